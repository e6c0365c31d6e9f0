"""Features of the layer predictor: one row per (host, moment, candidate layer).

The question the model answers is "will this host start something that needs layer L within the
next `horizon` seconds?". What a host started recently, and when, says most of it: the layers of
its last starts, how long since it last used L and how regular that use is, what usually follows
its last workload (a first-order chain over signatures, the host's own and the fleet's), what it
runs at this time of day, and how popular L is across the fleet right now.

One definition serves training (models/prefetch/train.py walks a trace through it) and serving
(coordinator/warm_predictor.py): `HostStarts` and `FleetStarts` are updated one start at a time, in
time order, and `HostStarts.features` reads them at any later moment. So a training row is exactly
what the coordinator would have computed at that moment.

Memory: per host, the last `keep` starts, and per layer it ever used a few floats and 24 hourly
counts; per signature pair it saw one count.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from core.imagerefs import split_reference

FEATURES_VERSION = "warm-features/3"
FEATURE_NAMES: tuple[str, ...] = (
    "share_last_5",
    "share_last_20",
    "share_last_100",
    "decayed_uses_1h",
    "decayed_uses_6h",
    "log_since_last_use",
    "since_use_over_interval",
    "chain_host",
    "chain_fleet",
    "hour_share",
    "hour_rate",
    "day_sin",
    "day_cos",
    "host_starts_1h",
    "log_since_last_start",
    "fleet_share_6h",
    "host_share_all",
    "signature_due",
    "signature_irregularity",
    "follow_host",
    "follow_fleet",
)
N_FEATURES = len(FEATURE_NAMES)
DAY = 86400.0
HOUR = 3600.0
KEEP_STARTS = 100
WINDOWS = (5, 20, KEEP_STARTS)
"""The share of a host's last 5, 20 and 100 starts that needed a layer."""
FLEET_CANDIDATES = 16
"""Besides the layers a host used, the fleet's most used layers right now are candidates, and as many
of the layers that followed the host's last signature across the fleet."""
FOLLOW_S = 900.0
"""`follow_host`, `follow_fleet`: which layers starts on the same host needed within this long after a
start of a signature."""


@dataclass(frozen=True)
class Start:
    """One task start as the predictor sees it: when, which signature, which layers it needed."""

    ts: float
    signature: str
    layers: tuple[str, ...]
    source: str = ""
    """`image:<ref>` or `composition:<name>` (empty when not known): a new image of a repository the
    fleet ran is a release of it (`FleetStarts.releases`)."""


class _LayerIndex:
    """Digest <-> row of the per-layer arrays, grown on demand."""

    def __init__(self, columns: int = 0) -> None:
        self.index: dict[str, int] = {}
        self.digests: list[str] = []
        self._columns = columns

    def ids(self, digests: Iterable[str]) -> list[int]:
        out = []
        for d in digests:
            i = self.index.get(d)
            if i is None:
                i = self.index[d] = len(self.digests)
                self.digests.append(d)
            out.append(i)
        return out

    def lookup(self, digests: Sequence[str]) -> npt.NDArray[np.int64]:
        """Rows of known digests, -1 for unknown ones."""
        return np.array([self.index.get(d, -1) for d in digests], np.int64)


def _grow(a: npt.NDArray[np.float64], n: int, fill: float = 0.0) -> npt.NDArray[np.float64]:
    if a.shape[0] >= n:
        return a
    new = np.full((max(n, 2 * a.shape[0], 64), *a.shape[1:]), fill)
    new[: a.shape[0]] = a
    return new


