"""The fleet's hosts: registration, heartbeats through telemetry, liveness and admin (drain) state."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from coordinator.config import CoordinatorConfig
from coordinator.metrics import CoordinatorMetrics
from coordinator.model import Decision, Drain, Host, HostAdmin, HostHealth, HostNotFound
from coordinator.store import Store, TelemetryUpdate
from coordinator.wire import check_batch, registration_to_host
from core.errors import Busy
from proto.ferryman.v1 import fleet_pb2

log = logging.getLogger(__name__)

Clock = Callable[[], float]
SampleObserver = Callable[[str, Sequence[tuple[float, Mapping[str, Any]]]], None]
"""Told of every accepted push (host, samples oldest first), after the store kept it."""


class RegistrationsBusy(Busy):
    code = "registrations_busy"


class HostRegistry:
    def __init__(
        self,
        store: Store,
        config: CoordinatorConfig,
        clock: Clock,
        metrics: CoordinatorMetrics,
        observer: SampleObserver | None = None,
        on_register: Callable[[Host], None] | None = None,
    ) -> None:
        self._store = store
        self._on_register = on_register
        self._config = config
        self._clock = clock
        self._since = clock()
        """When this coordinator began listening: silence before that (its own downtime, a restart)
        says nothing about the hosts, which could not reach it."""
        self._metrics = metrics
        self._observer = observer
        self._health_seen: dict[str, HostHealth] = {}
        """Each host's health at the last liveness check: a push brings a host back without a
        read of it, and the next check tells ("host is back")."""
        self._registering = 0
        """Registrations under way or waiting for their turn here."""
        self._turns = asyncio.Semaphore(config.registrations.max_in_flight)

    async def register(self, reg: fleet_pb2.Registration) -> Host:
        """Store the registration once one of `registrations.max_in_flight` turns is free;
        RegistrationsBusy, with nothing stored, when `max_queued` more wait already or no turn came
        within `max_wait` (the agent comes back after `retry_after`)."""
        limits = self._config.registrations
        if self._registering >= limits.max_in_flight + limits.max_queued:
            raise self._busy(f"{self._registering} registrations are under way or waiting here")
        self._registering += 1
        try:
            try:
                async with asyncio.timeout(limits.max_wait):
                    await self._turns.acquire()
            except TimeoutError:
                raise self._busy(f"no turn to register within {limits.max_wait:g} s") from None
            try:
                return await self._register(reg)
            finally:
                self._turns.release()
        finally:
            self._registering -= 1

    def _busy(self, why: str) -> RegistrationsBusy:
        self._metrics.registrations_deferred.inc()
        retry_after = self._config.registrations.retry_after
        return RegistrationsBusy(f"{why}; try again in {retry_after} s", retry_after)

    async def _register(self, reg: fleet_pb2.Registration) -> Host:
        host = registration_to_host(reg, self._clock())
        known = await self._store.get_host(host.name)
        stored = await self._store.register_host(host)
        if self._on_register is not None:
            self._on_register(stored)
        log.info(
            "host registered" if known is None else "host re-registered",
            extra={"host": host.name, "capacity": host.capacity.to_dict(), "api_url": host.api_url or None},
        )
        return stored

    async def push(self, batch: fleet_pb2.TelemetryBatch) -> fleet_pb2.TelemetryAck:
        """Validate and store a batch; an unknown host is asked to register (nothing is stored).

        Any replica takes a push; on etcd the summary reaches the others with the next flush
        (`run_flusher`)."""
        now = self._clock()
        checked = check_batch(
            batch,
            now,
            max_future_skew=self._config.telemetry.max_future_skew,
            max_batch=self._config.telemetry.max_batch,
        )
        update = TelemetryUpdate(
            host=checked.host,
            samples=checked.samples,
            received_at=now,
            used=checked.used,
            containers=checked.containers,
            pressure=checked.pressure,
            dropped=checked.dropped,
            heartbeat_only=not checked.samples,  # keep the last known usage
        )
        try:
            accepted = await self._store.record_telemetry(
                update, self._config.telemetry.max_samples_per_host, self._config.telemetry.max_age
            )
        except HostNotFound:
            return fleet_pb2.TelemetryAck(accepted=0, reregister=True)
        if self._observer is not None:
            self._observer(checked.host, checked.samples)
        self._metrics.telemetry_samples.inc(accepted)
        if checked.dropped:
            self._metrics.telemetry_dropped.inc(checked.dropped)
        return fleet_pb2.TelemetryAck(accepted=accepted)

    async def get(self, name: str) -> Host:
        host = await self._store.get_host(name)
        if host is None:
            raise HostNotFound(f"no host {name!r} is registered")
        return host

    async def all(self) -> list[Host]:
        return await self._store.list_hosts()

    # ----- liveness

    def _health_for(self, host: Host, now: float) -> HostHealth:
        silent = now - max(host.last_heartbeat, self._since)
        if silent >= self._config.heartbeat.down_after:
            return HostHealth.DOWN
        if silent >= self._config.heartbeat.suspect_after:
            return HostHealth.SUSPECT
        return HostHealth.READY

    async def check_liveness(self) -> list[tuple[str, HostHealth, HostHealth]]:
        """Move silent hosts to suspect/down; returns (host, old, new) for each change."""
        now = self._clock()
        changes: list[tuple[str, HostHealth, HostHealth]] = []
        listed = await self._store.list_hosts()
        seen, ready = self._health_seen, HostHealth.READY
        # A ready host heard from within suspect_after stays as it is: one comparison for most of
        # 10 000 hosts every check_period, the rest go through _health_for.
        fresh_after = now - self._config.heartbeat.suspect_after
        for host in listed:
            was = seen.get(host.name)
            if host.health is ready:
                if was is not ready:
                    if was is not None:
                        log.info("host is back", extra={"host": host.name, "was": was.value})
                    seen[host.name] = ready
                if host.last_heartbeat > fresh_after or self._since > fresh_after:
                    continue
            else:
                seen[host.name] = host.health
            health = self._health_for(host, now)
            # Only ever downwards here: coming back to ready is a telemetry push's job.
            if health is not host.health and _rank(health) > _rank(host.health):
                await self._store.set_health(host.name, health)
                self._health_seen[host.name] = health
                changes.append((host.name, host.health, health))
                log.warning(
                    "host missed heartbeats",
                    extra={"host": host.name, "health": health.value, "silent_s": round(now - host.last_heartbeat, 1)},
                )
        # The listing again only if this pass changed it (10 000 hosts: some 30 MB from etcd).
        self._metrics.set_hosts(await self._store.list_hosts() if changes else listed)
        return changes

    async def run_liveness(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.check_liveness()
            except Exception:
                log.exception("liveness check failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._config.heartbeat.check_period)

    async def run_flusher(self, stop: asyncio.Event) -> None:
        """Write the telemetry summaries held back to the store every `telemetry.flush_period` (every
        replica, leading or not: the pushes it takes must reach the leader)."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._config.telemetry.flush_period)
            try:
                await self._store.flush_telemetry()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("flushing telemetry summaries failed (kept for the next flush)")

    # ----- admin state

    async def drain(
        self, name: str, reason: str, *, probability: float | None = None, model_version: str = "", detail: str = ""
    ) -> Drain:
        """Mark a host draining (nothing new is placed there) and record the decision (`detail`: why,
        e.g. the notice or the model's top features, appended to the reason)."""
        host = await self.get(name)
        now = self._clock()
        running = [d for d in await self._store.list_drains(name) if d.state == "running"]
        if host.admin is not HostAdmin.ACTIVE and running:
            return running[-1]
        await self._store.set_admin(name, HostAdmin.DRAINING)
        drain = Drain(
            id=f"drain-{secrets.token_hex(6)}",
            host=name,
            reason=reason,
            started_at=now,
            probability=probability,
            model_version=model_version,
        )
        await self._store.put_drain(drain)
        await self._store.record_decision(
            Decision(
                ts=now,
                host=name,
                kind="drain",
                probability=probability,
                model_version=model_version,
                detail=f"{reason}: {detail}" if detail else reason,
            )
        )
        log.info("host draining", extra={"host": name, "reason": reason, "probability": probability})
        return drain

    async def finish_drain(self, name: str) -> None:
        await self._store.set_admin(name, HostAdmin.DRAINED)
        now = self._clock()
        for drain in await self._store.list_drains(name):
            if drain.state == "running":
                await self._store.put_drain(dataclasses.replace(drain, state="done", finished_at=now))
        await self._store.record_decision(Decision(ts=now, host=name, kind="drained", detail="no containers left"))
        log.info("host drained", extra={"host": name})

    async def uncordon(
        self, name: str, reason: str, *, probability: float | None = None, model_version: str = ""
    ) -> Host:
        host = await self.get(name)
        now = self._clock()
        await self._store.set_admin(name, HostAdmin.ACTIVE)
        for drain in await self._store.list_drains(name):
            if drain.state == "running":
                await self._store.put_drain(dataclasses.replace(drain, state="cancelled", finished_at=now))
        if host.admin is not HostAdmin.ACTIVE:
            await self._store.record_decision(
                Decision(
                    ts=now,
                    host=name,
                    kind="uncordon",
                    probability=probability,
                    model_version=model_version,
                    detail=reason,
                )
            )
            log.info("host back in service", extra={"host": name, "reason": reason})
        return await self.get(name)


_RANKS = {HostHealth.READY: 0, HostHealth.SUSPECT: 1, HostHealth.DOWN: 2}


def _rank(health: HostHealth) -> int:
    return _RANKS[health]
