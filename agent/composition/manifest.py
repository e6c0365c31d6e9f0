"""Composition manifests: text in, a validated `Composition` and its layer stack out, or InvalidComposition.

Pure functions, no I/O. The shape is checked by the JSON Schema shipped beside this module
(`schema.json`, also served at `GET /v1/manifests/schema`); what a schema cannot say is checked
here: duplicate nodes, edges naming no node, cycles (named), preferences naming no node, and layers
that no edge orders but that write the same path. Every problem is reported, each with where it is.
What needs the registry or the content store (unknown digests, sizes) is the resolver's
(`resolve.py`), and it runs only on a manifest that passed these.

The order rule, DAG -> stack: a node's dependencies are below it; among nodes whose dependencies
are all placed, the one with the smallest id goes next (Kahn's algorithm on `graphlib`, with the
smallest-id choice). So the stack depends only on the graph, never on the order of the lists.
"""

from __future__ import annotations

import graphlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

import jsonschema
import yaml

from core.errors import InvalidRequest
from core.http.validate import json_too_deep, parse_json

VERSION = 1
MAX_DEPTH = 16
"""Nesting levels of a manifest document; the format has 4."""
MAX_PROBLEMS = 20
"""Problems named in one error; past that the message says how many more."""


class InvalidComposition(InvalidRequest):
    """The manifest is malformed or inconsistent; `problems` names each thing wrong, with its place."""

    code = "invalid_composition"

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        shown = "; ".join(self.problems[:MAX_PROBLEMS])
        more = len(self.problems) - MAX_PROBLEMS
        super().__init__(f"invalid composition manifest: {shown}" + (f" (and {more} more)" if more > 0 else ""))


@dataclass(frozen=True)
class Costs:
    cpu_seconds: float | None = None
    """Declared seconds to assemble (apply) the layer."""
    network_seconds: float | None = None
    """Declared seconds to fetch the layer."""


@dataclass(frozen=True)
class Node:
    id: str
    ref: str
    digest: str
    size: int
    media_type: str = ""
    """Empty when not declared: the registry's is taken."""
    costs: Costs = Costs()
    paths: tuple[str, ...] = ()


@dataclass(frozen=True)
class Composition:
    name: str
    nodes: tuple[Node, ...]
    edges: tuple[tuple[str, str], ...]
    """(node, depends_on) pairs."""
    workload: str = ""
    prefetch_granularity: int | None = None
    preference: tuple[str, ...] = ()
    """Node ids (digests in the manifest are turned into the ids of their nodes)."""
    config: Mapping[str, Any] = field(default_factory=dict)

    def node(self, node_id: str) -> Node:
        return next(n for n in self.nodes if n.id == node_id)

    def dependencies(self) -> dict[str, set[str]]:
        deps: dict[str, set[str]] = {n.id: set() for n in self.nodes}
        for node, dep in self.edges:
            deps[node].add(dep)
        return deps

    def stack(self) -> tuple[Node, ...]:
        """The layer stack, bottom first (the order rule in the module docstring)."""
        by_id = {n.id: n for n in self.nodes}
        return tuple(by_id[i] for i in stack_order(self.dependencies()))

    def dependents_of(self) -> dict[str, set[str]]:
        """Per node: the ids of the nodes that depend on it, directly or not."""
        return _reachable(_reverse(self.dependencies()))


@cache
def schema() -> dict[str, Any]:
    text = resources.files(__package__).joinpath("schema.json").read_text()
    loaded: dict[str, Any] = json.loads(text)
    return loaded


def schema_bytes() -> bytes:
    return resources.files(__package__).joinpath("schema.json").read_bytes()


