"""Retrain the scaling model on the behaviour a coordinator recorded, and judge it against the active model.

    python -m models.scaling.retrain --recorded pairs.json --current active.onnx --out candidate.onnx \
        --verdict verdict.json [--holdout 120] [--seed 1] [--max-iter 100] [--model-version scaling-retrained]

The coordinator (coordinator/scaling/retraining.py) runs this in a niced child process, so
scikit-learn never loads in the daemon. `--recorded` holds, per upstream/downstream pair the
leader decided on, both components' per-second series over the seconds they share and the lag the
correlation engine found (`{"pairs": [{"upstream", "downstream", "lag_s", "up": {metric: [...]},
"down": {...}}]}`, coordinator/scaling/series.py's metrics). Each pair's last `--holdout` seconds
are held out: the candidate (the same features, target and regressor as models/scaling/train.py) is
trained on the rows whose horizon ends before the cut, and both models predict the need at the
horizon of every held-out second. `--verdict` gets both error figures (train.py's `errors`: mean
absolute error in cores, relative, share under by 20 %) and the candidate's relative error spread
on that window, which the candidate carries as its `prediction_error` (what the policy provisions
for), never below half the active model's (a few minutes of held-out seconds understate it); the
coordinator decides.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

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
from models.onnx_export import regressor_to_onnx
from models.scaling.train import TrainConfig, errors
from models.trees import fit_boosted_regressor

Rows = tuple[npt.NDArray[np.float32], npt.NDArray[np.float64], npt.NDArray[np.float64]]
"""Features, need at the horizon, scale."""


def series(data: dict[str, Any]) -> ComponentSeries:
    return ComponentSeries(*(np.asarray(data[m], np.float64) for m in METRICS))


def split_rows(pair: dict[str, Any], horizon: int, holdout: int, step: int) -> tuple[Rows | None, Rows | None]:
    """The pair's training rows (horizon before the cut) and held-out rows (from the cut on)."""
    up, down, lag = series(pair["up"]), series(pair["down"]), int(pair["lag_s"])
    if len(up) != len(down):
        raise ValueError(f"{pair['upstream']} -> {pair['downstream']}: series of different lengths")
    last = len(down) - horizon - 3
    cut = len(down) - holdout
    out: list[Rows | None] = []
    for times in (
        np.arange(first_second(lag), min(cut - horizon, last), step, dtype=np.int64),
        np.arange(max(cut, first_second(lag)), last, 1, dtype=np.int64),
    ):
        if len(times) == 0:
            out.append(None)
            continue
        X, scale = feature_matrix(up, down, lag, horizon, times)
        out.append((X, target(down, horizon, times), scale))
    return out[0], out[1]


def _stack(parts: list[Rows]) -> Rows:
    X = np.vstack([p[0] for p in parts])
    return X, np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recorded", type=Path, required=True)
    p.add_argument("--current", type=Path, required=True, help="the active model (its horizon is kept)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--verdict", type=Path, required=True)
    p.add_argument("--holdout", type=int, default=120, help="seconds at the end of each pair held out")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max-iter", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model-version", default="scaling-retrained")
    args = p.parse_args(argv)
    log = functools.partial(print, file=sys.stderr, flush=True)

    pairs = json.loads(args.recorded.read_text())["pairs"]
    if not pairs:
        raise SystemExit("no recorded pairs")
    active = ScalingModel.load(args.current)
    horizon = active.info.horizon_s
    cfg = TrainConfig()
    trained, held = [], []
    for pair in pairs:
        before, after = split_rows(pair, horizon, args.holdout, cfg.step_s)
        trained += [before] if before is not None else []
        held += [after] if after is not None else []
    if not trained or not held:
        raise SystemExit(f"the recorded pairs are too short for a {args.holdout} s held-out window")
    X, need, scale = _stack(trained)
    log(f"training rows {len(need)} from {len(pairs)} pair(s)")
    model = fit_boosted_regressor(
        X,
        training_target(need, X, scale),
        max_iter=args.max_iter,
        learning_rate=cfg.learning_rate,
        max_leaf_nodes=cfg.max_leaf_nodes,
        min_samples_leaf=min(cfg.min_samples_leaf, max(5, len(need) // 20)),
        l2_regularization=cfg.l2_regularization,
        seed=args.seed,
        threads=args.threads,
    )
    hX, h_need, h_scale = _stack(held)
    candidate_need = need_from_output(model.predict(hX), hX, h_scale)
    active_need = need_from_output(active.output(hX), hX, h_scale)
    spread = float(np.std(candidate_need / np.maximum(h_need, 1e-6) - 1.0))
    data_version = f"recorded: {len(pairs)} pair(s), {len(need)} training rows"
    metadata = {
        "model_version": args.model_version,
        "features_version": FEATURES_VERSION,
        "n_features": str(N_FEATURES),
        "feature_names": ",".join(FEATURE_NAMES),
        "horizon_s": str(horizon),
        "prediction_error": f"{max(spread, active.info.prediction_error * 0.5):.4f}",
        "data_version": data_version,
        "seed": str(args.seed),
        "output": "need at the horizon over the upstream-implied need (coordinator/scaling/features.py)",
    }
    onnx = regressor_to_onnx(model, N_FEATURES, "ferryman_scaling", "CPU need at the horizon (retrained)", metadata)
    verdict = {
        "held_out_s": args.holdout,
        "training_rows": len(need),
        "held_out_rows": len(h_need),
        "active_version": active.info.version,
        "candidate_version": args.model_version,
        "candidate_prediction_error": round(spread, 4),
        "candidate": errors(candidate_need, h_need),
        "active": errors(active_need, h_need),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(onnx)
    args.verdict.write_text(json.dumps(verdict, indent=2) + "\n")
    log(json.dumps({k: verdict[k] for k in ("candidate", "active")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
