"""Host telemetry: the /proc and cgroup parsers (real files and crafted text), the sampler on this
host, notice-file and counter events, and the Prometheus export."""

from __future__ import annotations

import asyncio
import math
import os
import re
import time
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agent.composition.costs import RECENT_HALF_LIFE, CostMeter
from agent.config import CapacityConfig, TelemetryConfig, parse_config
from agent.metrics import AgentMetrics
from agent.telemetry import procfs
from agent.telemetry.capacity import HostCapacity
from agent.telemetry.containers import CounterMark, counter_rate
from agent.telemetry.events import MAX_DETAIL, CounterDelta, EdacErrors, NoticeFile
from agent.telemetry.host import HostPaths, read_edac, read_host, whole_disks
from agent.telemetry.procfs import TelemetryParseError
from agent.telemetry.sampler import Sampler
from core.errors import ConfigError
from proto.ferryman.v1 import fleet_pb2 as pb

PROC = Path("/proc")

# ------------------------------------------------------------------ parsers on this host's real files


def test_real_stat_and_loadavg() -> None:
    before = procfs.parse_cpu_times((PROC / "stat").read_text())
    assert 0 < before.busy < before.total
    # Burn a little CPU so the busy counter must move.
    deadline = time.monotonic() + 0.2
    while time.monotonic() < deadline:
        sum(range(1000))
    after = procfs.parse_cpu_times((PROC / "stat").read_text())
    util = procfs.cpu_utilisation(before, after)
    assert util is not None and 0 < util <= 1
    load = procfs.parse_loadavg((PROC / "loadavg").read_text())
    assert load == pytest.approx(os.getloadavg(), abs=0.5)


def test_real_meminfo_matches_sysconf() -> None:
    info = procfs.parse_meminfo((PROC / "meminfo").read_text())
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert info["MemTotal"] == physical
    assert 0 < info["MemAvailable"] <= info["MemTotal"]
    assert "HugePages_Total" in info  # a page count, kept as a count


def test_real_diskstats_net_vmstat_pressure() -> None:
    disks = whole_disks(Path("/sys/block"))
    assert disks, "this host has a disk with a device link"
    assert not any(d.startswith(("loop", "zram", "ram", "dm-")) for d in disks)
    io = procfs.parse_diskstats((PROC / "diskstats").read_text(), disks)
    assert io.read > 0 and io.written > 0
    net = procfs.parse_net_dev((PROC / "net" / "dev").read_text())
    with_lo = procfs.parse_net_dev((PROC / "net" / "dev").read_text(), exclude=())
    assert with_lo.read >= net.read and with_lo.written >= net.written
    assert isinstance(procfs.parse_vmstat((PROC / "vmstat").read_text(), "oom_kill"), int)
    reading = read_host(HostPaths(), disks)
    if (PROC / "pressure" / "memory").exists():
        line = procfs.parse_pressure((PROC / "pressure" / "memory").read_text())
        assert line.some is not None and line.full is not None
        assert set(reading.pressure) == {"cpu", "memory", "io"}
    else:
        assert reading.pressure == {}


# ------------------------------------------------------------------ parsers on crafted text


def test_cpu_times_leave_out_guest_and_count_iowait_as_idle() -> None:
    text = "cpu  100 0 50 800 50 0 0 0 30 0\ncpu0 100 0 50 800 50 0 0 0 30 0\nintr 1\n"
    times = procfs.parse_cpu_times(text)
    assert times == procfs.CpuTimes(busy=150, total=1000)
    later = procfs.CpuTimes(busy=250, total=1200)
    assert procfs.cpu_utilisation(times, later) == pytest.approx(0.5)
    assert procfs.cpu_utilisation(times, times) is None
    with pytest.raises(TelemetryParseError, match="no aggregate cpu"):
        procfs.parse_cpu_times("cpu0 1 2 3 4\n")
    with pytest.raises(TelemetryParseError):
        procfs.parse_cpu_times("cpu 1 x 3 4\n")


def test_pressure_some_only_and_bad() -> None:
    cpu = procfs.parse_pressure("some avg10=1.50 avg60=0.20 avg300=0.00 total=1234\n")
    assert cpu == procfs.PressureLine(some=1.5, full=None)
    both = procfs.parse_pressure(
        "some avg10=3.00 avg60=1.00 avg300=0.50 total=9\nfull avg10=2.25 avg60=0.00 avg300=0.00 total=1\n"
    )
    assert both == procfs.PressureLine(some=3.0, full=2.25)
    with pytest.raises(TelemetryParseError):
        procfs.parse_pressure("some avg10=abc\n")
    with pytest.raises(TelemetryParseError):
        procfs.parse_pressure("")


