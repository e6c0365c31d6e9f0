"""Test hosts that run systemd as PID 1: what the Ansible roles and the units are checked against.

systemd is not PID 1 on this machine and `systemd-nspawn --boot` does not work here, but systemd
boots in its own PID, mount, UTS and IPC namespaces rooted in a Debian root (pivot_root), with a network
namespace for its address (/work/shared/RECIPES.md). Each `SystemdHost` is one such boot:

    root      scripts/build-fleet-root: a debootstrap root cached under /var/cache/ferryman, keyed by
              its inputs, never written: each host mounts an overlay over it (upper dir in its dir)
              and pivots into it; /var/lib/containerd is a bind of its dir's disk/ (overlayfs
              snapshots cannot nest in an overlay)
    network   netns <prefix>-hN with eth0 = 10.A.B.(10+N) on the bridge <prefix>-br in <prefix>-fab
              (10.A.B.1), the layout of tests/harness/mesh.py; nothing is added to the root netns
    cgroups   a child cgroup of this process's own in every hierarchy, so each host's systemd has a
              tree of its own (systemd takes the cgroup it starts in as its root)
    PID 1     `unshare --fork --pid --mount --uts --ipc` -> mounts -> pivot_root ROOT -> `systemd --system`

Everything but the overlay's upper dir lives in the host's private mount namespace and dies with it.
`stop()` SIGKILLs the host's systemd (as PID 1 it ignores SIGTERM); the kernel then kills every
process in its PID namespace (containerd, the agent, shims, containers), and `stop()` removes the
cgroups, the namespaces and the dirs.

`exec()` runs a command inside a host (all of its namespaces, its root), the way Ansible's
`nsenter` connection plugin (ansible/connection_plugins/nsenter.py) does.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.harness import netns as nsh

REPO = Path(__file__).resolve().parents[2]
BUILD_ROOT = REPO / "scripts" / "build-fleet-root"
CGROUP_MOUNT = Path("/sys/fs/cgroup")
# Device nodes bound from the machine into each host's private /dev (a tmpfs).
DEVICES = ("null", "zero", "full", "random", "urandom", "tty", "net/tun", "fuse")

# The boot script, run as the new PID namespace's first process (it becomes systemd by exec).
BOOT_SCRIPT = r"""
set -eu
lower=$1 upper=$2 work=$3 root=$4 hostname=$5 cgroups=$6 disk=$7
for cg in $cgroups; do echo $$ >"$cg/cgroup.procs"; done
mount -t overlay overlay -o "lowerdir=$lower,upperdir=$upper,workdir=$work" "$root"
# containerd's overlayfs snapshots cannot have an upper dir on an overlay: its data goes on the disk.
mkdir -p "$root/var/lib/containerd"
mount --bind "$disk" "$root/var/lib/containerd"
mount -t proc proc "$root/proc"
mount -t sysfs sysfs "$root/sys"
mount --rbind /sys/fs/cgroup "$root/sys/fs/cgroup"
mount -t tmpfs -o mode=0755,nosuid tmpfs "$root/run"
mount -t tmpfs -o mode=1777,nosuid tmpfs "$root/tmp"
mount -t tmpfs -o mode=0755,nosuid tmpfs "$root/dev"
mkdir -p "$root/dev/pts" "$root/dev/shm" "$root/dev/net"
for dev in DEVICES; do
    [ -e "/dev/$dev" ] || continue
    touch "$root/dev/$dev"; mount --bind "/dev/$dev" "$root/dev/$dev"
done
ln -s /proc/self/fd "$root/dev/fd"; ln -s /proc/self/fd/0 "$root/dev/stdin"
ln -s /proc/self/fd/1 "$root/dev/stdout"; ln -s /proc/self/fd/2 "$root/dev/stderr"
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts "$root/dev/pts"
ln -s pts/ptmx "$root/dev/ptmx"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$root/dev/shm"
mkdir -p "$root/dev/mqueue"; mount -t mqueue mqueue "$root/dev/mqueue"
hostname "$hostname"
echo "$hostname" >"$root/etc/hostname"
# pivot_root, not chroot: the overlay becomes the root of the host's mount namespace, as on a real
# host (CRIU refuses to dump from a namespace whose root is not its tasks' root).
cd "$root"
pivot_root . .
umount -l .
cd /
exec /lib/systemd/systemd --system --log-target=console --show-status=false
""".replace("DEVICES", " ".join(DEVICES))


def fleet_root(*, timeout: float = 1800) -> Path:
    """The cached Debian root (built on first use: debootstrap needs the Debian mirror once)."""
    res = subprocess.run([str(BUILD_ROOT)], capture_output=True, text=True, timeout=timeout, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"scripts/build-fleet-root failed:\n{res.stderr[-3000:]}")
    return Path(res.stdout.strip().splitlines()[-1])


def _own_cgroups() -> list[Path]:
    """This process's cgroup in every mounted hierarchy (v1 controllers, name=systemd, unified)."""
    dirs: list[Path] = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        hier, controllers, path = line.split(":", 2)
        if hier == "0":
            mount = CGROUP_MOUNT / "unified" if (CGROUP_MOUNT / "unified").is_dir() else CGROUP_MOUNT
        else:
            name = controllers.removeprefix("name=")
            mount = CGROUP_MOUNT / name
            if not mount.is_dir():
                mount = CGROUP_MOUNT / controllers  # e.g. "cpu,cpuacct" mounted under its full name
        if (mount / "cgroup.procs").exists():
            dirs.append(mount / path.lstrip("/"))
    return dirs


