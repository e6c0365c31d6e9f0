"""Synthetic per-second traces of a 3-stage pipeline (A -> B -> C), for the scaling models.

The process (version `scaling-gen/1`; README.md says it at length):

1. **Offered load at A.** Requests arrive at A as a Poisson process whose rate is a base rate times a
   diurnal wave (a compressed "day" of `diurnal_period_s`), times bursts (a Poisson number per hour,
   each a plateau of 1.5-3x for 20-90 s), times flash crowds (rarer: a ramp to 4-8x over 5-20 s and
   an exponential decay over 1-4 min).
2. **Downstream work follows upstream by a lag.** Every request A handles sends on average
   `fanout[0]` requests to B, which arrive `lags_s[0]` seconds later (+-1 s of jitter: weights
   0.2, 0.6, 0.2 on lag-1, lag, lag+1), as when A batches or queues its output; B feeds C the same
   way with `fanout[1]` and `lags_s[1]`. These are the *true lags* the correlation engine must find.
3. **Per-second metrics per stage**, measured under a fixed nominal provisioning (1.6x the stage's
   mean CPU need): `rate` (requests/s arrived), `cpu` (cores: `cpu_per_request` core-seconds per
   request, plus an idle floor, with 5 % noise; this is the stage's *CPU need*), `latency` (ms: the
   base service time inflated by the utilisation of the nominal capacity, M/M/1-like, with noise),
   `errors` (per second; a small base rate that rises once the nominal capacity is saturated) and
   `memory` (MB: a floor plus the requests in flight by Little's law).

Deterministic: everything is drawn from `SeedSequence([seed, regime key])`. Three regimes: the models
are trained on `diurnal` and `bursty` (each with its own lags) and judged on `flash` (flash crowds on
top of bursts, lags it never saw) with other seeds.

    .venv/bin/python -m models.scaling.generate --regime flash --seed 7 --out /tmp/trace.json
"""

from __future__ import annotations

import argparse
import json
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt

from coordinator.scaling.series import METRICS, ComponentSeries

GENERATOR_VERSION = "scaling-gen/1"
STAGES = ("A", "B", "C")
JITTER = (0.2, 0.6, 0.2)
"""Weights of a request's delay at lag-1, lag, lag+1 seconds."""


@dataclass(frozen=True)
class Regime:
    """The parameters of one kind of traffic. Training and evaluation use different regimes."""

    name: str
    base_rate: float = 40.0
    """Mean requests/s at A before the wave, bursts and crowds."""
    diurnal_period_s: float = 3600.0
    diurnal_amp: float = 0.5
    bursts_per_hour: float = 6.0
    burst_mult: tuple[float, float] = (1.5, 3.0)
    burst_s: tuple[float, float] = (20.0, 90.0)
    flash_per_hour: float = 0.0
    flash_mult: tuple[float, float] = (4.0, 8.0)
    flash_rise_s: tuple[float, float] = (5.0, 20.0)
    flash_decay_s: tuple[float, float] = (60.0, 240.0)
    lags_s: tuple[int, int] = (20, 12)
    """True lags A -> B and B -> C, seconds."""
    fanout: tuple[float, float] = (1.0, 0.6)
    cpu_per_request: tuple[float, float, float] = (0.01, 0.02, 0.03)
    idle_cpu: float = 0.02
    latency_ms: tuple[float, float, float] = (8.0, 20.0, 30.0)
    memory_mb: tuple[float, float, float] = (60.0, 120.0, 200.0)


REGIMES: dict[str, Regime] = {
    # smooth days, a few bursts
    "diurnal": Regime("diurnal", bursts_per_hour=2.0, lags_s=(20, 12)),
    # frequent bursts, other lags and fan-out
    "bursty": Regime(
        "bursty", base_rate=30.0, diurnal_amp=0.35, bursts_per_hour=10.0, lags_s=(15, 25), fanout=(1.2, 0.5)
    ),
    # judged on: flash crowds on top of bursts, lags and rates neither training regime has
    "flash": Regime(
        "flash",
        base_rate=50.0,
        diurnal_period_s=2700.0,
        diurnal_amp=0.4,
        bursts_per_hour=6.0,
        flash_per_hour=2.0,
        lags_s=(25, 18),
        fanout=(0.8, 0.7),
        cpu_per_request=(0.012, 0.025, 0.02),
    ),
}
TRAIN_REGIMES = ("diurnal", "bursty")
HELD_OUT_REGIME = "flash"


@dataclass(frozen=True)
class TraceSpec:
    regime: Regime
    seed: int
    duration_s: int = 7200

    def data_version(self) -> str:
        r = self.regime
        return (
            f"{GENERATOR_VERSION} regime={r.name} seed={self.seed} duration={self.duration_s}s "
            f"lags={r.lags_s[0]},{r.lags_s[1]}"
        )


