"""Named network namespaces for tests: create, configure, run things inside, find what lives in them.

Only the *network* namespace is ever entered (`nsenter --net`, or setns(2) in a throw-away thread):
`ip netns exec` would also unshare the mount namespace, and mounts made in there (containerd's
overlays) would then be invisible to the test process and to teardown.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import http.client
import os
import socket
import subprocess
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

NETNS_DIR = Path("/run/netns")
IP = "ip"
NSENTER = "nsenter"
CLONE_NEWNET = 0x40000000

T = TypeVar("T")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def netns_path(netns: str) -> Path:
    """A namespace is a name in /run/netns, or the absolute path of a bound one (such as a
    container's, in a mesh host's netns_dir)."""
    return Path(netns) if netns.startswith("/") else NETNS_DIR / netns


def nsenter_argv(netns: str | None) -> list[str]:
    """The argv prefix that runs a program in `netns` (nothing for the current namespace).

    nsenter execs the program after setns(2) (no fork is needed for a net namespace), so the pid a
    caller gets back is the program's own and signals reach it directly.
    """
    if netns is None:
        return []
    return [NSENTER, f"--net={netns_path(netns)}", "--"]


def run(
    argv: Sequence[str],
    *,
    netns: str | None = None,
    check: bool = True,
    timeout: float = 30,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `argv` (in `netns` when given) to completion; CalledProcessError carries stderr."""
    full = [*nsenter_argv(netns), *argv]
    res = subprocess.run(full, input=input, capture_output=True, text=True, timeout=timeout, check=False)
    if check and res.returncode != 0:
        raise subprocess.CalledProcessError(res.returncode, full, res.stdout, res.stderr)
    return res