def _remove_cgroup_tree(top: Path) -> None:
    """rmdir a cgroup and its children, deepest first (cgroups are removed with rmdir, not rm)."""
    if not top.is_dir():
        return
    for sub in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            sub.rmdir()
    with contextlib.suppress(OSError):
        top.rmdir()


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


class SystemdHost:
    """One Debian host with systemd as PID 1 (see the module docstring)."""

    def __init__(self, fleet: SystemdFleet, index: int) -> None:
        self.fleet = fleet
        self.index = index
        self.name = f"h{index}"
        self.hostname = f"{fleet.prefix}-{self.name}"
        self.netns = f"{fleet.prefix}-{self.name}"
        self.address = str(fleet.subnet.network_address + 10 + index)
        self.fabric_link = f"{fleet.prefix}-{self.name}"
        self.dir = fleet.dir / self.name
        self.root = self.dir / "root"
        """The overlay's mount point: the host's / (seen only inside its mount namespace)."""
        self.cgroups = [cg / f"ferryman-{self.hostname}" for cg in _own_cgroups()]
        self.pid: int | None = None
        """systemd's PID in this machine's PID namespace, once booted."""
        self._launcher: subprocess.Popen[bytes] | None = None
        self._console: Path = self.dir / "console.log"
        self.container_cgroup_parent = f"/ferryman-{self.hostname}"
        """The agent's [runtime] cgroup_parent here. The hosts share this machine's cgroup
        hierarchies (no cgroup namespace): with the default (/ferryman) the same container on two
        hosts, a migration's source and target, would share one cgroup, and a pre-copy restore
        found the source's frozen freezer cgroup. This name is the host's own cgroup where this
        process sits at a hierarchy's root; elsewhere `kill` removes it."""

    def __repr__(self) -> str:
        return f"<SystemdHost {self.name} {self.address} pid={self.pid}>"

    # ----- running things inside -------------------------------------------------------------------

    def nsenter_argv(self) -> list[str]:
        if self.pid is None:
            raise RuntimeError(f"{self.name} is not running")
        return ["nsenter", "-t", str(self.pid), "-m", "-u", "-i", "-n", "-p", "-r", "-w", "--"]

    def exec(
        self, argv: Sequence[str], *, check: bool = False, timeout: float = 60, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside the host (blocking)."""
        full = [*self.nsenter_argv(), *argv]
        res = subprocess.run(full, input=input, capture_output=True, text=True, timeout=timeout, check=False)
        if check and res.returncode != 0:
            raise subprocess.CalledProcessError(res.returncode, full, res.stdout, res.stderr)
        return res

    async def aexec(
        self, argv: Sequence[str], *, check: bool = False, within: float = 60, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(self.exec, argv, check=check, timeout=within, input=input)

    def sh(self, script: str, *, check: bool = True, timeout: float = 60) -> str:
        return self.exec(["/bin/sh", "-c", script], check=check, timeout=timeout).stdout

    def unit_property(self, unit: str, prop: str) -> str:
        """`systemctl show -p PROP --value UNIT` inside the host."""
        return self.exec(["systemctl", "show", "-p", prop, "--value", unit], check=True).stdout.strip()

    def journal(self, unit: str, *, since_boot: bool = True) -> str:
        argv = ["journalctl", "--no-pager", "-o", "cat", "-u", unit]
        return self.exec([*argv, "-b"] if since_boot else argv, check=False).stdout

    # ----- lifecycle -------------------------------------------------------------------------------

    def boot(self) -> None:
        """Start systemd; `wait_booted` waits until it has finished starting its units."""
        for sub in ("root", "upper", "work", "disk"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        for cg in self.cgroups:
            cg.mkdir(exist_ok=True)
            for knob in ("cpuset.cpus", "cpuset.mems"):  # a v1 cpuset takes no task until both are set
                if (cg / knob).exists() and not (cg / knob).read_text().strip():
                    (cg / knob).write_text((cg.parent / knob).read_text())
        argv = [
            "nsenter", f"--net={nsh.netns_path(self.netns)}", "--",
            "unshare", "--fork", "--pid", "--mount", "--uts", "--ipc", "--propagation", "private",
            "/bin/sh", "-c", BOOT_SCRIPT, "boot",
            str(self.fleet.lower), str(self.dir / "upper"), str(self.dir / "work"), str(self.root),
            self.hostname, " ".join(str(cg) for cg in self.cgroups), str(self.dir / "disk"),
        ]  # fmt: skip
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "container": "ferryman", "LANG": "C.UTF-8"}
        with self._console.open("ab") as console:
            self._launcher = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            for child in _children(self._launcher.pid):
                with contextlib.suppress(OSError):
                    if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                        self.pid = child
                        return
            if self._launcher.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"{self.name}: systemd did not start; console:\n{self.console_tail()}")

    def wait_booted(self, within: float = 120) -> str:
        """Wait for `systemctl is-system-running` to say running (or degraded, with the failed units
        named in the error); returns the state."""
        deadline = time.monotonic() + within
        state = ""
        while time.monotonic() < deadline:
            res = self.exec(["systemctl", "is-system-running"], timeout=10)
            state = res.stdout.strip()
            if state == "running":
                return state
            if state == "degraded":
                failed = self.sh("systemctl --failed --no-legend --plain", check=False)
                raise RuntimeError(f"{self.name} booted degraded; failed units:\n{failed}")
            time.sleep(0.2)
        raise RuntimeError(f"{self.name}: not booted within {within} s (state {state!r})\n{self.console_tail()}")

    def console_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self._console.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL PID 1: the kernel then kills every process of the host."""
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        if self._launcher is not None:
            try:
                self._launcher.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._launcher.kill()
                self._launcher.wait(timeout=10)
        self.pid = None
        self._launcher = None
        deadline = time.monotonic() + 30
        for cg in self.cgroups:  # the PID namespace's processes die asynchronously
            while cg.is_dir() and any(p.read_text().strip() for p in cg.rglob("cgroup.procs")):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name}: processes left in {cg}")
                time.sleep(0.05)
            _remove_cgroup_tree(cg)
        for hierarchy in CGROUP_MOUNT.iterdir():  # the containers' cgroups (container_cgroup_parent)
            _remove_cgroup_tree(hierarchy / self.container_cgroup_parent.lstrip("/"))

    def leftover_cgroups(self) -> list[Path]:
        parents = [h / self.container_cgroup_parent.lstrip("/") for h in CGROUP_MOUNT.iterdir()]
        return [cg for cg in [*self.cgroups, *parents] if cg.exists()]


