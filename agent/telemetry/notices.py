"""Drain notices from the sources a cloud or bare-metal host really has, in their documented formats.

A notice that states when the host goes away (a spot `instance-action` time, an Azure event's
`NotBefore`, systemd's `USEC=`) is reported with that `deadline`: the coordinator treats it as a
fact and drains the host whatever its model says. A notice without a time (a rebalance
recommendation, a live migration) is an event the model sees.

Sources (each off when its URL or path is empty; see `[telemetry.notices]` in docs/telemetry.md):

- AWS instance metadata (IMDSv2 token, then IMDSv1 if the token is refused):
  `/latest/meta-data/spot/instance-action` -> `{"action": "terminate"|"stop"|"hibernate",
  "time": "2017-09-18T08:22:00Z"}`, 404 when none; `/latest/meta-data/events/recommendations/rebalance`
  -> `{"noticeTime": "2020-10-27T08:22:00Z"}`, 404 when none.
- Azure Scheduled Events (`/metadata/scheduledevents?api-version=2020-07-01`, header `Metadata: true`):
  `{"DocumentIncarnation": n, "Events": [{"EventId", "EventType", "EventStatus", "NotBefore",
  "Resources", "Description", "EventSource", "DurationInSeconds"}]}`; only events whose `Resources`
  name this VM (`azure_vm_name`, else IMDS `compute/name`) count.
- GCE (`computeMetadata/v1/instance/maintenance-event`, header `Metadata-Flavor: Google`): `NONE`,
  `MIGRATE_ON_HOST_MAINTENANCE` or `TERMINATE_ON_HOST_MAINTENANCE` (60 s before, documented);
  `instance/preempted` `TRUE` after a pre-emption notice (30 s); `instance/upcoming-maintenance`
  (a JSON window, days ahead: a deadline at its start when `scheduling/on-host-maintenance` is
  TERMINATE, else an event without one).
- systemd: `/run/systemd/shutdown/scheduled`, key=value lines written by `shutdown -r +N`
  (`USEC=` microseconds since the epoch, `MODE=reboot|poweroff|halt|kexec`).
- SMART health from `smartctl --json` (`smart_status.passed`, NVMe media errors, ATA error log).
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import aiohttp

from proto.ferryman.v1 import fleet_pb2 as pb

log = logging.getLogger(__name__)

GCE_TERMINATE_NOTICE_S = 60.0
"""GCE sets TERMINATE_ON_HOST_MAINTENANCE 60 s before it stops the VM (documented)."""
GCE_PREEMPT_NOTICE_S = 30.0
"""A pre-empted GCE VM has 30 s before it stops (documented)."""
AZURE_DRAIN_TYPES = frozenset({"Reboot", "Redeploy", "Preempt", "Terminate"})
"""Azure event types that take the VM away; `Freeze` pauses it for seconds and needs no drain."""
MAX_BODY = 64 << 10
"""A metadata document is small; anything bigger is not one."""


@dataclass(frozen=True, slots=True)
class Notice:
    """One announcement read from a source. `key` identifies it across polls (reported once)."""

    kind: pb.HostEventKind
    source: str
    key: str
    detail: str
    deadline: float = 0.0
    """Unix seconds the source states the host goes away; 0 when it states none."""

    def event(self, now: float) -> pb.HostEvent:
        return pb.HostEvent(kind=self.kind, ts=now, detail=self.detail, deadline=self.deadline, source=self.source)


class NoticeParseError(ValueError):
    """A source answered with something that is not its documented format."""


def _iso_time(text: Any, what: str) -> float:
    if not isinstance(text, str):
        raise NoticeParseError(f"{what}: expected an ISO 8601 time, got {text!r}")
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise NoticeParseError(f"{what}: {exc}") from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def _object(text: str, what: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise NoticeParseError(f"{what}: not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise NoticeParseError(f"{what}: expected a JSON object")
    return data


# --- parsers (pure) ---------------------------------------------------------------------------------


def parse_aws_instance_action(text: str) -> Notice:
    data = _object(text, "spot/instance-action")
    action = str(data.get("action", ""))
    deadline = _iso_time(data.get("time"), "spot/instance-action time")
    return Notice(
        pb.PREEMPTION,
        "aws-spot",
        f"aws-spot:{action}:{deadline:.0f}",
        f"AWS spot instance-action {action} at {data.get('time')}",
        deadline,
    )


def parse_aws_rebalance(text: str) -> Notice:
    data = _object(text, "events/recommendations/rebalance")
    at = _iso_time(data.get("noticeTime"), "rebalance noticeTime")
    return Notice(
        pb.PREEMPTION,
        "aws-rebalance",
        f"aws-rebalance:{at:.0f}",
        f"AWS rebalance recommendation at {data.get('noticeTime')}",
    )


def parse_azure_scheduled_events(text: str, now: float, vm_name: str = "") -> list[Notice]:
    """Every scheduled or started event of this VM; those that take the VM away carry NotBefore (or
    now once started or when NotBefore is empty, which Azure sends for events already under way).

    The document lists the events of every VM in the availability set or scale set, each naming the
    VMs it affects in `Resources`: an event that names others but not `vm_name` is left out. With
    `vm_name` unknown (""), every event counts: a needless drain costs less than a missed one."""
    data = _object(text, "scheduledevents")
    events = data.get("Events", [])
    if not isinstance(events, list):
        raise NoticeParseError("scheduledevents: Events is not a list")
    out = []
    for ev in events:
        if not isinstance(ev, dict):
            raise NoticeParseError("scheduledevents: an event is not an object")
        etype, status = str(ev.get("EventType", "")), str(ev.get("EventStatus", ""))
        if status not in ("Scheduled", "Started"):
            continue  # Completed/Canceled: nothing left to act on
        resources = ev.get("Resources") or []
        if vm_name and isinstance(resources, list) and resources and vm_name not in resources:
            continue  # another VM's event
        not_before = ev.get("NotBefore") or ""
        if etype in AZURE_DRAIN_TYPES:
            if status == "Started" or not not_before:
                deadline = now
            else:
                try:
                    deadline = parsedate_to_datetime(str(not_before)).timestamp()
                except (TypeError, ValueError) as exc:
                    raise NoticeParseError(f"scheduledevents NotBefore {not_before!r}: {exc}") from exc
            kind = pb.PREEMPTION if etype in ("Preempt", "Terminate") else pb.DRAIN_NOTICE
        else:
            deadline, kind = 0.0, pb.MAINTENANCE
        event_id = str(ev.get("EventId", ""))
        out.append(
            Notice(
                kind,
                "azure-scheduled-events",
                f"azure:{event_id}:{status}:{not_before}",
                f"Azure {etype} {status} (NotBefore {not_before or '-'}): {ev.get('Description', '')}".strip(),
                deadline,
            )
        )
    return out


def parse_gce_maintenance_event(text: str, now: float) -> Notice | None:
    value = text.strip()
    if value in ("", "NONE"):
        return None
    if value == "TERMINATE_ON_HOST_MAINTENANCE":
        return Notice(
            pb.DRAIN_NOTICE, "gce-maintenance-event", f"gce:{value}", f"GCE {value}", now + GCE_TERMINATE_NOTICE_S
        )
    if value == "MIGRATE_ON_HOST_MAINTENANCE":  # live migration: the VM stays, the model may care
        return Notice(pb.MAINTENANCE, "gce-maintenance-event", f"gce:{value}", f"GCE {value}")
    raise NoticeParseError(f"maintenance-event: unknown value {value!r}")


def parse_gce_upcoming_maintenance(text: str, terminate: bool) -> Notice | None:
    """`instance/upcoming-maintenance` (404 or empty when none): `{"type": "SCHEDULED"|"UNSCHEDULED",
    "maintenance_status": "PENDING"|"ONGOING", "window_start_time": RFC 3339, "window_end_time", ...}`.

    A VM whose `scheduling/on-host-maintenance` is TERMINATE goes away at the window's start: a notice
    with that deadline. One that live-migrates stays up: an event the model sees, with no deadline."""
    if not text.strip():
        return None
    data = _object(text, "upcoming-maintenance")
    start = data.get("window_start_time")
    if not start:
        raise NoticeParseError("upcoming-maintenance: no window_start_time")
    status = str(data.get("maintenance_status", ""))
    detail = f"GCE {data.get('type', 'maintenance')} {status} window from {start}".strip()
    key = f"gce:upcoming:{start}"
    if terminate:
        return Notice(pb.DRAIN_NOTICE, "gce-upcoming-maintenance", key, detail, _iso_time(start, "window_start_time"))
    return Notice(pb.MAINTENANCE, "gce-upcoming-maintenance", key, detail)


def parse_gce_preempted(text: str, now: float) -> Notice | None:
    if text.strip().upper() != "TRUE":
        return None
    return Notice(
        pb.PREEMPTION, "gce-preempted", "gce:preempted", "GCE instance pre-empted", now + GCE_PREEMPT_NOTICE_S
    )


def parse_systemd_scheduled(text: str) -> Notice:
    """systemd-logind's scheduled shutdown file: USEC (epoch microseconds), MODE, WARN_WALL."""
    values = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    try:
        usec = int(values["USEC"])
    except (KeyError, ValueError) as exc:
        raise NoticeParseError(f"/run/systemd/shutdown/scheduled: no USEC= ({exc})") from exc
    mode = values.get("MODE", "poweroff")
    deadline = usec / 1e6
    when = datetime.fromtimestamp(deadline, UTC).isoformat(timespec="seconds")
    return Notice(
        pb.DRAIN_NOTICE, "systemd-shutdown", f"systemd:{mode}:{usec}", f"systemd {mode} scheduled at {when}", deadline
    )


