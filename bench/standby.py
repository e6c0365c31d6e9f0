"""A chain stage's activation: from a frozen warm standby (a thaw) against a cold start.

One mesh host (its agent on a private containerd) and a client namespace. The stage is
tests/workloads/stage.c holding `--state-mib` of buffer, at a service address.

- **frozen**: the stage is created, started, published and serving once; then each round freezes
  it (`POST /v1/containers/{id}/freeze`, the cgroup freezer: no CPU, memory and sockets kept), lets
  it sit frozen, and measures from the thaw request (`POST /v1/containers/{id}/thaw`) to the
  client's first answer. The client's request is already sent while the stage is frozen (the
  kernel takes the connection into the listen backlog; nobody reads it until the thaw), as a
  client of a standby being activated would.
  The agent writes the container's freezer cgroup itself (agent/runtime/freezer.py), so a thaw
  is one write, not a runc process.
- **kernel floor**: the same, but the bench writes the freezer file itself (no agent request): what
  the kernel, the stage and the client take; the rest of a frozen activation is the request.
- **checkpointed**: the stage checkpointed to the host's disk (`POST /v1/containers/{id}/checkpoint`:
  CRIU dumps it, its processes end, its rootfs and network namespace stay), then restored (`POST
  /v1/containers/{id}/restore`); measured from the restore request to the client's first answer,
  the client retrying every 2 ms (nothing listens until the restore).
- **cold** (the baseline, same run): from the create request (image already pulled; then the
  start request, which publishes the address) to the client's first answer, the client retrying
  every 2 ms.

Run as root from the repo: .venv/bin/python bench/standby.py [--rounds 40] [--state-mib 64]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import secrets
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.runtime import freezer
from tests.harness.containerd import scratch_dir
from tests.harness.fleet import api
from tests.harness.images import Dir, File, ImageBuilder, Layer, busybox_layer
from tests.harness.mesh import Mesh, MeshHost
from tests.harness.netns import acall_in_netns
from tests.harness.workloads import static_binary

PORT = 8080
TARGET_FROZEN_P99_MS = 10.0


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[-1] if len(values) >= 2 else values[0]


def first_answer(address: str, within: float, retry: float) -> float:
    """The monotonic time of the first 200 to GET /healthz at address (retrying every `retry` s)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection(address, PORT, timeout=max(0.05, deadline - time.monotonic()))
        try:
            conn.request("GET", "/healthz")
            if conn.getresponse().status == 200:
                return time.monotonic()
        except OSError:
            time.sleep(retry)
        finally:
            conn.close()
    raise TimeoutError(f"no answer from {address}:{PORT} within {within:g} s")


def connect_fast(address: str) -> bool:
    """Whether a connection to address is refused or unrouted within 20 ms (the cold start's probe)."""
    conn = http.client.HTTPConnection(address, PORT, timeout=0.02)
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def until_answer(address: str, within: float) -> float:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if connect_fast(address):
            return time.monotonic()
        time.sleep(0.002)
    raise TimeoutError(f"no answer from {address}:{PORT} within {within:g} s")


def spec(cid: str, image: str, address: str, state_bytes: int) -> dict[str, object]:
    return {
        "id": cid,
        "image": image,
        "args": ["/bin/stage", "bench", str(PORT), str(state_bytes), "none"],
        "service_ip": address,
    }


