"""The layer tracker as a service: registrations and announcements in, holders out.

Holders are named with their blob server address, complete ones first; hosts that are down, that
serve no blobs, or that ask, are left out. A host's complete holdings come from its registrations,
which the store keeps: `seed` rebuilds the index from them when the coordinator starts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from coordinator.metrics import CoordinatorMetrics
from coordinator.model import Host, HostHealth
from coordinator.store import Store
from coordinator.tracker import LayerTracker
from coordinator.wire import check_digests
from core.errors import InvalidRequest
from proto.ferryman.v1 import fleet_pb2


class LayerService:
    def __init__(
        self, store: Store, fetching_ttl: float, clock: Callable[[], float], metrics: CoordinatorMetrics
    ) -> None:
        self._store = store
        self._clock = clock
        self._metrics = metrics
        self.tracker = LayerTracker(fetching_ttl)

    async def seed(self) -> int:
        """The index from the stored registrations; returns the hosts read."""
        hosts = await self._store.list_hosts()
        for host in hosts:
            self.registered(host)
        return len(hosts)

    def registered(self, host: Host) -> None:
        self.tracker.registered(host.name, host.layer_digests)
        self._metrics.tracker_digests.set(self.tracker.digests())

    def announce(self, msg: fleet_pb2.LayerAnnouncement) -> None:
        for kind in ("fetching", "holding", "dropped"):
            check_digests(getattr(msg, kind), f"LayerAnnouncement.{kind}")
        self.tracker.announced(msg.host, self._clock(), msg.fetching, msg.holding, msg.dropped)
        for kind in ("fetching", "holding", "dropped"):
            if n := len(getattr(msg, kind)):
                self._metrics.tracker_announcements.labels(kind=kind).inc(n)
        self._metrics.tracker_digests.set(self.tracker.digests())

    async def holders(self, digests: Sequence[str], asking: str) -> fleet_pb2.LayerHolders:
        check_digests(digests, "LayerHoldersRequest.digests")
        if len(set(digests)) != len(digests):
            raise InvalidRequest("LayerHoldersRequest.digests: a digest is named twice")
        hosts = {
            h.name: h
            for h in await self._store.list_hosts()
            if h.blob_address and h.health is not HostHealth.DOWN and h.name != asking
        }
        out = fleet_pb2.LayerHolders()
        if not digests:
            for name in sorted(hosts):
                out.holders.add(digest="", host=name, blob_address=hosts[name].blob_address, complete=True)
            return out
        now = self._clock()
        for digest in digests:
            found = [h for h in self.tracker.holders(digest, now) if h.host in hosts]
            self._metrics.tracker_lookups.labels(result="hit" if found else "miss").inc()
            for holding in found:
                out.holders.add(
                    digest=digest,
                    host=holding.host,
                    blob_address=hosts[holding.host].blob_address,
                    complete=holding.complete,
                )
        return out
