"""Drain notices from real sources in their documented formats (agent/telemetry/notices.py), and the
coordinator treating a notice with a stated time as a fact (coordinator/notices.py, the policy).

The cloud metadata services are a local aiohttp server on 127.0.0.1 that answers like the real ones:
AWS IMDSv2 (token PUT, then 404 or the JSON documents), Azure Scheduled Events (needs `Metadata:
true`), GCE (needs `Metadata-Flavor: Google`, plain-text values). Bodies are the documented examples.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from agent.config import NoticesConfig, TelemetryConfig, parse_config
from agent.telemetry.notices import (
    NoticeParseError,
    SmartReading,
    parse_aws_instance_action,
    parse_azure_scheduled_events,
    parse_gce_maintenance_event,
    parse_gce_upcoming_maintenance,
    parse_notice_file_deadline,
    parse_smartctl,
    parse_systemd_scheduled,
    smart_events,
)
from agent.telemetry.sampler import Sampler
from coordinator.notices import GRACE_S, Notice, active_notice, fact_mask, notices_in_sample
from core.errors import ConfigError
from proto.ferryman.v1 import fleet_pb2 as pb

# --------------------------------------------------------------- parsers on the documented examples


def test_aws_spot_instance_action() -> None:
    n = parse_aws_instance_action('{"action": "terminate", "time": "2017-09-18T08:22:00Z"}')
    assert n.kind == pb.PREEMPTION and n.source == "aws-spot"
    assert n.deadline == datetime(2017, 9, 18, 8, 22, tzinfo=UTC).timestamp()
    with pytest.raises(NoticeParseError, match="ISO 8601"):
        parse_aws_instance_action('{"action": "terminate"}')


def test_azure_scheduled_events() -> None:
    body = {
        "DocumentIncarnation": 2,
        "Events": [
            {
                "EventId": "C7061BAC-AFDC-4513-B24B-AA5F13A16123",
                "EventStatus": "Scheduled",
                "EventType": "Reboot",
                "ResourceType": "VirtualMachine",
                "Resources": ["WestNO_0"],
                "NotBefore": "Mon, 11 Apr 2022 22:26:58 GMT",
                "Description": "Virtual machine is going to be restarted as requested by authorized user.",
                "EventSource": "User",
                "DurationInSeconds": 15,
            },
            {"EventId": "F", "EventStatus": "Scheduled", "EventType": "Freeze", "NotBefore": "", "Resources": []},
            {"EventId": "P", "EventStatus": "Started", "EventType": "Preempt", "NotBefore": ""},
            {"EventId": "C", "EventStatus": "Completed", "EventType": "Redeploy", "NotBefore": ""},
        ],
    }
    reboot, freeze, preempt = parse_azure_scheduled_events(json.dumps(body), now=1000.0)
    assert reboot.kind == pb.DRAIN_NOTICE
    assert reboot.deadline == datetime(2022, 4, 11, 22, 26, 58, tzinfo=UTC).timestamp()
    assert "Reboot Scheduled" in reboot.detail
    assert freeze.kind == pb.MAINTENANCE and freeze.deadline == 0.0  # a pause of seconds: no drain
    assert preempt.kind == pb.PREEMPTION and preempt.deadline == 1000.0  # already under way
    # The document lists every VM's events in the set: another VM's reboot is not this one's.
    mine = parse_azure_scheduled_events(json.dumps(body), now=1000.0, vm_name="WestNO_1")
    assert [n.detail.split()[1] for n in mine] == ["Freeze", "Preempt"]  # no Resources: everyone's
    assert len(parse_azure_scheduled_events(json.dumps(body), now=1000.0, vm_name="WestNO_0")) == 3


def test_gce_and_systemd_and_notice_files() -> None:
    assert parse_gce_maintenance_event("NONE", 5.0) is None
    migrate = parse_gce_maintenance_event("MIGRATE_ON_HOST_MAINTENANCE", 5.0)
    assert migrate is not None and migrate.kind == pb.MAINTENANCE and migrate.deadline == 0.0
    terminate = parse_gce_maintenance_event("TERMINATE_ON_HOST_MAINTENANCE", 5.0)
    assert terminate is not None and terminate.deadline == 65.0
    with pytest.raises(NoticeParseError, match="unknown value"):
        parse_gce_maintenance_event("SOMETHING_NEW", 5.0)
    window = {
        "can_reschedule": False,
        "maintenance_status": "PENDING",
        "type": "SCHEDULED",
        "window_start_time": "2030-01-01T02:00:00Z",
        "window_end_time": "2030-01-01T06:00:00Z",
    }
    stops = parse_gce_upcoming_maintenance(json.dumps(window), terminate=True)
    assert stops is not None and stops.kind == pb.DRAIN_NOTICE and stops.deadline == 1893463200.0
    moves = parse_gce_upcoming_maintenance(json.dumps(window), terminate=False)
    assert moves is not None and moves.kind == pb.MAINTENANCE and moves.deadline == 0.0
    assert parse_gce_upcoming_maintenance("", terminate=True) is None
    with pytest.raises(NoticeParseError, match="window_start_time"):
        parse_gce_upcoming_maintenance('{"type": "SCHEDULED"}', terminate=True)
    # what `shutdown -r +5` leaves in /run/systemd/shutdown/scheduled
    n = parse_systemd_scheduled("USEC=1764950400000000\nWARN_WALL=1\nMODE=reboot\n")
    assert n.deadline == 1764950400.0 and n.source == "systemd-shutdown" and "reboot" in n.detail
    with pytest.raises(NoticeParseError, match="USEC"):
        parse_systemd_scheduled("MODE=reboot\n")
    assert parse_notice_file_deadline("maintenance window\ndeadline=2030-01-01T02:00:00Z") == 1893463200.0
    assert parse_notice_file_deadline("deadline=1893463200") == 1893463200.0
    assert parse_notice_file_deadline("no time stated") == 0.0


def test_smartctl_json() -> None:
    nvme = {"smart_status": {"passed": True}, "nvme_smart_health_information_log": {"media_errors": 3}}
    ata = {"smart_status": {"passed": False}, "ata_smart_error_log": {"summary": {"count": 7}}}
    a = parse_smartctl(json.dumps(nvme), "/dev/nvme0")
    assert a == SmartReading("/dev/nvme0", True, 3)
    b = parse_smartctl(json.dumps(ata), "/dev/sda")
    assert b == SmartReading("/dev/sda", False, 7)
    assert smart_events(None, a, 1.0) == []  # the first reading is the baseline
    (worse,) = smart_events(a, SmartReading("/dev/nvme0", True, 5), 2.0)
    assert worse.kind == pb.HW_ERROR and "2 new errors" in worse.detail
    (failing,) = smart_events(None, b, 3.0)  # already failing: news even on the first reading
    assert "fails its health" in failing.detail


def test_notice_config() -> None:
    config = parse_config({"telemetry": {"notices": {"aws_metadata_url": "http://169.254.169.254"}}})
    assert config.telemetry.notices.aws_metadata_url == "http://169.254.169.254"
    with pytest.raises(ConfigError, match=r"telemetry\.notices\.gce_metadata_url"):
        parse_config({"telemetry": {"notices": {"gce_metadata_url": "metadata.google.internal"}}})
    with pytest.raises(ConfigError, match="unknown keys"):
        parse_config({"telemetry": {"notices": {"aws_url": "http://x"}}})


# --------------------------------------------------------------- the sampler against a local metadata server


class FakeMetadata:
    """Serves the documented paths; `state` decides what each answers."""

    def __init__(self) -> None:
        self.spot: dict[str, str] | None = None
        self.rebalance: dict[str, str] | None = None
        self.azure: dict[str, Any] = {"DocumentIncarnation": 0, "Events": []}
        self.gce = "NONE"
        self.gce_upcoming: dict[str, Any] | None = None
        self.gce_on_host_maintenance = "TERMINATE"
        self.azure_name_asked = 0
        self.tokens = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_put("/latest/api/token", self.token)
        app.router.add_get("/latest/meta-data/spot/instance-action", self.instance_action)
        app.router.add_get("/latest/meta-data/events/recommendations/rebalance", self.rebalance_doc)
        app.router.add_get("/metadata/scheduledevents", self.scheduled_events)
        app.router.add_get("/computeMetadata/v1/instance/maintenance-event", self.maintenance_event)
        app.router.add_get("/computeMetadata/v1/instance/preempted", self.preempted)
        app.router.add_get("/computeMetadata/v1/instance/upcoming-maintenance", self.upcoming_maintenance)
        app.router.add_get("/computeMetadata/v1/instance/scheduling/on-host-maintenance", self.on_host_maintenance)
        app.router.add_get("/metadata/instance/compute/name", self.azure_vm_name)
        return app

    async def upcoming_maintenance(self, request: web.Request) -> web.Response:
        if request.headers.get("Metadata-Flavor") != "Google":
            return web.Response(status=403)
        return web.json_response(self.gce_upcoming) if self.gce_upcoming else web.Response(status=404)

    async def on_host_maintenance(self, request: web.Request) -> web.Response:
        return web.Response(text=self.gce_on_host_maintenance)

    async def azure_vm_name(self, request: web.Request) -> web.Response:
        if request.headers.get("Metadata") != "true" or request.query.get("format") != "text":
            return web.Response(status=400)
        self.azure_name_asked += 1
        return web.Response(text="vm0")

    async def token(self, request: web.Request) -> web.Response:
        assert request.headers["X-aws-ec2-metadata-token-ttl-seconds"]
        self.tokens += 1
        return web.Response(text="TOKEN")

    def _aws(self, request: web.Request, doc: dict[str, str] | None) -> web.Response:
        if request.headers.get("X-aws-ec2-metadata-token") != "TOKEN":
            return web.Response(status=401)
        return web.json_response(doc) if doc is not None else web.Response(status=404)

    async def instance_action(self, request: web.Request) -> web.Response:
        return self._aws(request, self.spot)

    async def rebalance_doc(self, request: web.Request) -> web.Response:
        return self._aws(request, self.rebalance)

    async def scheduled_events(self, request: web.Request) -> web.Response:
        if request.headers.get("Metadata") != "true" or request.query.get("api-version") != "2020-07-01":
            return web.Response(status=400)
        return web.json_response(self.azure)

    async def maintenance_event(self, request: web.Request) -> web.Response:
        if request.headers.get("Metadata-Flavor") != "Google":
            return web.Response(status=403)
        return web.Response(text=self.gce)

    async def preempted(self, request: web.Request) -> web.Response:
        return web.Response(text="FALSE")


@pytest.fixture
async def metadata() -> AsyncIterator[tuple[FakeMetadata, str]]:
    fake = FakeMetadata()
    runner = web.AppRunner(fake.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield fake, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def test_sampler_reads_cloud_notices_once_each(metadata: tuple[FakeMetadata, str], tmp_path: Path) -> None:
    fake, base = metadata
    config = TelemetryConfig(
        drain_notice_file=str(tmp_path / "drain"),
        maintenance_file=str(tmp_path / "maint"),
        preemption_file=str(tmp_path / "preempt"),
        notices=NoticesConfig(
            aws_metadata_url=base,
            azure_scheduled_events_url=f"{base}/metadata/scheduledevents?api-version=2020-07-01",
            gce_metadata_url=f"{base}/computeMetadata/v1",
            systemd_shutdown_file=str(tmp_path / "scheduled"),
            smartctl="",
        ),
    )
    sampler = Sampler(config)
    try:
        quiet = await sampler.sample()
        assert list(quiet.events) == [] and fake.tokens == 1

        soon = int(time.time()) + 120
        fake.spot = {"action": "terminate", "time": _iso(soon)}
        fake.rebalance = {"noticeTime": _iso(soon - 600)}
        fake.azure = {
            "DocumentIncarnation": 1,
            "Events": [
                {
                    "EventId": "E1",
                    "EventStatus": "Scheduled",
                    "EventType": "Redeploy",
                    "NotBefore": format_datetime(datetime.fromtimestamp(soon + 300, UTC), usegmt=True),
                    "Description": "Host server is undergoing maintenance.",
                    "EventSource": "Platform",
                    "Resources": ["vm0"],
                },
                {
                    "EventId": "E2",
                    "EventStatus": "Scheduled",
                    "EventType": "Reboot",
                    "NotBefore": format_datetime(datetime.fromtimestamp(soon, UTC), usegmt=True),
                    "Resources": ["vm1"],  # a neighbour's: not this host's notice
                },
            ],
        }
        fake.gce = "TERMINATE_ON_HOST_MAINTENANCE"
        fake.gce_upcoming = {
            "type": "SCHEDULED",
            "maintenance_status": "PENDING",
            "window_start_time": _iso(soon + 86400),
        }
        (tmp_path / "scheduled").write_text(f"USEC={(soon + 900) * 1_000_000}\nWARN_WALL=1\nMODE=poweroff\n")
        (tmp_path / "drain").write_text(f"provider drain\ndeadline={soon + 1200}\n")
        second = await sampler.sample()
        by_source = {e.source: e for e in second.events}
        assert set(by_source) == {
            "aws-spot",
            "aws-rebalance",
            "azure-scheduled-events",
            "gce-maintenance-event",
            "gce-upcoming-maintenance",
            "systemd-shutdown",
            "notice-file",
        }
        assert len(second.events) == len(by_source)  # the neighbour's Azure event is left out
        assert fake.azure_name_asked == 1
        assert by_source["gce-upcoming-maintenance"].deadline == soon + 86400  # TERMINATE: the window's start
        assert by_source["aws-spot"].deadline == soon and by_source["aws-spot"].kind == pb.PREEMPTION
        assert by_source["aws-rebalance"].deadline == 0.0  # a recommendation states no time
        assert by_source["azure-scheduled-events"].deadline == soon + 300
        assert 0 < by_source["gce-maintenance-event"].deadline - second.ts <= 61
        assert by_source["systemd-shutdown"].deadline == soon + 900
        assert by_source["notice-file"].deadline == soon + 1200

        third = await sampler.sample()
        assert list(third.events) == []  # each notice is reported once while it stays
        fake.spot = None
        fake.azure = {"DocumentIncarnation": 2, "Events": []}
        await sampler.sample()
        fake.spot = {"action": "stop", "time": _iso(soon + 60)}
        fourth = await sampler.sample()
        assert [e.source for e in fourth.events] == ["aws-spot"]  # a new notice after it went away
    finally:
        await sampler.close()


async def test_unreachable_metadata_costs_nothing_but_the_timeout(tmp_path: Path) -> None:
    config = TelemetryConfig(
        drain_notice_file=str(tmp_path / "d"),
        notices=NoticesConfig(aws_metadata_url="http://127.0.0.1:9", request_timeout=0.5, smartctl=""),
    )
    sampler = Sampler(config)
    try:
        sample = await sampler.sample()
        assert list(sample.events) == []
    finally:
        await sampler.close()


# --------------------------------------------------------------- the coordinator's side: facts


def test_a_notice_holds_within_the_horizon_until_after_its_deadline() -> None:
    sample = {
        "events": [
            {"kind": "PREEMPTION", "ts": 100.0, "deadline": 1000.0, "source": "aws-spot", "detail": "terminate"},
            {"kind": "MAINTENANCE", "ts": 100.0, "detail": "no time stated"},
        ]
    }
    (notice,) = notices_in_sample(100.0, sample)
    assert notice == Notice(100.0, 1000.0, "PREEMPTION", "aws-spot", "terminate")
    assert active_notice([notice], 99.0, 1800.0) is None  # not seen yet
    assert active_notice([notice], 100.0, 1800.0) == notice
    assert active_notice([notice], 100.0, 600.0) is None  # deadline beyond the horizon: not yet
    assert active_notice([notice], 400.0, 600.0) == notice
    assert active_notice([notice], 1000.0 + GRACE_S + 1, 1800.0) is None
    times = [99.0, 100.0, 1000.0 + GRACE_S + 1]
    assert fact_mask([100.0], [1000.0], times, 1800.0).tolist() == [False, True, False]  # type: ignore[arg-type]
