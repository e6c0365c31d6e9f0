"""`ferryctl`: a thin command line over the agent's HTTP API.

Human output goes to stdout as tables; progress goes to stderr, only when both are terminals;
`--json` (on every command) prints the API's JSON. Failures print `error: <code>: <message>` to
stderr and exit with a code from agent/ctl/exits.py. docs/ferryctl.md documents all of it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import secrets
import sys
from pathlib import Path
from typing import Any, NoReturn

from rich.console import Console

from agent.api.handlers import parse_create
from agent.api.network import parse_target
from agent.composition import manifest
from agent.ctl import (
    cache,
    catalog,
    certs,
    chains,
    completion,
    deployments,
    fleet,
    healthcheck,
    migrate,
    render,
    reservations,
    scaling,
)
from agent.ctl import images as image_archives
from agent.ctl.args import container_id, cpus, memory_size, service_ip
from agent.ctl.client import DEFAULT_AGENT, ENV_AGENT, AgentClient, ApiError
from agent.ctl.exits import Exit, for_error
from agent.model import spelling_json
from core.errors import InvalidRequest

EXIT_OK = Exit.OK
EXIT_ERROR = Exit.ERROR
EXIT_USAGE = Exit.USAGE


class UsageError(Exception):
    """A bad argument value that argparse's types did not catch."""


