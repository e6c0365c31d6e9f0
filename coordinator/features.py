"""Drain-model features: one definition shared by training (models/drain/) and serving (the coordinator).

Samples are first accumulated into one-minute bins covering the last two hours (sums and counts per
field, event sums, sample counts), so the features do not depend on the sampling period, gaps or
jitter: a host sampled every 5 s and one sampled every 60 s produce the same kind of numbers. All
features are then computed for a whole batch of hosts at once from the binned windows with a few
matrix products, which is what keeps 10 000 hosts per tick cheap.

The features are chosen to hold on fleets the model was not trained on (`drain-features/2`):
- each reading is compared with the host's own baseline (the bins 30 min to 2 h old): the shift of
  the last 5 and 30 minutes and the largest one-minute excursion in the last 30, in units of the
  baseline's spread, and the 30-minute trend in the same units. Whether a precursor ramps linearly,
  steps or creeps up, and whatever the host's size, these say "moved well away from normal";
- throughputs are never used as absolute levels (they scale with the host's size), bounded readings
  (utilisation, PSI, memory fraction, load per CPU) are;
- announcements count as "seen" (0/1) and "seconds since", never as counts: a source that repeats
  its notice every minute and one that says it once mean the same;
- hardware errors as log rates and their acceleration, samples gone missing as the rise of the gap
  fraction over the host's own baseline (a host sampled every 2 minutes is not failing).

Two ways to feed a host:
- any `Sequence[TelemetryPoint]` (binned on the fly: O(points) Python work per host);
- a `HostHistory`, which keeps the bins incrementally as points arrive (O(1) per point) and is the
  fast path for a large fleet.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

FEATURES_VERSION = "drain-features/2"
"""Bump whenever a feature's definition, order or binning changes: models record it and the
predictor refuses a model trained on another version."""

BIN_S = 60.0
"""Width of one bin, seconds."""
N_BINS = 120
"""Bins kept: the longest horizon (2 h)."""

FIELDS: tuple[str, ...] = (
    "cpu_util",
    "load1",
    "mem_available_frac",
    "psi_cpu_some",
    "psi_mem_some",
    "psi_mem_full",
    "psi_io_some",
    "psi_io_full",
    "disk_bps",
    "net_bps",
)
EVENTS: tuple[str, ...] = ("hw_errors", "drain_notice", "maintenance", "oom_kills", "preemption_signal")

_LOG_FIELDS = ("disk_bps", "net_bps")
"""Heavy-tailed throughputs are binned as log1p(bytes/s): scale-free, and float32 keeps their slopes exact."""
_LOG_COLS = [FIELDS.index(f) for f in _LOG_FIELDS]
_C = len(FIELDS)
_E = len(EVENTS)
# Rows of a binned window: per-field sums, counts and sums of squares, event sums, samples, newest
# sample offset.
_SUM = slice(0, _C)
_CNT = slice(_C, 2 * _C)
_SQ = slice(2 * _C, 3 * _C)
_EVT = slice(3 * _C, 3 * _C + _E)
_SAMPLES = 3 * _C + _E
_LAST = _SAMPLES + 1
N_ROWS = _LAST + 1

Float32Array = npt.NDArray[np.float32]
Float64Array = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class TelemetryPoint:
    """One host sample as the model sees it. None means the reading was missing."""

    ts: float
    """Unix seconds."""
    cpu_util: float | None
    """0..1."""
    load1: float | None
    """load1 / CPU count."""
    mem_available_frac: float | None
    """MemAvailable / MemTotal."""
    psi_cpu_some: float | None
    """/proc/pressure avg10, percent 0..100."""
    psi_mem_some: float | None
    psi_mem_full: float | None
    psi_io_some: float | None
    psi_io_full: float | None
    disk_bps: float | None
    """Read + write bytes/s."""
    net_bps: float | None
    """rx + tx bytes/s."""
    hw_errors: int = 0
    """Events seen in this sample (counts), e.g. EDAC/MCE/disk errors."""
    drain_notice: int = 0
    maintenance: int = 0
    oom_kills: int = 0
    preemption_signal: int = 0


# --- feature layout -------------------------------------------------------------------------------

_BOUNDED = (
    "cpu_util",
    "load1",
    "mem_available_frac",
    "psi_cpu_some",
    "psi_mem_some",
    "psi_mem_full",
    "psi_io_some",
    "psi_io_full",
)
"""Readings whose level means the same on any host: they also get absolute levels."""
_FLOOR = {
    "cpu_util": 0.02,
    "load1": 0.05,
    "mem_available_frac": 0.02,
    "psi_cpu_some": 0.5,
    "psi_mem_some": 0.5,
    "psi_mem_full": 0.5,
    "psi_io_some": 0.5,
    "psi_io_full": 0.5,
    "disk_bps": 0.1,
    "net_bps": 0.1,
}
"""The least spread a baseline is taken to have (reading units; log1p for throughputs), so a flat
host's tiny wobble is not a large shift."""
_FLOORS = np.array([_FLOOR[f] for f in FIELDS], np.float64)
_BOUNDED_COLS = np.array([FIELDS.index(f) for f in _BOUNDED])
ANNOUNCEMENTS = ("drain_notice", "maintenance", "preemption_signal")
_ANN_COLS = [EVENTS.index(e) for e in ANNOUNCEMENTS]
_HW = EVENTS.index("hw_errors")
_OOM = EVENTS.index("oom_kills")
_RECENT, _LONG = 30, N_BINS
_BASE = (30, N_BINS)
"""Ages (bins) of the baseline: 30 min to 2 h ago."""
_SINCE_NONE = N_BINS * BIN_S
"""Value of a "seconds since" feature when nothing was seen in the whole window (>= 2 h)."""


