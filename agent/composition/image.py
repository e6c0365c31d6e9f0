"""The assembled composition as an ordinary OCI image: its config and manifest bytes (pure).

Both documents are canonical JSON (sorted keys, no spaces, no timestamps), so one composition gives
one image digest on every host, and assembling it twice names the same image.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent.oci import MEDIA_OCI_CONFIG, MEDIA_OCI_MANIFEST, Descriptor, Digest, Platform, sha256_digest

IMAGE_HOST = "composition.ferryman.local"
"""The registry host of composed images' names: no registry answers for it, they are made here."""
ANNOTATION_NAME = "io.ferryman.composition.name"
ANNOTATION_WORKLOAD = "io.ferryman.composition.workload"
CONFIG_KEYS = ("Entrypoint", "Cmd", "Env", "WorkingDir", "User", "ExposedPorts", "Labels", "StopSignal")
"""What a composition inherits from its top node's image config when it does not say."""


@dataclass(frozen=True)
class ComposedImage:
    name: str
    config: Descriptor
    config_bytes: bytes
    manifest: Descriptor
    manifest_bytes: bytes


def _canonical(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def compose(
    name: str,
    workload: str,
    layers: Sequence[Descriptor],
    diff_ids: Sequence[str],
    platform: Platform,
    inherited: Mapping[str, Any],
    declared: Mapping[str, Any],
) -> ComposedImage:
    """The image of a stack (bottom first): `declared` config keys win over `inherited` ones."""
    run_config = {k: v for k, v in inherited.items() if k in CONFIG_KEYS}
    run_config.update(declared)
    config: dict[str, Any] = {
        "architecture": platform.architecture,
        "os": platform.os,
        "config": run_config,
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
    }
    if platform.variant:
        config["variant"] = platform.variant
    config_bytes = _canonical(config)
    config_desc = Descriptor(MEDIA_OCI_CONFIG, sha256_digest(config_bytes), len(config_bytes))
    annotations = {ANNOTATION_NAME: name, **({ANNOTATION_WORKLOAD: workload} if workload else {})}
    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_OCI_MANIFEST,
        "config": config_desc.to_json(),
        "layers": [Descriptor(d.media_type, d.digest, d.size).to_json() for d in layers],
        "annotations": annotations,
    }
    manifest_bytes = _canonical(manifest)
    digest = sha256_digest(manifest_bytes)
    manifest_desc = Descriptor(MEDIA_OCI_MANIFEST, digest, len(manifest_bytes))
    return ComposedImage(image_name(name, digest), config_desc, config_bytes, manifest_desc, manifest_bytes)


def image_name(name: str, manifest_digest: Digest) -> str:
    """composition.ferryman.local/NAME:<16 hex of the manifest digest>: a new name for new content."""
    return f"{IMAGE_HOST}/{name}:{manifest_digest.removeprefix('sha256:')[:16]}"
