"""Named network namespaces, and running blocking code inside one, without forking.

Network namespace membership is per *thread* (setns/unshare with CLONE_NEWNET change only the caller),
so everything here runs in a dedicated, short-lived thread: a pooled thread must never be left in a
container's namespace. pyroute2's own `netns.create` and `IPRoute(netns=...)` fork a child instead,
which is best avoided in a process that runs gRPC threads.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from pyroute2 import netns as pr_netns

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
MNT_DETACH = 2
THREAD_TIMEOUT = 60.0
"""Seconds a namespace thread may take; netlink calls answer in milliseconds, so this is a hang."""

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def run_in_thread(fn: Callable[[], T], name: str) -> T:
    """Run `fn` in a new thread and return (or raise) its result; the thread is never reused."""
    result: list[T] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            result.append(fn())
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=body, name=name, daemon=True)
    thread.start()
    thread.join(THREAD_TIMEOUT)
    if thread.is_alive():
        raise TimeoutError(f"{name}: no answer within {THREAD_TIMEOUT}s")
    if error:
        raise error[0]
    return result[0]


def call_in_netns(path: str, fn: Callable[[], T]) -> T:
    """Run `fn` in a fresh thread that joined the network namespace bound at `path`."""

    def body() -> T:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _check(_libc.setns(fd, CLONE_NEWNET), f"setns({path})")
        finally:
            os.close(fd)
        return fn()

    return run_in_thread(body, f"netns:{Path(path).name}")


def is_netns_mount(path: str) -> bool:
    """True when `path` is a bind-mounted namespace (not a stale empty file left by a crash)."""
    try:
        return Path(path).stat().st_dev != Path(path).parent.stat().st_dev
    except FileNotFoundError:
        return False


def create_netns(path: str) -> None:
    """A new, empty network namespace bound at `path`, as `ip netns add` does (blocking).

    A throw-away thread unshares its network namespace and pyroute2's `attach` bind-mounts that
    thread's namespace (after making the directory a shared mount, like iproute2).
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)

    def body() -> None:
        _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
        pr_netns.attach(path, "thread-self")

    try:
        run_in_thread(body, f"netns-create:{Path(path).name}")
    except BaseException:
        remove_netns(path)
        raise


def remove_netns(path: str) -> None:
    """Unmount and remove the name; the namespace dies with its last process or interface. Idempotent."""
    if _libc.umount2(path.encode(), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):  # not a mount point / already gone
            raise OSError(err, f"umount {path}: {os.strerror(err)}")
    Path(path).unlink(missing_ok=True)