def _display(f: str) -> str:
    return f"log_{f}" if f in _LOG_FIELDS else f


def _feature_names() -> tuple[str, ...]:
    names: list[str] = []
    for f in _BOUNDED:
        names += [f"{f}_mean_5m", f"{f}_mean_30m", f"{f}_mean_2h"]
    for f in FIELDS:
        d = _display(f)
        names += [f"{d}_shift_5m", f"{d}_shift_30m", f"{d}_peak_30m", f"{d}_trend_30m", f"{d}_missing_frac_30m"]
    for e in ANNOUNCEMENTS:
        names += [f"{e}_seen_30m", f"{e}_seen_2h", f"{e}_seconds_since"]
    names += ["announcement_seen_5m", "announcement_seen_30m", "announcement_seen_2h", "announcement_seconds_since"]
    names += [
        "hw_errors_seen_30m",
        "hw_errors_log_rate_30m",
        "hw_errors_log_rate_2h",
        "hw_errors_acceleration",
        "hw_errors_active_frac_30m",
        "hw_errors_seconds_since",
    ]
    names += ["oom_kills_seen_30m", "oom_kills_seconds_since"]
    names += ["gap_frac_2h", "gap_rise_5m", "gap_rise_30m"]
    return tuple(names)


FEATURE_NAMES: tuple[str, ...] = _feature_names()
N_FEATURES = len(FEATURE_NAMES)


def _window_matrix() -> tuple[Float32Array, dict[str, int]]:
    """Columns that reduce a window (bin 0 = newest) to sums over sub-windows, and x-moments for slopes.

    x is seconds relative to the slope window's centre (newer = larger), which keeps the normal
    equations well conditioned in float32.
    """
    cols: list[Float32Array] = []
    index: dict[str, int] = {}
    age = np.arange(N_BINS, dtype=np.float64)

    def add(name: str, col: Float64Array) -> None:
        index[name] = len(cols)
        cols.append(col.astype(np.float32))

    for bins in (5, 30, N_BINS):
        add(f"w{bins}", (age < bins).astype(np.float64))
    add("base", ((age >= _BASE[0]) & (age < _BASE[1])).astype(np.float64))
    inside = age < _RECENT
    x = np.where(inside, -(age + 0.5) * BIN_S + _RECENT * BIN_S / 2, 0.0)
    add(f"x{_RECENT}", x)
    add(f"xx{_RECENT}", x * x)
    return np.stack(cols, axis=1), index


