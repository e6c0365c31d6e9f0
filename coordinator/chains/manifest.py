"""The Chain Manifest, version 1: its records and its checks. Pure: no I/O.

A chain is a sequence of stages run one after another at one service address; each stage hands
its state over to the next (docs/chains.md). A manifest is checked in two stages, each reporting
every problem it finds with the field's path, before anything of the chain exists:
1. the shipped JSON Schema (`manifest.schema.json`, served at GET /v1/chains/schema), with the
   `jsonschema` library: types, required fields, patterns, ranges, unknown fields;
2. the graph (stdlib graphlib) and the rules a schema cannot say: stage names unique across stages
   and fallbacks, every `consumes.from` and `fallback` naming a stage there is, no cycle, the stages
   one sequence (each consumes from the stage listed before it), a health check's timeout within
   its interval, and only the handover protocols this coordinator drives.
"""

from __future__ import annotations

import graphlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import jsonschema

from coordinator.catalog.model import HealthCheck
from core.errors import InvalidRequest

SCHEMA_FILE = "manifest.schema.json"
FORMAT_VERSION = 1
MAX_PROBLEMS = 20
DRIVEN_PROTOCOLS = frozenset({"http_state", "shared_volume", "criu"})
"""The handover protocols this coordinator drives; the others are part of the format already."""


class ChainManifestInvalid(InvalidRequest):
    code = "chain_manifest_invalid"

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("invalid chain manifest: " + "; ".join(self.problems))


def schema_text() -> bytes:
    """The JSON Schema of a chain manifest, as shipped (and served by the API)."""
    return resources.files(__package__).joinpath(SCHEMA_FILE).read_bytes()


