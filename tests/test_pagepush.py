"""The source's push of post-copy pages, read from a real process's memory (/proc/PID/mem) and sent
over a real stream channel. In hybrid, pages the target holds are named, not sent."""

from __future__ import annotations

import asyncio
import ctypes
import mmap
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.checkpoint.images import PAGE_SIZE
from agent.migration.link import ControlIn, Link, PagesIn, split_key
from agent.migration.pagepush import PushCounts, Region, next_unsent, push
from agent.migration.pageserve import sent_again
from agent.migration.postcopy import HeldByTarget
from agent.migration.pushflow import PushWindow
from agent.migration.ranges import PageRanges
from tests.harness.links import link_pair

PAGEMAP = "pagemap-1.img"
PAGES = 600  # three batches: 256, 256 and 88 pages


@pytest.fixture
async def links(tmp_path: Path) -> AsyncIterator[tuple[Link, Link]]:
    async with link_pair(tmp_path, "mig-push") as pair:
        yield pair


@pytest.fixture
def memory() -> Iterator[int]:
    """PAGES pages of this process's memory, each filled with its index: the address of the first."""
    area = mmap.mmap(-1, PAGES * PAGE_SIZE)
    for n in range(PAGES):
        area[n * PAGE_SIZE : (n + 1) * PAGE_SIZE] = content(n)
    anchor = ctypes.c_char.from_buffer(area)
    try:
        yield ctypes.addressof(anchor)
    finally:
        del anchor
        area.close()


@dataclass
class Pushed:
    messages: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    data: dict[int, bytes] = field(default_factory=dict)
    """Address -> content of every page that crossed."""
    counts: PushCounts = field(default_factory=PushCounts)
    progress: list[int] = field(default_factory=list)


async def run_push(
    links: tuple[Link, Link], memory: int, held_by_target: HeldByTarget | None, sent: PageRanges | None = None
) -> Pushed:
    source, target = links
    window = PushWindow()
    for _ in range(4):
        window.acked()  # credits, as the target's push_ack would give
    out = Pushed()
    regions = [Region(os.getpid(), PAGEMAP, [(memory, PAGES)])]
    sending = asyncio.create_task(
        push(
            source,
            asyncio.Lock(),
            regions,
            held_by_target,
            out.progress.append,
            asyncio.Event(),
            window,
            out.counts,
            sent,
        )
    )
    async with asyncio.timeout(10):
        while not out.messages or out.messages[-1][0] != "push_end":
            msg = await target.recv()
            if isinstance(msg, PagesIn):
                for index, key in enumerate(msg.keys):
                    out.data[split_key(key)[1]] = bytes(msg.data[index * PAGE_SIZE : (index + 1) * PAGE_SIZE])
                continue
            assert isinstance(msg, ControlIn)
            out.messages.append((msg.type, msg.body))
        await sending
    return out


def content(n: int) -> bytes:
    return bytes([n % 251 + 1]) * PAGE_SIZE


async def test_lazy_pushes_every_page_in_address_order(links: tuple[Link, Link], memory: int) -> None:
    pushed = await run_push(links, memory, None)
    assert [(kind, body.get("vaddr")) for kind, body in pushed.messages] == [
        ("pushed", memory),
        ("pushed", memory + 256 * PAGE_SIZE),
        ("pushed", memory + 512 * PAGE_SIZE),
        ("push_end", None),
    ]
    assert pushed.data == {memory + n * PAGE_SIZE: content(n) for n in range(PAGES)}
    assert pushed.counts.pages == PAGES and pushed.counts.held == 0 and sum(pushed.progress) == PAGES


async def test_hybrid_sends_only_what_the_target_does_not_hold(links: tuple[Link, Link], memory: int) -> None:
    changed = set(range(300, 310)) | {599}  # pages the target does not hold: in batches 2 and 3

    def held_by_target(pagemap: str, vaddr: int, data: memoryview) -> list[bool]:
        first = (vaddr - memory) // PAGE_SIZE
        return [first + n not in changed for n in range(len(data) // PAGE_SIZE)]

    pushed = await run_push(links, memory, held_by_target)
    messages = pushed.messages
    assert [kind for kind, _ in messages] == ["pushed", "pushed", "pushed", "push_end"]
    assert messages[0][1]["held"] == [[0, 256]]  # batch 1: all held, so no pages follow
    assert messages[1][1]["held"] == [[0, 44], [54, 202]]  # batch 2 starts at page 256
    assert messages[2][1]["held"] == [[0, 87]]
    assert pushed.data == {memory + n * PAGE_SIZE: content(n) for n in changed}  # no held page crossed
    assert pushed.counts.pages == PAGES and pushed.counts.held == PAGES - len(changed)
    assert sum(pushed.progress) == PAGES


async def test_the_push_leaves_out_what_replies_sent(links: tuple[Link, Link], memory: int) -> None:
    """Pages a fault's reply brought early are not pushed again, and the push marks what it sent."""
    dst_id = 1  # PAGEMAP's task
    sent = PageRanges()
    sent.add(dst_id, memory + 10 * PAGE_SIZE, 20)  # inside batch 1
    sent.add(dst_id, memory + 256 * PAGE_SIZE, 256)  # all of batch 2
    pushed = await run_push(links, memory, None, sent)
    assert [(kind, body.get("vaddr"), body.get("nr_pages")) for kind, body in pushed.messages] == [
        ("pushed", memory, 10),
        ("pushed", memory + 30 * PAGE_SIZE, 226),
        ("pushed", memory + 512 * PAGE_SIZE, 88),
        ("push_end", None, None),
    ]
    unsent = set(range(10, 30)) | set(range(256, 512))
    assert pushed.data == {memory + n * PAGE_SIZE: content(n) for n in range(PAGES) if n not in unsent}
    assert pushed.counts.pages == PAGES - len(unsent) and pushed.counts.skipped == len(unsent)
    assert sum(pushed.progress) == PAGES - len(unsent)
    assert sent.missing(dst_id, memory, PAGES) == []  # everything has crossed once now


def test_next_unsent_run_of_a_batch() -> None:
    sent = PageRanges()
    vaddr = 0x7F0000000000
    assert next_unsent(sent, 1, vaddr, 256, 0) == (0, 256)
    sent.add(1, vaddr, 4)
    sent.add(1, vaddr + 100 * PAGE_SIZE, 10)
    assert next_unsent(sent, 1, vaddr, 256, 0) == (4, 96)
    assert next_unsent(sent, 1, vaddr, 256, 100) == (110, 146)
    assert next_unsent(sent, 2, vaddr, 256, 0) == (0, 256)  # another task's pages
    sent.add(1, vaddr + 110 * PAGE_SIZE, 146)
    assert next_unsent(sent, 1, vaddr, 256, 100) is None


def test_a_reply_counts_the_pages_that_crossed_before() -> None:
    sent = PageRanges()
    vaddr = 0x7F0000000000
    assert sent_again(sent, 1, vaddr, [False] * 8) == 0
    sent.add(1, vaddr + 2 * PAGE_SIZE, 4)  # pages 2-5 went in a push
    assert sent_again(sent, 1, vaddr, [False] * 8) == 4
    assert sent_again(sent, 1, vaddr, [False, False, True, True, False, False, False, False]) == 2  # held: none sent
