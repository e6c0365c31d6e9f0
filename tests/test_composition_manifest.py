"""Composition manifests without I/O: the format, its validation, the order rule and the fetch order."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import json
import os
import socket
import tarfile
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.composition import paths, priority
from agent.composition.costs import ContainerdCpu, CostMeter, LayerHistory, process_cpu_seconds, socket_peer_pid
from agent.composition.manifest import InvalidComposition, load_text, parse, schema, stack_order, unordered_undeclared

D = [f"sha256:{i:064x}" for i in range(1, 40)]


def node(i: int, node_id: str | None = None, **kw: Any) -> dict[str, Any]:
    return {"id": node_id or f"n{i}", "ref": "localhost:5000/test/base:1", "digest": D[i], "size": 100 * i, **kw}


def manifest(nodes: list[dict[str, Any]], edges: list[tuple[str, str]] = (), **kw: Any) -> dict[str, Any]:  # type: ignore[assignment]
    return {
        "version": 1,
        "name": "web",
        "nodes": nodes,
        "edges": [{"node": a, "depends_on": b} for a, b in edges],
        **kw,
    }


def problems(doc: Any) -> tuple[str, ...]:
    with pytest.raises(InvalidComposition) as info:
        parse(doc)
    return info.value.problems


def test_the_shipped_schema_is_a_valid_json_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(schema())


def test_the_stack_puts_dependencies_below_and_breaks_ties_by_id() -> None:
    # app needs lib and py; lib and py need base; tools needs nothing: ties by the smallest id.
    doc = manifest(
        [node(1, "app"), node(2, "py"), node(3, "lib"), node(4, "base"), node(5, "tools")],
        [("app", "lib"), ("app", "py"), ("lib", "base"), ("py", "base")],
    )
    comp = parse(doc)
    assert [n.id for n in comp.stack()] == ["base", "lib", "py", "app", "tools"]
    # The order of the lists does not matter: same graph, same stack.
    doc["nodes"].reverse()
    doc["edges"].reverse()
    assert [n.id for n in parse(doc).stack()] == ["base", "lib", "py", "app", "tools"]
    assert comp.dependents_of()["base"] == {"lib", "py", "app"}


def test_yaml_and_json_give_the_same_composition() -> None:
    doc = manifest([node(1, "base"), node(2, "app")], [("app", "base")], preference=["app"], workload="w1")
    as_yaml = (
        "version: 1\nname: web\nworkload: w1\npreference: [app]\n"
        "nodes:\n"
        f"  - {{id: base, ref: localhost:5000/test/base:1, digest: '{D[1]}', size: 100}}\n"
        f"  - {{id: app, ref: localhost:5000/test/base:1, digest: '{D[2]}', size: 200}}\n"
        "edges:\n  - {node: app, depends_on: base}\n"
    )
    assert parse(load_text(as_yaml)) == parse(load_text(json.dumps(doc)))
    assert parse(load_text(as_yaml, "application/yaml")).preference == ("app",)


def test_a_cycle_is_named() -> None:
    doc = manifest([node(1, "a"), node(2, "b"), node(3, "c")], [("a", "b"), ("b", "c"), ("c", "a")])
    (problem,) = problems(doc)
    assert "cycle" in problem
    cycle = problem.split(": ")[-1].split(" -> ")
    assert cycle[0] == cycle[-1] and set(cycle) == {"a", "b", "c"}
    # A node depending on itself is a cycle of one.
    assert "a -> a" in problems(manifest([node(1, "a")], [("a", "a")]))[0]


def test_duplicates_and_dangling_names_are_each_reported() -> None:
    doc = manifest(
        [node(1, "a"), node(2, "a"), node(1, "c")],
        [("a", "zz"), ("c", "a"), ("c", "a")],
        preference=["nope"],
    )
    found = problems(doc)
    assert any("nodes[1].id: duplicate node 'a'" in p for p in found)
    assert any(f"nodes[2].digest: layer {D[1]} is already node 'a'" in p for p in found)
    assert any("edges[0].depends_on: no node 'zz'" in p for p in found)
    assert any("edges[2]: duplicate edge" in p for p in found)
    assert any("preference[0]" in p for p in found)


def test_shape_errors_name_the_field() -> None:
    bad = manifest([{**node(1), "size": -1}, {**node(2), "digest": "md5:abc"}])
    bad["version"] = 2
    bad["surprise"] = True
    found = problems(bad)
    assert any(p.startswith("manifest.nodes[0].size") for p in found)
    assert any(p.startswith("manifest.nodes[1].digest") for p in found)
    assert any(p.startswith("manifest.version") for p in found)
    assert any("surprise" in p for p in found)


def test_unordered_layers_writing_one_path_are_refused_until_an_edge_orders_them() -> None:
    nodes = [node(1, "base"), node(2, "py", paths=["/usr/lib/python3"]), node(3, "tools", paths=["/usr/lib"])]
    (problem,) = problems(manifest(nodes, [("py", "base"), ("tools", "base")]))
    assert "'py' and 'tools'" in problem and "/usr/lib" in problem
    # An edge decides which goes on top: accepted.
    assert parse(manifest(nodes, [("py", "base"), ("tools", "base"), ("py", "tools")]))
    # Paths that do not overlap (a sibling with a common prefix of letters) are fine unordered.
    nodes[2]["paths"] = ["/usr/lib64"]
    assert parse(manifest(nodes, [("py", "base"), ("tools", "base")]))


def layer_tar(*entries: tuple[str, str, bytes | str], compress: bool = True) -> io.BufferedReader:
    """A layer blob from (kind, name, data or link target) entries; kind: dir, file, symlink, whiteout."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz" if compress else "w") as tar:
        for kind, name, data in entries:
            info = tarfile.TarInfo(name)
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, str(data)
                tar.addfile(info)
            else:
                body = data if isinstance(data, bytes) else data.encode()
                info.size, info.mode = len(body), 0o644
                info.mtime = len(body)  # times differ between layers; they are not compared
                tar.addfile(info, io.BytesIO(body))
    raw.seek(0)
    return io.BufferedReader(raw)  # type: ignore[arg-type]