def test_diskstats_counts_whole_disks_only() -> None:
    text = (
        "   8       0 sda 10 0 100 5 20 0 200 7 0 10 12 0 0 0 0\n"
        "   8       1 sda1 10 0 100 5 20 0 200 7 0 10 12 0 0 0 0\n"
        "   7       0 loop0 99 0 999 5 99 0 999 7 0 10 12 0 0 0 0\n"
        " 259       0 nvme0n1 1 0 8 1 2 0 16 1 0 1 1\n"
    )
    io = procfs.parse_diskstats(text, ["sda", "nvme0n1"])
    assert io == procfs.IoBytes(read=(100 + 8) * 512, written=(200 + 16) * 512)
    with pytest.raises(TelemetryParseError):
        procfs.parse_diskstats("8 0 sda 10 0 many 5 20 0 200 7 0 10\n", ["sda"])


def test_net_dev_skips_headers_and_lo() -> None:
    text = (
        "Inter-|   Receive                                                |  Transmit\n"
        " face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop\n"
        "    lo: 500 5 0 0 0 0 0 0 500 5 0 0 0 0 0 0\n"
        "  eth0: 1000 10 0 0 0 0 0 0 2000 20 0 0 0 0 0 0\n"
        "veth1a: 30 1 0 0 0 0 0 0 40 1 0 0 0 0 0 0\n"
    )
    assert procfs.parse_net_dev(text) == procfs.IoBytes(read=1030, written=2040)
    with pytest.raises(TelemetryParseError):
        procfs.parse_net_dev("eth0: 1 2 3\n")


def test_rates_and_counters() -> None:
    assert procfs.rate(100, 300, 2.0) == 100.0
    assert procfs.rate(300, 100, 2.0) is None  # a device vanished: no negative throughput
    assert procfs.rate(1, 2, 0) is None
    assert procfs.parse_vmstat("pgfault 5\noom_kill 3\n", "oom_kill") == 3
    assert procfs.parse_vmstat("pgfault 5\n", "oom_kill") is None


def test_cgroup_files() -> None:
    assert procfs.parse_cgroup_int("max\n") is None
    assert procfs.parse_cgroup_int("67108864\n") == 64 << 20
    assert procfs.parse_memory_limit_v1("9223372036854771712\n") is None
    assert procfs.parse_memory_limit_v1("67108864\n") == 64 << 20
    assert procfs.parse_cpu_max("50000 100000\n") == 500.0
    assert procfs.parse_cpu_max("max 100000\n") is None
    assert procfs.cpu_quota_v1("-1\n", "100000\n") is None
    assert procfs.cpu_quota_v1("150000\n", "100000\n") == 1500.0
    assert procfs.parse_cpu_stat_usage_us("usage_usec 1234\nuser_usec 1000\n") == 1234
    for bad in ("", "12 34 56", "x 100"):
        with pytest.raises(TelemetryParseError):
            procfs.parse_cpu_max(bad)
    with pytest.raises(TelemetryParseError):
        procfs.parse_cgroup_int("lots")


def test_a_packet_counter_becomes_a_rate_over_a_window_of_a_second_or_more() -> None:
    first = counter_rate(None, 1000, 10.0)
    assert first == CounterMark(1000, 10.0) and first.rate is None  # one reading measures nothing
    assert counter_rate(first, 1300, 12.0) == CounterMark(1300, 12.0, 150.0)
    # A second reader within the window (admission) keeps telemetry's reading and its rate.
    measured = counter_rate(first, 1300, 12.0)
    assert counter_rate(measured, 1310, 12.5) is measured
    assert counter_rate(measured, 1300, 14.0).rate == 0.0  # idle is measured, not missing
    # A veth made again counts from 0: start over rather than report a negative rate.
    assert counter_rate(measured, 20, 14.0) == CounterMark(20, 14.0)


# ------------------------------------------------------------------ events


