"""The validator of registry documents (agent/manifests.py): examples, then properties over any JSON.

Whatever JSON a registry sends in place of a manifest, index or config, the result is a validated
value or InvalidManifest, never a TypeError, KeyError or OverflowError (which the API turns into 500).
"""

from __future__ import annotations

import contextlib
import json
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.errors import InvalidManifest, PlatformNotFound, RegistryError
from agent.manifests import (
    MAX_SIZE,
    ImageIndex,
    ImageManifest,
    choose_manifest,
    decode_json,
    parse_descriptor,
    parse_document,
    parse_image_config,
    parse_index,
)
from agent.oci import (
    MEDIA_OCI_CONFIG,
    MEDIA_OCI_INDEX,
    MEDIA_OCI_LAYER_GZIP,
    MEDIA_OCI_MANIFEST,
    Descriptor,
    Platform,
)

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
D3 = "sha256:" + "3" * 64


def manifest_doc() -> dict[str, Any]:
    return {
        "schemaVersion": 2,
        "mediaType": MEDIA_OCI_MANIFEST,
        "config": {"mediaType": MEDIA_OCI_CONFIG, "digest": D1, "size": 100},
        "layers": [
            {"mediaType": MEDIA_OCI_LAYER_GZIP, "digest": D2, "size": 1000},
            {"mediaType": MEDIA_OCI_LAYER_GZIP, "digest": D3, "size": 0, "annotations": {"a": "b"}},
        ],
        "annotations": {"org.opencontainers.image.created": "2024-01-01T00:00:00Z"},
    }


def index_doc() -> dict[str, Any]:
    return {
        "schemaVersion": 2,
        "mediaType": MEDIA_OCI_INDEX,
        "manifests": [
            {
                "mediaType": MEDIA_OCI_MANIFEST,
                "digest": D1,
                "size": 500,
                "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"},
            },
            {
                "mediaType": MEDIA_OCI_MANIFEST,
                "digest": D2,
                "size": 501,
                "platform": {"os": "linux", "architecture": "amd64"},
            },
            {"mediaType": MEDIA_OCI_MANIFEST, "digest": D3, "size": 502},
        ],
    }


def config_doc() -> dict[str, Any]:
    return {"os": "linux", "architecture": "amd64", "rootfs": {"type": "layers", "diff_ids": [D2, D3]}}


def test_valid_documents() -> None:
    manifest = parse_document(manifest_doc(), None, "m")
    assert isinstance(manifest, ImageManifest)
    assert manifest.config.digest == D1 and [d.size for d in manifest.layers] == [1000, 0]
    assert manifest.layers[1].annotations == {"a": "b"}
    index = parse_document(index_doc(), None, "i")
    assert isinstance(index, ImageIndex) and len(index.manifests) == 3
    assert choose_manifest(index, Platform("linux", "amd64"), "ref").digest == D2
    assert choose_manifest(index, Platform("linux", "arm64", "v8"), "ref").digest == D1
    with pytest.raises(PlatformNotFound, match="available: linux/amd64, linux/arm64/v8"):
        choose_manifest(index, Platform("linux", "s390x"), "ref")
    config = parse_image_config(config_doc(), "c")
    assert config.diff_ids == (D2, D3) and config.platform()["architecture"] == "amd64"
    # OCI makes the document's own mediaType optional: the header, then the shape decide.
    bare = {k: v for k, v in manifest_doc().items() if k != "mediaType"}
    assert parse_document(bare, "application/json", "m").media_type == MEDIA_OCI_MANIFEST
    assert parse_descriptor({"mediaType": "a/b", "digest": D1, "size": MAX_SIZE}, "d").size == MAX_SIZE


