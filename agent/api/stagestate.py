"""Thin HTTP handlers relaying a chain stage's HTTP state contract into its network namespace.

The coordinator's chain manager hands a stage's state to the next stage (docs/chains.md): it asks
the agent of each stage's host, which reaches the stage at its service address and the contract's
port from inside the container's network namespace (agent/probes), as health probes do. So the
next stage can take its state while the chain's address is still published for the stage before
it, and the coordinator needs no route into the service network. The body is relayed as it is
(MessagePack or protobuf; the agent does not read it):

    POST  /v1/containers/{id}/state/export?port=P[&since=V] -> POST /state/export[?since=V] (the
                                                               state, or its delta since V)
    PUT   /v1/containers/{id}/state?port=P          -> PUT /state (the body: the state)
    POST  /v1/containers/{id}/state/resume?port=P   -> POST /state/resume
    POST  /v1/containers/{id}/state/snapshot?port=P -> POST /state/snapshot (a live handover: the
                                                       state, the stage serving on)
    PATCH /v1/containers/{id}/state?port=P          -> PATCH /state (the body: a delta)

The stage's own answer comes back with its status and body; 502 `stage_unreachable` when it does
not answer at all.

A live handover's last step on one host is one request (the chain's switch, when the serving stage
and the next run here), so that the serving stage refuses changes for as short a time as can be:

    POST /v1/containers/{id}/state/takeover?port=P&from=S&from_port=Q&since=V
        S's POST /state/export?since=V, that delta to {id}'s PATCH /state, then {id}'s address
        published (the route flipped from S's veth to {id}'s). 200 {"delta_bytes": N, "steps_ms":
        {...}} when all three were done (`steps_ms`: what each part took, see `take_over`); 409
        `stage_refused` naming the step a stage refused (nothing published); 502
        `stage_unreachable`.
"""

from __future__ import annotations

import logging
import time

from aiohttp import web

from agent.api.handlers import CONTAINERS, _container_id
from agent.api.network import _network
from agent.api.responses import json_answer
from agent.model import LABEL_SERVICE_IP, ContainerSummary
from agent.network import NetworkError
from agent.probes import Exchange, HttpAnswer, ProbeFailed, http_exchange, netns_of, opened_exchange
from core.errors import Conflict, ContainerNotFound, FerrymanError, InvalidRequest
from core.http.validate import check_keys, query_number
from core.ids import check_container_id

log = logging.getLogger(__name__)

MAX_STATE_BYTES = 1 << 30
"""The largest state relayed either way (1 GiB); a stage with more hands it over through a volume."""
CHUNK = 1 << 20
TYPES = ("application/msgpack", "application/x-protobuf")


class StageUnreachable(FerrymanError):
    code = "stage_unreachable"
    http_status = 502


class StageRefused(Conflict):
    code = "stage_refused"


def _port(request: web.Request, name: str) -> int:
    port = query_number(request, name, integer=True, maximum=65535)
    if not port:
        raise InvalidRequest(f"query parameter {name}: expected 1-65535")
    return int(port)


def _stage(summaries: list[ContainerSummary], cid: str) -> tuple[str, str]:
    """(netns, service address) of the running container `cid`."""
    for summary in summaries:
        if summary.id == cid:
            address = summary.labels.get(LABEL_SERVICE_IP)
            if not address:
                raise Conflict(f"container {cid} has no service address: it cannot be a chain's stage")
            if not summary.pid:
                raise Conflict(f"container {cid} is not running")
            return netns_of(summary.pid), address
    raise ContainerNotFound(f"no container {cid!r}")


async def _target(request: web.Request, allowed: frozenset[str] = frozenset({"port"})) -> tuple[str, str, int]:
    """(netns, service address, port) of the running container the request names."""
    cid = _container_id(request)
    check_keys(dict(request.query), set(allowed), {"port"}, "query")
    port = _port(request, "port")
    netns, address = _stage(await request.app[CONTAINERS].list(), cid)
    return netns, address, port


async def _relay(
    request: web.Request,
    method: str,
    path: str,
    body: bytes,
    content_type: str,
    allowed: frozenset[str] = frozenset({"port"}),
) -> web.Response:
    netns, address, port = await _target(request, allowed)
    try:
        answer = await http_exchange(netns, address, port, method, path, body, content_type, MAX_STATE_BYTES)
    except ProbeFailed as exc:
        raise StageUnreachable(f"stage {request.match_info['id']}: {exc.message}") from exc
    return web.Response(status=answer.status, body=answer.body, content_type=content_type)


async def export_state(request: web.Request) -> web.Response:
    if "since" not in request.query:
        return await _relay(request, "POST", "/state/export", b"", TYPES[0])
    since = query_number(request, "since", integer=True)
    if since is None:
        raise InvalidRequest("query parameter since: expected the version of a snapshot")
    return await _relay(request, "POST", f"/state/export?since={since}", b"", TYPES[0], frozenset({"port", "since"}))


async def snapshot_state(request: web.Request) -> web.Response:
    return await _relay(request, "POST", "/state/snapshot", b"", TYPES[0])


