"""Train the drain model: P(host drained within H), exported to ONNX with its model card.

    .venv/bin/python -m models.drain.train                 # the shipped model (drain.onnx, card.*)
    .venv/bin/python -m models.drain.train --recorded traces.npz --out candidate.onnx --threads 1

The first form generates the training fleet (generate.py), splits it by host AND time, trains,
verifies onnxruntime against scikit-learn and writes drain.onnx, card.json and card.md next to this
file. The second retrains on recorded telemetry (coordinator.features.save_traces) and writes only
the candidate model and its card.json; the coordinator then decides whether to activate it.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from coordinator.features import (
    BIN_S,
    FEATURE_NAMES,
    FEATURES_VERSION,
    N_FEATURES,
    HostTrace,
    drain_labels,
    evaluation_times,
    load_traces,
    seconds_to_next_drain,
    trace_features,
)
from models.onnx_export import INPUT_NAME, PROB_OUTPUT, check_onnx, classifier_to_onnx, ort_probabilities
from models.trees import fit_boosted_trees

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class TrainConfig:
    horizon_s: float = 1800.0
    migration_time_s: float = 60.0
    """Alerts count as caught only if they arrive at least this long before the drain."""
    seed: int = 20251123
    model_version: str = "drain-2"
    train_stride_s: float = 1800.0
    """Rows far from any drain: one per this many seconds (weighted back to the natural rate)."""
    dense_before_s: float = 9000.0
    """Rows within this long before a drain: one per minute."""
    eval_stride_s: float = 120.0
    """Test rows: one per this many seconds, unweighted (natural prevalence)."""
    val_stride_s: float = 600.0
    """Validation rows (threshold choice): one per this many seconds, unweighted."""
    max_iter: int = 150
    learning_rate: float = 0.08
    max_leaf_nodes: int = 31
    min_samples_leaf: int = 80
    l2_regularization: float = 1.0
    threads: int = 1
    """OpenMP threads for the fit. More than one is slower on a busy machine (measured 1.2 s with one
    against 27 s with two for the same fit while other jobs held both cores)."""
    # the shipped model: generator families (models/drain/generate.py)
    fleet_hosts: int = 80
    """Hosts per family in a training fleet."""
    fleet_days: float = 10.0
    cal_hosts: int = 30
    """Hosts per family in the calibration fleets (other seeds): calibration and operating threshold."""
    cal_days: float = 8.0
    eval_hosts: int = 50
    """Hosts per family in the evaluation fleets (fresh seeds, never trained or calibrated on)."""
    eval_days: float = 10.0
    drain_boost: float = 3.0
    """Maintenance and hardware failures this many times more often than FleetSpec's defaults, so
    each family has enough drains; calibration weighs positives back by 1/drain_boost."""
    max_false_alarms_per_100_host_days: float = 1.0
    """The operating threshold is the lowest whose false alerts stay within this on calibration fleets."""
    hysteresis: float = 0.1
    """As the coordinator's model.hysteresis: an alert ends below threshold - hysteresis."""
    flag_ahead_s: float = 120.0
    """A drain counts as flagged in time when an alert comes at least this long before it."""


@dataclass
class Dataset:
    X: npt.NDArray[np.float32]
    y: npt.NDArray[np.int8]
    w: npt.NDArray[np.float64]
    hosts: list[str] = field(default_factory=list)


# --- rows -------------------------------------------------------------------------------------------


def training_rows(trace: HostTrace, lo: float, hi: float, cfg: TrainConfig) -> Dataset:
    """Rows in [lo, hi): every minute close before a drain, sparser elsewhere with weights so the
    weighted rows have the natural prevalence."""
    times = evaluation_times(trace, BIN_S)
    times = times[(times >= lo) & (times < hi)]
    step = max(1, round(cfg.train_stride_s / BIN_S))
    dense = seconds_to_next_drain(times, trace.drains) <= cfg.dense_before_s
    coarse = np.floor(times / BIN_S).astype(np.int64) % step == 0
    times, dense = times[dense | coarse], dense[dense | coarse]
    return Dataset(
        trace_features(trace, times),
        drain_labels(times, trace.drains, cfg.horizon_s),
        np.where(dense, 1.0, float(step)),
        [trace.host] * times.size,
    )


def eval_rows(trace: HostTrace, lo: float, hi: float, cfg: TrainConfig, stride: float | None = None) -> Dataset:
    times = evaluation_times(trace, stride or cfg.eval_stride_s)
    times = times[(times >= lo) & (times < hi)]
    return Dataset(
        trace_features(trace, times),
        drain_labels(times, trace.drains, cfg.horizon_s),
        np.ones(times.size),
        [trace.host] * times.size,
    )


def concat(parts: Sequence[Dataset]) -> Dataset:
    if not parts:
        return Dataset(np.empty((0, N_FEATURES), np.float32), np.empty(0, np.int8), np.empty(0))
    return Dataset(
        np.concatenate([p.X for p in parts]),
        np.concatenate([p.y for p in parts]),
        np.concatenate([p.w for p in parts]),
        [h for p in parts for h in p.hosts],
    )


# --- model, ONNX ------------------------------------------------------------------------------------


