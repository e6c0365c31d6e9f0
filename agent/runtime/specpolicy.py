"""What a migration target accepts as the runtime spec of a container it restores. Pure, no I/O.

The spec travels from the source agent, which is authenticated but not trusted: a compromised host
must not be able to choose the mounts, capabilities or namespaces of a container another host
creates. So the target accepts only a spec of the shape `spec.build_spec` makes: the default mounts
and the bind mounts of the shared volumes its labels name (their sources are replaced by the
target's own volume directories, agent/migration/target.py) and nothing else, capabilities within
the default set, no new privileges, every namespace new (the network one is replaced by the
target's own), the default masked and read-only paths kept, the devices cgroup denying all, and no
hooks, sysctls, devices or other keys the agent never writes.
Anything else is refused with `SpecRefused`, naming the field.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

from agent.runtime.spec import (
    DEFAULT_CAPABILITIES,
    DEFAULT_MASKED_PATHS,
    DEFAULT_MOUNTS,
    DEFAULT_READONLY_PATHS,
    NAMESPACES,
)
from core.errors import InvalidRequest

_TOP_KEYS = frozenset({"ociVersion", "process", "root", "hostname", "mounts", "linux", "annotations"})
_PROCESS_KEYS = frozenset(
    {"terminal", "user", "args", "env", "cwd", "capabilities", "rlimits", "noNewPrivileges", "consoleSize"}
)
_CAPABILITY_SETS = frozenset({"bounding", "effective", "permitted", "inheritable", "ambient"})
_ROOT_KEYS = frozenset({"path", "readonly"})
_LINUX_KEYS = frozenset({"resources", "cgroupsPath", "namespaces", "maskedPaths", "readonlyPaths"})
_RESOURCE_KEYS = frozenset({"devices", "cpu", "memory"})
_DENY_ALL_DEVICES = [{"allow": False, "access": "rwm"}]


class SpecRefused(InvalidRequest):
    """A migrated container's spec asks for more than the agent itself would give it."""

    code = "spec_refused"


def check_restorable_spec(spec: object, volumes: Collection[str] = ()) -> None:
    """Raise SpecRefused unless `spec` is one the agent could have created (see the module doc);
    `volumes`: the shared volumes the container mounts (its volumes label)."""
    top = _mapping(spec, "spec")
    _only(top, _TOP_KEYS, "spec")
    _check_process(_mapping(top.get("process"), "process"))
    root = _mapping(top.get("root"), "root")
    _only(root, _ROOT_KEYS, "root")
    if root.get("path") != "rootfs":
        raise SpecRefused(f"root.path must be 'rootfs' (the container's snapshot), got {root.get('path')!r}")
    _check_mounts(top.get("mounts"), volumes)
    _check_linux(_mapping(top.get("linux"), "linux"))
    annotations = top.get("annotations", {})
    if not isinstance(annotations, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()
    ):
        raise SpecRefused("annotations must be an object of strings")


def _check_process(process: Mapping[str, Any]) -> None:
    _only(process, _PROCESS_KEYS, "process")
    if process.get("noNewPrivileges") is not True:
        raise SpecRefused("process.noNewPrivileges must be true")
    if process.get("terminal", False) is not False:
        raise SpecRefused("process.terminal must be false")
    capabilities = _mapping(process.get("capabilities", {}), "process.capabilities")
    _only(capabilities, _CAPABILITY_SETS, "process.capabilities")
    allowed = set(DEFAULT_CAPABILITIES)
    for name, values in capabilities.items():
        if not isinstance(values, Sequence) or isinstance(values, str):
            raise SpecRefused(f"process.capabilities.{name} must be a list")
        added = sorted(str(v) for v in values if v not in allowed)
        if added:
            raise SpecRefused(f"process.capabilities.{name} adds {', '.join(added)}: beyond the default set")


def volume_mount_name(mount: object) -> str | None:
    """The shared volume a mount binds (the last part of its source, as `volumes.mounts` makes it),
    or None for any other mount."""
    if not isinstance(mount, Mapping) or set(mount) != {"destination", "type", "source", "options"}:
        return None
    if mount["type"] != "bind" or mount["options"] != ["rbind", "rw"]:
        return None
    destination, source = mount["destination"], mount["source"]
    if not isinstance(destination, str) or not destination.startswith("/") or not isinstance(source, str):
        return None
    return source.rstrip("/").rpartition("/")[2] or None


def _check_mounts(mounts: object, volumes: Collection[str]) -> None:
    if not isinstance(mounts, Sequence) or isinstance(mounts, str):
        raise SpecRefused("mounts must be a list")
    for index, mount in enumerate(mounts):
        if mount not in DEFAULT_MOUNTS and volume_mount_name(mount) not in volumes:
            where = mount.get("destination") if isinstance(mount, Mapping) else mount
            raise SpecRefused(f"mounts[{index}] ({where!r}) is not one the agent creates")


def _check_linux(linux: Mapping[str, Any]) -> None:
    _only(linux, _LINUX_KEYS, "linux")
    namespaces = linux.get("namespaces")
    if not isinstance(namespaces, Sequence) or not all(isinstance(ns, Mapping) for ns in namespaces):
        raise SpecRefused("linux.namespaces must be a list of objects")
    types = [ns.get("type") for ns in namespaces]
    if sorted(map(str, types)) != sorted(NAMESPACES):
        raise SpecRefused(f"linux.namespaces must be exactly {', '.join(NAMESPACES)} (new ones), got {types}")
    for ns in namespaces:
        _only(ns, frozenset({"type", "path"}), f"linux.namespaces[{ns.get('type')}]")
        if "path" in ns and ns.get("type") != "network":  # the target joins its own network namespace
            raise SpecRefused(f"linux.namespaces: the {ns.get('type')} namespace joins {ns['path']!r}")
    for key, required in (("maskedPaths", DEFAULT_MASKED_PATHS), ("readonlyPaths", DEFAULT_READONLY_PATHS)):
        paths = linux.get(key)
        if not isinstance(paths, Sequence) or isinstance(paths, str):
            raise SpecRefused(f"linux.{key} must be a list")
        missing = sorted(set(required) - set(paths))
        if missing:
            raise SpecRefused(f"linux.{key} lacks {', '.join(missing)}")
    resources = _mapping(linux.get("resources", {}), "linux.resources")
    _only(resources, _RESOURCE_KEYS, "linux.resources")
    if resources.get("devices", _DENY_ALL_DEVICES) != _DENY_ALL_DEVICES:
        raise SpecRefused("linux.resources.devices must deny all devices (runc adds its safe defaults)")


def _mapping(value: object, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise SpecRefused(f"{where} must be an object")
    return value


def _only(obj: Mapping[str, Any], allowed: frozenset[str], where: str) -> None:
    extra = sorted(str(k) for k in obj if k not in allowed)
    if extra:
        raise SpecRefused(f"{where} has {', '.join(extra)}, which the agent never sets")