def parse_notice_file_deadline(text: str) -> float:
    """A notice file may state its time: a line `deadline=<unix seconds | ISO 8601>`; 0 if none."""
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip().lower() == "deadline":
            value = value.strip()
            try:
                return float(value)
            except ValueError:
                return _iso_time(value, "notice file deadline")
    return 0.0


@dataclass(frozen=True, slots=True)
class SmartReading:
    device: str
    passed: bool | None
    errors: int
    """Media/data-integrity errors (NVMe) or ATA error-log entries: cumulative."""


def parse_smartctl(text: str, device: str) -> SmartReading:
    data = _object(text, f"smartctl --json {device}")
    status = data.get("smart_status")
    passed = bool(status["passed"]) if isinstance(status, dict) and "passed" in status else None
    errors = 0
    nvme = data.get("nvme_smart_health_information_log")
    if isinstance(nvme, dict):
        errors += int(nvme.get("media_errors", 0) or 0)
    ata = data.get("ata_smart_error_log")
    if isinstance(ata, dict) and isinstance(ata.get("summary"), dict):
        errors += int(ata["summary"].get("count", 0) or 0)
    return SmartReading(device, passed, errors)


# --- watching ---------------------------------------------------------------------------------------


class NoticeSource(Protocol):
    """One place notices come from. `read` never raises for an unreachable or silent source."""

    name: str

    async def read(self, now: float) -> list[Notice]: ...


