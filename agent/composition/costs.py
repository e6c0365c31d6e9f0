"""Measured costs and the access history: what the fetch order and (later) placement weigh.

`CostMeter` keeps, per source a layer came from ("registry/HOST", "peer"), the bytes and the seconds
of every fetch, and for assembly the bytes applied and the seconds containerd's apply took (the
apply decompresses and writes the layer, CPU-bound on an idle host: the assembly cost per byte).
`GET /v1/assembly/costs` serves them; they are the agent's measured side of placement's cost model.

The CPU is containerd's (it applies the layers): `ContainerdCpu` finds containerd's process from
its socket (SO_PEERCRED) and reads its user and system time from /proc around each apply, so the
assembly cost is counted in CPU seconds per byte as well as in wall seconds per byte; where the
process cannot be seen (another PID namespace), only the wall time is.

`LayerHistory` counts the assemblies that used each layer, kept in `state_dir` (crash-safe writes),
bounded to the `MAX_HISTORY` layers used last.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.files import atomic_write

log = logging.getLogger(__name__)

MIB = 1 << 20
DEFAULT_RATES = {"registry": 50 * MIB, "peer": 200 * MIB}
"""Bytes per second assumed for a source not measured yet (the cache's REFETCH estimates)."""
DEFAULT_APPLY_SECONDS_PER_BYTE = 1 / (100 * MIB)
FETCH_LATENCY = 0.05
"""Seconds a fetch costs beyond its bytes (a request, a round trip), in the estimates."""
MAX_HISTORY = 10_000
RECENT_HALF_LIFE = 60.0
"""Seconds after which a measurement counts half as much as a new one in the reported rates: the
machine's load changes over minutes, and a rate measured under another load mispredicts."""


@dataclass
class Totals:
    count: int = 0
    bytes: int = 0
    seconds: float = 0.0
    busy: float = 0.0
    """Seconds in which at least one fetch ran: concurrent fetches share a link, so a source's rate
    is its bytes over this, not over the sum of their durations."""
    busy_until: float = 0.0
    recent_bytes: float = 0.0
    recent_busy: float = 0.0
    """`bytes` and `busy` with each measurement weighted by its age when the newest arrived (halved
    every RECENT_HALF_LIFE seconds): the rates placement uses follow the host's current load."""
    recent_at: float | None = None

    def add(self, nbytes: int, seconds: float, ended: float | None = None) -> None:
        self.count += 1
        self.bytes += nbytes
        self.seconds += seconds
        if ended is None:
            busy = seconds
        else:
            # The union of the fetches' intervals, as they end (one that ended earlier but started
            # later than another still in flight is counted from where the union had reached).
            started = ended - seconds
            busy = max(0.0, ended - max(started, self.busy_until))
            self.busy_until = max(self.busy_until, ended)
        self.busy += busy
        now = time.monotonic() if ended is None else ended
        keep = recent_weight(now - self.recent_at) if self.recent_at is not None else 0.0
        self.recent_bytes = self.recent_bytes * keep + nbytes
        self.recent_busy = self.recent_busy * keep + busy
        self.recent_at = now if self.recent_at is None else max(self.recent_at, now)

    def recent_rate(self) -> float | None:
        """Bytes per busy second, recent measurements weighing most; None under a MiB of evidence."""
        if self.recent_busy > 0 and self.bytes >= MIB:
            return self.recent_bytes / self.recent_busy
        return None

    def to_json(self) -> dict[str, Any]:
        return {"count": self.count, "bytes": self.bytes, "seconds": round(self.seconds, 6)}


def recent_weight(age: float) -> float:
    """What a measurement `age` seconds older than the newest still counts for (1 at age 0)."""
    return 0.5 ** (max(0.0, age) / RECENT_HALF_LIFE)


class CostMeter:
    def __init__(self) -> None:
        self.fetches: dict[str, Totals] = {}
        self.assembly = Totals()
        self.assembly_cpu = Totals()
        """The applies whose CPU time was measured: bytes, and containerd's CPU seconds."""

    def fetched(self, source: str, nbytes: int, seconds: float, ended: float | None = None) -> None:
        """A fetch of `nbytes` from `source` that took `seconds` and ended at `ended` (monotonic
        clock; None: it ran alone)."""
        if nbytes > 0:
            self.fetches.setdefault(source, Totals()).add(nbytes, seconds, ended)

    def applied(self, nbytes: int, seconds: float, cpu_seconds: float | None = None) -> None:
        if nbytes > 0:
            self.assembly.add(nbytes, seconds)
            if cpu_seconds is not None:
                self.assembly_cpu.add(nbytes, cpu_seconds)

    def rate(self, source: str) -> float:
        """Bytes per second from `source`: measured, else the default for its kind."""
        t = self.fetches.get(source)
        if t is not None and t.seconds > 0 and t.bytes >= MIB:
            return t.bytes / t.seconds
        return DEFAULT_RATES.get(source.split("/", 1)[0], DEFAULT_RATES["registry"])

    def fetch_seconds(self, size: int, sources: list[str]) -> float:
        """Seconds to fetch `size` bytes from the fastest of `sources`."""
        return FETCH_LATENCY + size / max(self.rate(s) for s in sources)

    def apply_seconds_per_byte(self) -> float:
        a = self.assembly
        if a.seconds > 0 and a.bytes >= MIB:
            return a.seconds / a.bytes
        return DEFAULT_APPLY_SECONDS_PER_BYTE

    def measured(self) -> dict[str, float]:
        """What was measured, for the coordinator's placement (telemetry's LayerCosts): bytes per
        second from registries (all together) and from peers, and apply seconds per byte; a figure
        is left out until at least a MiB was measured for it. Rates are over the time fetches from
        the source were running (several at once share one link), the recent ones weighing most
        (RECENT_HALF_LIFE)."""
        registry = Totals()
        newest = max((t.recent_at for t in self.fetches.values() if t.recent_at is not None), default=0.0)
        for name, t in self.fetches.items():
            if name.startswith("registry/") and t.recent_at is not None:
                # Each registry's recent figures, aged to the newest measurement of any of them.
                keep = recent_weight(newest - t.recent_at)
                registry.bytes += t.bytes
                registry.recent_bytes += t.recent_bytes * keep
                registry.recent_busy += t.recent_busy * keep
        out: dict[str, float] = {}
        peer = self.fetches.get("peer", Totals())
        for key, t in (("registry_bytes_per_second", registry), ("peer_bytes_per_second", peer)):
            if (rate := t.recent_rate()) is not None:
                out[key] = rate
        if (applying := self.assembly.recent_rate()) is not None:
            out["apply_seconds_per_byte"] = 1.0 / applying
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "sources": {
                name: {**t.to_json(), "bytes_per_second": round(self.rate(name), 1)}
                for name, t in sorted(self.fetches.items())
            },
            "assembly": {
                **self.assembly.to_json(),
                "seconds_per_byte": self.apply_seconds_per_byte(),
                "cpu_seconds": round(self.assembly_cpu.seconds, 6),
                "cpu_seconds_per_byte": (
                    self.assembly_cpu.seconds / self.assembly_cpu.bytes if self.assembly_cpu.bytes else None
                ),
            },
        }


