"""The etcd store against three real members: a member lost, the quorum lost and given back.

The conformance cases (tests/test_store_conformance.py) run against one member; these are what only
a three-member cluster shows: the adapter moves to another endpoint when its member dies, a store
without a quorum refuses (EtcdUnavailable, 503) instead of deciding, and it carries on when the quorum
is back.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from coordinator.etcd.kv import Changes, Delete, EtcdError, EtcdKV, EtcdTls, EtcdUnavailable, without_quorum
from coordinator.etcd.store import MAX_MODEL_BYTES, EtcdStore
from coordinator.model import Capacity, Host, HostAdmin, InsufficientCapacity, Reservation
from coordinator.store import ModelSlots, StoredModel, TelemetryUpdate
from core.errors import ConfigError, InvalidRequest
from core.security.pki import init_ca, issue_client, issue_host
from tests.conftest import require
from tests.harness.etcd import EtcdCluster, EtcdTlsFiles

GiB = 1 << 30


@pytest.fixture
async def cluster(workdir: Path) -> AsyncIterator[EtcdCluster]:
    require("etcd")
    async with EtcdCluster(workdir / "etcd", size=3) as c:
        yield c


def _rsv(rid: str, memory: int = GiB) -> Reservation:
    return Reservation(rid, "h1", Capacity(0, memory, 0), 2000.0, "test", 1000.0)


async def test_losing_one_member_of_three_interrupts_nothing(cluster: EtcdCluster) -> None:
    store = EtcdStore(EtcdKV(cluster.endpoints, timeout=2.0))
    try:
        await store.register_host(Host("h1", Capacity(1000, 4 * GiB, 0)))
        await store.reserve(_rsv("r1"), 1000.0)
        # The member the store talks to (the first endpoint) dies without a word.
        await cluster.members[0].kill()
        started = time.monotonic()
        await store.reserve(_rsv("r2"), 1000.0)
        await store.set_admin("h1", HostAdmin.DRAINING)
        took = time.monotonic() - started
        assert [r.id for r in await store.list_reservations(1000.0)] == ["r1", "r2"]
        assert took < 5.0, f"the first writes after losing a member took {took:.2f}s"
        # It comes back from its data dir and catches up.
        await cluster.members[0].start(wait_healthy=True)
        host = await store.get_host("h1")
        assert host is not None and host.admin is HostAdmin.DRAINING
    finally:
        await store.close()


async def test_without_quorum_the_store_refuses_and_resumes_when_it_returns(cluster: EtcdCluster) -> None:
    store = EtcdStore(EtcdKV(cluster.endpoints, timeout=1.0))
    try:
        await store.register_host(Host("h1", Capacity(1000, 2 * GiB, 0)))
        await store.reserve(_rsv("r1"), 1000.0)
        await cluster.members[1].kill()
        await cluster.members[2].kill()
        started = time.monotonic()
        with pytest.raises(EtcdUnavailable):
            await store.reserve(_rsv("r2"), 1000.0)
        assert time.monotonic() - started < 10.0
        await asyncio.gather(*(m.start(wait_healthy=False) for m in cluster.members[1:]))
        await cluster.wait_healthy()
        # Nothing was half-written while the quorum was gone: exactly one more GiB fits.
        await store.reserve(_rsv("r3"), 1000.0)
        with pytest.raises(InsufficientCapacity):
            await store.reserve(_rsv("r4"), 1000.0)
        assert [r.id for r in await store.list_reservations(1000.0)] == ["r1", "r3"]
    finally:
        await store.close()


def test_bad_settings_are_refused_before_any_connection() -> None:
    with pytest.raises(ConfigError, match="at least one member"):
        EtcdKV([])
    with pytest.raises(ConfigError, match="not host:port"):
        EtcdKV(["127.0.0.1"])
    with pytest.raises(InvalidRequest, match="starts and ends with '/'"):
        EtcdStore(EtcdKV(["127.0.0.1:2379"]), "ferryman")


async def test_names_that_would_escape_their_key_are_refused(cluster: EtcdCluster) -> None:
    store = EtcdStore(EtcdKV(cluster.endpoints))
    try:
        with pytest.raises(InvalidRequest, match="contains '/'"):
            await store.register_host(Host("a/b", Capacity(1, 1, 0)))
        assert await store.list_hosts() == []
    finally:
        await store.close()


async def test_over_mutual_tls(workdir: Path) -> None:
    """Members that require client certificates: the store connects with the [store] TLS files, and
    a client without a certificate, or trusting another CA, gets nothing."""
    require("etcd")
    ca = init_ca(workdir / "ca").directory
    member = issue_host(ca, "etcd-member", workdir / "member", ["127.0.0.1"])
    coordinator = issue_client(ca, "coordinator", workdir / "client")
    files = EtcdTlsFiles(member.ca_file, member.cert_file, member.key_file, coordinator.cert_file, coordinator.key_file)
    other_ca = init_ca(workdir / "other-ca").directory
    async with EtcdCluster(workdir / "etcd", size=1, tls=files) as cluster:
        tls = EtcdTls(str(member.ca_file), str(coordinator.cert_file), str(coordinator.key_file))
        store = EtcdStore(EtcdKV(cluster.endpoints, tls=tls, timeout=2.0))
        try:
            await store.register_host(Host("h1", Capacity(1000, GiB, 0)))
            await store.reserve(_rsv("r1"), 1000.0)
            assert [r.id for r in await store.list_reservations(1000.0)] == ["r1"]
        finally:
            await store.close()
        for bad in (
            EtcdTls(str(member.ca_file)),  # no client certificate
            EtcdTls(str(other_ca / "ca.pem"), str(coordinator.cert_file), str(coordinator.key_file)),
        ):
            stranger = EtcdStore(EtcdKV(cluster.endpoints, tls=bad, timeout=2.0))
            try:
                with pytest.raises(EtcdError):
                    await stranger.list_hosts()
            finally:
                await stranger.close()


async def test_the_client_tls_files_reload_without_a_restart(workdir: Path) -> None:
    """The etcd members move to a new CA (their certificate and the client certificates they trust):
    the store's client fails until its files are replaced and `reload_tls()` (the coordinator's
    SIGHUP) reads them, then works again, the same client object; files that do not load are refused
    and the current ones stay in use."""
    require("etcd")
    old_ca = init_ca(workdir / "old-ca").directory
    new_ca = init_ca(workdir / "new-ca").directory
    old_member = issue_host(old_ca, "etcd-member", workdir / "old-member", ["127.0.0.1"])
    new_member = issue_host(new_ca, "etcd-member", workdir / "new-member", ["127.0.0.1"])
    old_client = issue_client(old_ca, "coordinator", workdir / "old-client")
    new_client = issue_client(new_ca, "coordinator", workdir / "new-client")
    live = workdir / "live"  # the files the store is configured with, replaced in place
    live.mkdir()
    ca_file, cert_file, key_file = live / "ca.pem", live / "client.pem", live / "client-key.pem"

    def install(ca: Path, cert: Path, key: Path) -> None:
        for src, dst in ((ca, ca_file), (cert, cert_file), (key, key_file)):
            shutil.copyfile(src, dst)

    install(old_member.ca_file, old_client.cert_file, old_client.key_file)
    old_files = EtcdTlsFiles(
        old_member.ca_file, old_member.cert_file, old_member.key_file, old_client.cert_file, old_client.key_file
    )
    new_files = EtcdTlsFiles(
        new_member.ca_file, new_member.cert_file, new_member.key_file, new_client.cert_file, new_client.key_file
    )
    async with EtcdCluster(workdir / "etcd", size=1, tls=old_files) as cluster:
        kv = EtcdKV(cluster.endpoints, tls=EtcdTls(str(ca_file), str(cert_file), str(key_file)), timeout=2.0)
        store = EtcdStore(kv)
        try:
            await store.register_host(Host("h1", Capacity(1000, GiB, 0)))
            # The member restarts on the new CA: the client's old files no longer get through.
            member = cluster.members[0]
            await member.stop()
            cluster.tls = new_files
            await member.start(wait_healthy=True)
            with pytest.raises(EtcdError):
                await store.list_hosts()
            # New files that do not load (a key of another certificate): refused, nothing changes.
            install(new_member.ca_file, new_client.cert_file, old_client.key_file)
            assert not store.reload_tls()
            with pytest.raises(ConfigError, match="does not fit"):
                kv.reload_tls()
            # The right files, then the reload: the same store answers again.
            install(new_member.ca_file, new_client.cert_file, new_client.key_file)
            with pytest.raises(EtcdError):  # files alone change nothing until the reload
                await store.list_hosts()
            assert store.reload_tls()
            assert [h.name for h in await store.list_hosts()] == ["h1"]
            await store.reserve(_rsv("r1"), 1000.0)
            assert [r.id for r in await store.list_reservations(1000.0)] == ["r1"]
        finally:
            await store.close()
    # Without TLS there is nothing to reload.
    assert not EtcdKV(["127.0.0.1:2379"]).reload_tls()


async def test_a_model_too_large_for_etcd_is_refused_whole(workdir: Path) -> None:
    require("etcd")
    async with EtcdCluster(workdir / "etcd", size=1) as cluster:
        store = EtcdStore(EtcdKV(cluster.endpoints), "/m/")
        try:
            small = StoredModel("a" * 64, b"small")
            await store.set_model_slots(ModelSlots(small))
            huge = StoredModel("b" * 64, b"x" * (MAX_MODEL_BYTES + 1))
            with pytest.raises(InvalidRequest, match="more than the"):
                await store.set_model_slots(ModelSlots(huge, small))
            assert await store.model_slots() == ModelSlots(small)
            # Only the blobs the slots name are kept.
            await store.set_model_slots(ModelSlots(StoredModel("c" * 64, b"c")))
            blobs = await store.kv.range(b"/m/models/blobs/")
            assert [e.key for e in blobs.entries] == [b"/m/models/blobs/" + b"c" * 64]
        finally:
            await store.close()


def counted_leader(
    cluster: EtcdCluster, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> tuple[EtcdStore, EtcdStore, list[int]]:
    """Two stores under `prefix`, the leader's and another replica's, and how many keys each of the
    leader's reads of changed keys returned, in order."""
    leader, other = (EtcdStore(EtcdKV(cluster.endpoints), prefix) for _ in range(2))
    read: list[int] = []
    changed_since = leader.kv.changed_since

    async def counting(prefix: bytes, revision: int) -> Changes:
        changes = await changed_since(prefix, revision)
        read.append(len(changes.entries))
        return changes

    monkeypatch.setattr(leader.kv, "changed_since", counting)
    return leader, other, read


