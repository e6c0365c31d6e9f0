"""Untrusted OCI documents in, typed values or InvalidManifest out: descriptors, manifests, indexes, configs.

Everything a registry sends is checked here, in one place, before any other code touches it: a
wrong JSON type anywhere (a `platform` that is a string, a `size` of 2**64, a `layers` that is not a
list) would otherwise surface far away as a TypeError, KeyError or OverflowError, that is as a 500.
Pure functions, no I/O; each takes any JSON value and either returns a validated value or raises
InvalidManifest naming the document and the field.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from agent.errors import InvalidManifest, PlatformNotFound
from agent.oci import INDEX_TYPES, MANIFEST_TYPES, MEDIA_OCI_INDEX, MEDIA_OCI_MANIFEST, Descriptor, Digest, Platform

MAX_SIZE = (1 << 63) - 1
"""containerd (and the OCI spec) keep sizes as int64."""

# The media type grammar of the OCI image spec (descriptor.md), from RFC 6838.
_MEDIA_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}")
# The only digest algorithm containerd and the registries we target use.
_DIGEST = re.compile(r"sha256:[a-f0-9]{64}")
# Types a JSON-ish `Content-Type` carries when the registry does not know the document's own.
_GENERIC_CONTENT_TYPES = frozenset({"", "application/json", "application/octet-stream", "text/plain"})


@dataclass(frozen=True)
class ImageManifest:
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]


@dataclass(frozen=True)
class ImageIndex:
    media_type: str
    manifests: tuple[Descriptor, ...]


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an image config the agent uses."""

    os: str
    architecture: str
    variant: str
    diff_ids: tuple[Digest, ...]

    def platform(self) -> dict[str, str]:
        return {"os": self.os, "architecture": self.architecture, "variant": self.variant}


def _kind(value: object) -> str:
    """A JSON type name for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _object(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidManifest(f"{where} must be an object, got {_kind(value)}")
    return value


def _array(value: object, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise InvalidManifest(f"{where} must be an array, got {_kind(value)}")
    return value


def _string(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise InvalidManifest(f"{where} must be a string, got {_kind(value)}")
    return value


def _optional_string(obj: dict[str, Any], key: str, where: str) -> str:
    return _string(obj[key], f"{where}.{key}") if key in obj else ""


def _strings(value: object, where: str) -> list[str]:
    return [_string(item, f"{where}[{i}]") for i, item in enumerate(_array(value, where))]


def _string_map(value: object, where: str) -> dict[str, str]:
    return {key: _string(item, f"{where}.{key}") for key, item in _object(value, where).items()}


def parse_digest_field(value: object, where: str) -> Digest:
    text = _string(value, where)
    if not _DIGEST.fullmatch(text):
        raise InvalidManifest(f"{where} must be a sha256 digest, got {text[:100]!r}")
    return Digest(text)


def parse_size(value: object, where: str) -> int:
    # bool is an int in Python, and 1.0 is a number in JSON: neither is a size.
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidManifest(f"{where} must be an integer, got {_kind(value)}")
    if not 0 <= value <= MAX_SIZE:
        raise InvalidManifest(f"{where} must be from 0 to 2**63-1, got {value}")
    return value


def parse_media_type(value: object, where: str) -> str:
    text = _string(value, where)
    if not _MEDIA_TYPE.fullmatch(text):
        raise InvalidManifest(f"{where} is not a media type: {text[:100]!r}")
    return text


def parse_platform(value: object, where: str) -> dict[str, Any]:
    """A descriptor's platform: os and architecture required, the optional fields typed."""
    obj = _object(value, where)
    for key in ("os", "architecture"):
        if key not in obj:
            raise InvalidManifest(f"{where}.{key} is missing")
        _string(obj[key], f"{where}.{key}")
    for key in ("variant", "os.version"):
        _optional_string(obj, key, where)
    for key in ("os.features", "features"):
        if key in obj:
            _strings(obj[key], f"{where}.{key}")
    return dict(obj)


def parse_descriptor(value: object, where: str) -> Descriptor:
    """One content descriptor (mediaType, digest and size required)."""
    obj = _object(value, where)
    for key in ("mediaType", "digest", "size"):
        if key not in obj:
            raise InvalidManifest(f"{where}.{key} is missing")
    media_type = parse_media_type(obj["mediaType"], f"{where}.mediaType")
    digest = parse_digest_field(obj["digest"], f"{where}.digest")
    size = parse_size(obj["size"], f"{where}.size")
    annotations = _string_map(obj["annotations"], f"{where}.annotations") if "annotations" in obj else {}
    platform = parse_platform(obj["platform"], f"{where}.platform") if "platform" in obj else None
    if "urls" in obj:
        _strings(obj["urls"], f"{where}.urls")
    return Descriptor(media_type=media_type, digest=digest, size=size, annotations=annotations, platform=platform)


