"""Service addresses: traffic follows the container (agent/network).

The end-to-end cases run on a real 2-host mesh with a client namespace: each host's agent creates a
network namespace + veth per container with a service address, publishes a /32 route, answers ARP
for it on its uplink and announces it with a gratuitous ARP. Every address lives inside namespaces
the mesh or the agents create; the root namespace is never given one.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import ipaddress
import json
import os
import secrets
import socket
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.api.handlers import parse_create
from agent.config import parse_config
from agent.containerd import Containerd
from agent.model import CreateRequest
from agent.network import RTPROT_FERRYMAN, ServiceNetwork, parse_service_ip
from agent.network.addresses import host_veth_name, netns_name
from agent.network.arp import ARPOP_REPLY, ARPOP_REQUEST, garp_frame, parse_arp
from agent.network.capture import HeldTraffic
from agent.network.nsutil import remove_netns
from agent.runtime.spec import build_spec, set_network_namespace
from core.errors import ConfigError, InvalidRequest
from tests.conftest import require, require_root
from tests.harness import netns as nsh
from tests.harness.images import ImageBuilder, busybox_layer
from tests.harness.mesh import AGENT_NAMESPACE, PREFIX_RE, Mesh, MeshHost

PORT = 8080
# Serves the HOSTTAG env var at "/" so a response names the host that answered.
HTTPD = ("/bin/sh", "-c", f'mkdir -p /www && echo "$HOSTTAG" > /www/index.html && exec httpd -f -p {PORT} -h /www')
PROBE_TIMEOUT = 0.2
"""Seconds per client request: a request sent into the gap fails fast and the next one is tried."""
PROBE_MAX = 20.0
"""Upper bound on one client probe loop."""


# ----------------------------------------------------------------------------------------------- pure


def test_parse_service_ip() -> None:
    assert parse_service_ip(" 10.1.2.100 ") == "10.1.2.100"
    for bad in (
        "",
        "10.1.2",
        "::1",
        "10.1.2.100/32",
        "127.0.0.1",
        "169.254.1.1",
        "224.0.0.1",
        "0.0.0.0",
        "255.255.255.255",
    ):
        with pytest.raises(InvalidRequest):
            parse_service_ip(bad)


def test_names_fit_ifnamsiz_and_differ_per_host() -> None:
    a, b = netns_name("1/ferryman", "web"), netns_name("2/ferryman", "web")
    assert a != b and a.startswith("fm-") and netns_name("1/ferryman", "web") == a
    assert len(host_veth_name("1/ferryman", "x" * 64)) <= 15
    # Never mistaken for a mesh's names (fm<4 hex>-...) by the harness's stale cleanup.
    assert not PREFIX_RE.match(a) and not PREFIX_RE.match(host_veth_name("1/ferryman", "web"))


def test_garp_frame() -> None:
    mac = bytes.fromhex("02aabbccddee")
    req = garp_frame(mac, "10.1.2.100")
    assert len(req) == 60 and req[:6] == b"\xff" * 6 and req[6:12] == mac and req[12:14] == b"\x08\x06"
    assert parse_arp(req) == (ARPOP_REQUEST, mac, "10.1.2.100", b"\x00" * 6, "10.1.2.100")
    # A gratuitous reply carries the sender MAC as target MAC too (Linux requires it to treat it as one).
    assert parse_arp(garp_frame(mac, "10.1.2.100", ARPOP_REPLY)) == (ARPOP_REPLY, mac, "10.1.2.100", mac, "10.1.2.100")
    with pytest.raises(ValueError):
        garp_frame(b"\x00", "10.1.2.100")


def test_parse_create_service_fields() -> None:
    req = parse_create({"id": "a", "image": "i", "service_ip": "10.9.8.7"})
    assert req.service_ip == "10.9.8.7" and req.publish_service is True
    assert (
        parse_create({"id": "a", "image": "i", "service_ip": "10.9.8.7", "publish_service": False}).publish_service
        is False
    )
    assert parse_create({"id": "a", "image": "i"}).service_ip is None
    for body in (
        {"service_ip": "nope"},
        {"service_ip": 5},
        {"service_ip": "127.0.0.1"},
        {"service_ip": "10.9.8.7", "publish_service": "no"},
        {"publish_service": False},
    ):
        with pytest.raises(InvalidRequest):
            parse_create({"id": "a", "image": "i", **body})


def test_spec_joins_the_given_netns() -> None:
    image = {"config": {"Cmd": ["/bin/true"]}}
    plain = build_spec(image, CreateRequest(id="a", image="i"))
    assert {"type": "network"} in plain["linux"]["namespaces"]
    spec = build_spec(image, CreateRequest(id="a", image="i"), netns_path="/run/netns/fm-x")
    nets = [ns for ns in spec["linux"]["namespaces"] if ns["type"] == "network"]
    assert nets == [{"type": "network", "path": "/run/netns/fm-x"}]
    set_network_namespace(spec, "/run/netns/fm-y")  # a migration target repoints a copied spec
    assert [ns for ns in spec["linux"]["namespaces"] if ns["type"] == "network"] == [
        {"type": "network", "path": "/run/netns/fm-y"}
    ]
    set_network_namespace(spec, None)
    assert {"type": "network"} in spec["linux"]["namespaces"]
    with pytest.raises(InvalidRequest):
        set_network_namespace(spec, "relative")


def test_network_config() -> None:
    config = parse_config({"network": {"uplink": "bond0", "link_local_gateway": "169.254.7.1"}})
    assert config.network.uplink == "bond0" and config.network.link_local_gateway == "169.254.7.1"
    assert parse_config({}).network.link_local_gateway == "169.254.1.1"
    for bad in ("10.0.0.1", "nope"):
        with pytest.raises(ConfigError):
            parse_config({"network": {"link_local_gateway": bad}})
    # The containers' namespaces go where the config says (a simulated host keeps its own).
    assert parse_config({}).network.netns_dir == "/run/netns"
    custom = parse_config({"network": {"netns_dir": "/var/tmp/h1/netns"}}).network
    assert ServiceNetwork(custom, "ns").info("web").path.startswith("/var/tmp/h1/netns/fm-")
    with pytest.raises(ConfigError, match="netns_dir must be an absolute path"):
        parse_config({"network": {"netns_dir": "netns"}})


# ----------------------------------------------------------------------------------------------- mesh


@dataclass
class Env:
    mesh: Mesh
    image: str
    service_ip: str


@pytest.fixture(scope="module")
async def env(base_dir: Path) -> AsyncIterator[Env]:
    require_root()
    for name in ("containerd", "ctr", "runc", "containerd-shim-runc-v2", "docker-registry", "busybox"):
        require(name)
    root_before = _root_state()
    mesh = Mesh(base_dir, 2, with_client=True)
    try:
        await mesh.start()
        name = f"test/svc-{secrets.token_hex(3)}"
        await ImageBuilder([busybox_layer()], cmd=HTTPD).build().push(mesh.push_host, name, "v1")
        image = mesh.image_ref(name, "v1")
        for host in mesh.hosts:
            status, body = await _api(host, "POST", "/v1/images/pull", {"ref": image})
            assert status == 200, body
        yield Env(mesh, image, str(mesh.subnet.network_address + 100))
    finally:
        try:
            for host in mesh.hosts:
                if host.agent_running:
                    with contextlib.suppress(Exception):
                        await _delete_all(host)
        finally:
            # Also whatever a failed test left: the containers' namespaces live in the hosts' dirs.
            await mesh.stop()
    assert _root_state() == root_before, "the root network namespace changed"


def _root_state() -> tuple[str, str]:
    """Links and IPv4 addresses+routes of the root namespace (never touched by these tests)."""
    links = sorted(n for n in nsh.link_names() if n.startswith(("fmv", "fm-")))
    addrs = nsh.ip("-o", "-4", "addr", "show").stdout
    ten = ipaddress.ip_network("10.0.0.0/8")
    assert not any(ipaddress.ip_interface(line.split()[3]).ip in ten for line in addrs.splitlines())
    return json.dumps(links), nsh.ip("-4", "route", "show", "proto", str(RTPROT_FERRYMAN)).stdout


async def _api(host: MeshHost, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    async with host.session() as session, session.request(method, path, json=body) as resp:
        text = await resp.text()
        return resp.status, (json.loads(text) if text else None)


async def _delete_all(host: MeshHost) -> None:
    status, body = await _api(host, "GET", "/v1/containers")
    assert status == 200, body
    for c in body["containers"]:
        status, out = await _api(host, "DELETE", f"/v1/containers/{c['id']}?force=1")
        assert status == 204, out


async def _run(host: MeshHost, cid: str, service_ip: str | None, image: str, *, publish: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {"id": cid, "image": image, "env": {"HOSTTAG": host.name}}
    if service_ip is not None:
        body["service_ip"] = service_ip
        if not publish:
            body["publish_service"] = False
    status, out = await _api(host, "POST", "/v1/containers?start=1", body)
    assert status == 201, out
    assert out["state"] == "running", out
    status, inspected = await _api(host, "GET", f"/v1/containers/{cid}")
    assert status == 200, inspected
    return dict(inspected)


def _http_get(host: str, port: int, timeout: float) -> str | None:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/")
        resp = conn.getresponse()
        body = resp.read().decode().strip()
        return body if resp.status == 200 else None
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


async def _get_from(netns: str, host: str, within: float = 1.0) -> str | None:
    return await nsh.acall_in_netns(netns, _http_get, host, PORT, within)


async def _wait_for_body(netns: str, host: str, want: str, within: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    last = None
    while loop.time() < deadline:
        last = await _get_from(netns, host)
        if last == want:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"GET http://{host}:{PORT}/ from {netns} never answered {want!r} (last: {last!r})")


def _mac(netns: str, ifname: str = "eth0") -> str:
    out = nsh.ip("-j", "link", "show", "dev", ifname, netns=netns).stdout
    return str(json.loads(out)[0]["address"])


def _neigh_mac(netns: str, address: str) -> str | None:
    entries = json.loads(nsh.ip("-j", "neigh", "show", address, netns=netns).stdout or "[]")
    return str(entries[0]["lladdr"]) if entries and "lladdr" in entries[0] else None


async def _until(cond: Callable[[], bool], within: float, step: float = 0.02) -> bool:
    for _ in range(int(within / step) + 1):
        if cond():
            return True
        await asyncio.sleep(step)
    return cond()


def _probe_loop(host: str, stop: threading.Event, samples: list[tuple[float, str | None]]) -> None:
    """GET in a tight loop (in the client's namespace) until `stop`, recording (end time, body or None)."""
    started = time.monotonic()
    while not stop.is_set() and time.monotonic() - started < PROBE_MAX:
        body = _http_get(host, PORT, PROBE_TIMEOUT)
        samples.append((time.monotonic(), body))
        time.sleep(0.005)


async def test_service_ip_reachable_from_client(env: Env) -> None:
    mesh, h1 = env.mesh, env.mesh["h1"]
    assert mesh.client is not None
    inspected = await _run(h1, "svc", env.service_ip, env.image)
    net = inspected["network"]
    assert net["service_ip"] == env.service_ip and net["published"] is True
    # The spec joins the prepared namespace; inside it: eth0 with the /32, default via the link-local gateway.
    joined = [ns for ns in inspected["spec"]["linux"]["namespaces"] if ns["type"] == "network"]
    assert joined == [{"type": "network", "path": net["netns"]}]
    assert Path(net["netns"]).exists()
    netns = net["netns"]
    assert netns.startswith(f"{h1.netns_dir}/")  # the mesh host's own dir, not the machine's /run/netns
    assert f"{env.service_ip}/32" in nsh.ip("-o", "-4", "addr", "show", "dev", "eth0", netns=netns).stdout
    assert "default via 169.254.1.1 dev eth0" in nsh.ip("route", netns=netns).stdout
    # On the host: the /32 via the veth (our protocol), proxy ARP on the uplink.
    routes = nsh.ip("route", "show", "proto", str(RTPROT_FERRYMAN), netns=h1.netns).stdout
    assert f"{env.service_ip} dev {net['host_veth']}" in routes
    # ARP for the address is answered by a proxy entry for it alone, not by proxy_arp for everything.
    assert f"{env.service_ip} dev eth0 proxy" in nsh.ip("neigh", "show", "proxy", netns=h1.netns).stdout
    assert nsh.run(["cat", "/proc/sys/net/ipv4/conf/eth0/proxy_arp"], netns=h1.netns).stdout.strip() == "0"
    await _wait_for_body(mesh.client.netns, env.service_ip, "h1")
    # ...and from the other host (its ARP on the fabric is answered by h1's proxy ARP).
    await _wait_for_body(mesh["h2"].netns, env.service_ip, "h1")
    status, listing = await _api(h1, "GET", "/v1/network")
    assert status == 200, listing
    assert listing["uplink"] == "eth0" and listing["routes"] == {env.service_ip: net["host_veth"]}
    [svc] = listing["services"]
    assert svc["container"] == "svc" and svc["published"] is True and svc["state"] == "running"
    # A second container may not take the same address on the same host.
    status, body = await _api(
        h1, "POST", "/v1/containers", {"id": "svc2", "image": env.image, "service_ip": env.service_ip}
    )
    assert status == 409, body


async def test_plain_container_keeps_an_empty_netns(env: Env) -> None:
    h1 = env.mesh["h1"]
    inspected = await _run(h1, "plain", None, env.image)
    assert "network" not in inspected
    assert {"type": "network"} in inspected["spec"]["linux"]["namespaces"]
    status, _ = await _api(h1, "DELETE", "/v1/containers/plain?force=1")
    assert status == 204


async def test_move_service_ip_to_another_host(env: Env) -> None:
    mesh, h1, h2 = env.mesh, env.mesh["h1"], env.mesh["h2"]
    client = mesh.client
    assert client is not None
    await _wait_for_body(client.netns, env.service_ip, "h1")  # the first test left svc published on h1
    # The same container (same id, same address) on h2 as a standby copy: prepared, running, not published.
    inspected = await _run(h2, "svc", env.service_ip, env.image, publish=False)
    h2_net = inspected["network"]
    assert h2_net["published"] is False
    assert h2_net["netns"] != (await _api(h1, "GET", "/v1/containers/svc"))[1]["network"]["netns"]
    await _wait_for_body(h2_net["netns"], "127.0.0.1", "h2")  # h2's copy serves, inside its netns
    assert await _get_from(client.netns, env.service_ip) == "h1"
    assert _neigh_mac(client.netns, env.service_ip) == _mac(h1.netns)

    stop = threading.Event()
    samples: list[tuple[float, str | None]] = []
    prober = asyncio.create_task(nsh.acall_in_netns(client.netns, _probe_loop, env.service_ip, stop, samples))
    try:
        await asyncio.sleep(0.5)  # a baseline of answers from h1
        t_move = time.monotonic()
        status, body = await _api(h1, "POST", "/v1/network/unpublish", {"service_ip": env.service_ip})
        assert status == 200 and body["was_published"] is True, body
        status, body = await _api(h2, "POST", "/v1/network/publish", {"service_ip": env.service_ip})
        assert status == 200 and body["container"] == "svc", body
        t_published = time.monotonic()
        # The announcement repoints the client's neighbour entry at h2 (without it the entry would
        # keep h1's MAC until the neighbour cache expires it, tens of seconds): the bounds are generous,
        # the figures are printed, and speed itself is measured by the benchmarks.
        h2_mac = _mac(h2.netns)
        assert await _until(lambda: _neigh_mac(client.netns, env.service_ip) == h2_mac, within=5.0)
        t_neigh = time.monotonic()
        assert await _until(lambda: any(b == "h2" for _, b in samples), within=10.0)
        await asyncio.sleep(0.5)  # and then some, to see it stays on h2
    finally:
        stop.set()
        await prober
    assert _neigh_mac(client.netns, env.service_ip) == _mac(h2.netns), nsh.ip("neigh", netns=client.netns).stdout
    first_h2 = next((t for t, b in samples if b == "h2"), None)
    assert first_h2 is not None, samples[-10:]
    last_h1 = max(t for t, b in samples if b == "h1" and t < first_h2)
    gap = first_h2 - last_h1
    failed = sum(1 for t, b in samples if last_h1 < t < first_h2 and b is None)
    print(
        f"\nservice move: client gap {gap * 1000:.1f} ms ({failed} failed requests); "
        f"unpublish+publish API calls {(t_published - t_move) * 1000:.1f} ms; "
        f"first h2 answer {(first_h2 - t_published) * 1000:.1f} ms after publish returned; "
        f"neighbour entry on h2 {(t_neigh - t_published) * 1000:.1f} ms after publish; {len(samples)} requests"
    )
    assert all(b == "h2" for t, b in samples if t > first_h2 and b is not None), "traffic went back to h1"
    # h1 keeps its copy (namespace, veth, container), unpublished; h2 now routes it.
    status, h1_view = await _api(h1, "GET", "/v1/containers/svc")
    assert status == 200 and h1_view["network"]["published"] is False and h1_view["state"] == "running"
    assert Path(h1_view["network"]["netns"]).exists()
    assert h1_view["network"]["host_veth"] in nsh.link_names(h1.netns)
    assert nsh.ip("route", "show", "proto", str(RTPROT_FERRYMAN), netns=h1.netns).stdout.strip() == ""
    assert nsh.ip("neigh", "show", "proxy", netns=h1.netns).stdout.strip() == ""
    status, h2_view = await _api(h2, "GET", "/v1/containers/svc")
    assert h2_view["network"]["published"] is True
    # Idempotent: publishing again and unpublishing an address that is not here are harmless.
    status, body = await _api(h2, "POST", "/v1/network/publish", {"container": "svc"})
    assert status == 200, body
    status, body = await _api(h1, "POST", "/v1/network/unpublish", {"service_ip": env.service_ip})
    assert status == 200 and body["was_published"] is False, body
    await _wait_for_body(client.netns, env.service_ip, "h2")


async def test_restart_keeps_serving(env: Env) -> None:
    """stop + start re-prepares idempotently: same namespace and veth, still published, still answering."""
    client, h2 = env.mesh.client, env.mesh["h2"]
    assert client is not None
    before = (await _api(h2, "GET", "/v1/containers/svc"))[1]["network"]
    status, body = await _api(h2, "POST", "/v1/containers/svc/stop?timeout=0")
    assert status == 200, body
    status, body = await _api(h2, "POST", "/v1/containers/svc/start")
    assert status == 200, body
    after = (await _api(h2, "GET", "/v1/containers/svc"))[1]["network"]
    assert after == before
    await _wait_for_body(client.netns, env.service_ip, "h2")


# Fetches the server's page as it starts (retrying only after an error), says so, then idles.
FETCH_AT_START = (
    "/bin/sh",
    "-c",
    'until wget -q -O /tmp/page "http://$SERVER:8080/"; do sleep 0.1; done; echo "fetched $(cat /tmp/page)"; '
    "exec sleep 3600",
)


def _tcp_retransmissions(netns: str) -> int:
    """RetransSegs of the namespace's TCP (SYN retransmissions count too)."""
    tcp = [line.split() for line in nsh.run(["cat", "/proc/net/snmp"], netns=netns, check=True).stdout.splitlines()]
    names, values = (row for row in tcp if row[0] == "Tcp:")
    return int(values[names.index("RetransSegs")])


async def test_first_connection_from_a_reused_address_is_answered_at_once(env: Env) -> None:
    """A container that connects out as it starts gets the reply to its first SYN, also from an
    address a peer still has a neighbour entry for (a deployment reusing a pool address): the address
    is published before the task starts. Published after, the reply reached the host before the route
    into the veth and was forwarded back out of the uplink; the client waited for TCP's 1 s SYN
    retransmission."""
    mesh, h1, h2 = env.mesh, env.mesh["h1"], env.mesh["h2"]
    server_ip, client_ip = str(mesh.subnet.network_address + 110), str(mesh.subnet.network_address + 111)
    name = f"test/fetch-{secrets.token_hex(3)}"
    await ImageBuilder([busybox_layer()], cmd=FETCH_AT_START).build().push(mesh.push_host, name, "v1")
    image = mesh.image_ref(name, "v1")
    status, body = await _api(h2, "POST", "/v1/images/pull", {"ref": image})
    assert status == 200, body
    made: list[tuple[MeshHost, str]] = []
    try:
        await _run(h1, "server", server_ip, env.image)
        made.append((h1, "server"))
        for run in ("fresh", "reused"):
            cid = f"fetch-{run}"
            if run == "reused":  # the premise: h1 answers the new client straight at h2, no ARP first
                assert _neigh_mac(h1.netns, client_ip) == _mac(h2.netns), nsh.ip("neigh", netns=h1.netns).stdout
            request = {"id": cid, "image": image, "service_ip": client_ip, "env": {"SERVER": server_ip}}
            status, out = await _api(h2, "POST", "/v1/containers?start=1", request)
            assert status == 201, out
            made.append((h2, cid))
            log = h2.container_log_dir / AGENT_NAMESPACE / f"{cid}.log"
            assert await _until(lambda log=log: log.exists() and "fetched h1" in log.read_text(), within=10.0), (
                log.read_text() if log.exists() else "no log"
            )
            status, inspected = await _api(h2, "GET", f"/v1/containers/{cid}")
            assert status == 200, inspected
            assert _tcp_retransmissions(inspected["network"]["netns"]) == 0, f"{run}: the first SYN went unanswered"
            status, out = await _api(h2, "DELETE", f"/v1/containers/{cid}?force=1")
            assert status == 204, out
            made.remove((h2, cid))
    finally:
        for host, cid in made:
            with contextlib.suppress(Exception):
                await _api(host, "DELETE", f"/v1/containers/{cid}?force=1")


async def test_bad_requests(env: Env) -> None:
    h1 = env.mesh["h1"]
    for body in ({}, {"service_ip": env.service_ip, "container": "svc"}, {"service_ip": "nope"}, {"bogus": 1}):
        status, out = await _api(h1, "POST", "/v1/network/publish", body)
        assert status == 400, (body, out)
    status, out = await _api(h1, "POST", "/v1/network/publish", {"service_ip": "10.255.255.1"})
    assert status == 404 and out["error"]["code"] == "container_not_found", out
    status, out = await _api(h1, "POST", "/v1/containers", {"id": "x", "image": env.image, "service_ip": "127.0.0.1"})
    assert status == 400, out


async def test_delete_leaves_nothing(env: Env) -> None:
    mesh = env.mesh
    views = {}
    for host in mesh.hosts:
        status, view = await _api(host, "GET", "/v1/containers/svc")
        assert status == 200, view
        views[host.name] = view["network"]
    for host in mesh.hosts:
        status, body = await _api(host, "DELETE", "/v1/containers/svc?force=1")
        assert status == 204, body
    for host in mesh.hosts:
        net = views[host.name]
        assert not Path(net["netns"]).exists()
        assert not [n for n in nsh.link_names(host.netns) if n.startswith("fmv")]
        assert nsh.ip("route", "show", "proto", str(RTPROT_FERRYMAN), netns=host.netns).stdout.strip() == ""
        assert nsh.ip("neigh", "show", "proxy", netns=host.netns).stdout.strip() == ""
        status, listing = await _api(host, "GET", "/v1/network")
        assert status == 200 and listing["services"] == [] and listing["routes"] == {}, listing
    assert not [p for host in mesh.hosts if host.netns_dir.exists() for p in host.netns_dir.iterdir()]
    assert mesh.client is not None
    assert await _get_from(mesh.client.netns, env.service_ip, within=0.5) is None


async def test_established_tcp_follows_a_checkpoint_restore_move(env: Env, base_dir: Path) -> None:
    """CRIU-dump on h1, restore into h2's prepared namespace, move the address: the client's open TCP
    connection carries on (what a migration does, without the migration machinery)."""
    mesh, h1, h2 = env.mesh, env.mesh["h1"], env.mesh["h2"]
    client = mesh.client
    assert client is not None
    ip = str(mesh.subnet.network_address + 101)
    work = Path(tempfile.mkdtemp(prefix="tcp-", dir=base_dir))
    conf = work / "criu.conf"
    conf.write_text("tcp-established\n")  # containerd 1.6 passes no TCP option to `runc restore`; runc reads this
    echo = ["/bin/sh", "-c", "exec nc -ll -p 9000 -e cat"]
    body = {"id": "tcp", "image": env.image, "args": echo, "service_ip": ip}
    status, out = await _api(h1, "POST", "/v1/containers?start=1", body)
    assert status == 201, out
    standby = {**body, "publish_service": False, "labels": {"org.criu.config": str(conf)}}
    status, out = await _api(h2, "POST", "/v1/containers", standby)
    assert status == 201, out
    cd1 = await Containerd.connect(h1.containerd.socket, AGENT_NAMESPACE)
    cd2 = await Containerd.connect(h2.containerd.socket, AGENT_NAMESPACE)
    sock: socket.socket | None = None
    try:
        for _ in range(100):
            with contextlib.suppress(OSError):
                sock = await nsh.acall_in_netns(client.netns, socket.create_connection, (ip, 9000), 1.0)
                break
            await asyncio.sleep(0.1)
        assert sock is not None, "the echo server never accepted"
        sock.settimeout(5)
        sock.sendall(b"before\n")
        assert sock.recv(64) == b"before\n"
        t0 = time.monotonic()
        await cd1.tasks.pause("tcp")
        await cd1.tasks.checkpoint("tcp", str(work / "dump"), leave_running=True)  # tcp-established
        record = await cd2.containers.get("tcp")
        log_uri = f"file://{work / 'restore.log'}"
        mounts = await cd2.snapshots.mounts(record.snapshot_key)
        await cd2.tasks.create(
            "tcp",
            mounts,
            stdout=log_uri,
            stderr=log_uri,
            runc_root=str(h2.containerd.runc_root),
            restore_from=str(work / "dump"),
        )
        await cd2.tasks.start("tcp")
        status, out = await _api(h1, "POST", "/v1/network/unpublish", {"service_ip": ip})
        assert status == 200, out
        status, out = await _api(h2, "POST", "/v1/network/publish", {"container": "tcp"})
        assert status == 200, out
        moved = time.monotonic() - t0
        sock.sendall(b"after\n")
        assert sock.recv(64) == b"after\n"
        print(f"\nTCP connection moved h1 -> h2: dump+restore+move {moved * 1000:.0f} ms")
        assert _neigh_mac(client.netns, ip) == _mac(h2.netns)
    finally:
        if sock is not None:
            sock.close()
        with contextlib.suppress(Exception):
            await cd1.tasks.resume("tcp")  # let the frozen source copy die normally
        await cd1.close()
        await cd2.close()
        for host in mesh.hosts:
            status, out = await _api(host, "DELETE", "/v1/containers/tcp?force=1")
            assert status in (204, 404), out
    for host in mesh.hosts:
        assert not [n for n in nsh.link_names(host.netns) if n.startswith("fmv")]
        assert nsh.ip("neigh", "show", "proxy", netns=host.netns).stdout.strip() == ""


# ------------------------------------------------------------------------- the adapter on its own

# Runs inside a scratch namespace (the adapter names things after the namespace it runs in), so the
# test process itself never touches a real namespace's links.
_ADAPTER_SCRIPT = r"""
import asyncio, json, subprocess, sys
from pathlib import Path
from agent.config import NetworkConfig
from core.errors import InvalidRequest
from agent.network import HELD, ServiceNetwork, UplinkNotFound

def ip(*args, netns=None):
    argv = ["ip"] + (["-n", netns] if netns else []) + list(args)
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout

def addrs(netns):
    return sorted(a["local"] for link in json.loads(ip("-j", "-4", "addr", "show", "dev", "eth0", netns=netns))
                  for a in link["addr_info"])

def udp_listener(netns):
    import socket
    from agent.network import nsutil
    def bind():
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("10.77.0.5", 9999))
        return sock
    return nsutil.call_in_netns(f"/run/netns/{netns}", bind)

def send_udp(payload):
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(payload, ("10.77.0.5", 9999))

def heard(sock, within=0.0):
    import select
    if not select.select([sock], [], [], within)[0]:
        return None
    return sock.recv(100)

async def main():
    net = ServiceNetwork(namespace="t")
    info = await net.prepare("k", "10.77.0.5")
    name = Path(info.path).name
    assert addrs(name) == ["10.77.0.5"], addrs(name)
    assert await net.prepare("k", "10.77.0.5") == info          # idempotent
    ip("link", "del", info.host_veth)                           # damage: the pair is gone
    await net.prepare("k", "10.77.0.5")
    assert info.host_veth in ip("-o", "link", "show") and addrs(name) == ["10.77.0.5"]
    await net.prepare("k", "10.77.0.6")                         # another address replaces the old one
    assert addrs(name) == ["10.77.0.6"], addrs(name)
    await net.destroy("k")
    await net.destroy("k")                                      # idempotent
    assert not Path(info.path).exists() and info.host_veth not in ip("-o", "link", "show")
    Path(info.path).touch()                                     # a stale name left by a crash
    await net.prepare("k", "10.77.0.5")
    assert addrs(name) == ["10.77.0.5"]
    try:
        await net.publish("10.77.0.5", info.host_veth)          # no default route here: no uplink
        raise AssertionError("publish without an uplink succeeded")
    except UplinkNotFound:
        pass
    try:
        await net.prepare("k", "127.0.0.1")
        raise AssertionError("a loopback service address was accepted")
    except InvalidRequest:
        pass
    await net.destroy("k")
    assert not Path(info.path).exists()
    # A configured uplink: the veth pair takes its MTU; publish/unpublish route and proxy-ARP through it.
    ip("link", "add", "up0", "mtu", "1400", "type", "veth", "peer", "name", "up0p")  # no dummy module here
    ip("link", "set", "up0", "up")
    ip("link", "set", "up0p", "up")
    net2 = ServiceNetwork(NetworkConfig(uplink="up0"), namespace="t")
    info = await net2.prepare("k", "10.77.0.5")
    mtus = [json.loads(ip("-j", "link", "show", "dev", dev, netns=ns))[0]["mtu"]
            for dev, ns in ((info.host_veth, None), ("eth0", Path(info.path).name))]
    assert mtus == [1400, 1400], mtus
    await net2.publish("10.77.0.5", info.host_veth)
    assert await net2.published("10.77.0.5") == info.host_veth
    assert "10.77.0.5 dev up0 proxy" in ip("neigh", "show", "proxy")
    ip("addr", "add", "10.77.0.1/24", "dev", "up0")
    device = "fmh" + info.host_veth[3:]
    listener = udp_listener(Path(info.path).name)
    # The packets the container takes in are counted on its veth (its request rate, in packets).
    before = await net2.packets_in(["k", "nothere"])
    assert set(before) == {"k"}, before                                  # no veth: not counted
    for _ in range(20):
        send_udp(b"request")
    assert heard(listener, 2.0) == b"request"
    while heard(listener, 0.2):
        pass
    after = await net2.packets_in(["k"])
    assert after["k"] - before["k"] >= 20, (before, after)
    assert await net2.hold("10.77.0.5", info.host_veth) is True       # before a freeze: kept, silently
    assert await net2.published("10.77.0.5") == HELD
    assert "UP" in json.loads(ip("-j", "link", "show", "dev", info.host_veth))[0]["flags"]  # it still sends
    await net2.silence(info.host_veth)                                 # frozen: silent outward too
    assert "UP" not in json.loads(ip("-j", "link", "show", "dev", info.host_veth))[0]["flags"]
    assert f"10.77.0.5 dev {device}" in ip("route", "show", "proto", "77")
    assert "10.77.0.5 dev up0 proxy" in ip("neigh", "show", "proxy")  # neighbours keep sending here
    send_udp(b"during the hold")
    await asyncio.sleep(0.2)
    assert not heard(listener)                                          # the container takes nothing in
    assert await net2.release("10.77.0.5", info.host_veth) is True    # a rollback routes it back
    assert await net2.published("10.77.0.5") == info.host_veth
    assert "UP" in json.loads(ip("-j", "link", "show", "dev", info.host_veth))[0]["flags"]
    assert device not in ip("-o", "link", "show")
    assert heard(listener, 2.0) == b"during the hold"                  # ... and gets what was kept
    assert await net2.release("10.77.0.5", info.host_veth) is False
    assert await net2.hold("10.77.0.5", "fmvnothere") is False        # not routed there: nothing to hold
    assert "fmhnothere" not in ip("-o", "link", "show")
    assert await net2.hold("10.77.0.5", info.host_veth) is True       # the decision unpublishes it held
    send_udp(b"for the new home")
    assert await net2.unpublish("10.77.0.5") is True and await net2.published("10.77.0.5") is None
    assert device not in ip("-o", "link", "show")
    assert ip("neigh", "show", "proxy").strip() == ""
    await net2.publish("10.77.0.5", info.host_veth)                   # (the new home, here)
    assert await net2.forward_held("10.77.0.5") == 1
    assert heard(listener, 2.0) == b"for the new home"
    assert await net2.forward_held("10.77.0.5") == 0                  # sent once
    assert await net2.hold("10.77.0.5", info.host_veth) is True
    await net2.destroy("k")                                            # the hold device goes with the rest
    assert device not in ip("-o", "link", "show")
    await net2.close()
    print(json.dumps({"netns": info.path, "veth": info.host_veth}))

asyncio.run(main())
"""


async def test_adapter_prepare_repairs_and_destroy_is_idempotent() -> None:
    require_root()
    scratch = f"fnt-{secrets.token_hex(3)}"
    await nsh.aip("netns", "add", scratch)
    inode = nsh.netns_inode(scratch)
    try:
        res = await nsh.arun([sys.executable, "-c", _ADAPTER_SCRIPT], netns=scratch, check=False, within=60)
        assert res.returncode == 0, res.stderr
        out = json.loads(res.stdout.strip().splitlines()[-1])
        assert out["netns"] == f"/run/netns/{netns_name(f'{inode}/t', 'k')}"
    finally:
        remove_netns(f"/run/netns/{netns_name(f'{inode}/t', 'k')}")
        nsh.del_netns(scratch)


def _ipv4(dst: str, size: int = 40) -> bytes:
    header = bytes([0x45, 0, 0, size, 0, 0, 0, 0, 64, 6, 0, 0]) + socket.inet_aton("10.9.9.9") + socket.inet_aton(dst)
    return header + bytes(size - 20)


def test_held_traffic_keeps_packets_for_its_address_within_its_budget() -> None:
    """The hold keeps IPv4 packets for its own address, oldest first, and counts what is over budget."""
    reader, writer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)  # one read, one packet
    reader.setblocking(False)
    held = HeldTraffic("10.77.0.5", "fmhtest", os.dup(reader.fileno()), budget=100)
    reader.close()
    for packet in (
        _ipv4("10.77.0.5"),
        _ipv4("10.77.0.6"),  # another address
        b"\x60" + bytes(39),  # IPv6 (the device's own chatter)
        _ipv4("10.77.0.5", 50),
        _ipv4("10.77.0.5"),  # 40 + 50 + 40 > 100
    ):
        writer.send(packet)
    writer.close()
    kept = held.take()
    held.close()
    assert kept == [_ipv4("10.77.0.5"), _ipv4("10.77.0.5", 50)]
    assert held.dropped == 1
    assert held.take() == []