def load_text(text: str | bytes, content_type: str = "") -> Any:
    """A manifest document from JSON or YAML text: YAML when the content type says so or when the
    text does not start like a JSON object. Refused: JSON's NaN, Infinity and duplicate keys (as
    every API body), YAML's aliases, and values JSON has not (dates, sets); nesting past MAX_DEPTH."""
    raw = text.encode() if isinstance(text, str) else text
    stripped = raw.lstrip()
    if "yaml" not in content_type.lower() and stripped.startswith(b"{"):
        try:
            return parse_json(raw, max_depth=MAX_DEPTH)
        except InvalidRequest as exc:
            raise InvalidComposition([exc.message.replace("request body", "the manifest")]) from exc
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidComposition([f"the manifest is not UTF-8: {exc}"]) from exc
    try:
        # No anchors or aliases: a few lines of them expand into gigabytes ("billion laughs"), or
        # into a document that contains itself. A manifest has no use for them.
        if any(isinstance(event, yaml.AliasEvent) for event in yaml.parse(decoded, Loader=yaml.SafeLoader)):
            raise InvalidComposition(["the manifest uses YAML aliases (*name), which are not accepted"])
        document = yaml.safe_load(decoded)
    except yaml.YAMLError as exc:
        raise InvalidComposition([f"the manifest is not valid YAML: {exc}"]) from exc
    # What YAML has and JSON has not (dates, sets, NaN) is no manifest: refused here, as in JSON.
    try:
        as_json = json.dumps(document, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidComposition([f"the manifest holds a value JSON cannot: {exc}"]) from exc
    if json_too_deep(as_json, MAX_DEPTH):
        raise InvalidComposition([f"the manifest nests deeper than {MAX_DEPTH} levels"])
    return document


def parse(document: Any) -> Composition:
    """A Composition from a decoded document, or InvalidComposition naming every problem."""
    validator = jsonschema.Draft202012Validator(schema())
    shape = sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path))
    if shape:
        raise InvalidComposition([f"{_where(e.absolute_path)}: {e.message}" for e in shape])
    nodes = tuple(_node(raw) for raw in document["nodes"])
    edges = tuple((e["node"], e["depends_on"]) for e in document.get("edges", []))
    problems = check_nodes(nodes) + check_edges(nodes, edges)
    preference, pref_problems = _preference(nodes, document.get("preference", []))
    problems += pref_problems
    if problems:
        raise InvalidComposition(problems)
    deps: dict[str, set[str]] = {n.id: set() for n in nodes}
    for node, dep in edges:
        deps[node].add(dep)
    cycle = find_cycle(deps)
    if cycle:
        raise InvalidComposition([f"edges: the dependencies form a cycle: {' -> '.join(cycle)}"])
    problems = path_conflicts(nodes, deps)
    if problems:
        raise InvalidComposition(problems)
    return Composition(
        name=document["name"],
        nodes=nodes,
        edges=edges,
        workload=document.get("workload", ""),
        prefetch_granularity=document.get("prefetch_granularity"),
        preference=preference,
        config=dict(document.get("config", {})),
    )


def _where(path: Sequence[Any]) -> str:
    out = "manifest"
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _node(raw: Mapping[str, Any]) -> Node:
    costs = raw.get("costs", {})
    return Node(
        id=raw["id"],
        ref=raw["ref"],
        digest=raw["digest"],
        size=raw["size"],
        media_type=raw.get("media_type", ""),
        costs=Costs(costs.get("cpu_seconds"), costs.get("network_seconds")),
        paths=tuple(_clean_path(p) for p in raw.get("paths", [])),
    )


def _clean_path(path: str) -> str:
    parts = [p for p in path.split("/") if p and p != "."]
    return "/" + "/".join(parts)


def check_nodes(nodes: Sequence[Node]) -> list[str]:
    """Duplicate ids, and one layer digest in two nodes (a stack holds each layer once)."""
    problems: list[str] = []
    first_id: dict[str, int] = {}
    first_digest: dict[str, int] = {}
    for i, n in enumerate(nodes):
        if n.id in first_id:
            problems.append(f"manifest.nodes[{i}].id: duplicate node {n.id!r} (first at nodes[{first_id[n.id]}])")
        else:
            first_id[n.id] = i
        if n.digest in first_digest:
            other = nodes[first_digest[n.digest]].id
            problems.append(f"manifest.nodes[{i}].digest: layer {n.digest} is already node {other!r}")
        else:
            first_digest[n.digest] = i
    return problems


def check_edges(nodes: Sequence[Node], edges: Sequence[tuple[str, str]]) -> list[str]:
    ids = {n.id for n in nodes}
    problems: list[str] = []
    seen: set[tuple[str, str]] = set()
    for i, (node, dep) in enumerate(edges):
        for key, name in (("node", node), ("depends_on", dep)):
            if name not in ids:
                problems.append(f"manifest.edges[{i}].{key}: no node {name!r}")
        if (node, dep) in seen:
            problems.append(f"manifest.edges[{i}]: duplicate edge {node!r} -> {dep!r}")
        seen.add((node, dep))
    return problems