_WINDOWS, _COL = _window_matrix()


# --- binning --------------------------------------------------------------------------------------


def points_to_columns(points: Sequence[TelemetryPoint]) -> tuple[Float64Array, Float32Array, Float32Array]:
    """(ts [n], values [n, fields] with NaN for missing, events [n, kinds]) for a list of points."""
    if not points:
        return np.empty(0), np.empty((0, _C), np.float32), np.empty((0, _E), np.float32)
    # np.array(..., float) maps None to NaN, which is what "missing" means here.
    raw = np.array(
        [
            (
                p.ts,
                p.cpu_util,
                p.load1,
                p.mem_available_frac,
                p.psi_cpu_some,
                p.psi_mem_some,
                p.psi_mem_full,
                p.psi_io_some,
                p.psi_io_full,
                p.disk_bps,
                p.net_bps,
                p.hw_errors,
                p.drain_notice,
                p.maintenance,
                p.oom_kills,
                p.preemption_signal,
            )
            for p in points
        ],
        dtype=np.float64,
    )
    return raw[:, 0], raw[:, 1 : 1 + _C].astype(np.float32), raw[:, 1 + _C :].astype(np.float32)


def _accumulate(
    target: Float32Array,
    slots: npt.NDArray[np.int64],
    offsets: Float64Array,
    values: Float32Array,
    events: Float32Array,
) -> None:
    """Add samples into bins `slots` of `target` [N_ROWS, slots]; offsets = ts - bin start, seconds.

    Non-finite readings count as missing; negative or non-finite event counts as zero.
    """
    values = values.copy()
    values[:, _LOG_COLS] = np.log1p(np.maximum(values[:, _LOG_COLS], 0.0))
    finite = np.isfinite(values)
    # transposed views: np.add.at indexes the first axis
    clean = np.where(finite, values, 0.0).astype(np.float32)
    np.add.at(target[_SUM].T, slots, clean)
    np.add.at(target[_CNT].T, slots, finite.astype(np.float32))
    np.add.at(target[_SQ].T, slots, clean * clean)
    ev = np.where(np.isfinite(events) & (events > 0), events, 0.0).astype(np.float32)
    np.add.at(target[_EVT].T, slots, ev)
    np.add.at(target[_SAMPLES], slots, np.float32(1.0))
    np.maximum.at(target[_LAST], slots, offsets.astype(np.float32))


def _split_ts(ts: Float64Array) -> tuple[npt.NDArray[np.int64], Float64Array]:
    bins = np.floor(ts / BIN_S).astype(np.int64)
    return bins, ts - bins * BIN_S


def window_from_columns(ts: Float64Array, values: Float32Array, events: Float32Array, now: float) -> Float32Array:
    """The binned window [N_ROWS, N_BINS] (bin 0 = the one holding `now`) of raw columns."""
    out = np.zeros((N_ROWS, N_BINS), np.float32)
    ok = np.isfinite(ts)
    bins, offsets = _split_ts(ts[ok])
    age = math.floor(now / BIN_S) - bins
    keep = (age >= 0) & (age < N_BINS) & (ts[ok] <= now)
    _accumulate(out, age[keep], offsets[keep], values[ok][keep], events[ok][keep])
    return out


def timeline_from_columns(
    ts: Float64Array, values: Float32Array, events: Float32Array, first_bin: int, n_bins: int
) -> Float32Array:
    """Bins [N_ROWS, n_bins] of a whole recorded trace, oldest first; training slices windows from it."""
    out = np.zeros((N_ROWS, n_bins), np.float32)
    ok = np.isfinite(ts)
    bins, offsets = _split_ts(ts[ok])
    slot = bins - first_bin
    keep = (slot >= 0) & (slot < n_bins)
    _accumulate(out, slot[keep], offsets[keep], values[ok][keep], events[ok][keep])
    return out


