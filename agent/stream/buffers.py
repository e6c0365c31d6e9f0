"""Reusable frame buffers.

Fresh large allocations are expensive on the VMs we run on (every new page faults in), and a
1 MiB chunk would otherwise cost a new buffer at each stage. A pool keeps a few buffers per
channel and hands them out again; deque append/pop are atomic, so worker threads release into
it without a lock.
"""

from __future__ import annotations

from collections import deque


class BufferPool:
    def __init__(self, size: int, keep: int) -> None:
        self.size = size
        self._keep = keep
        self._free: deque[bytearray] = deque()

    def acquire(self, need: int) -> bytearray:
        """A buffer of at least `need` bytes (contents undefined)."""
        if need <= self.size:
            try:
                return self._free.pop()
            except IndexError:
                return bytearray(self.size)
        return bytearray(need)  # oversized requests are rare (HELLO limits, big control messages)

    def release(self, buf: bytearray) -> None:
        if len(buf) == self.size and len(self._free) < self._keep:
            self._free.append(buf)
