"""Train the scaling model: a downstream component's CPU need at the horizon, exported to ONNX with its card.

    .venv/bin/python -m models.scaling.train                 # the shipped model (scaling.onnx, card.*)
    .venv/bin/python -m models.scaling.train --out /tmp/s/scaling.onnx --max-iter 40

Traces (generate.py), all seeded from `--seed` S:
- training: the `diurnal` and `bursty` regimes, seeds S .. S+train_seeds-1;
- validation (the error spread the policy provisions for): the same regimes, seed S+100;
- in distribution: `bursty`, seed S+300, never trained or tuned on;
- held out: the `flash` regime (flash crowds, lags and rates no training trace has), seeds S+200...

On every trace the lags come from the correlation engine (coordinator/scaling/correlation.py) run on
the trace's first `discovery_s` seconds, never from the generator: the model is trained and judged
on the lags it would have in service. Baselines for the prediction: `naive` (the last second's CPU),
`reactive` (the mean of the last 15 s, what an HPA sees), `upstream` (the upstream-implied need with
no model: transfer x upstream rate a lag before the horizon). The simulation (evaluate.py) replays
the held-out traces through the predictive policy and the HPA-like baseline.
"""

from __future__ import annotations

import functools
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from coordinator.scaling.correlation import CorrelationConfig, lead, pair_links
from coordinator.scaling.features import (
    FEATURE_NAMES,
    FEATURES_VERSION,
    N_FEATURES,
    feature_matrix,
    first_second,
    need_from_output,
    target,
    training_target,
)
from coordinator.scaling.model import ScalingModel
from coordinator.scaling.series import METRICS, ComponentSeries
from models.onnx_export import check_regressor_onnx, regressor_to_onnx
from models.scaling.evaluate import SimConfig, SimResult, ratio, simulate
from models.scaling.generate import HELD_OUT_REGIME, REGIMES, TRAIN_REGIMES, Trace, TraceSpec, generate
from models.training_cli import training_parser, write_model
from models.trees import fit_boosted_regressor

HERE = Path(__file__).resolve().parent
Log = Callable[[str], None]


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 20261205
    model_version: str = "scaling-1"
    horizon_s: int = 15
    """Longer than the simulated cold start (12 s): a replica started for the prediction is in time."""
    duration_s: int = 7200
    train_seeds: int = 6
    held_out_seeds: int = 3
    step_s: int = 2
    """A training row every this many seconds."""
    discovery_s: int = 3600
    max_iter: int = 150
    learning_rate: float = 0.1
    max_leaf_nodes: int = 31
    min_samples_leaf: int = 50
    l2_regularization: float = 1.0
    threads: int = 1
    sim: SimConfig = field(default_factory=SimConfig)


DISCOVERY = CorrelationConfig(upstream_metrics=METRICS, downstream_metrics=("cpu",))
"""For the model only the lead into CPU matters; `ferryctl scaling explain` tests every pair."""


@dataclass
class Rows:
    X: npt.NDArray[np.float32]
    y: npt.NDArray[np.float64]
    need: npt.NDArray[np.float64]
    scale: npt.NDArray[np.float64]
    naive: npt.NDArray[np.float64]
    reactive: npt.NDArray[np.float64]


def discover(trace: Trace, seconds: int) -> dict[str, dict[str, Any]]:
    """Per downstream stage: its upstream, the true and the discovered lag (and the link's figures)."""
    out: dict[str, dict[str, Any]] = {}
    for up, down, true_lag in trace.edges:
        u, d = trace.components[up].window(0, seconds), trace.components[down].window(0, seconds)
        link = lead(pair_links(up, u, down, d, DISCOVERY))
        if link is None:
            raise RuntimeError(f"{trace.spec.data_version()}: no lead found from {up} into {down}'s CPU")
        out[down] = {
            "upstream": up,
            "true_lag_s": true_lag,
            "lag_s": link.lag_s,
            "upstream_metric": link.upstream_metric,
            "correlation": round(link.correlation, 4),
            "granger_p": link.granger_p,
        }
    return out


def rows(trace: Trace, lags: dict[str, dict[str, Any]], horizon: int, step: int) -> Rows:
    parts = []
    for down, info in lags.items():
        up, dn = trace.components[info["upstream"]], trace.components[down]
        times = np.arange(first_second(info["lag_s"]), len(dn) - horizon - 3, step, dtype=np.int64)
        X, scale = feature_matrix(up, dn, info["lag_s"], horizon, times)
        need = target(dn, horizon, times)
        cpu = np.asarray(dn.cpu, np.float64)
        reactive = np.array([cpu[i - 14 : i + 1].mean() for i in times])
        parts.append(Rows(X, training_target(need, X, scale), need, scale, cpu[times], reactive))
    return _merge(parts)


