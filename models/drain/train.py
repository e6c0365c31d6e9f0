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
import contextlib
import functools
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
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

HERE = Path(__file__).resolve().parent
INPUT_NAME = "features"
PROB_OUTPUT = "probabilities"
LABEL_OUTPUT = "label"
MAX_ORT_DIFF = 1e-4


@dataclass(frozen=True)
class TrainConfig:
    horizon_s: float = 1800.0
    migration_time_s: float = 60.0
    """Alerts count as caught only if they arrive at least this long before the drain."""
    seed: int = 20251123
    model_version: str = "drain-1"
    train_stride_s: float = 1800.0
    """Rows far from any drain: one per this many seconds (weighted back to the natural rate)."""
    dense_before_s: float = 9000.0
    """Rows within this long before a drain: one per minute."""
    eval_stride_s: float = 120.0
    """Test rows: one per this many seconds, unweighted (natural prevalence)."""
    val_stride_s: float = 600.0
    """Validation rows (threshold choice): one per this many seconds, unweighted."""
    max_iter: int = 250
    learning_rate: float = 0.08
    max_leaf_nodes: int = 31
    min_samples_leaf: int = 40
    l2_regularization: float = 1.0
    threads: int = 2


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
    from sklearn.ensemble import HistGradientBoostingClassifier
    from threadpoolctl import threadpool_limits

    if data.y.min(initial=1) == data.y.max(initial=0):
        raise ValueError("training rows hold only one class: need both drained and quiet hosts")
    model = HistGradientBoostingClassifier(
        max_iter=cfg.max_iter,
        learning_rate=cfg.learning_rate,
        max_leaf_nodes=cfg.max_leaf_nodes,
        min_samples_leaf=cfg.min_samples_leaf,
        l2_regularization=cfg.l2_regularization,
        early_stopping=False,
        random_state=cfg.seed,
    )
    with threadpool_limits(cfg.threads):
        model.fit(data.X, data.y, sample_weight=data.w)
    return model


@contextlib.contextmanager
def _hgb_converter_fix() -> Iterator[None]:
    """skl2onnx writes leaves' missing-value flag as a Python bool, which current protobuf rejects in
    an int list ("Expected an int, got a boolean"). Coerce it to int while converting; the ORT-vs-
    sklearn check after export guards against this changing anything else."""
    from skl2onnx.common import tree_ensemble

    original = tree_ensemble.add_node

    @functools.wraps(original)
    def add_node(*args: Any, nodes_missing_value_tracks_true: Any = 0, **kwargs: Any) -> Any:
        return original(*args, nodes_missing_value_tracks_true=int(nodes_missing_value_tracks_true), **kwargs)

    tree_ensemble.add_node = add_node
    try:
        yield
    finally:
        tree_ensemble.add_node = original


