"""A container whose image came from an archive migrates: the target takes the blobs from the source.

Through the installed binaries: `ferryctl image import` on the source only, `ferryctl run`, then
`ferryctl migrate`. The image is named after a registry address in the mesh where a listener counts
connections: the target must never connect to it, and the memory must verify on the target.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.harness.fleet import api, fleet, memhog_status, task_states, verify_memory
from tests.harness.images import oci_archive
from tests.harness.mesh import Mesh, MeshHost
from tests.harness.netns import acall_in_netns
from tests.harness.workloads import memhog_image

FERRYCTL = Path(sys.executable).parent / "ferryctl"


@pytest.fixture
async def mesh(base_dir: Path) -> AsyncIterator[Mesh]:
    async with fleet(base_dir, hosts=2) as m:
        yield m


async def ferryctl(host: MeshHost, *args: str, within: float = 120) -> subprocess.CompletedProcess[str]:
    proc = await asyncio.create_subprocess_exec(
        str(FERRYCTL), "--agent", f"unix://{host.api_socket}", *args,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), within)
    return subprocess.CompletedProcess(args, proc.returncode or 0, out.decode(), err.decode())


@contextlib.asynccontextmanager
async def connection_counter(mesh: Mesh) -> AsyncIterator[tuple[str, list[str]]]:
    """A TCP listener on the fabric's gateway (where the mesh's registry is): (host:port, the peers
    that connected). Every connection is closed at once, so a registry client fails fast."""
    sock = await acall_in_netns(mesh.fabric.netns, socket.create_server, (mesh.gateway, 0))
    sock.setblocking(False)
    seen: list[str] = []
    loop = asyncio.get_running_loop()

    async def accept() -> None:
        while True:
            conn, peer = await loop.sock_accept(sock)
            seen.append(peer[0])
            conn.close()

    task = asyncio.create_task(accept(), name="connection-counter")
    try:
        yield f"{mesh.gateway}:{sock.getsockname()[1]}", seen
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        sock.close()


async def test_an_imported_image_migrates_with_its_blobs_from_the_source(mesh: Mesh, workdir: Path) -> None:
    async with connection_counter(mesh) as (registry, connections):
        await _migrate_imported_image(mesh, workdir, registry, connections)


async def _migrate_imported_image(mesh: Mesh, workdir: Path, registry: str, connections: list[str]) -> None:
    h1, h2 = mesh["h1"], mesh["h2"]
    image = memhog_image(16, 1).build()
    ref = f"{registry}/archived/memhog-{secrets.token_hex(3)}:v1"
    archive = workdir / "memhog.tar"
    archive.write_bytes(oci_archive(image, name=ref))

    res = await ferryctl(h1, "--json", "image", "import", str(archive))
    assert res.returncode == 0, res.stderr
    assert [i["digest"] for i in json.loads(res.stdout)["images"]] == [image.digest]
    res = await ferryctl(h1, "run", "--name", "hog", ref)
    assert res.returncode == 0, res.stderr
    before = await memhog_status(h1, "hog")

    res = await ferryctl(h1, "--json", "migrate", "hog", "--to", "h2", "--mode", "precopy", within=180)
    assert res.returncode == 0, (res.stdout, res.stderr)
    record = json.loads(res.stdout)
    assert record["state"] == "COMMIT", record
    assert task_states(h2) == {"hog": "RUNNING"} and "hog" not in task_states(h1)
    await asyncio.sleep(0.3)
    assert (await memhog_status(h2, "hog")).beats > before.beats
    assert await verify_memory(h2, "hog") == "ok"

    # The target got the image from the source, verified, under the same name and digest.
    [ready] = h2.log_events("image ready")
    assert ready["from"] == "peer" and ready["blobs"] == 1 + 1 + len(image.layers), ready  # manifest, config, layers
    # ... and the source's record says so, with the time the image took.
    assert record["stats"]["image_from"] == "peer" and record["stats"]["image_ms"] == ready["ms"], record["stats"]
    assert ready["bytes"] == len(image.manifest) + len(image.config) + sum(la.size for la in image.layers)
    [sent] = h1.log_events("image blobs sent")
    assert sent["bytes"] == ready["bytes"], sent
    images = {i["name"]: i for i in (await api(h2, "GET", "/v1/images"))["images"]}
    assert images[ref]["digest"] == image.digest
    # ... and never connected to the registry its name points at.
    assert connections == []

    # Back to the source, which still holds the image: nothing is fetched at all.
    res = await ferryctl(h2, "--json", "migrate", "hog", "--to", "h1", "--mode", "precopy", within=180)
    assert res.returncode == 0 and json.loads(res.stdout)["state"] == "COMMIT", (res.stdout, res.stderr)
    [local] = h1.log_events("image ready")
    assert local["from"] == "local" and local["blobs"] == 0, local
    assert json.loads(res.stdout)["stats"]["image_from"] == "local"
    assert await verify_memory(h1, "hog") == "ok"
    assert connections == []
    # The counter does see a host that asks that registry.
    res = await ferryctl(h2, "pull", f"{registry}/archived/other:v1")
    assert res.returncode != 0 and connections == [h2.address], (res.stderr, connections)
