"""The assembly service: a composition manifest in, an ordinary containerd image out.

    parse (manifest.py, pure) -> resolve each node against this host, then its registry (sizes,
    media types, diff IDs: nothing stored) -> the layers missing here, in priority order
    (priority.py, pure) -> fetched through the pull's path (local -> peers -> registry), at most
    `prefetch_granularity` at once -> applied bottom up onto snapshots named by chain ID, starting
    above the highest one that already exists -> config, manifest and image record, last.

All of it runs under one containerd lease, as a pull does: a failure leaves no image, and the lease
(deleted with a synchronous GC on failure, or expiring if the agent dies) lets containerd reclaim
whatever was made. A manifest that fails validation or resolution stops before the lease exists:
nothing is fetched or created for it. Concurrent assemblies of one composition are one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from agent.cache.policy import Origin
from agent.composition import paths, priority
from agent.composition.costs import ContainerdCpu, CostMeter, LayerHistory
from agent.composition.image import ANNOTATION_NAME, ANNOTATION_WORKLOAD, ComposedImage, compose
from agent.composition.manifest import Composition, InvalidComposition, Node, parse, unordered_undeclared
from agent.config import PullConfig
from agent.containerd import Containerd, ImageRecord
from agent.errors import ContainerdNotFound, ImageNotFound, InvalidManifest, ManifestNotFound, PlatformNotFound
from agent.images import labels as L
from agent.images.ingest import ensure_labels, put_blob
from agent.images.local import read_image
from agent.images.sources import BlobSource, ServedFrom, TransferStarts
from agent.images.unpack import unpack_layer
from agent.manifests import ImageManifest, decode_json, parse_document, parse_image_config
from agent.oci import Descriptor, Digest, Platform, Reference, chain_ids
from agent.registry.client import RegistryClient
from core.errors import InvalidRequest, NotFound
from core.singleflight import SingleFlight

log = logging.getLogger(__name__)

FILE_LISTS_KEPT = 64
"""Layer file lists kept in memory (by digest) for the conflicting-paths check."""
CONFIGS_KEPT = 256
"""Image configs kept in memory (by digest), each a few KB."""
WARM_TTL = 600.0
"""Seconds a warmed layer is kept by its lease when the request names no ttl."""
MAX_WARM_TTL = 7 * 24 * 3600.0


class Fetcher(Protocol):
    """The pull's blob path (agent.images.pull.Puller)."""

    def source(self, ref: Reference) -> BlobSource: ...

    def warm_source(self, ref: Reference) -> BlobSource:
        """`source`, for a warm: it yields to the pulls in flight (agent/images/pullgate.py)."""
        ...

    async def fetch_blob(self, source: BlobSource, desc: Descriptor, on_bytes: Callable[[int], None]) -> int: ...


class Uses(Protocol):
    async def used(self, name: str, origin: Origin | None = None) -> None: ...


@dataclass(frozen=True)
class RefLayers:
    """What an image reference says about its layers: descriptor and diff ID by digest, its config."""

    layers: dict[str, tuple[Descriptor, str]]
    config: dict[str, Any]
    where: str
    """"local" or "registry"."""


@dataclass(frozen=True)
class StackLayer:
    node: Node
    desc: Descriptor
    diff_id: str
    chain_id: str
    present: bool
    """The blob is in this host's content store."""
    assembled: bool
    """The snapshot of its chain ID exists."""
    dependents: frozenset[str]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.node.id,
            "ref": self.node.ref,
            "digest": self.desc.digest,
            "media_type": self.desc.media_type,
            "size": self.desc.size,
            "diff_id": self.diff_id,
            "chain_id": self.chain_id,
            "present": self.present,
            "assembled": self.assembled,
            "dependents": len(self.dependents),
        }


@dataclass(frozen=True)
class Resolved:
    composition: Composition
    stack: tuple[StackLayer, ...]
    image: ComposedImage
    fetch_order: tuple[str, ...]
    granularity: int
    unchecked: tuple[tuple[Node, Node], ...] = ()
    """Unordered node pairs whose paths are checked once their missing blobs are fetched (before
    either is applied): one or both declare no `paths` and their layer is not on this host yet."""

    @property
    def missing(self) -> list[StackLayer]:
        return [la for la in self.stack if not la.present]

    def to_json(self) -> dict[str, Any]:
        ids = {la.node.id: la.desc.digest for la in self.stack}
        return {
            "version": 1,
            "name": self.composition.name,
            "workload": self.composition.workload or None,
            "image": self.image.name,
            "digest": self.image.manifest.digest,
            "prefetch_granularity": self.granularity,
            "stack": [la.to_json() for la in self.stack],
            "missing": [la.desc.digest for la in self.missing],
            "missing_bytes": sum(la.desc.size for la in self.missing),
            "preference": [{"id": i, "digest": ids[i]} for i in self.composition.preference],
            "fetch_order": list(self.fetch_order),
            "paths_checked_after_fetch": sorted({n.id for pair in self.unchecked for n in pair}),
        }


