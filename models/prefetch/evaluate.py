"""Judging a layer-scoring policy on a trace: ranking figures and a cache simulation.

`walk` replays a trace through the serving features (coordinator/warm_features.py) in time order:
after every start and every `tick_s` per host it takes a *decision*: the candidate layers, their
feature rows, and which of them the host's starts of the next `horizon_s` needed. Every policy is
scored on the same decisions:

- `model`: the trained classifier's P(needed within the horizon);
- `popular`: the layers' share of the fleet's starts over the last hours (most-popular layers);
- `chain`: a first-order Markov chain over signatures: P(the next start needs the layer | the
  host's last signature), from the host's own transitions, else the fleet's;
- `none`: no prefetching.

`simulate` then runs one cache per host, bounded below the host's working set: a start finds its
layers local or pulls them (least recently used evicted); at a decision the policy warms the
candidates it scores at or above its threshold, best first, at most `max_layers` and
`budget_bytes`, each under a lease of `lease_s`: a warmed layer no start used before its lease ends
is evicted when the lease ends (wasted bytes). Within its lease it is never evicted, as the agent's
containerd lease holds it (docs/cache.md "Never evicted"): starts evict the other layers, and warms
under lease never hold more than `max_pending_share` of the cache.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from coordinator.warm_features import FEATURE_NAMES, N_FEATURES, FleetStarts, HostStarts, Start
from coordinator.warming import Aggressiveness, Candidate, WarmOutcome, plan, warm_budget
from coordinator.waste_control import ControlLimits, control, initial
from models.prefetch.generate import DAY, Trace

POPULAR_COL = FEATURE_NAMES.index("fleet_share_6h")
CHAIN_HOST_COL = FEATURE_NAMES.index("chain_host")
CHAIN_FLEET_COL = FEATURE_NAMES.index("chain_fleet")


@dataclass(frozen=True)
class EvalConfig:
    horizon_s: float = 900.0
    """A layer is needed if a start on the host within this long needs it."""
    tick_s: float = 300.0
    """Besides after every start, a decision every this many seconds per host."""
    lease_s: float = 3600.0
    """A warm no start used within this long is wasted (and evicted). Longer than the horizon: a layer
    likely needed within the horizon is often needed a little later, and a lease as short as the
    horizon throws it away just before (held out, lease 900 s: waste 0.36 at the operating point)."""
    max_pending_share: float = 0.5
    """Warms under lease hold at most this share of a host's cache (the rest stays for starts)."""
    max_layers: int = 8
    """Layers warmed per decision at most (also the budget of precision/recall at budget)."""
    budget_bytes: int = 512 << 20
    """Bytes warmed per decision at most."""
    cache_share: float = 0.6
    """A host's cache holds this share of its median daily working set (distinct layer bytes)."""
    warmup_s: float = 6 * 3600.0
    """Starts in the first hours of a trace are not counted (every cache starts empty)."""
    max_waste: float = 0.25
    """Operating threshold: the one with the best hit rate whose wasted share stays within this."""
    thresholds: tuple[float, ...] = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    control_s: float = 300.0
    """Controlled policies: seconds between two rounds of the waste controller (the warm period)."""
    link_bytes_per_s: float = 12.5e6
    """A host's link to its layer sources (100 Mbit/s): a decision warms at most its bandwidth share
    of what the link moves in `tick_s`."""


@dataclass
class Decision:
    host: str
    ts: float
    candidates: list[str]
    X: npt.NDArray[np.float32]
    label: npt.NDArray[np.int8]
    needed: frozenset[str]


@dataclass
class Walk:
    trace: Trace
    decisions: list[Decision]
    events: dict[str, list[tuple[float, int, int]]] = field(default_factory=dict)
    """Per host, in time order: (ts, 0, start index) for a start, (ts, 1, decision index) for a decision."""
    starts: list[tuple[str, Start]] = field(default_factory=list)

    def rows(self) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int8]]:
        if not self.decisions:
            return np.empty((0, N_FEATURES), np.float32), np.empty(0, np.int8)
        return np.concatenate([d.X for d in self.decisions]), np.concatenate([d.label for d in self.decisions])