def _check_schema_version(obj: dict[str, Any], where: str) -> None:
    # Required by the spec, but containerd does not insist either; when present it must say 2.
    if "schemaVersion" in obj:
        version = obj["schemaVersion"]
        if isinstance(version, bool) or version != 2:
            raise InvalidManifest(f"{where}.schemaVersion must be 2, got {json.dumps(version)[:40]}")


def document_media_type(value: object, content_type: str | None, where: str) -> str:
    """What kind of document `value` is: its own `mediaType` wins over the Content-Type header, and
    without either (OCI makes mediaType optional) its shape decides."""
    obj = _object(value, where)
    if "mediaType" in obj:
        return parse_media_type(obj["mediaType"], f"{where}.mediaType")
    header = (content_type or "").split(";", 1)[0].strip().lower()
    if header not in _GENERIC_CONTENT_TYPES:
        return header
    if "manifests" in obj:
        return MEDIA_OCI_INDEX
    if "config" in obj and "layers" in obj:
        return MEDIA_OCI_MANIFEST
    raise InvalidManifest(f"{where} has no mediaType and is neither an index nor a manifest")


def parse_manifest(value: object, media_type: str, where: str) -> ImageManifest:
    obj = _object(value, where)
    _check_schema_version(obj, where)
    if "config" not in obj:
        raise InvalidManifest(f"{where}.config is missing")
    if "layers" not in obj:
        raise InvalidManifest(f"{where}.layers is missing")
    config = parse_descriptor(obj["config"], f"{where}.config")
    entries = _array(obj["layers"], f"{where}.layers")
    layers = tuple(parse_descriptor(d, f"{where}.layers[{i}]") for i, d in enumerate(entries))
    if "annotations" in obj:
        _string_map(obj["annotations"], f"{where}.annotations")
    return ImageManifest(media_type=media_type, config=config, layers=layers)


def parse_index(value: object, media_type: str, where: str) -> ImageIndex:
    obj = _object(value, where)
    _check_schema_version(obj, where)
    if "manifests" not in obj:
        raise InvalidManifest(f"{where}.manifests is missing")
    entries = _array(obj["manifests"], f"{where}.manifests")
    manifests = tuple(parse_descriptor(d, f"{where}.manifests[{i}]") for i, d in enumerate(entries))
    if "annotations" in obj:
        _string_map(obj["annotations"], f"{where}.annotations")
    return ImageIndex(media_type=media_type, manifests=manifests)


def parse_document(value: object, content_type: str | None, where: str) -> ImageManifest | ImageIndex:
    """A manifest or an index, whichever `value` is; any other media type is InvalidManifest."""
    media_type = document_media_type(value, content_type, where)
    if media_type in INDEX_TYPES:
        return parse_index(value, media_type, where)
    if media_type in MANIFEST_TYPES:
        return parse_manifest(value, media_type, where)
    raise InvalidManifest(f"{where} has unsupported media type {media_type!r}")


def choose_manifest(index: ImageIndex, platform: Platform, what: str) -> Descriptor:
    """The index entry to pull on `platform`: an exact variant match before one that leaves the variant out."""
    candidates = [e for e in index.manifests if e.platform is not None and platform.matches(e.platform)]
    if not candidates:
        available = sorted(
            {
                str(Platform(p["os"], p["architecture"], p.get("variant", "")))
                for e in index.manifests
                if (p := e.platform) is not None
            }
        )
        raise PlatformNotFound(f"{what} has no manifest for {platform}; available: {', '.join(available) or 'none'}")
    exact = [e for e in candidates if (e.platform or {}).get("variant", "") == platform.variant]
    return (exact or candidates)[0]


def parse_image_config(value: object, where: str) -> ImageConfig:
    obj = _object(value, where)
    rootfs = _object(obj.get("rootfs"), f"{where}.rootfs")
    if "type" in rootfs and rootfs["type"] != "layers":
        raise InvalidManifest(f"{where}.rootfs.type must be \"layers\", got {json.dumps(rootfs['type'])[:40]}")
    diff_ids = _array(rootfs.get("diff_ids"), f"{where}.rootfs.diff_ids")
    return ImageConfig(
        os=_optional_string(obj, "os", where),
        architecture=_optional_string(obj, "architecture", where),
        variant=_optional_string(obj, "variant", where),
        diff_ids=tuple(parse_digest_field(d, f"{where}.rootfs.diff_ids[{i}]") for i, d in enumerate(diff_ids)),
    )


def decode_json(body: bytes, where: str) -> object:
    """Parse a document's bytes; anything json cannot parse (including nesting too deep for the
    parser's recursion) is InvalidManifest."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise InvalidManifest(f"{where} is not valid JSON: {str(exc)[:200]}") from exc
