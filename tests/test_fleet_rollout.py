"""The Ansible roles against hosts that run systemd as PID 1 (tests/harness/systemd_host.py).

Three fresh Debian roots boot with systemd; `ansible/site.yml` reaches them with the nsenter
connection plugin and installs the fleet PKI, the coordinator (on h1) and the agents (on all three)
from the controller's checkout, the ferryman-criu package and a wheelhouse. The tests then check
what a user would: the services run under systemd with the units' readiness, restart and logging
behaviour, the agents registered with the coordinator over mutual TLS, and a second run of the
playbook changes nothing. Then `site.yml -e ferryman_pki_rotate=true` gives every host a new
certificate while the workloads serve their clients: the services reload it in place (same
processes), no request fails, and a drain afterwards migrates over the new certificates. Last,
`ansible/upgrade.yml` moves the coordinator and every agent to a
new commit, one host at a time, each drained through the coordinator and returned to service, while
a stateful workload per host serves a client that keeps calling it: the workloads live-migrate out
of the way, no request fails and their memory is intact; the rollout time and the longest gap a
client saw are printed.

The first run takes most of the module's time (three venvs installed on a 2-core machine); the
module is marked `fleet` (and `slow`): `pytest -m fleet` runs it alone.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from core.security import HostCertPaths, client_context
from tests.harness import netns as nsh
from tests.harness.images import oci_archive
from tests.harness.systemd_host import REPO, PlaybookRun, SystemdFleet, SystemdHost, run_playbook, write_inventory
from tests.harness.workloads import MemhogStatus, memhog_image

pytestmark = [pytest.mark.fleet, pytest.mark.slow, pytest.mark.timeout(1500)]

AGENTS = ("h1", "h2", "h3")
COORDINATOR = "h1"
OPERATOR = "alice"
PROTOCOL_FILE = "agent/migration/protocol.py"


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout.strip()


def previous_release() -> str:
    """The commit before the one that set this checkout's MIGRATION_PROTOCOL: the fleet starts there and
    the rolling upgrade crosses that protocol change (old and new agents migrate to each other)."""
    version = re.search(r"^MIGRATION_PROTOCOL = (\d+)$", (REPO / PROTOCOL_FILE).read_text(), re.M)
    assert version is not None, f"no MIGRATION_PROTOCOL in {PROTOCOL_FILE}"
    changes = _git("log", "--format=%H", "-S", version.group(0), "--", PROTOCOL_FILE).split()
    assert changes, f"no commit set {version.group(0)}"
    return _git("rev-parse", "--verify", f"{changes[-1]}^")


def _script(name: str) -> Path:
    res = subprocess.run([str(REPO / "scripts" / name)], capture_output=True, text=True, timeout=900, check=False)
    assert res.returncode == 0, f"scripts/{name} failed:\n{res.stderr[-3000:]}"
    return Path(res.stdout.strip().splitlines()[-1])


class Deployed:
    def __init__(self, fleet: SystemdFleet, workdir: Path, first: PlaybookRun, release: str) -> None:
        self.fleet = fleet
        self.workdir = workdir
        self.first = first
        self.pki = workdir / "pki"
        self.release = release
        """The commit site.yml deployed: the previous release (previous_release)."""

    def ferryctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The controller's ferryctl as operator `alice`, from the bridge's side (the fabric netns)."""
        ops = self.pki / "ops" / OPERATOR
        argv = [
            "nsenter", f"--net=/run/netns/{self.fleet.fabric_netns}", "--",
            str(REPO / ".venv" / "bin" / "ferryctl"),
            "--coordinator", f"https://{self.fleet[COORDINATOR].address}:7543",
            "--ca", str(ops / "ca.pem"), "--cert", str(ops / "client.pem"), "--key", str(ops / "client-key.pem"),
            *args,
        ]  # fmt: skip
        return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    criu_deb = _script("build-criu-deb")
    wheelhouse = _script("build-wheelhouse")
    release = previous_release()
    workdir = tmp_path_factory.mktemp("rollout")
    fleet = SystemdFleet(Path("/var/tmp"), len(AGENTS))
    fleet.start()
    try:
        inventory = write_inventory(
            fleet,
            workdir / "hosts.yml",
            coordinators=[COORDINATOR],
            agents=AGENTS,
            variables={
                "ferryman_criu_deb": str(criu_deb),
                "ferryman_wheelhouse": str(wheelhouse),
                "ferryman_pki_dir": str(workdir / "pki"),
                "ferryman_pki_ferryctl": str(REPO / ".venv" / "bin" / "ferryctl"),
                "ferryman_pki_operators": [OPERATOR],
                "ferryman_version": release,
                # Fast registration and telemetry: the test waits for them.
                "ferryman_agent_config": {"version": 1, "telemetry": {"period": 1.0}},
            },
        )
        first = run_playbook(inventory)
        print(f"first run: {first.seconds:.0f} s, changed {first.changed()}")
        assert first.returncode == 0, first.output[-6000:]
        yield Deployed(fleet, workdir, first, release)
    finally:
        fleet.stop()
        leftovers = [cg for h in fleet.hosts for cg in h.leftover_cgroups()]
        assert not leftovers, f"cgroups left behind: {leftovers}"
        assert not fleet.dir.exists(), f"{fleet.dir} left behind"


