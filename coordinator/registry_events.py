"""A registry's notifications of pushed images: which image pushes a release can learn from.

docker-registry (distribution) POSTs an envelope of events (`{"events": [...]}`, media type
`application/vnd.docker.distribution.events.v1+json`) to each endpoint its `notifications` config
names; with `events: includereferences: true` a manifest's event lists the manifest's references
(its config and layers, with sizes). The envelope is checked against `ENVELOPE_SCHEMA` with the
`jsonschema` library before anything is taken from it; of its events, only the push of an image
manifest under a tag says a new image exists: `pushed_images` returns those, pure, no I/O.
What the coordinator does with them is coordinator/warm.py `WarmService.pushed`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jsonschema

from core.errors import InvalidRequest

IMAGE_MANIFESTS = frozenset(
    {"application/vnd.docker.distribution.manifest.v2+json", "application/vnd.oci.image.manifest.v1+json"}
)
"""A push of one of these is an image (an index or a blob push is not)."""
CONFIGS = frozenset({"application/vnd.docker.container.image.v1+json", "application/vnd.oci.image.config.v1+json"})
"""The reference of a manifest that is its config, not a layer."""
MAX_PROBLEMS = 10

_DESCRIPTOR: dict[str, Any] = {
    "type": "object",
    "required": ["mediaType", "digest"],
    "properties": {
        "mediaType": {"type": "string"},
        "digest": {"type": "string", "pattern": "^[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$"},
        "size": {"type": "integer", "minimum": 0},
    },
}
ENVELOPE_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["events"],
    "properties": {
        "events": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["action", "target"],
                "properties": {
                    "id": {"type": "string"},
                    "action": {"type": "string"},
                    "target": {
                        **_DESCRIPTOR,
                        "required": ["mediaType", "digest", "repository"],
                        "properties": {
                            **_DESCRIPTOR["properties"],
                            "repository": {"type": "string", "minLength": 1},
                            "tag": {"type": "string"},
                            "references": {"type": "array", "items": _DESCRIPTOR},
                        },
                    },
                    "request": {"type": "object", "properties": {"host": {"type": "string"}}},
                },
            },
        }
    },
}
_VALIDATOR = jsonschema.Draft202012Validator(ENVELOPE_SCHEMA)


@dataclass(frozen=True)
class PushedImage:
    source: str
    """`image:<registry host>/<repository>:<tag>`, as a start of it names its image."""
    layers: tuple[str, ...]
    sizes: tuple[int, ...]


def check_envelope(document: Any) -> dict[str, Any]:
    """The envelope, or InvalidRequest naming every problem (at most MAX_PROBLEMS) with its path."""
    problems = [
        f"{'/'.join(str(p) for p in error.absolute_path) or '(body)'}: {error.message}"
        for error in sorted(_VALIDATOR.iter_errors(document), key=lambda e: list(map(str, e.absolute_path)))
    ]
    if problems:
        more = f" (and {len(problems) - MAX_PROBLEMS} more)" if len(problems) > MAX_PROBLEMS else ""
        raise InvalidRequest("not a registry notification envelope: " + "; ".join(problems[:MAX_PROBLEMS]) + more)
    envelope: dict[str, Any] = document
    return envelope


def pushed_images(envelope: dict[str, Any]) -> list[PushedImage]:
    """The image manifests the envelope says were pushed under a tag, with their layers (bottom
    first); a push without references (the registry's `includereferences` off) has none to give."""
    out = []
    for event in envelope["events"]:
        target = event["target"]
        host = event.get("request", {}).get("host", "")
        if event["action"] != "push" or target["mediaType"] not in IMAGE_MANIFESTS or not target.get("tag") or not host:
            continue
        layers = [r for r in target.get("references", []) if r["mediaType"] not in CONFIGS]
        if not layers:
            continue
        out.append(
            PushedImage(
                f"image:{host}/{target['repository']}:{target['tag']}",
                tuple(r["digest"] for r in layers),
                tuple(int(r.get("size", 0)) for r in layers),
            )
        )
    return out
