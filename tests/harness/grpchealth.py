"""A gRPC health server (grpc.health.v1) for health-check tests, run as its own process.

The test images are busybox and static C programs; a gRPC server does not fit in them, so the tests
start this one on the host, inside the container's network namespace (`nsenter --net=...`): to a
probe it is the container's port. Each line on stdin sets the status of the server as a whole
(SERVING, NOT_SERVING); it prints "ready" once it listens and exits when stdin closes.

    nsenter --net=/proc/PID/ns/net python -m tests.harness.grpchealth PORT
"""

from __future__ import annotations

import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parents[2]


def main() -> None:
    port = int(sys.argv[1])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    print("ready", flush=True)
    for line in sys.stdin:
        servicer.set("", health_pb2.HealthCheckResponse.ServingStatus.Value(line.strip()))
        print("set", flush=True)
    server.stop(0)


class GrpcHealthServer:
    """The server above in the network namespace of process `pid`; `set` changes its status."""

    def __init__(self, pid: int, port: int) -> None:
        self.proc = subprocess.Popen(
            ["nsenter", f"--net=/proc/{pid}/ns/net", sys.executable, "-m", "tests.harness.grpchealth", str(port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            self.close()
            raise RuntimeError("the gRPC health server did not start")

    def set(self, status: str) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(status + "\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "set"

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


if __name__ == "__main__":
    main()
