"""The scaling service (coordinator/scaling/service.py) and `GET /v1/scaling/{id}/explain`.

The behaviour the coordinator keeps is played from the scaling generator's traces: per host and
sample the CPU and memory of a component's containers, as agent telemetry reports them (split over
two hosts, samples not in step), and the balancer's connection rate every 5 s. The service must find
the trace's true lag through that, and answer a pair with too little history plainly. The API test
runs an in-process coordinator over the real SQLite store and the real behaviour series; no agents
and no mesh are needed.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer
from rich.console import Console

from coordinator.api.server import build_app
from coordinator.app import Coordinator
from coordinator.auth import TokenHashes, hash_token
from coordinator.config import CoordinatorConfig
from coordinator.deployments.behaviour import LABEL_COMPONENT, LABEL_DEPLOYMENT
from coordinator.deployments.behaviour import ComponentSeries as BehaviourSeries
from coordinator.deployments.states import ComponentRecord, DeploymentRecord, State
from coordinator.scaling.correlation import CorrelationConfig
from coordinator.scaling.resample import per_second, shared_span
from coordinator.scaling.series import ComponentSeries
from coordinator.scaling.service import ScalingService, edges, explain_pair
from coordinator.sqlite_store import SqliteStore
from models.scaling.generate import HELD_OUT_REGIME, REGIMES, TraceSpec, generate, with_lags

T0 = 1_800_000_000.0
LAGS = (17, 9)
TOKEN = "scaling-test-token"


def _trace(seconds: int, seed: int = 9201) -> Any:
    return generate(TraceSpec(with_lags(REGIMES[HELD_OUT_REGIME], LAGS), seed, duration_s=seconds))


def _samples(
    deployment: str, component: str, series: ComponentSeries, share: float, offset: float, every: int
) -> list[tuple[float, dict[str, Any]]]:
    """Telemetry samples of one host running `share` of the component, one every `every` s."""
    labels = {LABEL_DEPLOYMENT: deployment, LABEL_COMPONENT: component}
    out = []
    for i in range(0, len(series), every):
        container = {
            "id": f"{deployment}-{component}",
            "cpu_millis": float(series.cpu[i]) * 1000 * share,
            "memory_bytes": str(int(series.memory[i] * (1 << 20) * share)),  # uint64: a string in JSON
            "labels": labels,
        }
        out.append((T0 + i + offset, {"containers": [container]}))
    return out


def _behaviour(deployment: str, trace: Any, every: int = 1) -> BehaviourSeries:
    """The coordinator's own series, fed as agents and the balancer feed it."""
    kept = BehaviourSeries(max_points=4000)
    for name, series in trace.components.items():
        kept.observe("h1", _samples(deployment, name, series, 0.6, 0.0, every))
        kept.observe("h2", _samples(deployment, name, series, 0.4, 0.5, every))
        balanced = 0.0
        for i in range(0, len(series), 5):  # the leader reads the counters every 5 s
            balanced += float(np.sum(series.rate[max(0, i - 5) : i]))
            kept.observe_traffic(deployment, name, T0 + i, int(balanced), {})
    return kept


def _record(deployment: str = "d1") -> DeploymentRecord:
    def component(name: str, level: int, requires: tuple[str, ...]) -> ComponentRecord:
        return ComponentRecord(name, f"{name}@1", f"reg/{name}:1", level, f"10.77.0.{level + 2}", requires=requires)

    # A calls B and B calls C: A requires B, B requires C.
    parts = (component("C", 0, ()), component("B", 1, ("C",)), component("A", 2, ("B",)))
    return DeploymentRecord(deployment, "A@1", State.HEALTHY, parts, created_at=T0)


def test_edges_run_from_the_dependent_to_what_it_requires() -> None:
    assert edges(_record()) == [("B", "C"), ("A", "B")]


def test_the_behaviour_kept_becomes_the_same_per_second_series() -> None:
    trace = _trace(400)
    kept = _behaviour("d1", trace)
    a, b = kept.of("d1", "A"), kept.of("d1", "B")
    window = shared_span(a, b)
    assert window is not None and (window.start, window.seconds) == (T0, 399)  # h2 reports until 399.5
    got = per_second(a, window)
    # Two hosts' shares, interpolated on whole seconds, sum back to the component's CPU (h2's half
    # second late samples give it the mean of two seconds; before its first one, only h1's share).
    want = trace.components["A"].cpu[:399]
    assert got.cpu[0] == pytest.approx(0.6 * want[0])
    step = np.max(np.abs(np.diff(want)))
    assert np.allclose(got.cpu[1:], want[1:], atol=0.2 * step + 1e-9), "cpu"
    assert got.rate[0] == 0 and np.all(got.rate[5:] >= 0) and np.any(got.rate > 0)
    assert np.all(got.latency == 0) and np.all(got.errors == 0)


@pytest.mark.parametrize("every", [1, 5])
def test_explain_finds_the_true_lag_through_the_coordinators_series(every: int) -> None:
    trace = _trace(3000)
    kept = _behaviour("d1", trace, every)
    config = CorrelationConfig()
    for up, down, true_lag in trace.edges:
        answer = explain_pair(up, kept.of("d1", up), down, kept.of("d1", down), config)
        assert answer["status"] == "ok", answer
        lead = answer["lead"]
        assert lead is not None, answer
        # telemetry every `every` s blurs the lag by up to that much
        assert abs(lead["lag_s"] - true_lag) <= every, (up, down, true_lag, lead)
        assert lead["downstream_metric"] == "cpu" and lead["granger_p"] < 1e-3 and lead["significant"]


