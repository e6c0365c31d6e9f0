"""Thin HTTP handlers: authenticate, validate, call one coordinator service, serialise the result."""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import weakref
from typing import Any, TypeVar
from urllib.parse import quote

from aiohttp import WSCloseCode, WSMsgType, web
from google.protobuf.message import Message
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from coordinator.app import Coordinator
from coordinator.auth import Principal, authenticate, require_agent, require_ops
from coordinator.chains.states import TERMINAL as CHAIN_TERMINAL
from coordinator.chains.states import State as ChainState
from coordinator.deployments.plan import preview
from coordinator.leadership import NotLeader, PushElsewhere
from coordinator.model import Capacity
from coordinator.orchestrator import AUTO
from coordinator.placement import Need
from coordinator.wire import MAX_BODY_BYTES, check_digests, parse_message, to_json
from core.config import MIGRATION_MODES
from core.errors import FerrymanError, InvalidRequest
from core.http.errors import error_body
from core.http.validate import (
    CAPACITY_MAX,
    PROTOBUF,
    capacity_fields,
    check_keys,
    json_type,
    positive_field,
    read_body,
    read_object,
    str_field,
)
from core.ids import check_catalog_name, check_catalog_version, check_container_id, parse_catalog_ref
from core.replicas import LEADER_HEADER
from core.security.pki import Role, validate_name
from proto.ferryman.v1 import fleet_pb2

COORDINATOR = web.AppKey("coordinator", Coordinator)
OPENAPI = web.AppKey("openapi", bytes)
PRINCIPAL = "principal"
MAX_WAIT = 3600.0
DEFAULT_WAIT = 600.0
M = TypeVar("M", bound=Message)


SESSIONS: web.AppKey[weakref.WeakSet[web.WebSocketResponse]] = web.AppKey("telemetry_sessions")
"""The open telemetry sessions (GET /v1/telemetry/stream), closed at shutdown."""
PEERS: web.AppKey[weakref.WeakKeyDictionary[ssl.SSLObject, Principal | None]] = web.AppKey("peers")
"""The certificate identity of each open connection, decoded at its first request: an agent's
kept-alive connection carries a push every few seconds, and decoding its certificate each time
was a tenth of a push's cost. Gone with the connection."""


@web.middleware
async def auth_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Find out who is calling once per request; each handler decides what that identity may do."""
    coordinator = request.app[COORDINATOR]
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    authorization = request.headers.get("Authorization")
    if authorization is None and ssl_object is not None:
        peers = request.app[PEERS]
        if ssl_object in peers:
            request[PRINCIPAL] = peers[ssl_object]
        else:
            request[PRINCIPAL] = peers[ssl_object] = authenticate(None, ssl_object, coordinator.tokens)
    else:
        request[PRINCIPAL] = authenticate(authorization, ssl_object, coordinator.tokens)
    response: web.StreamResponse = await handler(request)
    return response


LEADER_ONLY = frozenset(
    {
        ("POST", "/v1/hosts/{host}/drain"),
        ("POST", "/v1/hosts/{host}/uncordon"),
        ("POST", "/v1/migrations"),
        ("POST", "/v1/model"),
        ("POST", "/v1/model/rollback"),
        ("POST", "/v1/model/retrain"),
        ("POST", "/v1/deployments"),
        ("DELETE", "/v1/deployments/{id}"),
        ("POST", "/v1/deployments/{id}/components/{name}/scale"),
    }
)
"""Requests that start the leader's work (a deployment is driven, and taken over after a crash, by
the leader only). Placements, reservations and catalog writes are atomic in the store and are
served by any replica."""
ANY_REPLICA = frozenset({("POST", "/v1/register"), ("POST", "/v1/telemetry"), ("GET", "/v1/telemetry/stream")})
"""Served by any replica in full, the leader not named: agents stay on the replica they push to
(their drain-risk samples reach the leader through the store: coordinator/history_share.py)."""


@web.middleware
async def leader_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """On etcd, a replica that does not lead refuses LEADER_ONLY requests: 503 not_leader, naming
    the leader's URL, so that drains and migrations are followed by one replica only."""
    coordinator = request.app[COORDINATOR]
    resource = request.match_info.route.resource
    if resource is not None and (request.method, resource.canonical) in LEADER_ONLY and not coordinator.acting():
        leader = coordinator.election.leader if coordinator.election is not None else ""
        where = f"the leader at {leader}" if leader else "the leader (none is elected yet)"
        return _not_leader(NotLeader(f"this coordinator replica does not lead: send the request to {where}", leader))
    try:
        response: web.StreamResponse = await handler(request)
    except NotLeader as exc:  # a fenced write found another replica leading
        return _not_leader(exc)
    election = coordinator.election
    served_in_full = resource is not None and (request.method, resource.canonical) in ANY_REPLICA
    leader = election.leader if election is not None and not coordinator.acting() else ""
    if leader and not served_in_full and not response.prepared:
        response.headers[LEADER_HEADER] = leader  # served here, but the leader is there
    return response