class _Decayed:
    """Per-layer counts that decay with time constant `tau` (exponentially weighted uses)."""

    def __init__(self, tau: float) -> None:
        self.tau = tau
        self.values = np.zeros(0)
        self.total = 0.0
        self.ts = -math.inf

    def add(self, ts: float, rows: Sequence[int], n: int) -> None:
        if self.ts > -math.inf:
            factor = math.exp(-max(0.0, ts - self.ts) / self.tau)
            self.values *= factor
            self.total *= factor
        self.ts = max(ts, self.ts)
        self.values = _grow(self.values, n)
        self.values[list(rows)] += 1.0
        self.total += 1.0

    def at(self, now: float, rows: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.float64], float]:
        factor = math.exp(-max(0.0, now - self.ts) / self.tau) if self.ts > -math.inf else 0.0
        known = rows >= 0
        out = np.zeros(rows.size)
        out[known] = self.values[rows[known]] * factor
        return out, self.total * factor


class FleetStarts:
    """What the whole fleet started: layer popularity over the last hours and the chains between
    signatures (which signature follows which on the same host)."""

    def __init__(self) -> None:
        self.layers = _LayerIndex()
        self.popularity = _Decayed(6 * HOUR)
        self.signature_layers: dict[str, tuple[str, ...]] = {}
        self.chains: dict[str, dict[str, int]] = {}
        self.follows: dict[str, dict[str, int]] = {}
        """Per signature: per layer, how many of its starts on any host were followed on that host
        within FOLLOW_S by a start that needed the layer (HostStarts counts them)."""
        self.signature_starts: dict[str, int] = {}
        self.repositories: dict[str, tuple[str, str]] = {}
        """Image repository -> (signature, source) of its newest image the fleet started."""
        self.releases: dict[str, str] = {}
        """Signature -> the signature of a newer image of its repository started since (a release),
        so the hosts that ran the old one can be warmed for the new one (coordinator/warm_predictor.py)."""

    def add(self, start: Start, previous: str | None) -> None:
        self._add_release(start)
        rows = self.layers.ids(start.layers)
        self.popularity.add(start.ts, rows, len(self.layers.digests))
        self.signature_layers[start.signature] = start.layers
        self.signature_starts[start.signature] = self.signature_starts.get(start.signature, 0) + 1
        if previous is not None:
            nxt = self.chains.setdefault(previous, {})
            nxt[start.signature] = nxt.get(start.signature, 0) + 1

    def _add_release(self, start: Start) -> None:
        """A first start of a new image (another tag or digest) of a repository the fleet ran: a
        release of the old image's signature. The same image under another command is not."""
        repository = image_repository(start.source)
        if not repository or start.signature in self.signature_layers:
            return
        old, source = self.repositories.get(repository, (None, ""))
        if old is not None and source == start.source:
            return
        self.repositories[repository] = (start.signature, start.source)
        if old is not None:
            self.releases[old] = start.signature
            for older, newer in self.releases.items():  # v1 -> v2 becomes v1 -> v3 at v3
                if newer == old:
                    self.releases[older] = start.signature

    def pushed(self, source: str, layers: tuple[str, ...]) -> bool:
        """A registry's push of `source` (`image:<ref>`) with these layers, before any host started
        it: a new image of a repository the fleet runs is a release of the repository's newest
        signature now, so the hosts that ran that signature are warmed for the new layers before the
        image's first start anywhere (`warm_predictor.released`). The pushed image stands for the
        signature its first start will have (the push knows no command); that start keeps the
        release. False when the push is no release (a repository the fleet never ran, or an image it
        has seen)."""
        repository = image_repository(source)
        old, known = self.repositories.get(repository, (None, ""))
        if old is None or known == source:
            return False
        key = f"pushed:{source}"
        self._add_release(Start(0.0, key, layers, source))
        self.signature_layers[key] = layers
        return True

    def popular(self, now: float, n: int = FLEET_CANDIDATES) -> list[str]:
        """The `n` layers with the most recent uses (ties: the first seen first, so the choice is stable)."""
        if not self.layers.digests:
            return []
        values, _ = self.popularity.at(now, np.arange(len(self.layers.digests)))
        order = np.argsort(-values, kind="stable")[:n]
        return [self.layers.digests[i] for i in order.tolist() if values[i] > 0]

    def shares(self, now: float, digests: Sequence[str]) -> npt.NDArray[np.float64]:
        values, total = self.popularity.at(now, self.layers.lookup(digests))
        return values / total if total > 0 else np.zeros(len(digests))

    def chain_share(self, previous: str | None, digests: Sequence[str]) -> npt.NDArray[np.float64]:
        return chain_share(self.chains.get(previous or "", {}), self.signature_layers, digests)

    def follow_share(self, previous: str | None, digests: Sequence[str]) -> npt.NDArray[np.float64]:
        """Per layer, the share of the fleet's starts of `previous` that a start needing it followed
        within FOLLOW_S on the same host: NaN when the fleet never started `previous`. A host
        starting a signature it never ran (a new release) learns its workflow from other hosts."""
        seen = self.signature_starts.get(previous or "", 0)
        if not seen:
            return np.full(len(digests), np.nan)
        follows = self.follows.get(previous or "", {})
        return np.array([follows.get(d, 0) / seen for d in digests], np.float64)

    def followers(self, previous: str | None, n: int = FLEET_CANDIDATES) -> list[str]:
        """The `n` layers that most often followed `previous` across the fleet (ties: first seen first)."""
        follows = self.follows.get(previous or "", {})
        return [d for d, _ in sorted(follows.items(), key=lambda kv: -kv[1])[:n]]