def fit(data: Dataset, cfg: TrainConfig) -> Any:
    if data.y.min(initial=1) == data.y.max(initial=0):
        raise ValueError("training rows hold only one class: need both drained and quiet hosts")
    # Unweighted on purpose: scikit-learn's binning with sample weights took 10 s of a 11 s fit
    # (12k rows); the over-represented rows near drains are mapped back to the natural rate by the
    # calibration fitted afterwards (fit_calibration).
    return fit_boosted_trees(
        data.X,
        data.y,
        max_iter=cfg.max_iter,
        learning_rate=cfg.learning_rate,
        max_leaf_nodes=cfg.max_leaf_nodes,
        min_samples_leaf=cfg.min_samples_leaf,
        l2_regularization=cfg.l2_regularization,
        seed=cfg.seed,
        threads=cfg.threads,
    )


def to_onnx(model: Any, metadata: dict[str, str]) -> bytes:
    """The model as ONNX: input `features` float32 [N, N_FEATURES]; outputs `label` int64 [N] and
    `probabilities` float32 [N, 2], column 1 = P(drain within horizon)."""
    return classifier_to_onnx(
        model, N_FEATURES, "ferryman_drain", "ferryman drain predictor: P(host drained within horizon_s)", metadata
    )


def metadata(cfg: TrainConfig, threshold: float, data_version: str) -> dict[str, str]:
    return {
        "model_version": cfg.model_version,
        "features_version": FEATURES_VERSION,
        "n_features": str(N_FEATURES),
        "feature_names": ",".join(FEATURE_NAMES),
        "horizon_s": f"{cfg.horizon_s:g}",
        "threshold": f"{threshold:.6f}",
        "migration_time_s": f"{cfg.migration_time_s:g}",
        "data_version": data_version,
        "seed": str(cfg.seed),
        "input_name": INPUT_NAME,
        "output_name": PROB_OUTPUT,
        "positive_column": "1",
    }


# --- metrics ----------------------------------------------------------------------------------------


def choose_threshold(y: npt.NDArray[np.int8], p: npt.NDArray[np.float32]) -> float:
    """The probability that maximises F1 on validation rows (ties: the higher threshold)."""
    from sklearn.metrics import precision_recall_curve

    precision, recall, thresholds = precision_recall_curve(y, p)
    f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
    best = np.flatnonzero(f1 >= f1.max() - 1e-12)[-1]
    return float(thresholds[best])


def row_metrics(y: npt.NDArray[np.int8], p: npt.NDArray[np.float32], threshold: float) -> dict[str, float]:
    from sklearn.metrics import average_precision_score, brier_score_loss, roc_auc_score

    alert = p >= threshold
    tp = int(np.sum(alert & (y == 1)))
    return {
        "rows": int(y.size),
        "positives": int(y.sum()),
        "prevalence": float(y.mean()) if y.size else 0.0,
        "pr_auc": float(average_precision_score(y, p)),
        "roc_auc": float(roc_auc_score(y, p)),
        "brier": float(brier_score_loss(y, p)),
        "precision": tp / max(int(alert.sum()), 1),
        "recall": tp / max(int(y.sum()), 1),
        "threshold": threshold,
    }


def lead_times(
    traces: Sequence[HostTrace],
    kinds: Sequence[Sequence[str]] | None,
    lo: float,
    hi: float,
    score: Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float32]],
    threshold: float,
    cfg: TrainConfig,
) -> dict[str, Any]:
    """Per drain in [lo, hi): the earliest alert (P >= threshold, checked every minute) in
    [drain - horizon, drain - migration time]. Alerts later than that are too late to migrate."""
    leads: list[float] = []
    per_kind: dict[str, list[int]] = {}
    for i, trace in enumerate(traces):
        times = evaluation_times(trace, BIN_S)
        for j, drain in enumerate(trace.drains):
            if not lo <= drain < hi:
                continue
            kind = kinds[i][j] if kinds is not None else "observed"
            window = times[(times >= drain - cfg.horizon_s) & (times <= drain - cfg.migration_time_s)]
            p = score(trace_features(trace, window)) if window.size else np.empty(0, np.float32)
            hit = np.flatnonzero(p >= threshold)
            caught = per_kind.setdefault(kind, [0, 0])
            caught[1] += 1
            if hit.size:
                caught[0] += 1
                leads.append(float(drain - window[hit[0]]))
    total = sum(v[1] for v in per_kind.values())
    q = np.percentile(leads, [10, 25, 50, 75, 90]).tolist() if leads else [float("nan")] * 5
    return {
        "drains": total,
        "caught": len(leads),
        "event_recall": len(leads) / max(total, 1),
        "lead_s_p10_p25_p50_p75_p90": [round(v, 1) for v in q],
        "lead_s_histogram": _histogram(leads, cfg.horizon_s),
        "by_kind": {k: {"drains": v[1], "caught": v[0]} for k, v in sorted(per_kind.items())},
    }


def _histogram(leads: Sequence[float], horizon: float) -> dict[str, int]:
    edges = [0, 120, 300, 600, 900, 1200, 1500, horizon + 1]
    counts, _ = np.histogram(leads, bins=edges)
    return {f"{edges[i]:g}-{min(edges[i + 1], horizon):g}s": int(c) for i, c in enumerate(counts)}


# --- pipelines --------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    model: Any
    onnx: bytes
    threshold: float
    card: dict[str, Any]


def split_hosts(names: Sequence[str], test_frac: float, seed: int) -> set[str]:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(names))
    return {names[i] for i in order[: max(1, round(len(names) * test_frac))]}


