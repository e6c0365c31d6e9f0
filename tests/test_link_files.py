"""Image files over a real stream channel: the small ones travel as one bundle, the big ones alone."""

from __future__ import annotations

import asyncio
import io
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.migration.link import IMAGE_BUNDLE, SMALL_FILE, FileIn, Link, PeerFailed, unpack_files
from tests.harness.links import link_pair


@pytest.fixture
async def links(tmp_path: Path) -> AsyncIterator[tuple[Link, Link]]:
    async with link_pair(tmp_path, "mig-files") as pair:
        yield pair


async def test_small_files_travel_as_one_bundle(links: tuple[Link, Link], tmp_path: Path) -> None:
    source, target = links
    dump = tmp_path / "dump"
    dump.mkdir()
    contents = {f"core-{n}.img": bytes([n]) * (100 * n) for n in range(1, 21)}
    contents["empty.img"] = b""
    contents["pages-1.img"] = b"\x07" * (SMALL_FILE + 1)  # too big to bundle: sent alone
    for name, data in contents.items():
        (dump / name).write_bytes(data)
    await source.send_files(sorted(dump.iterdir()))
    bundle = await target.recv()
    assert isinstance(bundle, FileIn) and bundle.name == IMAGE_BUNDLE
    images = tmp_path / "images"
    images.mkdir()
    names = await asyncio.to_thread(unpack_files, bundle.path, images)
    assert sorted(names) == sorted(n for n in contents if n != "pages-1.img")
    assert not bundle.path.exists()
    big = await target.recv()
    assert isinstance(big, FileIn) and big.name == "pages-1.img"
    big.path.replace(images / big.name)
    assert {p.name: p.read_bytes() for p in images.iterdir()} == contents


def _tar_with(member: tarfile.TarInfo, data: bytes = b"") -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        tar.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return out.getvalue()


@pytest.mark.parametrize("kind", ["subdir", "dotdot", "absolute", "symlink", "device"])
def test_a_bundle_that_would_write_elsewhere_is_refused(tmp_path: Path, kind: str) -> None:
    member = tarfile.TarInfo({"subdir": "a/b.img", "dotdot": "../x.img", "absolute": "/etc/x.img"}.get(kind, "x.img"))
    if kind == "symlink":
        member.type, member.linkname = tarfile.SYMTYPE, "/etc/passwd"
    elif kind == "device":
        member.type = tarfile.CHRTYPE
    else:
        member.size = 3
    bundle = tmp_path / IMAGE_BUNDLE
    bundle.write_bytes(_tar_with(member, b"abc"))
    dest = tmp_path / "images"
    dest.mkdir()
    with pytest.raises(PeerFailed, match="only plain files"):
        unpack_files(bundle, dest)
    assert list(dest.iterdir()) == []
