"""ferryctl as scripts and operators run it: the installed `ferryctl` program, as docs/ferryctl.md
documents it, against a real API server on a unix socket over in-test fake services.

One test per promise of docs/ferryctl.md: every field of POST /v1/containers (with the API's
validation), plain output off a terminal and whole identifiers, `--json` with the documented keys on
every command, the exit code table, and shell completion.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import pty
import re
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.api import ApiServer, build_app, serve
from agent.ctl.exits import Exit
from agent.ctl.main import build_parser
from agent.ctl.migrate import outcome
from agent.migration.record import MigrationId, MigrationRecord, MigrationStats
from agent.migration.states import State
from agent.model import (
    LABEL_SERVICE_IP,
    ContainerState,
    ContainerSummary,
    CreateRequest,
    ImageSummary,
    RestartName,
    RestartPolicy,
)
from agent.network import NetnsInfo
from agent.reservations import Amount, Reservations
from agent.telemetry.containers import ContainerReading
from tests.test_api_migrations import FakeMigrations
from tests.test_cache_api import FakeCache
from tests.test_ctl import FakeContainers, FakeImages

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "ferryctl.md"
FERRYCTL = Path(sys.executable).with_name("ferryctl")  # the console script of the venv under test
ESC = "\x1b["


def has_colour(text: str) -> bool:
    """Any SGR sequence that sets a colour (foreground or background); bold alone is not colour."""
    for params in re.findall(r"\x1b\[([0-9;]*)m", text):
        if any(p and (30 <= int(p) <= 49 or 90 <= int(p) <= 107) for p in params.split(";")):
            return True
    return False


SPINNER = re.compile("[\u2800-\u28ff]")  # rich's "dots" spinner is braille
LONG_ID = "mig-" + "0123456789abcdef" * 7  # 116 characters: wider than any terminal row
LONG_CONTAINER = "a-container-with-a-name-much-longer-than-eighty-columns-can-hold-0123456789"


class ServiceContainers(FakeContainers):
    """The fake container service, keeping labels and the service address as the real one does."""

    async def create(self, req: CreateRequest) -> ContainerSummary:
        await super().create(req)
        labels = dict(req.labels)
        if req.service_ip:
            labels[LABEL_SERVICE_IP] = req.service_ip
        self.items[req.id] = ContainerSummary(req.id, req.image, ContainerState.CREATED, None, None, labels,
                                              "2024-01-01T00:00:00Z", req.restart_policy)
        return self.items[req.id]

    async def start(self, container_id: str) -> ContainerSummary:
        old = self._get(container_id)
        self.items[container_id] = dataclasses.replace(old, state=ContainerState.RUNNING, pid=7)
        return self.items[container_id]

    async def inspect(self, container_id: str) -> dict[str, Any]:
        summary = self._get(container_id)
        restart = {"policy": summary.restart_policy.to_json(), "count": summary.restart_count}
        return {**summary.to_json(), "restart": restart}


class FakeNetwork:
    """The service-network adapter's interface (agent.api.network.ServiceNetworkLike), in memory."""

    def __init__(self) -> None:
        self.published: dict[str, str] = {}

    def info(self, container_key: str) -> NetnsInfo:
        return NetnsInfo(f"/run/netns/{container_key}", f"fm{abs(hash(container_key)) % 10**6}")

    async def publish(self, service_ip: str, host_veth: str) -> None:
        self.published[service_ip] = host_veth

    async def unpublish(self, service_ip: str) -> bool:
        return self.published.pop(service_ip, None) is not None

    async def uplink(self) -> str:
        return "eth0"

    async def routes(self) -> dict[str, str]:
        return dict(self.published)


class FakeAssembly:
    """What CompositionService answers to a warm request (the real one: tests/test_composition.py)."""

    async def resolve(self, document: Any) -> Any:
        raise NotImplementedError

    async def assemble(self, document: Any) -> dict[str, Any]:
        raise NotImplementedError

    async def warm_layer(self, digest: str, ref: str, ttl: float | None = None, model: str = "") -> dict[str, Any]:
        return {
            "digest": digest,
            "ref": ref,
            "size": 10,
            "bytes_fetched": 10,
            "kept": False,
            "lease": "l1",
            "ttl_seconds": ttl or 600,
        }

    def costs_json(self) -> dict[str, Any]:
        return {}