@dataclass
class Timeline:
    started: float = field(default_factory=time.monotonic)
    events: list[dict[str, Any]] = field(default_factory=list)

    def mark(self, event: str, digest: str, **detail: Any) -> float:
        """`detail`: what the event took (seconds, bytes, source), shown with it."""
        at = time.monotonic() - self.started
        self.events.append({"at": round(at, 6), "event": event, "digest": digest, **detail})
        return at


class CompositionService:
    def __init__(
        self,
        cd: Containerd,
        registry: RegistryClient,
        fetcher: Fetcher,
        config: PullConfig,
        platform: Platform,
        state_dir: Path,
        has_peers: Callable[[], bool] = lambda: False,
        containerd_socket: str = "",
    ) -> None:
        self._cd = cd
        self._registry = registry
        self._fetcher = fetcher
        self._config = config
        self._platform = platform
        self._has_peers = has_peers
        self.costs = CostMeter()
        self._cpu = ContainerdCpu(containerd_socket)
        self.history = LayerHistory(state_dir / "composition" / "history.json")
        self.uses: Uses | None = None
        """The layer cache (set by the agent): each assembled image counts as a use."""
        self.on_warmed: Callable[[str, int, float, str], None] = lambda digest, size, ttl, model: None
        """Told of each warm (digest, size, lease seconds, model version): the cache counts its fate."""
        self.on_kept: Callable[[str, int, float, str], None] = lambda digest, size, ttl, model: None
        """Told of each keep (a warm request for a layer here already) as on_warmed is of a warm."""
        self.on_local: Callable[[str], None] = lambda digest: None
        """Told of each layer an assembly found local (a warm of it is then a hit)."""
        self._flights: SingleFlight[str, None, dict[str, Any]] = SingleFlight("assemble", lambda _: None)
        self._files: dict[str, paths.LayerFiles] = {}
        """Layer file lists by digest (the newest FILE_LISTS_KEPT), for the conflicting-paths check."""
        self._configs: dict[str, bytes] = {}
        """Image configs by digest (the newest CONFIGS_KEPT): content-addressed, so a tag's next
        resolve reads only its manifest."""

    def costs_json(self) -> dict[str, Any]:
        """The measured fetch rates per source and assembly cost per byte (GET /v1/assembly/costs)."""
        return self.costs.to_json()

    def assembling(self) -> list[str]:
        """Images being assembled now (the cache must not evict them)."""
        return list(self._flights.in_flight())

    # ------------------------------------------------------------------ resolve

    async def resolve(self, document: Any) -> Resolved:
        """Validate `document` and resolve it against this host and its registries; InvalidComposition
        names every problem. Reads manifests and configs, stores nothing."""
        comp = parse(document)
        refs: dict[str, RefLayers] = {}
        failed: set[str] = set()
        """Refs already reported: their other nodes are not looked up (or reported) again."""
        problems: list[str] = []
        parsed: dict[str, Reference | InvalidRequest] = {}
        for node in comp.nodes:
            try:
                parsed[node.ref] = Reference.parse(node.ref)
            except InvalidRequest as exc:
                parsed[node.ref] = exc
        allowed = {
            ref: p for ref, p in parsed.items() if isinstance(p, Reference) and self._config.allows_registry(p.host)
        }
        # Each image's manifest and config at once: on a fresh host they are round trips to registries.
        looked_up = await asyncio.gather(
            *(self._ref_layers(p, [n.digest for n in comp.nodes if n.ref == ref]) for ref, p in allowed.items()),
            return_exceptions=True,
        )
        answers = dict(zip(allowed, looked_up, strict=True))
        for i, node in enumerate(comp.nodes):
            where = f"manifest.nodes[{i}] ({node.id})"
            ref = parsed[node.ref]
            if isinstance(ref, InvalidRequest):
                problems.append(f"{where}.ref: {ref.message}")
                continue
            if node.ref not in allowed:
                problems.append(f"{where}.ref: registry {ref.host} is not allowed on this host")
                continue
            if node.ref in failed:
                continue
            if node.ref not in refs:
                answer = answers[node.ref]
                if isinstance(answer, ManifestNotFound | ImageNotFound):
                    problems.append(f"{where}.ref: {node.ref} is not in its registry: {answer.message}")
                    failed.add(node.ref)
                    continue
                if isinstance(answer, InvalidManifest | PlatformNotFound):
                    problems.append(f"{where}.ref: {answer.message}")
                    failed.add(node.ref)
                    continue
                if isinstance(answer, BaseException):
                    raise answer
                refs[node.ref] = answer
            info = refs[node.ref]
            found = info.layers.get(node.digest)
            if found is None:
                problems.append(f"{where}.digest: unknown digest {node.digest}: it is not a layer of {node.ref}")
                continue
            desc, _ = found
            if desc.size != node.size:
                problems.append(
                    f"{where}.size: layer {node.digest} is {desc.size} bytes in {info.where} {node.ref},"
                    f" the manifest says {node.size}"
                )
            if node.media_type and desc.media_type != node.media_type:
                problems.append(
                    f"{where}.media_type: layer {node.digest} is {desc.media_type} in {node.ref}, the manifest says"
                    f" {node.media_type}"
                )
        if problems:
            raise InvalidComposition(problems)
        resolved = await self._plan(comp, refs)
        # Layers no edge orders and that declare no paths: their file lists, where the blobs are here.
        pairs = unordered_undeclared(comp.nodes, comp.dependencies())
        present = {la.node.id for la in resolved.stack if la.present}
        readable = [(a, b) for a, b in pairs if all(n.paths or n.id in present for n in (a, b))]
        problems = await self._path_conflicts(readable)
        if problems:
            raise InvalidComposition(problems)
        unchecked = tuple(p for p in pairs if p not in readable)
        return dataclasses.replace(resolved, unchecked=unchecked) if unchecked else resolved

    async def _path_conflicts(self, pairs: list[tuple[Node, Node]]) -> list[str]:
        """The conflicting-paths problems of unordered `pairs` (their blobs must be in the content store)."""
        problems: list[str] = []
        files: dict[str, paths.LayerFiles | None] = {}
        for node in {n.id: n for pair in pairs for n in pair if not n.paths}.values():
            try:
                files[node.id] = await self._layer_files(node.digest)
            except paths.UnreadableLayer as exc:
                files[node.id] = None
                problems.append(
                    f"node {node.id!r}: the files of layer {node.digest} cannot be listed ({exc}), and no edge"
                    f" orders it against {', '.join(repr(o.id) for p in pairs for o in p if node in p and o != node)}:"
                    " declare its paths or add edges"
                )
        for a, b in pairs:
            fa, fb = files.get(a.id), files.get(b.id)
            if (not a.paths and fa is None) or (not b.paths and fb is None):
                continue
            if fa is not None and fb is not None:
                clash = paths.conflict(fa, fb)
            elif fa is not None:
                clash = paths.conflict_with_declared(fa, b.paths)
            else:
                assert fb is not None
                clash = paths.conflict_with_declared(fb, a.paths)
            if clash is not None:
                problems.append(
                    f"nodes {a.id!r} and {b.id!r} both write {clash} (read from their layers' files) and no edge"
                    f" orders them: add an edge (e.g. {{node: {b.id}, depends_on: {a.id}}}) to say which goes on top"
                )
        return problems

    async def _layer_files(self, digest: str) -> paths.LayerFiles:
        """The file list of the layer blob `digest`, read from the content store (decompressed in a
        thread, as it streams)."""
        if digest in self._files:
            return self._files[digest]
        chunks = self._cd.content.read(digest)
        reader = io.BufferedReader(_ChunkReader(chunks, asyncio.get_running_loop()), _READ_BUFFER)
        try:
            files = await asyncio.to_thread(paths.read_layer, reader)
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]
        self._files[digest] = files
        while len(self._files) > FILE_LISTS_KEPT:
            del self._files[next(iter(self._files))]
        return files

    async def _ref_layers(self, ref: Reference, wanted: list[str]) -> RefLayers:
        """The image `ref`'s layers: from the local image of that name when it has all `wanted`, else
        from the registry (manifest and config only)."""
        with contextlib.suppress(ImageNotFound, ContainerdNotFound, InvalidRequest, KeyError, ValueError):
            local = await read_image(self._cd, str(ref), self._platform)
            if set(wanted) <= set(local.layers):
                raw = await self._cd.content.read_all(local.manifest_digest)
                where = f"local manifest of {ref}"
                doc = parse_document(decode_json(raw, where), local.manifest_media_type, where)
                if isinstance(doc, ImageManifest):
                    return _ref_layers(doc, local.config, "local")
        image = await self._registry.resolve(ref, self._platform)
        where = f"image config of {ref}"
        raw_config = self._configs.get(image.config.digest)
        if raw_config is None:
            raw_config = await self._registry.fetch_bytes(ref, image.config)  # verified against its digest
            self._configs[image.config.digest] = raw_config
            while len(self._configs) > CONFIGS_KEPT:
                del self._configs[next(iter(self._configs))]
        config = decode_json(raw_config, where)
        if not isinstance(config, dict):
            raise InvalidManifest(f"{where} is not an object")
        doc = ImageManifest(image.manifest.media_type, image.config, tuple(image.layers))
        return _ref_layers(doc, config, "registry")

    async def _plan(self, comp: Composition, refs: dict[str, RefLayers]) -> Resolved:
        nodes = comp.stack()
        descs = [refs[n.ref].layers[n.digest][0] for n in nodes]
        diff_ids = [refs[n.ref].layers[n.digest][1] for n in nodes]
        chains = chain_ids([Digest(d) for d in diff_ids])
        above = comp.dependents_of()
        digest_of = {n.id: n.digest for n in nodes}
        # What this host holds, asked of containerd at once.
        held = await asyncio.gather(*(self._cd.content.exists(d.digest) for d in descs))
        snapshots = await asyncio.gather(*(self._cd.snapshots.exists(c) for c in chains))
        stack = [
            StackLayer(
                node=node,
                desc=desc,
                diff_id=diff_id,
                chain_id=chain,
                present=info is not None,
                assembled=assembled,
                dependents=frozenset(digest_of[i] for i in above[node.id]),
            )
            for node, desc, diff_id, chain, info, assembled in zip(
                nodes, descs, diff_ids, chains, held, snapshots, strict=True
            )
        ]
        top = refs[nodes[-1].ref].config.get("config")
        top = top if isinstance(top, dict) else {}
        image = compose(comp.name, comp.workload, descs, diff_ids, self._platform, top, comp.config)
        granularity = comp.prefetch_granularity or self._config.max_concurrent_layers
        preference = [digest_of[i] for i in comp.preference]
        order = priority.fetch_order(self._priority_layers(stack), preference, granularity)
        return Resolved(comp, tuple(stack), image, tuple(order), granularity)

    def _priority_layers(self, stack: list[StackLayer]) -> list[priority.Layer]:
        per_byte = self.costs.apply_seconds_per_byte()
        out = []
        # A layer's apply is saved when a snapshot at or above it exists already.
        top_done = max((i for i, la in enumerate(stack) if la.assembled), default=-1)
        for i, la in enumerate(stack):
            sources = [f"registry/{Reference.parse(la.node.ref).host}", *(["peer"] if self._has_peers() else [])]
            declared = la.node.costs
            fetch = declared.network_seconds if declared.network_seconds is not None else None
            if fetch is None:
                fetch = self.costs.fetch_seconds(la.desc.size, sources)
            apply = declared.cpu_seconds if declared.cpu_seconds is not None else la.desc.size * per_byte
            out.append(
                priority.Layer(
                    digest=la.desc.digest,
                    position=i,
                    fetch_seconds=0.0 if la.present else fetch,
                    apply_seconds=0.0 if i <= top_done else apply,
                    dependents=len(la.dependents),
                    uses=self.history.uses(la.desc.digest),
                    missing=not la.present,
                )
            )
        return out

    # ------------------------------------------------------------------ assemble

    async def assemble(self, document: Any) -> dict[str, Any]:
        """Assemble a composition here and record it as an image; returns the plan and what it took."""
        started = time.monotonic()
        resolved = await self.resolve(document)
        resolved_at = time.monotonic()
        result = await self._flights.run(resolved.image.name, lambda _: self._assemble(resolved))
        if self.uses is not None:
            await self.uses.used(resolved.image.name, Origin.REGISTRY)
        # Where the time went (placement compares them with its prediction's parts).
        return {
            **result,
            "resolve_seconds": round(resolved_at - started, 6),
            "seconds": round(time.monotonic() - started, 6),
            # This host's rates with this assembly's fetches in: the coordinator that placed it predicts
            # the next start from them, not from a telemetry sample taken while the fetches ran.
            "layer_costs": self.costs.measured(),
            "costs_at": time.time(),
        }

    async def _recorded(self, resolved: Resolved) -> bool:
        """The image is here already: its record names this manifest (whose GC labels keep the config,
        the layers and the top snapshot) and its top snapshot exists."""
        if not resolved.stack[-1].assembled:
            return False
        try:
            record = await self._cd.images.get(resolved.image.name)
        except ContainerdNotFound:
            return False
        return record.digest == resolved.image.manifest.digest

    async def _assemble(self, resolved: Resolved) -> dict[str, Any]:
        stack = resolved.stack
        if await self._recorded(resolved):
            # Assembled before: nothing to fetch, apply or record (a warm start's common case).
            for la in stack:
                self.on_local(la.desc.digest)
            await asyncio.to_thread(self.history.record, [la.desc.digest for la in stack])
            return {
                **resolved.to_json(),
                "fetched": [],
                "bytes_fetched": 0,
                "reused_snapshots": len(stack),
                "applied": [],
                "first_snapshot_seconds": 0.0,
                "runnable_seconds": 0.0,
                "timeline": [],
            }
        timeline = Timeline()
        fetched_bytes = 0
        async with self._cd.leases.held("composition", self._config.lease_expiry) as lease_id:
            cd = self._cd.leased(lease_id)
            # From now on this lease holds these blobs and snapshots, whoever made them. containerd's
            # round trips at once: each is a few ms on an idle host, many under load, and every
            # start that assembles pays them.
            await asyncio.gather(
                *(cd.leases.add_content(lease_id, la.desc.digest) for la in stack),
                *(cd.leases.add_snapshot(lease_id, cd.snapshotter_name, la.chain_id) for la in stack),
            )
            snapshots, held = await asyncio.gather(
                asyncio.gather(*(cd.snapshots.exists(la.chain_id) for la in stack)),
                asyncio.gather(*(cd.content.exists(la.desc.digest) for la in stack if la.present)),
            )
            # The highest snapshot of the stack that exists: only what is above it is applied.
            base = max((i for i, there in enumerate(snapshots) if there), default=-1)
            done: dict[str, asyncio.Event] = {la.desc.digest: asyncio.Event() for la in stack}
            queue = list(resolved.fetch_order)
            for la, info in zip([la for la in stack if la.present], held, strict=True):
                if info is None:
                    queue.insert(0, la.desc.digest)  # collected since it was resolved: fetched after all
                else:
                    done[la.desc.digest].set()
                    self.on_local(la.desc.digest)

            async def worker() -> None:
                nonlocal fetched_bytes
                while queue:
                    digest = queue.pop(0)
                    la = next(x for x in stack if x.desc.digest == digest)
                    source = self._fetcher.source(Reference.parse(la.node.ref))
                    started = time.monotonic()
                    got = await self._fetcher.fetch_blob(source, la.desc, lambda n: None)
                    ended = time.monotonic()
                    fetched_bytes += got
                    name = _source_name(source, digest, source_host(la))
                    # The source's rate is over the bytes' time: asking the tracker and the peers
                    # first is a fixed cost per fetch, not a slow link.
                    transfer = _transfer_started(source, digest, started)
                    self.costs.fetched(name, got, ended - transfer, ended)
                    timeline.mark(
                        "fetched",
                        digest,
                        seconds=round(ended - started, 6),
                        asking_seconds=round(transfer - started, 6),
                        bytes=got,
                        source=name,
                    )
                    done[digest].set()

            workers = [
                asyncio.create_task(worker(), name=f"composition-fetch-{i}")
                for i in range(min(resolved.granularity, len(queue)))
            ]
            # The unordered layers whose paths could not be checked before: nothing at or above the
            # lowest of them is applied until their blobs are here and their files agree.
            positions = {la.node.id: i for i, la in enumerate(stack)}
            gate = min((positions[n.id] for pair in resolved.unchecked for n in pair), default=len(stack))
            try:
                first = runnable = 0.0
                parent = stack[base].chain_id if base >= 0 else ""
                applied: list[str] = []
                checked = not resolved.unchecked

                async def check_paths() -> None:
                    for pair in resolved.unchecked:
                        for n in pair:
                            await _wait_either(done[n.digest], workers)
                    problems = await self._path_conflicts(list(resolved.unchecked))
                    if problems:
                        raise InvalidComposition(problems)

                for i, la in enumerate(stack[base + 1 :], start=base + 1):
                    if i >= gate and not checked:
                        await check_paths()
                        checked = True
                    await _wait_either(done[la.desc.digest], workers)
                    started = time.monotonic()
                    cpu_before = await asyncio.to_thread(self._cpu.seconds)
                    if await unpack_layer(cd, la.desc, la.diff_id, la.chain_id, parent):
                        cpu_after = await asyncio.to_thread(self._cpu.seconds)
                        cpu = cpu_after - cpu_before if cpu_before is not None and cpu_after is not None else None
                        self.costs.applied(la.desc.size, time.monotonic() - started, cpu)
                        applied.append(la.desc.digest)
                    at = timeline.mark("applied", la.desc.digest, seconds=round(time.monotonic() - started, 6))
                    first = first or at
                    runnable = at
                    parent = la.chain_id
                if not checked:  # every unordered layer was below an existing snapshot
                    await check_paths()
                await asyncio.gather(*workers)  # the blobs below `base` that were missing
            finally:
                for task in workers:
                    task.cancel()
                await asyncio.gather(*workers, return_exceptions=True)
            await asyncio.gather(*(ensure_labels(cd, la.desc.digest, {L.UNCOMPRESSED: la.diff_id}) for la in stack))
            await self._record(cd, resolved, stack[-1].chain_id)
        await asyncio.to_thread(self.history.record, [la.desc.digest for la in stack])  # fsyncs: off the loop
        log.info(
            "assembled composition",
            extra={"image": resolved.image.name, "applied": len(applied), "reused": base + 1, "bytes": fetched_bytes},
        )
        return {
            **resolved.to_json(),
            "fetched": [e["digest"] for e in timeline.events if e["event"] == "fetched"],
            "bytes_fetched": fetched_bytes,
            "reused_snapshots": base + 1,
            "applied": applied,
            "first_snapshot_seconds": round(first, 6),
            "runnable_seconds": round(runnable, 6),
            "timeline": timeline.events,
        }

    async def _record(self, cd: Containerd, resolved: Resolved, top_chain: str) -> None:
        image = resolved.image
        snapshotter = cd.snapshotter_name
        manifest_labels = {
            L.GC_CONFIG: image.config.digest,
            **{L.gc_layer(i): la.desc.digest for i, la in enumerate(resolved.stack)},
        }
        lock = self._config.ingest_lock_timeout
        # Both under the assembly's lease, so neither is collected before the record names them.
        await asyncio.gather(
            put_blob(cd, image.config, image.config_bytes, {L.gc_snapshot(snapshotter): top_chain}, lock),
            put_blob(cd, image.manifest, image.manifest_bytes, manifest_labels, lock),
        )
        comp = resolved.composition
        await cd.images.put(
            ImageRecord(
                name=image.name,
                media_type=image.manifest.media_type,
                digest=image.manifest.digest,
                size=image.manifest.size,
                labels={ANNOTATION_NAME: comp.name, **({ANNOTATION_WORKLOAD: comp.workload} if comp.workload else {})},
            )
        )

    # ------------------------------------------------------------------ warm

    async def warm_layer(self, digest: str, ref: str, ttl: float | None = None, model: str = "") -> dict[str, Any]:
        """Fetch one layer of image `ref` ahead of use and keep it `ttl` seconds under a lease (then
        it stays only if an image references it by then). `model`: the version of the model that
        chose it, if one did (shown in the cache status).

        A layer already in the content store is kept instead: the lease is taken and nothing is
        fetched (`"kept": true`), so the cache bound does not evict it while the lease lasts (the
        eviction leaves what a lease holds). A keep is counted apart from the warms: it moved no bytes."""
        ttl = WARM_TTL if ttl is None else ttl
        if not 0 < ttl <= MAX_WARM_TTL:
            raise InvalidRequest(f"ttl must be in (0, {MAX_WARM_TTL:g}] seconds, got {ttl:g}")
        parsed = Reference.parse(ref)
        if not self._config.allows_registry(parsed.host):
            raise InvalidRequest(f"registry {parsed.host} is not allowed on this host")
        local = await self._cd.content.exists(digest)
        if local is not None:
            lease_id = await self._cd.leases.create("warm", ttl)
            try:
                await self._cd.leases.add_content(lease_id, digest)
            except BaseException:
                await self._cd.leases.delete(lease_id, sync=True)
                raise
            self.on_kept(digest, local.size, ttl, model)
            return {
                "digest": digest,
                "ref": ref,
                "size": local.size,
                "bytes_fetched": 0,
                "kept": True,
                "lease": lease_id,
                "ttl_seconds": ttl,
            }
        info = await self._ref_layers(parsed, [digest])
        found = info.layers.get(digest)
        if found is None:
            raise LayerNotFound(f"layer {digest} is not a layer of {ref}")
        desc = found[0]
        lease_id = await self._cd.leases.create("warm", ttl)
        try:
            await self._cd.leases.add_content(lease_id, digest)
            source = self._fetcher.warm_source(parsed)
            started = time.monotonic()
            got = await self._fetcher.fetch_blob(source, desc, lambda n: None)
            transfer = _transfer_started(source, digest, started)
            self.costs.fetched(_source_name(source, digest, parsed.host), got, time.monotonic() - transfer)
        except BaseException:
            await self._cd.leases.delete(lease_id, sync=True)
            raise
        self.on_warmed(digest, desc.size, ttl, model)
        return {
            "digest": digest,
            "ref": ref,
            "size": desc.size,
            "bytes_fetched": got,
            "kept": False,
            "lease": lease_id,
            "ttl_seconds": ttl,
        }


