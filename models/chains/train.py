"""Train the chain usage model: a stage's CPU and memory in this run of a chain, exported to ONNX
with its model card.

    .venv/bin/python -m models.chains.train                    # the shipped model (usage.onnx, card.*)
    .venv/bin/python -m models.chains.train --out /tmp/c/usage.onnx --max-iter 40

Histories (generate.py), all seeded from `--seed` S:
- training: the `steady` and `drifting` regimes, seed S, `train_chains` chains each;
- in distribution: the same regimes, seed S+100, never trained on;
- held out: the `shifty` regime (more and larger changes between runs), seed S+200.

The request rate each stage served at is in every generated history; a coordinator that does not
measure it passes the rate feature as missing, so a seeded share of the training chains
(`rate_missing_share`) has its rates removed, and the card judges the held-out regime both with
the rates and without them.

A row is one (chain, run r >= 2, stage T after the first, resource), predicted as the chain manager
predicts it while the stage S before T serves run r: from runs 0..r-1 and S's usage in run r
(coordinator/chains/usage.py). Baselines: `last run` (T's usage in run r-1, what the coordinator
reserved without a model) and `mean of 3` (T's mean over runs r-3..r-1).
"""

from __future__ import annotations

import functools
import itertools
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from coordinator.chains.usage import (
    FACTOR_BOUNDS,
    FEATURE_NAMES,
    FEATURES_VERSION,
    KINDS,
    N_FEATURES,
    ChainRun,
    rows_for,
)
from models.chains.generate import GENERATOR_VERSION, REGIMES, histories
from models.onnx_export import check_regressor_onnx, ort_regression, regressor_to_onnx
from models.training_cli import training_parser, write_model
from models.trees import fit_boosted_regressor

HERE = Path(__file__).resolve().parent
TRAIN_REGIMES = ("steady", "drifting")
HELD_OUT_REGIME = "shifty"
Log = Callable[[str], None]


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 20261206
    model_version: str = "chain-usage-2"
    train_chains: int = 150
    eval_chains: int = 60
    max_iter: int = 150
    learning_rate: float = 0.08
    max_leaf_nodes: int = 31
    min_samples_leaf: int = 40
    l2_regularization: float = 1.0
    threads: int = 1
    min_runs: int = 2
    """Rows start at the run with this many runs of history before it."""
    rate_missing_share: float = 0.3
    """Training chains whose request rates are removed (the model learns to predict without them)."""


@dataclass
class Rows:
    X: npt.NDArray[np.float32]
    y: npt.NDArray[np.float64]
    """The target: T's usage in the run over its last run's."""
    actual: npt.NDArray[np.float64]
    last: npt.NDArray[np.float64]
    mean3: npt.NDArray[np.float64]
    kind: npt.NDArray[np.int8]


def history_rows(chains: Sequence[Sequence[ChainRun]], min_runs: int) -> Rows:
    X: list[list[float]] = []
    y: list[float] = []
    actual: list[float] = []
    last: list[float] = []
    mean3: list[float] = []
    kinds: list[int] = []
    for runs in chains:
        for r in range(min_runs, len(runs)):
            now = runs[r]
            names = list(now.usage)
            for source, target in itertools.pairwise(names):
                rows = rows_for(
                    runs[:r],
                    source,
                    target,
                    now.usage[source],
                    now.volume_bytes.get(source),
                    now.request_rate.get(source),
                )
                for kind, (row, scale) in rows.items():
                    past = [p.usage[target].of(kind) for p in runs[max(0, r - 3) : r]]
                    value = now.usage[target].of(kind)
                    X.append(row)
                    y.append(value / scale)
                    actual.append(value)
                    last.append(scale)
                    mean3.append(sum(past) / len(past))
                    kinds.append(KINDS.index(kind))
    return Rows(
        np.asarray(X, np.float32).reshape(-1, N_FEATURES),
        np.asarray(y),
        np.asarray(actual),
        np.asarray(last),
        np.asarray(mean3),
        np.asarray(kinds, np.int8),
    )


