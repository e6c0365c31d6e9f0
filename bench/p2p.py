"""Pulls through fleet peers vs from the registry, side by side on a 4-host mesh.

The registry sits behind a 100 Mbit/s link (tc tbf on the mesh bridge in the fabric namespace: it
shapes what the registry sends, not host-to-host traffic, which goes bridge port to port
unshaped). The image: 5 incompressible layers, 500 MB in all, the largest 250 MB.

  p2p:    host h1 holds the image; host h2 pulls it cold, once through peers and once from the
          registry alone ([sharing] min_peer_size above every blob), alternating which goes first,
          h2's image and content removed before each pull. Result: median peer time / registry time.
  fanout: every host's copy removed, then all 4 pull at once (peers on). Result: registry egress
          bytes (what passed the bridge's tbf) / image bytes; the p95 pull time over the solo registry
          pull's median (from the p2p rounds) is printed in the text.

Run as root from the repo: .venv/bin/python bench/p2p.py [--rounds 5] [--fanout-rounds 2]
  [--total-mib 500] [--rate 100mbit]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.harness.containerd import scratch_dir
from tests.harness.fleet import api, fleet
from tests.harness.images import ImageBuilder, random_layer
from tests.harness.mesh import Mesh, MeshHost

SHARING: dict[str, Any] = {"stall_timeout": 10.0}
REGISTRY_ONLY: dict[str, Any] = {**SHARING, "min_peer_size": 1 << 40}
SHARES = (0.5, 0.2, 0.15, 0.1, 0.05)
"""Each layer's part of the image: one half, then the rest."""


async def timed_pull(host: MeshHost, ref: str) -> float:
    started = time.perf_counter()
    await api(host, "POST", "/v1/images/pull", {"ref": ref}, expect=200)
    return time.perf_counter() - started


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--fanout-rounds", type=int, default=2)
    parser.add_argument("--total-mib", type=int, default=500)
    parser.add_argument("--rate", default="100mbit")
    args = parser.parse_args()

    total = args.total_mib * 1_000_000
    layers = [
        random_layer(int(total * share), seed=i, file_size=4 << 20, compression="none")
        for i, share in enumerate(SHARES)
    ]
    image = ImageBuilder(layers).build()
    size = sum(layer.size for layer in image.layers)
    digests = [layer.digest for layer in image.layers]

    async def all_sharing(mesh: Mesh) -> None:
        for host in mesh.hosts:
            host.settings["sharing"] = dict(SHARING)

    async with scratch_dir() as base, fleet(base, hosts=4, idle_timeout=60.0, before_agents=all_sharing) as mesh:
        await image.push(mesh.push_host, "bench/p2p", "v1")
        ref = mesh.image_ref("bench/p2p", "v1")
        await mesh.shape_registry(args.rate)
        print(f"image {ref}: {len(layers)} layers, {size / 1e6:.1f} MB; registry egress limited to {args.rate}")
        h1, h2 = mesh["h1"], mesh["h2"]
        await timed_pull(h1, ref)  # h1 holds the image (and the registry's page cache is warm)

        peer_times, registry_times = [], []
        for n in range(args.rounds):
            order = ("peers", "registry") if n % 2 == 0 else ("registry", "peers")
            for mode in order:
                await h2.configure("sharing", SHARING if mode == "peers" else REGISTRY_ONLY)
                await h2.forget_image(ref, digests)
                elapsed = await timed_pull(h2, ref)
                (peer_times if mode == "peers" else registry_times).append(elapsed)
            print(
                f"round {n + 1}: peers {peer_times[-1]:.2f} s ({size / peer_times[-1] / 1e6:.0f} MB/s), "
                f"registry {registry_times[-1]:.2f} s ({size / registry_times[-1] / 1e6:.1f} MB/s), "
                f"ratio {peer_times[-1] / registry_times[-1]:.3f}"
            )
        solo = statistics.median(registry_times)
        ratio = statistics.median(p / r for p, r in zip(peer_times, registry_times, strict=True))
        print(f"bench p2p: {ratio:.3f} ratio (target <= 0.2)")

        await h2.configure("sharing", SHARING)
        egress_ratios, p95s = [], []
        for n in range(args.fanout_rounds):
            for host in mesh.hosts:
                await host.forget_image(ref, digests)
            before = await mesh.registry_sent()
            times = await asyncio.gather(*(timed_pull(host, ref) for host in mesh.hosts))
            egress = await mesh.registry_sent() - before
            p95 = statistics.quantiles(times, n=20, method="inclusive")[18]
            egress_ratios.append(egress / size)
            p95s.append(p95 / solo)
            print(
                f"fanout {n + 1}: pulls {', '.join(f'{t:.1f}' for t in times)} s, p95 {p95:.1f} s"
                f" = {p95 / solo:.2f}x the solo registry pull ({solo:.1f} s; target <= 1.3x),"
                f" registry sent {egress / 1e6:.0f} MB = {egress / size:.2f}x the image"
            )
        print(
            f"fanout p95 over solo: {statistics.median(p95s):.2f}x (target <= 1.3x);"
            f" registry egress per image: {', '.join(f'{r:.2f}' for r in egress_ratios)}"
        )
        print(f"bench fanout: {statistics.median(egress_ratios):.2f} ratio (target <= 1.1)")


if __name__ == "__main__":
    asyncio.run(main())
