"""containerd's task service: the running process of a container."""

from __future__ import annotations

import builtins
import datetime as dt

from google.protobuf import any_pb2

from agent.containerd.connection import CallContext
from agent.containerd.snapshots import _mount_msgs
from agent.containerd.types import Mount, ProcessInfo, TaskStatus
from proto.containerd.api.services.tasks.v1 import tasks_pb2 as pb
from proto.containerd.api.services.tasks.v1.tasks_pb2_grpc import TasksStub
from proto.containerd.api.types.task import task_pb2
from proto.containerd.runtime.v2.runc.options import oci_pb2

RUNC_OPTIONS_TYPE = "containerd.runc.v1.Options"
CHECKPOINT_OPTIONS_TYPE = "containerd.runc.v1.CheckpointOptions"
PROCESS_SPEC_TYPE = "types.containerd.io/opencontainers/runtime-spec/1/Process"


def _process(msg: task_pb2.Process) -> ProcessInfo:
    status = TaskStatus(msg.status)
    exited = status == TaskStatus.STOPPED and msg.HasField("exited_at")
    return ProcessInfo(
        container_id=msg.container_id or msg.id,  # Tasks.List fills `id` instead
        pid=msg.pid,
        status=status,
        exit_status=msg.exit_status,
        stdout=msg.stdout,
        exited_at=msg.exited_at.ToDatetime(tzinfo=dt.UTC) if exited else None,
    )


class TaskService:
    def __init__(self, stub: TasksStub, ctx: CallContext) -> None:
        self._stub = stub
        self._ctx = ctx

    async def create(
        self,
        container_id: str,
        rootfs: list[Mount],
        stdout: str = "",
        stderr: str = "",
        runc_root: str = "",
        restore_from: str = "",
        criu_work_dir: str = "",
    ) -> int:
        """Create the task; with `restore_from` (a CRIU image directory) runc restores it from there."""
        options = None
        if runc_root or restore_from:
            opts = oci_pb2.Options(root=runc_root, criu_image_path=restore_from, criu_work_path=criu_work_dir)
            options = any_pb2.Any(type_url=RUNC_OPTIONS_TYPE, value=opts.SerializeToString())
        req = pb.CreateTaskRequest(
            options=options, container_id=container_id, rootfs=_mount_msgs(rootfs), stdout=stdout, stderr=stderr
        )
        return (await self._ctx.unary(self._stub.Create, req, f"create task {container_id}")).pid

    async def start(self, container_id: str) -> int:
        return (
            await self._ctx.unary(
                self._stub.Start, pb.StartRequest(container_id=container_id), f"start task {container_id}"
            )
        ).pid

    async def get(self, container_id: str) -> ProcessInfo:
        resp = await self._ctx.unary(self._stub.Get, pb.GetRequest(container_id=container_id), f"task {container_id}")
        return _process(resp.process)

    async def list(self) -> list[ProcessInfo]:
        resp = await self._ctx.unary(self._stub.List, pb.ListTasksRequest(), "list tasks")
        return [_process(t) for t in resp.tasks]

    async def kill(self, container_id: str, signal: int, all_processes: bool = True) -> None:
        req = pb.KillRequest(container_id=container_id, signal=signal, all=all_processes)
        await self._ctx.unary(self._stub.Kill, req, f"kill task {container_id}")

    async def wait(self, container_id: str) -> int:
        """Block until the task exits; returns its exit status."""
        resp = await self._ctx.unary(
            self._stub.Wait, pb.WaitRequest(container_id=container_id), f"wait task {container_id}"
        )
        return resp.exit_status

    async def delete(self, container_id: str) -> int:
        resp = await self._ctx.unary(
            self._stub.Delete, pb.DeleteTaskRequest(container_id=container_id), f"delete task {container_id}"
        )
        return resp.exit_status

    # ----- processes exec'd into a running task (health checks' exec probes) ---------------------

    async def exec(
        self, container_id: str, exec_id: str, process_spec: bytes, stdout: str = "", stderr: str = ""
    ) -> None:
        """Create (not start) process `exec_id` in the task, from an OCI process spec (JSON); its
        output goes to `stdout`/`stderr` (file:// URIs, like a task's)."""
        req = pb.ExecProcessRequest(
            container_id=container_id,
            exec_id=exec_id,
            stdout=stdout,
            stderr=stderr,
            spec=any_pb2.Any(type_url=PROCESS_SPEC_TYPE, value=process_spec),
        )
        await self._ctx.unary(self._stub.Exec, req, f"exec {exec_id} in {container_id}")

    async def start_process(self, container_id: str, exec_id: str) -> int:
        req = pb.StartRequest(container_id=container_id, exec_id=exec_id)
        return (await self._ctx.unary(self._stub.Start, req, f"start {exec_id} in {container_id}")).pid

    async def wait_process(self, container_id: str, exec_id: str) -> int:
        """Block until the exec'd process exits; returns its exit status."""
        req = pb.WaitRequest(container_id=container_id, exec_id=exec_id)
        return (await self._ctx.unary(self._stub.Wait, req, f"wait {exec_id} in {container_id}")).exit_status

    async def kill_process(self, container_id: str, exec_id: str, signal: int) -> None:
        req = pb.KillRequest(container_id=container_id, exec_id=exec_id, signal=signal)
        await self._ctx.unary(self._stub.Kill, req, f"kill {exec_id} in {container_id}")

    async def delete_process(self, container_id: str, exec_id: str) -> int:
        req = pb.DeleteProcessRequest(container_id=container_id, exec_id=exec_id)
        return (await self._ctx.unary(self._stub.DeleteProcess, req, f"delete {exec_id} in {container_id}")).exit_status

    async def pause(self, container_id: str) -> None:
        await self._ctx.unary(
            self._stub.Pause, pb.PauseTaskRequest(container_id=container_id), f"pause task {container_id}"
        )

    async def resume(self, container_id: str) -> None:
        await self._ctx.unary(
            self._stub.Resume, pb.ResumeTaskRequest(container_id=container_id), f"resume task {container_id}"
        )

    async def checkpoint(
        self,
        container_id: str,
        image_dir: str,
        work_dir: str = "",
        *,
        leave_running: bool = True,
        tcp_established: bool = True,
        external_unix_sockets: bool = False,
        file_locks: bool = False,
    ) -> None:
        """CRIU-dump the task into `image_dir` directly (never through the content store).

        A paused task stays frozen after a leave-running dump: CRIU restores the freezer state it found.
        """
        opts = oci_pb2.CheckpointOptions(
            exit=not leave_running,
            open_tcp=tcp_established,
            external_unix_sockets=external_unix_sockets,
            file_locks=file_locks,
            image_path=image_dir,
            work_path=work_dir,
        )
        req = pb.CheckpointTaskRequest(
            container_id=container_id,
            options=any_pb2.Any(type_url=CHECKPOINT_OPTIONS_TYPE, value=opts.SerializeToString()),
        )
        await self._ctx.unary(self._stub.Checkpoint, req, f"checkpoint task {container_id}")

    async def pids(self, container_id: str) -> builtins.list[int]:
        resp = await self._ctx.unary(
            self._stub.ListPids, pb.ListPidsRequest(container_id=container_id), f"pids of {container_id}"
        )
        return [p.pid for p in resp.processes]
