"""ferryctl's `catalog`: the coordinator's catalog of service images and their Dependency Manifests.

`register FILE` sends one entry (a JSON document; `-` reads stdin) as it is: the coordinator
checks it (schema, manifest rules, references, cycles) and answers with every problem it found.
`list`, `show NAME[@VERSION]`, `remove NAME[@VERSION]`, `plan NAME[@VERSION]` and `schema` read or
change the catalog. See docs/deployments.md for the entry format.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import shtab
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from agent.ctl import render
from agent.ctl.client import ApiError
from agent.ctl.exits import Exit
from core.errors import InvalidRequest
from core.ids import parse_catalog_ref

MAX_FILE_BYTES = 1 << 20
"""An entry is a few KiB; the coordinator takes at most 1 MiB in a request."""


class Requester(Protocol):
    async def request(
        self, method: str, path: str, *, params: dict[str, str] | None = None, body: Any = None
    ) -> Any: ...


class CatalogUsageError(Exception):
    """A catalog request that cannot be sent: a bad NAME[@VERSION], a file that is not JSON."""


def add_parser(sub: Any) -> None:
    p = sub.add_parser("catalog", help="service images and their dependency manifests: register, list, show, remove")
    actions = p.add_subparsers(dest="catalog_command", metavar="SUBCOMMAND")
    actions.add_parser("list", help="every entry, oldest registration first (the default)")
    q = actions.add_parser("register", help="register an entry: an image with its dependency manifest (JSON)")
    q.add_argument("file", help="the entry, a JSON file (- reads stdin)").complete = shtab.FILE  # type: ignore[attr-defined]
    q = actions.add_parser("show", help="an entry's versions and the entries that require it")
    q.add_argument("ref", metavar="NAME[@VERSION]")
    q = actions.add_parser("remove", help="remove every version of NAME, or one; refused while others require it")
    q.add_argument("ref", metavar="NAME[@VERSION]")
    q = actions.add_parser("plan", help="how NAME would deploy now: start levels, volumes, environment")
    q.add_argument("ref", metavar="NAME[@VERSION]")
    actions.add_parser("schema", help="print the JSON Schema of a catalog entry")


def _ref(text: str) -> tuple[str, str | None]:
    try:
        return parse_catalog_ref(text)
    except InvalidRequest as exc:
        raise CatalogUsageError(exc.message) from exc


def _entry_path(name: str, version: str | None) -> str:
    path = f"/v1/catalog/{quote(name, safe='')}"
    return path if version is None else f"{path}/versions/{quote(version, safe='')}"


async def read_document(file: str) -> Any:
    """The JSON document in `file` (`-`: stdin); io_error if it cannot be read, usage if not JSON."""
    try:
        if file == "-":
            raw = await asyncio.to_thread(sys.stdin.buffer.read, MAX_FILE_BYTES + 1)
        else:
            raw = await asyncio.to_thread(_read_head, Path(file))
    except OSError as exc:
        raise ApiError("io_error", f"cannot read {file}: {exc.strerror or exc}") from exc
    if len(raw) > MAX_FILE_BYTES:
        raise CatalogUsageError(f"{file}: larger than {MAX_FILE_BYTES} bytes; a catalog entry is a few KiB")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CatalogUsageError(f"{file}: not a JSON document: {exc}") from exc


def _read_head(path: Path) -> bytes:
    with path.open("rb") as f:
        return f.read(MAX_FILE_BYTES + 1)


async def run(client: Requester, args: argparse.Namespace, out: Console) -> int:
    """`catalog ...` against the coordinator; the exit code."""
    match args.catalog_command:
        case "register":
            entry = await client.request("POST", "/v1/catalog", body=await read_document(args.file))
            render.show(args, entry, lambda: render.say(f"registered {entry['id']} ({entry['image']})"))
        case "show":
            view = await client.request("GET", _entry_path(*_ref(args.ref)))
            render.show(args, view, lambda: render.say_all(entry_details(view)))
        case "remove":
            done = await client.request("DELETE", _entry_path(*_ref(args.ref)))
            render.show(args, done, lambda: render.say_all([f"removed {r}" for r in done["removed"]]))
        case "plan":
            name, version = _ref(args.ref)
            params = {"version": version} if version else None
            layout = await client.request("GET", f"/v1/catalog/{quote(name, safe='')}/plan", params=params)
            render.show(args, layout, lambda: render.say_all(plan_details(layout)))
        case "schema":
            schema = await client.request("GET", "/v1/schemas/catalog-entry.json")
            render.print_json(schema)
        case _:
            data = await client.request("GET", "/v1/catalog")
            render.show(args, data, lambda: render.print_table(out, catalog_table(data["entries"])))
    return Exit.OK


def _check(check: dict[str, Any]) -> str:
    kind = check.get("kind", "?")
    if kind == "exec":
        target = " ".join(check.get("command") or [])
    elif kind == "http":
        target = f":{check.get('port')}{check.get('path', '')}"
    else:
        target = f":{check.get('port')}" + (f" {check['service']}" if check.get("service") else "")
    return f"{kind} {target}"


def catalog_table(entries: list[dict[str, Any]]) -> Table:
    table = render.new_table("NAME", "VERSION", "IMAGE", "REQUIRES", "HEALTH CHECK", "REGISTERED")
    for e in entries:
        manifest = e.get("manifest") or {}
        protocols = manifest.get("data_transfer_protocols") or {}
        requires = ", ".join(
            f"{ref} ({(protocols.get(ref.split('@')[0]) or {}).get('protocol', '?')})"
            for ref in manifest.get("required_images") or []
        )
        table.add_row(
            escape(str(e.get("name", ""))),
            escape(str(e.get("version", ""))),
            escape(str(e.get("image", ""))),
            escape(requires or "-"),
            escape(_check(manifest.get("dependency_health_check") or {})),
            render.clock_time(e.get("registered_at"), short=True),
        )
    return table


def entry_details(view: dict[str, Any]) -> list[str]:
    """`catalog show`: each version with its manifest, then who requires it."""
    lines = []
    for e in view.get("versions", []):
        manifest = e.get("manifest") or {}
        lines.append(f"{e['id']}: {e.get('image', '')}")
        if e.get("description"):
            lines.append(f"  {e['description']}")
        lines.append(f"  registered {render.clock_time(e.get('registered_at'))} by {e.get('registered_by') or '-'}")
        protocols = manifest.get("data_transfer_protocols") or {}
        for ref in manifest.get("required_images") or []:
            transfer = dict(protocols.get(ref.split("@")[0]) or {})
            protocol = transfer.pop("protocol", "?")
            extra = " ".join(f"{k}={v}" for k, v in sorted(transfer.items()))
            lines.append(f"  requires {ref} over {protocol}" + (f" ({extra})" if extra else ""))
        check = manifest.get("dependency_health_check") or {}
        lines.append(
            f"  health check {_check(check)} every {check.get('interval')} s, timeout {check.get('timeout')} s, "
            f"{check.get('retries')} retries, start period {check.get('start_period')} s"
        )
    users = view.get("required_by") or []
    lines.append("required by " + (", ".join(f"{u['id']} ({u['requires']})" for u in users) if users else "nothing"))
    return lines


def plan_details(layout: dict[str, Any]) -> list[str]:
    """`catalog plan`: the start levels, the volumes and co-located groups, the environment."""
    components = layout.get("components") or {}
    lines = [f"deploying {components.get(layout.get('root'), {}).get('id', layout.get('root'))}:"]
    for i, level in enumerate(layout.get("levels") or []):
        lines.append(f"  level {i}: " + ", ".join(f"{components.get(n, {}).get('id', n)}" for n in level))
    lines.append("  teardown: " + " | ".join(", ".join(level) for level in layout.get("teardown") or []))
    for v in layout.get("volumes") or []:
        lines.append(f"  volume {v['name']} at {v['path']}: {', '.join(v['members'])}")
    for group in layout.get("colocated") or []:
        lines.append(f"  one host: {', '.join(group)}")
    for name, env in sorted((layout.get("environment") or {}).items()):
        lines.append(f"  {name}:")
        lines += [f"    {k}={v}" for k, v in sorted(env.items())]
    return lines
