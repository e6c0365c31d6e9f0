"""Synthetic traces of task starts on a fleet, for training and judging the layer predictor.

The process (version `starts-gen/1`; README.md says it at length):

1. **Layers.** A pool of base layers (OS images, large) and runtime layers (language runtimes),
   shared by every family; each family adds a framework layer; each signature adds 1-3 app layers
   of its own. Sizes are log-uniform in per-kind ranges.
2. **Workload families and signatures.** A family is a base, 1-2 runtimes and its framework; its
   3-6 signatures (image ref, command, labels, class; `core.workloads` makes their ids) add their
   app layers. Some are `cron`, the rest `service` or `batch`. A signature may have a workflow
   successor (same family mostly, another one sometimes) started after it with some probability.
3. **Hosts.** Each host draws an affinity over families (Dirichlet, small concentration: a host
   runs a few families), its own order of preference among a family's signatures (Zipf), a start
   rate, and 0-3 cron signatures with their periods and phases.
4. **Time.** Each family has a daily peak hour and amplitude: a host's starts of a family follow
   a Poisson process whose rate rises and falls with that family's day (thinning). Each start may
   set off its successor (and so on, at most 4 deep) after a delay; crons fire every period with
   a little jitter.
5. **Mix shift.** At `shift_at` (a fraction of the trace) some hosts redraw their family affinity,
   and some signatures get a new version: a new image ref (so a new signature id) with new app
   layers, as after a release.

Deterministic: everything is drawn from `SeedSequence([seed, regime key, ...])`; host i depends only
on the seed, the regime and i, so a host does not change when the fleet grows.

    .venv/bin/python -m models.prefetch.generate --regime train --seed 7 --hosts 12 --days 4 --out /tmp/starts.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from coordinator.warm_features import Start
from core.workloads import of_start

GENERATOR_VERSION = "starts-gen/1"
DAY = 86400.0
MB = 1 << 20


@dataclass(frozen=True)
class Regime:
    """The parameters of one kind of fleet. Training and evaluation use different regimes."""

    name: str
    n_bases: int = 4
    n_runtimes: int = 10
    n_families: int = 8
    sigs_per_family: tuple[int, int] = (3, 6)
    cron_share: float = 0.25
    """Share of signatures that are crons."""
    successor_p: float = 0.6
    """Probability that a signature has a workflow successor."""
    cross_family_successor: float = 0.3
    chain_p: float = 0.8
    """Probability that a start of a signature with a successor sets the successor off."""
    chain_delay_s: tuple[float, float] = (60.0, 600.0)
    affinity_alpha: float = 0.35
    starts_per_hour: float = 5.0
    """Mean initiating starts per host-hour (before the daily rise and fall)."""
    diurnal_amp: tuple[float, float] = (0.4, 0.95)
    crons_per_host: tuple[int, int] = (0, 3)
    cron_periods_s: tuple[float, ...] = (1800.0, 3600.0, 7200.0, 14400.0)
    zipf: float = 1.1
    shift_at: float = 0.5
    """When the mix shifts, as a fraction of the trace (>= 1: never)."""
    shift_hosts: float = 0.5
    """Share of hosts that redraw their family affinity at the shift."""
    shift_versions: float = 0.3
    """Share of signatures released in a new version (new app layers) at the shift."""


REGIMES: dict[str, Regime] = {
    # what the shipped model is trained on
    "train": Regime("train"),
    # a second training regime, so the model does not learn one regime's rates and delays
    "train-b": Regime(
        "train-b",
        n_bases=3,
        n_runtimes=8,
        n_families=6,
        sigs_per_family=(3, 8),
        cron_share=0.3,
        successor_p=0.7,
        cross_family_successor=0.2,
        chain_p=0.65,
        chain_delay_s=(30.0, 1200.0),
        affinity_alpha=0.25,
        starts_per_hour=4.0,
        diurnal_amp=(0.5, 0.95),
        cron_periods_s=(900.0, 3600.0, 10800.0),
        zipf=1.3,
        shift_at=0.4,
        shift_hosts=0.4,
        shift_versions=0.5,
    ),
    # judged on: more families, weaker workflows, busier hosts, broader mixes, other cron periods
    "eval": Regime(
        "eval",
        n_bases=5,
        n_runtimes=14,
        n_families=11,
        sigs_per_family=(2, 7),
        cron_share=0.2,
        successor_p=0.5,
        cross_family_successor=0.4,
        chain_p=0.7,
        chain_delay_s=(30.0, 900.0),
        affinity_alpha=0.5,
        starts_per_hour=7.0,
        diurnal_amp=(0.3, 0.9),
        cron_periods_s=(1200.0, 2700.0, 5400.0, 10800.0),
        zipf=0.9,
        shift_at=0.5,
        shift_hosts=0.6,
        shift_versions=0.4,
    ),
}


@dataclass(frozen=True)
class TraceSpec:
    regime: Regime
    seed: int
    n_hosts: int = 12
    days: float = 4.0

    @property
    def end(self) -> float:
        return self.days * DAY

    @property
    def shift_ts(self) -> float:
        return self.regime.shift_at * self.end if self.regime.shift_at < 1 else math.inf

    def data_version(self) -> str:
        return f"{GENERATOR_VERSION} regime={self.regime.name} seed={self.seed} hosts={self.n_hosts} days={self.days:g}"


@dataclass(frozen=True)
class SignatureDef:
    id: str
    family: int
    source: str
    workload_class: str
    layers: tuple[str, ...]
    successor: int
    """Index of the workflow successor, -1 for none."""


@dataclass
class Catalog:
    """Signatures before the shift and, per signature index, its version after the shift."""

    signatures: list[SignatureDef]
    after_shift: list[SignatureDef]
    sizes: dict[str, int]
    families: int
    kinds: dict[str, str] = field(default_factory=dict)
    """Layer digest -> its kind: base, runtime, framework or app."""

    def successors(self) -> dict[str, str]:
        """Signature id -> its workflow successor's id, before the shift and after it."""
        return {
            d.id: versions[d.successor].id
            for versions in (self.signatures, self.after_shift)
            for d in versions
            if d.successor >= 0
        }

    def crons(self) -> set[str]:
        return {d.id for d in (*self.signatures, *self.after_shift) if d.workload_class == "cron"}


