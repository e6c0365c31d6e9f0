"""The layer cache's HTTP API (agent/api/cache.py) over an in-memory cache with the real one's errors."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from agent.api import build_app
from agent.cache.service import ImageInUse
from agent.cache.stats import CacheCounters
from agent.errors import ImageNotFound
from tests.test_api import FakeAgent


class FakeCache:
    """What CacheService answers, for a few images in memory; its counts are the real counters'."""

    def __init__(self) -> None:
        self.images: dict[str, dict[str, Any]] = {}
        self.in_use: set[str] = set()
        self.counters = CacheCounters(CollectorRegistry())

    def add(self, name: str, size: int = 100) -> None:
        self.images[name] = {
            "name": name,
            "size": size,
            "unique_bytes": size,
            "uses": 1,
            "last_use": None,
            "origin": "registry",
            "pinned": False,
            "protected": None,
        }

    async def status(self) -> dict[str, Any]:
        used = sum(i["size"] for i in self.images.values())
        return {
            "capacity_bytes": 1000,
            "low_watermark_bytes": 900,
            "used_bytes": used,
            "blobs": len(self.images),
            "entries": len(self.images),
            "leased_bytes": 0,
            "pinned_bytes": sum(i["size"] for i in self.images.values() if i["pinned"]),
            **self.counters.to_json(),
            "images": list(self.images.values()),
        }

    def _get(self, ref: str) -> dict[str, Any]:
        if ref not in self.images:
            raise ImageNotFound(f"image {ref} is not pulled on this host")
        return self.images[ref]

    async def pin(self, ref: str, pinned: bool = True) -> dict[str, Any]:
        self._get(ref)["pinned"] = pinned
        return {"name": ref, "pinned": pinned}

    async def evict(self, ref: str) -> dict[str, Any]:
        image = self._get(ref)
        if image["pinned"] or ref in self.in_use:
            raise ImageInUse(f"image {ref} cannot be evicted: {'pinned' if image['pinned'] else 'in use'}")
        del self.images[ref]
        return {"name": ref, "evicted": True, "freed_bytes": image["size"]}

    async def prefetch(self, ref: str, pin: bool = False) -> dict[str, Any]:
        self.add(ref)
        self.images[ref]["pinned"] = pin
        return {
            "name": ref,
            "digest": "sha256:" + "e" * 64,
            "media_type": "m",
            "size": 100,
            "bytes_fetched": 100,
            "layers_fetched": 1,
            "pinned": pin,
        }


@pytest.fixture
def agent(tmp_path: Path) -> FakeAgent:
    fake = FakeAgent(tmp_path)
    fake.cache = FakeCache()  # type: ignore[attr-defined]
    return fake


@pytest.fixture
async def client(agent: FakeAgent) -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(TestServer(build_app(agent))) as c:
        yield c


async def test_status_pin_evict_prefetch(client: TestClient[Any, Any], agent: FakeAgent) -> None:
    cache: FakeCache = agent.cache  # type: ignore[attr-defined]
    cache.add("reg.local/app:1")
    resp = await client.get("/v1/cache/status")
    assert resp.status == 200 and (await resp.json())["entries"] == 1
    resp = await client.post("/v1/cache/pin", json={"ref": "reg.local/app:1"})
    assert (resp.status, await resp.json()) == (200, {"name": "reg.local/app:1", "pinned": True})
    resp = await client.post("/v1/cache/evict", json={"ref": "reg.local/app:1"})
    assert resp.status == 409 and (await resp.json())["error"]["code"] == "image_in_use"
    resp = await client.post("/v1/cache/unpin", json={"ref": "reg.local/app:1"})
    assert (await resp.json())["pinned"] is False
    resp = await client.post("/v1/cache/evict", json={"ref": "reg.local/app:1"})
    assert (resp.status, (await resp.json())["freed_bytes"]) == (200, 100)
    resp = await client.post("/v1/cache/evict", json={"ref": "reg.local/app:1"})
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "image_not_found"
    resp = await client.post("/v1/cache/prefetch", json={"ref": "reg.local/app:2", "pin": True})
    assert resp.status == 200 and (await resp.json())["pinned"] is True


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/v1/cache/pin", {}, "body: missing"),
        ("/v1/cache/pin", {"ref": "a", "pin": True}, "unknown fields ['pin']"),
        ("/v1/cache/evict", {"ref": 3}, "body.ref"),
        ("/v1/cache/prefetch", {"ref": "a", "pin": "yes"}, "body.pin: expected a boolean"),
    ],
)
async def test_bad_bodies_are_400(client: TestClient[Any, Any], path: str, body: Any, message: str) -> None:
    resp = await client.post(path, json=body)
    error = (await resp.json())["error"]
    assert resp.status == 400 and error["code"] == "invalid_request" and message in error["message"], error


async def test_without_a_cache_the_routes_answer_503(tmp_path: Path) -> None:
    async with TestClient(TestServer(build_app(FakeAgent(tmp_path)))) as c:  # type: ignore[arg-type]
        resp = await c.get("/v1/cache/status")
        assert resp.status == 503 and (await resp.json())["error"]["code"] == "cache_unavailable"


async def test_ferryctl_cache_plain_output_and_refusal(short_dir: Path) -> None:
    """`ferryctl cache` as an operator reads it, and `evict` of an image in use: exit 1, the API's code."""
    from agent.api import serve
    from tests.test_ctl_scripting import run

    fake = FakeAgent(short_dir)
    cache = FakeCache()
    fake.cache = cache  # type: ignore[attr-defined]
    cache.add("reg.local/app:1", size=3 << 20)
    cache.in_use.add("reg.local/app:1")
    server = await serve(build_app(fake), f"unix://{short_dir}/agent.sock")  # type: ignore[arg-type]
    try:
        r = await run(server, "cache")
        assert r.code == 0, r
        assert r.out.startswith("used 3.0 MiB of 1000 B (evicts down to 900 B), 1 images, pinned 0 B\n"), r.out
        assert "hit rate - of blobs, - of bytes; served: nothing yet" in r.out and "reg.local/app:1" in r.out
        assert "prefetch" not in r.out, "no warms, no keeps: no prefetch lines"
        cache.counters.kept("sha256:" + "a" * 64, 2 << 20, ttl=60)
        cache.counters.blob("local", 2 << 20, "sha256:" + "a" * 64)  # a pull found it: used
        r = await run(server, "cache")
        line = "prefetch keeps: 1 layers here kept (2.0 MiB), 1 used (2.0 MiB), 0 ended unused (0 B), 0 pending"
        assert f"\n{line}\n" in r.out, r.out
        r = await run(server, "cache", "--json")
        keeps = r.json()["warms"]["keeps"]
        assert (keeps["kept"], keeps["used"], keeps["used_bytes"], keeps["pending"]) == (1, 1, 2 << 20, 0)
        r = await run(server, "cache", "evict", "reg.local/app:1")
        assert (r.code, r.err) == (1, "error: image_in_use: image reg.local/app:1 cannot be evicted: in use\n")
        r = await run(server, "cache", "prefetch", "reg.local/app:2", "--pin")
        assert r.out == "prefetched reg.local/app:2 (100 B fetched), pinned\n"
    finally:
        await server.close()