def _merge(parts: Sequence[Rows]) -> Rows:
    return Rows(
        *(np.concatenate([getattr(p, f) for p in parts]) for f in ("X", "y", "need", "scale", "naive", "reactive"))
    )


def errors(pred: npt.NDArray[np.float64], need: npt.NDArray[np.float64]) -> dict[str, float]:
    rel = pred / np.maximum(need, 1e-6) - 1.0
    return {
        "mae_cores": round(float(np.mean(np.abs(pred - need))), 4),
        "rel_mae": round(float(np.mean(np.abs(rel))), 4),
        "under_by_20pct_share": round(float(np.mean(rel < -0.2)), 4),
    }


def prediction_figures(model_out: npt.NDArray[np.float64], r: Rows) -> dict[str, dict[str, float]]:
    implied = need_from_output(np.ones(len(r.y)), r.X, r.scale)
    return {
        "model": errors(need_from_output(model_out, r.X, r.scale), r.need),
        "naive": errors(r.naive, r.need),
        "reactive": errors(r.reactive, r.need),
        "upstream": errors(implied, r.need),
    }


def simulation(
    traces: Sequence[tuple[Trace, dict[str, dict[str, Any]]]], model: ScalingModel, cfg: TrainConfig
) -> dict[str, Any]:
    horizon = cfg.horizon_s

    def predict(up: ComponentSeries, down: ComponentSeries, lag: int, t: int) -> float:
        return float(model.predict_need(up, down, lag, np.array([t], np.int64))[0])

    results: list[SimResult] = []
    per_trace = []
    for trace, lags in traces:
        for down, info in lags.items():
            up, dn = trace.components[info["upstream"]], trace.components[down]
            for policy in ("predictive", "reactive"):
                res = simulate(
                    policy, down, up, dn, info["lag_s"], horizon, cfg.sim, predict, model.info.prediction_error
                )
                results.append(res)
                where = {"trace": trace.spec.data_version(), "component": down, "policy": policy}
                per_trace.append({**where, **res.figures()})
    totals: dict[str, dict[str, float]] = {}
    for policy in ("predictive", "reactive"):
        mine = [r for r in results if r.policy == policy]
        lat = np.concatenate([r.latency_ms for r in mine])
        totals[policy] = {
            "violation_s": int(sum(r.violation_s for r in mine)),
            "replica_s": round(sum(r.replica_s for r in mine), 1),
            "p99_latency_ms": round(float(np.percentile(lat, 99)), 2),
            "seconds": int(sum(r.seconds for r in mine)),
        }
    p, r = totals["predictive"], totals["reactive"]
    return {
        "totals": totals,
        "violation_ratio": round(ratio(p["violation_s"], r["violation_s"]), 4),
        "replica_ratio": round(ratio(p["replica_s"], r["replica_s"]), 4),
        "per_trace": per_trace,
    }


@dataclass
class Result:
    onnx: bytes
    card: dict[str, Any]