def walk(trace: Trace, cfg: EvalConfig, tick_s: float | None = None) -> Walk:
    tick = tick_s or cfg.tick_s
    by_host = trace.by_host()
    times = {h: [s.ts for s in starts] for h, starts in by_host.items()}
    queue: list[tuple[float, int, str, int]] = []
    for i, (host, start) in enumerate(trace.starts):
        queue.append((start.ts, 0, host, i))
        queue.append((start.ts, 1, host, -1))
    for host in trace.hosts:
        queue.extend((t, 1, host, -1) for t in np.arange(tick, trace.spec.end, tick).tolist())
    queue.sort(key=lambda e: (e[0], e[1], e[2]))
    fleet = FleetStarts()
    states = {h: HostStarts() for h in trace.hosts}
    out = Walk(trace, [], {h: [] for h in trace.hosts}, trace.starts)
    for ts, kind, host, i in queue:
        if kind == 0:
            states[host].add(trace.starts[i][1], fleet)
            out.events[host].append((ts, 0, i))
            continue
        if ts + cfg.horizon_s > trace.spec.end:
            continue  # its labels would look past the trace
        state = states[host]
        candidates = state.candidates(ts, fleet)
        if not candidates:
            continue
        lo = bisect.bisect_right(times[host], ts)
        hi = bisect.bisect_right(times[host], ts + cfg.horizon_s)
        needed = frozenset(d for s in by_host[host][lo:hi] for d in s.layers)
        label = np.array([d in needed for d in candidates], np.int8)
        out.events[host].append((ts, 1, len(out.decisions)))
        out.decisions.append(Decision(host, ts, candidates, state.features(ts, candidates, fleet), label, needed))
    return out


# --- policies ---------------------------------------------------------------------------------------

Scorer = Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float32]]


