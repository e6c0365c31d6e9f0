"""Which missing layer to fetch first: a pure function of the stack, the costs and the history.

A composition is runnable when its top snapshot is committed. Snapshots are applied bottom up, one
at a time, and a layer can be applied only once it is fetched and everything below it is applied.
So a missing layer holds up its own apply and the apply of every layer above it in the stack: its
dependents in the DAG, which the order rule always puts above it, and whatever the tie-break put
there too. Call the sum of those applies the layer's tail. In this model the composition is
runnable at

    max over layers i of (the end of i's fetch + tail(i))

With one fetch at a time, that is single-machine scheduling with delivery times, and fetching the
largest tail first (Jackson's rule) is optimal: for a stack, bottom first. With `granularity`
fetches at once the same rule is a good list schedule but a long fetch started late can end last;
so there the level is `fetch_seconds + tail` (critical-path list scheduling, HLFET), which starts a
large, slow layer early and overlaps it with the others.

`fetch_seconds` is the node's declared network cost, else its size at the measured rate of its
fastest source (peers, the registry); `apply_seconds` is the declared CPU cost, else its size at the
host's measured assembly seconds per byte. Size, cost and the number of layers waiting on a layer
all enter through these two.

Before the levels comes the manifest's layer preference list (in its order): the operator's word,
or what the prefetch design learned of the workload. After them, ties go to the layer with more
dependents in the DAG, then to the one used by more earlier assemblies on this host (the access
history), then to the lower one in the stack, then to the digest.

`simulate` runs the model forward (`granularity` parallel fetches of known durations, applies in
stack order) to give the time to the first applied snapshot and to the runnable one: the tests
compare orders with it, and the real assembly measures both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Layer:
    """One layer of the stack as the order sees it."""

    digest: str
    position: int
    """Index in the stack, 0 at the bottom."""
    fetch_seconds: float
    """0 when the layer is present on this host."""
    apply_seconds: float
    """0 when its snapshot already exists."""
    dependents: int = 0
    """Nodes that depend on it in the DAG, directly or not."""
    uses: int = 0
    """Earlier assemblies on this host that used it (the access history)."""
    missing: bool = True


def tails(stack: Sequence[Layer]) -> dict[str, float]:
    """Per layer: its apply and the applies of every layer above it in the stack."""
    out: dict[str, float] = {}
    total = 0.0
    for layer in sorted(stack, key=lambda la: la.position, reverse=True):
        total += layer.apply_seconds
        out[layer.digest] = total
    return out


def levels(stack: Sequence[Layer], granularity: int = 1) -> dict[str, float]:
    tail = tails(stack)
    if granularity <= 1:
        return tail
    return {la.digest: la.fetch_seconds + tail[la.digest] for la in stack}


def fetch_order(stack: Sequence[Layer], preference: Sequence[str] = (), granularity: int = 1) -> list[str]:
    """The missing layers' digests in the order to start their fetches."""
    level = levels(stack, granularity)
    rank = {digest: i for i, digest in enumerate(preference)}
    missing = [layer for layer in stack if layer.missing]
    missing.sort(
        key=lambda la: (
            rank.get(la.digest, len(rank)),
            -level[la.digest],
            -la.dependents,
            -la.uses,
            la.position,
            la.digest,
        )
    )
    return [layer.digest for layer in missing]


@dataclass(frozen=True)
class Timeline:
    first_snapshot: float
    """Seconds until the bottom layer that had to be applied is committed (0: nothing to apply)."""
    runnable: float
    """Seconds until the top snapshot is committed."""
    fetched: Mapping[str, float]
    applied: Mapping[str, float]


def simulate(stack: Sequence[Layer], order: Sequence[str], granularity: int) -> Timeline:
    """The model the order is chosen by, run forward: `granularity` fetches at once, each taking its
    `fetch_seconds`, started in `order`; applies one at a time bottom up, each once its layer is
    fetched and the one below is applied."""
    fetched: dict[str, float] = {la.digest: 0.0 for la in stack if not la.missing}
    slots = [0.0] * max(1, granularity)
    by_digest = {la.digest: la for la in stack}
    for digest in order:
        slot = min(range(len(slots)), key=lambda i: slots[i])
        slots[slot] += by_digest[digest].fetch_seconds
        fetched[digest] = slots[slot]
    applied: dict[str, float] = {}
    clock = 0.0
    first = 0.0
    for layer in sorted(stack, key=lambda la: la.position):
        if layer.apply_seconds == 0.0 and not layer.missing:
            applied[layer.digest] = clock
            continue
        clock = max(clock, fetched[layer.digest]) + layer.apply_seconds
        applied[layer.digest] = clock
        first = first or clock
    return Timeline(first, clock, fetched, applied)
