"""The CRIU options every ferryman container is dumped and restored with.

runc hands CRIU the file named by the container's `org.criu.config` annotation, and its settings
override runc's own RPC options. That is the only way to give the restore side options such as
tcp-established: containerd 1.6 passes none to `runc restore`. Each container gets its own file, so
one migration can add post-copy options for the length of one dump or restore without touching
any other container's checkpoints.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

ANNOTATION = "org.criu.config"
OPTIONS = (
    "tcp-established\n"  # established TCP connections survive (under CRIU's network lock)
    "skip-in-flight\n"  # a connection still in a listen queue is dropped, the client retries
    "ext-unix-sk\n"
    "file-locks\n"
    "manage-cgroups=ignore\n"  # runc puts the tasks in their cgroups itself (optional argument: needs "=")
)
LAZY_RESTORE = "lazy-pages\n"  # memory arrives through a `criu lazy-pages` daemon (userfaultfd)


def lazy_dump(port: int) -> str:
    """A dump that keeps memory in CRIU's page pipes and serves it on 127.0.0.1:port, once."""
    return f"lazy-pages\naddress 127.0.0.1\nport {port}\n"


class CriuConfigs:
    """One CRIU config file per container under <state_dir>/criu/containers.

    `network_lock` is how CRIU keeps TCP peers out while a container is frozen: "nftables" (set up
    in-process through libnftables, a few ms) where CRIU and the kernel support it, else "iptables"
    (CRIU runs iptables-restore at dump and at restore: ~50 ms each with iptables-nft, all of it
    downtime). The restore takes the method the dump recorded."""

    def __init__(self, state_dir: str, network_lock: str = "iptables") -> None:
        if network_lock not in ("iptables", "nftables"):
            raise ValueError(f"unknown network lock method {network_lock!r}")
        self.dir = Path(state_dir) / "criu" / "containers"
        self.network_lock = network_lock

    def path(self, container_id: str) -> Path:
        return self.dir / f"{container_id}.conf"

    def write(self, container_id: str, extra: str = "") -> Path:
        """(Re)write the container's file atomically: the base options plus `extra`."""
        path = self.path(container_id)
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(OPTIONS + f"network-lock {self.network_lock}\n" + extra)
        tmp.replace(path)
        return path

    def remove(self, container_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(container_id).unlink()
