"""The N-host mesh harness: namespaces and links, per-host containerd + agent, the shared registry,
link faults, and a teardown that leaves nothing behind (also after a failed start or a crash)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import secrets
import signal
import subprocess
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from tests.conftest import require, require_root
from tests.harness import netns as nsh
from tests.harness.containerd import mounts_under
from tests.harness.images import build_test_image
from tests.harness.mesh import STATE_DIR, Mesh, MeshHost, _pick_id, cleanup_stale

pytestmark = pytest.mark.timeout(180)


def _extra(host: MeshHost) -> str:
    # A top-level key, to check it is placed before the tables (else it would land in [[registries]]).
    return 'log_level = "DEBUG"\n'


@pytest.fixture(scope="module")
async def mesh(base_dir: Path) -> AsyncIterator[Mesh]:
    require_root()
    for name in ("containerd", "ctr", "runc", "containerd-shim-runc-v2", "docker-registry", "busybox"):
        require(name)
    m = Mesh(base_dir, 3, with_client=True, agent_extra_config=_extra)
    try:
        await m.start()
        yield m
    finally:
        await m.stop()


def _root_has_10x() -> bool:
    out = nsh.ip("-o", "-4", "addr", "show").stdout
    ten = ipaddress.ip_network("10.0.0.0/8")
    return any(ipaddress.ip_interface(line.split()[3]).ip in ten for line in out.splitlines())


def _running(pid: int) -> bool:
    """Exists and is not a zombie: killed shims are reparented to PID 1, which reaps them when it likes."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _pids_referencing(directory: Path) -> list[int]:
    inside = str(directory).rstrip("/") + "/"
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(a.startswith(inside) for a in args) and _running(int(entry.name)):
            found.append(int(entry.name))
    return found


async def test_layout(mesh: Mesh) -> None:
    assert len(mesh.id) == 4 and mesh.prefix == f"fm{mesh.id}"
    assert mesh.subnet.is_private and str(mesh.subnet).startswith("10.")
    names = nsh.list_netns()
    for node in mesh.nodes:
        assert node.netns in names and node.netns.startswith(f"{mesh.prefix}-")
    assert [h.address for h in mesh.hosts] == [str(mesh.subnet.network_address + 10 + i) for i in (1, 2, 3)]
    assert mesh.registry_host == f"{mesh.gateway}:5000" and mesh.push_host.startswith("127.0.0.1:")
    # Host side is eth0 with the host's address; every interface name fits IFNAMSIZ.
    assert mesh.client is not None
    for node in [*mesh.hosts, mesh.client]:
        addr = nsh.ip("-o", "-4", "addr", "show", "dev", "eth0", netns=node.netns).stdout
        assert f"{node.address}/24" in addr
        assert f"default via {mesh.gateway}" in nsh.ip("route", netns=node.netns).stdout
    for netns in mesh.netns_names():
        assert all(len(name) <= 15 for name in nsh.link_names(netns))
    # Nothing in the root namespace: no links of ours, and never a 10.x address.
    assert not [n for n in nsh.link_names() if n.startswith(mesh.prefix)]
    assert not _root_has_10x()
    assert (STATE_DIR / f"{mesh.prefix}.json").exists()


async def test_every_node_reaches_every_other(mesh: Mesh) -> None:
    peers = [*mesh.hosts, mesh.client]
    pairs = [(a, b) for a in peers for b in peers if a is not b and a is not None and b is not None]
    results = await asyncio.gather(*(mesh.ping(a, b) for a, b in pairs))
    assert all(results), [f"{a.name}->{b.name}" for (a, b), ok in zip(pairs, results, strict=True) if not ok]
    # ...and the registry on the fabric, by TCP.
    reach = await asyncio.gather(*(mesh.can_connect(h, mesh.gateway, 5000) for h in mesh.hosts))
    assert all(reach)


async def test_containerd_and_agent_run_inside_each_host(mesh: Mesh) -> None:
    sockets = set()
    for host in mesh.hosts:
        res = await host.actr("version")
        assert "Server:" in res.stdout
        sockets.add(host.containerd.socket)
        inode = mesh.netns_inodes[host.netns]
        assert host.containerd.proc is not None and host.agent_proc is not None
        assert nsh.pid_netns_inode(host.containerd.proc.pid) == inode
        assert nsh.pid_netns_inode(host.agent_proc.pid) == inode
        assert 'log_level = "DEBUG"' in host.agent_config_path.read_text()
        async with host.session() as session, session.get("/healthz") as resp:
            assert resp.status == 200
    assert len(sockets) == 3


