"""`ferryctl image import` and `image export` through the installed binaries, on a real containerd.

The archives are built here from the harness's images (tests/harness/images.py): an OCI image layout
and a `docker save` tar. Names use IP-literal registries (or are never pulled), so nothing here
resolves a name off this machine.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import secrets
import tarfile
from pathlib import Path

import pytest

from agent.errors import InvalidArchive
from agent.images.archive import Archive, read_archive
from agent.oci import normalize_name
from tests import test_agent_e2e
from tests.harness.containerd import PrivateContainerd
from tests.harness.images import TEST_KEEP, build_test_image, docker_archive, oci_archive, random_layer
from tests.test_agent_e2e import Daemon

daemon = test_agent_e2e.daemon
"""The installed agent on the session's containerd, in a namespace of its own (tests/test_agent_e2e.py)."""


async def _logs(d: Daemon, container: str, text: str) -> str:
    for _ in range(100):
        out = (await d.ctl("logs", container)).stdout
        if text in out:
            return out
        await asyncio.sleep(0.05)
    raise AssertionError(f"{container} never printed {text!r}: {out!r}")


def _namespace_state(containerd: PrivateContainerd, namespace: str) -> dict[str, list[str]]:
    """What the namespace holds: images, content, active ingests, leases, snapshots."""
    out = {}
    for what, args in {
        "images": ("images", "ls", "-q"),
        "content": ("content", "ls", "-q"),
        "ingests": ("content", "active"),
        "leases": ("leases", "ls", "-q"),
        "snapshots": ("snapshots", "ls"),
    }.items():
        lines = containerd.ctr(*args, namespace=namespace).stdout.splitlines()
        out[what] = [line for line in lines if line.strip() and not line.startswith(("KEY", "REF"))]
    return out


async def test_oci_archive_import_run_and_export_round_trip(
    daemon: Daemon, containerd: PrivateContainerd, workdir: Path
) -> None:
    image = build_test_image().build()
    ref = f"127.0.0.1:1/archives/oci-{secrets.token_hex(3)}:v1"
    archive = workdir / "oci.tar"
    archive.write_bytes(oci_archive(image))  # named only by its tag: the import names it

    res = await daemon.ctl("--json", "image", "import", str(archive), "--name", ref)
    [imported] = json.loads(res.stdout)["images"]
    assert imported["name"] == ref and imported["digest"] == image.digest
    assert ref in containerd.ctr("images", "ls", "-q", namespace=daemon.namespace).stdout

    await daemon.ctl("run", "--name", "from-oci", ref)
    assert TEST_KEEP.decode() in await _logs(daemon, "from-oci", TEST_KEEP.decode())

    exported = workdir / "exported.tar"
    res = await daemon.ctl("--json", "image", "export", ref, "-o", str(exported))
    assert json.loads(res.stdout) == {"name": ref, "file": str(exported), "size": exported.stat().st_size}
    with tarfile.open(exported) as tar:
        names = tar.getnames()
        index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
        [entry] = index["manifests"]
        assert entry["digest"] == image.digest
        assert entry["annotations"]["io.containerd.image.name"] == ref
        for member in tar.getmembers():
            if member.name.startswith("blobs/sha256/"):
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                assert hashlib.sha256(data).hexdigest() == member.name.rsplit("/", 1)[1]
    assert names[:2] == ["oci-layout", "index.json"]
    assert {f"blobs/sha256/{d.removeprefix('sha256:')}" for d in (image.digest, *image.blobs())} == set(names[2:])

    # The export imports again, by the name it carries, to the same digest.
    await daemon.ctl("rm", "-f", "from-oci")
    await daemon.ctl("rmi", ref)
    res = await daemon.ctl("--json", "image", "import", str(exported))
    [again] = json.loads(res.stdout)["images"]
    assert again["name"] == ref and again["digest"] == image.digest
    # ... and exports to the same bytes.
    second = workdir / "second.tar"
    await daemon.ctl("image", "export", ref, "-o", str(second))
    assert second.read_bytes() == exported.read_bytes()


async def test_docker_save_archive_import_and_run(daemon: Daemon, workdir: Path) -> None:
    image = build_test_image().build()
    repo = f"ferryman-test/saved-{secrets.token_hex(3)}"
    archive = workdir / "saved.tar"
    archive.write_bytes(docker_archive(image, [f"{repo}:v1", f"{repo}:latest"]))

    res = await daemon.ctl("image", "import", str(archive))
    # Docker's short names, made whole as docker reads them; the manifest is written here.
    assert f"imported docker.io/{repo}:v1 sha256:" in res.stdout
    assert f"imported docker.io/{repo}:latest sha256:" in res.stdout
    listed = {i["name"]: i for i in json.loads((await daemon.ctl("--json", "images")).stdout)["images"]}
    assert listed[f"docker.io/{repo}:v1"]["digest"] == listed[f"docker.io/{repo}:latest"]["digest"]

    await daemon.ctl("run", "--name", "from-docker", f"docker.io/{repo}:v1")
    assert TEST_KEEP.decode() in await _logs(daemon, "from-docker", TEST_KEEP.decode())


