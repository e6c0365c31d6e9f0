"""The deployment planner and the catalog's cycle finder: pure functions, driven with data.

Examples pin the documented behaviour (levels, teardown, volumes, the wiring environment);
hypothesis checks the order properties on random catalogs.
"""

from __future__ import annotations

import graphlib
import itertools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.catalog.model import (
    Catalog,
    CatalogEntry,
    DependencyCycle,
    HealthCheck,
    HealthCheckKind,
    Manifest,
    Reference,
    Transfer,
    TransferProtocol,
    UnknownReference,
)
from coordinator.catalog.validation import find_cycle
from coordinator.deployments.plan import PlanConflict, env_name, host_port, plan, preview, wiring

CHECK = HealthCheck(HealthCheckKind.TCP, port=1)


def _entry(name: str, version: str = "1", **deps: Transfer | tuple[str, Transfer]) -> CatalogEntry:
    """An entry requiring `deps` (name -> transfer, or name -> (reference, transfer))."""
    refs, transfers = [], {}
    for dep, spec in deps.items():
        dep_name = dep.replace("_", "-")
        ref, transfer = spec if isinstance(spec, tuple) else (dep_name, spec)
        refs.append(Reference.parse(ref))
        transfers[dep_name] = transfer
    return CatalogEntry(name, version, f"img/{name}:{version}", Manifest(tuple(refs), transfers, CHECK))


GRPC = Transfer(TransferProtocol.GRPC, port=50051)
HTTP = Transfer(TransferProtocol.HTTP, port=8080, path="/v1", scheme="http")
MQ = Transfer(TransferProtocol.MESSAGE_QUEUE, port=5672, scheme="amqp", queue="frames")


def _vol(path: str) -> Transfer:
    return Transfer(TransferProtocol.SHARED_VOLUME, path=path)


def _pipeline() -> Catalog:
    return Catalog(
        (
            _entry("queue"),
            _entry("detect", queue=MQ),
            _entry("render", detect=_vol("/shared/frames"), queue=MQ),
            _entry("transcode", render=HTTP),
        )
    )


def test_levels_teardown_volumes_of_a_pipeline() -> None:
    layout = plan(_pipeline(), "transcode")
    assert layout.levels == (("queue",), ("detect",), ("render",), ("transcode",))
    assert layout.teardown == (("transcode",), ("render",), ("detect",), ("queue",))
    assert [(v.name, v.provider, v.path, v.members) for v in layout.volumes] == [
        ("detect-1", "detect", "/shared/frames", ("detect", "render"))
    ]
    assert layout.colocated == (("detect", "render"),)
    assert layout.components["render"].requires == ("detect", "queue")
    assert layout.components["render"].level == 2
    # Only what the root needs: planning render leaves transcode out.
    assert set(plan(_pipeline(), "render").components) == {"queue", "detect", "render"}


def test_components_of_a_level_start_together() -> None:
    catalog = Catalog(
        (_entry("db"), _entry("cache"), _entry("api", db=GRPC, cache=GRPC), _entry("web", api=HTTP, cache=GRPC))
    )
    layout = plan(catalog, "web")
    assert layout.levels == (("cache", "db"), ("api",), ("web",))
    assert layout.teardown == (("web",), ("api",), ("cache", "db"))
    assert layout.volumes == () and layout.colocated == ()


