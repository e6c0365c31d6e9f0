"""The leader election driver: campaigns, keeps the lease alive, and steps down in time.

The decisions are in coordinator/leadership.py (the role table and the acting deadline); this module
does the I/O. Every replica keeps one lease alive and tries, every `renew_every(ttl)`, to put the
leader key (`PREFIX leader`, value: the replica's URL) with it if the key is absent. The replica that
wins is the leader for as long as its lease lives; when its process dies, etcd deletes the key when
the lease expires (at most `ttl` seconds) and the next campaign elects another replica. A leader that
stops cleanly revokes its lease, so the next leader is elected within one campaign period.

The same lease holds the replica's own key (`PREFIX replicas/URL`): every round reads which replicas
are live (`others_live`), so a leader knows whether it may leave the agents' pushes to followers
(`reads_replicas=False` skips the read where that is never asked: `leader_takes_pushes = "always"`).

`on_change(role, term)` is called on every change of role, before anything else happens; the
coordinator starts or stops its leader-only work there. The store is fenced with the term's revision
while leading, so a replica that was replaced cannot write even before it notices.

The coordinator runs the rounds on a thread of their own (`run_in_thread`), with their own event
loop and etcd client: a main loop busy with 10 000 agents' pushes and handshakes, or a tick, cannot
delay a keep-alive past the lease. What crosses threads: the acting deadline (one float, written by
the rounds, read by `acting()`), the leader's URL (one str), and each change of role, handed to the
main loop with `call_soon_threadsafe`, where the fence is set and `on_change` called, in order.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from coordinator.etcd.kv import Absent, EtcdError, EtcdKV, Put
from coordinator.etcd.store import EtcdStore
from coordinator.leadership import Event, Role, Term, acting_deadline, next_role, renew_every
from core.errors import ConfigError

log = logging.getLogger(__name__)


class Election:
    def __init__(
        self,
        kv: EtcdKV,
        store: EtcdStore,
        replica: str,
        *,
        ttl: int = 5,
        on_change: Callable[[Role, Term | None], None] = lambda role, term: None,
        clock: Callable[[], float] = time.monotonic,
        reads_replicas: bool = True,
    ) -> None:
        if ttl < 2:
            raise ValueError("a leader lease lives at least 2 seconds")
        self._kv = kv
        self.store = store
        """The store whose writes this election fences."""
        self.replica = replica
        self.ttl = ttl
        self._on_change = on_change
        self._clock = clock
        self._reads_replicas = reads_replicas
        """Whether rounds read the other replicas' keys (`others_live`); this replica's own key is
        put either way, so others can count it."""
        self.role = Role.FOLLOWER
        """The role as the coordinator acts on it (set where `on_change` is called)."""
        self.term: Term | None = None
        self.leader = ""
        """The leading replica's URL as last seen ("" when unknown)."""
        self._role = Role.FOLLOWER
        """The role as the rounds know it; `role` follows once the change is handed over."""
        self._term: Term | None = None
        self._lease = 0
        self._announced = 0
        """The lease our replica key was last put with (0: none)."""
        self.others_live: tuple[str, ...] = ()
        """The other replicas whose keys were present at the last round (their URLs)."""
        self._deadline = 0.0
        self._hand_over: Callable[[Callable[[], None]], object] = lambda change: change()
        """How a change of role reaches the coordinator: at once, or on its loop (run_in_thread)."""
        self._rounds_loop: asyncio.AbstractEventLoop | None = None

    def acting(self) -> bool:
        """This replica leads and its lease cannot have expired yet: it may decide and write."""
        return self.role is Role.LEADER and self._clock() < self._deadline

    def _apply(self, event: Event, term: Term | None = None) -> None:
        before = self._role
        self._role = next_role(before, event)
        if self._role is Role.LEADER and before is not Role.LEADER:
            self._term = term
            self.leader = self.replica
        elif self._role is Role.FOLLOWER and before is Role.LEADER:
            self._term = None
            self._deadline = 0.0  # acting() is False from now, before the change is handed over
        if self._role is not before:
            role, new_term = self._role, self._term
            self._hand_over(lambda: self._changed(role, new_term, event))

    def _changed(self, role: Role, term: Term | None, event: Event) -> None:
        """A change of role, where the coordinator acts: fence the store, then tell it."""
        if role is Role.LEADER:
            self.store.fence(term.revision if term else None)
        # A follower keeps the fence at the ended term: writes fail with NotLeader until the
        # coordinator has stopped its leader-only work (and lifts it) or the next win.
        self.role, self.term = role, term
        log.info("leadership changed", extra={"role": role.value, "replica": self.replica, "event": event})
        self._on_change(role, term)

    async def _lease_alive(self) -> float:
        """Keep our lease alive (a new one if it is gone): when the keep-alive was sent, or -1."""
        sent = self._clock()
        left = await self._kv.keepalive(self._lease) if self._lease else 0
        if left <= 0:
            sent = self._clock()
            self._lease = await self._kv.grant(self.ttl)
            left = self.ttl
        self._deadline = acting_deadline(sent, left)
        return sent

    async def _see_replicas(self) -> None:
        """Put our replica key with our lease (once per lease), and note which others are live."""
        prefix = self.store.replicas_prefix
        if self._lease and self._announced != self._lease:
            await self._kv.txn([], [Put(prefix + self.replica.encode(), b"", self._lease)])
            self._announced = self._lease
        if not self._reads_replicas:
            return
        live = (e.key[len(prefix) :].decode(errors="replace") for e in (await self._kv.range(prefix)).entries)
        self.others_live = tuple(url for url in live if url != self.replica)

    async def _campaign(self) -> None:
        key = self.store.leader_key
        await self._lease_alive()
        await self._kv.txn([Absent(key)], [Put(key, self.replica.encode(), self._lease)])
        entry = await self._kv.get(key)
        if entry is not None and entry.value == self.replica.encode():
            self._apply(Event.WON, Term(entry.mod_revision, self._lease))
        else:
            self.leader = "" if entry is None else entry.value.decode(errors="replace")
            self._apply(Event.OTHER_LEADS)

    async def _renew(self) -> None:
        sent = self._clock()
        left = await self._kv.keepalive(self._lease)
        entry = await self._kv.get(self.store.leader_key)
        if left <= 0:
            self._lease = 0
            self.leader = "" if entry is None else entry.value.decode(errors="replace")
            self._apply(Event.LOST)
            return
        if entry is None or self._term is None or entry.mod_revision != self._term.revision:
            self.leader = "" if entry is None else entry.value.decode(errors="replace")
            self._apply(Event.OTHER_LEADS)
            return
        self._deadline = acting_deadline(sent, left)
        self._apply(Event.RENEWED)

    async def step(self) -> None:
        """One round: campaign (follower) or renew (leader); past the deadline a leader steps down
        whether or not etcd answered."""
        try:
            if self._role is Role.FOLLOWER:
                await self._campaign()
            else:
                await self._renew()
            await self._see_replicas()
        except EtcdError as exc:
            log.warning("leader election round failed", extra={"replica": self.replica, "error": exc.message})
        if self._role is Role.LEADER and self._clock() >= self._deadline:
            self._lease = 0
            self._apply(Event.LOST)

    async def run(self, stop: asyncio.Event) -> None:
        """Rounds every renew_every(ttl) until `stop`; then resign (revoke the lease) if leading."""
        period = renew_every(self.ttl)
        try:
            while not stop.is_set():
                await self.step()
                wait = period
                if self._role is Role.LEADER:  # wake up at the deadline at the latest
                    wait = max(0.0, min(period, self._deadline - self._clock()))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), wait)
        finally:
            await self.resign()

    async def resign(self) -> None:
        """Give up leadership now (the key goes with the lease) and stop acting."""
        lease, self._lease = self._lease, 0
        if self._role is Role.LEADER:
            self._apply(Event.LOST)
        if lease:
            with contextlib.suppress(EtcdError):
                await self._kv.revoke(lease)

    async def run_in_thread(self, stop: asyncio.Event) -> None:
        """`run` on a thread with its own event loop, until `stop`; the etcd client given to this
        election must be its own (not the store's: a gRPC channel serves one loop). Changes of role
        are handed to the calling loop; the lease is revoked and the client closed before this returns."""
        main = asyncio.get_running_loop()
        self._hand_over = main.call_soon_threadsafe
        started: concurrent.futures.Future[asyncio.Event] = concurrent.futures.Future()
        ended: concurrent.futures.Future[None] = concurrent.futures.Future()

        async def rounds() -> None:
            self._rounds_loop = asyncio.get_running_loop()
            rounds_stop = asyncio.Event()
            started.set_result(rounds_stop)
            try:
                await self.run(rounds_stop)
            finally:
                await self._kv.close()

        def thread() -> None:
            try:
                asyncio.run(rounds())
            except BaseException as exc:  # told to the main loop, which raises it
                if not started.done():
                    started.set_exception(exc)
                ended.set_exception(exc)
            else:
                ended.set_result(None)

        threading.Thread(target=thread, name=f"election-{self.replica}", daemon=True).start()
        rounds_stop = await asyncio.wrap_future(started)
        finished = asyncio.wrap_future(ended)
        stopping = asyncio.create_task(stop.wait(), name="election-stop")
        either: set[asyncio.Future[Any]] = {finished, stopping}
        try:
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            loop = self._rounds_loop
            if loop is not None and not ended.done():
                loop.call_soon_threadsafe(rounds_stop.set)
            await asyncio.shield(finished)  # the lease revoked, the role handed over, the client closed

    def reload_tls(self) -> None:
        """SIGHUP: the election's own etcd client, on its thread, reads its TLS files again (refused
        files are logged, and the current ones kept). Nothing to do when the rounds share the
        store's client (not run_in_thread)."""

        def reload() -> None:
            try:
                self._kv.reload_tls()
            except ConfigError as exc:
                log.error(f"etcd tls reload refused for the election: {exc.message}", extra={"code": exc.code})

        loop = self._rounds_loop
        if loop is not None and loop.is_running():
            loop.call_soon_threadsafe(reload)