def test_notice_file_appears_changes_and_returns(tmp_path: Path) -> None:
    path = tmp_path / "drain-notice"
    notice = NoticeFile(str(path), pb.DRAIN_NOTICE)
    assert notice.poll(1.0) is None  # absent: nothing
    path.write_text("terminate at 12:00Z\n")
    event = notice.poll(2.0)
    assert event is not None and event.kind == pb.DRAIN_NOTICE and event.detail == "terminate at 12:00Z"
    assert event.ts == 2.0
    assert notice.poll(3.0) is None  # seen
    path.write_text("terminate at 12:30Z\n")
    changed = notice.poll(4.0)
    assert changed is not None and changed.detail == "terminate at 12:30Z"
    path.unlink()
    assert notice.poll(5.0) is None
    path.write_text("terminate at 12:30Z\n")  # same text as before, but a new notice
    assert notice.poll(6.0) is not None
    path.write_bytes(b"x" * (MAX_DETAIL * 3))
    big = notice.poll(7.0)
    assert big is not None and len(big.detail) == MAX_DETAIL
    assert NoticeFile("", pb.PREEMPTION).poll(8.0) is None  # not configured


def test_counter_delta_and_edac(tmp_path: Path) -> None:
    oom = CounterDelta(pb.OOM_KILL, "processes killed")
    assert oom.update(5, 1.0) is None  # baseline
    assert oom.update(5, 2.0) is None
    event = oom.update(7, 3.0)
    assert event is not None and event.kind == pb.OOM_KILL and event.detail.startswith("2 processes killed")
    assert oom.update(None, 4.0) is None
    assert oom.update(1, 5.0) is None  # went back: a new baseline, not an event

    edac_root = tmp_path / "edac"
    assert read_edac(edac_root) is None
    for mc, (ce, ue) in {"mc0": (3, 0), "mc1": (1, 0)}.items():
        (edac_root / "mc" / mc).mkdir(parents=True)
        (edac_root / "mc" / mc / "ce_count").write_text(f"{ce}\n")
        (edac_root / "mc" / mc / "ue_count").write_text(f"{ue}\n")
    assert read_edac(edac_root) == (4, 0)
    errors = EdacErrors()
    assert errors.update(read_edac(edac_root), 1.0) == []
    (edac_root / "mc" / "mc1" / "ue_count").write_text("1\n")
    events = errors.update(read_edac(edac_root), 2.0)
    assert [(e.kind, e.detail.split(" (")[0]) for e in events] == [(pb.HW_ERROR, "1 uncorrected memory errors")]


# ------------------------------------------------------------------ the sampler on this host


async def test_sampler_on_this_host(tmp_path: Path) -> None:
    config = TelemetryConfig(
        drain_notice_file=str(tmp_path / "drain"),
        maintenance_file=str(tmp_path / "maintenance"),
        preemption_file=str(tmp_path / "preempt"),
    )
    edac = tmp_path / "edac"
    (edac / "mc" / "mc0").mkdir(parents=True)
    (edac / "mc" / "mc0" / "ce_count").write_text("0\n")
    (edac / "mc" / "mc0" / "ue_count").write_text("0\n")
    sampler = Sampler(
        config,
        reserved=lambda: pb.Capacity(cpu_millis=500, memory_bytes=1 << 30),
        paths=HostPaths(edac=edac),
    )
    first = await sampler.sample()
    assert first.cpus == len(os.sched_getaffinity(0))
    assert not first.HasField("cpu_util")  # no previous reading yet
    assert first.memory_total_bytes == os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 0 < first.memory_available_bytes <= first.memory_total_bytes
    assert first.HasField("load1") and first.reserved.memory_bytes == 1 << 30
    assert list(first.events) == []
    await asyncio.sleep(0.3)
    (tmp_path / "maintenance").write_text("window 2030-01-01T02:00Z")
    (tmp_path / "preempt").write_text("spot termination in 120s")
    (edac / "mc" / "mc0" / "ce_count").write_text("2\n")
    second = await sampler.sample()
    assert 0 <= second.cpu_util <= 1
    for name in ("disk_read_bps", "disk_write_bps", "net_rx_bps", "net_tx_bps"):
        assert second.HasField(name) and getattr(second, name) >= 0, name
    if (PROC / "pressure" / "io").exists():
        assert second.pressure.HasField("io_some") and second.pressure.HasField("memory_full")
    kinds = sorted(pb.HostEventKind.Name(e.kind) for e in second.events)
    assert kinds == ["HW_ERROR", "MAINTENANCE", "PREEMPTION"]
    assert {e.detail for e in second.events if e.kind == pb.PREEMPTION} == {"spot termination in 120s"}
    third = await sampler.sample()
    assert list(third.events) == []  # each notice is reported once