class Dedup:
    """Reports each notice key once while it stays present; a key that disappears and comes back is new."""

    def __init__(self) -> None:
        self._seen: set[str] = set()

    def new(self, notices: Iterable[Notice]) -> list[Notice]:
        notices = list(notices)
        keys = {n.key for n in notices}
        fresh = [n for n in notices if n.key not in self._seen]
        self._seen = keys
        return fresh


@dataclass(frozen=True)
class HttpGet:
    url: str
    headers: dict[str, str]


class MetadataClient:
    """GETs of metadata documents: the body, or None for 404 (no notice) and for an unreachable
    endpoint (logged once per change of state, as a bare-metal host has none)."""

    def __init__(self, timeout: float) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self._failing: set[str] = set()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    async def request(self, method: str, url: str, headers: dict[str, str]) -> tuple[int, str] | None:
        try:
            async with self._open().request(method, url, headers=headers, allow_redirects=False) as resp:
                body = await resp.content.read(MAX_BODY)
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            if url not in self._failing:
                log.info("notice source unreachable", extra={"url": url, "error": f"{type(exc).__name__}: {exc}"})
                self._failing.add(url)
            return None
        self._failing.discard(url)
        return status, body.decode(errors="replace")

    async def get(self, url: str, headers: dict[str, str]) -> str | None:
        answer = await self.request("GET", url, headers)
        if answer is None or answer[0] == 404:
            return None
        status, body = answer
        if status != 200:
            log.warning("notice source answered an error", extra={"url": url, "status": status})
            return None
        return body