def windows_from_timeline(timeline: Float32Array, now_bins: npt.NDArray[np.int64]) -> Float32Array:
    """Windows [len(now_bins), N_ROWS, N_BINS] from a timeline; now_bins index its columns.

    Only samples in bins up to and including now's bin are used, so no feature sees the future
    beyond the current minute.
    """
    padded = np.concatenate([np.zeros((N_ROWS, N_BINS - 1), np.float32), timeline], axis=1)
    view = np.lib.stride_tricks.sliding_window_view(padded, N_BINS, axis=1)  # [R, T, N]
    # padded column (t + N_BINS - 1) is timeline column t; window starting at t covers t-N+1..t
    win = view[:, now_bins, :]  # [R, k, N] oldest..newest
    return np.ascontiguousarray(win[:, :, ::-1].transpose(1, 0, 2))


class HostHistory:
    """A host's last two hours of telemetry, kept as bins: O(1) memory and O(1) work per point.

    Points may arrive late or out of order; those older than the window are dropped.
    """

    __slots__ = ("_bin_ids", "_head", "_ring")

    def __init__(self) -> None:
        self._ring = np.zeros((N_ROWS, N_BINS), np.float32)
        self._bin_ids = np.full(N_BINS, np.iinfo(np.int64).min, np.int64)
        self._head = np.iinfo(np.int64).min

    @classmethod
    def from_points(cls, points: Iterable[TelemetryPoint]) -> HostHistory:
        history = cls()
        history.extend(points)
        return history

    def append(self, point: TelemetryPoint) -> None:
        self.extend((point,))

    def extend(self, points: Iterable[TelemetryPoint]) -> None:
        points = list(points)
        if len(points) == 1:
            self._add_point(points[0])
        else:
            self.add_columns(*points_to_columns(points))

    def _add_point(self, p: TelemetryPoint) -> None:
        """`add_columns` for one point (a push's usual load) in plain Python, one vector add: the
        array path's dozens of small numpy calls cost about ten times as much for one row. The
        same float32 values, bit for bit."""
        if not math.isfinite(p.ts):
            return
        bin_id = math.floor(p.ts / BIN_S)
        self._head = max(self._head, bin_id)
        if bin_id <= self._head - N_BINS:
            return
        slot = bin_id % N_BINS
        if self._bin_ids[slot] != bin_id:
            self._ring[:, slot] = 0.0
            self._bin_ids[slot] = bin_id
        sums: list[float] = []
        counts: list[float] = []
        squares: list[float] = []
        for name in FIELDS:
            value = getattr(p, name)
            if value is None or not math.isfinite(value):
                sums.append(0.0)
                counts.append(0.0)
                squares.append(0.0)
                continue
            v = float(np.float32(value))
            if name in _LOG_FIELDS:  # as the array path: float32 in, float32 out
                v = float(np.log1p(np.float32(max(v, 0.0))))
            sums.append(v)
            counts.append(1.0)
            squares.append(v * v)
        events = [float(e) if math.isfinite(e) and e > 0 else 0.0 for e in (getattr(p, k) for k in EVENTS)]
        column = self._ring[:, slot]
        column[:_LAST] += np.array([*sums, *counts, *squares, *events, 1.0], np.float32)
        offset = np.float32(p.ts - bin_id * BIN_S)
        if offset > column[_LAST]:
            column[_LAST] = offset

    def add_columns(self, ts: Float64Array, values: Float32Array, events: Float32Array) -> None:
        ok = np.isfinite(ts)
        if not ok.any():
            return
        bins, offsets = _split_ts(ts[ok])
        self._head = max(self._head, int(bins.max()))
        keep = bins > self._head - N_BINS
        bins, offsets = bins[keep], offsets[keep]
        slots = bins % N_BINS
        # a slot still holding an older bin (same slot one or more windows ago) starts afresh
        stale = np.unique(slots[self._bin_ids[slots] != bins])
        if stale.size:
            self._ring[:, stale] = 0.0
        self._bin_ids[slots] = bins
        _accumulate(self._ring, slots, offsets, values[ok][keep], events[ok][keep])

    def window(self, now: float) -> Float32Array:
        """The binned window [N_ROWS, N_BINS] at `now` (bin 0 holds `now`)."""
        rings, ages = _stack_histories([self], now)
        return rings[0][:, np.argsort(ages)]

    def recent_bins(self, count: int) -> dict[int, Float32Array]:
        """The newest `count` bins that hold samples, by bin id (each [N_ROWS], a copy): what another
        replica needs to add this history's latest samples to its own (`set_bins`, `merged`)."""
        if self._head == np.iinfo(np.int64).min:
            return {}
        out: dict[int, Float32Array] = {}
        for bin_id in range(self._head - count + 1, self._head + 1):
            slot = bin_id % N_BINS
            if self._bin_ids[slot] == bin_id and self._ring[_SAMPLES, slot] > 0:
                out[bin_id] = self._ring[:, slot].copy()
        return out

    def set_bins(self, ids: Sequence[int], rows: Float32Array) -> None:
        """Replace whole bins (`ids`, distinct) with what another replica holds for them (`rows`
        [len(ids), N_ROWS]); bins older than the window (relative to the newest known) are ignored."""
        # A plain loop: a share has a few bins, and fancy indexing costs more than it saves here.
        self._head = max(self._head, *ids) if len(ids) else self._head
        for i, bin_id in enumerate(ids):
            if bin_id > self._head - N_BINS:
                slot = bin_id % N_BINS
                self._ring[:, slot] = rows[i]
                self._bin_ids[slot] = bin_id

    @classmethod
    def merged(cls, parts: Sequence[HostHistory]) -> HostHistory:
        """One history holding every part's samples (each replica's share of one host): the bins'
        sums and counts add up, the newest-sample offsets take the latest."""
        out = cls()
        if not parts:
            return out
        out._head = max(p._head for p in parts)
        for part in parts:
            live = part._bin_ids > out._head - N_BINS
            newer = live & (part._bin_ids > out._bin_ids)
            if newer.any():  # a slot still holding an older bin (or none) starts from this part's
                out._ring[:, newer] = part._ring[:, newer]
                out._bin_ids[newer] = part._bin_ids[newer]
            same = live & ~newer & (part._bin_ids == out._bin_ids)
            if same.any():
                last = np.maximum(out._ring[_LAST, same], part._ring[_LAST, same])
                out._ring[:, same] += part._ring[:, same]
                out._ring[_LAST, same] = last
        return out


