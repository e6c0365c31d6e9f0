"""`scripts/mesh` and ferryctl as a person uses them, through the real binaries: a fleet that every
documented command works against, the README's quick start as it stands, and a teardown (SIGTERM,
`down`, or `cleanup` after SIGKILL) that leaves nothing of the fleet behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require, require_root
from tests.harness import netns as nsh
from tests.harness.containerd import cgroup_pids, pick_base_dir
from tests.harness.mesh import STATE_DIR, _cmdline, _is_zombie, _pids_using_dir

pytestmark = pytest.mark.timeout(300)
REPO = Path(__file__).resolve().parent.parent
MESH = REPO / "scripts" / "mesh"
BIN = Path(sys.executable).parent
FERRYCTL = BIN / "ferryctl"
# CRIU >= 4.2.1 is in /usr/local/sbin (the Makefile's PATH); ferryctl's venv as the env files set it.
PATH = f"/usr/local/sbin:/usr/local/bin:{BIN}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
QUICKSTART = re.compile(r"<!-- quickstart:[^>]*-->\s*```sh\n(.*?)```", re.DOTALL)


def _clean_env(extra: Mapping[str, str] = {}) -> dict[str, str]:
    """This process's environment without a fleet of its own (FERRYMAN_*, MESH_*), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FERRYMAN_", "MESH_"))}
    return {**env, "PATH": PATH, **extra}


async def _run(
    argv: Sequence[str], env: Mapping[str, str] | None = None, within: float = 120.0, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_clean_env(env or {}),
        cwd=REPO,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin.encode() if stdin else None), within)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return subprocess.CompletedProcess(list(argv), proc.returncode, out.decode(), err.decode())


# ----- what a fleet leaves behind


@dataclass
class Traces:
    """What a running fleet has made, recorded while it runs, to look for once it is gone."""

    prefix: str
    dir: Path
    netns_inodes: set[int] = field(default_factory=set)
    """The mesh's namespaces and its containers' (these carry no mesh name)."""
    pids: set[int] = field(default_factory=set)
    cgroups: list[str] = field(default_factory=list)
    root_links: set[str] = field(default_factory=set)
    """The root namespace's fm* links before the fleet started (other meshes' are not ours)."""
    seen_alive: float = 0.0
    """When the mesh's namespaces were last seen (CLOCK_BOOTTIME). Once they are gone the kernel
    reuses their inodes, so a process found by inode counts only if it started before this."""

    def record(self, container_netns: Sequence[str] = ()) -> None:
        names = [n for n in nsh.list_netns() if n.startswith(f"{self.prefix}-")]
        self.netns_inodes |= {i for i in map(nsh.netns_inode, [*names, *container_netns]) if i is not None}
        self.pids |= set(nsh.pids_in_netns(self.netns_inodes)) | set(_pids_using_dir(str(self.dir)))
        state = json.loads((STATE_DIR / f"{self.prefix}.json").read_text())
        self.cgroups = [c["cgroup_parent"] for c in state["containerds"]]
        self.seen_alive = time.clock_gettime(time.CLOCK_BOOTTIME)

    def left(self) -> list[str]:
        found = [f"netns {n}" for n in nsh.list_netns() if n.startswith(f"{self.prefix}-")]
        if found:
            self.seen_alive = time.clock_gettime(time.CLOCK_BOOTTIME)
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            if str(self.dir) in line or any(f"net:[{i}]" in line for i in self.netns_inodes):
                found.append(f"mount {line}")
        new_links = {n for n in nsh.link_names() if n.startswith("fm")} - self.root_links
        found += [f"link {n}" for n in sorted(new_links)]
        live = {p for p in self.pids if Path(f"/proc/{p}").exists() and not _is_zombie(p)}
        live |= {p for p in nsh.pids_in_netns(self.netns_inodes) if (nsh.pid_started_at(p) or 0.0) <= self.seen_alive}
        live |= set(_pids_using_dir(str(self.dir)))
        found += [f"process {p}: {' '.join(_cmdline(p))}" for p in sorted(live) if not _is_zombie(p)]
        found += [f"cgroup {c}" for c in self.cgroups if cgroup_pids(c)]
        for path in (self.dir, Path(f"/dev/shm/ferryman-{self.prefix}"), STATE_DIR / f"{self.prefix}.json"):
            if path.exists():
                found.append(f"file {path}")
        return found


