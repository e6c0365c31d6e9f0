"""Leader election on a real etcd: the role table, one leader among three, failover and fencing."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from coordinator.etcd.election import Election
from coordinator.etcd.kv import EtcdKV
from coordinator.etcd.store import EtcdStore
from coordinator.leadership import (
    MARGIN,
    Event,
    IllegalLeadershipEvent,
    NotLeader,
    Role,
    acting_deadline,
    next_role,
    renew_every,
    takes_pushes,
)
from coordinator.model import Capacity, Host, HostAdmin
from tests.conftest import require
from tests.harness.etcd import EtcdCluster

TTL = 2
REPO = Path(__file__).resolve().parent.parent


def test_the_role_table() -> None:
    assert next_role(Role.FOLLOWER, Event.WON) is Role.LEADER
    assert next_role(Role.LEADER, Event.RENEWED) is Role.LEADER
    assert next_role(Role.LEADER, Event.LOST) is Role.FOLLOWER
    assert next_role(Role.LEADER, Event.OTHER_LEADS) is Role.FOLLOWER
    for role, event in ((Role.FOLLOWER, Event.RENEWED), (Role.LEADER, Event.WON)):
        with pytest.raises(IllegalLeadershipEvent):
            next_role(role, event)
    # A keep-alive sent at 100 s and answered with 5 s left: act until 104 s (20 % margin).
    assert acting_deadline(100.0, 5) == pytest.approx(100.0 + 5 * (1 - MARGIN))
    assert renew_every(6) == 2.0


def test_who_takes_telemetry_pushes() -> None:
    assert takes_pushes("when_alone", None, 0)  # SQLite: one coordinator
    assert takes_pushes("when_alone", Role.FOLLOWER, 2)
    assert not takes_pushes("when_alone", Role.LEADER, 1)  # its core is the tick's
    assert takes_pushes("when_alone", Role.LEADER, 0)  # alone: nobody else would
    assert takes_pushes("always", Role.LEADER, 2)


@pytest.fixture
async def cluster(workdir: Path) -> AsyncIterator[EtcdCluster]:
    require("etcd")
    async with EtcdCluster(workdir / "etcd", size=1) as c:
        yield c


def _replica(cluster: EtcdCluster, name: str, **kw: object) -> Election:
    kv = EtcdKV(cluster.endpoints, timeout=1.0)
    return Election(kv, EtcdStore(kv, "/e/"), f"https://{name}:7543", ttl=TTL, **kw)  # type: ignore[arg-type]


async def _until(predicate: object, within: float) -> float:
    """Seconds until predicate() holds; AssertionError after `within`."""
    started = time.monotonic()
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() - started < within, f"not within {within}s"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def test_one_leader_among_three_and_a_clean_handover(cluster: EtcdCluster) -> None:
    replicas = [_replica(cluster, f"c{i}") for i in range(3)]
    stops = [asyncio.Event() for _ in replicas]
    tasks = [asyncio.create_task(r.run(s), name=f"election-{r.replica}") for r, s in zip(replicas, stops, strict=True)]
    try:
        await _until(lambda: sum(r.acting() for r in replicas) == 1, 5.0)
        leader = next(r for r in replicas if r.acting())
        await _until(lambda: all(r.leader == leader.replica for r in replicas), 5.0)
        # Each sees the others live (their replica keys, on their leases).
        urls = {r.replica for r in replicas}
        await _until(lambda: all(set(r.others_live) == urls - {r.replica} for r in replicas), 5.0)
        await asyncio.sleep(2 * TTL)  # renewals keep the same leader, and only one
        assert [r for r in replicas if r.acting()] == [leader]
        # The leader stops cleanly: it revokes its lease, the next campaign elects another.
        i = replicas.index(leader)
        stops[i].set()
        await tasks[i]
        assert not leader.acting()
        took = await _until(lambda: sum(r.acting() for r in replicas) == 1, renew_every(TTL) + 2.0)
        print(f"clean handover: {took:.2f} s")
        rest = [r for r in replicas if r is not leader]  # its key went with its revoked lease
        await _until(lambda: all(leader.replica not in r.others_live for r in rest), renew_every(TTL) + 2.0)
    finally:
        for s in stops:
            s.set()
        await asyncio.gather(*tasks)
        for r in replicas:
            await r.store.close()


async def test_a_replica_that_never_reads_the_others_is_still_counted(cluster: EtcdCluster) -> None:
    # leader_takes_pushes = "always" never asks who else is live: no read each round, but the
    # replica's own key is put, so a "when_alone" leader still knows it is not alone.
    reader, quiet = _replica(cluster, "r1"), _replica(cluster, "q1", reads_replicas=False)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(r.run(stop)) for r in (reader, quiet)]
    try:
        await _until(lambda: reader.others_live == (quiet.replica,), 5.0)
        await asyncio.sleep(2 * renew_every(TTL))
        assert quiet.others_live == ()
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        for r in (reader, quiet):
            await r.store.close()


_CRASHING_LEADER = """
import asyncio, sys
sys.path.insert(0, sys.argv[1])
from coordinator.etcd.election import Election
from coordinator.etcd.kv import EtcdKV
from coordinator.etcd.store import EtcdStore

