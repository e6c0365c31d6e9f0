"""The etcd adapter: reads, ranges and guarded transactions over aetcd, in our own types.

This is the only module that imports aetcd (and gRPC, for TLS credentials); an import-linter
contract keeps it so. What leaves it: `Entry`, `Snapshot` and `EtcdUnavailable`.

Endpoints: one channel at a time, to one member. When a call fails because that member cannot be
reached or cannot answer in time (it is down, or cut off from the quorum), the adapter moves to the
next endpoint and retries the call there, once per endpoint. That is safe for every call here: reads
are idempotent, and the store only writes with transactions guarded by revisions, so a retried write
whose first try did commit finds its guard false and re-reads.

Errors: EtcdUnavailable (503) when no endpoint answers; any other etcd error is EtcdError (500).

TLS: the CA, certificate and key files are read and checked when the client is made, and again by
`reload_tls()` (the coordinator's SIGHUP): later calls connect with the new files, calls under way
finish on the old channel, which closes after `timeout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aetcd
import aetcd.exceptions
import aetcd.rpc
import aetcd.utils
import aetcd.watcher
import grpc

from core.errors import ConfigError, FerrymanError

log = logging.getLogger(__name__)
T = TypeVar("T")


class EtcdError(FerrymanError):
    code = "store_error"
    http_status = 500


class EtcdUnavailable(EtcdError):
    """No endpoint answered (down, or no quorum): nothing was decided."""

    code = "store_unavailable"
    http_status = 503


@dataclass(frozen=True, slots=True)
class Entry:
    key: bytes
    value: bytes
    mod_revision: int
    create_revision: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The entries of a range, and the store revision they were read at."""

    entries: tuple[Entry, ...]
    revision: int


@dataclass(frozen=True, slots=True)
class Changes:
    """The entries of a range written after a revision, how many keys the whole range holds, and the
    store revision of the read (one read: the three agree)."""

    entries: tuple[Entry, ...]
    count: int
    revision: int


# ----- transaction guards (all must hold for the writes to apply)


@dataclass(frozen=True, slots=True)
class Unchanged:
    """No key in [key, range_end) (just `key` when range_end is empty) was written after `revision`;
    a key deleted since is not seen (deletions only ever free room here)."""

    key: bytes
    revision: int
    range_end: bytes = b""


@dataclass(frozen=True, slots=True)
class Absent:
    """`key` does not exist."""

    key: bytes


@dataclass(frozen=True, slots=True)
class ModRevision:
    """`key` exists and was last written at `revision` (a fencing token: the leader's key)."""

    key: bytes
    revision: int


Guard = Unchanged | Absent | ModRevision


@dataclass(frozen=True, slots=True)
class Put:
    key: bytes
    value: bytes
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Delete:
    key: bytes


Op = Put | Delete


@dataclass(frozen=True)
class EtcdTls:
    ca_file: str
    cert_file: str = ""
    key_file: str = ""
    server_name: str = ""
    """The name the members' certificates carry when the endpoints are addresses."""


def prefix_end(prefix: bytes) -> bytes:
    """The range end that covers every key starting with `prefix`."""
    return bytes(aetcd.utils.prefix_range_end(prefix))


MAX_RESPONSE_BYTES = 512 << 20
"""The largest etcd answer read. gRPC's default (4 MiB) refused a list of every host key from some
1 500 hosts on (a host key with its telemetry summary and history share is about 3 KB): 10 000 hosts
are some 32 MB, read whole at a replica's first listing (later ones read what changed)."""


class _Client(aetcd.Client):
    """aetcd's client with a TLS channel when configured (aetcd 1.x opens insecure channels only)."""

    def __init__(self, target: str, credentials: grpc.ChannelCredentials | None, timeout: float, options: Any) -> None:
        host, _, port = target.rpartition(":")
        super().__init__(host=host, port=int(port), timeout=timeout, options=options)  # type: ignore[arg-type]
        self._target = target
        self._credentials = credentials

    async def connect(self) -> None:
        if self._credentials is None:
            await super().connect()
            return
        if self._connected.is_set():
            return
        # The same steps as aetcd.Client.connect, on a secure channel.
        self.channel = grpc.aio.secure_channel(self._target, self._credentials, options=list(self._options.items()))
        self.kvstub = aetcd.rpc.KVStub(self.channel)
        self.clusterstub = aetcd.rpc.ClusterStub(self.channel)
        self.leasestub = aetcd.rpc.LeaseStub(self.channel)
        self.maintenancestub = aetcd.rpc.MaintenanceStub(self.channel)
        self._watcher = aetcd.watcher.Watcher(
            aetcd.rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
        )
        self._connected.set()

    async def range_changed(self, key: bytes, range_end: bytes, min_mod_revision: int) -> Any:
        """etcd's Range with `min_mod_revision`, which aetcd 1.x does not pass on: the keys of
        [key, range_end) written at or after that revision; `count` is still the whole range's."""
        await self.connect()
        request = aetcd.rpc.RangeRequest(key=key, range_end=range_end, min_mod_revision=min_mod_revision)
        try:
            return await self.kvstub.Range(request, timeout=self._timeout, metadata=self.metadata)
        except aetcd.rpc.AioRpcError as exc:
            aetcd.exceptions._handle_exception(exc)  # aetcd's own mapping to its ClientError tree


