"""The scaling service (coordinator/scaling/service.py) and `GET /v1/scaling/{id}/explain`.

The behaviour the coordinator keeps is played from the scaling generator's traces: per host and
sample the CPU and memory of a component's containers, as agent telemetry reports them (split over
two hosts, samples not in step), and the balancer's connection rate every 5 s. The service must find
the trace's true lag through that, and answer a pair with too little history plainly. The API test
runs an in-process coordinator over the real SQLite store and the real behaviour series; no agents
and no mesh are needed.
"""

from __future__ import annotations

import asyncio
import dataclasses
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
from coordinator.deployments.states import ComponentRecord, DeploymentRecord, ReplicaRecord, ReplicaState, State
from coordinator.scaling.correlation import CorrelationConfig
from coordinator.scaling.resample import Span, per_second, shared_span, span
from coordinator.scaling.series import ComponentSeries
from coordinator.scaling.service import ScalingService, edges, explain_pair
from coordinator.sqlite_store import SqliteStore
from core.errors import InvalidRequest
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


def test_the_cpu_now_counts_every_host_whose_next_sample_is_not_in_yet() -> None:
    # Two hosts run one copy each at 0.05 cores, sampled every 5 s, 2.5 s out of step: the window's
    # last second is past h1's last sample, whose next one is due. It still runs there.
    labels = {LABEL_DEPLOYMENT: "d1", LABEL_COMPONENT: "B"}
    kept = BehaviourSeries(max_points=100)
    for host, offset in (("h1", 0.0), ("h2", 2.5)):
        for i in range(0, 101, 5):
            container = {"id": f"B-{host}", "cpu_millis": 50.0, "memory_bytes": "0", "labels": labels}
            kept.observe(host, [(T0 + i + offset, {"containers": [container]})])
    b = kept.of("d1", "B")
    window = span(b)
    assert window is not None and window.seconds == 102
    cpu = per_second(b, window).cpu
    assert cpu[-1] == pytest.approx(0.1) and np.allclose(cpu[3:], 0.1)
    # A host that stopped reporting is held for 1.5 of its intervals, not for ever.
    h1_only = {**b, "usage": [p for p in b["usage"] if p["host"] == "h1"]}
    late = per_second(h1_only, Span(T0, T0 + 120)).cpu
    assert late[107] == pytest.approx(0.05) and late[108] == 0.0


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


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


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


# ----- the leader's decisions (coordinator/scaling/autoscaler.py)

MODEL = Path(__file__).resolve().parent.parent / "models/scaling/scaling.onnx"


class _Replicas:
    """The replica service's scale entry point; records what it was asked."""

    def __init__(self, busy: bool = False, cold_starts: dict[str, float] | None = None) -> None:
        self.asked: list[tuple[str, str, int]] = []
        self.busy = busy
        self.cold_starts = cold_starts or {}
        self.standbys: list[int | None] = []
        self.standbys_starting: dict[str, tuple[int, ...]] = {}

    async def scale(
        self,
        deployment_id: str,
        name: str,
        replicas: int,
        drain_timeout: float | None = None,
        standbys: int | None = None,
    ) -> Any:
        self.asked.append((deployment_id, name, replicas))
        self.standbys.append(standbys)
        return None

    def scaling(self, deployment_id: str, name: str | None = None, standbys: bool = True) -> bool:
        return self.busy

    def cold_start(self, deployment_id: str, name: str) -> float | None:
        return self.cold_starts.get(name)

    def starting_standbys(self, deployment_id: str, name: str) -> tuple[int, ...]:
        return self.standbys_starting.get(name, ())


class _All(_Records):
    async def all(self) -> list[DeploymentRecord]:
        return list(self.records.values())


def _autoscaler(kept: Any, replicas: _Replicas, records: _All, now: float, period_s: float = 0.0) -> Any:
    from coordinator.scaling.autoscaler import Autoscaler
    from coordinator.scaling.model import ScalingModel
    from coordinator.scaling.policy import ScalingConfig

    policy = ScalingConfig(min_replicas=1, max_replicas=8, replica_capacity=0.1, replica_cost=1.0, violation_cost=20.0)
    model = ScalingModel.load(MODEL)
    return Autoscaler(records, kept, replicas, model, policy, CorrelationConfig(), 30.0, lambda: now, period_s=period_s)


