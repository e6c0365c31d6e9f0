"""Synthetic fleet telemetry with labelled drains, from several generator families (README.md).

A model trained on one generator learns that generator: its exact announcement count, its ramp
shape. Each `Family` here describes a differently behaved fleet (precursor shapes, strengths and
timings, benign look-alikes, fleet-wide load waves, host sizes, sampling periods and loss), and every
host draws its own parameters from the family's wide ranges. Training leaves one family out and is
judged on it (models/drain/train.py).

Deterministic: host i of a fleet is generated from SeedSequence([seed, i]) (plus the family) alone, so
a host does not change when the fleet grows; fleet-wide load waves come from the seed alone.

    .venv/bin/python models/drain/generate.py --family chatty --seed 7 --hosts 50 --days 3 --out /tmp/fleet.npz
"""

from __future__ import annotations

import argparse
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
from scipy.signal import lfilter

from coordinator.features import EVENTS, FIELDS, HostTrace, save_traces

GENERATOR_VERSION = "fleet-gen/2"

DAY = 86400.0
MONTH = 30 * DAY
DETECTABLE_LEAD_S = 180.0
"""A drain counts as having a precursor when one starts at least this long before it (the bench's
"flagged at least 2 minutes ahead" needs a minute of binning on top)."""

# Public spot-interruption buckets (share of hosts, monthly interruption probability range).
PREEMPTION_BUCKETS: tuple[tuple[float, float, float], ...] = (
    (0.40, 0.00, 0.05),
    (0.20, 0.05, 0.10),
    (0.15, 0.10, 0.15),
    (0.12, 0.15, 0.20),
    (0.13, 0.20, 0.30),
)

DRAIN_KINDS = ("maintenance", "preemption", "hw_failure")
SHAPES = ("linear", "step", "exp", "sigmoid", "sqrt", "quad")

F = {name: i for i, name in enumerate(FIELDS)}
EV = {name: i for i, name in enumerate(EVENTS)}

Range = tuple[float, float]