PUSH_LEAD_MIN = (2.0, 60.0)
"""A release's image is pushed this many minutes (log-uniform) before its first start anywhere."""


@dataclass(frozen=True)
class Push:
    """A registry's push of a released image, before its first start (CI pushes, CD deploys)."""

    ts: float
    source: str
    layers: tuple[str, ...]


@dataclass
class Trace:
    spec: TraceSpec
    hosts: list[str]
    starts: list[tuple[str, Start]]
    """(host, start), in time order."""
    sizes: dict[str, int]
    signature_layers: dict[str, tuple[str, ...]] = field(default_factory=dict)
    pushes: list[Push] = field(default_factory=list)
    """The pushes of the images released at the shift, in time order."""

    @property
    def shift_ts(self) -> float:
        return self.spec.shift_ts

    def by_host(self) -> dict[str, list[Start]]:
        out: dict[str, list[Start]] = {h: [] for h in self.hosts}
        for host, start in self.starts:
            out[host].append(start)
        return out

    def to_json(self) -> dict[str, object]:
        return {
            "data_version": self.spec.data_version(),
            "spec": {**asdict(self.spec), "regime": asdict(self.spec.regime)},
            "sizes": self.sizes,
            "starts": [
                {"host": h, "ts": s.ts, "signature": s.signature, "layers": list(s.layers)} for h, s in self.starts
            ],
        }


def _key(name: str) -> int:
    return zlib.crc32(name.encode())


def _digest(*parts: object) -> str:
    return "sha256:" + hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()


def _size(rng: np.random.Generator, lo_mb: float, hi_mb: float) -> int:
    return int(math.exp(rng.uniform(math.log(lo_mb), math.log(hi_mb))) * MB)


