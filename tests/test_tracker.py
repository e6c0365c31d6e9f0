"""The coordinator's layer tracker: the index (pure), its API on a real coordinator process, and the
agent's directory falling back to the static [[peers]] when the tracker does not answer.

The fleet-level behaviour (pulls that find their peers through the tracker alone) is in
tests/test_peer_sharing.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.images.directory import TrackedPeers
from agent.metrics import AgentMetrics
from agent.sharing.client import Peer
from agent.telemetry.tracker import TrackerUnavailable
from coordinator.tracker import Holding, LayerTracker
from proto.ferryman.v1 import fleet_pb2 as pb
from tests.harness.coordinator import CoordinatorPki, CoordinatorProcess, registration, sample

A = "sha256:" + "a" * 64
B = "sha256:" + "b" * 64
C = "sha256:" + "c" * 64


# ----- the index


def test_registrations_replace_what_a_host_holds() -> None:
    t = LayerTracker(fetching_ttl=60)
    t.registered("h1", [A, B])
    t.registered("h2", [B])
    assert t.holders(B, now=0) == [Holding("h1", True), Holding("h2", True)]
    t.registered("h1", [C])  # evicted A and B, pulled C
    assert t.holders(A, now=0) == [] and t.holders(B, now=0) == [Holding("h2", True)]
    assert t.holders(C, now=0) == [Holding("h1", True)]
    assert t.digests() == 2


def test_fetching_hints_expire_unless_a_registration_confirms_them() -> None:
    t = LayerTracker(fetching_ttl=60)
    t.registered("h1", [A])
    t.announced("h2", now=100, fetching=[A, B])
    t.announced("h3", now=100, fetching=[B])
    # Complete holders first, then the hosts still fetching.
    assert t.holders(A, now=101) == [Holding("h1", True), Holding("h2", False)]
    t.registered("h2", [A, B])  # h2 finished both
    assert t.holders(B, now=101) == [Holding("h2", True), Holding("h3", False)]
    assert t.holders(B, now=161) == [Holding("h2", True)]  # h3 went quiet: no longer named
    t.announced("h2", now=170, dropped=[A])
    assert t.holders(A, now=170) == [Holding("h1", True)]
    t.forget("h1")
    assert t.holders(A, now=170) == [] and t.digests() == 1


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["register", "fetch", "hold", "drop", "forget"]),
            st.sampled_from(["h1", "h2", "h3"]),
            st.lists(st.sampled_from([A, B, C]), max_size=3),
        ),
        max_size=30,
    )
)
def test_the_index_agrees_with_a_simple_model(events: list[tuple[str, str, list[str]]]) -> None:
    """Whatever the order of registrations and announcements, a host is named complete exactly for
    what it last registered or announced held, and fetching only for what it started since."""
    t = LayerTracker(fetching_ttl=1e9)
    held: dict[str, set[str]] = {}
    fetching: dict[str, set[str]] = {}
    for kind, host, digests in events:
        if kind == "register":
            held[host] = set(digests)
            fetching[host] = fetching.get(host, set()) - set(digests)
            t.registered(host, digests)
        elif kind == "fetch":
            fetching.setdefault(host, set()).update(set(digests) - held.get(host, set()))
            t.announced(host, 0, fetching=digests)
        elif kind == "hold":
            held.setdefault(host, set()).update(digests)
            fetching[host] = fetching.get(host, set()) - set(digests)
            t.announced(host, 0, holding=digests)
        elif kind == "drop":
            held[host] = held.get(host, set()) - set(digests)
            fetching[host] = fetching.get(host, set()) - set(digests)
            t.announced(host, 0, dropped=digests)
        else:
            held.pop(host, None)
            fetching.pop(host, None)
            t.forget(host)
    for digest in (A, B, C):
        expected = [Holding(h, True) for h in sorted(held) if digest in held[h]]
        expected += [Holding(h, False) for h in sorted(fetching) if digest in fetching[h]]
        assert t.holders(digest, now=1) == expected


# ----- the API on a real coordinator


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> CoordinatorPki:
    return CoordinatorPki(tmp_path_factory.mktemp("tracker-pki"))


@pytest.fixture
async def coordinator(workdir: Path, pki: CoordinatorPki) -> AsyncIterator[CoordinatorProcess]:
    proc = CoordinatorProcess(workdir, pki, overrides={"tracker": {"fetching_ttl": 1.0}})
    await proc.start()
    try:
        yield proc
    finally:
        assert await proc.stop() == 0, proc.logs()


async def test_agents_announce_and_find_holders_through_the_api(
    coordinator: CoordinatorProcess, pki: CoordinatorPki
) -> None:
    for name, digests, address in (("h1", [A, B], "10.0.0.1:7445"), ("h2", [B], "10.0.0.2:7445"), ("h3", [A], "")):
        async with coordinator.client(pki.agent(name)) as agent:
            status, body = await agent.post(
                "/v1/register", registration(name, layer_digests=digests, blob_address=address)
            )
            assert status == 200 and body["blob_address"] == address, body
    async with coordinator.client(pki.agent("h2")) as h2:
        status, body = await h2.post("/v1/layers/announce", {"host": "h2", "fetching": [A, C]})
        assert status == 200, body
        status, body = await h2.post("/v1/layers/holders", {"digests": [A, B, C]})
        assert status == 200, body
        # h3 holds A but serves no blobs, h2 is the asker: neither is named to it.
        assert body["holders"] == [
            {"digest": A, "host": "h1", "blob_address": "10.0.0.1:7445", "complete": True},
            {"digest": B, "host": "h1", "blob_address": "10.0.0.1:7445", "complete": True},
        ]
        status, body = await h2.post("/v1/layers/holders", {})  # every host that serves blobs
        assert [(h["host"], h["digest"]) for h in body["holders"]] == [("h1", "")]
    async with coordinator.client(pki.operator("alice")) as ops:
        status, body = await ops.post("/v1/layers/holders", {"digests": [C]})
        assert status == 200 and body["holders"] == [
            {"digest": C, "host": "h2", "blob_address": "10.0.0.2:7445", "complete": False}
        ], body
        await asyncio.sleep(1.2)  # past [tracker] fetching_ttl: h2 never confirmed C
        status, body = await ops.post("/v1/layers/holders", {"digests": [C]})
        assert status == 200 and body.get("holders", []) == [], body
        # Only agents announce, and only for themselves.
        status, body = await ops.post("/v1/layers/announce", {"host": "h1", "fetching": [C]})
        assert status == 403, body
    async with coordinator.client(pki.agent("h1")) as h1:
        status, body = await h1.post("/v1/layers/announce", {"host": "h2", "fetching": [C]})
        assert status == 403, body
    async with coordinator.client(None) as anonymous:
        status, body = await anonymous.post("/v1/layers/holders", {"digests": [A]})
        assert status == 401, body
    async with coordinator.client(pki.operator("alice")) as ops:
        status, body = await ops.get("/metrics")
        assert 'ferryman_coordinator_tracker_lookups_total{result="hit"}' in body["text"]


@pytest.mark.parametrize(
    ("path", "payload", "fragment"),
    [
        ("/v1/layers/announce", {"host": "h1", "fetching": ["sha256:short"]}, "not a sha256 digest"),
        ("/v1/layers/announce", {"host": "h1", "fetching": "x"}, "LayerAnnouncement"),
        ("/v1/layers/holders", {"digests": [A, A]}, "named twice"),
        ("/v1/layers/holders", {"digests": ["md5:00"]}, "not a sha256 digest"),
        ("/v1/register", registration("h1", blob_address="no-port"), "expected host:port"),
        ("/v1/register", registration("h1", layer_digests=["sha256:XYZ"]), "not a sha256 digest"),
    ],
)
async def test_bad_tracker_input_is_refused_and_changes_nothing(
    coordinator: CoordinatorProcess, pki: CoordinatorPki, path: str, payload: dict[str, object], fragment: str
) -> None:
    async with coordinator.client(pki.agent("h1")) as h1:
        status, body = await h1.post("/v1/register", registration("h1", layer_digests=[B], blob_address="10.0.0.1:1"))
        assert status == 200
        status, body = await h1.post(path, payload)
        assert status == 400 and fragment in body["error"]["message"], body
    async with coordinator.client(pki.operator("alice")) as ops:
        status, body = await ops.post("/v1/layers/holders", {"digests": [A, B]})
        assert [(h["digest"], h["host"], h["complete"]) for h in body["holders"]] == [(B, "h1", True)], body


async def test_a_restarted_coordinator_names_holders_from_the_stored_registrations(
    workdir: Path, pki: CoordinatorPki
) -> None:
    proc = CoordinatorProcess(workdir, pki)
    await proc.start()
    try:
        async with proc.client(pki.agent("h1")) as h1:
            status, _ = await h1.post("/v1/register", registration("h1", layer_digests=[A], blob_address="10.0.0.1:1"))
            assert status == 200
    finally:
        assert await proc.stop() == 0
    again = CoordinatorProcess(workdir, pki)
    await again.start()
    try:
        async with again.client(pki.operator("alice")) as ops:
            status, body = await ops.post("/v1/layers/holders", {"digests": [A]})
            assert status == 200 and [h["host"] for h in body["holders"]] == ["h1"], body
    finally:
        assert await again.stop() == 0


# ----- the agent's directory


class FakeTracker:
    def __init__(self) -> None:
        self.down = False
        self.announced: list[str] = []

    async def holders(self, digests: Sequence[str]) -> list[pb.LayerHolder]:
        if self.down:
            raise TrackerUnavailable("connection refused")
        return [pb.LayerHolder(digest=A, host="h9", blob_address="10.0.0.9:7445", complete=True)]

    async def announce(self, fetching: Sequence[str] = (), dropped: Sequence[str] = ()) -> None:
        if self.down:
            raise TrackerUnavailable("connection refused")
        self.announced.extend(fetching)


async def test_the_directory_asks_the_tracker_and_falls_back_to_the_static_peers() -> None:
    tracker, metrics = FakeTracker(), AgentMetrics()
    static = [Peer("h2", "10.0.0.2:7445"), Peer("h9", "10.0.0.9:9999")]
    directory = TrackedPeers(tracker, lambda: static, metrics)
    # The tracker's holders first; a static peer it also names is asked once, at the tracker's address.
    assert await directory.peers(A) == [Peer("h9", "10.0.0.9:7445"), Peer("h2", "10.0.0.2:7445")]
    await directory.fetching(B)
    assert tracker.announced == [B]
    tracker.down = True
    assert await directory.peers(A) == static
    await directory.fetching(C)  # never raises: a pull goes on without the tracker
    failed = metrics.tracker_calls.labels(call="holders", result="failed")._value.get()
    assert failed == 1


# ----- placing a new container by predicted time to running (coordinator/costs.py)


async def test_a_new_container_is_placed_where_its_layers_arrive_soonest(
    coordinator: CoordinatorProcess, pki: CoordinatorPki
) -> None:
    mb = 1_000_000
    # h1 holds A (200 MB) and serves it; h2 holds nothing but measured fast links; h3 holds all but
    # reported hard CPU pressure and a slow apply.
    hosts = {"h1": [A], "h2": [], "h3": [A, B, C]}
    costs = {
        "h1": {"registry_bytes_per_second": 10 * mb, "peer_bytes_per_second": 50 * mb},
        "h2": {
            "registry_bytes_per_second": 100 * mb,
            "peer_bytes_per_second": 1000 * mb,
            "apply_seconds_per_byte": 1e-9,
        },
        "h3": {"registry_bytes_per_second": 1 * mb, "apply_seconds_per_byte": 1e-6},
    }
    now = time.time()
    for name, digests in hosts.items():
        async with coordinator.client(pki.agent(name)) as agent:
            status, _ = await agent.post(
                "/v1/register", registration(name, layer_digests=digests, blob_address=f"10.0.0.{name[1]}:7445")
            )
            assert status == 200
            pushed = sample(now, layer_costs=costs[name], pressure={"cpu_some": 5.0})
            status, body = await agent.post("/v1/telemetry", {"host": name, "samples": [pushed]})
            assert status == 200 and body["accepted"] == 1, body
    need = {"capacity": {"cpu_millis": 500, "memory_bytes": 1 << 30}, "layers": {A: 200 * mb, B: 20 * mb, C: 5 * mb}}
    async with coordinator.client(pki.operator("alice")) as ops:
        status, body = await ops.post("/v1/placements", need)
        assert status == 201, body
        # h3 needs no bytes at all: the start alone. h2 gets all 225 MB from peers at 1000 MB/s, A (the
        # lowest) last, then applies it and the two above it at the rate it measured (under its CPU
        # pressure already), then starts at the default 0.15 s x (1 + pressure): 0.61 s. h1 gets 25 MB
        # from the peer h3 at 50 MB/s and applies them at the default cost.
        assert [c["host"] for c in body["candidates"]] == ["h3", "h2", "h1"], body["candidates"]
        assert body["host"] == "h3" and body["reservation"]["host"] == "h3"
        h2 = body["candidates"][1]
        assert h2["bytes_from_peers"] == 225 * mb and h2["bytes_from_registry"] == 0 and h2["measured"]
        assert h2["seconds"] == pytest.approx(0.225 + 0.225 + 0.15 * 1.05, abs=0.01)
        status, decisions = await ops.get("/v1/decisions")
        assert [d["kind"] for d in decisions["decisions"]][:1] == ["place"], decisions
        # Bad input: nothing reserved.
        for bad, code, fragment in (
            ({**need, "layers": {"sha256:nope": 1}}, 400, "not a sha256 digest"),
            ({"capacity": need["capacity"]}, 400, "layers"),
            ({**need, "capacity": {"cpu_millis": -1, "memory_bytes": 1}}, 400, "cpu_millis"),
            ({**need, "capacity": {"cpu_millis": 500, "memory_bytes": 1 << 50}}, 409, "h1: insufficient capacity"),
        ):
            status, body = await ops.post("/v1/placements", bad)
            assert status == code and fragment in body["error"]["message"], (bad, body)
        _, reservations = await ops.get("/v1/reservations")
        assert len(reservations["reservations"]) == 1