async def main():
    kv = EtcdKV([sys.argv[2]], timeout=1.0)
    election = Election(kv, EtcdStore(kv, "/e/"), "https://doomed:7543", ttl=int(sys.argv[3]))
    while not election.acting():
        await election.step()
    print("leading", flush=True)
    await election.run(asyncio.Event())

asyncio.run(main())
"""


async def test_a_killed_leader_is_replaced_within_its_lease(cluster: EtcdCluster) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CRASHING_LEADER, str(REPO), cluster.endpoints[0], str(TTL),
        stdout=asyncio.subprocess.PIPE, env={**os.environ},
    )  # fmt: skip
    follower = _replica(cluster, "c1")
    try:
        assert proc.stdout is not None
        assert await asyncio.wait_for(proc.stdout.readline(), 20) == b"leading\n"
        await follower.step()
        assert follower.role is Role.FOLLOWER and follower.leader == "https://doomed:7543"
        proc.kill()
        await proc.wait()
        killed = time.monotonic()
        while not follower.acting():
            await follower.step()
            await asyncio.sleep(renew_every(TTL))
        took = time.monotonic() - killed
        print(f"killed leader replaced in {took:.2f} s (lease {TTL} s)")
        assert took <= TTL + renew_every(TTL) + 1.0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await follower.store.close()


async def test_a_replaced_leader_cannot_write(cluster: EtcdCluster) -> None:
    a, b = _replica(cluster, "a"), _replica(cluster, "b")
    try:
        await a.step()
        assert a.acting()
        await a.store.register_host(Host("h1", Capacity(1, 1, 0)))  # fenced by a's term, and a leads
        # a's lease ends behind its back (a long pause, a partition): b wins before a notices.
        assert a.term is not None
        await a._kv.revoke(a.term.lease)
        await b.step()
        assert b.acting()
        with pytest.raises(NotLeader) as err:
            await a.store.set_admin("h1", HostAdmin.DRAINING)
        assert err.value.leader == "https://b:7543"
        host = await b.store.get_host("h1")
        assert host is not None and host.admin is HostAdmin.ACTIVE
        await a.step()  # and a notices at its next round
        assert a.role is Role.FOLLOWER and a.leader == "https://b:7543"
    finally:
        await a.store.close()
        await b.store.close()


async def test_a_leader_cut_off_from_etcd_stops_acting_by_its_deadline(cluster: EtcdCluster) -> None:
    a = _replica(cluster, "a")
    try:
        await a.step()
        assert a.acting()
        renewed = time.monotonic()
        await a.step()
        await cluster.members[0].kill()
        while a.acting():
            await a.step()  # every round fails: no member answers
            await asyncio.sleep(0.05)
        took = time.monotonic() - renewed
        print(f"cut-off leader stopped acting {took:.2f} s after its last renewal")
        await a.step()  # the round after the deadline turns it into a follower (on_change is told)
        assert a.role is Role.FOLLOWER
        assert took <= TTL * (1 - MARGIN) + 1.5  # the deadline, plus one failing round's timeout
    finally:
        await a.store.close()


async def test_a_leader_whose_loop_is_blocked_keeps_its_lease(cluster: EtcdCluster) -> None:
    """The rounds run on a thread of their own: a main loop held longer than the lease (a burst of
    handshakes, a long tick) neither loses the lead nor writes unfenced."""
    kv = EtcdKV(cluster.endpoints, timeout=1.0)
    store = EtcdStore(kv, "/e/")
    changes: list[Role] = []
    leader = Election(kv.copy(), store, "https://a:7543", ttl=TTL, on_change=lambda role, term: changes.append(role))
    stop = asyncio.Event()
    rounds = asyncio.create_task(leader.run_in_thread(stop), name="election-a")
    try:
        await _until(leader.acting, 5.0)
        term = leader.term
        assert term is not None and changes == [Role.LEADER]
        time.sleep(1.5 * TTL)  # the main loop blocked: no keep-alive could run on it
        entry = await kv.get(store.leader_key)
        assert entry is not None and entry.mod_revision == term.revision, "the lease expired during the block"
        assert leader.acting() and leader.term == term
        await store.register_host(Host("h1", Capacity(1, 1, 0)))  # fenced by the same term, and it holds
        assert changes == [Role.LEADER]
    finally:
        stop.set()
        await rounds
    try:
        assert not leader.acting() and leader.role is Role.FOLLOWER and changes == [Role.LEADER, Role.FOLLOWER]
        assert await kv.get(store.leader_key) is None  # resigned: the lease revoked on the way out
    finally:
        await store.close()