def train(cfg: TrainConfig, log: Log) -> Result:
    t0 = time.monotonic()
    S = cfg.seed

    def traced(regime: str, seed: int) -> tuple[Trace, dict[str, dict[str, Any]]]:
        trace = generate(TraceSpec(REGIMES[regime], seed, cfg.duration_s))
        return trace, discover(trace, cfg.discovery_s)

    train_sets = [traced(reg, S + i) for reg in TRAIN_REGIMES for i in range(cfg.train_seeds)]
    log(f"training traces: {len(train_sets)} ({time.monotonic() - t0:.0f} s)")
    train_rows = [rows(t, lags, cfg.horizon_s, cfg.step_s) for t, lags in train_sets]
    X = np.vstack([r.X for r in train_rows])
    y = np.concatenate([r.y for r in train_rows])
    t_fit = time.monotonic()
    model = fit_boosted_regressor(
        X,
        y,
        max_iter=cfg.max_iter,
        learning_rate=cfg.learning_rate,
        max_leaf_nodes=cfg.max_leaf_nodes,
        min_samples_leaf=cfg.min_samples_leaf,
        l2_regularization=cfg.l2_regularization,
        seed=S,
        threads=cfg.threads,
    )
    fit_s = time.monotonic() - t_fit
    log(f"fitted on {len(y)} rows in {fit_s:.0f} s")
    validation = [traced(reg, S + 100) for reg in TRAIN_REGIMES]
    val_rows = [rows(t, lags, cfg.horizon_s, 1) for t, lags in validation]
    val_pred = np.concatenate([need_from_output(model.predict(r.X), r.X, r.scale) for r in val_rows])
    val_need = np.concatenate([r.need for r in val_rows])
    prediction_error = float(np.std(val_pred / np.maximum(val_need, 1e-6) - 1.0))
    traces = {
        "train": [t.spec.data_version() for t, _ in train_sets],
        "validation": [t.spec.data_version() for t, _ in validation],
    }
    metadata = {
        "model_version": cfg.model_version,
        "features_version": FEATURES_VERSION,
        "n_features": str(N_FEATURES),
        "feature_names": ",".join(FEATURE_NAMES),
        "horizon_s": str(cfg.horizon_s),
        "prediction_error": f"{prediction_error:.4f}",
        "data_version": "; ".join(traces["train"]),
        "seed": str(S),
        "output": "need at the horizon over the upstream-implied need (coordinator/scaling/features.py)",
    }
    onnx = regressor_to_onnx(
        model, N_FEATURES, "ferryman_scaling", "CPU need at the horizon (models/scaling)", metadata
    )
    diff = check_regressor_onnx(model, onnx, X[: min(len(X), 20000)], tolerance=1e-3)
    log(f"exported ({len(onnx)} bytes, onnxruntime vs scikit-learn {diff:.2e})")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scaling.onnx"
        path.write_bytes(onnx)
        served = ScalingModel.load(path)
    held = [traced(HELD_OUT_REGIME, S + 200 + i) for i in range(cfg.held_out_seeds)]
    indist = [traced("bursty", S + 300)]
    card: dict[str, Any] = {
        "model_version": cfg.model_version,
        "features_version": FEATURES_VERSION,
        "horizon_s": cfg.horizon_s,
        "prediction_error": round(prediction_error, 4),
        "rows": {"train": len(y)},
        "onnx": {
            "input": f"features float32 [N, {N_FEATURES}]",
            "output": "variable float32 [N, 1]: need at the horizon over the upstream-implied need",
            "max_abs_diff_vs_sklearn": diff,
            "bytes": len(onnx),
        },
        "traces": {
            **traces,
            "held_out": [t.spec.data_version() for t, _ in held],
            "in_distribution": [t.spec.data_version() for t, _ in indist],
        },
        "lags": {
            name: [{"trace": t.spec.data_version(), **{k: v for k, v in lg.items()}} for t, lg in sets]
            for name, sets in (("held_out", held), ("in_distribution", indist), ("train", train_sets))
        },
    }
    for name, sets in (("validation", validation), ("in_distribution", indist), ("held_out", held)):
        merged = _merge([rows(t, lags, cfg.horizon_s, 1) for t, lags in sets])
        card.setdefault("prediction", {})[name] = prediction_figures(model.predict(merged.X), merged)
    log(f"prediction figures ({time.monotonic() - t0:.0f} s)")
    card["simulation"] = {
        "held_out": simulation(held, served, cfg),
        "in_distribution": simulation(indist, served, cfg),
    }
    log(f"simulation ({time.monotonic() - t0:.0f} s)")
    card["config"] = {**asdict(cfg), "discovery": asdict(DISCOVERY)}
    card["features"] = list(FEATURE_NAMES)
    card["timing_s"] = {"fit": round(fit_s, 1), "total": round(time.monotonic() - t0, 1)}
    return Result(onnx, card)


def _table(figures: dict[str, dict[str, float]]) -> list[str]:
    lines = ["| predictor | MAE (cores) | relative MAE | share under by > 20 % |", "| --- | --- | --- | --- |"]
    for name, f in figures.items():
        lines.append(f"| {name} | {f['mae_cores']:.4f} | {f['rel_mae']:.4f} | {f['under_by_20pct_share']:.4f} |")
    return lines