def _not_leader(exc: NotLeader) -> web.Response:
    """503 not_leader with the leader's URL as `error.leader` ("" when none is known): clients follow it
    (core/replicas.py)."""
    body = error_body(exc.code, exc.message)
    body["error"]["leader"] = exc.leader
    return web.json_response(body, status=exc.http_status)


def _principal(request: web.Request) -> Principal | None:
    principal: Principal | None = request.get(PRINCIPAL)
    return principal


def _ops(request: web.Request) -> Principal:
    return require_ops(_principal(request))


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status)


def _host_name(request: web.Request) -> str:
    name = request.match_info["host"]
    try:
        return validate_name(name)
    except Exception as exc:
        raise InvalidRequest(f"invalid host name {name!r}") from exc


async def _raw(request: web.Request) -> bytes:
    return await read_body(request, max_bytes=MAX_BODY_BYTES)


async def _message(request: web.Request, message: type[M]) -> M:
    """The body as `message`: JSON, or binary protobuf when sent as application/x-protobuf."""
    return parse_message(await _raw(request), message, request.content_type)


# ----- agents


async def register(request: web.Request) -> web.Response:
    principal = _principal(request)
    require_agent(principal, principal.name if principal else "")  # 401/403 before reading the body
    reg = await _message(request, fleet_pb2.Registration)
    require_agent(principal, reg.host)
    host = await request.app[COORDINATOR].hosts.register(reg)
    return _json(host.to_dict())


def _push_elsewhere(coordinator: Coordinator) -> PushElsewhere | None:
    """The refusal of a leader that leaves pushes to its followers, or None: this replica takes them."""
    if coordinator.takes_pushes():
        return None
    coordinator.metrics.pushes_sent_elsewhere.inc()
    return PushElsewhere("this coordinator replica leads and leaves telemetry to the other replicas: push there")


async def telemetry(request: web.Request) -> web.Response:
    coordinator = request.app[COORDINATOR]
    principal = _principal(request)
    require_agent(principal, principal.name if principal else "")
    if refused := _push_elsewhere(coordinator):
        raise refused
    try:
        batch = await _message(request, fleet_pb2.TelemetryBatch)
        require_agent(principal, batch.host)
        ack = await coordinator.hosts.push(batch)
    except InvalidRequest:
        coordinator.metrics.telemetry_rejected.inc()
        raise
    return _json({"accepted": ack.accepted, "reregister": ack.reregister})


STREAM_HEARTBEAT = 30.0
"""Seconds of silence after which the coordinator pings a telemetry session (a gone agent's half-open
connection is closed after another as long without a pong)."""


