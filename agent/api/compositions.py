"""Thin HTTP handlers for composition manifests (agent/composition): parse, assemble, warm, costs.

A manifest is sent as the body (JSON, or YAML with a YAML content type) to `/v1/manifests/parse`
and `/v1/compositions`, and as the `composition` member of a `POST /v1/containers` body.
"""

from __future__ import annotations

from typing import Any, Protocol

from aiohttp import web

from agent.api.responses import json_answer
from agent.composition.manifest import load_text, schema_bytes
from agent.oci import parse_digest
from core.errors import FerrymanError, InvalidRequest
from core.http.validate import check_keys, json_type, read_body, read_object, str_field


class AssemblyLike(Protocol):
    async def resolve(self, document: Any) -> Any: ...
    async def assemble(self, document: Any) -> dict[str, Any]: ...
    async def warm_layer(self, digest: str, ref: str, ttl: float | None = None, model: str = "") -> dict[str, Any]: ...
    def costs_json(self) -> dict[str, Any]: ...


ASSEMBLY = web.AppKey("assembly", AssemblyLike)


class AssemblyUnavailable(FerrymanError):
    code = "assembly_unavailable"
    http_status = 503


def _assembly(request: web.Request) -> AssemblyLike:
    assembly = request.app.get(ASSEMBLY)
    if assembly is None:
        raise AssemblyUnavailable("this agent assembles no compositions")
    return assembly


async def _manifest(request: web.Request) -> Any:
    return load_text(await read_body(request), request.headers.get("Content-Type", ""))


async def parse_manifest(request: web.Request) -> web.Response:
    resolved = await _assembly(request).resolve(await _manifest(request))
    return json_answer(resolved.to_json())


async def assemble(request: web.Request) -> web.Response:
    return json_answer(await _assembly(request).assemble(await _manifest(request)), status=201)


async def manifest_schema(request: web.Request) -> web.Response:
    return web.Response(body=schema_bytes(), headers={"Content-Type": "application/schema+json"})


async def warm_layer(request: web.Request) -> web.Response:
    digest = parse_digest(request.match_info["digest"])
    body = await read_object(request)
    check_keys(body, {"ref", "ttl", "model"}, {"ref"}, "body")
    ref = str_field(body, "ref", "body")
    assert ref is not None
    ttl = body.get("ttl")
    if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int | float)):
        raise InvalidRequest(f"body.ttl: expected a number of seconds, got {json_type(ttl)}")
    model = str_field(body, "model", "body", optional=True) or ""
    if len(model) > 128:
        raise InvalidRequest("body.model: at most 128 characters")
    return json_answer(await _assembly(request).warm_layer(digest, ref, ttl, model))


async def costs(request: web.Request) -> web.Response:
    return json_answer(_assembly(request).costs_json())


async def with_composition(request: web.Request, body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """A `POST /v1/containers` body naming a `composition` (a manifest object) instead of an `image`:
    the composition is assembled here, and the body names its image. Also the assembly's timings
    (None without a composition)."""
    if "composition" not in body:
        return body, None
    if "image" in body:
        raise InvalidRequest("body: give either image or composition, not both")
    document = body["composition"]
    if not isinstance(document, dict):
        raise InvalidRequest(f"body.composition: expected a manifest object, got {json_type(document)}")
    assembled = await _assembly(request).assemble(document)
    kept = ("seconds", "resolve_seconds", "runnable_seconds", "timeline", "layer_costs", "costs_at")
    timings: dict[str, Any] = {k: assembled[k] for k in kept if k in assembled}
    return {**{k: v for k, v in body.items() if k != "composition"}, "image": assembled["image"]}, timings


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/manifests/parse", parse_manifest)
    app.router.add_get("/v1/manifests/schema", manifest_schema)
    app.router.add_post("/v1/compositions", assemble)
    app.router.add_post("/v1/prefetch/layers/{digest}", warm_layer)
    app.router.add_get("/v1/assembly/costs", costs)