def _pick_prefix() -> str:
    taken = {name[:6] for name in nsh.list_netns()}
    for _ in range(100):
        prefix = f"fs{secrets.token_hex(2)}"
        if prefix not in taken:
            return prefix
    raise RuntimeError("no free fleet prefix")


class SystemdFleet:
    """N `SystemdHost`s on one bridge (the layout of tests/harness/mesh.py, prefix `fs<4 hex>`)."""

    def __init__(self, base_dir: Path, hosts: int, *, lower: Path | None = None) -> None:
        self.prefix = _pick_prefix()
        self.dir = Path(os.path.realpath(base_dir)) / self.prefix
        self.subnet = ipaddress.IPv4Network(f"10.{200 + secrets.randbelow(10)}.{secrets.randbelow(256)}.0/24")
        self.gateway = str(self.subnet.network_address + 1)
        self.fabric_netns = f"{self.prefix}-fab"
        self.bridge = f"{self.prefix}-br"
        self._lower = lower
        self.hosts = [SystemdHost(self, i) for i in range(1, hosts + 1)]
        self._created: list[str] = []

    @property
    def lower(self) -> Path:
        if self._lower is None:
            self._lower = fleet_root()
        return self._lower

    def __getitem__(self, name: str) -> SystemdHost:
        for host in self.hosts:
            if host.name == name:
                return host
        raise KeyError(name)

    def start(self) -> None:
        try:
            _ = self.lower
            self.dir.mkdir(parents=True)
            self._create_network()
            for host in self.hosts:
                host.boot()
            for host in self.hosts:
                host.wait_booted()
        except BaseException:
            self.stop()
            raise

    def _create_network(self) -> None:
        for name in [self.fabric_netns, *(h.netns for h in self.hosts)]:
            nsh.add_netns(name)
            self._created.append(name)
        prefixlen = self.subnet.prefixlen
        fabric = [
            "link set lo up",
            f"link add {self.bridge} type bridge forward_delay 0",
            f"addr add {self.gateway}/{prefixlen} dev {self.bridge}",
            f"link set {self.bridge} up",
        ]
        for h in self.hosts:
            fabric += [
                f"link add {h.fabric_link} type veth peer name eth0 netns {h.netns}",
                f"link set {h.fabric_link} master {self.bridge} up",
            ]
        _ip_batch(fabric, self.fabric_netns)
        for h in self.hosts:
            _ip_batch(
                [
                    "link set lo up",
                    f"addr add {h.address}/{prefixlen} dev eth0",
                    "link set eth0 up",
                    f"route add default via {self.gateway}",
                ],
                h.netns,
            )

    def stop(self) -> None:
        """Kill every host, remove the namespaces and the dirs; safe to call again."""
        errors: list[BaseException] = []
        for host in self.hosts:  # every PID 1 first: the hosts then die in parallel
            if host.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(host.pid, signal.SIGKILL)
        for host in self.hosts:
            try:
                host.kill()
            except Exception as exc:
                errors.append(exc)
        for name in reversed(self._created):
            nsh.del_netns(name)
        self._created.clear()
        if self.dir.exists():
            # The overlays were mounted in the hosts' own mount namespaces, gone with them: nothing
            # is mounted under the dir, which is what makes this rmtree safe.
            if any(str(self.dir) in line for line in Path("/proc/self/mountinfo").read_text().splitlines()):
                errors.append(RuntimeError(f"mounts left under {self.dir}"))
            else:
                shutil.rmtree(self.dir, ignore_errors=True)
        if errors:
            raise errors[0]

    def inventory_vars(self) -> dict[str, dict[str, object]]:
        """Per-host connection variables for Ansible's nsenter connection plugin."""
        return {
            h.name: {"ansible_connection": "nsenter", "ansible_nsenter_pid": h.pid, "ferryman_address": h.address}
            for h in self.hosts
        }

    def __enter__(self) -> SystemdFleet:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _ip_batch(lines: Sequence[str], netns: str) -> None:
    nsh.run(nsh.ip_argv((), netns, batch=True), input="".join(f"{line}\n" for line in lines))