async def telemetry_stream(request: web.Request) -> web.StreamResponse:
    """`GET /v1/telemetry/stream`: a WebSocket session carrying the agent's pushes, one binary
    TelemetryBatch per message, each answered in order by a binary TelemetryAck, or by a text message
    with the error as JSON (`{"error": {"code", "message"}}`, as POST /v1/telemetry would answer it)
    and the session kept. The same checks and the same service as the POST: only the HTTP request
    around each push is gone, which was most of its cost (docs/benchmarks.md)."""
    coordinator = request.app[COORDINATOR]
    principal = _principal(request)
    require_agent(principal, principal.name if principal else "")  # 401/403 before the upgrade
    assert principal is not None
    if refused := _push_elsewhere(coordinator):
        raise refused
    ws = web.WebSocketResponse(heartbeat=STREAM_HEARTBEAT, max_msg_size=MAX_BODY_BYTES, compress=False)
    await ws.prepare(request)
    request.app[SESSIONS].add(ws)
    try:
        async for msg in ws:  # ends at the agent's close, or the heartbeat's
            if msg.type is WSMsgType.BINARY:
                if _push_elsewhere(coordinator):  # became the leader, or a follower came up
                    # Unanswered: the agent POSTs this batch, is refused, and moves to its next URL.
                    await ws.close(code=WSCloseCode.GOING_AWAY, message=b"leader: push to another replica")
                    break
                try:
                    batch = parse_message(msg.data, fleet_pb2.TelemetryBatch, PROTOBUF)
                    require_agent(principal, batch.host)
                    ack = await coordinator.hosts.push(batch)
                except FerrymanError as exc:
                    coordinator.metrics.telemetry_rejected.inc()
                    await ws.send_str(json.dumps(error_body(exc.code, exc.message)))
                    continue
                await ws.send_bytes(ack.SerializeToString())
            elif msg.type is WSMsgType.TEXT:
                coordinator.metrics.telemetry_rejected.inc()
                error = error_body("invalid_request", "the telemetry stream takes binary TelemetryBatch messages only")
                await ws.send_str(json.dumps(error))
    except ConnectionResetError:  # the agent went away while answered: its next push reconnects
        pass
    finally:
        request.app[SESSIONS].discard(ws)
    return ws


async def close_sessions(app: web.Application) -> None:
    """On shutdown: end every telemetry session (1001, going away) so that the server need not wait
    for them; their agents reconnect, to this replica or the next, at their next push."""
    sessions: weakref.WeakSet[web.WebSocketResponse] = app[SESSIONS]
    for ws in list(sessions):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"coordinator shutting down")


# ----- the layer tracker (agents; ops may look)


async def announce_layers(request: web.Request) -> web.Response:
    principal = _principal(request)
    require_agent(principal, principal.name if principal else "")
    msg = await _message(request, fleet_pb2.LayerAnnouncement)
    require_agent(principal, msg.host)
    request.app[COORDINATOR].layers.announce(msg)
    return _json({})


async def layer_holders(request: web.Request) -> web.Response:
    principal = _principal(request)
    if principal is None or principal.role is not Role.OPS:
        require_agent(principal, principal.name if principal else "")
    msg = await _message(request, fleet_pb2.LayerHoldersRequest)
    asking = principal.name if principal is not None and principal.role is not Role.OPS else ""
    holders = await request.app[COORDINATOR].layers.holders(list(msg.digests), asking)
    return _json(to_json(holders, defaults=True))


async def registry_events(request: web.Request) -> web.Response:
    """`POST /v1/registry/events`: a registry's notification envelope (docker-registry's
    `notifications` endpoint, with an ops bearer token in its `headers`). A push of a new image of a
    repository the fleet runs is taken as a release (coordinator/registry_events.py); a body that is
    no envelope is refused whole (400) and changes nothing."""
    _ops(request)
    return _json(request.app[COORDINATOR].warm.registry_events(await read_object(request)))


# ----- ops: hosts


async def list_hosts(request: web.Request) -> web.Response:
    _ops(request)
    coordinator = request.app[COORDINATOR]
    now = coordinator.clock()
    predictions = await coordinator.store.latest_predictions()
    out = []
    for host in await coordinator.hosts.all():
        out.append(await _host_view(coordinator, host.to_dict(), now, predictions))
    return _json({"hosts": out})


async def _host_view(coordinator: Coordinator, host: dict[str, Any], now: float, predictions: Any) -> dict[str, Any]:
    name = host["name"]
    reserved = [r for r in await coordinator.store.list_reservations(now) if r.host == name]
    host["reserved"] = sum((r.capacity for r in reserved), Capacity()).to_dict()
    host["free"] = (await coordinator.store.free_capacity(name, now)).to_dict()
    prediction = predictions.get(name)
    host["drain_probability"] = prediction.probability if prediction else None
    host["model_version"] = prediction.model_version if prediction else None
    return host


async def get_host(request: web.Request) -> web.Response:
    _ops(request)
    coordinator = request.app[COORDINATOR]
    host = await coordinator.hosts.get(_host_name(request))
    view = await _host_view(
        coordinator, host.to_dict(), coordinator.clock(), await coordinator.store.latest_predictions()
    )
    view["telemetry_samples"] = len(await coordinator.store.telemetry(host.name))
    view["drains"] = [d.to_dict() for d in await coordinator.store.list_drains(host.name)]
    view["decisions"] = [d.to_dict() for d in await coordinator.store.list_decisions(host.name, limit=50)]
    return _json(view)