@dataclass(frozen=True)
class Family:
    """How a kind of fleet behaves. Ranges are drawn per host (per drain for precursors)."""

    name: str
    step_s: Range = (60.0, 60.0)
    """Sampling period, seconds (log-uniform)."""
    loss: Range = (0.002, 0.03)
    """Per-host share of samples that never arrive."""
    log_throughput: Range = (16.0, 18.0)
    """Mean log(bytes/s) of disk traffic: the host's size."""
    maintenance_scale: float = 1.0
    preemption_scale: float = 1.0
    hw_scale: float = 1.0
    # maintenance precursors
    announce_p: float = 0.85
    announce_repeats: tuple[int, int] = (1, 1)
    announce_lead_min: Range = (10.0, 90.0)
    second_notice_p: float = 0.8
    """A drain_notice shortly before (3-25 min), as a provider's final notice."""
    stated_time_p: float = 0.0
    """Share of final notices that state the drain time (a fact for the coordinator)."""
    ramp_p: float = 0.8
    ramp_shapes: tuple[str, ...] = ("linear",)
    ramp_strength: Range = (0.1, 0.35)
    ramp_lead_min: Range = (10.0, 40.0)
    # hardware failures
    degrade_lead_h: Range = (1.0, 8.0)
    degrade_shapes: tuple[str, ...] = ("quad",)
    degrade_peak: Range = (10.0, 40.0)
    error_rate: Range = (0.1, 0.5)
    """hw_errors per minute at the failure."""
    # pre-emptions
    warning_p: float = 0.6
    warning_stated_p: float = 0.0
    """Share of two-minute warnings that state the time (spot instance-action)."""
    rebalance_p: float = 0.3
    # decoys and background
    bursts_per_day: Range = (0.5, 1.5)
    burst_strength: Range = (0.1, 0.35)
    burst_shapes: tuple[str, ...] = ("linear",)
    waves_per_day: float = 0.0
    """Fleet-wide load waves (every host at once: a deploy, a batch window)."""
    wave_strength: Range = (0.1, 0.3)
    decoy_announcements_per_month: float = 0.15
    decoy_repeats: tuple[int, int] = (1, 1)
    false_degradations_per_month: float = 0.15
    error_bursts_per_month: float = 0.0
    """Benign bursts of correctable errors (a noisy DIMM that does not fail)."""


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        # The original generator (fleet-gen/1): one announcement, linear ramps, quadratic failures.
        Family("classic"),
        # Providers that repeat their notices, fast sampling, sigmoid/step cordons, fleet-wide waves.
        Family(
            "chatty",
            step_s=(15.0, 30.0),
            loss=(0.01, 0.05),
            log_throughput=(15.0, 20.0),
            announce_p=0.9,
            announce_repeats=(3, 15),
            announce_lead_min=(20.0, 100.0),
            stated_time_p=0.3,
            ramp_shapes=("sigmoid", "step"),
            ramp_strength=(0.05, 0.4),
            ramp_lead_min=(5.0, 60.0),
            degrade_lead_h=(0.5, 4.0),
            degrade_shapes=("exp", "sigmoid"),
            bursts_per_day=(1.0, 3.0),
            burst_shapes=("sigmoid", "step"),
            waves_per_day=2.0,
            decoy_announcements_per_month=0.5,
            decoy_repeats=(3, 10),
        ),
        # Weak, slow precursors on coarsely sampled, lossy hosts with many benign look-alikes.
        Family(
            "subtle",
            step_s=(60.0, 120.0),
            loss=(0.03, 0.10),
            log_throughput=(14.0, 19.0),
            announce_p=0.5,
            announce_repeats=(1, 3),
            second_notice_p=0.5,
            stated_time_p=0.1,
            ramp_p=0.9,
            ramp_shapes=("step", "sqrt", "exp"),
            ramp_strength=(0.05, 0.2),
            ramp_lead_min=(15.0, 60.0),
            degrade_lead_h=(2.0, 12.0),
            degrade_shapes=("linear", "step", "sqrt"),
            degrade_peak=(5.0, 20.0),
            error_rate=(0.03, 0.2),
            bursts_per_day=(2.0, 4.0),
            burst_strength=(0.1, 0.4),
            burst_shapes=("step", "sqrt", "linear"),
            waves_per_day=1.0,
            false_degradations_per_month=0.4,
            error_bursts_per_month=1.0,
        ),
        # A cloud fleet: mostly pre-emptions and provider terminations, many with a stated time.
        Family(
            "cloud",
            step_s=(15.0, 60.0),
            loss=(0.005, 0.05),
            log_throughput=(15.0, 19.0),
            maintenance_scale=0.5,
            preemption_scale=3.0,
            hw_scale=0.7,
            announce_p=0.7,
            announce_repeats=(1, 4),
            stated_time_p=0.6,
            ramp_p=0.4,
            ramp_shapes=("linear", "quad"),
            degrade_shapes=("step", "linear"),
            error_rate=(0.05, 1.0),
            warning_p=0.9,
            warning_stated_p=0.8,
            rebalance_p=0.6,
            waves_per_day=0.5,
            decoy_announcements_per_month=0.3,
            decoy_repeats=(1, 2),
            error_bursts_per_month=0.5,
        ),
    )
}


@dataclass(frozen=True)
class FleetSpec:
    seed: int = 20251123
    n_hosts: int = 500
    days: float = 28.0
    step_s: float = 60.0
    """The classic family's sampling period; other families draw their own."""
    start: float = 1_750_000_020.0
    maintenance_per_month: float = 1.5
    """Mean planned-maintenance drains per host-month (each host draws its own rate around it)."""
    hw_failures_per_month: float = 0.08
    """Far above real fleets, so the model sees enough failures to learn from."""
    false_degradations_per_month: float = 0.15
    cancelled_notices_per_month: float = 0.15
    load_bursts_per_day: float = 1.0
    outages_per_month: float = 2.0
    family: str = "classic"

    @property
    def end(self) -> float:
        return self.start + self.days * DAY

    def data_version(self) -> str:
        return f"{GENERATOR_VERSION} family={self.family} seed={self.seed} hosts={self.n_hosts} days={self.days:g}" + (
            f" step={self.step_s:g}s" if self.family == "classic" else ""
        )


@dataclass
class GeneratedHost:
    trace: HostTrace
    drain_kinds: list[str]
    preemption_rate: float
    """Monthly interruption probability the host was given."""
    episodes: list[tuple[str, float]] = field(default_factory=list)
    """Non-drain episodes (kind, time): decoys the model should not alarm on."""
    precursor: list[bool] = field(default_factory=list)
    """Per drain: whether any precursor or notice started at least DETECTABLE_LEAD_S before it."""
    family: str = "classic"


def _poisson_times(rng: np.random.Generator, rate_per_s: float, start: float, end: float) -> list[float]:
    n = rng.poisson(max(rate_per_s, 0.0) * (end - start))
    return sorted(rng.uniform(start, end, n).tolist())