async def test_a_round_decides_per_downstream_component_records_its_inputs_and_applies_it() -> None:
    trace = _trace(900)
    kept = _behaviour("d1", trace)
    replicas = _Replicas()
    records = _All(_record("d1"), dataclasses.replace(_record("d2"), state=State.STARTING))
    autoscaler = _autoscaler(kept, replicas, records, T0 + 900)
    entries = await autoscaler.round()
    # d2 is not HEALTHY: not decided on; d1's two downstream components are.
    assert [(e["deployment"], e["component"], e["upstream"]) for e in entries] == [("d1", "C", "B"), ("d1", "B", "A")]
    true = {(u, d): lag for u, d, lag in trace.edges}
    for e in entries:
        inputs = e["inputs"]
        assert e["lag_s"] == true[(e["upstream"], e["component"])], e
        assert inputs["ready"] == 1 and inputs["starting"] == 0 and inputs["horizon_s"] == 15, e
        assert inputs["cold_start_s"] == 30.0 and e["cold_start"] == "configured", e  # none measured yet
        cpu = trace.components[e["component"]].cpu
        # the last whole second: h1's 60 % at 898, h2's 40 % between its samples at 897.5 and 898.5
        assert inputs["need_now"] == pytest.approx(0.8 * cpu[898] + 0.2 * cpu[897]), e
        assert 0 < inputs["predicted_need"] < 3 * max(cpu), e
        # the generator's stages use more than one replica's 0.1 cores: scale out, applied
        applied = f"scaling to {e['target']}, {e['standbys']} standby"
        assert e["action"] == "scale-out" and e["target"] > 1 and e["applied"] == applied, e
    assert replicas.asked == [("d1", e["component"], e["target"]) for e in entries]
    assert replicas.standbys == [e["standbys"] for e in entries]  # the policy's (max_standbys 0 here)
    assert await autoscaler.history("d1") == entries and await autoscaler.history("d2") == []
    assert set(await autoscaler.status("d1")) == {"B", "C"}

    # While the component is being scaled, a decision is recorded, not applied.
    busy = _Replicas(busy=True)
    later = _autoscaler(kept, busy, records, T0 + 900)
    entries = await later.round()
    assert busy.asked == [] and all(e["applied"] == f"no: a scale of {e['component']} is under way" for e in entries)


async def test_a_decision_knows_its_lead_how_far_its_data_lags_and_the_next_round() -> None:
    # What decides whether a cold start decided now (or at the next round) is late: the prediction
    # starts at the series' last whole second (898 of 900 here), the next round is a period away.
    trace = _trace(900)
    autoscaler = _autoscaler(_behaviour("d1", trace), _Replicas(), _All(_record("d1")), T0 + 900, period_s=5.0)
    entries = await autoscaler.round()
    assert len(entries) == 2
    for e in entries:
        inputs = e["inputs"]
        assert inputs["lead_s"] == e["lag_s"] and inputs["period_s"] == 5.0, e
        assert inputs["data_age_s"] == pytest.approx(2.0), e
        # 30 s cold start + 5 s period against 15 - 2 s seen ahead
        assert e["cold_late_s"] == pytest.approx(22.0), e


async def test_a_scale_out_thaws_the_standby_and_leaves_its_top_up_to_a_later_round() -> None:
    # B has a warm standby; its cold start (30 s) is late for what the lead shows, so the scale out
    # thaws it first. The decision still wants a standby beside the new count, but starting it within
    # this scale would hold back B's next scale out for a cold start: the scale asks for none.
    trace = _trace(900)
    record = _record("d1")
    standby = ReplicaRecord(1, "10.77.0.40", "h1", "d1-B-1", state=ReplicaState.STANDBY)
    parts = tuple(dataclasses.replace(c, replicas=(standby,)) if c.name == "B" else c for c in record.components)
    replicas = _Replicas()
    autoscaler = _autoscaler(
        _behaviour("d1", trace), replicas, _All(dataclasses.replace(record, components=parts)), T0 + 900, period_s=5.0
    )
    autoscaler._policy = dataclasses.replace(autoscaler._policy, max_standbys=1, replica_capacity=1.0)
    b = next(e for e in await autoscaler.round() if e["component"] == "B")
    assert b["action"] == "scale-out" and b["warm_starts"] == 1 and b["standbys"] >= 1, (b["target"], b["inputs"])
    assert b["applied"] == f"scaling to {b['target']}, 0 standby", b