class Agent:
    def __init__(self, log_dir: Path) -> None:
        from agent.metrics import AgentMetrics

        self.metrics = AgentMetrics()
        self.images = FakeImages()
        self.containers = ServiceContainers(log_dir)
        self.network = FakeNetwork()
        self.migrations = FakeMigrations()
        self.migrations.metrics = self.metrics
        self.reservations = Reservations("h1", log_dir, self._capacity, self._usage)
        self.cache = FakeCache()
        self.assembly = FakeAssembly()

    async def _capacity(self) -> Amount:
        return Amount(4000, 4 << 30, 100 << 30)

    async def _usage(self) -> list[ContainerReading]:
        return []


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


@pytest.fixture
def agent(short_dir: Path) -> Agent:
    return Agent(short_dir)


@pytest.fixture
async def server(agent: Agent, short_dir: Path) -> AsyncIterator[ApiServer]:
    srv = await serve(build_app(agent), f"unix://{short_dir}/agent.sock")  # type: ignore[arg-type]
    yield srv
    agent.migrations.release.set()
    await agent.migrations.wait_idle()
    await srv.close()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR", "COLUMNS", "TERM")}
    env.update({"COLUMNS": "80", "TERM": "xterm-256color"}, **extra)
    return env


async def run(server: ApiServer | None, *argv: str, **env: str) -> Result:
    """`ferryctl [--agent URL] ARGV...` with stdout and stderr on pipes (not terminals)."""
    agent = ["--agent", server.url] if server is not None else []
    proc = await asyncio.create_subprocess_exec(
        str(FERRYCTL), *agent, *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(**env)
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


async def run_on_tty(server: ApiServer, *argv: str) -> Result:
    """`ferryctl ARGV...` with stdout and stderr on one pseudo-terminal (what an operator sees)."""
    main_fd, sub_fd = pty.openpty()
    proc = await asyncio.create_subprocess_exec(
        str(FERRYCTL), "--agent", server.url, *argv, stdin=subprocess.DEVNULL, stdout=sub_fd, stderr=sub_fd,
        env=_env(),
    )
    os.close(sub_fd)
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(main_fd, 65536)
            except OSError:  # EIO: the program exited and closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    await asyncio.gather(asyncio.to_thread(drain), proc.wait())
    os.close(main_fd)
    assert proc.returncode is not None
    return Result(proc.returncode, b"".join(chunks).decode(errors="replace"), "")


def _documented_json_keys() -> dict[str, list[str]]:
    """docs/ferryctl.md's JSON table: command -> the keys it promises."""
    section = DOC.read_text().split("## JSON (`--json`)", 1)[1].split("\n## ", 1)[0]
    keys: dict[str, list[str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`") and cells[0] != "command":
            keys[cells[0]] = re.findall(r"`([a-z_]+)`", cells[2])
    return keys


def _documented_exit_codes() -> dict[str, int]:
    section = DOC.read_text().split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    return {m[1]: int(m[0]) for m in re.findall(r"^\| (\d+) \| `([A-Z_]+)` \|", section, re.MULTILINE)}


def _add_target_record(agent: Agent) -> None:
    """A finished inbound migration, as a target agent records it: no downtime, no total."""
    record = MigrationRecord(
        id=MigrationId(LONG_ID), role="target", container=LONG_CONTAINER, peer="host-c",
        state=State.COMMIT, stats=MigrationStats(restore_ms=90.1, bytes_raw=1 << 20),
        started_at="2026-01-01T00:00:00.000+00:00", updated_at="2026-01-01T00:00:04.210+00:00",
    )
    agent.migrations.records[record.id] = record


# ------------------------------------------------------------------ every API field, the API's validation


def test_run_has_an_option_for_every_field_of_the_create_request() -> None:
    schema = yaml.safe_load((ROOT / "agent/api/openapi.yaml").read_text())["components"]["schemas"]
    fields = set(schema["CreateContainerRequest"]["properties"]) | {
        f"resources.{k}" for k in schema["Resources"]["properties"]
    }
    fields.discard("resources")
    # Positionals and the options docs/ferryctl.md maps by another name; the rest are --kebab-case.
    renamed = {"id": "--name", "image": "image", "args": "args", "labels": "--label", "env": "--env",
               "resources.cpus": "--cpus", "resources.memory": "--memory", "restart_policy": "--restart",
               "health": "--health-cmd", "volumes": "--volume"}
    for command in ("run", "create"):
        sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]  # type: ignore[union-attr]
        names = {s for a in sub._actions for s in (a.option_strings or [a.dest])}
        for f in sorted(fields):
            assert renamed.get(f, "--" + f.replace("_", "-")) in names, f"ferryctl {command} has no option for {f}"
        assert "--no-publish-service" in names
        documented = DOC.read_text()
        assert all(f"| `{f}` |" in documented for f in fields), "docs/ferryctl.md maps every field"


async def test_run_and_create_send_every_field(server: ApiServer, agent: Agent) -> None:
    r = await run(server, "run", "--name", "web", "--service-ip", "10.77.0.10", "--label", "team=infra",
                  "-e", "A=1", "--cpus", "0.5", "-m", "64M", "-w", "/srv", "-u", "1000:1000", "app:1", "sh", "-c", "x")
    assert (r.code, r.out, r.err) == (0, "web\n", "")
    req = agent.containers.requests[-1]
    assert (req.service_ip, req.publish_service, req.labels, req.env) == ("10.77.0.10", True, {"team": "infra"},
                                                                          {"A": "1"})
    assert (req.resources.cpus, req.resources.memory, req.workdir, req.user) == (0.5, 64 << 20, "/srv", "1000:1000")
    assert req.args == ("sh", "-c", "x")
    assert req.restart_policy == RestartPolicy()  # no --restart: the API's default, `no`

    # docker's --restart spelling becomes the API's restart_policy; inspect shows it.
    for spelling, policy in (("on-failure:3", RestartPolicy(RestartName.ON_FAILURE, 3)),
                             ("on-failure", RestartPolicy(RestartName.ON_FAILURE)),
                             ("unless-stopped", RestartPolicy(RestartName.UNLESS_STOPPED)),
                             ("no", RestartPolicy())):
        name = f"worker-{policy.name.value}-{policy.max_retries}"
        r = await run(server, "run", "--name", name, "--restart", spelling, "app:1")
        assert (r.code, r.err) == (0, ""), r
        assert agent.containers.requests[-1].restart_policy == policy
        r = await run(server, "inspect", name)
        assert r.json()["restart"]["policy"] == policy.to_json() == {"name": policy.name.value,
                                                                     "max_retries": policy.max_retries}

    # A standby copy: created, not started, not published; published later by address.
    r = await run(server, "create", "--json", "--name", "standby", "--service-ip", "10.77.0.11",
                  "--no-publish-service", "app:1")
    assert r.code == 0 and r.json()["state"] == "created", r
    assert agent.containers.requests[-1].publish_service is False
    assert (await run(server, "start", "standby")).out == "standby running\n"
    r = await run(server, "network", "publish", "--service-ip", "10.77.0.11")
    assert r.code == 0 and r.out.startswith("10.77.0.11 published (standby, fm"), r
    r = await run(server, "--json", "network")
    services = {s["container"]: s for s in r.json()["services"]}
    assert services["standby"]["published"] is True and services["web"]["published"] is False
    r = await run(server, "network", "unpublish", "--container", "standby")
    assert r.out == "10.77.0.11 unpublished\n"


@pytest.mark.parametrize(
    ("argv", "api_message"),
    [
        (["--service-ip", "127.0.0.1"], "service_ip: 127.0.0.1 cannot be a service address"),
        (["--service-ip", "10.0.0.300"], "service_ip: '10.0.0.300' is not an IPv4 address"),
        (["--no-publish-service"], "body.publish_service: only meaningful with service_ip"),
        (["--name", "bad/id"], "invalid container id 'bad/id'"),
        (["--cpus", "100000"], "body.resources.cpus"),
        (["-e", "=x"], "--env '=x': expected KEY=VALUE"),
        (["--restart", "sometimes"], "restart_policy.name: expected one of no, on-failure, always, unless-stopped"),
        (["--restart", "always:3"], "body.restart_policy.max_retries: only on-failure has a retry limit"),
        (["--restart", "on-failure:0"], "body.restart_policy.max_retries: expected a positive integer, got 0"),
        (["--restart", "on-failure:x"], "body.restart_policy.max_retries: expected a positive integer, got 'x'"),
    ],
)
async def test_run_refuses_what_the_api_refuses_before_sending(
    server: ApiServer, agent: Agent, argv: list[str], api_message: str
) -> None:
    r = await run(server, "run", *argv, "app:1")
    assert r.code == Exit.USAGE and api_message in r.err, r
    assert agent.containers.requests == [] and r.out == ""


# ------------------------------------------------------------------ scriptable output


async def test_off_a_terminal_output_is_plain_lines(server: ApiServer, agent: Agent) -> None:
    agent.images.images["app:1"] = ImageSummary("app:1", "sha256:" + "c" * 64, "m", 1)
    for argv in (["migrate", "web", "--to", "host-b"], ["pull", "app:2"], ["ps", "-a"], ["migrations"]):
        r = await run(server, *argv)
        assert r.code == 0, r
        assert ESC not in r.out + r.err and not SPINNER.search(r.out + r.err), (argv, r)
    # The case: the error has a line of its own, and nothing else is on stderr.
    r = await run(server, "migrate", "nosuch", "--to", "host-b")
    assert (r.code, r.out, r.err) == (Exit.ERROR, "", "error: container_not_found: no container nosuch\n")


async def test_on_a_terminal_there_is_colour_unless_told_otherwise(server: ApiServer, agent: Agent) -> None:
    agent.containers.add("web", ContainerState.RUNNING)
    assert has_colour((await run_on_tty(server, "ps")).out)
    for argv in (["ps", "--no-color"], ["--no-progress", "--no-color", "migrate", "web", "--to", "host-b"]):
        r = await run_on_tty(server, *argv)
        assert r.code == 0 and not has_colour(r.out) and not SPINNER.search(r.out), (argv, r.out)


async def test_identifiers_are_never_wrapped_or_cut(server: ApiServer, agent: Agent) -> None:
    _add_target_record(agent)
    for result in (await run(server, "migrations"), await run_on_tty(server, "migrations")):
        row = next(line for line in result.out.splitlines() if LONG_ID in line)
        assert LONG_CONTAINER in row and "host-c" in row and "…" not in result.out
        # A target row shows what the target knows: its restore, and its span start to end.
        assert "restore 90.1 ms" in row and "4.21 s" in row
    r = await run(server, "migrations", "show", LONG_ID)
    assert "  downtime     restore 90.1 ms, the source measures the downtime" in r.out
    assert "  total time   4.21 s" in r.out


# ------------------------------------------------------------------ --json on every command


async def test_every_command_prints_its_documented_json(
    server: ApiServer, agent: Agent, short_dir: Path
) -> None:
    documented = _documented_json_keys()
    agent.images.images["app:1"] = ImageSummary("app:1", "sha256:" + "c" * 64, "m", 1)
    agent.containers.log_path("c1").write_bytes(b"one\ntwo\n")
    ca, out = short_dir / "ca", short_dir / "h1"
    archive = short_dir / "in.tar"
    archive.write_bytes(b"an archive")
    # In this order: each command's state comes from the ones before. `--json` goes after the command
    # for half of them, to show either place works.
    commands: list[tuple[str, list[str]]] = [
        ("`pull`", ["pull", "app:2"]),
        ("`images`", ["images"]),
        ("`rmi`", ["rmi", "app:2"]),
        ("`image import`", ["image", "import", str(archive), "--name", "app:3"]),
        ("`image export`", ["image", "export", "app:3", "-o", str(short_dir / "out.tar")]),
        ("`create`", ["create", "--name", "c1", "--service-ip", "10.77.0.12", "app:1"]),
        ("`start`", ["start", "c1"]),
        ("`run`", ["run", "--name", "c2", "app:1"]),
        ("`ps`", ["ps"]),
        ("`logs`", ["logs", "c1"]),
        ("`inspect`", ["inspect", "c1"]),
        ("`network publish`", ["network", "publish", "--container", "c1"]),
        ("`network`", ["network"]),
        ("`network unpublish`", ["network", "unpublish", "--service-ip", "10.77.0.12"]),
        ("`health`", ["health"]),
        ("`stop`", ["stop", "c2"]),
        ("`rm`", ["rm", "c2"]),
        ("`migrate`", ["migrate", "web", "--to", "host-b"]),
        ("`migrations`", ["migrations"]),
        ("`migrations show`", ["migrations", "show", "mig-0001"]),
        ("`migrations watch`", ["migrations", "watch", "mig-0001"]),
        ("`reservations create`", ["reservations", "create", "--id", "r1", "--cpus", "0.5", "-m", "64M"]),
        ("`reservations`", ["reservations"]),
        ("`reservations release`", ["reservations", "release", "r1"]),
        ("`certs init`", ["certs", "init", "--dir", str(ca)]),
        ("`certs issue`", ["certs", "issue", "h1", "--ca-dir", str(ca), "--out", str(out)]),
        ("`certs show`", ["certs", "show", str(out / "ca.pem")]),
        ("`completion`", ["completion", "bash"]),
        ("`cache prefetch`", ["cache", "prefetch", "app:4", "--pin"]),
        ("`cache prefetch --layer`", ["cache", "prefetch", "--layer", "sha256:" + "d" * 64, "--from", "app:4"]),
        ("`cache pin`", ["cache", "pin", "app:4"]),
        ("`cache status`", ["cache", "status"]),
        ("`cache unpin`", ["cache", "unpin", "app:4"]),
        ("`cache evict`", ["cache", "evict", "app:4"]),
    ]
    agent_commands = {c for c in documented if "(coordinator)" not in c}
    assert {c for c, _ in commands} == agent_commands, "every documented command is run here"
    for i, (name, argv) in enumerate(commands):
        r = await run(server, "--json", *argv) if i % 2 else await run(server, *argv, "--json")
        assert r.code == 0, (name, r)
        docs = [json.loads(line) for line in r.out.splitlines()] if name == "`logs`" else [r.json()]
        assert docs, name
        for doc in docs:
            missing = [k for k in documented[name] if k not in doc]
            assert not missing, f"{name} --json lacks {missing}: {doc}"
    assert [json.loads(line)["line"] for line in (await run(server, "--json", "logs", "c1")).out.splitlines()] == [
        "one", "two"
    ]


async def test_a_failure_in_json_mode_is_json_too(server: ApiServer) -> None:
    r = await run(server, "--json", "stop", "ghost")
    assert r.code == Exit.ERROR
    assert r.json() == {"error": {"code": "container_not_found", "message": "no container ghost"}, "exit_code": 1}
    assert r.err == "error: container_not_found: no container ghost\n"
    # argparse's own complaints and the offline `certs` failures too.
    r = await run(server, "--json", "migrate", "web")
    assert r.code == Exit.USAGE and "the following arguments are required: --to" in r.err
    assert r.json() == {"error": {"code": "usage", "message": "the following arguments are required: --to"},
                        "exit_code": 2}
    assert (await run(server, "migrate", "web")).out == ""  # without --json: stderr only
    r = await run(None, "certs", "show", "/nonexistent.pem", "--json")
    assert r.code == Exit.ERROR and r.json()["error"]["code"] and r.json()["exit_code"] == 1, r
    assert r.err.startswith("error: "), r


# ------------------------------------------------------------------ exit codes


def test_the_exit_code_table_is_the_documented_one() -> None:
    assert _documented_exit_codes() == {e.name: int(e) for e in Exit}


async def test_exit_codes(server: ApiServer, short_dir: Path) -> None:
    assert (await run(server, "ps")).code == Exit.OK
    assert (await run(server, "stop", "ghost")).code == Exit.ERROR
    assert (await run(server, "migrate", "web")).code == Exit.USAGE  # no --to
    r = await run(server, "migrate", "late", "--to", "host-b", "--downtime-target", "150")
    assert r.code == Exit.OK and "warning: downtime_target_missed" in r.err, r  # committed: the workload moved
    r = await run(server, "migrate", "doomed", "--to", "host-b")
    assert r.code == Exit.NOT_MIGRATED and r.err.endswith("error: rolled_back: target restore failed: CRIU said no\n")
    r = await run(None, "--agent", f"unix://{short_dir}/none.sock", "ps")
    assert r.code == Exit.UNREACHABLE and r.err.startswith("error: agent_unreachable: ")
    # NEEDS_OPERATOR and NOT_DRAINED need an agent or a coordinator in those states: the same
    # function decides (here) and tests/test_fleet_ctl.py runs `drain --wait` to its exit 7.
    stuck = MigrationRecord(id=MigrationId("m"), role="source", container="c", peer="p", state=State.NEEDS_OPERATOR)
    assert outcome(stuck.for_storage()) == Exit.NEEDS_OPERATOR


async def test_reservations_by_hand_on_one_agent(server: ApiServer, agent: Agent) -> None:
    made = await run(server, "reservations", "create", "--cpus", "0.5", "-m", "256M", "--ttl", "120",
                     "--purpose", "maintenance")
    assert made.code == Exit.OK, made
    rid = made.out.split()[0]
    assert rid.startswith("ops-") and " on h1 until " in made.out
    [held] = agent.reservations.held()
    assert (held.id, held.capacity.cpu_millis, held.capacity.memory_bytes, held.purpose) == (
        rid, 500, 256 << 20, "maintenance"
    )
    assert 110 < held.expires_at - time.time() <= 120
    listed = await run(server, "reservations")
    assert listed.code == Exit.OK and rid in listed.out and "256.0 MiB" in listed.out, listed.out
    # Refused before anything is sent, in the words of the API's validation where it has them.
    for argv, words in (
        (["reservations", "create"], "give at least one of --cpus, --memory and --disk"),
        (["reservations", "create", "-m", "1M", "--host", "h2"], "--host: only with a coordinator"),
        (["reservations", "create", "-m", "1M", "--id", "bad id"], "must match"),
        (["reservations", "create", "-m", "1M", "--ttl", "100000"], "must be within"),
        (["reservations", "create", "--cpus", "0"], "cpu count must be positive"),
    ):
        r = await run(server, *argv)
        assert r.code == Exit.USAGE and words in r.err, (argv, r)
    assert [h.id for h in agent.reservations.held()] == [rid]
    gone = await run(server, "reservations", "release", "nosuch")
    assert gone.code == Exit.ERROR and "error: reservation_not_found: " in gone.err, gone
    assert (await run(server, "reservations", "release", rid)).code == Exit.OK
    assert agent.reservations.held() == []


# ------------------------------------------------------------------ shell completion


async def test_bash_completion_completes_commands_and_options() -> None:
    script = (await run(None, "completion", "bash")).out
    probe = (
        'source <(ferryctl completion bash) || exit 9\n'
        'c() { COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); COMP_LINE="$*"; COMP_POINT=${#COMP_LINE};'
        ' COMPREPLY=(); _shtab_ferryctl; echo "${COMPREPLY[*]}"; }\n'
        "c ferryctl mig\nc ferryctl run --service\nc ferryctl migrate web --mode ''\nc ferryctl completion ''\n"
    )
    env = _env(PATH=f"{FERRYCTL.parent}:{os.environ['PATH']}")
    proc = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, env=env, check=False, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["migrate migrations", "--service-ip", "auto precopy lazy hybrid", "bash zsh"]
    assert "complete -o bashdefault -F _shtab_ferryctl ferryctl" in script


async def test_zsh_completion_is_valid_zsh(short_dir: Path) -> None:
    zsh = shutil.which("zsh")
    assert zsh is not None, "zsh is missing: scripts/setup-host installs it"
    path = short_dir / "_ferryctl"
    path.write_text((await run(None, "completion", "zsh")).out)
    assert path.read_text().startswith("#compdef ferryctl")
    proc = subprocess.run([zsh, "-n", str(path)], capture_output=True, text=True, check=False, timeout=60)
    assert proc.returncode == 0, proc.stderr
