"""Sets of pages as merged [start, end) address ranges per task (CRIU's dst_id).

Post-copy moves pages in runs (pushed batches, read-ahead windows, the daemon's background requests),
so a whole process's worth of pages stays a handful of ranges instead of a set of 262144 addresses.
"""

from __future__ import annotations

import bisect

from agent.checkpoint.images import PAGE_SIZE


class PageRanges:
    def __init__(self) -> None:
        self._ranges: dict[int, list[tuple[int, int]]] = {}  # dst_id -> sorted, disjoint, merged

    def add(self, dst_id: int, vaddr: int, nr_pages: int) -> None:
        ranges = self._ranges.setdefault(dst_id, [])
        start, end = vaddr, vaddr + nr_pages * PAGE_SIZE
        i = bisect.bisect_left(ranges, (start, start))
        if i and ranges[i - 1][1] >= start:  # merge with the range before
            i -= 1
            start = ranges[i][0]
        j = i
        while j < len(ranges) and ranges[j][0] <= end:  # and with every range it reaches
            end = max(end, ranges[j][1])
            j += 1
        ranges[i:j] = [(start, end)]

    def covers(self, dst_id: int, vaddr: int, nr_pages: int) -> bool:
        """Every one of the `nr_pages` pages from `vaddr` is in the set."""
        ranges = self._ranges.get(dst_id)
        if not ranges:
            return False
        i = bisect.bisect_right(ranges, (vaddr, 1 << 64)) - 1
        return i >= 0 and ranges[i][0] <= vaddr and vaddr + nr_pages * PAGE_SIZE <= ranges[i][1]

    def missing(self, dst_id: int, vaddr: int, nr_pages: int) -> list[tuple[int, int]]:
        """The (first, count) runs of the `nr_pages` pages from `vaddr` that are not in the set, in order
        (`first` counts pages from `vaddr`)."""
        start, end = vaddr, vaddr + nr_pages * PAGE_SIZE
        out: list[tuple[int, int]] = []
        ranges = self._ranges.get(dst_id, [])
        i = max(bisect.bisect_right(ranges, (start, 1 << 64)) - 1, 0)
        at = start
        while at < end:
            while i < len(ranges) and ranges[i][1] <= at:
                i += 1
            if i == len(ranges) or ranges[i][0] >= end:
                out.append(((at - start) // PAGE_SIZE, (end - at) // PAGE_SIZE))
                break
            low, high = ranges[i]
            if low > at:
                out.append(((at - start) // PAGE_SIZE, (low - at) // PAGE_SIZE))
            at = high
        return out

    def count(self, dst_id: int, vaddr: int, nr_pages: int) -> int:
        """How many of the `nr_pages` pages from `vaddr` are in the set."""
        return nr_pages - sum(n for _, n in self.missing(dst_id, vaddr, nr_pages))

    def __len__(self) -> int:
        return sum(len(r) for r in self._ranges.values())