def write_card_md(card: dict[str, Any], path: Path) -> None:
    sim_h, sim_i = card["simulation"]["held_out"], card["simulation"]["in_distribution"]
    sc = card["config"]["sim"]

    def sim_table(sim: dict[str, Any]) -> list[str]:
        lines = [
            "| policy | SLO-violation s | replica-s | p99 latency (ms) | seconds |",
            "| --- | --- | --- | --- | --- |",
        ]
        for policy, f in sim["totals"].items():
            lines.append(
                f"| {policy} | {f['violation_s']} | {f['replica_s']:.0f} | {f['p99_latency_ms']:.1f} | {f['seconds']} |"
            )
        lines.append("")
        lines.append(
            f"SLO-violation seconds predictive / reactive: **{sim['violation_ratio']:.3f}** (target <= 0.2); "
            f"replica-seconds: **{sim['replica_ratio']:.3f}** (target <= 1.1)."
        )
        return lines

    lag_lines = [
        "| trace | stage | upstream | true lag (s) | discovered (s) | metric | r | Granger p |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for entry in card["lags"]["held_out"] + card["lags"]["in_distribution"]:
        for stage in ("B", "C"):
            lg = entry[stage]
            lag_lines.append(
                f"| `{entry['trace']}` | {stage} | {lg['upstream']} | {lg['true_lag_s']} | {lg['lag_s']} | "
                f"{lg['upstream_metric']} | {lg['correlation']:.3f} | {lg['granger_p']:.1e} |"
            )
    exact = sum(
        entry[s]["true_lag_s"] == entry[s]["lag_s"]
        for group in card["lags"].values()
        for entry in group
        for s in ("B", "C")
    )
    total = sum(2 for group in card["lags"].values() for _ in group)
    lines = [
        f"# Scaling model card: {card['model_version']}",
        "",
        "Predicts a downstream component's CPU need (cores) 15 s ahead from its upstream's lagged metrics and",
        "its own, for the predictive scaling policy. Generated by `models/scaling/train.py`; every figure here",
        "is in `card.json` too.",
        "",
        "| | |",
        "| --- | --- |",
        f"| features | `{card['features_version']}`, {len(card['features'])} features |",
        f"| horizon | {card['horizon_s']} s |",
        f"| training rows | {card['rows']['train']} |",
        f"| error spread (validation, relative std) | {card['prediction_error']:.4f} (the policy's quantile uses it) |",
        f"| ONNX | input `{card['onnx']['input']}`, output `{card['onnx']['output']}` |",
        f"| onnxruntime vs scikit-learn | max abs diff {card['onnx']['max_abs_diff_vs_sklearn']:.2e} |",
        "",
        "## Summary",
        "",
        f"The correlation engine found the true lag exactly on {exact} of {total} stage pairs (all traces). On "
        f"the held-out regime the model's relative MAE is {card['prediction']['held_out']['model']['rel_mae']:.3f} "
        f"against {card['prediction']['held_out']['naive']['rel_mae']:.3f} for the last value and "
        f"{card['prediction']['held_out']['reactive']['rel_mae']:.3f} for the reactive 15 s mean "
        f"({card['prediction']['held_out']['upstream']['rel_mae']:.3f} for the upstream-implied need without a model). "
        f"Replayed through the queueing simulation, predictive scaling has "
        f"{sim_h['violation_ratio']:.3f} of the reactive baseline's SLO-violation seconds at "
        f"{sim_h['replica_ratio']:.3f} of its replica-seconds on the held-out traces.",
        "",
        "## Lags: discovered (first hour of each trace) vs true",
        "",
        *lag_lines,
        "",
        "## Prediction error (need at +15 s)",
        "",
        "Baselines: `naive` = the last second's CPU; `reactive` = the mean of the last 15 s (what an HPA",
        "acts on); `upstream` = the upstream-implied need with no model.",
        "",
        "### Held out (`flash` regime, unseen seeds and lags)",
        "",
        *_table(card["prediction"]["held_out"]),
        "",
        "### In distribution (`bursty`, unseen seed)",
        "",
        *_table(card["prediction"]["in_distribution"]),
        "",
        "### Validation",
        "",
        *_table(card["prediction"]["validation"]),
        "",
        "## Simulation: predictive vs the HPA-like baseline",
        "",
        f"`models/scaling/evaluate.py`: B and C of each trace, replicas of {sc['replica_cores']:g} core, cold start "
        f"{sc['cold_start_s']} s, warm standby {sc['warm_start_s']} s ({sc['standbys']} kept by the predictive policy, "
        f"counted at {sc['standby_share']:g} of a replica), SLO = {sc['slo_factor']:g}x the base latency, the "
        f"predictive policy deciding every {sc['decide_every_s']} s (replica capacity "
        f"{sc['scaling']['replica_capacity']:g} cores, replica cost {sc['scaling']['replica_cost']:g} vs violation "
        f"cost {sc['scaling']['violation_cost']:g}, hold {sc['scaling']['scale_in_hold_s']:g} s), the reactive one "
        f"every {sc['hpa']['sync_period_s']:g} s at {sc['hpa']['target_utilization']:g} utilisation, "
        f"{sc['hpa']['tolerance']:g} tolerance, {sc['hpa']['scale_down_stabilization_s']:g} s stabilisation.",
        "",
        "### Held out",
        "",
        *sim_table(sim_h),
        "",
        "### In distribution",
        "",
        *sim_table(sim_i),
        "",
        "## Features",
        "",
        ", ".join(f"`{n}`" for n in card["features"]),
        "",
    ]
    path.write_text("\n".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
    p = training_parser(
        __doc__, TrainConfig.seed, TrainConfig.max_iter, TrainConfig.model_version, HERE / "scaling.onnx"
    )
    args = p.parse_args(argv)
    cfg = replace(TrainConfig(), seed=args.seed, max_iter=args.max_iter, model_version=args.model_version)
    log = functools.partial(print, file=sys.stderr, flush=True)
    result = train(cfg, log)
    write_model(args.out, result.onnx, result.card, write_card_md)
    sim = result.card["simulation"]["held_out"]
    log(json.dumps({"violation_ratio": sim["violation_ratio"], "replica_ratio": sim["replica_ratio"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
