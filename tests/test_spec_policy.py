"""The migration target's spec policy: the spec a peer sends is restored only if the agent itself
could have made it (agent/runtime/specpolicy.py). Pure: no containerd, no peers."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.model import CreateRequest, Resources
from agent.runtime.spec import build_spec, set_network_namespace
from agent.runtime.specpolicy import SpecRefused, check_restorable_spec

IMAGE = {"config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]}}


def made_by_the_agent(**request: Any) -> dict[str, Any]:
    req = CreateRequest(id="web", image="r/app:1", resources=Resources(cpus=0.5, memory=64 << 20), **request)
    spec = build_spec(IMAGE, req, netns_path="/run/netns/fm-web")
    spec.setdefault("annotations", {})["ferryman.criu-config"] = "/var/lib/ferryman/criu/web.conf"
    return spec


def test_what_the_agent_makes_is_accepted() -> None:
    check_restorable_spec(made_by_the_agent())
    check_restorable_spec(made_by_the_agent(labels={"tier": "web"}, user="1000:1000", workdir="/srv"))
    moved = made_by_the_agent()
    set_network_namespace(moved, "/run/netns/elsewhere")  # what a target does before restoring
    check_restorable_spec(moved)


def _mutate(path: str, value: Any) -> dict[str, Any]:
    spec = made_by_the_agent()
    *parents, last = path.split(".")
    node = spec
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return spec


ATTACKS = [
    ("process.capabilities.bounding", ["CAP_SYS_ADMIN"], "CAP_SYS_ADMIN"),
    ("process.capabilities.ambient", ["CAP_NET_ADMIN"], "CAP_NET_ADMIN"),
    ("process.noNewPrivileges", False, "noNewPrivileges"),
    ("root.path", "/", "root.path"),
    ("hooks", {"prestart": [{"path": "/bin/sh"}]}, "hooks"),
    ("linux.sysctl", {"kernel.shm_rmid_forced": "1"}, "sysctl"),
    ("linux.devices", [{"path": "/dev/sda", "type": "b", "major": 8, "minor": 0}], "devices"),
    ("linux.resources.devices", [{"allow": True, "access": "rwm"}], "deny all"),
    ("linux.maskedPaths", [], "maskedPaths"),
    ("linux.readonlyPaths", ["/proc/bus"], "readonlyPaths"),
    ("linux.uidMappings", [{"containerID": 0, "hostID": 0, "size": 1}], "uidMappings"),
    ("process.apparmorProfile", "unconfined", "apparmorProfile"),
]


@pytest.mark.parametrize(("path", "value", "named"), ATTACKS, ids=[a[0] for a in ATTACKS])
def test_a_spec_asking_for_more_is_refused(path: str, value: Any, named: str) -> None:
    with pytest.raises(SpecRefused, match=named):
        check_restorable_spec(_mutate(path, value))


def test_host_mounts_and_namespaces_are_refused() -> None:
    spec = made_by_the_agent()
    spec["mounts"].append({"destination": "/host", "type": "bind", "source": "/", "options": ["rbind", "rw"]})
    with pytest.raises(SpecRefused, match="mounts"):
        check_restorable_spec(spec)
    for joined in ("pid", "mount", "ipc", "uts"):
        spec = made_by_the_agent()
        for ns in spec["linux"]["namespaces"]:
            if ns["type"] == joined:
                ns["path"] = "/proc/1/ns/" + joined
        with pytest.raises(SpecRefused, match=f"the {joined} namespace joins"):
            check_restorable_spec(spec)
    spec = made_by_the_agent()  # no pid entry at all: the host's pid namespace
    spec["linux"]["namespaces"] = [ns for ns in spec["linux"]["namespaces"] if ns["type"] != "pid"]
    with pytest.raises(SpecRefused, match="namespaces"):
        check_restorable_spec(spec)
    spec = made_by_the_agent()  # a default mount with an option removed (/proc without noexec)
    spec["mounts"][0] = {**spec["mounts"][0], "options": ["nosuid"]}
    with pytest.raises(SpecRefused, match="mounts"):
        check_restorable_spec(spec)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
KEYS = ["process", "root", "mounts", "linux", "annotations", "hostname", "hooks"]


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.sampled_from(KEYS), st.sampled_from(["", "capabilities", "namespaces", "resources", "x"]), JSON)
def test_any_spec_is_accepted_or_refused_with_a_reason(top: str, sub: str, value: Any) -> None:
    spec: Any = made_by_the_agent()
    if sub and isinstance(spec.get(top), dict):
        spec[top] = copy.deepcopy(spec[top])
        spec[top][sub] = value
    else:
        spec[top] = value
    try:
        check_restorable_spec(spec)
    except SpecRefused as exc:
        assert exc.message


@given(JSON)
@settings(max_examples=100, deadline=None, derandomize=True)
def test_not_even_an_object_is_refused(value: Any) -> None:
    if not isinstance(value, dict):
        with pytest.raises(SpecRefused):
            check_restorable_spec(value)
