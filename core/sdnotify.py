"""The systemd readiness protocol (sd_notify) without libsystemd: one datagram to $NOTIFY_SOCKET.

With `WatchdogSec=` in a unit, systemd sets $WATCHDOG_USEC (and $WATCHDOG_PID) for the main process
and restarts the service when no "WATCHDOG=1" arrives within that time; `watchdog_interval` says how
often to send it (half the limit, as sd_watchdog_enabled(3) advises).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

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


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between "WATCHDOG=1" pings, or None when systemd expects none from process `pid`.

    None when $WATCHDOG_USEC is unset, not a positive integer, or $WATCHDOG_PID names another process
    (the variables were inherited, not meant for us); a malformed value is logged, not raised.
    """
    usec = environ.get("WATCHDOG_USEC", "")
    if not usec:
        return None
    owner = environ.get("WATCHDOG_PID", "")
    if owner and owner != str(pid):
        return None
    if not usec.isdigit() or int(usec) == 0:
        log.warning("ignoring a malformed WATCHDOG_USEC", extra={"watchdog_usec": usec})
        return None
    return int(usec) / 2_000_000
