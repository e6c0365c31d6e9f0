"""The catalog: registration checks on a real SQLite store, the API through a real coordinator
process, and `ferryctl catalog` through its real entry point.

Every refused registration is checked to have stored nothing (the catalog's revision and entries
are unchanged), and every error to name what is wrong.
"""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from agent.ctl.catalog import plan_details
from agent.ctl.main import main
from coordinator.catalog.model import (
    Catalog,
    CatalogChanged,
    CatalogEntry,
    CatalogEntryExists,
    CatalogEntryInUse,
    CatalogEntryNotFound,
    DependencyCycle,
    ManifestInvalid,
    UnknownReference,
)
from coordinator.catalog.service import CatalogService
from coordinator.catalog.validation import schema_text
from coordinator.deployments.plan import PlanConflict, preview, wiring
from coordinator.sqlite_store import _SCHEMA, SCHEMA_VERSION, SqliteStore
from core.ids import CATALOG_NAME_RE, CATALOG_VERSION_RE
from tests.harness.coordinator import CoordinatorPki, CoordinatorProcess, new_token
from tests.test_ctl_scripting import _documented_json_keys

ROOT = Path(__file__).resolve().parent.parent
HTTP_CHECK = {"kind": "http", "port": 8080, "path": "/healthz", "interval": 1, "timeout": 0.5, "retries": 3}


