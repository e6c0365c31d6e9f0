"""The layer tracker: which hosts hold, or are fetching, which blob.

Agents ask it where to fetch a blob before they go to the registry (agent/images/directory.py).
Two kinds of facts feed it:
- what a host holds for good, from each registration (its `layer_digests`, re-sent every minute and
  kept in the store, so a restarted coordinator starts from the hosts' last registrations);
- what a host has started to fetch or has just committed, from its announcements. Those are hints
  that expire (`[tracker] fetching_ttl`) unless a registration confirms them: a host that crashed
  mid-pull stops being named after that long, and a host wrongly named costs its peers one probe,
  since they ask the host itself what it holds before they read from it.

This module keeps the index only (no I/O, no clock of its own): coordinator/layers.py drives it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Holding:
    host: str
    complete: bool
    """False while the host is still fetching the blob (it serves the bytes it has)."""


class LayerTracker:
    def __init__(self, fetching_ttl: float) -> None:
        self._fetching_ttl = fetching_ttl
        self._held: dict[str, set[str]] = {}
        """digest -> hosts that registered it, or announced it committed."""
        self._fetching: dict[str, dict[str, float]] = {}
        """digest -> host -> when the hint expires."""
        self._by_host: dict[str, set[str]] = {}
        """host -> digests in _held: what a new registration replaces."""

    def registered(self, host: str, digests: Iterable[str]) -> None:
        """`host` holds exactly `digests` now (a registration); its fetches of them are done."""
        new = set(digests)
        old = self._by_host.get(host, set())
        for digest in old - new:
            self._discard(self._held, digest, host)
        for digest in new - old:
            self._held.setdefault(digest, set()).add(host)
            self._discard(self._fetching, digest, host)
        self._by_host[host] = new

    def announced(
        self,
        host: str,
        now: float,
        fetching: Iterable[str] = (),
        holding: Iterable[str] = (),
        dropped: Iterable[str] = (),
    ) -> None:
        held = self._by_host.setdefault(host, set())
        for digest in fetching:
            if digest not in held:
                self._fetching.setdefault(digest, {})[host] = now + self._fetching_ttl
        for digest in holding:
            self._discard(self._fetching, digest, host)
            self._held.setdefault(digest, set()).add(host)
            held.add(digest)
        for digest in dropped:
            self._discard(self._fetching, digest, host)
            self._discard(self._held, digest, host)
            held.discard(digest)

    def forget(self, host: str) -> None:
        """A host that left the fleet: name it for nothing."""
        for digest in self._by_host.pop(host, set()):
            self._discard(self._held, digest, host)
        for digest in [d for d, hosts in self._fetching.items() if host in hosts]:
            self._discard(self._fetching, digest, host)

    def holders(self, digest: str, now: float) -> list[Holding]:
        """Who has `digest`: complete holders first, then hosts fetching it; each group by name."""
        out = [Holding(host, True) for host in sorted(self._held.get(digest, ()))]
        fetching = self._fetching.get(digest, {})
        for host, expires in sorted(fetching.items()):
            if expires > now:
                out.append(Holding(host, False))
        expired = [host for host, expires in fetching.items() if expires <= now]
        for host in expired:
            self._discard(self._fetching, digest, host)
        return out

    def held_by(self, host: str) -> frozenset[str]:
        """What `host` holds, as registered or announced since."""
        return frozenset(self._by_host.get(host, ()))

    def digests(self) -> int:
        """Distinct blobs the tracker names a holder for (a gauge)."""
        return len(self._held.keys() | self._fetching.keys())

    @staticmethod
    def _discard(index: dict[str, set[str]] | dict[str, dict[str, float]], digest: str, host: str) -> None:
        hosts = index.get(digest)
        if hosts is None:
            return
        if isinstance(hosts, dict):
            hosts.pop(host, None)
        else:
            hosts.discard(host)
        if not hosts:
            del index[digest]
