"""Volume groups: the containers of one host that share a volume migrate together, with the volume.

A shared volume is a directory of its host (agent/runtime/volumes.py), so a container that mounts
one cannot move alone: the others would lose its writes and it would lose theirs. Asked to migrate
any of them, the source agent migrates the whole group, every container that shares a volume with
it (transitively), to the one target, each by its own pre-copy migration, in step:

FROZEN    every member is frozen and dumped: nothing writes the volumes any more
VOLUMES   the carrier (the container asked for) sends each volume as a tar in its own stream; the
          target unpacks them before the carrier's restore, the others restore after it
RESTORED  every member's copy is restored, paused: only then does any of them decide to commit

A member that fails before RESTORED breaks the group: every member rolls back (the sources resume,
the targets remove their copies and the volumes they received). After the commit the source removes
its volumes. Post-copy modes are refused for groups: their decision cannot wait for the others.
"""

from __future__ import annotations

import asyncio
import tarfile
from collections.abc import Collection, Coroutine, Iterable, Mapping
from pathlib import Path
from typing import Any

from core.errors import FerrymanError

VOLUME_FILE_PREFIX = "volume-"
VOLUME_FILE_SUFFIX = ".tar"


class GroupBroken(FerrymanError):
    code = "group_broken"
    http_status = 409


def volume_file(name: str) -> str:
    """The name a volume's tar goes by in the carrier's stream."""
    return f"{VOLUME_FILE_PREFIX}{name}{VOLUME_FILE_SUFFIX}"


def volume_of_file(file_name: str) -> str | None:
    """The volume a file of the stream carries, or None for CRIU's own images."""
    if file_name.startswith(VOLUME_FILE_PREFIX) and file_name.endswith(VOLUME_FILE_SUFFIX):
        return file_name[len(VOLUME_FILE_PREFIX) : -len(VOLUME_FILE_SUFFIX)]
    return None


def split_volumes(label: str) -> set[str]:
    """The volume names of a container's volumes label (comma-separated)."""
    return {v for v in label.split(",") if v}


def volume_group(start: str, volumes_of: Mapping[str, Collection[str]]) -> tuple[list[str], set[str]]:
    """The containers that share a volume with `start`, transitively (`start` first, then sorted),
    and the volumes they mount; `volumes_of` maps each container of the host to its volumes."""
    members, volumes = {start}, set(volumes_of.get(start, ()))
    grew = True
    while grew:
        grew = False
        for container, mounted in volumes_of.items():
            if container not in members and volumes.intersection(mounted):
                members.add(container)
                volumes.update(mounted)
                grew = True
    return [start, *sorted(members - {start})], volumes


def pack_volume(directory: Path, tar_path: Path) -> None:
    with tarfile.open(tar_path, "w") as tar:
        tar.add(directory, arcname=".")


def unpack_volume(tar_path: Path, directory: Path) -> None:
    """Unpack into `directory`; the "data" filter refuses links and paths that leave it."""
    directory.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tar_path) as tar:
        tar.extractall(directory, filter="data")


class MigrationGroup:
    """The steps the members of one volume group take together on the source (see the module doc)."""

    def __init__(self, members: Iterable[str], carrier: str, volumes: Mapping[str, Path]) -> None:
        self.members = list(members)
        self.carrier = carrier
        self.volumes = dict(volumes)
        """Volume name -> its directory on this host."""
        self._frozen = asyncio.Barrier(len(self.members))
        self._restored = asyncio.Barrier(len(self.members))
        self._placed = asyncio.Event()
        self._broken = asyncio.Event()
        self.error = ""

    def break_group(self, container: str, reason: str) -> None:
        """A member failed before its decision: every member rolls back."""
        if not self._broken.is_set():
            self.error = f"{container} of the volume group failed: {reason}"
            self._broken.set()

    async def _wait(self, step: Coroutine[Any, Any, object]) -> None:
        """Until `step` is done, or GroupBroken as soon as a member breaks the group."""
        waiting = asyncio.ensure_future(step)
        broken = asyncio.ensure_future(self._broken.wait())
        try:
            done, _ = await asyncio.wait({waiting, broken}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            broken.cancel()
            if not waiting.done():
                waiting.cancel()
        if waiting not in done:
            raise GroupBroken(self.error)
        waiting.result()

    async def all_frozen(self) -> None:
        await self._wait(self._frozen.wait())

    async def volumes_placed(self) -> None:
        """The non-carriers restore once the carrier's target has the volumes."""
        await self._wait(self._placed.wait())

    def placed(self) -> None:
        self._placed.set()

    async def all_restored(self) -> None:
        await self._wait(self._restored.wait())