def entry(
    name: str,
    version: str = "1.0.0",
    requires: tuple[str, ...] = (),
    protocols: dict[str, dict[str, Any]] | None = None,
    check: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A valid entry document: each required image over HTTP unless `protocols` says otherwise."""
    transfer = {r.split("@")[0]: {"protocol": "http", "port": 8080} for r in requires}
    transfer.update(protocols or {})
    return {
        "name": name,
        "version": version,
        "image": f"registry.test:5000/pipeline/{name}:{version}",
        "manifest": {
            "required_images": list(requires),
            "data_transfer_protocols": transfer,
            "dependency_health_check": check or HTTP_CHECK,
        },
    }


QUEUE = entry("queue", check={"kind": "tcp", "port": 5672})
DETECT = entry(
    "detect",
    requires=("queue",),
    protocols={"queue": {"protocol": "message_queue", "port": 5672, "queue": "frames", "scheme": "amqp"}},
    check={"kind": "grpc", "port": 50051, "start_period": 2},
)
RENDER = entry(
    "render",
    requires=("detect@1.0.0", "queue"),
    protocols={
        "detect": {"protocol": "shared_volume", "path": "/shared/frames"},
        "queue": {"protocol": "message_queue", "port": 5672, "queue": "rendered"},
    },
    check={"kind": "exec", "command": ["/bin/check", "--ready"], "interval": 2, "timeout": 1},
)


@pytest.fixture
async def store(workdir: Path) -> AsyncIterator[SqliteStore]:
    s = await SqliteStore.open(workdir / "c.db")
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
def service(store: SqliteStore) -> CatalogService:
    return CatalogService(store, time.time)


async def _pipeline(service: CatalogService) -> None:
    for doc in (QUEUE, DETECT, RENDER):
        assert (await service.register(doc, "alice")).created


# ------------------------------------------------------------------ store and validation (real SQLite)


async def test_register_show_remove_and_reopen(workdir: Path, service: CatalogService, store: SqliteStore) -> None:
    await _pipeline(service)
    catalog = await service.catalog()
    assert [e.id for e in catalog.entries] == ["queue@1.0.0", "detect@1.0.0", "render@1.0.0"]
    assert catalog.revision == 3
    render = catalog.get("render", "1.0.0")
    assert render is not None and render.registered_by == "alice" and render.registered_at > 0
    # Defaults are filled in and stored: what a deployment reads is explicit.
    check = render.manifest.dependency_health_check
    assert (check.interval, check.timeout, check.retries, check.start_period) == (2.0, 1.0, 3, 0.0)
    assert catalog.get("detect", "1.0.0").manifest.data_transfer_protocols["queue"].scheme == "amqp"  # type: ignore[union-attr]

    view = await service.show("queue")
    assert [e.id for e in view.versions] == ["queue@1.0.0"]
    assert [(e.id, str(r)) for e, r in view.required_by] == [("detect@1.0.0", "queue"), ("render@1.0.0", "queue")]
    with pytest.raises(CatalogEntryNotFound):
        await service.show("queue", "9")

    assert [e.id for e in await service.remove("render")] == ["render@1.0.0"]
    await store.close()
    reopened = await SqliteStore.open(workdir / "c.db")
    try:
        again = await reopened.catalog()
        assert [e.id for e in again.entries] == ["queue@1.0.0", "detect@1.0.0"]
        assert again.revision == 4
        assert again.entries[1] == catalog.entries[1]  # the stored record round-trips whole
    finally:
        await reopened.close()


async def test_registering_again_is_a_noop_and_entries_never_change(service: CatalogService) -> None:
    first = await service.register(QUEUE, "alice")
    again = await service.register(json.loads(json.dumps(QUEUE)), "bob")
    assert first.created and not again.created
    assert again.entry == first.entry  # still alice's, from the first registration
    # Spelling out a default is the same entry.
    explicit = json.loads(json.dumps(QUEUE))
    explicit["manifest"]["dependency_health_check"].update(interval=1.0, timeout=1.0, retries=3, start_period=0)
    assert not (await service.register(explicit, "bob")).created
    changed = {**QUEUE, "image": "registry.test:5000/other:1"}
    with pytest.raises(CatalogEntryExists, match=r"queue@1\.0\.0 is already registered with a different image"):
        await service.register(changed, "alice")
    assert (await service.catalog()).revision == 1


def _with(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of `doc` with the dotted `path` set to `value` (or deleted, for ...)."""
    out = json.loads(json.dumps(doc))
    *parents, last = path.split(".")
    node = out
    for part in parents:
        node = node[part]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return out


_M = "manifest"
_HC = "manifest.dependency_health_check"
_P = "manifest.data_transfer_protocols"


@pytest.mark.parametrize(
    ("doc", "fragment"),
    [
        (_with(DETECT, _M, ...), "manifest: missing: every image in the catalog needs its Dependency Manifest"),
        (_with(DETECT, f"{_M}.dependency_health_check", ...), "manifest: 'dependency_health_check' is a required"),
        (_with(DETECT, "name", "Detect"), "name: 'Detect' is not valid: A catalog entry's name: a DNS label"),
        (_with(DETECT, "version", "1 0"), "version: '1 0' is not valid"),
        (_with(DETECT, "color", "blue"), "entry: Additional properties are not allowed ('color' was unexpected)"),
        (_with(DETECT, f"{_P}.queue.protocol", "amqp"), f"{_P}.queue.protocol: 'amqp' is not one of ['grpc', 'http'"),
        (_with(DETECT, f"{_P}.queue.port", 0), f"{_P}.queue.port: 0 is less than the minimum of 1"),
        (_with(DETECT, f"{_P}.queue.port", True), f"{_P}.queue.port: True is not of type 'integer'"),
        (_with(DETECT, f"{_P}.queue.queue", ...), f"{_P}.queue: 'queue' is a required property"),
        (
            _with(DETECT, f"{_P}.queue", {"protocol": "grpc", "port": 1, "queue": "q"}),
            f"{_P}.queue.queue: not allowed with protocol 'grpc'",
        ),
        (
            _with(DETECT, f"{_P}.queue", {"protocol": "shared_volume", "path": "shared"}),
            f"{_P}.queue.path: 'shared' is not valid: An absolute path",
        ),
        (_with(DETECT, f"{_P}.queue", {"protocol": "shared_volume", "path": "/proc/x"}), "under /proc, /sys, /dev"),
        (_with(DETECT, f"{_P}.queue", {"protocol": "shared_volume", "path": "/a/../etc"}), "a '.' or '..' segment"),
        (_with(DETECT, f"{_P}.queue", ...), f"{_P}: no protocol for the required image 'queue'"),
        (
            _with(DETECT, f"{_P}.detect", {"protocol": "grpc", "port": 1}),
            f"{_P}.detect: 'detect' is not in required_images",
        ),
        (
            _with(DETECT, f"{_M}.required_images", ["queue", "queue@1.0.0"]),
            "manifest.required_images[1]: queue is already required at [0]",
        ),
        (_with(DETECT, f"{_M}.required_images", ["queue@"]), "manifest.required_images[0]: 'queue@' is not valid"),
        (_with(DETECT, f"{_HC}.kind", "ping"), f"{_HC}.kind: 'ping' is not one of ['http', 'tcp', 'grpc', 'exec']"),
        (_with(DETECT, f"{_HC}.port", ...), f"{_HC}: 'port' is a required property"),
        (_with(DETECT, f"{_HC}.command", ["x"]), f"{_HC}.command: not allowed with kind 'grpc'"),
        (_with(DETECT, _HC, {"kind": "exec", "command": []}), f"{_HC}.command: [] should be non-empty"),
        (_with(DETECT, _HC, {"kind": "http", "port": 80, "path": "healthz"}), f"{_HC}.path: 'healthz' is not valid"),
        (_with(DETECT, f"{_HC}.interval", 0), f"{_HC}.interval: 0 is less than or equal to the minimum of 0"),
        (_with(DETECT, f"{_HC}.retries", 0), f"{_HC}.retries: 0 is less than the minimum of 1"),
        (_with(DETECT, f"{_HC}.start_period", -1), f"{_HC}.start_period: -1 is less than the minimum of 0"),
        (_with(DETECT, f"{_HC}.timeout", 5), f"{_HC}.timeout: 5 s is longer than the interval (1 s)"),
        ([DETECT], "entry: expected a JSON object"),
    ],
)
async def test_a_bad_entry_is_refused_with_its_field_and_nothing_is_stored(
    service: CatalogService, doc: Any, fragment: str
) -> None:
    await service.register(QUEUE, "alice")
    before = await service.catalog()
    with pytest.raises(ManifestInvalid) as caught:
        await service.register(doc, "alice")
    assert caught.value.code == "manifest_invalid" and caught.value.http_status == 400
    assert fragment in caught.value.message, caught.value.message
    after = await service.catalog()
    assert after == before


async def test_every_problem_is_reported_at_once(service: CatalogService) -> None:
    doc = _with(_with(DETECT, f"{_HC}.retries", 0), f"{_P}.queue.protocol", "smtp")
    with pytest.raises(ManifestInvalid) as caught:
        await service.register(_with(doc, "name", "_x"), "alice")
    assert len(caught.value.problems) == 3, caught.value.problems


async def test_references_must_resolve_in_the_catalog(service: CatalogService) -> None:
    with pytest.raises(UnknownReference, match=r"required_images\[0\]: no catalog entry named 'queue'"):
        await service.register(DETECT, "alice")
    await service.register(QUEUE, "alice")
    await service.register(_with(QUEUE, "version", "1.1.0"), "alice")
    pinned = entry("detect", requires=("queue@2.0.0",))
    with pytest.raises(
        UnknownReference,
        match=r"no catalog entry queue@2\.0\.0 \(registered versions of queue: "
        r"1\.0\.0, 1\.1\.0\)",
    ):
        await service.register(pinned, "alice")
    assert (await service.catalog()).revision == 2


async def test_cycles_across_the_catalog_are_refused_and_named(service: CatalogService) -> None:
    await _pipeline(service)
    # queue@2 requiring render: render -> detect -> queue -> render, across versions of queue.
    loop = entry("queue", "2.0.0", requires=("render",))
    with pytest.raises(DependencyCycle) as caught:
        await service.register(loop, "alice")
    assert caught.value.code == "catalog_cycle"
    assert "queue@2.0.0 would close a dependency cycle in the catalog: queue -> render -> detect -> queue" in (
        caught.value.message
    )
    with pytest.raises(DependencyCycle, match="queue -> queue"):
        await service.register(entry("queue", "3.0.0", requires=("queue",)), "alice")
    assert [e.id for e in (await service.catalog()).entries] == ["queue@1.0.0", "detect@1.0.0", "render@1.0.0"]


async def test_an_entry_that_could_not_deploy_is_refused(service: CatalogService) -> None:
    await _pipeline(service)
    await service.register(_with(DETECT, "version", "2.0.0"), "alice")
    # render pins detect@1.0.0; "detect" alone is now 2.0.0: one deployment cannot run both.
    both = entry("app", requires=("render", "detect"))
    with pytest.raises(PlanConflict) as caught:
        await service.register(both, "alice")
    assert caught.value.message == (
        "detect would run at two versions in one deployment: detect@2.0.0 (app@1.0.0 requires detect) and "
        "detect@1.0.0 (render@1.0.0 requires detect@1.0.0); require one version of it"
    )
    assert (await service.register(entry("app", requires=("render", "detect@1.0.0")), "alice")).created


async def test_removal_is_refused_while_others_require_it(service: CatalogService) -> None:
    await _pipeline(service)
    with pytest.raises(CatalogEntryInUse) as caught:
        await service.remove("queue")
    assert caught.value.http_status == 409
    assert caught.value.message == (
        "queue is required by detect@1.0.0 (requires queue), render@1.0.0 (requires queue); "
        "remove or re-register those first"
    )
    # A second version of queue: the unpinned references still resolve without the first.
    await service.register(_with(QUEUE, "version", "2.0.0"), "alice")
    assert [e.id for e in await service.remove("queue", "1.0.0")] == ["queue@1.0.0"]
    with pytest.raises(CatalogEntryInUse, match=r"queue@2\.0\.0 is required by detect@1\.0\.0"):
        await service.remove("queue", "2.0.0")
    # A pinned reference holds its version even when others remain.
    await service.register(_with(DETECT, "version", "2.0.0"), "alice")
    with pytest.raises(
        CatalogEntryInUse, match=r"detect@1\.0\.0 is required by render@1\.0\.0 \(requires detect@1\.0\.0\)"
    ):
        await service.remove("detect", "1.0.0")
    with pytest.raises(CatalogEntryNotFound):
        await service.remove("nothing")
    revision = (await service.catalog()).revision
    await service.remove("render")
    await service.remove("detect")
    await service.remove("queue")
    after = await service.catalog()
    assert after.entries == () and after.revision == revision + 3


class _ReadTogether:
    """The real store, except that the first snapshot waits until the other writer has read its own:
    both registrations are then checked against the same catalog, the race at its worst."""

    def __init__(self, store: SqliteStore, barrier: asyncio.Barrier) -> None:
        self.store = store
        self.barrier = barrier
        self.waited = False
        self.changed = 0

    async def catalog(self) -> Catalog:
        snapshot = await self.store.catalog()
        if not self.waited:
            self.waited = True
            await self.barrier.wait()
        return snapshot

    async def add_catalog_entry(self, entry: CatalogEntry, revision: int) -> int:
        try:
            return await self.store.add_catalog_entry(entry, revision)
        except CatalogChanged:
            self.changed += 1
            raise

    async def remove_catalog_entries(self, ids: Sequence[str], revision: int) -> int:
        return await self.store.remove_catalog_entries(ids, revision)


async def test_racing_registrations_cannot_close_a_cycle_together(workdir: Path) -> None:
    """Two coordinators on one database register a@2 -> b and b@2 -> a, each fine alone."""
    stores = [await SqliteStore.open(workdir / "c.db") for _ in range(2)]
    try:
        for doc in (entry("a"), entry("b")):
            await CatalogService(stores[0], time.time).register(doc, "alice")
        barrier = asyncio.Barrier(2)
        racers = [_ReadTogether(s, barrier) for s in stores]
        one, two = (CatalogService(r, time.time) for r in racers)
        results = await asyncio.gather(
            one.register(entry("a", "2", requires=("b",)), "alice"),
            two.register(entry("b", "2", requires=("a",)), "bob"),
            return_exceptions=True,
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        assert len(failures) == 1 and isinstance(failures[0], DependencyCycle), results
        assert sum(r.changed for r in racers) == 1  # the loser's write found the catalog moved, and re-checked
        catalog = await stores[0].catalog()
        assert len(catalog.entries) == 3 and catalog.revision == 3
    finally:
        for s in stores:
            await s.close()


async def test_a_version_1_database_gains_the_catalog(workdir: Path) -> None:
    path = workdir / "old.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(_SCHEMA[0])
        conn.execute("PRAGMA user_version=1")
        conn.execute(
            "INSERT INTO hosts (name, capacity, peer_address, api_url, labels, agent_version, layer_digests,"
            " criu_features, telemetry_period, health, admin, registered_at, last_heartbeat)"
            " VALUES ('h1', '{}', '', '', '{}', '', '[]', '{}', 5, 'ready', 'active', 1, 1)"
        )
    store = await SqliteStore.open(path)
    try:
        assert await store.schema_version() == SCHEMA_VERSION
        assert [h.name for h in await store.list_hosts()] == ["h1"]
        service = CatalogService(store, time.time)
        await service.register(QUEUE, "alice")
        assert [e.id for e in (await store.catalog()).entries] == ["queue@1.0.0"]
    finally:
        await store.close()


def test_the_schema_says_what_the_code_checks() -> None:
    schema = json.loads(schema_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$defs"]["name"]["pattern"] == f"^{CATALOG_NAME_RE.pattern}$"
    assert schema["$defs"]["version"]["pattern"] == f"^{CATALOG_VERSION_RE.pattern}$"
    assert schema["$defs"]["reference"]["pattern"] == f"^{CATALOG_NAME_RE.pattern}(@{CATALOG_VERSION_RE.pattern})?$"


# ------------------------------------------------------------------ the API, through a real coordinator


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> CoordinatorPki:
    return CoordinatorPki(tmp_path_factory.mktemp("catalog-pki"))


@pytest.fixture(scope="module")
def token() -> str:
    return new_token()


@pytest.fixture
async def coordinator(workdir: Path, pki: CoordinatorPki, token: str) -> AsyncIterator[CoordinatorProcess]:
    proc = CoordinatorProcess(workdir, pki, tokens=(token,))
    await proc.start()
    try:
        yield proc
    finally:
        assert await proc.stop() == 0, proc.logs()


async def test_catalog_api(coordinator: CoordinatorProcess, pki: CoordinatorPki) -> None:
    async with coordinator.client(pki.operator("alice")) as ops:
        status, body = await ops.post("/v1/catalog", QUEUE)
        assert status == 201, body
        assert body["id"] == "queue@1.0.0" and body["registered_by"] == "alice"
        status, again = await ops.post("/v1/catalog", QUEUE)
        assert status == 200 and again == body
        for doc in (DETECT, RENDER):
            status, body = await ops.post("/v1/catalog", doc)
            assert status == 201, body

        # Refusals: JSON errors with their codes; the catalog is as it was.
        _, before = await ops.get("/v1/catalog")
        for doc, status_code, code, fragment in [
            (_with(DETECT, _M, ...), 400, "manifest_invalid", "Dependency Manifest"),
            (_with(DETECT, f"{_HC}.timeout", 9), 400, "manifest_invalid", "longer than the interval"),
            (entry("x", requires=("nothing",)), 400, "catalog_unknown_reference", "no catalog entry named 'nothing'"),
            (entry("queue", "2", requires=("render",)), 400, "catalog_cycle", "queue -> render -> detect -> queue"),
            ({**QUEUE, "image": "elsewhere/queue:1"}, 409, "catalog_entry_exists", "queue@1.0.0"),
        ]:
            status, body = await ops.post("/v1/catalog", doc)
            assert (status, body["error"]["code"]) == (status_code, code), body
            assert fragment in body["error"]["message"], body
        status, body = await ops.post("/v1/catalog", raw=b'{"name": "a", "name": "b"}')
        assert status == 400 and "duplicate key" in body["error"]["message"]
        _, after = await ops.get("/v1/catalog")
        assert after == before and after["revision"] == 3

        status, view = await ops.get("/v1/catalog/detect")
        assert status == 200 and [v["id"] for v in view["versions"]] == ["detect@1.0.0"]
        assert view["required_by"] == [{"id": "render@1.0.0", "requires": "detect@1.0.0"}]
        status, view = await ops.get("/v1/catalog/queue/versions/1.0.0")
        assert status == 200 and {u["id"] for u in view["required_by"]} == {"detect@1.0.0", "render@1.0.0"}
        status, body = await ops.get("/v1/catalog/queue/versions/7")
        assert status == 404 and body["error"]["code"] == "catalog_entry_not_found"
        status, body = await ops.get("/v1/catalog/Bad_Name")
        assert status == 400 and "invalid catalog entry name" in body["error"]["message"]

        status, layout = await ops.get("/v1/catalog/render/plan")
        assert status == 200, layout
        assert layout["levels"] == [["queue"], ["detect"], ["render"]]
        assert layout["teardown"] == [["render"], ["detect"], ["queue"]]
        assert layout["colocated"] == [["detect", "render"]]
        assert layout["environment"]["render"]["FERRYMAN_DEP_QUEUE_URL"] == "tcp://<queue>:5672/rendered"
        status, body = await ops.get("/v1/catalog/nothing/plan")
        assert status == 404, body

        status, body = await ops.request("DELETE", "/v1/catalog/queue")
        assert status == 409 and body["error"]["code"] == "catalog_entry_in_use"
        assert "detect@1.0.0 (requires queue), render@1.0.0 (requires queue)" in body["error"]["message"]
        status, body = await ops.request("DELETE", "/v1/catalog/render/versions/1.0.0")
        assert (status, body) == (200, {"removed": ["render@1.0.0"]})

    # Ops only; the schema, like this API's OpenAPI document, is for anyone.
    async with coordinator.client(pki.agent("h1")) as agent:
        status, body = await agent.post("/v1/catalog", entry("x"))
        assert status == 403 and body["error"]["code"] == "forbidden"
        status, _ = await agent.get("/v1/catalog")
        assert status == 403
    async with coordinator.client(None) as anonymous:
        status, body = await anonymous.get("/v1/catalog")
        assert status == 401
        status, body = await anonymous.get("/v1/schemas/catalog-entry.json")
        assert status == 200
        served = json.loads(body["text"])
    assert served == json.loads(schema_text())
    jsonschema.validate(RENDER, served)

    # The catalog outlives the process.
    assert await coordinator.stop() == 0
    await coordinator.start()
    async with coordinator.client(pki.operator("alice")) as ops:
        _, listed = await ops.get("/v1/catalog")
    assert [e["id"] for e in listed["entries"]] == ["queue@1.0.0", "detect@1.0.0"]


# ------------------------------------------------------------------ ferryctl catalog


async def ctl(proc: CoordinatorProcess, pki: CoordinatorPki, *argv: str, token: str | None = None) -> int:
    who = (
        ["--token", token]
        if token
        else ["--cert", str(pki.operator().cert_file), "--key", str(pki.operator().key_file)]
    )
    base = ["--coordinator", proc.url, "--ca", str(pki.server.ca_file), *who]
    return await asyncio.to_thread(main, [*base, *argv])


async def test_ferryctl_catalog(
    coordinator: CoordinatorProcess,
    pki: CoordinatorPki,
    token: str,
    workdir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    files = {}
    for doc in (QUEUE, DETECT, RENDER):
        files[doc["name"]] = workdir / f"{doc['name']}.json"
        files[doc["name"]].write_text(json.dumps(doc))
    for name in ("queue", "detect", "render"):
        assert await ctl(coordinator, pki, "catalog", "register", str(files[name])) == 0
        assert f"registered {name}@1.0.0 (registry.test:5000/pipeline/{name}:1.0.0)" in capsys.readouterr().out

    assert await ctl(coordinator, pki, "catalog", token=token) == 0  # `list` is the default
    table = capsys.readouterr().out
    for fragment in ("NAME", "REQUIRES", "HEALTH CHECK", "detect@1.0.0 (shared_volume)", "grpc :50051", "exec"):
        assert fragment in table, table

    assert await ctl(coordinator, pki, "catalog", "show", "queue") == 0
    out = capsys.readouterr().out
    assert "queue@1.0.0: registry.test:5000/pipeline/queue:1.0.0" in out
    assert "health check tcp :5672 every 1.0 s" in out
    assert "required by detect@1.0.0 (queue), render@1.0.0 (queue)" in out

    assert await ctl(coordinator, pki, "catalog", "plan", "render") == 0
    out = capsys.readouterr().out
    assert "level 0: queue@1.0.0" in out and "level 2: render@1.0.0" in out
    assert "volume detect-1 at /shared/frames: detect, render" in out
    assert "FERRYMAN_DEP_DETECT_VOLUME=/shared/frames" in out

    # Refusals: the coordinator's words, exit 1; a bad NAME or a file that is not JSON: exit 2.
    assert await ctl(coordinator, pki, "catalog", "remove", "queue") == 1
    err = capsys.readouterr().err
    assert "error: catalog_entry_in_use: queue is required by detect@1.0.0 (requires queue)" in err
    bad = workdir / "bad.json"
    bad.write_text(json.dumps(_with(DETECT, _M, ...)))
    assert await ctl(coordinator, pki, "catalog", "register", str(bad)) == 1
    assert "error: manifest_invalid: invalid catalog entry: manifest: missing" in capsys.readouterr().err
    bad.write_text("{not json")
    assert await ctl(coordinator, pki, "catalog", "register", str(bad)) == 2
    assert "not a JSON document" in capsys.readouterr().err
    assert await ctl(coordinator, pki, "catalog", "register", str(workdir / "absent.json")) == 1
    assert "error: io_error: cannot read" in capsys.readouterr().err
    assert await ctl(coordinator, pki, "catalog", "show", "Queue@1") == 2
    assert "invalid catalog entry name 'Queue'" in capsys.readouterr().err

    # --json carries the keys docs/ferryctl.md promises.
    documented = _documented_json_keys()
    for name, argv in (
        ("`catalog` (coordinator)", ["catalog", "list"]),
        ("`catalog show` (coordinator)", ["catalog", "show", "render"]),
        ("`catalog plan` (coordinator)", ["catalog", "plan", "render"]),
        ("`catalog remove` (coordinator)", ["catalog", "remove", "render@1.0.0"]),
        ("`catalog register` (coordinator)", ["catalog", "register", str(files["render"])]),
    ):
        assert await ctl(coordinator, pki, "--json", *argv) == 0, name
        data = json.loads(capsys.readouterr().out)
        assert [k for k in documented[name] if k not in data] == [], (name, data)
    assert await ctl(coordinator, pki, "catalog", "schema") == 0
    assert json.loads(capsys.readouterr().out)["$id"] == "urn:ferryman:catalog-entry:v1"

    # Without a coordinator there is no catalog.
    monkeypatch.delenv("FERRYMAN_COORDINATOR", raising=False)
    assert await asyncio.to_thread(main, ["catalog", "list"]) == 2
    assert "catalog talks to the coordinator" in capsys.readouterr().err


# ------------------------------------------------------------------ docs/deployments.md


def _doc_examples() -> list[dict[str, Any]]:
    text = (ROOT / "docs" / "deployments.md").read_text()
    return [json.loads(block) for block in re.findall(r"```json\n(.*?)```", text, re.DOTALL) if '"manifest"' in block]


async def test_the_documented_examples_register_and_plan(service: CatalogService) -> None:
    examples = _doc_examples()
    assert len(examples) >= 3
    for doc in examples:
        assert (await service.register(doc, "docs")).created, doc["name"]
    layout = await service.plan(examples[-1]["name"])
    text = (ROOT / "docs" / "deployments.md").read_text()
    # The plan as `ferryctl catalog plan` prints it, and render's environment, as documented.
    printed = plan_details(json.loads(json.dumps(preview(layout))))
    shown = re.search(r"catalog plan transcode` prints:\n\n```\n(.*?)```", text, re.DOTALL)
    assert shown is not None
    documented = [line for line in shown[1].splitlines() if line.strip() != "..."]
    assert printed[: len(documented)] == documented
    block = re.search(r"`render` starts with:\n\n```\n(.*?)```", text, re.DOTALL)
    assert block is not None
    addresses = {
        "frames-queue": "10.77.0.10",
        "detect": "10.77.0.11",
        "render": "10.77.0.12",
        "transcode": "10.77.0.13",
    }
    env = wiring(layout, addresses, "pipeline-1")["render"]
    assert block[1].splitlines() == [f"{k}={v}" for k, v in env.items()]
