"""Deciding what to warm (layer prefetch): which layers, within what budget, as pure functions.

The coordinator's prefetch loop (not here: it drives these) scores each host's candidate layers with
the layer predictor (coordinator/warm_predictor.py), asks `plan` which of them to warm under the
current `Aggressiveness`, and asks the host's agent to fetch them under a TTL lease
(`POST /v1/prefetch/layers/{digest}`; peers first, like any pull). Every round it measures what the
warms and starts since the round before did (`WarmOutcome`) and the waste controller
(coordinator/waste_control.py) moves the aggressiveness.

Warms never compete with work that runs now: `warm_budget` gives them a share of what the host's
link has left after its running pulls, migrations and workloads, and nothing when it is busy.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Aggressiveness:
    threshold: float = 0.7
    """P(needed within the horizon) at or above which a layer is warmed."""
    max_layers: int = 8
    """Layers warmed per host per round at most."""
    bandwidth_share: float = 0.25
    """Share of the link's idle bandwidth the warms may use."""


@dataclass(frozen=True)
class WarmOutcome:
    """What the warms and starts of the last window did (per host or fleet-wide).

    `waste` is the bytes of warms that expired unused in the window over the bytes warmed in it, the
    figure the card and the bench report over a whole run; the controller steers on wasted over
    settled bytes over its memory instead (coordinator/waste_control.py says why)."""

    warmed_bytes: int = 0
    """Bytes warmed in the window."""
    wasted_bytes: int = 0
    """Bytes of warms whose lease ended unused in the window."""
    settled_warms: int = 0
    """Warms used by a start or expired unused in the window (the evidence)."""
    starts: int = 0
    local_starts: int = 0
    """Starts that found every layer local."""
    warms: int = 0
    """Warms started in the window (settled or not)."""
    used_bytes: int = 0
    """Bytes of warms a start used in the window (with `wasted_bytes`: the settled bytes)."""

    @property
    def waste(self) -> float:
        if self.warmed_bytes:
            return self.wasted_bytes / self.warmed_bytes
        return 1.0 if self.wasted_bytes else 0.0

    @property
    def hit_rate(self) -> float:
        return self.local_starts / self.starts if self.starts else 1.0


def warm_budget(link_bytes_per_s: float, busy_bytes_per_s: float, period_s: float, share: float) -> int:
    """Bytes the warms of one round may move: `share` of what the link has idle over `period_s`;
    nothing while running work uses 90 % of it or more (warms wait for a quieter round)."""
    if link_bytes_per_s <= 0 or busy_bytes_per_s >= 0.9 * link_bytes_per_s:
        return 0
    return int((link_bytes_per_s - busy_bytes_per_s) * period_s * share)


@dataclass(frozen=True)
class Candidate:
    digest: str
    probability: float
    size: int
    """Bytes; 0 when unknown (such a layer is not warmed: its cost cannot be judged)."""
    lease_probability: float | None = None
    """P(a start on the host uses it before a warm's lease ends), the model's P calibrated to the
    lease (warm_predictor.py); None: unknown, `probability` stands for it (a lower bound, as the
    lease is longer than the horizon)."""


REGISTRY_ONLY_BAR = 0.75
"""A layer no other host holds is warmed from `threshold` x this: a start that misses it fetches it
over the registry's link (seconds for a large layer), one that misses a layer a peer holds gets it
over the fleet's network (a fraction of that), so warming it saves more per byte risked."""