def make_catalog(spec: TraceSpec) -> Catalog:
    r = spec.regime
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, _key(r.name), 0]))
    sizes: dict[str, int] = {}
    kinds: dict[str, str] = {}

    def layer(kind: str, i: object, lo: float, hi: float) -> str:
        d = _digest(GENERATOR_VERSION, r.name, spec.seed, kind, i)
        sizes[d] = _size(rng, lo, hi)
        kinds[d] = kind
        return d

    bases = [layer("base", i, 40, 200) for i in range(r.n_bases)]
    runtimes = [layer("runtime", i, 20, 120) for i in range(r.n_runtimes)]
    signatures: list[SignatureDef] = []
    after: list[SignatureDef] = []
    members: list[list[int]] = []
    for f in range(r.n_families):
        stack = [bases[rng.integers(r.n_bases)]]
        stack += [runtimes[j] for j in rng.choice(r.n_runtimes, size=int(rng.integers(1, 3)), replace=False)]
        stack.append(layer("framework", f, 10, 80))
        members.append([])
        for s in range(int(rng.integers(r.sigs_per_family[0], r.sigs_per_family[1] + 1))):
            cls = "cron" if rng.random() < r.cron_share else ("service" if rng.random() < 0.5 else "batch")
            n_app = int(rng.integers(1, 4))
            versions = []
            for version in (1, 2):
                apps = [layer("app", f"{f}.{s}.v{version}.{a}", 1, 60) for a in range(n_app)]
                source = f"image:registry.test/fam{f}/app{s}:v{version}"
                made = of_start(source, ["/bin/run", f"app{s}"], {"team": f"t{f % 4}"}, cls)
                versions.append((made.id, source, tuple(stack + apps)))
            members[-1].append(len(signatures))
            for out, (sid, source, layers) in zip((signatures, after), versions, strict=True):
                out.append(SignatureDef(sid, f, source, cls, layers, -1))
    # workflow successors: mostly within the family
    for i, defined in enumerate(signatures):
        if defined.workload_class == "cron" or rng.random() >= r.successor_p:
            continue
        fam = defined.family
        if rng.random() < r.cross_family_successor:
            fam = int(rng.integers(r.n_families))
        choices = [j for j in members[fam] if j != i and signatures[j].workload_class != "cron"]
        if choices:
            nxt = int(rng.choice(choices))
            signatures[i] = _with_successor(defined, nxt)
            after[i] = _with_successor(after[i], nxt)
    # a release at the shift: some signatures get their new version, the others keep the old one
    released = rng.random(len(signatures)) < r.shift_versions
    after = [after[i] if released[i] else signatures[i] for i in range(len(signatures))]
    return Catalog(signatures, after, sizes, r.n_families, kinds)


def _with_successor(sig: SignatureDef, successor: int) -> SignatureDef:
    return SignatureDef(sig.id, sig.family, sig.source, sig.workload_class, sig.layers, successor)


def _host_mix(rng: np.random.Generator, catalog: Catalog, r: Regime) -> tuple[np.ndarray, list[np.ndarray]]:
    """Family affinity and, per family, the host's preference over its signatures (Zipf, own order)."""
    affinity = rng.dirichlet(np.full(catalog.families, r.affinity_alpha))
    prefs = []
    for f in range(catalog.families):
        members = [i for i, s in enumerate(catalog.signatures) if s.family == f and s.workload_class != "cron"]
        w = np.zeros(len(catalog.signatures))
        if members:
            ranks = rng.permutation(len(members)) + 1
            w[members] = ranks.astype(float) ** -r.zipf
            w /= w.sum()
        prefs.append(w)
    return affinity, prefs


