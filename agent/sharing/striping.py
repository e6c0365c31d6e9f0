"""Pure decisions for fetching one blob from several peers at once, in ranges.

A blob is cut into fixed ranges (`plan_ranges`); each range goes to the live peer with the fewest
ranges in flight (`choose_peer`, the faster one on a tie), at most `ranges_per_peer` each. A peer that
fails or stalls is dropped for the blob and its range goes back to the queue. The receiver checks the
whole blob's digest (containerd does at commit); when that fails, the registry's copy of the same
ranges says which peers sent bad bytes (`culprits`).
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class ByteRange:
    """Bytes [start, end) of a blob."""

    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start

    def header(self) -> str:
        """The HTTP Range header asking for exactly these bytes (HTTP ranges are inclusive)."""
        return f"bytes={self.start}-{self.end - 1}"


@dataclass(frozen=True)
class Served:
    """One range a peer served, and the SHA-256 of what it sent."""

    peer: str
    range: ByteRange
    sha256: str


def plan_ranges(start: int, size: int, range_size: int) -> list[ByteRange]:
    """Bytes [start, size) in ranges of `range_size` (the last one shorter); none when start >= size."""
    if range_size <= 0:
        raise ValueError(f"range_size must be positive, got {range_size}")
    return [ByteRange(s, min(s + range_size, size)) for s in range(max(start, 0), size, range_size)]


def choose_peer(
    live: Sequence[str], in_flight: Mapping[str, int], throughput: Mapping[str, float], per_peer: int
) -> str | None:
    """The peer for the next range: the live one with the fewest ranges in flight (below `per_peer`),
    the fastest measured (bytes/s) on a tie, then the earliest listed; None when all are busy."""
    best: tuple[int, float, int] | None = None
    chosen = None
    for order, peer in enumerate(live):
        busy = in_flight.get(peer, 0)
        if busy >= per_peer:
            continue
        key = (busy, -throughput.get(peer, 0.0), order)
        if best is None or key < best:
            best, chosen = key, peer
    return chosen


def culprits(served: Sequence[Served], truth: Mapping[ByteRange, str]) -> set[str]:
    """The peers that served a range whose hash differs from the trusted copy's (`truth`, by range);
    a range the trusted copy did not cover proves nothing."""
    return {s.peer for s in served if s.range in truth and truth[s.range] != s.sha256}


def rendezvous_rank(host: str, others: Sequence[str], digest: str) -> int:
    """How many of `others` rank before `host` for `digest` (highest-random-weight hashing): the hosts
    that start one blob at once agree, without talking, that rank 0 goes to the registry first and the
    others wait `rank * delay` for it to show up as a holder."""

    def weight(name: str) -> bytes:
        return hashlib.sha256(f"{name}\0{digest}".encode()).digest()

    mine = weight(host)
    return sum(1 for other in others if other != host and weight(other) > mine)


class Step(enum.Enum):
    """What a host does next about a blob it lacks, after asking its peers."""

    PEERS = "peers"  # read it from the peers that have bytes of it
    REGISTRY = "registry"  # fetch it from the registry (and so become the others' source)
    WAIT = "wait"  # wait rendezvous_delay, then ask again


def next_step(host: str, digest: str, held: Mapping[str, int], waited: int) -> tuple[Step, list[str]]:
    """Where to get `digest` from, given what each peer that answered holds of it (`held`: peer ->
    bytes available now; 0 for a peer that has started the blob but has nothing yet) after `waited`
    rounds of waiting.

    Peers with bytes win. Otherwise the hosts that want the blob (those that started it, and this
    one) elect, by rendezvous rank, the one that goes to the registry; the others wait for it to show
    bytes. The first round always waits, so hosts starting at the same moment see each other before
    they elect; a host waits at most one round per host that wants the blob, then goes itself."""
    sources = [peer for peer, available in held.items() if available > 0]
    if sources:
        return Step.PEERS, sources
    if waited == 0:
        return Step.WAIT, []
    wanting = list(held)
    if rendezvous_rank(host, wanting, digest) == 0 or waited > len(wanting):
        return Step.REGISTRY, []
    return Step.WAIT, []