def test_layer_files_conflict_only_where_the_order_would_change_the_result() -> None:
    base = paths.read_layer(layer_tar(("dir", "etc", ""), ("file", "etc/passwd", b"root"), ("dir", "./srv", "")))
    # The same directory and the same bytes in another layer (uncompressed, other mtimes): no conflict.
    same = paths.read_layer(
        layer_tar(("dir", "./etc/", ""), ("file", "./etc/passwd", b"root"), ("file", "opt/x", b"1"), compress=False)
    )
    assert paths.conflict(base, same) is None
    other = paths.read_layer(layer_tar(("dir", "etc", ""), ("file", "etc/passwd", b"admin")))
    assert paths.conflict(base, other) == "/etc/passwd"
    assert paths.conflict(other, base) == "/etc/passwd"
    # A file in one where the other has a directory holding files.
    file_over_dir = paths.read_layer(layer_tar(("file", "srv", b"x")))
    assert paths.conflict(base, file_over_dir) == "/srv"
    inside = paths.read_layer(layer_tar(("symlink", "opt", "/usr/opt")))
    assert paths.conflict(same, inside) == "/opt/x"
    # A whiteout deletes what the other writes; an opaque directory hides what the other put in it.
    whiteout = paths.read_layer(layer_tar(("file", "etc/.wh.passwd", b"")))
    assert paths.conflict(base, whiteout) == "/etc/passwd"
    opaque = paths.read_layer(layer_tar(("dir", "etc", ""), ("file", "etc/.wh..wh..opq", b"")))
    assert paths.conflict(opaque, base) == "/etc/passwd"
    # Against declared paths: anything at or below them, a non-directory above them.
    assert paths.conflict_with_declared(base, ["/etc"]) == "/etc"
    assert paths.conflict_with_declared(base, ["/srv/app"]) is None
    assert paths.conflict_with_declared(file_over_dir, ["/srv/app"]) == "/srv"
    assert paths.conflict_with_declared(whiteout, ["/etc/passwd"]) == "/etc/passwd"