async def test_a_standby_being_started_is_neither_a_copy_nor_a_reason_to_scale() -> None:
    # B's standby is being started: the record lists it as a starting replica. Taken for a copy, the
    # decision would see 2 provisioned and, keeping a standby, ask for a scale to 2 -- which starts
    # a real second copy (the replica service plans around the standby being started).
    trace = _trace(900)
    record = _record("d1")
    standby = ReplicaRecord(1, "10.77.0.40", "h1", "d1-B-1", state=ReplicaState.STARTING)
    parts = tuple(dataclasses.replace(c, replicas=(standby,)) if c.name == "B" else c for c in record.components)
    replicas = _Replicas()
    replicas.standbys_starting = {"B": (1,)}
    autoscaler = _autoscaler(
        _behaviour("d1", trace), replicas, _All(dataclasses.replace(record, components=parts)), T0 + 900, period_s=5.0
    )
    # one replica serves the need; the cold start (30 s) is late for what the lead shows: a standby
    autoscaler._policy = dataclasses.replace(autoscaler._policy, max_standbys=1, replica_capacity=100.0)
    b = next(e for e in await autoscaler.round() if e["component"] == "B")
    assert (b["inputs"]["starting"], b["inputs"]["standbys_starting"], b["inputs"]["standbys"]) == (0, 1, 0), b
    assert (b["action"], b["target"], b["standbys"]) == ("hold", 1, 1), b
    assert "applied" not in b and [a for a in replicas.asked if a[1] == "B"] == [], (b, replicas.asked)


async def test_decisions_kept_in_the_store_are_seen_by_the_next_leader(workdir: Path) -> None:
    from coordinator.scaling.autoscaler import Autoscaler

    kept = _behaviour("d1", _trace(900))
    records = _All(_record("d1"))
    store = await SqliteStore.open(workdir / "c.db")
    try:
        first = _autoscaler(kept, _Replicas(), records, T0 + 900)
        first._store = store
        entries = await first.round()
        assert [e["component"] for e in entries] == ["C", "B"]
        # another leader (a new Autoscaler on the same store) shows them and adds to them
        second: Autoscaler = _autoscaler(kept, _Replicas(), records, T0 + 905)
        second._store = store
        assert json.loads(json.dumps(entries)) == await second.history("d1")
        await second.round()
        assert [e["component"] for e in await second.history("d1")] == ["C", "B", "C", "B"]
        assert (await second.status("d1"))["B"]["ts"] == T0 + 905
        # a deployment that ends takes its decisions with it
        records.records["d1"] = dataclasses.replace(records.records["d1"], state=State.REMOVED)
        await second.round()
        assert await store.scaling_decisions("d1") == []
    finally:
        await store.close()


async def test_the_policy_and_the_decisions_state_survive_a_leader_change(workdir: Path) -> None:
    kept = _behaviour("d1", _trace(900))
    records = _All(_record("d1"))
    store = await SqliteStore.open(workdir / "c.db")
    try:
        first = _autoscaler(kept, _Replicas(), records, T0 + 900)
        first._store = store
        await first.set_policy("d1", "reactive")
        assert [e["policy"] for e in await first.round()] == ["reactive", "reactive"]  # the HPA's first pass
        state = await store.scaling_state("d1")
        assert state is not None and state["policy"] == "reactive", state
        assert state["components"]["B"]["hpa"]["last_sync"] == T0 + 900, state
        # A new leader 5 s later on the same store follows the policy set and continues the HPA's
        # 15 s sync: no pass yet (a leader starting afresh, in memory, would pass at once).
        second = _autoscaler(kept, _Replicas(), records, T0 + 905)
        second._store = store
        assert await second.policy("d1") == "reactive"
        assert await second.round() == []
        fresh = _autoscaler(kept, _Replicas(), records, T0 + 905)
        await fresh.set_policy("d1", "reactive")
        assert len(await fresh.round()) == 2
        third = _autoscaler(kept, _Replicas(), records, T0 + 916)
        third._store = store
        assert [e["policy"] for e in await third.round()] == ["reactive", "reactive"]
        # Setting a policy starts its state again; the predictive hold window is kept the same way.
        await third.set_policy("d1", "predictive")
        assert await store.scaling_state("d1") == {}
        third._clock = lambda: T0 + 920
        await third.round()
        state = await store.scaling_state("d1")
        assert state is not None and state["policy"] == "predictive", state
        recent = state["components"]["B"]["predictive"]["recent"]
        assert [t for t, _ in recent] == [T0 + 920], state
        fourth = _autoscaler(kept, _Replicas(), records, T0 + 925)
        fourth._store = store
        await fourth.round()
        state = await store.scaling_state("d1")
        assert state is not None and [t for t, _ in state["components"]["B"]["predictive"]["recent"]] == [
            T0 + 920,
            T0 + 925,
        ], state
        # an ended deployment takes its policy and state with it
        records.records["d1"] = dataclasses.replace(records.records["d1"], state=State.REMOVED)
        await fourth.round()
        assert await store.scaling_state("d1") is None and await store.scaling_policy("d1") is None
    finally:
        await store.close()


