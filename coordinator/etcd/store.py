"""`Store` on etcd: what every coordinator replica must see the same, in etcd keys under one prefix.

Keys (values are JSON; PREFIX is `[store] etcd_prefix`, "/ferryman/" by default):

    PREFIX hosts/NAME                  a Host, with its last telemetry summary (used, pressure, ...)
    PREFIX reservations/HOST/ID        a Reservation (grouped by host: one range per host)
    PREFIX reservation-ids/ID          HOST (finds a reservation from its id alone)
    PREFIX migrations/ID               a Migration (its history inside)
    PREFIX drains/ID                   a Drain
    PREFIX predictions/HOST            the host's latest Prediction (only the latest is ever read)
    PREFIX decisions/TS-RANDOM         a Decision; its id is the key's create revision
    PREFIX catalog/revision            the catalog's revision (0 when absent), +1 on every write
    PREFIX catalog/entries/NAME@VER    a CatalogEntry; registration order is the create revision
    PREFIX deployments/ID              a deployment's record (coordinator/deployments/states.py)
    PREFIX chains/ID                   a chain's record (coordinator/chains/states.py)
    PREFIX models/slots                {"active": SHA256, "previous": SHA256 | null} (ModelStore)
    PREFIX models/blobs/SHA256         a drain model file's bytes (at most MAX_MODEL_BYTES)

Every write is a transaction guarded by the revisions the writer read (read, decide, write if
nothing changed, else read again), so replicas never overwrite each other's updates. `reserve` is the
double-booking guarantee: it reads the host and its reservation range, checks the free capacity, and
inserts only if neither the host nor any reservation on it changed since; a replica that loses the
race reads again and decides again (InsufficientCapacity once the host is full).

Telemetry time series do not go to etcd, and neither does each push: a push refreshes the host's
summary (the heartbeat and the capacity in use, which `reserve` needs) in this replica's memory,
and `flush_telemetry` (every `[telemetry] flush_period`, and before this replica reads a host)
writes every summary held back in as few transactions as etcd allows, each guarded by the host
keys' revisions as this replica last read or wrote them (a host changed meanwhile by another
replica, e.g. the leader marking it suspect, is read again and its summary reapplied). The samples
are kept in this replica's memory, bounded per host by count and age exactly as the SQLite store
bounds them; a replica that starts has none until agents push again (docs/coordinator.md, "Running
on etcd"). The start history (the layer predictor's) is kept the same way, in this replica's memory.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import json
import logging
import random
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

from coordinator.catalog.model import Catalog, CatalogChanged, CatalogEntry, CatalogEntryExists
from coordinator.chains.states import ChainRecord
from coordinator.deployments.states import DeploymentRecord
from coordinator.etcd.kv import (
    Absent,
    Delete,
    Entry,
    EtcdError,
    EtcdKV,
    Guard,
    ModRevision,
    Put,
    Unchanged,
    prefix_end,
)
from coordinator.history_share import current_shares
from coordinator.leadership import NotLeader
from coordinator.model import (
    Capacity,
    ContainerUsage,
    Decision,
    Drain,
    Host,
    HostAdmin,
    HostHealth,
    HostNotFound,
    InsufficientCapacity,
    Migration,
    MigrationState,
    Prediction,
    Reservation,
    StartRecord,
)
from coordinator.store import ModelSlots, StoredModel, TelemetryUpdate
from core.errors import ConfigError, InvalidRequest

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 200
"""Read-decide-write rounds one update may lose to concurrent writers before it gives up."""
MAX_TXN_OPS = 127
"""etcd refuses a transaction of more than 128 operations (--max-txn-ops)."""
_PARSE_BETWEEN_YIELDS = 500
"""Host keys parsed in a listing before the event loop gets a turn (about 15 ms of work)."""
PREDICTION_BATCHES_IN_FLIGHT = 8
"""Prediction transactions a tick has in flight at once (each MAX_TXN_OPS hosts)."""
DECISIONS_KEPT = 10_000
"""Decisions kept in etcd (the oldest beyond this are deleted; SQLite keeps them all)."""
_TRIM_EVERY = 256
SCALING_TRIM_EVERY = 20
"""A deployment's scaling decisions beyond `keep` are deleted every this many writes of one client
(so up to that many more per client may be read back between two trims)."""
MAX_MODEL_BYTES = 1 << 20
"""A drain model kept in etcd: one value, below etcd's default request limit (1.5 MiB)."""


_ENCODER = json.JSONEncoder(separators=(",", ":"), sort_keys=True)
"""One encoder for every value: `json.dumps` with options builds a new one per call (a tick writes a
prediction per host)."""


def _dumps(value: Any) -> bytes:
    return _ENCODER.encode(value).encode()


def _fields(record: Any) -> dict[str, Any]:
    """A dataclass's fields one level deep: what `asdict` gives for a flat one, without its deep
    copies (a host key is written for every host at every flush)."""
    return {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}


def _host_to_json(host: Host, shares: Mapping[str, Any] | None = None) -> bytes:
    """A host key's value; `shares` are the replicas' summaries of its recent pushes (history_share)."""
    out = _fields(host)
    out["capacity"] = _fields(host.capacity)
    out["used"] = _fields(host.used)
    out["health"] = host.health.value
    out["admin"] = host.admin.value
    out["layer_digests"] = list(host.layer_digests)
    out["containers"] = [_fields(c) for c in host.containers]
    if shares:
        out["shared"] = shares
    return _dumps(out)


def _host_from_json(raw: bytes) -> Host:
    return _host_from_dict(json.loads(raw))


def _shares_of(raw: bytes | None) -> dict[str, Any]:
    if raw is None:
        return {}
    shared = json.loads(raw).get("shared")
    return shared if isinstance(shared, dict) else {}