def test_first_run_installs_everything(deployed: Deployed) -> None:
    assert set(deployed.first.recap) == set(AGENTS)
    for name, recap in deployed.first.recap.items():
        assert recap["failed"] == 0 and recap["unreachable"] == 0, (name, recap)
        assert recap["changed"] > 0, (name, recap)
    for host in deployed.fleet.hosts:
        assert host.sh("systemctl is-active ferryman-agent containerd").split() == ["active", "active"]
        # A runtime host: CRIU from the package, no compiler, no test tools in the venv.
        assert "ferryman-criu" in host.sh("dpkg-query -W -f='${Package}\\n' ferryman-criu")
        check = host.exec(["/usr/local/sbin/criu", "check"])
        assert "Looks good" in check.stdout + check.stderr, check
        assert host.exec(["sh", "-c", "command -v gcc"]).returncode != 0
        assert host.exec(["/opt/ferryman/venv/bin/python", "-c", "import pytest"]).returncode != 0
        assert host.exec(["/opt/ferryman/venv/bin/python", "-c", "import pycriu, agent.daemon"]).returncode == 0
        key = host.sh("stat -c '%U:%G %a' /etc/ferryman/pki/host-key.pem").strip()
        assert key == "root:ferryman 640", key
    coordinator = deployed.fleet[COORDINATOR]
    assert coordinator.sh("systemctl is-active ferryman-coordinator").strip() == "active"


def test_agents_register_with_the_coordinator(deployed: Deployed) -> None:
    deadline = time.monotonic() + 60
    hosts: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        res = deployed.ferryctl("--json", "hosts")
        if res.returncode == 0:
            hosts = json.loads(res.stdout)["hosts"]
            if sorted(str(h["name"]) for h in hosts) == list(AGENTS) and all(h["state"] == "ready" for h in hosts):
                return
        time.sleep(1)
    raise AssertionError(f"agents did not all register: {hosts or res.stdout + res.stderr}")


def test_agent_unit_under_systemd(deployed: Deployed) -> None:
    host = deployed.fleet["h2"]
    unit = "ferryman-agent.service"
    props = {p: host.unit_property(unit, p) for p in ("Type", "NotifyAccess", "Restart", "KillMode", "Delegate")}
    assert props == {
        "Type": "notify",
        "NotifyAccess": "main",
        "Restart": "on-failure",
        "KillMode": "process",
        "Delegate": "yes",
    }
    # Type=notify: "active" means the agent sent READY=1 (until then the unit is "activating").
    assert host.unit_property(unit, "ActiveState") == "active"
    assert host.unit_property(unit, "SubState") == "running"
    # Its logs are in the host's journal.
    assert "ferryman" in host.journal(unit).lower()

    # A crash (SIGKILL) is restarted, and the new process becomes ready again.
    pid = host.unit_property(unit, "MainPID")
    restarts = int(host.unit_property(unit, "NRestarts"))
    host.sh(f"kill -9 {pid}")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        new_pid = host.unit_property(unit, "MainPID")
        if new_pid not in ("0", pid) and host.unit_property(unit, "ActiveState") == "active":
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"not restarted:\n{host.sh('systemctl status ferryman-agent --no-pager', check=False)}")
    assert int(host.unit_property(unit, "NRestarts")) == restarts + 1

    # A stop is clean: SIGTERM ends the agent with success, and start brings it back ready.
    host.sh("systemctl stop ferryman-agent")
    assert host.unit_property(unit, "Result") == "success"
    assert host.unit_property(unit, "ExecMainStatus") == "0"
    host.sh("systemctl start ferryman-agent", timeout=120)
    assert host.unit_property(unit, "ActiveState") == "active"