def test_the_wiring_environment() -> None:
    layout = plan(_pipeline(), "transcode")
    env = wiring(
        layout,
        {"queue": "10.77.0.10", "detect": "10.77.0.11", "render": "10.77.0.12", "transcode": "fd00::13"},
        "dep-1",
    )
    assert env["render"] == {
        "FERRYMAN_COMPONENT": "render",
        "FERRYMAN_DEPLOYMENT": "dep-1",
        "FERRYMAN_SERVICE_HOST": "10.77.0.12",
        "FERRYMAN_DEPS": "detect,queue",
        "FERRYMAN_VOLUMES": "/shared/frames",
        "FERRYMAN_DEP_DETECT_PROTOCOL": "shared_volume",
        "FERRYMAN_DEP_DETECT_HOST": "10.77.0.11",
        "FERRYMAN_DEP_DETECT_VOLUME": "/shared/frames",
        "FERRYMAN_DEP_QUEUE_PROTOCOL": "message_queue",
        "FERRYMAN_DEP_QUEUE_HOST": "10.77.0.10",
        "FERRYMAN_DEP_QUEUE_PORT": "5672",
        "FERRYMAN_DEP_QUEUE_ADDR": "10.77.0.10:5672",
        "FERRYMAN_DEP_QUEUE_QUEUE": "frames",
        "FERRYMAN_DEP_QUEUE_URL": "amqp://10.77.0.10:5672/frames",
    }
    assert env["transcode"]["FERRYMAN_DEP_RENDER_URL"] == "http://10.77.0.12:8080/v1"
    assert env["transcode"]["FERRYMAN_SERVICE_HOST"] == "fd00::13"
    assert env["detect"]["FERRYMAN_VOLUMES"] == "/shared/frames"  # the provider learns its volume too
    assert env["queue"]["FERRYMAN_DEPS"] == "" and env["queue"]["FERRYMAN_VOLUMES"] == ""
    grpc = wiring(plan(Catalog((_entry("a"), _entry("b", a=GRPC))), "b"), {"a": "fd00::1", "b": "fd00::2"})
    assert grpc["b"]["FERRYMAN_DEP_A_ADDR"] == "[fd00::1]:50051"
    assert "FERRYMAN_DEP_A_URL" not in grpc["b"]
    with pytest.raises(ValueError, match="no service address for detect, queue"):
        wiring(layout, {"render": "10.0.0.1", "transcode": "10.0.0.2"})


def test_preview_stands_names_for_addresses() -> None:
    shown = preview(plan(_pipeline(), "transcode"))
    assert shown["environment"]["transcode"]["FERRYMAN_DEP_RENDER_URL"] == "http://<render>:8080/v1"
    assert shown["levels"] == [["queue"], ["detect"], ["render"], ["transcode"]]
    assert shown["components"]["render"]["id"] == "render@1"


def test_references_resolve_to_one_version_per_name() -> None:
    catalog = Catalog(
        (
            _entry("db", "1"),
            _entry("db", "2"),
            _entry("api", db=("db@1", GRPC)),
            _entry("web", api=HTTP, db=GRPC),  # "db" is the newest: 2
        )
    )
    assert plan(catalog, "api").components["db"].entry.version == "1"
    assert plan(catalog, "db").components["db"].entry.version == "2"
    assert plan(catalog, "db", "1").components["db"].entry.version == "1"
    with pytest.raises(
        PlanConflict,
        match=r"db would run at two versions in one deployment: db@2 \(web@1 requires db\) and db@1 "
        r"\(api@1 requires db@1\)",
    ):
        plan(catalog, "web")
    with pytest.raises(UnknownReference, match=r"no catalog entry db@3 \(registered versions of db: 1, 2\)"):
        plan(catalog, "db", "3")


def test_overlapping_volumes_in_one_container_conflict() -> None:
    catalog = Catalog(
        (
            _entry("a"),
            _entry("b"),
            _entry("c", a=_vol("/data")),
            _entry("d", b=_vol("/data/x"), c=GRPC),
        )
    )
    assert len(plan(catalog, "d").volumes) == 2
    clash = Catalog((*catalog.entries, _entry("e", a=_vol("/data/in")), _entry("f", c=GRPC, e=GRPC)))
    # a provides /data (to c) and /data/in (to e): both mounted in a, one inside the other.
    with pytest.raises(PlanConflict, match="a would mount two shared volumes at overlapping paths: /data"):
        plan(clash, "f")


