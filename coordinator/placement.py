"""Target selection: a pure scoring of candidate hosts, and a `Placer` that picks and reserves.

Each term is normalised to 0..1 before weighting (weights in [placement] of the config):
  + free_capacity  headroom left on the tightest resource after the placement (fraction of capacity)
  - drain_risk     the host's own latest P(drain); hosts at or above the threshold are never targets
  - pull_bytes     fraction of the image's bytes the host would have to pull (layers it lacks)
  - pressure       the worst PSI avg10 (cpu/memory/io "some") of its last sample, in 0..1
Hosts that are not ready+active (suspect, down, draining, drained) or cannot fit the need are
excluded outright, never just scored low.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from coordinator.config import PlacementConfig
from coordinator.costs import Breakdown, Rates, time_to_running
from coordinator.model import (
    Capacity,
    Decision,
    Host,
    HostAdmin,
    HostHealth,
    InsufficientCapacity,
    NoTarget,
    Reservation,
)
from coordinator.reservations import ReservationService
from coordinator.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Need:
    capacity: Capacity
    layers: Mapping[str, int] = field(default_factory=dict)
    """Digest -> size of the image's layers, when the caller knows them."""
    image: str = ""
    """The image reference: without layer sizes, a host already running it counts as holding it."""


@dataclass(frozen=True)
class Candidate:
    host: Host
    free: Capacity
    """Free capacity net of container usage and active reservations."""
    risk: float | None = None


@dataclass(frozen=True)
class Scored:
    host: str
    score: float
    headroom: float
    risk: float
    pull_fraction: float
    pressure: float


def exclusion(candidate: Candidate, need: Need, threshold: float, exclude: Collection[str]) -> str | None:
    """Why a candidate can never be the target, or None if it can."""
    host = candidate.host
    if host.name in exclude:
        return "excluded"
    if host.health is not HostHealth.READY:
        return host.health.value
    if host.admin is not HostAdmin.ACTIVE:
        return host.admin.value
    if candidate.risk is not None and candidate.risk >= threshold:
        return f"drain risk {candidate.risk:.2f} >= {threshold:.2f}"
    if not candidate.free.fits(need.capacity):
        return "insufficient capacity"
    return None


def pull_fraction(host: Host, need: Need) -> float:
    total = sum(need.layers.values())
    if total > 0:
        held = set(host.layer_digests)
        missing = sum(size for digest, size in need.layers.items() if digest not in held)
        return missing / total
    if need.image:
        return 0.0 if any(c.image == need.image for c in host.containers) else 1.0
    return 0.0


def headroom(candidate: Candidate, need: Need) -> float:
    cap, left = candidate.host.capacity, candidate.free - need.capacity
    fractions = [
        left.cpu_millis / cap.cpu_millis if cap.cpu_millis else 0.0,
        left.memory_bytes / cap.memory_bytes if cap.memory_bytes else 0.0,
    ]
    if need.capacity.disk_bytes and cap.disk_bytes:
        fractions.append(left.disk_bytes / cap.disk_bytes)
    return max(0.0, min(1.0, min(fractions)))


def pressure(host: Host) -> float:
    some = [host.pressure.get(k, 0.0) for k in ("cpu_some", "memory_some", "io_some")]
    return max(0.0, min(1.0, max(some) / 100.0))


def score(candidate: Candidate, need: Need, weights: PlacementConfig) -> Scored:
    h, r, p, q = (
        headroom(candidate, need),
        candidate.risk or 0.0,
        pull_fraction(candidate.host, need),
        pressure(candidate.host),
    )
    total = weights.free_capacity * h - weights.drain_risk * r - weights.pull_bytes * p - weights.pressure * q
    return Scored(candidate.host.name, total, h, r, p, q)


def rank(
    candidates: Sequence[Candidate],
    need: Need,
    weights: PlacementConfig,
    threshold: float,
    exclude: Collection[str] = (),
) -> list[Scored]:
    """Eligible candidates, best first (ties broken by name so the order is deterministic)."""
    scored = [score(c, need, weights) for c in candidates if exclusion(c, need, threshold, exclude) is None]
    return sorted(scored, key=lambda s: (-s.score, s.host))