async def _gone(traces: Traces, within: float = 20.0) -> list[str]:
    """What is left of the fleet once teardown had `within` seconds (killed shims take a moment)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        left = traces.left()
        if not left or loop.time() >= deadline:
            return left
        await asyncio.sleep(0.5)


# ----- a fleet through scripts/mesh up


@dataclass
class Fleet:
    proc: asyncio.subprocess.Process
    info: dict[str, Any]
    traces: Traces

    @property
    def env(self) -> dict[str, str]:
        return dict(self.info["env"])

    async def ferryctl(self, *args: str, env: Mapping[str, str] = {}) -> subprocess.CompletedProcess[str]:
        """The real ferryctl, configured by the fleet's env file only (as after `source <dir>/env`)."""
        return await _run([str(FERRYCTL), *args], {**self.env, **env})

    async def ok(self, *args: str, env: Mapping[str, str] = {}) -> str:
        res = await self.ferryctl(*args, env=env)
        assert res.returncode == 0, f"ferryctl {' '.join(args)}: {res.returncode}\n{res.stdout}\n{res.stderr}"
        return res.stdout


@asynccontextmanager
async def mesh_up(parent: Path, *args: str) -> AsyncIterator[Fleet]:
    """`scripts/mesh up --json ...` in the foreground, as a child; whatever happens, nothing stays."""
    for name in ("containerd", "runc", "docker-registry", "busybox", "gcc"):
        require(name)
    root_links = {n for n in nsh.link_names() if n.startswith("fm")}
    argv = [str(MESH), "up", "--json", "--dir", str(parent), *args]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_clean_env(), cwd=REPO
    )
    prefix = None
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 120)
        if not line:
            raise AssertionError(f"scripts/mesh up failed: {(await proc.stderr.read()).decode()}")
        info = json.loads(line)
        prefix = info["prefix"]
        traces = Traces(prefix, Path(info["dir"]), root_links=root_links)
        traces.record()
        yield Fleet(proc, info, traces)
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 90)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if prefix is not None:
            await _run([str(MESH), "cleanup", "--prefix", prefix])


async def _run_web(fleet: Fleet, name: str = "web") -> dict[str, Any]:
    """The documented start: pull, then run the web image with the env's service address."""
    await fleet.ok("pull", fleet.env["MESH_WEB_IMAGE"])
    await fleet.ok("run", "--name", name, "--service-ip", fleet.env["MESH_SERVICE_IP"], fleet.env["MESH_WEB_IMAGE"])
    inspected = json.loads(await fleet.ok("inspect", name))
    assert inspected["network"]["service_ip"] == fleet.env["MESH_SERVICE_IP"], inspected["network"]
    return dict(inspected)


async def _client_get(fleet: Fleet, within: float = 10.0) -> str:
    """What the client namespace gets from the service address (the README's wget), once it answers:
    a container just started may not listen yet."""
    url = f"http://{fleet.env['MESH_SERVICE_IP']}:8080/"
    # No -T: a timeout option crashes Debian 12's busybox wget (1.35); _run bounds the call instead.
    argv = ["nsenter", f"--net={fleet.env['MESH_CLIENT_NETNS']}", "busybox", "wget", "-qO-", url]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        res = await _run(argv, within=30)
        if res.returncode == 0 or loop.time() >= deadline:
            return res.stdout.strip() or res.stderr.strip()
        await asyncio.sleep(0.2)


async def _where(fleet: Fleet, name: str) -> list[str]:
    """The hosts whose agent lists `name` as running."""
    found = []
    for host in fleet.info["hosts"]:
        listed = json.loads(await fleet.ok("--json", "ps", env={"FERRYMAN_AGENT": host["api"]}))["containers"]
        found += [host["name"] for c in listed if c["id"] == name]
    return found


