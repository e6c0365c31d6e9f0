"""ferryctl's coordinator commands: `hosts`, `drain`, `uncordon`, `predictions`, `decisions`,
`model`, and `migrate` / `migrations` / `reservations` when a coordinator is configured.

The coordinator is `--coordinator URL` or $FERRYMAN_COORDINATOR (https only); a coordinator with
several replicas (on etcd) is `--coordinator` once per replica, or their URLs separated by commas in
the variable: ferryctl talks to the first that answers and follows a follower's answer to the leader.
Ops authenticate with an ops client certificate (`--cert/--key`, $FERRYMAN_CERT/$FERRYMAN_KEY;
`ferryctl certs issue NAME --role ops`) or a bearer token (`--token`, $FERRYMAN_TOKEN); the coordinator's certificate is
verified against the fleet CA (`--ca`, $FERRYMAN_CA) for the URL's host or `--server-name`.
Without a coordinator, `migrate`, `migrations` and `reservations` talk to the agent
(agent/ctl/migrate.py, agent/ctl/reservations.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl
import sys
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from agent.ctl import catalog, chains, deployments, render, reservations, scaling
from agent.ctl.client import ApiError, _error_from
from agent.ctl.exits import Exit
from core.replicas import Replicas, not_leader, parse_urls

ENV_COORDINATOR = "FERRYMAN_COORDINATOR"
ENV_CERT = "FERRYMAN_CERT"
ENV_KEY = "FERRYMAN_KEY"
ENV_CA = "FERRYMAN_CA"
ENV_TOKEN = "FERRYMAN_TOKEN"
ENV_SERVER_NAME = "FERRYMAN_COORDINATOR_NAME"
CONNECT_TIMEOUT = 10.0
POLL_PERIOD = 0.5
DEFAULT_DRAIN_WAIT = 600.0
COORDINATOR_ONLY = frozenset(
    {"hosts", "drain", "uncordon", "predictions", "decisions", "model", "catalog"}
    | deployments.COMMANDS
    | chains.COMMANDS
    | scaling.COMMANDS
)
"""Commands that exist only with a coordinator; BOTH_WORLDS go to the agent without one."""
BOTH_WORLDS = frozenset({"migrate", "migrations", "reservations"})
_STATE_STYLE = {"ready": "green", "draining": "yellow", "drained": "dim", "suspect": "yellow", "down": "red"}


class FleetUsageError(Exception):
    """A coordinator command without a coordinator, or options the coordinator does not take."""


def add_global_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("coordinator")
    g.add_argument(
        "--coordinator",
        metavar="URL",
        action="append",
        help=f"https://host:port of the coordinator; once per replica (${ENV_COORDINATOR}, comma-separated)",
    )
    g.add_argument("--cert", metavar="PEM", help=f"ops client certificate (${ENV_CERT})")
    g.add_argument("--key", metavar="PEM", help=f"its private key (${ENV_KEY})")
    g.add_argument("--ca", metavar="PEM", help=f"the fleet CA certificate (${ENV_CA})")
    g.add_argument("--token", help=f"ops bearer token instead of a certificate (${ENV_TOKEN})")
    g.add_argument(
        "--server-name", metavar="NAME", help=f"name the coordinator's certificate must carry (${ENV_SERVER_NAME})"
    )


def _wait_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"must be within (0, 3600] seconds, got {text!r}")
    return value


def add_parsers(sub: Any) -> None:
    """Add the coordinator-only commands (`sub` is argparse's subparsers action)."""
    sub.add_parser("hosts", help="the fleet's hosts: state, capacity, reservations, drain probability")
    p = sub.add_parser("drain", help="stop placing on a host and migrate its containers away")
    p.add_argument("host")
    p.add_argument(
        "--wait",
        nargs="?",
        const=DEFAULT_DRAIN_WAIT,
        type=_wait_seconds,
        metavar="SECONDS",
        help=f"wait until the host is drained (default {DEFAULT_DRAIN_WAIT:g} s)",
    )
    p = sub.add_parser("uncordon", help="return a drained or draining host to service")
    p.add_argument("host")
    p = sub.add_parser("predictions", help="the latest drain probability of every host, with the model version")
    p.add_argument("--explain", metavar="HOST", help="why HOST has its probability: the notice or the top features")
    p = sub.add_parser("decisions", help="what the coordinator decided (drains, migrations, retries) and why")
    p.add_argument("--host", help="only this host's")
    p = sub.add_parser("model", help="the drain model: show it, activate a file, roll back, retrain")
    actions = p.add_subparsers(dest="model_command", metavar="SUBCOMMAND")
    actions.add_parser("show", help="the active and previous model versions and the threshold (the default)")
    activate = actions.add_parser("activate", help="load and activate a model file on the coordinator's host")
    activate.add_argument("path", help="path of the .onnx file as the coordinator sees it")
    actions.add_parser("rollback", help="go back to the previous model")
    actions.add_parser("retrain", help="train a candidate on the recorded telemetry now; activate it if it is better")


@dataclass(frozen=True)
class Endpoint:
    urls: tuple[str, ...]
    """The coordinator's replicas (one URL for a single coordinator)."""
    cert: str | None
    key: str | None
    ca: str | None
    token: str | None
    server_name: str | None


def endpoint(args: argparse.Namespace) -> Endpoint | None:
    """The configured coordinator (options over environment), or None when there is none."""

    def pick(value: str | None, env: str) -> str | None:
        return value if value else (os.environ.get(env) or None)

    urls: list[str] = list(args.coordinator or ())
    if not urls:
        urls = [u.strip() for u in os.environ.get(ENV_COORDINATOR, "").split(",") if u.strip()]
    if not urls:
        return None
    return Endpoint(
        urls=tuple(urls),
        cert=pick(args.cert, ENV_CERT),
        key=pick(args.key, ENV_KEY),
        ca=pick(args.ca, ENV_CA),
        token=pick(args.token, ENV_TOKEN),
        server_name=pick(args.server_name, ENV_SERVER_NAME),
    )


def handles(args: argparse.Namespace) -> bool:
    """True when this module runs the command: coordinator-only ones, or any with a coordinator."""
    if args.command in COORDINATOR_ONLY:
        return True
    if args.command in BOTH_WORLDS:
        if endpoint(args) is not None:
            return True
        if args.command == "migrate" and args.target == "auto":
            raise FleetUsageError(
                f"--to auto needs a coordinator to place the container (--coordinator URL or ${ENV_COORDINATOR})"
            )
    return False


def _ssl_context(ep: Endpoint) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(cafile=ep.ca) if ep.ca else ssl.create_default_context()
        if ep.cert or ep.key:
            if not (ep.cert and ep.key):
                raise FleetUsageError("--cert and --key go together")
            ctx.load_cert_chain(ep.cert, ep.key)
    except (OSError, ssl.SSLError) as exc:
        raise ApiError("tls_files", f"cannot use the TLS files: {exc}") from exc
    return ctx


class CoordinatorClient:
    """The coordinator's ops API over HTTPS (a client certificate and/or a bearer token)."""

    def __init__(self, ep: Endpoint) -> None:
        try:
            self._replicas = Replicas(parse_urls(ep.urls, "coordinator URL"))
        except ValueError as exc:
            raise FleetUsageError(str(exc)) from None
        self._ssl = _ssl_context(ep)
        self._server_name = ep.server_name
        headers = {"Authorization": f"Bearer {ep.token}"} if ep.token else {}
        # No total timeout: `drain --wait` legitimately takes long; connecting must not.
        self._session = aiohttp.ClientSession(
            headers=headers, timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT)
        )

    @property
    def url(self) -> str:
        """The replica in use."""
        return self._replicas.current

    async def __aenter__(self) -> CoordinatorClient:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._session.close()

    async def request(self, method: str, path: str, *, params: dict[str, str] | None = None, body: Any = None) -> Any:
        """One request to the coordinator. A replica that cannot be connected to is skipped for the
        next; one that answers not_leader is left for the leader it names (core/replicas.py)."""
        kwargs: dict[str, Any] = {"ssl": self._ssl, "params": params, "json": body}
        if self._server_name:
            kwargs["server_hostname"] = self._server_name
        failure: ApiError | None = None
        unreachable = 0
        for _ in range(self._replicas.budget()):
            url = self._replicas.current
            try:
                async with self._session.request(method, url + path, **kwargs) as resp:
                    if resp.status >= 400:
                        failure = await _error_from(resp)
                        leader = not_leader(await resp.text(errors="replace")) if resp.status == 503 else None
                        if leader is None:
                            raise failure
                        self._replicas.redirected(leader)
                        continue
                    if resp.status == 204:
                        return None
                    return await resp.json(content_type=None)
            except aiohttp.ClientConnectorError as exc:  # nothing was sent: the next replica may answer
                failure = ApiError("coordinator_unreachable", f"cannot talk to the coordinator at {url}: {exc}")
                self._replicas.unreachable()
                unreachable += 1
                if unreachable >= len(self._replicas.urls):
                    raise failure from exc
            except aiohttp.ClientError as exc:
                raise ApiError("coordinator_unreachable", f"cannot talk to the coordinator at {url}: {exc}") from exc
        assert failure is not None
        raise failure