def test_detected_capacity(tmp_path: Path) -> None:
    detected = HostCapacity(CapacityConfig(disk_path=str(tmp_path / "missing")), str(tmp_path))
    assert detected.cpu_millis == len(os.sched_getaffinity(0)) * 1000
    assert detected.memory_bytes == os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    st = os.statvfs(tmp_path)
    assert detected.disk_path == tmp_path
    assert detected.disk_bytes() == pytest.approx(st.f_bavail * st.f_frsize, rel=0.05)
    fixed = HostCapacity(CapacityConfig(cpu_millis=1500, memory_bytes=1 << 30, disk_bytes=5 << 30), str(tmp_path))
    assert fixed.current() == pb.Capacity(cpu_millis=1500, memory_bytes=1 << 30, disk_bytes=5 << 30)


# ------------------------------------------------------------------ Prometheus export


async def test_sample_exported_as_metrics(tmp_path: Path) -> None:
    metrics = AgentMetrics()
    (tmp_path / "drain").write_text("drain soon")
    sampler = Sampler(TelemetryConfig(drain_notice_file=str(tmp_path / "drain")))
    metrics.observe_sample(await sampler.sample())  # carries the drain notice
    await asyncio.sleep(0.2)
    sample = await sampler.sample()
    sample.containers.add(id="web", memory_bytes=12345, cpu_millis=250.0)
    sample.events.add(kind=pb.OOM_KILL, ts=1.0, detail="1 killed")
    sample.reserved.memory_bytes = 1 << 20
    metrics.observe_sample(sample)
    values = scrape(metrics)
    assert values[("ferryman_host_memory_total_bytes", ())] == sample.memory_total_bytes
    assert values[("ferryman_host_cpu_utilisation", ())] == pytest.approx(sample.cpu_util)
    assert values[("ferryman_container_memory_bytes", (("container", "web"),))] == 12345
    assert values[("ferryman_container_cpu_millicores", (("container", "web"),))] == 250
    assert values[("ferryman_host_events_total", (("kind", "oom_kill"),))] == 1
    assert values[("ferryman_host_events_total", (("kind", "drain_notice"),))] == 1
    assert values[("ferryman_reserved", (("resource", "memory_bytes"),))] == 1 << 20
    assert values[("ferryman_host_load", (("window", "1"),))] == pytest.approx(sample.load1)
    assert values[("ferryman_host_disk_bytes_per_second", (("direction", "read"),))] == pytest.approx(
        sample.disk_read_bps
    )
    # The container left: its series goes; a field the sample lacks reads NaN, not a stale value.
    metrics.observe_sample(pb.TelemetrySample(ts=time.time(), cpus=1))
    values = scrape(metrics)
    assert ("ferryman_container_memory_bytes", (("container", "web"),)) not in values
    assert math.isnan(values[("ferryman_host_cpu_utilisation", ())])


