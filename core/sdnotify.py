"""The systemd readiness protocol (sd_notify) without libsystemd: one datagram to $NOTIFY_SOCKET."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


def notify(state: str, socket_path: str | None = None) -> bool:
    """Send `state` (e.g. "READY=1") to the service manager; False when there is none or it failed.

    `socket_path` defaults to $NOTIFY_SOCKET. A leading "@" names a Linux abstract socket.
    """
    addr = socket_path if socket_path is not None else os.environ.get("NOTIFY_SOCKET", "")
    if not addr:
        return False  # not started by systemd (or Type= is not notify): nothing to tell
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    elif not addr.startswith("/"):
        log.debug("unsupported NOTIFY_SOCKET address", extra={"notify_socket": addr})
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # Non-blocking: this is called from the event loop and must never stall it on a full queue.
            sock.setblocking(False)
            sock.sendto(state.encode(), addr)
    except OSError as exc:
        log.warning("sd_notify failed", extra={"state": state, "error": str(exc)})
        return False
    return True
