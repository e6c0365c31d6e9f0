"""The probes adapter: a container's endpoints, reached from inside its network namespace.

Health checks (agent/health) ask it whether a port accepts connections (`connect`), what an HTTP GET
answers (`http_get`) and what the gRPC health service says (`grpc_health`); chains export and import
a stage's state through `http_exchange`, or `opened_exchange` when the connection is to be made
ahead of the request (docs/chains.md). Each raises `ProbeFailed`
with what went wrong; the caller bounds the time. Exec probes go through containerd instead
(agent/containerd/tasks.py).
"""

from agent.probes.errors import ProbeFailed
from agent.probes.grpc import SERVING, grpc_health
from agent.probes.http import Exchange, HttpAnswer, http_exchange, http_get, opened_exchange
from agent.probes.netns import connect, netns_of

__all__ = [
    "SERVING",
    "Exchange",
    "HttpAnswer",
    "ProbeFailed",
    "connect",
    "grpc_health",
    "http_exchange",
    "http_get",
    "netns_of",
    "opened_exchange",
]
