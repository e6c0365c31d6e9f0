"""What to evict, as pure functions of the cache's entries: no I/O, no clock, no state.

An entry is one image record. Evicting it deletes the record; containerd's GC then drops the blobs
(and snapshots) nothing else references. So an entry frees only the bytes no other image, no
protected image and no lease still holds, and which bytes those are changes as other entries go:
`plan` works over the digests, not over per-image sizes.

The order is GDSF (Greedy-Dual-Size-Frequency, Cherkasova 1998): an entry's value is

    H = L + uses * refetch_cost / size

where L is the cache's clock when the entry was last used. L starts at 0 and becomes the H of what
was last evicted, so an entry not used since the clock moved past it ages out (LRU's recency), one
used often outlasts one used once (LFU's frequency), a large image that is cheap to fetch again
goes before a small one that is slow to fetch again (size and cost). docs/cache.md compares it with
LRU and LFU.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

MIB = 1 << 20


class Origin(enum.StrEnum):
    """Where an image's blobs would come from again after an eviction."""

    REGISTRY = "registry"
    PEER = "peer"
    """A migration's source had it: peers hold it, but the registry may not."""
    ARCHIVE = "archive"
    """Imported from an archive: no registry may have it, so it is the costliest to lose."""


@dataclass(frozen=True)
class Refetch:
    """Seconds to fetch an image again: `fixed` (resolve, manifests, round trips) + bytes / `rate`."""

    fixed: float
    rate: float
    """Bytes per second."""


REFETCH: Mapping[Origin, Refetch] = {
    Origin.REGISTRY: Refetch(fixed=1.0, rate=50 * MIB),
    Origin.PEER: Refetch(fixed=0.2, rate=200 * MIB),
    # Nobody may have it again: an operator must import it again, counted as an hour.
    Origin.ARCHIVE: Refetch(fixed=3600.0, rate=1 * MIB),
}
"""Estimates, only their ratios matter: a registry across the internet against a peer on the LAN."""


def refetch_cost(origin: Origin, size: int) -> float:
    """Seconds to get `size` bytes of an image from `origin` again."""
    cost = REFETCH[origin]
    return cost.fixed + size / cost.rate


def value(clock: float, uses: int, origin: Origin, size: int, on_peers: int = 0) -> float:
    """GDSF's H for an entry used `uses` times, last when the cache's clock read `clock`. `on_peers`
    of its `size` bytes another host holds: they come back from a peer, the rest from `origin`."""
    on_peers = min(max(on_peers, 0), size)
    if on_peers and on_peers == size:
        cost = refetch_cost(Origin.PEER, size)
    else:  # the rest from its origin, which also pays the round trips
        cost = refetch_cost(origin, size - on_peers) + on_peers / REFETCH[Origin.PEER].rate
    return clock + max(uses, 1) * cost / max(size / MIB, 1 / MIB)


@dataclass(frozen=True)
class Entry:
    name: str
    blobs: frozenset[str]
    """The digests the image references: index, manifest, config, layers."""
    uses: int = 1
    """Pulls, imports, container creations and migrations that used it."""
    clock: float = 0.0
    """The cache's clock at its last use."""
    last_use: float = 0.0
    """Unix seconds of its last use: the tie-break, older first."""
    origin: Origin = Origin.REGISTRY
    protected: str = ""
    """Why it must stay ("pinned", "used by container web", "being pulled"); empty: evictable."""


@dataclass(frozen=True)
class Bound:
    high: int
    """Evict when the store holds more than this many bytes..."""
    low: int
    """...until it holds at most this many (hysteresis: not one eviction per pull at the bound)."""

    def __post_init__(self) -> None:
        if not 0 < self.low <= self.high:
            raise ValueError(f"a cache bound needs 0 < low <= high, got low={self.low} high={self.high}")


@dataclass(frozen=True)
class Plan:
    evict: tuple[str, ...]
    """Image names, in eviction order."""
    freed: int
    """Bytes the evictions free (blobs no remaining image and no lease holds)."""
    short: int
    """Bytes still over `low` after them: what protected entries and leases keep (0 when it fits)."""
    clock: float
    """The cache's clock afterwards: the H of the last entry evicted, or the clock given."""


def sizes_of(entries: Iterable[Entry], sizes: Mapping[str, int]) -> dict[str, int]:
    """Each entry's size: the bytes of its blobs that are in the store."""
    return {e.name: sum(sizes.get(d, 0) for d in e.blobs) for e in entries}


def freed_by(evicted: Iterable[Entry], kept: Iterable[Entry], held: frozenset[str], sizes: Mapping[str, int]) -> int:
    """Bytes freed when `evicted` go and `kept` stay: blobs of the evicted that no kept entry and no
    lease (`held`) references."""
    still = set(held)
    for e in kept:
        still |= e.blobs
    gone = set().union(*(e.blobs for e in evicted)) - still
    return sum(sizes.get(d, 0) for d in gone)


def plan(
    entries: Iterable[Entry],
    sizes: Mapping[str, int],
    held: frozenset[str],
    bound: Bound,
    clock: float,
    on_peers: frozenset[str] = frozenset(),
) -> Plan:
    """The images to evict so that the store (every blob in `sizes`) fits `bound`.

    Nothing happens at or under `bound.high`. Over it, unprotected entries go lowest H first (then
    oldest use, then name) until the store is at or under `bound.low`; an eviction that would free
    nothing (everything it holds is shared with images that stay, or leased) is left out.
    `on_peers`: blobs another host of the fleet holds (the layer tracker's view). An image's bytes
    there cost a peer fetch to get back, not a registry fetch, so it goes before one of the same
    uses and clock whose bytes only this host holds: the fleet keeps its last copy longest."""
    entries = list(entries)
    used = sum(sizes.values())
    if used <= bound.high:
        return Plan((), 0, 0, clock)
    need = used - bound.low
    image_size = sizes_of(entries, sizes)
    peer_size = {e.name: sum(sizes.get(d, 0) for d in e.blobs & on_peers) for e in entries}

    def h(e: Entry) -> float:
        return value(e.clock, e.uses, e.origin, image_size[e.name], peer_size[e.name])

    candidates = sorted((e for e in entries if not e.protected), key=lambda e: (h(e), e.last_use, e.name))
    chosen: list[Entry] = []
    for e in candidates:
        chosen.append(e)
        if _freed(chosen, entries, held, sizes) >= need:
            break
    # Drop what frees nothing once the others are gone: its blobs stay for images that remain.
    for e in list(reversed(chosen)):
        rest = [c for c in chosen if c is not e]
        if _freed(rest, entries, held, sizes) == _freed(chosen, entries, held, sizes):
            chosen = rest
    freed = _freed(chosen, entries, held, sizes)
    last = max((h(e) for e in chosen), default=clock)
    return Plan(tuple(e.name for e in chosen), freed, max(0, used - freed - bound.low), max(clock, last))


def _freed(chosen: list[Entry], entries: list[Entry], held: frozenset[str], sizes: Mapping[str, int]) -> int:
    names = {e.name for e in chosen}
    return freed_by(chosen, [e for e in entries if e.name not in names], held, sizes)


def recover_clock(entries: Iterable[Entry]) -> float:
    """The clock after a restart: the latest any entry recorded (the clock never goes back)."""
    return max((e.clock for e in entries), default=0.0)
