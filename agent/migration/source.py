"""The source side of a live migration, step by step.

PREPARE   the target checks room, pulls the image; we announce the container
PRECOPY   read memory while running (CRIU pre-dump with soft-dirty, else /proc/PID/mem), send only
          pages that changed, until the rounds converge (precopy and hybrid modes; lazy skips it)
STOPCOPY  freeze, final dump (tasks stay frozen), last delta, other images, the rw layer; in lazy and
          hybrid modes the dump keeps memory in CRIU's page server instead
RESTORE   the target restores the task, left paused
POSTCOPY  (lazy, hybrid) our decision: the target's copy runs; its missing pages come from our page
          server, on demand and in the background, until every page is there
SWITCH    our decision (precopy) or every page is on the target (post-copy): the target commits
COMMIT    the target confirmed; our frozen copy is removed
Any failure before the decision rolls back: our frozen tasks resume, so the workload runs exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.checkpoint.criuconf import CriuConfigs, lazy_dump
from agent.checkpoint.delta import DeltaStats, PageTracker
from agent.checkpoint.images import is_pages
from agent.checkpoint.lazypages import ensure_pipe_max_size, lazy_pages
from agent.checkpoint.livepages import LiveMemoryUnavailable, LiveProcess, check_readable, live_processes
from agent.checkpoint.pageserver import PageServerClient, free_local_port
from agent.checkpoint.runc import runc_checkpoint, runc_state_root
from agent.config import AgentConfig
from agent.containerd import Containerd, TaskStatus
from agent.images.local import read_image
from agent.migration.convergence import Overheads, Round, Verdict, decide
from agent.migration.failpoints import Failpoints
from agent.migration.group import MigrationGroup, pack_volume, volume_file
from agent.migration.journal import Journal
from agent.migration.link import Link, PeerReportedFailure
from agent.migration.local import describe_failure, remove_container, resume_if_paused
from agent.migration.pagepush import PushCounts, lazy_regions, push
from agent.migration.pageserve import SourcePages
from agent.migration.protocol import (
    Commit,
    Committed,
    Container,
    Prepare,
    Prepared,
    PrepareOptions,
    ProtocolError,
    Ready,
    Restore,
    Restored,
    Resume,
    Resumed,
    RwLayer,
    Stopcopy,
    negotiate,
)
from agent.migration.protocol import Round as RoundDone
from agent.migration.pushflow import PushWindow
from agent.migration.record import MigrationRecord
from agent.migration.rootfs import RW_LAYER_FILE, export_rw_layer
from agent.migration.states import Event, State, can_roll_back
from agent.model import LABEL_MANAGED, LABEL_SERVICE_IP
from agent.network import ServiceNetwork
from agent.oci import Platform
from core.errors import ContainerNotFound, FerrymanError
from core.files import confined

log = logging.getLogger(__name__)

# Until a round has measured it, assume CRIU restores about as fast as it dumps.
RESTORE_PER_DUMP = 1.0


@dataclass
class SourceContext:
    config: AgentConfig
    cd: Containerd
    journal: Journal
    failpoints: Failpoints
    platform: Platform
    publish: Callable[[MigrationRecord], None]
    """Called with every new version of the record (progress, API, metrics)."""
    network: ServiceNetwork
    criu_configs: CriuConfigs
    postcopy_link: Callable[[str, float], Awaitable[tuple[Link, bool]]]
    """In POSTCOPY, waits (up to the timeout) for the target to reconnect after a cut link; the flag says
    whether it still holds its pre-copy store."""
    soft_dirty: bool = False
    """CRIU can pre-dump here (mem_dirty_track): rounds dump only written pages, via runc."""
    criu_version: str = ""
    """This host's CRIU version, for targets of protocol 2 (they refuse images of a newer CRIU)."""
    group: MigrationGroup | None = None
    """The volume group this container migrates with (group.py); None when it moves alone."""


class PostcopyLost(FerrymanError):
    code = "postcopy_lost"
    http_status = 502


