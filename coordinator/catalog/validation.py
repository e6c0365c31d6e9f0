"""Checking a catalog entry before anything of it is stored: pure functions, no I/O.

Three stages, each reporting every problem it finds with the field's path:
1. `EntryValidator.parse`: the shipped JSON Schema (`entry.schema.json`, served at
   GET /v1/schemas/catalog-entry.json), checked with the `jsonschema` library;
2. the manifest's own rules, which a schema cannot say: one protocol per required image and none
   for anything else, each image required once, a health check's timeout within its interval,
   shared volumes at distinct, non-overlapping paths outside /proc, /sys and /dev;
3. `check_in_catalog`: against the catalog as it stands: no cycle between entry names across all
   their versions (stdlib graphlib, the cycle named), every reference resolvable, and the entry
   deployable as the catalog stands (coordinator/deployments/plan.py).
"""

from __future__ import annotations

import graphlib
import json
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from typing import Any

import jsonschema

from coordinator.catalog.model import (
    Catalog,
    CatalogEntry,
    DependencyCycle,
    HealthCheckKind,
    ManifestInvalid,
    TransferProtocol,
    UnknownReference,
)
from coordinator.deployments.plan import plan

SCHEMA_FILE = "entry.schema.json"
MAX_PROBLEMS = 20
"""At most this many problems in one error message; a document that wrong needs a fresh look anyway."""
RESERVED_MOUNTS = ("/proc", "/sys", "/dev")
"""Where a shared volume may not go: the runtime mounts its own filesystems there."""


def schema_text() -> bytes:
    """The JSON Schema of a catalog entry, as shipped (and served by the API)."""
    return resources.files(__package__).joinpath(SCHEMA_FILE).read_bytes()


class EntryValidator:
    """A catalog entry document -> a `CatalogEntry`, or ManifestInvalid listing every problem."""

    def __init__(self, schema: bytes | None = None) -> None:
        self.schema_bytes = schema if schema is not None else schema_text()
        self.schema: dict[str, Any] = json.loads(self.schema_bytes)
        jsonschema.Draft202012Validator.check_schema(self.schema)
        self._validator = jsonschema.Draft202012Validator(self.schema)

    def parse(self, document: Any) -> CatalogEntry:
        """Stages 1 and 2: the schema, then the manifest's own rules."""
        problems = self.schema_problems(document)
        if problems:
            raise ManifestInvalid(problems)
        entry = CatalogEntry.from_dict(document)
        problems = manifest_problems(entry)
        if problems:
            raise ManifestInvalid(problems)
        return entry

    def schema_problems(self, document: Any) -> list[str]:
        if not isinstance(document, dict):
            return ["entry: expected a JSON object with name, version, image and manifest"]
        if "manifest" not in document:
            # The most likely mistake gets its own words: the manifest is what registration is for.
            return [
                "manifest: missing: every image in the catalog needs its Dependency Manifest "
                "(required_images, data_transfer_protocols, dependency_health_check)"
            ]
        errors = sorted(self._validator.iter_errors(document), key=lambda e: [str(p) for p in e.absolute_path])
        problems = [_describe(error, document) for error in errors]
        return _unique(problems)[:MAX_PROBLEMS]