class ContainerdCpu:
    """containerd's CPU seconds so far (user + system), or None where its process cannot be read."""

    def __init__(self, socket_path: str) -> None:
        self._socket_path = socket_path.removeprefix("unix://")
        self._pid: int | None = None

    def seconds(self) -> float | None:
        """Blocking (a connect and a /proc read): call it off the loop."""
        if not self._socket_path:
            return None
        for _ in range(2):  # once more after containerd restarted under another pid
            if self._pid is None:
                self._pid = socket_peer_pid(self._socket_path)
                if self._pid is None:
                    return None
            found = process_cpu_seconds(self._pid)
            if found is not None:
                return found
            self._pid = None
        return None


def socket_peer_pid(path: str) -> int | None:
    """The pid of the process listening on unix socket `path` (SO_PEERCRED), None if unknown."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            sock.connect(path)
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    pid, _, _ = struct.unpack("3i", creds)
    return pid if pid > 0 else None


def process_cpu_seconds(pid: int) -> float | None:
    """utime + stime of `pid` from /proc/PID/stat, in seconds; None if it cannot be read (a pid of
    another PID namespace reads as 0 or nothing)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()
    try:
        ticks = int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5), after pid and comm
    except (IndexError, ValueError):
        return None
    return ticks / os.sysconf("SC_CLK_TCK")


class LayerHistory:
    """Per layer digest: assemblies that used it and when last (UTC ISO-8601)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        """record() runs in worker threads (it fsyncs); two assemblies may end at once."""
        self._uses: dict[str, dict[str, Any]] = {}
        try:
            loaded = json.loads(path.read_text())
            if isinstance(loaded, dict):
                self._uses = {k: v for k, v in loaded.items() if isinstance(v, dict)}
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            log.warning("layer history unreadable, starting empty", extra={"path": str(path), "error": str(exc)})

    def uses(self, digest: str) -> int:
        value = self._uses.get(digest, {}).get("uses", 0)
        return value if isinstance(value, int) else 0

    def record(self, digests: list[str]) -> None:
        with self._lock:
            self._record(digests)

    def _record(self, digests: list[str]) -> None:
        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        for digest in digests:
            self._uses[digest] = {"uses": self.uses(digest) + 1, "last": now}
        if len(self._uses) > MAX_HISTORY:
            keep = sorted(self._uses.items(), key=lambda kv: str(kv[1].get("last", "")))[-MAX_HISTORY:]
            self._uses = dict(keep)
        self._path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self._path, json.dumps(self._uses, sort_keys=True).encode())