class SourceMigration:
    def __init__(self, ctx: SourceContext, record: MigrationRecord, connect: Callable[[], Awaitable[Link]]) -> None:
        self.ctx = ctx
        self.record = record
        self._connect = connect
        self.work = confined(ctx.config.migration.work_dir, record.id)
        self._started = time.monotonic()
        self._tracker: PageTracker | None = None
        self._pushed = 0
        self._parent: Path | None = None
        self._link: Link | None = None
        """In post-copy, the current link to the target (it changes when the target reconnects)."""

    # ----- bookkeeping ---------------------------------------------------------------------------

    async def _save(self, record: MigrationRecord) -> None:
        self.record = record
        await self.ctx.journal.write(record)
        self.ctx.publish(record)

    async def _advance(self, event: Event, error: str | None = None) -> None:
        await self._save(self.record.advance(event, error))
        log.info("migration state", extra={"migration": self.record.id, "state": self.record.state.value})

    def _downtime(self, downtime_ms: float) -> dict[str, object]:
        """The stats of a measured downtime: the figure, and whether it missed the caller's target."""
        return {
            "downtime_ms": round(downtime_ms, 1),
            "downtime_target_missed": downtime_ms > self.record.options.downtime_target_ms,
        }

    def _progress(self, link: Link | None, **stats: object) -> None:
        if link is not None:
            elapsed = max(time.monotonic() - self._started, 1e-6)
            stats.update(
                bytes_raw=link.bytes_raw,
                bytes_wire=link.bytes_wire,
                rate_mbps=round(link.bytes_wire / elapsed / 1e6, 2),
            )
        self.record = self.record.with_stats(**stats)
        self.ctx.publish(self.record)

    # ----- the run -------------------------------------------------------------------------------

    async def run(self) -> MigrationRecord:
        cid = self.record.container
        link: Link | None = None
        await self._save(self.record)
        try:
            async with asyncio.timeout(self.ctx.config.migration.phase_timeout):
                link = await self._connect()
                link.follow("source", lambda: self.record.state)
                await self._prepare(link)
                if self.record.options.mode == "lazy":
                    await self._advance(Event.CONVERGED)  # nothing to pre-copy
                else:
                    await self._precopy(link)
                if self.record.options.mode == "precopy":
                    await self._stopcopy(link)
            if self.record.options.mode != "precopy":
                link = await self._lazy_stopcopy(link)
        except BaseException as exc:
            if can_roll_back(self.record.state):
                if self.ctx.group is not None:
                    self.ctx.group.break_group(cid, describe_failure(exc))
                await self._rollback(link, exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                return self.record
            if self.record.state == State.POSTCOPY:
                await self._postcopy_failed(link, exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                return self.record
            raise
        finally:
            if self._tracker is not None:
                self._tracker.close()
            shutil.rmtree(self.work, ignore_errors=True)
            if link is not None:
                await link.close()
        log.info("migration committed", extra={"migration": self.record.id, "container": cid})
        return self.record

    async def _prepare(self, link: Link) -> None:
        cid = self.record.container
        container = await self.ctx.cd.containers.get(cid)
        if container.labels.get(LABEL_MANAGED) != "true":
            raise ContainerNotFound(f"container {cid} is not managed by ferryman")
        task = await self.ctx.cd.tasks.get(cid)
        if task.status != TaskStatus.RUNNING:
            raise FerrymanError(f"container {cid} is {task.status.name.lower()}, only running ones migrate")
        image = await read_image(self.ctx.cd, container.image, self.ctx.platform)
        self._image_chain = image.chain_id
        self._snapshot_key = container.snapshot_key
        self._service_ip = container.labels.get(LABEL_SERVICE_IP)
        # The highest version both speak, from the target's HELLO: an older target hears the wire it knows.
        protocol = negotiate(self.record.peer, link.peer_speaks)
        await link.send(
            Prepare(
                migration=self.record.id,
                container=Container(
                    id=cid,
                    image=container.image,
                    labels=container.labels,
                    spec=json.loads(container.spec),
                    runtime=container.runtime,
                ),
                estimated_bytes=await self._memory_estimate(cid),
                options=PrepareOptions(
                    downtime_target_ms=self.record.options.downtime_target_ms,
                    mode=self.record.options.mode,
                    reservation=self.record.options.reservation,
                ),
                protocol=protocol,
                criu=self.ctx.criu_version if protocol >= 2 else "",
            )
        )
        prepared = await link.expect(Prepared)
        if prepared.protocol != protocol:
            raise ProtocolError(f"'prepared' of migration protocol {protocol}", f"protocol {prepared.protocol}")
        log.info(
            "migration protocol agreed",
            extra={
                "migration": self.record.id,
                "peer": self.record.peer,
                "protocol": protocol,
                "peer_speaks": list(link.peer_speaks),
                "peer_criu": prepared.criu,
            },
        )
        await self.ctx.failpoints.hit("source.prepared")
        await self._advance(Event.PREPARED)

    async def _memory_estimate(self, cid: str) -> int:
        """Resident bytes of the container's processes: the size of the page images to expect."""
        return resident_bytes(await self.ctx.cd.tasks.pids(cid))

    async def _precopy(self, link: Link) -> None:
        target_s = self.record.options.downtime_target_ms / 1000
        tracker = self._tracker = PageTracker(self.work)  # its digests go to the work directory
        rounds: list[Round] = []
        dirty: list[int] = []
        previous: Path | None = None
        while True:
            number = len(rounds) + 1
            await self.ctx.failpoints.hit(f"source.precopy.round{number}")
            round_dir = self.work / f"round-{number}"
            round_dir.mkdir(parents=True)
            started = time.monotonic()
            live = await self._live_processes()
            if live is None:
                await self._dump(round_dir, pre_dump=True, parent=previous)
            dump_s = time.monotonic() - started
            sent_before = link.bytes_wire
            started = time.monotonic()
            stats = await self._send_delta(link, tracker, round_dir if live is None else live)
            transfer_s = time.monotonic() - started
            if live is not None:
                # No dump to time: reading all of memory is the closest measure of what the final dump costs.
                dump_s = transfer_s if number == 1 else rounds[0].seconds
            if self.ctx.soft_dirty:  # the next pre-dump needs this one as its parent
                if previous is not None:
                    shutil.rmtree(previous, ignore_errors=True)
                previous = round_dir
            else:
                shutil.rmtree(round_dir, ignore_errors=True)
            self._parent = previous
            await link.send(RoundDone(number=number, pages=stats.changed, zero=stats.zero))
            rounds.append(Round(stats.changed, link.bytes_wire - sent_before, transfer_s))
            dirty.append(stats.changed)
            verdict = decide(
                rounds,
                Overheads(freeze_s=dump_s, restore_s=dump_s * RESTORE_PER_DUMP),
                target_s,
                self.record.options.max_iterations,
            )
            source = "proc-mem" if live is not None else "criu-pre-dump" if self.ctx.soft_dirty else "criu-dump"
            self._progress(
                link, iterations=number, dirty_pages=tuple(dirty), stop_reason=verdict.value, round_source=source
            )
            if verdict != Verdict.CONTINUE:
                break
        await self._advance(Event.CONVERGED)

    async def _dump(self, image_dir: Path, *, pre_dump: bool, parent: Path | None) -> None:
        """One round's dump: a runc pre-dump chain with soft-dirty, else a full dump through containerd."""
        cid = self.record.container
        if self.ctx.soft_dirty:
            root = runc_state_root(self.ctx.config.containerd.runc_root, self.ctx.cd.namespace)
            await runc_checkpoint(root, cid, image_dir, self.work / "criu-work", pre_dump=pre_dump, parent=parent)
        else:
            await self.ctx.cd.tasks.checkpoint(cid, str(image_dir), leave_running=True)

    async def _live_processes(self) -> list[LiveProcess] | None:
        """The processes whose memory a pre-copy round reads directly, or None to dump with CRIU instead.

        Without soft-dirty a CRIU dump freezes the workload while it copies all of memory; reading
        /proc/PID/mem does not. Where that is not allowed (a ptrace policy), rounds dump as before.
        """
        if self.ctx.soft_dirty or not self.ctx.config.migration.live_precopy:
            return None
        processes = live_processes(await self.ctx.cd.tasks.pids(self.record.container))
        try:
            await asyncio.to_thread(check_readable, processes)
        except LiveMemoryUnavailable as exc:
            log.warning(
                "pre-copy reads memory through CRIU dumps instead",
                extra={"migration": self.record.id, "error": str(exc)},
            )
            return None
        return processes

    async def _send_delta(self, link: Link, tracker: PageTracker, source: Path | list[LiveProcess]) -> DeltaStats:
        """Hash pages in a worker thread and send batches as they come, so both overlap.

        `source`: a dump's image directory, or the running processes to read memory from."""
        stats = DeltaStats()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue(maxsize=8)
        done = object()

        def produce() -> None:
            try:
                if isinstance(source, Path):
                    batches = tracker.delta(source, stats)
                else:
                    batches = tracker.live_delta(source, stats)
                for batch in batches:
                    asyncio.run_coroutine_threadsafe(queue.put(batch), loop).result()
            finally:
                asyncio.run_coroutine_threadsafe(queue.put(done), loop).result()

        producer = asyncio.create_task(asyncio.to_thread(produce), name="page-delta")
        try:
            while (item := await queue.get()) is not done:
                await link.send_pages(item)  # type: ignore[arg-type]
        finally:
            if not producer.done():
                # Drain so the thread can finish its put() calls, then wait for it.
                while not producer.done():
                    with contextlib.suppress(asyncio.QueueEmpty):
                        queue.get_nowait()
                    await asyncio.sleep(0)
            await producer
        return stats

    async def _stopcopy(self, link: Link) -> None:
        cid, tasks = self.record.container, self.ctx.cd.tasks
        await self.ctx.failpoints.hit("source.stopcopy")
        final = self.work / "final"
        final.mkdir(parents=True)
        await link.send(Stopcopy())
        await link.expect(Ready)  # the target has the image (and its pager): the freeze waits for nothing
        await self._hold_address()
        frozen_at = time.monotonic()
        await tasks.pause(cid)
        await self._silence()  # frozen first: what it wrote until the pause reaches its clients
        await self.ctx.failpoints.hit("source.frozen")  # fault tests: the agent dies with its copy frozen
        await self._dump(final, pre_dump=False, parent=self._parent)  # a paused task stays frozen
        freeze_dump_ms = (time.monotonic() - frozen_at) * 1000
        assert self._tracker is not None, "pre-copy ran first"
        stats = await self._send_delta(link, self._tracker, final)
        delta_done = time.monotonic()
        await link.send_files([path for path in sorted(final.iterdir()) if path.is_file() and not is_pages(path.name)])
        digest, data = await export_rw_layer(
            self.ctx.cd, self._snapshot_key, self._image_chain, self.ctx.config.pull.lease_expiry
        )
        await self._send_rw_layer(link, digest, data)
        await self._group_volumes(link)
        await link.send(Restore(rw_digest=digest))
        log.info(
            "stop-copy sent",
            extra={
                "migration": self.record.id,
                "freeze_dump_ms": round(freeze_dump_ms),
                "delta_ms": round((delta_done - frozen_at) * 1000 - freeze_dump_ms),
                "delta_pages": stats.changed,
                "files_ms": round((time.monotonic() - delta_done) * 1000),
            },
        )
        await self._advance(Event.IMAGES_SENT)
        self._progress(
            link,
            dirty_pages=(*self.record.stats.dirty_pages, stats.changed),
            freeze_dump_ms=round(freeze_dump_ms, 1),
        )
        reply = await link.expect(Restored)
        await self.ctx.failpoints.hit("source.restored")
        if (group := self.ctx.group) is not None:
            if cid == group.carrier:
                group.placed()
            await group.all_restored()  # one member's decision waits for every member's restore
        # The decision: from here on the target's copy is the workload.
        await self._advance(Event.RESTORED)
        await self.ctx.failpoints.hit("source.decided")
        if self._service_ip:
            # Traffic leaves us now (the target publishes the address as it resumes), and our frozen copy
            # loses its link: its sockets must never answer the client again, not even with a FIN.
            await self.ctx.network.unpublish(self._service_ip)
            await self.ctx.network.destroy(self.record.container)
        await link.send(Commit())
        await link.expect(Committed)
        downtime_ms = (time.monotonic() - frozen_at) * 1000
        self._progress(
            link,
            **self._downtime(downtime_ms),
            restore_ms=reply.restore_ms,
            image_ms=reply.image_ms,
            image_from=reply.image_from,
            held_packets=await self._forward_held(),
            total_ms=round((time.monotonic() - self._started) * 1000, 1),
        )
        await self._remove_local_copy()  # before COMMIT is published: a watcher sees the final picture
        await self._advance(Event.SWITCHED)

    async def _group_volumes(self, link: Link) -> None:
        """In a volume group, once every member is frozen, the carrier sends the volumes in its stream
        (its target unpacks them before its restore); the others restore only after that."""
        group = self.ctx.group
        if group is None:
            return
        await group.all_frozen()
        if self.record.container != group.carrier:
            await group.volumes_placed()
            return
        await self.ctx.failpoints.hit("source.volumes")
        for name, directory in sorted(group.volumes.items()):
            tar_path = self.work / volume_file(name)
            await asyncio.to_thread(pack_volume, directory, tar_path)
            await link.send_file(tar_path, volume_file(name))

    # ----- post-copy (lazy and hybrid modes) ------------------------------------------------------

    async def _lazy_stopcopy(self, link: Link) -> Link:
        """Freeze; a dump without memory; the target restores and runs; its pages follow on demand."""
        cid, tasks = self.record.container, self.ctx.cd.tasks
        await self.ctx.failpoints.hit("source.stopcopy")
        final = self.work / "final"
        final.mkdir(parents=True)
        await asyncio.to_thread(ensure_pipe_max_size)
        port = free_local_port()
        await asyncio.to_thread(self.ctx.criu_configs.write, cid, lazy_dump(port))
        await link.send(Stopcopy(lazy=True))
        await link.expect(Ready)  # the target has the image (and its pager): the freeze waits for nothing
        await self._hold_address()
        frozen_at = time.monotonic()
        await tasks.pause(cid)
        await self._silence()  # frozen first: what it wrote until the pause reaches its clients
        # Returns only once the page server has served every page (or failed); a paused task stays frozen.
        dump: asyncio.Task[None] = asyncio.create_task(self._dump(final, pre_dump=False, parent=None), name="lazy-dump")
        # The rw layer is final once frozen: export it while CRIU dumps, so the target builds the
        # container while we wait for the dump.
        rw_layer = asyncio.create_task(
            export_rw_layer(self.ctx.cd, self._snapshot_key, self._image_chain, self.ctx.config.pull.lease_expiry),
            name="rw-layer",
        )
        try:
            digest, data = await rw_layer
            await self._send_rw_layer(link, digest, data)
            try:
                client = await PageServerClient.connect(port, dump, within=self.ctx.config.migration.idle_timeout)
            finally:
                await asyncio.to_thread(self.ctx.criu_configs.write, cid)  # later dumps are ordinary again
            freeze_dump_ms = (time.monotonic() - frozen_at) * 1000
            # pages-*.img holds only what CRIU does not do lazily (not anonymous memory)
            await link.send_files([path for path in sorted(final.iterdir()) if path.is_file()])
            await link.send(Restore(rw_digest=digest, lazy=True))
            total = await asyncio.to_thread(lazy_pages, final)  # for progress: after the restore is asked
            await self._advance(Event.IMAGES_SENT)
            self._progress(link, freeze_dump_ms=round(freeze_dump_ms, 1), lazy_pages=total, pages_remote=total)
            # The restore itself faults pages in (the restorer writes to the task's stack): serve from now on.
            held = self._tracker.held_by_target if self._tracker is not None else None  # hybrid: pre-copied pages
            progress = self._pages_progress(total)  # pages answered or pushed
            pages = SourcePages(client, progress, self._postcopy_failpoint(), held)
            self._link = link
            traffic = asyncio.create_task(self._serve_postcopy(pages), name="postcopy-pages")
            pusher: asyncio.Task[None] | None = None
            try:
                reply = await pages.expect(Restored, traffic, link)
                await self.ctx.failpoints.hit("source.restored")
                # The decision: the target's copy is the workload from here, with some of its memory still here.
                await self._advance(Event.LAZY_RESTORED)
                await self.ctx.failpoints.hit("source.decided")
                if self._service_ip:  # traffic goes to the target; our veth stays until the copy is removed
                    await self.ctx.network.unpublish(self._service_ip)
                if await self._send_resume(link):
                    pages.push_link = link
                    pusher = asyncio.create_task(self._push(link, pages, final, progress), name="postcopy-push")
                await pages.expect(Resumed, traffic, self._link or link)
                resumed_at = time.monotonic()
                self._progress(
                    link,
                    **self._downtime((resumed_at - frozen_at) * 1000),
                    restore_ms=reply.restore_ms,
                    image_ms=reply.image_ms,
                    image_from=reply.image_from,
                    held_packets=await self._forward_held(),
                )
                await traffic
            finally:
                pages.push_stop.set()
                for task in (traffic, pusher):
                    if task is not None and not task.done():
                        task.cancel()
                await asyncio.gather(*(t for t in (traffic, pusher) if t is not None), return_exceptions=True)
                await client.close()
            link = self._link or link
            async with asyncio.timeout(self.ctx.config.migration.idle_timeout):
                await dump  # CRIU confirms the page server's session is over
        finally:
            helpers: tuple[asyncio.Task[Any], ...] = (dump, rw_layer)
            for task in helpers:
                if not task.done():
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
        self._progress(
            link,
            pages_remote=0,
            pages_local=pages.local_pages,
            pages_pushed=self._pushed,
            pages_served=pages.served,
            pages_resent=pages.resent,
            postcopy_ms=round((time.monotonic() - resumed_at) * 1000, 1),
        )
        log.info(
            "post-copy done",
            extra={
                "migration": self.record.id,
                "pages": total,
                "from_target_copy": pages.local_pages,
                "served": pages.served,
                "resent": pages.resent,
            },
        )
        await self._advance(Event.PAGES_COMPLETE)
        await self.ctx.failpoints.hit("source.commit")
        await link.send(Commit())
        await link.expect(Committed)
        if self._service_ip:  # gone before the kill: the dying sockets must not reach the client
            await self.ctx.network.destroy(self.record.container)
        await self._remove_local_copy()
        self._progress(
            link,
            total_ms=round((time.monotonic() - self._started) * 1000, 1),
            released_ms=round((time.monotonic() - self._started) * 1000, 1),
        )
        await self._advance(Event.SWITCHED)
        return link

    async def _send_resume(self, link: Link) -> bool:
        """Tell the target to run its copy. On a cut link the send blocks behind page replies and times
        out: the link is closed then, so neither side goes on over one that may have lost a message.
        The target asks for the decision itself and comes back for its pages (`_serve_postcopy` waits)."""
        try:
            await self.ctx.failpoints.hit("source.resume")
            await link.send(Resume())
        except (TimeoutError, OSError, FerrymanError) as exc:
            log.warning(
                "resume not delivered, the target asks for the decision",
                extra={"migration": self.record.id, "error": describe_failure(exc)},
            )
            await link.close()
            return False
        return True

    async def _push(self, link: Link, pages: SourcePages, image_dir: Path, progress: Callable[[int], None]) -> None:
        """Push every lazy page to the target (pagepush); a failure only ends the push. Fault tests
        hold it back with `source.push`: the workload's pages then come by its faults only."""
        started = time.monotonic()
        counts = PushCounts()
        try:
            await self.ctx.failpoints.hit("source.push")
            processes = live_processes(await self.ctx.cd.tasks.pids(self.record.container))
            regions = await asyncio.to_thread(lazy_regions, image_dir, processes)
            await push(
                link,
                pages.sending,
                regions,
                pages.held_by_target,
                progress,
                pages.push_stop,
                pages.push_window,
                counts,
                pages.sent,
                pages.carried,
            )
        except (OSError, TimeoutError, FerrymanError) as exc:
            log.warning(
                "page push stopped, the rest follows on request",
                extra={"migration": self.record.id, "error": describe_failure(exc)},
            )
        finally:
            pages.local_pages += counts.held
            self._pushed = counts.pages
        log.info(
            "pages pushed",
            extra={
                "migration": self.record.id,
                "pages": counts.pages,
                "held": counts.held,
                "skipped": counts.skipped,
                "ms": round((time.monotonic() - started) * 1000),
                "wait_read_ms": round(counts.wait_read * 1000),
                "wait_credit_ms": round(counts.wait_credit * 1000),
                "wait_send_ms": round(counts.wait_send * 1000),
            },
        )

    async def _send_rw_layer(self, link: Link, digest: str, data: bytes) -> None:
        rw_file = self.work / RW_LAYER_FILE
        await asyncio.to_thread(rw_file.write_bytes, data)
        await link.send(RwLayer(digest=digest))  # before the file: the target starts building on arrival
        await link.send_file(rw_file, RW_LAYER_FILE)

    def _postcopy_failpoint(self) -> Callable[[], Awaitable[None]]:
        """Fault tests hold post-copy open with `source.postcopy` (hit once, after the decision)."""
        hit = False

        async def before_reply() -> None:
            nonlocal hit
            if not hit and self.record.state == State.POSTCOPY:
                hit = True
                await self.ctx.failpoints.hit("source.postcopy")

        return before_reply

    def _pages_progress(self, total: int) -> Callable[[int], None]:
        served = 0
        last = 0.0

        def on_pages(count: int) -> None:
            nonlocal served, last
            served += count
            now = time.monotonic()
            if now - last > 0.1:  # progress, not a record per page fault
                last = now
                self._progress(None, pages_remote=max(total - served, 0))

        return on_pages

    async def _serve_postcopy(self, pages: SourcePages) -> None:
        """Answer page requests until the target's daemon closes. After the decision a cut link waits
        for the target to come back (its pager asks again for whatever was unanswered)."""
        while True:
            link = self._link
            assert link is not None, "set before the traffic starts"
            try:
                await pages.serve(link)
                return
            except PeerReportedFailure:
                raise
            except (TimeoutError, OSError, FerrymanError) as exc:
                if self.record.state != State.POSTCOPY:
                    raise  # before the decision, a broken link rolls back
                log.warning(
                    "post-copy link lost, waiting for the target",
                    extra={"migration": self.record.id, "error": describe_failure(exc)},
                )
                await link.close()
                timeout = self.ctx.config.migration.postcopy_reconnect_timeout
                try:
                    self._link, keeps_store = await self.ctx.postcopy_link(self.record.id, timeout)
                    self._link.follow("source", lambda: self.record.state)
                    pages.push_window = PushWindow()  # the push ended with the old link, its acks with it
                    if not keeps_store:  # a restarted target lost its pre-copy store: send every page
                        pages.held_by_target = None
                except TimeoutError:
                    raise PostcopyLost(f"the target did not come back within {timeout:.0f} s during POSTCOPY") from exc
                log.info("post-copy link back", extra={"migration": self.record.id})

    async def _postcopy_failed(self, link: Link | None, exc: BaseException) -> None:
        """After the decision nothing rolls back by itself. If the target says its copy is gone, ours
        (frozen at the switch) resumes: the workload continues from that point (ROLLBACK). Otherwise
        ours stays frozen, for an operator to decide: the target may still be running (NEEDS_OPERATOR)."""
        reason = describe_failure(exc)
        if isinstance(exc, PeerReportedFailure):
            await resume_if_paused(self.ctx.cd, self.record.container)
            if self._service_ip:
                info = self.ctx.network.info(self.record.container)
                await self.ctx.network.publish(self._service_ip, info.host_veth)
            reason = f"post-copy failed on the target ({reason}); the workload resumed here as of the switch"
        else:
            reason = (
                f"post-copy lost ({reason}); the target kills its copy after "
                f"{self.ctx.config.migration.postcopy_reconnect_timeout:.0f} s; ours stays frozen as of the switch"
            )
        log.error("post-copy failed", extra={"migration": self.record.id, "error": reason})
        lost = not isinstance(exc, PeerReportedFailure)
        await self._advance(Event.LOST if lost else Event.POSTCOPY_ABORTED, error=reason)
        self._progress(link, total_ms=round((time.monotonic() - self._started) * 1000, 1))

    # ----- endings -------------------------------------------------------------------------------

    async def _remove_local_copy(self) -> None:
        """Kill the frozen tasks, delete task, container and snapshot."""
        await remove_container(self.ctx.cd, self.record.container, moved_to=self.record.peer)

    async def _hold_address(self) -> None:
        """From just before the freeze until the decision, the service address's traffic is kept here,
        away from the copy: what its kernel took in after CRIU read its sockets, or a connection it
        completed that the workload had not accepted yet, would be lost to the target."""
        if self._service_ip:
            await self.ctx.network.hold(self._service_ip, self.ctx.network.info(self.record.container).host_veth)

    async def _silence(self) -> None:
        """Once frozen, nothing the copy's kernel sends leaves (see ServiceNetwork.silence). Only then:
        a reply the workload wrote before the pause still reaches its client, or it would wait for the
        restored copy's retransmission timer."""
        if self._service_ip:
            await self.ctx.network.silence(self.ctx.network.info(self.record.container).host_veth)

    async def _forward_held(self) -> int:
        """The target has published the address: what clients sent during the freeze goes there now,
        so each connection hears from the restored copy at once instead of at its client's next
        (backed-off) retransmission."""
        return await self.ctx.network.forward_held(self._service_ip) if self._service_ip else 0

    async def _rollback(self, link: Link | None, exc: BaseException) -> None:
        reason = describe_failure(exc)
        log.warning("migration rolling back", extra={"migration": self.record.id, "error": reason})
        if link is not None:
            await link.fail(reason)
        await resume_if_paused(self.ctx.cd, self.record.container)
        if self._service_ip:
            await self.ctx.network.release(self._service_ip, self.ctx.network.info(self.record.container).host_veth)
        await self._advance(Event.FAILED, error=reason)
        self._progress(link, total_ms=round((time.monotonic() - self._started) * 1000, 1))


def resident_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * 4096
    return total