def test_a_zstd_layer_cannot_be_listed() -> None:
    blob = io.BufferedReader(io.BytesIO(paths.ZSTD_MAGIC + b"rest"))  # type: ignore[arg-type]
    with pytest.raises(paths.UnreadableLayer, match="zstd"):
        paths.read_layer(blob)


def test_only_unordered_pairs_with_undeclared_paths_are_read() -> None:
    doc = {
        "version": 1,
        "name": "pairs",
        "nodes": [
            {
                "id": i,
                "ref": "r.local/x:1",
                "digest": f"sha256:{c * 64}",
                "size": 1,
                **({"paths": [f"/{i}"]} if i in "cd" else {}),
            }
            for i, c in zip("abcde", "12345", strict=True)
        ],
        "edges": [{"node": "b", "depends_on": "a"}, {"node": "c", "depends_on": "a"}, {"node": "d", "depends_on": "a"}],
    }
    comp = parse(doc)
    pairs = [(x.id, y.id) for x, y in unordered_undeclared(comp.nodes, comp.dependencies())]
    # c and d declare paths (compared by parse); a is below b, c, d; e is ordered against nothing.
    assert pairs == [("a", "e"), ("b", "c"), ("b", "d"), ("b", "e"), ("c", "e"), ("d", "e")]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('{"version": 1, "version": 1}', "duplicate"),
        ('{"version": NaN}', "NaN"),
        ("a: &x [1]\nb: *x\n", "aliases"),
        ("when: 2024-01-01\n", "JSON cannot"),
        ("[" * 40 + "]" * 40, "deeper"),
        ("{ not json", "not valid JSON"),
    ],
)
def test_text_that_is_no_manifest(text: str, fragment: str) -> None:
    with pytest.raises(InvalidComposition) as info:
        load_text(text)
    assert fragment in info.value.message


# ---------------------------------------------------------------- the fetch order


def chain(sizes: list[int], rate: float = 10.0, apply_rate: float = 100.0) -> list[priority.Layer]:
    """A chain of layers bottom first, all missing: fetch at `rate`, apply at `apply_rate` bytes/s."""
    digests = D[: len(sizes)]
    return [
        priority.Layer(
            digest=d,
            position=i,
            fetch_seconds=size / rate,
            apply_seconds=size / apply_rate,
            dependents=len(sizes) - 1 - i,
        )
        for i, (d, size) in enumerate(zip(digests, sizes, strict=True))
    ]


def test_layers_many_depend_on_go_first_and_preferences_before_them() -> None:
    stack = chain([10, 10, 10])
    assert priority.fetch_order(stack) == D[:3]
    assert priority.fetch_order(stack, [D[2]]) == [D[2], D[0], D[1]]


def test_a_large_slow_layer_starts_early_when_fetches_run_in_parallel() -> None:
    stack = chain([10, 10, 200])  # a big top layer: its fetch alone is longer than the rest together
    order = priority.fetch_order(stack, granularity=2)
    assert order[0] == D[2]
    assert priority.fetch_order(stack, granularity=1) == D[:3]  # one at a time: bottom first
    by_stack = priority.simulate(stack, D[:3], granularity=2)
    chosen = priority.simulate(stack, order, granularity=2)
    assert chosen.runnable < by_stack.runnable


def test_history_breaks_ties() -> None:
    a, b = (priority.Layer(D[i], i, 1.0, 0.0, uses=u) for i, u in ((0, 0), (1, 5)))
    assert priority.fetch_order([a, b]) == [D[1], D[0]]


