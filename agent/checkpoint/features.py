"""What the installed CRIU can do on this kernel, detected once at agent start."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from core.errors import FerrymanError

MIN_VERSION = (4, 2, 1)


class CriuUnavailable(FerrymanError):
    code = "criu_unavailable"
    http_status = 503


@dataclass(frozen=True)
class CriuFeatures:
    version: str
    mem_dirty_track: bool
    """Soft-dirty tracking: CRIU pre-dump works and pre-copy can use parent images."""
    uffd: bool
    """userfaultfd (non-cooperative): lazy pages / post-copy are possible."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


async def _run(criu: str, *args: str) -> tuple[int, str]:
    try:
        proc = await asyncio.create_subprocess_exec(
            criu, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
    except FileNotFoundError as exc:
        raise CriuUnavailable(f"{criu} not found: run scripts/setup-host") from exc
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace")


async def detect(criu: str = "criu") -> CriuFeatures:
    rc, out = await _run(criu, "--version")
    match = re.search(r"Version:\s*([0-9.]+)", out)
    if rc != 0 or match is None:
        raise CriuUnavailable(f"cannot tell the CRIU version: {out.strip()}")
    version = match.group(1)
    parts = tuple(int(p) for p in version.split("."))
    if parts < MIN_VERSION:
        need = ".".join(map(str, MIN_VERSION))
        raise CriuUnavailable(f"CRIU {version} is too old for this kernel (need >= {need})")
    dirty_rc, _ = await _run(criu, "check", "--feature", "mem_dirty_track")
    uffd_rc, _ = await _run(criu, "check", "--feature", "uffd-noncoop")
    return CriuFeatures(version=version, mem_dirty_track=dirty_rc == 0, uffd=uffd_rc == 0)


async def network_lock_method(criu: str = "criu") -> str:
    """ "nftables" where this CRIU and kernel can lock the network with it, else "iptables"."""
    try:
        rc, _ = await _run(criu, "check", "--feature", "network_lock_nftables")
    except CriuUnavailable:
        return "iptables"
    return "nftables" if rc == 0 else "iptables"


KDAT_CACHE = Path("/run/criu.kdat")


async def prime_kdat_cache(criu: str = "criu", cache: Path = KDAT_CACHE) -> bool:
    """Give CRIU its kernel-feature cache where it will not keep one itself; True if written.

    CRIU probes the kernel (~40 ms) at every start unless /run/criu.kdat holds the result, and it
    writes that file only when /run is a tmpfs, which a reboot clears (systemd hosts). Where /run is
    not a tmpfs every dump, restore and lazy-pages start would pay the probe inside the downtime. So
    the agent runs `criu check` with a private tmpfs on /run (its own mount namespace) and installs
    the cache it leaves there, at each start: it is then fresh for this boot and this CRIU.
    """
    if _is_tmpfs(cache.parent):
        return False
    script = f"mount -t tmpfs -o size=1m ferryman-kdat /run && {criu} check >/dev/null 2>&1; cat /run/{cache.name}"
    try:
        proc = await asyncio.create_subprocess_exec(
            "unshare", "--mount", "--propagation", "private", "sh", "-c", script,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        data, _ = await proc.communicate()
    except OSError:
        return False
    if proc.returncode != 0 or not data:
        return False
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")  # agents on one machine (tests) race here
    try:
        await asyncio.to_thread(_write_private, tmp, data)
        await asyncio.to_thread(tmp.replace, cache)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        return False  # CRIU probes the kernel itself, as it would anyway
    return True


def _is_tmpfs(path: Path) -> bool:
    try:
        with open("/proc/self/mounts") as mounts:
            best, fstype = "", ""
            for line in mounts:
                fields = line.split()
                where = fields[1]
                if (str(path) == where or str(path).startswith(where.rstrip("/") + "/")) and len(where) > len(best):
                    best, fstype = where, fields[2]
    except OSError:
        return False
    return fstype == "tmpfs"


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
