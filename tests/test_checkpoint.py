"""Checkpoints through containerd with the real CRIU: dumps into a directory, the page delta, restore."""

from __future__ import annotations

import asyncio
import secrets
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.app import Agent
from agent.checkpoint.delta import DeltaStats, IncompleteImage, PageStore, PageTracker
from agent.checkpoint.features import detect
from agent.checkpoint.images import is_pages, read_pagemaps
from agent.containerd import TaskStatus
from agent.model import CreateRequest
from tests.harness.agent import agent_config, running_agent
from tests.harness.containerd import PrivateContainerd
from tests.harness.registry import DockerRegistry
from tests.harness.workloads import MemhogStatus, bundle_rootfs, memhog_image


@pytest.fixture(scope="module")
async def memhog_ref(registry: DockerRegistry) -> str:
    name = f"test/memhog-{secrets.token_hex(3)}"
    await memhog_image(resident_mib=8, rewrite_mbps=2).build().push(registry.host, name, "v1")
    return f"{registry.host}/{name}:v1"


@pytest.fixture
async def agent(
    containerd: PrivateContainerd, registry: DockerRegistry, workdir: Path, memhog_ref: str
) -> AsyncIterator[Agent]:
    async with running_agent(agent_config(containerd, [registry.registry_config()], workdir)) as a:
        await a.images.pull(memhog_ref)
        yield a


async def status(ctrd: PrivateContainerd, agent: Agent, cid: str) -> MemhogStatus:
    path = bundle_rootfs(ctrd.state, agent.containerd.namespace, cid) / "tmp" / "status"
    for _ in range(100):
        if path.exists():
            return MemhogStatus.parse(path.read_text())
        await asyncio.sleep(0.05)
    raise AssertionError(f"no status at {path}")


async def test_criu_features_detected() -> None:
    features = await detect()
    assert tuple(int(p) for p in features.version.split(".")) >= (4, 2, 1)
    assert features.uffd  # this kernel has userfaultfd


async def test_dump_delta_and_rebuild(
    agent: Agent, containerd: PrivateContainerd, memhog_ref: str, tmp_path: Path
) -> None:
    cid = f"m-{secrets.token_hex(3)}"
    await agent.containers.create(CreateRequest(id=cid, image=memhog_ref))
    await agent.containers.start(cid)
    await status(containerd, agent, cid)
    tasks = agent.containerd.tasks

    tracker, store = PageTracker(), PageStore(tmp_path / "store")
    rounds: list[DeltaStats] = []
    for n in range(3):
        dump = tmp_path / f"round-{n}"
        dump.mkdir()
        await tasks.checkpoint(cid, str(dump), leave_running=True)
        assert (await tasks.get(cid)).status == TaskStatus.RUNNING  # pre-copy dumps leave it running
        stats = DeltaStats()
        for batch in await asyncio.to_thread(lambda d=dump, s=stats: list(tracker.delta(d, s))):
            data = memoryview(b"".join(batch.data))
            store.add(batch.pagemap, batch.vaddrs, data, batch.zeros)
        rounds.append(stats)
        await asyncio.sleep(0.3)

    first, later = rounds[0], rounds[-1]
    assert first.changed + first.zero == first.pages  # round one: everything is new
    assert first.pages >= 8 * 256  # the 8 MiB the workload holds
    assert later.unchanged > 0.5 * later.pages  # 2 MB/s rewrites touch only part of it
    assert 0 < later.changed < first.changed

    # The final dump's pages rebuilt from the store alone are byte-identical to CRIU's own.
    final = tmp_path / "round-2"
    originals = {p.name: p.read_bytes() for p in final.iterdir() if is_pages(p.name)}
    rebuilt = tmp_path / "rebuilt"
    shutil.copytree(final, rebuilt, ignore=shutil.ignore_patterns("pages-*.img"))
    written = store.write_pages_files(rebuilt)
    assert written == sum(len(v) for v in originals.values())
    for name, data in originals.items():
        assert (rebuilt / name).read_bytes() == data, name
    assert {pm.pages_file for pm in read_pagemaps(rebuilt)} <= set(originals)

    # Pages that arrived in another order (mappings changed between rounds) take the copying path.
    shuffled = PageStore(tmp_path / "shuffled")
    replay = PageTracker()
    batches = await asyncio.to_thread(lambda: list(replay.delta(final, DeltaStats())))
    for batch in reversed(batches):
        shuffled.add(batch.pagemap, batch.vaddrs, memoryview(b"".join(batch.data)), batch.zeros)
    again = tmp_path / "rebuilt-again"
    shutil.copytree(final, again, ignore=shutil.ignore_patterns("pages-*.img"))
    shuffled.write_pages_files(again)
    for name, data in originals.items():
        assert (again / name).read_bytes() == data, name

    # A store that misses a page refuses to write a hole.
    with pytest.raises(IncompleteImage):
        PageStore(tmp_path / "empty").write_pages_files(rebuilt)