def train_on_traces(
    traces: Sequence[HostTrace],
    cfg: TrainConfig,
    *,
    data_version: str,
    split_time: float,
    end: float,
    test_hosts: set[str],
    kinds: Sequence[Sequence[str]] | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train on hosts not in `test_hosts` before `split_time` (minus one horizon, so no label looks
    past it); choose the threshold on those hosts after `split_time`; report on `test_hosts` after
    `split_time`. Rows closer than one horizon to `end` are dropped (their labels are censored)."""
    t0 = time.perf_counter()
    train_idx = [i for i, t in enumerate(traces) if t.host not in test_hosts]
    test_idx = [i for i, t in enumerate(traces) if t.host in test_hosts]
    label_end = end - cfg.horizon_s
    train = concat([training_rows(traces[i], -np.inf, split_time - cfg.horizon_s, cfg) for i in train_idx])
    val = concat([eval_rows(traces[i], split_time, label_end, cfg, cfg.val_stride_s) for i in train_idx])
    test = concat([eval_rows(traces[i], split_time, label_end, cfg) for i in test_idx])
    log(f"rows: train {train.y.size} ({int(train.y.sum())} positive), val {val.y.size}, test {test.y.size}")
    t1 = time.perf_counter()
    model = fit(train, cfg)
    t2 = time.perf_counter()
    raw_val = model.predict_proba(val.X)[:, 1].astype(np.float32)
    # the fit sees rows near drains over-represented: the later window maps it back to the real rate
    calibration = fit_calibration(raw_val, val.y, np.ones(val.y.size)) if 0 < val.y.sum() < val.y.size else IDENTITY
    threshold = choose_threshold(val.y, calibration(raw_val))
    meta = metadata(cfg, threshold, data_version)
    meta["calibration"] = calibration.table()
    meta["feature_reference"] = ",".join(
        f"{v:.6g}" for v in np.nanmedian(np.where(train.y[:, None] == 0, train.X, np.nan), axis=0)
    )
    onnx_bytes = to_onnx(model, meta)
    check_rows = test.X if test.y.size else val.X
    diff = check_onnx(model, onnx_bytes, check_rows)

    def served(X: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        return calibration(ort_probabilities(onnx_bytes, X))

    p_test = served(test.X)
    leads = lead_times(
        [traces[i] for i in test_idx],
        [kinds[i] for i in test_idx] if kinds is not None else None,
        split_time,
        label_end,
        served,
        threshold,
        cfg,
    )
    card = {
        "model_version": cfg.model_version,
        "features_version": FEATURES_VERSION,
        "data_version": data_version,
        "horizon_s": cfg.horizon_s,
        "migration_time_s": cfg.migration_time_s,
        "threshold": threshold,
        "threshold_rule": "max F1 of the calibrated P on the validation rows (training hosts, later time window)",
        "calibration": {"method": "isotonic on the validation rows", "table": meta["calibration"]},
        "onnx": {
            "input": f"{INPUT_NAME} float32 [N, {N_FEATURES}]",
            "output": f"{PROB_OUTPUT} float32 [N, 2], column 1 = P(drain)",
            "max_abs_diff_vs_sklearn": diff,
            "rows_checked": int(check_rows.shape[0]),
        },
        "split": {
            "train": f"{len(train_idx)} hosts, t < split - horizon; rows every minute within "
            f"{cfg.dense_before_s:g}s before a drain, else every {cfg.train_stride_s:g}s with weight",
            "validation": f"the same {len(train_idx)} hosts, t >= split, one row per {cfg.val_stride_s:g}s",
            "test": f"{len(test_idx)} held-out hosts, t >= split, one row per {cfg.eval_stride_s:g}s",
            "split_time": split_time,
            "rows": {"train": int(train.y.size), "validation": int(val.y.size), "test": int(test.y.size)},
        },
        "test": row_metrics(test.y, p_test, threshold) if test.y.size and 0 < test.y.sum() < test.y.size else {},
        "lead_time": leads,
        "config": asdict(cfg),
        "n_features": N_FEATURES,
        "features": list(FEATURE_NAMES),
        "timing_s": {"rows": round(t1 - t0, 1), "fit": round(t2 - t1, 1), "total": round(time.perf_counter() - t0, 1)},
    }
    return TrainResult(model, onnx_bytes, threshold, card)


def train_shipped(cfg: TrainConfig, n_hosts: int, days: float, log: Callable[[str], None] = print) -> TrainResult:
    from models.drain.generate import FleetSpec, generate_fleet

    spec = FleetSpec(seed=cfg.seed, n_hosts=n_hosts, days=days)
    t0 = time.perf_counter()
    hosts = list(generate_fleet(spec))
    generate_s = time.perf_counter() - t0
    log(f"generated {spec.data_version()} in {generate_s:.1f}s")
    traces = [h.trace for h in hosts]
    split_time = spec.start + 0.7 * (spec.end - spec.start)
    test_hosts = split_hosts([t.host for t in traces], 0.2, cfg.seed)
    result = train_on_traces(
        traces,
        cfg,
        data_version=spec.data_version(),
        split_time=split_time,
        end=spec.end,
        test_hosts=test_hosts,
        kinds=[h.drain_kinds for h in hosts],
        log=log,
    )
    result.card["generator"] = asdict(spec)
    result.card["timing_s"]["generate"] = round(generate_s, 1)
    return result


def train_recorded(traces: Sequence[HostTrace], cfg: TrainConfig, log: Callable[[str], None] = print) -> TrainResult:
    """Retrain on recorded telemetry: the last 25 % of the recorded time is for the threshold and
    the report, one host in five is held out from training."""
    starts = [float(t.ts.min()) for t in traces if t.ts.size]
    ends = [float(t.ts.max()) for t in traces if t.ts.size]
    if not starts:
        raise ValueError("no recorded samples")
    start, end = min(starts), max(ends)
    split_time = start + 0.75 * (end - start)
    test_hosts = split_hosts([t.host for t in traces], 0.2, cfg.seed) if len(traces) >= 5 else set()
    version = f"recorded hosts={len(traces)} from={start:.0f} to={end:.0f} drains={sum(t.drains.size for t in traces)}"
    return train_on_traces(
        traces, cfg, data_version=version, split_time=split_time, end=end, test_hosts=test_hosts, log=log
    )


# --- generator families: calibration, operating threshold, leave-one-family-out -------------------


@dataclass(frozen=True)
class Calibration:
    """Raw model output -> calibrated P (isotonic regression knots, linear in between)."""

    x: npt.NDArray[np.float64]
    y: npt.NDArray[np.float64]

    def __call__(self, p: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.float32]:
        return np.interp(np.asarray(p, np.float64), self.x, self.y).astype(np.float32)

    def table(self) -> str:
        """The `calibration` metadata the coordinator's DrainPredictor applies ("x:y,...")."""
        return ",".join(f"{a:.6g}:{b:.6g}" for a, b in zip(self.x, self.y, strict=True))


IDENTITY = Calibration(np.array([0.0, 1.0]), np.array([0.0, 1.0]))


def fit_calibration(
    p: npt.NDArray[np.floating[Any]], y: npt.NDArray[np.int8], w: npt.NDArray[np.float64]
) -> Calibration:
    from sklearn.isotonic import IsotonicRegression

    iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip", increasing=True)
    iso.fit(np.asarray(p, np.float64), y.astype(np.float64), sample_weight=w)
    x, yy = np.asarray(iso.X_thresholds_, np.float64), np.asarray(iso.y_thresholds_, np.float64)
    xs = np.concatenate([[0.0], x[(x > 0) & (x < 1)], [1.0]])
    ys = np.interp(xs, x, yy)
    # a sliver of the raw value keeps the map strictly increasing, so calibration breaks no ranking
    # (PR-AUC) into ties; it moves no probability by more than 1e-4
    return Calibration(xs, np.clip((1 - 1e-4) * ys + 1e-4 * xs, 0.0, 1.0))


@dataclass
class Fleet:
    family: str
    spec: Any
    hosts: list[Any]

    @property
    def traces(self) -> list[HostTrace]:
        return [h.trace for h in self.hosts]

    @property
    def host_days(self) -> float:
        return float(sum((t.ts.max() - t.ts.min()) / 86400 for t in self.traces if t.ts.size > 1))


def family_fleet(family: str, seed: int, hosts: int, days: float, boost: float) -> Fleet:
    from models.drain.generate import FleetSpec, generate_fleet

    base = FleetSpec()
    spec = FleetSpec(
        seed=seed,
        n_hosts=hosts,
        days=days,
        family=family,
        maintenance_per_month=base.maintenance_per_month * boost,
        hw_failures_per_month=base.hw_failures_per_month * boost,
    )
    return Fleet(family, spec, list(generate_fleet(spec)))


def _seed(cfg: TrainConfig, family: str, role: int) -> int:
    """Distinct seeds per family and role: 0 training, 1 calibration, 2 evaluation (never trained on)."""
    return cfg.seed * 10 + role * 1000 + sorted(_families()).index(family) * 100_000


def _families() -> list[str]:
    from models.drain.generate import FAMILIES

    return list(FAMILIES)


@dataclass
class Scored:
    """A fleet's rows every `stride` seconds, concatenated over hosts: calibrated P (1 where a notice
    with a stated time holds), the raw model output, labels, and per drain the highest P in
    [drain - horizon, drain - flag_ahead_s] (so "flagged at threshold x" is one comparison)."""

    fleet: Fleet
    p: npt.NDArray[np.float32]
    raw: npt.NDArray[np.float32]
    y: npt.NDArray[np.int8]
    first: npt.NDArray[np.bool_]
    """True on each host's first row (alert state starts off)."""
    drain_max_p: npt.NDArray[np.float32]
    drain_precursor: npt.NDArray[np.bool_]
    drain_lead: list[tuple[npt.NDArray[np.float64], npt.NDArray[np.float32], float]]
    """Per drain: (times, P) of its flag window and the drain time, for lead times."""


def score_fleet(
    fleet: Fleet,
    score_raw: Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float32]],
    calibration: Calibration,
    cfg: TrainConfig,
    stride: float,
) -> Scored:
    from coordinator.notices import NOTICE_PROBABILITY, fact_mask

    ps, raws, ys, firsts, maxp, pre, leads = [], [], [], [], [], [], []
    lo, hi = fleet.spec.start + 7200, fleet.spec.end - cfg.horizon_s
    for host in fleet.hosts:
        trace = host.trace
        times = evaluation_times(trace, stride)
        times = times[(times >= lo) & (times < hi)]
        raw = score_raw(trace_features(trace, times)) if times.size else np.empty(0, np.float32)
        facts = fact_mask(trace.notices[:, 0], trace.notices[:, 1], times, cfg.horizon_s)
        p = np.where(facts, NOTICE_PROBABILITY, calibration(raw)).astype(np.float32)
        first = np.zeros(times.size, bool)
        first[:1] = True
        ps.append(p)
        raws.append(raw)
        ys.append(drain_labels(times, trace.drains, cfg.horizon_s))
        firsts.append(first)
        # before each drain, every minute (the coordinator scores every tick_period, 15 s by default)
        minutes = evaluation_times(trace, BIN_S)
        for j, drain in enumerate(trace.drains):
            if not lo + cfg.horizon_s <= drain < hi:
                continue
            wt = minutes[(minutes >= drain - cfg.horizon_s) & (minutes <= drain - cfg.flag_ahead_s)]
            wfacts = fact_mask(trace.notices[:, 0], trace.notices[:, 1], wt, cfg.horizon_s)
            wraw = score_raw(trace_features(trace, wt)) if wt.size else np.empty(0, np.float32)
            wp = np.where(wfacts, NOTICE_PROBABILITY, calibration(wraw)).astype(np.float32)
            maxp.append(float(wp.max()) if wp.size else 0.0)
            pre.append(bool(host.precursor[j]) if j < len(host.precursor) else True)
            leads.append((wt, wp, float(drain)))
    return Scored(
        fleet,
        np.concatenate(ps) if ps else np.empty(0, np.float32),
        np.concatenate(raws) if raws else np.empty(0, np.float32),
        np.concatenate(ys) if ys else np.empty(0, np.int8),
        np.concatenate(firsts) if firsts else np.empty(0, bool),
        np.asarray(maxp, np.float32),
        np.asarray(pre, bool),
        leads,
    )


