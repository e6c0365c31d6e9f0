"""Synthetic fleet telemetry with labelled drains (the generative process is described in README.md).

Deterministic: host i of a fleet is generated from SeedSequence(seed).spawn(...)[i] alone, so a host
does not change when the fleet grows and hosts can be generated one at a time (bounded memory).

    .venv/bin/python models/drain/generate.py --seed 7 --hosts 50 --days 3 --out /tmp/fleet.npz
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
from scipy.signal import lfilter

from coordinator.features import EVENTS, FIELDS, HostTrace, save_traces

GENERATOR_VERSION = "fleet-gen/1"

DAY = 86400.0
MONTH = 30 * DAY

# Public spot-interruption buckets (share of hosts, monthly interruption probability range).
PREEMPTION_BUCKETS: tuple[tuple[float, float, float], ...] = (
    (0.40, 0.00, 0.05),
    (0.20, 0.05, 0.10),
    (0.15, 0.10, 0.15),
    (0.12, 0.15, 0.20),
    (0.13, 0.20, 0.30),
)

DRAIN_KINDS = ("maintenance", "preemption", "hw_failure")

F = {name: i for i, name in enumerate(FIELDS)}
EV = {name: i for i, name in enumerate(EVENTS)}


@dataclass(frozen=True)
class FleetSpec:
    seed: int = 20251123
    n_hosts: int = 500
    days: float = 28.0
    step_s: float = 60.0
    start: float = 1_750_000_020.0
    maintenance_per_month: float = 1.5
    """Mean planned-maintenance drains per host-month (each host draws its own rate around it)."""
    hw_failures_per_month: float = 0.08
    """Far above real fleets, so the model sees enough failures to learn from."""
    false_degradations_per_month: float = 0.15
    cancelled_notices_per_month: float = 0.15
    load_bursts_per_day: float = 1.0
    outages_per_month: float = 2.0

    @property
    def end(self) -> float:
        return self.start + self.days * DAY

    def data_version(self) -> str:
        return f"{GENERATOR_VERSION} seed={self.seed} hosts={self.n_hosts} days={self.days:g} step={self.step_s:g}s"


@dataclass
class GeneratedHost:
    trace: HostTrace
    drain_kinds: list[str]
    preemption_rate: float
    """Monthly interruption probability the host was given."""
    episodes: list[tuple[str, float]] = field(default_factory=list)
    """Non-drain episodes (kind, time): decoys the model should not alarm on."""


def _poisson_times(rng: np.random.Generator, rate_per_s: float, start: float, end: float) -> list[float]:
    n = rng.poisson(max(rate_per_s, 0.0) * (end - start))
    return sorted(rng.uniform(start, end, n).tolist())


def _ramp(t: npt.NDArray[np.float64], begin: float, end: float) -> npt.NDArray[np.float64]:
    """0 before `begin`, rising linearly to 1 at `end`, 1 after (callers cut it at the drain)."""
    return np.clip((t - begin) / max(end - begin, 1.0), 0.0, 1.0) * (t >= begin)


def _smooth_noise(rng: np.random.Generator, n: int, rho: float, sd: float) -> npt.NDArray[np.float64]:
    """AR(1) noise with stationary standard deviation `sd`."""
    eps = rng.normal(0.0, sd * math.sqrt(1 - rho * rho), n)
    out: npt.NDArray[np.float64] = lfilter([1.0], [1.0, -rho], eps)
    return out


def generate_host(spec: FleetSpec, index: int) -> GeneratedHost:
    seq = np.random.SeedSequence([spec.seed, index])
    rng = np.random.default_rng(seq)
    t = (spec.start + np.arange(int(spec.days * DAY / spec.step_s)) * spec.step_s).astype(np.float64)
    n = t.size
    dt = spec.step_s

    # --- which drains happen, in time order; a drained host is down for a while -------------------
    shares = np.array([b[0] for b in PREEMPTION_BUCKETS])
    bucket = PREEMPTION_BUCKETS[int(rng.choice(len(PREEMPTION_BUCKETS), p=shares / shares.sum()))]
    p_month = rng.uniform(bucket[1], bucket[2])
    preempt_rate = -math.log(1.0 - p_month) / MONTH
    maint_rate = spec.maintenance_per_month * rng.uniform(0.5, 1.5) / MONTH
    hw_rate = spec.hw_failures_per_month * rng.uniform(0.3, 2.0) / MONTH
    candidates = sorted(
        [(s, "maintenance") for s in _poisson_times(rng, maint_rate, spec.start + 3 * 3600, spec.end)]
        + [(s, "preemption") for s in _poisson_times(rng, preempt_rate, spec.start + 3 * 3600, spec.end)]
        + [(s, "hw_failure") for s in _poisson_times(rng, hw_rate, spec.start + 9 * 3600, spec.end)]
    )
    drains: list[tuple[float, str]] = []
    down = np.zeros(n, bool)
    busy_until = spec.start
    for when, kind in candidates:
        # a drain needs the host up, with its precursor window after the previous recovery
        if when < busy_until + 3 * 3600:
            continue
        drains.append((when, kind))
        outage = {
            "maintenance": rng.uniform(1800, 4 * 3600),
            "preemption": rng.uniform(300, 3600),
            "hw_failure": rng.uniform(4 * 3600, 24 * 3600),
        }[kind]
        down |= (t > when) & (t <= when + outage)
        busy_until = when + outage

    # --- a quiet host: diurnal load, slow noise --------------------------------------------------
    level = rng.uniform(0.15, 0.55)
    amp = rng.uniform(0.05, 0.25)
    phase = rng.uniform(0, 2 * math.pi)
    cpu = level + amp * np.sin(2 * math.pi * t / DAY + phase) + _smooth_noise(rng, n, 0.97, 0.05)
    cpu += rng.normal(0, 0.02, n)
    mem = rng.uniform(0.3, 0.8) - 0.4 * (cpu - level) + _smooth_noise(rng, n, 0.995, 0.04)
    disk = np.exp(rng.normal(17.0, 1.0)) * (0.4 + cpu) * np.exp(rng.normal(0, 0.25, n))
    net = np.exp(rng.normal(16.0, 1.0)) * (0.4 + cpu) * np.exp(rng.normal(0, 0.25, n))
    psi_extra_mem = np.zeros(n)
    psi_extra_io = np.zeros(n)
    hw_rate_min = np.full(n, 1.0 / (14 * 1440.0))  # correctable errors now and then
    drop_p = np.full(n, rng.uniform(0.002, 0.03))
    events = np.zeros((n, len(EVENTS)), np.float32)

    def at(when: float) -> int:
        return min(max(round((when - spec.start) / dt), 0), n - 1)

    # batch-job bursts look like a cordon ramp but lead to nothing
    episodes: list[tuple[str, float]] = []
    for when in _poisson_times(rng, spec.load_bursts_per_day / DAY, spec.start, spec.end):
        width = rng.uniform(600, 2400)
        bump = rng.uniform(0.1, 0.35) * (_ramp(t, when, when + width) - _ramp(t, when + width, when + 2 * width))
        cpu += bump
        disk *= 1 + 2 * bump
        episodes.append(("load_burst", when))

    def degrade(begin: float, end: float, peak: float, errors: float) -> npt.NDArray[np.float64]:
        r = _ramp(t, begin, end) * (t <= end)
        psi_extra_mem[:] += peak * r**2
        psi_extra_io[:] += peak * 1.3 * r**2
        hw_rate_min[:] += errors * r**2
        drop_p[:] += 0.15 * r**2
        return r

    for when in _poisson_times(rng, spec.false_degradations_per_month / MONTH, spec.start, spec.end):
        length = rng.uniform(3600, 6 * 3600)
        degrade(when, when + length, rng.uniform(3, 15), rng.uniform(0.02, 0.1))
        episodes.append(("false_degradation", when))
    for when in _poisson_times(rng, spec.cancelled_notices_per_month / MONTH, spec.start, spec.end):
        events[at(when), EV["maintenance"]] += 1
        episodes.append(("cancelled_notice", when))

    # --- precursors of the real drains --------------------------------------------------------------
    for when, kind in drains:
        if kind == "maintenance":
            if rng.random() < 0.85:
                events[at(when - rng.uniform(10 * 60, 90 * 60)), EV["maintenance"]] += 1
            if rng.random() < 0.8:
                events[at(when - rng.uniform(3 * 60, 25 * 60)), EV["drain_notice"]] += 1
            if rng.random() < 0.8:  # cordoned: neighbours' work lands here, evacuation traffic
                r = _ramp(t, when - rng.uniform(10 * 60, 40 * 60), when) * (t <= when)
                cpu += rng.uniform(0.1, 0.35) * r
                disk *= 1 + rng.uniform(1, 4) * r
                net *= 1 + rng.uniform(1, 4) * r
        elif kind == "preemption":
            if rng.random() < 0.6:  # the two-minute warning
                events[at(when - rng.uniform(30, 120)), EV["preemption_signal"]] += 1
            if rng.random() < 0.3:  # an earlier rebalance recommendation
                events[at(when - rng.uniform(5 * 60, 30 * 60)), EV["preemption_signal"]] += 1
        else:
            begin = when - rng.uniform(3600, 8 * 3600)
            degrade(begin, when, rng.uniform(10, 40), rng.uniform(0.1, 0.5))
            mem -= 0.15 * _ramp(t, begin, when) * (t <= when)

    # --- derived readings ---------------------------------------------------------------------------
    cpu = np.clip(cpu, 0.0, 1.0)
    mem = np.clip(mem, 0.01, 0.98)
    load1 = np.clip(cpu * rng.uniform(0.8, 1.5) + rng.normal(0, 0.05, n), 0.0, None)
    psi_cpu = 100 * np.clip(cpu - 0.6, 0, None) ** 1.5 + np.abs(rng.normal(0, 0.3, n))
    psi_mem_some = 40 * np.clip(0.15 - mem, 0, None) / 0.15 + psi_extra_mem + np.abs(rng.normal(0, 0.2, n))
    psi_mem_full = 0.4 * psi_mem_some * rng.uniform(0.5, 1.0)
    psi_io_some = 2 * np.log1p(disk / 5e7) + psi_extra_io + np.abs(rng.normal(0, 0.3, n))
    psi_io_full = 0.5 * psi_io_some * rng.uniform(0.3, 1.0)
    events[:, EV["hw_errors"]] += rng.poisson(hw_rate_min * dt / 60.0)
    events[:, EV["oom_kills"]] += rng.poisson(np.where(mem < 0.05, 0.05, 1.0 / (30 * 1440)) * dt / 60.0)

    values = np.stack(
        [cpu, load1, mem, psi_cpu, psi_mem_some, psi_mem_full, psi_io_some, psi_io_full, disk, net], axis=1
    ).astype(np.float32)
    psi_cols = [F[f] for f in FIELDS if f.startswith("psi_")]
    if rng.random() < 0.05:  # an old kernel without /proc/pressure
        values[:, psi_cols] = np.nan
    values[rng.random(values.shape) < 0.01] = np.nan

    # --- samples that never arrive: random drops, telemetry outages, the host being down -----------
    keep = (rng.random(n) >= np.clip(drop_p, 0, 0.9)) & ~down
    for when in _poisson_times(rng, spec.outages_per_month / MONTH, spec.start, spec.end):
        keep &= ~((t >= when) & (t < when + rng.uniform(300, 3600)))
    ts = t + rng.uniform(0, 3, n)  # sampling jitter, never crossing into the next minute
    drain_times = np.array([w for w, _ in drains], np.float64)
    trace = HostTrace(f"h{index:05d}", ts[keep], values[keep], events[keep], drain_times)
    return GeneratedHost(trace, [k for _, k in drains], p_month, episodes)


def generate_fleet(spec: FleetSpec) -> Iterator[GeneratedHost]:
    for i in range(spec.n_hosts):
        yield generate_host(spec, i)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=FleetSpec.seed)
    p.add_argument("--hosts", type=int, default=50)
    p.add_argument("--days", type=float, default=3.0)
    p.add_argument("--out", type=Path, required=True, help=".npz of traces (coordinator.features.load_traces)")
    args = p.parse_args(argv)
    spec = FleetSpec(seed=args.seed, n_hosts=args.hosts, days=args.days)
    hosts = list(generate_fleet(spec))
    save_traces(args.out, [h.trace for h in hosts])
    kinds = [k for h in hosts for k in h.drain_kinds]
    print(f"{spec.data_version()}: {len(kinds)} drains " + ", ".join(f"{k}={kinds.count(k)}" for k in DRAIN_KINDS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
