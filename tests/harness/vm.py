"""A Debian VM under QEMU for what this host's kernel cannot run (soft-dirty pre-dumps).

The image comes from scripts/build-test-vm, cached under /var/cache/ferryman/vm-<key>. A boot shares
host directories read-only at the same absolute paths (9p): the project tree, its venv and the
interpreter the venv was made from, so the host's venv runs inside (the image is the host's Debian
release, so glibc and the interpreter's libraries match). A writable io directory carries the job
script in and its log, exit code and results out. The VM's init runs `/ferryman-io/job` and powers
off; the qcow2 overlay of each boot keeps the cached image untouched.

QEMU emulates (TCG): on the development machine KVM opens but `-cpu host` aborts and the other CPU
models hang after the BIOS. Emulation is slow: keep jobs small.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "scripts" / "build-test-vm"
QEMU = "qemu-system-x86_64"
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class VmImage:
    dir: Path

    @property
    def manifest(self) -> dict[str, Any]:
        return dict(json.loads((self.dir / "manifest.json").read_text()))


@dataclass(frozen=True)
class VmRun:
    rc: int | None
    """The job's exit code, or None when the VM never reported one (crash, timeout)."""
    seconds: float
    io: Path
    serial: Path

    def log_tail(self, chars: int = 6000) -> str:
        parts = []
        qemu = self.serial.with_name("qemu.stderr")
        for name, path in (("job log", self.io / "job.log"), ("serial console", self.serial), ("qemu", qemu)):
            with contextlib.suppress(OSError):
                text = path.read_text(errors="replace")
                if len(text) > 2 * chars:  # the start says what failed first, the end how it ended
                    text = f"{text[:chars]}\n[...]\n{text[-chars:]}"
                parts.append(f"--- {name} ({path}) ---\n{text}")
        return "\n".join(parts)


def build_image(within: float = 1800.0) -> VmImage:
    """The cached image (built first if its inputs changed: minutes; else about a second)."""
    proc = subprocess.run([str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=within, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"scripts/build-test-vm failed:\n{proc.stderr[-4000:]}")
    return VmImage(Path(proc.stdout.strip().splitlines()[-1]))


def _die_with_parent() -> None:
    # QEMU must not outlive a killed test run.
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def venv_shares() -> list[Path]:
    """The project tree, the running venv and its interpreter's prefix (each once, outermost only)."""
    wanted = [REPO, Path(sys.prefix), Path(sys.base_prefix)]
    shares: list[Path] = []
    for path in sorted({p.resolve() for p in wanted}, key=lambda p: len(p.parts)):
        if str(path) in ("/", "/usr") or any(path.is_relative_to(s) for s in shares):
            continue  # the image's own /usr is the same Debian release
        shares.append(path)
    return shares


class Vm:
    def __init__(
        self, image: VmImage, workdir: Path, shares: Sequence[Path], *, memory_mib: int = 1536, cpus: int = 2
    ) -> None:
        self.image = image
        self.workdir = workdir
        self.shares = list(shares)
        self.memory_mib = memory_mib
        self.cpus = cpus
        self.io = workdir / "io"
        self.serial = workdir / "serial.log"
        self.overlay = workdir / "rootfs.qcow2"

    def argv(self) -> list[str]:
        mounts = ",".join(f"s{i}={path}" for i, path in enumerate(self.shares))
        boot = "root=/dev/vda rw console=ttyS0,115200 init=/sbin/ferryman-vm-init panic=-1 noresume quiet"
        cmdline = f"{boot} ferryman.shares={mounts}"
        argv = [
            QEMU, "-machine", "q35", "-accel", "tcg", "-cpu", "max", "-smp", str(self.cpus),
            "-m", str(self.memory_mib), "-nodefaults", "-display", "none", "-no-reboot",
            "-serial", f"file:{self.serial}", "-monitor", "none",
            "-kernel", str(self.image.dir / "vmlinuz"), "-initrd", str(self.image.dir / "initrd.img"),
            "-append", cmdline,
            "-drive", f"file={self.overlay},format=qcow2,if=virtio,cache=unsafe",
            "-device", "virtio-rng-pci",
            "-virtfs", f"local,path={self.io},mount_tag=io,security_model=none",
        ]  # fmt: skip
        for i, path in enumerate(self.shares):
            argv += ["-virtfs", f"local,path={path},mount_tag=s{i},security_model=none,readonly=on"]
        return argv

    async def run(self, job: str, within: float) -> VmRun:
        """Boot, run `job` (a sh script) as root inside, wait for the power-off; QEMU is killed on any
        way out (timeout, cancellation, error)."""
        self.io.mkdir(parents=True, exist_ok=True)
        (self.io / "job").write_text(job)
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(self.image.dir / "rootfs.img"),
             str(self.overlay)],
            check=True,
        )  # fmt: skip
        started = time.monotonic()
        with (self.workdir / "qemu.stderr").open("wb") as stderr:
            proc = await asyncio.create_subprocess_exec(
                *self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                preexec_fn=_die_with_parent,
            )
        try:
            async with asyncio.timeout(within):
                await proc.wait()
        except TimeoutError:
            pass  # reported as rc None: the caller shows the logs
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            with contextlib.suppress(OSError):
                self.overlay.unlink()  # up to the VM's disk size: do not keep it
        rc_file = self.io / "rc"
        rc = int(rc_file.read_text()) if rc_file.exists() else None
        return VmRun(rc, time.monotonic() - started, self.io, self.serial)
