"""The compact page bookkeeping of pre-copy (agent.checkpoint.pageruns), and the tracker and store
built on it, against plain lists and dicts of every page (hypothesis)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pycriu import images as criu_images

from agent.checkpoint.delta import DeltaStats, IncompleteImage, PageStore, PageTracker
from agent.checkpoint.images import PAGE_SIZE, PE_PRESENT
from agent.checkpoint.pageruns import PageRuns, SlotMap, runs_of

BASE = 0x7F0000000000
ZERO = bytes(PAGE_SIZE)


def address(page: int) -> int:
    return BASE + page * PAGE_SIZE


# Page numbers from a small space, so that runs touch, merge and leave gaps.
pages = st.integers(min_value=0, max_value=40)
distinct_pages = st.lists(pages, unique=True, max_size=40)


# ----- PageRuns -------------------------------------------------------------------------------------


@given(distinct_pages)
def test_page_runs_hold_the_sequence(numbers: list[int]) -> None:
    vaddrs = [address(n) for n in numbers]
    runs = PageRuns.of(vaddrs)
    assert list(runs) == vaddrs
    assert len(runs) == len(vaddrs)
    assert runs.run_count == len(list(runs_of(vaddrs)))
    assert all(runs.at(i) == v for i, v in enumerate(vaddrs))
    with pytest.raises(IndexError):
        runs.at(len(vaddrs))
    for n in range(-1, 42):
        expected = vaddrs.index(address(n)) if address(n) in vaddrs else None
        assert runs.position(address(n)) == expected
    assert runs.position(address(0) + 8) is None  # not a page address
    assert runs == PageRuns.of(iter(vaddrs))  # equal sequences, equal arrays


@given(distinct_pages, st.integers(0, 45), st.integers(0, 45))
def test_page_runs_slice_like_a_list(numbers: list[int], position: int, count: int) -> None:
    vaddrs = [address(n) for n in numbers]
    part = PageRuns.of(vaddrs).slice(position, count)
    assert list(part) == vaddrs[position : position + count]
    assert part == PageRuns.of(vaddrs[position : position + count])


@given(st.lists(st.tuples(pages, st.integers(1, 5)), max_size=12))
def test_page_runs_append_merges_runs(appended: list[tuple[int, int]]) -> None:
    runs, model = PageRuns(), []
    for first, count in appended:
        runs.append(address(first), count)
        model += [address(first + i) for i in range(count)]
    assert list(runs) == model
    assert runs == PageRuns.of(model)
    other = PageRuns()
    other.extend(runs)
    assert other == runs


@given(distinct_pages, distinct_pages)
def test_page_runs_differences_like_a_list(mine: list[int], theirs: list[int]) -> None:
    a, b = [address(n) for n in mine], [address(n) for n in theirs]
    expected = [i for i in range(len(a)) if i >= len(b) or a[i] != b[i]]
    got = [
        p for position, count in PageRuns.of(a).differences(PageRuns.of(b)) for p in range(position, position + count)
    ]
    assert got == expected


# ----- SlotMap ---------------------------------------------------------------------------------------


class SlotModel:
    """The store's old index: a dict, new pages appended to an order list one at a time."""

    def __init__(self) -> None:
        self.slots: dict[int, int] = {}
        self.order: list[int] = []

    def assign(self, vaddr: int, count: int) -> list[int]:
        out = []
        for v in range(vaddr, vaddr + count * PAGE_SIZE, PAGE_SIZE):
            if v not in self.slots:
                self.slots[v] = len(self.order)
                self.order.append(v)
            out.append(self.slots[v])
        return out


def flat(runs: list[tuple[int, int]] | None) -> list[int] | None:
    return None if runs is None else [slot for first, n in runs for slot in range(first, first + n)]


@given(st.lists(st.tuples(pages, st.integers(1, 6)), max_size=25), st.lists(st.tuples(pages, st.integers(0, 6))))
def test_slot_map_is_the_dict_it_replaces(assigned: list[tuple[int, int]], asked: list[tuple[int, int]]) -> None:
    slots, model = SlotMap(), SlotModel()
    for first, count in assigned:
        assert flat(slots.assign(address(first), count)) == model.assign(address(first), count)
        assert len(slots) == len(model.order)
    assert list(slots.order()) == model.order
    assert slots.run_count <= len(model.order)
    for first, count in asked:
        wanted = [address(first + i) for i in range(count)]
        expected = [model.slots[v] for v in wanted] if all(v in model.slots for v in wanted) else None
        assert flat(slots.lookup(address(first), count)) == expected
        missing = next((v for v in wanted if v not in model.slots), None)
        assert slots.first_missing(address(first), count) == missing
        assert slots.get(address(first)) == model.slots.get(address(first))


def test_slot_map_keeps_round_one_as_one_run() -> None:
    slots = SlotMap()
    for batch in range(4096):  # 1 Mi pages in batches of 256, as round one of a 4 GiB process sends them
        slots.assign(address(batch * 256), 256)
    assert len(slots) == 1 << 20 and slots.run_count == 1
    assert slots.get(address(123456)) == 123456


# ----- PageStore and PageTracker against the pages CRIU would write ----------------------------------


