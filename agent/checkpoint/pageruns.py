"""Sets and sequences of page addresses as runs of consecutive pages, held in flat arrays.

Pre-copy keeps bookkeeping for every page of the workload: on the source, which pages it sent and
in what order; on the target, where each received page sits in its store file. As Python lists,
dicts and sets of ints each page cost 100-200 bytes of agent memory (an int object, a list slot, a
hash table entry): at 4 GiB (1 Mi pages) the agents peaked at 344 MB (source) and 360 MB (target).
A process's pages are a handful of runs of consecutive addresses, so these types cost 16-24 bytes
per run, whatever its length, and a few bytes per page at worst (every page a run of its own).
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Iterable, Iterator

from agent.checkpoint.images import PAGE_SIZE

Run = tuple[int, int]
"""(first address, number of pages)."""


def runs_of(vaddrs: Iterable[int]) -> Iterator[Run]:
    """Consecutive pages of `vaddrs`, in their order, grouped into runs."""
    start = count = 0
    for vaddr in vaddrs:
        if count and vaddr == start + count * PAGE_SIZE:
            count += 1
            continue
        if count:
            yield start, count
        start, count = vaddr, 1
    if count:
        yield start, count


class PageRuns:
    """A sequence of distinct page addresses in an order of its own (a dump's file order).

    Position i is the i-th address. Runs are merged as they are appended, so two equal sequences
    have equal arrays.
    """

    __slots__ = ("_ends", "_index", "_starts")

    def __init__(self, runs: Iterable[Run] = ()) -> None:
        self._starts = array("Q")
        """The first address of each run."""
        self._ends = array("Q")
        """The position just past each run: the pages of all runs up to it."""
        self._index: tuple[array[int], array[int]] | None = None
        """Run starts in address order and their run numbers, for position(); built when first asked."""
        for vaddr, count in runs:
            self.append(vaddr, count)

    @classmethod
    def of(cls, vaddrs: Iterable[int]) -> PageRuns:
        return cls(runs_of(vaddrs))

    def append(self, vaddr: int, count: int = 1) -> None:
        """Add `count` consecutive pages from `vaddr` at the end."""
        if count <= 0:
            return
        self._index = None
        if self._starts:
            last = len(self._starts) - 1
            first = self._ends[last - 1] if last else 0
            if self._starts[last] + (self._ends[last] - first) * PAGE_SIZE == vaddr:
                self._ends[last] += count
                return
        self._starts.append(vaddr)
        self._ends.append(len(self) + count)

    def extend(self, other: PageRuns) -> None:
        for vaddr, count in other.runs():
            self.append(vaddr, count)

    def __len__(self) -> int:
        return self._ends[-1] if self._ends else 0

    def __iter__(self) -> Iterator[int]:
        for vaddr, count in self.runs():
            yield from range(vaddr, vaddr + count * PAGE_SIZE, PAGE_SIZE)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PageRuns):
            return NotImplemented
        return self._ends == other._ends and self._starts == other._starts

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"PageRuns({list(self.runs())!r})"

    @property
    def run_count(self) -> int:
        return len(self._starts)

    def runs(self) -> Iterator[Run]:
        first = 0
        for vaddr, end in zip(self._starts, self._ends, strict=True):
            yield vaddr, end - first
            first = end

    def at(self, position: int) -> int:
        """The address at `position` (IndexError past the end)."""
        if not 0 <= position < len(self):
            raise IndexError(position)
        run = bisect.bisect_right(self._ends, position)
        first = self._ends[run - 1] if run else 0
        return self._starts[run] + (position - first) * PAGE_SIZE

    def slice(self, position: int, count: int) -> PageRuns:
        """The addresses at positions [position, position + count), cut at the end."""
        out = PageRuns()
        end = min(position + count, len(self))
        if position < 0 or position >= end:
            return out
        run = bisect.bisect_right(self._ends, position)
        while position < end:
            first = self._ends[run - 1] if run else 0
            take = min(self._ends[run], end) - position
            out.append(self._starts[run] + (position - first) * PAGE_SIZE, take)
            position += take
            run += 1
        return out

    def position(self, vaddr: int) -> int | None:
        """Where `vaddr` is in the sequence, or None."""
        if self._index is None:
            by_address = sorted(range(len(self._starts)), key=self._starts.__getitem__)
            self._index = array("Q", (self._starts[n] for n in by_address)), array("Q", by_address)
        starts, numbers = self._index
        at = bisect.bisect_right(starts, vaddr) - 1
        if at < 0:
            return None
        run = numbers[at]
        first = self._ends[run - 1] if run else 0
        offset, rest = divmod(vaddr - self._starts[run], PAGE_SIZE)
        if rest or first + offset >= self._ends[run]:
            return None
        return first + offset

    def differences(self, other: PageRuns) -> list[Run]:
        """(position, count) ranges of the positions of this sequence whose address differs from
        `other`'s at the same position (or that `other` is too short to have), merged."""
        out: list[Run] = []

        def add(position: int, count: int) -> None:
            if out and out[-1][0] + out[-1][1] == position:
                out[-1] = (out[-1][0], out[-1][1] + count)
            else:
                out.append((position, count))

        theirs = other.runs()
        them: Run | None = next(theirs, None)
        position = 0
        for vaddr, count in self.runs():
            while count:
                if them is None:
                    add(position, count)
                    position += count
                    break
                take = min(count, them[1])
                if vaddr != them[0]:  # both advance a page at a time: equal at the start, equal throughout
                    add(position, take)
                position += take
                vaddr, count = vaddr + take * PAGE_SIZE, count - take
                them = (them[0] + take * PAGE_SIZE, them[1] - take) if them[1] > take else next(theirs, None)
        return out


class SlotMap:
    """Page address -> slot (the page's place in a store file), kept as runs of consecutive addresses
    on consecutive slots, sorted by address. New addresses take the next free slots, in the order
    they are assigned."""

    __slots__ = ("_counts", "_slots", "_starts", "slots")

    def __init__(self) -> None:
        self._starts = array("Q")
        self._counts = array("Q")
        self._slots = array("Q")
        """The slot of each run's first page."""
        self.slots = 0
        """Slots given out: the next new address gets this one."""

    def __len__(self) -> int:
        return self.slots

    @property
    def run_count(self) -> int:
        return len(self._starts)

    def _covering(self, vaddr: int) -> int:
        """The number of the run holding `vaddr`, else of the first run after it."""
        run = bisect.bisect_right(self._starts, vaddr) - 1
        if run >= 0 and vaddr < self._starts[run] + self._counts[run] * PAGE_SIZE:
            return run
        return run + 1

    def get(self, vaddr: int) -> int | None:
        run = self._covering(vaddr)
        if run == len(self._starts) or self._starts[run] > vaddr:
            return None
        offset, rest = divmod(vaddr - self._starts[run], PAGE_SIZE)
        return None if rest else self._slots[run] + offset

    def _walk(self, vaddr: int, count: int, assign: bool) -> list[Run] | None:
        out: list[Run] = []

        def add(slot: int, n: int) -> None:
            if out and out[-1][0] + out[-1][1] == slot:
                out[-1] = (out[-1][0], out[-1][1] + n)
            else:
                out.append((slot, n))

        run = self._covering(vaddr)
        while count:
            if run < len(self._starts) and self._starts[run] <= vaddr:
                offset = (vaddr - self._starts[run]) // PAGE_SIZE
                n = min(count, self._counts[run] - offset)
                add(self._slots[run] + offset, n)
                run += 1
            else:  # a gap before the next run (or past the last)
                n = count if run == len(self._starts) else min(count, (self._starts[run] - vaddr) // PAGE_SIZE)
                if not assign:
                    return None
                add(self.slots, n)
                run = self._insert(run, vaddr, n)
            vaddr, count = vaddr + n * PAGE_SIZE, count - n
        return out

    def _insert(self, run: int, vaddr: int, count: int) -> int:
        """New slots for `count` pages from `vaddr`, which go before run number `run`; returns the
        number of the run after them."""
        slot, self.slots = self.slots, self.slots + count
        before = run - 1
        if (
            before >= 0
            and self._starts[before] + self._counts[before] * PAGE_SIZE == vaddr
            and self._slots[before] + self._counts[before] == slot
        ):
            self._counts[before] += count
            return run
        self._starts.insert(run, vaddr)
        self._counts.insert(run, count)
        self._slots.insert(run, slot)
        return run + 1

    def lookup(self, vaddr: int, count: int) -> list[Run] | None:
        """(slot, count) runs holding the `count` pages from `vaddr`, in address order, or None if
        one of them has no slot."""
        return self._walk(vaddr, count, assign=False)

    def assign(self, vaddr: int, count: int = 1) -> list[Run]:
        """Like lookup(), giving the pages that have none the next free slots, in address order."""
        out = self._walk(vaddr, count, assign=True)
        assert out is not None
        return out

    def first_missing(self, vaddr: int, count: int) -> int | None:
        """The first of the `count` pages from `vaddr` without a slot, or None."""
        run = self._covering(vaddr)
        end = vaddr + count * PAGE_SIZE
        while vaddr < end:
            if run == len(self._starts) or self._starts[run] > vaddr:
                return vaddr
            vaddr = self._starts[run] + self._counts[run] * PAGE_SIZE
            run += 1
        return None

    def order(self) -> PageRuns:
        """The addresses in slot order."""
        out = PageRuns()
        for run in sorted(range(len(self._starts)), key=self._slots.__getitem__):
            out.append(self._starts[run], self._counts[run])
        return out
