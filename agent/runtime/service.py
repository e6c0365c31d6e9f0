"""The container service: create, start, stop, delete and list containers through containerd.

containerd is the source of truth: everything we know about a container is in its containerd
record (labels included) or its task. Ferryman-managed containers carry the io.ferryman.* labels.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import shutil
import signal
import weakref
from collections import Counter
from pathlib import Path
from typing import Any, Protocol

from agent.checkpoint.criuconf import ANNOTATION as CRIU_ANNOTATION
from agent.checkpoint.criuconf import CriuConfigs
from agent.config import ContainerdConfig, RuntimeConfig
from agent.containerd import Containerd, ContainerRecord, ProcessInfo, TaskStatus
from agent.errors import ContainerdAlreadyExists, ContainerdNotFound, VolumeNotFound
from agent.health.spec import LABEL_HEALTH
from agent.images.local import read_image
from agent.images.service import ImageUses
from agent.model import (
    LABEL_CHECKPOINT,
    LABEL_EXIT_STATUS,
    LABEL_FINISHED_AT,
    LABEL_IMAGE,
    LABEL_LOG_PATH,
    LABEL_MANAGED,
    LABEL_OPERATOR_STOP,
    LABEL_PREFIX,
    LABEL_RESTART_COUNT,
    LABEL_RESTART_POLICY,
    LABEL_SERVICE_IP,
    LABEL_SERVICE_PUBLISH,
    LABEL_SIGNATURE,
    LABEL_STARTED_AT,
    LABEL_VOLUMES,
    ContainerState,
    ContainerSummary,
    CreateRequest,
    RestartName,
)
from agent.network import HELD, NetworkError, ServiceNetwork, parse_service_ip
from agent.oci import Platform
from agent.reservations import Admission, container_need
from agent.runtime import freezer
from agent.runtime.freezer import FreezerCgroup, FreezerError
from agent.runtime.restarts import ExitView, exit_view, policy_of, restart_count, restart_json, restart_labels
from agent.runtime.rootfs import read_snapshot_files
from agent.runtime.spec import build_spec
from agent.runtime.volumes import VolumeDirs
from agent.runtime.volumes import mounts as volume_bind_mounts
from core.errors import Conflict, ContainerNotFound, InvalidRequest
from core.ids import CONTAINER_ID_RE
from core.workloads import of_start

log = logging.getLogger(__name__)

PUBLISH_ON_START = "on-start"
PUBLISH_MANUAL = "manual"
_STATES = {
    TaskStatus.CREATED: ContainerState.CREATED,
    TaskStatus.RUNNING: ContainerState.RUNNING,
    TaskStatus.STOPPED: ContainerState.STOPPED,
    TaskStatus.PAUSED: ContainerState.PAUSED,
    TaskStatus.PAUSING: ContainerState.PAUSED,
}


class HealthReports(Protocol):
    """The health monitor's view of a container (agent.health.monitor.HealthMonitor.report)."""

    def report(self, container_id: str, labels: dict[str, str]) -> dict[str, Any] | None: ...


