"""Test workloads built from source at test time (static binaries in their own image layer)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.harness.images import Dir, File, ImageBuilder, Layer, busybox_layer

SOURCES = Path(__file__).resolve().parent.parent / "workloads"
BUILD_DIR = Path("/var/tmp/ferryman-build")


def static_binary(name: str) -> bytes:
    """Compile tests/workloads/<name>.c statically (cached by source hash)."""
    source = SOURCES / f"{name}.c"
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    out = BUILD_DIR / f"{name}-{digest}"
    if not out.exists():
        gcc = shutil.which("gcc")
        if gcc is None:
            raise RuntimeError("gcc is needed to build test workloads: run scripts/setup-host")
        BUILD_DIR.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        subprocess.run([gcc, "-static", "-O2", "-o", str(tmp), str(source)], check=True)
        tmp.replace(out)
    return out.read_bytes()


def memhog_image(
    resident_mib: int = 16,
    rewrite_mbps: float = 0,
    status: str = "/tmp/status",
    http_port: int | None = None,
    processes: int = 1,
    fork_every_ms: int = 0,
    port: int | None = None,
) -> ImageBuilder:
    """busybox + /bin/memhog, running `memhog RESIDENT REWRITE STATUS` by default.

    With `http_port`, busybox httpd also serves "served" there, for clients that watch the service.
    With `processes` > 1, more memhogs run beside it, each with its own memory and STATUS-<n> file.
    With `fork_every_ms`, memhog forks that often a child that checks a few of its pages.
    With `port`, memhog itself serves TCP requests there, each answered after reading a page of its
    memory (see tests/workloads/memhog.c for the protocol).
    """
    layer = Layer([Dir("bin"), File("bin/memhog", static_binary("memhog"), 0o755)], comment="memhog")
    memhog: tuple[str, ...] = ("/bin/memhog", str(resident_mib), str(rewrite_mbps), status)
    if fork_every_ms or port is not None:
        memhog = (*memhog, str(fork_every_ms))
    if port is not None:
        memhog = (*memhog, str(port))
    if http_port is None and processes == 1:
        return ImageBuilder([busybox_layer(), layer], cmd=memhog)
    steps = [f"{' '.join(memhog[:3])} {status}-{n} &" for n in range(2, processes + 1)]
    if http_port is not None:
        steps.append(f"mkdir -p /www && echo served > /www/index.html && httpd -p {http_port} -h /www &&")
    script = " ".join([*steps, f"exec {' '.join(memhog)}"])
    return ImageBuilder([busybox_layer(), layer], cmd=("/bin/sh", "-c", script))


@dataclass(frozen=True)
class MemhogStatus:
    beats: int
    max_gap_us: int
    last_us: int
    verified: str
    pages: int
    forks: int = 0
    fork_errors: int = 0
    children: int = 0
    """Forked children not reaped yet."""
    max_gap_end_us: int = 0
    """When the longest gap ended (realtime, µs): where it lies on a migration's timeline."""
    served: int = 0
    """TCP requests answered (memhog with a port)."""
    bad_pages: int = 0
    """Of those, the ones whose page did not hold its generation's content."""
    conns: int = 0
    """TCP connections accepted."""

    @classmethod
    def parse(cls, text: str) -> MemhogStatus:
        fields = dict(part.split("=", 1) for part in text.split())
        return cls(
            beats=int(fields["beats"]),
            max_gap_us=int(fields["max_gap_us"]),
            last_us=int(fields["last_us"]),
            verified=fields["verified"],
            pages=int(fields["pages"]),
            forks=int(fields.get("forks", 0)),
            fork_errors=int(fields.get("fork_errors", 0)),
            children=int(fields.get("children", 0)),
            max_gap_end_us=int(fields.get("max_gap_end_us", 0)),
            served=int(fields.get("served", 0)),
            bad_pages=int(fields.get("bad_pages", 0)),
            conns=int(fields.get("conns", 0)),
        )


def bundle_rootfs(containerd_state: Path, namespace: str, container_id: str) -> Path:
    """The task's mounted rootfs on the host (containerd's runc v2 shim bundle layout)."""
    return containerd_state / "io.containerd.runtime.v2.task" / namespace / container_id / "rootfs"


def loadstage_image(port: int = 8080, work_us: int = 2000, start_ms: int = 0) -> ImageBuilder:
    """/bin/loadstage: HTTP on `port` after `start_ms`, each POST /work burns `work_us` of CPU,
    GET /metrics counts them (tests/workloads/loadstage.c): a stage of the scaling bench."""
    layer = Layer([Dir("bin"), File("bin/loadstage", static_binary("loadstage"), 0o755)], comment="loadstage")
    return ImageBuilder([busybox_layer(), layer], cmd=("/bin/loadstage", str(port), str(work_us), str(start_ms)))
