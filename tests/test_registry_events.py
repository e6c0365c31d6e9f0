"""A registry's push notifications as releases (POST /v1/registry/events, coordinator/registry_events.py).

The real docker-registry posts its events to a real coordinator process; the service's side is
checked in process on the same code (coordinator/warm.py `WarmService.registry_events`).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from coordinator.model import StartRecord
from coordinator.sqlite_store import SqliteStore
from coordinator.warm import WarmService
from coordinator.warm_predictor import released
from core.errors import InvalidRequest
from tests.harness.coordinator import CoordinatorPki, CoordinatorProcess, free_port, new_token
from tests.harness.images import ImageBuilder, random_layer
from tests.harness.registry import DockerRegistry, Notifications

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar"


def _digest(c: str) -> str:
    return "sha256:" + c * 64


def _push(repository: str, tag: str, layers: list[str], host: str = "registry.test") -> dict[str, Any]:
    """One manifest push event as docker-registry 2.8 sends it with `includereferences`."""
    return {
        "id": f"{repository}-{tag}",
        "timestamp": "2026-12-06T12:00:00Z",
        "action": "push",
        "target": {
            "mediaType": MANIFEST,
            "digest": _digest("9"),
            "size": 500,
            "repository": repository,
            "tag": tag,
            "url": f"http://{host}/v2/{repository}/manifests/{_digest('9')}",
            "references": [
                {"mediaType": CONFIG, "digest": _digest("8"), "size": 300},
                *({"mediaType": LAYER, "digest": d, "size": 1000} for d in layers),
            ],
        },
        "request": {"id": "r", "addr": "127.0.0.1:4000", "host": host, "method": "PUT", "useragent": "x"},
        "actor": {},
        "source": {"addr": "registry:5000", "instanceID": "i"},
    }


async def test_a_push_of_a_new_tag_is_a_release_and_a_bad_envelope_changes_nothing(workdir: Path) -> None:
    store = await SqliteStore.open(workdir / "c.db")
    try:
        warm = WarmService(store, None, time.time)
        base, old_app, new_app = _digest("a"), _digest("b"), _digest("c")
        warm.started(
            StartRecord(
                "h1", 100.0, "sig-web-1", (base, old_app), source="image:registry.test/app/web:v1", sizes=(5, 7)
            )
        )
        refs = dict(warm.layer_refs)
        # one valid release first, then an event that is no event: the whole envelope is refused
        bad = {"events": [_push("app/web", "v2", [base, new_app]), {"action": "push", "target": {"digest": "x"}}]}
        with pytest.raises(InvalidRequest, match="events/1/target") as refused:
            warm.registry_events(bad)
        assert "'mediaType' is a required property" in refused.value.message
        with pytest.raises(InvalidRequest, match="events"):
            warm.registry_events({"events": "push"})
        assert warm.fleet.releases == {} and warm.layer_refs == refs

        ignored = {"events": [_push("app/web", "v1", [base, old_app]), _push("other/db", "v1", [_digest("d")])]}
        assert warm.registry_events(ignored) == {"events": 2, "pushes": 2, "releases": []}
        got = warm.registry_events({"events": [_push("app/web", "v2", [base, new_app])]})
        assert got == {"events": 1, "pushes": 1, "releases": ["image:registry.test/app/web:v2"]}
        # the new layer is warmable by the pushed reference and takes the old layer's score on h1
        assert warm.layer_refs[new_app] == ("registry.test/app/web:v2", 1000)
        scores = released({base: 0.9, old_app: 0.6}, warm.hosts["h1"], warm.fleet)
        assert scores == {base: 0.9, new_app: 0.6}
        # the image's first start keeps the release
        warm.started(
            StartRecord(
                "h2", 200.0, "sig-web-2", (base, new_app), source="image:registry.test/app/web:v2", sizes=(5, 9)
            )
        )
        assert released({base: 0.9, old_app: 0.6}, warm.hosts["h1"], warm.fleet) == scores
    finally:
        await store.close()


def _pushes(metrics_text: str) -> dict[str, float]:
    return {
        s.labels["outcome"]: s.value
        for family in text_string_to_metric_families(metrics_text)
        if family.name == "ferryman_coordinator_registry_pushes"
        for s in family.samples
        if s.name.endswith("_total")
    }


async def test_the_real_registry_notifies_the_coordinator_of_a_release(workdir: Path) -> None:
    pki, token = CoordinatorPki(workdir / "pki"), new_token()
    registry_port = free_port()
    host = f"127.0.0.1:{registry_port}"
    v1 = ImageBuilder([random_layer(64 << 10, seed=1), random_layer(64 << 10, seed=2)]).build()
    v2 = ImageBuilder([random_layer(64 << 10, seed=1), random_layer(64 << 10, seed=3)]).build()
    (workdir / "coordinator").mkdir()
    coordinator = CoordinatorProcess(workdir / "coordinator", pki, tokens=(token,))
    # the fleet ran v1 on h1: the coordinator's start history has it when it starts
    store = await SqliteStore.open(coordinator.database)
    try:
        layers = tuple(str(layer.digest) for layer in v1.layers)
        await store.record_start(
            StartRecord("h1", time.time() - 60, "sig-web-1", layers, source=f"image:{host}/app/web:v1", sizes=(1, 1)),
            keep=100,
            max_age=3600.0,
        )
    finally:
        await store.close()
    notify = Notifications(
        f"{coordinator.url}/v1/registry/events", {"Authorization": f"Bearer {token}"}, pki.server.ca_file
    )
    await coordinator.start()
    try:
        async with (
            DockerRegistry(workdir / "registry", port=registry_port, notifications=notify) as registry,
            coordinator.client(token=token) as ops,
        ):
            await v1.push(registry.host, "app/web", "v1")  # an image the fleet has seen: no release
            await v2.push(registry.host, "app/web", "v2")  # a new tag of a repository the fleet runs
            seen: dict[str, float] = {}
            for _ in range(200):
                status, body = await ops.get("/metrics")
                assert status == 200, body
                seen = _pushes(body["text"])
                if seen.get("release", 0) >= 1 and seen.get("ignored", 0) >= 1:
                    break
                await asyncio.sleep(0.1)
            assert seen == {"release": 1.0, "ignored": 1.0}, (seen, (registry.workdir / "registry.log").read_text())

            # a bad body: a clear error, nothing counted; no token: refused
            status, body = await ops.post("/v1/registry/events", {"events": [{"action": "push"}]})
            assert status == 400 and "events/0: 'target' is a required property" in body["error"]["message"]
            async with coordinator.client() as anonymous:
                status, _ = await anonymous.post("/v1/registry/events", {"events": []})
                assert status == 401
            status, body = await ops.get("/metrics")
            assert _pushes(body["text"]) == {"release": 1.0, "ignored": 1.0}
    finally:
        await coordinator.stop()