def _set(doc: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return doc


def _drop(doc: dict[str, Any], path: tuple[Any, ...]) -> dict[str, Any]:
    target = doc
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return doc


# The probe's cases and their relatives: each is a message fragment the error must carry.
MALFORMED_INDEXES = [
    (_set(index_doc(), ("manifests", 0, "platform"), "linux/amd64"), r"manifests\[0\]\.platform must be an object"),
    (_set(index_doc(), ("manifests", 1, "platform", "os"), 7), r"manifests\[1\]\.platform\.os must be a string"),
    (_drop(index_doc(), ("manifests", 1, "platform", "architecture")), r"platform\.architecture is missing"),
    (_set(index_doc(), ("manifests", 1, "platform", "os.features"), "x"), r"os\.features must be an array"),
    (_set(index_doc(), ("manifests",), {"a": 1}), r"\.manifests must be an array, got an object"),
    (_set(index_doc(), ("manifests", 2), None), r"manifests\[2\] must be an object, got null"),
    (_set(index_doc(), ("manifests", 1, "size"), 2**64), r"size must be from 0 to 2\*\*63-1, got 18446744073709551616"),
    (_set(index_doc(), ("schemaVersion",), True), r"schemaVersion must be 2"),
    (_drop(index_doc(), ("manifests",)), r"\.manifests is missing"),
]
MALFORMED_MANIFESTS = [
    (_set(manifest_doc(), ("layers", 0, "size"), 2**64), r"layers\[0\]\.size must be from 0 to 2\*\*63-1"),
    (_set(manifest_doc(), ("layers", 0, "size"), -1), r"layers\[0\]\.size must be from 0"),
    (_set(manifest_doc(), ("layers", 0, "size"), 1.5), r"layers\[0\]\.size must be an integer, got a number"),
    (_set(manifest_doc(), ("layers", 0, "size"), "1000"), r"layers\[0\]\.size must be an integer, got a string"),
    (_set(manifest_doc(), ("layers", 1, "size"), True), r"layers\[1\]\.size must be an integer, got a boolean"),
    (_set(manifest_doc(), ("layers", 0, "digest"), "sha256:abc"), r"layers\[0\]\.digest must be a sha256 digest"),
    (_set(manifest_doc(), ("layers", 0, "digest"), ["x"]), r"layers\[0\]\.digest must be a string"),
    (_drop(manifest_doc(), ("layers", 0, "mediaType")), r"layers\[0\]\.mediaType is missing"),
    (_set(manifest_doc(), ("layers", 0, "mediaType"), 3), r"layers\[0\]\.mediaType must be a string"),
    (_set(manifest_doc(), ("layers", 0, "mediaType"), "gzip"), r"layers\[0\]\.mediaType is not a media type"),
    (_set(manifest_doc(), ("layers",), {"0": {}}), r"\.layers must be an array"),
    (_drop(manifest_doc(), ("layers",)), r"\.layers is missing"),
    (_set(manifest_doc(), ("config",), "sha256:" + "1" * 64), r"\.config must be an object"),
    (_set(manifest_doc(), ("layers", 1, "annotations"), {"a": 1}), r"annotations\.a must be a string"),
    (_set(manifest_doc(), ("mediaType",), ["x"]), r"\.mediaType must be a string"),
    (_set(manifest_doc(), ("mediaType",), "application/vnd.example+json"), r"unsupported media type"),
]
MALFORMED_CONFIGS = [
    (_set(config_doc(), ("rootfs",), []), r"\.rootfs must be an object"),
    (_set(config_doc(), ("rootfs", "diff_ids"), "sha256:x"), r"diff_ids must be an array"),
    (_set(config_doc(), ("rootfs", "diff_ids", 1), 5), r"diff_ids\[1\] must be a string"),
    (_set(config_doc(), ("architecture",), {"x": 1}), r"\.architecture must be a string"),
    (_set(config_doc(), ("rootfs", "type"), "squashfs"), r"rootfs\.type must be \"layers\""),
]


@pytest.mark.parametrize(("doc", "message"), MALFORMED_INDEXES + MALFORMED_MANIFESTS)
def test_malformed_documents_name_the_field(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidManifest, match=message) as err:
        parse_document(doc, None, "manifest example")
    assert err.value.code == "invalid_manifest" and err.value.http_status == 502
    assert isinstance(err.value, RegistryError)


@pytest.mark.parametrize(("doc", "message"), MALFORMED_CONFIGS)
def test_malformed_configs_name_the_field(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidManifest, match=message):
        parse_image_config(doc, "image config")


@pytest.mark.parametrize(
    "body",
    [b"", b"{", b"\xff\xfe", b"[" * 100_000 + b"]" * 100_000, b'{"size": 1' + b"0" * 5000 + b"}", b"NaN"],
)
def test_undecodable_bodies(body: bytes) -> None:
    with pytest.raises(InvalidManifest):
        parse_document(decode_json(body, "manifest example"), None, "manifest example")


# ---- properties -----------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.sampled_from([D1, MEDIA_OCI_MANIFEST, MEDIA_OCI_INDEX, "linux", "amd64", "layers"])
    # The edges of containerd's int64 sizes, which plain integer strategies rarely hit.
    | st.sampled_from([-1, MAX_SIZE, MAX_SIZE + 1, 2**64, 1e300])
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(["mediaType", "digest", "size", "platform", "os", "architecture", "manifests", "layers"])
            | st.text(max_size=8),
            inner,
            max_size=5,
        )
    ),
    max_leaves=25,
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every position in a JSON value (the root excluded)."""
    out: list[tuple[Any, ...]] = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else []
    for key, child in items:
        out.append((*prefix, key))
        out.extend(_paths(child, (*prefix, key)))
    return out


def _assert_usable(desc: Descriptor) -> None:
    """What the pull relies on after validation: containerd's int64 sizes, sha256 digests, typed platforms."""
    assert isinstance(desc.size, int) and not isinstance(desc.size, bool) and 0 <= desc.size <= MAX_SIZE
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", desc.digest)
    assert isinstance(desc.media_type, str) and "/" in desc.media_type
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in desc.annotations.items())
    if desc.platform is not None:
        assert isinstance(desc.platform["os"], str) and isinstance(desc.platform["architecture"], str)
        assert isinstance(desc.platform.get("variant", ""), str)