def _wait_seconds(request: web.Request) -> float | None:
    raw = request.query.get("wait")
    if raw is None:
        return None
    if raw in ("", "true"):  # not "1": that is one second
        return DEFAULT_WAIT
    try:
        value = float(raw)
    except ValueError:
        raise InvalidRequest(f"wait: expected seconds or 1/true, got {raw!r}") from None
    if not 0 < value <= MAX_WAIT:
        raise InvalidRequest(f"wait: must be within (0, {MAX_WAIT}] seconds")
    return value


async def drain_host(request: web.Request) -> web.Response:
    principal = _ops(request)
    coordinator = request.app[COORDINATOR]
    name = _host_name(request)
    wait = _wait_seconds(request)
    drain = await coordinator.hosts.drain(name, f"ops:{principal.name}")
    await coordinator.policy.plan(name)
    if wait is None:
        return _json({"drain": drain.to_dict(), "host": (await coordinator.hosts.get(name)).to_dict()}, status=202)
    host = await coordinator.policy.wait_drained(name, wait)
    return _json({"drain": drain.to_dict(), "host": host.to_dict()}, status=200 if host.state == "drained" else 202)


async def uncordon_host(request: web.Request) -> web.Response:
    principal = _ops(request)
    host = await request.app[COORDINATOR].hosts.uncordon(_host_name(request), f"ops:{principal.name}")
    return _json(host.to_dict())


# ----- ops: migrations


async def start_migration(request: web.Request) -> web.Response:
    principal = _ops(request)
    body = await read_object(request)
    check_keys(body, {"container", "to", "mode"}, {"container"}, "body")
    container = str_field(body, "container", "body")
    assert container is not None
    check_container_id(container)
    to = str_field(body, "to", "body", optional=True) or AUTO
    if to != AUTO:
        try:
            validate_name(to)
        except Exception as exc:
            raise InvalidRequest(f'body.to: expected "auto" or a host name, got {to!r}') from exc
    mode = str_field(body, "mode", "body", optional=True)
    if mode is not None and mode not in MIGRATION_MODES:
        raise InvalidRequest(f"body.mode: expected one of {', '.join(MIGRATION_MODES)}, got {mode!r}")
    migration = await request.app[COORDINATOR].migrations.request(
        container, to, mode=mode, requested_by=principal.name, reason="manual"
    )
    resp = _json(migration.to_dict(), status=202)
    resp.headers["Location"] = f"/v1/migrations/{migration.id}"
    return resp


async def list_migrations(request: web.Request) -> web.Response:
    _ops(request)
    return _json({"migrations": [m.to_dict() for m in await request.app[COORDINATOR].migrations.all()]})


async def get_migration(request: web.Request) -> web.Response:
    _ops(request)
    migration = await request.app[COORDINATOR].migrations.get(request.match_info["id"])
    return _json(migration.to_dict())


# ----- ops: predictions, decisions, reservations


async def list_predictions(request: web.Request) -> web.Response:
    _ops(request)
    coordinator = request.app[COORDINATOR]
    model = coordinator.predictions.model
    latest = await coordinator.store.latest_predictions()
    return _json(
        {
            "model_version": model.version if model else None,
            "threshold": coordinator.predictions.threshold() if model else None,
            "predictions": [p.to_dict() for _, p in sorted(latest.items())],
        }
    )


async def explain_prediction(request: web.Request) -> web.Response:
    """Why a host has its P(drain): the notice that makes it a fact, or the model's top features."""
    _ops(request)
    coordinator = request.app[COORDINATOR]
    host = await coordinator.hosts.get(_host_name(request))  # 404 for an unknown host
    explanation = coordinator.predictions.explanations.get(host.name)
    decisions = [d.to_dict() for d in await coordinator.store.list_decisions(host.name, limit=10)]
    body: dict[str, Any] = (
        explanation.to_dict() if explanation is not None else {"host": host.name, "explanation": None}
    )
    body["notices"] = [n.to_dict() for n in coordinator.predictions.notices(host.name)]
    body["threshold"] = coordinator.predictions.threshold() if coordinator.predictions.model else None
    body["decisions"] = decisions
    return _json(body)