async def test_without_a_leading_upstream_the_need_now_is_the_forecast() -> None:
    # Two independent traces: A's behaviour leads nothing of B's.
    kept = _behaviour("d1", _trace(900))
    other = _behaviour("d1", _trace(900, seed=4242))
    for name in ("A",):
        kept._usage[("d1", name)] = other._usage[("d1", name)]
        kept._traffic[("d1", name)] = other._traffic[("d1", name)]
    replicas = _Replicas()
    entries = {e["component"]: e for e in await _autoscaler(kept, replicas, _All(_record("d1")), T0 + 900).round()}
    b = entries["B"]
    assert b["reason"].startswith("no metric of A leads B's cpu: the need now taken as the forecast"), b
    assert b["inputs"]["predicted_need"] == b["inputs"]["need_now"] > 0.1 and "lag_s" not in b, b
    assert b["action"] == "scale-out" and ("d1", "B", b["target"]) in replicas.asked, b  # overloaded now: out


async def test_a_lead_found_is_kept_for_a_while_when_a_later_round_finds_none() -> None:
    from coordinator.scaling.autoscaler import Autoscaler
    from coordinator.scaling.model import ScalingModel
    from coordinator.scaling.policy import ScalingConfig

    kept = _behaviour("d1", _trace(900))
    now = [T0 + 900]
    policy = ScalingConfig(min_replicas=1, max_replicas=8, replica_capacity=0.1, replica_cost=1.0, violation_cost=20.0)
    model = ScalingModel.load(MODEL)
    records = _All(_record("d1"))
    scaler = Autoscaler(
        records, kept, _Replicas(), model, policy, CorrelationConfig(), 30.0, lambda: now[0], lead_keep_s=120.0
    )
    first = {e["component"]: e for e in await scaler.round()}
    assert first["B"]["lag_s"] == LAGS[0] and "lead_kept" not in first["B"], first["B"]
    # The round tests only the links into CPU: alpha shared by 5 metric pairs, not explain's 25, so
    # the same lead passes a lower threshold; the decision records it.
    shown = explain_pair("A", kept.of("d1", "A"), "B", kept.of("d1", "B"), CorrelationConfig())["lead"]
    used = first["B"]["lead"]
    assert used["upstream_metric"] == shown["upstream_metric"] and used["correlation"] == shown["correlation"]
    assert used["threshold"] < shown["threshold"] and 0 <= used["granger_p"] < 0.01 / 5, used
    # A's behaviour is replaced by an independent trace's: the engine finds no lead into B any more.
    other = _behaviour("d1", _trace(900, seed=4242))
    kept._usage[("d1", "A")] = other._usage[("d1", "A")]
    kept._traffic[("d1", "A")] = other._traffic[("d1", "A")]
    now[0] = T0 + 960
    b = {e["component"]: e for e in await scaler.round()}["B"]
    assert b["lag_s"] == LAGS[0] and b["inputs"]["lead_s"] == LAGS[0], b
    assert b["lead_kept"] == {"lag_s": LAGS[0], "found_at": T0 + 900, "age_s": 60.0}, b
    assert b["reason"].startswith(f"no lead found this round: the {LAGS[0]} s lead found 60 s ago kept"), b
    # Past lead_keep_s it is forgotten: the naive forecast again.
    now[0] = T0 + 1021
    b = {e["component"]: e for e in await scaler.round()}["B"]
    assert "lag_s" not in b and "lead_kept" not in b and b["inputs"]["lead_s"] is None, b
    assert b["reason"].startswith("no metric of A leads B's cpu"), b


