"""ferryctl's migration commands: `migrate`, `migrations`, `migrations show` and `migrations watch`.

`migrate` starts the migration with the streaming POST and follows it to the end. Interrupting
ferryctl (or losing the connection) does not stop the migration: it runs in the agent.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from typing import Any

from rich.console import Console

from agent.ctl import render
from agent.ctl.args import positive_int
from agent.ctl.client import AgentClient, ApiError
from agent.ctl.exits import Exit


def add_parsers(sub: Any) -> None:
    """Add `migrate` and `migrations` to ferryctl's subcommands (`sub` is argparse's subparsers action)."""
    p = sub.add_parser("migrate", help="live-migrate a running container to another host")
    p.add_argument("container")
    p.add_argument("--to", dest="target", required=True, metavar="HOST", help="the peer agent's host name")
    p.add_argument("--downtime-target", type=positive_int, metavar="MS", help="freeze budget in ms (agent default 300)")
    p.add_argument("--max-iterations", type=positive_int, metavar="N", help="pre-copy rounds at most (default 8)")
    p.add_argument(
        "--mode",
        choices=("auto", "precopy", "lazy", "hybrid"),
        help="precopy, lazy (post-copy), hybrid, or auto: the fastest the hosts' CRIU allows (agent default)",
    )

    p = sub.add_parser("migrations", help="list migrations, or show one")
    actions = p.add_subparsers(dest="migrations_command", metavar="SUBCOMMAND")
    show = actions.add_parser("show", help="a migration's details")
    show.add_argument("id")
    watch = actions.add_parser("watch", help="follow a migration to its end (the exit code of `migrate`)")
    watch.add_argument("id")


def _is_error_line(line: dict[str, Any]) -> bool:
    """The stream's in-band failure, told apart from records by shape: records carry an `id`, and
    their `error` is a string, not an object."""
    return "id" not in line and isinstance(line.get("error"), dict)


async def migrate(client: AgentClient, args: argparse.Namespace, err: Console) -> Exit:
    """Run one migration to its end; the exit code (exits.py): OK, NOT_MIGRATED or NEEDS_OPERATOR."""
    spec: dict[str, Any] = {"container": args.container, "target": args.target}
    if args.downtime_target is not None:
        spec["downtime_target_ms"] = args.downtime_target
    if args.max_iterations is not None:
        spec["max_iterations"] = args.max_iterations
    if args.mode is not None:
        spec["mode"] = args.mode
    final: dict[str, Any] | None = None
    last: dict[str, Any] | None = None
    view = render.MigrationView(err, args.container, args.target) if args.progress else None
    try:
        with view if view is not None else contextlib.nullcontext():
            async for line in client.migrate(spec):
                if _is_error_line(line):
                    raise ApiError(str(line["error"].get("code")), str(line["error"].get("message")))
                last = line
                if view is not None:
                    view.update(line)
                if line.get("done"):
                    final = line
                    break
    except asyncio.CancelledError:  # Ctrl-C: only ferryctl stops; say where to follow the migration
        if last is not None:
            err.print(
                f"interrupted; migration {last['id']} goes on in the agent: ferryctl migrations show {last['id']}",
                markup=False,
                highlight=False,
            )
        raise
    if final is None:
        where = f"; it goes on in the agent: ferryctl migrations show {last['id']}" if last else ""
        raise ApiError("stream_ended", f"the agent closed the stream before the migration ended{where}")
    return finish(final, args.json)


def finish(final: dict[str, Any], as_json: bool) -> Exit:
    """Print a finished migration's record (the details, or the JSON); its exit code."""
    if as_json:
        render.print_json(final)
    else:
        for text in render.migration_details(final):
            render.say(text)
    return outcome(final)


def outcome(final: dict[str, Any]) -> Exit:
    """Say on stderr how a finished migration (an agent record) went; its exit code."""
    stats = final.get("stats") or {}
    if final.get("state") == "COMMIT":
        if not stats.get("downtime_target_missed"):
            return Exit.OK
        # Committed: the workload moved, so not a failure to retry; the missed budget is said on
        # stderr and kept in the record (stats.downtime_target_missed) and the metrics.
        target = (final.get("options") or {}).get("downtime_target_ms")
        sys.stderr.write(
            f"warning: downtime_target_missed: the workload was frozen {render.human_ms(stats.get('downtime_ms'))}, "
            f"over its target of {target} ms\n"
        )
        return Exit.OK
    # The ferryctl failure convention (stderr, `error: <code>: <message>`), after the statistics.
    if final.get("state") == "NEEDS_OPERATOR":  # ended undecided: the source keeps its frozen copy
        sys.stderr.write(f"error: needs_operator: {final.get('error') or 'the migration needs the operator'}\n")
        return Exit.NEEDS_OPERATOR
    sys.stderr.write(f"error: rolled_back: {final.get('error') or 'the migration rolled back'}\n")
    return Exit.NOT_MIGRATED


async def migrations(client: AgentClient, args: argparse.Namespace, out: Console, err: Console) -> Exit:
    if args.migrations_command == "watch":
        return await watch(client, args, err)
    if args.migrations_command == "show":
        record = await client.get_migration(args.id)
        if args.json:
            render.print_json(record)
        else:
            for text in render.migration_details(record, history=True):
                render.say(text)
        return Exit.OK
    records = await client.list_migrations()
    if args.json:
        render.print_json({"migrations": records})
    else:
        render.print_table(out, render.migrations_table(records))
    return Exit.OK


async def watch(client: AgentClient, args: argparse.Namespace, err: Console) -> Exit:
    """Follow a running (or finished) migration: each new state on stderr, then its details (with
    --json: the final record, as `migrate` prints it) and the exit code `migrate` would have given."""
    final: dict[str, Any] | None = None
    state = None
    async for line in client.watch_migration(args.id):
        if not args.json and line.get("state") != state:
            err.print(f"{line['id']} {line.get('state')}", markup=False, highlight=False)
        state = line.get("state")
        if line.get("done"):
            final = line
            break
    if final is None:
        raise ApiError("stream_ended", f"the agent closed the stream before migration {args.id} ended")
    return finish(final, args.json)