def _model_view(coordinator: Coordinator) -> dict[str, Any]:
    predictions = coordinator.predictions
    return {
        "active": predictions.model.version if predictions.model else None,
        "previous": predictions.previous.version if predictions.previous else None,
        "threshold": predictions.threshold() if predictions.model else None,
    }


async def get_model(request: web.Request) -> web.Response:
    _ops(request)
    return _json(_model_view(request.app[COORDINATOR]))


async def activate_model(request: web.Request) -> web.Response:
    _ops(request)
    body = await read_object(request)
    check_keys(body, {"path"}, {"path"}, "body")
    path = str_field(body, "path", "body")
    assert path is not None
    coordinator = request.app[COORDINATOR]
    await coordinator.predictions.activate(path)
    return _json(_model_view(coordinator))


async def rollback_model(request: web.Request) -> web.Response:
    _ops(request)
    coordinator = request.app[COORDINATOR]
    await coordinator.predictions.rollback()
    return _json(_model_view(coordinator))


async def retrain_model(request: web.Request) -> web.Response:
    _ops(request)
    coordinator = request.app[COORDINATOR]
    outcome = await coordinator.retrainer.run_once()
    return _json(
        {
            "activated": outcome.activated,
            "reason": outcome.reason,
            "candidate": outcome.candidate,
            "model": _model_view(coordinator),
        }
    )


async def list_decisions(request: web.Request) -> web.Response:
    _ops(request)
    host = request.query.get("host")
    decisions = await request.app[COORDINATOR].store.list_decisions(host, limit=500)
    return _json({"decisions": [d.to_dict() for d in decisions]})


async def list_reservations(request: web.Request) -> web.Response:
    _ops(request)
    return _json({"reservations": [r.to_dict() for r in await request.app[COORDINATOR].reservations.active()]})


def _capacity(body: dict[str, Any]) -> Capacity:
    raw = body.get("capacity")
    if not isinstance(raw, dict):
        raise InvalidRequest(f"body.capacity: expected an object, got {json_type(raw)}")
    # Bounded: the values go to SQLite's INTEGER columns, which overflow at 2**63 (a 500 before).
    return Capacity(**capacity_fields(raw, "body.capacity"))


def _layers(body: dict[str, Any]) -> dict[str, int]:
    raw = body.get("layers") or {}
    limit = CAPACITY_MAX["disk_bytes"]
    if not isinstance(raw, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= limit for v in raw.values()
    ):
        raise InvalidRequest(f"body.layers: expected an object of layer digest -> size in bytes (0..{limit})")
    check_digests(list(raw), "body.layers")
    return dict(raw)


async def place_reservation(request: web.Request) -> web.Response:
    """Place and reserve: the best eligible host (`host: "auto"`) or the one named."""
    _ops(request)
    body = await read_object(request)
    check_keys(body, {"capacity", "host", "ttl", "purpose", "image", "layers"}, {"capacity"}, "body")
    host = str_field(body, "host", "body", optional=True) or AUTO
    ttl = positive_field(body, "ttl", "body", integer=False)
    purpose = str_field(body, "purpose", "body", optional=True) or "ops"
    image = str_field(body, "image", "body", optional=True) or ""
    need = Need(capacity=_capacity(body), layers=_layers(body), image=image)
    placer = request.app[COORDINATOR].placer
    reservation = await placer.place(need, purpose, only=None if host == AUTO else host, ttl=ttl)
    return _json(reservation.to_dict(), status=201)


async def place_start(request: web.Request) -> web.Response:
    """A new container's host: the least predicted time to running (coordinator/costs.py), reserved."""
    _ops(request)
    body = await read_object(request)
    check_keys(body, {"capacity", "layers", "ttl", "purpose"}, {"capacity", "layers"}, "body")
    ttl = positive_field(body, "ttl", "body", integer=False)
    purpose = str_field(body, "purpose", "body", optional=True) or "new container"
    need = Need(capacity=_capacity(body), layers=_layers(body))
    placement = await request.app[COORDINATOR].placer.place_start(need, purpose, ttl=ttl)
    return _json(placement.to_dict(), status=201)


