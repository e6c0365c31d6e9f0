"""The start history the layer predictor learns from: every start placed through the coordinator is
recorded with its workload signature, the layers it needed and which the host held already, and
survives a restart of the coordinator (SQLite)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.app import Coordinator
from coordinator.auth import TokenHashes
from coordinator.config import CoordinatorConfig
from coordinator.metrics import CoordinatorMetrics
from coordinator.model import Capacity, Host, Reservation, StartRecord
from coordinator.placement import Need, Placer
from coordinator.reservations import ReservationService
from coordinator.sqlite_store import SqliteStore
from coordinator.starts import ContainerStarts
from coordinator.warm import WarmService
from coordinator.warm_features import FleetStarts, HostStarts, Start, image_repository
from coordinator.warm_predictor import LayerPredictor, released
from coordinator.waste_control import ControlLimits
from core.errors import ConfigError, InvalidRequest
from core.workloads import WorkloadSignature, check_signature_id, of_start
from tests.harness.coordinator import NoAgents

SHIPPED = Path(__file__).resolve().parent.parent / "models" / "prefetch" / "prefetch.onnx"
GiB = 1 << 30
MB = 1_000_000
BASE, MID, TOP = ("sha256:" + c * 64 for c in "abc")
LAYERS = {BASE: 200 * MB, MID: 50 * MB, TOP: 10 * MB}


class CreatingAgents(NoAgents):
    """The agent client's create, answered as an agent would (the rest still refuses)."""

    def __init__(self) -> None:
        self.created: list[tuple[str, dict[str, Any]]] = []

    async def create_container(self, host: Host, spec: dict[str, Any], within: float) -> dict[str, Any]:
        self.created.append((host.name, spec))
        return {"id": spec["id"], "image": spec.get("image", ""), "state": "running"}


@pytest.fixture
async def store(workdir: Path) -> AsyncIterator[SqliteStore]:
    s = await SqliteStore.open(workdir / "c.db")
    try:
        yield s
    finally:
        await s.close()


async def test_a_placed_start_is_recorded_with_its_signature_hits_and_misses(store: SqliteStore, workdir: Path) -> None:
    await store.register_host(Host(name="h1", capacity=Capacity(4000, 4 * GiB, 0), layer_digests=(BASE, MID)))
    config = CoordinatorConfig()
    agents = CreatingAgents()
    reservations = ReservationService(store, agents, config, lambda: 1000.0, CoordinatorMetrics())
    placer = Placer(store, reservations, config.placement, lambda: 0.5, lambda: 1000.0)
    metrics = CoordinatorMetrics()
    warm = WarmService(store, LayerPredictor.load(SHIPPED), lambda: 1300.0, metrics)
    starts = ContainerStarts(
        store, placer, reservations, agents, 5.0, clock=lambda: 1234.5, history=(10, 3600.0), on_recorded=warm.started
    )
    spec = {"id": "c1", "image": "registry.test/app:1", "args": ["serve"], "labels": {"ferryman.io/class": "service"}}
    await starts.start(spec, Need(Capacity(500, GiB, 0), LAYERS))
    [record] = await store.starts("h1")
    signature = of_start("image:registry.test/app:1", ["serve"], {"ferryman.io/class": "service"})
    assert record == StartRecord(
        host="h1",
        ts=1234.5,
        signature=signature.id,
        layers=(BASE, MID, TOP),
        hits=(BASE, MID),
        workload_class="service",
        source="image:registry.test/app:1",
        sizes=(200 * MB, 50 * MB, 10 * MB),
    )
    assert record.misses == (TOP,) and record.to_dict()["misses"] == [TOP]
    # the served predictor learned the start at once: the host's layers are its candidates
    predicted = await warm.predict("h1")
    assert {p.digest for p in predicted} == set(LAYERS) and warm.model_version.startswith("warm-")
    assert await warm.predict("h9") == []
    sample = metrics.registry.get_sample_value
    assert sample("ferryman_coordinator_starts_total", {"result": "partial"}) == 1
    assert sample("ferryman_coordinator_start_layers_total", {"kind": "hit"}) == 2
    assert sample("ferryman_coordinator_start_layers_total", {"kind": "miss"}) == 1
    assert sample("ferryman_coordinator_warm_model_info", {"version": warm.model_version}) == 1
    await store.close()
    reopened = await SqliteStore.open(workdir / "c.db")
    try:
        assert await reopened.starts() == [record]
        assert await reopened.starts(since=1300.0) == []
        # a restarted coordinator rebuilds the same state from the store
        again = WarmService(reopened, LayerPredictor.load(SHIPPED), lambda: 1300.0)
        assert await again.seed() == 1
        assert await again.predict("h1") == predicted
    finally:
        await reopened.close()
    assert WarmService.load_model("") is None
    with pytest.raises(ConfigError, match=r"cannot load the layer predictor .*absent\.onnx"):
        WarmService.load_model(str(workdir / "absent.onnx"))  # configured but unusable: no start


