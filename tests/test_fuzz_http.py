"""Property-based fuzzing of both daemons' HTTP APIs with generated input (hypothesis).

A real agent (the test containerd, the test registry, a real image) behind its real `serve()`, and the
real coordinator process over mutual TLS. For every route that takes input, hypothesis generates
bodies (arbitrary JSON, a valid body with fields replaced by arbitrary values or extra fields, text
JSON cannot carry: NaN, Infinity, 1e999, 5000-digit integers, 5000-deep nesting, lone surrogates),
ids and paths (with ../, NUL, unicode) and query strings, and asserts for every answer:

* never a 5xx (except a 503 `*_unavailable` from an agent built without that service: a designed
  answer that says the input was valid), never past DEADLINE seconds;
* every 4xx is `{"error": {"code", "message"}}` JSON;
* nothing was created by a rejected request: no container, image, reservation, migration, host
  change or telemetry sample (checked after every example; what an accepted one made is removed).

Hypothesis runs in a worker thread with a plain blocking HTTP client, while the servers keep
running on the test's event loop. Runs are derandomized (the same examples every run, so CI is
reproducible); a failure prints the smallest failing example. FERRYMAN_FUZZ_EXAMPLES sets the
number of examples per route (default 150).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import secrets
import ssl
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.api import build_app, serve
from agent.api.server import ApiServer
from agent.app import Agent
from agent.oci import Reference
from core.errors import FerrymanError
from tests.harness.agent import agent_config, running_agent
from tests.harness.containerd import PrivateContainerd
from tests.harness.coordinator import CoordinatorPki, CoordinatorProcess, registration, sample
from tests.harness.images import build_test_image
from tests.harness.registry import DockerRegistry

T = TypeVar("T")

DEADLINE = 5.0
"""Seconds any one request may take, from sending it to the end of the answer."""
EXAMPLES = int(os.environ.get("FERRYMAN_FUZZ_EXAMPLES", "150"))
UNAVAILABLE = {"migrations_unavailable", "network_unavailable", "reservations_unavailable", "cache_unavailable"}

FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,  # our own per-request DEADLINE instead: the first example also pays for warm-up
    derandomize=True,
    database=None,
    print_blob=False,
    suppress_health_check=list(HealthCheck),
)

pytestmark = pytest.mark.timeout(900)

STATUSES: Counter[int] = Counter()
"""Answers by class (200, 400, ...) in the running test: proof that some input got through."""


@pytest.fixture(autouse=True)
def statuses() -> Iterator[Counter[int]]:
    STATUSES.clear()
    yield STATUSES
    print(f"answers by class: {dict(sorted(STATUSES.items()))}")  # shown with -s / on failure


# ------------------------------------------------------------------ generated input


@dataclass(frozen=True)
class Raw:
    """JSON text sent as it is: what json.dumps will not write (or not the way we want)."""

    text: str

    def __repr__(self) -> str:  # failure reports quote the strategy: keep 5000-char pieces out of them
        return f"Raw({self.text[:12]!r}...{len(self.text)} chars)" if len(self.text) > 20 else f"Raw({self.text!r})"


RAW = [
    Raw("NaN"),
    Raw("Infinity"),
    Raw("-Infinity"),
    Raw("1e999"),
    Raw("-1e999"),
    Raw("9" * 5000),  # past Python's 4300-digit int limit
    Raw("[" * 5000 + "]" * 5000),
    Raw('{"a":' * 3000 + "1" + "}" * 3000),
    Raw('"\\ud800"'),  # a lone surrogate: valid JSON, not encodable as UTF-8
    Raw('"\\u0000"'),
]
EDGE_INTS = [0, -1, 1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30]
NASTY_TEXT = [
    "",
    " ",
    "../etc/passwd",
    "..",
    ".",
    "a/../../b",
    "a\x00b",
    "\x00",
    "a\nb",
    "ü-ñ-日本",
    "%2e%2e%2f",
    "a" * 300,
    "-leading-dash",
    "rsv-" + "0" * 16,
    "/dev/null",
]

texts = st.text(max_size=24) | st.sampled_from(NASTY_TEXT)
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from(EDGE_INTS)
    | st.floats(allow_nan=False, allow_infinity=False)
    | texts
    | st.sampled_from(RAW)
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(texts, children, max_size=4),
    max_leaves=10,
)


def dump(value: Any) -> str:
    """JSON text for `value`, with Raw pieces inserted as they are."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(str(k))}:{dump(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(dump(v) for v in value) + "]"
    return json.dumps(value)