async def test_up_runs_every_documented_command(base_dir: Path) -> None:
    """run, migrate in every mode (through the coordinator and agent to agent), drain, uncordon,
    predictions, hosts, migrations, env; then `down` removes everything."""
    require_root()
    async with mesh_up(base_dir / "cli-docs", "--hosts", "2", "--client") as fleet:
        env, info = fleet.env, fleet.info
        # What up says: each host, the coordinator on loopback, the images, the env files.
        assert [h["name"] for h in info["hosts"]] == ["h1", "h2"]
        assert env["FERRYMAN_AGENT"] == info["hosts"][0]["api"] and env["MESH_AGENT_H2"] == info["hosts"][1]["api"]
        assert env["FERRYMAN_COORDINATOR"].startswith("https://127.0.0.1:")
        assert all(Path(env[k]).is_file() for k in ("FERRYMAN_CA", "FERRYMAN_CERT", "FERRYMAN_KEY"))
        env_file = Path(info["env_file"]).read_text()
        assert f"export FERRYMAN_COORDINATOR={env['FERRYMAN_COORDINATOR']}\n" in env_file
        from_env = await _run([str(MESH), "env", "h2", "--prefix", info["prefix"]])
        assert from_env.returncode == 0 and from_env.stdout == Path(info["hosts"][1]["env_file"]).read_text()
        assert f"export FERRYMAN_AGENT={info['hosts'][1]['api']}\n" in from_env.stdout

        hosts = await fleet.ok("hosts")
        assert re.search(r"h1\s+ready", hosts) and re.search(r"h2\s+ready", hosts), hosts
        inspected = await _run_web(fleet)
        netns = inspected["network"]["netns"]
        fleet.traces.record([netns])
        assert netns.startswith(f"{info['dir']}/h1/netns/")  # the mesh's own dir, not /run/netns
        assert await _client_get(fleet) == "served"

        for mode, target in (("precopy", "h2"), ("lazy", "h1"), ("hybrid", "h2")):
            out = await fleet.ok("migrate", "web", "--to", target, "--mode", mode)
            assert "committed" in out, out
            assert await _where(fleet, "web") == [target]
            assert await _client_get(fleet) == "served"
        agent_direct = {"FERRYMAN_COORDINATOR": "", "FERRYMAN_AGENT": env["MESH_AGENT_H2"]}
        out = await fleet.ok("migrate", "web", "--to", "h1", "--mode", "precopy", env=agent_direct)
        assert "COMMIT" in out and "mode         precopy" in out, out
        assert await _where(fleet, "web") == ["h1"]

        drained = json.loads(await fleet.ok("--json", "drain", "h1", "--wait", "90"))
        assert drained["host"]["state"] == "drained", drained
        assert await _where(fleet, "web") == ["h2"]
        assert "h1 ready" in await fleet.ok("uncordon", "h1")
        out = await fleet.ok("migrate", "web", "--to", "auto")
        assert "web h2 -> h1: committed" in out, out
        history = json.loads(await fleet.ok("--json", "migrations"))["migrations"]
        history.sort(key=lambda m: float(m["created_at"]))
        assert [(m["requested_to"], m["state"]) for m in history if m["reason"] == "manual"] == [
            ("h2", "committed"),
            ("h1", "committed"),
            ("h2", "committed"),
            ("auto", "committed"),
        ], history
        predictions = await fleet.ok("predictions")
        assert "model drain-2" in predictions and "h2" in predictions, predictions
        assert await _client_get(fleet) == "served"

        fleet.traces.record()
        down = await _run([str(MESH), "down", info["prefix"]])
        assert down.returncode == 0 and f"{info['prefix']}: down" in down.stdout, down.stderr
        assert await fleet.proc.wait() == 0
        assert await _gone(fleet.traces) == []


async def test_sigterm_removes_everything(base_dir: Path) -> None:
    """SIGTERM to `scripts/mesh up` with a container on its service address: no namespace (the
    container's either), link, mount, process, cgroup or dir of the fleet remains."""
    require_root()
    async with mesh_up(base_dir / "cli-term", "--hosts", "2") as fleet:
        inspected = await _run_web(fleet)
        fleet.traces.record([inspected["network"]["netns"]])
        assert fleet.traces.left(), "the running fleet shows no traces: the check would check nothing"
        fleet.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(fleet.proc.wait(), 90) == 0
        assert await _gone(fleet.traces) == []