async def test_a_corrupt_archive_is_refused_and_leaves_nothing(
    daemon: Daemon, containerd: PrivateContainerd, workdir: Path
) -> None:
    # A layer of its own: containerd shares content between namespaces, and would take a digest it
    # already holds (from another test) without reading the archive's bytes.
    image = build_test_image([random_layer(64 << 10, seed=secrets.randbits(32))]).build()
    top = image.layers[-1]
    corrupt = bytearray(top.blob)
    corrupt[len(corrupt) // 2] ^= 0xFF  # same size, other bytes: only the digest can tell
    archive = workdir / "corrupt.tar"
    archive.write_bytes(oci_archive(image, name="127.0.0.1:1/archives/corrupt:v1", blobs={top.digest: bytes(corrupt)}))

    res = await daemon.ctl("--json", "image", "import", str(archive), check=False)
    assert res.returncode == 1, res.stderr
    error = json.loads(res.stdout)["error"]
    assert error["code"] == "invalid_archive" and top.digest in error["message"], error
    assert res.stderr.startswith("error: invalid_archive: ")
    # The first layers and the documents were stored before the bad one: all gone again.
    assert _namespace_state(containerd, daemon.namespace) == {
        "images": [],
        "content": [],
        "ingests": [],
        "leases": [],
        "snapshots": [],
    }

    not_tar = workdir / "not.tar"
    not_tar.write_bytes(b"this is not a tar archive\n" * 100)
    res = await daemon.ctl("image", "import", str(not_tar), check=False)
    assert res.returncode == 1 and res.stderr.startswith("error: invalid_archive: "), res.stderr
    missing = await daemon.ctl("image", "import", str(workdir / "nope.tar"), check=False)
    assert missing.returncode == 1 and missing.stderr.startswith("error: io_error: "), missing.stderr
    res = await daemon.ctl(
        "image", "export", "127.0.0.1:1/archives/absent:v1", "-o", str(workdir / "x.tar"), check=False
    )
    assert res.returncode == 1 and "image_not_found" in res.stderr and not (workdir / "x.tar").exists()


# ----- reading archives, without containerd --------------------------------------------------------


def _read(tmp: Path, data: bytes) -> Archive:
    path = tmp / "a.tar"
    path.write_bytes(data)
    with path.open("rb") as file:
        return read_archive(file, 1 << 20)


def _tar(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@pytest.mark.parametrize(
    ("text", "whole"),
    [
        ("busybox", "docker.io/library/busybox:latest"),
        ("team/app:1.2", "docker.io/team/app:1.2"),
        ("localhost/app", "localhost/app:latest"),
        ("10.0.0.5:5000/team/app:1", "10.0.0.5:5000/team/app:1"),
        ("registry.example/app@sha256:" + "a" * 64, "registry.example/app@sha256:" + "a" * 64),
    ],
)
def test_docker_names_are_made_whole_as_docker_reads_them(text: str, whole: str) -> None:
    assert normalize_name(text) == whole


def test_both_formats_are_read_and_named(tmp_path: Path) -> None:
    image = build_test_image().build()
    oci = _read(tmp_path, oci_archive(image, name="10.0.0.5:5000/team/app:1"))
    assert oci.format == "oci" and [(i.target.digest, i.names) for i in oci.images] == [
        (image.digest, ("10.0.0.5:5000/team/app:1",))
    ]
    saved = _read(tmp_path, docker_archive(image, ["app:1"]))
    [entry] = saved.images
    assert saved.format == "docker" and entry.names == ("docker.io/library/app:1",)
    manifest = json.loads(saved.blobs.documents[entry.target.digest])
    # The layers as docker saves them (uncompressed), so each digest is its diff_id.
    assert [la["digest"] for la in manifest["layers"]] == [la.diff_id for la in image.layers]
    assert manifest["config"]["digest"] == image.config_digest


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ({"hello.txt": b"hi"}, "neither an OCI image layout"),
        ({"oci-layout": b"{}", "index.json": b"[1"}, "index.json in the archive is not valid JSON"),
        ({"oci-layout": b"{}", "index.json": b"{}"}, "not an image index"),
        ({"manifest.json": b'[{"Config": "c.json", "Layers": ["l.tar"]}]'}, "names 'c.json', which the archive"),
        ({"manifest.json": b"{}"}, "not a non-empty array"),
        ({"manifest.json": b'[{"Config": "c", "Layers": [], "RepoTags": ["Bad Name"]}]', "c": b"{}"}, "invalid"),
    ],
)
def test_malformed_archives_are_refused(tmp_path: Path, members: dict[str, bytes], message: str) -> None:
    with pytest.raises(InvalidArchive, match=message):
        _read(tmp_path, _tar(members))
    with pytest.raises(InvalidArchive, match="not a tar archive"):
        _read(tmp_path, b"\x00garbage" * 100)
