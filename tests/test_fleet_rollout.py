"""The Ansible roles against hosts that run systemd as PID 1 (tests/harness/systemd_host.py).

Three fresh Debian roots boot with systemd; `ansible/site.yml` reaches them with the nsenter
connection plugin and installs the fleet PKI, the coordinator (on h1) and the agents (on all three)
from the controller's checkout, the ferryman-criu package and a wheelhouse. The tests then check
what a user would: the services run under systemd with the units' readiness, restart and logging
behaviour, the agents registered with the coordinator over mutual TLS, and a second run of the
playbook changes nothing. Last, `ansible/upgrade.yml` moves every agent to a new commit, one host
at a time, each drained through the coordinator and returned to service.

The first run takes most of the module's time (three venvs installed on a 2-core machine); the
module is marked `fleet` (and `slow`): `pytest -m fleet` runs it alone.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.systemd_host import REPO, PlaybookRun, SystemdFleet, run_playbook, write_inventory

pytestmark = [pytest.mark.fleet, pytest.mark.slow, pytest.mark.timeout(1500)]

AGENTS = ("h1", "h2", "h3")
COORDINATOR = "h1"
OPERATOR = "alice"


def _script(name: str) -> Path:
    res = subprocess.run([str(REPO / "scripts" / name)], capture_output=True, text=True, timeout=900, check=False)
    assert res.returncode == 0, f"scripts/{name} failed:\n{res.stderr[-3000:]}"
    return Path(res.stdout.strip().splitlines()[-1])


class Deployed:
    def __init__(self, fleet: SystemdFleet, workdir: Path, first: PlaybookRun) -> None:
        self.fleet = fleet
        self.workdir = workdir
        self.first = first
        self.pki = workdir / "pki"

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
                # Fast registration and telemetry: the test waits for them.
                "ferryman_agent_config": {"version": 1, "telemetry": {"period": 1.0}},
            },
        )
        first = run_playbook(inventory)
        print(f"first run: {first.seconds:.0f} s, changed {first.changed()}")
        assert first.returncode == 0, first.output[-6000:]
        yield Deployed(fleet, workdir, first)
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


def test_rolling_upgrade_to_a_new_commit(deployed: Deployed, tmp_path: Path) -> None:
    """upgrade.yml moves every agent to a new commit, one host at a time, each drained through the
    coordinator first and returned to service after; a second run changes nothing.

    Runs last: it leaves the fleet at a commit that is not the checkout's HEAD."""
    repo = tmp_path / "repo"
    subprocess.run(["git", "clone", "-q", str(REPO), str(repo)], check=True, timeout=120)
    git = ["git", "-C", str(repo), "-c", "user.name=rollout", "-c", "user.email=rollout@localhost"]
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "the next release"], check=True, timeout=30)
    new = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()

    inventory = deployed.workdir / "hosts.yml"
    run = run_playbook(inventory, "upgrade.yml", ferryman_local_repo=str(repo), ferryman_version="HEAD")
    print(f"rolling upgrade: {run.seconds:.0f} s, changed {run.changed()}")
    assert run.returncode == 0, run.output[-6000:]
    for host in deployed.fleet.hosts:
        assert host.sh("cat /opt/ferryman/src/.ferryman-commit").strip() == new
        assert host.sh("systemctl is-active ferryman-agent").strip() == "active"
    # serial: 1 — each host is drained and returned to service before the next one is drained.
    events = [
        (task, host)
        for task, host in re.findall(r"TASK \[(Drain|Return)[^\]]*\].*?\nchanged: \[(h\d)", run.output, re.S)
    ]
    assert events == [(step, h) for h in AGENTS for step in ("Drain", "Return")], events
    hosts = json.loads(deployed.ferryctl("--json", "hosts").stdout)["hosts"]
    assert {h["name"]: (h["state"], h["admin"]) for h in hosts} == dict.fromkeys(AGENTS, ("ready", "active"))

    again = run_playbook(inventory, "upgrade.yml", ferryman_local_repo=str(repo), ferryman_version="HEAD")
    assert again.returncode == 0, again.output[-6000:]
    assert again.changed() == dict.fromkeys(AGENTS, 0), again.output[-6000:]
