"""Read files out of an image's committed snapshot (for /etc/passwd lookups) through a read-only view."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import tempfile
from pathlib import Path

from agent.containerd import Containerd, Mount
from agent.errors import ContainerdError
from core.errors import FerrymanError


async def _run(*argv: str) -> None:
    proc = await asyncio.create_subprocess_exec(*argv, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise FerrymanError(f"{argv[0]} failed: {err.decode(errors='replace').strip()}")


async def read_snapshot_files(cd: Containerd, chain_id: str, paths: list[str]) -> dict[str, str | None]:
    """Contents of `paths` (absolute, inside the image) or None where a file is absent."""
    key = f"view-{secrets.token_hex(6)}"
    mounts: list[Mount] = await cd.snapshots.view(key, chain_id)
    try:
        with tempfile.TemporaryDirectory(prefix="ferryman-view-") as target:
            await _mount_all(mounts, target)
            try:
                return await asyncio.to_thread(_read_inside, Path(target), paths)
            finally:
                await _run("umount", target)
    finally:
        with contextlib.suppress(ContainerdError):
            await cd.snapshots.remove(key)


def _read_inside(root: Path, paths: list[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    top = root.resolve()
    for path in paths:
        # Resolve inside the view only: a symlinked /etc/passwd must not reach the host.
        real = (root / path.lstrip("/")).resolve()
        out[path] = real.read_text(errors="replace") if real.is_relative_to(top) and real.is_file() else None
    return out


async def _mount_all(mounts: list[Mount], target: str) -> None:
    if len(mounts) != 1:
        raise FerrymanError(f"expected one mount for a snapshot view, got {len(mounts)}")
    m = mounts[0]
    options = list(m.options)
    if m.type == "bind":  # a one-layer view is a bind mount: "bind" is an option, not a filesystem type
        argv = ["mount", "-o", ",".join(["bind", *options]), m.source, target]
    else:
        argv = ["mount", "-t", m.type, *(["-o", ",".join(options)] if options else []), m.source, target]
    await _run(*argv)