def parse_pairs(items: list[str] | None, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{what} {item!r}: expected KEY=VALUE")
        out[key] = value
    return out


def _output_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """--json, --no-progress, --no-color: before the command or after it (`ferryctl ps --json`).

    On subcommands the default is SUPPRESS, so an option given before the command is not reset.
    """
    default: Any = argparse.SUPPRESS if suppress else False
    g = parser.add_argument_group("output")
    g.add_argument("--json", action="store_true", default=default, help="print JSON (docs/ferryctl.md has the schemas)")
    g.add_argument(
        "--no-progress", action="store_true", default=default, help="no progress bars or spinners (also when not a TTY)"
    )
    g.add_argument(
        "--no-color", action="store_true", default=default, help="no colour (also when not a TTY, or with $NO_COLOR)"
    )


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every subcommand's parser, nested ones included."""
    found: list[argparse.ArgumentParser] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
                found += [child, *_subparsers(child)]
    return found


def _container_options(p: argparse.ArgumentParser) -> None:
    """The fields of POST /v1/containers, under the API's names (`run` and `create`)."""
    p.add_argument("--name", type=container_id, help="container id, the API's `id` (generated when omitted)")
    p.add_argument("--env", "-e", action="append", metavar="K=V", help="environment variable (repeatable)")
    p.add_argument("--label", "-l", action="append", metavar="K=V", help="label (repeatable)")
    p.add_argument("--cpus", type=cpus, help="CPU limit in cores, e.g. 0.5 (resources.cpus)")
    p.add_argument("--memory", "-m", type=memory_size, help="memory limit, e.g. 64M (resources.memory)")
    p.add_argument("--workdir", "-w", help="working directory")
    p.add_argument("--user", "-u", help="user[:group]")
    p.add_argument(
        "--service-ip", type=service_ip, metavar="IPV4", help="service address: own network namespace with this /32"
    )
    p.add_argument(
        "--publish-service",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="publish --service-ip on this host at start (default); --no-publish-service makes a standby copy",
    )
    p.add_argument(
        "--restart",
        type=spelling_json,  # the API's validator checks it, in the API's words (container_spec)
        metavar="POLICY",
        help="restart policy (restart_policy): no (default), on-failure[:N], always or unless-stopped",
    )
    p.add_argument(
        "--reservation",
        metavar="ID",
        help="charge the container's resources to this reservation held on the host (a coordinator placement)",
    )
    p.add_argument(
        "--volume",
        action="append",
        metavar="NAME:PATH",
        help="mount the host's shared volume NAME at PATH, made on first use (volumes; repeatable)",
    )
    healthcheck.add_options(p)
    p.add_argument(
        "--composition",
        metavar="FILE",
        help="a composition manifest (JSON or YAML) to assemble and run instead of an image (docs/composition.md)",
    )
    p.add_argument("image", nargs="?", help="the image (omitted with --composition: the arguments follow)")
    # REMAINDER: everything after the image belongs to the container, flags included.
    p.add_argument("args", nargs=argparse.REMAINDER)


def build_parser() -> argparse.ArgumentParser:
    parser = CtlParser(prog="ferryctl", description="Control a ferryman agent.")
    parser.add_argument(
        "--agent",
        default=None,
        help=f"agent address, unix:///path or tcp://host:port (default ${ENV_AGENT} or {DEFAULT_AGENT})",
    )
    _output_options(parser, suppress=False)
    fleet.add_global_options(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("pull", help="pull an image")
    p.add_argument("ref")

    p = sub.add_parser("images", help="list images")

    p = sub.add_parser("rmi", help="remove an image")
    p.add_argument("name")

    image_archives.add_parser(sub)
    cache.add_parser(sub)

    run = sub.add_parser("run", help="create and start a container")
    run.add_argument(
        "--to",
        choices=["auto"],
        help="auto: the coordinator places it on the host where it runs soonest and starts it there",
    )
    _container_options(run)
    _container_options(sub.add_parser("create", help="create a container without starting it"))

    p = sub.add_parser("start", help="start a created or stopped container")
    p.add_argument("id", type=container_id)

    p = sub.add_parser("ps", help="list containers")
    p.add_argument("-a", "--all", action="store_true", help="include containers that are not running")

    p = sub.add_parser("stop", help="stop a container")
    p.add_argument("--timeout", "-t", type=float, help="seconds before SIGKILL")
    p.add_argument("id", type=container_id)

    p = sub.add_parser("rm", help="delete a container")
    p.add_argument("-f", "--force", action="store_true", help="kill it first if it is running")
    p.add_argument("id", type=container_id)

    p = sub.add_parser("logs", help="print a container's output")
    p.add_argument("--tail", "-n", type=int, help="only the last N lines")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new output")
    p.add_argument("id", type=container_id)

    p = sub.add_parser("inspect", help="show a container's details as JSON")
    p.add_argument("id", type=container_id)

    p = sub.add_parser("network", help="service addresses on this host; publish or unpublish one")
    actions = p.add_subparsers(dest="network_command", metavar="SUBCOMMAND")
    for name, text in (("publish", "route a service address to this host"), ("unpublish", "stop routing it here")):
        q = actions.add_parser(name, help=text)
        which = q.add_mutually_exclusive_group(required=True)
        which.add_argument("--service-ip", type=service_ip, metavar="IPV4", help="the address")
        which.add_argument("--container", type=container_id, metavar="ID", help="the container that has it")

    sub.add_parser("health", help="the agent's health (exit 1 when containerd does not answer)")

    migrate.add_parsers(sub)
    reservations.add_parser(sub)
    fleet.add_parsers(sub)
    catalog.add_parser(sub)
    deployments.add_parsers(sub)
    chains.add_parsers(sub)
    scaling.add_parsers(sub)
    certs.add_parser(sub)
    completion.add_parser(sub)
    for child in _subparsers(parser):
        _output_options(child, suppress=True)
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
    view = render.PullView(err, args.ref) if args.progress else None
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


def container_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The POST /v1/containers body for `run`/`create`, checked by the agent's own validator."""
    composition = _composition(args)
    if composition is None and args.image is None:
        raise UsageError("give an image, or a composition manifest with --composition FILE")
    image = args.image if composition is None else None
    command = list(args.args) if composition is None or args.image is None else [args.image, *args.args]
    name = args.image if composition is None else str(composition.get("name", "composition"))
    spec: dict[str, Any] = {"id": args.name or _generated_id(name)}
    spec.update({"image": image} if composition is None else {"composition": composition})
    if command:
        spec["args"] = command
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
    if args.service_ip is not None:
        spec["service_ip"] = args.service_ip
    if args.publish_service is not None:
        spec["publish_service"] = args.publish_service
    if args.restart is not None:
        spec["restart_policy"] = args.restart
    if args.reservation is not None:
        spec["reservation"] = args.reservation
    if args.volume:
        pairs = [v.partition(":") for v in args.volume]
        if any(not sep for _, sep, _ in pairs):
            raise UsageError("--volume: expected NAME:PATH")
        spec["volumes"] = [{"name": name, "path": path} for name, _, path in pairs]
    try:
        health = healthcheck.health_spec(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if health is not None:
        spec["health"] = health
    checked = {k: v for k, v in spec.items() if k != "composition"}
    checked.setdefault("image", COMPOSED_PLACEHOLDER)  # the agent names the composition's image
    try:
        parse_create(checked)  # the API's validation, so a bad request fails here with the API's words
    except InvalidRequest as exc:
        raise UsageError(exc.message) from exc
    return spec


COMPOSED_PLACEHOLDER = "composition.ferryman.local/placeholder:latest"


def _composition(args: argparse.Namespace) -> dict[str, Any] | None:
    """The manifest of --composition FILE, checked here as the agent will (its shape and graph)."""
    if not getattr(args, "composition", None):
        return None
    try:
        text = Path(args.composition).read_bytes()
    except OSError as exc:
        raise UsageError(f"--composition {args.composition}: {exc.strerror or exc}") from exc
    try:
        document = manifest.load_text(text, "yaml" if args.composition.endswith((".yaml", ".yml")) else "")
        manifest.parse(document)
    except InvalidRequest as exc:
        raise UsageError(f"--composition {args.composition}: {exc.message}") from exc
    if not isinstance(document, dict):
        raise UsageError(f"--composition {args.composition}: not a manifest object")
    return document


async def _create(client: AgentClient, args: argparse.Namespace) -> int:
    summary = await client.create(container_spec(args), start=args.command == "run")
    if args.json:
        _print_json(summary)
    else:
        _say(summary["id"])
    return EXIT_OK


async def _network(client: AgentClient, args: argparse.Namespace, out: Console) -> int:
    if args.network_command is None:
        data = await client.request("GET", "/v1/network")
        if args.json:
            _print_json(data)
        else:
            _say(f"uplink {data.get('uplink') or '-'}")
            render.print_table(out, render.network_table(data))
        return EXIT_OK
    body = {"service_ip": args.service_ip} if args.service_ip is not None else {"container": args.container}
    try:
        parse_target(body)
    except InvalidRequest as exc:
        raise UsageError(exc.message) from exc
    data = await client.request("POST", f"/v1/network/{args.network_command}", body=body)
    if args.json:
        _print_json(data)
    elif args.network_command == "publish":
        _say(f"{data['service_ip']} published ({data['container']}, {data['host_veth']})")
    else:
        _say(f"{data['service_ip']} unpublished" + ("" if data.get("was_published") else " (was not published)"))
    return EXIT_OK


async def _health(client: AgentClient, args: argparse.Namespace) -> int:
    # 503 (containerd does not answer) carries an error object: ApiError, exit 1, like any failure.
    data = await client.health()
    if args.json:
        _print_json(data)
    else:
        _say(str(data.get("status", "")))
    return EXIT_OK


async def _logs(client: AgentClient, args: argparse.Namespace) -> int:
    stdout = sys.stdout.buffer
    if args.json:  # NDJSON: one {"container", "line"} object per line of output
        pending = b""
        async for chunk in client.logs(args.id, tail=args.tail, follow=args.follow):
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                render.print_json_line({"container": args.id, "line": line.decode(errors="replace")})
        if pending:
            render.print_json_line({"container": args.id, "line": pending.decode(errors="replace")})
        return EXIT_OK
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
                    render.print_table(out, render.images_table(images))
            case "image":
                return await image_archives.run(client, args)
            case "cache":
                return await cache.run(client, args, out)
            case "rmi":
                await client.remove_image(args.name)
                if args.json:
                    _print_json({"name": args.name, "removed": True})
            case "run" | "create":
                return await _create(client, args)
            case "start":
                summary = await client.start(args.id)
                if args.json:
                    _print_json(summary)
                else:
                    _say(f"{summary['id']} {summary['state']}")
            case "ps":
                containers = await client.list_containers()
                if not args.all:
                    containers = [c for c in containers if c.get("state") in ("running", "paused")]
                if args.json:
                    _print_json({"containers": containers})
                else:
                    render.print_table(out, render.containers_table(containers))
            case "stop":
                summary = await client.stop(args.id, args.timeout)
                if args.json:
                    _print_json(summary)
                else:
                    _say(f"{summary['id']} {summary['state']}")
            case "rm":
                await client.remove(args.id, force=args.force)
                if args.json:
                    _print_json({"id": args.id, "removed": True})
            case "logs":
                return await _logs(client, args)
            case "inspect":
                _print_json(await client.inspect(args.id))
            case "migrate":
                return await migrate.migrate(client, args, err)
            case "migrations":
                return await migrate.migrations(client, args, out, err)
            case "reservations":
                return await reservations.run(client, args, out, coordinator=False)
            case "network":
                return await _network(client, args, out)
            case "health":
                return await _health(client, args)
            case _:  # pragma: no cover - argparse rejects unknown commands
                raise UsageError(f"unknown command {args.command!r}")
    return EXIT_OK


def _consoles(args: argparse.Namespace) -> tuple[Console, Console]:
    """stdout and stderr consoles, and `args.progress`: whether live progress may be drawn.

    Progress (spinners, bars) only when stdout and stderr are both terminals and neither --json nor
    --no-progress was given: a redirected stdout means a script, whose stderr must stay plain lines.
    Colour only on a terminal, without --no-color or $NO_COLOR (rich reads NO_COLOR itself).
    """
    out_tty, err_tty = sys.stdout.isatty(), sys.stderr.isatty()
    args.progress = out_tty and err_tty and not args.json and not args.no_progress
    no_color = True if args.no_color else None
    # Consoles are made per call, bound to the streams of the moment (tests swap sys.stdout).
    out = Console(file=sys.stdout, force_terminal=out_tty, no_color=no_color, highlight=False)
    err = Console(file=sys.stderr, force_terminal=err_tty, no_color=no_color, highlight=False)
    return out, err


def _fail(args: argparse.Namespace, code: str, message: str, exit_code: Exit) -> int:
    """Report a failure on stderr (`error: <code>: <message>`; usage errors like argparse's), and with
    --json also as `{"error": {"code", "message"}, "exit_code"}` on stdout."""
    if exit_code == Exit.USAGE:
        sys.stderr.write(f"ferryctl: error: {message}\n")
    else:
        sys.stderr.write(f"error: {code}: {message}\n")
    if getattr(args, "json", False):
        render.print_json({"error": {"code": code, "message": message}, "exit_code": int(exit_code)})
    return exit_code


class ArgumentError(Exception):
    """argparse's complaint, raised instead of exiting so that --json can report it too."""

    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message)
        self.parser = parser
        self.message = message


class CtlParser(argparse.ArgumentParser):
    """argparse's parser, but its errors are raised (subcommands' parsers are of this class too)."""

    def error(self, message: str) -> NoReturn:
        raise ArgumentError(self, message)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parser.parse_args(argv)
    except ArgumentError as exc:
        exc.parser.print_usage(sys.stderr)
        sys.stderr.write(f"{exc.parser.prog}: error: {exc.message}\n")
        if "--json" in argv[: argv.index("--") if "--" in argv else len(argv)]:
            render.print_json({"error": {"code": "usage", "message": exc.message}, "exit_code": int(Exit.USAGE)})
        return Exit.USAGE
    if args.command == "completion":
        return completion.run(parser, args)
    try:
        if args.command == "certs":
            return certs.run(args)  # offline: files only, no agent connection
    except certs.CertsError as exc:
        return _fail(args, exc.code, exc.message, Exit.ERROR)
    except certs.CertsUsageError as exc:
        return _fail(args, "usage", str(exc), Exit.USAGE)
    out, err = _consoles(args)
    try:
        if args.command == "run" and args.to == "auto":
            return asyncio.run(fleet.start_placed(args, container_spec(args)))
        if fleet.handles(args):  # coordinator commands, and migrations when a coordinator is configured
            return asyncio.run(fleet.run(args, out, err))
        return asyncio.run(dispatch(args, out, err))
    except fleet.FleetUsageError as exc:
        return _fail(args, "usage", str(exc), Exit.USAGE)
    except ApiError as exc:
        return _fail(args, exc.code, exc.message, for_error(exc.code))
    except (UsageError, reservations.ReservationUsageError, catalog.CatalogUsageError, cache.CacheUsageError) as exc:
        return _fail(args, "usage", str(exc), Exit.USAGE)
    except KeyboardInterrupt:
        return Exit.INTERRUPTED
    except BrokenPipeError:
        # `ferryctl logs | head`: the reader left; that is not an error worth a traceback.
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
