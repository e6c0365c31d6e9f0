"""Cold pull through the agent vs `ctr images pull --plain-http`, same image, same registry.

Each round starts two fresh containerds (fresh content stores), then pulls once through the agent's
HTTP API and once with ctr, alternating which goes first. Prints the median agent/ctr time ratio.
Run as root from the repo: .venv/bin/python bench/pull.py [--rounds 5] [--layers 4] [--layer-mib 25]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import signal
import statistics
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.harness.containerd import PrivateContainerd, scratch_dir
from tests.harness.images import ImageBuilder, busybox_layer, random_layer
from tests.harness.registry import DockerRegistry

BIN = Path(sys.executable).parent


async def agent_pull(base: Path, registry: DockerRegistry, ref: str) -> float:
    ctrd = PrivateContainerd(base / f"agent-{secrets.token_hex(3)}")
    await ctrd.start()
    sock = ctrd.workdir / "agent.sock"
    config = ctrd.workdir / "agent.toml"
    config.write_text(
        f'[containerd]\nsocket = "{ctrd.socket}"\nnamespace = "bench"\n'
        f'[api]\nlisten = "unix://{sock}"\n'
        f'[runtime]\nlog_dir = "{ctrd.workdir / "logs"}"\n'
        f'[[registries]]\nhost = "{registry.host}"\nplain_http = true\n'
    )
    log = (ctrd.workdir / "agent.log").open("wb")
    proc = await asyncio.create_subprocess_exec(str(BIN / "ferryman-agent"), "--config", str(config), stderr=log)
    try:
        for _ in range(400):
            if sock.exists():
                break
            await asyncio.sleep(0.025)
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock))) as http:
            started = time.perf_counter()
            async with http.post("http://agent/v1/images/pull", json={"ref": ref}) as resp:
                body = await resp.json()
            elapsed = time.perf_counter() - started
        if resp.status != 200:
            raise RuntimeError(f"agent pull failed: {json.dumps(body)}")
        return elapsed
    finally:
        proc.send_signal(signal.SIGTERM)
        await proc.wait()
        log.close()
        await ctrd.stop()


async def ctr_pull(base: Path, ref: str) -> float:
    ctrd = PrivateContainerd(base / f"ctr-{secrets.token_hex(3)}", namespace="bench")
    await ctrd.start()
    try:
        started = time.perf_counter()
        await ctrd.actr("images", "pull", "--plain-http", ref, within=600)
        return time.perf_counter() - started
    finally:
        await ctrd.stop()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--layer-mib", type=int, default=25)
    args = parser.parse_args()

    async with scratch_dir() as base:
        registry = DockerRegistry(base / "registry")
        await registry.start()
        try:
            layers = [busybox_layer()] + [
                random_layer(args.layer_mib << 20, seed=i, file_size=4 << 20) for i in range(args.layers)
            ]
            image = ImageBuilder(layers).build()
            await image.push(registry.host, "bench/pull", "v1")
            ref = f"{registry.host}/bench/pull:v1"
            total = sum(layer.size for layer in image.layers)
            print(f"image {ref}: {len(layers)} layers, {total / 1e6:.1f} MB compressed")
            # Warm the registry's page cache so round 1 is not special.
            await ctr_pull(base, ref)
            ratios = []
            for n in range(args.rounds):
                if n % 2 == 0:
                    agent_s = await agent_pull(base, registry, ref)
                    ctr_s = await ctr_pull(base, ref)
                else:
                    ctr_s = await ctr_pull(base, ref)
                    agent_s = await agent_pull(base, registry, ref)
                ratios.append(agent_s / ctr_s)
                print(
                    f"round {n + 1}: agent {agent_s:.2f} s ({total / agent_s / 1e6:.0f} MB/s), "
                    f"ctr {ctr_s:.2f} s ({total / ctr_s / 1e6:.0f} MB/s), ratio {ratios[-1]:.2f}"
                )
            print(f"bench pull: {statistics.median(ratios):.2f} agent/ctr (target <= 1.0)")
        finally:
            await registry.stop()


if __name__ == "__main__":
    asyncio.run(main())
