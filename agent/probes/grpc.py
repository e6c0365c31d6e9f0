"""The gRPC health protocol (grpc.health.v1.Health/Check) from inside a container's network namespace.

The only module outside agent.containerd that imports grpc (an import-linter exception in
pyproject.toml): the probe's channel reaches the container through a tunnel (agent/probes/netns.py),
because grpc dials from threads of its own, which are not in the container's namespace.
"""

from __future__ import annotations

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agent.probes.errors import ProbeFailed
from agent.probes.netns import tunnel

SERVING = health_pb2.HealthCheckResponse.ServingStatus.Name(health_pb2.HealthCheckResponse.SERVING)


async def grpc_health(netns: str, host: str, port: int, service: str, timeout: float) -> str:  # noqa: ASYNC109
    """The serving status the server reports for `service` ("SERVING", "NOT_SERVING", ...), or
    ProbeFailed when it gives none (refused, no health service, unknown service, no answer in time)."""
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    async with (
        tunnel(netns, host, port) as socket_path,
        grpc.aio.insecure_channel(f"unix:{socket_path}", options=[("grpc.default_authority", authority)]) as channel,
    ):
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.UNIMPLEMENTED:
                raise ProbeFailed(f"{authority} does not serve grpc.health.v1.Health") from exc
            if code == grpc.StatusCode.NOT_FOUND:
                raise ProbeFailed(f"{authority} knows no service {service!r}") from exc
            raise ProbeFailed(f"grpc.health.v1.Health/Check at {authority}: {code.name} {exc.details() or ''}") from exc
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))
