"""What the installed CRIU can do on this kernel, detected once at agent start."""

from __future__ import annotations

import asyncio
import re
from dataclasses import asdict, dataclass
from typing import Any

from agent.errors import FerrymanError

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