async def resume_stage(request: web.Request) -> web.Response:
    return await _relay(request, "POST", "/state/resume", b"", TYPES[0])


async def _body(request: web.Request) -> tuple[bytes, str]:
    content_type = request.content_type if request.content_type in TYPES else TYPES[0]
    body = bytearray()
    async for chunk in request.content.iter_chunked(CHUNK):
        body += chunk
        if len(body) > MAX_STATE_BYTES:
            raise InvalidRequest(f"the state is larger than {MAX_STATE_BYTES} bytes")
    return bytes(body), content_type


async def import_state(request: web.Request) -> web.Response:
    body, content_type = await _body(request)
    return await _relay(request, "PUT", "/state", body, content_type)


async def apply_delta(request: web.Request) -> web.Response:
    body, content_type = await _body(request)
    return await _relay(request, "PATCH", "/state", body, content_type)


def _answer_of(answer: HttpAnswer, method: str, path: str, who: str) -> bytes:
    """The body of a contract answer of 200 or 204, else StageRefused."""
    if answer.status not in (200, 204):
        text = answer.body[:200].decode(errors="replace").strip()
        raise StageRefused(f"stage {who} refused {method} {path}: HTTP {answer.status}: {text}")
    return answer.body


async def _send(exchange: Exchange, method: str, path: str, body: bytes, who: str) -> bytes:
    try:
        answer = await exchange.send(method, path, body, TYPES[0], MAX_STATE_BYTES)
    except ProbeFailed as exc:
        raise StageUnreachable(f"stage {who}: {exc.message}") from exc
    return _answer_of(answer, method, path, who)


async def take_over(request: web.Request) -> web.Response:
    """A live handover's last step on this host, in one request (the module's docstring).

    The source refuses changes from its export on, until the route is flipped, so everything else
    is done before the export: both stages looked up, a connection made to each (the stage's thread
    for it already started), the target's veth found and set up, the netlink socket opened. Between
    the export and the flip there are then two requests over open connections and one `route
    replace`, all on the event loop; the rest of the publish (proxy ARP, announcement) follows the
    flip. `steps_ms` in the answer says what each part took."""
    started = time.perf_counter()
    target = _container_id(request)
    check_keys(
        dict(request.query), {"port", "from", "from_port", "since"}, {"port", "from", "from_port", "since"}, "query"
    )
    source = request.query["from"]
    check_container_id(source)
    port, source_port = _port(request, "port"), _port(request, "from_port")
    since = query_number(request, "since", integer=True)
    if since is None:
        raise InvalidRequest("query parameter since: expected the version of a snapshot")
    network = _network(request)
    summaries = await request.app[CONTAINERS].list()
    source_netns, source_address = _stage(summaries, source)
    target_netns, target_address = _stage(summaries, target)
    if source_address != target_address:
        raise Conflict(f"containers {source} and {target} do not share a service address")
    target_veth = network.info(target).host_veth
    export_path = f"/state/export?since={since}"
    steps: dict[str, float] = {}
    mark = time.perf_counter()
    steps["look_up"] = mark - started
    try:
        async with (
            opened_exchange(source_netns, source_address, source_port) as to_source,
            opened_exchange(target_netns, target_address, port) as to_target,
            network.route_switch(target_address, target_veth) as flip,
        ):
            steps["connect"], mark = _since(mark)
            delta = await _send(to_source, "POST", export_path, b"", source)
            steps["export"], mark = _since(mark)
            await _send(to_target, "PATCH", "/state", delta, target)
            steps["patch"], mark = _since(mark)
            await flip()
            steps["flip"], mark = _since(mark)
    except ProbeFailed as exc:  # a connection made ahead was refused: nothing was exported
        raise StageUnreachable(f"stage {source} or {target}: {exc.message}") from exc
    # The route is there already (this replaces it with the same); the proxy ARP entry and the
    # announcement are for other hosts' clients, and nothing on this host waits for them. Past the
    # flip the target serves: a failure here must not roll the handover back onto the source,
    # which would then serve without what the target did.
    try:
        await network.publish(target_address, target_veth)
    except NetworkError as exc:
        log.warning("address moved, the rest of its publish failed", extra={"container": target, "error": str(exc)})
    steps["publish"], mark = _since(mark)
    steps_ms = {name: round(seconds * 1000, 3) for name, seconds in steps.items()}
    log.info("stage taken over", extra={"container": target, "from": source, "steps_ms": steps_ms})
    return json_answer(
        {"delta_bytes": len(delta), "container": target, "service_ip": target_address, "steps_ms": steps_ms}
    )


def _since(mark: float) -> tuple[float, float]:
    """(seconds since `mark`, now)."""
    now = time.perf_counter()
    return now - mark, now


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/containers/{id}/state/export", export_state)
    app.router.add_put("/v1/containers/{id}/state", import_state)
    app.router.add_post("/v1/containers/{id}/state/resume", resume_stage)
    app.router.add_post("/v1/containers/{id}/state/snapshot", snapshot_state)
    app.router.add_patch("/v1/containers/{id}/state", apply_delta)
    app.router.add_post("/v1/containers/{id}/state/takeover", take_over)
