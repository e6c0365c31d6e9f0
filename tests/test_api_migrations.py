"""Migration API shape tests: a real aiohttp server over an in-test fake migration service.

The fake only mimics MigrationService's interface (migrate/get/list/watch) and walks a record
through the states on a timer, so routes, validation, error codes, NDJSON streaming and metrics can
be checked without containerd or CRIU. The real end-to-end migrations are the lead's tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from agent.api import build_app, serve
from agent.api.migrations import parse_migrate
from agent.api.server import OPENAPI_PATH
from agent.metrics import AgentMetrics
from agent.migration.record import MigrationId, MigrationOptions, MigrationRecord
from agent.migration.states import Event, State
from core.errors import Conflict, ContainerNotFound, InvalidRequest, NotFound

# ------------------------------------------------------------------ fakes (API-shape tests only)


class MigrationNotFound(NotFound):
    code = "migration_not_found"  # as agent/migration/service.py will define it


class UnknownPeer(NotFound):
    code = "unknown_peer"


PAGE = 4096


class FakeMigrations:
    """Mimics MigrationService: migrate() returns the PREPARE record and a task walks it to the end.

    Containers named `doomed*` roll back during pre-copy; `slow*` wait for `release` before finishing;
    `late*` commit with a downtime over their target.
    """

    def __init__(self) -> None:
        self.containers = {"web", "doomed", "slow", "db", "late"}
        self.peers = {"host-b"}
        self.records: dict[str, MigrationRecord] = {}
        self.calls: list[tuple[str, str, MigrationOptions]] = []
        self.watchers: dict[str, list[asyncio.Queue[MigrationRecord]]] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.step = 0.01
        self.release = asyncio.Event()
        self.observed: list[MigrationRecord] = []
        self.metrics: AgentMetrics | None = None
        self._n = 0

    def _publish(self, record: MigrationRecord) -> None:
        previous = self.records.get(record.id)
        self.records[record.id] = record
        for queue in self.watchers.get(record.id, []):
            queue.put_nowait(record)
        if record.done and (previous is None or not previous.done) and self.metrics is not None:
            self.metrics.observe_migration(record)

    async def migrate(self, container_id: str, target: str, options: MigrationOptions) -> MigrationRecord:
        options = options.validated()
        if target not in self.peers:
            raise UnknownPeer(f"no peer named {target} in this agent's [[peers]]")
        if container_id not in self.containers:
            raise ContainerNotFound(f"no container {container_id}")
        if any(r.container == container_id and not r.done for r in self.records.values()):
            raise InvalidRequest(f"container {container_id} is already migrating")
        self.calls.append((container_id, target, options))
        self._n += 1
        record = MigrationRecord(
            id=MigrationId(f"mig-{self._n:04d}"), role="source", container=container_id, peer=target, options=options
        )
        self._publish(record)
        task = asyncio.create_task(self._run(record))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return record

    async def _run(self, record: MigrationRecord) -> None:
        await asyncio.sleep(self.step)
        record = record.advance(Event.PREPARED)
        self._publish(record)
        sent = 0
        for number, pages in enumerate((25_600, 1_200, 300), start=1):
            await asyncio.sleep(self.step)
            sent += pages * PAGE
            dirty = (*record.stats.dirty_pages, pages)
            record = record.with_stats(iterations=number, dirty_pages=dirty, bytes_raw=sent, bytes_wire=sent // 4,
                                       rate_mbps=12.5, stop_reason="continue", round_source="proc-mem")
            self._publish(record)
            if record.container.startswith("doomed"):
                self._publish(record.advance(Event.FAILED, error="target restore failed: CRIU said no"))
                return
        if record.container.startswith("slow"):
            await self.release.wait()
        for event in (Event.CONVERGED, Event.IMAGES_SENT, Event.RESTORED):
            await asyncio.sleep(self.step)
            record = record.advance(event)
            self._publish(record)
        record = record.with_stats(stop_reason="dirty_set_small", downtime_ms=182.4, total_ms=4210.0,
                                   freeze_dump_ms=120.3, restore_ms=90.1,
                                   downtime_target_missed=record.container.startswith("late"))
        self._publish(record.advance(Event.SWITCHED))

    def get(self, migration_id: str) -> MigrationRecord:
        record = self.records.get(migration_id)
        if record is None:
            raise MigrationNotFound(f"no migration {migration_id} on this host")
        return record

    def list(self) -> list[MigrationRecord]:
        return sorted(self.records.values(), key=lambda r: r.started_at)

    async def watch(self, migration_id: str) -> AsyncIterator[MigrationRecord]:
        record = self.get(migration_id)
        queue: asyncio.Queue[MigrationRecord] = asyncio.Queue()
        self.watchers.setdefault(migration_id, []).append(queue)
        try:
            yield record
            while not record.done:
                record = await queue.get()
                yield record
        finally:
            self.watchers[migration_id].remove(queue)

    async def wait_idle(self) -> None:
        await asyncio.wait_for(asyncio.gather(*self.tasks), 5)


class FakeContainers:
    """Just enough of ContainerService for /metrics and /healthz."""

    async def list(self) -> list[Any]:
        return []


class FakeAgent:
    def __init__(self, with_migrations: bool = True) -> None:
        self.metrics = AgentMetrics()
        self.images = object()
        self.containers = FakeContainers()
        if with_migrations:
            self.migrations = FakeMigrations()
            self.migrations.metrics = self.metrics


# ------------------------------------------------------------------ fixtures and helpers


@pytest.fixture
def agent() -> FakeAgent:
    return FakeAgent()


@pytest.fixture
def app(agent: FakeAgent) -> web.Application:
    return build_app(agent)  # type: ignore[arg-type]


@pytest.fixture
async def client(app: web.Application, agent: FakeAgent) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    async with TestClient(TestServer(app)) as c:
        yield c
    agent.migrations.release.set()  # a test that failed half-way must not leave a migration waiting
    await agent.migrations.wait_idle()


async def _error(resp: aiohttp.ClientResponse, status: int, code: str) -> str:
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    return str(body["error"]["message"])


async def _lines(resp: aiohttp.ClientResponse) -> list[dict[str, Any]]:
    assert resp.content_type == "application/x-ndjson", await resp.text()
    raw = await asyncio.wait_for(resp.read(), 5)
    assert raw.endswith(b"\n")
    return [json.loads(line) for line in raw.splitlines()]


def _migrate_body(**extra: Any) -> dict[str, Any]:
    return {"container": "web", "target": "host-b", **extra}


# ------------------------------------------------------------------ starting


async def test_start_returns_first_record(client: TestClient[Any, Any], agent: FakeAgent) -> None:
    resp = await client.post("/v1/migrations", json=_migrate_body(downtime_target_ms=150, max_iterations=4))
    assert resp.status == 202
    record = await resp.json()
    assert record["state"] == "PREPARE" and record["done"] is False
    assert record["container"] == "web" and record["peer"] == "host-b" and record["role"] == "source"
    assert record["options"] == {"downtime_target_ms": 150, "max_iterations": 4, "mode": "", "reservation": ""}
    assert resp.headers["Location"] == f"/v1/migrations/{record['id']}"
    assert set(record["stats"]) >= {"iterations", "dirty_pages", "bytes_raw", "bytes_wire", "compression_ratio"}
    assert agent.migrations.calls == [("web", "host-b", MigrationOptions(150, 4))]


async def test_start_defaults_and_nulls(client: TestClient[Any, Any], agent: FakeAgent) -> None:
    body = _migrate_body(downtime_target_ms=None, max_iterations=None, mode=None)
    assert (await client.post("/v1/migrations", json=body)).status == 202
    assert agent.migrations.calls[0][2] == MigrationOptions()


@pytest.mark.parametrize("how", ["query", "accept"])
async def test_start_stream_ends_with_terminal_record(client: TestClient[Any, Any], how: str) -> None:
    if how == "query":
        resp = await client.post("/v1/migrations?stream=1", json=_migrate_body())
    else:
        resp = await client.post("/v1/migrations", json=_migrate_body(), headers={"Accept": "application/x-ndjson"})
    assert resp.status == 202
    lines = await _lines(resp)
    assert lines[0]["state"] == "PREPARE"
    assert len({line["id"] for line in lines}) == 1
    assert [line["done"] for line in lines] == [False] * (len(lines) - 1) + [True]
    final = lines[-1]
    assert final["state"] == "COMMIT" and final["error"] is None
    assert final["stats"]["iterations"] == 3 and final["stats"]["dirty_pages"] == [25_600, 1_200, 300]
    assert final["stats"]["compression_ratio"] == 4.0
    assert [h[0] for h in final["history"]] == ["PRECOPY", "STOPCOPY", "RESTORE", "SWITCH", "COMMIT"]
    assert "PRECOPY" in {line["state"] for line in lines}  # progress, not only the verdict


async def test_start_stream_rolled_back(client: TestClient[Any, Any]) -> None:
    lines = await _lines(await client.post("/v1/migrations?stream=1", json=_migrate_body(container="doomed")))
    assert lines[-1]["state"] == "ROLLBACK" and lines[-1]["done"] is True
    assert lines[-1]["error"] == "target restore failed: CRIU said no"


async def test_client_disconnect_does_not_cancel(client: TestClient[Any, Any], agent: FakeAgent) -> None:
    resp = await client.post("/v1/migrations?stream=1", json=_migrate_body(container="slow"))
    first = json.loads(await asyncio.wait_for(resp.content.readline(), 5))
    resp.close()  # the ops client goes away mid-migration
    await asyncio.sleep(0.1)
    agent.migrations.release.set()
    await agent.migrations.wait_idle()
    assert agent.migrations.get(first["id"]).state == State.COMMIT
    for _ in range(50):  # the handler closed its watch, so the service holds no subscriber
        if not agent.migrations.watchers[first["id"]]:
            break
        await asyncio.sleep(0.05)
    assert agent.migrations.watchers[first["id"]] == []


async def _broken_watch(self: FakeMigrations, migration_id: str) -> AsyncIterator[MigrationRecord]:
    yield self.get(migration_id)
    raise Conflict("the journal is unreadable")


async def test_watch_failure_is_an_error_line(
    client: TestClient[Any, Any], agent: FakeAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(FakeMigrations, "watch", _broken_watch)
    lines = await _lines(await client.post("/v1/migrations?stream=1", json=_migrate_body()))
    assert lines[0]["state"] == "PREPARE"
    assert lines[-1] == {"error": {"code": "conflict", "message": "the journal is unreadable"}}


async def test_service_errors(client: TestClient[Any, Any], agent: FakeAgent) -> None:
    await _error(await client.post("/v1/migrations", json=_migrate_body(container="ghost")), 404,
                 "container_not_found")
    await _error(await client.post("/v1/migrations?stream=1", json=_migrate_body(target="host-z")), 404,
                 "unknown_peer")
    agent.migrations.containers.add("busy")
    agent.migrations.step = 0.2
    assert (await client.post("/v1/migrations", json=_migrate_body(container="busy"))).status == 202
    msg = await _error(await client.post("/v1/migrations", json=_migrate_body(container="busy")), 400,
                       "invalid_request")
    assert "already migrating" in msg


@pytest.mark.parametrize(
    ("raw", "needle"),
    [(b"{not json", "not valid JSON"), (b"", "JSON object"), (b"[1]", "got array")],
)
async def test_start_bad_json(client: TestClient[Any, Any], agent: FakeAgent, raw: bytes, needle: str) -> None:
    resp = await client.post("/v1/migrations", data=raw, headers={"Content-Type": "application/json"})
    assert needle in await _error(resp, 400, "invalid_request")
    assert agent.migrations.calls == []


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"target": "host-b"}, "missing required fields ['container']"),
        ({"container": "web"}, "missing required fields ['target']"),
        (_migrate_body(live=True), "unknown fields ['live']"),
        (_migrate_body(options={"max_iterations": 2}), "unknown fields ['options']"),
        ({"container": 5, "target": "host-b"}, "body.container"),
        ({"container": "", "target": "host-b"}, "body.container"),
        ({"container": "web", "target": ["host-b"]}, "body.target"),
        ({"container": "web", "target": ""}, "body.target"),
        ({"container": "../etc", "target": "host-b"}, "invalid container id"),
        (_migrate_body(downtime_target_ms="300"), "body.downtime_target_ms"),
        (_migrate_body(downtime_target_ms=True), "body.downtime_target_ms"),
        (_migrate_body(downtime_target_ms=1.5), "body.downtime_target_ms"),
        (_migrate_body(downtime_target_ms=0), "body.downtime_target_ms"),
        (_migrate_body(downtime_target_ms=600_001), "downtime_target_ms must be between"),
        (_migrate_body(max_iterations=-1), "body.max_iterations"),
        (_migrate_body(max_iterations=65), "max_iterations must be between"),
        (_migrate_body(mode="postcopy"), "not supported"),
        (_migrate_body(mode=1), "body.mode"),
    ],
)
async def test_start_validation(
    client: TestClient[Any, Any], agent: FakeAgent, body: dict[str, Any], needle: str
) -> None:
    msg = await _error(await client.post("/v1/migrations?stream=1", json=body), 400, "invalid_request")
    assert needle in msg
    assert agent.migrations.calls == []  # nothing reached the service


def test_parse_migrate() -> None:
    assert parse_migrate({"container": "web", "target": "h", "mode": "precopy"}) == (
        "web", "h", MigrationOptions(mode="precopy"),
    )
    with pytest.raises(InvalidRequest):
        parse_migrate({"container": "web", "target": "h", "max_iterations": 0})


# ------------------------------------------------------------------ reading


async def test_list_and_get(client: TestClient[Any, Any], agent: FakeAgent) -> None:
    inbound = MigrationRecord(id=MigrationId("mig-in"), role="target", container="db", peer="host-c",
                              started_at="2000-01-01T00:00:00.000+00:00")
    agent.migrations.records[inbound.id] = inbound
    started = await (await client.post("/v1/migrations", json=_migrate_body())).json()
    await agent.migrations.wait_idle()

    resp = await client.get("/v1/migrations")
    assert resp.status == 200
    listed = (await resp.json())["migrations"]
    assert [(m["id"], m["role"]) for m in listed] == [("mig-in", "target"), (started["id"], "source")]

    resp = await client.get(f"/v1/migrations/{started['id']}")
    assert resp.status == 200
    record = await resp.json()
    assert record["state"] == "COMMIT" and record["done"] is True
    assert MigrationRecord.from_storage(record) == agent.migrations.get(started["id"])


async def test_unknown_and_bad_ids(client: TestClient[Any, Any]) -> None:
    await _error(await client.get("/v1/migrations/mig-nope"), 404, "migration_not_found")
    await _error(await client.get("/v1/migrations/mig-nope/events"), 404, "migration_not_found")
    await _error(await client.get("/v1/migrations/bad%0Aid"), 400, "invalid_request")
    await _error(await client.get("/v1/migrations/.hidden/events"), 400, "invalid_request")


async def test_events_follow_to_the_end(client: TestClient[Any, Any], agent: FakeAgent) -> None:
    agent.migrations.step = 0.05
    started = await (await client.post("/v1/migrations", json=_migrate_body())).json()
    lines = await _lines(await client.get(f"/v1/migrations/{started['id']}/events"))
    assert lines[-1]["state"] == "COMMIT" and lines[-1]["done"] is True
    assert all(not line["done"] for line in lines[:-1])
    # A finished migration: its terminal record alone, and the stream ends at once.
    lines = await _lines(await client.get(f"/v1/migrations/{started['id']}/events"))
    assert len(lines) == 1 and lines[0]["state"] == "COMMIT"


async def test_without_migration_service() -> None:
    async with TestClient(TestServer(build_app(FakeAgent(with_migrations=False)))) as c:  # type: ignore[arg-type]
        await _error(await c.get("/v1/migrations"), 503, "migrations_unavailable")
        await _error(await c.post("/v1/migrations", json=_migrate_body()), 503, "migrations_unavailable")
        resp = await c.get("/metrics")
        assert resp.status == 200 and "ferryman_migrations_active{" not in await resp.text()


async def test_shutdown_ends_migration_streams(agent: FakeAgent) -> None:
    server = await serve(build_app(agent), "tcp://127.0.0.1:0")  # type: ignore[arg-type]
    port = server.url.rsplit(":", 1)[1]
    async with aiohttp.ClientSession() as s, s.post(
        f"http://127.0.0.1:{port}/v1/migrations?stream=1", json=_migrate_body(container="slow")
    ) as r:
        await asyncio.wait_for(r.content.readline(), 5)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await server.close()
        assert loop.time() - started < 3  # the watcher did not hold the server for its grace period
        with contextlib.suppress(aiohttp.ClientError):
            await r.read()
    assert any(not r.done for r in agent.migrations.list())  # ...and the migration itself goes on
    agent.migrations.release.set()
    await agent.migrations.wait_idle()


# ------------------------------------------------------------------ metrics


def _finished(state: State, role: str = "source", mode: str = "", **stats: Any) -> MigrationRecord:
    options = MigrationOptions(mode=mode)
    record = MigrationRecord(id=MigrationId("m"), role=role, container="web", peer="h", options=options)
    record = record.advance(Event.PREPARED).with_stats(**stats)
    if state == State.ROLLBACK:
        return record.advance(Event.FAILED, error="boom")
    for event in (Event.CONVERGED, Event.IMAGES_SENT, Event.RESTORED, Event.SWITCHED):
        record = record.advance(event)
    return record


def test_observe_migration_values() -> None:
    metrics = AgentMetrics()
    sample = metrics.registry.get_sample_value
    # Born at 0, so an alert's increase() sees the first one of each kind.
    assert sample("ferryman_migrations_total", {"role": "source", "result": "rolled_back", "mode": "lazy"}) == 0
    assert sample("ferryman_migrations_total", {"role": "target", "result": "committed", "mode": ""}) == 0
    assert sample("ferryman_migration_downtime_target_missed_total", {"mode": "precopy"}) == 0
    running = MigrationRecord(id=MigrationId("x"), role="source", container="c", peer="p").with_stats(bytes_raw=5)
    metrics.observe_migration(running)
    assert sample("ferryman_migration_bytes_total", {"kind": "raw"}) is None  # not terminal: not counted

    metrics.observe_migration(_finished(State.COMMIT, mode="hybrid", downtime_ms=250.0, total_ms=4000.0,
                                        bytes_raw=4000, bytes_wire=1000, iterations=3))
    metrics.observe_migration(_finished(State.ROLLBACK, mode="lazy", bytes_raw=100, bytes_wire=50, iterations=1))
    metrics.observe_migration(_finished(State.COMMIT, role="target", bytes_raw=999, iterations=3))
    assert sample("ferryman_migrations_total", {"role": "source", "result": "committed", "mode": "hybrid"}) == 1
    assert sample("ferryman_migrations_total", {"role": "source", "result": "rolled_back", "mode": "lazy"}) == 1
    assert sample("ferryman_migrations_total", {"role": "source", "result": "rolled_back", "mode": "hybrid"}) == 0
    assert sample("ferryman_migrations_total", {"role": "target", "result": "committed", "mode": ""}) == 1
    # Source-measured numbers only: the target's copy of the same migration is not counted twice.
    assert sample("ferryman_migration_bytes_total", {"kind": "raw"}) == 4100
    assert sample("ferryman_migration_bytes_total", {"kind": "wire"}) == 1050
    assert sample("ferryman_migration_downtime_seconds_count", {}) == 1  # the rollback never froze
    assert sample("ferryman_migration_downtime_seconds_sum", {}) == 0.25
    assert sample("ferryman_migration_downtime_seconds_bucket", {"le": "0.3"}) == 1
    assert sample("ferryman_migration_downtime_seconds_bucket", {"le": "0.2"}) == 0
    assert sample("ferryman_migration_duration_seconds_count", {}) == 2  # rollback: from its timestamps
    assert sample("ferryman_migration_iterations_count", {}) == 2
    assert sample("ferryman_migration_iterations_sum", {}) == 4


async def test_metrics_endpoint(client: TestClient[Any, Any], agent: FakeAgent) -> None:
    await _lines(await client.post("/v1/migrations?stream=1", json=_migrate_body()))
    await _lines(await client.post("/v1/migrations?stream=1", json=_migrate_body(container="doomed")))
    await client.post("/v1/migrations", json=_migrate_body(container="slow"))
    text = await (await client.get("/metrics")).text()
    for name in ("ferryman_migrations_total", "ferryman_migration_downtime_seconds",
                 "ferryman_migration_duration_seconds", "ferryman_migration_bytes_total",
                 "ferryman_migration_iterations", "ferryman_migrations_active"):
        assert f"# TYPE {name} " in text, name
    assert 'ferryman_migrations_total{mode="",result="committed",role="source"} 1.0' in text
    assert 'ferryman_migrations_total{mode="",result="rolled_back",role="source"} 1.0' in text
    assert 'ferryman_migrations_active{role="source"} 1.0' in text
    assert 'ferryman_migrations_active{role="target"} 0.0' in text
    assert 'ferryman_migration_bytes_total{kind="wire"}' in text
    assert "ferryman_containers" in text  # the usual scrape is still there
    agent.migrations.release.set()
    await agent.migrations.wait_idle()
    text = await (await client.get("/metrics")).text()
    assert 'ferryman_migrations_active{role="source"} 0.0' in text


# ------------------------------------------------------------------ openapi


def test_openapi_documents_migrations(app: web.Application) -> None:
    doc = yaml.safe_load(OPENAPI_PATH.read_text())
    documented = {(m, p) for p, item in doc["paths"].items() for m in item if m in {"get", "post", "delete"}}
    wanted = {
        ("post", "/v1/migrations"),
        ("get", "/v1/migrations"),
        ("get", "/v1/migrations/{id}"),
        ("get", "/v1/migrations/{id}/events"),
    }
    assert wanted <= documented
    registered = {(r.method.lower(), r.resource.canonical) for r in app.router.routes()  # type: ignore[union-attr]
                  if r.method != "HEAD"}
    assert wanted <= registered
    schemas = doc["components"]["schemas"]
    request = schemas["MigrationRequest"]
    fields = {"container", "target", "downtime_target_ms", "max_iterations", "mode", "reservation"}
    assert set(request["properties"]) == fields
    assert request["additionalProperties"] is False and set(request["required"]) == {"container", "target"}
    record = MigrationRecord(id=MigrationId("m"), role="source", container="c", peer="p").for_storage()
    assert set(schemas["MigrationRecord"]["properties"]) == set(record)
    assert set(schemas["MigrationStats"]["properties"]) == set(record["stats"])
    assert set(schemas["MigrationOptions"]["properties"]) == set(record["options"])
    assert set(schemas["MigrationState"]["enum"]) == {s.value for s in State}


def test_openapi_ids_match_handler_pattern() -> None:
    from agent.api.migrations import MIGRATION_ID_RE

    doc = yaml.safe_load(OPENAPI_PATH.read_text())
    assert doc["components"]["schemas"]["MigrationId"]["pattern"] == f"^{MIGRATION_ID_RE.pattern}$"


def test_fake_matches_protocol() -> None:
    # The fake must keep the real service's method names (the handlers only call these).
    from agent.api.migrations import MigrationServiceLike

    for name in ("migrate", "get", "list", "watch"):
        assert callable(getattr(FakeMigrations, name)) and hasattr(MigrationServiceLike, name)


def test_observe_migration_needs_operator() -> None:
    metrics = AgentMetrics()
    record = MigrationRecord(id=MigrationId("m"), role="source", container="web", peer="h", options=MigrationOptions())
    for event in (Event.PREPARED, Event.CONVERGED, Event.IMAGES_SENT, Event.LAZY_RESTORED, Event.LOST):
        record = record.advance(event)
    metrics.observe_migration(record)
    metrics.set_active_migrations([record])
    sample = metrics.registry.get_sample_value
    assert sample("ferryman_migrations_total", {"role": "source", "result": "needs_operator", "mode": ""}) == 1
    assert sample("ferryman_migrations_active", {"role": "source"}) == 0  # finished


def test_a_missed_downtime_target_is_counted_by_mode() -> None:
    metrics = AgentMetrics()
    sample = metrics.registry.get_sample_value
    missed = _finished(State.COMMIT, downtime_ms=900.0, downtime_target_missed=True)
    missed = dataclasses.replace(missed, options=MigrationOptions(mode="lazy"))
    metrics.observe_migration(missed)
    metrics.observe_migration(_finished(State.COMMIT, downtime_ms=100.0))
    metrics.observe_migration(_finished(State.COMMIT, role="target", downtime_target_missed=True))
    assert sample("ferryman_migration_downtime_target_missed_total", {"mode": "lazy"}) == 1
    assert sample("ferryman_migration_downtime_target_missed_total", {"mode": ""}) is None