def test_the_order_changes_the_time_to_the_first_and_the_runnable_snapshot() -> None:
    """The model the order is chosen by: one fetch at a time, a large base. Bottom first, the base is
    applied while the rest arrives; the reverse (the preference list can force it) waits for all."""
    stack = chain([300, 100, 50], rate=100.0, apply_rate=200.0)
    chosen = priority.simulate(stack, priority.fetch_order(stack), granularity=1)
    reverse = priority.simulate(stack, list(reversed(D[:3])), granularity=1)
    assert chosen.first_snapshot == pytest.approx(3.0 + 1.5)
    assert reverse.first_snapshot == pytest.approx(4.5 + 1.5)
    assert chosen.runnable < reverse.runnable


@given(
    st.lists(st.integers(1, 1000), min_size=1, max_size=6),
    st.lists(st.booleans(), min_size=6, max_size=6),
    st.sampled_from([10.0, 100.0, 1000.0]),
)
def test_one_fetch_at_a_time_the_order_is_optimal(sizes: list[int], present: list[bool], apply_rate: float) -> None:
    """Jackson's rule: with one fetch at a time no order of the missing layers is runnable sooner."""
    stack = [
        dataclasses.replace(la, missing=not here, fetch_seconds=0.0 if here else la.fetch_seconds)
        for la, here in zip(chain(sizes, apply_rate=apply_rate), present, strict=False)
    ]
    missing = [la.digest for la in stack if la.missing]
    best = min(priority.simulate(stack, list(p), 1).runnable for p in itertools.permutations(missing))
    assert priority.simulate(stack, priority.fetch_order(stack), 1).runnable <= best + 1e-9


def test_stack_order_is_deterministic_on_a_wide_graph() -> None:
    deps = {f"n{i:02d}": set() for i in range(20)}
    assert stack_order(deps) == sorted(deps)


# ---------------------------------------------------------------- measuring


def test_containerds_cpu_is_read_through_its_socket(tmp_path: Path) -> None:
    """The peer of a unix socket is found by SO_PEERCRED, and its CPU time read from /proc: here
    the listener is this process, so its CPU time grows with work done."""
    path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen()
        assert socket_peer_pid(str(path)) == os.getpid()
        cpu = ContainerdCpu(f"unix://{path}")
        before = cpu.seconds()
        assert before is not None
        deadline = time.process_time() + 0.05
        while time.process_time() < deadline:
            pass
        after = cpu.seconds()
        assert after is not None and after >= before + 0.04
    assert ContainerdCpu(str(tmp_path / "none.sock")).seconds() is None
    assert process_cpu_seconds(0) is None


def test_measured_rates_replace_the_defaults_once_a_mib_has_moved(tmp_path: Path) -> None:
    meter = CostMeter()
    assert meter.rate("registry/r:5000") == 50 * 2**20
    meter.fetched("registry/r:5000", 2**20, 0.5)
    assert meter.rate("registry/r:5000") == 2 * 2**20
    meter.applied(2**20, 0.25, cpu_seconds=0.125)
    assert meter.apply_seconds_per_byte() == 0.25 / 2**20
    assert meter.to_json()["assembly"]["cpu_seconds_per_byte"] == 0.125 / 2**20
    history = LayerHistory(tmp_path / "h.json")
    history.record([D[1], D[2]])
    history.record([D[1]])
    assert LayerHistory(tmp_path / "h.json").uses(D[1]) == 2


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=30,
)


@given(st.one_of(st.text(max_size=300), st.binary(max_size=300)))
def test_any_text_is_a_manifest_or_a_refusal(text: str | bytes) -> None:
    """No input makes the parser raise anything but InvalidComposition (a 400)."""
    with contextlib.suppress(InvalidComposition):
        parse(load_text(text))


@given(JSON, st.sampled_from(["nodes", "edges", "preference", "config", "name", "version"]))
def test_any_value_in_any_field_is_a_manifest_or_a_refusal(value: Any, key: str) -> None:
    doc = manifest([node(1, "a"), node(2, "b", paths=["/x"])], [("b", "a")], preference=["a"])
    doc[key] = value
    with contextlib.suppress(InvalidComposition):
        parse(load_text(json.dumps(doc)))
