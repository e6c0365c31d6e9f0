"""The deployment planner: a catalog and a root image in, the deployment's shape out. Data only.

`plan` resolves the root's dependencies from the catalog into one component per entry name,
orders them with stdlib graphlib into levels (level 0 needs nothing; every component starts after
all of its dependencies, the components of one level in parallel) and the reverse order for
teardown, and works out the shared volumes and which components must therefore share a host.
`wiring` computes each component's environment from the service addresses the components got:
the contract between the coordinator and the programs in the images (docs/deployments.md).

Resolution: `NAME@VERSION` means that entry, `NAME` the newest registration of NAME. A deployment
runs one component per name, so two references that resolve to different versions of one name
are a PlanConflict naming both; pin them alike to deploy.
"""

from __future__ import annotations

import graphlib
import ipaddress
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from coordinator.catalog.model import (
    Catalog,
    CatalogEntry,
    DependencyCycle,
    Reference,
    Transfer,
    TransferProtocol,
)
from core.errors import Conflict

ENV_PREFIX = "FERRYMAN_"


class PlanConflict(Conflict):
    """The root's dependencies cannot run together as one deployment (two versions of one name, two
    shared volumes at one path in one container)."""

    code = "deployment_plan_conflict"


@dataclass(frozen=True)
class Component:
    """One catalog entry in a deployment; its name is unique within the deployment."""

    name: str
    entry: CatalogEntry
    requires: tuple[str, ...]
    """The names of its required images, in manifest order."""
    level: int
    """Its start level: 0 for components that require nothing."""

    def transfer(self, dependency: str) -> Transfer:
        return self.entry.manifest.data_transfer_protocols[dependency]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "id": self.entry.id,
            "image": self.entry.image,
            "requires": list(self.requires),
            "level": self.level,
            "health_check": self.entry.manifest.dependency_health_check.to_dict(),
        }


@dataclass(frozen=True)
class SharedVolume:
    """A volume that a dependency shares with dependents over `shared_volume`: one per (provider,
    path); the agent creates it and every member mounts it at `path`."""

    name: str
    provider: str
    path: str
    members: tuple[str, ...]
    """The provider first, then its dependents that use the volume, by name."""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "provider": self.provider, "path": self.path, "members": list(self.members)}


@dataclass(frozen=True)
class DeploymentPlan:
    root: str
    components: Mapping[str, Component]
    levels: tuple[tuple[str, ...], ...]
    """Start order: each level after the one before it, the components of a level in parallel."""
    volumes: tuple[SharedVolume, ...] = ()
    colocated: tuple[tuple[str, ...], ...] = ()
    """Groups of components that must run on one host (they share volumes), each sorted."""

    @property
    def teardown(self) -> tuple[tuple[str, ...], ...]:
        """Stop order: the start order reversed, dependents before what they depend on."""
        return tuple(reversed(self.levels))

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "components": {n: c.to_dict() for n, c in sorted(self.components.items())},
            "levels": [list(level) for level in self.levels],
            "teardown": [list(level) for level in self.teardown],
            "volumes": [v.to_dict() for v in self.volumes],
            "colocated": [list(g) for g in self.colocated],
        }


