"""A thin handler relaying a component's request metrics endpoint from inside its network namespace.

The coordinator keeps each deployment component's request rate, latency and errors
(coordinator/deployments/behaviour.py). A component that declares `metrics_port` in its catalog
manifest serves them as Prometheus text at `GET /metrics` on its service address; the coordinator
needs no route into the service network, so it asks the agent of the copy's host, which reaches the
copy the way health probes do (agent/probes):

    GET /v1/containers/{id}/metrics?port=P   -> GET http://<its service address>:P/metrics

The copy's answer comes back with its status, as text; 502 `component_unreachable` when it does not
answer at all. The agent does not read the text.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from agent.api.handlers import CONTAINERS, _container_id
from agent.model import LABEL_SERVICE_IP
from agent.probes import ProbeFailed, http_get, netns_of
from core.errors import Conflict, ContainerNotFound, FerrymanError, InvalidRequest
from core.http.validate import check_keys, query_number

MAX_METRICS_BYTES = 1 << 20
"""The largest metrics page relayed (1 MiB); longer pages are cut, which the parser refuses."""
METRICS_TIMEOUT = 5.0
"""Seconds a copy has to answer (the coordinator reads every few seconds)."""


class ComponentUnreachable(FerrymanError):
    code = "component_unreachable"
    http_status = 502


async def component_metrics(request: web.Request) -> web.Response:
    cid = _container_id(request)
    check_keys(dict(request.query), {"port"}, {"port"}, "query")
    port = query_number(request, "port", integer=True, maximum=65535)
    if not port:
        raise InvalidRequest("query parameter port: expected 1-65535")
    for summary in await request.app[CONTAINERS].list():
        if summary.id != cid:
            continue
        address = summary.labels.get(LABEL_SERVICE_IP)
        if not address:
            raise Conflict(f"container {cid} has no service address: it serves no metrics endpoint")
        if not summary.pid:
            raise Conflict(f"container {cid} is not running")
        try:
            async with asyncio.timeout(METRICS_TIMEOUT):
                answer = await http_get(netns_of(summary.pid), address, int(port), "/metrics", MAX_METRICS_BYTES)
        except ProbeFailed as exc:
            raise ComponentUnreachable(f"container {cid}: {exc.message}") from exc
        except TimeoutError as exc:
            raise ComponentUnreachable(f"container {cid}: no answer within {METRICS_TIMEOUT:g} s") from exc
        return web.Response(status=answer.status, body=answer.body, content_type="text/plain")
    raise ContainerNotFound(f"no container {cid!r}")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/containers/{id}/metrics", component_metrics)
