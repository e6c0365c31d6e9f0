"""Registrations bounded per replica: a fleet starting at once registers at the pace the store takes.

The real registry service on a real SQLite store whose host writes are held at a gate, so the
registrations under way are known; the answer a refused agent gets is the API's own error response.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from google.protobuf import json_format

from coordinator.config import CoordinatorConfig, RegistrationConfig, parse_config
from coordinator.metrics import CoordinatorMetrics
from coordinator.model import Host
from coordinator.registry import HostRegistry, RegistrationsBusy
from coordinator.sqlite_store import SqliteStore
from core.errors import ConfigError, InvalidRequest
from core.http.errors import ferryman_error_response
from proto.ferryman.v1 import fleet_pb2
from tests.harness.coordinator import registration


class HeldStore(SqliteStore):
    """SQLite, with every host write waiting for `gate` (a store slow under a crowd)."""

    gate: asyncio.Event

    async def register_host(self, host: Host) -> Host:
        await self.gate.wait()
        return await super().register_host(host)


@pytest.fixture
async def store(workdir: Path) -> AsyncIterator[HeldStore]:
    s = await HeldStore.open(workdir / "c.db")
    assert isinstance(s, HeldStore)
    s.gate = asyncio.Event()
    try:
        yield s
    finally:
        await s.close()


def _reg(name: str) -> fleet_pb2.Registration:
    return json_format.ParseDict(registration(name), fleet_pb2.Registration())


async def test_registrations_beyond_the_bound_wait_then_are_refused_with_retry_after(store: HeldStore) -> None:
    config = CoordinatorConfig(registrations=RegistrationConfig(max_in_flight=2, max_queued=1, retry_after=3))
    metrics = CoordinatorMetrics()
    hosts = HostRegistry(store, config, time.time, metrics)
    writes = 0
    register_host = store.register_host

    async def counted(host: Host) -> Host:
        nonlocal writes
        writes += 1
        return await register_host(host)

    store.register_host = counted  # type: ignore[method-assign]
    under_way = [asyncio.create_task(hosts.register(_reg(f"h{i}"))) for i in range(3)]
    await asyncio.sleep(0.1)  # two at the store's gate, the third waiting for its turn
    assert writes == 2
    with pytest.raises(RegistrationsBusy) as refused:
        await hosts.register(_reg("h3"))
    answer = ferryman_error_response(refused.value)
    assert answer.status == 503 and answer.headers["Retry-After"] == "3"
    assert answer.text is not None and '"code": "registrations_busy"' in answer.text
    assert metrics.registrations_deferred._value.get() == 1
    assert await store.get_host("h3") is None  # nothing of it was kept
    store.gate.set()
    assert [h.name for h in await asyncio.gather(*under_way)] == ["h0", "h1", "h2"]
    # The bound is on what is under way, not a quota: once they are done, the refused one gets in.
    assert (await hosts.register(_reg("h3"))).name == "h3"
    assert [h.name for h in await store.list_hosts()] == ["h0", "h1", "h2", "h3"]


async def test_a_failing_registration_frees_its_place(store: HeldStore) -> None:
    config = CoordinatorConfig(registrations=RegistrationConfig(max_in_flight=1))
    hosts = HostRegistry(store, config, time.time, CoordinatorMetrics())
    store.gate.set()
    bad = _reg("h0")
    bad.capacity.cpu_millis = 0
    with pytest.raises(InvalidRequest, match="cpu_millis"):
        await hosts.register(bad)
    assert (await hosts.register(_reg("h1"))).name == "h1"


async def test_a_registration_waits_for_its_turn_at_most_max_wait(store: HeldStore) -> None:
    config = CoordinatorConfig(registrations=RegistrationConfig(max_in_flight=1, max_wait=0.3, retry_after=1))
    hosts = HostRegistry(store, config, time.time, CoordinatorMetrics())
    first = asyncio.create_task(hosts.register(_reg("h0")))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    with pytest.raises(RegistrationsBusy, match=r"no turn to register within 0\.3 s") as refused:
        await hosts.register(_reg("h1"))
    assert 0.3 <= time.monotonic() - started < 1.0 and refused.value.retry_after == 1
    store.gate.set()
    assert (await first).name == "h0"
    assert await store.get_host("h1") is None
    assert (await hosts.register(_reg("h1"))).name == "h1"  # its turn was given back


def test_the_bound_must_be_positive() -> None:
    for table in ({"max_in_flight": 0}, {"retry_after": 0}, {"max_queued": -1}, {"max_wait": 0}):
        with pytest.raises(ConfigError, match="registrations"):
            parse_config({"registrations": table})