@dataclass
class Trace:
    spec: TraceSpec
    components: dict[str, ComponentSeries]
    """Per stage, its per-second metrics."""
    offered: npt.NDArray[np.float64]
    """A's arrival rate (the Poisson mean) per second, before noise: for plots and checks."""
    edges: list[tuple[str, str, int]] = field(default_factory=list)
    """(upstream, downstream, true lag in seconds)."""

    def to_json(self) -> dict[str, object]:
        return {
            "data_version": self.spec.data_version(),
            "spec": {**asdict(self.spec), "regime": asdict(self.spec.regime)},
            "edges": [list(e) for e in self.edges],
            "components": {
                name: {m: [round(float(v), 4) for v in getattr(c, m)] for m in METRICS}
                for name, c in self.components.items()
            },
        }


def _key(name: str) -> int:
    return zlib.crc32(name.encode())


def offered_rate(spec: TraceSpec, rng: np.random.Generator) -> npt.NDArray[np.float64]:
    """A's Poisson mean per second: base x diurnal wave x bursts x flash crowds."""
    r, n = spec.regime, spec.duration_s
    t = np.arange(n, dtype=np.float64)
    phase = rng.uniform(0, 1)
    mult = 1.0 + r.diurnal_amp * np.sin(2 * np.pi * (t / r.diurnal_period_s + phase))
    hours = n / 3600.0
    for _ in range(int(rng.poisson(r.bursts_per_hour * hours))):
        start, length = rng.uniform(0, n), rng.uniform(*r.burst_s)
        ramp = np.clip(np.minimum(t - start, start + length - t) / 5.0, 0.0, 1.0)  # 5 s edges
        mult *= 1.0 + (rng.uniform(*r.burst_mult) - 1.0) * ramp
    for _ in range(int(rng.poisson(r.flash_per_hour * hours))):
        start, peak = rng.uniform(0, n), rng.uniform(*r.flash_mult)
        rise, decay = rng.uniform(*r.flash_rise_s), rng.uniform(*r.flash_decay_s)
        up = np.clip((t - start) / rise, 0.0, 1.0)
        down = np.where(t > start + rise, np.exp(-(t - start - rise) / decay), 1.0)
        mult *= 1.0 + (peak - 1.0) * up * down
    return np.asarray(r.base_rate * mult, np.float64)


def _delayed(x: npt.NDArray[np.float64], lag: int) -> npt.NDArray[np.float64]:
    """x moved `lag` seconds later with the jitter weights (zeros before the start)."""
    out = np.zeros_like(x)
    for d, w in zip((lag - 1, lag, lag + 1), JITTER, strict=True):
        out[d:] += w * x[: len(x) - d]
    return out


def _metrics(rng: np.random.Generator, arrivals: npt.NDArray[np.float64], stage: int, r: Regime) -> ComponentSeries:
    n = len(arrivals)
    cpu = r.idle_cpu + r.cpu_per_request[stage] * arrivals * np.exp(rng.normal(0.0, 0.05, n))
    nominal = 1.6 * float(cpu.mean())
    rho = np.minimum(cpu / nominal, 0.97)
    latency = r.latency_ms[stage] * (1.0 + rho / (1.0 - rho) * 0.5) * np.exp(rng.normal(0.0, 0.1, n))
    err_p = 0.001 + 0.2 * np.clip(cpu / nominal - 0.9, 0.0, None)
    errors = rng.binomial(arrivals.astype(np.int64), np.minimum(err_p, 1.0)).astype(np.float64)
    inflight = arrivals * latency / 1000.0
    memory = r.memory_mb[stage] + 2.0 * inflight + rng.normal(0.0, 1.0, n)
    return ComponentSeries(rate=arrivals, latency=latency, errors=errors, cpu=cpu, memory=memory)


def generate(spec: TraceSpec) -> Trace:
    r = spec.regime
    if min(r.lags_s) < 2 or max(r.lags_s) * 4 > spec.duration_s:
        raise ValueError(f"lags {r.lags_s} must be >= 2 s (the jitter is +-1 s) and <= a quarter of the trace")
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, _key(r.name)]))
    offered = offered_rate(spec, rng)
    arrivals = [rng.poisson(offered).astype(np.float64)]
    for k in range(2):
        mean = r.fanout[k] * _delayed(arrivals[-1], r.lags_s[k])
        arrivals.append(rng.poisson(mean).astype(np.float64))
    components = {name: _metrics(rng, a, i, r) for i, (name, a) in enumerate(zip(STAGES, arrivals, strict=True))}
    edges = [(STAGES[k], STAGES[k + 1], r.lags_s[k]) for k in range(2)]
    return Trace(spec, components, offered, edges)


def with_lags(regime: Regime, lags: tuple[int, int]) -> Regime:
    return replace(regime, lags_s=lags)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--regime", choices=sorted(REGIMES), default="diurnal")
    p.add_argument("--seed", type=int, default=20261205)
    p.add_argument("--duration", type=int, default=7200, help="seconds")
    p.add_argument("--lags", type=int, nargs=2, metavar=("AB", "BC"), help="true lags (default: the regime's)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    regime = REGIMES[args.regime]
    if args.lags:
        regime = with_lags(regime, (args.lags[0], args.lags[1]))
    if args.duration < 600:
        p.error("--duration must be at least 600 s")
    try:
        trace = generate(TraceSpec(regime, args.seed, args.duration))
    except ValueError as exc:
        p.error(str(exc))
    args.out.write_text(json.dumps(trace.to_json()))
    print(f"{trace.spec.data_version()}: {len(STAGES)} stages x {args.duration} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
