"""Pre-dumps through runc, for kernels with soft-dirty tracking.

containerd's checkpoint API has no pre-dump and no parent images, so on such kernels the pre-copy
rounds call runc directly on the container containerd created (same runc root, same id). CRIU then
dumps only the pages written since the previous round. Not exercised on kernels without
mem_dirty_track (CRIU refuses pre-dump there); the agent picks the full-dump path instead.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from core.errors import FerrymanError

DEFAULT_RUNC_ROOT = "/run/containerd/runc"


class RuncCheckpointError(FerrymanError):
    code = "checkpoint_failed"
    http_status = 500


def runc_state_root(runc_root: str, namespace: str) -> str:
    """containerd's runc shim keeps each namespace's containers under <root>/<namespace>."""
    return str(Path(runc_root or DEFAULT_RUNC_ROOT) / namespace)


def checkpoint_argv(
    state_root: str,
    container_id: str,
    image_dir: Path,
    work_dir: Path,
    *,
    pre_dump: bool,
    parent: Path | None,
) -> list[str]:
    argv = ["runc", "--root", state_root, "checkpoint", "--image-path", str(image_dir), "--work-path", str(work_dir)]
    if pre_dump:
        argv.append("--pre-dump")
    else:
        argv += ["--leave-running", "--tcp-established"]  # a paused task stays frozen after the dump
    if parent is not None:
        # CRIU wants the parent relative to the image directory.
        argv += ["--parent-path", os.path.relpath(parent, image_dir)]
    return [*argv, container_id]


async def runc_checkpoint(
    state_root: str,
    container_id: str,
    image_dir: Path,
    work_dir: Path,
    *,
    pre_dump: bool,
    parent: Path | None = None,
) -> None:
    argv = checkpoint_argv(state_root, container_id, image_dir, work_dir, pre_dump=pre_dump, parent=parent)
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    if proc.returncode != 0:
        what = "pre-dump" if pre_dump else "dump"
        raise RuncCheckpointError(f"runc {what} of {container_id} failed: {err.decode(errors='replace').strip()}")
