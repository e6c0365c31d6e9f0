"""The page-level delta between successive dumps, for kernels without soft-dirty tracking.

The source remembers a digest of every page it has sent; after each dump it sends only pages whose
content changed (and marks zero pages instead of sending them). The target keeps every page it has
received and, after the final dump, writes complete pages files for CRIU's restore.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import logging
import mmap
import os
import tempfile
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from agent.checkpoint.images import PAGE_SIZE, PE_PARENT, PageMap, flatten_pagemap, is_pagemap, read_pagemaps
from agent.checkpoint.livepages import READ_PAGES, LiveProcess, read_pages
from agent.checkpoint.pageruns import PageRuns, Run, SlotMap, runs_of
from core.errors import FerrymanError

log = logging.getLogger(__name__)
ZERO_PAGE = bytes(PAGE_SIZE)
DIGEST = 16  # bytes of SHA-256 kept per page (SHA-256: the CPU's SHA extensions make it the fastest here)
ZERO_DIGEST = bytes(DIGEST)  # what the tracker records for a zero page (a real digest of 0s: p = 2**-128)


class IncompleteImage(FerrymanError):
    code = "incomplete_image"
    http_status = 500


# Pages per delta batch: 1 MiB of page data, the stream's chunk size.
BATCH_PAGES = 256
# Pages hashed per task on the hashing threads.
HASH_CHUNK = 2048
WINDOW_CHUNKS = 4
"""A dump's pages file is hashed WINDOW_CHUNKS * HASH_CHUNK pages (32 MiB) at a time, the next window
while the current one is compared, and each window is dropped from the agent's mapping once done:
the pages file lives in tmpfs, and every page of it the agent has touched counted in its resident
memory (1.2 GB at the end of a 1 GiB pre-copy)."""


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


# Pages with their data and digests: (addresses, data, 16-byte digests back to back).
Piece = tuple[PageRuns, memoryview, bytes]


@dataclass
class DeltaStats:
    pages: int = 0
    changed: int = 0
    zero: int = 0
    unchanged: int = 0


def _drop(mm: mmap.mmap, start: int, end: int) -> None:
    """Unmap the pages of [start, end) from this process (they stay in the file): resident memory
    counts every page of a mapped tmpfs file the process has touched."""
    if end > start:
        mm.madvise(mmap.MADV_DONTNEED, start, end - start)


def _digests(view: memoryview, first: int, count: int) -> bytes:
    """16 bytes of digest per page, back to back; a zero page is ZERO_DIGEST, without hashing."""
    return b"".join(
        ZERO_DIGEST if page == ZERO_PAGE else hashlib.sha256(page).digest()[:DIGEST]
        for page in (view[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] for i in range(first, first + count))
    )


class _Digests:
    """16 bytes of digest a page, by position, in an unnamed file of the migration's work directory.

    The digests are the one part of the tracker that grows with the process: 16 MB at 4 GiB, 256 MB
    at 64 GiB, twice while a round replaces the last. In the work directory (tmpfs, beside the
    dumps, which hold 256 times as much) they stay out of the agent's memory, which must not grow
    with the container. They are read and written a piece (up to HASH_CHUNK pages) at a time.
    """

    def __init__(self, directory: Path | None) -> None:
        self._directory = directory
        self._fd = -1
        self.count = 0

    def append(self, blob: bytes) -> None:
        if self._fd < 0:
            self._fd = _unnamed_file(self._directory or Path(tempfile.gettempdir()))
            # Closed with the last reference, not before: post-copy may still read it on a thread.
            weakref.finalize(self, os.close, self._fd)
        _pwrite_all(self._fd, blob, self.count * DIGEST)
        self.count += len(blob) // DIGEST

    def read(self, position: int, count: int) -> bytes:
        """The digests of positions [position, position + count), cut at the end."""
        count = min(count, self.count - position)
        if count <= 0:
            return b""
        return os.pread(self._fd, count * DIGEST, position * DIGEST)


@dataclass(frozen=True)
class _Sent:
    """What one pagemap's pages were when last sent: addresses in dump order, digests alike."""

    vaddrs: PageRuns
    digests: _Digests

    def digest_of(self, vaddr: int) -> bytes | None:
        at = self.vaddrs.position(vaddr)
        return None if at is None else self.digests.read(at, 1)