def test_a_hung_agent_is_restarted_by_the_watchdog(deployed: Deployed) -> None:
    """The agent pings systemd's watchdog from its event loop: a live agent outlasts WatchdogSec=,
    a stopped one (SIGSTOP: its loop no longer turns) is aborted, killed and started again."""
    host = deployed.fleet["h3"]
    unit = "ferryman-agent.service"
    assert host.unit_property(unit, "WatchdogUSec") == "30s"
    limit = 30.0
    # Alive past the limit with the same process: its pings arrive.
    pid = host.unit_property(unit, "MainPID")
    restarts = int(host.unit_property(unit, "NRestarts"))
    started = int(host.unit_property(unit, "ExecMainStartTimestampMonotonic")) / 1e6
    time.sleep(max(0.0, started + limit + 2 - time.monotonic()))
    assert (host.unit_property(unit, "MainPID"), int(host.unit_property(unit, "NRestarts"))) == (pid, restarts)

    host.sh(f"kill -STOP {pid}")
    stopped = time.monotonic()
    deadline = stopped + limit + 60
    while time.monotonic() < deadline:
        new_pid = host.unit_property(unit, "MainPID")
        if new_pid not in ("0", pid) and host.unit_property(unit, "ActiveState") == "active":
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"not restarted:\n{host.sh('systemctl status ferryman-agent --no-pager', check=False)}")
    print(f"hung agent restarted after {time.monotonic() - stopped:.0f} s")
    # By the watchdog: 30 s after the last ping, which came at most 15 s before the SIGSTOP (systemd
    # sends SIGCONT after SIGABRT, so the abort itself is quick).
    assert time.monotonic() - stopped > limit / 2 - 1
    assert int(host.unit_property(unit, "NRestarts")) == restarts + 1
    # Aborted (SIGABRT is the watchdog's signal): faulthandler's line, then its best-effort stacks.
    # systemd's own "Watchdog timeout" line goes to the test host's console, not to its journal.
    journal = host.journal(unit)
    assert "Fatal Python error: Aborted" in journal, journal[-3000:]


def test_coordinator_unit_under_systemd(deployed: Deployed) -> None:
    host = deployed.fleet[COORDINATOR]
    unit = "ferryman-coordinator.service"
    assert host.unit_property(unit, "Type") == "notify"
    assert host.unit_property(unit, "ActiveState") == "active"
    assert host.unit_property(unit, "DynamicUser") == "yes"
    user = host.sh(f"ps -o user= -p {host.unit_property(unit, 'MainPID')}").strip()
    assert user != "root", user
    assert host.journal(unit).strip(), "nothing in the journal"


def test_second_run_changes_nothing(deployed: Deployed) -> None:
    inventory = deployed.workdir / "hosts.yml"
    second = run_playbook(inventory)
    print(f"second run: {second.seconds:.0f} s, changed {second.changed()}")
    assert second.returncode == 0, second.output[-6000:]
    assert second.changed() == dict.fromkeys(AGENTS, 0), second.output[-6000:]


# ----- workloads that must not notice the rolling upgrade -------------------------------------------

WORKLOAD_IMAGE = "ferryman.test/memhog:rollout"
WORKLOAD_PORT = 9000
CLIENT = REPO / "bench" / "_client.py"
CLIENT_PERIOD_MS = 10
"""The persistent connection's pace: 100 requests a second per workload (the machine has 2 cores)."""
CLIENT_SHORT_PER_S = 2
CLIENT_TIMEOUT = 15.0
"""A request unanswered this long is a failure (a freeze is a pause, far shorter)."""
BUNDLES = "/run/containerd/io.containerd.runtime.v2.task/ferryman"


@dataclass(frozen=True)
class Workload:
    name: str
    ip: str
    home: str
    """Where it started."""


def start_workloads(deployed: Deployed) -> list[Workload]:
    """memhog (16 MiB whose every page is checkable, a TCP server reading a page per request) on each
    host, with a service address on the bridge; the last one labelled ferryman.postcopy=never."""
    archive = oci_archive(memhog_image(resident_mib=16, rewrite_mbps=0.5, port=WORKLOAD_PORT).build(), WORKLOAD_IMAGE)
    workloads = []
    for i, host in enumerate(deployed.fleet.hosts, 1):
        imported = subprocess.run(
            [*host.nsenter_argv(), "/usr/local/bin/ferryctl", "image", "import", "-"],
            input=archive, capture_output=True, timeout=120, check=False,
        )  # fmt: skip
        assert imported.returncode == 0, imported.stderr.decode(errors="replace")
        workload = Workload(f"w{i}", str(deployed.fleet.subnet.network_address + 100 + i), host.name)
        never = "--label ferryman.postcopy=never" if i == len(deployed.fleet.hosts) else ""
        run = f"/usr/local/bin/ferryctl run --name {workload.name} --service-ip {workload.ip} {never}"
        host.sh(f"{run} {WORKLOAD_IMAGE}")
        workloads.append(workload)
    for workload in workloads:
        deadline = time.monotonic() + 60
        while not nsh.call_in_netns(deployed.fleet.fabric_netns, _answers, workload.ip):
            assert time.monotonic() < deadline, f"{workload.name} does not serve {workload.ip}:{WORKLOAD_PORT}"
            time.sleep(0.2)
    return workloads