def test_a_signature_from_the_wire_is_checked() -> None:
    sig = of_start("composition:web", [], {"team": "a"}, "service")
    assert WorkloadSignature.from_storage({**sig.for_storage(), "id": sig.id}) == sig
    for bad, message in (
        ({"source": "web"}, "signature.source"),
        ({"source": "image:a", "command": "run"}, "signature.command"),
        ({"source": "image:a", "labels": {"a": 1}}, "signature.labels"),
        ({"source": "image:a", "extra": 1}, "unknown fields"),
        ({**sig.for_storage(), "id": "sig-0000000000000000"}, "does not match"),
    ):
        with pytest.raises(InvalidRequest, match=message):
            WorkloadSignature.from_storage(bad)
    assert check_signature_id(sig.id) == sig.id
    with pytest.raises(InvalidRequest, match="invalid signature id"):
        check_signature_id("sig-XYZ")


def test_the_history_state_learns_chains_crons_and_the_fleet() -> None:
    fleet, host = FleetStarts(), HostStarts()
    a, b = ("sha256:" + "1" * 64,), ("sha256:" + "2" * 64, "sha256:" + "3" * 64)
    for i in range(10):  # a -> b, every hour
        host.add(Start(i * 3600.0, "sig-000000000000000a", a), fleet)
        host.add(Start(i * 3600.0 + 60, "sig-000000000000000b", b), fleet)
    now = 9 * 3600.0 + 3000
    X = host.features(now, [*a, *b, "sha256:" + "9" * 64], fleet)
    rows = dict(zip(("a", "b1", "b2", "unknown"), X, strict=True))
    assert list(X[:, 7]) == [1.0, 0.0, 0.0, 0.0]  # on this host, after b comes a
    assert list(X[:, 8]) == [1.0, 0.0, 0.0, 0.0]  # and in the fleet (this host is all of it)
    assert rows["a"][6] == pytest.approx(3000 / 3600.0, rel=1e-3)  # an hourly cron, due in 10 minutes
    assert rows["a"][0] == pytest.approx(0.4) and rows["b1"][0] == pytest.approx(0.6)  # of the last 5 starts
    assert rows["unknown"][0] == 0.0 and np.isnan(rows["unknown"][6])
    assert host.candidates(now, fleet) == [*a, *b]


def test_a_release_seen_in_the_fleet_carries_the_old_image_s_score_to_the_new_layers() -> None:
    fleet, here, there = FleetStarts(), HostStarts(), HostStarts()
    base, old_app, new_app = ("sha256:" + c * 64 for c in "abc")
    v1, v2, other = "sig-00000000000000a1", "sig-00000000000000a2", "sig-00000000000000b1"
    here.add(Start(0.0, v1, (base, old_app), "image:registry.test/app:v1"), fleet)
    # the same image under another command is another signature, not a release
    there.add(Start(60.0, other, (base, old_app), "image:registry.test/app:v1"), fleet)
    assert fleet.releases == {}
    scored = {base: 0.5, old_app: 0.7}
    assert released(scored, here, fleet) == scored
    there.add(Start(120.0, v2, (base, new_app), "image:registry.test/app:v2"), fleet)
    assert fleet.releases == {v1: v2}  # the first signature of the old image: what the new one replaces
    # the new layer takes the old layer's score; the old one, which only the old image needed, goes
    assert released(scored, here, fleet) == {base: 0.5, new_app: 0.7}
    assert image_repository("image:registry.test:5000/team/app@sha256:" + "d" * 64) == "registry.test:5000/team/app"
    assert image_repository("composition:shop") == ""