async def arun(
    argv: Sequence[str],
    *,
    netns: str | None = None,
    check: bool = True,
    within: float = 30,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """`run` without blocking the event loop; the child is killed if `within` seconds pass."""
    full = [*nsenter_argv(netns), *argv]
    proc = await asyncio.create_subprocess_exec(
        *full,
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(input.encode() if input is not None else None), within)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    res = subprocess.CompletedProcess(full, proc.returncode or 0, out.decode(), err.decode())
    if check and res.returncode != 0:
        raise subprocess.CalledProcessError(res.returncode, full, res.stdout, res.stderr)
    return res


def ip_argv(args: Sequence[str], netns: str | None = None, batch: bool = False) -> list[str]:
    # `ip -n` switches only for the lifetime of this short `ip` process, so its private mount
    # namespace (it remounts /sys) does no harm here.
    argv = [IP]
    if netns is not None and netns.startswith("/"):
        argv = [*nsenter_argv(netns), IP]  # `ip -n` takes only names in /run/netns
    elif netns is not None:
        argv += ["-n", netns]
    if batch:
        argv += ["-force", "-batch", "-"]
    return [*argv, *args]


def ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(ip_argv(args, netns), check=check)


async def aip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    return await arun(ip_argv(args, netns), check=check)


async def aip_batch(lines: Iterable[str], netns: str | None = None, check: bool = True) -> None:
    """Several `ip` commands in one process (one line each, without the leading `ip`)."""
    text = "".join(f"{line}\n" for line in lines)
    if text:
        await arun(ip_argv((), netns, batch=True), input=text, check=check)


def list_netns() -> list[str]:
    """Names of the named network namespaces (from /run/netns, no subprocess)."""
    try:
        return sorted(p.name for p in NETNS_DIR.iterdir())
    except FileNotFoundError:
        return []


def add_netns(name: str) -> None:
    ip("netns", "add", name)


def del_netns(name: str) -> None:
    """Remove the name; the namespace itself dies when its last process or interface ref is gone."""
    if netns_path(name).exists():
        ip("netns", "del", name, check=False)


def netns_inode(name: str) -> int | None:
    try:
        return netns_path(name).stat().st_ino
    except OSError:
        return None


def pid_netns_inode(pid: int) -> int | None:
    try:
        return Path(f"/proc/{pid}/ns/net").stat().st_ino
    except OSError:
        return None


def pid_started_at(pid: int) -> float | None:
    """When `pid` started, in seconds since boot (CLOCK_BOOTTIME); None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 (starttime, in clock ticks); the fields after the command name start at field 3.
    return int(stat.rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")


def pids_in_netns(inodes: Iterable[int]) -> list[int]:
    """Every process (thread group) whose network namespace is one of `inodes`."""
    wanted = set(inodes)
    if not wanted:
        return []
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and pid_netns_inode(int(entry.name)) in wanted:
            found.append(int(entry.name))
    return found


def link_names(netns: str | None = None) -> list[str]:
    """Interface names in `netns` (default: the current one)."""
    res = ip("-o", "link", "show", netns=netns, check=False)
    names: list[str] = []
    for line in res.stdout.splitlines():
        # "3: name@peer: <FLAGS> ..." -> "name"
        parts = line.split(":", 2)
        if len(parts) >= 2:
            names.append(parts[1].strip().split("@", 1)[0])
    return names


# ----- code running inside a namespace, in-process ---------------------------------------------------


def call_in_netns(netns: str, fn: Callable[..., T], *args: object) -> T:
    """Run `fn(*args)` in a fresh thread that has joined `netns`, and return (or raise) its result.

    setns(CLONE_NEWNET) changes only the calling thread; using a new thread each time means no
    pooled thread is ever left in the wrong namespace.
    """
    result: list[T] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            fd = os.open(netns_path(netns), os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({netns}): {os.strerror(err)}")
            finally:
                os.close(fd)
            result.append(fn(*args))
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=body, name=f"netns-{netns}", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


async def acall_in_netns(netns: str, fn: Callable[..., T], *args: object) -> T:
    return await asyncio.to_thread(call_in_netns, netns, fn, *args)


def _write_sysctls(values: dict[str, str]) -> None:
    for key, value in values.items():
        Path("/proc/sys", *key.split(".")).write_text(value)


def set_sysctls(netns: str, values: dict[str, str]) -> None:
    """Write net.* sysctls of `netns` (they are per namespace and resolved by the writing thread)."""
    call_in_netns(netns, _write_sysctls, values)


def _tcp_connect(host: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


async def can_connect(netns: str | None, host: str, port: int, within: float = 1.0) -> bool:
    """True when a TCP connection from `netns` to host:port succeeds within `within` seconds."""
    if netns is None:
        return await asyncio.to_thread(_tcp_connect, host, port, within)
    return await acall_in_netns(netns, _tcp_connect, host, port, within)


def _http_status(host: str, port: int, path: str, timeout: float) -> int | None:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


async def http_status(netns: str | None, host: str, port: int, path: str = "/", within: float = 2.0) -> int | None:
    """Status of a plain-HTTP GET made from inside `netns`, or None when there was no answer."""
    if netns is None:
        return await asyncio.to_thread(_http_status, host, port, path, within)
    return await acall_in_netns(netns, _http_status, host, port, path, within)


# ----- a way in from this namespace --------------------------------------------------------------------


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setblocking(False)
    return sock


class LoopbackRelay:
    """A TCP port on 127.0.0.1 in this namespace whose connections are relayed, byte for byte, to
    host:port inside `netns` (TLS passes through untouched).

    A mesh adds nothing to the root namespace's network, so this is how a program there (ferryctl
    at an operator's shell) reaches a service on the fabric, such as the coordinator. The relay
    lives in the process that starts it.
    """

    def __init__(self, netns: str, host: str, port: int, connect_timeout: float = 5.0) -> None:
        self.netns = netns
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout
        self.listen_port = 0
        """The port on 127.0.0.1, once started."""
        self._server: asyncio.Server | None = None
        self._relays: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.listen_port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._relays):
            task.cancel()
        await asyncio.gather(*self._relays, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._relays.add(task)
        ends = [writer]
        try:
            sock = await acall_in_netns(self.netns, _connect, self.host, self.port, self.connect_timeout)
            up_reader, up_writer = await asyncio.open_connection(sock=sock)
            ends.append(up_writer)
            await asyncio.gather(_pipe(reader, up_writer, ends), _pipe(up_reader, writer, ends))
        except OSError:
            pass  # the far end is down or went away: the client sees its connection close
        finally:
            for end in ends:
                end.close()
            self._relays.discard(task)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ends: list[asyncio.StreamWriter]) -> None:
    """Copy until EOF, then pass the EOF on; on an error close both connections (which ends the
    other direction too)."""
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        for end in ends:
            end.close()
