"""Synthetic histories of chains, for the chain usage model (version `chain-gen/2`).

A chain runs again and again; in each run its stages serve one after another. Per run r of a chain
(README.md says it at length):

1. **Request rate** R_r: the chain's base rate x a slow trend (growth per run) x a wave (a period of
   runs) x log-normal run-to-run noise; at each run, with probability `shift_p`, the base rate moves
   to 0.5-2x where it was (a new customer, a lost one) and stays there.
2. **Data volume** V_r (the state handed into the first stage): proportional to R_r^`volume_exp`,
   with log-normal noise of its own. Each stage hands on its input volume x its own factor.
3. **Each stage's measured peak**: CPU (millicores) = idle + per-request cost x R_r x (1 + volume
   weight x its volume over the chain's typical volume), and memory (bytes) = a floor + bytes per
   input byte x its volume + bytes per request x R_r, each with a few percent of noise.
4. **Each stage's measured request rate**: R_r, as the stage counted it (a few percent of noise,
   `rate_measure_noise`), drawn from a stream of its own so that the usage and volume histories
   are those of `chain-gen/1` exactly.

So a stage's usage changes between runs as the rate and the volume change; it shows first in the
stage serving before it, which is what the model can use and the "same as last run" baseline cannot.
Deterministic: everything is drawn from `SeedSequence([seed, regime key, chain index])`.

    .venv/bin/python -m models.chains.generate --regime shifty --seed 7 --chains 2 --out /tmp/h.json
"""

from __future__ import annotations

import argparse
import json
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from coordinator.chains.usage import ChainRun, StageUsage

GENERATOR_VERSION = "chain-gen/2"
MIB = 1 << 20


@dataclass(frozen=True)
class Regime:
    """How a family of chains behaves run to run. Training and evaluation use different regimes."""

    name: str
    runs: int = 80
    stages: tuple[int, int] = (3, 5)
    """Stages per chain, inclusive."""
    base_rate: tuple[float, float] = (20.0, 400.0)
    """Requests/s, drawn log-uniformly per chain."""
    growth_per_run: tuple[float, float] = (-0.002, 0.01)
    wave_period: tuple[float, float] = (7.0, 30.0)
    """Runs per cycle of the wave (a weekly pattern of daily runs, say)."""
    wave_amp: tuple[float, float] = (0.0, 0.4)
    rate_noise: float = 0.15
    shift_p: float = 0.05
    volume_exp: float = 0.8
    volume_noise: float = 0.2
    volume_mib: tuple[float, float] = (4.0, 512.0)
    """The first stage's typical input volume, drawn log-uniformly per chain."""
    usage_noise: float = 0.04
    rate_measure_noise: float = 0.03


REGIMES = {
    "steady": Regime("steady", shift_p=0.02, rate_noise=0.08, volume_noise=0.1),
    "drifting": Regime("drifting", growth_per_run=(0.0, 0.03), shift_p=0.06, rate_noise=0.2),
    "shifty": Regime("shifty", shift_p=0.12, rate_noise=0.25, volume_noise=0.3, wave_amp=(0.1, 0.6)),
}
"""`steady` and `drifting` train the model; `shifty` (more and larger changes) is held out."""


def _loguniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(np.exp(rng.uniform(np.log(bounds[0]), np.log(bounds[1]))))


def chain_history(regime: Regime, seed: int, index: int) -> list[ChainRun]:
    """Every run of chain `index` of the regime, oldest first."""
    key = zlib.crc32(regime.name.encode())
    rng = np.random.default_rng(np.random.SeedSequence([seed, key, index]))
    measure = np.random.default_rng(np.random.SeedSequence([seed, key, index, 1]))  # the measured rates
    n_stages = int(rng.integers(regime.stages[0], regime.stages[1] + 1))
    names = [f"s{i}" for i in range(n_stages)]
    base = _loguniform(rng, regime.base_rate)
    growth = rng.uniform(*regime.growth_per_run)
    period = rng.uniform(*regime.wave_period)
    amp = rng.uniform(*regime.wave_amp)
    phase = rng.uniform(0, 2 * np.pi)
    volume0 = _loguniform(rng, regime.volume_mib) * MIB
    idle = rng.uniform(20, 200, n_stages)
    per_request = np.exp(rng.uniform(np.log(0.5), np.log(8.0), n_stages))  # millicores per request/s
    volume_weight = rng.uniform(0.0, 1.5, n_stages)
    floor = np.exp(rng.uniform(np.log(16 * MIB), np.log(256 * MIB), n_stages))
    per_byte = rng.uniform(0.2, 3.0, n_stages)
    per_request_bytes = rng.uniform(0.05, 2.0, n_stages) * MIB
    hand_on = rng.uniform(0.3, 1.6, n_stages)
    runs: list[ChainRun] = []
    for r in range(regime.runs):
        if rng.random() < regime.shift_p:
            base *= float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
        wave = 1 + amp * np.sin(2 * np.pi * r / period + phase)
        rate = base * (1 + growth) ** r * wave * float(np.exp(rng.normal(0, regime.rate_noise)))
        volume = volume0 * (rate / base) ** regime.volume_exp * float(np.exp(rng.normal(0, regime.volume_noise)))
        usage: dict[str, StageUsage] = {}
        volumes: dict[str, float] = {}
        rates: dict[str, float] = {}
        for i, name in enumerate(names):
            volumes[name] = volume
            rates[name] = round(rate * float(np.exp(measure.normal(0, regime.rate_measure_noise))), 2)
            noise = np.exp(rng.normal(0, regime.usage_noise, 2))
            cpu = (idle[i] + per_request[i] * rate * (1 + volume_weight[i] * volume / volume0)) * noise[0]
            memory = (floor[i] + per_byte[i] * volume + per_request_bytes[i] * rate) * noise[1]
            usage[name] = StageUsage(round(float(cpu), 1), float(round(memory)))
            volume *= hand_on[i]
        runs.append(ChainRun(usage, volumes, rates))
    return runs


def histories(regime: Regime, seed: int, chains: int) -> list[list[ChainRun]]:
    return [chain_history(regime, seed, i) for i in range(chains)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--regime", choices=sorted(REGIMES), default="steady")
    p.add_argument("--seed", type=int, default=20261206)
    p.add_argument("--chains", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    regime = REGIMES[args.regime]
    out = {
        "generator": GENERATOR_VERSION,
        "regime": asdict(regime),
        "seed": args.seed,
        "chains": [
            [
                {
                    "usage": {k: asdict(v) for k, v in run.usage.items()},
                    "volume_bytes": dict(run.volume_bytes),
                    "request_rate": dict(run.request_rate),
                }
                for run in h
            ]
            for h in histories(regime, args.seed, args.chains)
        ],
    }
    args.out.write_text(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
