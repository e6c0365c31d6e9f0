"""Deployments on a 3-host coordinated fleet: time to all-healthy, and teardown after a failure.

The pipeline of tests/test_deployments.py (detect -> render over a shared volume, render ->
transcode over HTTP; busybox programs, an HTTP check every 0.2 s) is deployed `--rounds` times
cold (images in the hosts' containerd after the first round, no container of it running) and
undeployed after each. Then `--rounds` deployments with one injected failure, alternating a
missing image and a check that never passes, each needing a healthy dependency first (so there is
something to roll back). Measured on the coordinator's clock from the record's history:
all-healthy = HEALTHY - PLANNED; teardown = FAILED - ROLLING_BACK; and the alert latency, from
ROLLING_BACK to the webhook POST arriving at a receiver in the fabric namespace. Docker Compose's
`up` polls health every 500 ms and leaves a failed stack running; there is no cross-host
all-or-nothing baseline to run beside it.

Run as root from the repo: .venv/bin/python bench/deploy.py [--rounds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.harness.alerts import AlertReceiver
from tests.harness.containerd import scratch_dir
from tests.harness.fleet import coordinated_fleet
from tests.harness.mesh import Mesh
from tests.test_deployments import (
    DETECT_TO_VOLUME,
    PORT,
    RENDER_FROM_VOLUME,
    entry,
    fetch_then_serve,
    push,
)

TARGET_HEALTHY = 2.0
TARGET_TEARDOWN = 2.0


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1] if len(values) >= 2 else values[0]


def at(record: dict[str, Any], state: str) -> float:
    return float(next(h["ts"] for h in record["history"] if h["state"] == state))


def levels(record: dict[str, Any]) -> list[float]:
    """Seconds each level took: from its STARTING (level 0: from PLANNED, so placement is in it) to
    the next level's STARTING, the last one to HEALTHY."""
    marks = [float(h["ts"]) for h in record["history"] if h["state"] in ("PLANNED", "STARTING", "HEALTHY")]
    return [b - a for a, b in zip([marks[0], *marks[2:-1]], marks[2:], strict=True)]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=30, help="cold deployments, and as many failures")
    parser.add_argument("--cpu-millis", type=int, default=100, help="[deployments] cpu_millis: each component's limit")
    args = parser.parse_args()
    holder: dict[str, AlertReceiver] = {}

    def tables(mesh: Mesh) -> dict[str, dict[str, Any]]:
        holder["receiver"] = AlertReceiver(mesh.fabric.netns, mesh.gateway)
        return {
            "deployments": {
                "address_pool": f"{mesh.subnet.network_address + 192}/28",
                "health_timeout": 30.0,
                "cpu_millis": args.cpu_millis,
            },
            "alerts": {"webhook_url": holder["receiver"].url},
        }

    async with scratch_dir() as base, coordinated_fleet(base, 3, coordinator_for=tables) as f:
        receiver = holder["receiver"]
        await receiver.start()
        arrivals: list[float] = []
        seen = 0
        try:
            mesh = f.mesh
            never = {"kind": "http", "port": PORT, "path": "/healthz", "interval": 0.2, "timeout": 0.2, "retries": 3}
            for document in (
                entry("detect", await push(mesh, "detect", DETECT_TO_VOLUME)),
                entry("render", await push(mesh, "render", RENDER_FROM_VOLUME), {"detect": "shared_volume"}),
                entry(
                    "transcode",
                    await push(mesh, "transcode", fetch_then_serve("RENDER", "transcoded")),
                    {"render": "http"},
                ),
                entry(
                    "probe",
                    await push(
                        mesh, "probe", f"mkdir -p /www && echo ok > /www/healthz && exec httpd -f -p {PORT} -h /www"
                    ),
                ),
                entry("broken", mesh.image_ref("test/absent", "v1"), {"probe": "http"}),
                entry("sick", await push(mesh, "sick", "exec sleep 3600"), {"probe": "http"}, never),
            ):
                await f.call("POST", "/v1/catalog", document, expect=201)
            await f.call("POST", "/v1/deployments?wait=120", {"image": "transcode"}, expect=200)  # warm: pulls
            for d in (await f.call("GET", "/v1/deployments"))["deployments"]:
                await f.call("DELETE", f"/v1/deployments/{d['id']}?wait=60", expect=200)

            healthy: list[float] = []
            per_level: list[list[float]] = []
            for n in range(args.rounds):
                record = await f.call("POST", "/v1/deployments?wait=120", {"image": "transcode"}, expect=200)
                assert record["state"] == "HEALTHY", record
                healthy.append(at(record, "HEALTHY") - at(record, "PLANNED"))
                per_level.append(levels(record))
                await f.call("DELETE", f"/v1/deployments/{record['id']}?wait=60", expect=200)
                split = " / ".join(f"{s:.2f}" for s in per_level[-1])
                print(f"deploy {n + 1}: all healthy in {healthy[-1]:.2f} s (levels {split} s)")

            teardown: list[float] = []
            alert_s: list[float] = []
            for n in range(args.rounds):
                name = ("broken", "sick")[n % 2]
                record = await f.call("POST", "/v1/deployments?wait=120", {"image": name}, expect=200)
                assert record["state"] == "FAILED", record
                bodies = await receiver.wait_for(seen + 1)
                arrivals.append(receiver.arrived[seen])
                seen = len(bodies)
                teardown.append(at(record, "FAILED") - at(record, "ROLLING_BACK"))
                alert_s.append(arrivals[-1] - at(record, "ROLLING_BACK"))
                print(f"failure {n + 1} ({name}): torn down in {teardown[-1]:.2f} s, alert after {alert_s[-1]:.2f} s")
        finally:
            await receiver.close()
    print(
        f"all-healthy p50 {statistics.median(healthy):.2f} s, p95 {p95(healthy):.2f} s over {len(healthy)} cold "
        f"deployments of 3 components on 3 levels; after a failure: teardown p95 {p95(teardown):.2f} s "
        f"(target <= {TARGET_TEARDOWN}), alert p95 {p95(alert_s):.2f} s after the failure (as the receiver "
        "noted each POST's arrival)"
    )
    split = ", ".join(f"level {n} {statistics.median(ls):.2f} s" for n, ls in enumerate(zip(*per_level, strict=True)))
    print(f"per level (p50; level 0 includes placement, pulls and creates): {split}")
    print(f"bench deploy: {p95(healthy):.2f} s (target <= {TARGET_HEALTHY})")


if __name__ == "__main__":
    asyncio.run(main())