NO_QUORUM = ("context deadline exceeded", "request timed out", "no leader", "leader changed")
"""What an etcd member answers, as a plain error, when it cannot get its cluster's agreement in time."""


def without_quorum(exc: Exception) -> bool:
    """Whether an etcd error says the member could not reach a quorum (not that the request was bad)."""
    text = str(exc).lower()
    return any(words in text for words in NO_QUORUM)


def _credentials(tls: EtcdTls | None) -> tuple[grpc.ChannelCredentials | None, list[tuple[str, Any]]]:
    if tls is None:
        return None, []
    try:
        ca = Path(tls.ca_file).read_bytes()
        cert = Path(tls.cert_file).read_bytes() if tls.cert_file else None
        key = Path(tls.key_file).read_bytes() if tls.key_file else None
    except OSError as exc:
        raise ConfigError(f"store: cannot read an etcd TLS file: {exc}") from exc
    if (cert is None) != (key is None):
        raise ConfigError("store: etcd_cert_file and etcd_key_file go together")
    # Checked now, not at the first handshake: a reload with files that do not load keeps the old ones.
    scratch = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        scratch.load_verify_locations(cadata=ca.decode("ascii", errors="replace"))
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"store: {tls.ca_file} holds no CA certificate OpenSSL can load: {exc}") from exc
    if cert is not None:
        try:
            scratch.load_cert_chain(tls.cert_file, tls.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"store: {tls.key_file} does not fit {tls.cert_file}: {exc}") from exc
    options: list[tuple[str, Any]] = []
    if tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert), options