def _stack_histories(histories: Sequence[HostHistory], now: float) -> tuple[Float32Array, npt.NDArray[np.int64]]:
    """The rings [n, N_ROWS, N_BINS] as stored, bins outside the window zeroed, and each column's age.

    Every ring puts bin b in slot b % N_BINS, so one column order (ages) serves all hosts and the
    data is never permuted.
    """
    now_bin = math.floor(now / BIN_S)
    ages = (now_bin - np.arange(N_BINS, dtype=np.int64)) % N_BINS
    rings = np.stack([h._ring for h in histories])  # [n, R, N]
    ids = np.stack([h._bin_ids for h in histories])  # [n, N]
    stale = ids != now_bin - ages
    hosts = np.flatnonzero(stale.any(axis=1))
    if hosts.size:
        rings[hosts] *= ~stale[hosts, None, :]
    return rings, ages


# --- features from windows ------------------------------------------------------------------------


def features_from_windows(
    windows: Float32Array, now: float | Float64Array, ages: npt.NDArray[np.int64] | None = None
) -> Float32Array:
    """Features [n, N_FEATURES] from binned windows [n, N_ROWS, N_BINS] taken at `now` (scalar or [n]).

    Column j of a window is the bin `ages[j]` bins before now's (default: j, newest first). The one
    feature definition: serving and training both end here.
    """
    n = windows.shape[0]
    age = np.arange(N_BINS, dtype=np.int64) if ages is None else ages
    weights = _WINDOWS[age]
    if n == 0:
        return np.empty((0, N_FEATURES), np.float32)

    red = (windows.reshape(n * N_ROWS, N_BINS) @ weights).reshape(n, N_ROWS, -1).astype(np.float64)
    sums, cnts = red[:, _SUM, :], red[:, _CNT, :]
    samples = red[:, _SAMPLES, :]

    def level(col: str) -> Float64Array:
        k = _COL[col]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(cnts[:, :, k] > 0, sums[:, :, k] / cnts[:, :, k], np.nan)

    # the baseline: mean and spread of the readings 30 min to 2 h old
    nb = cnts[:, :, _COL["base"]]
    with np.errstate(invalid="ignore", divide="ignore"):
        base_mean = np.where(nb >= 2, sums[:, :, _COL["base"]] / nb, np.nan)
        base_var = np.where(nb >= 2, red[:, _SQ, _COL["base"]] / nb - base_mean**2, np.nan)
    scale = np.sqrt(np.maximum(base_var, 0.0)) + _FLOORS  # [n, C]
    # the highest one-minute mean of the last 30 minutes
    recent_cols = np.flatnonzero(age < _RECENT)
    r_sum, r_cnt = windows[:, _SUM, :][:, :, recent_cols], windows[:, _CNT, :][:, :, recent_cols]
    r_has = r_cnt > 0
    r_mean = np.divide(r_sum, r_cnt, out=np.full_like(r_sum, -np.inf), where=r_has)
    peak = r_mean.max(axis=2).astype(np.float64)
    peak[~np.isfinite(peak)] = np.nan

    m5, m30, m2h = level("w5"), level("w30"), level(f"w{N_BINS}")

    # least-squares slope over the last 30 minutes, per second
    w, x, xx = _COL[f"w{_RECENT}"], _COL[f"x{_RECENT}"], _COL[f"xx{_RECENT}"]
    sw, swx, swxx = cnts[:, :, w], cnts[:, :, x], cnts[:, :, xx]
    sy, sxy = sums[:, :, w], sums[:, :, x]
    den = sw * swxx - swx * swx
    with np.errstate(invalid="ignore", divide="ignore"):
        slope = np.where(den > 1e-6 * np.maximum(sw * swxx, 1.0), (sw * sxy - swx * sy) / den, np.nan)
        missing = np.where(samples[:, w, None] > 0, 1.0 - cnts[:, :, w] / samples[:, w, None], 1.0)

    blocks: list[Float64Array] = []
    blocks.append(np.stack([m5, m30, m2h], axis=2)[:, _BOUNDED_COLS, :].reshape(n, -1))
    per_field = np.stack(
        [
            (m5 - base_mean) / scale,
            (m30 - base_mean) / scale,
            (peak - base_mean) / scale,
            slope * (_RECENT * BIN_S) / scale,
            missing,
        ],
        axis=2,
    )
    blocks.append(per_field.reshape(n, -1))

    # events: "seen" and "seconds since", never counts for announcements
    ev = red[:, _EVT, :]  # [n, E, cols]
    first = np.where(windows[:, _EVT, :] > 0, age, N_BINS).min(axis=2)  # [n, E] newest age with events
    since = np.where(first < N_BINS, first * BIN_S, _SINCE_NONE)
    ann = []
    for k in _ANN_COLS:
        ann += [ev[:, k, _COL["w30"]] > 0, ev[:, k, _COL[f"w{N_BINS}"]] > 0, since[:, k]]
    any_ann = ev[:, _ANN_COLS, :].sum(axis=1)
    ann += [any_ann[:, _COL["w5"]] > 0, any_ann[:, _COL["w30"]] > 0, any_ann[:, _COL[f"w{N_BINS}"]] > 0]
    ann.append(since[:, _ANN_COLS].min(axis=1))
    blocks.append(np.stack(ann, axis=1).astype(np.float64))

    hw30, hw2h, hw_base = ev[:, _HW, _COL["w30"]], ev[:, _HW, _COL[f"w{N_BINS}"]], ev[:, _HW, _COL["base"]]
    rate30 = np.log1p(hw30 * (3600.0 / (_RECENT * BIN_S)))  # per hour
    rate2h = np.log1p(hw2h * (3600.0 / (N_BINS * BIN_S)))
    rate_base = np.log1p(hw_base * (3600.0 / ((_BASE[1] - _BASE[0]) * BIN_S)))
    hw_bins = (windows[:, _EVT.start + _HW, :] > 0).astype(np.float32) @ weights[:, _COL["w30"]]
    blocks.append(
        np.stack([hw30 > 0, rate30, rate2h, rate30 - rate_base, hw_bins / _RECENT, since[:, _HW]], axis=1).astype(
            np.float64
        )
    )
    blocks.append(np.stack([ev[:, _OOM, _COL["w30"]] > 0, since[:, _OOM]], axis=1).astype(np.float64))

    occupied = (windows[:, _SAMPLES, :] > 0).astype(np.float32)  # [n, N]
    occ = occupied @ weights
    gap5 = 1.0 - occ[:, _COL["w5"]] / 5
    gap30 = 1.0 - occ[:, _COL["w30"]] / _RECENT
    gap2h = 1.0 - occ[:, _COL[f"w{N_BINS}"]] / N_BINS
    gap_base = 1.0 - occ[:, _COL["base"]] / (_BASE[1] - _BASE[0])
    blocks.append(np.stack([gap2h, gap5 - gap_base, gap30 - gap_base], axis=1).astype(np.float64))

    return np.concatenate(blocks, axis=1).astype(np.float32)