class WarmingAgents(CreatingAgents):
    def __init__(self) -> None:
        super().__init__()
        self.warmed: list[tuple[str, str, str, float, str]] = []

    async def hold_reservation(self, host: Host, reservation: Reservation) -> bool:
        return True

    async def release_reservation(self, host: Host, reservation_id: str) -> None:
        pass

    async def warm_layer(
        self, host: Host, digest: str, ref: str, ttl: float, model: str, within: float
    ) -> dict[str, Any]:
        self.warmed.append((host.name, digest, ref, ttl, model))
        return {"digest": digest, "ref": ref, "kept": digest in host.layer_digests}


async def test_a_warming_round_asks_the_agent_for_the_predicted_layers(store: SqliteStore) -> None:
    now = [10_000.0]
    config = CoordinatorConfig()
    await store.register_host(
        Host(name="h1", capacity=Capacity(4000, 64 * GiB, 0), layer_digests=(BASE,), api_url="https://h1")
    )
    agents = WarmingAgents()
    reservations = ReservationService(store, agents, config, lambda: now[0], CoordinatorMetrics())
    placer = Placer(store, reservations, config.placement, lambda: 0.5, lambda: now[0])
    warm = WarmService(store, LayerPredictor.load(SHIPPED), lambda: now[0])
    starts = ContainerStarts(
        store, placer, reservations, agents, 5.0, clock=lambda: now[0], on_recorded=warm.started, warming=warm.warming
    )
    spec = {"image": "registry.test/app:1", "args": ["batch"]}
    for i in range(12):  # the same batch job every five minutes
        await starts.start({**spec, "id": f"c{i}"}, Need(Capacity(100, GiB, 0), LAYERS))
        now[0] += 300.0
    warm_config = dataclasses.replace(config.warm, period=60.0)
    limits = ControlLimits()
    # the host holds only BASE (its registration says so): the other two are warmed, under the model's lease
    asked = await warm.round(agents, warm_config, limits, busy_hosts=set())
    assert sorted(asked["h1"]) == sorted([MID, TOP]), asked
    lease = warm.predictor.info.lease if warm.predictor else 0
    assert {(d, ref, ttl) for _, d, ref, ttl, _ in agents.warmed} == {
        (MID, "registry.test/app:1", lease),
        (TOP, "registry.test/app:1", lease),
    }
    assert all(model == warm.model_version for *_, model in agents.warmed)
    assert warm.warming("h1", now[0]) == {MID, TOP}
    # asked once: not again while the warms are in flight; and a migrating host gets none
    assert (await warm.round(agents, warm_config, limits, busy_hosts=set())).get("h1") == []
    assert await warm.round(agents, warm_config, limits, busy_hosts={"h1"}) == {}
    # the next start finds them: hits, and warm hits
    await store.register_host(
        Host(name="h1", capacity=Capacity(4000, 64 * GiB, 0), layer_digests=(BASE, MID, TOP), api_url="https://h1")
    )
    await starts.start({**spec, "id": "c-next"}, Need(Capacity(100, GiB, 0), LAYERS))
    last = (await store.starts("h1"))[-1]
    assert set(last.warm_hits) == {MID, TOP} and last.misses == ()
    assert warm.warming("h1", now[0]) == set()