def plan(catalog: Catalog, root: str, version: str | None = None) -> DeploymentPlan:
    """The plan for deploying `root` (its newest version, or `version`) as the catalog stands.

    UnknownReference when an entry is missing, DependencyCycle for a cycle (a catalog that the
    registration checks built has none), PlanConflict when the components cannot run together.
    """
    chosen = _resolve(catalog, Reference(root, version))
    graph = {name: {r.name for r in entry.manifest.required_images} for name, entry in chosen.items()}
    sorter = graphlib.TopologicalSorter(graph)
    try:
        sorter.prepare()
    except graphlib.CycleError as exc:
        cycle = [str(n) for n in exc.args[1]]
        raise DependencyCycle(f"the dependencies of {root} form a cycle: {' -> '.join(cycle)}", cycle) from None
    levels: list[tuple[str, ...]] = []
    while sorter.is_active():
        ready = tuple(sorted(sorter.get_ready()))
        levels.append(ready)
        sorter.done(*ready)
    level_of = {name: i for i, level in enumerate(levels) for name in level}
    components = {
        name: Component(
            name=name,
            entry=entry,
            requires=tuple(r.name for r in entry.manifest.required_images),
            level=level_of[name],
        )
        for name, entry in chosen.items()
    }
    volumes = _volumes(components)
    return DeploymentPlan(
        root=root,
        components=components,
        levels=tuple(levels),
        volumes=volumes,
        colocated=_colocated(volumes),
    )


def _resolve(catalog: Catalog, root: Reference) -> dict[str, CatalogEntry]:
    """name -> entry for the root and everything it needs, breadth first; one version per name."""
    first = catalog.resolve(root)
    chosen = {first.name: first}
    why = {first.name: f"the deployment asks for {root}"}
    queue = deque([first])
    while queue:
        entry = queue.popleft()
        for ref in entry.manifest.required_images:
            dep = catalog.resolve(ref)
            have = chosen.get(dep.name)
            if have is None:
                chosen[dep.name] = dep
                why[dep.name] = f"{entry.id} requires {ref}"
                queue.append(dep)
            elif have.version != dep.version:
                raise PlanConflict(
                    f"{dep.name} would run at two versions in one deployment: {have.id} ({why[dep.name]}) "
                    f"and {dep.id} ({entry.id} requires {ref}); require one version of it"
                )
    return chosen


def _volumes(components: Mapping[str, Component]) -> tuple[SharedVolume, ...]:
    members: dict[tuple[str, str], set[str]] = {}
    for name in sorted(components):
        component = components[name]
        for dep in component.requires:
            transfer = component.transfer(dep)
            if transfer.protocol is TransferProtocol.SHARED_VOLUME:
                members.setdefault((dep, transfer.path), set()).add(name)
    volumes = []
    numbers: dict[str, int] = {}
    for provider, path in sorted(members):
        numbers[provider] = numbers.get(provider, 0) + 1
        volumes.append(
            SharedVolume(
                name=f"{provider}-{numbers[provider]}",
                provider=provider,
                path=path,
                members=(provider, *sorted(members[(provider, path)])),
            )
        )
    mounts: dict[str, list[SharedVolume]] = {}
    for volume in volumes:
        for member in volume.members:
            mounts.setdefault(member, []).append(volume)
    for member, mounted in sorted(mounts.items()):
        for i, a in enumerate(mounted):
            for b in mounted[i + 1 :]:
                if _overlaps(a.path, b.path):
                    raise PlanConflict(
                        f"{member} would mount two shared volumes at overlapping paths: {a.path} (of {a.provider}) "
                        f"and {b.path} (of {b.provider}); give them distinct paths"
                    )
    return tuple(volumes)