def generate_host(spec: TraceSpec, catalog: Catalog, index: int) -> list[tuple[float, int]]:
    """(ts, signature index) of one host's starts, unsorted; the shift is applied by the caller."""
    r = spec.regime
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, _key(r.name), 1, index]))
    fam_rng = np.random.default_rng(np.random.SeedSequence([spec.seed, _key(r.name), 2]))
    peaks = fam_rng.uniform(0, 1, catalog.families)
    amps = fam_rng.uniform(*r.diurnal_amp, catalog.families)
    before = _host_mix(rng, catalog, r)
    shifted = rng.random() < r.shift_hosts
    after = _host_mix(rng, catalog, r) if shifted else before
    rate = r.starts_per_hour / 3600.0 * math.exp(rng.normal(0.0, 0.3))
    top = 1.0 + float(amps.max())
    out: list[tuple[float, int]] = []
    t = 0.0
    while True:
        t += rng.exponential(1.0 / (rate * top))
        if t >= spec.end:
            break
        affinity, prefs = before if t < spec.shift_ts else after
        weights = affinity * (1.0 + amps * np.cos(2 * np.pi * (t / DAY - peaks)))
        if rng.random() * top >= weights.sum():
            continue  # thinning: the day is quiet for this host's families now
        fam = int(rng.choice(catalog.families, p=weights / weights.sum()))
        if prefs[fam].sum() == 0:
            continue
        sig = int(rng.choice(len(prefs[fam]), p=prefs[fam]))
        when = t
        for _ in range(5):  # the start and up to 4 successors
            out.append((when, sig))
            nxt = catalog.signatures[sig].successor
            if nxt < 0 or rng.random() >= r.chain_p:
                break
            when += rng.uniform(*r.chain_delay_s)
            sig = nxt
            if when >= spec.end:
                break
    crons = [i for i, s in enumerate(catalog.signatures) if s.workload_class == "cron"]
    for _ in range(int(rng.integers(r.crons_per_host[0], r.crons_per_host[1] + 1)) if crons else 0):
        sig = int(rng.choice(crons))
        period = float(rng.choice(r.cron_periods_s))
        when = rng.uniform(0, period)
        while when < spec.end:
            out.append((max(0.0, when + rng.normal(0.0, 20.0)), sig))
            when += period
    return out


def generate(spec: TraceSpec) -> Trace:
    catalog = make_catalog(spec)
    hosts = [f"host-{i:03d}" for i in range(spec.n_hosts)]
    starts: list[tuple[str, Start]] = []
    for i, host in enumerate(hosts):
        for ts, sig in generate_host(spec, catalog, i):
            if ts >= spec.end:
                continue
            d = catalog.after_shift[sig] if ts >= spec.shift_ts else catalog.signatures[sig]
            starts.append((host, Start(round(ts, 3), d.id, d.layers, d.source)))
    starts.sort(key=lambda hs: (hs[1].ts, hs[0]))
    sig_layers = {d.id: d.layers for d in (*catalog.signatures, *catalog.after_shift)}
    return Trace(spec, hosts, starts, catalog.sizes, sig_layers, pushes(spec, catalog, starts))


def pushes(spec: TraceSpec, catalog: Catalog, starts: Sequence[tuple[str, Start]]) -> list[Push]:
    """Each released image pushed PUSH_LEAD_MIN before its first start (its own draws: the starts
    do not change)."""
    rng = np.random.default_rng(np.random.SeedSequence([spec.seed, _key(spec.regime.name), 3]))
    first: dict[str, Start] = {}
    for _, s in starts:
        first.setdefault(s.signature, s)
    released = [d for old, d in zip(catalog.signatures, catalog.after_shift, strict=True) if d.id != old.id]
    lo, hi = (math.log(60.0 * m) for m in PUSH_LEAD_MIN)
    out = [
        Push(round(first[d.id].ts - math.exp(rng.uniform(lo, hi)), 3), d.source, d.layers)
        for d in released
        if d.id in first
    ]
    return sorted(out, key=lambda p: p.ts)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--regime", choices=sorted(REGIMES), default="train")
    p.add_argument("--seed", type=int, default=20261205)
    p.add_argument("--hosts", type=int, default=12)
    p.add_argument("--days", type=float, default=4.0)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    trace = generate(TraceSpec(REGIMES[args.regime], args.seed, args.hosts, args.days))
    args.out.write_text(json.dumps(trace.to_json()))
    print(f"{trace.spec.data_version()}: {len(trace.starts)} starts, {len(trace.sizes)} layers")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