async def test_listing_hosts_reads_only_what_changed_since_the_last(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The leader lists every host up to three times a tick: after the first listing only the keys
    written since are read, yet the list is what etcd holds (other replicas' writes, a key deleted)."""
    require("etcd")
    async with EtcdCluster(workdir / "etcd", size=1) as cluster:
        leader, other, read = counted_leader(cluster, "/l/", monkeypatch)
        try:
            for name in ("h1", "h2", "h3"):
                await leader.register_host(Host(name, Capacity(1000, GiB, 0)))
            assert [h.name for h in await leader.list_hosts()] == ["h1", "h2", "h3"]
            assert [h.name for h in await leader.list_hosts()] == ["h1", "h2", "h3"] and read == [0]
            # Another replica registers a host and drains one: those two keys are read, no others.
            await other.register_host(Host("h0", Capacity(1000, GiB, 0)))
            await other.set_admin("h2", HostAdmin.DRAINING)
            hosts = await leader.list_hosts()
            assert [(h.name, h.admin) for h in hosts] == [
                ("h0", HostAdmin.ACTIVE), ("h1", HostAdmin.ACTIVE), ("h2", HostAdmin.DRAINING), ("h3", HostAdmin.ACTIVE)
            ]  # fmt: skip
            assert read == [0, 2]
            # A host key deleted (by hand): the counts disagree and the whole range is read again.
            await other.kv.txn([], [Delete(b"/l/hosts/h3")])
            assert [h.name for h in await leader.list_hosts()] == ["h0", "h1", "h2"]
            assert [h.name for h in await leader.list_hosts()] == ["h0", "h1", "h2"] and read[-1] == 0
        finally:
            await leader.close()
            await other.close()


async def test_a_leader_following_the_host_keys_lists_them_without_reading_them(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The leader watches the host keys: what other replicas write arrives between two listings, and
    a listing reads only what the watch has not delivered yet (nothing, once it has caught up)."""
    require("etcd")
    async with EtcdCluster(workdir / "etcd", size=1) as cluster:
        leader, other, read = counted_leader(cluster, "/w/", monkeypatch)
        stop = asyncio.Event()
        following = asyncio.create_task(leader.follow_hosts(stop), name="hosts-watch")
        try:
            for name in ("h1", "h2", "h3"):
                await other.register_host(Host(name, Capacity(1000, GiB, 0)))
            await other.set_admin("h2", HostAdmin.DRAINING)
            await other.kv.txn([], [Delete(b"/w/hosts/h3")])
            last = (await other.kv.range(b"/w/")).revision
            deadline = time.monotonic() + 10
            while leader._hosts_listed_at < last - 1:  # the watch has delivered everything
                assert time.monotonic() < deadline, "the watch did not deliver the changes"
                await asyncio.sleep(0.02)
            hosts = await leader.list_hosts()
            assert [(h.name, h.admin) for h in hosts] == [("h1", HostAdmin.ACTIVE), ("h2", HostAdmin.DRAINING)]
            assert read[-1] <= 1  # at most the last change, which the watch may not have marked done
        finally:
            stop.set()
            following.cancel()
            await asyncio.gather(following, return_exceptions=True)
            await leader.close()
            await other.close()


async def test_the_ticks_view_is_the_watched_one_and_holds_back_no_flush(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`followed_hosts` (the leader's tick): a listing while no watch runs; with the watch running,
    the hosts as it delivered them, with no read and without flushing the summaries held back here
    (placement's `list_hosts` still flushes them), and what the leader wrote itself."""
    require("etcd")
    async with EtcdCluster(workdir / "etcd", size=1) as cluster:
        leader, other, read = counted_leader(cluster, "/v/", monkeypatch)
        stop = asyncio.Event()
        following: asyncio.Task[None] | None = None
        try:
            await other.register_host(Host("h1", Capacity(1000, GiB, 0)))
            assert [h.name for h in await leader.followed_hosts()] == ["h1"]  # no watch: a listing
            following = asyncio.create_task(leader.follow_hosts(stop), name="hosts-watch")
            await other.register_host(Host("h2", Capacity(1000, GiB, 0)))
            await other.set_admin("h1", HostAdmin.DRAINING)
            deadline = time.monotonic() + 10
            while [(h.name, h.admin) for h in await leader.followed_hosts()] != [
                ("h1", HostAdmin.DRAINING), ("h2", HostAdmin.ACTIVE)
            ]:  # fmt: skip
                assert time.monotonic() < deadline, "the watch did not deliver the changes"
                await asyncio.sleep(0.02)
            reads = len(read)
            update = TelemetryUpdate("h2", [], 5000.0, Capacity(100, GiB // 2, 0), (), {})
            await leader.record_telemetry(update, 10, 3600.0)
            assert [h.name for h in await leader.followed_hosts()] == ["h1", "h2"]
            assert len(read) == reads, "the tick's view read etcd"
            stored = await other.get_host("h2")
            assert stored is not None and stored.last_heartbeat != 5000.0  # still held back here
            assert {h.name: h.used for h in await leader.list_hosts()}["h2"] == Capacity(100, GiB // 2, 0)
            # A host the leader itself changes stays in its view, changed, before the watch brings it.
            await leader.set_admin("h2", HostAdmin.DRAINING)
            assert [(h.name, h.admin) for h in await leader.followed_hosts()] == [
                ("h1", HostAdmin.DRAINING), ("h2", HostAdmin.DRAINING)
            ]  # fmt: skip
        finally:
            stop.set()
            if following is not None:
                following.cancel()
                await asyncio.gather(following, return_exceptions=True)
            await leader.close()
            await other.close()


async def test_a_flush_reads_again_what_failed_its_guard(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A host key changed by another replica fails the flush's guard; the next round reads it again,
    even when the leader's watch, behind, has put back the version that failed meanwhile."""
    require("etcd")
    async with EtcdCluster(workdir / "etcd", size=1) as cluster:
        here, other = (EtcdStore(EtcdKV(cluster.endpoints), "/f/") for _ in range(2))
        try:
            await here.register_host(Host("h1", Capacity(1000, GiB, 0)))
            update = TelemetryUpdate("h1", [], 5000.0, Capacity(100, GiB // 2, 0), (), {})
            await here.record_telemetry(update, 10, 3600.0)
            failed = here._known["h1"]
            await other.set_admin("h1", HostAdmin.DRAINING)  # the key moves on behind `here`'s back
            retry_pause = here._retry_pause

            async def lagging_watch(attempt: int) -> None:
                here._known["h1"] = failed  # a watch behind delivers the version that failed
                await retry_pause(attempt)

            monkeypatch.setattr(here, "_retry_pause", lagging_watch)
            await asyncio.wait_for(here.flush_telemetry(), 10)
            host = await other.get_host("h1")
            assert host is not None and host.admin is HostAdmin.DRAINING and host.last_heartbeat == 5000.0
            assert host.used == Capacity(100, GiB // 2, 0)
        finally:
            await here.close()
            await other.close()


@pytest.mark.parametrize(
    ("error", "no_quorum"),
    [
        ("context deadline exceeded", True),
        ("etcdserver: request timed out", True),
        ("etcdserver: no leader", True),
        ("etcdserver: leader changed", True),
        ("etcdserver: mvcc: required revision has been compacted", False),
        ("etcdserver: duplicate key given in txn request", False),
    ],
)
def test_errors_that_mean_no_quorum_are_told_apart(error: str, no_quorum: bool) -> None:
    """An etcd member that cannot reach its quorum answers with a plain error (not gRPC's
    UNAVAILABLE): the store reports it as unavailable, not as a bad request."""
    assert without_quorum(Exception(error)) is no_quorum