# ----- commands


async def run(args: argparse.Namespace, out: Console, err: Console) -> int:
    """Run a command through the coordinator; the exit code."""
    ep = endpoint(args)
    if ep is None:
        raise FleetUsageError(
            f"{args.command} talks to the coordinator: give --coordinator URL or set ${ENV_COORDINATOR}"
        )
    async with CoordinatorClient(ep) as client:
        match args.command:
            case "hosts":
                data = await client.request("GET", "/v1/hosts")
                render.show(args, data, lambda: render.print_table(out, hosts_table(data["hosts"])))
            case "drain":
                return await _drain(client, args)
            case "uncordon":
                host = await client.request("POST", f"/v1/hosts/{quote(args.host, safe='')}/uncordon")
                render.show(args, host, lambda: render.say(f"{host['name']} {host['state']}"))
            case "predictions" if args.explain:
                data = await client.request("GET", f"/v1/predictions/{quote(args.explain, safe='')}")
                render.show(args, data, lambda: _print_explanation(out, data))
            case "predictions":
                data = await client.request("GET", "/v1/predictions")
                render.show(args, data, lambda: _print_predictions(out, data))
            case "migrate":
                return await _migrate(client, args, err)
            case "migrations":
                return await _migrations(client, args, out, err)
            case "reservations":
                return await reservations.run(client, args, out, coordinator=True)
            case "decisions":
                params = {"host": args.host} if args.host else None
                data = await client.request("GET", "/v1/decisions", params=params)
                render.show(args, data, lambda: render.print_table(out, decisions_table(data["decisions"])))
            case "model":
                data = await _model(client, args)
                render.show(args, data, lambda: render.say_all(model_details(data)))
            case "catalog":
                return await catalog.run(client, args, out)
            case "deploy" | "deployments" | "undeploy" | "deployment" | "scale":
                return await deployments.run(client, args, out)
            case "chain" | "chains":
                return await chains.run(client, args, out)
            case "scaling":
                return await scaling.run(client, args, out)
            case _:  # pragma: no cover - handles() decides what reaches here
                raise FleetUsageError(f"{args.command} does not go through the coordinator")
    return 0