def _errors(predicted: npt.NDArray[np.float64], rows: Rows) -> dict[str, dict[str, float]]:
    """Per resource: MAE (millicores or MiB), relative MAE, and the share predicted > 10 % under."""
    out: dict[str, dict[str, float]] = {}
    for k, kind in enumerate(KINDS):
        sel = rows.kind == k
        err = predicted[sel] - rows.actual[sel]
        unit = 1.0 if kind == "cpu_millis" else float(1 << 20)
        out[kind] = {
            "rows": int(sel.sum()),
            "mae": float(np.mean(np.abs(err)) / unit),
            "relative_mae": float(np.mean(np.abs(err) / rows.actual[sel])),
            "under_10pct": float(np.mean(predicted[sel] < 0.9 * rows.actual[sel])),
        }
    return out


def judge(onnx: bytes, rows: Rows) -> dict[str, Any]:
    low, high = FACTOR_BOUNDS
    factor = np.clip(ort_regression(onnx, rows.X).astype(np.float64), low, high)
    predictors = {"model": factor * rows.last, "last run": rows.last, "mean of 3": rows.mean3}
    errors = {name: _errors(p, rows) for name, p in predictors.items()}
    ratios = {kind: errors["model"][kind]["relative_mae"] / errors["last run"][kind]["relative_mae"] for kind in KINDS}
    return {"errors": errors, "model_over_last_run": ratios}


def without_rates(chains: Sequence[Sequence[ChainRun]]) -> list[list[ChainRun]]:
    """The histories as the coordinator has them for stages whose request rate it did not measure."""
    return [[replace(run, request_rate={}) for run in runs] for runs in chains]


def some_without_rates(chains: Sequence[Sequence[ChainRun]], share: float, seed: int) -> list[list[ChainRun]]:
    """The histories, a seeded `share` of them without their request rates."""
    drop = np.random.default_rng(np.random.SeedSequence([seed, 2])).random(len(chains)) < share
    return [without_rates([runs])[0] if d else list(runs) for runs, d in zip(chains, drop, strict=True)]


@dataclass(frozen=True)
class Result:
    onnx: bytes
    card: dict[str, Any]


def train(cfg: TrainConfig, log: Log) -> Result:
    training = [h for name in TRAIN_REGIMES for h in histories(REGIMES[name], cfg.seed, cfg.train_chains)]
    training = some_without_rates(training, cfg.rate_missing_share, cfg.seed)
    in_dist = [h for name in TRAIN_REGIMES for h in histories(REGIMES[name], cfg.seed + 100, cfg.eval_chains)]
    held_out = histories(REGIMES[HELD_OUT_REGIME], cfg.seed + 200, cfg.eval_chains)
    train_rows = history_rows(training, cfg.min_runs)
    log(f"training rows: {train_rows.X.shape[0]}")
    model = fit_boosted_regressor(
        train_rows.X,
        train_rows.y,
        max_iter=cfg.max_iter,
        learning_rate=cfg.learning_rate,
        max_leaf_nodes=cfg.max_leaf_nodes,
        min_samples_leaf=cfg.min_samples_leaf,
        l2_regularization=cfg.l2_regularization,
        seed=cfg.seed,
        threads=cfg.threads,
    )
    data_version = (
        f"{GENERATOR_VERSION} train={','.join(TRAIN_REGIMES)} seed={cfg.seed} chains/regime={cfg.train_chains}"
    )
    metadata = {
        "model_version": cfg.model_version,
        "features_version": FEATURES_VERSION,
        "n_features": str(N_FEATURES),
        "feature_names": ",".join(FEATURE_NAMES),
        "output": "usage in this run over the stage's last run",
        "data_version": data_version,
        "seed": str(cfg.seed),
    }
    onnx = regressor_to_onnx(
        model, N_FEATURES, "ferryman_chain_usage", "ferryman chain usage: a stage's usage over its last run", metadata
    )
    diff = check_regressor_onnx(model, onnx, train_rows.X[:20000], 1e-3)
    log(f"onnxruntime vs scikit-learn: {diff:.3g}")
    held, within = history_rows(held_out, cfg.min_runs), history_rows(in_dist, cfg.min_runs)
    card = {
        "model_version": cfg.model_version,
        "features_version": FEATURES_VERSION,
        "feature_names": list(FEATURE_NAMES),
        "data_version": data_version,
        "training_rows": int(train_rows.X.shape[0]),
        "onnx": {
            "input": f"features float32 [N, {N_FEATURES}]",
            "output": "variable float32 [N, 1]: the stage's usage in this run over its last run's",
            "max_abs_diff_vs_sklearn": diff,
        },
        "held_out": {"regime": HELD_OUT_REGIME, "seed": cfg.seed + 200, **judge(onnx, held)},
        "held_out_without_rates": {
            "regime": HELD_OUT_REGIME,
            "seed": cfg.seed + 200,
            **judge(onnx, history_rows(without_rates(held_out), cfg.min_runs)),
        },
        "in_distribution": {"regimes": list(TRAIN_REGIMES), "seed": cfg.seed + 100, **judge(onnx, within)},
        "config": asdict(cfg),
    }
    return Result(onnx, card)