def popular_scores(X: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    return np.nan_to_num(X[:, POPULAR_COL]).astype(np.float32)


def chain_scores(X: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    host, fleet = X[:, CHAIN_HOST_COL], X[:, CHAIN_FLEET_COL]
    return np.nan_to_num(np.where(np.isnan(host), fleet, host)).astype(np.float32)


BASELINES: dict[str, Scorer] = {"popular": popular_scores, "chain": chain_scores}


def score_walk(w: Walk, scorer: Scorer) -> list[npt.NDArray[np.float32]]:
    """Scores per decision, from one batch over every row."""
    X, _ = w.rows()
    p = scorer(X) if X.shape[0] else np.empty(0, np.float32)
    out, at = [], 0
    for d in w.decisions:
        out.append(p[at : at + len(d.candidates)])
        at += len(d.candidates)
    return out


def ranking(w: Walk, scores: Sequence[npt.NDArray[np.float32]], k: int) -> dict[str, float]:
    """Precision and recall of the top `k` per decision (micro-averaged over decisions that needed
    anything; a needed layer no candidate named counts against recall), PR-AUC over the rows, and
    the Brier score over the rows (how far P is from what happened: the expected-waste rule of the
    warms, coordinator/warming.py `plan`, trusts P as it is)."""
    from sklearn.metrics import average_precision_score, brier_score_loss

    tp = picked = needed = 0
    for d, s in zip(w.decisions, scores, strict=True):
        if not d.needed:
            continue
        top = np.argsort(-s, kind="stable")[:k]
        tp += int(d.label[top].sum())
        picked += top.size
        needed += len(d.needed)
    _, y = w.rows()
    p = np.concatenate(list(scores)) if scores else np.empty(0)
    return {
        f"precision_at_{k}": tp / max(picked, 1),
        f"recall_at_{k}": tp / max(needed, 1),
        "pr_auc": float(average_precision_score(y, p)) if 0 < y.sum() < y.size else float("nan"),
        "brier": float(brier_score_loss(y, np.clip(p, 0.0, 1.0))) if y.size else float("nan"),
    }


# --- cache simulation -------------------------------------------------------------------------------


@dataclass
class SimResult:
    starts: int = 0
    all_local: int = 0
    warmed_bytes: int = 0
    wasted_bytes: int = 0
    warm_hits: int = 0
    """Warmed layers a start then used."""
    pulled_bytes: int = 0
    hits: list[tuple[float, bool]] = field(default_factory=list)
    """(ts, every layer local) per counted start, in time order."""
    rounds: list[tuple[float, float, float]] = field(default_factory=list)
    """Controlled policies: (ts, threshold after the round, waste the controller measured)."""
    misses: list[tuple[float, str, tuple[str, ...]]] = field(default_factory=list)
    """`replay_window`: (ts, host, the layers it did not hold) per counted start that missed any."""
    fetched: list[tuple[int, int]] = field(default_factory=list)
    """`replay_window`: per counted start, the bytes it lacked that another host held (a peer serves
    them) and the bytes no host held (the registry serves them)."""

    @property
    def hit_rate(self) -> float:
        return self.all_local / max(self.starts, 1)

    @property
    def waste(self) -> float:
        return self.wasted_bytes / self.warmed_bytes if self.warmed_bytes else 0.0

    def summary(self) -> dict[str, float]:
        return {
            "hit_rate": self.hit_rate,
            "waste": self.waste,
            "starts": self.starts,
            "warmed_gb": self.warmed_bytes / 1e9,
            "wasted_gb": self.wasted_bytes / 1e9,
            "pulled_gb": self.pulled_bytes / 1e9,
            "warm_hits": self.warm_hits,
        }


def capacities(trace: Trace, cfg: EvalConfig) -> dict[str, int]:
    """Per host: `cache_share` of its median daily working set."""
    daily: dict[str, dict[int, set[str]]] = {h: {} for h in trace.hosts}
    for host, s in trace.starts:
        daily[host].setdefault(int(s.ts // DAY), set()).update(s.layers)
    out = {}
    for host, days in daily.items():
        sets = [sum(trace.sizes[d] for d in layers) for layers in days.values()] or [0]
        out[host] = int(cfg.cache_share * float(np.median(sets)))
    return out


class Cache:
    def __init__(self, capacity: int, sizes: dict[str, int]) -> None:
        self.capacity = capacity
        self.sizes = sizes
        self.entries: dict[str, list[float]] = {}
        """digest -> [last used, lease end (0: used, not a pending warm)]"""
        self.used = 0
        self.window = [0, 0, 0, 0, 0, 0, 0]
        """Since the last round of the controller: warmed bytes, wasted bytes, settled warms, starts, local starts,
        warms made, used warm bytes (WarmOutcome's fields)."""

    def outcome(self) -> WarmOutcome:
        return WarmOutcome(*self.window)

    def expire(self, now: float, result: SimResult) -> None:
        for d in [d for d, e in self.entries.items() if 0 < e[1] <= now]:
            self._drop(d, result)

    def _drop(self, d: str, result: SimResult) -> None:
        if self.entries.pop(d)[1] > 0:
            result.wasted_bytes += self.sizes[d]
            self.window[1] += self.sizes[d]
            self.window[2] += 1
        self.used -= self.sizes[d]

    def evict(self, protect: set[str], result: SimResult) -> None:
        if self.used <= self.capacity:
            return
        # Least recently used first. Warms under lease are held (the agent's lease protects them);
        # unused warms whose lease ended are gone already (expire).
        order = sorted(
            (d for d, e in self.entries.items() if d not in protect and e[1] == 0), key=lambda d: self.entries[d][0]
        )
        for d in order:
            if self.used <= self.capacity:
                break
            self._drop(d, result)

    def start(self, now: float, layers: Sequence[str], result: SimResult, count: bool) -> None:
        local = all(d in self.entries for d in layers)
        for d in layers:
            e = self.entries.get(d)
            if e is None:
                self.entries[d] = [now, 0.0]
                self.used += self.sizes[d]
                result.pulled_bytes += self.sizes[d] if count else 0
            else:
                if e[1] > 0:
                    result.warm_hits += 1
                    self.window[2] += 1
                    self.window[6] += self.sizes[d]
                e[0], e[1] = now, 0.0
        self.evict(set(layers), result)
        self.window[3] += 1
        self.window[4] += local
        if count:
            result.starts += 1
            result.all_local += local
            result.hits.append((now, local))

    def warm(self, now: float, ranked: Sequence[str], cfg: EvalConfig, result: SimResult, agg: Aggressiveness) -> None:
        taken: set[str] = set()
        pending = sum(self.sizes[d] for d, e in self.entries.items() if e[1] > 0)
        link = warm_budget(cfg.link_bytes_per_s, 0.0, cfg.tick_s, agg.bandwidth_share)
        budget = min(cfg.budget_bytes, link, int(self.capacity * cfg.max_pending_share) - pending)
        spent = 0
        for d in ranked:
            if len(taken) >= agg.max_layers:
                break
            if d in self.entries:
                continue
            size = self.sizes[d]
            if spent + size > budget:
                continue
            self.entries[d] = [now, now + cfg.lease_s]
            self.used += size
            spent += size
            taken.add(d)
            self.window[0] += size
            self.window[5] += 1
            result.warmed_bytes += size
        self.evict(taken, result)


def lease_labels(w: Walk, lease_s: float) -> list[npt.NDArray[np.int8]]:
    """Per decision, per candidate: whether a start on the host within `lease_s` after it needed the
    layer (would a warm of it made then be used before its lease ended)."""
    by_host = w.trace.by_host()
    times = {h: [s.ts for s in starts] for h, starts in by_host.items()}
    out = []
    for d in w.decisions:
        lo = bisect.bisect_right(times[d.host], d.ts)
        hi = bisect.bisect_right(times[d.host], d.ts + lease_s)
        needed = {x for s in by_host[d.host][lo:hi] for x in s.layers}
        out.append(np.array([c in needed for c in d.candidates], np.int8))
    return out


def simulate(
    w: Walk,
    scores: Sequence[npt.NDArray[np.float32]] | None,
    threshold: float,
    cfg: EvalConfig,
    controlled: ControlLimits | None = None,
    in_lease: Callable[[npt.NDArray[np.float64]], npt.NDArray[np.float64]] | None = None,
) -> SimResult:
    """One cache per host (capacities()); `scores` None: no prefetching. With `controlled`, the
    fleet's aggressiveness starts at `threshold` and every `cfg.control_s` seconds of the trace
    moves by what the warms and starts of every host did since (coordinator/waste_control.py
    `control`), and a decision's warms keep their expected waste within `controlled.max_waste`
    (coordinator/warming.py `plan`; with `in_lease`, the model's calibration to the lease, the
    expected waste of P calibrated to the lease), as the coordinator's warming rounds do; otherwise
    it stays at `threshold`, `cfg.max_layers` and the default bandwidth share."""
    caps = capacities(w.trace, cfg)
    result = SimResult()
    begin = cfg.warmup_s
    caches = {host: Cache(caps[host], w.trace.sizes) for host in w.events}
    state = initial(threshold, controlled) if controlled is not None else None
    agg = state.aggressiveness if state is not None else Aggressiveness(threshold=threshold, max_layers=cfg.max_layers)
    next_round = cfg.control_s
    events = heapq.merge(*([(ts, kind, i, host) for ts, kind, i in ev] for host, ev in w.events.items()))
    for ts, kind, i, host in events:
        while state is not None and controlled is not None and ts >= next_round:
            window = [0, 0, 0, 0, 0, 0, 0]
            for c in caches.values():
                c.expire(next_round, result)
                window = [a + b for a, b in zip(window, c.window, strict=True)]
                c.window = [0, 0, 0, 0, 0, 0, 0]
            state = control(state, WarmOutcome(*window), controlled)
            agg = state.aggressiveness
            result.rounds.append((next_round, agg.threshold, state.waste))
            next_round += cfg.control_s
        cache = caches[host]
        cache.expire(ts, result)
        if kind == 0:
            cache.start(ts, w.starts[i][1].layers, result, ts >= begin)
        elif scores is not None:
            d, s = w.decisions[i], scores[i]
            if controlled is not None:
                # as the coordinator plans a round: the expected waste of the warms within the bound
                q = in_lease(s.astype(np.float64)) if in_lease is not None else [None] * len(s)
                candidates = [
                    Candidate(c, float(p), w.trace.sizes[c], None if pl is None else float(pl))
                    for c, p, pl in zip(d.candidates, s, q, strict=True)
                ]
                chosen = plan(candidates, cache.entries, (), agg, cfg.budget_bytes, controlled.max_waste)
                ranked = [c.digest for c in chosen]
            else:
                order = np.argsort(-s, kind="stable")
                ranked = [d.candidates[j] for j in order if s[j] >= agg.threshold]
            cache.warm(ts, ranked, cfg, result, agg)
    for cache in caches.values():
        # warms still pending at the end were not used either
        for digest, entry in cache.entries.items():
            if entry[1] > 0:
                result.wasted_bytes += w.trace.sizes[digest]
    result.hits.sort()
    return result


def merged(results: Sequence[SimResult]) -> SimResult:
    out = SimResult()
    for r in results:
        out.starts += r.starts
        out.all_local += r.all_local
        out.warmed_bytes += r.warmed_bytes
        out.wasted_bytes += r.wasted_bytes
        out.warm_hits += r.warm_hits
        out.pulled_bytes += r.pulled_bytes
    return out


def operating_threshold(
    walks: Sequence[tuple[Walk, Sequence[npt.NDArray[np.float32]]]], cfg: EvalConfig
) -> tuple[float, dict[str, float]]:
    """The threshold with the best hit rate whose waste stays within `max_waste` (else the least
    wasteful), over `walks` (each with its scores) together; with the simulation's summary at it."""
    tried = [(t, merged([simulate(w, s, t, cfg) for w, s in walks])) for t in cfg.thresholds]
    ok = [(t, r) for t, r in tried if r.waste <= cfg.max_waste]
    t, r = max(ok, key=lambda tr: (tr[1].hit_rate, -tr[0])) if ok else min(tried, key=lambda tr: tr[1].waste)
    return t, r.summary()


def recovery(result: SimResult, shift_ts: float, window: int = 50, before: int = 500) -> dict[str, float]:
    """After the mix shift: how many fleet starts until a window of `window` starts is back to 90 %
    of the hit rate of the `before` starts before the shift (-1: never)."""
    hits = result.hits
    pre = [h for t, h in hits if t < shift_ts][-before:]
    post = [h for t, h in hits if t >= shift_ts]
    rate = float(np.mean(pre)) if pre else float("nan")
    first = -1
    for i in range(max(0, len(post) - window + 1)):
        if np.mean(post[i : i + window]) >= 0.9 * rate:
            first = i
            break
    first_window = float(np.mean(post[:window])) if post else float("nan")
    return {
        "hit_rate_before": rate,
        "hit_rate_first_window_after": first_window,
        "starts_to_recover": first,
        "window": window,
    }


def windows_after(result: SimResult, shift_ts: float, window: int = 50) -> list[float]:
    """The share of starts all local in each run of `window` counted starts after the shift (the
    last run may be shorter)."""
    post = [h for t, h in result.hits if t >= shift_ts]
    return [float(np.mean(post[i : i + window])) for i in range(0, len(post), window)]


MISS_CAUSES = ("new_to_fleet", "new_to_host", "evicted")


def miss_causes(trace: Trace, result: SimResult, since: float, window: int = 50) -> list[dict[str, float]]:
    """Why the starts after `since` missed, per run of `window` counted starts (`replay_window`'s
    `misses`): per cause, the starts that missed a layer for it and the bytes. A layer is new to the
    fleet when no start anywhere used it before, new to the host when none of the host's did, and
    evicted when the host ran it before (the bound or an ended lease dropped it)."""
    fleet: dict[str, float] = {}
    host: dict[tuple[str, str], float] = {}
    for h, s in trace.starts:
        for d in s.layers:
            fleet.setdefault(d, s.ts)
            host.setdefault((h, d), s.ts)
    times = [t for t, _ in result.hits if t >= since]
    misses = [m for m in result.misses if m[0] >= since]
    out = []
    for i in range(0, len(times), window):
        lo, hi = times[i], times[min(i + window, len(times)) - 1]
        row: dict[str, float] = {"starts": float(min(window, len(times) - i)), "missed": 0.0}
        row |= {f"{c}_starts": 0.0 for c in MISS_CAUSES} | {f"{c}_mb": 0.0 for c in MISS_CAUSES}
        for ts, h, layers in misses:
            if not lo <= ts <= hi:
                continue
            row["missed"] += 1
            causes = set()
            for d in layers:
                cause = "new_to_fleet" if fleet[d] >= ts else "new_to_host" if host[(h, d)] >= ts else "evicted"
                causes.add(cause)
                row[f"{cause}_mb"] += trace.sizes[d] / 1e6
            for cause in causes:
                row[f"{cause}_starts"] += 1
        out.append(row)
    return out


# --- what a window of a trace allows: the same cache, an oracle, and the history's best static set ----

Ranker = Callable[[str, float], Sequence[str]]
"""(host, trace time) -> the layers to warm there now, best first."""


def replay_window(
    trace: Trace,
    begin: float,
    end: float,
    capacity: int,
    sizes: dict[str, int],
    ranker: Ranker | None,
    cfg: EvalConfig,
    *,
    prime_s: float,
    warmup: int,
) -> SimResult:
    """The bench's replay (bench/prefetch.py) in the cache simulation: the starts of [begin, end) on
    one `Cache` of `capacity` per host, primed with the starts of the `prime_s` before, the first
    `warmup` starts not counted; `ranker` (None: no prefetching) names the layers to warm after every
    start and every `cfg.tick_s` per host, at most `cfg.max_layers` within the sim's byte budget."""
    caches = {h: Cache(capacity, sizes) for h in trace.hosts}
    result, primed = SimResult(), SimResult()
    events: list[tuple[float, int, str, int]] = []
    for i, (host, s) in enumerate(trace.starts):
        if begin - prime_s <= s.ts < begin:
            caches[host].start(s.ts, s.layers, primed, False)
        elif begin <= s.ts < end:
            events += [(s.ts, 0, host, i), (s.ts, 1, host, -1)]
    for host in trace.hosts:
        events += [(t, 1, host, -1) for t in np.arange(begin, end, cfg.tick_s).tolist()]
    events.sort(key=lambda e: (e[0], e[1], e[2]))
    agg = Aggressiveness(threshold=0.0, max_layers=cfg.max_layers)
    counted = 0
    for ts, kind, host, i in events:
        for cache in caches.values():
            cache.expire(ts, result)
        if kind == 0:
            counted += 1
            layers = trace.starts[i][1].layers
            missing = tuple(d for d in layers if d not in caches[host].entries)
            if counted > warmup:
                if missing:
                    result.misses.append((ts, host, missing))
                on_peers = sum(sizes[d] for d in missing if any(d in c.entries for c in caches.values()))
                result.fetched.append((on_peers, sum(sizes[d] for d in missing) - on_peers))
            caches[host].start(ts, layers, result, counted > warmup)
        elif ranker is not None:
            caches[host].warm(ts, ranker(host, ts), cfg, result, agg)
    for cache in caches.values():
        result.wasted_bytes += sum(sizes[d] for d, e in cache.entries.items() if e[1] > 0)
    result.hits.sort()
    return result


def oracle_ranker(trace: Trace, next_starts: int, within_s: float) -> Ranker:
    """Knows the future: the layers of the host's next `next_starts` starts within `within_s`. What
    no predictor can beat at a cache bound; it shows whether the bound leaves room for prefetching."""
    by_host = trace.by_host()
    times = {h: [s.ts for s in starts] for h, starts in by_host.items()}

    def rank(host: str, now: float) -> list[str]:
        lo = bisect.bisect_right(times[host], now)
        out: list[str] = []
        for s in by_host[host][lo : lo + next_starts]:
            if s.ts - now > within_s:
                break
            out += [d for d in s.layers if d not in out]
        return out

    return rank


def history_static_hits(
    trace: Trace, begin: float, end: float, capacity: int, sizes: dict[str, int], history_s: float
) -> tuple[int, int]:
    """(starts all local, starts) in [begin, end) for a cache that holds, per host, the signatures'
    layers its `history_s` of starts before `begin` used most per byte (greedy, within `capacity`),
    and never changes: how far the history alone ranks what the window needs."""
    hits = total = 0
    for host in trace.hosts:
        past: dict[str, int] = {}
        layers: dict[str, tuple[str, ...]] = {}
        for h, s in trace.starts:
            if h == host and begin - history_s <= s.ts < begin:
                past[s.signature] = past.get(s.signature, 0) + 1
                layers[s.signature] = s.layers
        kept: set[str] = set()
        used = 0
        while True:
            best: tuple[float, list[str], int] | None = None
            for sig, n in past.items():
                extra = [d for d in layers[sig] if d not in kept]
                cost = sum(sizes[d] for d in extra)
                if extra and used + cost <= capacity and (best is None or n / cost > best[0]):
                    best = (n / cost, extra, cost)
            if best is None:
                break
            kept.update(best[1])
            used += best[2]
        window = [s for h, s in trace.starts if h == host and begin <= s.ts < end]
        total += len(window)
        hits += sum(all(d in kept for d in s.layers) for s in window)
    return hits, total


def structure_ranker(trace: Trace, successors: dict[str, str], crons: Collection[str], lead_s: float = 600.0) -> Ranker:
    """Knows the generative process but not its draws: after a start of a signature with a workflow
    successor (`successors`, from the generator's catalog), the successor's layers; a cron
    signature's layers from `lead_s` before its next run, its period read off the host's last two
    runs. The most a predictor of the history could learn of the process; the rest of the starts
    are independent draws from each host's mix."""
    by_host = trace.by_host()
    times = {h: [s.ts for s in starts] for h, starts in by_host.items()}

    def rank(host: str, now: float) -> list[str]:
        past = by_host[host][: bisect.bisect_right(times[host], now)]
        out: list[str] = []
        if past and past[-1].signature in successors and now - past[-1].ts < lead_s:
            out += trace.signature_layers[successors[past[-1].signature]]
        runs: dict[str, list[float]] = {}
        for s in past:
            if s.signature in crons:
                runs.setdefault(s.signature, []).append(s.ts)
        for sig, ts in runs.items():
            if len(ts) >= 2 and -lead_s <= now - (2 * ts[-1] - ts[-2]) < 120.0:
                out += [d for d in trace.signature_layers[sig] if d not in out]
        return out

    return rank