# --- public entry points --------------------------------------------------------------------------

HistoryLike = Sequence[TelemetryPoint] | HostHistory


def windows_for(histories: Sequence[HistoryLike], now: float) -> Float32Array:
    """Binned windows [n, N_ROWS, N_BINS] for a batch of hosts at `now`."""
    if not histories:
        return np.empty((0, N_ROWS, N_BINS), np.float32)
    if all(isinstance(h, HostHistory) for h in histories):
        rings, ages = _stack_histories(histories, now)  # type: ignore[arg-type]
        return rings[:, :, np.argsort(ages)]
    return np.stack([_window(h, now) for h in histories])


def _window(history: HistoryLike, now: float) -> Float32Array:
    if isinstance(history, HostHistory):
        return history.window(now)
    return window_from_columns(*points_to_columns(history), now)


EXTRACT_CHUNK = 256
"""Hosts whose rings are stacked and reduced at once: a fleet's all at once (10 000 hosts, 177 MB
copied and reduced through memory) takes some 40 % more CPU than slices that stay in the caches."""


def extract_batch(histories: Mapping[str, HistoryLike] | Sequence[HistoryLike], now: float) -> Float32Array:
    """Features [n_hosts, N_FEATURES] (float32) in the mapping's (or sequence's) order."""
    seq = list(histories.values()) if isinstance(histories, Mapping) else list(histories)
    if seq and all(isinstance(h, HostHistory) for h in seq):
        if len(seq) <= EXTRACT_CHUNK:
            rings, ages = _stack_histories(seq, now)  # type: ignore[arg-type]
            return features_from_windows(rings, now, ages)
        rows = []
        for start in range(0, len(seq), EXTRACT_CHUNK):
            part = seq[start : start + EXTRACT_CHUNK]
            # The last slice padded to a whole one: BLAS reduces a small matrix with other kernels,
            # which round differently; whole slices give the very floats of the fleet in one batch.
            padding = [HostHistory()] * (EXTRACT_CHUNK - len(part))
            rings, ages = _stack_histories([*part, *padding], now)  # type: ignore[list-item]
            rows.append(features_from_windows(rings, now, ages)[: len(part)])
        return np.concatenate(rows)
    return features_from_windows(windows_for(seq, now), now)