def alert_state(
    p: npt.NDArray[np.float32], first: npt.NDArray[np.bool_], threshold: float, hysteresis: float
) -> npt.NDArray[np.bool_]:
    """Rows where a host is alerted: from P reaching the threshold until it falls below
    threshold - hysteresis (each host starts not alerted)."""
    ev = np.where(p >= threshold, 1, np.where(p < threshold - hysteresis, 0, -1))
    ev = np.where(first & (ev < 0), 0, ev)
    idx = np.where(ev >= 0, np.arange(p.size), 0)
    return ev[np.maximum.accumulate(idx)] == 1 if p.size else np.zeros(0, bool)


def alert_starts(
    p: npt.NDArray[np.float32], first: npt.NDArray[np.bool_], threshold: float, hysteresis: float
) -> npt.NDArray[np.bool_]:
    """Rows where an alert begins (see `alert_state`)."""
    state = alert_state(p, first, threshold, hysteresis)
    prev = np.concatenate([[False], state[:-1]]) & ~first
    return state & ~prev


def false_alert_count(
    p: npt.NDArray[np.float32],
    first: npt.NDArray[np.bool_],
    y: npt.NDArray[np.int8],
    threshold: float,
    hysteresis: float,
) -> int:
    """Alerts no drain followed: none while the alert lasted nor within the horizon after its last
    row (no row of the alert labelled 1). An alert that begins a little more than one horizon before
    its drain and lasts until it is a true alert, however early."""
    state = alert_state(p, first, threshold, hysteresis)
    starts = state & ~(np.concatenate([[False], state[:-1]]) & ~first)
    if not starts.any():
        return 0
    episode = np.cumsum(starts)[state] - 1
    drained = np.bincount(episode, weights=y[state].astype(np.float64), minlength=int(starts.sum()))
    return int(np.sum(drained == 0))