def _preference(nodes: Sequence[Node], raw: Sequence[str]) -> tuple[tuple[str, ...], list[str]]:
    by_digest = {n.digest: n.id for n in nodes}
    ids = {n.id for n in nodes}
    out: list[str] = []
    problems: list[str] = []
    for i, item in enumerate(raw):
        node_id = item if item in ids else by_digest.get(item)
        if node_id is None:
            problems.append(f"manifest.preference[{i}]: {item!r} is neither a node id nor a node's digest")
        elif node_id in out:
            problems.append(f"manifest.preference[{i}]: node {node_id!r} is already listed")
        else:
            out.append(node_id)
    return tuple(out), problems


def find_cycle(deps: Mapping[str, set[str]]) -> list[str]:
    """A cycle of the dependency graph as node ids, first == last; empty when there is none."""
    try:
        graphlib.TopologicalSorter(deps).prepare()
    except graphlib.CycleError as exc:
        cycle: list[str] = list(exc.args[1])
        # graphlib names it from the dependency side; say it as "a depends on b depends on ... a".
        return list(reversed(cycle))
    return []


def stack_order(deps: Mapping[str, set[str]]) -> list[str]:
    """Node ids bottom first: dependencies below, then the smallest id among the ready ones."""
    sorter = graphlib.TopologicalSorter(deps)
    sorter.prepare()
    ready: set[str] = set(sorter.get_ready())
    order: list[str] = []
    while ready:
        nxt = min(ready)
        ready.discard(nxt)
        order.append(nxt)
        sorter.done(nxt)
        ready.update(sorter.get_ready())
    return order


def _reverse(deps: Mapping[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {n: set() for n in deps}
    for node, below in deps.items():
        for dep in below:
            out[dep].add(node)
    return out


def _reachable(graph: Mapping[str, set[str]]) -> dict[str, set[str]]:
    """Per node, every node reachable from it (not itself)."""
    out: dict[str, set[str]] = {}
    for start in graph:
        seen: set[str] = set()
        todo = list(graph[start])
        while todo:
            n = todo.pop()
            if n not in seen:
                seen.add(n)
                todo.extend(graph[n])
        out[start] = seen
    return out


def _overlap(a: str, b: str) -> bool:
    """Two paths overlap when they are equal or one is a directory holding the other."""
    return a == b or a == "/" or b == "/" or b.startswith(a + "/") or a.startswith(b + "/")


def path_conflicts(nodes: Sequence[Node], deps: Mapping[str, set[str]]) -> list[str]:
    """Layers no edge orders (neither depends on the other) that write an overlapping path: which
    one ends on top is only the tie-break's choice, so the manifest must say it with an edge."""
    below = _reachable(deps)
    problems: list[str] = []
    ordered = sorted(nodes, key=lambda n: n.id)
    for i, a in enumerate(ordered):
        for b in ordered[i + 1 :]:
            if not a.paths or not b.paths or a.id in below[b.id] or b.id in below[a.id]:
                continue
            clash = next(((p, q) for p in a.paths for q in b.paths if _overlap(p, q)), None)
            if clash is not None:
                p, q = clash
                where = p if p == q else f"{p} and {q}"
                problems.append(
                    f"nodes {a.id!r} and {b.id!r} both write {where} and no edge orders them: add an edge"
                    f" (e.g. {{node: {b.id}, depends_on: {a.id}}}) to say which goes on top"
                )
    return problems


def unordered_undeclared(nodes: Sequence[Node], deps: Mapping[str, set[str]]) -> list[tuple[Node, Node]]:
    """Pairs of nodes no edge orders where one or both declare no `paths`: their layers' own file
    lists decide whether they conflict (paths.py), read where the blobs are."""
    below = _reachable(deps)
    ordered = sorted(nodes, key=lambda n: n.id)
    return [
        (a, b)
        for i, a in enumerate(ordered)
        for b in ordered[i + 1 :]
        if (not a.paths or not b.paths) and a.id not in below[b.id] and b.id not in below[a.id]
    ]
