"""Shared volumes: directories of this host that containers on it mount, to pass data through files.

A deployment's components that talk over `shared_volume` run on one host (docs/deployments.md);
the agent keeps each volume as `<state_dir>/volumes/<name>`, made when the first container that
names it is created and bind-mounted read-write at the path the request gives. A volume outlives
its containers until it is removed (`DELETE /v1/volumes/{name}`, refused while a container still
mounts it), so a dependent started after its provider sees what the provider wrote.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from agent.model import Volume
from core.errors import InvalidRequest
from core.http.validate import check_keys, json_type, str_field
from core.ids import check_container_id

MAX_VOLUMES = 16
FORBIDDEN = ("/proc", "/sys", "/dev")


def check_path(path: str, where: str) -> str:
    """An absolute path of plain segments, not under /proc, /sys or /dev; else InvalidRequest."""
    parts = path.split("/")
    if not path.startswith("/") or path == "/" or any(p in ("", ".", "..") for p in parts[1:]):
        raise InvalidRequest(f"{where}: expected an absolute path of plain segments, got {path!r}")
    if any(path == f or path.startswith(f + "/") for f in FORBIDDEN):
        raise InvalidRequest(f"{where}: must not be under /proc, /sys or /dev, got {path!r}")
    return path


def parse_volumes(raw: Any, where: str) -> tuple[Volume, ...]:
    """`[{"name", "path"}, ...]` from a request body: names unique, paths not overlapping."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise InvalidRequest(f"{where}: expected an array, got {json_type(raw)}")
    if len(raw) > MAX_VOLUMES:
        raise InvalidRequest(f"{where}: at most {MAX_VOLUMES} volumes")
    out: list[Volume] = []
    for i, item in enumerate(raw):
        at = f"{where}[{i}]"
        if not isinstance(item, dict):
            raise InvalidRequest(f"{at}: expected an object, got {json_type(item)}")
        check_keys(item, {"name", "path"}, {"name", "path"}, at)
        name, path = str_field(item, "name", at), str_field(item, "path", at)
        assert name is not None and path is not None
        try:
            check_container_id(name)
        except InvalidRequest as exc:
            raise InvalidRequest(f"{at}.name: {exc.message.replace('container id', 'volume name')}") from None
        out.append(Volume(name, check_path(path, f"{at}.path")))
    for i, a in enumerate(out):
        for b in out[i + 1 :]:
            if a.name == b.name:
                raise InvalidRequest(f"{where}: volume {a.name!r} named twice")
            if a.path == b.path or a.path.startswith(b.path + "/") or b.path.startswith(a.path + "/"):
                raise InvalidRequest(f"{where}: {a.path} and {b.path} overlap")
    return tuple(out)


def mounts(volumes: Sequence[Volume], sources: Sequence[Path]) -> list[dict[str, Any]]:
    """The runtime spec's bind mounts for `volumes` at their `sources` (one each, in order)."""
    return [
        {"destination": v.path, "type": "bind", "source": str(src), "options": ["rbind", "rw"]}
        for v, src in zip(volumes, sources, strict=True)
    ]


class VolumeDirs:
    """The volumes' directories under `<state_dir>/volumes`."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, name: str) -> Path:
        return self.root / check_container_id(name)

    def ensure(self, name: str) -> Path:
        path = self.path(name)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def exists(self, name: str) -> bool:
        return self.path(name).is_dir()

    def remove(self, name: str) -> bool:
        """Delete the volume and what is in it; False when there was none."""
        path = self.path(name)
        if not path.is_dir():
            return False
        shutil.rmtree(path)
        return True
