"""Shared volumes in the agent's create request: validation and the runtime spec's bind mounts."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.api.handlers import parse_create
from agent.model import Volume
from agent.runtime.spec import build_spec
from agent.runtime.volumes import VolumeDirs, mounts
from core.errors import InvalidRequest

IMAGE = {"config": {"Cmd": ["/bin/sh"]}}


def test_volumes_are_parsed_and_mounted_read_write(tmp_path: Path) -> None:
    req = parse_create({"id": "c", "image": "i", "volumes": [{"name": "d-1", "path": "/shared/frames"}]})
    assert req.volumes == (Volume("d-1", "/shared/frames"),)
    dirs = VolumeDirs(tmp_path / "volumes")
    source = dirs.ensure("d-1")
    spec = build_spec(IMAGE, req, volume_mounts=mounts(req.volumes, [source]))
    assert spec["mounts"][-1] == {
        "destination": "/shared/frames",
        "type": "bind",
        "source": str(tmp_path / "volumes" / "d-1"),
        "options": ["rbind", "rw"],
    }
    (source / "f").write_text("x")
    assert dirs.remove("d-1") and not source.exists() and not dirs.remove("d-1")


@pytest.mark.parametrize(
    ("volumes", "message"),
    [
        ({"name": "a", "path": "/x"}, "expected an array"),
        ([{"name": "a"}], "path"),
        ([{"name": "../a", "path": "/x"}], "volume name"),
        ([{"name": "a", "path": "x"}], "absolute path"),
        ([{"name": "a", "path": "/x/../y"}], "plain segments"),
        ([{"name": "a", "path": "/proc/x"}], "/proc"),
        ([{"name": "a", "path": "/x"}, {"name": "a", "path": "/y"}], "named twice"),
        ([{"name": "a", "path": "/x"}, {"name": "b", "path": "/x/y"}], "overlap"),
        ([{"name": "a", "path": "/x", "mode": "ro"}], "mode"),
    ],
)
def test_bad_volumes_are_refused_with_the_field_named(volumes: object, message: str) -> None:
    with pytest.raises(InvalidRequest, match=r"body\.volumes") as caught:
        parse_create({"id": "c", "image": "i", "volumes": volumes})
    assert message in caught.value.message