async def test_cleanup_after_sigkill_removes_everything(base_dir: Path) -> None:
    """The owner SIGKILLed (no teardown at all): `scripts/mesh cleanup` removes what it left."""
    require_root()
    async with mesh_up(base_dir / "cli-kill", "--hosts", "2") as fleet:
        inspected = await _run_web(fleet)
        fleet.traces.record([inspected["network"]["netns"]])
        fleet.proc.kill()
        await fleet.proc.wait()
        assert await _gone(fleet.traces, within=1.0), "a killed owner took its fleet with it: nothing to clean"
        down = await _run([str(MESH), "down", fleet.info["prefix"]])
        assert down.returncode == 1 and "scripts/mesh cleanup" in down.stderr, down.stderr
        cleaned = await _run([str(MESH), "cleanup", "--prefix", fleet.info["prefix"]])
        assert cleaned.returncode == 0 and cleaned.stdout.strip() == f"cleaned: {fleet.info['prefix']}", cleaned
        assert await _gone(fleet.traces) == []


async def test_readme_quick_start_works_as_written(workdir: Path) -> None:
    """The README's quick-start block, run as it stands in one shell (set -e: every command must
    succeed), from `eval "$(scripts/mesh up ... --detach)"` to `scripts/mesh down`."""
    require_root()
    blocks = QUICKSTART.findall((REPO / "README.md").read_text())
    assert len(blocks) == 1, "README.md must have one block marked <!-- quickstart: ... -->"
    script = blocks[0]
    commands = [line.split("  #")[0].strip() for line in script.strip().splitlines()]
    assert commands[0].startswith('eval "$(scripts/mesh up') and commands[-1] == "scripts/mesh down", commands
    root_links = {n for n in nsh.link_names() if n.startswith("fm")}
    # The script names its mesh however it ends, so that a failed run is cleaned up too.
    said = workdir / "prefix"
    wrapped = f"trap 'echo \"$MESH_PREFIX\" > {said}' EXIT\nset -euo pipefail -x\n{script}"
    proc = await asyncio.create_subprocess_exec(
        "bash",
        "-c",
        wrapped,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=_clean_env(),
        cwd=REPO,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 240)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        prefix = said.read_text().strip() if said.exists() else ""
        if re.fullmatch(r"fm[0-9a-f]{4}", prefix) and (STATE_DIR / f"{prefix}.json").exists():
            await _run([str(MESH), "down", prefix])
            await _run([str(MESH), "cleanup", "--prefix", prefix])
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-6000:]
    assert re.fullmatch(r"fm[0-9a-f]{4}", prefix), text[-3000:]
    assert text.count("\nserved\n") == 2, text[-6000:]
    # Four migrations through the coordinator (three modes and auto), one agent to agent.
    assert text.count(": committed\n") == 4 and "COMMIT" in text, text[-6000:]
    assert "h2 drained" in text and "model drain-2" in text and f"{prefix}: down" in text, text[-6000:]
    left = await _gone(Traces(prefix, pick_base_dir() / prefix, root_links=root_links))
    assert left == [], left


@pytest.mark.parametrize(
    ("argv", "code", "said"),
    [
        (["up", "--hosts", "0"], 2, "argument --hosts: a mesh has 1 to 99 hosts, got 0"),
        (["up", "--hosts", "two"], 2, "argument --hosts: expected a whole number, got 'two'"),
        (["up", "--dir", "/proc/ferryman-nowhere", "--detach"], 1, "mesh: no directory for the mesh:"),
        (["down", "fm12"], 1, "mesh: a mesh prefix is fm and 4 hex digits, got 'fm12'"),
        (["env", "--prefix", "fmzzzz"], 1, "mesh: a mesh prefix is fm and 4 hex digits, got 'fmzzzz'"),
    ],
)
async def test_bad_input_is_refused_with_a_clear_error(argv: list[str], code: int, said: str) -> None:
    require_root()
    res = await _run([str(MESH), *argv], within=60)
    assert res.returncode == code and said in res.stderr, res