async def start_placed(args: argparse.Namespace, spec: dict[str, Any]) -> int:
    """`run --to auto`: the coordinator places the container where it runs soonest and starts it."""
    ep = endpoint(args)
    if ep is None:
        raise FleetUsageError(
            f"--to auto needs a coordinator to place the container (--coordinator URL or ${ENV_COORDINATOR})"
        )
    async with CoordinatorClient(ep) as client:
        started = await client.request("POST", "/v1/containers", body={"container": spec})
    predicted = started["placement"]["predicted"]
    render.show(
        args,
        started,
        lambda: render.say(
            f"{started['container']['id']} on {started['placement']['host']}: running after {started['seconds']:.2f} s"
            f" (predicted {predicted['seconds']:.2f} s)"
        ),
    )
    return 0


async def _drain(client: CoordinatorClient, args: argparse.Namespace) -> int:
    params = {"wait": f"{args.wait:g}"} if args.wait is not None else None
    data = await client.request("POST", f"/v1/hosts/{quote(args.host, safe='')}/drain", params=params)
    host = data["host"]
    render.show(args, data, lambda: render.say(f"{host['name']} {host['state']} ({data['drain']['id']})"))
    if args.wait is not None and host["state"] != "drained":
        sys.stderr.write(f"error: not_drained: {host['name']} is still {host['state']} after {args.wait:g} s\n")
        return Exit.NOT_DRAINED
    return Exit.OK


async def _migrate(client: CoordinatorClient, args: argparse.Namespace, err: Console) -> int:
    unsupported = [
        flag
        for flag, value in (("--downtime-target", args.downtime_target), ("--max-iterations", args.max_iterations))
        if value is not None
    ]
    if unsupported:
        raise FleetUsageError(f"{', '.join(unsupported)}: set on the agents' [migration] when using the coordinator")
    body: dict[str, Any] = {"container": args.container, "to": args.target}
    if args.mode is not None:
        body["mode"] = args.mode
    migration = await client.request("POST", "/v1/migrations", body=body)
    return await _follow(client, migration, args, err)