async def test_image_pushed_over_loopback_is_pulled_by_h2_from_the_fabric(mesh: Mesh) -> None:
    name = f"test/mesh-{secrets.token_hex(3)}"
    await build_test_image(cmd=("/bin/sh", "-c", "sleep 300")).build().push(mesh.push_host, name, "v1")
    ref = mesh.image_ref(name, "v1")
    h2 = mesh["h2"]
    async with h2.session() as session:
        async with session.post("/v1/images/pull", json={"ref": ref}) as resp:
            body = await resp.json()
            assert resp.status == 200, body
        assert body["name"] == ref
        # Run it, so that teardown has a shim, a task and snapshot mounts to clean up.
        async with session.post("/v1/containers", json={"id": "sleeper", "image": ref}) as resp:
            assert resp.status in (200, 201), await resp.text()
        async with session.post("/v1/containers/sleeper/start") as resp:
            assert resp.status == 200, await resp.text()
    assert ref in (await h2.actr("images", "ls", "-q")).stdout
    assert ref not in (await mesh["h1"].actr("images", "ls", "-q")).stdout
    [shim] = h2.containerd.shim_pids()
    assert nsh.pid_netns_inode(shim) == mesh.netns_inodes[h2.netns]
    assert mounts_under(h2.dir)


async def test_link_down_isolates_a_host_and_link_up_restores_it(mesh: Mesh) -> None:
    h1, h2, h3 = mesh.hosts
    await mesh.link_down(h1)
    try:
        # Concurrently: each failed probe waits out its whole timeout.
        cut = await asyncio.gather(
            mesh.ping(h2, h1),
            mesh.ping(h1, mesh.gateway),
            mesh.ping("client", h1),
            mesh.can_connect(h1, mesh.gateway, 5000, within=0.5),
        )
        assert not any(cut), cut
        assert await mesh.ping(h2, h3)
    finally:
        await mesh.link_up(h1)
    # link_up forgets the failed ARP entries, so this is normally immediate; allow a few retries anyway.
    assert await _eventually(lambda: mesh.ping(h2, h1)), _diag(mesh)
    assert await _eventually(lambda: mesh.can_connect(h1, mesh.gateway, 5000)), _diag(mesh)


async def _eventually(probe: Callable[[], Awaitable[bool]], attempts: int = 5) -> bool:
    for _ in range(attempts):
        if await probe():
            return True
    return False


def _diag(mesh: Mesh) -> str:
    return "\n".join(
        [
            f"registry running: {mesh.registry.running}",
            nsh.ip("neigh", netns=mesh.hosts[0].netns, check=False).stdout,
            nsh.ip("-br", "link", netns=mesh.fabric.netns, check=False).stdout,
            nsh.run(["ss", "-tanp"], netns=mesh.fabric.netns, check=False).stdout,
            mesh.registry.log_path.read_text(errors="replace")[-2000:],
        ]
    )


async def test_agent_kill_start_restart(mesh: Mesh) -> None:
    h3 = mesh["h3"]
    assert h3.agent_proc is not None
    old = h3.agent_proc.pid
    assert await h3.kill_agent() == -signal.SIGKILL
    assert not h3.agent_running and h3.api_socket.exists()  # a stale socket, like after a crash
    await h3.start_agent()
    assert h3.agent_running and h3.agent_proc is not None and h3.agent_proc.pid != old
    await h3.restart_agent()
    async with h3.session() as session, session.get("/healthz") as resp:
        assert resp.status == 200


async def test_exec_in(mesh: Mesh) -> None:
    res = mesh.exec_in("client", ["ip", "-o", "-4", "addr", "show", "dev", "eth0"], check=True)
    assert mesh.client is not None and mesh.client.address in res.stdout
    res = await mesh.aexec_in(mesh["h1"], ["cat", "/proc/net/dev"], check=True)
    assert "eth0" in res.stdout
    res = await mesh.aexec_in(mesh.fabric.netns, ["ip", "-o", "link", "show", "master", mesh.bridge], check=True)
    assert len(res.stdout.splitlines()) == 4  # three hosts and the client