def extract(points: HistoryLike, now: float) -> Float32Array:
    """Features [N_FEATURES] (float32) of one host at `now`."""
    return extract_batch([points], now)[0]


# --- recorded traces (training on recorded telemetry) ---------------------------------------------


@dataclass(frozen=True)
class HostTrace:
    """A host's recorded telemetry as columns plus the drains observed on it."""

    host: str
    ts: Float64Array
    values: Float32Array
    events: Float32Array
    drains: Float64Array
    notices: Float64Array = field(default_factory=lambda: np.empty((0, 2), np.float64))
    """[k, 2]: (seen at, stated deadline) of each notice with a stated time (coordinator/notices.py)."""

    @classmethod
    def from_points(
        cls,
        host: str,
        points: Sequence[TelemetryPoint],
        drains: Iterable[float] = (),
        notices: Iterable[tuple[float, float]] = (),
    ) -> HostTrace:
        ts, values, events = points_to_columns(points)
        order = np.argsort(ts, kind="stable")
        stated = np.asarray(list(notices), np.float64).reshape(-1, 2)
        return cls(host, ts[order], values[order], events[order], np.sort(np.asarray(list(drains), np.float64)), stated)


def trace_features(trace: HostTrace, times: Float64Array, chunk: int = 4096) -> Float32Array:
    """Features [len(times), N_FEATURES] of one trace at each of `times` (any order)."""
    times = np.asarray(times, np.float64)
    if times.size == 0:
        return np.empty((0, N_FEATURES), np.float32)
    lo = min(float(trace.ts.min()) if trace.ts.size else float(times.min()), float(times.min()))
    first_bin = math.floor(lo / BIN_S)
    now_bins = np.floor(times / BIN_S).astype(np.int64) - first_bin
    n_bins = int(now_bins.max()) + 1
    # Every sample of now's bin counts: evaluate at a bin's last sample (see evaluation_times).
    timeline = timeline_from_columns(trace.ts, trace.values, trace.events, first_bin, n_bins)
    out = np.empty((times.size, N_FEATURES), np.float32)
    for start in range(0, times.size, chunk):
        sl = slice(start, start + chunk)
        out[sl] = features_from_windows(windows_from_timeline(timeline, now_bins[sl]), times[sl])
    return out


