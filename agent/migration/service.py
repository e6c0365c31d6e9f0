"""The migration service: starts migrations, answers peers, keeps records, recovers after a restart.

Sessions between agents start with one control message that says what they are for (protocol.OPENERS):
  prepare   a source starts a migration to us (we become its target)
  query     a target restarted while its restored copy waited: what did the source decide?
  resolve   a source restarted after deciding: it tells the waiting target to commit
  postcopy  a target in POSTCOPY lost its link (or restarted): page traffic continues on this session
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import gc
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Coroutine, Sequence
from pathlib import Path
from typing import Any, Protocol

from agent.checkpoint.criuconf import CriuConfigs
from agent.checkpoint.features import CriuFeatures
from agent.checkpoint.features import detect as detect_criu
from agent.config import AgentConfig
from agent.containerd import Containerd
from agent.errors import ContainerdNotFound
from agent.images.service import ImageService
from agent.malloc import release_freed_memory
from agent.metrics import AgentMetrics
from agent.migration.blobs import image_blobs, serve_blobs
from agent.migration.failpoints import Failpoints
from agent.migration.group import MigrationGroup, split_volumes, volume_group
from agent.migration.journal import Journal
from agent.migration.link import Link
from agent.migration.local import remove_container, resume_if_paused
from agent.migration.protocol import (
    OPENERS,
    Blobs,
    Committed,
    PeerFailed,
    Postcopy,
    Prepare,
    ProtocolError,
    Query,
    Resolve,
    check_criu,
    check_protocol,
)
from agent.migration.protocol import Decision as DecisionReply
from agent.migration.record import MigrationId, MigrationOptions, MigrationRecord
from agent.migration.source import SourceContext, SourceMigration, resident_bytes
from agent.migration.states import Decision, Event, RecoveryAction, State, answer_for, recovery_action
from agent.migration.target import DecisionPending, TargetContext, TargetMigration, known_prepare
from agent.model import LABEL_POSTCOPY, LABEL_SERVICE_IP, LABEL_VOLUMES
from agent.reservations import ReservationBook
from agent.runtime.service import ContainerService
from agent.runtime.specpolicy import check_restorable_spec
from core.errors import FerrymanError, InvalidRequest, NotFound
from core.tasks import TaskSet

log = logging.getLogger(__name__)

# How often a waiting side asks its peer again for a decision it could not learn.
RESOLVE_INTERVAL = 2.0
RELEASE_MEMORY_AFTER = 2.0
"""Seconds after a migration ends before its freed memory goes back to the kernel: its link and
helpers let go of their buffers in that time."""


def auto_mode(features: CriuFeatures, postcopy_allowed: bool = True) -> str:
    """The fastest mode these CRIU features make safe."""
    if not features.uffd or not postcopy_allowed:
        return "precopy"
    # Without soft-dirty every pre-copy round freezes the workload for a whole dump: go lazy at once.
    return "hybrid" if features.mem_dirty_track else "lazy"


class MigrationNotFound(NotFound):
    code = "migration_not_found"


class UnknownPeer(NotFound):
    code = "unknown_peer"


class PeerTransport(Protocol):
    """Migration links to other agents (sessions.MigrationSessions over agent.peers)."""

    async def connect(self, host: str, migration_id: str) -> Link: ...


class MigrationService:
    def __init__(
        self,
        config: AgentConfig,
        cd: Containerd,
        images: ImageService,
        containers: ContainerService,
        metrics: AgentMetrics,
        transport: PeerTransport,
        host_name: str,
        failpoints: Failpoints | None = None,
        admission: ReservationBook | None = None,
    ) -> None:
        self.config = config
        self.host_name = host_name
        self._cd = cd
        self._images = images
        self._containers = containers
        self._metrics = metrics
        self._transport = transport
        self.journal = Journal(Path(config.state_dir) / "migrations")
        self.failpoints = failpoints or Failpoints()
        self._admission = admission
        self._records: dict[str, MigrationRecord] = {r.id: r for r in self.journal.all()}
        self._watchers: dict[str, list[asyncio.Queue[MigrationRecord]]] = {}
        self._tasks = TaskSet()
        self._criu_configs = containers.criu_configs or CriuConfigs(config.state_dir)
        self._postcopy_links: dict[str, asyncio.Queue[tuple[Link, asyncio.Event, bool]]] = {}
        """Sessions a POSTCOPY target opened to continue page traffic, for the source migration to take."""
        self._platform = images.platform
        self._features: CriuFeatures | None = None
        self._waiting: dict[str, TargetMigration] = {}
        """Restored, paused copies waiting for the source's decision."""
        self._decision_lock = asyncio.Lock()
        self._postcopy_done: dict[str, asyncio.Event] = {}
        self._release_timer: asyncio.TimerHandle | None = None

    # ----- records -------------------------------------------------------------------------------

    def _publish(self, record: MigrationRecord) -> None:
        previous = self._records.get(record.id)
        self._records[record.id] = record
        for queue in self._watchers.get(record.id, []):
            queue.put_nowait(record)
        if record.done and (previous is None or not previous.done):
            observe = getattr(self._metrics, "observe_migration", None)
            if observe is not None:
                observe(record)
            self._schedule_release()

    def _schedule_release(self) -> None:
        """_release_memory in RELEASE_MEMORY_AFTER s, once: at each migration's end, and at the end
        of each peer session, since a target's session (and its channel's buffers) outlives its
        record's end by a few seconds."""
        if self._release_timer is not None:
            self._release_timer.cancel()
        self._release_timer = asyncio.get_running_loop().call_later(RELEASE_MEMORY_AFTER, self._release_memory)

    def _release_memory(self) -> None:
        """Once no migration runs, the memory the migrations freed goes back to the kernel: the
        agent keeps it only while they run (agent.malloc).

        A full collection first: a finished migration's channels end up in reference cycles
        (threads, executors, exceptions with their frames), and without it their buffers are freed
        whenever the next gen-2 collection happens to run, after this release, and stay resident."""
        if all(record.done for record in self._records.values()):
            before = resident_bytes([os.getpid()])
            started = time.monotonic()
            gc.collect()
            collected_ms = round((time.monotonic() - started) * 1000)
            release_freed_memory()
            after = resident_bytes([os.getpid()])
            log.info(
                "freed memory released",
                extra={"rss_mb": after >> 20, "was_mb": before >> 20, "gc_ms": collected_ms},
            )

    def get(self, migration_id: str) -> MigrationRecord:
        record = self._records.get(migration_id)
        if record is None:
            raise MigrationNotFound(f"no migration {migration_id} on this host")
        return record

    def list(self) -> list[MigrationRecord]:
        return sorted(self._records.values(), key=lambda r: r.started_at)

    def migrating(self, container_id: str) -> bool:
        """Whether a migration that has not ended holds this container here, as source or target: the
        exits of its task are then the migration's doing, not the workload's (agent/runtime/restarts.py)."""
        return any(r.container == container_id and not r.done for r in self._records.values())

    async def watch(self, migration_id: str) -> AsyncIterator[MigrationRecord]:
        record = self.get(migration_id)
        queue: asyncio.Queue[MigrationRecord] = asyncio.Queue()
        self._watchers.setdefault(migration_id, []).append(queue)
        try:
            yield record
            while not record.done:
                record = await queue.get()
                yield record
        finally:
            self._watchers[migration_id].remove(queue)

    def _spawn(self, coro: Coroutine[Any, Any, object], name: str) -> None:
        self._tasks.spawn(coro, name)

    # ----- starting a migration (source) ----------------------------------------------------------

    async def migrate(self, container_id: str, target: str, options: MigrationOptions) -> MigrationRecord:
        options = options.validated()
        if target == self.host_name:
            raise InvalidRequest(f"{container_id} already runs on {target}")
        peer_address = self._peer_address(target)
        summary = await self._containers.inspect(container_id)  # ContainerNotFound for unknown or unmanaged ids
        if (summary.get("labels") or {}).get(LABEL_VOLUMES, ""):
            return await self._migrate_group(container_id, target, peer_address, options)
        busy = [r for r in self._records.values() if r.container == container_id and not r.done]
        if busy:
            raise InvalidRequest(f"container {container_id} is already migrating ({busy[0].id})")
        soft_dirty = await self._soft_dirty()
        postcopy_allowed = (summary.get("labels") or {}).get(LABEL_POSTCOPY, "") != "never"
        options = dataclasses.replace(options, mode=self._resolve_mode(options.mode, postcopy_allowed))
        record = MigrationRecord(
            id=MigrationId(f"mig-{secrets.token_hex(6)}"),
            role="source",
            container=container_id,
            peer=target,
            options=options,
            peer_address=peer_address,
        )
        await self.journal.write(record)
        self._publish(record)
        context = self._source_context(soft_dirty)
        migration = SourceMigration(context, record, lambda: self._transport.connect(target, record.id))
        self._spawn(self._run_source(migration), f"migration-{record.id}")
        return record

    async def _migrate_group(
        self, container_id: str, target: str, peer_address: str, options: MigrationOptions
    ) -> MigrationRecord:
        """A container that shares a volume moves with its whole volume group and the volumes
        (group.py): one pre-copy migration per member, in step; returns the asked-for member's record,
        whose `group` names every member's migration."""
        dirs = self._containers.volumes
        if dirs is None:
            raise InvalidRequest(f"container {container_id} mounts shared volumes, and this agent keeps none")
        volumes_of = {c.id: split_volumes(c.labels.get(LABEL_VOLUMES, "")) for c in await self._containers.list()}
        members, volumes = volume_group(container_id, volumes_of)
        busy = [r for r in self._records.values() if r.container in members and not r.done]
        if busy:
            raise InvalidRequest(
                f"container {busy[0].container} of {container_id}'s volume group ({', '.join(members)}) "
                f"is already migrating ({busy[0].id})"
            )
        if options.mode in ("lazy", "hybrid"):
            raise InvalidRequest(
                f"container {container_id} moves with its volume group ({', '.join(members)}), which migrates "
                f"in precopy mode only: its members decide together, mode {options.mode} decides alone"
            )
        soft_dirty = await self._soft_dirty()
        options = dataclasses.replace(options, mode="precopy")
        ids = {m: MigrationId(f"mig-{secrets.token_hex(6)}") for m in members}
        group_ids = tuple((m, str(ids[m])) for m in members)
        group = MigrationGroup(members, container_id, {v: dirs.path(v) for v in volumes})
        records = [
            MigrationRecord(
                id=ids[m],
                role="source",
                container=m,
                peer=target,
                # The coordinator's reservation covers the group; it is charged with the first member.
                options=options if m == container_id else dataclasses.replace(options, reservation=""),
                peer_address=peer_address,
                group=group_ids,
            )
            for m in members
        ]
        for record in records:
            await self.journal.write(record)
            self._publish(record)
        context = dataclasses.replace(self._source_context(soft_dirty), group=group)
        migrations = [
            SourceMigration(context, r, functools.partial(self._transport.connect, target, r.id)) for r in records
        ]
        log.info("volume group migrating", extra={"members": members, "volumes": sorted(volumes), "target": target})
        self._spawn(self._run_group(migrations, group), f"migration-group-{records[0].id}")
        return records[0]

    async def _run_group(self, migrations: Sequence[SourceMigration], group: MigrationGroup) -> None:
        """Every member's migration at once; once all committed, this host's copies of the volumes go."""
        await asyncio.gather(*(self._run_source(m) for m in migrations), return_exceptions=True)
        states = {m.record.container: self._records[m.record.id].state for m in migrations}
        if all(state == State.COMMIT for state in states.values()):
            dirs = self._containers.volumes
            assert dirs is not None, "checked before the group started"
            for name in sorted(group.volumes):
                await asyncio.to_thread(dirs.remove, name)
            log.info("volume group moved", extra={"volumes": sorted(group.volumes), "members": group.members})
        else:
            log.warning(
                "volume group rolled back",
                extra={"states": {c: s.value for c, s in states.items()}, "error": group.error},
            )

    async def _run_source(self, migration: SourceMigration) -> None:
        try:
            await migration.run()
            self._release_postcopy_session(migration.record.id)
        except (FerrymanError, TimeoutError, OSError) as exc:
            if migration.record.state == State.SWITCH:
                log.warning(
                    "commit not confirmed yet, retrying", extra={"migration": migration.record.id, "error": str(exc)}
                )
                await self._finish_switch(migration.record)
            else:
                raise

    def _peer_address(self, host: str) -> str:
        for peer in self.config.peers:
            if peer.name == host:
                return peer.address
        raise UnknownPeer(f"no peer named {host} in this agent's [[peers]]")

    async def _soft_dirty(self) -> bool:
        """Whether CRIU can pre-dump on this kernel; detected once (None until then)."""
        if self._features is None:
            try:
                self._features = await detect_criu()
            except FerrymanError as exc:
                raise InvalidRequest(f"migration needs CRIU: {exc.message}") from exc
            log.info("CRIU features", extra=self._features.to_json())
        return self._features.mem_dirty_track

    def _resolve_mode(self, requested: str, postcopy_allowed: bool = True) -> str:
        """`auto` (or the agent default) becomes the fastest mode this host's CRIU can do safely."""
        mode = requested or self.config.migration.mode
        features = self._features
        assert features is not None, "detected by _soft_dirty() first"
        if mode in ("lazy", "hybrid") and not postcopy_allowed:
            raise InvalidRequest(f"the container's label {LABEL_POSTCOPY}=never rules out mode {mode}")
        if mode in ("lazy", "hybrid") and not features.uffd:
            raise InvalidRequest(f"mode {mode} needs userfaultfd, which this kernel does not offer")
        return mode if mode != "auto" else auto_mode(features, postcopy_allowed)

    async def _postcopy_link(self, migration_id: str, within: float) -> tuple[Link, bool]:
        queue = self._postcopy_links.setdefault(migration_id, asyncio.Queue())
        async with asyncio.timeout(within):
            link, done, keeps_store = await queue.get()
        self._release_postcopy_session(migration_id)  # the previous session is over
        self._postcopy_done[migration_id] = done
        return link, keeps_store

    def _release_postcopy_session(self, migration_id: str) -> None:
        done = self._postcopy_done.pop(migration_id, None)
        if done is not None:
            done.set()

    def _source_context(self, soft_dirty: bool = False) -> SourceContext:
        return SourceContext(
            criu_configs=self._criu_configs,
            postcopy_link=self._postcopy_link,
            soft_dirty=soft_dirty,
            criu_version=self._features.version if self._features is not None else "",
            config=self.config,
            cd=self._cd,
            journal=self.journal,
            failpoints=self.failpoints,
            platform=self._platform,
            publish=self._publish,
            network=self._containers.network,
        )

    def _target_context(self) -> TargetContext:
        return TargetContext(
            config=self.config,
            cd=self._cd,
            journal=self.journal,
            failpoints=self.failpoints,
            platform=self._platform,
            images=self._images,
            log_path=self._containers.log_path,
            criu_configs=self._criu_configs,
            publish=self._publish,
            network=self._containers.network,
            connect=self._transport.connect,
            admission=self._admission,
            criu_version=self._features.version if self._features is not None else "",
            volumes=self._containers.volumes,
        )

    # ----- sessions from peers --------------------------------------------------------------------

    async def handle_session(self, link: Link, peer_host: str, session_id: str) -> None:
        """One inbound mTLS session; `peer_host` is the identity from the peer's certificate and
        `session_id` the migration its preamble named (its files land under that id)."""
        try:
            first = await link.expect_one_of(OPENERS)
            about = first.migration if isinstance(first, Prepare | Query | Resolve | Postcopy | Blobs) else None
            if about != session_id:
                raise ProtocolError(f"a message about migration {session_id!r}", f"{first.type} about {about!r}")
            if isinstance(first, Prepare):
                await self._accept_migration(link, peer_host, first)
            elif isinstance(first, Query):
                await self._answer_query(link, peer_host, first.migration)
            elif isinstance(first, Resolve):
                await self._apply_resolution(link, first.migration)
            elif isinstance(first, Postcopy):
                await self._continue_postcopy(link, peer_host, first.migration, first.store)
            elif isinstance(first, Blobs):
                await self._serve_blobs(link, peer_host, first.migration)
        except (FerrymanError, TimeoutError, OSError) as exc:
            log.warning("peer session failed", extra={"peer": peer_host, "error": str(exc)})
            await link.fail(str(exc))
        except Exception as exc:
            # A bug here, not the peer's doing: the peer still hears that this side failed.
            log.exception("peer session crashed", extra={"peer": peer_host})
            await link.fail(f"internal error on {self.host_name}: {type(exc).__name__}")
        finally:
            await link.close()
            self._schedule_release()

    async def _accept_migration(self, link: Link, peer_host: str, prepare: Prepare) -> None:
        # Another version first: the source hears why (link.fail) before anything is reserved or sent.
        check_protocol(prepare.protocol)
        if prepare.protocol >= 2:  # our CRIU version, told in `prepared`; a newer one's images may not restore here
            await self._soft_dirty()
            assert self._features is not None
            if prepare.criu:
                check_criu(prepare.criu, self._features.version)
        log.info(
            "migration protocol agreed",
            extra={
                "migration": prepare.migration,
                "peer": peer_host,
                "protocol": prepare.protocol,
                "peer_criu": prepare.criu,
            },
        )
        # The peer is authenticated, not trusted: it may not choose the mounts, capabilities or
        # namespaces of what this host creates. Refused here, before anything is recorded or built.
        check_restorable_spec(prepare.container.spec, split_volumes(prepare.container.labels.get(LABEL_VOLUMES, "")))
        record = MigrationRecord(
            id=MigrationId(prepare.migration),
            role="target",
            container=prepare.container.id,
            peer=peer_host,
            image=prepare.container.image,
            peer_address=next((p.address for p in self.config.peers if p.name == peer_host), ""),
        )
        migration = TargetMigration(self._target_context(), record, prepare)
        try:
            await migration.run(link)
        except DecisionPending:
            self._waiting[record.id] = migration
            self._spawn(self._ask_source(migration), f"ask-source-{record.id}")

    async def _continue_postcopy(self, link: Link, peer_host: str, migration_id: str, keeps_store: bool) -> None:
        """Hand the session to our POSTCOPY source migration; it is closed once that is done with it."""
        record = self._records.get(migration_id)
        if record is None or record.role != "source" or record.peer != peer_host or record.state != State.POSTCOPY:
            raise PeerFailed(f"no migration {migration_id} in POSTCOPY to {peer_host} here")
        done = asyncio.Event()
        await self._postcopy_links.setdefault(migration_id, asyncio.Queue()).put((link, done, keeps_store))
        await done.wait()

    async def _serve_blobs(self, link: Link, peer_host: str, migration_id: str) -> None:
        """The image's blobs to the target of one of our migrations that is under way (blobs.py)."""
        record = self._records.get(migration_id)
        if record is None or record.role != "source" or record.peer != peer_host or record.done:
            raise MigrationNotFound(f"no migration {migration_id} to {peer_host} runs from here")
        container = await self._cd.containers.get(record.container)
        image, allowed = await image_blobs(self._cd, container.image, self._platform)
        started = time.monotonic()
        sent = await serve_blobs(link, self._cd, image, allowed)
        log.info(
            "image blobs sent",
            extra={"migration": migration_id, "bytes": sent, "ms": round((time.monotonic() - started) * 1000, 1)},
        )

    async def _answer_query(self, link: Link, peer_host: str, migration_id: str) -> None:
        record = self._records.get(migration_id)
        answer = answer_for(record, peer_host)  # the decision table (states.py)
        await link.send(DecisionReply(decision=answer.decision.value))
        if answer.await_committed and record is not None:
            await link.expect(Committed)
            await self._complete_source(record)

    async def _apply_resolution(self, link: Link, migration_id: str) -> None:
        record = self._records.get(migration_id)
        if record is None or record.role != "target":
            raise MigrationNotFound(f"no migration {migration_id} waits here")
        migration = self._waiting.get(migration_id)
        if migration is not None:
            await self._resolve_target(migration, Decision.COMMIT)
        state = self._records[migration_id].state
        if state != State.COMMIT:
            raise PeerFailed(f"migration {migration_id} is {state.value}, it cannot commit")
        await link.send(Committed())

    # ----- decisions that could not be delivered ---------------------------------------------------

    async def _ask_source(self, migration: TargetMigration) -> None:
        """A restored, paused copy learns the source's decision, however long the link is down."""
        record = migration.record
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.migration.decision_timeout
        while loop.time() < deadline:
            with contextlib.suppress(FerrymanError, TimeoutError, OSError):
                link = await self._transport.connect(record.peer, record.id)
                try:
                    await link.send(Query(migration=record.id))
                    reply = await link.expect(DecisionReply)
                    decision = Decision.parse(reply.decision)
                    if decision is not None and decision.final and await self._resolve_target(migration, decision):
                        if decision is Decision.COMMIT:
                            await link.send(Committed())
                        return
                finally:
                    await link.close()
            await asyncio.sleep(RESOLVE_INTERVAL)
        log.error("no decision from the source; the restored copy stays paused", extra={"migration": record.id})

    async def _resolve_target(self, migration: TargetMigration, decision: Decision) -> bool:
        """Apply the source's decision to a restored, paused copy, once (the source may push it while
        we ask for it). Returns True when the migration has that outcome now."""
        async with self._decision_lock:
            current = self._records[migration.record.id]
            commit = decision is Decision.COMMIT
            wanted = State.COMMIT if commit else State.ROLLBACK
            if current.state != State.RESTORE:
                return current.state == wanted or (commit and current.state == State.POSTCOPY)
            migration.record = current
            if commit and migration.lazy:
                await migration._resume_postcopy()
                self._spawn(self._finish_postcopy(migration), f"postcopy-{current.id}")
            elif commit:
                await migration.commit()
            else:
                await migration.rollback("the source rolled back")
            self._waiting.pop(current.id, None)
            return True

    async def _finish_postcopy(self, migration: TargetMigration) -> None:
        """A POSTCOPY target whose first link is gone (or whose agent restarted) finishes over new ones."""
        try:
            await migration.finish_postcopy(None)
        except (FerrymanError, TimeoutError, OSError) as exc:
            await migration.rollback(f"post-copy failed: {exc}")
        finally:
            if migration.record.done:
                await migration.cleanup()

    async def _finish_switch(self, record: MigrationRecord) -> None:
        """The source decided to commit; deliver that to the target until it confirms."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.migration.decision_timeout
        while loop.time() < deadline:
            with contextlib.suppress(FerrymanError, TimeoutError, OSError):
                link = await self._transport.connect(record.peer, record.id)
                try:
                    await link.send(Resolve(migration=record.id, decision="commit"))
                    await link.expect(Committed)
                finally:
                    await link.close()
                await self._complete_source(self._records[record.id])
                return
            await asyncio.sleep(RESOLVE_INTERVAL)
        log.error("target never confirmed; the frozen source copy is kept", extra={"migration": record.id})

    async def _complete_source(self, record: MigrationRecord) -> None:
        if record.state != State.SWITCH:
            return
        await remove_container(self._cd, record.container, moved_to=record.peer)
        record = record.advance(Event.SWITCHED)
        await self.journal.write(record)
        self._publish(record)

    # ----- after a restart -------------------------------------------------------------------------

    async def recover(self) -> None:
        """Finish or roll back what the journal says was in flight when the agent stopped: each
        journaled state has one action (the recovery table in states.py)."""
        actions = {
            RecoveryAction.RESUME_SOURCE_AND_FAIL: self._recover_resume_source,
            RecoveryAction.FINISH_SWITCH: self._recover_finish_switch,
            RecoveryAction.NEEDS_OPERATOR: self._recover_needs_operator,
            RecoveryAction.REMOVE_TARGET_COPY_AND_FAIL: self._recover_remove_target_copy,
            RecoveryAction.ASK_SOURCE: self._recover_ask_source,
            RecoveryAction.FINISH_POSTCOPY: self._recover_finish_postcopy,
            RecoveryAction.FINISH_COMMIT: self._recover_finish_commit,
        }
        for record in [r for r in self._records.values() if not r.done]:
            await actions[recovery_action(record.role, record.state)](record)
            log.info("recovered migration", extra={"migration": record.id, "state": self._records[record.id].state})

    @staticmethod
    def _restart_reason(record: MigrationRecord) -> str:
        return f"agent restarted during {record.state.value}"

    async def _recover_resume_source(self, record: MigrationRecord) -> None:
        await resume_if_paused(self._cd, record.container)
        await self._release_address(record.container)
        await self._save(record.advance(Event.FAILED, error=self._restart_reason(record)))

    async def _recover_needs_operator(self, record: MigrationRecord) -> None:
        # The page server's session died with the previous process: the target cannot get its
        # missing pages any more and its pager kills that copy. Ours, frozen at the switch, stays.
        error = (
            f"{self._restart_reason(record)}: the pages still here are lost to the target, whose copy is killed; "
            "the frozen copy here is kept as of the switch"
        )
        await self._save(record.advance(Event.LOST, error=error))

    async def _recover_finish_switch(self, record: MigrationRecord) -> None:
        self._spawn(self._finish_switch(record), f"finish-{record.id}")

    async def _recover_remove_target_copy(self, record: MigrationRecord) -> None:
        await remove_container(self._cd, record.container, only_migration=record.id)
        await self._save(record.advance(Event.FAILED, error=self._restart_reason(record)))

    async def _recover_ask_source(self, record: MigrationRecord) -> None:
        migration = await self._restarted_target(record)
        self._waiting[record.id] = migration
        self._spawn(self._ask_source(migration), f"ask-source-{record.id}")

    async def _recover_finish_postcopy(self, record: MigrationRecord) -> None:
        migration = TargetMigration(self._target_context(), record, known_prepare(record))
        migration.lazy = True
        self._spawn(self._finish_postcopy(migration), f"postcopy-{record.id}")

    async def _recover_finish_commit(self, record: MigrationRecord) -> None:
        """The source decided commit and resends it until we confirm: our copy is the workload. If
        that copy is gone, neither side can finish on its own."""
        try:
            await self._cd.containers.get(record.container)
        except ContainerdNotFound:
            error = f"{self._restart_reason(record)}: the committed copy is gone; the source keeps its frozen copy"
            await self._save(record.advance(Event.LOST, error=error))
            return
        migration = await self._restarted_target(record)
        await migration.finish_commit()
        await migration.cleanup()

    async def _restarted_target(self, record: MigrationRecord) -> TargetMigration:
        """A target migration rebuilt from its record and the container's labels (its service address)."""
        try:
            labels = (await self._cd.containers.get(record.container)).labels
        except ContainerdNotFound:
            labels = {}
        return TargetMigration(self._target_context(), record, known_prepare(record, labels))

    async def _release_address(self, container_id: str) -> None:
        """A source that stopped while the address was held (before the decision) routes it back."""
        try:
            labels = (await self._cd.containers.get(container_id)).labels
        except ContainerdNotFound:
            return
        if service_ip := labels.get(LABEL_SERVICE_IP):
            network = self._containers.network
            await network.release(service_ip, network.info(container_id).host_veth)

    async def _save(self, record: MigrationRecord) -> None:
        await self.journal.write(record)
        self._publish(record)

    async def close(self) -> None:
        """Stop background work. A running dump is never interrupted half-way: its step completes."""
        if self._release_timer is not None:
            self._release_timer.cancel()
        await self._tasks.close()
