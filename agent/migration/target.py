"""The target side of a live migration.

It keeps every page the source sends, pulls the image while pre-copy runs, and on `restore` builds
the container: the image snapshot plus the source's rw layer, the source's spec adapted to this host,
and a task restored by CRIU from the received images. The restored task is paused until the source
decides (`commit`); without that decision it is removed, so the workload never runs twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.checkpoint.criuconf import ANNOTATION as CRIU_ANNOTATION
from agent.checkpoint.delta import PageStore
from agent.config import AgentConfig
from agent.containerd import Containerd, ContainerRecord
from agent.errors import AlreadyExists, ContainerdNotFound, FerrymanError
from agent.images.local import read_image
from agent.images.service import ImageService
from agent.migration.failpoints import Failpoints
from agent.migration.journal import Journal
from agent.migration.link import FileIn, Link, PagesIn, PeerFailed
from agent.migration.local import LABEL_MIGRATION, describe_failure, remove_container
from agent.migration.record import MigrationRecord
from agent.migration.rootfs import RW_LAYER_FILE, import_rw_layer
from agent.migration.states import Event, State
from agent.model import LABEL_LOG_PATH, LABEL_PREFIX, LABEL_SERVICE_IP
from agent.network import NetnsInfo, ServiceNetwork
from agent.oci import Platform
from agent.runtime.spec import set_network_namespace

log = logging.getLogger(__name__)

LABEL_MIGRATED_FROM = LABEL_PREFIX + "migrated-from"


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
    criu_config: Path
    """A CRIU config file (tcp-established and friends) runc passes to restore via the spec annotation."""
    publish: Callable[[MigrationRecord], None]
    network: ServiceNetwork


class TargetMigration:
    def __init__(self, ctx: TargetContext, record: MigrationRecord, prepare: dict[str, Any]) -> None:
        self.ctx = ctx
        self.record = record
        self.prepare_msg = prepare
        self.container: dict[str, Any] = prepare["container"]
        self.work = Path(ctx.config.migration.work_dir) / record.id
        self.images_dir = self.work / "images"
        self.store = PageStore(self.work / "pagestore")
        self._lease: str | None = None
        self.service_ip: str | None = (self.container.get("labels") or {}).get(LABEL_SERVICE_IP)
        self._netns: NetnsInfo | None = None

    def _save(self, record: MigrationRecord) -> None:
        self.record = record
        self.ctx.journal.write(record)
        self.ctx.publish(record)

    def _advance(self, event: Event, error: str | None = None) -> None:
        self._save(self.record.advance(event, error))
        log.info("migration state", extra={"migration": self.record.id, "state": self.record.state.value})

    async def run(self, link: Link) -> MigrationRecord:
        self._save(self.record)
        pull: asyncio.Task[Any] | None = None
        try:
            async with asyncio.timeout(self.ctx.config.migration.phase_timeout):
                await self._check_room(int(self.prepare_msg.get("estimated_bytes", 0)))
                self._lease = await self.ctx.cd.leases.create("migration", self.ctx.config.migration.phase_timeout)
                if self.service_ip:  # the same address, in a namespace of this host, unpublished until commit
                    self._netns = await self.ctx.network.prepare(self.container["id"], self.service_ip)
                pull = asyncio.create_task(self.ctx.images.pull(self.container["image"]), name="migration-pull")
                await link.send("prepared")
                self._advance(Event.PREPARED)
                rw_digest = await self._receive(link)
                self._advance(Event.IMAGES_SENT)
                await pull
                restore_ms = await self._restore(rw_digest)
                await link.send("restored", restore_ms=round(restore_ms, 1))
                await self._await_decision(link)
        except DecisionPending:
            raise  # the restored copy stays, paused: the service asks the source what it decided
        except BaseException as exc:
            if pull is not None and not pull.done():
                pull.cancel()
                await asyncio.gather(pull, return_exceptions=True)
            if self.record.state not in (State.SWITCH, State.COMMIT):
                await link.fail(describe_failure(exc))
                await self.rollback(describe_failure(exc))
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            await link.close()
            self.store.close()
            shutil.rmtree(self.work, ignore_errors=True)
        return self.record

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
        if await self._container_exists(self.container["id"]):
            raise AlreadyExists(f"container {self.container['id']} already exists on this host")

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
            elif isinstance(msg, FileIn):
                dest = self.images_dir / msg.name
                if msg.path != dest:
                    shutil.move(msg.path, dest)
            elif msg.type == "round":
                self.record = self.record.with_stats(iterations=int(msg.body.get("number", 0)))
                self.ctx.publish(self.record)
                await self.ctx.failpoints.hit("target.precopy")
            elif msg.type == "stopcopy":
                self._advance(Event.CONVERGED)
                await self.ctx.failpoints.hit("target.stopcopy")
            elif msg.type == "restore":
                return str(msg.body["rw_digest"])
            else:
                raise PeerFailed(f"unexpected message {msg.type!r} while receiving images")

    def _spec_for_here(self) -> bytes:
        spec = dict(self.container["spec"])
        linux = dict(spec.get("linux") or {})
        ns, cid = self.ctx.cd.namespace, self.container["id"]
        linux["cgroupsPath"] = f"{self.ctx.config.runtime.cgroup_parent}/{ns}/{cid}"
        spec["linux"] = linux
        annotations = dict(spec.get("annotations") or {})
        annotations[CRIU_ANNOTATION] = str(self.ctx.criu_config)
        spec["annotations"] = annotations
        if self._netns is not None:
            set_network_namespace(spec, self._netns.path)  # CRIU restores into this host's namespace
        return json.dumps(spec).encode()

    async def _restore(self, rw_digest: str) -> float:
        cid = self.container["id"]
        started = time.monotonic()
        await asyncio.to_thread(self.store.write_pages_files, self.images_dir)
        log.info(
            "pages files ready",
            extra={"migration": self.record.id, "ms": round((time.monotonic() - started) * 1000, 1)},
        )
        if self.ctx.failpoints.action("target.corrupt_images") == "corrupt":
            for core in self.images_dir.glob("core-*.img"):
                core.write_bytes(b"\0" * 16)  # CRIU itself must then refuse the images
        await self.ctx.failpoints.hit("target.restore")
        assert self._lease is not None
        cd = self.ctx.cd.leased(self._lease)
        image = await read_image(self.ctx.cd, self.container["image"], self.ctx.platform)
        rw_data = await asyncio.to_thread((self.images_dir / RW_LAYER_FILE).read_bytes)
        await import_rw_layer(cd, cid, image.chain_id, rw_data, rw_digest)
        log_file = self.ctx.log_path(cid)
        labels = dict(self.container["labels"])
        labels[LABEL_LOG_PATH] = str(log_file)
        labels[LABEL_MIGRATED_FROM] = self.record.peer
        labels[LABEL_MIGRATION] = self.record.id
        await cd.containers.create(
            ContainerRecord(
                id=cid,
                image=self.container["image"],
                labels=labels,
                runtime=self.container["runtime"],
                spec=self._spec_for_here(),
                snapshotter=cd.snapshotter_name,
                snapshot_key=cid,
            )
        )
        await asyncio.to_thread(log_file.parent.mkdir, parents=True, exist_ok=True)
        mounts = await cd.snapshots.mounts(cid)
        uri = f"file://{log_file}"
        started = time.monotonic()
        await cd.tasks.create(
            cid,
            mounts,
            stdout=uri,
            stderr=uri,
            runc_root=self.ctx.config.containerd.runc_root,
            restore_from=str(self.images_dir),
            criu_work_dir=str(self.work / "criu-work"),
        )
        await cd.tasks.start(cid)
        await cd.tasks.pause(cid)  # provisional until the source decides
        restore_ms = (time.monotonic() - started) * 1000
        self._save(self.record.with_stats(restore_ms=round(restore_ms, 1)))
        await self.ctx.failpoints.hit("target.restored")
        return restore_ms

    async def _await_decision(self, link: Link) -> None:
        try:
            await link.expect("commit")
        except (TimeoutError, OSError, FerrymanError) as exc:
            # We cannot tell whether the source decided: stay paused, the service asks the source.
            log.warning("no decision from the source yet", extra={"migration": self.record.id, "error": str(exc)})
            raise DecisionPending(self.record) from exc
        await self.commit()
        await link.send("committed")

    async def commit(self) -> None:
        """The source decided for us: resume the restored task and own the workload."""
        cid = self.container["id"]
        self._advance(Event.RESTORED)
        await self.ctx.cd.tasks.resume(cid)
        if self.service_ip:
            info = self._netns or await self.ctx.network.prepare(cid, self.service_ip)
            await self.ctx.network.publish(self.service_ip, info.host_veth)
        self._advance(Event.SWITCHED)
        await self._drop_lease()

    async def rollback(self, reason: str) -> None:
        """Remove whatever of the container exists here; the source keeps the workload."""
        removed = await remove_container(self.ctx.cd, self.container["id"], only_migration=self.record.id)
        if self.service_ip and removed:
            await self.ctx.network.destroy(self.container["id"])
        await self._drop_lease()
        shutil.rmtree(self.work, ignore_errors=True)
        if self.record.state not in (State.COMMIT, State.ROLLBACK):
            self._advance(Event.FAILED, error=reason)

    async def _drop_lease(self) -> None:
        if self._lease is not None:
            await self.ctx.cd.leases.delete(self._lease)
            self._lease = None


class DecisionPending(FerrymanError):
    """The restored copy waits, paused, for the source's decision."""

    code = "decision_pending"

    def __init__(self, record: MigrationRecord) -> None:
        super().__init__(f"migration {record.id}: waiting for the source's decision")
        self.record = record
