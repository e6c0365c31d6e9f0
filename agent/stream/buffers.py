"""Reusable frame buffers.

Fresh large allocations are expensive on the VMs we run on (every new page faults in), and a
1 MiB chunk would otherwise cost a new buffer at each stage. A pool keeps a few buffers per
channel and hands them out again; deque append/pop are atomic, so worker threads release into
it without a lock.

Received plaintext is handed to the consumer as memoryviews of pooled buffers ("lent"): the
pool takes such a buffer back only once nothing refers to it any more, i.e. every memoryview
of it is gone. A consumer that keeps the data simply keeps the buffer; the pool forgets it.
"""

from __future__ import annotations

import sys
from collections import deque

# References to a lent buffer while the pool checks it: the local name and getrefcount's argument.
_IDLE_REFS = 2


class BufferPool:
    def __init__(self, size: int, keep: int) -> None:
        self.size = size
        self._keep = keep
        self._free: deque[bytearray] = deque()
        self._lent: deque[bytearray] = deque()

    def acquire(self, need: int) -> bytearray:
        """A buffer of at least `need` bytes (contents undefined)."""
        if need <= self.size:
            try:
                return self._free.pop()
            except IndexError:
                pass
            reclaimed = self._reclaim()
            return reclaimed if reclaimed is not None else bytearray(self.size)
        return bytearray(need)  # oversized requests are rare (HELLO limits, big control messages)

    def release(self, buf: bytearray) -> None:
        if len(buf) == self.size and len(self._free) < self._keep:
            self._free.append(buf)

    def lend(self, buf: bytearray) -> None:
        """`buf` now backs memoryviews someone else holds; reuse it once they are all gone."""
        if len(buf) != self.size:
            return
        self._lent.append(buf)
        while len(self._lent) > self._keep:  # a consumer that keeps its data keeps the buffers
            try:
                self._lent.popleft()
            except IndexError:
                break

    def clear(self) -> None:
        """Forget every buffer and keep none from now on: the channel is closed, and its threads
        may outlive it (or it may sit in a reference cycle until the next full collection), so its
        pools would otherwise keep their MiBs resident after the migration."""
        self._keep = 0
        self._free.clear()
        self._lent.clear()

    def _reclaim(self) -> bytearray | None:
        # Oldest loans first: they are the likeliest to be released. Each buffer is popped
        # before it is checked, so two threads never look at the same one.
        for _ in range(len(self._lent)):
            try:
                buf = self._lent.popleft()
            except IndexError:
                return None
            if sys.getrefcount(buf) <= _IDLE_REFS:
                return buf
            self._lent.append(buf)
        return None