def alert_outcomes(scored: Scored, threshold: float, cfg: TrainConfig) -> dict[str, Any]:
    """What the policy would have done at `threshold`: alerts (with hysteresis), false ones (no drain
    while alerted or within the horizon after), drains flagged at least `flag_ahead_s` before (those
    with a precursor or a notice, and all)."""
    starts = alert_starts(scored.p, scored.first, threshold, cfg.hysteresis)
    false_alerts = false_alert_count(scored.p, scored.first, scored.y, threshold, cfg.hysteresis)
    hit = scored.drain_max_p >= threshold
    flagged = int(np.sum(hit & scored.drain_precursor))
    with_precursor = int(scored.drain_precursor.sum())
    leads = []
    for (times, p, drain), h in zip(scored.drain_lead, hit, strict=True):
        if h:
            leads.append(drain - float(times[np.flatnonzero(p >= threshold)[0]]))
    host_days = scored.fleet.host_days
    return {
        "alerts": int(starts.sum()),
        "false_alerts": false_alerts,
        "false_alerts_per_100_host_days": 100.0 * false_alerts / max(host_days, 1e-9),
        "host_days": round(host_days, 1),
        "drains": int(hit.size),
        "drains_with_precursor": with_precursor,
        "flagged_in_time": flagged,
        "flagged_share": flagged / max(with_precursor, 1),
        "flagged_share_all_drains": int(hit.sum()) / max(hit.size, 1),
        "lead_s_p10_p50_p90": [round(float(v), 1) for v in np.percentile(leads, [10, 50, 90])] if leads else [],
    }