def _answers(ip: str) -> bool:
    try:
        with socket.create_connection((ip, WORKLOAD_PORT), timeout=1) as sock:
            sock.sendall(b"1 1\n")
            return sock.recv(64).endswith(b" ok\n")
    except OSError:
        return False


class Client:
    """bench/_client.py from the bridge's side (the fabric netns): one persistent connection in
    lock-step and a trickle of short connections; `stop()` returns what it saw."""

    def __init__(self, fleet: SystemdFleet, workload: Workload) -> None:
        self.workload = workload
        argv = [
            *nsh.nsenter_argv(fleet.fabric_netns), sys.executable, str(CLIENT), workload.ip, str(WORKLOAD_PORT),
            str(CLIENT_SHORT_PER_S), str(CLIENT_TIMEOUT), str(CLIENT_PERIOD_MS),
        ]  # fmt: skip
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def stop(self) -> dict[str, Any]:
        # communicate() closes the client's stdin, its stop signal, and reads what it saw.
        out, err = self.proc.communicate(timeout=CLIENT_TIMEOUT + 30)
        assert self.proc.returncode == 0, err.decode(errors="replace")[-3000:]
        return dict(json.loads(out))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def failures(seen: dict[str, Any]) -> list[tuple[float, str]]:
    """Every failed request: the persistent connection's and the short connections'."""
    short = [(started, kind) for started, _, kind in seen["short"] if kind != "ok"]
    return [(t, kind) for t, kind in seen["errors"]] + short


def longest_gap(seen: dict[str, Any]) -> float:
    """The longest time between two good replies on the persistent connection (seconds)."""
    stamps = [seen["started"], *seen["replies"], seen["stopped"]]
    return max(b - a for a, b in itertools.pairwise(stamps))


def where_runs(fleet: SystemdFleet, name: str) -> list[SystemdHost]:
    found = []
    for host in fleet.hosts:
        listed = json.loads(host.sh("/usr/local/bin/ferryctl --json ps"))["containers"]
        found += [host for c in listed if c["id"] == name and c.get("state") == "running"]
    return found


def memhog_state(host: SystemdHost, name: str, *, verify: bool = False) -> MemhogStatus:
    """memhog's status line (in its rootfs on `host`); with `verify`, after it checked every page."""
    status = f"{BUNDLES}/{name}/rootfs/tmp/status"
    if verify:
        host.sh(f"echo 1 > {status}.verify")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = host.sh(f"cat {status} 2>/dev/null || true")
        with contextlib.suppress(KeyError, ValueError):
            state = MemhogStatus.parse(text)
            if not verify or (state.verified != "none" and not host.sh(f"ls {status}.verify 2>/dev/null || true")):
                return state
        time.sleep(0.2)
    raise AssertionError(f"no memhog status for {name} on {host.name}")


@pytest.fixture(scope="module")
def workloads(deployed: Deployed) -> list[Workload]:
    """The workloads, started once for the tests that need them (they stay until the fleet goes)."""
    return start_workloads(deployed)


PEER_PORT, OPS_PORT, COORDINATOR_PORT = 7443, 7444, 7543


def served_serials(deployed: Deployed) -> dict[tuple[str, int], int]:
    """The serial of the certificate each TLS listener presents, from the bridge's side: every agent's
    peer and ops ports and the coordinator's API (the alice certificate gets through the handshake)."""
    return {key: cert.serial_number for key, cert in served_certificates(deployed).items()}