async def test_paused_dump_stays_frozen_and_resumes(
    agent: Agent, containerd: PrivateContainerd, memhog_ref: str, tmp_path: Path
) -> None:
    cid = f"m-{secrets.token_hex(3)}"
    await agent.containers.create(CreateRequest(id=cid, image=memhog_ref))
    await agent.containers.start(cid)
    before = await status(containerd, agent, cid)
    tasks = agent.containerd.tasks
    await tasks.pause(cid)
    await tasks.checkpoint(cid, str(tmp_path), leave_running=True)
    assert (await tasks.get(cid)).status == TaskStatus.PAUSED  # the final dump leaves it frozen, not killed
    frozen = await status(containerd, agent, cid)
    await asyncio.sleep(0.5)
    assert (await status(containerd, agent, cid)).beats == frozen.beats
    await tasks.resume(cid)  # rollback: the source copy simply continues
    await asyncio.sleep(0.5)
    after = await status(containerd, agent, cid)
    assert after.beats > frozen.beats >= before.beats


def test_pre_dump_chain_pagemaps_are_flattened(tmp_path: Path) -> None:
    """Pages a pre-dump chain left in parent images come from the target's store like the others."""
    from pycriu import images as criu_images

    from agent.checkpoint.images import PE_PARENT, PE_PRESENT, flatten_pagemap, read_pagemap
    from agent.checkpoint.runc import checkpoint_argv

    img = {
        "magic": "PAGEMAP",
        "entries": [
            {"pages_id": 7},
            {"vaddr": 0x10000, "nr_pages": 2, "flags": PE_PRESENT, "compat_nr_pages": 0},
            {"vaddr": 0x20000, "nr_pages": 3, "flags": PE_PARENT, "compat_nr_pages": 0},
        ],
    }
    path = tmp_path / "pagemap-1.img"
    with path.open("wb") as fh:
        criu_images.dump(img, fh)
    assert read_pagemap(path).present_pages == 2
    assert flatten_pagemap(path) is True
    flat = read_pagemap(path)
    assert flat.present_pages == 5 and flat.pages_file == "pages-7.img"
    assert list(flat.present_vaddrs())[2:] == [0x20000, 0x21000, 0x22000]
    assert flatten_pagemap(path) is False  # idempotent
    # The final dump of a chain names its parent relative to its own image dir, as CRIU requires.
    argv = checkpoint_argv(
        "/run/r/ns", "c1", tmp_path / "final", tmp_path / "w", pre_dump=False, parent=tmp_path / "round-2"
    )
    assert argv[argv.index("--parent-path") + 1] == "../round-2"
    assert "--leave-running" in argv and "--pre-dump" not in argv