async def test_a_warming_round_keeps_the_predicted_layers_a_host_holds(store: SqliteStore) -> None:
    """With `[warm] keep_bytes`, the predicted layers the host holds are kept under the lease (the
    agent takes the lease, fetches nothing) within that room, highest P first; not asked again while
    kept, and counted apart from warms."""
    now = [10_000.0]
    config = CoordinatorConfig()
    await store.register_host(
        Host(name="h1", capacity=Capacity(4000, 64 * GiB, 0), layer_digests=(BASE, MID), api_url="https://h1")
    )
    agents = WarmingAgents()
    metrics = CoordinatorMetrics()
    reservations = ReservationService(store, agents, config, lambda: now[0], metrics)
    placer = Placer(store, reservations, config.placement, lambda: 0.5, lambda: now[0])
    warm = WarmService(store, LayerPredictor.load(SHIPPED), lambda: now[0], metrics)
    starts = ContainerStarts(
        store, placer, reservations, agents, 5.0, clock=lambda: now[0], on_recorded=warm.started, warming=warm.warming
    )
    spec = {"image": "registry.test/app:1", "args": ["batch"]}
    for i in range(12):  # the same batch job every five minutes
        await starts.start({**spec, "id": f"c{i}"}, Need(Capacity(100, GiB, 0), LAYERS))
        now[0] += 300.0
    limits = ControlLimits()
    # room for MID, not BASE as well: MID kept, TOP (not held) warmed
    asked = await warm.round(agents, dataclasses.replace(config.warm, period=60.0, keep_bytes=100 * MB), limits, set())
    assert asked["h1"] == [MID, TOP], asked
    assert set(warm.warms["h1"].kept) == {MID} and warm.warming("h1", now[0]) == {TOP}
    sample = metrics.registry.get_sample_value
    assert sample("ferryman_coordinator_warm_bytes_total", {"outcome": "kept"}) == LAYERS[MID]
    # without keep_bytes (the default), none: held layers are neither kept nor warmed
    again = await warm.round(agents, dataclasses.replace(config.warm, period=60.0), limits, set())
    assert again["h1"] == []
    await starts.start({**spec, "id": "c-next"}, Need(Capacity(100, GiB, 0), LAYERS))
    assert warm.warms["h1"].kept == {}
    assert sample("ferryman_coordinator_warm_bytes_total", {"outcome": "kept_used"}) == LAYERS[MID]


async def test_a_start_goes_where_its_layers_were_warmed(workdir: Path) -> None:
    """Placement counts a landed warm as the layer held there before the host's next registration
    says so: the start goes to the host that was warmed, not to one that would fetch the layers again."""
    now = [10_000.0]
    config = CoordinatorConfig(database=str(workdir / "c.db"))
    store = await SqliteStore.open(config.database)
    agents = WarmingAgents()
    c = Coordinator(config, store, agents, TokenHashes(), None, lambda: now[0], LayerPredictor.load(SHIPPED))
    try:
        for name in ("h1", "h2"):  # the same but for the name: h1 wins a tie
            await store.register_host(
                Host(name=name, capacity=Capacity(4000, 64 * GiB, 0), layer_digests=(BASE,), api_url=f"https://{name}")
            )
        need = Need(Capacity(100, GiB, 0), LAYERS)
        before = await c.placer.place_start(need, "before any warm")
        assert before.chosen.host == "h1"
        await c.reservations.release(before.reservation.id)
        for _ in range(12):  # h2 ran the same batch job every five minutes
            c.warm.started(
                StartRecord(
                    host="h2",
                    ts=now[0],
                    signature="sig-batch",
                    layers=tuple(LAYERS),
                    sizes=tuple(LAYERS.values()),
                    hits=tuple(LAYERS),
                    source="image:registry.test/app:1",
                )
            )
            now[0] += 300.0
        asked = await c.warm.round(agents, dataclasses.replace(config.warm, period=60.0), ControlLimits(), set())
        assert sorted(asked["h2"]) == sorted([MID, TOP]) and not asked.get("h1"), asked
        assert c.warm.warmed_on(MID, now[0]) == ["h2"] and c.warm.warmed_on(BASE, now[0]) == []
        after = await c.placer.place_start(need, "after the warm")
        assert after.chosen.host == "h2", after.candidates
        # once the lease ends unused, the warm no longer counts
        now[0] += 2 * (c.warm.predictor.info.lease if c.warm.predictor else 0)
        assert c.warm.warmed_on(MID, now[0]) == []
    finally:
        await c.close()
