"""A private containerd daemon (real /usr/bin/containerd) with its own root, state and sockets, for tests.

Several test sessions may run their own instance on one host at the same time, so everything an instance
creates lives under its workdir, or is named after it (cgroup parent, shim sockets), and `stop()` removes
exactly that and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

CONTAINERD = "/usr/bin/containerd"
CTR = "/usr/bin/ctr"
SHIM_NAME = "containerd-shim"
# containerd 1.6 puts shim sockets here whatever its state dir: fixed in the shim code.
SHIM_SOCKET_DIR = Path("/run/containerd/s")
# sockaddr_un.sun_path is 108 bytes including the NUL; containerd also appends ".ttrpc".
MAX_SOCKET_PATH = 100

_MNT_DETACH = 2
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _umount2(target: str, flags: int) -> int:
    """umount2(2) directly: no dependency on util-linux and a real errno back."""
    if _libc.umount2(os.fsencode(target), flags) == 0:
        return 0
    return ctypes.get_errno()


def _mount(source: str, target: str, fstype: str, options: str) -> int:
    if _libc.mount(os.fsencode(source), os.fsencode(target), os.fsencode(fstype), 0, os.fsencode(options)) == 0:
        return 0
    return ctypes.get_errno()


def _unescape_mountinfo(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out: list[str] = []
    i = 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below `path` in this mount namespace, deepest (and latest) first."""
    base = os.path.realpath(path)
    found: list[str] = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = _unescape_mountinfo(line.split()[4])
            if point == base or point.startswith(base.rstrip("/") + "/"):
                found.append(point)
    # Later lines are mounted on top of earlier ones: reverse first, then a stable sort by depth.
    found.reverse()
    found.sort(key=lambda p: p.count("/"), reverse=True)
    return found


def unmount_under(path: Path) -> list[str]:
    """Unmount everything at or below `path`; lazy-detach only what stays busy. Returns what it unmounted."""
    done: list[str] = []
    for _ in range(10):
        points = mounts_under(path)
        if not points:
            return done
        for point in points:
            err = _umount2(point, 0)
            if err == errno.EBUSY:
                err = _umount2(point, _MNT_DETACH)
            if err in (0, errno.EINVAL, errno.ENOENT):
                done.append(point)
    left = mounts_under(path)
    if left:
        raise RuntimeError(f"could not unmount {left}")
    return done


def overlay_supported(directory: Path) -> bool:
    """True when an overlay mount with its upper dir in `directory` works (not e.g. on overlayfs itself)."""
    probe = Path(tempfile.mkdtemp(prefix=".overlay-probe-", dir=directory))
    try:
        for name in ("lower", "upper", "work", "merged"):
            (probe / name).mkdir()
        opts = f"lowerdir={probe / 'lower'},upperdir={probe / 'upper'},workdir={probe / 'work'}"
        if _mount("overlay", str(probe / "merged"), "overlay", opts) != 0:
            return False
        (probe / "merged" / "x").write_bytes(b"x")
        ok = (probe / "upper" / "x").exists()
        _umount2(str(probe / "merged"), 0)
        return ok
    except OSError:
        return False
    finally:
        unmount_under(probe)
        shutil.rmtree(probe, ignore_errors=True)


def pick_base_dir(candidates: Iterable[str] = ("/var/tmp", "/tmp", "/dev/shm")) -> Path:
    """The first existing candidate where the overlayfs snapshotter can put its upper dirs."""
    tried: list[str] = []
    for candidate in candidates:
        path = Path(candidate)
        if path.is_dir() and overlay_supported(path):
            return path
        tried.append(candidate)
    raise RuntimeError(f"no directory among {tried} supports overlay upper dirs")


@contextlib.asynccontextmanager
async def scratch_dir(prefix: str = "ferryman-bench-") -> AsyncIterator[Path]:
    """A new directory where a mesh can live (pick_base_dir), removed with whatever is mounted in it
    once the block ends: `async with scratch_dir() as base, fleet(base, ...) as mesh:`."""
    base = Path(tempfile.mkdtemp(prefix=prefix, dir=pick_base_dir()))
    try:
        yield base
    finally:
        unmount_under(base)
        shutil.rmtree(base, ignore_errors=True)