class EtcdKV:
    """A connection to an etcd cluster through one of `endpoints` ("host:port") at a time."""

    def __init__(self, endpoints: Sequence[str], *, tls: EtcdTls | None = None, timeout: float = 5.0) -> None:
        if not endpoints:
            raise ConfigError("store: etcd_endpoints must name at least one member")
        for endpoint in endpoints:
            host, sep, port = endpoint.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ConfigError(f"store: etcd endpoint {endpoint!r} is not host:port")
        self.endpoints = tuple(endpoints)
        self._tls = tls
        self._credentials, self._options = _credentials(tls)
        self._options.append(("grpc.max_receive_message_length", MAX_RESPONSE_BYTES))
        self._retiring: set[asyncio.Task[None]] = set()
        """Channels replaced by a TLS reload, closed once the calls under way on them are done."""
        self._timeout = timeout
        self._current = 0
        self._client: _Client | None = None
        self._switch = asyncio.Lock()

    def copy(self) -> EtcdKV:
        """A client of its own to the same cluster, with the same TLS files and timeout (for another
        thread's event loop: a gRPC channel serves the loop it was opened on)."""
        return EtcdKV(self.endpoints, tls=self._tls, timeout=self._timeout)

    def _connect(self) -> _Client:
        if self._client is None:
            self._client = _Client(self.endpoints[self._current], self._credentials, self._timeout, dict(self._options))
        return self._client

    async def _next_endpoint(self, failed: _Client) -> None:
        async with self._switch:
            if self._client is not failed:  # another call has already moved on
                return
            self._client = None
            self._current = (self._current + 1) % len(self.endpoints)
        try:
            await failed.close()
        except Exception:  # the channel is being dropped because it failed
            log.debug("closing a failed etcd channel", exc_info=True)

    async def _call(self, what: str, fn: Callable[[_Client], Awaitable[T]]) -> T:
        last: Exception | None = None
        for _ in range(len(self.endpoints)):
            client = self._connect()
            try:
                return await fn(client)
            except (aetcd.ConnectionFailedError, aetcd.ConnectionTimeoutError) as exc:
                last = exc
                log.warning(
                    "etcd endpoint failed; trying the next",
                    extra={"endpoint": self.endpoints[self._current], "call": what, "error": str(exc)},
                )
                await self._next_endpoint(client)
            except aetcd.ClientError as exc:
                if without_quorum(exc):  # not retried: a write may still be applied once the quorum is back
                    raise EtcdUnavailable(f"etcd {what}: the cluster has no quorum: {exc}") from exc
                raise EtcdError(f"etcd {what}: {exc}") from exc
        raise EtcdUnavailable(f"etcd {what}: no endpoint of {list(self.endpoints)} answered: {last}") from last

    async def get(self, key: bytes) -> Entry | None:
        async def op(c: _Client) -> Entry | None:
            kv = await c.get(key)
            return None if kv is None else Entry(kv.key, kv.value, kv.mod_revision, kv.create_revision)

        return await self._call("get", op)

    async def range(self, prefix: bytes) -> Snapshot:
        """Every key under `prefix`, in key order, with the revision of the read."""

        async def op(c: _Client) -> Snapshot:
            got = await c.get_prefix(prefix)
            entries = tuple(Entry(kv.key, kv.value, kv.mod_revision, kv.create_revision) for kv in got)
            return Snapshot(entries, got.header.revision)

        return await self._call("range", op)

    async def changed_since(self, prefix: bytes, revision: int) -> Changes:
        """The keys under `prefix` written after `revision` (a deleted key is not among them: compare
        `count` with the keys known), with the whole range's count and the revision of the read."""

        async def op(c: _Client) -> Changes:
            got = await c.range_changed(prefix, prefix_end(prefix), revision + 1)
            entries = tuple(Entry(kv.key, kv.value, kv.mod_revision, kv.create_revision) for kv in got.kvs)
            return Changes(entries, int(got.count), int(got.header.revision))

        return await self._call("range", op)

    async def watch(self, prefix: bytes, start_revision: int) -> AsyncIterator[tuple[bool, Entry]]:
        """Every put and delete under `prefix` from `start_revision` on, in revision order, as
        (deleted, entry); a deleted entry has no value and the deletion's revision. Runs until the
        caller stops iterating; EtcdError when the stream fails (the member went away, the start
        revision was compacted): the caller reads again and watches anew."""
        client = self._connect()
        try:
            watch = await client.watch_prefix(prefix, start_revision=start_revision)
        except aetcd.ClientError as exc:
            raise EtcdError(f"etcd watch: {exc}") from exc
        try:
            async for event in watch:
                kv = event.kv
                yield event.kind == "DELETE", Entry(kv.key, kv.value, kv.mod_revision, kv.create_revision)
        except aetcd.ClientError as exc:
            raise EtcdError(f"etcd watch: {exc}") from exc
        finally:
            with contextlib.suppress(Exception):  # the stream is being dropped either way
                await watch.cancel()

    async def txn(self, guards: Sequence[Guard], ops: Sequence[Op]) -> bool:
        """Apply `ops` in one transaction if every guard holds; whether they were applied."""
        return await self.txn_revision(guards, ops) is not None

    async def txn_revision(self, guards: Sequence[Guard], ops: Sequence[Op]) -> int | None:
        """`txn`, answering the store revision the transaction wrote at (every key it put now has
        that mod revision; 0 when it had no put), or None when a guard failed and nothing was applied."""

        async def op(c: _Client) -> int | None:
            t = c.transactions
            compare: list[Any] = []
            for g in guards:
                if isinstance(g, Unchanged):
                    compare.append(t.mod(g.key, g.range_end or None) < g.revision + 1)
                elif isinstance(g, Absent):
                    compare.append(t.version(g.key) == 0)
                else:
                    compare.append(t.mod(g.key) == g.revision)
            success = [t.put(o.key, o.value, o.lease or None) if isinstance(o, Put) else t.delete(o.key) for o in ops]
            ok, responses = await c.transaction(compare=compare, success=success, failure=[])
            if not ok:
                return None
            puts = [r.response_put for r in responses if r.WhichOneof("response") == "response_put"]
            return int(puts[0].header.revision) if puts else 0

        return await self._call("transaction", op)

    # ----- leases (leadership)

    async def grant(self, ttl: int) -> int:
        """A new lease of `ttl` seconds; its id."""

        async def op(c: _Client) -> int:
            return int((await c.lease(ttl)).id)

        return await self._call("lease grant", op)

    async def keepalive(self, lease: int) -> int:
        """Refresh `lease`: the seconds it now has left, 0 if it has expired or was revoked."""

        async def op(c: _Client) -> int:
            reply = await c.refresh_lease(lease)
            return 0 if reply is None else max(0, int(reply.TTL))

        return await self._call("lease keep-alive", op)

    async def revoke(self, lease: int) -> None:
        """End `lease` now: etcd deletes every key attached to it."""

        async def op(c: _Client) -> None:
            try:
                await c.revoke_lease(lease)
            except aetcd.ClientError as exc:
                if "requested lease not found" not in str(exc):
                    raise

        await self._call("lease revoke", op)

    def reload_tls(self) -> bool:
        """Read and check the TLS files again; calls from now on connect with them. False without TLS;
        ConfigError, with the current files still in use, when they do not load."""
        if self._tls is None:
            return False
        self._credentials, self._options = _credentials(self._tls)
        old, self._client = self._client, None
        if old is not None:
            task = asyncio.get_running_loop().create_task(self._retire(old), name="etcd-retire-channel")
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        return True

    async def _retire(self, client: _Client) -> None:
        try:
            await asyncio.sleep(self._timeout)  # no call waits longer than this
        finally:
            try:
                await client.close()
            except Exception:  # the channel is being dropped anyway
                log.debug("closing a retired etcd channel", exc_info=True)

    async def close(self) -> None:
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        client, self._client = self._client, None
        if client is not None:
            await client.close()
