"""The containerd adapter on its own, against the real daemon: namespaces, errors, content, events."""

from __future__ import annotations

import asyncio
import hashlib
import secrets

import pytest

from agent.containerd import Containerd, ImageRecord
from agent.errors import ContainerdAlreadyExists, ContainerdNotFound, ContainerdUnavailable, DigestMismatch
from core.errors import NotFound
from tests.harness.containerd import PrivateContainerd


async def connect(ctrd: PrivateContainerd, namespace: str | None = None) -> Containerd:
    return await Containerd.connect(ctrd.socket, namespace or f"a-{secrets.token_hex(3)}")


def blob(n: int = 300_000) -> tuple[bytes, str]:
    data = secrets.token_bytes(n)
    return data, "sha256:" + hashlib.sha256(data).hexdigest()


async def test_errors_are_typed_and_carry_containerd_message(containerd: PrivateContainerd) -> None:
    cd = await connect(containerd)
    try:
        with pytest.raises(ContainerdNotFound) as info:
            await cd.images.get("no/such:image")
        assert isinstance(info.value, NotFound)
        assert info.value.grpc_code == "NOT_FOUND"
        assert "no/such:image" in info.value.message
        with pytest.raises(ContainerdNotFound, match="no/such"):
            await cd.images.delete("no/such:image")
    finally:
        await cd.close()


async def test_unreachable_socket(tmp_path: object) -> None:
    with pytest.raises(ContainerdUnavailable, match="did not answer"):
        await Containerd.connect("/nonexistent/containerd.sock", "x", connect_timeout=0.5)


async def test_namespaces_isolate_content(containerd: PrivateContainerd) -> None:
    a, b = await connect(containerd), await connect(containerd)
    data, digest = blob()
    try:
        async with a.leases.held("t", 60) as lease:
            la = a.leased(lease)
            async with la.content.writer("r1", len(data), digest) as w:
                await w.write(data)
                await w.commit({"k": "v"})
            assert await la.content.read_all(digest) == data
            assert (await la.content.info(digest)).labels == {"k": "v"}
            assert await b.content.exists(digest) is None  # the metadata header scopes every call
    finally:
        await a.close()
        await b.close()


async def test_ingest_status_resume_and_abort(containerd: PrivateContainerd) -> None:
    cd = await connect(containerd)
    data, digest = blob()
    try:
        async with cd.leases.held("t", 60) as lease:
            lc = cd.leased(lease)
            async with lc.content.writer("resumable", len(data), digest) as w:
                await w.write(data[:100_000])
            status = await lc.content.status("resumable")
            assert status is not None and status.offset == 100_000
            async with lc.content.writer("resumable", len(data), digest) as w:
                assert w.offset == 100_000
                await w.write(data[w.offset :])
                await w.commit()
            assert await lc.content.status("resumable") is None
            # A second writer for present content is refused as already existing.
            with pytest.raises(ContainerdAlreadyExists):
                async with lc.content.writer("again", len(data), digest) as w:
                    pass
            other, other_digest = blob(1000)
            async with lc.content.writer("aborted", len(other), other_digest) as w:
                await w.write(other[:10])
            await lc.content.abort("aborted")
            assert await lc.content.status("aborted") is None
            wrong, _ = blob(1000)
            with pytest.raises(DigestMismatch):
                async with lc.content.writer("wrong", len(wrong), other_digest) as w:
                    await w.write(wrong)
                    await w.commit()
    finally:
        await cd.close()


async def test_events_report_image_changes(containerd: PrivateContainerd) -> None:
    ns = f"ev-{secrets.token_hex(3)}"
    cd = await connect(containerd, ns)
    data, digest = blob(2000)
    seen: list[str] = []

    async def watch() -> None:
        async for event in cd.events.subscribe([f'namespace=="{ns}"']):
            seen.append(event.topic)
            if event.topic == "/images/create":
                return

    watcher = asyncio.create_task(watch())
    try:
        await asyncio.sleep(0.2)  # let the subscription reach containerd
        async with cd.leases.held("t", 60) as lease:
            lc = cd.leased(lease)
            async with lc.content.writer("ev", len(data), digest) as w:
                await w.write(data)
                await w.commit()
            await lc.images.put(
                ImageRecord(name="ev/img:1", media_type="application/octet-stream", digest=digest, size=len(data))
            )
        await asyncio.wait_for(watcher, 10)
        assert "/images/create" in seen
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        await cd.images.delete("ev/img:1")
        await cd.close()
        await asyncio.sleep(0.1)  # grpc.aio finishes its cancelled stream call in a task of its own