def test_a_cycle_in_a_hand_made_catalog_is_reported() -> None:
    catalog = Catalog((_entry("a", b=GRPC), _entry("b", a=GRPC)))
    with pytest.raises(DependencyCycle):
        plan(catalog, "a")


def test_env_names_and_addresses() -> None:
    assert env_name("frames-queue") == "FRAMES_QUEUE"
    assert host_port("10.0.0.1", 80) == "10.0.0.1:80"
    assert host_port("::1", 80) == "[::1]:80"
    assert host_port("<render>", 80) == "<render>:80"


# ------------------------------------------------------------------ properties on random catalogs

_PROTOCOLS = [GRPC, HTTP, MQ]


@st.composite
def dags(draw: st.DrawFn) -> tuple[Catalog, str]:
    """A random acyclic catalog (n<i> may require only n<j> with j < i) and a root in it."""
    size = draw(st.integers(min_value=1, max_value=12))
    entries = []
    for i in range(size):
        deps = draw(st.sets(st.integers(min_value=0, max_value=i - 1), max_size=4)) if i else set()
        transfers: dict[str, Any] = {}
        for j in sorted(deps):
            if draw(st.booleans()) and draw(st.booleans()):
                # A path of its own per (provider, dependent): volumes never overlap here.
                transfers[f"n{j}"] = _vol(f"/v/n{j}/n{i}")
            else:
                transfers[f"n{j}"] = draw(st.sampled_from(_PROTOCOLS))
        entries.append(_entry(f"n{i}", **transfers))
    root = draw(st.integers(min_value=0, max_value=size - 1))
    return Catalog(tuple(entries)), f"n{root}"


def _reachable(catalog: Catalog, root: str) -> set[str]:
    seen, stack = set(), [root]
    while stack:
        name = stack.pop()
        if name not in seen:
            seen.add(name)
            stack += [r.name for r in catalog.resolve(Reference(name)).manifest.required_images]
    return seen


@settings(max_examples=200, deadline=None)
@given(dags())
def test_every_dependency_starts_in_an_earlier_level(case: tuple[Catalog, str]) -> None:
    catalog, root = case
    layout = plan(catalog, root)
    order = [name for level in layout.levels for name in level]
    assert sorted(order) == sorted(_reachable(catalog, root))  # each component once, nothing more
    assert layout.levels[-1] == (root,)  # nothing requires the root inside its own deployment
    for name, component in layout.components.items():
        assert all(layout.components[d].level < component.level for d in component.requires)
        # As early as possible: one level above its highest dependency.
        assert component.level == (1 + max((layout.components[d].level for d in component.requires), default=-1))
        assert name in layout.levels[component.level]
    assert layout.teardown == tuple(reversed(layout.levels))
    for volume in layout.volumes:
        assert any(set(volume.members) <= set(group) for group in layout.colocated)
    env = wiring(layout, {name: f"10.0.0.{i}" for i, name in enumerate(sorted(layout.components))})
    for name, component in layout.components.items():
        assert env[name]["FERRYMAN_DEPS"] == ",".join(component.requires)
        for dep in component.requires:
            assert env[name][f"FERRYMAN_DEP_{env_name(dep)}_HOST"] == env[dep]["FERRYMAN_SERVICE_HOST"]


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from("abcdefg"), st.sets(st.sampled_from("abcdefg"), max_size=3), max_size=7))
def test_find_cycle_names_a_real_cycle_exactly_when_there_is_one(graph: dict[str, set[str]]) -> None:
    try:
        graphlib.TopologicalSorter(graph).prepare()
        cyclic = False
    except graphlib.CycleError:
        cyclic = True
    cycle = find_cycle(graph, start="a")
    assert (cycle is not None) == cyclic
    if cycle is not None:
        assert cycle[0] == cycle[-1] and len(set(cycle[:-1])) == len(cycle) - 1
        assert all(b in graph.get(a, ()) for a, b in itertools.pairwise(cycle))  # along "requires" edges
        if "a" in cycle:
            assert cycle[0] == "a"