def _shape(
    rng: np.random.Generator, kind: str, t: npt.NDArray[np.float64], begin: float, end: float
) -> npt.NDArray[np.float64]:
    """0 before `begin`, rising to 1 at `end` along `kind`, 1 after (callers cut it where needed)."""
    u = np.clip((t - begin) / max(end - begin, 1.0), 0.0, 1.0) * (t >= begin)
    if kind == "step":
        return (u >= rng.uniform(0.2, 0.9)).astype(np.float64)
    if kind == "exp":
        k = rng.uniform(2.0, 6.0)
        out: npt.NDArray[np.float64] = np.expm1(k * u) / math.expm1(k)
        return out
    if kind == "sigmoid":
        c, w = rng.uniform(0.3, 0.7), rng.uniform(0.05, 0.2)
        lo, hi = 1 / (1 + math.exp(c / w)), 1 / (1 + math.exp(-(1 - c) / w))
        return np.clip((1 / (1 + np.exp(-(u - c) / w)) - lo) / (hi - lo), 0.0, 1.0) * (t >= begin)
    if kind == "sqrt":
        return np.sqrt(u)
    if kind == "quad":
        return u**2
    return u


def _smooth_noise(rng: np.random.Generator, n: int, rho: float, sd: float) -> npt.NDArray[np.float64]:
    """AR(1) noise with stationary standard deviation `sd`."""
    eps = rng.normal(0.0, sd * math.sqrt(1 - rho * rho), n)
    out: npt.NDArray[np.float64] = lfilter([1.0], [1.0, -rho], eps)
    return out


def _family_key(name: str) -> int:
    return zlib.crc32(name.encode())


def fleet_waves(spec: FleetSpec, family: Family) -> list[tuple[float, float, float, str]]:
    """(start, width, strength, shape) of the fleet-wide load waves: the same for every host."""
    rng = np.random.default_rng([spec.seed, _family_key(family.name), 1 << 30])
    out = []
    for when in _poisson_times(rng, family.waves_per_day / DAY, spec.start, spec.end):
        out.append((when, rng.uniform(600, 3600), rng.uniform(*family.wave_strength), str(rng.choice(SHAPES))))
    return out


