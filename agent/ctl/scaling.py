"""ferryctl's predictive scaling: `scaling explain|status|history DEPLOYMENT`.

Through the coordinator (docs/scaling.md): `explain`, for each upstream/downstream pair of the
deployment, the upstream metrics that lead the downstream ones, by how many seconds, and how sure
(or how much more history the pair needs); `status`, each downstream component's last decision;
`history`, every decision kept, with its inputs.
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

COMMANDS = frozenset({"scaling"})


class Requester(Protocol):
    async def request(
        self, method: str, path: str, *, params: dict[str, str] | None = None, body: Any = None
    ) -> Any: ...


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("scaling", help="predictive scaling of a deployment's components: `scaling explain ID`")
    actions = p.add_subparsers(dest="scaling_command", metavar="SUBCOMMAND", required=True)
    q = actions.add_parser("explain", help="which upstream metrics lead which downstream ones, by what lag")
    q.add_argument("id", metavar="DEPLOYMENT")
    q = actions.add_parser("status", help="each downstream component's last scaling decision")
    q.add_argument("id", metavar="DEPLOYMENT")
    q = actions.add_parser("history", help="the scaling decisions kept for a deployment, with their inputs")
    q.add_argument("id", metavar="DEPLOYMENT")
    q = actions.add_parser("policy", help="follow the predictive, reactive (HPA-like) or no policy for a deployment")
    q.add_argument("id", metavar="DEPLOYMENT")
    q.add_argument("policy", choices=("predictive", "reactive", "off"))


async def run(client: Requester, args: argparse.Namespace, out: Console) -> int:
    """One scaling command against the coordinator; the exit code."""
    path = f"/v1/scaling/{quote(args.id, safe='')}"
    if args.scaling_command == "status":
        data = await client.request("GET", path)
        decisions = list((data.get("components") or {}).values())
        render.show(args, data, lambda: _decisions(out, data, decisions))
        return Exit.OK
    if args.scaling_command == "policy":
        data = await client.request("PUT", f"{path}/policy", body={"policy": args.policy})
        render.show(
            args, data, lambda: render.say(f"deployment {data.get('deployment')}: {data.get('policy')} scaling")
        )
        return Exit.OK
    if args.scaling_command == "history":
        data = await client.request("GET", f"{path}/history")
        render.show(args, data, lambda: _decisions(out, data, data.get("decisions") or []))
        return Exit.OK
    data = await client.request("GET", f"{path}/explain")

    def human() -> None:
        render.say_all(explain_lines(data))
        table = links_table(data.get("pairs") or [])
        if table.row_count:
            render.print_table(out, table)

    render.show(args, data, human)
    return Exit.OK


def explain_lines(data: dict[str, Any]) -> list[str]:
    """A line per pair: its lead into the downstream's CPU, or why there is none."""
    pairs = data.get("pairs") or []
    lines = [f"deployment {data.get('deployment')}: {len(pairs)} upstream/downstream pair(s)"]
    if not pairs:
        lines.append("  no component requires another: nothing leads anything")
    for p in pairs:
        line = f"  {p.get('upstream')} -> {p.get('downstream')}: "
        lead = p.get("lead")
        if p.get("status") != "ok":
            line += str(p.get("message"))
        elif lead:
            line += (
                f"{lead['upstream_metric']} leads cpu by {lead['lag_s']} s "
                f"(r={lead['correlation']:.2f}, Granger p={lead['granger_p']:.2g}) over {p.get('seconds')} s"
            )
        else:
            line += f"{p.get('message')} over {p.get('seconds')} s"
        lines.append(escape(line))
    return lines


def links_table(pairs: list[dict[str, Any]]) -> Table:
    table = render.new_table("UPSTREAM", "METRIC", "DOWNSTREAM", "METRIC", "LAG", "R", "GRANGER P")
    for p in pairs:
        for link in p.get("links") or []:
            table.add_row(
                escape(str(link["upstream"])),
                escape(str(link["upstream_metric"])),
                escape(str(link["downstream"])),
                escape(str(link["downstream_metric"])),
                f"{link['lag_s']} s",
                f"{link['correlation']:.2f}",
                f"{link['granger_p']:.2g}",
            )
    return table


def _decisions(out: Console, data: dict[str, Any], decisions: list[dict[str, Any]]) -> None:
    if not data.get("enabled"):
        render.say(f"deployment {data.get('deployment')}: predictive scaling is off ([scaling] enabled = false)")
        return
    if not decisions:
        render.say(f"deployment {data.get('deployment')}: no scaling decision yet ({data.get('policy', 'predictive')})")
        return
    render.print_table(out, decisions_table(decisions))


def decisions_table(decisions: list[dict[str, Any]]) -> Table:
    table = render.new_table("TIME", "COMPONENT", "ACTION", "TARGET", "NEED NOW", "PREDICTED", "LAG", "REASON")
    for d in decisions:
        inputs = d.get("inputs") or {}
        reason = str(d.get("reason") or "")
        if d.get("applied"):
            reason += f"; {d['applied']}"
        table.add_row(
            render.clock_time(d.get("ts"), short=True),
            escape(str(d.get("component", ""))),
            escape(str(d.get("action", ""))),
            str(d.get("target", "-")),
            f"{inputs['need_now']:.2f}" if "need_now" in inputs else "-",
            f"{inputs['predicted_need']:.2f}" if "predicted_need" in inputs else "-",
            f"{d['lag_s']} s" if "lag_s" in d else "-",
            escape(reason),
        )
    return table