def _parsed(source: str, parse: Any, *args: Any) -> Any:
    try:
        return parse(*args)
    except NoticeParseError as exc:
        log.warning("unreadable notice", extra={"source": source, "error": str(exc)})
        return None


class AwsNotices:
    name = "aws"
    TOKEN_TTL = "21600"

    def __init__(self, client: MetadataClient, base_url: str) -> None:
        self._client = client
        self._base = base_url.rstrip("/")

    async def _headers(self) -> dict[str, str]:
        answer = await self._client.request(
            "PUT", f"{self._base}/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": self.TOKEN_TTL}
        )
        if answer is not None and answer[0] == 200 and answer[1]:
            return {"X-aws-ec2-metadata-token": answer[1].strip()}
        return {}  # IMDSv1

    async def read(self, now: float) -> list[Notice]:
        headers = await self._headers()
        out = []
        action = await self._client.get(f"{self._base}/latest/meta-data/spot/instance-action", headers)
        if action is not None and (n := _parsed("aws-spot", parse_aws_instance_action, action)):
            out.append(n)
        rebalance = await self._client.get(f"{self._base}/latest/meta-data/events/recommendations/rebalance", headers)
        if rebalance is not None and (n := _parsed("aws-rebalance", parse_aws_rebalance, rebalance)):
            out.append(n)
        return out


class AzureNotices:
    name = "azure"
    NAME_PATH = "/metadata/instance/compute/name?api-version=2021-02-01&format=text"
    """IMDS's instance endpoint on the same host as the scheduled events: this VM's name."""

    def __init__(self, client: MetadataClient, url: str, vm_name: str = "") -> None:
        self._client = client
        self._url = url
        self._vm_name = vm_name
        parts = urlsplit(url)
        self._name_url = f"{parts.scheme}://{parts.netloc}{self.NAME_PATH}"

    async def _name(self) -> str:
        """The configured name, else the one IMDS gives (asked until it answers)."""
        if not self._vm_name:
            body = await self._client.get(self._name_url, {"Metadata": "true"})
            self._vm_name = body.strip() if body else ""
        return self._vm_name

    async def read(self, now: float) -> list[Notice]:
        body = await self._client.get(self._url, {"Metadata": "true"})
        if body is None:
            return []
        name = await self._name()
        return _parsed("azure-scheduled-events", parse_azure_scheduled_events, body, now, name) or []


class GceNotices:
    name = "gce"
    HEADERS = {"Metadata-Flavor": "Google"}

    def __init__(self, client: MetadataClient, base_url: str) -> None:
        self._client = client
        self._base = base_url.rstrip("/")
        self._deadlines: dict[str, float] = {}
        """The deadline first computed for a value, so a notice seen on several polls keeps its time."""

    def _stable(self, notice: Notice | None) -> list[Notice]:
        if notice is None:
            return []
        deadline = self._deadlines.setdefault(notice.key, notice.deadline)
        return [Notice(notice.kind, notice.source, notice.key, notice.detail, deadline)]

    async def read(self, now: float) -> list[Notice]:
        out = []
        seen = set()
        for path, parse in (
            ("instance/maintenance-event", parse_gce_maintenance_event),
            ("instance/preempted", parse_gce_preempted),
        ):
            body = await self._client.get(f"{self._base}/{path}", self.HEADERS)
            if body is not None:
                for n in self._stable(_parsed(f"gce-{path}", parse, body, now)):
                    out.append(n)
                    seen.add(n.key)
        upcoming = await self._client.get(f"{self._base}/instance/upcoming-maintenance", self.HEADERS)
        if upcoming is not None:
            policy = await self._client.get(f"{self._base}/instance/scheduling/on-host-maintenance", self.HEADERS)
            terminate = (policy or "").strip().upper() == "TERMINATE"
            if n := _parsed("gce-upcoming-maintenance", parse_gce_upcoming_maintenance, upcoming, terminate):
                out.append(n)
                seen.add(n.key)
        self._deadlines = {k: v for k, v in self._deadlines.items() if k in seen}
        return out


