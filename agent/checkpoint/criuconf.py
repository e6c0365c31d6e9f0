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

from core.files import atomic_write

ANNOTATION = "org.criu.config"
OPTIONS = (
    "tcp-established\n"  # established TCP connections survive (under CRIU's network lock)
    "skip-in-flight\n"  # a connection still in a listen queue is dropped, the client retries
    "ext-unix-sk\n"
    "file-locks\n"
    "manage-cgroups=ignore\n"  # runc puts the tasks in their cgroups itself (optional argument: needs "=")
)
LAZY_RESTORE = "lazy-pages\n"  # memory arrives through a `criu lazy-pages` daemon (userfaultfd)
MASKED_DIRS = ("/proc/acpi", "/proc/asound", "/proc/scsi", "/sys/firmware")
"""The masked paths runc covers with an empty read-only tmpfs (where they are directories). CRIU
would tar each one at the dump and untar it at the restore, ~4 ms apiece while the workload is
frozen. Named external mounts instead, they are not dumped, and the restore binds an empty
read-only directory of the target host there: the same mask."""


def masked_key(path: str) -> str:
    return "fm-masked" + path.replace("/", "-")


def masked_mounts(empty_dir: Path) -> str:
    """ext-mount-map lines for both directions: <mountpoint>:<key> names a mount at the dump,
    <key>:<host path> says what to bind at the restore (each side ignores the other's lines)."""
    dump = "".join(f"ext-mount-map {path}:{masked_key(path)}\n" for path in MASKED_DIRS)
    restore = "".join(f"ext-mount-map {masked_key(path)}:{empty_dir}\n" for path in MASKED_DIRS)
    return dump + restore


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
        self.empty_dir = Path(state_dir) / "criu" / "masked"
        """What a restore binds over a masked directory: empty, and read-only in the container."""
        self.network_lock = network_lock

    def path(self, container_id: str) -> Path:
        return self.dir / f"{container_id}.conf"

    def write(self, container_id: str, extra: str = "") -> Path:
        """(Re)write the container's file atomically: the base options plus `extra`."""
        path = self.path(container_id)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.empty_dir.mkdir(mode=0o555, exist_ok=True)
        atomic_write(path, OPTIONS + f"network-lock {self.network_lock}\n" + masked_mounts(self.empty_dir) + extra)
        return path

    def remove(self, container_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(container_id).unlink()
