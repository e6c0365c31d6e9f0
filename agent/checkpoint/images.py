"""Read and write the memory part of a CRIU image directory (pagemaps and their pages files).

Each `*pagemap*.img` lists page ranges by virtual address; the present pages of all its ranges are
stored back to back in `pages-<pages_id>.img`. pycriu decodes the pagemaps; the pages files are raw.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pycriu import images as criu_images

from core.files import atomic_write

PAGE_SIZE = 4096
PE_PARENT = 1 << 0  # the page lives in the parent images (pre-dump chains)
PE_LAZY = 1 << 1  # served later by the lazy-pages daemon (post-copy)
PE_PRESENT = 1 << 2  # the page is in this dump's pages file


@dataclass(frozen=True)
class PageRange:
    vaddr: int
    nr_pages: int
    flags: int


@dataclass(frozen=True)
class PageMap:
    name: str
    """The pagemap file name, e.g. pagemap-1.img: the stable key of a process's memory across dumps."""
    pages_file: str
    ranges: tuple[PageRange, ...]

    def present_vaddrs(self) -> Iterator[int]:
        """Addresses of the pages stored in `pages_file`, in file order."""
        for r in self.ranges:
            if r.flags & PE_PRESENT:
                yield from range(r.vaddr, r.vaddr + r.nr_pages * PAGE_SIZE, PAGE_SIZE)

    def present_runs(self) -> Iterator[tuple[int, int]]:
        """(address, number of pages) of the ranges stored in `pages_file`, in file order."""
        for r in self.ranges:
            if r.flags & PE_PRESENT:
                yield r.vaddr, r.nr_pages

    @property
    def present_pages(self) -> int:
        return sum(r.nr_pages for r in self.ranges if r.flags & PE_PRESENT)

    @property
    def lazy_ranges(self) -> tuple[PageRange, ...]:
        """The ranges a lazy dump left in the process for the page server (post-copy)."""
        return tuple(r for r in self.ranges if r.flags & PE_LAZY)


def is_pagemap(name: str) -> bool:
    return name.endswith(".img") and "pagemap" in name


def is_pages(name: str) -> bool:
    return name.startswith("pages-") and name.endswith(".img")


def read_pagemap(path: Path) -> PageMap:
    with path.open("rb") as fh:
        img = criu_images.load(fh)
    head, *entries = img["entries"]
    ranges = tuple(
        PageRange(vaddr=int(e["vaddr"]), nr_pages=int(e["nr_pages"]), flags=int(e.get("flags", PE_PRESENT)))
        for e in entries
    )
    return PageMap(name=path.name, pages_file=f"pages-{head['pages_id']}.img", ranges=ranges)


def read_pagemaps(image_dir: Path) -> list[PageMap]:
    return [read_pagemap(p) for p in sorted(image_dir.iterdir()) if is_pagemap(p.name)]


def flatten_pagemap(path: Path) -> bool:
    """Mark pages that a pre-dump chain kept in parent images as present in this dump's own pages file.

    The target assembles complete pages files from everything it received, so the restore needs no
    parent images. Returns True when the pagemap changed.
    """
    with path.open("rb") as fh:
        img = criu_images.load(fh)
    changed = False
    for entry in img["entries"][1:]:
        flags = int(entry.get("flags", PE_PRESENT))
        if flags & PE_PARENT:
            entry["flags"] = (flags & ~PE_PARENT) | PE_PRESENT
            changed = True
    if changed:
        out = io.BytesIO()
        criu_images.dump(img, out)
        atomic_write(path, out.getvalue(), mode=0o600)
    return changed