@dataclass(frozen=True)
class Handover:
    protocol: str
    """http_state, shared_volume or criu."""
    port: int = 0
    """http_state, shared_volume: the port of the stage's state contract."""
    encoding: str = "msgpack"
    path: str = ""
    drain: float = 1.0
    """Seconds the old stage keeps finishing in-flight requests after the address moved."""
    deadline: float = 60.0
    """Seconds the whole handover may take before it rolls back."""
    live: bool = False
    """http_state, shared_volume: the stage serves on while a snapshot of its state is carried; only
    the delta since it is exported at the switch."""
    become: bool = False
    """criu: the next stage is this stage's process, moved; otherwise, once moved, it hands its state
    over by the contract on `port`."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"protocol": self.protocol, "drain": self.drain, "deadline": self.deadline}
        if self.protocol == "http_state":
            out.update(port=self.port, encoding=self.encoding, live=self.live)
        if self.protocol == "shared_volume":
            out.update(port=self.port, path=self.path, encoding=self.encoding, live=self.live)
        if self.protocol == "criu":
            out.update(become=self.become)
            if not self.become:
                out.update(port=self.port, encoding=self.encoding, live=self.live)
        return out

    @property
    def contract(self) -> bool:
        """The stage speaks the HTTP state contract at its handover (all but criu's `become`)."""
        return not (self.protocol == "criu" and self.become)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Handover:
        return cls(
            protocol=data["protocol"],
            port=int(data.get("port", 0)),
            encoding=data.get("encoding", "msgpack"),
            path=data.get("path", ""),
            drain=float(data.get("drain", 1.0)),
            deadline=float(data.get("deadline", 60.0)),
            live=bool(data.get("live", False)),
            become=bool(data.get("become", False)),
        )


@dataclass(frozen=True)
class Stage:
    name: str
    handover: Handover
    image: str = ""
    entry: str = ""
    """A catalog reference (NAME or NAME@VERSION) instead of an image."""
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    consumes_from: str = ""
    consumes_state: tuple[str, ...] = ()
    cpu_millis: int = 0
    """0: the coordinator's [deployments] cpu_millis."""
    memory_bytes: int = 0
    predicted_cpu_millis: int = 0
    predicted_memory_bytes: int = 0
    health: HealthCheck | None = None
    run_for: float = 0.0
    """0: until `chain advance`."""
    fallback: str = ""
    standby: str = "none"
    """frozen: created ahead, while the stage before it serves, and frozen until its handover."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        if self.image:
            out["image"] = self.image
        if self.entry:
            out["entry"] = self.entry
        if self.args:
            out["args"] = list(self.args)
        if self.env:
            out["env"] = dict(self.env)
        if self.consumes_from:
            out["consumes"] = {"from": self.consumes_from, "state": list(self.consumes_state)}
        if self.cpu_millis or self.memory_bytes:
            out["resources"] = _resources(self.cpu_millis, self.memory_bytes)
        if self.predicted_cpu_millis or self.predicted_memory_bytes:
            out["predicted"] = _resources(self.predicted_cpu_millis, self.predicted_memory_bytes)
        if self.health is not None:
            out["health"] = self.health.to_dict()
        out["handover"] = self.handover.to_dict()
        if self.run_for:
            out["run_for"] = self.run_for
        if self.fallback:
            out["fallback"] = self.fallback
        if self.standby != "none":
            out["standby"] = self.standby
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Stage:
        consumes = data.get("consumes") or {}
        resources_ = data.get("resources") or {}
        predicted = data.get("predicted") or {}
        return cls(
            name=data["name"],
            handover=Handover.from_dict(data["handover"]),
            image=data.get("image", ""),
            entry=data.get("entry", ""),
            args=tuple(data.get("args", ())),
            env=dict(data.get("env", {})),
            consumes_from=consumes.get("from", ""),
            consumes_state=tuple(consumes.get("state", ())),
            cpu_millis=int(resources_.get("cpu_millis", 0)),
            memory_bytes=int(resources_.get("memory_bytes", 0)),
            predicted_cpu_millis=int(predicted.get("cpu_millis", 0)),
            predicted_memory_bytes=int(predicted.get("memory_bytes", 0)),
            health=HealthCheck.from_dict(data["health"]) if data.get("health") else None,
            run_for=float(data.get("run_for", 0.0)),
            fallback=data.get("fallback", ""),
            standby=data.get("standby", "none"),
        )


def _resources(cpu: int, memory: int) -> dict[str, int]:
    return {k: v for k, v in (("cpu_millis", cpu), ("memory_bytes", memory)) if v}


@dataclass(frozen=True)
class ChainManifest:
    name: str
    stages: tuple[Stage, ...]
    fallbacks: tuple[Stage, ...] = ()
    description: str = ""
    port: int = 0

    def stage(self, name: str) -> Stage:
        for s in (*self.stages, *self.fallbacks):
            if s.name == name:
                return s
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": FORMAT_VERSION, "name": self.name}
        if self.description:
            out["description"] = self.description
        if self.port:
            out["port"] = self.port
        out["stages"] = [s.to_dict() for s in self.stages]
        if self.fallbacks:
            out["fallbacks"] = [s.to_dict() for s in self.fallbacks]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ChainManifest:
        return cls(
            name=data["name"],
            stages=tuple(Stage.from_dict(s) for s in data["stages"]),
            fallbacks=tuple(Stage.from_dict(s) for s in data.get("fallbacks", ())),
            description=data.get("description", ""),
            port=int(data.get("port", 0)),
        )


class ManifestValidator:
    """A manifest document -> a `ChainManifest`, or ChainManifestInvalid listing every problem."""

    def __init__(self) -> None:
        self.schema_bytes = schema_text()
        self.schema: dict[str, Any] = json.loads(self.schema_bytes)
        jsonschema.Draft202012Validator.check_schema(self.schema)
        self._validator = jsonschema.Draft202012Validator(self.schema)

    def parse(self, document: Any) -> ChainManifest:
        problems = self.schema_problems(document)
        if problems:
            raise ChainManifestInvalid(problems)
        manifest = ChainManifest.from_dict(document)
        problems = graph_problems(manifest)
        if problems:
            raise ChainManifestInvalid(problems)
        return manifest

    def schema_problems(self, document: Any) -> list[str]:
        if not isinstance(document, dict):
            return ["manifest: expected a JSON object with version, name and stages"]
        if document.get("version", FORMAT_VERSION) != FORMAT_VERSION:
            return [f"version: {document['version']!r} is not a manifest version this coordinator reads (1)"]
        errors = sorted(self._validator.iter_errors(document), key=lambda e: [str(p) for p in e.absolute_path])
        return _unique(_describe(e, document) for e in errors)[:MAX_PROBLEMS]


def _path(parts: Iterable[Any]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "manifest"


def _describe(error: jsonschema.ValidationError, document: Any) -> str:
    parts = list(error.absolute_path)
    if error.validator is None:
        # A `false` subschema: a field this kind of object does not take (reported at its object).
        owner = document
        for part in parts:
            owner = owner[part]
        if isinstance(owner, dict):
            key = "protocol" if "protocol" in owner else "kind"
            # (by type too: True == 1, and `become: true` is not the `port: 1` refused beside it)
            fields = [
                k for k, v in owner.items() if v == error.instance and type(v) is type(error.instance) and k != key
            ]
            return f"{_path([*parts, '/'.join(fields) or '?'])}: not allowed with {key} {owner.get(key)!r}"
    if error.validator == "oneOf" and isinstance(error.instance, dict):
        return f"{_path(parts)}: give exactly one of image and entry"
    if error.validator == "pattern" and isinstance(error.schema, dict) and error.schema.get("description"):
        return f"{_path(parts)}: {error.instance!r} is not valid: {str(error.schema['description']).rstrip('.')}"
    return f"{_path(parts)}: {error.message}"


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _becoming_problems(manifest: ChainManifest) -> list[str]:
    """criu with `become`: the next stage is the moved process, so it must be what that process
    runs (image, args, env), with nothing of its own to start (no standby, no fallback)."""
    problems = []
    for j, fb in enumerate(manifest.fallbacks):
        if fb.handover.become:
            problems.append(f"fallbacks[{j}].handover.become: a fallback hands over by criu only with the contract")
    for i, s in enumerate(manifest.stages):
        if not s.handover.become:
            continue
        if i + 1 == len(manifest.stages):
            problems.append(f"stages[{i}].handover.become: {s.name} is the last stage; there is no stage to become")
            continue
        nxt = manifest.stages[i + 1]
        for what, mine, theirs in (
            ("image", s.image, nxt.image),
            ("entry", s.entry, nxt.entry),
            ("args", s.args, nxt.args),
            ("env", s.env, nxt.env),
        ):
            if mine != theirs:
                problems.append(
                    f"stages[{i + 1}].{what}: {nxt.name} is {s.name}'s process moved (its handover is criu with "
                    f"become), so its {what} is {s.name}'s"
                )
        if nxt.standby != "none":
            problems.append(f"stages[{i + 1}].standby: {nxt.name} is {s.name}'s process moved; it has no standby")
        if nxt.fallback:
            problems.append(f"stages[{i + 1}].fallback: {nxt.name} is {s.name}'s process moved; it has no fallback")
    return problems


def graph_problems(manifest: ChainManifest) -> list[str]:
    """Stage 2: names, references, the graph of consumes edges (graphlib), the rest of the rules."""
    problems: list[str] = []
    where: dict[str, str] = {}
    for group, stages in (("stages", manifest.stages), ("fallbacks", manifest.fallbacks)):
        for i, s in enumerate(stages):
            at = f"{group}[{i}]"
            if s.name in where:
                problems.append(f"{at}.name: {s.name!r} is already the name of {where[s.name]}; stage names are unique")
                continue
            where[s.name] = at
    main = [s.name for s in manifest.stages]
    fallback_names = {s.name for s in manifest.fallbacks}
    graph: dict[str, set[str]] = {}
    volume_at: tuple[str, str] | None = None  # the first shared_volume stage's (path, where)
    for group, stages in (("stages", manifest.stages), ("fallbacks", manifest.fallbacks)):
        for i, s in enumerate(stages):
            at = f"{group}[{i}]"
            graph.setdefault(s.name, set())
            if s.consumes_from:
                if s.consumes_from not in where:
                    problems.append(f"{at}.consumes.from: no stage is named {s.consumes_from!r}")
                else:
                    graph[s.name].add(s.consumes_from)
            if s.fallback:
                if s.fallback not in fallback_names:
                    problems.append(f"{at}.fallback: {s.fallback!r} is not one of fallbacks")
                elif group == "fallbacks":
                    problems.append(f"{at}.fallback: a fallback stage has no fallback of its own")
            if s.handover.protocol not in DRIVEN_PROTOCOLS:
                problems.append(
                    f"{at}.handover.protocol: {s.handover.protocol!r} is part of the format but this coordinator "
                    f"does not drive it yet (it drives: {', '.join(sorted(DRIVEN_PROTOCOLS))})"
                )
            if s.handover.protocol == "shared_volume":
                first_path, first_at = volume_at or (s.handover.path, at)
                volume_at = (first_path, first_at)
                if s.handover.path != first_path:
                    problems.append(
                        f"{at}.handover.path: {s.handover.path!r}, but {first_at} mounts the chain's volume at "
                        f"{first_path!r}; a chain has one volume, at one path"
                    )
            if s.health is not None and s.health.timeout > s.health.interval:
                problems.append(
                    f"{at}.health.timeout: {s.health.timeout:g} s is longer than its interval ({s.health.interval:g} s)"
                )
            if s.health is None and not s.entry:
                problems.append(f"{at}.health: required for a stage given by image (an entry brings its own)")
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        cycle = list(exc.args[1])
        problems.append(f"stages: consumes edges close a cycle: {' -> '.join(reversed(cycle))}")
        return problems
    # One sequence: the first stage consumes nothing, each later one consumes from the one before.
    for i, s in enumerate(manifest.stages):
        if i == 0:
            if s.consumes_from:
                problems.append(f"stages[0].consumes: {s.name} is the first stage; it consumes nothing")
            if s.standby != "none":
                problems.append(f"stages[0].standby: {s.name} is the first stage; nothing runs before it to keep one")
        elif not s.consumes_from:
            problems.append(f"stages[{i}].consumes: {s.name} runs after {main[i - 1]}; say what it consumes from it")
        elif s.consumes_from != main[i - 1] and s.consumes_from in where:
            problems.append(
                f"stages[{i}].consumes.from: {s.name} runs after {main[i - 1]}, so it consumes from "
                f"{main[i - 1]!r}, not {s.consumes_from!r}"
            )
    problems += _becoming_problems(manifest)
    for j, fb in enumerate(manifest.fallbacks):
        users = [s for s in manifest.stages if s.fallback == fb.name]
        if not users:
            problems.append(f"fallbacks[{j}]: no stage names {fb.name!r} as its fallback")
        for user in users:
            if fb.consumes_from != user.consumes_from:
                problems.append(
                    f"fallbacks[{j}].consumes.from: {fb.name} stands in for {user.name}, so it consumes from "
                    f"{user.consumes_from or 'nothing'} as {user.name} does"
                )
    return problems