def test_pages_file_from_a_reordered_store(tmp_path: Path) -> None:
    """A store whose pages arrived out of address order (a page that only the final dump had, sent
    last) still yields the exact pages file CRIU expects, by runs of copies."""
    import os

    from pycriu import images as criu_images

    from agent.checkpoint.images import PAGE_SIZE, PE_PRESENT

    vaddrs = [0x400000 + i * PAGE_SIZE for i in range(200)]
    content = {v: os.urandom(PAGE_SIZE) for v in vaddrs}
    content[vaddrs[150]] = bytes(PAGE_SIZE)  # a zero page: a hole in the store
    store = PageStore(tmp_path / "store")
    late = vaddrs[0]  # first in the dump, last to arrive
    first_round = vaddrs[1:]
    zeros = [v for v in first_round if content[v] == bytes(PAGE_SIZE)]
    data = [v for v in first_round if v not in zeros]
    store.add("pagemap-1.img", data, memoryview(b"".join(content[v] for v in data)), zeros)
    store.add("pagemap-1.img", [late], memoryview(content[late]), [])
    images = tmp_path / "images"
    images.mkdir()
    with (images / "pagemap-1.img").open("wb") as fh:
        criu_images.dump(
            {
                "magic": "PAGEMAP",
                "entries": [
                    {"pages_id": 3},
                    {"vaddr": vaddrs[0], "nr_pages": len(vaddrs), "flags": PE_PRESENT, "compat_nr_pages": 0},
                ],
            },
            fh,
        )
    assert store.write_pages_files(images) == len(vaddrs) * PAGE_SIZE
    assert (images / "pages-3.img").read_bytes() == b"".join(content[v] for v in vaddrs)
    store.close()


def test_tracker_keeps_what_a_pre_dump_left_in_its_parent(tmp_path: Path) -> None:
    """A soft-dirty dump holds only the pages written since its parent: the pages it left there are
    still on the target, so a later dump that holds them again (unchanged) sends nothing for them."""
    import os

    from pycriu import images as criu_images

    from agent.checkpoint.images import PAGE_SIZE, PE_PARENT, PE_PRESENT

    base = 0x400000
    content = [os.urandom(PAGE_SIZE) for _ in range(8)]

    def dump(name: str, ranges: list[tuple[int, int, int]], pages: list[bytes]) -> Path:
        image = tmp_path / name
        image.mkdir()
        entries = [{"vaddr": base + first * PAGE_SIZE, "nr_pages": n, "flags": f, "compat_nr_pages": 0}
                   for first, n, f in ranges]  # fmt: skip
        with (image / "pagemap-1.img").open("wb") as fh:
            criu_images.dump({"magic": "PAGEMAP", "entries": [{"pages_id": 1}, *entries]}, fh)
        (image / "pages-1.img").write_bytes(b"".join(pages))
        return image

    tracker = PageTracker()
    try:
        first = DeltaStats()
        list(tracker.delta(dump("round-1", [(0, 8, PE_PRESENT)], content), first))
        assert first.changed == 8
        content[3] = os.urandom(PAGE_SIZE)  # one page written: the pre-dump holds it alone
        second = DeltaStats()
        chained = [(0, 3, PE_PARENT), (3, 1, PE_PRESENT), (4, 4, PE_PARENT)]
        list(tracker.delta(dump("round-2", chained, [content[3]]), second))
        assert (second.pages, second.changed) == (1, 1)
        # Hybrid's post-copy asks the same digests: the parent's pages are on the target already.
        assert tracker.held_by_target("pagemap-1.img", base, memoryview(b"".join(content[:5]))) == [True] * 5
        content[5] = os.urandom(PAGE_SIZE)
        final = DeltaStats()  # a dump that holds every page again (a huge page, a full dump): one changed
        batches = list(tracker.delta(dump("final", [(0, 8, PE_PRESENT)], content), final))
        assert (final.pages, final.changed, final.unchanged) == (8, 1, 7)
        assert [v for b in batches for v in b.vaddrs] == [base + 5 * PAGE_SIZE]
    finally:
        tracker.close()