def cgroup_controller_dirs(cgroup_path: str) -> list[Path]:
    """Where a cgroupsPath lands: one dir per v1 controller mount, or one under the v2 mount."""
    rel = cgroup_path.strip("/")
    dirs: list[Path] = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fstype = right.split()[0] if right else ""
            if fstype in ("cgroup", "cgroup2"):
                dirs.append(Path(_unescape_mountinfo(left.split()[4])) / rel)
    return dirs


def cgroup_pids(cgroup_path: str) -> set[int]:
    """Every pid in the cgroup tree `cgroup_path`, across all hierarchies."""
    pids: set[int] = set()
    for top in cgroup_controller_dirs(cgroup_path):
        if not top.is_dir():
            continue
        for procs in top.rglob("cgroup.procs"):
            with contextlib.suppress(OSError):
                pids.update(int(x) for x in procs.read_text().split())
    return pids


def remove_cgroup(cgroup_path: str) -> None:
    """rmdir the cgroup tree `cgroup_path` in every hierarchy, leaves first (cgroupfs needs rmdir, not rm)."""
    for top in cgroup_controller_dirs(cgroup_path):
        if not top.is_dir():
            continue
        subdirs = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
        for d in [*subdirs, top]:
            with contextlib.suppress(OSError):
                d.rmdir()


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [os.fsdecode(a) for a in raw.split(b"\0") if a]


def _all_pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def _descendants(roots: Iterable[int]) -> set[int]:
    """All processes below `roots` in the process tree (from /proc/<pid>/stat ppids)."""
    children: dict[int, list[int]] = {}
    for pid in _all_pids():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        # The comm field may hold spaces and parens: the ppid is the 2nd field after the last ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    todo = list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _flag(args: list[str], name: str) -> str | None:
    for i, arg in enumerate(args[:-1]):
        if arg in (f"-{name}", f"--{name}"):
            return args[i + 1]
    return None