async def start_container(request: web.Request) -> web.Response:
    """Place a new container by predicted time to running and start it there (coordinator/starts.py)."""
    _ops(request)
    body = await read_object(request)
    check_keys(body, {"container", "capacity", "layers", "ttl"}, {"container"}, "body")
    spec = body["container"]
    if not isinstance(spec, dict):
        raise InvalidRequest(f"body.container: expected the agent's container spec (an object), got {json_type(spec)}")
    cid = str_field(spec, "id", "body.container")
    assert cid is not None
    check_container_id(cid)
    if "reservation" in spec:
        raise InvalidRequest("body.container.reservation: the coordinator makes the reservation")
    layers = _layers(body) if "layers" in body else _composition_layers(spec)
    capacity = _capacity(body) if "capacity" in body else _spec_capacity(spec)
    ttl = positive_field(body, "ttl", "body", integer=False)
    started = await request.app[COORDINATOR].starts.start(spec, Need(capacity, layers, str(spec.get("image", ""))), ttl)
    return _json(started, status=201)


def _composition_layers(spec: dict[str, Any]) -> dict[str, int]:
    """digest -> size from a composition's nodes (the agent validates the composition itself)."""
    composition = spec.get("composition")
    if not isinstance(composition, dict):
        return {}
    nodes = composition.get("nodes")
    if not isinstance(nodes, list):
        raise InvalidRequest("body.container.composition.nodes: expected an array")
    layers = {}
    for i, node in enumerate(nodes):
        digest, size = (node.get("digest"), node.get("size")) if isinstance(node, dict) else (None, None)
        if not isinstance(digest, str) or not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidRequest(f"body.container.composition.nodes[{i}]: needs a digest and a size")
        layers[digest] = size
    check_digests(list(layers), "body.container.composition.nodes")
    return layers


def _spec_capacity(spec: dict[str, Any]) -> Capacity:
    """What the container's limits ask for; a small default where it sets none."""
    raw = spec.get("resources")
    resources: dict[str, Any] = raw if isinstance(raw, dict) else {}
    cpus, memory = resources.get("cpus"), resources.get("memory")
    cpu_millis = int(cpus * 1000) if isinstance(cpus, int | float) and not isinstance(cpus, bool) and cpus > 0 else 100
    memory_bytes = memory if isinstance(memory, int) and not isinstance(memory, bool) and memory > 0 else 64 << 20
    return Capacity(cpu_millis, memory_bytes, 0)


async def release_reservation(request: web.Request) -> web.Response:
    _ops(request)
    released = await request.app[COORDINATOR].reservations.release(request.match_info["id"])
    if released is None:
        raise web.HTTPNotFound(text=f"no reservation {request.match_info['id']!r}")
    return web.Response(status=204)


# ----- ops: the catalog (coordinator/catalog/, docs/deployments.md)


def _entry_name(request: web.Request) -> str:
    return check_catalog_name(request.match_info["name"])


def _entry_version(request: web.Request) -> str:
    return check_catalog_version(request.match_info["version"])


async def list_catalog(request: web.Request) -> web.Response:
    _ops(request)
    catalog = await request.app[COORDINATOR].catalog.catalog()
    return _json({"revision": catalog.revision, "entries": [e.to_dict() for e in catalog.entries]})


async def register_catalog_entry(request: web.Request) -> web.Response:
    principal = _ops(request)
    registered = await request.app[COORDINATOR].catalog.register(await read_object(request), principal.name)
    entry = registered.entry
    resp = _json(entry.to_dict(), status=201 if registered.created else 200)
    resp.headers["Location"] = f"/v1/catalog/{entry.name}/versions/{quote(entry.version, safe='')}"
    return resp


async def show_catalog_name(request: web.Request) -> web.Response:
    _ops(request)
    return _json((await request.app[COORDINATOR].catalog.show(_entry_name(request))).to_dict())


async def show_catalog_entry(request: web.Request) -> web.Response:
    _ops(request)
    view = await request.app[COORDINATOR].catalog.show(_entry_name(request), _entry_version(request))
    return _json(view.to_dict())


async def remove_catalog_name(request: web.Request) -> web.Response:
    _ops(request)
    removed = await request.app[COORDINATOR].catalog.remove(_entry_name(request))
    return _json({"removed": [e.id for e in removed]})


async def remove_catalog_entry(request: web.Request) -> web.Response:
    _ops(request)
    removed = await request.app[COORDINATOR].catalog.remove(_entry_name(request), _entry_version(request))
    return _json({"removed": [e.id for e in removed]})


