"""The target side of a live migration.

It keeps every page the source sends, pulls the image while pre-copy runs, and on `restore` builds
the container: the image snapshot plus the source's rw layer, the source's spec adapted to this host,
and a task restored by CRIU from the received images. The restored task is paused until the source
decides (`commit`, or `resume` in post-copy); without that decision it is removed, so the workload
never runs twice.

In post-copy (lazy and hybrid modes) the restored task's anonymous memory is missing: a `criu
lazy-pages` daemon fills it through userfaultfd, asking the pager process, which asks us, which ask
the source. The task runs meanwhile (POSTCOPY); the migration commits once every page is here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.checkpoint.criuconf import ANNOTATION as CRIU_ANNOTATION
from agent.checkpoint.criuconf import LAZY_RESTORE, CriuConfigs
from agent.checkpoint.delta import PageStore
from agent.checkpoint.lazypages import (
    LazyPagesError,
    ensure_pipe_max_size,
    lazy_pages,
    spawn_daemon,
    wait_ready,
)
from agent.config import AgentConfig
from agent.containerd import Containerd, ContainerRecord
from agent.errors import ContainerdNotFound
from agent.images.local import read_image
from agent.images.service import ImageService
from agent.migration.blobs import PeerBlobs
from agent.migration.failpoints import Failpoints
from agent.migration.group import split_volumes, unpack_volume, volume_of_file
from agent.migration.journal import Journal
from agent.migration.link import IMAGE_BUNDLE, FileIn, Link, PagesIn, PeerReportedFailure, describe, unpack_files
from agent.migration.local import LABEL_MIGRATION, describe_failure, remove_container, resume_if_paused
from agent.migration.pagerproc import PostcopyPaths, spawn_pager
from agent.migration.protocol import (
    Commit,
    Committed,
    Container,
    Postcopy,
    Prepare,
    Prepared,
    PrepareOptions,
    ProtocolError,
    Ready,
    Restore,
    Restored,
    Resume,
    Resumed,
    Round,
    RwLayer,
    Stopcopy,
)
from agent.migration.ranges import PageRanges
from agent.migration.record import MigrationRecord
from agent.migration.relay import TargetRelay
from agent.migration.rootfs import RW_LAYER_FILE, import_rw_layer
from agent.migration.states import Event, State
from agent.model import LABEL_LOG_PATH, LABEL_PREFIX, LABEL_SERVICE_IP, LABEL_VOLUMES
from agent.network import NetnsInfo, ServiceNetwork
from agent.oci import Platform
from agent.reservations import ReservationBook, container_need
from agent.runtime.spec import set_network_namespace
from agent.runtime.specpolicy import volume_mount_name
from agent.runtime.volumes import VolumeDirs
from core.errors import AlreadyExists, FerrymanError, InvalidRequest
from core.files import confined

log = logging.getLogger(__name__)

LABEL_MIGRATED_FROM = LABEL_PREFIX + "migrated-from"


def incoming_marker(dirs: VolumeDirs, name: str) -> Path:
    """Present while a volume that came with a group migration is not committed here yet."""
    return dirs.root / f".incoming-{name}"


class InsufficientSpace(FerrymanError):
    code = "insufficient_space"
    http_status = 507


@dataclass
class TargetContext:
    config: AgentConfig
    cd: Containerd
    journal: Journal
    failpoints: Failpoints
    platform: Platform
    images: ImageService
    log_path: Callable[[str], Path]
    criu_configs: CriuConfigs
    """Per-container CRIU config files (tcp-established and friends) runc passes to restore."""
    publish: Callable[[MigrationRecord], None]
    network: ServiceNetwork
    connect: Callable[[str, str], Awaitable[Link]]
    """A new session to the source (host, migration id): post-copy reconnects after a cut link."""
    admission: ReservationBook | None = None
    """Reservations on this host: a migration may not eat capacity reserved for someone else."""
    criu_version: str = ""
    """This host's CRIU version, told to sources of protocol 2 in `prepared`."""
    volumes: VolumeDirs | None = None
    """This host's shared volumes: a volume group's members mount them here (group.py)."""