async def cold_start(host: MeshHost, client: str, image: str, address: str, state_bytes: int) -> float:
    cid = f"cold-{secrets.token_hex(3)}"
    began = time.monotonic()
    waiting = asyncio.create_task(acall_in_netns(client, until_answer, address, 30.0))
    await api(host, "POST", "/v1/containers", spec(cid, image, address, state_bytes), expect=201)
    await api(host, "POST", f"/v1/containers/{cid}/start")
    answered = await waiting
    await api(host, "DELETE", f"/v1/containers/{cid}?force=1", expect=204)
    return (answered - began) * 1000


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--state-mib", type=int, default=64)
    parser.add_argument("--frozen-for", type=float, default=0.2, help="seconds each round stays frozen")
    args = parser.parse_args()
    state_bytes = args.state_mib << 20
    async with scratch_dir() as base:
        mesh = Mesh(base, 1, with_client=True)
        try:
            await mesh.start()
            assert mesh.client is not None
            client, host = mesh.client.netns, mesh.hosts[0]
            layer = Layer([Dir("bin"), File("bin/stage", static_binary("stage"), 0o755)], comment="stage")
            repo = f"bench/stage-{secrets.token_hex(3)}"
            await ImageBuilder([busybox_layer(), layer]).build().push(mesh.push_host, repo, "v1")
            image = mesh.image_ref(repo, "v1")
            await api(host, "POST", "/v1/images/pull", {"ref": image})
            address = str(mesh.subnet.network_address + 100)

            cold = [await cold_start(host, client, image, address, state_bytes) for _ in range(args.rounds)]

            await api(host, "POST", "/v1/containers", spec("standby", image, address, state_bytes), expect=201)
            await api(host, "POST", "/v1/containers/standby/start")
            await acall_in_netns(client, until_answer, address, 30.0)
            pid = (await api(host, "GET", "/v1/containers/standby"))["pid"]
            cgroup = freezer.locate(pid)
            frozen: list[float] = []
            thaw_call: list[float] = []  # the agent's thaw request alone
            floor: list[float] = []
            # One keep-alive session for the thaws, as the coordinator's agent client keeps one.
            async with host.session() as agent:
                for _ in range(args.rounds):
                    for direct in (False, True):
                        await api(host, "POST", "/v1/containers/standby/freeze")
                        waiting = asyncio.create_task(acall_in_netns(client, first_answer, address, 30.0, 0.002))
                        await asyncio.sleep(args.frozen_for)
                        assert not waiting.done(), "the frozen standby answered"
                        began = time.monotonic()
                        if direct:
                            await freezer.thaw(cgroup)
                            floor.append((await waiting - began) * 1000)
                            await api(host, "POST", "/v1/containers/standby/thaw")  # the agent's bookkeeping
                            continue
                        async with agent.post("/v1/containers/standby/thaw") as resp:
                            assert resp.status == 200, await resp.text()
                        thawed = time.monotonic()
                        answered = await waiting
                        frozen.append((answered - began) * 1000)
                        thaw_call.append((thawed - began) * 1000)
            checkpointed: list[float] = []
            dump: list[float] = []
            for _ in range(args.rounds):
                began = time.monotonic()
                await api(host, "POST", "/v1/containers/standby/checkpoint")
                dump.append((time.monotonic() - began) * 1000)
                await asyncio.sleep(args.frozen_for)
                began = time.monotonic()
                waiting = asyncio.create_task(acall_in_netns(client, until_answer, address, 30.0))
                await api(host, "POST", "/v1/containers/standby/restore")
                checkpointed.append((await waiting - began) * 1000)
            await api(host, "DELETE", "/v1/containers/standby?force=1", expect=204)
        finally:
            await mesh.stop()
    series = (
        ("cold start", cold),
        ("frozen standby (thaw)", frozen),
        ("kernel floor", floor),
        ("checkpointed standby (restore)", checkpointed),
    )
    for name, values in series:
        print(
            f"{name}: p50 {statistics.median(values):.1f} ms, p99 {p99(values):.1f} ms, "
            f"max {max(values):.1f} ms ({len(values)} activations, {args.state_mib} MiB of state)"
        )
    call = f"p50 {statistics.median(thaw_call):.1f} ms, p99 {p99(thaw_call):.1f} ms"
    print(f"the thaw request to the agent, to its answer: {call}")
    print(f"the checkpoint request (CRIU dump, not on the activation's path): p50 {statistics.median(dump):.1f} ms")
    print(f"bench standby: {p99(frozen):.1f} ms (target <= {TARGET_FROZEN_P99_MS:g})")


if __name__ == "__main__":
    asyncio.run(main())
