"""The daemon's start-up and shutdown, config loading (agent/config.py), and sd_notify.

The agent used by the run/shutdown tests is an in-test fake; the real Agent (containerd + registry)
is exercised by the lead's end-to-end tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent import daemon
from agent.config import AgentConfig, ApiConfig, load_config, parse_config
from agent.metrics import AgentMetrics
from agent.migration.failpoints import Failpoints, FailpointsRefused
from core import sdnotify
from core.errors import ConfigError
from core.security.reload import TlsContexts

REPO = Path(__file__).resolve().parent.parent


def _run_daemon(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.daemon", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def _one_json_line(stderr: str) -> dict[str, Any]:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    record = json.loads(lines[0])
    assert record["level"] == "ERROR"
    return dict(record)


# ------------------------------------------------------------------ daemon exits on bad config


def test_missing_explicit_config_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    proc = _run_daemon("--config", str(missing))
    assert proc.returncode == 2
    record = _one_json_line(proc.stderr)
    assert record["msg"] == f"configuration error: config file not found: {missing}"
    assert record["code"] == "config_invalid"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("this is not toml", "is not valid TOML"),
        ("[api]\nlisten = 'unix:///tmp/x.sock'\nport = 80\n", "api: unknown keys ['port']"),
        ("colour = 'blue'\n", "unknown keys ['colour']"),
        ("[pull]\nretries = 'three'\n", "pull.retries: expected"),
        ("version = 2\n", "config version 2 is not supported"),
        ("[api]\nlisten = 'http://0.0.0.0:80'\n", "expected unix:///path or tcp://host:port"),
        ("log_level = 'LOUD'\n", "unknown log level 'LOUD'"),
    ],
)
def test_bad_config_file_exits_2(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    proc = _run_daemon("--config", str(path))
    assert proc.returncode == 2, proc.stderr
    record = _one_json_line(proc.stderr)
    assert record["msg"].startswith("configuration error: ")
    assert needle in record["msg"]


def test_bad_log_level_flag_exits_2() -> None:
    proc = _run_daemon("--log-level", "chatty")
    assert proc.returncode == 2
    assert "unknown log level" in _one_json_line(proc.stderr)["error"]


def test_missing_default_config_means_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(daemon, "DEFAULT_CONFIG", str(tmp_path / "absent.toml"))
    assert daemon.resolve_config(None) == AgentConfig()
    with pytest.raises(ConfigError, match="not found"):
        daemon.resolve_config(str(tmp_path / "absent.toml"))


# ------------------------------------------------------------------ load_config (agent/config.py)


def _load(tmp_path: Path, text: str) -> AgentConfig:
    path = tmp_path / "agent.toml"
    path.write_text(textwrap.dedent(text))
    return load_config(path)


def test_load_full_config(tmp_path: Path) -> None:
    cfg = _load(
        tmp_path,
        """
        version = 1
        host_name = "node-7"
        log_level = "DEBUG"
        [containerd]
        socket = "/run/containerd/containerd.sock"
        connect_timeout = 3
        [api]
        listen = "tcp://127.0.0.1:7070"
        [pull]
        max_concurrent_layers = 8
        [[registries]]
        host = "registry.local:5000"
        plain_http = true
        """,
    )
    assert cfg.host_name == "node-7"
    assert cfg.containerd.connect_timeout == 3.0 and isinstance(cfg.containerd.connect_timeout, float)
    assert cfg.api == ApiConfig(listen="tcp://127.0.0.1:7070")
    assert cfg.registry("registry.local:5000").plain_http is True
    assert cfg.registry("other.example").plain_http is False


def test_empty_file_is_defaults(tmp_path: Path) -> None:
    assert _load(tmp_path, "") == AgentConfig()
    assert load_config(None) == AgentConfig()


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("nmae = 'x'\n", "unknown keys ['nmae']"),
        ("[containerd]\nsockett = '/x'\n", "containerd: unknown keys ['sockett']"),
        ("[[registries]]\nhost = 'r'\nuser = 'me'\n", "registries[0]: unknown keys ['user']"),
        ("[runtime]\nstop_timeout = 1\n[runtime.extra]\na = 1\n", "unknown keys ['extra']"),
    ],
)
def test_unknown_keys_rejected(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text)
    assert needle in info.value.message
    assert info.value.code == "config_invalid"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("host_name = 5\n", "host_name"),
        ("[api]\nlisten = 7070\n", "api.listen"),
        ("[pull]\nretries = '3'\n", "pull.retries"),
        ("[pull]\nretries = true\n", "pull.retries"),
        ("[pull]\nretries = 2.5\n", "pull.retries"),
        ("[pull]\nread_timeout = 'slow'\n", "pull.read_timeout"),
        ("[pull]\nread_timeout = false\n", "pull.read_timeout"),
        ("[[registries]]\nhost = 'r'\nplain_http = 'yes'\n", "registries[0].plain_http"),
        ("[[registries]]\nplain_http = true\n", "registries[0]"),  # host is required
        ("registries = 'r'\n", "registries"),
        ("registries = ['r']\n", "registries[0]"),
        ("api = 'tcp://x:1'\n", "api"),
        ("[containerd]\nsocket = ['a']\n", "containerd.socket"),
        ("version = '1'\n", "version"),
    ],
)
def test_wrong_types_rejected(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text)
    assert needle in info.value.message


@pytest.mark.parametrize(
    "data",
    [
        {"pull": {"max_concurrent_layers": 0}},
        {"pull": {"chunk_size": 0}},
        {"pull": {"retries": -1}},
        {"containerd": {"connect_timeout": -5.0}},
        {"cache": {"max_bytes": -1}},
        {"cache": {"max_fraction": 0}},
        {"cache": {"max_fraction": 1.5}},
        {"cache": {"low_watermark": 0}},
        {"cache": {"interval": 0}},
    ],
)
def test_nonsense_numbers_rejected(data: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        parse_config(data)


def test_log_level_validated_by_config() -> None:
    with pytest.raises(ConfigError):
        parse_config({"log_level": "LOUD"})


# ------------------------------------------------------------------ sd_notify


def test_sdnotify_path_socket(short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = short_dir / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert sdnotify.notify("READY=1") is True
        assert sock.recv(4096) == b"READY=1"
        assert sdnotify.notify("STATUS=serving\nMAINPID=1") is True
        assert sock.recv(4096) == b"STATUS=serving\nMAINPID=1"


def test_sdnotify_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"ferryman-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("READY=1") is True
        assert sock.recv(4096) == b"READY=1"


def test_sdnotify_without_manager(short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(short_dir / "gone.sock"))
    assert sdnotify.notify("READY=1") is False  # nobody listening: reported, not raised
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert sdnotify.notify("READY=1") is False


@pytest.mark.parametrize(
    ("environ", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),  # half the limit
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "4242"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # inherited from another process
        ({}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
    ],
)
def test_watchdog_interval(environ: dict[str, str], interval: float | None) -> None:
    assert sdnotify.watchdog_interval(environ, 4242) == interval


# ------------------------------------------------------------------ run(): ready, serve, graceful stop


class FakeAgent:
    """Stands in for agent.app.Agent: services are never called by these tests except list()."""

    def __init__(self) -> None:
        self.metrics = AgentMetrics()
        self.images = self
        self.containers = self
        self.tls_contexts = TlsContexts()
        self.closed = False

    async def list(self) -> list[Any]:
        return []

    async def close(self) -> None:
        self.closed = True


async def test_run_ready_serve_stop(short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    notify_path = short_dir / "notify.sock"
    api_path = short_dir / "api" / "agent.sock"
    fake = FakeAgent()

    async def open_agent(config: AgentConfig) -> FakeAgent:
        return fake

    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify_sock:
        notify_sock.bind(str(notify_path))
        notify_sock.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", str(notify_path))
        stop = asyncio.Event()
        config = AgentConfig(api=ApiConfig(listen=f"unix://{api_path}"))
        task = asyncio.create_task(daemon.run(config, open_agent=open_agent, stop=stop))

        assert await asyncio.wait_for(loop.sock_recv(notify_sock, 4096), 10) == b"READY=1"
        async with (
            aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(api_path))) as s,
            s.get("http://agent/healthz") as resp,
        ):
            assert resp.status == 200

        stop.set()
        assert await asyncio.wait_for(loop.sock_recv(notify_sock, 4096), 10) == b"STOPPING=1"
        assert await asyncio.wait_for(task, 10) == 0
    assert fake.closed
    assert not api_path.exists()


async def test_run_pings_the_watchdog_from_the_loop(short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With WatchdogSec= (WATCHDOG_USEC) the daemon sends WATCHDOG=1 after READY=1, every half
    period, while its loop turns; none once it is stopping."""
    notify_path = short_dir / "notify.sock"
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify_sock:
        notify_sock.bind(str(notify_path))
        notify_sock.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", str(notify_path))
        monkeypatch.setenv("WATCHDOG_USEC", "200000")
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
        stop = asyncio.Event()
        config = AgentConfig(api=ApiConfig(listen=f"unix://{short_dir / 'agent.sock'}"))

        async def open_agent(config: AgentConfig) -> FakeAgent:
            return FakeAgent()

        task = asyncio.create_task(daemon.run(config, open_agent=open_agent, stop=stop))
        assert await asyncio.wait_for(loop.sock_recv(notify_sock, 4096), 10) == b"READY=1"
        t0 = loop.time()
        for _ in range(4):
            assert await asyncio.wait_for(loop.sock_recv(notify_sock, 4096), 10) == b"WATCHDOG=1"
        assert loop.time() - t0 >= 0.25  # paced at 0.1 s, not a burst
        stop.set()
        received = [await asyncio.wait_for(loop.sock_recv(notify_sock, 4096), 10)]
        while received[-1] != b"STOPPING=1":
            received.append(await asyncio.wait_for(loop.sock_recv(notify_sock, 4096), 10))
        assert await asyncio.wait_for(task, 10) == 0
        await asyncio.sleep(0.3)
        with pytest.raises(BlockingIOError):
            notify_sock.recv(4096)  # no ping after STOPPING=1