def scrape(metrics: AgentMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The exposition text parsed back: (sample name, sorted labels) -> value."""
    out = {}
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


# ------------------------------------------------------------------ configuration


def test_telemetry_config_keys() -> None:
    config = parse_config(
        {
            "api": {"tls_listen": "[::1]:7444"},
            "coordinator": {"url": "https://coord.example:7543", "labels": {"zone": "a", "rack": "r7"}},
            "telemetry": {"period": 2, "buffer_max_samples": 10},
            "capacity": {"memory_bytes": 1 << 30},
        }
    )
    assert config.coordinator.labels == {"zone": "a", "rack": "r7"}
    assert config.coordinator.endpoints == ("https://coord.example:7543",)
    replicas = parse_config({"coordinator": {"urls": ["https://c1:7543", "https://c2:7543"]}}).coordinator
    assert replicas.endpoints == ("https://c1:7543", "https://c2:7543")
    assert parse_config({}).coordinator.endpoints == ()
    assert config.telemetry.period == 2.0 and config.capacity.memory_bytes == 1 << 30
    bad = {
        "coordinator.url": {"coordinator": {"url": "http://coord:7543"}},
        "expected https://host:port": {"coordinator": {"url": "https://coord"}},
        "table of strings": {"coordinator": {"labels": {"zone": 1}}},
        "coordinator.url and coordinator.urls exclude each other": {
            "coordinator": {"url": "https://a:1", "urls": ["https://b:1"]}
        },
        "coordinator.urls 'https://b'": {"coordinator": {"urls": ["https://a:1", "https://b"]}},
        "listed twice": {"coordinator": {"urls": ["https://a:1", "https://a:1/"]}},
        "expected an array of strings": {"coordinator": {"urls": "https://a:1"}},
        "telemetry.period must be greater than 0": {"telemetry": {"period": 0}},
        "capacity.cpu_millis must not be negative": {"capacity": {"cpu_millis": -1}},
        "api.tls_listen": {"api": {"tls_listen": "7444"}},
        "unknown keys": {"telemetry": {"perid": 5}},
    }
    for message, data in bad.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            parse_config(data)


async def test_samples_carry_the_measured_layer_costs() -> None:
    """What fetching and applying layers cost here goes to the coordinator's placement, and only
    once measured (a figure under a MiB of evidence is left out: the coordinator's default holds)."""
    meter = CostMeter()
    sampler = Sampler(TelemetryConfig(), layer_costs=meter.measured)
    assert not (await sampler.sample()).HasField("layer_costs")
    meter.fetched("registry/r1:5000", 4 << 20, 0.5)
    meter.fetched("registry/r2:5000", 4 << 20, 1.5)
    meter.fetched("peer", 100, 0.001)  # too little to say anything
    meter.applied(8 << 20, 0.08)
    costs = (await sampler.sample()).layer_costs
    assert costs.registry_bytes_per_second == pytest.approx((8 << 20) / 2.0)
    assert costs.peer_bytes_per_second == 0.0
    assert costs.apply_seconds_per_byte == pytest.approx(0.08 / (8 << 20))


def test_concurrent_fetches_share_their_link_in_the_measured_rate() -> None:
    """Two 4 MiB fetches from one registry over the same 2 s (each took 2 s): 4 MiB/s, not 2."""
    meter = CostMeter()
    meter.fetched("registry/r:5000", 4 << 20, 2.0, ended=12.0)
    meter.fetched("registry/r:5000", 4 << 20, 2.0, ended=12.0)
    assert meter.measured()["registry_bytes_per_second"] == pytest.approx((8 << 20) / 2.0)
    meter.fetched("registry/r:5000", 2 << 20, 1.0, ended=20.0)  # later, alone: the first two aged 8 s
    keep = 0.5 ** (8.0 / RECENT_HALF_LIFE)
    assert meter.measured()["registry_bytes_per_second"] == pytest.approx(
        ((8 << 20) * keep + (2 << 20)) / (2 * keep + 1)
    )


def test_measured_rates_follow_the_recent_load() -> None:
    """Fetches and applies measured minutes ago under another load hardly count once new ones arrive:
    the rates placement predicts with are today's, not the run's average."""
    meter = CostMeter()
    meter.fetched("peer", 64 << 20, 1.0, ended=100.0)  # 64 MiB/s on an idle machine
    meter.fetched("peer", 8 << 20, 1.0, ended=700.0)  # 10 minutes later, busy: 8 MiB/s
    assert meter.measured()["peer_bytes_per_second"] == pytest.approx(8 << 20, rel=0.01)
    meter.fetched("registry/a:5000", 10 << 20, 1.0, ended=100.0)
    meter.fetched("registry/b:5000", 1 << 20, 1.0, ended=700.0)  # each registry aged to the newest
    assert meter.measured()["registry_bytes_per_second"] == pytest.approx(1 << 20, rel=0.01)
    # Fetches close together count alike.
    meter.fetched("peer", 8 << 20, 2.0, ended=703.0)
    assert meter.measured()["peer_bytes_per_second"] == pytest.approx((16 << 20) / 3.0, rel=0.05)


def test_machine_checks_from_proc_interrupts() -> None:
    text = (
        "           CPU0       CPU1\n"
        "  0:         22          0   IO-APIC    2-edge      timer\n"
        "MCE:          3          1   Machine check exceptions\n"
        "MCP:        412        412   Machine check polls\n"
    )
    assert procfs.parse_interrupt_total(text, "MCE") == 4
    assert procfs.parse_interrupt_total(text, "MCP") == 824
    assert procfs.parse_interrupt_total("  0:  1  IO-APIC timer\n", "MCE") is None  # not x86
    on_this_host = read_host(HostPaths(), [])
    assert on_this_host.machine_checks == procfs.parse_interrupt_total((PROC / "interrupts").read_text(), "MCE")