def to_onnx(model: Any, metadata: dict[str, str]) -> bytes:
    """The model as ONNX: input `features` float32 [N, N_FEATURES]; outputs `label` int64 [N] and
    `probabilities` float32 [N, 2], column 1 = P(drain within horizon)."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    with _hgb_converter_fix():
        onx = convert_sklearn(
            model,
            initial_types=[(INPUT_NAME, FloatTensorType([None, N_FEATURES]))],
            options={id(model): {"zipmap": False}},
        )
    names = [o.name for o in onx.graph.output]
    if names != [LABEL_OUTPUT, PROB_OUTPUT]:
        raise RuntimeError(f"unexpected ONNX outputs {names}")
    onx.graph.name = "ferryman_drain"  # skl2onnx picks a random one: same inputs, same bytes
    onx.doc_string = "ferryman drain predictor: P(host drained within horizon_s)"
    for key, value in metadata.items():
        prop = onx.metadata_props.add()
        prop.key, prop.value = key, value
    return bytes(onx.SerializeToString())


def ort_probabilities(onnx_bytes: bytes, X: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
    out = session.run([PROB_OUTPUT], {INPUT_NAME: X})[0]
    return np.asarray(out[:, 1], np.float32)


def check_onnx(model: Any, onnx_bytes: bytes, X: npt.NDArray[np.float32]) -> float:
    """Max |P_onnxruntime - P_sklearn| over X; RuntimeError above MAX_ORT_DIFF."""
    diff = float(np.max(np.abs(ort_probabilities(onnx_bytes, X) - model.predict_proba(X)[:, 1]), initial=0.0))
    if diff > MAX_ORT_DIFF:
        raise RuntimeError(f"onnxruntime differs from scikit-learn by {diff:.3g} (> {MAX_ORT_DIFF})")
    return diff


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
    threshold = choose_threshold(val.y, model.predict_proba(val.X)[:, 1].astype(np.float32))
    onnx_bytes = to_onnx(model, metadata(cfg, threshold, data_version))
    check_rows = test.X if test.y.size else val.X
    diff = check_onnx(model, onnx_bytes, check_rows)
    p_test = ort_probabilities(onnx_bytes, test.X)
    leads = lead_times(
        [traces[i] for i in test_idx],
        [kinds[i] for i in test_idx] if kinds is not None else None,
        split_time,
        label_end,
        functools.partial(ort_probabilities, onnx_bytes),
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
        "threshold_rule": "max F1 on the validation rows (training hosts, later time window)",
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


def write_card_md(card: dict[str, Any], path: Path) -> None:
    t, lt = card.get("test", {}), card["lead_time"]
    q = lt["lead_s_p10_p25_p50_p75_p90"]
    lines = [
        f"# Drain model card: {card['model_version']}",
        "",
        "Predicts P(host drained within the horizon) from the last two hours of host telemetry.",
        "Generated by `models/drain/train.py`; every figure here is in `card.json` too.",
        "",
        "| | |",
        "| --- | --- |",
        f"| data version | `{card['data_version']}` |",
        f"| features | `{card['features_version']}`, {card['n_features']} features (list below) |",
        f"| horizon | {card['horizon_s']:g} s |",
        f"| threshold | {card['threshold']:.4f} ({card['threshold_rule']}) |",
        f"| ONNX input | `{card['onnx']['input']}` |",
        f"| ONNX output | `{card['onnx']['output']}` (also `label` int64 [N]) |",
        f"| onnxruntime vs scikit-learn | max abs diff {card['onnx']['max_abs_diff_vs_sklearn']:.2e} "
        f"over {card['onnx']['rows_checked']} rows |",
        "",
        "## Split (by time and by host)",
        "",
        *[f"- {k}: {v}" for k, v in card["split"].items() if k != "rows"],
        f"- rows: {card['split']['rows']}",
        "",
        "## Held-out hosts, later window",
        "",
        "| metric | value |",
        "| --- | --- |",
        *[f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in t.items()],
        "",
        f"## Lead time of true alerts (at least {card['migration_time_s']:g} s before the drain)",
        "",
        f"Drains in the test window: {lt['drains']}; caught in time: {lt['caught']} "
        f"(event recall {lt['event_recall']:.3f}).",
        f"Lead time p10/p25/p50/p75/p90: {' / '.join(f'{v:g}' for v in q)} s.",
        "",
        "| lead time | alerts |",
        "| --- | --- |",
        *[f"| {k} | {v} |" for k, v in lt["lead_s_histogram"].items()],
        "",
        "| drain kind | drains | caught |",
        "| --- | --- | --- |",
        *[f"| {k} | {v['drains']} | {v['caught']} |" for k, v in lt["by_kind"].items()],
        "",
        "The lead time is measured from the first minute in [drain - horizon, drain - migration time]",
        "whose probability reaches the threshold. Pre-emptions mostly come with a two-minute warning or",
        "none at all, so many cannot be caught a migration ahead: that is the data, not a bug.",
        "",
        "## Features",
        "",
        ", ".join(f"`{n}`" for n in card["features"]),
        "",
    ]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--hosts", type=int, default=500)
    p.add_argument("--days", type=float, default=28.0)
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
    )
    log = functools.partial(print, file=sys.stderr, flush=True)
    if args.recorded:
        result = train_recorded(load_traces(args.recorded), cfg, log=log)
    else:
        result = train_shipped(cfg, args.hosts, args.days, log=log)
    args.out.write_bytes(result.onnx)
    card_json = args.out.with_name("card.json") if args.out.name == "drain.onnx" else args.out.with_suffix(".card.json")
    card_json.write_text(json.dumps(result.card, indent=2, default=float) + "\n")
    if not args.recorded:
        write_card_md(result.card, args.out.with_name("card.md"))
    summary = {k: result.card[k] for k in ("test", "lead_time", "timing_s")}
    log(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