_SIGTERM_SCRIPT = """
import sys
from agent import daemon
from agent.metrics import AgentMetrics
from core.security.reload import TlsContexts

class FakeAgent:
    def __init__(self):
        self.metrics = AgentMetrics()
        self.images = self.containers = self
        self.tls_contexts = TlsContexts()
    async def list(self):
        return []
    async def close(self):
        print("agent closed", flush=True)

async def open_agent(config):
    return FakeAgent()

daemon._open_real_agent = open_agent  # the real one needs containerd
sys.exit(daemon.main(sys.argv[1:]))
"""


def test_daemon_sigterm_graceful_exit_0(short_dir: Path) -> None:
    notify_path = short_dir / "notify.sock"
    config = short_dir / "agent.toml"
    config.write_text(f'[api]\nlisten = "unix://{short_dir}/agent.sock"\n')
    script = short_dir / "fake_daemon.py"
    script.write_text(_SIGTERM_SCRIPT)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify_sock:
        notify_sock.bind(str(notify_path))
        notify_sock.settimeout(20)
        proc = subprocess.Popen(
            [sys.executable, str(script), "--config", str(config), "--log-level", "debug"],
            cwd=REPO,
            env={**os.environ, "NOTIFY_SOCKET": str(notify_path), "PYTHONPATH": str(REPO)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert notify_sock.recv(4096) == b"READY=1"
            assert (short_dir / "agent.sock").exists()
            proc.send_signal(signal.SIGTERM)
            assert notify_sock.recv(4096) == b"STOPPING=1"
            out, err = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, err
    assert out.strip() == "agent closed"
    records = [json.loads(line) for line in err.splitlines() if line.strip()]
    messages = [r["msg"] for r in records]
    assert "agent ready" in messages and "shutting down" in messages and messages[-1] == "agent stopped"
    assert not (short_dir / "agent.sock").exists()


def test_failpoints_outside_the_test_harness_refuse_to_start(short_dir: Path) -> None:
    """FERRYMAN_FAILPOINTS alone (a stray variable in a production unit) is a configuration error."""
    config = short_dir / "agent.toml"
    config.write_text(f'[api]\nlisten = "unix://{short_dir}/agent.sock"\n')
    script = short_dir / "fake_daemon.py"
    script.write_text(_SIGTERM_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "FERRYMAN_TEST_HARNESS"}
    proc = subprocess.run(
        [sys.executable, str(script), "--config", str(config)],
        cwd=REPO,
        env={**env, "PYTHONPATH": str(REPO), "FERRYMAN_FAILPOINTS": "stream.corrupt_frame=40"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == daemon.EXIT_CONFIG, proc.stderr
    assert "fault injection is test-only" in proc.stderr
    assert not (short_dir / "agent.sock").exists()


def test_failpoints_arm_only_with_the_harness_switch() -> None:
    spec = {"FERRYMAN_FAILPOINTS": "target.restore=exit,source.stopcopy"}
    with pytest.raises(FailpointsRefused):
        Failpoints.from_env(spec)
    armed = Failpoints.from_env({**spec, "FERRYMAN_TEST_HARNESS": "1"})
    assert armed.action("target.restore") == "exit" and armed.action("source.stopcopy") == "error"
    assert Failpoints.from_env({}).action("target.restore") is None
