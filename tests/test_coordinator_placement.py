"""Placement: the pure scoring, and the Placer racing against the real SQLite store."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.config import CoordinatorConfig, PlacementConfig
from coordinator.costs import LATENCY_MAX_PIPELINE, LEARNED_MAX_AGE, CostBook, Rates, time_to_running
from coordinator.metrics import CoordinatorMetrics
from coordinator.model import (
    Capacity,
    ContainerUsage,
    Host,
    HostAdmin,
    HostHealth,
    InsufficientCapacity,
    NoTarget,
    Prediction,
    Reservation,
)
from coordinator.placement import Candidate, Need, Placer, by_time, exclusion, pull_fraction, rank
from coordinator.reservations import ReservationService
from coordinator.sqlite_store import SqliteStore
from coordinator.starts import OLD_AGENT_REFUSAL, ContainerStarts
from coordinator.store import TelemetryUpdate
from core.errors import InvalidRequest
from tests.harness.coordinator import NoAgents

GiB = 1 << 30
WEIGHTS = PlacementConfig()
NEED = Need(Capacity(500, GiB, 0))


def _cand(name: str, *, free_mem: int = 3 * GiB, risk: float | None = None, **host: Any) -> Candidate:
    h = Host(name=name, capacity=Capacity(4000, 4 * GiB, 100 * GiB), **host)
    return Candidate(h, Capacity(4000, free_mem, 100 * GiB), risk)


def test_unfit_and_unhealthy_hosts_are_never_targets() -> None:
    threshold = 0.5
    cases = {
        "suspect": _cand("a", health=HostHealth.SUSPECT),
        "down": _cand("b", health=HostHealth.DOWN),
        "draining": _cand("c", admin=HostAdmin.DRAINING),
        "drained": _cand("d", admin=HostAdmin.DRAINED),
        "drain risk 0.50 >= 0.50": _cand("e", risk=0.5),
        "insufficient capacity": _cand("f", free_mem=GiB - 1),
        "excluded": _cand("g"),
    }
    for reason, cand in cases.items():
        assert exclusion(cand, NEED, threshold, exclude={"g"}) == reason
    assert rank(list(cases.values()), NEED, WEIGHTS, threshold, exclude={"g"}) == []
    assert exclusion(_cand("ok", risk=0.49, free_mem=GiB), NEED, threshold, ()) is None


def test_scoring_prefers_room_low_risk_held_layers_and_low_pressure() -> None:
    roomy, tight = _cand("roomy", free_mem=4 * GiB), _cand("tight", free_mem=GiB + GiB // 2)
    assert [s.host for s in rank([tight, roomy], NEED, WEIGHTS, 0.9)] == ["roomy", "tight"]

    safe, risky = _cand("safe", risk=0.05), _cand("risky", risk=0.6)
    assert [s.host for s in rank([risky, safe], NEED, WEIGHTS, 0.9)] == ["safe", "risky"]

    layers = {"sha256:big": 900 << 20, "sha256:small": 100 << 20}
    need = Need(NEED.capacity, layers=layers)
    has_big = _cand("has-big", layer_digests=("sha256:big",))
    has_small = _cand("has-small", layer_digests=("sha256:small",))
    assert pull_fraction(has_big.host, need) == pytest.approx(0.1)
    assert pull_fraction(has_small.host, need) == pytest.approx(0.9)
    assert [s.host for s in rank([has_small, has_big], need, WEIGHTS, 0.9)] == ["has-big", "has-small"]

    # Without layer sizes, a host already running the image counts as holding it.
    runs = _cand("runs", containers=(ContainerUsage(id="x", image="busybox"),))
    idle = _cand("idle")
    assert [s.host for s in rank([idle, runs], Need(NEED.capacity, image="busybox"), WEIGHTS, 0.9)] == ["runs", "idle"]

    calm, stalled = _cand("calm", pressure={"io_some": 1.0}), _cand("stalled", pressure={"memory_some": 60.0})
    assert [s.host for s in rank([stalled, calm], NEED, WEIGHTS, 0.9)] == ["calm", "stalled"]
    # Weights decide: with pressure ignored, the tie breaks by name.
    no_pressure = PlacementConfig(pressure=0.0)
    assert [s.host for s in rank([stalled, calm], NEED, no_pressure, 0.9)] == ["calm", "stalled"]
    assert rank([stalled], NEED, no_pressure, 0.9)[0].score == rank([calm], NEED, no_pressure, 0.9)[0].score


@pytest.fixture
async def store(workdir: Path) -> AsyncIterator[SqliteStore]:
    s = await SqliteStore.open(workdir / "c.db")
    try:
        yield s
    finally:
        await s.close()


def _placer(store: SqliteStore, threshold: float = 0.5, now: float = 1000.0) -> Placer:
    config = CoordinatorConfig()
    reservations = ReservationService(store, NoAgents(), config, lambda: now, CoordinatorMetrics())
    return Placer(store, reservations, config.placement, lambda: threshold, lambda: now)


async def test_two_hundred_concurrent_placements_never_overbook(store: SqliteStore) -> None:
    # Different sizes, so hosts fill unevenly and the best-scored host changes as they fill.
    for name, memory in (("h1", 8 * GiB), ("h2", 5 * GiB), ("h3", 3 * GiB), ("h4", 16 * GiB)):
        await store.register_host(Host(name=name, capacity=Capacity(64000, memory, 0)))
    await store.record_telemetry(TelemetryUpdate("h4", [], 1000.0, Capacity(0, 10 * GiB, 0), (), {}), 10, 100)
    await store.record_predictions([Prediction("h1", 999.0, 0.9, "v")])  # h1 is about to be drained
    placer = _placer(store)

    async def place(i: int) -> str | None:
        size = (GiB // 2) if i % 3 else GiB
        try:
            return (await placer.place(Need(Capacity(10, size, 0)), f"p{i}")).host
        except NoTarget:
            return None

    placed = await asyncio.gather(*(place(i) for i in range(200)))
    assert "h1" not in placed
    held: dict[str, int] = defaultdict(int)
    for r in await store.list_reservations(1000.0):
        held[r.host] += r.capacity.memory_bytes
    for host in await store.list_hosts():
        assert held[host.name] + host.used.memory_bytes <= host.capacity.memory_bytes
    # Everything that could fit did: what is left on each eligible host is below the smallest need.
    for name in ("h2", "h3", "h4"):
        assert (await store.free_capacity(name, 1000.0)).memory_bytes < GiB // 2
    assert sum(p is not None for p in placed) == len(await store.list_reservations(1000.0))


async def test_a_named_target_must_be_eligible(store: SqliteStore) -> None:
    await store.register_host(Host(name="h1", capacity=Capacity(4000, 4 * GiB, 0)))
    await store.register_host(Host(name="h2", capacity=Capacity(4000, 4 * GiB, 0)))
    await store.set_admin("h2", HostAdmin.DRAINING)
    placer = _placer(store)
    with pytest.raises(NoTarget, match="'h2' cannot be the target: draining"):
        await placer.place(NEED, "x", only="h2")
    with pytest.raises(NoTarget, match="'h9' cannot be the target: not registered"):
        await placer.place(NEED, "x", only="h9")
    reservation = await placer.place(NEED, "x", only="h1")
    assert reservation.host == "h1" and reservation.expires_at == 1000.0 + CoordinatorConfig().reservations.ttl


# ----- new containers: the least predicted time to running

MB = 1_000_000
BASE, MID, TOP = ("sha256:" + c * 64 for c in "abc")
LAYERS = {BASE: 200 * MB, MID: 50 * MB, TOP: 10 * MB}
SLOW = {"registry_bytes_per_second": 10 * MB, "peer_bytes_per_second": 100 * MB, "apply_seconds_per_byte": 1e-8}


def test_time_to_running_counts_each_missing_layer_at_its_cheapest_source() -> None:
    rates = Rates.of(SLOW, WEIGHTS)
    held_base = time_to_running("h1", {BASE}, LAYERS, {MID: ["h2"]}, rates, 0.0)
    # MID from the peer h2 (here at 0.5 s) while TOP comes from the registry (1 s); MID applied at
    # once (0.5 s), TOP once it is here and MID is applied (0.1 s), then the start.
    assert held_base.bytes_held == 200 * MB and held_base.bytes_from_peers == 50 * MB
    assert held_base.bytes_from_registry == 10 * MB and held_base.measured
    assert held_base.fetch_seconds == pytest.approx(1.0) and held_base.apply_seconds == pytest.approx(0.6)
    assert held_base.seconds == pytest.approx(max(0.5 + 0.5, 1.0) + 0.1 + WEIGHTS.start_seconds)
    # The host itself is no peer of its own; CPU pressure slows applying.
    cold = time_to_running("h2", set(), LAYERS, {BASE: ["h2"]}, rates, 0.5)
    assert cold.bytes_from_registry == 260 * MB and cold.apply_seconds == pytest.approx(2.6 * 1.5)
    assert not time_to_running("h3", set(), LAYERS, {}, Rates.of(None, WEIGHTS), 0.0).measured


def test_a_new_container_goes_where_it_runs_soonest_not_where_its_image_is_biggest() -> None:
    need = Need(Capacity(500, GiB, 0), LAYERS)
    # h1 holds the big base layer but is slow and loaded; h2 holds nothing, a peer (h1) has the base
    # and its links are fast; h3 is down.
    candidates = [
        _cand("h1", layer_digests=(BASE,), pressure={"cpu_some": 90.0}),
        _cand("h2"),
        _cand("h3", health=HostHealth.DOWN, layer_digests=(BASE, MID, TOP)),
    ]
    fast = {"registry_bytes_per_second": 100 * MB, "peer_bytes_per_second": 1000 * MB, "apply_seconds_per_byte": 1e-9}
    costs = {"h1": {**SLOW, "apply_seconds_per_byte": 5e-8}, "h2": fast}
    ranked, excluded = by_time(candidates, need, WEIGHTS, 0.5, lambda d: {"h1": True} if d == BASE else {}, costs.get)
    assert [b.host for b in ranked] == ["h2", "h1"] and excluded == {"h3": "down"}
    assert ranked[0].bytes_from_peers == 200 * MB and ranked[0].seconds < ranked[1].seconds


def test_a_cold_image_goes_beside_no_other_image_when_that_costs_little() -> None:
    """Nobody holds BASE: every host fetches it from the registry. h1 is a little faster (it holds
    a small layer of another image) but holds that other image; h2 holds nothing else: h2, as long as
    it is within the slack of the fastest."""
    other = "sha256:" + "9" * 64
    need = Need(Capacity(500, GiB, 0), {BASE: 200 * MB, TOP: 10 * MB})
    candidates = [_cand("h1", layer_digests=(TOP, other)), _cand("h2")]
    costs = {"h1": SLOW, "h2": SLOW}
    holders = {TOP: {"h1": True}}
    held = {"h1": {TOP, other}, "h2": set()}

    def ranked(weights: PlacementConfig) -> list[str]:
        out, _ = by_time(candidates, need, weights, 0.5, lambda d: holders.get(d, {}), costs.get, (), held.get)
        return [b.host for b in out]

    assert ranked(WEIGHTS) == ["h2", "h1"]
    assert ranked(PlacementConfig(affinity_slack=0.0)) == ["h1", "h2"]  # the fastest only
    # Past the slack the time decides: h2 would fetch far more.
    holders[BASE] = {"h1": True}
    held["h1"] |= {BASE}
    candidates[0] = _cand("h1", layer_digests=(TOP, other, BASE))
    assert ranked(WEIGHTS) == ["h1", "h2"]


def test_a_big_lower_layer_arriving_last_is_applied_after_it_arrives() -> None:
    """The layers of one source share its link: TOP (10 MB) is here after 2 s, BASE (200 MB) after
    21 s; BASE is applied (2 s) only then, and TOP above it after that: nothing of BASE's apply
    hides behind the fetch."""
    rates = Rates.of({**SLOW, "fetch_latency_seconds": 0.5}, WEIGHTS)
    cold = time_to_running("h1", set(), {BASE: 200 * MB, TOP: 10 * MB}, {}, rates, 0.0)
    assert cold.fetch_seconds == pytest.approx(0.5 + 21.0) and cold.apply_seconds == pytest.approx(2.1)
    assert cold.assembled_seconds == pytest.approx(21.5 + 2.0 + 0.1)
    assert cold.seconds == pytest.approx(23.6 + WEIGHTS.start_seconds)
    # Held above a missing layer: applied again (its snapshot has another parent), not fetched.
    above = time_to_running("h1", {TOP}, {BASE: 200 * MB, TOP: 10 * MB}, {}, rates, 0.0)
    assert above.bytes_held == 10 * MB and above.fetch_seconds == pytest.approx(20.5)
    assert above.seconds == pytest.approx(20.5 + 2.1 + WEIGHTS.start_seconds)
    # Held at the bottom: neither fetched nor applied.
    below = time_to_running("h1", {BASE}, {BASE: 200 * MB, TOP: 10 * MB}, {}, rates, 0.0)
    assert below.seconds == pytest.approx(0.5 + 1.0 + 0.1 + WEIGHTS.start_seconds)


DIGESTS = ["sha256:" + c * 64 for c in "0123456789"]


@given(
    sizes=st.lists(st.integers(0, 500 * MB), min_size=1, max_size=8),
    held_mask=st.lists(st.booleans(), min_size=8, max_size=8),
    peer_mask=st.lists(st.booleans(), min_size=8, max_size=8),
    registry=st.floats(1e6, 1e9),
    peer=st.floats(1e6, 1e10),
    per_byte=st.floats(1e-10, 1e-6),
    latency=st.floats(0.0, 5.0),
    pressure=st.floats(0.0, 1.0),
    extra=st.integers(0, 7),
)
def test_time_to_running_lies_between_overlap_and_sequence(
    sizes: list[int],
    held_mask: list[bool],
    peer_mask: list[bool],
    registry: float,
    peer: float,
    per_byte: float,
    latency: float,
    pressure: float,
    extra: int,
) -> None:
    """At least the longer of fetching and applying, at most both one after the other; holding one
    more layer never makes a start slower."""
    layers = dict(zip(DIGESTS, sizes, strict=False))
    held = {d for d, h in zip(layers, held_mask, strict=False) if h}
    holders = {d: ["h2"] for d, p in zip(layers, peer_mask, strict=False) if p}
    costs = {
        "registry_bytes_per_second": registry,
        "peer_bytes_per_second": peer,
        "apply_seconds_per_byte": per_byte,
        "fetch_latency_seconds": latency,
    }
    rates = Rates.of(costs, WEIGHTS)
    b = time_to_running("h1", held, layers, holders, rates, pressure)
    tolerance = 1e-9 * max(1.0, b.seconds)
    assert max(b.fetch_seconds, b.apply_seconds) + b.start_seconds <= b.seconds + tolerance
    assert b.seconds <= b.fetch_seconds + b.apply_seconds + b.start_seconds + tolerance
    assert b.bytes_held + b.bytes_from_peers + b.bytes_from_registry == sum(layers.values())
    more = held | {list(layers)[extra % len(layers)]}
    assert time_to_running("h1", more, layers, holders, rates, pressure).seconds <= b.seconds + tolerance


def test_a_spilled_container_goes_to_a_host_holding_no_other_image() -> None:
    """BASE's own host (h3) is full: h1 (holding another image's OTHER and the shared MID) and h4
    (holding nothing) both copy BASE from h3. h1 fetches a little less and measured faster peer
    fetches; h4 goes first, so h1's slots stay for OTHER's containers."""
    other = "sha256:" + "9" * 64
    need = Need(Capacity(500, GiB, 0), {MID: 8 * MB, BASE: 64 * MB, TOP: 2 * MB})
    candidates = [_cand("h1", layer_digests=(MID, other)), _cand("h4")]
    costs = {"h1": {**SLOW, "peer_bytes_per_second": 30 * MB}, "h4": {**SLOW, "peer_bytes_per_second": 14 * MB}}
    holders = {BASE: {"h3": True}, MID: {"h1": True, "h3": True}, TOP: {"h3": True}}
    held = {"h1": {MID, other}, "h4": set()}

    def ranked(weights: PlacementConfig) -> list[str]:
        out, _ = by_time(candidates, need, weights, 0.5, lambda d: holders.get(d, {}), costs.get, (), held.get)
        return [b.host for b in out]

    assert ranked(WEIGHTS) == ["h4", "h1"]
    assert ranked(PlacementConfig(spill_slack=0.0)) == ["h1", "h4"]  # by time alone
    # Where the fastest host holds the image, no copy is worth avoiding: it goes there.
    held["h1"] |= {BASE, TOP}
    candidates[0] = _cand("h1", layer_digests=(MID, other, BASE, TOP))
    assert ranked(WEIGHTS) == ["h1", "h4"]


class _FilledMeanwhile(ReservationService):
    """Refuses `full` as the store would once that host filled after the placer's reads."""

    def __init__(self, *args: Any, full: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.full = full

    async def reserve(
        self, host: str, capacity: Capacity, purpose: str, ttl: float | None = None, *, on_agent: bool = True
    ) -> Reservation:
        if host == self.full:
            raise InsufficientCapacity(f"{host} filled meanwhile")
        return await super().reserve(host, capacity, purpose, ttl, on_agent=on_agent)


async def test_a_refused_host_reorders_the_rest_around_the_next_fastest(store: SqliteStore) -> None:
    """h3 holds the image but filled since the placer read it: the container spills. Among the rest,
    the fastest is h1 (another image's host, measured fast peers); h4, empty, copies a little more:
    near it, and holding nothing else, it is reserved."""
    other = "sha256:" + "9" * 64
    layers = {MID: 8 * MB, BASE: 64 * MB, TOP: 2 * MB}
    held = {"h1": (MID, other), "h3": (MID, BASE, TOP), "h4": ()}
    for name, digests in held.items():
        await store.register_host(Host(name=name, capacity=Capacity(4000, 4 * GiB, 0), layer_digests=digests))
    config = CoordinatorConfig()
    reservations = _FilledMeanwhile(store, NoAgents(), config, lambda: 1000.0, CoordinatorMetrics(), full="h3")
    costs = {"h1": {**SLOW, "peer_bytes_per_second": 30 * MB}, "h4": {**SLOW, "peer_bytes_per_second": 14 * MB}}
    holders = {d: {h: True for h, ds in held.items() if d in ds} for d in layers}
    placer = Placer(
        store,
        reservations,
        config.placement,
        lambda: 0.5,
        lambda: 1000.0,
        holders=lambda d: holders.get(d, {}),
        costs=costs.get,
        held=lambda h: held[h],
    )
    placement = await placer.place_start(Need(Capacity(500, GiB, 0), layers), "spill")
    assert [b.host for b in placement.candidates] == ["h3", "h1", "h4"]
    assert placement.chosen.host == "h4" and placement.excluded == {"h3": "lost to a concurrent placement"}


class _OneRoundTrip(NoAgents):
    """Agents that take a placed start in its create alone (a hold or a release fails the test);
    the agents of `full` refuse the reservation the create carries, as a host filled meanwhile does."""

    def __init__(self, *full: str) -> None:
        self.full = full
        self.creates: list[tuple[str, dict[str, Any]]] = []

    async def create_container(
        self, host: Host, spec: dict[str, Any], within: float, start: bool = True
    ) -> dict[str, Any]:
        self.creates.append((host.name, spec))
        if host.name in self.full:
            raise InsufficientCapacity(f"agent {host.name}: insufficient_capacity")
        return {"id": spec["id"], "image": spec.get("image", ""), "state": "running"}


async def test_a_placed_start_is_one_create_and_a_refusing_agent_passes_it_on(store: SqliteStore) -> None:
    """The create carries the reservation (held by the agent for that request): no hold before it,
    no release after it. h1, fastest, refuses it (filled since its last report): its reservation is
    dropped and h2 runs the container; no reservation is left in the store."""
    for name, digests in (("h1", (BASE, MID)), ("h2", ())):
        await store.register_host(
            Host(name=name, capacity=Capacity(4000, 4 * GiB, 0), layer_digests=digests, api_url=f"https://{name}")
        )
    config = CoordinatorConfig()
    agents = _OneRoundTrip("h1")
    reservations = ReservationService(store, agents, config, lambda: 1000.0, CoordinatorMetrics())
    placer = Placer(store, reservations, config.placement, lambda: 0.5, lambda: 1000.0)
    starts = ContainerStarts(store, placer, reservations, agents, 5.0, clock=lambda: 1000.0)
    answer = await starts.start({"id": "c1", "image": "registry.test/app:1"}, Need(Capacity(500, GiB, 0), LAYERS))
    assert [(host, spec["reservation"]["host"]) for host, spec in agents.creates] == [("h1", "h1"), ("h2", "h2")]
    carried = agents.creates[1][1]["reservation"]
    assert carried["id"] == answer["placement"]["reservation"]["id"] and carried["capacity"]["memory_bytes"] == str(GiB)
    assert answer["placement"]["host"] == "h2" and answer["container"]["id"] == "c1"
    assert await store.list_reservations(1000.0) == []
    # Every host refusing: NoTarget, and still nothing held.
    with pytest.raises(NoTarget):
        await ContainerStarts(store, placer, reservations, _OneRoundTrip("h1", "h2"), 5.0).start(
            {"id": "c2", "image": "registry.test/app:1"}, Need(Capacity(500, GiB, 0), LAYERS)
        )
    assert await store.list_reservations(1000.0) == []


class _IdOnlyAgents(NoAgents):
    """Agents from before a create carried its reservation: they refuse one given whole, as such an
    agent's create does, and take the id of one they hold."""

    def __init__(self) -> None:
        self.held: set[str] = set()
        self.creates: list[Any] = []

    async def hold_reservation(self, host: Host, reservation: Reservation) -> bool:
        self.held.add(reservation.id)
        return True

    async def release_reservation(self, host: Host, reservation_id: str) -> None:
        self.held.discard(reservation_id)

    async def create_container(
        self, host: Host, spec: dict[str, Any], within: float, start: bool = True
    ) -> dict[str, Any]:
        given = spec["reservation"]
        self.creates.append(given)
        if not isinstance(given, str):
            raise InvalidRequest(f"agent {host.name}: create: {OLD_AGENT_REFUSAL}, got object")
        assert given in self.held, "created before its reservation was held"
        return {"id": spec["id"], "image": spec.get("image", ""), "state": "running"}


async def test_an_agent_from_before_scoped_reservations_still_starts_placed_containers(store: SqliteStore) -> None:
    """During a rolling upgrade (coordinator first) an older agent refuses the reservation in the
    create: the start holds it on that agent, creates by id, and releases it on both sides after."""
    await store.register_host(Host(name="h1", capacity=Capacity(4000, 4 * GiB, 0), api_url="https://h1"))
    config = CoordinatorConfig()
    agents = _IdOnlyAgents()
    reservations = ReservationService(store, agents, config, lambda: 1000.0, CoordinatorMetrics())
    placer = Placer(store, reservations, config.placement, lambda: 0.5, lambda: 1000.0)
    starts = ContainerStarts(store, placer, reservations, agents, 5.0, clock=lambda: 1000.0)
    answer = await starts.start({"id": "c1", "image": "registry.test/app:1"}, Need(Capacity(500, GiB, 0), LAYERS))
    assert answer["container"]["id"] == "c1"
    whole, by_id = agents.creates
    assert isinstance(whole, dict) and by_id == whole["id"]
    assert agents.held == set() and await store.list_reservations(1000.0) == []


def test_learned_overheads_are_forgotten_once_old() -> None:
    """Warm starts taught h1 a 0.8 s overhead on a busy machine; minutes later the load is gone:
    the old starts count no more (the default until it starts again), and the first new warm start
    sets it alone, not outvoted by four stale ones."""
    now = [0.0]
    book = CostBook(clock=lambda: now[0])
    warm = time_to_running("h1", set(LAYERS), LAYERS, {}, Rates.of(None, WEIGHTS), 0.0)
    for seconds in (0.8, 0.9, 0.7, 0.8):
        book.started("h1", seconds, warm)
        book.started("h2", seconds, warm)
    assert Rates.of(book.of("h1"), WEIGHTS).start_seconds == pytest.approx(0.8)
    now[0] = LEARNED_MAX_AGE + 1.0
    assert book.of("h1") is None and Rates.of(book.of("h1"), WEIGHTS).start_seconds == WEIGHTS.start_seconds
    book.started("h1", 0.3, warm)
    assert Rates.of(book.of("h1"), WEIGHTS).start_seconds == pytest.approx(0.3)
    # A host with nothing fresh of its own takes the fleet's fresh figures, not its own old ones.
    assert Rates.of(book.of("h2"), WEIGHTS).start_seconds == pytest.approx(0.3)


async def test_place_start_reserves_on_the_fastest_host_and_records_why(store: SqliteStore) -> None:
    for name, layers in (("h1", (BASE, MID)), ("h2", ())):
        await store.register_host(Host(name=name, capacity=Capacity(4000, 4 * GiB, 0), layer_digests=layers))
    config = CoordinatorConfig()
    reservations = ReservationService(store, NoAgents(), config, lambda: 1000.0, CoordinatorMetrics())
    placer = Placer(store, reservations, config.placement, lambda: 0.5, lambda: 1000.0, costs={"h1": SLOW}.get)
    placement = await placer.place_start(Need(Capacity(500, GiB, 0), LAYERS), "task 1")
    assert placement.chosen.host == "h1" and placement.reservation.host == "h1"
    assert [b.host for b in placement.candidates] == ["h1", "h2"]
    # A start that fetched teaches nothing about the start overhead (a wrong rate would pass for a
    # slow start) but the fetch overhead: what it took beyond the predicted pipeline and the start
    # (10 MB at 10 MB/s, applied in 0.1 s, start 0.15 s: 1.25 s more), once per start; one that
    # needed no layer is the overhead.
    book = CostBook()
    book.started("h2", 9.0, time_to_running("h2", set(), LAYERS, {}, Rates.of(None, WEIGHTS), 0.0))
    assert book.of("h2") is None, "a start predicted at the default rates teaches no latency"
    assert placement.chosen.layers_fetched == 1 and placement.chosen.seconds == pytest.approx(1.25)
    book.started("h1", 2.5, placement.chosen)
    assert book.of("h1") == {"fetch_latency_seconds": pytest.approx(1.25)}
    relearned = time_to_running(
        "h1", {BASE, MID}, LAYERS, {}, Rates.of({**SLOW, **(book.of("h1") or {})}, WEIGHTS), 0.0
    )
    assert relearned.seconds == pytest.approx(2.5) and relearned.latency_seconds == pytest.approx(1.25)
    warm = time_to_running("h1", set(LAYERS), LAYERS, {}, Rates.of(None, WEIGHTS), 0.0)
    for seconds in (0.8, 4.6, 0.7):  # one outlier (a stale view of the host's layers) does not set it
        book.started("h1", seconds, warm)
    assert Rates.of(book.of("h1"), WEIGHTS).start_seconds == pytest.approx(0.8)
    book.observe("h1", [(1.0, {"layer_costs": SLOW})])  # a new sample keeps what was learned
    assert Rates.of(book.of("h1"), WEIGHTS).start_seconds == pytest.approx(0.8)
    assert Rates.of(book.of("h1"), WEIGHTS).fetch_latency_seconds == pytest.approx(1.25)
    # A host that measured nothing yet takes the fleet's median.
    assert Rates.of(book.of("h9"), WEIGHTS).registry_bytes_per_second == SLOW["registry_bytes_per_second"]
    [decision] = await store.list_decisions()
    assert decision.kind == "place" and decision.host == "h1"
    assert "predicted" in decision.detail and "next h2" in decision.detail
    with pytest.raises(NoTarget, match="insufficient capacity"):
        await placer.place_start(Need(Capacity(500, 64 * GiB, 0), LAYERS), "too big")
    assert len(await store.list_reservations(1000.0)) == 1


def test_learned_figures_follow_the_hosts_cpu_pressure() -> None:
    """A warm start of 0.9 s and an apply rate measured at CPU pressure 0.8 are predicted at the
    pressure now: at 0.2, (1 + 0.2) / (1 + 0.8) of them; at 0.8 again, as measured."""
    book = CostBook()
    busy = {"pressure": {"cpu_some": 80.0}, "layer_costs": SLOW}
    book.observe("h1", [(1.0, busy)])
    warm = time_to_running("h1", set(LAYERS), LAYERS, {}, Rates.of(None, WEIGHTS), 0.0)
    book.started("h1", 0.9, warm)
    again = time_to_running("h1", set(LAYERS), LAYERS, {}, Rates.of(book.of("h1"), WEIGHTS), 0.8)
    assert again.seconds == pytest.approx(0.9)
    book.observe("h1", [(2.0, {"pressure": {"cpu_some": 20.0}})])
    calmer = time_to_running("h1", set(LAYERS), LAYERS, {}, Rates.of(book.of("h1"), WEIGHTS), 0.2)
    assert calmer.seconds == pytest.approx(0.9 * 1.2 / 1.8)
    # The apply rate the busy sample reported: 1e-8 s/B at 0.8, so 1.2 / 1.8 of it at 0.2.
    cold = time_to_running("h1", {BASE}, LAYERS, {}, Rates.of(book.of("h1"), WEIGHTS), 0.2)
    assert cold.apply_seconds == pytest.approx(60 * MB * 1e-8 * 1.2 / 1.8)


def test_a_long_fetch_teaches_no_fetch_overhead() -> None:
    """A base image's 26 s from the registry ran 3 s over: the rates' error, not a per-start cost; a
    10 MB fetch 0.4 s over its 1.1 s is."""
    book = CostBook()
    rates = Rates.of(SLOW, WEIGHTS)
    cold = time_to_running("h1", set(), LAYERS, {}, rates, 0.0)
    assert cold.assembled_seconds > LATENCY_MAX_PIPELINE
    book.started("h1", cold.seconds + 3.0, cold)
    assert book.of("h1") is None
    small = time_to_running("h1", {BASE, MID}, LAYERS, {}, rates, 0.0)
    book.started("h1", small.seconds + 0.4, small)
    assert book.of("h1") == {"fetch_latency_seconds": pytest.approx(0.4)}


def test_a_host_with_few_starts_borrows_the_fleets_newest() -> None:
    book = CostBook()
    warm = time_to_running("h1", set(LAYERS), LAYERS, {}, Rates.of(None, WEIGHTS), 0.0)
    for _ in range(4):
        book.started("h2", 0.2, warm)
    book.started("h1", 0.9, warm)  # one slow start of its own does not set it
    assert Rates.of(book.of("h1"), WEIGHTS).start_seconds == pytest.approx(0.2)
    for _ in range(3):
        book.started("h1", 0.9, warm)
    assert Rates.of(book.of("h1"), WEIGHTS).start_seconds == pytest.approx(0.9)


def test_a_starts_reported_costs_outrank_older_samples() -> None:
    """A start's answer carries the host's rates with its fetches in: the next prediction uses them,
    and a telemetry sample taken before then (while those fetches ran) does not replace them; a
    later sample does. Nonsense values are ignored."""
    book = CostBook()
    book.observe("h1", [(10.0, {"layer_costs": {"registry_bytes_per_second": 5e6}})])
    book.reported("h1", {"registry_bytes_per_second": 12e6, "peer_bytes_per_second": float("nan")}, 20.0)
    assert book.of("h1") == {"registry_bytes_per_second": 12e6}
    book.observe("h1", [(19.0, {"layer_costs": {"registry_bytes_per_second": 5e6}})])
    assert book.of("h1") == {"registry_bytes_per_second": 12e6}
    book.observe("h1", [(21.0, {"layer_costs": {"registry_bytes_per_second": 11e6}})])
    assert book.of("h1") == {"registry_bytes_per_second": 11e6}
    book.reported("h1", {"registry_bytes_per_second": -1, "start_seconds": 9.0, "apply_seconds_per_byte": True}, 30.0)
    assert book.of("h1") == {"registry_bytes_per_second": 11e6}