class PageTracker:
    """Source side: what the target already holds, as one digest per page.

    `directory` holds the digests (the migration's work directory; None: the temporary directory).
    """

    def __init__(self, directory: Path | None = None, threads: int = 2) -> None:
        self._directory = directory
        self._sent: dict[str, _Sent] = {}
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="page-hash")

    def held_by_target(self, pagemap: str, vaddr: int, data: memoryview) -> list[bool]:
        """For the pages of `data` (consecutive from `vaddr`): does the target hold exactly this
        content already? Post-copy then lets it use its own copy. Call from a worker thread."""
        count = len(data) // PAGE_SIZE
        sent = self._sent.get(pagemap)
        if sent is None:
            return [False] * count
        digests = _digests(data, 0, count)
        at = sent.vaddrs.position(vaddr)
        if at is not None and sent.vaddrs.slice(at, count) == PageRuns([(vaddr, count)]):
            held = sent.digests.read(at, count)  # sent in the same order, as usual: one read
            return [held[i * DIGEST : (i + 1) * DIGEST] == digests[i * DIGEST : (i + 1) * DIGEST] for i in range(count)]
        return [sent.digest_of(vaddr + i * PAGE_SIZE) == digests[i * DIGEST : (i + 1) * DIGEST] for i in range(count)]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.forget()

    def delta(self, image_dir: Path, stats: DeltaStats) -> Iterator[PageBatch]:
        """Batches of pages that differ from what was sent; call from a worker thread (it hashes)."""
        for pm in read_pagemaps(image_dir):
            path = image_dir / pm.pages_file
            if pm.present_pages == 0 or not path.exists():
                continue
            before = self._sent.get(pm.name)
            with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                view = memoryview(mm)
                try:
                    yield from self._scan(pm, view, stats, functools.partial(_drop, mm))
                finally:
                    view.release()
            if before is not None:
                self._keep_parent_pages(pm, before)

    def _keep_parent_pages(self, pm: PageMap, before: _Sent) -> None:
        """A soft-dirty dump (pre-dump chains) holds only the pages written since its parent; the others
        are in the parent, unchanged, and the target still holds them as last sent. Without their digests
        every later dump would send them again as new (seen: a stop-copy delta of 1578 of 2066 pages
        after rounds of 65 and 23). Their runs join this dump's in address order, as a full dump lists
        its pages; the digests are copied a chunk at a time (they live in a file, not in memory)."""
        parent = sorted((r.vaddr, r.vaddr + r.nr_pages * PAGE_SIZE) for r in pm.ranges if r.flags & PE_PARENT)
        if not parent:
            return
        now = self._sent[pm.name]
        # (first address, pages, where their digests are, position there); a page is either in this
        # dump or in its parent, never both, so the pieces do not overlap.
        pieces: list[tuple[int, int, _Digests, int]] = []
        position = 0
        for vaddr, count in now.vaddrs.runs():
            pieces.append((vaddr, count, now.digests, position))
            position += count
        starts = [start for start, _ in parent]
        position = 0
        for vaddr, count in before.vaddrs.runs():
            end = vaddr + count * PAGE_SIZE
            at = max(bisect.bisect_right(starts, vaddr) - 1, 0)
            while at < len(parent) and parent[at][0] < end:
                low, high = max(vaddr, parent[at][0]), min(end, parent[at][1])
                if low < high:
                    skipped = (low - vaddr) // PAGE_SIZE
                    pieces.append((low, (high - low) // PAGE_SIZE, before.digests, position + skipped))
                at += 1
            position += count
        vaddrs, digests = PageRuns(), _Digests(self._directory)
        for vaddr, count, source, first in sorted(pieces, key=lambda piece: piece[0]):
            vaddrs.append(vaddr, count)
            for offset in range(0, count, HASH_CHUNK):
                digests.append(source.read(first + offset, min(HASH_CHUNK, count - offset)))
        self._sent[pm.name] = _Sent(vaddrs, digests)

    def live_delta(self, processes: list[LiveProcess], stats: DeltaStats) -> Iterator[PageBatch]:
        """Like delta(), but read from the running processes' memory (livepages): no dump, no freeze."""
        buffer = bytearray(READ_PAGES * PAGE_SIZE)
        half = READ_PAGES // 2
        for process in processes:

            def hashed(pieces: Iterator[tuple[int, memoryview]]) -> Iterator[Piece]:
                for vaddr, view in pieces:
                    count = len(view) // PAGE_SIZE
                    parts = self._pool.map(
                        lambda first, view=view, count=count: _digests(view, first, min(half, count - first)),
                        range(0, count, half),
                    )
                    yield PageRuns([(vaddr, count)]), view, b"".join(parts)

            yield from self._compare(process.pagemap, hashed(read_pages(process, buffer)), stats)

    def _scan(
        self, pm: PageMap, view: memoryview, stats: DeltaStats, done: Callable[[int, int], None]
    ) -> Iterator[PageBatch]:
        """`done(start, end)` is called with each byte range of `view` once nothing refers to it."""
        vaddrs = PageRuns(pm.present_runs())
        total = len(vaddrs)
        window = WINDOW_CHUNKS * HASH_CHUNK

        def hash_window(start: int) -> list[Future[bytes]]:
            # Digests of HASH_CHUNK pages at a time on the pool's threads (hashlib releases the GIL).
            return [
                self._pool.submit(_digests, view, first, min(HASH_CHUNK, total - first))
                for first in range(start, min(start + window, total), HASH_CHUNK)
            ]

        def pieces() -> Iterator[Piece]:
            ahead = hash_window(0)
            for start in range(0, total, window):
                current, ahead = ahead, hash_window(start + window)  # the next window hashes meanwhile
                for index, future in enumerate(current):
                    first = start + index * HASH_CHUNK
                    page_view = view[first * PAGE_SIZE : (first + HASH_CHUNK) * PAGE_SIZE]
                    yield vaddrs.slice(first, HASH_CHUNK), page_view, future.result()
                done(start * PAGE_SIZE, min(start + window, total) * PAGE_SIZE)  # compared, copied out

        yield from self._compare(pm.name, pieces(), stats)

    def _compare(self, pagemap: str, pieces: Iterator[Piece], stats: DeltaStats) -> Iterator[PageBatch]:
        """Batches of the pages whose digest differs from the one last sent; records the new digests."""
        batch = PageBatch(pagemap)
        before = self._sent.get(pagemap, _Sent(PageRuns(), _Digests(None)))
        vaddrs = PageRuns()
        digests = _Digests(self._directory)
        for piece_vaddrs, view, blob in pieces:
            position, count = len(vaddrs), len(piece_vaddrs)
            vaddrs.extend(piece_vaddrs)
            digests.append(blob)
            stats.pages += count
            # Usually the mappings did not change: then a whole piece whose digests equal the old ones
            # is skipped in one comparison, and only pieces with changes are looked at page by page.
            aligned = before.vaddrs.slice(position, count) == piece_vaddrs
            olds = before.digests.read(position, count) if aligned else b""
            if aligned and olds == blob:
                stats.unchanged += count
                continue
            for offset, vaddr in enumerate(piece_vaddrs):
                digest = blob[offset * DIGEST : (offset + 1) * DIGEST]
                old = olds[offset * DIGEST : (offset + 1) * DIGEST] if aligned else before.digest_of(vaddr)
                if old == digest:
                    stats.unchanged += 1
                elif digest == ZERO_DIGEST:
                    batch.zeros.append(vaddr)
                    stats.zero += 1
                else:
                    batch.vaddrs.append(vaddr)
                    batch.data.append(bytes(view[offset * PAGE_SIZE : (offset + 1) * PAGE_SIZE]))  # the source goes
                    stats.changed += 1
                    if len(batch.vaddrs) >= BATCH_PAGES:
                        yield batch
                        batch = PageBatch(pagemap)
        self._sent[pagemap] = _Sent(vaddrs, digests)
        if batch.vaddrs or batch.zeros:
            yield batch

    def forget(self) -> None:
        self._sent.clear()


class PageStore:
    """Target side: every page received, kept in one file per pagemap (on the migration's tmpfs).

    Pages get a slot in arrival order, which for the first round is the dump's own order. When the
    final dump lists the same pages in the same order (the common case: a process whose mappings did
    not change), its pages file *is* the store file and is handed to CRIU by a rename: no copy of the
    whole memory while the workload is frozen. Otherwise the pages file is assembled from the slots.
    Zero pages are holes in the file, which read back as zeros and take no memory.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._files: dict[str, _PageFile] = {}

    def __len__(self) -> int:
        return sum(len(f.slots) for f in self._files.values())

    def _file(self, pagemap: str) -> _PageFile:
        page_file = self._files.get(pagemap)
        if page_file is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            page_file = self._files[pagemap] = _PageFile(self.directory / f"{pagemap}.pages")
        return page_file

    def add(self, pagemap: str, vaddrs: list[int], data: memoryview, zeros: list[int]) -> None:
        """Store pages (call from a worker thread: it writes). `data` holds len(vaddrs) pages."""
        page_file = self._file(pagemap)
        if zeros:  # new pages take slots in address order, zero or not, so round one mirrors the dump
            for vaddr, count in runs_of(sorted((*vaddrs, *zeros))):
                page_file.slots.assign(vaddr, count)
        page_file.write(vaddrs, data)
        page_file.zero(zeros)

    def read(self, pagemap: str, vaddr: int) -> bytes | None:
        """One stored page, or None if it never arrived."""
        return self.read_run(pagemap, vaddr, 1)

    def read_run(self, pagemap: str, vaddr: int, count: int) -> bytes | None:
        """`count` consecutive pages from `vaddr`, or None if one never arrived. Pages whose slots
        follow each other (the usual case) come in one pread."""
        page_file = self._files.get(pagemap)
        slots = None if page_file is None else page_file.slots.lookup(vaddr, count)
        if slots is None:
            return None
        assert page_file is not None
        return b"".join(page_file.read_slots(slot, n) for slot, n in slots)

    def write_pages_files(self, image_dir: Path) -> int:
        """Put the pages file of every pagemap in `image_dir` in place; returns the bytes it holds.

        A page the store has never seen is an error: restoring from a hole would corrupt memory.
        """
        total = 0
        for path in sorted(image_dir.iterdir()):
            if is_pagemap(path.name):
                flatten_pagemap(path)  # pages a pre-dump chain left in parents come from the store too
        for pm in read_pagemaps(image_dir):
            wanted = PageRuns(pm.present_runs())
            page_file = self._files.get(pm.name)
            target = image_dir / pm.pages_file
            if page_file is None:
                if wanted:
                    raise IncompleteImage(f"{pm.name}: no page was ever received")
                target.write_bytes(b"")
                continue
            for vaddr, count in wanted.runs():
                missing = page_file.slots.first_missing(vaddr, count)
                if missing is not None:
                    raise IncompleteImage(f"{pm.name}: page {missing:#x} was never received")
            misplaced = wanted.differences(page_file.slots.order())
            moved = sum(count for _, count in misplaced)
            if moved <= max(64, len(wanted) // 8):
                # The store file is the pages file but for a few pages: a rename, then those patched in.
                page_file.move_to(target, wanted, misplaced)
                del self._files[pm.name]
            else:
                log.info(
                    "pages file by copy: mappings changed a lot since the first round",
                    extra={
                        "pagemap": pm.name,
                        "misplaced": moved,
                        "pages": len(wanted),
                        "stored": len(page_file.slots),
                        "first": misplaced[0][0],
                    },
                )
                page_file.copy_to(target, wanted)
            total += len(wanted) * PAGE_SIZE
        return total

    def close(self) -> None:
        for page_file in self._files.values():
            page_file.close()


class _PageFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self.slots = SlotMap()
        """Where each page is: slot n is bytes [n * 4096, (n + 1) * 4096) of the file."""
        self.filled = bytearray()
        """One byte per slot, 1 for a slot written with data (all others are holes, i.e. zero pages)."""

    def write(self, vaddrs: list[int], data: memoryview) -> None:
        # Runs of consecutive slots go out in one pwrite each; round one is a single run per batch.
        first_slot = first_page = pages = 0
        page = 0
        for vaddr, count in runs_of(vaddrs):
            for slot, n in self.slots.assign(vaddr, count):
                if pages and slot == first_slot + pages:
                    pages += n
                else:
                    if pages:
                        self._pwrite(first_slot, data[first_page * PAGE_SIZE : (first_page + pages) * PAGE_SIZE])
                    first_slot, first_page, pages = slot, page, n
                page += n
        if pages:
            self._pwrite(first_slot, data[first_page * PAGE_SIZE : (first_page + pages) * PAGE_SIZE])

    def zero(self, vaddrs: list[int]) -> None:
        for vaddr in vaddrs:
            ((slot, _),) = self.slots.assign(vaddr)
            if slot < len(self.filled) and self.filled[slot]:  # it holds old content: overwrite
                self._pwrite(slot, ZERO_PAGE)  # (a never-written slot is a hole)
                self.filled[slot] = 0

    def _pwrite(self, slot: int, data: bytes | memoryview) -> None:
        end = slot + len(data) // PAGE_SIZE
        if end > len(self.filled):
            self.filled.extend(bytes(end - len(self.filled)))
        self.filled[slot:end] = b"\x01" * (end - slot)
        _pwrite_all(self.fd, data, slot * PAGE_SIZE)

    def read_slots(self, first: int, count: int) -> bytes:
        data = os.pread(self.fd, count * PAGE_SIZE, first * PAGE_SIZE)
        return data + bytes(count * PAGE_SIZE - len(data))  # past the end of the file: a hole, zeros

    def _slot_runs(self, vaddrs: PageRuns) -> Iterator[Run]:
        """(slot, count) runs of the slots of `vaddrs` (all stored), in their order, merged."""
        first = count = 0
        for vaddr, pages in vaddrs.runs():
            slots = self.slots.lookup(vaddr, pages)
            assert slots is not None, "checked by the caller"
            for slot, n in slots:
                if count and slot == first + count:
                    count += n
                    continue
                if count:
                    yield first, count
                first, count = slot, n
        if count:
            yield first, count

    def _full_size(self) -> None:
        """Holes at the end are part of the file too (copy_file_range stops at its end)."""
        os.ftruncate(self.fd, max(os.fstat(self.fd).st_size, len(self.slots) * PAGE_SIZE))

    def copy_to(self, target: Path, vaddrs: PageRuns) -> None:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            self._full_size()
            # One copy_file_range per run of consecutive slots: a layout shifted by a page or two is
            # still a few long runs, not one call per page.
            out = 0
            for slot, count in self._slot_runs(vaddrs):
                _copy(self.fd, slot * PAGE_SIZE, fd, out, count * PAGE_SIZE, self.path)
                out += count * PAGE_SIZE
        finally:
            os.close(fd)

    def move_to(self, target: Path, vaddrs: PageRuns, misplaced: list[Run]) -> None:
        """Make this file the pages file `target`, which holds `vaddrs` in order, by a rename. The
        pages at the `misplaced` (position, count) ranges are copied aside first, by runs, and into
        their places after: the agent holds none of them."""
        self._full_size()
        aside = -1
        try:
            if misplaced:
                aside = _unnamed_file(self.path.parent)
                out = 0
                for position, count in misplaced:
                    for slot, n in self._slot_runs(vaddrs.slice(position, count)):
                        _copy(self.fd, slot * PAGE_SIZE, aside, out, n * PAGE_SIZE, self.path)
                        out += n * PAGE_SIZE
            self.close()
            self.path.replace(target)  # same filesystem: a rename, not a copy
            fd = os.open(target, os.O_RDWR)
            try:
                at = 0
                for position, count in misplaced:
                    _copy(aside, at, fd, position * PAGE_SIZE, count * PAGE_SIZE, target)
                    at += count * PAGE_SIZE
                os.ftruncate(fd, len(vaddrs) * PAGE_SIZE)
            finally:
                os.close(fd)
        finally:
            if aside >= 0:
                os.close(aside)

    def close(self) -> None:
        if self.fd >= 0:
            self._full_size()
            os.close(self.fd)
            self.fd = -1


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        offset += written
        view = view[written:]


def _unnamed_file(directory: Path) -> int:
    """A file open for writing that no name leads to: it goes when closed, even after a crash."""
    try:
        return os.open(directory, os.O_RDWR | os.O_TMPFILE, 0o600)
    except OSError:  # a filesystem without O_TMPFILE
        path = directory / f".aside-{os.getpid()}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        path.unlink()
        return fd


def _copy(src: int, src_offset: int, dst: int, dst_offset: int, size: int, what: Path) -> None:
    while size:
        copied = os.copy_file_range(src, dst, size, src_offset, dst_offset)
        if copied <= 0:
            raise OSError(f"copy_file_range stopped short in {what}")
        size, src_offset, dst_offset = size - copied, src_offset + copied, dst_offset + copied