def _host_from_dict(d: dict[str, Any]) -> Host:
    return Host(
        name=d["name"],
        capacity=Capacity.from_dict(d["capacity"]),
        peer_address=d["peer_address"],
        api_url=d["api_url"],
        labels=d["labels"],
        agent_version=d["agent_version"],
        layer_digests=tuple(d["layer_digests"]),
        blob_address=d["blob_address"],
        criu_features=d["criu_features"],
        telemetry_period=d["telemetry_period"],
        health=HostHealth(d["health"]),
        admin=HostAdmin(d["admin"]),
        registered_at=d["registered_at"],
        last_heartbeat=d["last_heartbeat"],
        used=Capacity.from_dict(d["used"]),
        containers=tuple(ContainerUsage.from_record(c) for c in d["containers"]),
        pressure=d["pressure"],
    )


def _reservation_from_json(raw: bytes) -> Reservation:
    d = json.loads(raw)
    d["capacity"] = Capacity.from_dict(d["capacity"])
    return Reservation(**d)


def _migration_to_json(migration: Migration) -> bytes:
    record = migration.to_dict()
    record.pop("done")
    record["history"] = [list(h) for h in migration.history]
    return _dumps(record)


def _migration_from_json(raw: bytes) -> Migration:
    d = json.loads(raw)
    d["state"] = MigrationState(d["state"])
    d["tried_targets"] = tuple(d.get("tried_targets", ()))
    d["history"] = tuple(tuple(h) for h in d.get("history", ()))
    return Migration(**d)


def free_capacity(host: Host, reservations: Sequence[Reservation], now: float) -> Capacity:
    """capacity - what the containers use (last sample) - the host's active reservations."""
    held = Capacity()
    for r in reservations:
        if r.host == host.name and r.expires_at > now:
            held = held + r.capacity
    return host.capacity - host.used - held


class _Series:
    """One replica's telemetry samples per host, bounded by count and age (never in etcd)."""

    def __init__(self) -> None:
        self._by_host: dict[str, collections.deque[tuple[float, dict[str, Any]]]] = {}

    def add(self, update: TelemetryUpdate, keep: int, max_age: float) -> None:
        """Samples in time order (stable: equal stamps keep their arrival order), at most `keep`, none
        older than `max_age` before the push. O(samples pushed) when they arrive in order, as they
        do: a push must not cost in proportion to the history kept (1440 samples a host)."""
        if keep <= 0:
            self._by_host[update.host] = collections.deque()
            return
        new = [(ts, dict(s)) for ts, s in update.samples]
        series = self._by_host.setdefault(update.host, collections.deque())
        in_order = all(a[0] <= b[0] for a, b in itertools.pairwise(new))
        if in_order and (not series or not new or series[-1][0] <= new[0][0]):
            series.extend(new)
        else:  # late or shuffled samples: merge the whole series once
            series = self._by_host[update.host] = collections.deque(sorted([*series, *new], key=lambda item: item[0]))
        cutoff = update.received_at - max_age
        while series and (series[0][0] < cutoff or len(series) > keep):
            series.popleft()

    def since(self, host: str, since: float) -> list[tuple[float, dict[str, Any]]]:
        return [item for item in self._by_host.get(host, ()) if item[0] >= since]

    def all_since(self, since: float) -> dict[str, list[tuple[float, dict[str, Any]]]]:
        out = {host: self.since(host, since) for host in sorted(self._by_host)}
        return {host: samples for host, samples in out.items() if samples}


class _Starts:
    """One replica's start history per host, bounded by count and age (never in etcd)."""

    def __init__(self) -> None:
        self._by_host: dict[str, list[StartRecord]] = {}

    def add(self, start: StartRecord, keep: int, max_age: float) -> None:
        kept = [*self._by_host.get(start.host, []), start]
        kept.sort(key=lambda s: s.ts)  # stable: equal stamps keep their arrival order
        cutoff = start.ts - max_age
        self._by_host[start.host] = [s for s in kept if s.ts >= cutoff][-keep:] if keep > 0 else []

    def since(self, host: str | None, since: float) -> list[StartRecord]:
        hosts = [host] if host is not None else sorted(self._by_host)
        out = [s for h in hosts for s in self._by_host.get(h, ()) if s.ts >= since]
        return sorted(out, key=lambda s: s.ts)


def _merge_pending(older: TelemetryUpdate | None, newer: TelemetryUpdate) -> TelemetryUpdate:
    """One host's summaries held back, as one: the newest heartbeat, the newest usage pushed."""
    if older is None or not newer.heartbeat_only or older.heartbeat_only:
        return newer
    return dataclasses.replace(older, received_at=max(older.received_at, newer.received_at), samples=())


def _with_summary(host: Host, update: TelemetryUpdate) -> Host:
    """`host` as etcd has it, refreshed by a summary held back (never moved back in time)."""
    if update.received_at < host.last_heartbeat:
        return dataclasses.replace(host, health=HostHealth.READY)  # another replica wrote a newer one
    if update.heartbeat_only:
        return dataclasses.replace(host, last_heartbeat=update.received_at, health=HostHealth.READY)
    return dataclasses.replace(
        host,
        last_heartbeat=update.received_at,
        health=HostHealth.READY,
        used=update.used,
        containers=tuple(update.containers),
        pressure=dict(update.pressure),
    )


