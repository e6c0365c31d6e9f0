"""ferryctl's predictive scaling: `scaling explain DEPLOYMENT`.

Through the coordinator (docs/scaling.md, "Explain"): for each upstream/downstream pair of the
deployment, the upstream metrics that lead the downstream ones, by how many seconds, and how sure;
or how much more history the pair needs.
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


async def run(client: Requester, args: argparse.Namespace, out: Console) -> int:
    """One scaling command against the coordinator; the exit code."""
    data = await client.request("GET", f"/v1/scaling/{quote(args.id, safe='')}/explain")

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
