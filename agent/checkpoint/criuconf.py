"""The CRIU options every ferryman container is dumped and restored with.

runc hands CRIU the file named by the container's `org.criu.config` annotation, and its settings
override runc's own RPC options. That is the only way to give the restore side options such as
tcp-established: containerd 1.6 passes none to `runc restore`.
"""

from __future__ import annotations

from pathlib import Path

ANNOTATION = "org.criu.config"
OPTIONS = (
    "tcp-established\n"  # established TCP connections survive (under CRIU's network lock)
    "skip-in-flight\n"  # a connection still in a listen queue is dropped, the client retries
    "ext-unix-sk\n"
    "file-locks\n"
)


def ensure_criu_config(state_dir: str) -> Path:
    """Write <state_dir>/criu/runc.conf if it is missing or different; returns its path."""
    path = Path(state_dir) / "criu" / "runc.conf"
    if path.exists() and path.read_text() == OPTIONS:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(OPTIONS)
    tmp.replace(path)
    return path