class _Seen:
    """Behaviour points as the coordinator keeps them (Behaviour.of), given directly."""

    def __init__(self, points: dict[str, dict[str, Any]]) -> None:
        self.points = points

    def of(self, deployment: str, component: str) -> dict[str, Any]:
        return self.points[component]


def _bench_as_seen(end: int, noise_seed: int) -> dict[str, dict[str, Any]]:
    """bench/scaling.py's replayed trace (bursty, seed 20261605, its window from 180 s, each
    second's requests thinned to 0.35) as the coordinator sees it for its first `end` seconds:
    each stage's CPU sampled every 2 s on each of its hosts with 30 % noise (4 ms a request at B
    and C, 2 at A), its request rate read every 5 s."""
    trace = generate(TraceSpec(REGIMES["bursty"], 20261605, duration_s=3600))
    thin = np.random.default_rng(20261605)
    rows = np.array(
        [[thin.binomial(int(trace.components[s].rate[t]), 0.35) for s in "ABC"] for t in range(180, 800)], float
    )
    rng = np.random.default_rng(noise_seed)
    out = {}
    for k, (name, ms, hosts) in enumerate((("A", 2, 2), ("B", 4, 3), ("C", 4, 2))):
        rate = rows[:end, k]
        usage = []
        for h in range(hosts):
            off = rng.uniform(0, 2)
            for ts in np.arange(off + 2, end, 2.0):
                i = int(ts)
                cpu = rate[max(0, i - 2) : i].mean() * ms / hosts
                cpu = cpu * np.exp(rng.normal(0, 0.3)) + rng.normal(0, 5)
                point = {"ts": T0 + ts, "host": f"h{h}", "cpu_millis": max(cpu, 0.0)}
                usage.append({**point, "memory_bytes": 1e8 + rng.normal(0, 1e6)})
        off = rng.uniform(0, 5)
        requests = [
            {
                "ts": T0 + ts,
                "requests_per_second": rate[int(ts) - 5 : int(ts)].mean(),
                "latency_ms": 5 + rng.normal(0, 1),
                "errors_per_second": 0.0,
            }
            for ts in np.arange(off + 5, end, 5.0)
        ]
        out[name] = {"usage": usage, "requests": requests, "traffic": []}
    return out


@pytest.mark.parametrize(("noise_seed", "end"), [(1, 380), (2, 425), (3, 365)])
async def test_a_round_finds_the_lead_on_the_bench_trace_as_the_coordinator_sees_it(noise_seed: int, end: int) -> None:
    # CPU samples every 2 s with 30 % noise, the request rate every 5 s, 365-425 s of history: over
    # all 25 metric pairs the engine names no lead into B in these windows; over the 5 into CPU,
    # which the round asks for, it names A's CPU 14-16 s ahead (the trace's true lag is 15 s).
    from coordinator.scaling.autoscaler import Autoscaler
    from coordinator.scaling.model import ScalingModel
    from coordinator.scaling.policy import ScalingConfig

    seen = _Seen(_bench_as_seen(end, noise_seed))
    config = CorrelationConfig(max_lag_s=40)
    shown = explain_pair("A", seen.of("d1", "A"), "B", seen.of("d1", "B"), config)
    assert shown["status"] == "ok" and shown["lead"] is None, shown["lead"]
    policy = ScalingConfig(min_replicas=1, max_replicas=8, replica_capacity=0.07, replica_cost=1.0, violation_cost=20.0)
    scaler = Autoscaler(
        _All(_record("d1")), seen, _Replicas(), ScalingModel.load(MODEL), policy, config, 9.0, lambda: T0 + end
    )
    b = {e["component"]: e for e in await scaler.round()}["B"]
    assert abs(b["lag_s"] - 15) <= 2 and b["lead"]["upstream_metric"] == "cpu", b


async def test_a_round_takes_the_components_measured_cold_start_over_the_configured_one() -> None:
    kept = _behaviour("d1", _trace(900))
    replicas = _Replicas(cold_starts={"C": 4.5})
    entries = {e["component"]: e for e in await _autoscaler(kept, replicas, _All(_record("d1")), T0 + 900).round()}
    assert (entries["C"]["inputs"]["cold_start_s"], entries["C"]["cold_start"]) == (4.5, "measured")
    assert (entries["B"]["inputs"]["cold_start_s"], entries["B"]["cold_start"]) == (30.0, "configured")