def choose_operating_threshold(scored: Sequence[Scored], cfg: TrainConfig) -> tuple[float, dict[str, Any]]:
    """The lowest threshold whose false alerts per 100 host-days stay within the budget on every
    calibration fleet together: the most drains flagged for the false alarms operators accept."""
    negatives = np.concatenate([s.p[s.y == 0] for s in scored])
    grid = np.unique(np.round(np.quantile(negatives, 1 - np.geomspace(0.1, 1e-6, 120)), 5))
    grid = grid[(grid > 0.01) & (grid < 1.0)]
    best: tuple[float, dict[str, Any]] | None = None
    for threshold in sorted(grid.tolist()):
        outcomes = [alert_outcomes(s, threshold, cfg) for s in scored]
        false = sum(o["false_alerts"] for o in outcomes)
        days = sum(o["host_days"] for o in outcomes)
        if 100.0 * false / max(days, 1e-9) <= cfg.max_false_alarms_per_100_host_days:
            flagged = sum(o["flagged_in_time"] for o in outcomes)
            total = sum(o["drains_with_precursor"] for o in outcomes)
            best = (
                threshold,
                {"false_alerts_per_100_host_days": 100.0 * false / days, "flagged_share": flagged / max(total, 1)},
            )
            break
    if best is None:
        top = float(grid.max()) if grid.size else 0.99
        return top, {
            "note": "no threshold met the false-alarm budget: the highest tried",
            **alert_outcomes(scored[0], top, cfg),
        }
    return best


def reliability(p: npt.NDArray[np.float32], y: npt.NDArray[np.int8], bins: int = 10) -> list[dict[str, float]]:
    """Reliability curve: per bin of predicted P, its mean and the observed drain rate."""
    edges = np.array([0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0001])[: bins + 1]
    out = []
    for a, b in itertools.pairwise(edges):
        m = (p >= a) & (p < b)
        if m.any():
            out.append(
                {
                    "p_from": float(a),
                    "p_to": float(min(b, 1.0)),
                    "rows": int(m.sum()),
                    "mean_p": float(p[m].mean()),
                    "observed": float(y[m].mean()),
                }
            )
    return out


def family_report(scored: Scored, threshold: float, cfg: TrainConfig) -> dict[str, Any]:
    from sklearn.metrics import average_precision_score

    y, p = scored.y, scored.p
    report: dict[str, Any] = (
        dict(row_metrics(y, p, threshold)) if 0 < y.sum() < y.size else {"rows": int(y.size), "positives": int(y.sum())}
    )
    report["pr_auc_model_only"] = (
        float(average_precision_score(y, scored.raw)) if 0 < y.sum() < y.size else float("nan")
    )
    report.update(alert_outcomes(scored, threshold, cfg))
    report["reliability"] = reliability(p, y)
    report["fleet"] = scored.fleet.spec.data_version()
    return report


@dataclass
class FamilyModel:
    model: Any
    calibration: Calibration
    threshold: float
    threshold_report: dict[str, Any]
    reference: npt.NDArray[np.float32]
    rows: int


def train_families(families: Sequence[str], cfg: TrainConfig, log: Callable[[str], None] = print) -> FamilyModel:
    """Fit on training fleets of `families`, calibrate and pick the operating threshold on their
    calibration fleets (other seeds)."""
    parts = []
    for fam in families:
        fleet = family_fleet(fam, _seed(cfg, fam, 0), cfg.fleet_hosts, cfg.fleet_days, cfg.drain_boost)
        parts.append(concat([training_rows(t, -np.inf, fleet.spec.end - cfg.horizon_s, cfg) for t in fleet.traces]))
    train = concat(parts)
    t0 = time.perf_counter()
    model = fit(train, cfg)
    log(
        f"  train on {','.join(families)}: {train.y.size} rows, {int(train.y.sum())} positive, "
        f"fit {time.perf_counter() - t0:.0f}s"
    )
    raw_score = functools.partial(_sk_score, model)
    cal_fleets = [family_fleet(f, _seed(cfg, f, 1), cfg.cal_hosts, cfg.cal_days, cfg.drain_boost) for f in families]
    scored = [score_fleet(f, raw_score, IDENTITY, cfg, cfg.eval_stride_s) for f in cal_fleets]
    raw = np.concatenate([s.raw for s in scored])
    y = np.concatenate([s.y for s in scored])
    w = np.where(y == 1, 1.0 / cfg.drain_boost, 1.0)
    calibration = fit_calibration(raw, y, w)
    scored = [score_fleet(f, raw_score, calibration, cfg, cfg.eval_stride_s) for f in cal_fleets]
    threshold, report = choose_operating_threshold(scored, cfg)
    reference = np.nanmedian(np.where(train.y[:, None] == 0, train.X, np.nan), axis=0).astype(np.float32)
    return FamilyModel(model, calibration, threshold, report, reference, int(train.y.size))