def write_dump(directory: Path, layout: dict[str, list[int]], content: dict[tuple[str, int], bytes]) -> None:
    """A dump's memory images: per pagemap the pages in `layout` order, as CRIU writes them."""
    directory.mkdir(parents=True)
    for pages_id, (name, vaddrs) in enumerate(sorted(layout.items())):
        entries: list[dict[str, int]] = [{"pages_id": pages_id}]
        entries += [{"vaddr": v, "nr_pages": n, "flags": PE_PRESENT, "compat_nr_pages": 0} for v, n in runs_of(vaddrs)]
        with (directory / name).open("wb") as fh:
            criu_images.dump({"magic": "PAGEMAP", "entries": entries}, fh)
        (directory / f"pages-{pages_id}.img").write_bytes(b"".join(content.get((name, v), ZERO) for v in vaddrs))


# One round: per pagemap, which pages the dump lists (in order) and the content of each.
page_contents = st.sampled_from([ZERO, b"\x01" * PAGE_SIZE, b"\x02" * PAGE_SIZE, bytes(range(256)) * 16])


@st.composite
def rounds(draw: st.DrawFn) -> list[tuple[dict[str, list[int]], dict[tuple[str, int], bytes]]]:
    out = []
    for _ in range(draw(st.integers(1, 4))):
        layout: dict[str, list[int]] = {}
        content: dict[tuple[str, int], bytes] = {}
        for name in draw(st.lists(st.sampled_from(["pagemap-1.img", "pagemap-7.img"]), unique=True, min_size=1)):
            numbers = draw(distinct_pages)
            if draw(st.booleans()):
                numbers.sort()  # the usual dump: address order
            layout[name] = [address(n) for n in numbers]
            for v in layout[name]:
                content[name, v] = draw(page_contents)
        out.append((layout, content))
    return out


@settings(max_examples=60, deadline=None)
@given(rounds(), st.integers(1, 3))
def test_tracker_and_store_rebuild_the_last_dump(
    history: list[tuple[dict[str, list[int]], dict[tuple[str, int], bytes]]], reversed_batches: int
) -> None:
    """Every round's delta is what a dict of every page's last content says changed; the store then
    rebuilds the last dump's pages files byte for byte."""
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        tracker, store = PageTracker(), PageStore(tmp / "store")
        sent: dict[str, dict[int, bytes]] = {}
        try:
            for number, (layout, content) in enumerate(history):
                dump = tmp / f"round-{number}"
                write_dump(dump, layout, content)
                stats = DeltaStats()
                batches = list(tracker.delta(dump, stats))
                for name, vaddrs in layout.items():
                    before = sent.get(name, {})
                    changed = [v for v in vaddrs if before.get(v) != content[name, v]]
                    got_data = [v for b in batches if b.pagemap == name for v in b.vaddrs]
                    got_zeros = [v for b in batches if b.pagemap == name for v in b.zeros]
                    assert got_data == [v for v in changed if content[name, v] != ZERO]
                    assert got_zeros == [v for v in changed if content[name, v] == ZERO]
                    if vaddrs:  # a pagemap without pages is not looked at
                        sent[name] = {v: content[name, v] for v in vaddrs}
                    memory = [content.get((name, address(n)), ZERO) for n in range(41)]
                    held = tracker.held_by_target(name, address(0), memoryview(b"".join(memory)))
                    assert held == [sent.get(name, {}).get(address(n)) == memory[n] for n in range(41)]
                assert stats.pages == sum(len(v) for v in layout.values())
                assert stats.pages == stats.changed + stats.zero + stats.unchanged
                if number == reversed_batches:  # pages may also arrive in another order
                    batches.reverse()
                for batch in batches:
                    store.add(batch.pagemap, batch.vaddrs, memoryview(b"".join(batch.data)), batch.zeros)
                for name, vaddrs in layout.items():
                    for v in vaddrs:
                        assert store.read(name, v) == content[name, v]
                    if vaddrs:
                        run = next(runs_of(sorted(vaddrs)))
                        expected = b"".join(content[name, run[0] + i * PAGE_SIZE] for i in range(run[1]))
                        assert store.read_run(name, run[0], run[1]) == expected
                assert store.read("pagemap-3.img", address(0)) is None
            layout, content = history[-1]
            final = tmp / f"round-{len(history) - 1}"
            originals = {p.name: p.read_bytes() for p in final.iterdir() if p.name.startswith("pages-")}
            for p in final.iterdir():
                if p.name.startswith("pages-"):
                    p.unlink()
            assert store.write_pages_files(final) == sum(len(v) for v in layout.values()) * PAGE_SIZE
            for name, data in originals.items():
                assert (final / name).read_bytes() == data, name
        finally:
            tracker.close()
            store.close()


def test_store_refuses_a_page_it_never_received(tmp_path: Path) -> None:
    store = PageStore(tmp_path / "store")
    store.add("pagemap-1.img", [address(0), address(1)], memoryview(b"\x01" * 2 * PAGE_SIZE), [])
    dump = tmp_path / "dump"
    write_dump(dump, {"pagemap-1.img": [address(0), address(1), address(2)]}, {})  # content: no pages file needed
    with pytest.raises(IncompleteImage, match=hex(address(2))):
        store.write_pages_files(dump)
    store.close()
