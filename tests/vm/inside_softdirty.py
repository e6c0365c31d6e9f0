"""Runs inside the test VM only (tests/test_softdirty_vm.py boots it and runs this file there).

A pre-copy migration between two containerds of a mesh on a kernel with soft-dirty tracking, so its
rounds are CRIU pre-dumps through runc, each chained on the previous one. Not named test_*.py: the
normal suite does not collect it on the host (whose kernel cannot run it); the VM's job names it.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest

from agent.checkpoint.features import detect as detect_criu
from tests.harness.fleet import fleet, memhog_status, migrate, run_memhog, task_states, verify_memory

RESULT = os.environ.get("FERRYMAN_VM_RESULT", "")


async def test_precopy_by_soft_dirty_pre_dumps(base_dir: Path) -> None:
    if os.environ.get("FERRYMAN_IN_VM") != "1":
        pytest.fail("runs inside the test VM only (tests/test_softdirty_vm.py)", pytrace=False)
    features = await detect_criu()
    assert features.mem_dirty_track, f"the VM's kernel should track soft-dirty pages: {features}"
    # Emulated (TCG) on a shared machine, Python runs some 30-50x slower than on the host: an agent
    # takes minutes to start.
    started = time.monotonic()
    async with fleet(base_dir, hosts=2, idle_timeout=120, agent_within=400) as mesh:
        print(f"fleet up after {time.monotonic() - started:.0f} s")
        h1, h2 = mesh["h1"], mesh["h2"]
        # Slow rewrites (5 pages/s): rounds take tens of seconds here, and a round must not see every
        # page rewritten since the one before.
        await run_memhog(h1, mesh, "hog", resident_mib=8, rewrite_mbps=0.02)
        before = await memhog_status(h1, "hog")
        print(f"memhog up after {time.monotonic() - started:.0f} s")
        # A 1 ms target is never met: rounds go on to the limit, so pre-dumps chain on their parents.
        record = await migrate(h1, "hog", "h2", downtime_target_ms=1, max_iterations=3, mode="precopy")
        print(f"migrated after {time.monotonic() - started:.0f} s: {json.dumps(record)}")
        verified = await verify_memory(h2, "hog", within=60) if task_states(h2).get("hog") == "RUNNING" else "-"
        after = await memhog_status(h2, "hog") if verified != "-" else None
        if RESULT:
            Path(RESULT).write_text(
                json.dumps({"features": features.to_json(), "record": record, "verified": verified})
            )
        assert record["state"] == "COMMIT", (record, h1.agent_log_tail(40), h2.agent_log_tail(40))
        stats = record["stats"]
        assert stats["round_source"] == "criu-pre-dump", stats
        # Rounds after the first, and the stop-copy (the last entry), send only what was written since.
        first, *later = stats["dirty_pages"]
        assert stats["iterations"] >= 2 and all(pages < first // 4 for pages in later), stats
        assert task_states(h2) == {"hog": "RUNNING"}
        assert "hog" not in task_states(h1)
        assert verified == "ok"  # memhog checks every page against its generation
        await asyncio.sleep(0.5)
        assert after is not None and (await memhog_status(h2, "hog")).beats > before.beats