class PrivateContainerd:
    """One containerd daemon whose root, state, sockets and temp files all live in `workdir`."""

    def __init__(self, workdir: Path, namespace: str = "ferryman", *, netns: str | None = None) -> None:
        self.workdir = Path(os.path.realpath(workdir))
        self.namespace = namespace
        self.netns = netns
        """A named network namespace (/run/netns/<name>) for the daemon, its shims and `ctr`; None: ours."""
        self.root = self.workdir / "root"
        self.state = self.workdir / "state"
        self.tmpdir = self.workdir / "tmp"
        self.runc_root = self.state / "runc"
        """Pass as runc Options.Root: the shim default (/run/containerd/runc) is shared by every instance."""
        self.fifo_dir = self.state / "fifo"
        self.socket = str(self.workdir / "containerd.sock")
        self.ttrpc_socket = self.socket + ".ttrpc"
        self.config_path = self.workdir / "config.toml"
        self.log_path = self.workdir / "containerd.log"
        # A cgroup parent unique to this instance, so stop() can find and remove what its tasks left.
        self.cgroup_parent = f"/ferryman-test-{secrets.token_hex(4)}"
        self.proc: subprocess.Popen[bytes] | None = None
        if len(self.ttrpc_socket) > MAX_SOCKET_PATH:
            raise ValueError(f"workdir path too long for a unix socket: {self.ttrpc_socket}")

    # ----- configuration -------------------------------------------------------------------------

    def config_text(self) -> str:
        return (
            "version = 2\n"
            f'root = "{self.root}"\n'
            f'state = "{self.state}"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            "\n[grpc]\n"
            f'  address = "{self.socket}"\n'
            "  uid = 0\n  gid = 0\n"
            "\n[ttrpc]\n"
            f'  address = "{self.ttrpc_socket}"\n'
            # Empty addresses: no debug or metrics listener at all (metrics would be TCP).
            "\n[debug]\n"
            '  address = ""\n'
            '  level = "info"\n'
            "\n[metrics]\n"
            '  address = ""\n'
            # The opt plugin would otherwise create /opt/containerd, shared with every other instance.
            '\n[plugins."io.containerd.internal.v1.opt"]\n'
            f'  path = "{self.root / "opt"}"\n'
        )

    def run_flags(self, container_id: str) -> list[str]:
        """`ctr run` flags that keep a task's runc state, fifos and cgroup inside this instance."""
        return [
            "--runc-root",
            str(self.runc_root),
            "--fifo-dir",
            str(self.fifo_dir),
            "--cgroup",
            f"{self.cgroup_parent}/{container_id}",
        ]

    # ----- lifecycle -----------------------------------------------------------------------------

    async def start(self, within: float = 30.0) -> None:
        if self.proc is not None:
            raise RuntimeError("containerd already started")
        for binary in (CONTAINERD, CTR):
            if not os.access(binary, os.X_OK):
                raise RuntimeError(f"{binary} not found: run scripts/setup-host")
        self.proc = self._spawn()
        try:
            await self._wait_ready(within)
            await self._check_overlay()
        except BaseException:
            await self.stop()
            raise

    def _spawn(self) -> subprocess.Popen[bytes]:
        for d in (self.root, self.state, self.tmpdir, self.fifo_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config_text())
        # containerd 1.6 makes containerd-mount* dirs in $TMPDIR and ctrd-checkpoint* ones in
        # $XDG_RUNTIME_DIR (falling back to $TMPDIR); a daemon killed mid-operation leaves them there.
        env = {**os.environ, "TMPDIR": str(self.tmpdir), "XDG_RUNTIME_DIR": str(self.tmpdir)}
        with self.log_path.open("ab") as log:
            return subprocess.Popen(
                [*self._nsenter(), CONTAINERD, "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # a Ctrl-C in the test terminal must not kill it before stop()
            )

    async def _wait_ready(self, within: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while loop.time() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"containerd exited early: see {self.log_path}\n{self.log_tail()}")
            if self._socket_exists():
                res = await self.actr("version", check=False, within=5)
                if res.returncode == 0:
                    return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"containerd did not answer on {self.socket} within {within}s\n{self.log_tail()}")

    def _socket_exists(self) -> bool:
        return Path(self.socket).exists()

    async def _check_overlay(self) -> None:
        res = await self.actr("plugins", "ls")
        for line in res.stdout.splitlines():
            cols = line.split()
            if len(cols) >= 4 and cols[0] == "io.containerd.snapshotter.v1" and cols[1] == "overlayfs":
                if cols[-1] == "ok":
                    return
                raise RuntimeError(
                    f"overlayfs snapshotter not usable under {self.root} ({cols[-1]}): pick a workdir on "
                    f"ext4/xfs/tmpfs, not on overlayfs; see {self.log_path}"
                )
        raise RuntimeError("containerd has no overlayfs snapshotter plugin")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def shim_pids(self) -> list[int]:
        """Shims started by this daemon: their command line carries `-address <our socket>`."""
        pids: list[int] = []
        for pid in _all_pids():
            args = _cmdline(pid)
            if args and SHIM_NAME in Path(args[0]).name and _flag(args, "address") == self.socket:
                pids.append(pid)
        return pids

    def _shim_socket(self, namespace: str, container_id: str) -> Path:
        # Mirrors containerd 1.6 shim.SocketAddress: sha256 of "<containerd address>/<ns>/<id>".
        digest = hashlib.sha256(f"{self.socket}/{namespace}/{container_id}".encode()).hexdigest()
        return SHIM_SOCKET_DIR / digest

    async def stop(self) -> None:
        """Tear everything down; safe to call twice, after a failed start, or after a failed test."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                await self._kill_tasks()
        await self._stop_daemon()
        shims = [(pid, _cmdline(pid)) for pid in self.shim_pids()]
        # Container processes first (they are the shims' children), while the shims still hold them:
        # once a shim dies they are reparented to init and only their cgroup identifies them.
        cgroups = [self.cgroup_parent, *self._task_cgroups()]
        doomed = _descendants([pid for pid, _ in shims]).union(*(cgroup_pids(cg) for cg in cgroups))
        for pid in [*doomed, *(pid for pid, _ in shims)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for _ in range(50):
            pids = set[int]().union(*(cgroup_pids(cg) for cg in cgroups))
            if not pids and not self.shim_pids():
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            await asyncio.sleep(0.1)
        await asyncio.to_thread(self._remove_files, [args for _, args in shims], cgroups)

    def _task_cgroups(self) -> list[str]:
        """cgroupsPath of every task bundle still on disk (tasks whose shim did not clean up)."""
        paths: list[str] = []
        for config in self.state.glob("io.containerd.runtime.v2.task/*/*/config.json"):
            with contextlib.suppress(OSError, ValueError, AttributeError):
                path = json.loads(config.read_text()).get("linux", {}).get("cgroupsPath", "")
                if isinstance(path, str) and path.startswith("/"):
                    paths.append(path)
        return paths

    def _remove_files(self, shim_args: list[list[str]], cgroups: list[str]) -> None:
        for args in shim_args:
            ns, cid = _flag(args, "namespace"), _flag(args, "id")
            if ns and cid:
                self._shim_socket(ns, cid).unlink(missing_ok=True)
        unmount_under(self.workdir)
        # Only the tasks' own (leaf) cgroups: a parent such as /ferryman may be shared with others.
        for cgroup in cgroups:
            remove_cgroup(cgroup)
        for d in (self.root, self.state, self.tmpdir):
            shutil.rmtree(d, ignore_errors=True)
        for sock in (self.socket, self.ttrpc_socket):
            Path(sock).unlink(missing_ok=True)

    async def _kill_tasks(self) -> None:
        namespaces = (await self.actr("namespaces", "ls", "-q", within=10)).stdout.split()
        for ns in namespaces:
            tasks = (await self.actr("tasks", "ls", "-q", namespace=ns, within=10)).stdout.split()
            for task in tasks:
                await self.actr("tasks", "kill", "-a", "-s", "SIGKILL", task, namespace=ns, check=False)
            for task in tasks:
                await self.actr("tasks", "delete", "-f", task, namespace=ns, check=False, within=20)

    async def _stop_daemon(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                await asyncio.to_thread(proc.wait, 10)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)

    async def __aenter__(self) -> PrivateContainerd:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ----- ctr -----------------------------------------------------------------------------------

    def _ctr_env(self) -> dict[str, str]:
        # Client-side temp files (e.g. of `ctr tasks checkpoint`) also stay in this instance.
        return {**os.environ, "TMPDIR": str(self.tmpdir)} if self.tmpdir.is_dir() else dict(os.environ)

    def _nsenter(self) -> list[str]:
        # Network namespace only (not `ip netns exec`): the mount namespace must stay shared so the
        # snapshot mounts stay visible to us and to stop().
        if self.netns is None:
            return []
        return ["nsenter", f"--net=/run/netns/{self.netns}", "--"]

    def _ctr_argv(self, args: tuple[str, ...], namespace: str | None) -> list[str]:
        # ctr in the daemon's namespace too: `ctr images pull` fetches client-side.
        return [*self._nsenter(), CTR, "--address", self.socket, "-n", namespace or self.namespace, *args]

    def ctr(
        self,
        *args: str,
        namespace: str | None = None,
        check: bool = True,
        timeout: float = 120,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ctr against this daemon (blocking). Raises CalledProcessError with stderr when `check`."""
        res = subprocess.run(
            self._ctr_argv(args, namespace),
            input=input,
            env=self._ctr_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and res.returncode != 0:
            raise subprocess.CalledProcessError(res.returncode, res.args, res.stdout, res.stderr)
        return res

    async def actr(
        self, *args: str, namespace: str | None = None, check: bool = True, within: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Like `ctr` but without blocking the event loop (an in-process server may be on it)."""
        argv = self._ctr_argv(args, namespace)
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self._ctr_env()
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), within)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        res = subprocess.CompletedProcess(argv, proc.returncode or 0, out.decode(), err.decode())
        if check and res.returncode != 0:
            raise subprocess.CalledProcessError(res.returncode, argv, res.stdout, res.stderr)
        return res
