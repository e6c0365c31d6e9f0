"""The cache's driver: measures containerd's content store, applies policy.plan, deletes images.

All I/O of the cache is here; every decision is policy.py's. What an image's use and pin are is kept
on the image record itself as labels, so it survives agent restarts and needs no file of its own.
Deleting an image with a synchronous GC is all an eviction does: containerd then drops the blobs and
snapshots nothing references, and leaves what a container, a lease or another image still holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.cache.policy import Bound, Entry, Origin, Plan, freed_by, plan, recover_clock, sizes_of
from agent.cache.stats import CacheCounters
from agent.config import CacheConfig
from agent.containerd import Containerd, ImageRecord
from agent.errors import ContainerdNotFound, ImageNotFound
from agent.images.local import read_image
from agent.model import ImageSummary
from agent.oci import Platform, Reference
from core.errors import Conflict, FerrymanError, InvalidRequest
from core.tasks import TaskSet

log = logging.getLogger(__name__)

PINNED = "io.ferryman.cache.pinned"
USES = "io.ferryman.cache.uses"
CLOCK = "io.ferryman.cache.clock"
LAST_USE = "io.ferryman.cache.last-use"
ORIGIN = "io.ferryman.cache.origin"


class ImageInUse(Conflict):
    code = "image_in_use"


@dataclass(frozen=True)
class Measure:
    """The content store as one consistent-enough look: enough for a plan, never stored."""

    sizes: dict[str, int]
    held: frozenset[str]
    entries: list[Entry]
    records: dict[str, ImageRecord]


class CacheService:
    def __init__(
        self,
        cd: Containerd,
        config: CacheConfig,
        disk_path: str,
        counters: CacheCounters,
        platform: Platform,
        busy: Callable[[], Mapping[str, str]],
        pull: Callable[[str], Awaitable[ImageSummary]],
    ) -> None:
        self._cd = cd
        self._config = config
        self._disk_path = disk_path
        self._counters = counters
        self.layers_changed: Callable[[], None] = lambda: None
        """Told when the layers held here change (a fetch, an eviction): the agent registers again
        with the coordinator sooner, so its layer tracker names this host for what it now holds."""
        self._platform = platform
        self._busy = busy
        """Images at work that no container or lease may show yet, and why: pulls and migrations in
        progress (a migrated image is recorded before its container is created)."""
        self._pull = pull
        self.on_peers: Callable[[Mapping[str, int]], Awaitable[frozenset[str]]] | None = None
        """Which of some blobs (digest -> size) a peer holds (None: nobody to ask): policy.plan
        evicts those first."""
        self._clock: float | None = None
        """GDSF's clock (policy.py); recovered from the images' labels at the first look."""
        self._lock = asyncio.Lock()
        """One measure-and-evict at a time: two would plan over the same bytes."""
        self._tasks = TaskSet()

    async def start(self) -> None:
        self._tasks.spawn(self._every_interval(), "cache bound")

    async def close(self) -> None:
        await self._tasks.close()

    async def _every_interval(self) -> None:
        while True:
            await asyncio.sleep(self._config.interval)
            try:
                # an image pulled for a container that is not created yet has no container to keep it
                await self.enforce(recent=self._config.interval)
            except FerrymanError as exc:
                log.warning("cache: cannot enforce the bound", extra={"code": exc.code, "error": exc.message})

    # ------------------------------------------------------------------ the bound

    async def bound(self) -> Bound:
        high = self._config.max_bytes
        if not high:
            path = self._disk_path if await asyncio.to_thread(Path(self._disk_path).exists) else "/"
            st = await asyncio.to_thread(os.statvfs, path)
            high = max(1, int(st.f_blocks * st.f_frsize * self._config.max_fraction))
        return Bound(high=high, low=max(1, int(high * self._config.low_watermark)))

    async def enforce(self, just_used: str = "", recent: float = 0.0) -> Plan:
        """Evict what policy.plan chooses, so the store is back under the bound. `just_used` is the
        image whose use asked for this check: it is kept (it was fetched to be used). Images used
        within the last `recent` seconds are kept too (the periodic check: a client pulls, then
        creates its container from the image)."""
        async with self._lock:
            bound = await self.bound()
            used = sum(c.size for c in await self._cd.content.infos())
            self._counters.capacity.set(bound.high)
            self._counters.used.set(used)
            if used <= bound.high:
                # Under the bound (the usual case): no need to read every image's manifest.
                return Plan((), 0, 0, self._clock or 0.0)
            measure = await self._measure(just_used, recent)
            on_peers = await self._held_on_peers(measure)
            chosen = plan(measure.entries, measure.sizes, measure.held, bound, self._clock_of(measure), on_peers)
            used = sum(measure.sizes.values())
            for name in chosen.evict:
                used = await self._delete(name, used)
            self._counters.used.set(used)
            self._clock = chosen.clock
            if chosen.evict:
                log.info(
                    "cache: evicted",
                    extra={"images": list(chosen.evict), "bytes": chosen.freed, "short": chosen.short},
                )
            return chosen

    async def _held_on_peers(self, measure: Measure) -> frozenset[str]:
        """The blobs of the evictable images that another host holds; none when nobody can say."""
        if self.on_peers is None:
            return frozenset()
        evictable = set().union(*(e.blobs for e in measure.entries if not e.protected))
        blobs = {d: size for d, size in measure.sizes.items() if d in evictable}
        return await self.on_peers(blobs) if blobs else frozenset()

    async def _delete(self, name: str, used: int) -> int:
        """Delete one image with a synchronous GC; counts the bytes that left the store."""
        with contextlib.suppress(ContainerdNotFound):
            await self._cd.images.delete(name, sync=True)
        self.layers_changed()
        now = sum(c.size for c in await self._cd.content.infos())
        self._counters.evicted(max(0, used - now))
        return now

    # ------------------------------------------------------------------ uses and pins

    async def used(self, name: str, origin: Origin | None = None) -> None:
        """An image was pulled, imported, migrated here or given to a container: count the use, then
        keep the bound (the caller's image is the latest used, so it goes last)."""
        try:
            record = await self._cd.images.get(name)
        except ContainerdNotFound:
            return
        if self._clock is None:
            self._clock = self._clock_of(await self._measure())
        labels = {
            USES: str(_int(record.labels.get(USES)) + 1),
            CLOCK: repr(self._clock),
            LAST_USE: dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"),
        }
        if origin is not None:
            labels[ORIGIN] = origin.value
            self.layers_changed()
        with contextlib.suppress(ContainerdNotFound):
            await self._cd.images.update_labels(name, labels)
        try:
            await self.enforce(just_used=name)
        except FerrymanError as exc:
            log.warning("cache: cannot enforce the bound", extra={"code": exc.code, "error": exc.message})

    async def pin(self, ref: str, pinned: bool = True) -> dict[str, Any]:
        name = _name(ref)
        try:
            await self._cd.images.update_labels(name, {PINNED: "true" if pinned else ""})
        except ContainerdNotFound as exc:
            raise ImageNotFound(f"image {name} is not pulled on this host") from exc
        return {"name": name, "pinned": pinned}

    async def evict(self, ref: str) -> dict[str, Any]:
        """Evict one image now; ImageInUse (409) when it is protected (a container, a pin, a pull)."""
        name = _name(ref)
        async with self._lock:
            measure = await self._measure()
            entry = next((e for e in measure.entries if e.name == name), None)
            if entry is None:
                raise ImageNotFound(f"image {name} is not pulled on this host")
            if entry.protected:
                raise ImageInUse(f"image {name} cannot be evicted: {entry.protected}")
            used = sum(measure.sizes.values())
            now = await self._delete(name, used)
        return {"name": name, "evicted": True, "freed_bytes": max(0, used - now)}

    async def prefetch(self, ref: str, pin: bool = False) -> dict[str, Any]:
        """Pull an image without running it (a warm cache), and pin it if asked."""
        summary = await self._pull(ref)
        if pin:
            await self.pin(summary.name)
        return {**summary.to_json(), "pinned": pin}

    # ------------------------------------------------------------------ status

    async def status(self) -> dict[str, Any]:
        bound = await self.bound()
        measure = await self._measure()
        image_sizes = sizes_of(measure.entries, measure.sizes)
        pinned = [e for e in measure.entries if measure.records[e.name].labels.get(PINNED) == "true"]
        pinned_blobs = frozenset().union(*(e.blobs for e in pinned))
        pinned_bytes = sum(measure.sizes.get(d, 0) for d in pinned_blobs)
        used = sum(measure.sizes.values())
        self._counters.capacity.set(bound.high)
        self._counters.used.set(used)
        self._counters.pinned.set(pinned_bytes)
        self._counters.entries.set(len(measure.entries))
        images = []
        for e in measure.entries:
            others = [o for o in measure.entries if o.name != e.name]
            images.append(
                {
                    "name": e.name,
                    "size": image_sizes[e.name],
                    "unique_bytes": freed_by([e], others, measure.held, measure.sizes),
                    "uses": e.uses,
                    "last_use": measure.records[e.name].labels.get(LAST_USE),
                    "origin": e.origin.value,
                    "pinned": e in pinned,
                    "protected": e.protected or None,
                }
            )
        return {
            "capacity_bytes": bound.high,
            "low_watermark_bytes": bound.low,
            "used_bytes": used,
            "blobs": len(measure.sizes),
            "entries": len(measure.entries),
            "pinned_bytes": pinned_bytes,
            "leased_bytes": sum(measure.sizes.get(d, 0) for d in measure.held),
            **self._counters.to_json(),
            "images": images,
        }

    # ------------------------------------------------------------------ measuring

    def _clock_of(self, measure: Measure) -> float:
        return self._clock if self._clock is not None else recover_clock(measure.entries)

    async def _measure(self, just_used: str = "", recent: float = 0.0) -> Measure:
        cd = self._cd
        since = dt.datetime.now(dt.UTC).timestamp() - recent if recent > 0 else float("inf")
        sizes = {c.digest: c.size for c in await cd.content.infos()}
        held: set[str] = set()
        for lease in await cd.leases.list():
            held |= {rid for kind, rid in await cd.leases.resources(lease) if kind == "content"}
        users: dict[str, str] = {}
        for container in await cd.containers.list():
            users.setdefault(container.image, container.id)
        busy = {_name(ref): why for ref, why in self._busy().items()}
        records = {r.name: r for r in await cd.images.list()}
        entries = []
        for name, record in records.items():
            last_use = _time(record.labels.get(LAST_USE), record)
            blobs = {record.digest}
            with contextlib.suppress(ImageNotFound, ContainerdNotFound, InvalidRequest):
                image = await read_image(cd, name, self._platform)
                blobs |= {image.manifest_digest, image.config_digest, *image.layers}
            entries.append(
                Entry(
                    name=name,
                    blobs=frozenset(blobs),
                    uses=max(1, _int(record.labels.get(USES))),
                    clock=_float(record.labels.get(CLOCK)),
                    last_use=last_use,
                    origin=_origin(record.labels.get(ORIGIN)),
                    protected=_protected(
                        record, users.get(name), busy.get(name, ""), name == just_used or last_use >= since
                    ),
                )
            )
        return Measure(sizes, frozenset(held), entries, records)


def _protected(record: ImageRecord, container: str | None, busy: str, just_used: bool) -> str:
    if record.labels.get(PINNED) == "true":
        return "pinned"
    if container is not None:
        return f"in use by container {container}"
    if busy:
        return busy
    if just_used:
        return "just used"
    return ""


def _name(ref: str) -> str:
    try:
        return str(Reference.parse(ref))
    except InvalidRequest:
        return ref  # not a reference this agent pulls: compared as it is


def _int(text: str | None) -> int:
    try:
        return int(text or 0)
    except ValueError:
        return 0


def _float(text: str | None) -> float:
    try:
        return float(text or 0)
    except ValueError:
        return 0.0


def _time(text: str | None, record: ImageRecord) -> float:
    with contextlib.suppress(ValueError, TypeError):
        return dt.datetime.fromisoformat(text or "").timestamp()
    return record.created_at.replace(tzinfo=dt.UTC).timestamp() if record.created_at else 0.0


def _origin(text: str | None) -> Origin:
    try:
        return Origin(text or Origin.REGISTRY)
    except ValueError:
        return Origin.REGISTRY