@dataclass(frozen=True)
class Placement:
    """A new container's host, chosen by predicted time to running, and its reservation."""

    reservation: Reservation
    chosen: Breakdown
    candidates: tuple[Breakdown, ...]
    """Every eligible host's prediction, best first."""
    excluded: Mapping[str, str]
    """Host -> why it could not be chosen."""
    target: Host
    """The chosen host as the placement read it (its registration and what it holds)."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "host": self.chosen.host,
            "reservation": self.reservation.to_dict(),
            "predicted": self.chosen.to_dict(),
            "candidates": [c.to_dict() for c in self.candidates],
            "excluded": dict(self.excluded),
        }


def describe(placement: Placement, purpose: str) -> str:
    """The decision record's detail: the prediction and its parts, and the runner-up."""
    c = placement.chosen
    mb = 1_000_000
    text = (
        f"{purpose or 'new container'}: predicted {c.seconds:.2f} s to running = fetch {c.fetch_seconds:.2f} s "
        f"({c.bytes_from_peers / mb:.1f} MB from peers, {c.bytes_from_registry / mb:.1f} MB from the registry, "
        f"{c.bytes_held / mb:.1f} MB held) + apply {c.apply_seconds:.2f} s + start {c.start_seconds:.2f} s"
        f"{'' if c.measured else ' (assumed rates)'}"
    )
    others = [b for b in placement.candidates if b.host != c.host]
    if others:
        text += f"; next {others[0].host} {others[0].seconds:.2f} s"
    return text


def by_time(
    candidates: Sequence[Candidate],
    need: Need,
    weights: PlacementConfig,
    threshold: float,
    holders: Callable[[str], Mapping[str, bool]],
    costs: Callable[[str], Mapping[str, float] | None],
    exclude: Collection[str] = (),
    held: Callable[[str], Collection[str]] = lambda host: (),
) -> tuple[list[Breakdown], dict[str, str]]:
    """Eligible candidates by predicted time to running, fastest first (then by the target score,
    then by name), the near ones reordered by `prefer_unshared`, and why each other candidate is out."""
    timed, excluded = fastest_first(candidates, need, weights, threshold, holders, costs, exclude)
    return prefer_unshared(timed, need, weights, held), excluded


def fastest_first(
    candidates: Sequence[Candidate],
    need: Need,
    weights: PlacementConfig,
    threshold: float,
    holders: Callable[[str], Mapping[str, bool]],
    costs: Callable[[str], Mapping[str, float] | None],
    exclude: Collection[str] = (),
) -> tuple[list[Breakdown], dict[str, str]]:
    """Eligible candidates by predicted time to running (then by the target score, then by name),
    and why each other candidate is out."""
    excluded: dict[str, str] = {}
    ranked: list[tuple[float, float, str, Breakdown]] = []
    named = {digest: holders(digest) for digest in need.layers}
    peer_holders = {digest: list(hosts) for digest, hosts in named.items()}
    for c in candidates:
        why = exclusion(c, need, threshold, exclude)
        if why is not None:
            excluded[c.host.name] = why
            continue
        predicted = time_to_running(
            c.host.name,
            # Its registration, and what the tracker has learned since (a start or pull just done).
            set(c.host.layer_digests) | {d for d, hosts in named.items() if hosts.get(c.host.name)},
            need.layers,
            peer_holders,
            Rates.of(costs(c.host.name), weights),
            c.host.pressure.get("cpu_some", 0.0) / 100.0,
        )
        ranked.append((predicted.seconds, -score(c, need, weights).score, c.host.name, predicted))
    ranked.sort(key=lambda r: r[:3])
    return [r[3] for r in ranked], excluded


def prefer_unshared(
    timed: Sequence[Breakdown],
    need: Need,
    weights: PlacementConfig,
    held: Callable[[str], Collection[str]],
) -> list[Breakdown]:
    """`timed` (fastest first) with the hosts near the fastest first, among themselves by the fewest
    held layers (`held(host)`, the tracker's) the container does not use (stable: then by time).

    Near: predicted within `affinity_slack` of the fastest; or, when the fastest has layers to fetch
    too, fetching at most `spill_slack` of the container's bytes more than it. A layer that has to
    be fetched costs about the same on any host (the hosts' measured rates differ by more noise than
    link), and putting it beside another image's layers takes the slots that image's next containers
    would have started in without a fetch: once that host is full, they copy their image to another
    host. That holds for a cold image (every host fetches it from the registry) and for one whose
    hosts are full (every other host copies it from a peer)."""
    if not timed or weights.affinity_slack <= 0:
        return list(timed)
    best = timed[0]
    total = sum(need.layers.values())

    def fetched(b: Breakdown) -> int:
        return b.bytes_from_peers + b.bytes_from_registry

    def near(b: Breakdown) -> bool:
        if b.seconds <= best.seconds * (1.0 + weights.affinity_slack):
            return True
        return fetched(best) > 0 and fetched(b) - fetched(best) <= weights.spill_slack * total

    close = [b for b in timed if near(b)]
    close.sort(key=lambda b: len(set(held(b.host) or ()) - need.layers.keys()))
    return close + [b for b in timed if not near(b)]