async def test_cleanup_stale_spares_live_and_removes_crashed(mesh: Mesh, base_dir: Path) -> None:
    # A live mesh (its owner holds the lock) is never touched.
    assert await cleanup_stale(mesh.prefix) == []
    assert all(n in nsh.list_netns() for n in mesh.netns_names())

    # A "crashed" one: a netns with a process in it, a state file nobody locks, a dir.
    prefix = f"fm{_pick_id()}"
    netns = f"{prefix}-h1"
    stale_dir = base_dir / prefix
    (stale_dir / "h1").mkdir(parents=True)
    nsh.add_netns(netns)
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    (STATE_DIR / f"{prefix}.json").write_text(json.dumps({"id": prefix[2:], "dir": str(stale_dir), "netns": [netns]}))
    sleeper = await asyncio.to_thread(subprocess.Popen, [*nsh.nsenter_argv(netns), "sleep", "120"])
    try:
        assert await cleanup_stale(prefix) == [prefix]
        assert await asyncio.to_thread(sleeper.wait, 10) == -signal.SIGKILL
        assert netns not in nsh.list_netns()
        assert not stale_dir.exists()
        assert not (STATE_DIR / f"{prefix}.json").exists()
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()
        nsh.del_netns(netns)
        (STATE_DIR / f"{prefix}.json").unlink(missing_ok=True)


async def test_stop_leaves_nothing(mesh: Mesh) -> None:
    inodes = dict(mesh.netns_inodes)
    pids = [p.pid for p in (mesh.registry.proc, mesh.push_registry.proc) if p is not None]
    for host in mesh.hosts:
        pids += [p.pid for p in (host.containerd.proc, host.agent_proc) if p is not None]
        pids += host.containerd.shim_pids()
    assert len(pids) >= 2 + 2 * 3  # (+ a shim when the pull test ran its container)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await mesh.stop()
    took = loop.time() - started
    await mesh.stop()  # idempotent

    assert not [n for n in nsh.list_netns() if n.startswith(mesh.prefix)]
    assert mesh.prefix not in nsh.ip("netns", "list").stdout
    assert mesh.prefix not in nsh.ip("link").stdout
    assert not mounts_under(mesh.dir)
    assert not mesh.dir.exists()
    assert not [p for p in pids if _running(p)]
    assert not nsh.pids_in_netns(inodes.values())
    assert not _pids_referencing(mesh.dir)
    assert not (STATE_DIR / f"{mesh.prefix}.json").exists()
    assert took < 30


async def test_failed_start_cleans_up(base_dir: Path) -> None:
    require_root()

    def broken(host: MeshHost) -> str:
        return "[containerd\n"  # invalid TOML: start_agent raises after the containerds are up

    m = Mesh(base_dir, 2, agent_extra_config=broken)
    with pytest.raises(ValueError, match="not valid TOML"):
        await m.start()
    assert not [n for n in nsh.list_netns() if n.startswith(m.prefix)]
    assert not m.dir.exists()
    assert not _pids_referencing(m.dir)
    assert not (STATE_DIR / f"{m.prefix}.json").exists()
    await m.stop()  # still fine


async def test_mesh_as_context_manager_without_agents(base_dir: Path) -> None:
    require_root()
    async with Mesh(base_dir, 1, start_agents=False) as m:
        [h1] = m.hosts
        assert not h1.agent_running and h1.containerd.proc is not None
        assert await m.ping(h1, m.gateway)
    assert not m.dir.exists() and m.dir.name == m.prefix
    assert not [n for n in nsh.list_netns() if n.startswith(m.prefix)]


def test_agent_config_merges_extra_top_level_keys_and_tables(base_dir: Path) -> None:
    """No namespaces needed: the config is composed before anything starts."""

    def extra(host: MeshHost) -> str:
        return f'log_level = "DEBUG"\n\n[peer]\nlisten = "tcp://{host.address}:7443"\n'

    m = Mesh(base_dir, 2, agent_extra_config=extra, peer_port=7443)
    data = tomllib.loads(m["h2"].agent_config_text())
    assert data["log_level"] == "DEBUG" and data["host_name"] == "h2"
    assert data["peer"] == {"listen": f"tcp://{m['h2'].address}:7443"}
    assert data["registries"] == [{"host": m.registry_host, "plain_http": True}]
    assert data["containerd"]["socket"] == m["h2"].containerd.socket
    assert data["api"] == {"listen": f"unix://{m['h2'].api_socket}", "peer_listen": f"{m['h2'].address}:7443"}
    # The containers' namespaces go to the host's own dir, where teardown and cleanup find them.
    assert data["network"] == {"netns_dir": f"{m.dir}/h2/netns"}