def seconds_to_next_drain(times: Float64Array, drains: Float64Array) -> Float64Array:
    """For each time, seconds until the first drain strictly after it (inf if none)."""
    padded = np.append(np.sort(np.asarray(drains, np.float64)), np.inf)
    return padded[np.searchsorted(padded, times, side="right")] - times


def drain_labels(times: Float64Array, drains: Float64Array, horizon: float) -> npt.NDArray[np.int8]:
    """1 where a drain happens in (t, t + horizon], else 0."""
    return (seconds_to_next_drain(times, drains) <= horizon).astype(np.int8)


def evaluation_times(trace: HostTrace, stride: float) -> Float64Array:
    """Times to evaluate a trace at: the last sample of a bin, about every `stride` seconds.

    Evaluating at a bin's last sample means no sample after `now` sits in now's bin, so a row never
    sees the future; and "now" is a moment a sample arrived, as when serving.
    """
    if trace.ts.size == 0:
        return np.empty(0)
    bins = np.floor(trace.ts / BIN_S).astype(np.int64)
    last = np.append(bins[1:] != bins[:-1], True)  # ts is sorted
    ts, b = trace.ts[last], bins[last]
    step = max(1, round(stride / BIN_S))
    return ts[b % step == 0]


def save_traces(path: str | Path, traces: Sequence[HostTrace]) -> None:
    """Write traces to one .npz (how the coordinator hands recorded telemetry to a training process)."""
    arrays: dict[str, npt.NDArray[np.generic]] = {
        "hosts": np.array([t.host for t in traces], dtype=np.str_),
        "features_version": np.array(FEATURES_VERSION),
    }
    for i, t in enumerate(traces):
        arrays[f"ts_{i}"] = t.ts
        arrays[f"values_{i}"] = t.values
        arrays[f"events_{i}"] = t.events
        arrays[f"drains_{i}"] = t.drains
        arrays[f"notices_{i}"] = t.notices
    np.savez_compressed(path, **arrays)  # type: ignore[arg-type]


def load_traces(path: str | Path) -> list[HostTrace]:
    with np.load(path, allow_pickle=False) as z:
        if str(z["features_version"]) != FEATURES_VERSION:
            raise ValueError(f"{path}: traces for {z['features_version']}, this code is {FEATURES_VERSION}")
        return [
            HostTrace(
                str(h),
                z[f"ts_{i}"],
                z[f"values_{i}"],
                z[f"events_{i}"],
                z[f"drains_{i}"],
                z[f"notices_{i}"] if f"notices_{i}" in z else np.empty((0, 2), np.float64),
            )
            for i, h in enumerate(z["hosts"])
        ]