def describe(fleet: SystemdFleet) -> str:
    return "\n".join(f"{h.name} {h.address} pid={h.pid} enter: {shlex.join(h.nsenter_argv())} sh" for h in fleet.hosts)


# ----- Ansible against the fleet ---------------------------------------------------------------------

ANSIBLE_DIR = REPO / "ansible"
RECAP_RE = re.compile(r"^(\S+)\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


def write_inventory(
    fleet: SystemdFleet,
    path: Path,
    *,
    coordinators: Sequence[str],
    agents: Sequence[str],
    variables: dict[str, object] | None = None,
) -> Path:
    """An inventory (JSON is YAML) naming the groups the roles read, every host reached with the
    nsenter connection plugin at its PID 1 and addressed by its bridge address."""
    hostvars = {
        h.name: {
            "ansible_nsenter_pid": h.pid,
            "ferryman_address": h.address,
            "ferryman_host_name": h.name,
            "ferryman_agent_config_host": {"runtime": {"cgroup_parent": h.container_cgroup_parent}},
        }
        for h in fleet.hosts
    }
    inventory = {
        "all": {
            "vars": {
                "ansible_connection": "nsenter",
                "ansible_python_interpreter": "/usr/bin/python3",
                **(variables or {}),
            },
            "children": {
                "ferryman_coordinators": {"hosts": {n: hostvars[n] for n in coordinators}},
                "ferryman_agents": {"hosts": {n: hostvars[n] for n in agents}},
            },
        }
    }
    path.write_text(json.dumps(inventory, indent=2))
    return path


@dataclass
class PlaybookRun:
    returncode: int
    output: str
    seconds: float
    recap: dict[str, dict[str, int]]

    def changed(self) -> dict[str, int]:
        return {host: r["changed"] for host, r in self.recap.items()}


def run_playbook(
    inventory: Path, playbook: str = "site.yml", *, timeout: float = 900, limit: str = "", **extra: str
) -> PlaybookRun:
    """`ansible-playbook` from the venv, in ansible/ (its ansible.cfg), against `inventory` (its hosts
    matching `limit`, if given)."""
    argv = [str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(inventory), playbook]
    if limit:
        argv += ["--limit", limit]
    for key, value in extra.items():
        argv += ["-e", f"{key}={value}"]
    env = {**os.environ, "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_LOCAL_TEMP": str(inventory.parent / "ansible-tmp")}  # fmt: skip
    t0 = time.monotonic()
    res = subprocess.run(argv, cwd=ANSIBLE_DIR, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    recap = {
        m[1]: {"ok": int(m[2]), "changed": int(m[3]), "unreachable": int(m[4]), "failed": int(m[5])}
        for m in RECAP_RE.finditer(res.stdout)
    }
    return PlaybookRun(res.returncode, res.stdout + res.stderr, time.monotonic() - t0, recap)