class SystemdShutdown:
    """Blocking file read, done in the sampler's thread."""

    name = "systemd"

    def __init__(self, path: str) -> None:
        self._path = Path(path)

    def read_blocking(self) -> list[Notice]:
        try:
            text = self._path.read_text()
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            log.warning("unreadable systemd shutdown file", extra={"path": str(self._path), "error": exc.strerror})
            return []
        notice = _parsed("systemd-shutdown", parse_systemd_scheduled, text)
        return [notice] if notice is not None else []


class SmartHealth:
    """`smartctl --json --health --attributes` of each disk every `interval` seconds (blocking: a thread).

    A disk whose overall health turns to failed, or whose error count rises, is one HW_ERROR event.
    The first reading of a disk is the baseline, except a disk that already fails its self-assessment.
    """

    name = "smart"

    def __init__(self, smartctl: str, devices: Sequence[str], interval: float, timeout: float = 20.0) -> None:
        self._smartctl = shutil.which(smartctl) if smartctl else None
        self._devices = list(devices)
        self._interval = interval
        self._timeout = timeout
        self._next = 0.0
        self._last: dict[str, SmartReading] = {}

    @property
    def enabled(self) -> bool:
        return self._smartctl is not None and bool(self._devices)

    def read_blocking(self, now: float) -> list[pb.HostEvent]:
        import subprocess

        if not self.enabled or now < self._next:
            return []
        self._next = now + self._interval
        events = []
        for dev in self._devices:
            path = dev if dev.startswith("/") else f"/dev/{dev}"
            try:
                proc = subprocess.run(
                    [str(self._smartctl), "--json", "--health", "--attributes", "--log=error", path],
                    capture_output=True,
                    text=True,
                    timeout=self._timeout,
                    check=False,
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                log.warning("smartctl failed", extra={"device": path, "error": str(exc)})
                continue
            # smartctl's exit status is a bit mask (bit 3: disk failing); the JSON says it all
            reading = _parsed("smart", parse_smartctl, proc.stdout, path)
            if reading is None:
                continue
            events.extend(smart_events(self._last.get(path), reading, now))
            self._last[path] = reading
        return events


def smart_events(before: SmartReading | None, after: SmartReading, now: float) -> list[pb.HostEvent]:
    """HW_ERROR events for a change between two readings of one disk (pure)."""
    out = []
    if after.passed is False and (before is None or before.passed is not False):
        out.append(
            pb.HostEvent(
                kind=pb.HW_ERROR,
                ts=now,
                detail=f"SMART: {after.device} fails its health self-assessment",
                source="smart",
            )
        )
    if before is not None and after.errors > before.errors:
        out.append(
            pb.HostEvent(
                kind=pb.HW_ERROR,
                ts=now,
                detail=f"SMART: {after.errors - before.errors} new errors on {after.device} (total {after.errors})",
                source="smart",
            )
        )
    return out


class CloudNotices:
    """The metadata sources that are configured, polled concurrently; new notices as events."""

    def __init__(self, sources: Sequence[NoticeSource], client: MetadataClient) -> None:
        self._sources = list(sources)
        self._client = client
        self._dedup = {s.name: Dedup() for s in self._sources}

    @property
    def enabled(self) -> bool:
        return bool(self._sources)

    async def poll(self, now: float) -> list[pb.HostEvent]:
        if not self._sources:
            return []
        results = await asyncio.gather(*(s.read(now) for s in self._sources))
        return [
            n.event(now)
            for s, found in zip(self._sources, results, strict=True)
            for n in self._dedup[s.name].new(found)
        ]

    async def close(self) -> None:
        await self._client.close()
