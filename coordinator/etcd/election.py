"""The leader election driver: campaigns, keeps the lease alive, and steps down in time.

The decisions are in coordinator/leadership.py (the role table and the acting deadline); this module
does the I/O. Every replica keeps one lease alive and tries, every `renew_every(ttl)`, to put the
leader key (`PREFIX leader`, value: the replica's URL) with it if the key is absent. The replica that
wins is the leader for as long as its lease lives; when its process dies, etcd deletes the key when
the lease expires (at most `ttl` seconds) and the next campaign elects another replica. A leader that
stops cleanly revokes its lease, so the next leader is elected within one campaign period.

`on_change(role, term)` is called on every change of role, before anything else happens; the
coordinator starts or stops its leader-only work there. The store is fenced with the term's revision
while leading, so a replica that was replaced cannot write even before it notices.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from coordinator.etcd.kv import Absent, EtcdError, EtcdKV, Put
from coordinator.etcd.store import EtcdStore
from coordinator.leadership import Event, Role, Term, acting_deadline, next_role, renew_every

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
        self.role = Role.FOLLOWER
        self.term: Term | None = None
        self.leader = ""
        """The leading replica's URL as last seen ("" when unknown)."""
        self._lease = 0
        self._deadline = 0.0

    def acting(self) -> bool:
        """This replica leads and its lease cannot have expired yet: it may decide and write."""
        return self.role is Role.LEADER and self._clock() < self._deadline

    def _apply(self, event: Event, term: Term | None = None) -> None:
        before = self.role
        self.role = next_role(self.role, event)
        if self.role is Role.LEADER and before is not Role.LEADER:
            self.term = term
            self.leader = self.replica
            self.store.fence(term.revision if term else None)
        elif self.role is Role.FOLLOWER and before is Role.LEADER:
            # The fence stays at the ended term: writes fail with NotLeader until the next win.
            self.term = None
        if self.role is not before:
            log.info("leadership changed", extra={"role": self.role.value, "replica": self.replica, "event": event})
            self._on_change(self.role, self.term)

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
        if entry is None or self.term is None or entry.mod_revision != self.term.revision:
            self.leader = "" if entry is None else entry.value.decode(errors="replace")
            self._apply(Event.OTHER_LEADS)
            return
        self._deadline = acting_deadline(sent, left)
        self._apply(Event.RENEWED)

    async def step(self) -> None:
        """One round: campaign (follower) or renew (leader); past the deadline a leader steps down
        whether or not etcd answered."""
        try:
            if self.role is Role.FOLLOWER:
                await self._campaign()
            else:
                await self._renew()
        except EtcdError as exc:
            log.warning("leader election round failed", extra={"replica": self.replica, "error": exc.message})
        if self.role is Role.LEADER and self._clock() >= self._deadline:
            self._lease = 0
            self._apply(Event.LOST)

    async def run(self, stop: asyncio.Event) -> None:
        """Rounds every renew_every(ttl) until `stop`; then resign (revoke the lease) if leading."""
        period = renew_every(self.ttl)
        try:
            while not stop.is_set():
                await self.step()
                wait = period
                if self.role is Role.LEADER:  # wake up at the deadline at the latest
                    wait = max(0.0, min(period, self._deadline - self._clock()))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), wait)
        finally:
            await self.resign()

    async def resign(self) -> None:
        """Give up leadership now (the key goes with the lease) and stop acting."""
        lease, self._lease = self._lease, 0
        if self.role is Role.LEADER:
            self._apply(Event.LOST)
        if lease:
            with contextlib.suppress(EtcdError):
                await self._kv.revoke(lease)