class Placer:
    """Picks a target and reserves capacity on it; a lost race moves on to the next best host."""

    def __init__(
        self,
        store: Store,
        reservations: ReservationService,
        weights: PlacementConfig,
        threshold: Callable[[], float],
        clock: Callable[[], float],
        holders: Callable[[str], Mapping[str, bool]] = lambda digest: {},
        costs: Callable[[str], Mapping[str, float] | None] = lambda host: None,
        held: Callable[[str], Collection[str]] = lambda host: (),
    ) -> None:
        """`holders(digest)`: host -> complete, for the hosts that hold or fetch a blob (the layer
        tracker); `costs(host)`:
        the host's measured layer costs (coordinator/costs.py)."""
        self._store = store
        self._reservations = reservations
        self._weights = weights
        self._threshold = threshold
        self._clock = clock
        self._holders = holders
        self._costs = costs
        self._held = held

    async def place_start(
        self,
        need: Need,
        purpose: str,
        *,
        exclude: Collection[str] = (),
        ttl: float | None = None,
        on_agent: bool = True,
    ) -> Placement:
        """Reserve `need` for a new container on the host with the least predicted time to running
        (coordinator/costs.py); NoTarget when no host can hold it. `on_agent=False`: the reservation
        is in the store only (`ReservationService.reserve`)."""
        candidates = await self.candidates()
        timed, excluded = fastest_first(
            candidates, need, self._weights, self._threshold(), self._holders, self._costs, exclude
        )
        ranked = prefer_unshared(timed, need, self._weights, self._held)
        left = list(ranked)
        while left:
            choice = left[0]
            try:
                reservation = await self._reservations.reserve(
                    choice.host, need.capacity, purpose, ttl, on_agent=on_agent
                )
            except InsufficientCapacity:
                excluded[choice.host] = "lost to a concurrent placement"
                # The rest again: which hosts are near depends on the fastest one left.
                left = prefer_unshared([b for b in timed if b.host not in excluded], need, self._weights, self._held)
                continue
            log.info(
                "placed a new container",
                extra={"host": choice.host, "predicted_s": round(choice.seconds, 3), "purpose": purpose},
            )
            target = next(c.host for c in candidates if c.host.name == choice.host)
            placement = Placement(reservation, choice, tuple(ranked), excluded, target)
            await self._store.record_decision(
                Decision(ts=self._clock(), host=choice.host, kind="place", detail=describe(placement, purpose))
            )
            return placement
        reasons = "; ".join(f"{h}: {why}" for h, why in sorted(excluded.items())) or "no hosts registered"
        raise NoTarget(f"no host can run {need.capacity.to_dict()} ({reasons})")

    async def candidates(self) -> list[Candidate]:
        """Every host with its free capacity (capacity - used - active reservations) and P(drain).

        Three reads whatever the fleet's size (not one per host: on etcd each is a round trip). The
        hosts and the reservations are not one snapshot; that only affects the ranking, as `reserve`
        checks the chosen host's free capacity again, atomically."""
        now = self._clock()
        # At once: on etcd each read is a round trip, and every placement makes them.
        predictions, hosts, reservations = await asyncio.gather(
            self._store.latest_predictions(), self._store.list_hosts(), self._store.list_reservations(now)
        )
        held: dict[str, Capacity] = defaultdict(Capacity)
        for r in reservations:
            held[r.host] = held[r.host] + r.capacity
        out = []
        for host in hosts:
            prediction = predictions.get(host.name)
            free = host.capacity - host.used - held[host.name]
            out.append(Candidate(host, free, prediction.probability if prediction else None))
        return out

    async def rank(self, need: Need, exclude: Collection[str] = ()) -> list[Scored]:
        return rank(await self.candidates(), need, self._weights, self._threshold(), exclude)

    async def place(
        self,
        need: Need,
        purpose: str,
        *,
        exclude: Collection[str] = (),
        only: str | None = None,
        ttl: float | None = None,
    ) -> Reservation:
        """Reserve `need` on the best eligible host (or on `only`); NoTarget when none can hold it."""
        ranked = await self.rank(need, exclude)
        if only is not None:
            ranked = [s for s in ranked if s.host == only]
            if not ranked:
                reason = await self._why_not(only, need, exclude)
                raise NoTarget(f"host {only!r} cannot be the target: {reason}")
        for choice in ranked:
            try:
                reservation = await self._reservations.reserve(choice.host, need.capacity, purpose, ttl)
            except InsufficientCapacity:
                continue  # another placement got there first: the store refused, try the next
            log.info("placed", extra={"host": choice.host, "score": round(choice.score, 4), "purpose": purpose})
            return reservation
        raise NoTarget(f"no eligible host can hold {need.capacity.to_dict()} ({len(ranked)} candidates tried)")

    async def _why_not(self, name: str, need: Need, exclude: Collection[str]) -> str:
        for candidate in await self.candidates():
            if candidate.host.name == name:
                return exclusion(candidate, need, self._threshold(), exclude) or "lost to a concurrent placement"
        return "not registered"