def bodies(template: dict[str, Any]) -> st.SearchStrategy[bytes]:
    """Request bodies around a valid `template`: mostly wrong, some right, a few not JSON at all."""
    keys = sorted(template)

    @st.composite
    def mutated(draw: st.DrawFn) -> Any:
        body = dict(template)
        changed = draw(st.lists(st.sampled_from(keys), max_size=len(keys), unique=True)) if keys else []
        for key in changed:
            if draw(st.booleans()):
                body[key] = draw(json_values)
            else:
                del body[key]
        if draw(st.integers(0, 4)) == 0:
            body[draw(texts)] = draw(json_values)  # an unknown field, or a duplicate spelled the same
        return body

    json_bodies = st.just(template) | mutated() | json_values
    return json_bodies.map(lambda v: dump(v).encode()) | st.binary(max_size=64)


def query_strings(names: list[str]) -> st.SearchStrategy[str]:
    values = texts | st.sampled_from(["1", "0", "true", "nan", "inf", "-1", "1e300", "9" * 40, "3600", "0.01"])
    keys = (st.sampled_from(names) | texts) if names else texts
    return st.dictionaries(keys, values, max_size=3).map(
        lambda q: ("?" + urlencode(q)) if q else ""
    )


def segment(text: str) -> str:
    return quote(text, safe="") or "%20"


# ------------------------------------------------------------------ a blocking client for the worker thread


@dataclass(frozen=True)
class Answer:
    status: int
    content_type: str
    body: bytes
    elapsed: float


class Client:
    """http.client on one kept-alive connection (reopened after the server closes it)."""

    def __init__(self, host: str, port: int, context: ssl.SSLContext | None = None) -> None:
        self._make: Callable[[], http.client.HTTPConnection]
        if context is None:
            self._make = lambda: http.client.HTTPConnection(host, port, timeout=DEADLINE)
        else:
            self._make = lambda: http.client.HTTPSConnection(host, port, timeout=DEADLINE, context=context)
        self._conn = self._make()

    def send(self, method: str, path: str, body: bytes | None = None) -> Answer:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        start = time.monotonic()
        try:
            self._conn.request(method, path, body=body, headers=headers)
            resp = self._conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException):
            self._conn.close()
            self._conn = self._make()
            raise
        elapsed = time.monotonic() - start
        if resp.will_close:
            self._conn.close()
            self._conn = self._make()
        return Answer(resp.status, resp.getheader("Content-Type") or "", data, elapsed)

    def json(self, path: str) -> Any:
        answer = self.send("GET", path)
        assert answer.status == 200, (path, answer)
        return json.loads(answer.body)

    def close(self) -> None:
        self._conn.close()