async def _follow(client: CoordinatorClient, migration: dict[str, Any], args: argparse.Namespace, err: Console) -> int:
    """Print a coordinator migration's history as it grows, until it is done; its exit code."""
    seen = 0
    try:
        while True:
            for entry in migration.get("history", [])[seen:]:
                if not args.json:
                    err.print(
                        f"{migration['id']} {entry['state']} {entry['detail']}".rstrip(), markup=False, highlight=False
                    )
            seen = len(migration.get("history", []))
            if migration.get("done"):
                break
            await asyncio.sleep(POLL_PERIOD)
            migration = await client.request("GET", f"/v1/migrations/{quote(migration['id'], safe='')}")
    except asyncio.CancelledError:
        err.print(
            f"interrupted; migration {migration['id']} goes on in the coordinator: "
            f"ferryctl migrations show {migration['id']}",
            markup=False,
            highlight=False,
        )
        raise
    render.show(args, migration, lambda: render.say_all(migration_details(migration)))
    if migration["state"] != "committed":
        sys.stderr.write(f"error: {migration['state']}: {migration.get('error') or 'the migration did not commit'}\n")
        return Exit.NOT_MIGRATED
    return Exit.OK


async def _migrations(client: CoordinatorClient, args: argparse.Namespace, out: Console, err: Console) -> int:
    if args.migrations_command == "watch":
        record = await client.request("GET", f"/v1/migrations/{quote(args.id, safe='')}")
        return await _follow(client, record, args, err)
    if args.migrations_command == "show":
        record = await client.request("GET", f"/v1/migrations/{quote(args.id, safe='')}")
        render.show(args, record, lambda: render.say_all(migration_details(record, history=True)))
        return Exit.OK
    data = await client.request("GET", "/v1/migrations")
    render.show(args, data, lambda: render.print_table(out, migrations_table(data["migrations"])))
    return Exit.OK


async def _model(client: CoordinatorClient, args: argparse.Namespace) -> dict[str, Any]:
    match args.model_command:
        case "activate":
            return dict(await client.request("POST", "/v1/model", body={"path": args.path}))
        case "rollback":
            return dict(await client.request("POST", "/v1/model/rollback"))
        case "retrain":
            return dict(await client.request("POST", "/v1/model/retrain"))
        case _:
            return dict(await client.request("GET", "/v1/model"))


# ----- tables


def _percent(p: float | None) -> str:
    return "-" if p is None else f"{100 * p:.1f}%"


def _used_of(used: int, total: int, size: bool) -> str:
    if size:
        return f"{render.human_size(used)} / {render.human_size(total)}"
    return f"{used / 1000:g} / {total / 1000:g}"


def hosts_table(hosts: list[dict[str, Any]]) -> Table:
    table = render.new_table(
        "HOST", "STATE", "CPU USED", "MEMORY USED", "RESERVED CPU/MEM", "FREE MEM", "CONTAINERS", "P(DRAIN)"
    )
    for h in sorted(hosts, key=lambda h: str(h.get("name", ""))):
        cap, used, reserved, free = h["capacity"], h["used"], h["reserved"], h["free"]
        state = str(h.get("state", ""))
        table.add_row(
            escape(str(h["name"])),
            f"[{_STATE_STYLE.get(state, '')}]{escape(state)}[/]" if state in _STATE_STYLE else escape(state),
            _used_of(used["cpu_millis"], cap["cpu_millis"], size=False),
            _used_of(used["memory_bytes"], cap["memory_bytes"], size=True),
            f"{reserved['cpu_millis'] / 1000:g} / {render.human_size(reserved['memory_bytes'])}",
            render.human_size(free["memory_bytes"]),
            str(len(h.get("containers", []))),
            _percent(h.get("drain_probability")),
        )
    return table


def _print_predictions(out: Console, data: dict[str, Any]) -> None:
    model = data.get("model_version")
    if model is None:
        render.say("no drain model is active: only ops drain hosts")
    else:
        render.say(f"model {model}, threshold {_percent(data.get('threshold'))}")
    table = render.new_table("HOST", "P(DRAIN)", "MODEL", "AT")
    threshold = data.get("threshold") or 2.0
    for p in data.get("predictions", []):
        prob = float(p["probability"])
        cell = _percent(prob) if prob < threshold else f"[red]{_percent(prob)}[/]"
        table.add_row(escape(str(p["host"])), cell, escape(str(p["model_version"])), render.clock_time(p.get("ts")))
    render.print_table(out, table)


