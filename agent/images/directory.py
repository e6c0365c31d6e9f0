"""Which peers to ask for a blob: the coordinator's layer tracker, else the static `[[peers]]`.

With a coordinator, the tracker names the hosts that hold or are fetching each blob, with their
blob server addresses (coordinator/tracker.py), and this host announces each blob it starts to
fetch, so hosts that pull one image at once find each other while they download. The static
`[[peers]]` are asked too, and alone whenever the tracker does not answer (no coordinator, or one
that is down or slow: each call is bounded by `[sharing] probe_timeout`). Either way a peer is only a
candidate: the pull asks it what it holds before it reads, and checks every byte by digest.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Protocol

from agent.metrics import AgentMetrics
from agent.sharing.client import Peer
from agent.telemetry.tracker import TrackerUnavailable
from proto.ferryman.v1 import fleet_pb2 as pb

log = logging.getLogger(__name__)


class PeerDirectory(Protocol):
    @property
    def empty(self) -> bool:
        """True when no peer can ever be named (no tracker, no static peers): pulls skip peers."""
        ...

    async def peers(self, digest: str | None) -> list[Peer]:
        """Candidates for `digest` (None: every peer that serves blobs), holders first."""
        ...

    async def fetching(self, digest: str) -> None:
        """This host has started to fetch `digest` (servable to peers as it arrives)."""
        ...


class Tracker(Protocol):
    """agent.telemetry.tracker.TrackerClient, or a fake."""

    async def holders(self, digests: Sequence[str]) -> list[pb.LayerHolder]: ...

    async def announce(self, fetching: Sequence[str] = (), dropped: Sequence[str] = ()) -> None: ...


class StaticPeers:
    """The `[[peers]]` with a blob address, read at each call (a config reload changes them)."""

    def __init__(self, peers: Callable[[], Sequence[Peer]]) -> None:
        self._peers = peers

    @property
    def empty(self) -> bool:
        return not self._peers()

    async def peers(self, digest: str | None) -> list[Peer]:
        return list(self._peers())

    async def fetching(self, digest: str) -> None:
        return None


class TrackedPeers:
    def __init__(self, tracker: Tracker, static: Callable[[], Sequence[Peer]], metrics: AgentMetrics) -> None:
        self._tracker = tracker
        self._static = static
        self._metrics = metrics
        self._reachable = True

    @property
    def empty(self) -> bool:
        return False

    async def peers(self, digest: str | None) -> list[Peer]:
        static = list(self._static())
        try:
            holders = await self._tracker.holders([digest] if digest is not None else [])
        except TrackerUnavailable as exc:
            self._failed("holders", exc)
            return static
        self._ok("holders")
        named = {h.host: Peer(h.host, h.blob_address) for h in holders if h.blob_address}
        return [*named.values(), *(p for p in static if p.name not in named)]

    async def fetching(self, digest: str) -> None:
        try:
            await self._tracker.announce(fetching=[digest])
        except TrackerUnavailable as exc:
            self._failed("announce", exc)
            return
        self._ok("announce")

    def _ok(self, call: str) -> None:
        self._metrics.tracker_calls.labels(call=call, result="ok").inc()
        if not self._reachable:
            log.info("layer tracker reachable again")
        self._reachable = True

    def _failed(self, call: str, exc: TrackerUnavailable) -> None:
        self._metrics.tracker_calls.labels(call=call, result="failed").inc()
        if self._reachable:  # log the transition, not every pull
            log.warning("layer tracker unavailable; asking the static [[peers]]", extra={"error": str(exc)})
        self._reachable = False