_READ_BUFFER = 1 << 20


class _ChunkReader(io.RawIOBase):
    """A blocking file over an async stream of chunks, for a thread to read while the loop streams."""

    def __init__(self, chunks: AsyncIterator[bytes], loop: asyncio.AbstractEventLoop) -> None:
        self._chunks = chunks
        self._loop = loop
        self._left = b""

    def readable(self) -> bool:
        return True

    async def _next(self) -> bytes:
        return await anext(self._chunks, b"")

    def readinto(self, buffer: Any) -> int:
        if not self._left:
            self._left = asyncio.run_coroutine_threadsafe(self._next(), self._loop).result()
        n = min(len(buffer), len(self._left))
        buffer[:n] = self._left[:n]
        self._left = self._left[n:]
        return n


class LayerNotFound(NotFound):
    code = "layer_not_found"


def _ref_layers(doc: ImageManifest, config: dict[str, Any], where: str) -> RefLayers:
    what = f"the {where} image config"
    diff_ids = parse_image_config(config, what).diff_ids
    if len(diff_ids) != len(doc.layers):
        raise InvalidManifest(f"{what} lists {len(diff_ids)} diff IDs for {len(doc.layers)} layers")
    return RefLayers({d.digest: (d, diff) for d, diff in zip(doc.layers, diff_ids, strict=True)}, config, where)