def _path(parts: Iterable[Any]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "entry"


def _describe(error: jsonschema.ValidationError, document: Any) -> str:
    parts = list(error.absolute_path)
    if error.validator is None:
        # A `false` subschema: a field this kind of object does not take. jsonschema reports it at the
        # object, with the field's value only; the field is the one holding that value.
        owner = _at(document, parts)
        if isinstance(owner, dict):
            key = "protocol" if "protocol" in owner else "kind"
            fields = [k for k, v in owner.items() if v == error.instance and k != key]
            return f"{_path([*parts, '/'.join(fields) or '?'])}: not allowed with {key} {owner.get(key)!r}"
    if error.validator == "pattern" and isinstance(error.schema, dict) and error.schema.get("description"):
        # The pattern's own words instead of the regular expression (a key's error is at its object).
        return f"{_path(parts)}: {error.instance!r} is not valid: {str(error.schema['description']).rstrip('.')}"
    return f"{_path(parts)}: {error.message}"


def _at(document: Any, parts: Sequence[Any]) -> Any:
    node = document
    for part in parts:
        node = node[part]
    return node


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def manifest_problems(entry: CatalogEntry) -> list[str]:
    """Stage 2: the rules of one manifest that its schema cannot express."""
    manifest = entry.manifest
    problems: list[str] = []
    first_at: dict[str, int] = {}
    for i, ref in enumerate(manifest.required_images):
        if ref.name in first_at:
            problems.append(
                f"manifest.required_images[{i}]: {ref.name} is already required at [{first_at[ref.name]}]; "
                "require each image once"
            )
        else:
            first_at[ref.name] = i
    protocols = manifest.data_transfer_protocols
    for name in first_at:
        if name not in protocols:
            problems.append(f"manifest.data_transfer_protocols: no protocol for the required image {name!r}")
    for name in protocols:
        if name not in first_at:
            problems.append(f"manifest.data_transfer_protocols.{name}: {name!r} is not in required_images")
    problems += _volume_problems(
        {n: t.path for n, t in protocols.items() if t.protocol is TransferProtocol.SHARED_VOLUME}
    )
    check = manifest.dependency_health_check
    if check.timeout > check.interval:
        problems.append(
            f"manifest.dependency_health_check.timeout: {check.timeout:g} s is longer than the interval "
            f"({check.interval:g} s): checks would overlap"
        )
    if check.kind is HealthCheckKind.GRPC and check.service and not check.service.isprintable():
        problems.append("manifest.dependency_health_check.service: must be printable")
    return problems


def _volume_problems(paths: Mapping[str, str]) -> list[str]:
    problems = []
    for name, path in paths.items():
        where = f"manifest.data_transfer_protocols.{name}.path"
        segments = path.split("/")[1:]
        if any(s in (".", "..") for s in segments):
            problems.append(f"{where}: {path!r} has a '.' or '..' segment; give the plain absolute path")
        elif any(_within(path, reserved) for reserved in RESERVED_MOUNTS):
            problems.append(f"{where}: {path!r} is under {', '.join(RESERVED_MOUNTS)}, which the runtime mounts")
    names = list(paths)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if _within(paths[a], paths[b]) or _within(paths[b], paths[a]):
                problems.append(
                    f"manifest.data_transfer_protocols.{b}.path: {paths[b]!r} overlaps {a}'s shared volume at "
                    f"{paths[a]!r}; each shared volume needs a path of its own"
                )
    return problems


def _within(path: str, base: str) -> bool:
    return path == base or path.startswith(base.rstrip("/") + "/")


def name_graph(entries: Iterable[CatalogEntry]) -> dict[str, set[str]]:
    """name -> the names it requires, over every version of it: the graph that must stay acyclic."""
    graph: dict[str, set[str]] = {}
    for entry in entries:
        graph.setdefault(entry.name, set()).update(r.name for r in entry.manifest.required_images)
    return graph


def find_cycle(graph: Mapping[str, Iterable[str]], start: str | None = None) -> list[str] | None:
    """A cycle of `graph` (name -> names it requires) as [a, b, ..., a] in "requires" order, or None.

    graphlib finds it; it is then turned to run along the requires edges and rotated to begin at
    `start` when `start` is on it, so that the message reads from the entry being registered.
    """
    sorter = graphlib.TopologicalSorter({k: sorted(v) for k, v in graph.items()})
    try:
        sorter.prepare()
    except graphlib.CycleError as exc:
        cycle = list(exc.args[1])
    else:
        return None
    ring = cycle[:-1]
    if not all(ring[(i + 1) % len(ring)] in graph.get(node, ()) for i, node in enumerate(ring)):
        ring.reverse()
    if start in ring:
        i = ring.index(start)
        ring = ring[i:] + ring[:i]
    return [*ring, ring[0]]


def check_in_catalog(catalog: Catalog, entry: CatalogEntry) -> None:
    """Stage 3: DependencyCycle, UnknownReference, or PlanConflict (from the planner), else None."""
    graph = name_graph((*catalog.entries, entry))
    cycle = find_cycle(graph, entry.name)
    if cycle is not None:
        raise DependencyCycle(f"{entry.id} would close a dependency cycle in the catalog: {' -> '.join(cycle)}", cycle)
    unknown = []
    for i, ref in enumerate(entry.manifest.required_images):
        try:
            catalog.resolve(ref)
        except UnknownReference as exc:
            unknown.append(f"manifest.required_images[{i}]: {exc.message}")
    if unknown:
        raise UnknownReference("; ".join(unknown))
    plan(catalog.with_entry(entry), entry.name, entry.version)