async def test_the_reactive_policy_computes_like_the_hpa_on_the_same_deployment() -> None:
    from coordinator.scaling.hpa import HpaConfig, HpaState, hpa_step

    trace = _trace(900)
    kept = _behaviour("d1", trace)
    replicas = _Replicas()
    clock = [T0 + 900]
    autoscaler = _autoscaler(kept, replicas, _All(_record("d1")), 0.0)
    autoscaler._clock = lambda: clock[0]
    with pytest.raises(InvalidRequest, match="policy"):
        await autoscaler.set_policy("d1", "psychic")
    await autoscaler.set_policy("d1", "reactive")
    entries = await autoscaler.round()
    assert [(e["component"], e["policy"]) for e in entries] == [("C", "reactive"), ("B", "reactive")]
    for e in entries:
        # the mean CPU of the last 15 s the series cover (0.1-core replicas, 70 % target), computed by hpa_step
        cpu = e["inputs"]["cpu_used"]
        want, _ = hpa_step(HpaState(), clock[0], 1, 1, cpu, HpaConfig(replica_cores=0.1, max_replicas=8))
        assert want is not None and e["target"] == want.desired > 1 and e["action"] == "scale-out", e
        assert e["applied"] == f"scaling to {e['target']}, 0 standby", e  # the HPA keeps no standby
    assert replicas.standbys == [0, 0]
    clock[0] += 5  # within the HPA's 15 s sync: no pass
    assert await autoscaler.round() == []
    await autoscaler.set_policy("d1", "off")
    clock[0] += 30
    assert await autoscaler.round() == [] and len(replicas.asked) == 2


async def test_a_round_without_enough_history_decides_on_the_need_now_and_says_why() -> None:
    trace = _trace(200)
    kept = _behaviour("d1", trace)
    replicas = _Replicas()
    autoscaler = _autoscaler(kept, replicas, _All(_record("d1")), T0 + 200)
    entries = await autoscaler.round()
    assert [e["component"] for e in entries] == ["C", "B"]
    for e in entries:
        assert e["reason"].startswith("not enough history: 199 s of 300 needed: the need now taken as the forecast"), e
        assert "lag_s" not in e and e["action"] != "skip", e
        inputs = e["inputs"]
        assert inputs["predicted_need"] == inputs["need_now"] > 0, e
    # a component that has reported nothing yet is skipped, with why
    empty = _autoscaler(BehaviourSeries(max_points=10), _Replicas(), _All(_record("d1")), T0)
    assert [(e["action"], e["reason"]) for e in await empty.round()] == [
        ("skip", "not enough history: 0 s of 300 needed"),
        ("skip", "not enough history: 0 s of 300 needed"),
    ]


async def test_status_and_history_over_the_api_and_ferryctl(
    coordinator: Coordinator, client: TestClient, capsys: pytest.CaptureFixture[str]
) -> None:
    from agent.ctl import scaling
    from agent.ctl.main import build_parser

    await coordinator.store.put_deployment(_record("d1"))
    status, body = await _get(client, "/v1/scaling/d1")
    assert (status, body) == (200, {"deployment": "d1", "enabled": False, "policy": "off", "components": {}}), body
    resp = await client.put("/v1/scaling/d1/policy", json={"policy": "reactive"}, headers=_auth())
    assert resp.status == 409, await resp.text()  # scaling is off
    status, body = await _get(client, "/v1/scaling/d1/history")
    assert (status, body) == (200, {"deployment": "d1", "enabled": False, "decisions": []}), body
    status, body = await _get(client, "/v1/scaling/nope/history")
    assert status == 404, body
    args = build_parser().parse_args(["scaling", "status", "d1"])
    assert await scaling.run(_ClientRequester(client), args, Console(width=200)) == 0
    assert "predictive scaling is off" in capsys.readouterr().out

    # Enabled: the leader's decisions, through the same routes and ferryctl.
    replicas = _Replicas()
    coordinator.scaling.autoscaler = _autoscaler(_behaviour("d1", _trace(900)), replicas, _All(_record("d1")), T0 + 900)
    for body, code in (({"policy": "psychic"}, 400), ({"policy": 1}, 400), ({"policy": "off", "x": 1}, 400)):
        resp = await client.put("/v1/scaling/d1/policy", json=body, headers=_auth())
        assert resp.status == code, await resp.text()
    resp = await client.put("/v1/scaling/nope/policy", json={"policy": "off"}, headers=_auth())
    assert resp.status == 404, await resp.text()
    args = build_parser().parse_args(["scaling", "policy", "d1", "off"])
    assert await scaling.run(_ClientRequester(client), args, Console(width=200)) == 0
    assert "d1: off scaling" in capsys.readouterr().out
    assert await coordinator.scaling.autoscaler.round() == []
    args = build_parser().parse_args(["--json", "scaling", "policy", "d1", "predictive"])
    assert await scaling.run(_ClientRequester(client), args, Console(width=200)) == 0
    assert json.loads(capsys.readouterr().out)["policy"] == "predictive"
    await coordinator.scaling.autoscaler.round()
    status, body = await _get(client, "/v1/scaling/d1/history")
    assert status == 200 and [d["component"] for d in body["decisions"]] == ["C", "B"], body
    assert all(d["action"] == "scale-out" and "inputs" in d for d in body["decisions"]), body
    args = build_parser().parse_args(["scaling", "history", "d1"])
    assert await scaling.run(_ClientRequester(client), args, Console(width=250)) == 0
    shown = capsys.readouterr().out
    assert "scale-out" in shown and "PREDICTED" in shown and f"{LAGS[0]} s" in shown, shown
    args = build_parser().parse_args(["--json", "scaling", "status", "d1"])
    assert await scaling.run(_ClientRequester(client), args, Console()) == 0
    assert set(json.loads(capsys.readouterr().out)["components"]) == {"B", "C"}