def image_repository(source: str) -> str:
    """`registry/path` of an `image:registry/path:tag` or `...@digest` source; "" for anything else."""
    if not source.startswith("image:"):
        return ""
    return split_reference(source.removeprefix("image:"))[0]


def chain_share(
    following: dict[str, int], signature_layers: dict[str, tuple[str, ...]], digests: Sequence[str]
) -> npt.NDArray[np.float64]:
    """P(the next start needs each layer), from how often each signature followed: NaN when the
    previous signature was never followed by anything (no evidence, not zero)."""
    total = sum(following.values())
    if total == 0:
        return np.full(len(digests), np.nan)
    where = {d: i for i, d in enumerate(digests)}
    out = np.zeros(len(digests))
    for sig, count in following.items():
        for d in signature_layers.get(sig, ()):
            i = where.get(d)
            if i is not None:
                out[i] += count
    return out / total


class HostStarts:
    """One host's start history, kept incrementally (O(layers of a start) per start)."""

    def __init__(self) -> None:
        self.recent: deque[tuple[Start, list[int]]] = deque(maxlen=KEEP_STARTS)
        """The last starts with the rows of their (distinct) layers."""
        self.window_counts = [np.zeros(0) for _ in WINDOWS]
        self.layers = _LayerIndex()
        self.uses_1h = _Decayed(HOUR)
        self.uses_6h = _Decayed(6 * HOUR)
        self.last_use = np.zeros(0)
        self.interval = np.zeros(0)
        """Per layer: exponentially weighted mean of the seconds between its uses (0: one use)."""
        self.hourly = np.zeros((0, 24))
        self.hourly_starts = np.zeros(24)
        self.total_uses = np.zeros(0)
        self.starts = 0
        self.first_ts = math.inf
        self.chains: dict[str, dict[str, int]] = {}
        self.signature_layers: dict[str, tuple[str, ...]] = {}
        self.signature_runs: dict[str, list[float]] = {}
        """Per signature: [last start, mean gap between its starts (0: one start), mean deviation of the gaps]."""
        self.layer_signatures: dict[str, set[str]] = {}
        self.signature_starts: dict[str, int] = {}
        self.follows: dict[str, dict[str, int]] = {}
        """Per signature: per layer, how many of its starts on the host were followed within FOLLOW_S
        by a start that needed the layer (a workflow's next step, whichever starts came between)."""
        self.open_follows: deque[tuple[float, str, set[str]]] = deque()

    @property
    def last_signature(self) -> str | None:
        return self.recent[-1][0].signature if self.recent else None

    def add(self, start: Start, fleet: FleetStarts | None = None) -> None:
        """Record a start (in time order: an older one than the last is refused with ValueError)."""
        if self.recent and start.ts < self.recent[-1][0].ts:
            raise ValueError(f"start at {start.ts} is older than the last one ({self.recent[-1][0].ts})")
        previous = self.last_signature
        rows = self.layers.ids(dict.fromkeys(start.layers))  # distinct: fancy += counts a row once
        n = len(self.layers.digests)
        self.uses_1h.add(start.ts, rows, n)
        self.uses_6h.add(start.ts, rows, n)
        self.last_use = _grow(self.last_use, n, np.nan)
        self.interval = _grow(self.interval, n)
        self.total_uses = _grow(self.total_uses, n)
        self.hourly = _grow(self.hourly, n)
        for k, window in enumerate(WINDOWS):
            counts = self.window_counts[k] = _grow(self.window_counts[k], n)
            if len(self.recent) >= window:
                counts[self.recent[-window][1]] -= 1.0
            counts[rows] += 1.0
        for i in rows:
            if not np.isnan(self.last_use[i]):
                gap = start.ts - self.last_use[i]
                self.interval[i] = gap if self.interval[i] == 0 else 0.7 * self.interval[i] + 0.3 * gap
            self.last_use[i] = start.ts
        hour = int((start.ts % DAY) // HOUR)
        self.hourly[rows, hour] += 1.0
        self.hourly_starts[hour] += 1.0
        self.total_uses[rows] += 1.0
        self.starts += 1
        self.first_ts = min(self.first_ts, start.ts)
        self.signature_layers[start.signature] = start.layers
        if previous is not None:
            nxt = self.chains.setdefault(previous, {})
            nxt[start.signature] = nxt.get(start.signature, 0) + 1
        self._add_signature(start, fleet)
        self.recent.append((start, rows))
        if fleet is not None:
            fleet.add(start, previous)

    def _add_signature(self, start: Start, fleet: FleetStarts | None) -> None:
        """Per signature: the regularity of its starts (crons) and what followed it."""
        runs = self.signature_runs.get(start.signature)
        if runs is None:
            self.signature_runs[start.signature] = [start.ts, 0.0, 0.0]
        else:
            gap = start.ts - runs[0]
            if runs[1] == 0:
                runs[1] = gap
            else:
                runs[2] = 0.7 * runs[2] + 0.3 * abs(gap - runs[1])
                runs[1] = 0.7 * runs[1] + 0.3 * gap
            runs[0] = start.ts
        for d in start.layers:
            self.layer_signatures.setdefault(d, set()).add(start.signature)
        while self.open_follows and start.ts - self.open_follows[0][0] > FOLLOW_S:
            self.open_follows.popleft()
        for _, sig, seen in self.open_follows:
            counts = self.follows.setdefault(sig, {})
            fleet_counts = fleet.follows.setdefault(sig, {}) if fleet is not None else {}
            for d in start.layers:
                if d not in seen:
                    seen.add(d)
                    counts[d] = counts.get(d, 0) + 1
                    fleet_counts[d] = fleet_counts.get(d, 0) + 1
        self.open_follows.append((start.ts, start.signature, set()))
        self.signature_starts[start.signature] = self.signature_starts.get(start.signature, 0) + 1

    def _signature_features(self, now: float, digests: Sequence[str]) -> npt.NDArray[np.float64]:
        """[n, 3]: signature_due, signature_irregularity, follow_host."""
        out = np.full((len(digests), 3), np.nan)
        # per signature with a gap: how far now is from its next start if it keeps its rhythm, in gaps
        due: dict[str, tuple[float, float]] = {}
        for sig, (last, gap, dev) in self.signature_runs.items():
            if gap > 0:
                due[sig] = (abs(now - last - gap) / gap, dev / gap)
        previous = self.last_signature
        follows = self.follows.get(previous or "", {})
        seen = self.signature_starts.get(previous or "", 0)
        for i, d in enumerate(digests):
            best = min((due[s] for s in self.layer_signatures.get(d, ()) if s in due), default=None)
            if best is not None:
                out[i, 0] = min(best[0], 50.0)
                out[i, 1] = min(best[1], 50.0)
            if seen:
                out[i, 2] = follows.get(d, 0) / seen
        return out

    def candidates(self, now: float, fleet: FleetStarts | None = None) -> list[str]:
        """The layers worth scoring: those of the host's last starts, then the fleet's most used, then
        those that most often followed the host's last signature across the fleet."""
        recent = np.flatnonzero(self.window_counts[-1] > 0) if self.recent else np.empty(0, np.int64)
        out = dict.fromkeys(self.layers.digests[i] for i in recent.tolist())
        if fleet is not None:
            out.update(dict.fromkeys(fleet.popular(now)))
            out.update(dict.fromkeys(fleet.followers(self.last_signature)))
        return list(out)

    def features(self, now: float, digests: Sequence[str], fleet: FleetStarts | None = None) -> npt.NDArray[np.float32]:
        """[len(digests), N_FEATURES] at `now`, from the starts added so far (none after `now`)."""
        n = len(digests)
        X = np.full((n, N_FEATURES), np.nan)
        rows = self.layers.lookup(digests)
        known = rows >= 0
        for col, window in enumerate(WINDOWS):
            if self.recent:
                counts = np.zeros(n)
                counts[known] = self.window_counts[col][rows[known]]
                X[:, col] = counts / min(window, len(self.recent))
        X[:, 3], _ = self.uses_1h.at(now, rows)
        X[:, 4], _ = self.uses_6h.at(now, rows)
        since = np.full(n, np.nan)
        since[known] = now - self.last_use[rows[known]]
        X[:, 5] = np.log1p(np.where(np.isnan(since), 30 * DAY, np.maximum(since, 0.0)))
        interval = np.zeros(n)
        interval[known] = self.interval[rows[known]]
        X[:, 6] = np.where(interval > 0, np.minimum(since / np.where(interval > 0, interval, 1.0), 50.0), np.nan)
        last = self.last_signature
        X[:, 7] = chain_share(self.chains.get(last or "", {}), self.signature_layers, digests)
        if fleet is not None:
            X[:, 8] = fleet.chain_share(last, digests)
            X[:, 15] = fleet.shares(now, digests)
            X[:, 20] = fleet.follow_share(last, digests)
        hour = int((now % DAY) // HOUR)
        bins = [hour, (hour + 1) % 24]
        starts_in_bins = self.hourly_starts[bins].sum()
        uses_in_bins = np.zeros(n)
        uses_in_bins[known] = self.hourly[rows[known]][:, bins].sum(axis=1)
        X[:, 9] = uses_in_bins / starts_in_bins if starts_in_bins > 0 else np.nan
        days = max((now - self.first_ts) / DAY, 1.0) if self.starts else 1.0
        X[:, 10] = np.log1p(uses_in_bins / days)
        X[:, 11] = math.sin(2 * math.pi * (now % DAY) / DAY)
        X[:, 12] = math.cos(2 * math.pi * (now % DAY) / DAY)
        _, starts_1h = self.uses_1h.at(now, rows[:0])
        X[:, 13] = math.log1p(starts_1h)
        last_ts = self.recent[-1][0].ts if self.recent else now - 30 * DAY
        X[:, 14] = math.log1p(max(0.0, now - last_ts))
        totals = np.zeros(n)
        totals[known] = self.total_uses[rows[known]]
        X[:, 16] = totals / self.starts if self.starts else np.nan
        X[:, 17:20] = self._signature_features(now, digests)
        return X.astype(np.float32)
