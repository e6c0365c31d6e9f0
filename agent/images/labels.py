"""containerd's GC and unpack labels, named once so the pull and the tests agree."""

from __future__ import annotations

UNCOMPRESSED = "containerd.io/uncompressed"
GC_CONFIG = "containerd.io/gc.ref.content.config"


def gc_layer(index: int) -> str:
    return f"containerd.io/gc.ref.content.l.{index}"


def gc_manifest(index: int) -> str:
    return f"containerd.io/gc.ref.content.m.{index}"


def gc_snapshot(snapshotter: str) -> str:
    return f"containerd.io/gc.ref.snapshot.{snapshotter}"


def distribution_source(host: str) -> str:
    return f"containerd.io/distribution.source.{host}"
