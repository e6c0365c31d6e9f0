"""Workload signatures: what kind of workload a start is, so starts of the same kind can be counted.

The layer predictor (coordinator/warm_features.py, models/prefetch/) learns which layers a host
needs next from which *kinds* of workloads started there before. A container id says nothing about
that; the signature does. It is built from what the start request declares, never from what
happened at run time, so the agent, the coordinator and the trace generator compute the same one:

- `source`: the image reference (`image:<ref>`) or the composition (`composition:<name>`);
- `command`: the argv, as given (empty: the image's default);
- `labels`: the container labels, except those under `LABEL_IGNORED_PREFIXES` (ids, timestamps and
  other per-instance values that would make every start its own kind);
- `workload_class`: the declared class (the composition's `workload`, or the `ferryman.io/class`
  label): "service", "batch", "cron", ... free text, empty when not declared.

`WorkloadSignature.id` is `sig-` and the first 16 hex digits of the SHA-256 of the canonical JSON of
those four fields (sorted keys, no spaces): stable across hosts, processes and versions of Python.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from core.errors import InvalidRequest

SIGNATURE_VERSION = "workload-signature/1"
CLASS_LABEL = "ferryman.io/class"
LABEL_IGNORED_PREFIXES = ("ferryman.io/instance", "ferryman.io/reservation", "io.kubernetes.pod.uid")
SIGNATURE_ID_RE = re.compile(r"sig-[0-9a-f]{16}")
MAX_COMMAND = 64
MAX_LABELS = 64
MAX_TEXT = 4096


@dataclass(frozen=True)
class WorkloadSignature:
    source: str
    """`image:<ref>` or `composition:<name>`."""
    command: tuple[str, ...] = ()
    labels: tuple[tuple[str, str], ...] = ()
    """Sorted (key, value) pairs, the ignored prefixes left out."""
    workload_class: str = ""
    id: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "id", signature_id(self.for_storage()))

    def for_storage(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "command": list(self.command),
            "labels": dict(self.labels),
            "class": self.workload_class,
        }

    @classmethod
    def from_storage(cls, data: Mapping[str, Any]) -> WorkloadSignature:
        """The signature from its stored (or wire) form; InvalidRequest naming what is wrong."""
        if not isinstance(data, Mapping):
            raise InvalidRequest("signature: expected an object")
        unknown = set(data) - {"source", "command", "labels", "class", "id"}
        if unknown:
            raise InvalidRequest(f"signature: unknown fields {sorted(unknown)}")
        source = data.get("source")
        command = data.get("command", [])
        labels = data.get("labels", {})
        workload_class = data.get("class", "")
        if not isinstance(source, str) or not source.startswith(("image:", "composition:")) or len(source) > MAX_TEXT:
            raise InvalidRequest("signature.source: expected 'image:<ref>' or 'composition:<name>'")
        if not isinstance(command, list) or len(command) > MAX_COMMAND or not all(_text(a) for a in command):
            raise InvalidRequest(f"signature.command: expected at most {MAX_COMMAND} strings")
        if (
            not isinstance(labels, Mapping)
            or len(labels) > MAX_LABELS
            or not all(_text(k) and _text(v) for k, v in labels.items())
        ):
            raise InvalidRequest(f"signature.labels: expected at most {MAX_LABELS} string pairs")
        if not _text(workload_class):
            raise InvalidRequest("signature.class: expected a string")
        signature = of_start(source, command, labels, workload_class)
        if "id" in data and data["id"] != signature.id:
            raise InvalidRequest(f"signature.id {data['id']!r} does not match its fields ({signature.id})")
        return signature


def of_start(
    source: str, command: Sequence[str] = (), labels: Mapping[str, str] | None = None, workload_class: str = ""
) -> WorkloadSignature:
    """The signature of a start as requested; the class falls back to the `ferryman.io/class` label."""
    kept = {k: v for k, v in (labels or {}).items() if not k.startswith(LABEL_IGNORED_PREFIXES)}
    return WorkloadSignature(
        source=source,
        command=tuple(command),
        labels=tuple(sorted(kept.items())),
        workload_class=workload_class or kept.get(CLASS_LABEL, ""),
    )


def of_container_spec(spec: Mapping[str, Any]) -> WorkloadSignature:
    """The signature of a start request's container spec (the agent's create body, which the
    coordinator's start forwards): `image`, or `composition` (its `name` and `workload`), `args`,
    `labels`. Fields of the wrong type count as absent: the agent validates the spec itself."""
    composition = spec.get("composition")
    args = spec.get("args")
    labels = spec.get("labels")
    command = [a for a in args if isinstance(a, str)] if isinstance(args, list) else []
    kept = (
        {k: v for k, v in labels.items() if isinstance(k, str) and isinstance(v, str)}
        if isinstance(labels, Mapping)
        else {}
    )
    if isinstance(composition, Mapping):
        workload = composition.get("workload", "")
        return of_start(
            f"composition:{composition.get('name', '')}", command, kept, workload if isinstance(workload, str) else ""
        )
    image = spec.get("image", "")
    return of_start(f"image:{image if isinstance(image, str) else ''}", command, kept)


def signature_id(fields: Mapping[str, Any]) -> str:
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return "sig-" + hashlib.sha256(canonical.encode()).hexdigest()[:16]


def check_signature_id(value: str) -> str:
    if not isinstance(value, str) or not SIGNATURE_ID_RE.fullmatch(value):
        raise InvalidRequest(f"invalid signature id {value!r}: expected 'sig-' and 16 hex digits")
    return value


def _text(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= MAX_TEXT
