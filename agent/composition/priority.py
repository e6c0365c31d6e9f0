"""Which missing layer to fetch first: a pure function of the stack, the costs and the history.

A composition is runnable when its top snapshot is committed. Snapshots are applied bottom up, one
at a time, and a layer can be applied only once it is fetched and everything below it is applied.
So a layer holds up not only its own apply but the apply of every layer that depends on it. The
order is critical-path list scheduling (HLFET, "highest level first"): each missing layer's level is
the longest the composition must still wait once the layer's fetch starts,

    level = fetch_seconds + apply_seconds + sum(apply_seconds of every node that depends on it)

and layers are fetched highest level first. `fetch_seconds` is the declared network cost, else the
layer's size at the measured rate of its cheapest source (peers, the registry); `apply_seconds` is
the declared CPU cost, else the size at the host's measured assembly seconds per byte. So a large
layer, and a layer many others depend on, go early; a small top layer goes last.

Before the levels come the manifest's layer preference list (in its order): the operator's word,
or what the prefetch design learned of the workload. After them, ties go to the layer used by more
earlier assemblies on this host (the access history), then to the lower one in the stack, then to
the digest. `prefetch_granularity` bounds how many fetches run at once; the driver (service.py)
starts them in this order.

`simulate` runs the same model forward (parallel fetches of known durations, applies in stack
order) to give the time to the first snapshot and to the runnable one: the tests compare orders with
it, and the real assembly measures both.
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
    dependents: frozenset[str] = frozenset()
    """Digests of the layers that depend on it, directly or not."""
    uses: int = 0
    """Earlier assemblies on this host that used it (the access history)."""
    missing: bool = True


def levels(stack: Sequence[Layer]) -> dict[str, float]:
    apply = {layer.digest: layer.apply_seconds for layer in stack}
    return {
        layer.digest: layer.fetch_seconds + layer.apply_seconds + sum(apply.get(d, 0.0) for d in layer.dependents)
        for layer in stack
    }


def fetch_order(stack: Sequence[Layer], preference: Sequence[str] = ()) -> list[str]:
    """The missing layers' digests in the order to start their fetches."""
    level = levels(stack)
    rank = {digest: i for i, digest in enumerate(preference)}
    missing = [layer for layer in stack if layer.missing]
    missing.sort(key=lambda la: (rank.get(la.digest, len(rank)), -level[la.digest], -la.uses, la.position, la.digest))
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
