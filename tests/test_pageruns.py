"""The compact page bookkeeping of pre-copy (agent.checkpoint.pageruns) against plain lists and
dicts of every page (hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.checkpoint.images import PAGE_SIZE
from agent.checkpoint.pageruns import PageRuns, SlotMap, runs_of

BASE = 0x7F0000000000


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
