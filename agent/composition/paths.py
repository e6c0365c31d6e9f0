"""What a layer writes, read from its tar, and where two unordered layers disagree about a path.

Two nodes that no edge orders end up one above the other only by the tie-break. When a node
declares `paths` the manifest says what it writes (manifest.path_conflicts compares those); when it
declares none, its layer's own file list says it. `read_layer` lists a layer blob (plain, gzip, bzip2
or xz tar; zstd cannot be read here) and `conflict` finds the first path where the order would change
what the container sees:

- an entry (file, link, device, directory) both layers hold with different contents or metadata
  (type, mode, owner, link target, the SHA-256 of a file's bytes; modification times are ignored):
  a directory both create the same way, or a file both carry byte for byte, is no conflict;
- an entry of one layer at or below a non-directory of the other (a file in one, a directory in the
  other);
- a whiteout in one layer (`.wh.NAME`: NAME deleted) over an entry of the other at or below NAME,
  and an opaque directory (`.wh..wh..opq`) over an entry of the other inside it;
- against declared `paths`: any entry of the other layer at or below a declared path, or a
  non-directory above one.

Pure: `read_layer` takes an open binary file, nothing else here does I/O.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_CHUNK = 1 << 20


class UnreadableLayer(Exception):
    """The layer's file list cannot be read here (zstd, or not a tar)."""


@dataclass(frozen=True)
class LayerFiles:
    """A layer's entries by absolute path, with what makes each one what it is."""

    entries: dict[str, tuple[object, ...]] = field(default_factory=dict)
    """Path -> (kind, mode, uid, gid, content digest or link target)."""
    deleted: frozenset[str] = frozenset()
    """Paths a whiteout removes from the layers below."""
    opaque: frozenset[str] = frozenset()
    """Directories whose lower contents an opaque whiteout hides."""

    def is_dir(self, path: str) -> bool:
        entry = self.entries.get(path)
        return entry is not None and entry[0] == "dir"


def _clean(name: str) -> str:
    parts = [p for p in name.split("/") if p and p != "."]
    return posixpath.normpath("/" + "/".join(parts))


def read_layer(blob: io.BufferedReader[Any]) -> LayerFiles:
    """The entries of the layer tar in `blob` (compressed or not); UnreadableLayer if it cannot be read."""
    if blob.peek(4)[:4] == ZSTD_MAGIC:
        raise UnreadableLayer("it is zstd-compressed")
    entries: dict[str, tuple[object, ...]] = {}
    deleted: set[str] = set()
    opaque: set[str] = set()
    try:
        with tarfile.open(fileobj=blob, mode="r|*") as tar:
            for member in tar:
                path = _clean(member.name)
                parent, base = posixpath.split(path)
                if base == OPAQUE:
                    opaque.add(parent)
                    continue
                if base.startswith(WHITEOUT):
                    deleted.add(posixpath.join(parent, base[len(WHITEOUT) :]))
                    continue
                entries[path] = _signature(tar, member)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise UnreadableLayer(f"it is not a readable tar: {exc}") from exc
    return LayerFiles(entries, frozenset(deleted), frozenset(opaque))


def _signature(tar: tarfile.TarFile, member: tarfile.TarInfo) -> tuple[object, ...]:
    owner = (member.mode & 0o7777, member.uid, member.gid)
    if member.isdir():
        return ("dir", *owner, "")
    if member.issym():
        return ("symlink", *owner, member.linkname)
    if member.islnk():
        return ("hardlink", *owner, _clean(member.linkname))
    if member.isreg():
        hasher = hashlib.sha256()
        data = tar.extractfile(member)
        if data is not None:
            while chunk := data.read(_CHUNK):
                hasher.update(chunk)
        return ("file", *owner, hasher.hexdigest())
    return (f"type{member.type!r}", *owner, f"{member.devmajor}:{member.devminor}")


def _ancestors(path: str) -> Iterable[str]:
    while path != "/":
        path = posixpath.dirname(path)
        yield path


def _under(path: str, top: str) -> bool:
    return path == top or top == "/" or path.startswith(top + "/")


def conflict(a: LayerFiles, b: LayerFiles) -> str | None:
    """The first path (sorted) where putting `a` above `b` or `b` above `a` gives different files."""
    found: list[str] = []
    for path, entry in a.entries.items():
        other = b.entries.get(path)
        if other is not None and other != entry:
            found.append(path)
    for one, two in ((a, b), (b, a)):
        for path in one.entries:
            # an entry of `one` inside a non-directory of `two`
            if any(anc in two.entries and not two.is_dir(anc) for anc in _ancestors(path)):
                found.append(path)
        for gone in one.deleted:
            found += [p for p in two.entries if _under(p, gone)]
        for top in one.opaque:
            found += [p for p in two.entries if p != top and _under(p, top)]
    return min(found) if found else None


def conflict_with_declared(files: LayerFiles, declared: Iterable[str]) -> str | None:
    """The first path of `files` that clashes with a layer declared to write `declared`."""
    found: list[str] = []
    for top in declared:
        found += [p for p in files.entries if _under(p, top)]
        found += [p for p in files.deleted if _under(p, top) or _under(top, p)]
        found += [p for p in files.opaque if _under(top, p)]
        found += [a for a in _ancestors(top) if a in files.entries and not files.is_dir(a)]
    return min(found) if found else None