def test_an_enabled_coordinator_needs_a_model_that_loads(workdir: Path) -> None:
    from coordinator.config import PredictiveScalingConfig
    from core.errors import ConfigError

    bad = workdir / "bad.onnx"
    bad.write_bytes(b"not onnx")
    config = CoordinatorConfig(scaling=PredictiveScalingConfig(enabled=True, model=str(bad)))
    with pytest.raises(ConfigError, match=r"scaling\.model"):
        Coordinator(config, None, _NoAgents(), TokenHashes(), None, time.time)  # type: ignore[arg-type]


async def test_the_leader_runs_rounds_when_enabled(workdir: Path) -> None:
    from coordinator.config import PredictiveScalingConfig

    store = await SqliteStore.open(workdir / "c.db")
    config = CoordinatorConfig(scaling=PredictiveScalingConfig(enabled=True, model=str(MODEL), period=0.05))
    c = Coordinator(config, store, _NoAgents(), TokenHashes(), None, time.time)
    try:
        await store.put_deployment(_record("d1"))
        await c.start()  # one SQLite store: it leads at once
        deadline = time.monotonic() + 10
        while len((await c.scaling.history("d1"))["decisions"]) < 4:  # two rounds of two components
            assert time.monotonic() < deadline, await c.scaling.history("d1")
            await asyncio.sleep(0.05)
        status = await c.scaling.status("d1")
        assert status["enabled"] and {d["action"] for d in status["components"].values()} == {"skip"}, status
        assert status["components"]["B"]["reason"] == "not enough history: 0 s of 300 needed", status
    finally:
        await c.close()


# ----- the daemon, as a real process


async def test_the_daemon_starts_with_scaling_enabled_and_refuses_a_bad_model(workdir: Path) -> None:
    from tests.harness.coordinator import CoordinatorPki, CoordinatorProcess, new_token

    pki = CoordinatorPki(workdir / "pki")
    token = new_token()
    broken = workdir / "broken.onnx"
    broken.write_bytes(b"\x08\x07 not an onnx model")
    bad = CoordinatorProcess(workdir, pki, overrides={"scaling": {"enabled": True, "model": str(broken)}})
    with pytest.raises(RuntimeError, match=r"exited with 2[\s\S]*scaling\.model .*broken\.onnx"):
        await bad.start()
    proc = CoordinatorProcess(
        workdir, pki, tokens=(token,), overrides={"scaling": {"enabled": True, "model": str(MODEL), "period": 0.2}}
    )
    await proc.start()
    try:
        async with proc.client(token=token) as ops:
            status, body = await ops.get("/v1/scaling/nope")
            assert (status, body["error"]["code"]) == (404, "deployment_not_found"), body
            status, body = await ops.get("/v1/scaling/nope/explain")
            assert status == 404, body
    finally:
        code = await proc.stop()
        assert code == 0, proc.logs()