def generate_host(
    spec: FleetSpec, index: int, waves: list[tuple[float, float, float, str]] | None = None
) -> GeneratedHost:
    fam = FAMILIES[spec.family]
    key = [spec.seed, index] if fam.name == "classic" else [spec.seed, index, _family_key(fam.name)]
    rng = np.random.default_rng(np.random.SeedSequence(key))
    step = spec.step_s if fam.name == "classic" else float(np.exp(rng.uniform(*np.log(fam.step_s))))
    t = (spec.start + np.arange(int(spec.days * DAY / step)) * step).astype(np.float64)
    n = t.size
    waves = fleet_waves(spec, fam) if waves is None else waves

    # --- which drains happen, in time order; a drained host is down for a while -------------------
    shares = np.array([b[0] for b in PREEMPTION_BUCKETS])
    bucket = PREEMPTION_BUCKETS[int(rng.choice(len(PREEMPTION_BUCKETS), p=shares / shares.sum()))]
    p_month = min(rng.uniform(bucket[1], bucket[2]) * fam.preemption_scale, 0.9)
    preempt_rate = -math.log(1.0 - p_month) / MONTH
    maint_rate = spec.maintenance_per_month * fam.maintenance_scale * rng.uniform(0.5, 1.5) / MONTH
    hw_rate = spec.hw_failures_per_month * fam.hw_scale * rng.uniform(0.3, 2.0) / MONTH
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
    level = rng.uniform(0.1, 0.6)
    amp = rng.uniform(0.03, 0.25)
    phase = rng.uniform(0, 2 * math.pi)
    cpu = level + amp * np.sin(2 * math.pi * t / DAY + phase) + _smooth_noise(rng, n, 0.97, rng.uniform(0.02, 0.08))
    cpu += rng.normal(0, rng.uniform(0.01, 0.04), n)
    mem = rng.uniform(0.3, 0.8) - 0.4 * (cpu - level) + _smooth_noise(rng, n, 0.995, 0.04)
    log_size = rng.uniform(*fam.log_throughput)
    disk = np.exp(rng.normal(log_size, 0.5)) * (0.4 + cpu) * np.exp(rng.normal(0, rng.uniform(0.15, 0.4), n))
    net = np.exp(rng.normal(log_size - 1, 0.7)) * (0.4 + cpu) * np.exp(rng.normal(0, rng.uniform(0.15, 0.4), n))
    psi_extra_mem = np.zeros(n)
    psi_extra_io = np.zeros(n)
    hw_rate_min = np.full(n, 1.0 / (rng.uniform(5, 30) * 1440.0))  # correctable errors now and then
    drop_p = np.full(n, rng.uniform(*fam.loss))
    events = np.zeros((n, len(EVENTS)), np.float32)
    notices: list[tuple[float, float]] = []

    def at(when: float) -> int:
        return min(max(round((when - spec.start) / step), 0), n - 1)

    def announce(kind: str, first: float, last: float, repeats: tuple[int, int]) -> None:
        times = [first] if repeats[1] <= 1 else np.linspace(first, last, int(rng.integers(repeats[0], repeats[1] + 1)))
        for when in times:
            events[at(float(when)), EV[kind]] += 1

    # --- benign look-alikes --------------------------------------------------------------------
    episodes: list[tuple[str, float]] = []
    bursts = rng.uniform(*fam.bursts_per_day) * spec.load_bursts_per_day
    for when in _poisson_times(rng, bursts / DAY, spec.start, spec.end):
        width = rng.uniform(600, 2400)
        shape = str(rng.choice(fam.burst_shapes))
        bump = rng.uniform(*fam.burst_strength) * (
            _shape(rng, shape, t, when, when + width) - _shape(rng, "linear", t, when + width, when + 2 * width)
        )
        cpu += bump
        disk *= 1 + rng.uniform(1, 4) * bump
        net *= 1 + rng.uniform(0, 3) * bump
        episodes.append(("load_burst", when))
    for when, width, strength, shape in waves:
        bump = strength * (
            _shape(rng, shape, t, when, when + width) - _shape(rng, "linear", t, when + width, when + 2 * width)
        )
        cpu += bump
        disk *= 1 + 2 * bump
        net *= 1 + 2 * bump
        episodes.append(("fleet_wave", when))

    def degrade(begin: float, end: float, peak: float, errors: float, shape: str) -> npt.NDArray[np.float64]:
        r = _shape(rng, shape, t, begin, end) * (t <= end)
        psi_extra_mem[:] += peak * r
        psi_extra_io[:] += peak * rng.uniform(0.8, 1.6) * r
        hw_rate_min[:] += errors * r
        drop_p[:] += rng.uniform(0.0, 0.2) * r
        return r

    scale = spec.false_degradations_per_month / 0.15
    for when in _poisson_times(rng, fam.false_degradations_per_month * scale / MONTH, spec.start, spec.end):
        length = rng.uniform(3600, 6 * 3600)
        peak = rng.uniform(3, 15)
        degrade(when, when + length, peak, rng.uniform(0.02, 0.1), str(rng.choice(fam.degrade_shapes)))
        episodes.append(("false_degradation", when))
    scale = spec.cancelled_notices_per_month / 0.15
    for when in _poisson_times(rng, fam.decoy_announcements_per_month * scale / MONTH, spec.start, spec.end):
        announce("maintenance", when, when + rng.uniform(600, 3600), fam.decoy_repeats)
        episodes.append(("cancelled_notice", when))
    for when in _poisson_times(rng, fam.error_bursts_per_month / MONTH, spec.start, spec.end):
        width = rng.uniform(600, 3 * 3600)
        hw_rate_min[:] += rng.uniform(0.05, 0.5) * ((t >= when) & (t < when + width))
        episodes.append(("error_burst", when))

    # --- precursors of the real drains --------------------------------------------------------------
    precursor: list[bool] = []
    for when, kind in drains:
        leads: list[float] = []
        if kind == "maintenance":
            if rng.random() < fam.announce_p:
                lead = rng.uniform(*fam.announce_lead_min) * 60
                announce(
                    "maintenance", when - lead, when - rng.uniform(3 * 60, min(lead, 25 * 60)), fam.announce_repeats
                )
                leads.append(lead)
            if rng.random() < fam.second_notice_p:
                lead = rng.uniform(3 * 60, 25 * 60)
                events[at(when - lead), EV["drain_notice"]] += 1
                if rng.random() < fam.stated_time_p:
                    notices.append((when - lead, when - rng.uniform(0, 120)))
                leads.append(lead)
            if rng.random() < fam.ramp_p:  # cordoned: neighbours' work lands here, evacuation traffic
                lead = rng.uniform(*fam.ramp_lead_min) * 60
                r = _shape(rng, str(rng.choice(fam.ramp_shapes)), t, when - lead, when) * (t <= when)
                cpu += rng.uniform(*fam.ramp_strength) * r
                disk *= 1 + rng.uniform(1, 4) * r
                net *= 1 + rng.uniform(1, 4) * r
                leads.append(lead * 0.5)  # a ramp is visible some way into it
        elif kind == "preemption":
            if rng.random() < fam.warning_p:  # the two-minute warning (30 s to 5 min)
                lead = rng.uniform(30, 300)
                events[at(when - lead), EV["preemption_signal"]] += 1
                if rng.random() < fam.warning_stated_p:
                    notices.append((when - lead, when - rng.uniform(0, 30)))
                leads.append(lead)
            if rng.random() < fam.rebalance_p:  # an earlier rebalance recommendation (no time stated)
                lead = rng.uniform(5 * 60, 30 * 60)
                events[at(when - lead), EV["preemption_signal"]] += 1
                leads.append(lead)
        else:
            lead = rng.uniform(*fam.degrade_lead_h) * 3600
            r = degrade(
                when - lead,
                when,
                rng.uniform(*fam.degrade_peak),
                rng.uniform(*fam.error_rate),
                str(rng.choice(fam.degrade_shapes)),
            )
            mem -= rng.uniform(0.0, 0.2) * r
            leads.append(lead * 0.3)
        precursor.append(any(lead >= DETECTABLE_LEAD_S for lead in leads))

    # --- derived readings ---------------------------------------------------------------------------
    cpu = np.clip(cpu, 0.0, 1.0)
    mem = np.clip(mem, 0.01, 0.98)
    load1 = np.clip(cpu * rng.uniform(0.6, 1.8) + rng.normal(0, 0.05, n), 0.0, None)
    psi_cpu = 100 * np.clip(cpu - rng.uniform(0.5, 0.7), 0, None) ** 1.5 + np.abs(rng.normal(0, 0.3, n))
    psi_mem_some = 40 * np.clip(0.15 - mem, 0, None) / 0.15 + psi_extra_mem + np.abs(rng.normal(0, 0.2, n))
    psi_mem_full = 0.4 * psi_mem_some * rng.uniform(0.5, 1.0)
    psi_io_some = 2 * np.log1p(disk / np.exp(log_size + 1)) + psi_extra_io + np.abs(rng.normal(0, 0.3, n))
    psi_io_full = 0.5 * psi_io_some * rng.uniform(0.3, 1.0)
    events[:, EV["hw_errors"]] += rng.poisson(hw_rate_min * step / 60.0)
    events[:, EV["oom_kills"]] += rng.poisson(np.where(mem < 0.05, 0.05, 1.0 / (30 * 1440)) * step / 60.0)

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
    ts = t + rng.uniform(0, min(3.0, step / 2), n)  # sampling jitter
    drain_times = np.array([w for w, _ in drains], np.float64)
    stated = np.array(notices, np.float64).reshape(-1, 2)
    trace = HostTrace(f"{fam.name[:2]}{index:05d}", ts[keep], values[keep], events[keep], drain_times, stated)
    return GeneratedHost(trace, [k for _, k in drains], p_month, episodes, precursor, fam.name)


def generate_fleet(spec: FleetSpec) -> Iterator[GeneratedHost]:
    waves = fleet_waves(spec, FAMILIES[spec.family])
    for i in range(spec.n_hosts):
        yield generate_host(spec, i, waves)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=FleetSpec.seed)
    p.add_argument("--hosts", type=int, default=50)
    p.add_argument("--days", type=float, default=3.0)
    p.add_argument("--family", choices=sorted(FAMILIES), default="classic")
    p.add_argument("--out", type=Path, required=True, help=".npz of traces (coordinator.features.load_traces)")
    args = p.parse_args(argv)
    spec = FleetSpec(seed=args.seed, n_hosts=args.hosts, days=args.days, family=args.family)
    hosts = list(generate_fleet(spec))
    save_traces(args.out, [h.trace for h in hosts])
    kinds = [k for h in hosts for k in h.drain_kinds]
    print(f"{spec.data_version()}: {len(kinds)} drains " + ", ".join(f"{k}={kinds.count(k)}" for k in DRAIN_KINDS))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
