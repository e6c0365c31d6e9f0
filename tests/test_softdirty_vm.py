"""The soft-dirty pre-copy path, run where it can run: Debian's own kernel under QEMU.

Kernels without soft-dirty tracking (this host's) never take the CRIU pre-dump path of pre-copy
(`agent/migration/source.py`, `SourceContext.soft_dirty`). This test boots the cached test VM
(scripts/build-test-vm: Debian's 6.1 kernel, CONFIG_MEM_SOFT_DIRTY=y) with this tree and its venv
shared in, and runs tests/vm/inside_softdirty.py there: a pre-copy migration of memhog between two
containerds whose rounds are soft-dirty pre-dumps, memory checked page by page. The first run
builds the image (minutes); later runs reuse it.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import sys
from pathlib import Path

import pytest

from tests.conftest import ON_CI, require, require_root
from tests.harness.vm import REPO, Vm, build_image, venv_shares
from tests.harness.workloads import BUILD_DIR, static_binary

INSIDE = "tests/vm/inside_softdirty.py"
JOB_SECONDS = 1200.0  # emulated: Python runs 30-50x slower than on the (shared) host


def vm_job() -> str:
    """The VM's job: this tree's pytest on INSIDE, with only the plugins it needs."""
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "FERRYMAN_IN_VM": "1",
        "FERRYMAN_VM_RESULT": "/ferryman-io/result.json",
        "PYTHONDONTWRITEBYTECODE": "1",  # the tree is shared read-only
        # Only the plugins the test uses: importing the others (hypothesis) costs a minute under TCG.
        "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
        **({"CI": "true"} if ON_CI else {}),
    }
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    pytest_argv = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-p", "pytest_asyncio.plugin"]
    pytest_argv += ["-p", "pytest_timeout", "-o", f"timeout={JOB_SECONDS - 60:.0f}", INSIDE]
    return f"cd {shlex.quote(str(REPO))}\nexport {exports}\nexec {shlex.join(pytest_argv)}\n"


@pytest.mark.timeout(2400)  # a first run builds the image (debootstrap, kernel, containerd)
async def test_precopy_by_soft_dirty_pre_dumps_in_a_vm(workdir: Path) -> None:
    require_root()
    for tool in ("qemu-system-x86_64", "qemu-img", "debootstrap", "mkfs.ext4"):
        require(tool)
    image = await asyncio.to_thread(build_image)
    static_binary("memhog")  # built on the host: the VM finds it in the shared build dir (no gcc there)
    vm = Vm(image, workdir, [*venv_shares(), BUILD_DIR])
    run = await vm.run(vm_job(), within=JOB_SECONDS)
    print(f"VM job: rc {run.rc} in {run.seconds:.0f} s, image {image.manifest}")
    assert run.rc == 0, f"the VM's job failed (rc {run.rc}):\n{run.log_tail()}"

    result = json.loads((run.io / "result.json").read_text())
    assert result["features"]["mem_dirty_track"] is True
    stats = result["record"]["stats"]
    print(f"VM migration stats: {json.dumps(stats)}")
    assert result["record"]["state"] == "COMMIT"
    assert stats["round_source"] == "criu-pre-dump" and stats["iterations"] >= 2, stats
    first, *later = stats["dirty_pages"]
    assert all(pages < first // 4 for pages in later), stats  # incl. the stop-copy delta (last)
    assert result["verified"] == "ok"
    assert not vm.overlay.exists()
