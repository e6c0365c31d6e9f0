"""Shared fixtures: a real registry and a real private containerd per session, scratch dirs per test.

A missing prerequisite is an error, never a skip: a green run must mean the real components ran.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from hypothesis import settings

# Hypothesis's per-example deadline (200 ms) is a timing assertion: on a loaded 2-core CI host it fails
# property tests that are correct. Speed belongs in bench/, so no test has a deadline.
settings.register_profile("ferryman", deadline=None)
settings.load_profile("ferryman")

# `tests.harness.*` imports need the repo root on sys.path; `.venv/bin/pytest` only adds tests/.
_REPO = str(Path(__file__).resolve().parent.parent)
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from tests.harness.containerd import (  # noqa: E402 (needs the sys.path line above)
    CONTAINERD,
    CTR,
    PrivateContainerd,
    pick_base_dir,
    unmount_under,
)
from tests.harness.mesh import agent_log_digest  # noqa: E402
from tests.harness.registry import DockerRegistry  # noqa: E402

# tests/etcd imports the etcd client, whose generated protobuf files ("rpc.proto", ...) collide in
# protobuf's default descriptor pool with pycriu's, which the agent's tests load: one process cannot
# hold both. `make test` runs tests/etcd as a second pytest run of its own (FERRYMAN_ETCD_TESTS=1).
ETCD_RUN = os.environ.get("FERRYMAN_ETCD_TESTS") == "1"
collect_ignore_glob = [] if ETCD_RUN else ["etcd/*"]


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """In the etcd run, only tests/etcd is collected."""
    if ETCD_RUN and collection_path.suffix == ".py" and "etcd" not in collection_path.parts:
        return collection_path.name != "conftest.py"
    return None


ON_CI = os.environ.get("CI") == "true"
PREREQUISITES = {
    "containerd": CONTAINERD,
    "ctr": CTR,
    "runc": "runc",
    "containerd-shim-runc-v2": "containerd-shim-runc-v2",
    "docker-registry": "docker-registry",
    "busybox": "/bin/busybox",
}


def require(name: str) -> str:
    """Path of a prerequisite binary, or a test *error* (pytest.fail) naming what to install."""
    target = PREREQUISITES.get(name, name)
    path = target if Path(target).is_absolute() and os.access(target, os.X_OK) else shutil.which(target)
    if path is None:
        where = "CI" if ON_CI else "this host"
        pytest.fail(f"prerequisite {name} missing on {where}: run scripts/setup-host", pytrace=False)
    return path


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("these tests drive containerd and runc and must run as root", pytrace=False)


BASE_DIR = pytest.StashKey[Path]()


@pytest.fixture(scope="session")
def base_dir(request: pytest.FixtureRequest) -> Iterator[Path]:
    """One scratch dir for the session, on a filesystem where overlay upper dirs work."""
    base = Path(tempfile.mkdtemp(prefix="ferryman-test-", dir=pick_base_dir()))
    request.config.stash[BASE_DIR] = base
    yield base
    unmount_under(base)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def workdir(base_dir: Path) -> Iterator[Path]:
    """A fresh dir per test under the session base (short path: unix sockets fit)."""
    path = Path(tempfile.mkdtemp(prefix="w-", dir=base_dir))
    yield path
    # Never rmtree through a mount a failed test left behind.
    unmount_under(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
async def registry(base_dir: Path) -> AsyncIterator[DockerRegistry]:
    require("docker-registry")
    reg = DockerRegistry(base_dir / "registry")
    await reg.start()
    try:
        yield reg
    finally:
        await reg.stop()


@pytest.fixture(scope="session")
async def containerd(base_dir: Path) -> AsyncIterator[PrivateContainerd]:
    require_root()
    for name in ("containerd", "ctr", "runc", "containerd-shim-runc-v2", "busybox"):
        require(name)
    ctrd = PrivateContainerd(base_dir / "containerd")
    try:
        await ctrd.start()
        yield ctrd
    finally:
        await ctrd.stop()


LEAK_GRACE = 1.0
"""Seconds a task left behind by a test may take to end by itself before it counts as leaked."""


@pytest.fixture(autouse=True)
async def no_leaked_tasks() -> AsyncIterator[None]:
    """Fail a test that leaves asyncio tasks running on the shared session loop."""
    before = asyncio.all_tasks()
    yield
    for _ in range(3):  # let tasks that are already finishing run their last step
        await asyncio.sleep(0)
    # Setup and teardown may run in different tasks: exclude whichever runs this code now.
    leaked = [t for t in asyncio.all_tasks() - before - {asyncio.current_task()} if not t.done()]
    if leaked:
        # A cancelled gRPC stream (the agent's containerd event subscription, at close) ends its
        # status task on grpc's poller thread, some milliseconds later: what ends by itself soon is
        # no leak.
        _, pending = await asyncio.wait(leaked, timeout=LEAK_GRACE)
        leaked = list(pending)
    for task in leaked:
        task.cancel()
    if leaked:
        await asyncio.gather(*leaked, return_exceptions=True)
        pytest.fail(f"test left {len(leaked)} asyncio task(s) pending: {leaked!r}", pytrace=False)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A scratch directory under /tmp: unix socket paths are limited to 107 bytes, and pytest's
    tmp_path can be longer."""
    path = Path(tempfile.mkdtemp(prefix="fm-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A test that failed while a mesh was up (a module's shared one) gets what its agents logged
    meanwhile in its report: the mesh's directory is gone by the end of the run."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    base = item.config.stash.get(BASE_DIR, None)
    if report.when != "call" or not report.failed or base is None:
        return
    # <base>/<mesh>/<host>/agent.log, or one level down for a mesh in a test's own workdir
    logs = sorted([*base.glob("*/*/agent.log"), *base.glob("*/*/*/agent.log")])
    digests = [agent_log_digest(log, since=call.start) for log in logs]
    if text := "".join(digests):
        report.sections.append(("agent logs", text))