def _overlaps(a: str, b: str) -> bool:
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def _colocated(volumes: tuple[SharedVolume, ...]) -> tuple[tuple[str, ...], ...]:
    """Union of the volumes' members: components joined by shared volumes, transitively."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for volume in volumes:
        for member in volume.members[1:]:
            parent[find(member)] = find(volume.members[0])
    groups: dict[str, list[str]] = {}
    for name in parent:
        groups.setdefault(find(name), []).append(name)
    return tuple(sorted(tuple(sorted(g)) for g in groups.values() if len(g) > 1))


# ----- wiring


def env_name(component: str) -> str:
    """A component name as it appears in variable names: `frame-queue` -> `FRAME_QUEUE`.

    Entry names are DNS labels (no '_'), so two names never map to one variable."""
    return component.upper().replace("-", "_")


def host_port(host: str, port: int) -> str:
    """`host:port`, with an IPv6 address in brackets."""
    try:
        bracket = ipaddress.ip_address(host).version == 6
    except ValueError:
        bracket = False
    return f"[{host}]:{port}" if bracket else f"{host}:{port}"


def wiring(layout: DeploymentPlan, addresses: Mapping[str, str], deployment: str = "") -> dict[str, dict[str, str]]:
    """component -> the environment it starts with, given every component's service address.

    For each component C and each dependency D (NAME = env_name(D)), docs/deployments.md:
      FERRYMAN_COMPONENT, FERRYMAN_DEPLOYMENT, FERRYMAN_SERVICE_HOST: C's own name, deployment, address
      FERRYMAN_DEPS: C's dependencies, comma-separated, in manifest order
      FERRYMAN_VOLUMES: the shared volume paths C mounts, comma-separated
      FERRYMAN_DEP_<NAME>_PROTOCOL, _HOST: always
      grpc: _PORT, _ADDR (host:port); http: also _URL (scheme://host:port/path);
      message_queue: _PORT, _ADDR, _QUEUE, _URL (scheme://host:port/queue); shared_volume: _VOLUME (path)
    """
    missing = sorted(set(layout.components) - set(addresses))
    if missing:
        raise ValueError(f"no service address for {', '.join(missing)}")
    mounted: dict[str, list[str]] = {}
    for volume in layout.volumes:
        for member in volume.members:
            mounted.setdefault(member, []).append(volume.path)
    out: dict[str, dict[str, str]] = {}
    for name, component in layout.components.items():
        env = {
            f"{ENV_PREFIX}COMPONENT": name,
            f"{ENV_PREFIX}DEPLOYMENT": deployment,
            f"{ENV_PREFIX}SERVICE_HOST": addresses[name],
            f"{ENV_PREFIX}DEPS": ",".join(component.requires),
            f"{ENV_PREFIX}VOLUMES": ",".join(sorted(mounted.get(name, ()))),
        }
        for dep in component.requires:
            env.update(dependency_env(dep, component.transfer(dep), addresses[dep]))
        out[name] = env
    return out


def dependency_env(dependency: str, transfer: Transfer, host: str) -> dict[str, str]:
    """The FERRYMAN_DEP_<NAME>_* variables for one dependency reached over `transfer` at `host`."""
    prefix = f"{ENV_PREFIX}DEP_{env_name(dependency)}_"
    env = {f"{prefix}PROTOCOL": transfer.protocol.value, f"{prefix}HOST": host}
    match transfer.protocol:
        case TransferProtocol.SHARED_VOLUME:
            env[f"{prefix}VOLUME"] = transfer.path
        case TransferProtocol.GRPC:
            env[f"{prefix}PORT"] = str(transfer.port)
            env[f"{prefix}ADDR"] = host_port(host, transfer.port)
        case TransferProtocol.HTTP:
            env[f"{prefix}PORT"] = str(transfer.port)
            env[f"{prefix}ADDR"] = host_port(host, transfer.port)
            env[f"{prefix}URL"] = f"{transfer.scheme}://{host_port(host, transfer.port)}{transfer.path}"
        case TransferProtocol.MESSAGE_QUEUE:
            env[f"{prefix}PORT"] = str(transfer.port)
            env[f"{prefix}ADDR"] = host_port(host, transfer.port)
            env[f"{prefix}QUEUE"] = transfer.queue
            env[f"{prefix}URL"] = f"{transfer.scheme}://{host_port(host, transfer.port)}/{transfer.queue}"
    return env


def preview(layout: DeploymentPlan) -> dict[str, Any]:
    """The plan as the API shows it, with each component's environment where `<name>` stands for
    the service address that component will get, and `<deployment>` for the deployment's id."""
    placeholders = {name: f"<{name}>" for name in layout.components}
    return {**layout.to_dict(), "environment": wiring(layout, placeholders, "<deployment>")}