def write_card_md(card: dict[str, Any], path: Path) -> None:
    def table(section: dict[str, Any]) -> list[str]:
        lines = [
            "| predictor | resource | MAE | relative MAE | share > 10 % under |",
            "| --- | --- | --- | --- | --- |",
        ]
        for name, per_kind in section["errors"].items():
            for kind, e in per_kind.items():
                unit = "millicores" if kind == "cpu_millis" else "MiB"
                lines.append(
                    f"| {name} | {kind} | {e['mae']:.1f} {unit} | {e['relative_mae']:.4f} | {e['under_10pct']:.3f} |"
                )
        return lines

    held = card["held_out"]
    ratios = held["model_over_last_run"]
    blind = card["held_out_without_rates"]["model_over_last_run"]
    text = [
        f"# Chain usage model card: {card['model_version']}",
        "",
        "Predicts a chain stage's CPU (millicores) and memory (bytes) in the run going on, while the",
        "stage before it serves, from the chain's own history; the chain manager reserves that capacity",
        "for the stage ahead of its handover. Generated by `models/chains/train.py`; every figure here is",
        "in `card.json` too.",
        "",
        "| | |",
        "| --- | --- |",
        f"| features | `{card['features_version']}`, {len(card['feature_names'])} features |",
        f"| data | `{card['data_version']}` |",
        f"| training rows | {card['training_rows']} |",
        f"| ONNX | input `{card['onnx']['input']}`, output `{card['onnx']['output']}` |",
        f"| onnxruntime vs scikit-learn | max abs diff {card['onnx']['max_abs_diff_vs_sklearn']:.3g} |",
        "",
        "## Summary",
        "",
        f"On the held-out regime (`{held['regime']}`: more and larger changes between runs) the model's",
        f'relative MAE is {ratios["cpu_millis"]:.2f} of the "same as last run" baseline\'s for CPU and',
        f"{ratios['memory_bytes']:.2f} for memory, with the request rate each stage served at; without",
        f"the rates (a stage whose rate was not measured: the feature missing) {blind['cpu_millis']:.2f} and",
        f"{blind['memory_bytes']:.2f}.",
        "",
        f"## Held out (`{held['regime']}`, seed {held['seed']})",
        "",
        *table(held),
        "",
        f"## Held out without request rates (`{held['regime']}`, seed {held['seed']}, `rate_growth` missing)",
        "",
        *table(card["held_out_without_rates"]),
        "",
        f"## In distribution ({', '.join(card['in_distribution']['regimes'])}, seed {card['in_distribution']['seed']})",
        "",
        *table(card["in_distribution"]),
        "",
    ]
    path.write_text("\n".join(text))


def main(argv: Sequence[str] | None = None) -> int:
    p = training_parser(__doc__, TrainConfig.seed, TrainConfig.max_iter, TrainConfig.model_version, HERE / "usage.onnx")
    args = p.parse_args(argv)
    cfg = replace(TrainConfig(), seed=args.seed, max_iter=args.max_iter, model_version=args.model_version)
    log = functools.partial(print, file=sys.stderr, flush=True)
    result = train(cfg, log)
    write_model(args.out, result.onnx, result.card, write_card_md)
    log(f"held out, model over last run: {result.card['held_out']['model_over_last_run']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