async def plan_catalog_entry(request: web.Request) -> web.Response:
    _ops(request)
    raw = request.query.get("version")
    version = check_catalog_version(raw) if raw else None
    layout = await request.app[COORDINATOR].catalog.plan(_entry_name(request), version)
    return _json(preview(layout))


async def catalog_schema(request: web.Request) -> web.Response:
    return web.Response(body=request.app[COORDINATOR].catalog.schema, content_type="application/schema+json")


# ----- ops: deployments (coordinator/deployments/, docs/deployments.md)

DEPLOYMENT_ID_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,79}")


def _deployment_id(request: web.Request) -> str:
    raw = request.match_info["id"]
    if not DEPLOYMENT_ID_RE.fullmatch(raw):
        raise InvalidRequest(f"invalid deployment id {raw!r}")
    return raw


async def _deployment_answer(request: web.Request, deployment_id: str, accepted: bool) -> web.Response:
    """The record; with ?wait=S once the running deploy or undeploy ended (200), or 202 if not yet."""
    service = request.app[COORDINATOR].deployments
    wait = _wait_seconds(request)
    if wait is not None:
        record = await service.wait(deployment_id, wait)
        accepted = record.state.value not in ("HEALTHY", "FAILED", "REMOVED")
    else:
        record = await service.get(deployment_id)
    resp = _json(record.to_dict(), status=202 if accepted else 200)
    resp.headers["Location"] = f"/v1/deployments/{record.id}"
    return resp


async def create_deployment(request: web.Request) -> web.Response:
    principal = _ops(request)
    body = await read_object(request)
    check_keys(body, {"image"}, {"image"}, "body")
    ref = str_field(body, "image", "body")
    assert ref is not None
    name, version = parse_catalog_ref(ref)
    record = await request.app[COORDINATOR].deployments.deploy(name, version, principal.name)
    return await _deployment_answer(request, record.id, accepted=True)


async def list_deployments(request: web.Request) -> web.Response:
    _ops(request)
    records = await request.app[COORDINATOR].deployments.all()
    return _json({"deployments": [r.to_dict() for r in records]})


async def get_deployment(request: web.Request) -> web.Response:
    _ops(request)
    return await _deployment_answer(request, _deployment_id(request), accepted=False)


async def delete_deployment(request: web.Request) -> web.Response:
    _ops(request)
    record = await request.app[COORDINATOR].deployments.undeploy(_deployment_id(request))
    return await _deployment_answer(request, record.id, accepted=True)


async def scale_component(request: web.Request) -> web.Response:
    """Scale a component to `replicas` copies behind its service address (202; `?wait=S`: 200 once
    done, the record either way)."""
    _ops(request)
    deployment_id = _deployment_id(request)
    body = await read_object(request)
    check_keys(body, {"replicas", "drain_timeout", "standbys"}, {"replicas"}, "body")
    replicas = body["replicas"]
    if not isinstance(replicas, int) or isinstance(replicas, bool):
        raise InvalidRequest("replicas: expected an integer")
    drain = body.get("drain_timeout")
    if drain is not None and (not isinstance(drain, int | float) or isinstance(drain, bool)):
        raise InvalidRequest("drain_timeout: expected a number of seconds")
    standbys = body.get("standbys")
    if standbys is not None and (not isinstance(standbys, int) or isinstance(standbys, bool)):
        raise InvalidRequest("standbys: expected an integer")
    service = request.app[COORDINATOR].replicas
    record = await service.scale(deployment_id, request.match_info["name"], replicas, drain, standbys)
    wait = _wait_seconds(request)
    accepted = True
    if wait is not None:
        record = await service.wait(deployment_id, wait)
        accepted = service.scaling(deployment_id)
    resp = _json(record.to_dict(), status=202 if accepted else 200)
    resp.headers["Location"] = f"/v1/deployments/{record.id}"
    return resp


async def component_behaviour(request: web.Request) -> web.Response:
    """A component's time series: cgroup usage per host and sample, balanced traffic (docs/deployments.md)."""
    _ops(request)
    coordinator = request.app[COORDINATOR]
    record = await coordinator.deployments.get(_deployment_id(request))
    return _json(coordinator.replicas.behaviour(record, request.match_info["name"]))


# ----- ops: scaling (coordinator/scaling/, docs/scaling.md)


