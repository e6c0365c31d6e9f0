"""ferryctl's chains: `chain run FILE`, `chains`, `chain status ID`, `chain advance ID`, `chain abort ID`.

All through the coordinator (docs/chains.md). FILE is a chain manifest, JSON or YAML (by its
`.yaml`/`.yml` name; `-` reads JSON from stdin), sent as JSON; the coordinator checks it. `run`
waits until the first stage serves (`--wait SECONDS`, default 600; `--no-wait` returns at once),
`advance` until the handover is done or rolled back, `abort` until nothing of the chain runs; each
exits 8 when the chain did not get there (it failed, or a handover rolled back).
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import shtab
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from agent.ctl import render
from agent.ctl.catalog import CatalogUsageError, read_document
from agent.ctl.deployments import _wait_options
from agent.ctl.exits import Exit

COMMANDS = frozenset({"chain", "chains"})


class Requester(Protocol):
    async def request(
        self, method: str, path: str, *, params: dict[str, str] | None = None, body: Any = None
    ) -> Any: ...


def add_parsers(sub: Any) -> None:
    sub.add_parser("chains", help="the coordinator's chains and their states")
    p = sub.add_parser("chain", help="staged workflows with state handover: run, status, advance, abort")
    actions = p.add_subparsers(dest="chain_command", metavar="SUBCOMMAND")
    q = actions.add_parser("run", help="run a chain from its manifest (JSON or YAML)")
    q.add_argument("file", help="the manifest (- reads JSON from stdin)").complete = shtab.FILE  # type: ignore[attr-defined]
    _wait_options(q, "running its first stage")
    q = actions.add_parser("status", help="a chain's state, stages, hosts and handovers")
    q.add_argument("id")
    q = actions.add_parser("advance", help="hand over to the next stage now (past the last one: complete)")
    q.add_argument("id")
    _wait_options(q, "handed over or rolled back")
    q = actions.add_parser("abort", help="stop the chain wherever it is and remove every stage of it")
    q.add_argument("id")
    _wait_options(q, "aborted")


async def read_manifest(file: str) -> Any:
    if file.endswith((".yaml", ".yml")):
        try:
            raw = await asyncio.to_thread(Path(file).read_bytes)
            return yaml.safe_load(raw)
        except OSError as exc:
            raise CatalogUsageError(f"cannot read {file}: {exc.strerror or exc}") from exc
        except yaml.YAMLError as exc:
            raise CatalogUsageError(f"{file}: not a YAML document: {exc}") from exc
    return await read_document(file)


def _path(chain_id: str, action: str = "") -> str:
    return f"/v1/chains/{quote(chain_id, safe='')}" + (f"/{action}" if action else "")


def _params(args: argparse.Namespace) -> dict[str, str] | None:
    return None if args.no_wait else {"wait": f"{args.wait:g}"}


async def run(client: Requester, args: argparse.Namespace, out: Console) -> int:
    """One chains command against the coordinator; the exit code."""
    if args.command == "chains":
        data = await client.request("GET", "/v1/chains")
        render.show(args, data, lambda: render.print_table(out, chains_table(data["chains"])))
        return Exit.OK
    match args.chain_command:
        case "run":
            body = await read_manifest(args.file)
            record = await client.request("POST", "/v1/chains", params=_params(args), body=body)
            render.show(args, record, lambda: render.say_all(details(record)))
            return Exit.OK if args.no_wait or record.get("state") == "RUNNING" else Exit.NOT_DEPLOYED
        case "advance":
            record = await client.request("POST", _path(args.id, "advance"), params=_params(args))
            render.show(args, record, lambda: render.say_all(details(record)))
            if args.no_wait:
                return Exit.OK
            last = (record.get("handovers") or [{}])[-1]
            ok = record.get("state") in ("RUNNING", "COMPLETED") and last.get("outcome") != "rolled_back"
            return Exit.OK if ok else Exit.NOT_DEPLOYED
        case "abort":
            record = await client.request("POST", _path(args.id, "abort"), params=_params(args))
            render.show(args, record, lambda: render.say_all(details(record)))
            return Exit.OK if args.no_wait or record.get("state") == "ABORTED" else Exit.NOT_DEPLOYED
        case _:
            record = await client.request("GET", _path(args.id))
            render.show(args, record, lambda: render.say_all(details(record)))
            return Exit.NOT_DEPLOYED if record["state"] == "FAILED" else Exit.OK


def chains_table(records: list[dict[str, Any]]) -> Table:
    table = render.new_table("ID", "STATE", "SERVING", "ADDRESS", "HANDOVERS", "CREATED", "ERROR")
    for r in records:
        handovers = r.get("handovers") or []
        table.add_row(
            escape(str(r.get("id", ""))),
            escape(str(r.get("state", ""))),
            escape(str(r.get("serving") or "-")),
            escape(str(r.get("address", ""))),
            str(sum(h.get("outcome") == "done" for h in handovers)),
            render.clock_time(r.get("created_at"), short=True),
            escape(str(r.get("error") or "-")),
        )
    return table


def details(record: dict[str, Any]) -> list[str]:
    """`chain status`: the state, the serving stage, each run and each handover."""
    state = record.get("state", "?")
    if record.get("target"):
        state = f"{state} ({record.get('serving')} -> {record['target']})"
    lines = [f"chain {record.get('id')} at {record.get('address')}: {state}"]
    if record.get("serving"):
        lines.append(f"  serving: {record['serving']}")
    if record.get("error"):
        lines.append(f"  error: {record['error']}")
    lines.extend(_prediction_lines(record))
    for run in record.get("runs") or []:
        where = f"on {run['host']}" if run.get("host") else "not placed"
        line = f"  stage {run.get('stage')}: {run.get('container')} {run.get('state')} {where}"
        if run.get("error"):
            line += f": {run['error']}"
        lines.append(line)
    for h in record.get("handovers") or []:
        outcome = h.get("outcome") or "running"
        line = f"  handover {h.get('source')} -> {h.get('target')}: {outcome}, {h.get('state_bytes', 0)} bytes"
        if h.get("failed_phase"):
            line += f", failed in {h['failed_phase']}: {h.get('error')}"
        lines.append(line)
    return lines


def _prediction_lines(record: dict[str, Any]) -> list[str]:
    """The next stage's predicted usage and the capacity pre-allocated for it (docs/chains.md)."""
    lines = []
    p = record.get("prediction") or {}
    if p:
        lines.append(
            f"  predicted: {p.get('stage')} {p.get('cpu_millis')} millicores, "
            f"{render.human_size(p.get('memory_bytes'))} (from {p.get('basis')})"
        )
        if p.get("request_rate") is not None:
            growth = p.get("rate_growth")
            versus = f", {growth:.2f}x its last run's" if growth is not None else ""
            lines.append(f"  serving at: {p['request_rate']:.1f} packets/s in{versus}")
    held = record.get("preallocation") or {}
    if held:
        lines.append(
            f"  pre-allocated: {held.get('stage')} on {held.get('host')}: {held.get('cpu_millis')} millicores, "
            f"{render.human_size(held.get('memory_bytes'))} (reservation {held.get('reservation')})"
        )
    return lines