class EtcdStore:
    """`Store` on an etcd cluster. Open with `EtcdStore(EtcdKV(endpoints), prefix)`; no I/O until used."""

    def __init__(self, kv: EtcdKV, prefix: str = "/ferryman/") -> None:
        if not prefix.startswith("/") or not prefix.endswith("/"):
            raise InvalidRequest(f"an etcd key prefix starts and ends with '/', got {prefix!r}")
        self._kv = kv
        self._prefix = prefix.encode()
        self._series = _Series()
        self._starts = _Starts()
        self._decisions_recorded = 0
        self._scaling_recorded: dict[str, int] = {}
        self._fence: ModRevision | None = None
        self._pending: dict[str, TelemetryUpdate] = {}
        """Each host's telemetry summary pushed here and not yet in etcd (flush_telemetry)."""
        self._known: dict[str, tuple[Host, int]] = {}
        """Hosts as this client last read or wrote them, with their keys' mod revisions: a push
        needs no read to learn that its host is registered, a flush none to guard its writes, and
        a listing reads only the keys written since the last one."""
        self._hosts_listed_at = 0
        """The etcd revision of the last listing of the hosts (0: none yet). A host key unchanged
        since is as `_known` has it: a key a client drops from `_known` was written after it."""
        self._following = False
        """The watch of the host keys (follow_hosts) is applying every change to `_known`."""
        self._replica = ""
        """This replica's name in the history shares of host keys (its advertise URL)."""
        self._share_source: Callable[[str], Mapping[str, Any] | None] | None = None
        self._shares: dict[str, tuple[int, dict[str, Any]]] = {}
        """Each host key's history shares (replica -> share JSON) as last read or written here,
        with the key's mod revision."""
        self._flushing = asyncio.Lock()
        self._reserving: dict[str, asyncio.Lock] = {}
        """One reserve per host at a time from this client: its own calls queue instead of racing
        each other's transactions (another replica's still race, and the guards settle it)."""

    @property
    def kv(self) -> EtcdKV:
        return self._kv

    # ----- fencing (coordinator/leadership.py)

    @property
    def leader_key(self) -> bytes:
        """The key the leading replica's lease holds (coordinator/etcd/election.py)."""
        return self._prefix + b"leader"

    @property
    def replicas_prefix(self) -> bytes:
        """Where each running replica's key lives, `replicas/URL`, attached to its election lease:
        the live replicas are the keys present (a replica killed goes with its lease)."""
        return self._prefix + b"replicas/"

    def fence(self, revision: int | None) -> None:
        """Make every later write conditional on the leader key still being at `revision` (the term
        this replica won); None: unconditional again (a single coordinator, or tests)."""
        self._fence = None if revision is None else ModRevision(self.leader_key, revision)

    async def _txn(self, guards: Sequence[Guard], ops: Sequence[Put | Delete]) -> bool:
        """`kv.txn` with the fence added; NotLeader when it is the fence that failed."""
        return await self._txn_revision(guards, ops) is not None

    async def _txn_revision(self, guards: Sequence[Guard], ops: Sequence[Put | Delete]) -> int | None:
        """`_txn`, answering the revision it wrote at (`kv.txn_revision`), None when a guard failed."""
        fence = self._fence
        if fence is None:
            return await self._kv.txn_revision(guards, ops)
        revision = await self._kv.txn_revision([*guards, fence], ops)
        if revision is not None:
            return revision
        leader = await self._kv.get(self.leader_key)
        if leader is None or leader.mod_revision != fence.revision:
            holder = "" if leader is None else leader.value.decode(errors="replace")
            raise NotLeader(f"this replica no longer leads (term {fence.revision} ended)", holder)
        return None

    # ----- keys

    def _key(self, *parts: str) -> bytes:
        for part in parts[1:]:
            if not part or "/" in part:
                raise InvalidRequest(f"{part!r} cannot be a name in the store (empty, or contains '/')")
        return self._prefix + "/".join(parts).encode()

    def _host_key(self, name: str) -> bytes:
        return self._key("hosts", name)

    @property
    def _hosts_prefix(self) -> bytes:
        return self._key("hosts") + b"/"

    def _host_reservations(self, host: str) -> bytes:
        return self._key("reservations", host) + b"/"

    async def _retry_pause(self, attempt: int) -> None:
        if attempt >= MAX_ATTEMPTS - 1:
            raise EtcdError(f"gave up after {MAX_ATTEMPTS} conflicting concurrent updates")
        await asyncio.sleep(random.uniform(0, 0.001 * min(attempt + 1, 20)))

    def reload_tls(self) -> bool:
        """SIGHUP: the etcd client's TLS files, read again (kv.reload_tls); False if they were refused."""
        try:
            if self._kv.reload_tls():
                log.info("etcd tls files reloaded", extra={"endpoints": list(self._kv.endpoints)})
        except ConfigError as exc:
            log.error(f"etcd tls reload refused, keeping the current files: {exc.message}", extra={"code": exc.code})
            return False
        return True

    async def close(self) -> None:
        try:
            await self.flush_telemetry()  # what this replica was told last, for the others
        except EtcdError as exc:
            log.warning("telemetry summaries not flushed at close", extra={"error": exc.message})
        finally:
            await self._kv.close()

    # ----- history shares (coordinator/history_share.py): followers' pushes reach the leader's scoring

    def share_histories(self, replica: str, source: Callable[[str], Mapping[str, Any] | None]) -> None:
        """Write `source(host)` (this replica's share of the host's recent pushes, JSON) into the host
        key, under `replica` (its advertise URL), with every flush of its summary."""
        if not replica:
            raise ValueError("a history share needs the replica's name")
        self._replica = replica
        self._share_source = source

    def peer_shares(self) -> dict[str, tuple[int, dict[str, Any]]]:
        """The other replicas' shares per host, as of the host keys last read here (`list_hosts`
        reads them all), with each key's mod revision: a share is new when its revision is."""
        out: dict[str, tuple[int, dict[str, Any]]] = {}
        for host, (revision, shares) in self._shares.items():
            others = {r: share for r, share in shares.items() if r != self._replica}
            if others:
                out[host] = (revision, others)
        return out

    # ----- hosts

    async def _update_host(self, name: str, change: dict[str, Any]) -> Host:
        key = self._host_key(name)
        await self._flush_host(name)
        for attempt in range(MAX_ATTEMPTS):
            entry = await self._kv.get(key)
            if entry is None:
                raise HostNotFound(f"no host {name!r} is registered")
            host = dataclasses.replace(_host_from_json(entry.value), **change)
            shares = _shares_of(entry.value)
            revision = await self._txn_revision(
                [ModRevision(key, entry.mod_revision)], [Put(key, _host_to_json(host, shares))]
            )
            if revision is not None:
                self._wrote_host(host, revision, shares)
                return host
            await self._retry_pause(attempt)
        raise AssertionError("unreachable")

    async def register_host(self, host: Host) -> Host:
        key = self._host_key(host.name)
        await self._flush_host(host.name)
        for attempt in range(MAX_ATTEMPTS):
            entry = await self._kv.get(key)
            guard: Guard
            if entry is None:
                new = dataclasses.replace(host, health=HostHealth.READY)
                guard = Absent(key)
            else:
                old = _host_from_json(entry.value)  # keeps the admin state and the last telemetry summary
                new = dataclasses.replace(
                    host,
                    health=HostHealth.READY,
                    admin=old.admin,
                    used=old.used,
                    containers=old.containers,
                    pressure=old.pressure,
                )
                guard = ModRevision(key, entry.mod_revision)
            shares = _shares_of(entry.value if entry is not None else None)
            revision = await self._txn_revision([guard], [Put(key, _host_to_json(new, shares))])
            if revision is not None:
                self._wrote_host(new, revision, shares)
                return new
            await self._retry_pause(attempt)
        raise AssertionError("unreachable")

    def _wrote_host(self, host: Host, revision: int, shares: dict[str, Any]) -> None:
        """Remember a host key this client just wrote at `revision`, as the watch will deliver it: the
        leader's tick lists the hosts from `_known`, and a host it just drained must not drop out of
        that listing until the watch catches up (it would go unscored for a tick)."""
        known = self._known.get(host.name)
        if known is not None and known[1] >= revision:
            return  # the watch already delivered this write or a later one
        self._known[host.name] = (host, revision)
        if shares:
            self._shares[host.name] = (revision, shares)
        else:
            self._shares.pop(host.name, None)

    async def get_host(self, name: str) -> Host | None:
        await self._flush_host(name)
        entry = await self._kv.get(self._host_key(name))
        return None if entry is None else self._remember(entry)

    async def list_hosts(self) -> list[Host]:
        """Every host as of one etcd revision. After the first listing only the host keys written
        since the last one are read (etcd filters them by mod revision) and merged into the hosts
        known here; the whole range is read again when the counts disagree (a host key deleted)."""
        await self.flush_telemetry()
        if self._hosts_listed_at:
            changes = await self._kv.changed_since(self._hosts_prefix, self._hosts_listed_at)
            await self._remember_all(changes.entries)
            if len(self._known) == changes.count:
                self._hosts_listed_at = changes.revision
                return sorted((host for host, _ in self._known.values()), key=lambda h: h.name)
        snap = await self._kv.range(self._hosts_prefix)
        hosts = await self._remember_all(snap.entries)
        listed = {h.name for h in hosts}
        for name in [name for name in self._known if name not in listed]:  # deleted from etcd
            del self._known[name]
            self._shares.pop(name, None)
        self._hosts_listed_at = snap.revision
        hosts.sort(key=lambda h: h.name)
        return hosts

    WATCH_RETRY = 1.0
    """Seconds before a failed watch of the host keys starts again (after a full listing)."""

    async def follow_hosts(self, stop: asyncio.Event) -> None:
        """Until `stop` (or cancelled): apply each host key's change as etcd announces it, so that a
        listing reads only what the watch has not delivered yet. The leader runs this: it lists every
        host up to three times a tick, and with agents pushing every host key changes between two
        ticks (each replica's flush); parsed as they come, the keys no longer pile up at the tick.
        A listing stays exact without it: the watch only moves the revision listings read from."""
        while not stop.is_set():
            try:
                if not self._hosts_listed_at:
                    await self.list_hosts()  # the starting point: every host as of one revision
                self._following = True
                async for deleted, entry in self._kv.watch(self._hosts_prefix, self._hosts_listed_at + 1):
                    self._watched(deleted, entry)
                    if stop.is_set():
                        return
            except EtcdError as exc:
                self._following = False
                log.warning("watch of the host keys failed; listing again", extra={"error": exc.message})
                self._hosts_listed_at = 0  # the next listing reads the whole range
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.WATCH_RETRY)
            finally:
                self._following = False

    async def followed_hosts(self) -> list[Host]:
        """Every host as the watch of the host keys has delivered them (`follow_hosts`), without a
        read: what the leader's tick scores and decides on. This replica's pushed summaries still
        held back are not in it (the tick needs no usage; placement lists with `list_hosts`, which
        flushes them first), and a key this client just wrote is back once the watch delivers it.
        Without a watch running, `list_hosts`."""
        if not self._following:
            return await self.list_hosts()
        return sorted((host for host, _ in self._known.values()), key=lambda h: h.name)

    def _watched(self, deleted: bool, entry: Entry) -> None:
        """One change from the watch. Events come in revision order, so every change before this
        one's revision has been applied: the listings may start from there."""
        if deleted:
            name = entry.key[len(self._hosts_prefix) :].decode()
            known = self._known.get(name)
            if known is not None and known[1] < entry.mod_revision:
                del self._known[name]
                self._shares.pop(name, None)
        else:
            self._remember(entry)
        self._hosts_listed_at = max(self._hosts_listed_at, entry.mod_revision - 1)

    async def _remember_all(self, entries: Sequence[Entry]) -> list[Host]:
        hosts: list[Host] = []
        for start in range(0, len(entries), _PARSE_BETWEEN_YIELDS):
            if start:
                # 10 000 host keys changed since the last listing (every flush rewrites them) take
                # some 0.3 s to parse: the loop's other work (pushes, lease renewals) runs between.
                await asyncio.sleep(0)
            hosts.extend(self._remember(e) for e in entries[start : start + _PARSE_BETWEEN_YIELDS])
        return hosts

    def _remember(self, entry: Entry) -> Host:
        """The host of a key read from etcd, parsed only when its revision is not the one known here:
        a tick lists every host up to three times (10 000 keys of some 3 KB each), mostly unchanged
        in between."""
        known = self._known.get(entry.key[len(self._hosts_prefix) :].decode())
        if known is not None and known[1] >= entry.mod_revision:
            # The same, or newer: written here while a listing was parsed (it yields between chunks).
            return known[0]
        d = json.loads(entry.value)
        host = _host_from_dict(d)
        self._known[host.name] = (host, entry.mod_revision)
        shared = d.get("shared")
        if isinstance(shared, dict) and shared:
            self._shares[host.name] = (entry.mod_revision, shared)
        else:
            self._shares.pop(host.name, None)
        return host

    async def set_health(self, name: str, health: HostHealth) -> None:
        await self._update_host(name, {"health": health})

    async def set_admin(self, name: str, admin: HostAdmin) -> None:
        await self._update_host(name, {"admin": admin})

    # ----- telemetry: the summary in etcd, the samples in this replica's memory

    async def record_telemetry(self, update: TelemetryUpdate, keep: int, max_age: float) -> int:
        if update.host not in self._known:  # once per host and replica, not once per push
            entry = await self._kv.get(self._host_key(update.host))
            if entry is None:
                raise HostNotFound(f"no host {update.host!r} is registered")
            self._remember(entry)
        self._pending[update.host] = _merge_pending(self._pending.get(update.host), update)
        self._series.add(update, keep, max_age)
        return len(update.samples)

    async def flush_telemetry(self) -> None:
        async with self._flushing:
            pending, self._pending = self._pending, {}
            names = sorted(pending)
            # etcd caps a transaction's guards and its operations alike (one of each per host).
            for start in range(0, len(names), MAX_TXN_OPS - 1):
                chunk = {name: pending.pop(name) for name in names[start : start + MAX_TXN_OPS - 1]}
                try:
                    await self._flush_chunk(chunk)
                except BaseException:
                    for name, update in {**chunk, **pending}.items():
                        self._hold_back_again(name, update)
                    raise

    async def _flush_host(self, name: str) -> None:
        """Flush `name`'s summary (if one is held back) before reading or writing its key."""
        if name in self._pending:
            async with self._flushing:
                update = self._pending.pop(name, None)
                if update is not None:
                    try:
                        await self._flush_chunk({name: update})
                    except BaseException:
                        self._hold_back_again(name, update)
                        raise

    def _hold_back_again(self, name: str, update: TelemetryUpdate) -> None:
        """Keep a summary that could not be written (etcd unreachable, say) for the next flush, under
        what was pushed since."""
        newer = self._pending.get(name)
        self._pending[name] = update if newer is None else _merge_pending(update, newer)

    async def _flush_chunk(self, chunk: dict[str, TelemetryUpdate]) -> None:
        """One transaction putting every host of `chunk`, guarded by the revisions known here; the hosts
        not known (or changed by another client since) are read again first. Not fenced: a summary is
        the agent's word, whichever replica writes it."""
        stale: set[str] = set()
        for attempt in range(MAX_ATTEMPTS):
            unknown = [name for name in chunk if name in stale or name not in self._known]
            entries = await asyncio.gather(*(self._kv.get(self._host_key(name)) for name in unknown))
            for name, entry in zip(unknown, entries, strict=True):
                if entry is None:
                    del chunk[name]  # no longer registered: nothing to refresh
                else:
                    self._remember(entry)
            if not chunk:
                return
            fresh = {name: _with_summary(self._known[name][0], update) for name, update in chunk.items()}
            shares = {name: self._shares_to_write(name, update.received_at) for name, update in chunk.items()}
            guards: list[Guard] = [ModRevision(self._host_key(name), self._known[name][1]) for name in chunk]
            ops = [Put(self._host_key(name), _host_to_json(host, shares[name])) for name, host in fresh.items()]
            revision = await self._kv.txn_revision(guards, ops)
            if revision is not None:
                for name, host in fresh.items():
                    self._wrote_host(host, revision, shares[name])
                return
            # Which guard failed is not said: read them all again. Not by dropping them from
            # `_known`: the leader's watch, behind by a few revisions, would put back the versions
            # that just failed before the next round, and the rounds would fail until they ran out.
            stale = set(chunk)
            await self._retry_pause(attempt)

    def _shares_to_write(self, name: str, now: float) -> dict[str, Any]:
        """The host key's shares with this replica's own refreshed, those gone stale dropped."""
        shares = dict(self._shares.get(name, (0, {}))[1])
        if self._share_source is not None:
            own = self._share_source(name)
            if own is not None:
                shares[self._replica] = own
        return current_shares(shares, now)

    async def telemetry(self, host: str, since: float = 0.0) -> list[tuple[float, dict[str, Any]]]:
        return self._series.since(host, since)

    async def telemetry_all(self, since: float = 0.0) -> dict[str, list[tuple[float, dict[str, Any]]]]:
        return self._series.all_since(since)

    # ----- start history: this replica's memory, like the telemetry samples

    async def record_start(self, start: StartRecord, keep: int, max_age: float) -> None:
        self._starts.add(start, keep, max_age)

    async def starts(self, host: str | None = None, since: float = 0.0) -> list[StartRecord]:
        return self._starts.since(host, since)

    # ----- reservations

    async def _host_state(self, host: str) -> tuple[Host, int, list[Reservation], int]:
        """The host, its key's revision, its reservations and the revision of that range read."""
        await self._flush_host(host)
        entry = await self._kv.get(self._host_key(host))
        if entry is None:
            raise HostNotFound(f"no host {host!r} is registered")
        snap = await self._kv.range(self._host_reservations(host))
        held = [_reservation_from_json(e.value) for e in snap.entries]
        return _host_from_json(entry.value), entry.mod_revision, held, snap.revision

    async def reserve(self, reservation: Reservation, now: float) -> Reservation:
        key = self._host_reservations(reservation.host) + reservation.id.encode()
        id_key = self._key("reservation-ids", reservation.id)
        async with self._reserving.setdefault(reservation.host, asyncio.Lock()):
            return await self._reserve(reservation, now, key, id_key)

    async def _reserve(self, reservation: Reservation, now: float, key: bytes, id_key: bytes) -> Reservation:
        for attempt in range(MAX_ATTEMPTS):
            host, host_revision, held, read_at = await self._host_state(reservation.host)
            if any(r.id == reservation.id for r in held):
                return reservation  # a retried call whose first try committed
            free = free_capacity(host, held, now)
            if not free.fits(reservation.capacity):
                raise InsufficientCapacity(
                    f"host {reservation.host!r} cannot hold {reservation.capacity.to_dict()}: free {free.to_dict()}"
                )
            in_range = self._host_reservations(reservation.host)
            guards: list[Guard] = [
                ModRevision(self._host_key(reservation.host), host_revision),
                Unchanged(in_range, read_at, prefix_end(in_range)),
                Absent(id_key),
            ]
            ops = [Put(key, _dumps(reservation.to_dict())), Put(id_key, reservation.host.encode())]
            if await self._txn(guards, ops):
                return reservation
            await self._retry_pause(attempt)
        raise AssertionError("unreachable")

    async def free_capacity(self, host: str, now: float) -> Capacity:
        found, _, held, _ = await self._host_state(host)
        return free_capacity(found, held, now)

    async def _reservation_entry(self, reservation_id: str) -> tuple[bytes, bytes, Reservation, int] | None:
        id_key = self._key("reservation-ids", reservation_id)
        index = await self._kv.get(id_key)
        if index is None:
            return None
        key = self._host_reservations(index.value.decode()) + reservation_id.encode()
        entry = await self._kv.get(key)
        if entry is None:
            return None
        return id_key, key, _reservation_from_json(entry.value), entry.mod_revision

    async def mark_held(self, reservation_id: str) -> None:
        for attempt in range(MAX_ATTEMPTS):
            found = await self._reservation_entry(reservation_id)
            if found is None:
                return
            _, key, reservation, revision = found
            held = dataclasses.replace(reservation, held_by_agent=True)
            if await self._txn([ModRevision(key, revision)], [Put(key, _dumps(held.to_dict()))]):
                return
            await self._retry_pause(attempt)

    async def get_reservation(self, reservation_id: str) -> Reservation | None:
        found = await self._reservation_entry(reservation_id)
        return None if found is None else found[2]

    async def release(self, reservation_id: str) -> Reservation | None:
        for attempt in range(MAX_ATTEMPTS):
            found = await self._reservation_entry(reservation_id)
            if found is None:
                return None
            id_key, key, reservation, revision = found
            if await self._txn([ModRevision(key, revision)], [Delete(key), Delete(id_key)]):
                return reservation
            await self._retry_pause(attempt)
        raise AssertionError("unreachable")

    async def _all_reservations(self) -> list[Reservation]:
        snap = await self._kv.range(self._key("reservations") + b"/")
        return [_reservation_from_json(e.value) for e in snap.entries]

    async def expired_reservations(self, now: float) -> list[Reservation]:
        return sorted((r for r in await self._all_reservations() if r.expires_at <= now), key=lambda r: r.expires_at)

    async def list_reservations(self, now: float | None = None) -> list[Reservation]:
        found = [r for r in await self._all_reservations() if now is None or r.expires_at > now]
        return sorted(found, key=lambda r: (r.created_at, r.id))

    # ----- migrations

    async def put_migration(self, migration: Migration) -> None:
        await self._txn([], [Put(self._key("migrations", migration.id), _migration_to_json(migration))])

    async def get_migration(self, migration_id: str) -> Migration | None:
        entry = await self._kv.get(self._key("migrations", migration_id))
        return None if entry is None else _migration_from_json(entry.value)

    async def list_migrations(self, *, active_only: bool = False) -> list[Migration]:
        snap = await self._kv.range(self._key("migrations") + b"/")
        found = [_migration_from_json(e.value) for e in snap.entries]
        return sorted((m for m in found if not (active_only and m.done)), key=lambda m: (m.created_at, m.id))

    # ----- predictions, decisions, drains

    async def record_predictions(self, predictions: Sequence[Prediction]) -> None:
        latest: dict[str, Prediction] = {}
        for p in predictions:
            if p.host not in latest or p.ts >= latest[p.host].ts:
                latest[p.host] = p
        if latest:
            # One host's latest each: batches need not land together (etcd caps a transaction's ops),
            # so several go at once, and etcd commits them in a few rounds (10 000 hosts: 79 batches,
            # one after the other a good part of the tick's second). Each batch encodes its values
            # when its turn comes: all 79 started at once encoded everything in one turn of the
            # event loop (0.2-0.4 s at 10 000 hosts), and the pushes and lease renewals waited.
            hosts = list(latest.items())
            in_flight = asyncio.Semaphore(PREDICTION_BATCHES_IN_FLIGHT)

            async def write(batch: Sequence[tuple[str, Prediction]]) -> None:
                async with in_flight:
                    ops = [Put(self._key("predictions", host), _dumps(p.to_dict())) for host, p in batch]
                    await self._txn([], ops)

            await asyncio.gather(*(write(hosts[i : i + MAX_TXN_OPS]) for i in range(0, len(hosts), MAX_TXN_OPS)))

    async def latest_predictions(self) -> dict[str, Prediction]:
        snap = await self._kv.range(self._key("predictions") + b"/")
        found = (Prediction(**json.loads(e.value)) for e in snap.entries)
        return {p.host: p for p in found}

    async def record_decision(self, decision: Decision) -> Decision:
        key = self._key("decisions", f"{decision.ts:020.6f}-{secrets.token_hex(4)}")
        record = asdict(decision)
        record.pop("id")
        await self._txn([Absent(key)], [Put(key, _dumps(record))])
        entry = await self._kv.get(key)
        self._decisions_recorded += 1
        if self._decisions_recorded % _TRIM_EVERY == 0:
            await self._trim_decisions()
        return dataclasses.replace(decision, id=entry.create_revision if entry is not None else 0)

    async def _decision_entries(self) -> list[tuple[int, bytes, dict[str, Any]]]:
        snap = await self._kv.range(self._key("decisions") + b"/")
        return sorted(((e.create_revision, e.key, json.loads(e.value)) for e in snap.entries), reverse=True)

    async def _trim_decisions(self) -> None:
        old = (await self._decision_entries())[DECISIONS_KEPT:]
        for start in range(0, len(old), 100):  # etcd caps the operations in one transaction (128)
            await self._txn([], [Delete(key) for _, key, _ in old[start : start + 100]])

    async def list_decisions(self, host: str | None = None, limit: int = 100) -> list[Decision]:
        out: list[Decision] = []
        for revision, _, record in await self._decision_entries():
            if host is None or record["host"] == host:
                out.append(Decision(**record, id=revision))
                if len(out) >= limit:
                    break
        return out

    async def record_scaling_decision(self, deployment: str, entry: Mapping[str, Any], keep: int) -> None:
        prefix = self._key("scaling", deployment) + b"/"
        key = prefix + secrets.token_hex(8).encode()  # read back in create_revision order
        await self._txn([Absent(key)], [Put(key, _dumps(dict(entry)))])
        count = self._scaling_recorded.get(deployment, 0) + 1
        self._scaling_recorded[deployment] = count
        if count % SCALING_TRIM_EVERY == 0:
            old = sorted((e.create_revision, e.key) for e in (await self._kv.range(prefix)).entries)[:-keep]
            for start in range(0, len(old), 100):  # etcd caps the operations in one transaction (128)
                await self._txn([], [Delete(key) for _, key in old[start : start + 100]])

    async def scaling_decisions(self, deployment: str) -> list[dict[str, Any]]:
        snap = await self._kv.range(self._key("scaling", deployment) + b"/")
        return [json.loads(v) for _, v in sorted((e.create_revision, e.value) for e in snap.entries)]

    async def put_scaling_policy(self, deployment: str, policy: str) -> None:
        await self._txn([], [Put(self._key("scaling-state", deployment, "policy"), _dumps(policy))])

    async def scaling_policy(self, deployment: str) -> str | None:
        entry = await self._kv.get(self._key("scaling-state", deployment, "policy"))
        policy = None if entry is None else json.loads(entry.value)
        return policy if isinstance(policy, str) else None

    async def put_scaling_state(self, deployment: str, state: Mapping[str, Any]) -> None:
        await self._txn([], [Put(self._key("scaling-state", deployment, "state"), _dumps(dict(state)))])

    async def scaling_state(self, deployment: str) -> dict[str, Any] | None:
        entry = await self._kv.get(self._key("scaling-state", deployment, "state"))
        state = None if entry is None else json.loads(entry.value)
        return state if isinstance(state, dict) else None

    async def forget_scaling_decisions(self, deployment: str) -> None:
        old = [e.key for e in (await self._kv.range(self._key("scaling", deployment) + b"/")).entries]
        old += [e.key for e in (await self._kv.range(self._key("scaling-state", deployment) + b"/")).entries]
        for start in range(0, len(old), 100):
            await self._txn([], [Delete(key) for key in old[start : start + 100]])

    async def put_drain(self, drain: Drain) -> None:
        key = self._key("drains", drain.id)
        for attempt in range(MAX_ATTEMPTS):
            entry = await self._kv.get(key)
            guard: Guard
            if entry is None:
                new, guard = drain, Absent(key)
            else:  # like SQLite's upsert: only the state and the finish time change
                old = Drain(**json.loads(entry.value))
                new = dataclasses.replace(old, state=drain.state, finished_at=drain.finished_at)
                guard = ModRevision(key, entry.mod_revision)
            if await self._txn([guard], [Put(key, _dumps(new.to_dict()))]):
                return
            await self._retry_pause(attempt)

    async def list_drains(self, host: str | None = None) -> list[Drain]:
        snap = await self._kv.range(self._key("drains") + b"/")
        found = [Drain(**json.loads(e.value)) for e in snap.entries]
        return sorted((d for d in found if host is None or d.host == host), key=lambda d: d.started_at)

    # ----- deployments: one record per key, written whole by the one task driving the deployment

    async def put_deployment(self, record: DeploymentRecord) -> None:
        body = json.dumps(record.for_storage(), separators=(",", ":")).encode()
        await self._txn([], [Put(self._key("deployments", record.id), body)])

    async def get_deployment(self, deployment_id: str) -> DeploymentRecord | None:
        entry = await self._kv.get(self._key("deployments", deployment_id))
        return None if entry is None else DeploymentRecord.from_storage(json.loads(entry.value))

    async def list_deployments(self) -> list[DeploymentRecord]:
        snap = await self._kv.range(self._key("deployments") + b"/")
        found = [DeploymentRecord.from_storage(json.loads(e.value)) for e in snap.entries]
        return sorted(found, key=lambda r: (r.created_at, r.id))

    # ----- chains: one record per key, written whole by the one task driving the chain

    async def put_chain(self, record: ChainRecord) -> None:
        body = json.dumps(record.for_storage(), separators=(",", ":")).encode()
        await self._txn([], [Put(self._key("chains", record.id), body)])

    async def get_chain(self, chain_id: str) -> ChainRecord | None:
        entry = await self._kv.get(self._key("chains", chain_id))
        return None if entry is None else ChainRecord.from_storage(json.loads(entry.value))

    async def list_chains(self) -> list[ChainRecord]:
        snap = await self._kv.range(self._key("chains") + b"/")
        found = [ChainRecord.from_storage(json.loads(e.value)) for e in snap.entries]
        return sorted(found, key=lambda r: (r.created_at, r.id))

    # ----- catalog: writes land only at the catalog revision the caller read

    def _catalog_revision_key(self) -> bytes:
        return self._key("catalog", "revision")

    def _catalog_entry_key(self, entry_id: str) -> bytes:
        return self._key("catalog", "entries", entry_id)

    async def catalog(self) -> Catalog:
        snap = await self._kv.range(self._key("catalog") + b"/")  # one read: entries and revision agree
        revision = 0
        entries: list[tuple[int, CatalogEntry]] = []
        for e in snap.entries:
            if e.key == self._catalog_revision_key():
                revision = int(json.loads(e.value))
            else:
                entries.append((e.create_revision, CatalogEntry.from_dict(json.loads(e.value))))
        return Catalog(tuple(entry for _, entry in sorted(entries, key=lambda item: item[0])), revision)

    async def _catalog_guard(self, revision: int) -> Guard:
        """The guard that the catalog is still at `revision`; CatalogChanged if it already moved."""
        key = self._catalog_revision_key()
        entry = await self._kv.get(key)
        current = 0 if entry is None else int(json.loads(entry.value))
        if current != revision:
            raise CatalogChanged(f"the catalog moved from revision {revision} to {current}")
        return Absent(key) if entry is None else ModRevision(key, entry.mod_revision)

    async def add_catalog_entry(self, entry: CatalogEntry, revision: int) -> int:
        key = self._catalog_entry_key(entry.id)
        for attempt in range(MAX_ATTEMPTS):
            guard = await self._catalog_guard(revision)
            if await self._kv.get(key) is not None:
                raise CatalogEntryExists(f"{entry.id} is already in the catalog")
            ops = [Put(self._catalog_revision_key(), _dumps(revision + 1)), Put(key, _dumps(entry.to_dict()))]
            if await self._txn([guard, Absent(key)], ops):
                return revision + 1
            await self._retry_pause(attempt)  # the next round names what moved
        raise AssertionError("unreachable")

    async def remove_catalog_entries(self, ids: Sequence[str], revision: int) -> int:
        if len(ids) >= MAX_TXN_OPS:
            raise InvalidRequest(f"at most {MAX_TXN_OPS - 1} catalog entries can be removed at once")
        for attempt in range(MAX_ATTEMPTS):
            guard = await self._catalog_guard(revision)
            ops: list[Put | Delete] = [Put(self._catalog_revision_key(), _dumps(revision + 1))]
            ops += [Delete(self._catalog_entry_key(entry_id)) for entry_id in ids]
            if await self._txn([guard], ops):
                return revision + 1
            await self._retry_pause(attempt)
        raise AssertionError("unreachable")

    # ----- drain models activated at run time: the bytes under their digest, the slots naming them

    async def model_slots(self) -> ModelSlots | None:
        entry = await self._kv.get(self._key("models", "slots"))
        if entry is None:
            return None
        names = json.loads(entry.value)

        async def blob(sha: str | None) -> StoredModel | None:
            if not sha:
                return None
            found = await self._kv.get(self._key("models", "blobs", sha))
            if found is None:
                raise EtcdError(f"the stored drain model {sha} is missing from etcd")
            return StoredModel(sha, found.value)

        active = await blob(names["active"])
        assert active is not None
        return ModelSlots(active, await blob(names.get("previous")))

    async def set_model_slots(self, slots: ModelSlots) -> None:
        models = [m for m in (slots.active, slots.previous) if m is not None]
        for model in models:  # all checked before anything is written
            if len(model.data) > MAX_MODEL_BYTES:
                raise InvalidRequest(
                    f"the drain model {model.sha256} has {len(model.data)} bytes: more than the "
                    f"{MAX_MODEL_BYTES} a model kept in etcd may have"
                )
        for model in models:
            key = self._key("models", "blobs", model.sha256)
            await self._txn([Absent(key)], [Put(key, model.data)])  # False: already there
        previous = slots.previous.sha256 if slots.previous else None
        names = _dumps({"active": slots.active.sha256, "previous": previous})
        await self._txn([], [Put(self._key("models", "slots"), names)])
        blobs = self._key("models", "blobs") + b"/"
        keep = {blobs + m.sha256.encode() for m in models}
        stale = [Delete(e.key) for e in (await self._kv.range(blobs)).entries if e.key not in keep]
        if stale:
            await self._txn([], stale)