def _outcome(check: Any, value: Any) -> None:
    """`check(value)` returns a usable value or raises InvalidManifest; anything else fails the property."""
    with contextlib.suppress(InvalidManifest):
        result = check(value)
        if isinstance(result, Descriptor):
            _assert_usable(result)
        elif isinstance(result, ImageManifest):
            for desc in (result.config, *result.layers):
                _assert_usable(desc)
        elif isinstance(result, ImageIndex):
            for desc in result.manifests:
                _assert_usable(desc)
        else:
            assert all(re.fullmatch(r"sha256:[0-9a-f]{64}", d) for d in result.diff_ids)
            assert all(isinstance(v, str) for v in result.platform().values())


VALIDATORS = {
    "document": lambda v: parse_document(v, None, "m"),
    "document with a content type": lambda v: parse_document(v, MEDIA_OCI_INDEX, "m"),
    "index": lambda v: parse_index(v, MEDIA_OCI_INDEX, "m"),
    "descriptor": lambda v: parse_descriptor(v, "d"),
    "config": lambda v: parse_image_config(v, "c"),
    "bytes": lambda v: parse_document(decode_json(json.dumps(v).encode(), "m"), None, "m"),
}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=json_values)
def test_any_json_value_is_validated_or_invalid(value: Any) -> None:
    for check in VALIDATORS.values():
        _outcome(check, value)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    base=st.sampled_from(["manifest", "index", "config"]),
    replacement=json_scalars | json_values,
)
def test_any_field_replaced_by_any_json_is_validated_or_invalid(
    data: st.DataObject, base: str, replacement: Any
) -> None:
    # Near-valid documents reach the deep checks that random JSON rarely gets to.
    doc = {"manifest": manifest_doc, "index": index_doc, "config": config_doc}[base]()
    path = data.draw(st.sampled_from(_paths(doc)))
    _set(doc, path, replacement)
    for check in VALIDATORS.values():
        _outcome(check, doc)