def check(answer: Answer, method: str, what: str) -> dict[str, Any] | None:
    """The answer's properties; its JSON body when it is an error."""
    STATUSES[answer.status // 100 * 100] += 1
    assert answer.elapsed < DEADLINE, f"{what}: took {answer.elapsed:.1f} s"
    if answer.status < 400:
        return None
    if method == "HEAD":
        return None  # no body to check
    assert answer.content_type.startswith("application/json"), f"{what}: {answer.status} {answer.body[:200]!r}"
    body = json.loads(answer.body)
    assert isinstance(body, dict) and set(body) == {"error"}, f"{what}: {body}"
    error = body["error"]
    assert set(error) == {"code", "message"}, f"{what}: {body}"
    assert isinstance(error["code"], str) and error["code"], f"{what}: {body}"
    assert isinstance(error["message"], str) and error["message"], f"{what}: {body}"
    if answer.status >= 500:
        assert answer.status == 503 and error["code"] in UNAVAILABLE, f"{what}: {answer.status} {body}"
    return body


async def in_thread(run: Callable[[], None], *clients: Client) -> None:
    try:
        await asyncio.to_thread(run)
    finally:
        for client in clients:
            client.close()
        await asyncio.sleep(0.2)  # let the servers' connection tasks see the close and end


# ------------------------------------------------------------------ the agent


@dataclass
class AgentUnderTest:
    agent: Agent
    server: ApiServer
    image: str
    registry_host: str
    loop: asyncio.AbstractEventLoop

    def client(self) -> Client:
        host, port = self.server.url.removeprefix("tcp://").rsplit(":", 1)
        return Client(host, int(port))

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the servers' loop from the worker thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    async def snapshot(self) -> dict[str, Any]:
        reservations = self.agent.reservations
        try:
            persisted = sorted(r["id"] for r in json.loads(reservations.path.read_text())["reservations"])
        except FileNotFoundError:
            persisted = []
        return {
            "containers": sorted(c.id for c in await self.agent.containers.list()),
            "images": sorted(i.name for i in await self.agent.images.list()),
            # held() hides what has expired, and hid a NaN expiry: the persisted file shows everything.
            "reservations": sorted(h.id for h in reservations.held()),
            "reservations_file": persisted,
            "reserved": reservations.reserved().to_json(),
            "migrations": sorted(r.id for r in self.agent.migrations.list()),
        }

    def state(self) -> dict[str, Any]:
        """`snapshot()`, from the worker thread."""
        return self.call(self.snapshot())

    async def _undo(self, before: dict[str, Any]) -> None:
        """Remove what an accepted request made, so the next example starts from the same state."""
        now = await self.snapshot()
        for cid in set(now["containers"]) - set(before["containers"]):
            await self.agent.containers.delete(cid, force=True)
        for rid in set(now["reservations_file"]) - set(before["reservations_file"]):
            await self.agent.reservations.release(rid)
        for name in set(now["images"]) - set(before["images"]):
            with contextlib.suppress(FerrymanError):
                await self.agent.images.remove(name)

    def settle(self, before: dict[str, Any], answer: Answer, what: str) -> dict[str, Any]:
        """Assert a rejected request changed nothing; undo what an accepted one made. The new baseline."""
        after = self.state()
        if answer.status >= 400:
            assert after == before, f"{what}: rejected with {answer.status} but the agent changed: {before} -> {after}"
            return before
        self.call(self._undo(before))
        return self.state()  # an accepted migration leaves its record: part of the new baseline


@pytest.fixture(scope="module")
async def agent_under_test(
    containerd: PrivateContainerd, registry: DockerRegistry, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[AgentUnderTest]:
    name = f"test/fuzz-{secrets.token_hex(4)}"
    await build_test_image().build().push(registry.host, name, "v1")
    image = f"{registry.host}/{name}:v1"
    workdir = tmp_path_factory.mktemp("fuzz-agent")
    async with running_agent(agent_config(containerd, [registry.registry_config()], workdir)) as agent:
        await agent.images.pull(image)
        server = await serve(build_app(agent), "tcp://127.0.0.1:0")
        try:
            yield AgentUnderTest(agent, server, image, registry.host, asyncio.get_running_loop())
        finally:
            await server.close()


def _agent_templates(image: str, registry_host: str) -> dict[str, dict[str, Any]]:
    return {
        "/v1/images/pull": {"ref": f"{registry_host}/fuzz/missing:v1"},
        "/v1/containers": {
            "id": "fz-1",
            "image": image,
            "args": ["sleep", "30"],
            "env": {"A": "1"},
            "labels": {"fuzz": "yes"},
            "resources": {"cpus": 0.5, "memory": 64 << 20},
            "workdir": "/",
            "health": {"http": {"port": 80, "path": "/", "status": [200, 399]}, "interval": 1, "retries": 2},
        },
        "/v1/migrations": {
            "container": "fz-none",
            "target": "peer-x",
            "mode": "precopy",
            "downtime_target_ms": 300,
            "max_iterations": 5,
            "reservation": "r1",
        },
        "/v1/reservations": {
            "id": "fz-r1",
            "host": "test-host",
            "capacity": {"cpuMillis": "100", "memoryBytes": "1048576", "diskBytes": "0"},
            "expiresAt": 4_000_000_000.0,  # replaced per example by a time 60 s ahead
            "purpose": "fuzz",
        },
        "/v1/network/publish": {"service_ip": "10.99.0.5"},
        "/v1/network/unpublish": {"container": "fz-1"},
        "/v1/cache/pin": {"ref": image},
        "/v1/cache/unpin": {"ref": image},
        # Not the image the other routes run: an accepted eviction could not be undone.
        "/v1/cache/evict": {"ref": f"{registry_host}/fuzz/missing:v1"},
        "/v1/cache/prefetch": {"ref": f"{registry_host}/fuzz/missing:v1", "pin": False},
    }


def _keep_pulls_local(body: bytes, registry_host: str) -> bytes:
    """A generated ref naming another registry would go to the network: point it at ours instead."""
    try:
        doc = json.loads(body)
        ref = Reference.parse(doc["ref"])
    except Exception:
        return body
    if ref.host == registry_host:
        return body
    doc["ref"] = f"{registry_host}/{ref.repository}"
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    "route",
    [
        "/v1/images/pull",
        "/v1/containers",
        "/v1/migrations",
        "/v1/reservations",
        "/v1/network/publish",
        "/v1/network/unpublish",
        "/v1/cache/pin",
        "/v1/cache/unpin",
        "/v1/cache/evict",
        "/v1/cache/prefetch",
    ],
)
async def test_agent_post_bodies(agent_under_test: AgentUnderTest, route: str) -> None:
    aut = agent_under_test
    template = _agent_templates(aut.image, aut.registry_host)[route]
    client = aut.client()
    baseline = await aut.snapshot()

    @FUZZ
    @given(body=bodies(template), query=query_strings(["start"]))
    def run(body: bytes, query: str) -> None:
        nonlocal baseline
        if route == "/v1/reservations":
            body = body.replace(b"4000000000.0", str(time.time() + 60).encode())
        if route in ("/v1/images/pull", "/v1/cache/prefetch", "/v1/cache/evict"):
            body = _keep_pulls_local(body, aut.registry_host)
        path = route + (query if route == "/v1/containers" else "")
        answer = client.send("POST", path, body)
        what = f"POST {path} {body[:300]!r}"
        check(answer, "POST", what)
        baseline = aut.settle(baseline, answer, what)

    await in_thread(run, client)
    if route in ("/v1/containers", "/v1/reservations"):
        assert STATUSES[200] > 0, "no generated request got through: the fuzz never reached the service"


async def test_agent_container_paths_and_queries(agent_under_test: AgentUnderTest) -> None:
    aut = agent_under_test
    client = aut.client()
    baseline = await aut.snapshot()
    actions = [
        ("POST", "/start", []),
        ("POST", "/stop", ["timeout"]),
        ("DELETE", "", ["force"]),
        ("GET", "", []),
        ("GET", "/logs", ["tail", "follow"]),
        ("GET", "/health", ["after", "wait"]),
    ]

    @FUZZ
    @given(cid=texts, action=st.sampled_from(actions), data=st.data(), body=bodies({}))
    def run(cid: str, action: tuple[str, str, list[str]], data: st.DataObject, body: bytes) -> None:
        nonlocal baseline
        method, suffix, names = action
        path = f"/v1/containers/{segment(cid)}{suffix}" + data.draw(query_strings(names))
        answer = client.send(method, path, body if method == "POST" else None)
        what = f"{method} {path}"
        check(answer, method, what)
        baseline = aut.settle(baseline, answer, what)

    await in_thread(run, client)


API_WORDS = [
    "v1", "containers", "images", "migrations", "reservations", "network", "events", "logs", "start",
    "hosts", "h1", "model", "rollback", "predictions", "decisions", "register", "telemetry", "healthz",
    "catalog", "versions", "plan", "schemas", "catalog-entry.json",
]  # fmt: skip


def random_paths(protected: Callable[[str], bool]) -> st.SearchStrategy[str]:
    words = st.sampled_from(API_WORDS) | texts
    return st.lists(words, min_size=1, max_size=5).map(lambda parts: "/" + "/".join(segment(p) for p in parts)).filter(
        lambda p: not protected(p)
    )


async def test_agent_random_paths(agent_under_test: AgentUnderTest) -> None:
    aut = agent_under_test
    client = aut.client()
    baseline = await aut.snapshot()
    image_path = "/v1/images/" + aut.image

    @FUZZ
    @given(
        method=st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]),
        path=random_paths(lambda p: p.startswith(image_path)),
        query=query_strings(["force", "timeout", "tail", "follow", "start", "stream"]),
        body=bodies({}),
    )
    def run(method: str, path: str, query: str, body: bytes) -> None:
        nonlocal baseline
        answer = client.send(method, path + query, body if method in ("POST", "PUT", "PATCH") else None)
        what = f"{method} {path}{query}"
        check(answer, method, what)
        baseline = aut.settle(baseline, answer, what)

    await in_thread(run, client)


