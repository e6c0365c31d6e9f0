"""The page-level delta between successive dumps, for kernels without soft-dirty tracking.

The source remembers a digest of every page it has sent; after each dump it sends only pages whose
content changed (and marks zero pages instead of sending them). The target keeps every page it has
received and, after the final dump, writes complete pages files for CRIU's restore.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from agent.checkpoint.images import PAGE_SIZE, PageMap, read_pagemaps
from agent.errors import FerrymanError

ZERO_PAGE = bytes(PAGE_SIZE)


class IncompleteImage(FerrymanError):
    code = "incomplete_image"
    http_status = 500


# Pages per delta batch: 1 MiB of page data, the stream's chunk size.
BATCH_PAGES = 256


@dataclass
class PageBatch:
    """Changed pages of one pagemap: `vaddrs[i]` holds `data[i*4096:(i+1)*4096]`; `zeros` hold nothing."""

    pagemap: str
    vaddrs: list[int] = field(default_factory=list)
    data: list[bytes] = field(default_factory=list)
    zeros: list[int] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return len(self.vaddrs) * PAGE_SIZE


@dataclass
class DeltaStats:
    pages: int = 0
    changed: int = 0
    zero: int = 0
    unchanged: int = 0


class PageTracker:
    """Source side: what the target already holds, as one digest per page."""

    def __init__(self) -> None:
        self._sent: dict[tuple[str, int], bytes] = {}

    def delta(self, image_dir: Path, stats: DeltaStats) -> Iterator[PageBatch]:
        """Batches of pages that differ from what was sent; call from a worker thread (it hashes)."""
        for pm in read_pagemaps(image_dir):
            path = image_dir / pm.pages_file
            if pm.present_pages == 0 or not path.exists():
                continue
            with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                view = memoryview(mm)
                try:
                    yield from self._scan(pm, view, stats)
                finally:
                    view.release()

    def _scan(self, pm: PageMap, view: memoryview, stats: DeltaStats) -> Iterator[PageBatch]:
        batch = PageBatch(pm.name)
        sent = self._sent
        for index, vaddr in enumerate(pm.present_vaddrs()):
            page = view[index * PAGE_SIZE : (index + 1) * PAGE_SIZE]
            stats.pages += 1
            key = (pm.name, vaddr)
            if page == ZERO_PAGE:
                if sent.get(key) != b"":
                    sent[key] = b""
                    batch.zeros.append(vaddr)
                    stats.zero += 1
                else:
                    stats.unchanged += 1
                continue
            digest = hashlib.blake2b(page, digest_size=16).digest()
            if sent.get(key) == digest:
                stats.unchanged += 1
                continue
            sent[key] = digest
            batch.vaddrs.append(vaddr)
            batch.data.append(bytes(page))  # a copy: the dump dir is removed after this round
            stats.changed += 1
            if len(batch.vaddrs) >= BATCH_PAGES:
                yield batch
                batch = PageBatch(pm.name)
        if batch.vaddrs or batch.zeros:
            yield batch

    def forget(self) -> None:
        self._sent.clear()


class PageStore:
    """Target side: every page received, by (pagemap name, address); zero pages are implicit."""

    def __init__(self) -> None:
        self._pages: dict[tuple[str, int], bytes | memoryview] = {}

    def __len__(self) -> int:
        return len(self._pages)

    def add(self, pagemap: str, vaddrs: list[int], data: memoryview, zeros: list[int]) -> None:
        for i, vaddr in enumerate(vaddrs):
            self._pages[(pagemap, vaddr)] = data[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
        for vaddr in zeros:
            self._pages[(pagemap, vaddr)] = ZERO_PAGE

    def write_pages_files(self, image_dir: Path) -> int:
        """Write the pages file of every pagemap in `image_dir` from the store; returns bytes written.

        A page the store has never seen is an error: restoring from a hole would corrupt memory.
        """
        written = 0
        for pm in read_pagemaps(image_dir):
            target = image_dir / pm.pages_file
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                buffers: list[bytes | memoryview] = []
                for vaddr in pm.present_vaddrs():
                    page = self._pages.get((pm.name, vaddr))
                    if page is None:
                        raise IncompleteImage(f"{pm.name}: page {vaddr:#x} was never received")
                    buffers.append(page)
                    if len(buffers) == 1024:
                        written += _writev_all(fd, buffers)
                        buffers = []
                if buffers:
                    written += _writev_all(fd, buffers)
            finally:
                os.close(fd)
        return written


def _writev_all(fd: int, buffers: list[bytes | memoryview]) -> int:
    total = sum(len(b) for b in buffers)
    done = os.writev(fd, buffers)
    if done != total:  # short write: finish the rest the simple way
        rest = b"".join(bytes(b) for b in buffers)[done:]
        while rest:
            n = os.write(fd, rest)
            rest = rest[n:]
    return total
