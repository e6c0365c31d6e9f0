"""ferryctl's deployments: `deploy IMAGE`, `deployments`, `undeploy ID`, `deployment status ID`,
`scale ID COMPONENT N`.

All through the coordinator (docs/deployments.md, "Deploying"). `deploy` and `undeploy` wait for
the outcome (`--wait SECONDS`, default 600; `--no-wait` returns at once) and exit 8 when the
deployment failed (it was rolled back: nothing of it runs) or did not get there in time.
"""

from __future__ import annotations

import argparse
from typing import Any, Protocol
from urllib.parse import quote

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from agent.ctl import render
from agent.ctl.exits import Exit

DEFAULT_WAIT = 600.0
COMMANDS = frozenset({"deploy", "deployments", "undeploy", "deployment", "scale"})


class Requester(Protocol):
    async def request(
        self, method: str, path: str, *, params: dict[str, str] | None = None, body: Any = None
    ) -> Any: ...


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"must be within (0, 3600] seconds, got {text!r}")
    return value


def _wait_options(p: argparse.ArgumentParser, what: str) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--wait",
        type=_seconds,
        default=DEFAULT_WAIT,
        metavar="SECONDS",
        help=f"how long to wait until it is {what} (default {DEFAULT_WAIT:g} s)",
    )
    g.add_argument("--no-wait", action="store_true", help="return once the coordinator accepted it")


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("deploy", help="deploy a catalog image and everything it requires, health-gated, all or nothing")
    p.add_argument("image", metavar="NAME[@VERSION]")
    _wait_options(p, "healthy or failed")
    sub.add_parser("deployments", help="the coordinator's deployments and their states")
    p = sub.add_parser("undeploy", help="remove a deployment: its components in the reverse start order")
    p.add_argument("id")
    _wait_options(p, "removed")
    p = sub.add_parser("scale", help="run N replicas of a deployment's component behind its service address")
    p.add_argument("id", metavar="DEPLOYMENT")
    p.add_argument("component", metavar="COMPONENT")
    p.add_argument("replicas", type=int, metavar="N")
    p.add_argument("--drain-timeout", type=_seconds, metavar="SECONDS", help="how long a replica scaled in may drain")
    p.add_argument("--standbys", type=int, metavar="N", help="warm standbys (started, frozen) to keep beside them")
    _wait_options(p, "scaled")
    p = sub.add_parser("deployment", help="one deployment: `deployment status ID`")
    actions = p.add_subparsers(dest="deployment_command", metavar="SUBCOMMAND")
    q = actions.add_parser("status", help="a deployment's state, components, hosts and addresses")
    q.add_argument("id")


def _path(deployment_id: str) -> str:
    return f"/v1/deployments/{quote(deployment_id, safe='')}"


def _params(args: argparse.Namespace) -> dict[str, str] | None:
    return None if args.no_wait else {"wait": f"{args.wait:g}"}


async def run(client: Requester, args: argparse.Namespace, out: Console) -> int:
    """One deployments command against the coordinator; the exit code."""
    match args.command:
        case "deploy":
            record = await client.request("POST", "/v1/deployments", params=_params(args), body={"image": args.image})
            render.show(args, record, lambda: render.say_all(details(record)))
            return _outcome(record, args.no_wait, "HEALTHY")
        case "undeploy":
            record = await client.request("DELETE", _path(args.id), params=_params(args))
            render.show(args, record, lambda: render.say_all(details(record)))
            return _outcome(record, args.no_wait, "REMOVED")
        case "scale":
            body: dict[str, Any] = {"replicas": args.replicas}
            if args.drain_timeout is not None:
                body["drain_timeout"] = args.drain_timeout
            if args.standbys is not None:
                body["standbys"] = args.standbys
            path = f"{_path(args.id)}/components/{quote(args.component, safe='')}/scale"
            record = await client.request("POST", path, params=_params(args), body=body)
            render.show(args, record, lambda: render.say_all(details(record)))
            return Exit.OK
        case "deployment":
            record = await client.request("GET", _path(args.id))
            render.show(args, record, lambda: render.say_all(details(record)))
            return Exit.NOT_DEPLOYED if record["state"] == "FAILED" else Exit.OK
        case _:
            data = await client.request("GET", "/v1/deployments")
            render.show(args, data, lambda: render.print_table(out, deployments_table(data["deployments"])))
    return Exit.OK


def _outcome(record: dict[str, Any], no_wait: bool, wanted: str) -> int:
    if no_wait:
        return Exit.OK
    return Exit.OK if record.get("state") == wanted else Exit.NOT_DEPLOYED


def deployments_table(records: list[dict[str, Any]]) -> Table:
    table = render.new_table("ID", "IMAGE", "STATE", "COMPONENTS", "CREATED", "ERROR")
    for r in records:
        components = r.get("components") or []
        table.add_row(
            escape(str(r.get("id", ""))),
            escape(str(r.get("root", ""))),
            escape(str(r.get("state", ""))),
            str(len(components)),
            render.clock_time(r.get("created_at"), short=True),
            escape(str(r.get("error") or "-")),
        )
    return table


def details(record: dict[str, Any]) -> list[str]:
    """`deployment status`: the state, why it failed, and each component where it runs."""
    state = record.get("state", "?")
    if state == "STARTING":
        state = f"STARTING (level {record.get('level', 0)})"
    lines = [f"deployment {record.get('id')} of {record.get('root')}: {state}"]
    if record.get("error"):
        lines.append(f"  failed: {record.get('failed_component') or '-'}: {record['error']}")
    for c in record.get("components") or []:
        where = f"on {c['host']}" if c.get("host") else "not placed"
        line = f"  level {c.get('level')}: {c.get('name')} ({c.get('entry')}) {c.get('state')} {where}"
        line += f" at {c.get('address')}"
        if c.get("replicas"):
            serving = [r for r in c["replicas"] if r.get("state") == "serving"]
            line += f", {1 + len(serving)} replicas serving"
        if c.get("waiting_on"):
            line += f", waiting on {', '.join(c['waiting_on'])}"
        if c.get("left_behind"):
            line += ", left behind (removal retried until its host answers)"
        if c.get("error") and c.get("name") != record.get("failed_component"):
            line += f": {c['error']}"
        lines.append(line)
        for r in c.get("replicas") or []:
            where = r.get("host") or "-"
            lines.append(f"    replica {r.get('index')}: {r.get('state')} on {where} at {r.get('address')}")
    return lines