async def explain_scaling(request: web.Request) -> web.Response:
    """Per upstream/downstream pair of a deployment: the leading metrics, their lags and confidence."""
    _ops(request)
    return _json(await request.app[COORDINATOR].scaling.explain(_deployment_id(request)))


async def scaling_status(request: web.Request) -> web.Response:
    """Per downstream component, the last predictive scaling decision of this coordinator."""
    _ops(request)
    return _json(await request.app[COORDINATOR].scaling.status(_deployment_id(request)))


async def set_scaling_policy(request: web.Request) -> web.Response:
    """Which policy the leader follows for a deployment: predictive, reactive (HPA-like) or off."""
    _ops(request)
    body = await read_object(request)
    check_keys(body, {"policy"}, {"policy"}, "body")
    if not isinstance(body["policy"], str):
        raise InvalidRequest("policy: expected a string")
    return _json(await request.app[COORDINATOR].scaling.set_policy(_deployment_id(request), body["policy"]))


async def scaling_history(request: web.Request) -> web.Response:
    """The predictive scaling decisions kept for a deployment, each with its inputs, oldest first."""
    _ops(request)
    return _json(await request.app[COORDINATOR].scaling.history(_deployment_id(request)))


# ----- ops: chains (coordinator/chains/, docs/chains.md)

CHAIN_ID_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,79}")


def _chain_id(request: web.Request) -> str:
    raw = request.match_info["id"]
    if not CHAIN_ID_RE.fullmatch(raw):
        raise InvalidRequest(f"invalid chain id {raw!r}")
    return raw


async def _chain_answer(
    request: web.Request, chain_id: str, until: frozenset[ChainState], past: int = 0
) -> web.Response:
    """The record; with ?wait=S once it is in one of `until` (past `past` history entries) or
    ended (200), or 202 if not yet."""
    service = request.app[COORDINATOR].chains
    wait = _wait_seconds(request)
    record = await service.get(chain_id) if wait is None else await service.wait(chain_id, wait, until, past)
    done = record.state in CHAIN_TERMINAL or (record.state in until and len(record.history) > past)
    resp = _json(record.to_dict(), status=200 if done and wait is not None else 202)
    resp.headers["Location"] = f"/v1/chains/{record.id}"
    return resp


async def chain_schema(request: web.Request) -> web.Response:
    schema = request.app[COORDINATOR].chains.validator.schema_bytes
    return web.Response(body=schema, content_type="application/schema+json")


async def run_chain(request: web.Request) -> web.Response:
    principal = _ops(request)
    record = await request.app[COORDINATOR].chains.run(await read_object(request), principal.name)
    return await _chain_answer(request, record.id, frozenset({ChainState.RUNNING}))


async def list_chains(request: web.Request) -> web.Response:
    _ops(request)
    records = await request.app[COORDINATOR].chains.all()
    return _json({"chains": [r.to_dict() for r in records]})


async def get_chain(request: web.Request) -> web.Response:
    _ops(request)
    record = await request.app[COORDINATOR].chains.get(_chain_id(request))
    return _json(record.to_dict())


async def advance_chain(request: web.Request) -> web.Response:
    _ops(request)
    record = await request.app[COORDINATOR].chains.advance(_chain_id(request))
    return await _chain_answer(request, record.id, frozenset({ChainState.RUNNING}), past=len(record.history))


async def abort_chain(request: web.Request) -> web.Response:
    _ops(request)
    record = await request.app[COORDINATOR].chains.abort(_chain_id(request))
    return await _chain_answer(request, record.id, frozenset())


# ----- plumbing


async def healthz(request: web.Request) -> web.Response:
    coordinator = request.app[COORDINATOR]
    election = coordinator.election
    leader = "" if election is None else election.leader
    return _json(
        {
            "status": "ok",
            "role": coordinator.role,
            "acting": coordinator.acting(),
            "leader": leader,
            "takes_pushes": coordinator.takes_pushes(),
        }
    )


async def metrics(request: web.Request) -> web.Response:
    if _principal(request) is None:
        require_ops(None)
    coordinator = request.app[COORDINATOR]
    coordinator.metrics.set_hosts(await coordinator.hosts.all())
    # Off the loop: at 10 000 hosts the text is some 0.6 MB, 60 ms of rendering on a quiet core
    # (the registry's own locks make it safe in a thread).
    body = await asyncio.to_thread(generate_latest, coordinator.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI], content_type="application/yaml")