# ------------------------------------------------------------------ the coordinator


@dataclass
class CoordinatorUnderTest:
    proc: CoordinatorProcess
    pki: CoordinatorPki

    def client(self, who: str) -> Client:
        identity = self.pki.operator("alice") if who == "ops" else self.pki.agent(who)
        return Client(self.proc.host, self.proc.port, self.pki.client_ssl(identity))


@pytest.fixture(scope="module")
async def coordinator_under_test(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[CoordinatorUnderTest]:
    pki = CoordinatorPki(tmp_path_factory.mktemp("fuzz-pki"))
    proc = CoordinatorProcess(
        tmp_path_factory.mktemp("fuzz-coordinator"),
        pki,
        overrides={"heartbeat": {"suspect_after": 600.0, "down_after": 1200.0, "check_period": 0.5}},
    )
    await proc.start()
    try:
        cut = CoordinatorUnderTest(proc, pki)
        agent = cut.client("h1")
        answer = await asyncio.to_thread(
            agent.send, "POST", "/v1/register", json.dumps(registration("h1", memory_bytes=8 << 30)).encode()
        )
        agent.close()
        assert answer.status == 200, answer
        yield cut
    finally:
        code = await proc.stop()
        assert code == 0, proc.logs()


def _coordinator_state(ops: Client, route: str) -> dict[str, Any]:
    """What a request to `route` could have changed."""
    if route in ("/v1/register", "/v1/hosts"):
        return {"hosts": [{k: h.get(k) for k in ("name", "capacity", "labels", "admin", "health")}
                          for h in ops.json("/v1/hosts")["hosts"]]}  # fmt: skip
    if route == "/v1/telemetry":
        host = ops.json("/v1/hosts/h1")
        return {k: host.get(k) for k in ("telemetry_samples", "last_heartbeat", "used", "containers", "pressure")}
    if route == "/v1/migrations":
        return {"migrations": ops.json("/v1/migrations")["migrations"]}
    if route == "/v1/reservations":
        return {"reservations": ops.json("/v1/reservations")["reservations"]}
    if route == "/v1/model":
        return {"model": ops.json("/v1/model")}
    if route == "/v1/catalog":
        return {"catalog": ops.json("/v1/catalog")}
    raise AssertionError(route)


def _coordinator_templates() -> dict[str, tuple[str, dict[str, Any]]]:
    return {
        "/v1/register": ("h1", registration("h1", memory_bytes=8 << 30)),
        "/v1/telemetry": ("h1", {"host": "h1", "samples": [sample(1_700_000_000.0)], "dropped": 0}),
        "/v1/migrations": ("ops", {"container": "web", "to": "auto", "mode": "precopy"}),
        "/v1/reservations": (
            "ops",
            {
                "capacity": {"cpu_millis": 100, "memory_bytes": 1 << 20, "disk_bytes": 0},
                "host": "h1",
                "ttl": 30,
                "purpose": "fuzz",
                "image": "registry.local/app:1",
                "layers": {"sha256:" + "a" * 64: 1024},
            },
        ),
        "/v1/model": ("ops", {"path": "/nonexistent/model.onnx"}),
        "/v1/catalog": (
            "ops",
            {
                "name": "fuzz",
                "version": "1.0.0",
                "image": "registry.local/app:1",
                "description": "a leaf entry",
                "manifest": {
                    "required_images": [],
                    "data_transfer_protocols": {},
                    "dependency_health_check": {"kind": "http", "port": 8080, "path": "/healthz", "interval": 1},
                },
            },
        ),
    }


@pytest.mark.parametrize("route", sorted(_coordinator_templates()))
async def test_coordinator_post_bodies(coordinator_under_test: CoordinatorUnderTest, route: str) -> None:
    cut = coordinator_under_test
    who, template = _coordinator_templates()[route]
    client, ops = cut.client(who), cut.client("ops")
    baseline = _coordinator_state(ops, route)

    @FUZZ
    @given(body=bodies(template))
    def run(body: bytes) -> None:
        nonlocal baseline
        if route == "/v1/telemetry":
            body = body.replace(b"1700000000.0", str(time.time()).encode())
        answer = client.send("POST", route, body)
        what = f"POST {route} {body[:300]!r}"
        check(answer, "POST", what)
        after = _coordinator_state(ops, route)
        if answer.status >= 400:
            assert after == baseline, f"{what}: rejected with {answer.status} but the coordinator changed"
        elif route == "/v1/reservations":
            # Accepted: give the capacity back, so the next example can place again.
            created = json.loads(answer.body)
            assert ops.send("DELETE", f"/v1/reservations/{segment(created['id'])}").status == 204
            after = _coordinator_state(ops, route)
        elif route == "/v1/catalog":
            # Accepted: remove it again, so the next example registers into the same catalog.
            created = json.loads(answer.body)
            path = f"/v1/catalog/{segment(created['name'])}/versions/{segment(created['version'])}"
            assert ops.send("DELETE", path).status == 200
            after = _coordinator_state(ops, route)
        baseline = after

    await in_thread(run, client, ops)
    if route in ("/v1/register", "/v1/telemetry", "/v1/reservations", "/v1/catalog"):
        assert STATUSES[200] > 0, "no generated request got through: the fuzz never reached the service"


async def test_coordinator_host_paths_and_queries(coordinator_under_test: CoordinatorUnderTest) -> None:
    cut = coordinator_under_test
    ops = cut.client("ops")
    baseline = _coordinator_state(ops, "/v1/hosts")

    @FUZZ
    @given(
        host=texts.filter(lambda h: h != "h1"),  # draining the one real host would wait for it
        action=st.sampled_from(["drain", "uncordon"]),
        query=query_strings(["wait"]),
        body=bodies({}),
    )
    def run(host: str, action: str, query: str, body: bytes) -> None:
        path = f"/v1/hosts/{segment(host)}/{action}{query}"
        answer = ops.send("POST", path, body)
        what = f"POST {path}"
        check(answer, "POST", what)
        if answer.status >= 400:
            assert _coordinator_state(ops, "/v1/hosts") == baseline, f"{what}: rejected but hosts changed"

    await in_thread(run, ops)


async def test_coordinator_random_paths(coordinator_under_test: CoordinatorUnderTest) -> None:
    cut = coordinator_under_test
    ops = cut.client("ops")
    before = {route: _coordinator_state(ops, route) for route in ("/v1/hosts", "/v1/migrations", "/v1/reservations")}

    @FUZZ
    @given(
        method=st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]),
        # retrain runs the trainer and drain waits for a real host: neither is an input-handling question.
        path=random_paths(lambda p: "retrain" in p or "/drain" in p),
        query=query_strings(["wait", "host"]),
        body=bodies({}),
    )
    def run(method: str, path: str, query: str, body: bytes) -> None:
        answer = ops.send(method, path + query, body if method in ("POST", "PUT", "PATCH") else None)
        check(answer, method, f"{method} {path}{query}")

    await in_thread(run, ops)
    ops = cut.client("ops")
    try:
        after = {route: _coordinator_state(ops, route) for route in before}
    finally:
        ops.close()
    assert after == before


def test_raw_pieces_reach_the_wire_as_they_are() -> None:
    assert dump({"a": [Raw("NaN"), 1, "x", {"b": None}]}) == '{"a":[NaN,1,"x",{"b":null}]}'
