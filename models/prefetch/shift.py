"""What bench/prefetch.py's window allows in the cache simulation: recovery after the trace's mix
shift and the mean start, per policy.

    .venv/bin/python -m models.prefetch.shift                       # bench/prefetch.py's window and bound
    .venv/bin/python -m models.prefetch.shift --cache-share 0.8 --model /tmp/p/prefetch.onnx
    .venv/bin/python -m models.prefetch.shift --regime train --seed 777       # the same window of another trace

The window is bench/prefetch.py's: the `eval` regime, seed 20261231, 3 hosts, 2 days, the 3 trace
hours before the shift and the 9 after, each host's cache primed with its 2 trace hours before and
bounded to `--cache-share` of the median working set of the window (the bench's layers are the
trace's / 4, its bound the same share of theirs), the first 5 starts not counted. On it
(`evaluate.replay_window`) each policy warms after every start and every 300 s: no prefetching,
the served layer predictor (`LayerPredictor.host_layers`, the registry's pushes of released images
included) at fixed thresholds, an oracle warming the host's next start, the same oracle blind to
layers new to the fleet (`history_ceiling_ranker`: the most any predictor of the history could
name), warms that know the generator's workflows and crons (`structure_ranker`), and warms that
know only the layers of the host's next start it never held (`novel_ranker`: what no history
holds), alone and before the model's. Per policy: the share of starts all local before the shift
and in each run of 50 starts after it, how many starts after the shift until a run of 50 is back to
90 % of the share before (`evaluate.recovery`, as the bench prints it), the starts that touch the
registry and the mean start estimated from where each start's missing bytes come (`StartCost`),
and why the starts after it missed (`evaluate.miss_causes`).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.warm_features import FleetStarts, HostStarts
from coordinator.warm_predictor import LayerPredictor
from models.prefetch.evaluate import (
    EvalConfig,
    Ranker,
    miss_causes,
    oracle_ranker,
    recovery,
    replay_window,
    structure_ranker,
    windows_after,
)
from models.prefetch.generate import REGIMES, Trace, TraceSpec, generate, make_catalog

HERE = Path(__file__).resolve().parent
BENCH_SCALE = 4
"""bench/prefetch.py's layers are the trace's bytes / 4 (at least 64 KiB)."""


@dataclass(frozen=True)
class ShiftWindow:
    trace: Trace
    begin: float
    end: float
    capacity: int
    """Per host, in trace bytes."""


def bench_window(
    seed: int = 20261231,
    before_h: float = 3.0,
    after_h: float = 9.0,
    cache_share: float = 0.6,
    regime: str = "eval",
) -> ShiftWindow:
    """bench/prefetch.py's trace, window and cache bound (its layer sizes approximated: the trace's
    / 4, at least 64 KiB, without the tar headers of the bench's layers); another `regime` or seed
    gives the same window of another trace."""
    trace = generate(TraceSpec(REGIMES[regime], seed, n_hosts=3, days=2.0))
    begin, end = trace.shift_ts - 3600 * before_h, trace.shift_ts + 3600 * after_h
    held: dict[str, set[str]] = {h: set() for h in trace.hosts}
    for host, s in trace.starts:
        if begin <= s.ts < end:
            held[host].update(s.layers)
    scaled = statistics.median(sum(max(64 << 10, trace.sizes[d] // BENCH_SCALE) for d in ds) for ds in held.values())
    return ShiftWindow(trace, begin, end, int(cache_share * scaled) * BENCH_SCALE)


@dataclass(frozen=True)
class StartCost:
    """What a start takes on the bench's mesh by where its missing bytes come from, fitted to
    bench/prefetch.py's figures of 2026-12-06: every layer local 0.16 s (the median); a peer moves a
    MB in 11.6 ms (starts served by peers alone: 21.6 MB in 0.41 s); the registry's 100 Mbit/s link
    one in 80 ms. An estimate for comparing policies, not a measurement; for the model it gives the
    ratio the mesh measures (0.91x against 0.89-0.90x, docs/benchmarks.md)."""

    local_s: float = 0.16
    peer_s_per_mb: float = 0.0116
    registry_s_per_mb: float = 0.08

    def mean_s(self, fetched: Sequence[tuple[int, int]]) -> float:
        """The mean start over `evaluate.SimResult.fetched` (trace bytes: the bench's are / BENCH_SCALE)."""
        mb = 1e6 * BENCH_SCALE
        return statistics.fmean(
            self.local_s + peer / mb * self.peer_s_per_mb + registry / mb * self.registry_s_per_mb
            for peer, registry in fetched
        )


def predictor_ranker(trace: Trace, predictor: LayerPredictor, threshold: float, pushes: bool = True) -> Ranker:
    """The served predictor's layers at or above `threshold`, best first, from the fleet's starts
    up to the moment (and the registry's pushes, `Trace.pushes`), as the coordinator records them.
    Calls must come in time order (replay_window's)."""
    fleet = FleetStarts()
    hosts = {h: HostStarts() for h in trace.hosts}
    fed = [0, 0]

    def rank(host: str, now: float) -> list[str]:
        while fed[0] < len(trace.starts) and trace.starts[fed[0]][1].ts <= now:
            h, s = trace.starts[fed[0]]
            hosts[h].add(s, fleet)
            fed[0] += 1
        while pushes and fed[1] < len(trace.pushes) and trace.pushes[fed[1]].ts <= now:
            fleet.pushed(trace.pushes[fed[1]].source, trace.pushes[fed[1]].layers)
            fed[1] += 1
        return [s.digest for s in predictor.host_layers(hosts[host], fleet, now) if s.probability >= threshold]

    return rank


def novel_ranker(trace: Trace, lease_s: float, then: Ranker | None = None) -> Ranker:
    """Knows only what is new: the layers of the host's next start (within `lease_s`) that the host
    never held before, then `then`'s. What a predictor of the history cannot know after a shift
    (a release's new layers, the signatures a host's new mix brings); with it, what is left is the
    history's to predict."""
    oracle = oracle_ranker(trace, 1, lease_s)
    first: dict[tuple[str, str], float] = {}
    for h, s in trace.starts:
        for d in s.layers:
            first.setdefault((h, d), s.ts)

    def rank(host: str, now: float) -> list[str]:
        new = [d for d in oracle(host, now) if first[(host, d)] > now]
        rest = then(host, now) if then is not None else []
        return new + [d for d in rest if d not in new]

    return rank


def history_ceiling_ranker(trace: Trace, lease_s: float, pushes: bool = True) -> Ranker:
    """Knows the host's next start (within `lease_s`) but not the layers no start of the fleet used
    before (with `pushes`, nor pushed to the registry before): every layer a predictor of the starts
    (and the registry's pushes) could name, and only the right ones. No predictor of the history does
    better on any host's next start."""
    oracle = oracle_ranker(trace, 1, lease_s)
    seen: dict[str, float] = {}
    for _, s in trace.starts:
        for d in s.layers:
            seen.setdefault(d, s.ts)
    for push in trace.pushes if pushes else ():
        for d in push.layers:
            seen[d] = min(seen.get(d, push.ts), push.ts)

    def rank(host: str, now: float) -> list[str]:
        return [d for d in oracle(host, now) if seen[d] < now]

    return rank


def policies(
    window: ShiftWindow, predictor: LayerPredictor, thresholds: Sequence[float], lease_s: float
) -> dict[str, Ranker | None]:
    catalog = make_catalog(window.trace.spec)
    out: dict[str, Ranker | None] = {"none": None}
    for t in thresholds:
        out[f"model at {t:g}"] = predictor_ranker(window.trace, predictor, t)
    out["oracle"] = oracle_ranker(window.trace, 1, lease_s)
    out["the history's ceiling"] = history_ceiling_ranker(window.trace, lease_s, pushes=False)
    out["the history's ceiling, pushed layers known"] = history_ceiling_ranker(window.trace, lease_s)
    out["new layers known"] = novel_ranker(window.trace, lease_s)
    out[f"new layers known, then the model at {thresholds[0]:g}"] = novel_ranker(
        window.trace, lease_s, predictor_ranker(window.trace, predictor, thresholds[0])
    )
    out["structure"] = structure_ranker(window.trace, catalog.successors(), catalog.crons())
    return out


def judge(window: ShiftWindow, ranker: Ranker | None, cfg: EvalConfig, run: int = 50) -> dict[str, Any]:
    sim = replay_window(
        window.trace, window.begin, window.end, window.capacity, window.trace.sizes, ranker, cfg,
        prime_s=7200.0, warmup=5,
    )  # fmt: skip
    shift = window.trace.shift_ts
    rec = recovery(sim, shift, window=run)
    return {
        "hit_rate": sim.hit_rate,
        "waste": sim.waste,
        "mean_start_s": StartCost().mean_s(sim.fetched),
        "registry_starts": sum(registry > 0 for _, registry in sim.fetched),
        "before": rec["hit_rate_before"],
        "runs_after": windows_after(sim, shift, run),
        "starts_to_recover": rec["starts_to_recover"],
        "misses_after": miss_causes(window.trace, sim, shift, run),
    }


SWEPT = ("none", "model", "structure", "the history's ceiling", "oracle")


def sweep(
    seeds: Sequence[int], regime: str, cache_share: float, predictor: LayerPredictor, threshold: float, cfg: EvalConfig
) -> dict[int, dict[str, dict[str, Any]]]:
    """The same window of other traces (seeds), per policy of `SWEPT`: whether the bench window's
    figures are its own or the regime's."""
    named = {"model": f"model at {threshold:g}"}  # the rest by their names in `policies`
    out = {}
    for seed in seeds:
        window = bench_window(seed, cache_share=cache_share, regime=regime)
        rankers = policies(window, predictor, [threshold], cfg.lease_s)
        out[seed] = {name: judge(window, rankers[named.get(name, name)], cfg) for name in SWEPT}
    return out


def _seeds(text: str) -> list[int]:
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi) + 1)) if hi else [int(t) for t in text.split(",")]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=20261231)
    p.add_argument("--regime", choices=sorted(REGIMES), default="eval", help="the trace's regime (the bench's: eval)")
    p.add_argument("--cache-share", type=float, default=0.6)
    p.add_argument("--model", type=Path, default=HERE / "prefetch.onnx")
    p.add_argument("--thresholds", default="0.4,0.6", help="the model's fixed thresholds, comma-separated")
    p.add_argument("--json", action="store_true", help="print every figure as JSON")
    p.add_argument(
        "--seeds",
        type=_seeds,
        help="instead of one window, a line per seed (1-8 or 1,5,9): a few policies, the model at the first threshold",
    )
    args = p.parse_args(argv)
    if args.seeds:
        rows = sweep(args.seeds, args.regime, args.cache_share, LayerPredictor.load(args.model),
                     float(args.thresholds.split(",")[0]), EvalConfig())  # fmt: skip
        print(f"regime {args.regime}; per policy: all local, starts to 90 % after the shift, mean start x none")
        print("| seed | " + " | ".join(SWEPT) + " |\n| --- |" + " --- |" * len(SWEPT))
        for seed, by in rows.items():
            cells = (
                f"{r['hit_rate']:.2f}, {'never' if r['starts_to_recover'] < 0 else r['starts_to_recover']}, "
                f"{r['mean_start_s'] / by['none']['mean_start_s']:.2f}x"
                for r in by.values()
            )
            print(f"| {seed} | " + " | ".join(cells) + " |")
        return 0
    window = bench_window(args.seed, cache_share=args.cache_share, regime=args.regime)
    predictor = LayerPredictor.load(args.model)
    cfg = EvalConfig()
    thresholds = [float(t) for t in args.thresholds.split(",")]
    out = {name: judge(window, r, cfg) for name, r in policies(window, predictor, thresholds, cfg.lease_s).items()}
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print(
        f"{window.trace.spec.data_version()}; window {(window.begin - window.trace.shift_ts) / 3600:+g} h to "
        f"{(window.end - window.trace.shift_ts) / 3600:+g} h of the shift; cache {window.capacity / 1e6:.0f} MB of "
        f"trace bytes per host; model {predictor.version}"
    )
    print(
        "| policy | all local (waste) | before the shift | runs of 50 after it | starts to 90 % "
        "| starts that touch the registry | mean start, estimated (x none) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, r in out.items():
        runs = " / ".join(f"{x:.2f}" for x in r["runs_after"])
        to90 = "never" if r["starts_to_recover"] < 0 else str(r["starts_to_recover"])
        ratio = r["mean_start_s"] / out["none"]["mean_start_s"]
        print(
            f"| {name} | {r['hit_rate']:.3f} ({r['waste']:.2f}) | {r['before']:.2f} | {runs} | {to90} "
            f"| {r['registry_starts']} | {r['mean_start_s']:.2f} s ({ratio:.2f}) |"
        )
    print("\nwhy the starts after the shift missed, per run of 50 (starts missing such a layer, MB):")
    for name in ("none", f"model at {thresholds[0]:g}"):
        rows = out[name]["misses_after"]
        print(
            f"  {name}: "
            + "; ".join(
                f"{int(r['missed'])}/{int(r['starts'])} missed: "
                + ", ".join(
                    f"{c} {int(r[f'{c}_starts'])} ({r[f'{c}_mb']:.0f} MB)"
                    for c in ("new_to_fleet", "new_to_host", "evicted")
                )
                for r in rows
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
