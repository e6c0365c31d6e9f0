"""Runs coordinator migrations: place a target with a reservation, start the migration on the source
agent, follow it to COMMIT, ROLLBACK or NEEDS_OPERATOR, retry a rollback on another target within bounds.

Limits: at most `max_per_fleet` migrations run at once, at most `max_per_host` out of one source,
and "auto" placements skip targets already receiving `max_per_host`.

The live migration itself is the agents' (agent/migration/): the source agent drives it and keeps
the workload running exactly once. The coordinator only chooses, reserves, starts and watches, and
records every step in the store, so a restarted coordinator picks running migrations up again.

Intent before action: an attempt's target and reservation are recorded (PENDING, with the
reservation id and no agent migration id yet) before the source agent is asked, with the same
fenced write as everything else, so a leader that stops between the agent's answer and the record
naming its migration leaves a trace. The next leader reconciles each such intent against the
source agent's own records (`GET /v1/migrations`, matched by the reservation id the agent was
given): it follows the agent's migration if there is one, and frees the reservation and starts the
attempt afresh if there is none. Reservations made for a migration that no record names (the leader
stopped between reserving and recording) are freed at the same time. So every container moves at
most once and no reservation outlives a change of leader.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from coordinator.agents import AgentClientLike
from coordinator.config import CoordinatorConfig
from coordinator.groups import follower_tag, group_outcome, lead_of, volume_group
from coordinator.metrics import CoordinatorMetrics
from coordinator.model import (
    Capacity,
    Decision,
    Host,
    HostNotFound,
    Migration,
    MigrationNotFound,
    MigrationState,
    NoTarget,
    Reservation,
)
from coordinator.placement import Need, Placer
from coordinator.reservations import ReservationService
from coordinator.store import Store
from core.errors import Conflict, ContainerNotFound, FerrymanError, InvalidRequest
from core.tasks import TaskSet

log = logging.getLogger(__name__)

AUTO = "auto"
_AGENT_DONE = {
    "COMMIT": MigrationState.COMMITTED,
    "ROLLBACK": MigrationState.FAILED,
    # The agents could not decide safely (post-copy lost with the source frozen): the source keeps
    # its frozen copy for a human. Finished and failed, and never retried: another attempt would only
    # move a frozen copy, or fail on it.
    "NEEDS_OPERATOR": MigrationState.ABANDONED,
}


class Orchestrator:
    def __init__(
        self,
        store: Store,
        placer: Placer,
        reservations: ReservationService,
        agents: AgentClientLike,
        config: CoordinatorConfig,
        clock: Callable[[], float],
        metrics: CoordinatorMetrics,
    ) -> None:
        self._store = store
        self._placer = placer
        self._reservations = reservations
        self._agents = agents
        self._limits = config.migrations
        self._clock = clock
        self._metrics = metrics
        self._fleet = asyncio.Semaphore(self._limits.max_per_fleet)
        self._per_host: defaultdict[str, asyncio.Semaphore] = defaultdict(
            lambda: asyncio.Semaphore(self._limits.max_per_host)
        )
        self._incoming: Counter[str] = Counter()
        """Migrations running into each target host."""
        self._slots = asyncio.Condition()
        """Held while placing (so the counts stay exact); notified when a target slot frees up."""
        self._tasks = TaskSet()
        self._changed = asyncio.Condition()
        self.fault: Callable[[str, Migration], Awaitable[None]] | None = None
        """A test's fault-injection point, awaited at "reserved" (a target reserved, nothing
        recorded), "recorded" (the intent recorded, the agent not asked) and "accepted" (the agent
        started it, its id not recorded): the windows a leader can stop in. None in production."""

    # ----- requests

    async def request(
        self,
        container: str,
        to: str = AUTO,
        *,
        mode: str | None = None,
        requested_by: str = "",
        reason: str = "manual",
    ) -> Migration:
        """Accept a migration of `container` to `to` ("auto" or a host); it runs in the background."""
        source = await self._source_of(container)
        members = volume_group(container, source.containers)
        if to != AUTO:
            if await self._store.get_host(to) is None:
                raise HostNotFound(f"no host {to!r} is registered")
            if to == source.name:
                raise InvalidRequest(f"container {container!r} already runs on {to!r}")
        for active in await self._store.list_migrations(active_only=True):
            if active.container == container:
                raise Conflict(f"container {container!r} is already being migrated ({active.id})")
            if active.container in members:
                raise Conflict(
                    f"container {container!r} moves with its volume group ({', '.join(members)}), and "
                    f"{active.container!r} of it is already being migrated ({active.id})"
                )
        now = self._clock()
        migration = Migration(
            id=f"mig-{secrets.token_hex(6)}",
            container=container,
            source=source.name,
            target="" if to == AUTO else to,
            requested_to=to,
            mode=mode or "",
            requested_by=requested_by,
            reason=reason,
            created_at=now,
            updated_at=now,
            history=((MigrationState.PENDING.value, now, f"{reason}; to {to}" + (f"; mode {mode}" if mode else "")),),
        )
        await self._store.put_migration(migration)
        self._metrics.migration_transitions.labels(state=MigrationState.PENDING.value).inc()
        for member in members[1:]:
            # Kept in step by the lead's driver (_save); the source agent moves the whole group.
            await self._store.put_migration(
                dataclasses.replace(
                    migration,
                    id=f"mig-{secrets.token_hex(6)}",
                    container=member,
                    requested_by=follower_tag(migration.id),
                    history=(
                        (MigrationState.PENDING.value, now, f"moves with {container}'s volume group ({migration.id})"),
                    ),
                )
            )
        group = f" with its volume group ({', '.join(members[1:])})" if len(members) > 1 else ""
        await self._store.record_decision(
            Decision(
                ts=now,
                host=source.name,
                kind="migrate",
                detail=f"{migration.id}: {container}{group} to {to} ({reason})",
            )
        )
        self._spawn(migration.id, to, mode)
        return migration

    async def _source_of(self, container: str) -> Host:
        hosts = [h for h in await self._store.list_hosts() if any(c.id == container for c in h.containers)]
        if not hosts:
            raise ContainerNotFound(f"no host reports a container {container!r} in its telemetry")
        if len(hosts) > 1:
            raise Conflict(f"container {container!r} is reported by several hosts: {[h.name for h in hosts]}")
        return hosts[0]

    async def get(self, migration_id: str) -> Migration:
        migration = await self._store.get_migration(migration_id)
        if migration is None:
            raise MigrationNotFound(f"no migration {migration_id!r}")
        return migration

    async def all(self) -> list[Migration]:
        return await self._store.list_migrations()

    async def wait(self, migration_id: str, within: float) -> Migration:
        """The migration once it is done, or as it is after `within` seconds."""
        try:
            async with asyncio.timeout(within), self._changed:
                while not (migration := await self.get(migration_id)).done:
                    await self._changed.wait()
        except TimeoutError:
            return await self.get(migration_id)
        return migration

    def active_count(self) -> int:
        return len(self._tasks)

    # ----- lifecycle

    async def resume(self) -> int:
        """After a restart or a change of leader: free the reservations no migration record names,
        then pick every unfinished migration up again (running ones are re-polled, recorded intents
        reconciled with the source agent)."""
        started = self._clock()
        active = await self._store.list_migrations(active_only=True)
        named = {m.reservation_id for m in active if m.reservation_id}
        for reservation in await self._store.list_reservations():
            if (
                reservation.purpose.startswith("migration:")
                and reservation.id not in named
                and reservation.created_at < started  # not one a migration accepted since has just made
            ):
                log.warning(
                    "freeing a reservation no migration names",
                    extra={"reservation": reservation.id, "purpose": reservation.purpose, "host": reservation.host},
                )
                await self._reservations.release(reservation.id, agent_too=True)
        leads = [m for m in active if lead_of(m) is None]  # a group's followers: their lead's driver keeps them
        for migration in leads:
            self._spawn(migration.id, migration.requested_to, migration.mode or None)
        return len(leads)

    async def close(self) -> None:
        await self._tasks.close()

    def _spawn(self, migration_id: str, to: str, mode: str | None) -> None:
        self._tasks.spawn(self._run(migration_id, to, mode), f"migration-{migration_id}")

    # ----- one migration

    async def _save(
        self,
        migration: Migration,
        state: MigrationState,
        detail: str = "",
        agent_ids: Mapping[str, str] | None = None,
        **changes: Any,
    ) -> Migration:
        """Record the new state; a group's lead brings its followers along (`agent_ids`: each member's
        migration on the source agent, once it started)."""
        now = self._clock()
        migration = dataclasses.replace(
            migration, state=state, updated_at=now, history=(*migration.history, (state.value, now, detail)), **changes
        )
        await self._store.put_migration(migration)
        # Counted with the write, before any other await: a waiter that reads it done sees it counted.
        self._metrics.migration_transitions.labels(state=state.value).inc()
        for follower in await self._followers(migration.id):
            await self._store.put_migration(
                dataclasses.replace(
                    follower,
                    state=state,
                    updated_at=now,
                    history=(*follower.history, (state.value, now, detail)),
                    target=migration.target,
                    attempt=migration.attempt,
                    tried_targets=migration.tried_targets,
                    error=migration.error,
                    agent_migration_id=(agent_ids or {}).get(follower.container, follower.agent_migration_id),
                )
            )
        self._metrics.set_migrations(await self._store.list_migrations())
        async with self._changed:
            self._changed.notify_all()
        return migration

    async def _followers(self, lead_id: str) -> list[Migration]:
        tag = follower_tag(lead_id)
        return [m for m in await self._store.list_migrations() if m.requested_by == tag]

    async def _run(self, migration_id: str, to: str, mode: str | None) -> None:
        try:
            migration = await self.get(migration_id)
            async with self._fleet, self._per_host[migration.source]:
                await self._attempts(migration, to, mode)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("migration driver failed", extra={"migration": migration_id})

    async def _attempts(self, migration: Migration, to: str, mode: str | None) -> None:
        max_attempts = 1 if to != AUTO else self._limits.max_attempts
        while not migration.done:
            if _intent_only(migration):
                migration = await self._reconcile(migration)
                continue
            if migration.state is MigrationState.RUNNING and migration.agent_migration_id:
                # Resumed after a coordinator restart: follow it, it still counts against its target.
                async with self._slots:
                    self._incoming[migration.target] += 1
                try:
                    migration = await self._follow(migration)
                finally:
                    async with self._slots:
                        self._incoming[migration.target] -= 1
                        self._slots.notify_all()
            elif migration.attempt >= max_attempts:
                migration = await self._save(migration, MigrationState.ABANDONED, f"gave up after {migration.attempt}")
                await self._decide(migration, "give_up", migration.error)
            else:
                migration = await self._attempt(migration, to, mode)
            if migration.state is MigrationState.FAILED and migration.attempt < max_attempts:
                await self._decide(migration, "retry", f"attempt {migration.attempt} failed: {migration.error}")

    async def _attempt(self, migration: Migration, to: str, mode: str | None) -> Migration:
        source = await self._store.get_host(migration.source)
        if source is None:
            return await self._save(migration, MigrationState.ABANDONED, "source host unregistered")
        usage = next((c for c in source.containers if c.id == migration.container), None)
        # A volume group lands on one target: it must hold all of it.
        members = {migration.container, *(f.container for f in await self._followers(migration.id))}
        group = [c for c in source.containers if c.id in members]
        need = Need(
            capacity=Capacity(
                cpu_millis=int(sum(c.cpu_millis for c in group)), memory_bytes=sum(c.memory_bytes for c in group)
            ),
            image=usage.image if usage else "",
        )
        attempt = migration.attempt + 1
        reservation = await self._place(migration, source.name, need, to)
        if self.fault is not None and not isinstance(reservation, NoTarget):
            await self.fault("reserved", migration)
        if isinstance(reservation, NoTarget):
            error = reservation.message
            migration = await self._save(migration, MigrationState.FAILED, error, attempt=attempt, error=error)
            # No host can take it now: retrying at once would only fail the same way.
            return await self._save(migration, MigrationState.ABANDONED, "no target")
        try:
            return await self._start(migration, source, reservation, attempt, mode)
        finally:
            async with self._slots:
                self._incoming[reservation.host] -= 1
                self._slots.notify_all()

    async def _place(self, migration: Migration, source: str, need: Need, to: str) -> Reservation | NoTarget:
        """Reserve a target and count it as receiving; the NoTarget error when no host can take it.

        "auto" placements skip targets already receiving max_per_host migrations and, when only busy
        targets could take the container, wait for one of them to finish. A named target is not
        limited: ops chose it.
        """
        while True:
            async with self._slots:
                busy = {h for h, n in self._incoming.items() if n >= self._limits.max_per_host} if to == AUTO else set()
                try:
                    reservation = await self._placer.place(
                        need,
                        f"migration:{migration.id}",
                        exclude={source, *migration.tried_targets, *busy},
                        only=None if to == AUTO else to,
                    )
                except NoTarget as exc:
                    if not busy:
                        return exc
                    await self._slots.wait()  # a busy target may be the one that fits: wait for a slot
                    continue
                self._incoming[reservation.host] += 1
                return reservation

    async def _start(
        self, migration: Migration, source: Host, reservation: Reservation, attempt: int, mode: str | None
    ) -> Migration:
        target = reservation.host
        options: dict[str, Any] = {"mode": mode} if mode else {}
        # The intent, before the agent hears of it (see the module's docstring).
        migration = await self._save(
            migration,
            MigrationState.PENDING,
            f"starting: to {target} with reservation {reservation.id}",
            attempt=attempt,
            target=target,
            tried_targets=(*migration.tried_targets, target),
            reservation_id=reservation.id,
            agent_migration_id="",
        )
        if self.fault is not None:
            await self.fault("recorded", migration)
        try:
            record = await self._agents.start_migration(source, migration.container, target, reservation.id, options)
        except FerrymanError as exc:
            await self._reservations.release(reservation.id)
            detail = f"start on {source.name} failed"
            return await self._save(migration, MigrationState.FAILED, detail, error=exc.message)
        if self.fault is not None:
            await self.fault("accepted", migration)
        migration = await self._save(
            migration,
            MigrationState.RUNNING,
            f"to {target}",
            agent_ids={str(c): str(i) for c, i in record.get("group") or ()},
            agent_migration_id=str(record.get("id", "")),
            error="",
        )
        return await self._follow(migration)

    async def _reconcile(self, migration: Migration) -> Migration:
        """An intent recorded by a leader that stopped before recording the agent's answer: follow the
        migration the source agent has for this reservation, or free the reservation and make the
        attempt again. Until the source agent answers, nothing else is tried (it may hold one)."""
        try:
            async with asyncio.timeout(self._limits.timeout):
                while True:
                    source = await self._store.get_host(migration.source)
                    if source is None:
                        await self._reservations.release(migration.reservation_id, agent_too=True)
                        return await self._save(migration, MigrationState.ABANDONED, "source host unregistered")
                    try:
                        records = await self._agents.list_migrations(source)
                        break
                    except FerrymanError as exc:
                        log.warning(
                            "cannot reconcile a migration yet", extra={"migration": migration.id, "error": exc.message}
                        )
                    await asyncio.sleep(self._limits.poll_period)
        except TimeoutError:
            error = (
                f"{migration.source} did not say within {self._limits.timeout:g} s whether it started "
                f"{migration.container}; not retried, see its record"
            )
            migration = await self._save(migration, MigrationState.ABANDONED, error, error=error)
            await self._decide(migration, "give_up", error)
            return migration
        found = started_for(records, migration)
        if found is not None:
            migration = await self._save(
                migration,
                MigrationState.RUNNING,
                f"to {migration.target}: the agent's {found} (recorded after a change of leader)",
                agent_migration_id=found,
                error="",
            )
            async with self._slots:
                self._incoming[migration.target] += 1
            try:
                return await self._follow(migration)
            finally:
                async with self._slots:
                    self._incoming[migration.target] -= 1
                    self._slots.notify_all()
        # Never started: undo the attempt, as if the leader had stopped before it.
        await self._reservations.release(migration.reservation_id, agent_too=True)
        return await self._save(
            migration,
            MigrationState.PENDING,
            f"not started on {migration.source}; reservation {migration.reservation_id} freed",
            attempt=migration.attempt - 1,
            tried_targets=migration.tried_targets[:-1],
            target="",
            reservation_id="",
        )

    async def _follow(self, migration: Migration) -> Migration:
        """Poll the source agent until its record is terminal (or the attempt times out).

        A timed-out attempt is abandoned, never retried: the agent's migration may still be running
        or committing, and a second attempt could move the workload while the first one lands.
        """
        timed_out = False
        try:
            async with asyncio.timeout(self._limits.timeout):
                outcome, error = await self._poll(migration)
        except TimeoutError:
            timed_out = True
            outcome = MigrationState.ABANDONED
            error = (
                f"no outcome from {migration.source} within {self._limits.timeout:g} s; not retried, "
                "the agent may still finish it (see its record)"
            )
        if migration.reservation_id:
            # The target agent releases its copy on commit/rollback itself; this frees ours. The agent's
            # copy is released here only after a rollback: a timed-out migration may still need it.
            await self._reservations.release(migration.reservation_id, agent_too=outcome is MigrationState.FAILED)
        migration = await self._save(migration, outcome, error or "done", error=error)
        if timed_out:
            await self._decide(migration, "give_up", error)
        elif outcome is MigrationState.ABANDONED:  # the agents' NEEDS_OPERATOR
            await self._decide(migration, "needs_operator", error)
        return migration

    async def _poll(self, migration: Migration) -> tuple[MigrationState, str]:
        ids = [migration.agent_migration_id, *(f.agent_migration_id for f in await self._followers(migration.id))]
        while True:
            source = await self._store.get_host(migration.source)
            if source is not None:
                try:
                    records = [await self._agents.get_migration(source, i) for i in ids if i]
                except FerrymanError as exc:
                    log.warning("migration poll failed", extra={"migration": migration.id, "error": exc.message})
                else:
                    # A volume group ends when every member has: committed together, or rolled back.
                    state = group_outcome([str(r.get("state", "")) for r in records]) or ""
                    record = next((r for r in records if r.get("error") and r.get("state") != "COMMIT"), records[0])
                    outcome = _AGENT_DONE.get(state)
                    if outcome is MigrationState.COMMITTED:
                        return outcome, ""
                    if outcome is MigrationState.ABANDONED:  # NEEDS_OPERATOR
                        return outcome, f"needs the operator: {record.get('error') or 'the agents could not decide'}"
                    if outcome is not None:
                        return outcome, str(record.get("error") or "rolled back")
            await asyncio.sleep(self._limits.poll_period)

    async def _decide(self, migration: Migration, kind: str, detail: str) -> None:
        await self._store.record_decision(
            Decision(ts=self._clock(), host=migration.source, kind=kind, detail=f"{migration.id}: {detail}")
        )


def _intent_only(migration: Migration) -> bool:
    """An attempt recorded as about to start whose agent migration id never was."""
    pending = migration.state is MigrationState.PENDING
    return pending and bool(migration.reservation_id) and not migration.agent_migration_id


def started_for(records: list[dict[str, Any]], migration: Migration) -> str | None:
    """The id of the source agent's migration started for `migration`'s current attempt, if any: the
    one given its reservation (unique per attempt)."""
    for record in records:
        options = record.get("options") or {}
        if (
            record.get("role", "source") == "source"
            and record.get("container") == migration.container
            and options.get("reservation") == migration.reservation_id
        ):
            return str(record.get("id", "")) or None
    return None