def _sk_score(model: Any, X: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    return np.asarray(model.predict_proba(X)[:, 1], np.float32)


def evaluate_family(fm: FamilyModel, family: str, cfg: TrainConfig) -> dict[str, Any]:
    fleet = family_fleet(family, _seed(cfg, family, 2), cfg.eval_hosts, cfg.eval_days, cfg.drain_boost)
    scored = score_fleet(fleet, functools.partial(_sk_score, fm.model), fm.calibration, cfg, cfg.eval_stride_s)
    return family_report(scored, fm.threshold, cfg)


def train_shipped_families(cfg: TrainConfig, log: Callable[[str], None] = print) -> TrainResult:
    """Leave each family out once (train on the others, judge on it), then the shipped model on all."""
    t0 = time.perf_counter()
    families = _families()
    held_out: dict[str, Any] = {}
    for fam in families:
        log(f"leave out {fam}")
        fm = train_families([f for f in families if f != fam], cfg, log)
        held_out[fam] = evaluate_family(fm, fam, cfg)
        held_out[fam]["threshold"] = fm.threshold
        log(
            f"  held-out {fam}: "
            + json.dumps(
                {
                    k: held_out[fam].get(k)
                    for k in ("pr_auc", "brier", "flagged_share", "false_alerts_per_100_host_days")
                }
            )
        )
    log("final model on all families")
    final = train_families(families, cfg, log)
    in_dist = {fam: evaluate_family(final, fam, cfg) for fam in families}
    data_version = (
        f"{_generator_version()} families={','.join(families)} seed={cfg.seed} "
        f"hosts/family={cfg.fleet_hosts} days={cfg.fleet_days:g}"
    )
    meta = metadata(cfg, final.threshold, data_version)
    meta["calibration"] = final.calibration.table()
    meta["feature_reference"] = ",".join(f"{v:.6g}" for v in final.reference)
    onnx_bytes = to_onnx(final.model, meta)
    probe = family_fleet(families[0], _seed(cfg, families[0], 2), 8, 2.0, 1.0)
    X = concat([eval_rows(t, -np.inf, np.inf, cfg) for t in probe.traces]).X
    diff = check_onnx(final.model, onnx_bytes, X)

    def mean(key: str, table: dict[str, Any]) -> float:
        return float(np.mean([v[key] for v in table.values()]))

    card = {
        "model_version": cfg.model_version,
        "features_version": FEATURES_VERSION,
        "data_version": data_version,
        "horizon_s": cfg.horizon_s,
        "migration_time_s": cfg.migration_time_s,
        "threshold": final.threshold,
        "threshold_rule": (
            f"the lowest calibrated P whose alerts (hysteresis {cfg.hysteresis:g}) stay within "
            f"{cfg.max_false_alarms_per_100_host_days:g} false alerts per 100 host-days on the calibration fleets"
        ),
        "threshold_on_calibration_fleets": final.threshold_report,
        "calibration": {
            "method": "isotonic regression of the raw output on the calibration fleets (other seeds of the "
            f"training families), positives weighted 1/{cfg.drain_boost:g} back to the natural drain rate",
            "table": meta["calibration"],
        },
        "onnx": {
            "input": f"{INPUT_NAME} float32 [N, {N_FEATURES}]",
            "output": f"{PROB_OUTPUT} float32 [N, 2], column 1 = raw P(drain); calibrated by the `calibration` table",
            "max_abs_diff_vs_sklearn": diff,
            "rows_checked": int(X.shape[0]),
        },
        "families": families,
        "held_out_family": held_out,
        "in_distribution": in_dist,
        "summary": {
            "held_out_pr_auc_mean": mean("pr_auc", held_out),
            "held_out_pr_auc_min": float(min(v["pr_auc"] for v in held_out.values())),
            "in_distribution_pr_auc_mean": mean("pr_auc", in_dist),
            "held_out_flagged_share_mean": mean("flagged_share", held_out),
            "held_out_false_alerts_per_100_host_days_mean": mean("false_alerts_per_100_host_days", held_out),
            "held_out_brier_mean": mean("brier", held_out),
        },
        "config": asdict(cfg),
        "n_features": N_FEATURES,
        "features": list(FEATURE_NAMES),
        "timing_s": {"total": round(time.perf_counter() - t0, 1)},
    }
    # test and lead_time keep the old card's keys: the in-distribution figures over all families
    card["test"] = {k: mean(k, in_dist) for k in ("pr_auc", "roc_auc", "brier", "precision", "recall")}
    return TrainResult(final.model, onnx_bytes, final.threshold, card)


def _generator_version() -> str:
    from models.drain.generate import GENERATOR_VERSION

    return GENERATOR_VERSION


def write_card_md(card: dict[str, Any], path: Path) -> None:
    fams = card["families"]
    ho, ind, sm = card["held_out_family"], card["in_distribution"], card["summary"]

    def row(name: str, r: dict[str, Any]) -> str:
        return (
            f"| {name} | {r.get('pr_auc', float('nan')):.3f} | {r.get('pr_auc_model_only', float('nan')):.3f} | "
            f"{r.get('brier', float('nan')):.5f} | {r['flagged_in_time']}/{r['drains_with_precursor']} "
            f"({r['flagged_share']:.2f}) | {r['false_alerts']} in {r['host_days']:g} "
            f"({r['false_alerts_per_100_host_days']:.2f}) |"
        )

    header = [
        "| family | PR-AUC | PR-AUC model alone | Brier | drains flagged >= 2 min ahead (with a precursor) "
        "| false alerts in host-days (per 100) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines = [
        f"# Drain model card: {card['model_version']}",
        "",
        "Predicts P(host drained within the horizon) from the last two hours of host telemetry, trained",
        "on several generator families and judged on a family it never saw. Generated by",
        "`models/drain/train.py`; every figure here is in `card.json` too.",
        "",
        "| | |",
        "| --- | --- |",
        f"| data version | `{card['data_version']}` |",
        f"| features | `{card['features_version']}`, {card['n_features']} features (list below) |",
        f"| horizon | {card['horizon_s']:g} s |",
        f"| threshold | {card['threshold']:.4f} (calibrated P; {card['threshold_rule']}) |",
        f"| ONNX input | `{card['onnx']['input']}` |",
        f"| ONNX output | `{card['onnx']['output']}` |",
        f"| onnxruntime vs scikit-learn | max abs diff {card['onnx']['max_abs_diff_vs_sklearn']:.2e} "
        f"over {card['onnx']['rows_checked']} rows |",
        "",
        "## Generalisation: leave one family out",
        "",
        f"Families: {', '.join(f'`{f}`' for f in fams)} (models/drain/generate.py, README.md). For each, a",
        "model is trained on the other families, calibrated and thresholded on their calibration fleets,",
        "and judged on a fresh fleet (unseen seed) of the left-out family, maintenance and hardware failures "
        f"x{card['config']['drain_boost']:g} as in training (rows every "
        f"{card['config']['eval_stride_s']:g} s). P is the calibrated model output, or 1 where a notice",
        'with a stated time holds (as the coordinator serves it); "model alone" leaves notices out.',
        "",
        *header,
        *[row(f, ho[f]) for f in fams],
        "",
        f"Mean held-out PR-AUC {sm['held_out_pr_auc_mean']:.3f} (lowest {sm['held_out_pr_auc_min']:.3f}), "
        f"in distribution {sm['in_distribution_pr_auc_mean']:.3f}; held-out share of drains flagged in time "
        f"{sm['held_out_flagged_share_mean']:.2f}, false alerts "
        f"{sm['held_out_false_alerts_per_100_host_days_mean']:.2f} "
        "per 100 host-days.",
        "",
        "## In distribution: the shipped model on fresh fleets of every family",
        "",
        *header,
        *[row(f, ind[f]) for f in fams],
        "",
        "## Calibration",
        "",
        card["calibration"]["method"] + ". The table (raw -> calibrated) is in the model's metadata as",
        "`calibration` and applied by the coordinator's `DrainPredictor.predict`.",
        "",
        "Reliability on the held-out families (calibrated P, rows of all four left-out evaluations):",
        "",
        "| P from | P to | rows | mean P | observed drain rate |",
        "| --- | --- | --- | --- | --- |",
        *[
            f"| {b['p_from']:g} | {b['p_to']:g} | {b['rows']} | {b['mean_p']:.4f} | {b['observed']:.4f} |"
            for b in _pooled_reliability([ho[f]["reliability"] for f in fams])
        ],
        "",
        "## Features",
        "",
        ", ".join(f"`{n}`" for n in card["features"]),
        "",
    ]
    path.write_text("\n".join(lines))


def _pooled_reliability(curves: Sequence[list[dict[str, float]]]) -> list[dict[str, float]]:
    pooled: dict[tuple[float, float], list[float]] = {}
    for curve in curves:
        for b in curve:
            acc = pooled.setdefault((b["p_from"], b["p_to"]), [0.0, 0.0, 0.0])
            acc[0] += b["rows"]
            acc[1] += b["mean_p"] * b["rows"]
            acc[2] += b["observed"] * b["rows"]
    return [
        {"p_from": a, "p_to": b, "rows": int(v[0]), "mean_p": v[1] / v[0], "observed": v[2] / v[0]}
        for (a, b), v in sorted(pooled.items())
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--hosts", type=int, default=TrainConfig.fleet_hosts, help="hosts per family in a training fleet")
    p.add_argument("--days", type=float, default=TrainConfig.fleet_days)
    p.add_argument("--horizon", type=float, default=TrainConfig.horizon_s, help="seconds (default 1800)")
    p.add_argument("--migration-time", type=float, default=TrainConfig.migration_time_s)
    p.add_argument("--threads", type=int, default=TrainConfig.threads)
    p.add_argument("--model-version", default=TrainConfig.model_version)
    p.add_argument("--max-iter", type=int, default=TrainConfig.max_iter, help="boosting rounds")
    p.add_argument("--recorded", type=Path, help="retrain on these recorded traces (.npz) instead")
    p.add_argument("--out", type=Path, default=HERE / "drain.onnx")
    args = p.parse_args(argv)
    cfg = replace(
        TrainConfig(),
        seed=args.seed,
        horizon_s=args.horizon,
        migration_time_s=args.migration_time,
        threads=args.threads,
        model_version=args.model_version,
        max_iter=args.max_iter,
        fleet_hosts=args.hosts,
        fleet_days=args.days,
    )
    log = functools.partial(print, file=sys.stderr, flush=True)
    if args.recorded:
        result = train_recorded(load_traces(args.recorded), cfg, log=log)
    else:
        result = train_shipped_families(cfg, log=log)
    args.out.write_bytes(result.onnx)
    card_json = args.out.with_name("card.json") if args.out.name == "drain.onnx" else args.out.with_suffix(".card.json")
    card_json.write_text(json.dumps(result.card, indent=2, default=float) + "\n")
    if not args.recorded:
        write_card_md(result.card, args.out.with_name("card.md"))
    summary = {k: result.card[k] for k in ("test", "summary", "lead_time", "timing_s") if k in result.card}
    log(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