class TargetMigration:
    def __init__(self, ctx: TargetContext, record: MigrationRecord, prepare: Prepare) -> None:
        self.ctx = ctx
        self.record = record
        self.prepare_msg = prepare
        self.container = prepare.container
        self.work = confined(ctx.config.migration.work_dir, record.id)
        self.images_dir = self.work / "images"
        self.store = PageStore(self.work / "pagestore")
        self._lease: str | None = None
        self.service_ip: str | None = self.container.labels.get(LABEL_SERVICE_IP)
        self._netns: NetnsInfo | None = None
        self.paths = PostcopyPaths(self.work)
        self.lazy = False
        self._keep_work = False
        self._relay: TargetRelay | None = None
        self._traffic: asyncio.Task[None] | None = None
        self._pager: subprocess.Popen[bytes] | None = None
        self._pausing: asyncio.Task[None] | None = None
        """post-copy: the restored task's provisional pause, under way while the source decides."""
        self._daemon: subprocess.Popen[bytes] | None = None
        self._daemon_end: socket.socket | None = None
        self._link: Link | None = None
        self._remote = record.stats.pages_remote  # after a restart: where the journal left it
        self._published_at = 0.0
        self._pull: asyncio.Task[Any] | None = None
        self._rw_digest: str | None = None
        self._build: asyncio.Task[None] | None = None
        """Container record and rootfs, built as soon as the rw layer arrives (overlaps the source's dump)."""

    def _prepared(self) -> Prepared:
        """The answer to `prepare`, in the protocol the source chose (protocol 2 adds our CRIU version)."""
        protocol = self.prepare_msg.protocol
        if protocol < 2:
            return Prepared()
        return Prepared(protocol=protocol, criu=self.ctx.criu_version)

    async def _save(self, record: MigrationRecord) -> None:
        self.record = record
        await self.ctx.journal.write(record)
        self.ctx.publish(record)

    async def _advance(self, event: Event, error: str | None = None) -> None:
        await self._save(self.record.advance(event, error))
        log.info("migration state", extra={"migration": self.record.id, "state": self.record.state.value})

    async def run(self, link: Link) -> MigrationRecord:
        await self._save(self.record)
        self._link = link
        link.follow("target", lambda: self.record.state)
        pull: asyncio.Task[Any] | None = None
        try:
            async with asyncio.timeout(self.ctx.config.migration.phase_timeout):
                await self._check_room(self.prepare_msg.estimated_bytes)
                await self._admit()
                if self.prepare_msg.options.mode in ("lazy", "hybrid"):
                    await asyncio.to_thread(ensure_pipe_max_size)  # fail in PREPARE, not after the freeze
                    await self._start_pager()
                self._lease = await self.ctx.cd.leases.create("migration", self.ctx.config.migration.phase_timeout)
                if self.service_ip:  # the same address, in a namespace of this host, unpublished until commit
                    self._netns = await self.ctx.network.prepare(self.container.id, self.service_ip)
                pull = self._pull = asyncio.create_task(self._fetch_image(), name="migration-image")
                await link.send(self._prepared())
                await self._advance(Event.PREPARED)
                rw_digest = await self._receive(link)
                await self._place_volumes()
                await self._advance(Event.IMAGES_SENT)
                await pull
                restore_ms = await self._restore(rw_digest)
                stats = self.record.stats
                await link.send(
                    Restored(restore_ms=round(restore_ms, 1), image_ms=stats.image_ms, image_from=stats.image_from)
                )
            if self.lazy:
                await self._await_resume(link)
                await link.send(Resumed())
                await self.finish_postcopy(link)
            else:
                await self._await_decision(link)
        except DecisionPending:
            await self._settle_pause()
            self._keep_work = self.lazy  # the daemon and the pager still use it
            raise  # the restored copy stays, paused: the service asks the source what it decided
        except BaseException as exc:
            await self._settle_pause()
            for task in (pull, self._build):
                if task is not None and not task.done():
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            if isinstance(exc, asyncio.CancelledError) and self.record.state == State.POSTCOPY:
                # The agent is stopping: the pager and the daemon carry on, the next agent takes over.
                self._keep_work = True
                raise
            if self.record.state not in (State.SWITCH, State.COMMIT):
                await (self._link or link).fail(describe_failure(exc))
                await self.rollback(describe_failure(exc))
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            await link.close()
            if self._link is not None and self._link is not link:
                await self._link.close()
            self.store.close()
            if not self._keep_work:
                await self._stop_postcopy_helpers()
                shutil.rmtree(self.work, ignore_errors=True)
        return self.record

    async def _fetch_image(self) -> None:
        """The container's image, while pre-copy runs: this host's copy, else the source's blobs (a
        `blobs` session, blobs.py), else the registry (ImageService.ensure says why in that order)."""
        image = self.container.image
        started = time.monotonic()
        peer = PeerBlobs(
            lambda: self.ctx.connect(self.record.peer, self.record.id),
            self.record.id,
            self.ctx.config.pull.max_manifest_bytes,
        )
        try:
            try:
                target = await peer.image()
            except (FerrymanError, OSError, TimeoutError) as exc:  # a source from before `blobs` sessions
                log.warning("the source names no image digest, pulling", extra={"image": image, "error": str(exc)})
                await self.ctx.images.pull(image)
                origin = "registry"
            else:
                origin = await self.ctx.images.ensure(image, target, peer)
        finally:
            await peer.close()
        image_ms = round((time.monotonic() - started) * 1000, 1)
        await self._save(self.record.with_stats(image_ms=image_ms, image_from=origin))
        log.info(
            "image ready",
            extra={
                "migration": self.record.id,
                "image": image,
                "from": origin,
                "blobs": peer.blobs,
                "bytes": peer.bytes,
                "ms": image_ms,
            },
        )

    async def _check_room(self, needed: int) -> None:
        self.images_dir.mkdir(parents=True, exist_ok=True)
        fs = os.statvfs(self.images_dir)
        free = fs.f_bavail * fs.f_frsize
        # Pages plus the other images and the rw layer: keep a margin over the resident size.
        if needed and free < needed * 1.2 + (16 << 20):
            raise InsufficientSpace(
                f"{self.ctx.config.migration.work_dir} has {free >> 20} MiB free, the images need about "
                f"{needed >> 20} MiB"
            )
        if await self._container_exists(self.container.id):
            raise AlreadyExists(f"container {self.container.id} already exists on this host")

    @property
    def reservation(self) -> str:
        return self.prepare_msg.options.reservation

    async def _admit(self) -> None:
        """Charge the container's limits (or its resident size) to the coordinator's reservation, if any."""
        if self.ctx.admission is None:
            return
        resources = (self.container.spec.get("linux") or {}).get("resources") or {}
        memory = int((resources.get("memory") or {}).get("limit") or 0)
        memory = memory or self.prepare_msg.estimated_bytes
        cpu = resources.get("cpu") or {}
        cpus = cpu["quota"] / cpu["period"] if cpu.get("quota") and cpu.get("period") else None
        await self.ctx.admission.admit(container_need(cpus, memory), self.reservation or None)

    async def _release_reservation(self) -> None:
        if self.ctx.admission is not None and self.reservation:
            await self.ctx.admission.release(self.reservation)

    async def _container_exists(self, container_id: str) -> bool:
        try:
            await self.ctx.cd.containers.get(container_id)
        except ContainerdNotFound:
            return False
        return True

    async def _receive(self, link: Link) -> str:
        """Pages and files until `restore`; returns the rw layer's digest."""
        while True:
            msg = await link.recv()
            if isinstance(msg, PagesIn):
                for pagemap, vaddrs, data, zeros in link.split_pages(msg):
                    await asyncio.to_thread(self.store.add, pagemap, vaddrs, data, zeros)
            elif isinstance(msg, FileIn) and msg.name == IMAGE_BUNDLE:
                await asyncio.to_thread(unpack_files, msg.path, self.images_dir)
            elif isinstance(msg, FileIn):
                dest = self.images_dir / msg.name
                if msg.path != dest:
                    shutil.move(msg.path, dest)
                if msg.name == RW_LAYER_FILE and self._rw_digest and self._build is None:
                    self._build = asyncio.create_task(self._build_container(self._rw_digest), name="migration-build")
            elif isinstance(msg, RwLayer):
                self._rw_digest = msg.digest
            elif isinstance(msg, Round):
                self.record = self.record.with_stats(iterations=msg.number)
                self.ctx.publish(self.record)
                await self.ctx.failpoints.hit("target.precopy")
            elif isinstance(msg, Stopcopy):
                self.lazy = msg.lazy
                await self._advance(Event.CONVERGED)
                await self.ctx.failpoints.hit("target.stopcopy")
                await self._ready(link)
            elif isinstance(msg, Restore):
                return msg.rw_digest
            else:
                raise ProtocolError(
                    "'round', 'stopcopy', 'rw_layer' or 'restore' while receiving images", describe(msg)
                )

    async def _ready(self, link: Link) -> None:
        """The source freezes only after this: the image pull and the pager's start-up (a Python
        process) are done here first, so neither waits inside the downtime nor takes CPU from the
        dump (on hosts that share it)."""
        if self._pull is not None:
            await self._pull
        if self._relay is not None:
            async with asyncio.timeout(self.ctx.config.migration.idle_timeout):
                await self._relay.connected.wait()
        await link.send(Ready())

    def _spec_for_here(self) -> bytes:
        spec = dict(self.container.spec)
        linux = dict(spec.get("linux") or {})
        ns, cid = self.ctx.cd.namespace, self.container.id
        linux["cgroupsPath"] = f"{self.ctx.config.runtime.cgroup_parent}/{ns}/{cid}"
        spec["linux"] = linux
        annotations = dict(spec.get("annotations") or {})
        annotations[CRIU_ANNOTATION] = str(self.ctx.criu_configs.path(self.container.id))
        spec["annotations"] = annotations
        if self._netns is not None:
            set_network_namespace(spec, self._netns.path)  # CRIU restores into this host's namespace
        if self.volume_names:
            # The source's paths mean nothing here: each volume bind-mounts this host's directory of it.
            spec["mounts"] = [self._mount_here(m) for m in spec.get("mounts") or []]
        return json.dumps(spec).encode()

    @property
    def volume_names(self) -> set[str]:
        return split_volumes(self.container.labels.get(LABEL_VOLUMES, ""))

    def _mount_here(self, mount: dict[str, Any]) -> dict[str, Any]:
        name = volume_mount_name(mount)
        if name is None or name not in self.volume_names:
            return mount
        return {**mount, "source": str(self._volume_dirs().path(name))}

    def _volume_dirs(self) -> VolumeDirs:
        if self.ctx.volumes is None:
            raise InvalidRequest(f"container {self.container.id} mounts shared volumes; this agent keeps none")
        return self.ctx.volumes

    async def _place_volumes(self) -> None:
        """Unpack the volumes the carrier of a volume group sent (group.py) into this host's volume
        directories, before any member restores. A marker says the volume came with this migration:
        a rollback removes it with the last member that mounts it (`_drop_received_volumes`)."""
        for tar_path in sorted(self.images_dir.iterdir()):
            name = volume_of_file(tar_path.name)
            if name is None:
                continue
            if name not in self.volume_names:
                raise ProtocolError(f"a volume {self.container.id} mounts", f"volume {name!r}")
            dirs = self._volume_dirs()
            directory = dirs.path(name)
            if directory.exists() and any(directory.iterdir()):
                raise AlreadyExists(f"volume {name} already exists on this host with other contents")
            await asyncio.to_thread(dirs.root.mkdir, parents=True, exist_ok=True)
            await asyncio.to_thread(incoming_marker(dirs, name).write_text, self.record.id)
            await asyncio.to_thread(unpack_volume, tar_path, directory)
            tar_path.unlink()
            log.info("volume received", extra={"migration": self.record.id, "volume": name})

    async def _drop_received_volumes(self) -> None:
        """After a rollback: the volumes a group migration brought here go, once no container mounts them."""
        if not self.volume_names or self.ctx.volumes is None:
            return
        dirs = self.ctx.volumes
        mounted = {
            v for c in await self.ctx.cd.containers.list() for v in split_volumes(c.labels.get(LABEL_VOLUMES, ""))
        }
        for name in sorted(self.volume_names - mounted):
            marker = incoming_marker(dirs, name)
            if marker.exists():
                await asyncio.to_thread(dirs.remove, name)
                marker.unlink(missing_ok=True)
                log.info("received volume removed", extra={"migration": self.record.id, "volume": name})

    def _keep_received_volumes(self) -> None:
        """Committed: the volumes are this host's now."""
        if self.ctx.volumes is not None:
            for name in self.volume_names:
                incoming_marker(self.ctx.volumes, name).unlink(missing_ok=True)

    async def _restore(self, rw_digest: str) -> float:
        cid = self.container.id
        started = time.monotonic()
        if self.lazy:
            await self._start_postcopy_helpers()
            assert self._link is not None and self._relay is not None
            # The restore itself faults pages in (the restorer writes to the task's stack): relay from now on.
            self._traffic = asyncio.create_task(
                self._relay.relay(self._link, within=self.ctx.config.migration.idle_timeout), name="postcopy-relay"
            )
        else:
            await asyncio.to_thread(self.store.write_pages_files, self.images_dir)
        log.info(
            "images ready",
            extra={"migration": self.record.id, "ms": round((time.monotonic() - started) * 1000, 1), "lazy": self.lazy},
        )
        if self.ctx.failpoints.action("target.corrupt_images") == "corrupt":
            for core in self.images_dir.glob("core-*.img"):
                core.write_bytes(b"\0" * 16)  # CRIU itself must then refuse the images
        await self.ctx.failpoints.hit("target.restore")
        if self._build is None:
            self._build = asyncio.create_task(self._build_container(rw_digest), name="migration-build")
        await self._build
        assert self._lease is not None
        cd = self.ctx.cd.leased(self._lease)
        await asyncio.to_thread(self.ctx.criu_configs.write, cid, LAZY_RESTORE if self.lazy else "")
        started = time.monotonic()
        try:
            if self.lazy:
                assert self._daemon is not None
                await wait_ready(self._daemon, self.paths.criu_work)  # CRIU's restore hands it the memory
            pid = await cd.tasks.start(cid)  # containerd restores at Start: Create knows no pid yet
            if self.lazy:  # the pager kills exactly this process tree if the pages cannot come
                await asyncio.to_thread(self.paths.pid_file.write_text, str(pid))
                # Provisional until the source decides. The pause goes on while `restored` travels:
                # the freezer waits for the task's first page faults (35-45 ms measured), too long
                # to sit in front of the decision.
                self._pausing = asyncio.create_task(cd.tasks.pause(cid), name="provisional-pause")
            else:
                await cd.tasks.pause(cid)  # provisional until the source decides
        finally:
            await asyncio.to_thread(self.ctx.criu_configs.write, cid)  # its later dumps are ordinary
        restore_ms = (time.monotonic() - started) * 1000
        await self._save(self.record.with_stats(restore_ms=round(restore_ms, 1)))
        await self.ctx.failpoints.hit("target.restored")
        return restore_ms

    async def _await_decision(self, link: Link) -> None:
        try:
            await link.expect(Commit)
        except (TimeoutError, OSError, FerrymanError) as exc:
            # We cannot tell whether the source decided: stay paused, the service asks the source.
            log.warning("no decision from the source yet", extra={"migration": self.record.id, "error": str(exc)})
            raise DecisionPending(self.record) from exc
        await self.commit()
        await link.send(Committed())

    async def _build_container(self, rw_digest: str) -> None:
        """The image snapshot plus the source's rw layer, the container record and its task.

        The task is created as soon as the rw layer is here, while the source may still be dumping:
        containerd 1.6 restores only at Start (runc reads the images then), and creating the shim and
        bundle is ~12 ms that no longer sit in the downtime."""
        cid = self.container.id
        if self._pull is not None:
            await self._pull
        assert self._lease is not None
        cd = self.ctx.cd.leased(self._lease)
        image = await read_image(self.ctx.cd, self.container.image, self.ctx.platform)
        rw_data = await asyncio.to_thread((self.images_dir / RW_LAYER_FILE).read_bytes)
        await import_rw_layer(cd, cid, image.chain_id, rw_data, rw_digest)
        log_file = self.ctx.log_path(cid)
        labels = dict(self.container.labels)
        labels[LABEL_LOG_PATH] = str(log_file)
        labels[LABEL_MIGRATED_FROM] = self.record.peer
        labels[LABEL_MIGRATION] = self.record.id
        await cd.containers.create(
            ContainerRecord(
                id=cid,
                image=self.container.image,
                labels=labels,
                runtime=self.container.runtime,
                spec=self._spec_for_here(),
                snapshotter=cd.snapshotter_name,
                snapshot_key=cid,
            )
        )
        await asyncio.to_thread(log_file.parent.mkdir, parents=True, exist_ok=True)
        uri = f"file://{log_file}"
        await cd.tasks.create(
            cid,
            list(await cd.snapshots.mounts(cid)),
            stdout=uri,
            stderr=uri,
            runc_root=self.ctx.config.containerd.runc_root,
            restore_from=str(self.images_dir),
            criu_work_dir=str(self.paths.criu_work),
        )

    # ----- post-copy ---------------------------------------------------------------------------------

    async def _start_pager(self) -> None:
        """The relay's socket and the pager, ahead of time (a Python start-up is not free)."""
        self.work.mkdir(parents=True, exist_ok=True)
        self._relay = TargetRelay(self.paths, self._on_pages)
        await self._relay.listen()
        self._pager, self._daemon_end = spawn_pager(self.paths, self.ctx.config.migration.postcopy_reconnect_timeout)

    async def _start_postcopy_helpers(self) -> None:
        await asyncio.to_thread(ensure_pipe_max_size)
        total = await asyncio.to_thread(lazy_pages, self.images_dir)
        self.record = self.record.with_stats(lazy_pages=total, pages_remote=total)
        self._remote = total
        if self._pager is None:
            await self._start_pager()
        assert self._relay is not None and self._daemon_end is not None
        self._relay.read_local = self.store.read_run if len(self.store) else None  # hybrid: pre-copied pages
        self._relay.pushed = PageRanges()
        try:
            idle_class = self.ctx.config.migration.lazy_daemon_idle_class
            self._daemon = spawn_daemon(self.paths.images, self.paths.criu_work, self._daemon_end, idle_class)
        finally:
            self._daemon_end.close()
            self._daemon_end = None
        # Not ready yet: the restore waits for it (_restore), container creation does not.

    def _on_pages(self, count: int) -> None:
        self._remote = max(self._remote - count, 0)
        now = time.monotonic()
        if now - self._published_at > 0.1 or not self._remote:  # progress, not a record per page fault
            self._published_at = now
            self.record = self.record.with_stats(pages_remote=self._remote)
            self.ctx.publish(self.record)

    async def _await_resume(self, link: Link) -> None:
        assert self._relay is not None and self._traffic is not None
        try:
            await self._relay.expect(Resume, self._traffic, link)
        except PeerReportedFailure:
            raise
        except (TimeoutError, OSError, FerrymanError) as exc:
            log.warning("no decision from the source yet", extra={"migration": self.record.id, "error": str(exc)})
            raise DecisionPending(self.record) from exc
        await self._resume_postcopy()

    async def _resume_postcopy(self) -> None:
        """The decision: run the restored task with its pages still arriving."""
        paused = await self._settle_pause()
        await self._publish_address()  # first: see there
        if paused:
            await self.ctx.cd.tasks.resume(self.container.id)
        self._resumed_at = time.monotonic()
        await self._advance(Event.LAZY_RESTORED)

    async def _settle_pause(self) -> bool:
        """Wait for the provisional pause: False if it failed (the task runs, nothing to resume)."""
        pausing, self._pausing = self._pausing, None
        if pausing is None:
            return True
        try:
            await pausing
        except FerrymanError as exc:
            log.warning("provisional pause failed", extra={"migration": self.record.id, "error": str(exc)})
            return False
        return True

    async def finish_postcopy(self, link: Link | None) -> None:
        """Relay pages until the daemon has them all, reconnecting as needed; then commit."""
        if self._relay is None:  # after an agent restart: the pager is still there, and reconnects
            self._relay = TargetRelay(self.paths, self._on_pages)
            await self._relay.listen()
        timeout = self.ctx.config.migration.postcopy_reconnect_timeout
        started = time.monotonic()
        try:
            while True:
                if self._traffic is None:
                    if link is None:
                        link = await self._reconnect(within=timeout)
                    self._link = link
                    self._traffic = asyncio.create_task(self._relay.relay(link, within=timeout), name="postcopy-relay")
                try:
                    await self._traffic
                    break
                except PeerReportedFailure:
                    raise
                except (TimeoutError, OSError, FerrymanError) as exc:
                    if (failure := await self._pager_failure()) is not None:
                        raise LazyPagesError(f"post-copy failed on this host: {failure}") from exc
                    log.warning(
                        "post-copy link lost, reconnecting",
                        extra={"migration": self.record.id, "error": describe_failure(exc)},
                    )
                    if link is not None:
                        await link.close()
                    link = None
                    self._traffic = None
            assert link is not None
            await self._pager_result(within=timeout)
            self.record = self.record.with_stats(
                pages_remote=0, postcopy_ms=round((time.monotonic() - started) * 1000, 1)
            )
        finally:
            await self._relay.close()
        # Every page is here, so the source has answered its daemon's close: from now on it can only
        # commit, or keep its frozen copy for an operator. Ours is the workload, whatever the link does.
        await self._advance(Event.PAGES_COMPLETE)
        heard = await self._commit_heard(link)
        await self._own_workload()
        if heard:
            await link.send(Committed())

    async def _commit_heard(self, link: Link) -> bool:
        """Whether the source's `commit` came over this link. If the link fails first we commit all the
        same: the source resends its decision (`resolve`) until we confirm it."""
        try:
            await link.expect(Commit)
            return True
        except (TimeoutError, OSError, FerrymanError) as exc:
            log.warning(
                "commit not heard from the source; every page is here, committing",
                extra={"migration": self.record.id, "error": describe_failure(exc)},
            )
            return False

    async def _reconnect(self, within: float) -> Link:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            try:
                link = await self.ctx.connect(self.record.peer, self.record.id)
                link.follow("target", lambda: self.record.state)
                store = self._relay is not None and self._relay.read_local is not None
                await link.send(Postcopy(migration=self.record.id, store=store))
                # The source may still wait for this (the first link died before it arrived); a repeat
                # is harmless.
                await link.send(Resumed())
                return link
            except (TimeoutError, OSError, FerrymanError) as exc:
                if (failure := await self._pager_failure()) is not None:
                    raise LazyPagesError(f"post-copy failed on this host: {failure}") from exc
                if loop.time() > deadline:
                    raise LazyPagesError(f"the source stayed unreachable during POSTCOPY: {exc}") from exc
                await asyncio.sleep(0.2)

    async def _pager_failure(self) -> str | None:
        """The pager's reason, if it failed. It writes its result before it lets go of its sockets,
        so a pager connection that closed on us finds it here."""
        result = await asyncio.to_thread(_read_result, self.paths.result)
        if result is None:
            if self._pager is not None and (code := self._pager.poll()) is not None:
                return f"the pager exited with {code} and no result"
            return None
        if result.get("ok"):
            return None
        return str(result.get("error") or "the pager failed")

    async def _pager_result(self, within: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while (result := await asyncio.to_thread(_read_result, self.paths.result)) is None:
            if loop.time() > deadline:
                raise LazyPagesError("the pager did not report after the last page")
            await asyncio.sleep(0.01)
        if not result.get("ok"):
            raise LazyPagesError(f"post-copy failed on this host: {result.get('error')}")
        log.info(
            "post-copy pages in",
            extra={
                "migration": self.record.id,
                **{k: v for k, v in result.items() if k not in ("ok", "error")},
                **self._relay_waits(),
            },
        )
        if self._pager is not None:
            await asyncio.to_thread(self._pager.wait, 10)

    def _relay_waits(self) -> dict[str, int]:
        """Where the relay waited: for the pager to take pushed pages, and holding the push's credits."""
        if self._relay is None:
            return {}
        return {
            "pager_drain_ms": round(self._relay.drain_wait * 1000),
            "push_held_ms": round(self._relay.ack_hold * 1000),
        }

    async def cleanup(self) -> None:
        """What run() does at its end, for a migration finished elsewhere (after a restart)."""
        self.store.close()
        await self._stop_postcopy_helpers()
        if self._link is not None:
            await self._link.close()
        shutil.rmtree(self.work, ignore_errors=True)

    async def _stop_postcopy_helpers(self) -> None:
        """The pager kills the restored task before it lets go of the daemon (SIGTERM), if it is not done."""
        if self._traffic is not None and not self._traffic.done():
            self._traffic.cancel()
            await asyncio.gather(self._traffic, return_exceptions=True)
        for process in (self._pager, self._daemon):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    await asyncio.to_thread(process.wait, 10)
                except subprocess.TimeoutExpired:
                    process.kill()
        if self._relay is not None:
            await self._relay.close()
        if self._daemon_end is not None:
            self._daemon_end.close()
            self._daemon_end = None

    async def commit(self) -> None:
        """The source decided for us: publish the address, resume the restored task, own the workload."""
        await self._advance(Event.RESTORED)
        await self._publish_address()
        await self.ctx.cd.tasks.resume(self.container.id)
        await self._own_workload()

    async def finish_commit(self) -> None:
        """After a restart in SWITCH: the source decided commit, and never rolls back from there, so
        our copy is the workload. Publish the address, and resume it if the previous agent had not."""
        await self._publish_address()
        await resume_if_paused(self.ctx.cd, self.container.id)
        await self._own_workload()

    async def _publish_address(self) -> None:
        """Route the service address here before the task runs: until then this host's reverse-path
        filter drops what the copy sends from the address (its route points elsewhere), so the
        first replies it writes would wait for its retransmission timer (1 s after a restore)."""
        if self.service_ip:
            info = self._netns or await self.ctx.network.prepare(self.container.id, self.service_ip)
            await self.ctx.network.publish(self.service_ip, info.host_veth)

    async def _own_workload(self) -> None:
        self._keep_received_volumes()
        await self._advance(Event.SWITCHED)
        await self._drop_lease()

    async def rollback(self, reason: str) -> None:
        """Remove whatever of the container exists here; the source keeps the workload.

        Before the decision that is a rollback (FAILED); in POSTCOPY our copy dies and the source
        resumes its frozen one (POSTCOPY_ABORTED). From SWITCH on our copy is the workload: it stays.
        """
        if self.record.state in (State.SWITCH, State.COMMIT, State.NEEDS_OPERATOR):
            log.error(
                "not removing the copy: the source decided to commit",
                extra={"migration": self.record.id, "state": self.record.state.value, "error": reason},
            )
            return
        await self._stop_postcopy_helpers()
        removed = await remove_container(self.ctx.cd, self.container.id, only_migration=self.record.id)
        if self.service_ip and removed:
            await self.ctx.network.destroy(self.container.id)
        await self._drop_lease()
        await self._drop_received_volumes()
        shutil.rmtree(self.work, ignore_errors=True)
        if self.record.state == State.POSTCOPY:
            await self._advance(Event.POSTCOPY_ABORTED, error=reason)
        elif not self.record.done:
            await self._advance(Event.FAILED, error=reason)

    async def _drop_lease(self) -> None:
        await self._release_reservation()  # commit or rollback: the container now counts as itself, or not at all
        if self._lease is not None:
            await self.ctx.cd.leases.delete(self._lease)
            self._lease = None


def known_prepare(record: MigrationRecord, labels: dict[str, str] | None = None) -> Prepare:
    """What a restarted agent still knows of a migration's `prepare`: its record, and the labels of the
    container it built. Enough to finish or remove it: the spec was used at the restore, and the mode
    and reservation only in PREPARE."""
    options = PrepareOptions(downtime_target_ms=record.options.downtime_target_ms, mode="precopy", reservation="")
    container = Container(id=record.container, image=record.image, labels=labels or {}, spec={}, runtime="")
    return Prepare(migration=record.id, container=container, estimated_bytes=0, options=options)


class DecisionPending(FerrymanError):
    """The restored copy waits, paused, for the source's decision."""

    code = "decision_pending"

    def __init__(self, record: MigrationRecord) -> None:
        super().__init__(f"migration {record.id}: waiting for the source's decision")
        self.record = record


def _read_result(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