class ContainerService:
    def __init__(
        self,
        cd: Containerd,
        containerd: ContainerdConfig,
        runtime: RuntimeConfig,
        platform: Platform,
        network: ServiceNetwork | None = None,
        criu_configs: CriuConfigs | None = None,
        admission: Admission | None = None,
        volumes: VolumeDirs | None = None,
        checkpoints: Path | None = None,
    ) -> None:
        self._cd = cd
        self._containerd = containerd
        self._runtime = runtime
        self._platform = platform
        self.criu_configs = criu_configs
        """The CRIU option files this service writes (None: checkpoints use runc's defaults)."""
        self._admission = admission
        self.volumes = volumes
        """Where shared volumes live (None: requests with volumes are refused)."""
        """Refuses containers that would use capacity reserved by the coordinator (agent/reservations.py)."""
        # Containers with a service address get their own network namespace through this adapter.
        self.network = network if network is not None else ServiceNetwork(namespace=cd.namespace)
        self._creating: Counter[str] = Counter()
        self.checkpoints = checkpoints
        """Where checkpointed standbys keep their CRIU images (None: checkpoints are refused)."""
        self._frozen: dict[str, FreezerCgroup] = {}
        """Containers this agent froze (`freeze`) and has not thawed since, with their freezer cgroup."""
        self.uses: ImageUses | None = None
        """The layer cache, told that a container used its image (set by the agent)."""
        self.health: HealthReports | None = None
        """The health monitor, whose report inspect shows (set by the agent)."""
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        """One lock per container for start, stop, delete and the supervisor's restarts: a restart
        decided before an operator's stop must not run after it."""

    def _lock(self, container_id: str) -> asyncio.Lock:
        lock = self._locks.get(container_id)
        if lock is None:
            lock = self._locks[container_id] = asyncio.Lock()
        return lock

    def log_path(self, container_id: str) -> Path:
        return Path(self._runtime.log_dir, self._cd.namespace, f"{container_id}.log")

    async def create(self, req: CreateRequest) -> ContainerSummary:
        self._creating[req.image] += 1
        try:
            summary = await self._create(req)
        finally:
            self._creating[req.image] -= 1
            self._creating = +self._creating  # drop the names at 0
        if self.uses is not None:
            await self.uses.used(summary.image)
        return summary

    def creating(self) -> list[str]:
        """Images of containers being created: read, but not yet held by a container record."""
        return list(self._creating)

    async def _create(self, req: CreateRequest) -> ContainerSummary:
        if not CONTAINER_ID_RE.fullmatch(req.id):
            raise InvalidRequest(f"container id {req.id!r} must match {CONTAINER_ID_RE.pattern}")
        if any(k.startswith(LABEL_PREFIX) for k in req.labels):
            raise InvalidRequest(f"labels starting with {LABEL_PREFIX} are reserved")
        if self._admission is not None:  # before anything is made: a refusal leaves nothing behind
            await self._admission.admit(container_need(req.resources.cpus, req.resources.memory), req.reservation)
        image = await read_image(self._cd, req.image, self._platform)
        passwd = group = None
        # Names, and numeric uids without a gid, resolve through the image's own passwd and group.
        user = req.user or (image.config.get("config") or {}).get("User") or ""
        if user and not (":" in user and all(part.isdigit() for part in user.split(":"))):
            files = await read_snapshot_files(self._cd, image.chain_id, ["/etc/passwd", "/etc/group"])
            passwd, group = files["/etc/passwd"], files["/etc/group"]
        service_ip = parse_service_ip(req.service_ip) if req.service_ip is not None else None
        if service_ip is not None and req.publish_service:
            await self._check_service_ip_free(service_ip)
        volume_mounts: list[dict[str, Any]] = []
        if req.volumes:
            if self.volumes is None:
                raise InvalidRequest("body.volumes: this agent keeps no shared volumes")
            dirs = self.volumes
            sources = await asyncio.to_thread(lambda: [dirs.ensure(v.name) for v in req.volumes])
            volume_mounts = volume_bind_mounts(req.volumes, sources)
        spec = build_spec(
            image.config,
            req,
            cgroups_path=f"{self._runtime.cgroup_parent}/{self._cd.namespace}/{req.id}",
            passwd=passwd,
            group=group,
            # The path is derived from the id alone, so the namespace is made only once the record exists.
            netns_path=self.network.info(req.id).path if service_ip is not None else None,
            volume_mounts=volume_mounts,
        )
        if self.criu_configs is not None:  # so that checkpoints of it get ferryman's CRIU options
            criu_config = await asyncio.to_thread(self.criu_configs.write, req.id)
            spec.setdefault("annotations", {})[CRIU_ANNOTATION] = str(criu_config)
        labels = {
            **req.labels,
            LABEL_MANAGED: "true",
            LABEL_IMAGE: image.record.name,
            LABEL_LOG_PATH: str(self.log_path(req.id)),
            LABEL_SIGNATURE: req.signature or of_start(f"image:{req.image}", req.args or (), req.labels).id,
        }
        if service_ip is not None:
            labels[LABEL_SERVICE_IP] = service_ip
            labels[LABEL_SERVICE_PUBLISH] = PUBLISH_ON_START if req.publish_service else PUBLISH_MANUAL
        if req.restart_policy.name != RestartName.NO:
            labels[LABEL_RESTART_POLICY] = req.restart_policy.spelling
        if req.health is not None:
            labels[LABEL_HEALTH] = req.health.label()
        if req.volumes:
            labels[LABEL_VOLUMES] = ",".join(v.name for v in req.volumes)
        async with self._cd.leases.held("create", 300) as lease_id:
            cd = self._cd.leased(lease_id)
            try:  # containerd refuses a key in use: no round trip to ask first
                await cd.snapshots.prepare(req.id, image.chain_id)
            except ContainerdAlreadyExists as exc:
                raise Conflict(f"a snapshot named {req.id} already exists") from exc
            try:
                record = await cd.containers.create(
                    ContainerRecord(
                        id=req.id,
                        image=image.record.name,
                        labels=labels,
                        runtime=self._containerd.runtime,
                        spec=json.dumps(spec).encode(),
                        snapshotter=cd.snapshotter_name,
                        snapshot_key=req.id,
                    )
                )
            except BaseException:
                with contextlib.suppress(ContainerdNotFound):
                    await cd.snapshots.remove(req.id)
                raise
        if service_ip is not None:
            try:
                await self.network.prepare(req.id, service_ip)
            except BaseException:
                await self._undo_create(req.id)
                raise
        log.info("created container", extra={"container": req.id, "image": image.record.name})
        return _summary(record, None)

    async def start(self, container_id: str) -> ContainerSummary:
        """An operator's start: it ends an operator's stop, and the restart count starts over."""
        async with self._lock(container_id):
            return await self._start(container_id, {LABEL_OPERATOR_STOP: "", LABEL_RESTART_COUNT: ""})

    async def restart_exited(self, seen: ExitView) -> ContainerSummary | None:
        """The restart supervisor's start of a container whose run `seen` ended; None (nothing done)
        when the container changed since: deleted, stopped by an operator, or started again."""
        async with self._lock(seen.container_id):
            try:
                record = await self._get(seen.container_id)
            except ContainerNotFound:
                return None
            now = exit_view(seen.container_id, record.labels, await self._task(seen.container_id))
            if now is None or now.run != seen.run or now.operator_stopped:
                return None
            return await self._start(seen.container_id, restart_labels(seen, dt.datetime.now(dt.UTC)))

    async def _start(self, container_id: str, labels: dict[str, str]) -> ContainerSummary:
        # containerd's round trips at once where they do not depend on each other (every start pays them).
        record, task = await asyncio.gather(self._get(container_id), self._task(container_id))
        if task is not None:
            if task.status != TaskStatus.STOPPED:
                raise Conflict(f"container {container_id} is already {_STATES.get(task.status, 'active')}")
            await self._cd.tasks.delete(container_id)
        service_ip = record.labels.get(LABEL_SERVICE_IP)
        host_veth = ""
        if service_ip:
            # Idempotent: also recreates the namespace after a reboot emptied /run/netns.
            host_veth = await self._prepare_network(record, service_ip)
        log_file = self.log_path(container_id)
        log_file.parent.mkdir(parents=True, exist_ok=True)
        mounts = await self._cd.snapshots.mounts(record.snapshot_key)
        # A new run, named before its task exists: an exit the supervisor sees is then of this run.
        now = dt.datetime.now(dt.UTC).isoformat()
        record = await self._cd.containers.update_labels(
            container_id, {LABEL_EXIT_STATUS: "", LABEL_FINISHED_AT: "", **labels, LABEL_STARTED_AT: now}
        )
        uri = f"file://{log_file}"
        await self._cd.tasks.create(container_id, mounts, stdout=uri, stderr=uri, runc_root=self._containerd.runc_root)
        published_here: str | None = None  # the address this start published, undone if it fails
        try:
            if service_ip and record.labels.get(LABEL_SERVICE_PUBLISH, PUBLISH_ON_START) == PUBLISH_ON_START:
                # Before the task starts: its first packets leave from the address at once, and a
                # reply arriving before the route into the veth is forwarded back out of the uplink
                # (lost, or looping between hosts whose entries for a reused address point at each
                # other): the process would wait for TCP's 1 s SYN retransmission. Until it listens,
                # its kernel answers clients with a reset, so they retry at once.
                if await self.network.published(service_ip) is None:
                    published_here = service_ip
                await self.network.publish(service_ip, host_veth)
            await self._cd.tasks.start(container_id)
        except BaseException:
            if published_here is not None:
                with contextlib.suppress(NetworkError):
                    await self.network.unpublish(published_here)
            with contextlib.suppress(ContainerdNotFound):
                await self._cd.tasks.delete(container_id)
            raise
        log.info("started container", extra={"container": container_id})
        return _summary(record, await self._task(container_id))

    async def stop(self, container_id: str, timeout: float | None = None) -> ContainerSummary:  # noqa: ASYNC109
        """SIGTERM, then SIGKILL after `timeout`; the exit status is kept as a container label.

        An operator's stop: no restart policy brings the container back (see agent/runtime/restarts.py)."""
        async with self._lock(container_id):
            return await self._stop(container_id, timeout)

    async def _stop(self, container_id: str, timeout: float | None = None) -> ContainerSummary:  # noqa: ASYNC109
        await self._get(container_id)
        # Before the signal: the supervisor then sees an exit that an operator asked for.
        now = dt.datetime.now(dt.UTC).isoformat()
        record = await self._cd.containers.update_labels(container_id, {LABEL_OPERATOR_STOP: now})
        task = await self._task(container_id)
        if task is None:
            return _summary(record, None)
        grace = self._runtime.stop_timeout if timeout is None else timeout
        if task.status != TaskStatus.STOPPED:
            # A frozen task takes no signal: thawed first, it stops as any other does.
            frozen = self._frozen.pop(container_id, None)
            if frozen is None:
                await self._thaw_found(task)
            else:
                with contextlib.suppress(FreezerError):
                    await freezer.thaw(frozen)
            waiter = asyncio.create_task(self._cd.tasks.wait(container_id), name=f"wait-{container_id}")
            try:
                if grace > 0:
                    await self._cd.tasks.kill(container_id, signal.SIGTERM)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(waiter), grace)
                if not waiter.done():
                    log.info("container ignored SIGTERM, killing", extra={"container": container_id})
                    await self._cd.tasks.kill(container_id, signal.SIGKILL)
                await waiter
            finally:
                waiter.cancel()
        exit_status = await self._cd.tasks.delete(container_id)
        now = dt.datetime.now(dt.UTC).isoformat()
        record = await self._cd.containers.update_labels(
            container_id, {LABEL_EXIT_STATUS: str(exit_status), LABEL_FINISHED_AT: now}
        )
        log.info("stopped container", extra={"container": container_id, "exit_status": exit_status})
        return _summary(record, None)

    async def freeze(self, container_id: str) -> ContainerSummary:
        """Freeze a running container's processes (its cgroup freezer, written directly:
        agent/runtime/freezer.py): they keep their memory and sockets and get no CPU until `thaw`.
        A warm standby: thawing it is an activation without a start (docs/chains.md, "Warm
        standby"). containerd's task stays running; this agent reports the container `paused`."""
        async with self._lock(container_id):
            record = await self._get(container_id)
            task = await self._task(container_id)
            if task is None or task.status != TaskStatus.RUNNING or container_id in self._frozen:
                state = "created" if task is None else _STATES.get(task.status, ContainerState.UNKNOWN).value
                state = "paused" if container_id in self._frozen else state
                raise Conflict(f"container {container_id} is {state}; only a running container can be frozen")
            try:
                cgroup = await asyncio.to_thread(freezer.locate, task.pid)
            except FreezerError as exc:
                raise Conflict(f"container {container_id} cannot be frozen: {exc}") from exc
            self._frozen[container_id] = cgroup  # before the freeze: no probe of it counts from now on
            try:
                await freezer.freeze(cgroup)
            except BaseException:
                self._frozen.pop(container_id, None)
                raise
            log.info("froze container", extra={"container": container_id})
            return self._overlay(_summary(record, task))

    def frozen(self, container_id: str) -> bool:
        """Whether this agent froze the container (and has not thawed it): its health is not probed."""
        return container_id in self._frozen

    async def thaw(self, container_id: str) -> ContainerSummary:
        """Let a frozen container run again, where it stopped. The freezer is written first, before
        anything is asked of containerd: the container runs as soon as it can."""
        async with self._lock(container_id):
            cgroup = self._frozen.get(container_id)
            if cgroup is not None:
                await freezer.thaw(cgroup)
                del self._frozen[container_id]
                log.info("thawed container", extra={"container": container_id})
                return _summary(await self._get(container_id), await self._task(container_id))
            record = await self._get(container_id)
            task = await self._task(container_id)
            if task is not None and task.status == TaskStatus.PAUSED:  # paused through containerd
                await self._cd.tasks.resume(container_id)
            elif task is None or task.status != TaskStatus.RUNNING or not await self._thaw_found(task):
                state = "created" if task is None else _STATES.get(task.status, ContainerState.UNKNOWN).value
                raise Conflict(f"container {container_id} is {state}; only a frozen container can be thawed")
            log.info("thawed container", extra={"container": container_id})
            return _summary(record, await self._task(container_id))

    async def checkpoint(self, container_id: str) -> ContainerSummary:
        """Checkpoint a running container to this host's disk and end its task: a checkpointed warm
        standby (docs/chains.md). Its CRIU images stay under `checkpoints`, its record, rootfs and
        network namespace stay as they are, so `restore` brings the processes back where they were,
        listening sockets and memory included. No restart policy restarts it (an operator's stop)."""
        async with self._lock(container_id):
            if self.checkpoints is None:
                raise Conflict("this agent keeps no checkpoints (no state directory)")
            await self._get(container_id)
            task = await self._task(container_id)
            if task is None or task.status != TaskStatus.RUNNING or container_id in self._frozen:
                raise Conflict(f"container {container_id} is not running; only a running container can be checkpointed")
            images = self.checkpoints / container_id
            await asyncio.to_thread(shutil.rmtree, images, True)
            await asyncio.to_thread(images.mkdir, parents=True)
            now = dt.datetime.now(dt.UTC).isoformat()
            # Before the dump ends the task: the supervisor sees an exit an operator asked for.
            await self._cd.containers.update_labels(container_id, {LABEL_OPERATOR_STOP: now})
            try:
                await self._cd.tasks.checkpoint(container_id, str(images), leave_running=False)
            except BaseException:
                await self._cd.containers.update_labels(container_id, {LABEL_OPERATOR_STOP: ""})
                await asyncio.to_thread(shutil.rmtree, images, True)
                raise
            with contextlib.suppress(ContainerdNotFound):
                await self._cd.tasks.delete(container_id)
            record = await self._cd.containers.update_labels(container_id, {LABEL_CHECKPOINT: str(images)})
            log.info("checkpointed container", extra={"container": container_id, "images": str(images)})
            return _summary(record, None)

    async def restore(self, container_id: str) -> ContainerSummary:
        """Run a checkpointed container again from its images (CRIU restore through containerd);
        the images are deleted once it runs. Its address stays as it was (unpublished, for a standby)."""
        async with self._lock(container_id):
            record = await self._get(container_id)
            images = record.labels.get(LABEL_CHECKPOINT, "")
            if not images or not await asyncio.to_thread(Path(images).is_dir):
                raise Conflict(f"container {container_id} has no checkpoint to restore")
            task = await self._task(container_id)
            if task is not None:
                if task.status != TaskStatus.STOPPED:
                    raise Conflict(f"container {container_id} is running already")
                await self._cd.tasks.delete(container_id)
            service_ip = record.labels.get(LABEL_SERVICE_IP)
            if service_ip:
                await self._prepare_network(record, service_ip)
            mounts = await self._cd.snapshots.mounts(record.snapshot_key)
            uri = f"file://{self.log_path(container_id)}"
            now = dt.datetime.now(dt.UTC).isoformat()
            run_labels = {LABEL_OPERATOR_STOP: "", LABEL_EXIT_STATUS: "", LABEL_FINISHED_AT: "", LABEL_STARTED_AT: now}
            record = await self._cd.containers.update_labels(container_id, run_labels)
            await self._cd.tasks.create(
                container_id, mounts, stdout=uri, stderr=uri, runc_root=self._containerd.runc_root, restore_from=images
            )
            try:
                await self._cd.tasks.start(container_id)  # containerd restores at Start
            except BaseException:
                with contextlib.suppress(ContainerdNotFound):
                    await self._cd.tasks.delete(container_id)
                raise
            record = await self._cd.containers.update_labels(container_id, {LABEL_CHECKPOINT: ""})
            await asyncio.to_thread(shutil.rmtree, images, True)
            log.info("restored container", extra={"container": container_id})
            return _summary(record, await self._task(container_id))

    async def _thaw_found(self, task: ProcessInfo) -> bool:
        """Thaw the task's freezer cgroup if it is frozen (by an agent before a restart of it):
        whether it was. A frozen task takes no signal, so a stop thaws it first."""
        try:
            cgroup = await asyncio.to_thread(freezer.locate, task.pid)
            if not await asyncio.to_thread(freezer.is_frozen, cgroup):
                return False
            await freezer.thaw(cgroup)
        except FreezerError as exc:
            log.warning("freezer unreadable", extra={"container": task.container_id, "error": str(exc)})
            return False
        return True

    def _overlay(self, summary: ContainerSummary) -> ContainerSummary:
        """A container this agent froze shows as `paused` (containerd's task says running)."""
        if summary.id in self._frozen and summary.state is ContainerState.RUNNING:
            return dataclasses.replace(summary, state=ContainerState.PAUSED)
        return summary

    async def remove_volume(self, name: str) -> None:
        """Delete a shared volume: VolumeNotFound without it, Conflict while a container mounts it."""
        if self.volumes is None or not await asyncio.to_thread(self.volumes.exists, name):
            raise VolumeNotFound(f"no volume {name!r}")
        users = [c.id for c in await self.list() if name in c.labels.get(LABEL_VOLUMES, "").split(",")]
        if users:
            raise Conflict(f"volume {name} is mounted by {', '.join(sorted(users))}; delete those first")
        await asyncio.to_thread(self.volumes.remove, name)

    async def delete(self, container_id: str, force: bool = False) -> None:
        async with self._lock(container_id):
            await self._delete(container_id, force)

    async def _delete(self, container_id: str, force: bool) -> None:
        record = await self._get(container_id)
        task = await self._task(container_id)
        if task is not None and task.status != TaskStatus.STOPPED:
            if not force:
                raise Conflict(f"container {container_id} is running; stop it first or use force")
            await self._stop(container_id, timeout=0)
        elif task is not None:
            await self._cd.tasks.delete(container_id)
        service_ip = record.labels.get(LABEL_SERVICE_IP)
        if service_ip:
            # Before the record goes: a failure here leaves a container that a retried delete cleans up.
            # The route would die with the veth; unpublishing also drops the uplink's proxy ARP entry.
            if await self.network.published(service_ip) in (self.network.info(container_id).host_veth, HELD):
                await self.network.unpublish(service_ip)
            await self.network.destroy(container_id)
        await self._cd.containers.delete(container_id)
        with contextlib.suppress(ContainerdNotFound):
            await self._cd.snapshots.remove(record.snapshot_key)
        with contextlib.suppress(FileNotFoundError):
            self.log_path(container_id).unlink()
        if self.criu_configs is not None:
            self.criu_configs.remove(container_id)
        self._frozen.pop(container_id, None)
        if self.checkpoints is not None:
            await asyncio.to_thread(shutil.rmtree, self.checkpoints / container_id, True)
        log.info("deleted container", extra={"container": container_id})

    async def exit_view(self, container_id: str) -> ExitView | None:
        """The container's ended run (agent/runtime/restarts.py), None if it has none or is gone."""
        try:
            record = await self._cd.containers.get(container_id)
        except ContainerdNotFound:
            return None
        return exit_view(container_id, record.labels, await self._task(container_id))

    async def exit_views(self) -> dict[str, ExitView | None]:
        """Every managed container, with its ended run if it has one: what the supervisor re-reads
        for the exits whose events it missed."""
        records = await self._cd.containers.list([f'labels."{LABEL_MANAGED}"==true'])
        tasks = {t.container_id: t for t in await self._cd.tasks.list()}
        return {r.id: exit_view(r.id, r.labels, tasks.get(r.id)) for r in records}

    async def list(self) -> list[ContainerSummary]:
        records = await self._cd.containers.list([f'labels."{LABEL_MANAGED}"==true'])
        tasks = {t.container_id: t for t in await self._cd.tasks.list()}
        return [self._overlay(_summary(r, tasks.get(r.id))) for r in sorted(records, key=lambda r: r.id)]

    async def inspect(self, container_id: str) -> dict[str, Any]:
        record = await self._get(container_id)
        task = await self._task(container_id)
        out = self._overlay(_summary(record, task)).to_json()
        out["spec"] = json.loads(record.spec)
        out["snapshotter"] = record.snapshotter
        out["snapshot_key"] = record.snapshot_key
        out["runtime"] = record.runtime
        out["log_path"] = str(self.log_path(container_id))
        out["restart"] = restart_json(record.labels)
        out["health"] = self.health.report(container_id, record.labels) if self.health is not None else None
        service_ip = record.labels.get(LABEL_SERVICE_IP)
        if service_ip:
            info = self.network.info(container_id)
            out["network"] = {
                "service_ip": service_ip,
                "netns": info.path,
                "host_veth": info.host_veth,
                "published": await self.network.published(service_ip) == info.host_veth,
            }
        return out

    async def _check_service_ip_free(self, service_ip: str) -> None:
        """One published container per service address on a host: the /32 route points at one veth.

        A container created unpublished (`publish_service: false`) may share the address of one
        here: a standby copy, e.g. a chain's next stage on the same host (docs/chains.md). Each has
        the address in its own namespace; publishing one of them replaces the route, in one step."""
        for record in await self._cd.containers.list([f'labels."{LABEL_MANAGED}"==true']):
            if record.labels.get(LABEL_SERVICE_IP) == service_ip:
                raise Conflict(f"service address {service_ip} is already used by container {record.id}")

    async def _prepare_network(self, record: ContainerRecord, service_ip: str) -> str:
        """Prepare the container's namespace; the spec must join the one this host prepares."""
        info = self.network.info(record.id)
        joined = next(
            (
                ns.get("path")
                for ns in json.loads(record.spec).get("linux", {}).get("namespaces", [])
                if ns.get("type") == "network"
            ),
            None,
        )
        if joined != info.path:
            raise Conflict(
                f"container {record.id} joins network namespace {joined!r}, but this host prepares {info.path}"
            )
        await self.network.prepare(record.id, service_ip)
        return info.host_veth

    async def _undo_create(self, container_id: str) -> None:
        with contextlib.suppress(ContainerdNotFound):
            await self._cd.containers.delete(container_id)
        with contextlib.suppress(ContainerdNotFound):
            await self._cd.snapshots.remove(container_id)
        try:
            await self.network.destroy(container_id)
        except NetworkError:
            log.warning("could not remove the network of a failed create", extra={"container": container_id})

    async def _get(self, container_id: str) -> ContainerRecord:
        try:
            record = await self._cd.containers.get(container_id)
        except ContainerdNotFound as exc:
            raise ContainerNotFound(f"no container {container_id}") from exc
        if record.labels.get(LABEL_MANAGED) != "true":
            raise ContainerNotFound(f"container {container_id} is not managed by ferryman")
        return record

    async def _task(self, container_id: str) -> ProcessInfo | None:
        try:
            return await self._cd.tasks.get(container_id)
        except ContainerdNotFound:
            return None


def _summary(record: ContainerRecord, task: ProcessInfo | None) -> ContainerSummary:
    exit_status: int | None = None
    if task is not None:
        state = _STATES.get(task.status, ContainerState.UNKNOWN)
        pid = task.pid or None
        if task.status == TaskStatus.STOPPED:
            exit_status = task.exit_status
    elif LABEL_EXIT_STATUS in record.labels:
        state, pid, exit_status = ContainerState.STOPPED, None, int(record.labels[LABEL_EXIT_STATUS])
    else:
        state, pid = ContainerState.CREATED, None
    created = record.created_at.replace(tzinfo=dt.UTC).isoformat() if record.created_at else ""
    return ContainerSummary(
        id=record.id,
        image=record.image,
        state=state,
        pid=pid,
        exit_status=exit_status,
        labels=record.labels,
        created_at=created,
        restart_policy=policy_of(record.labels),
        restart_count=restart_count(record.labels),
    )
