"""`ferryctl`: a thin command line over the agent's HTTP API.

Human output goes to stdout as tables; progress bars go to stderr; `--json` prints the API's JSON.
Failures print `error: <code>: <message>` to stderr and exit 1 (2 for usage errors).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import secrets
import sys
from typing import Any

from rich.console import Console

from agent.ctl import certs, fleet, migrate, render
from agent.ctl.client import DEFAULT_AGENT, ENV_AGENT, AgentClient, ApiError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2

_MEMORY_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)", re.IGNORECASE)
_MEMORY_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class UsageError(Exception):
    """A bad argument value that argparse's types did not catch."""


def parse_memory(text: str) -> int:
    """Bytes from '512', '64M', '1.5G', '64MiB' (binary units, like docker)."""
    m = _MEMORY_RE.fullmatch(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"invalid memory size {text!r} (use e.g. 64M, 1G or bytes)")
    value = int(float(m.group(1)) * _MEMORY_UNITS[m.group(2).lower()])
    if value <= 0:
        raise argparse.ArgumentTypeError(f"memory size must be positive, got {text!r}")
    return value


def parse_cpus(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid cpu count {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"cpu count must be positive, got {text!r}")
    return value


def parse_pairs(items: list[str] | None, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{what} {item!r}: expected KEY=VALUE")
        out[key] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ferryctl", description="Control a ferryman agent.")
    parser.add_argument(
        "--agent",
        default=None,
        help=f"agent address, unix:///path or tcp://host:port (default ${ENV_AGENT} or {DEFAULT_AGENT})",
    )
    parser.add_argument("--json", action="store_true", help="print the API's JSON instead of tables")
    fleet.add_global_options(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("pull", help="pull an image")
    p.add_argument("ref")

    p = sub.add_parser("images", help="list images")

    p = sub.add_parser("rmi", help="remove an image")
    p.add_argument("name")

    p = sub.add_parser("run", help="create and start a container")
    p.add_argument("--name", help="container id (generated when omitted)")
    p.add_argument("--env", "-e", action="append", metavar="K=V", help="environment variable (repeatable)")
    p.add_argument("--label", "-l", action="append", metavar="K=V", help="label (repeatable)")
    p.add_argument("--cpus", type=parse_cpus, help="CPU limit in cores, e.g. 0.5")
    p.add_argument("--memory", "-m", type=parse_memory, help="memory limit, e.g. 64M")
    p.add_argument("--workdir", "-w", help="working directory")
    p.add_argument("--user", "-u", help="user[:group]")
    p.add_argument("image")
    # REMAINDER: everything after the image belongs to the container, flags included.
    p.add_argument("args", nargs=argparse.REMAINDER)

    p = sub.add_parser("ps", help="list containers")
    p.add_argument("-a", "--all", action="store_true", help="include containers that are not running")

    p = sub.add_parser("stop", help="stop a container")
    p.add_argument("--timeout", "-t", type=float, help="seconds before SIGKILL")
    p.add_argument("id")

    p = sub.add_parser("rm", help="delete a container")
    p.add_argument("-f", "--force", action="store_true", help="kill it first if it is running")
    p.add_argument("id")

    p = sub.add_parser("logs", help="print a container's output")
    p.add_argument("--tail", "-n", type=int, help="only the last N lines")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new output")
    p.add_argument("id")

    p = sub.add_parser("inspect", help="show a container's details as JSON")
    p.add_argument("id")

    migrate.add_parsers(sub)
    fleet.add_parsers(sub)
    certs.add_parser(sub)
    return parser


# Shared with the other command modules (agent/ctl/migrate.py), so they live in render.
_print_json = render.print_json
_say = render.say


def _generated_id(image: str) -> str:
    # Image base name (sanitised) plus randomness: readable in `ps`, unique without asking the agent.
    base = image.rsplit("/", 1)[-1].split("@", 1)[0].split(":", 1)[0]
    base = re.sub(r"[^A-Za-z0-9_.-]", "-", base).strip("-._")[:40] or "c"
    return f"{base}-{secrets.token_hex(4)}"


def _is_verdict(line: dict[str, Any]) -> bool:
    """The stream's last line, told apart from snapshots by shape: snapshots carry no `image`, and
    their `error` is a string, not an object."""
    status = line.get("status")
    return (status == "done" and "image" in line) or (status == "failed" and isinstance(line.get("error"), dict))


async def _pull(client: AgentClient, args: argparse.Namespace, err: Console) -> int:
    final: dict[str, Any] | None = None
    view = None if args.json else render.PullView(err, args.ref)
    with view if view is not None else contextlib.nullcontext():
        async for line in client.pull(args.ref):
            if _is_verdict(line):
                final = line
            elif view is not None:
                view.update(line)
        if view is not None:
            view.finish(final is not None and final["status"] == "done")
    if final is None:
        raise ApiError("stream_ended", "the agent closed the pull stream without a result")
    if final["status"] == "failed":
        raise ApiError(str(final["error"].get("code")), str(final["error"].get("message")))
    image = final["image"]
    if args.json:
        _print_json(image)
    else:
        _say(
            f"pulled {image['name']} {image['digest']} ({render.human_size(image.get('size'))}, "
            f"{render.human_size(image.get('bytes_fetched'))} fetched)"
        )
    return EXIT_OK


async def _run(client: AgentClient, args: argparse.Namespace) -> int:
    spec: dict[str, Any] = {"id": args.name or _generated_id(args.image), "image": args.image}
    if args.args:
        spec["args"] = list(args.args)
    env = parse_pairs(args.env, "--env")
    labels = parse_pairs(args.label, "--label")
    if env:
        spec["env"] = env
    if labels:
        spec["labels"] = labels
    if args.workdir:
        spec["workdir"] = args.workdir
    if args.user:
        spec["user"] = args.user
    resources = {k: v for k, v in (("cpus", args.cpus), ("memory", args.memory)) if v is not None}
    if resources:
        spec["resources"] = resources
    summary = await client.create(spec, start=True)
    if args.json:
        _print_json(summary)
    else:
        _say(summary["id"])
    return EXIT_OK


async def _logs(client: AgentClient, args: argparse.Namespace) -> int:
    stdout = sys.stdout.buffer
    async for chunk in client.logs(args.id, tail=args.tail, follow=args.follow):
        stdout.write(chunk)
        stdout.flush()  # followed output should appear as it arrives
    return EXIT_OK


async def dispatch(args: argparse.Namespace, out: Console, err: Console) -> int:
    address = args.agent or os.environ.get(ENV_AGENT) or DEFAULT_AGENT
    async with AgentClient(address) as client:
        match args.command:
            case "pull":
                return await _pull(client, args, err)
            case "images":
                images = await client.list_images()
                if args.json:
                    _print_json({"images": images})
                else:
                    out.print(render.images_table(images))
            case "rmi":
                await client.remove_image(args.name)
            case "run":
                return await _run(client, args)
            case "ps":
                containers = await client.list_containers()
                if not args.all:
                    containers = [c for c in containers if c.get("state") in ("running", "paused")]
                if args.json:
                    _print_json({"containers": containers})
                else:
                    out.print(render.containers_table(containers))
            case "stop":
                summary = await client.stop(args.id, args.timeout)
                if args.json:
                    _print_json(summary)
                else:
                    _say(f"{summary['id']} {summary['state']}")
            case "rm":
                await client.remove(args.id, force=args.force)
            case "logs":
                return await _logs(client, args)
            case "inspect":
                _print_json(await client.inspect(args.id))
            case "migrate":
                # Exit 1 for a rollback too: scripts must not mistake it for a moved workload.
                return EXIT_OK if await migrate.migrate(client, args, err) else EXIT_ERROR
            case "migrations":
                await migrate.migrations(client, args, out)
            case _:  # pragma: no cover - argparse rejects unknown commands
                raise UsageError(f"unknown command {args.command!r}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "certs":
        return certs.run(args)  # offline: files only, no agent connection
    # Consoles are made per call, bound to the streams of the moment (tests swap sys.stdout).
    out = Console(file=sys.stdout)
    err = Console(file=sys.stderr)
    try:
        if fleet.handles(args):  # coordinator commands, and migrations when a coordinator is configured
            return asyncio.run(fleet.run(args, out, err))
        return asyncio.run(dispatch(args, out, err))
    except fleet.FleetUsageError as exc:
        sys.stderr.write(f"ferryctl: error: {exc}\n")
        return EXIT_USAGE
    except ApiError as exc:
        sys.stderr.write(f"error: {exc.code}: {exc.message}\n")
        return EXIT_ERROR
    except UsageError as exc:
        sys.stderr.write(f"ferryctl: error: {exc}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `ferryctl logs | head`: the reader left; that is not an error worth a traceback.
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
