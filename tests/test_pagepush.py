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
from agent.migration.pagepush import PushCounts, Region, push
from agent.migration.postcopy import HeldByTarget
from agent.migration.pushflow import PushWindow
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


async def run_push(links: tuple[Link, Link], memory: int, held_by_target: HeldByTarget | None) -> Pushed:
    source, target = links
    window = PushWindow()
    for _ in range(4):
        window.acked()  # credits, as the target's push_ack would give
    out = Pushed()
    regions = [Region(os.getpid(), PAGEMAP, [(memory, PAGES)])]
    sending = asyncio.create_task(
        push(source, asyncio.Lock(), regions, held_by_target, out.progress.append, asyncio.Event(), window, out.counts)
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