def served_certificates(deployed: Deployed) -> dict[tuple[str, int], x509.Certificate]:
    """The certificate each TLS listener presents (see served_serials)."""
    ops = deployed.pki / "ops" / OPERATOR
    ctx = client_context(HostCertPaths(ops / "ca.pem", ops / "client.pem", ops / "client-key.pem"))

    def serial(address: str, port: int, name: str) -> x509.Certificate:
        with (
            socket.create_connection((address, port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname=name) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            return x509.load_der_x509_certificate(der)

    listeners = [(h.name, port) for h in deployed.fleet.hosts for port in (PEER_PORT, OPS_PORT)]
    listeners.append((COORDINATOR, COORDINATOR_PORT))
    fleet = deployed.fleet
    return {(n, p): nsh.call_in_netns(fleet.fabric_netns, serial, fleet[n].address, p, n) for n, p in listeners}


def refusals_of(deployed: Deployed, cert_file: Path, key_file: Path) -> dict[tuple[str, int], str]:
    """How each TLS listener answers a client presenting `cert_file`: the TLS alert it sends, or
    "accepted". With TLS 1.3 the client's handshake ends before the server checks its certificate,
    so the answer is what the first read brings."""
    ops = deployed.pki / "ops" / OPERATOR
    ctx = client_context(HostCertPaths(ops / "ca.pem", cert_file, key_file))

    def answer(address: str, port: int, name: str) -> str:
        with socket.create_connection((address, port), timeout=10) as raw:
            try:
                with ctx.wrap_socket(raw, server_hostname=name) as tls:
                    tls.settimeout(1.0)  # a refusal comes at once; a server that accepted waits for a request
                    if tls.recv(1) == b"":
                        return "closed without an alert"
            except ssl.SSLError as exc:
                return str(exc.reason)
            except ConnectionError as exc:
                return f"reset: {exc}"
            except TimeoutError:
                pass  # it waits for our request: the handshake passed
            return "accepted"

    listeners = [(h.name, port) for h in deployed.fleet.hosts for port in (PEER_PORT, OPS_PORT)]
    listeners.append((COORDINATOR, COORDINATOR_PORT))
    fleet = deployed.fleet
    return {(n, p): nsh.call_in_netns(fleet.fabric_netns, answer, fleet[n].address, p, n) for n, p in listeners}


def issued_serials(deployed: Deployed) -> dict[str, int]:
    """The serial of each host's certificate as the controller last issued it."""
    return {
        name: x509.load_pem_x509_certificate((deployed.pki / "hosts" / name / "host.pem").read_bytes()).serial_number
        for name in AGENTS
    }


def longest_gap_between(seen: dict[str, Any], start: float, end: float) -> float:
    """The longest time without a good reply on the persistent connection within [start, end]."""
    stamps = [start, *(t for t in seen["replies"] if start < t < end), end]
    return max(b - a for a, b in itertools.pairwise(stamps))


def fleet_services(fleet: SystemdFleet) -> list[tuple[SystemdHost, str]]:
    """Every agent's unit and the coordinator's, with their hosts."""
    services = [(h, "ferryman-agent.service") for h in fleet.hosts]
    services.append((fleet[COORDINATOR], "ferryman-coordinator.service"))
    return services


def service_pids(services: list[tuple[SystemdHost, str]]) -> dict[tuple[str, str], tuple[str, str]]:
    """Each unit's MainPID and NRestarts: unchanged means reloaded, not restarted."""
    return {(h.name, u): (h.unit_property(u, "MainPID"), h.unit_property(u, "NRestarts")) for h, u in services}


def drain_and_return(
    deployed: Deployed, host: str
) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
    """`ferryctl drain HOST --wait 300`, then `uncordon HOST`: both results."""
    return deployed.ferryctl("drain", host, "--wait", "300"), deployed.ferryctl("uncordon", host)


def test_certificate_rotation_under_load(deployed: Deployed, workloads: list[Workload]) -> None:
    """`site.yml -e ferryman_pki_rotate=true` while every workload serves its client: each host gets
    a new certificate and its services reload it (SIGHUP, the same processes), no request fails, and
    a migration afterwards (a drain of h2, then uncordon) runs over the new certificates."""
    fleet = deployed.fleet
    services = fleet_services(fleet)

    def pids() -> dict[tuple[str, str], tuple[str, str]]:
        return service_pids(services)

    before_pids = pids()
    before = served_serials(deployed)
    assert {before[(n, p)] for n in AGENTS for p in (PEER_PORT, OPS_PORT)} == set(issued_serials(deployed).values())
    clients = [Client(fleet, w) for w in workloads]
    inventory = deployed.workdir / "hosts.yml"
    try:
        time.sleep(2)  # the clients' steady state first
        t0 = time.time()
        rotation = run_playbook(inventory, ferryman_pki_rotate="true")
        t_played = time.time()
        assert rotation.returncode == 0, rotation.output[-6000:]
        # systemctl reload returns once SIGHUP is sent; the daemons load the files right after.
        issued = issued_serials(deployed)
        expected = {(n, p): issued[n] for n, p in before}
        deadline = time.monotonic() + 30
        while (after := served_serials(deployed)) != expected and time.monotonic() < deadline:
            time.sleep(0.2)
        t_served = time.time()
        time.sleep(2)
        t_drain = time.time()
        drained, uncordoned = drain_and_return(deployed, "h2")
        t_moved = time.time()
        time.sleep(2)
        seen = {c.workload.name: c.stop() for c in clients}
    finally:
        for client in clients:
            client.kill()
    rotation_gap = max(longest_gap_between(s, t0, t_served) for s in seen.values())
    drain_gap = max(longest_gap_between(s, t_drain, t_moved) for s in seen.values())
    print(
        f"certificate rotation: playbook {rotation.seconds:.0f} s, changed {rotation.changed()}; all listeners "
        f"serving new certificates {t_served - t0:.0f} s after it started ({t_served - t_played:.1f} s after it "
        f"ended); longest client gap {rotation_gap * 1000:.0f} ms during the rotation; drain of h2 after it "
        f"{t_moved - t_drain:.0f} s, longest client gap {drain_gap * 1000:.0f} ms"
    )
    # Every listener serves the host's new certificate, and every one of them is new.
    assert after == expected, (after, expected)
    assert all(after[key] != before[key] for key in before), (before, after)
    # Reloaded, not restarted: the same processes, no restart counted.
    assert pids() == before_pids
    for host, unit in services:
        assert "tls certificates reloaded" in host.journal(unit), (host.name, unit)
    # No client request failed, during the rotation or the drain that followed.
    assert {name: failures(s) for name, s in seen.items()} == {w.name: [] for w in workloads}
    # The drain migrated h2's workload to another host over the new certificates.
    assert drained.returncode == 0, drained.stdout + drained.stderr
    assert uncordoned.returncode == 0, uncordoned.stdout + uncordoned.stderr
    w2 = next(w for w in workloads if w.home == "h2")
    moved_to = where_runs(fleet, w2.name)
    assert len(moved_to) == 1 and moved_to[0].name != "h2", (w2.name, moved_to)
    hosts = json.loads(deployed.ferryctl("--json", "hosts").stdout)["hosts"]
    assert {h["name"]: (h["state"], h["admin"]) for h in hosts} == dict.fromkeys(AGENTS, ("ready", "active"))


def agreed_protocols(host: SystemdHost) -> list[dict[str, Any]]:
    """The agent's "migration protocol agreed" log lines (as a source and as a target), oldest first."""
    lines = []
    for line in host.journal("ferryman-agent.service").splitlines():
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict) and entry.get("msg") == "migration protocol agreed":
                lines.append(entry)
    return lines


def migrate(deployed: Deployed, name: str, target: str) -> tuple[str, float]:
    """`ferryctl migrate` on the host that runs `name` (its agent's own ferryctl); (source, seconds)."""
    (source,) = where_runs(deployed.fleet, name)
    t0 = time.monotonic()
    res = source.exec(["/usr/local/bin/ferryctl", "migrate", name, "--to", target], timeout=300)
    assert res.returncode == 0, (name, source.name, target, res.stdout + res.stderr)
    assert [h.name for h in where_runs(deployed.fleet, name)] == [target], name
    return source.name, time.monotonic() - t0


def test_rolling_upgrade_across_a_protocol_change(
    deployed: Deployed, workloads: list[Workload], tmp_path: Path
) -> None:
    """upgrade.yml moves the coordinator, then every agent, from the previous release (the commit
    before this checkout's MIGRATION_PROTOCOL) to this checkout's HEAD, one host at a time, each
    drained through the coordinator first and returned to service after; a second run changes
    nothing. It runs in two parts so that old and new agents meet: first the coordinator and h1
    (`--limit h1`), then a workload migrates from an old agent to the new one and back, then the
    rest. A workload on each host keeps serving its client throughout: no request fails, and its
    memory is intact after. Migrations between releases speak protocol 1 (the older agent's),
    migrations between upgraded agents protocol 2, which checks CRIU versions.

    Leaves the fleet at the checkout's HEAD, not the release the fixture deployed."""
    fleet = deployed.fleet
    new = _git("rev-parse", "HEAD")
    assert new != deployed.release
    for host in fleet.hosts:
        assert host.sh("cat /opt/ferryman/src/.ferryman-commit").strip() == deployed.release
    # Where each runs now (a test before may have migrated some).
    before = {w.name: memhog_state(where_runs(fleet, w.name)[0], w.name) for w in workloads}
    clients = [Client(fleet, w) for w in workloads]
    inventory = deployed.workdir / "hosts.yml"
    cross: list[tuple[str, str, float]] = []
    try:
        time.sleep(2)  # the clients' steady state before anything moves
        first = run_playbook(inventory, "upgrade.yml", limit=COORDINATOR, ferryman_version=new)
        assert first.returncode == 0, first.output[-6000:]
        # h1 runs the new release, h2 and h3 the old one: a workload moves old -> new -> old.
        mover = next(w for w in workloads if w.name != "w3")  # w3 is pre-copy only; any mode will do
        (old_home,) = where_runs(fleet, mover.name)
        assert old_home.name != COORDINATOR, "h1 was drained"
        source, seconds = migrate(deployed, mover.name, COORDINATOR)
        cross.append((source, COORDINATOR, seconds))
        source, seconds = migrate(deployed, mover.name, old_home.name)
        cross.append((source, old_home.name, seconds))
        rest = run_playbook(inventory, "upgrade.yml", ferryman_version=new)
        assert rest.returncode == 0, rest.output[-6000:]
        # Both upgraded now: a migration between them speaks protocol 2.
        newest = next(h.name for h in fleet.hosts if h.name not in (COORDINATOR, where_runs(fleet, mover.name)[0].name))
        source, seconds = migrate(deployed, mover.name, newest)
        cross.append((source, newest, seconds))
        time.sleep(2)
        seen = {c.workload.name: c.stop() for c in clients}
    finally:
        for client in clients:
            client.kill()
    gaps = {name: longest_gap(s) for name, s in seen.items()}
    print(
        f"rolling upgrade {deployed.release[:12]} -> {new[:12]}: {first.seconds + rest.seconds:.0f} s "
        f"(coordinator and h1 {first.seconds:.0f} s, h2 and h3 {rest.seconds:.0f} s), changed "
        f"{first.changed()} then {rest.changed()}; migrations by hand "
        + ", ".join(f"{a}->{b} {t:.1f} s" for a, b, t in cross)
        + f"; longest client gap {max(gaps.values()) * 1000:.0f} ms ("
        + ", ".join(f"{name} {gap * 1000:.0f} ms, {len(seen[name]['replies'])} replies" for name, gap in gaps.items())
        + ")"
    )
    # Before anything moved, each host named its containers that migrate by pre-copy only.
    assert re.search(r"ok: \[h3\] => \{\s*\"msg\": \"pre-copy only: \['w3'\]\"", rest.output), rest.output[:6000]
    # Every workload answered every request, the whole time, and still holds every page it wrote.
    assert {name: failures(s) for name, s in seen.items()} == {w.name: [] for w in workloads}
    for workload in workloads:
        hosts = where_runs(fleet, workload.name)
        assert len(hosts) == 1, (workload.name, hosts)
        after = memhog_state(hosts[0], workload.name, verify=True)
        assert after.verified == "ok", (workload.name, after)
        assert after.bad_pages == 0 and after.served > before[workload.name].served, (workload.name, after)
        assert after.beats > before[workload.name].beats, (workload.name, after)  # the same process, counting on
    for host in fleet.hosts:
        assert host.sh("cat /opt/ferryman/src/.ferryman-commit").strip() == new
        assert host.sh("systemctl is-active ferryman-agent").strip() == "active"
    # The versions the agents agreed on: the new agent on h1 spoke protocol 1 with the old agents (as
    # a target, then as a source), and protocol 2 once both sides were new, with CRIU versions.
    agreed = {h.name: agreed_protocols(h) for h in fleet.hosts}
    h1 = [(e["peer"], e["protocol"]) for e in agreed[COORDINATOR]]
    assert h1[:2] == [(old_home.name, 1), (old_home.name, 1)], agreed[COORDINATOR]
    last = agreed[newest][-1]
    assert (last["peer"], last["protocol"]) == (cross[-1][0], 2) and re.fullmatch(r"[\d.]+", last["peer_criu"]), last
    # serial: 1 — each host is drained and returned to service before the next one is drained.
    events = [
        (task, host)
        for run in (first, rest)
        for task, host in re.findall(r"TASK \[(Drain|Return)[^\]]*\].*?\nchanged: \[(h\d)", run.output, re.S)
    ]
    assert events == [(step, h) for h in AGENTS for step in ("Drain", "Return")], events
    hosts = json.loads(deployed.ferryctl("--json", "hosts").stdout)["hosts"]
    assert {h["name"]: (h["state"], h["admin"]) for h in hosts} == dict.fromkeys(AGENTS, ("ready", "active"))

    again = run_playbook(inventory, "upgrade.yml", ferryman_version=new)
    assert again.returncode == 0, again.output[-6000:]
    assert again.changed() == dict.fromkeys(AGENTS, 0), again.output[-6000:]


def trusted_cas(host: SystemdHost) -> list[x509.Certificate]:
    """The CA certificates in the host's /etc/ferryman/pki/ca.pem."""
    return x509.load_pem_x509_certificates(host.sh("cat /etc/ferryman/pki/ca.pem").encode())


def test_ca_rotation_under_load(deployed: Deployed, workloads: list[Workload]) -> None:
    """`pki.yml -e ferryman_pki_ca_rotation=start|reissue|finish` moves the fleet to a new CA while
    every workload serves its client: first every host trusts both CAs, then every certificate is
    issued again from the new one, then the old one is dropped. The services reload each time (the
    same processes), no request fails, and a drain after it migrates over the new CA's certificates."""
    fleet = deployed.fleet
    inventory = deployed.workdir / "hosts.yml"
    # The fleet runs this checkout's code (after test_rolling_upgrade it does; run alone, upgrade it):
    # forgetting the old CA on reload is this checkout's.
    head = _git("rev-parse", "HEAD")
    if {h.sh("cat /opt/ferryman/src/.ferryman-commit").strip() for h in fleet.hosts} != {head}:
        upgraded = run_playbook(inventory, "upgrade.yml", ferryman_version=head)
        assert upgraded.returncode == 0, upgraded.output[-6000:]
    services = fleet_services(fleet)

    def pids() -> dict[tuple[str, str], tuple[str, str]]:
        return service_pids(services)

    def ca_file(name: str) -> x509.Certificate:
        return x509.load_pem_x509_certificate((deployed.pki / name / "ca.pem").read_bytes())

    old_ca = ca_file("ca")
    # The operator's certificate from the old CA, kept to knock on every listener after `finish`.
    old_ops = deployed.workdir / "ops-old-ca"
    old_ops.mkdir(exist_ok=True)
    for name in ("client.pem", "client-key.pem"):
        shutil.copyfile(deployed.pki / "ops" / OPERATOR / name, old_ops / name)
    before_pids = pids()
    old_ops_answers = refusals_of(deployed, old_ops / "client.pem", old_ops / "client-key.pem")
    # The handshake passes everywhere; the peer port then hangs up on an operator (not an agent).
    assert set(old_ops_answers.values()) <= {"accepted", "closed without an alert"}, old_ops_answers
    assert {p for (_, p), a in old_ops_answers.items() if a != "accepted"} == {PEER_PORT}, old_ops_answers
    clients = [Client(fleet, w) for w in workloads]
    runs: dict[str, PlaybookRun] = {}
    try:
        time.sleep(2)  # the clients' steady state first
        t0 = time.time()
        runs["start"] = run_playbook(inventory, "pki.yml", ferryman_pki_ca_rotation="start")
        assert runs["start"].returncode == 0, runs["start"].output[-6000:]
        new_ca = ca_file("ca-next")
        assert new_ca.subject != old_ca.subject
        for host in fleet.hosts:
            assert trusted_cas(host) == [old_ca, new_ca], host.name
        runs["reissue"] = run_playbook(inventory, "pki.yml", ferryman_pki_ca_rotation="reissue")
        assert runs["reissue"].returncode == 0, runs["reissue"].output[-6000:]
        # systemctl reload returns once SIGHUP is sent; the daemons load the files right after.
        deadline = time.monotonic() + 30
        while {c.issuer for c in served_certificates(deployed).values()} != {new_ca.subject}:
            assert time.monotonic() < deadline, {k: c.issuer for k, c in served_certificates(deployed).items()}
            time.sleep(0.2)
        runs["finish"] = run_playbook(inventory, "pki.yml", ferryman_pki_ca_rotation="finish")
        assert runs["finish"].returncode == 0, runs["finish"].output[-6000:]
        t_rotated = time.time()
        assert ca_file("ca") == new_ca and not (deployed.pki / "ca-next").exists()
        assert [ca_file(d.name) for d in deployed.pki.glob("ca-retired-*")] == [old_ca]
        for host in fleet.hosts:
            assert trusted_cas(host) == [new_ca], host.name
        # The old CA is refused by every listener from the reload on: the same processes, no restart.
        deadline = time.monotonic() + 30
        # (asyncio servers hang up on a failed handshake without sending the alert)
        while (
            "accepted"
            in (answers := refusals_of(deployed, old_ops / "client.pem", old_ops / "client-key.pem")).values()
        ):
            assert time.monotonic() < deadline, answers
            time.sleep(0.2)
        assert pids() == before_pids
        again = run_playbook(inventory, "pki.yml")
        assert again.returncode == 0, again.output[-6000:]
        time.sleep(2)
        t_drain = time.time()
        drained, uncordoned = drain_and_return(deployed, "h2")
        t_moved = time.time()
        time.sleep(2)
        seen = {c.workload.name: c.stop() for c in clients}
    finally:
        for client in clients:
            client.kill()
    rotation_gap = max(longest_gap_between(s, t0, t_rotated) for s in seen.values())
    drain_gap = max(longest_gap_between(s, t_drain, t_moved) for s in seen.values())
    print(
        "CA rotation: "
        + ", ".join(f"{step} {run.seconds:.0f} s (changed {run.changed()})" for step, run in runs.items())
        + f"; longest client gap {rotation_gap * 1000:.0f} ms during it; drain of h2 after it "
        f"{t_moved - t_drain:.0f} s, longest client gap {drain_gap * 1000:.0f} ms"
    )
    assert again.changed() == dict.fromkeys(AGENTS, 0), again.output[-6000:]
    # Reloaded, not restarted: the same processes, no restart counted.
    assert pids() == before_pids
    # No client request failed, during the rotation or the drain that followed.
    assert {name: failures(s) for name, s in seen.items()} == {w.name: [] for w in workloads}
    assert drained.returncode == 0, drained.stdout + drained.stderr
    assert uncordoned.returncode == 0, uncordoned.stdout + uncordoned.stderr
    w2 = [w.name for w in workloads if where_runs(fleet, w.name)[0].name == "h2"]
    assert w2 == [], w2
    hosts = json.loads(deployed.ferryctl("--json", "hosts").stdout)["hosts"]
    assert {h["name"]: (h["state"], h["admin"]) for h in hosts} == dict.fromkeys(AGENTS, ("ready", "active"))