def source_host(la: StackLayer) -> str:
    return Reference.parse(la.node.ref).host


def _source_name(source: BlobSource, digest: str, host: str) -> str:
    """ "peer" or "registry/HOST": where the source says the blob came from."""
    said = source.served_from(digest) if isinstance(source, ServedFrom) else None
    return "peer" if said == "peer" else f"registry/{host}"


def _transfer_started(source: BlobSource, digest: str, started: float) -> float:
    """When `source` began to request `digest`'s bytes in a fetch begun at `started`."""
    said = source.transfer_started(digest) if isinstance(source, TransferStarts) else None
    return min(max(said, started), time.monotonic()) if said is not None else started


async def _wait_either(event: asyncio.Event, workers: list[asyncio.Task[None]]) -> None:
    """Until `event` is set; a worker's failure is raised instead of waiting for ever."""
    waiter = asyncio.create_task(event.wait(), name="composition-layer-wait")
    try:
        while not event.is_set():
            for w in workers:
                if w.done() and not w.cancelled() and (exc := w.exception()) is not None:
                    raise exc
            pending = [w for w in workers if not w.done()]
            if not pending:
                await asyncio.wait([waiter], timeout=0)
                if not event.is_set():
                    raise RuntimeError("every fetch ended but a layer is still missing")
                return
            await asyncio.wait([waiter, *pending], return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiter
