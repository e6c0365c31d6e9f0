"""Retrain the layer predictor on the starts a coordinator recorded, and judge it against the active model.

    python -m models.prefetch.retrain --recorded starts.json --current active.onnx --out candidate.onnx \
        --verdict verdict.json [--holdout 21600] [--seed 1] [--max-iter 100] [--model-version warm-retrained]

The coordinator (coordinator/warm_retraining.py) runs this in a niced child process, so scikit-learn
never loads in the daemon. `--recorded` is the start history as the coordinator keeps it
(`{"starts": [{"host", "ts", "signature", "layers", "sizes"}...]}`, in time order). Its last
`--holdout` seconds are held out: the candidate is trained on the decisions before them (only those
whose horizon ends before the cut, so no label looks into the held-out window), then the candidate
and the active model are judged on the same held-out starts with the same cache simulation as the
card (models/prefetch/evaluate.py; every host's cache primed by the history before) at the active
model's threshold. `--verdict` gets both figures; the coordinator decides. The candidate carries
its P calibrated to the lease (`lease_calibration`, as models/prefetch/train.py fits it) from the
decisions whose lease ends before the cut.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from coordinator.warm_features import Start
from models.onnx_export import ort_probabilities
from models.prefetch.evaluate import EvalConfig, ranking, score_walk, simulate, walk
from models.prefetch.generate import DAY, REGIMES, Trace, TraceSpec
from models.prefetch.train import TrainConfig, fit, fit_lease_calibration, metadata, to_onnx

RECORDED_REGIME = replace(REGIMES["eval"], name="recorded", shift_at=1.0)
"""Only its name and "no shift" matter: a recorded trace is not generated."""


def recorded_trace(data: dict[str, Any]) -> Trace:
    """The recorded starts as a trace, times moved back by whole days (the time-of-day features hold)."""
    rows = sorted(data["starts"], key=lambda r: float(r["ts"]))
    if not rows:
        raise ValueError("no recorded starts")
    origin = math.floor(float(rows[0]["ts"]) / DAY) * DAY
    sizes: dict[str, int] = {}
    starts: list[tuple[str, Start]] = []
    for r in rows:
        layers = tuple(str(d) for d in r["layers"])
        for d, size in zip(layers, r.get("sizes") or [], strict=False):
            sizes[d] = max(sizes.get(d, 0), int(size))
        for d in layers:
            sizes.setdefault(d, 1)  # unknown size: counted, never zero (the cache simulation divides)
        starts.append((str(r["host"]), Start(float(r["ts"]) - origin, str(r["signature"]), layers)))
    hosts = sorted({h for h, _ in starts})
    days = (starts[-1][1].ts + 1.0) / DAY
    return Trace(TraceSpec(RECORDED_REGIME, 0, len(hosts), days), hosts, starts, sizes)


def judge(trace: Trace, cut: float, scorers: dict[str, Any], threshold: float, cfg: EvalConfig) -> dict[str, Any]:
    """Each scorer's cache figures on the starts after `cut` (warms decided by it all along) and its
    ranking on the decisions after `cut`."""
    w = walk(trace, cfg)
    held = replace(cfg, warmup_s=cut)
    out: dict[str, Any] = {}
    for name, scorer in scorers.items():
        scores = score_walk(w, scorer)
        sim = simulate(w, scores, threshold, held)
        after = [k for k, d in enumerate(w.decisions) if d.ts >= cut]
        w_after = replace(w, decisions=[w.decisions[k] for k in after])
        out[name] = {**sim.summary(), **ranking(w_after, [scores[k] for k in after], cfg.max_layers)}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recorded", type=Path, required=True)
    p.add_argument("--current", type=Path, required=True, help="the active model (its threshold and lease are kept)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--verdict", type=Path, required=True)
    p.add_argument("--holdout", type=float, default=6 * 3600.0, help="seconds at the end held out")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max-iter", type=int, default=TrainConfig.max_iter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model-version", default="warm-retrained")
    args = p.parse_args(argv)
    log = functools.partial(print, file=sys.stderr, flush=True)

    trace = recorded_trace(json.loads(args.recorded.read_text()))
    current = args.current.read_bytes()
    meta = ort.InferenceSession(current, providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    threshold, lease = float(meta["threshold"]), float(meta.get("lease_s") or meta["horizon_s"])
    cfg = replace(
        TrainConfig(), seed=args.seed, max_iter=args.max_iter, threads=args.threads, model_version=args.model_version
    )
    cfg = replace(cfg, eval=replace(cfg.eval, horizon_s=float(meta["horizon_s"]), lease_s=lease))
    cut = trace.spec.end - args.holdout
    if cut <= trace.starts[0][1].ts:
        raise SystemExit(f"the recorded starts span less than the held-out window ({args.holdout:g} s)")
    training = walk(trace, cfg.eval, tick_s=cfg.train_tick_s)
    rows = [d for d in training.decisions if d.ts + cfg.eval.horizon_s <= cut]
    if not rows:
        raise SystemExit("no decisions before the held-out window")
    X = np.concatenate([d.X for d in rows])
    y = np.concatenate([d.label for d in rows])
    log(f"training rows {y.size} ({int(y.sum())} needed) from {len(rows)} decisions before the cut")
    model = fit(X, y, cfg)
    hosts = len(trace.hosts)
    data_version = f"recorded: {len(trace.starts)} starts on {hosts} hosts over {trace.spec.days:.2f} days"
    # its P calibrated to the lease as the shipped model's is, on the decisions whose lease ends before the cut
    provisional = to_onnx(model, metadata(cfg, threshold, data_version))
    calibrating = replace(training, decisions=[d for d in training.decisions if d.ts + lease <= cut])
    knots = None
    if calibrating.decisions:
        knots = fit_lease_calibration([calibrating], functools.partial(ort_probabilities, provisional), lease)
        knots = knots if len(knots[0]) >= 2 else None  # one distinct P: nothing to map
    candidate = to_onnx(model, {**metadata(cfg, threshold, data_version, knots), "lease_s": f"{lease:g}"})
    scorers = {
        "candidate": functools.partial(ort_probabilities, candidate),
        "active": functools.partial(ort_probabilities, current),
    }
    verdict = {
        "threshold": threshold,
        "held_out_s": args.holdout,
        "training_rows": int(y.size),
        "active_version": meta.get("model_version", ""),
        "candidate_version": args.model_version,
        **judge(trace, cut, scorers, threshold, cfg.eval),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(candidate)
    args.verdict.write_text(json.dumps(verdict, indent=2, default=float) + "\n")
    log(json.dumps({k: verdict[k] for k in ("candidate", "active")}, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