def _print_explanation(out: Console, data: dict[str, Any]) -> None:
    if data.get("explanation") is None:
        render.say(f"{data['host']}: not scored yet")
    else:
        render.say(
            f"{data['host']}: P(drain) {_percent(data.get('probability'))} "
            f"(model {_percent(data.get('model_probability'))}, threshold {_percent(data.get('threshold'))}) "
            f"from the {data.get('source')}"
        )
        render.say(escape(str(data["explanation"])))
    if data.get("contributions"):
        table = render.new_table("FEATURE", "VALUE", "REFERENCE", "RAISES P BY")
        for c in data["contributions"]:
            table.add_row(escape(str(c["feature"])), f"{c['value']:.4g}", f"{c['reference']:.4g}", f"{c['delta']:+.3f}")
        render.print_table(out, table)
    if data.get("notices"):
        table = render.new_table("NOTICE", "DEADLINE", "SEEN", "DETAIL")
        for n in data["notices"]:
            table.add_row(
                escape(str(n["source"] or n["kind"])),
                render.clock_time(n.get("deadline")),
                render.clock_time(n.get("seen_at")),
                escape(str(n["detail"])),
            )
        render.print_table(out, table)
    for d in data.get("decisions", [])[:5]:
        render.say(f"  {render.clock_time(d.get('ts'))} {d['kind']}: {escape(str(d.get('detail', '')))}")


def migrations_table(migrations: list[dict[str, Any]]) -> Table:
    table = render.new_table("ID", "CONTAINER", "FROM", "TO", "STATE", "TRY", "REASON", "UPDATED")
    for m in sorted(migrations, key=lambda m: float(m.get("created_at", 0))):
        state = str(m.get("state", ""))
        style = {"committed": "green", "failed": "yellow", "abandoned": "red", "running": "cyan"}.get(state, "")
        table.add_row(
            escape(str(m["id"])),
            escape(str(m["container"])),
            escape(str(m["source"])),
            escape(str(m.get("target") or m.get("requested_to", ""))),
            f"[{style}]{state}[/]" if style else escape(state),
            str(m.get("attempt", 0)),
            escape(str(m.get("reason", ""))),
            render.clock_time(m.get("updated_at"), short=True),
        )
    return table


def decisions_table(decisions: list[dict[str, Any]]) -> Table:
    table = render.new_table("AT", "HOST", "KIND", "P(DRAIN)", "MODEL", "DETAIL")
    for d in sorted(decisions, key=lambda d: float(d.get("ts", 0))):
        table.add_row(
            render.clock_time(d.get("ts")),
            escape(str(d.get("host", ""))),
            escape(str(d.get("kind", ""))),
            _percent(d.get("probability")),
            escape(str(d.get("model_version") or "-")),
            escape(str(d.get("detail", ""))),
        )
    return table


def model_details(data: dict[str, Any]) -> list[str]:
    """`model` output: a retrain's verdict first (when there is one), then the model in use."""
    model = data.get("model", data)
    lines = []
    if "activated" in data:
        verdict = "activated" if data["activated"] else "not activated"
        lines.append(f"candidate {data.get('candidate') or '-'}: {verdict} ({data.get('reason') or '-'})")
    if model.get("active") is None:
        lines.append("no drain model is active: only ops drain hosts")
    else:
        lines.append(f"active {model['active']}, threshold {_percent(model.get('threshold'))}")
    lines.append(f"previous {model.get('previous') or '-'}")
    return lines


def migration_details(m: dict[str, Any], history: bool = False) -> list[str]:
    lines = [
        f"{m['id']}: {m['container']} {m['source']} -> {m.get('target') or m.get('requested_to')}: {m['state']}",
        f"  attempt {m.get('attempt', 0)}, tried {', '.join(m.get('tried_targets') or []) or '-'}; "
        f"requested by {m.get('requested_by') or '-'} ({m.get('reason') or '-'})",
    ]
    if m.get("agent_migration_id"):
        lines.append(f"  agent migration {m['agent_migration_id']} (ferryctl --agent ... migrations show it)")
    if m.get("error"):
        lines.append(f"  error: {m['error']}")
    if history:
        lines += [f"  {render.clock_time(e['ts'])} {e['state']} {e['detail']}".rstrip() for e in m.get("history", [])]
    return lines