def plan(
    candidates: Sequence[Candidate],
    held: Collection[str],
    in_flight: Collection[str],
    aggressiveness: Aggressiveness,
    budget_bytes: int,
    max_expected_waste: float = 1.0,
    on_peers: Collection[str] | None = None,
) -> list[Candidate]:
    """The layers to warm now: at or above their bar, not held or already being fetched, of known
    size, within the layer count and the byte budget (a layer that does not fit is skipped, a
    smaller one after it may), and while the expected wasted share of the chosen bytes,
    sum((1 - P_lease) * bytes) / sum(bytes), stays within `max_expected_waste`: a warm is wasted
    when no start uses it before its lease ends, so P_lease is the candidate's `lease_probability`
    (its `probability` when that is unknown).

    The bar is the threshold; with `on_peers` (the layers another host of the fleet holds) a layer
    outside it, which only the registry can serve, has the lower bar `threshold x REGISTRY_ONLY_BAR`.
    The candidates go by P over their bar, highest first: those the registry alone holds first
    when P is equal. Without `on_peers` (not known) every layer has the threshold as its bar.

    The expected waste is known when the warm is made; the waste controller's threshold moves on
    wasted warms, known only a lease later. With both, a model surer than it should be (a retrained
    one served on little data) cannot run the waste up for a lease before the controller sees it."""

    def bar(c: Candidate) -> float:
        return _bar(c, aggressiveness, on_peers)

    chosen: list[Candidate] = []
    spent = 0
    expected_waste = 0.0
    for c in _by_margin(candidates, aggressiveness, on_peers):
        p = c.probability
        if len(chosen) >= aggressiveness.max_layers or p < bar(c):
            break  # sorted by P over the bar: the rest are below theirs too
        if c.digest in held or c.digest in in_flight or c.size <= 0 or spent + c.size > budget_bytes:
            continue
        q = p if c.lease_probability is None else c.lease_probability
        if expected_waste + (1.0 - q) * c.size > max_expected_waste * (spent + c.size):
            break  # the rest are no further above their bars: stop while the bound holds
        chosen.append(c)
        spent += c.size
        expected_waste += (1.0 - q) * c.size
    return chosen


def _bar(c: Candidate, aggressiveness: Aggressiveness, on_peers: Collection[str] | None) -> float:
    registry_only = on_peers is not None and c.digest not in on_peers
    return aggressiveness.threshold * (REGISTRY_ONLY_BAR if registry_only else 1.0)


def _by_margin(
    candidates: Sequence[Candidate], aggressiveness: Aggressiveness, on_peers: Collection[str] | None
) -> list[Candidate]:
    """By P over the bar, highest first (then digest, so the order is stable)."""
    return sorted(candidates, key=lambda c: (-c.probability / max(_bar(c, aggressiveness, on_peers), 1e-9), c.digest))


def keep(
    candidates: Sequence[Candidate],
    held: Collection[str],
    kept: Collection[str],
    aggressiveness: Aggressiveness,
    room_bytes: int,
    on_peers: Collection[str] | None = None,
) -> list[Candidate]:
    """The predicted layers the host holds already to keep under a warm lease, so the cache bound
    does not evict them before the start the model expects: at or above their bar (as in `plan`),
    held, not kept already, of known size, by P over the bar highest first, while their bytes fit
    `room_bytes` (the cache room left to layers under warm leases; a layer that does not fit is
    skipped, a smaller one after it may).

    A keep fetches nothing, so neither the byte budget of the link nor the expected-waste bound
    applies, nor the layer count (a count of fetches). A keep whose lease ends unused wasted cache
    room for a lease (what the bound evicted instead), not bytes: it is counted apart from warms.
    Plan the keeps before the warms, in the same room: a start misses a layer it held before,
    which a keep saves at no cost, more often than one it never had."""
    chosen: list[Candidate] = []
    spent = 0
    for c in _by_margin(candidates, aggressiveness, on_peers):
        if c.probability < _bar(c, aggressiveness, on_peers):
            break  # sorted by P over the bar: the rest are below theirs too
        if c.digest not in held or c.digest in kept or c.size <= 0 or spent + c.size > room_bytes:
            continue
        chosen.append(c)
        spent += c.size
    return chosen


def outcome_of(
    starts: Sequence[tuple[Collection[str], Collection[str]]],
    warmed: Sequence[int],
    settled: Sequence[tuple[int, bool]],
) -> WarmOutcome:
    """A window's outcome from its starts ((layers, layers that were local) each), the sizes of the
    warms made in it, and the warms that settled in it ((size, used) each)."""
    return WarmOutcome(
        warmed_bytes=sum(warmed),
        wasted_bytes=sum(size for size, used in settled if not used),
        settled_warms=len(settled),
        starts=len(starts),
        local_starts=sum(1 for layers, local in starts if set(layers) <= set(local)),
        warms=len(warmed),
        used_bytes=sum(size for size, used in settled if used),
    )