def test_a_pair_with_too_little_history_says_how_much_it_has_and_needs() -> None:
    trace = _trace(200)
    kept = _behaviour("d1", trace)
    answer = explain_pair("A", kept.of("d1", "A"), "B", kept.of("d1", "B"), CorrelationConfig())
    assert answer["status"] == "not_enough_history"
    assert answer["message"] == "not enough history: 199 s of 300 needed"
    assert (answer["seconds"], answer["needed"], answer["links"], answer["lead"]) == (199, 300, [], None)
    nothing = explain_pair("A", kept.of("d1", "A"), "X", kept.of("d1", "X"), CorrelationConfig(max_lag_s=90))
    assert nothing["message"] == "not enough history: 0 s of 450 needed"


class _Records:
    def __init__(self, *records: DeploymentRecord) -> None:
        self.records = {r.id: r for r in records}

    async def get(self, deployment_id: str) -> DeploymentRecord:
        return self.records[deployment_id]


async def test_the_service_answers_every_pair_of_the_deployment() -> None:
    trace = _trace(1200)
    kept = _behaviour("d1", trace)
    service = ScalingService(_Records(_record()), kept, CorrelationConfig())
    answer = await service.explain("d1")
    assert (answer["deployment"], answer["max_lag_s"], answer["alpha"]) == ("d1", 60, 0.01)
    assert [(p["upstream"], p["downstream"], p["status"]) for p in answer["pairs"]] == [
        ("B", "C", "ok"),
        ("A", "B", "ok"),
    ]
    true = {(u, d): lag for u, d, lag in trace.edges}
    for p in answer["pairs"]:
        assert p["lead"]["lag_s"] == true[(p["upstream"], p["downstream"])], p


# ----- the API, in process


@pytest.fixture
async def coordinator(workdir: Path) -> AsyncIterator[Coordinator]:
    store = await SqliteStore.open(workdir / "c.db")
    tokens = TokenHashes(((bytes.fromhex(hash_token(TOKEN)), "ops"),))
    c = Coordinator(CoordinatorConfig(), store, _NoAgents(), tokens, None, time.time)
    try:
        yield c
    finally:
        await c.close()


class _NoAgents:
    async def close(self) -> None:
        pass


@pytest.fixture
async def client(coordinator: Coordinator) -> AsyncIterator[TestClient]:
    async with TestClient(TestServer(build_app(coordinator))) as c:
        yield c


async def _get(client: TestClient, path: str, token: str | None = TOKEN) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    resp = await client.get(path, headers=headers)
    return resp.status, await resp.json()


async def test_explain_over_the_api(coordinator: Coordinator, client: TestClient) -> None:
    await coordinator.store.put_deployment(_record("d1"))
    # No behaviour yet: every pair says so, no error.
    status, body = await _get(client, "/v1/scaling/d1/explain")
    assert status == 200, body
    assert [p["message"] for p in body["pairs"]] == ["not enough history: 0 s of 300 needed"] * 2
    # Telemetry as the agents report it, into the coordinator's own series.
    trace = _trace(720)
    for host, share, offset in (("h1", 0.6, 0.0), ("h2", 0.4, 0.5)):
        for name, series in trace.components.items():
            coordinator.behaviour.observe(host, _samples("d1", name, series, share, offset, 2))
    status, body = await _get(client, "/v1/scaling/d1/explain")
    assert status == 200, body
    true = {(u, d): lag for u, d, lag in trace.edges}
    for p in body["pairs"]:
        assert p["status"] == "ok" and abs(p["lead"]["lag_s"] - true[(p["upstream"], p["downstream"])]) <= 2, p

    status, body = await _get(client, "/v1/scaling/nope/explain")
    assert (status, body["error"]["code"]) == (404, "deployment_not_found"), body
    status, body = await _get(client, "/v1/scaling/Bad_Id/explain")
    assert (status, body["error"]["code"]) == (400, "invalid_request"), body
    status, body = await _get(client, "/v1/scaling/d1/explain", token=None)
    assert status == 401, body


class _ClientRequester:
    """ferryctl's coordinator client, over the in-process API (what ferryctl sends and renders)."""

    def __init__(self, client: TestClient) -> None:
        self.client = client

    async def request(self, method: str, path: str, *, params: Any = None, body: Any = None) -> Any:
        resp = await self.client.request(
            method, path, params=params, json=body, headers={"Authorization": f"Bearer {TOKEN}"}
        )
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def test_ferryctl_scaling_explain(
    coordinator: Coordinator, client: TestClient, capsys: pytest.CaptureFixture[str]
) -> None:
    from agent.ctl import fleet, scaling
    from agent.ctl.main import build_parser

    await coordinator.store.put_deployment(_record("d1"))
    trace = _trace(720)
    args = build_parser().parse_args(["scaling", "explain", "d1"])
    assert fleet.handles(args)
    console = Console(width=200)
    assert await scaling.run(_ClientRequester(client), args, console) == 0
    short = capsys.readouterr().out
    assert "B -> C: not enough history: 0 s of 300 needed" in short and "A -> B" in short, short

    for name, series in trace.components.items():
        coordinator.behaviour.observe("h1", _samples("d1", name, series, 1.0, 0.0, 1))
    assert await scaling.run(_ClientRequester(client), args, console) == 0
    shown = capsys.readouterr().out
    a_b = next(line for line in shown.splitlines() if "A -> B:" in line)
    assert f"leads cpu by {LAGS[0]} s" in a_b and "Granger p=" in a_b, shown
    assert "UPSTREAM" in shown and "GRANGER P" in shown, shown

    json_args = build_parser().parse_args(["--json", "scaling", "explain", "d1"])
    assert await scaling.run(_ClientRequester(client), json_args, console) == 0
    data = json.loads(capsys.readouterr().out)
    assert [p["lead"]["lag_s"] for p in data["pairs"]] == [LAGS[1], LAGS[0]]
