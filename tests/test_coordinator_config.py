"""The coordinator's TOML config: defaults, strictness, the shipped example and the systemd unit."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from coordinator.auth import TokenHashes, hash_token
from coordinator.config import CoordinatorConfig, load_config, parse_config
from core.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "systemd" / "coordinator.toml.example"
UNIT = REPO / "systemd" / "ferryman-coordinator.service"


def test_the_example_lists_every_default() -> None:
    assert load_config(EXAMPLE) == CoordinatorConfig()
    # Every table and key of the config appears in the example (so it documents them all).
    data = tomllib.loads(EXAMPLE.read_text())
    defaults = CoordinatorConfig()
    for name in defaults.__dataclass_fields__:
        assert name in data, name
        value = getattr(defaults, name)
        if hasattr(value, "__dataclass_fields__"):
            assert set(data[name]) == set(value.__dataclass_fields__), name


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"listen": "nowhere"}, "listen 'nowhere': expected host:port"),
        ({"heartbeat": {"suspect_after": 10.0, "down_after": 5.0}}, "down_after must be greater"),
        ({"heartbeat": {"check_period": 0}}, "heartbeat.check_period must be greater than 0"),
        ({"telemetry": {"max_samples": 5}}, "unknown keys ['max_samples']"),
        ({"model": {"threshold": 1.5}}, "model.threshold must be in [0, 1)"),
        ({"placement": {"pressure": -1.0}}, "placement.pressure must not be negative"),
        ({"reservations": {"ttl": 7200.0}}, "ttl must not exceed"),
        ({"migrations": {"max_per_host": 9}}, "max_per_host must not exceed"),
        ({"migrations": {"max_attempts": "3"}}, "expected <class 'int'>, got str"),
        ({"log_level": "LOUD"}, "unknown log level"),
        ({"event_loop": "trio"}, "event_loop must be one of ['asyncio', 'uvloop'], got 'trio'"),
        ({"version": 2}, "config version 2 is not supported"),
        ({"tls": "yes"}, "expected a table"),
        ({"store": {"backend": "zookeeper"}}, "store.backend must be one of ['sqlite', 'etcd']"),
        ({"store": {"backend": "etcd"}}, 'store.backend = "etcd" needs store.etcd_endpoints'),
        ({"store": {"etcd_endpoints": ["10.0.0.1"]}}, "'10.0.0.1' is not host:port"),
        ({"store": {"etcd_endpoints": "10.0.0.1:2379"}}, "store.etcd_endpoints: expected an array of strings"),
        ({"store": {"etcd_prefix": "ferryman"}}, "store.etcd_prefix must start and end with '/'"),
        ({"store": {"etcd_timeout": 0}}, "store.etcd_timeout must be greater than 0"),
        ({"store": {"etcd_cert_file": "c.pem"}}, "etcd_cert_file and store.etcd_key_file go together"),
        ({"store": {"etcd_cert_file": "c.pem", "etcd_key_file": "k.pem"}}, "need store.etcd_ca_file"),
        ({"store": {"leader_ttl": 1}}, "store.leader_ttl must be at least 2 seconds"),
        ({"store": {"advertise_url": "10.0.0.5:7543"}}, "store.advertise_url must be an https:// URL"),
        ({"scaling": {"period": 0}}, "scaling.period must be greater than 0"),
        ({"scaling": {"cold_start": -1.0}}, "scaling.cold_start must be greater than 0"),
        ({"scaling": {"replica_cost": 30.0}}, "scaling.violation_cost (20.0) must exceed scaling.replica_cost"),
        ({"scaling": {"min_replicas": 9}}, "scaling.min_replicas must be in [1, scaling.max_replicas = 8], got 9"),
        ({"scaling": {"max_replicas": 17}}, "scaling.max_replicas (17) must not exceed deployments.max_replicas"),
        ({"scaling": {"lone_replica_risk": 1.5}}, "scaling.lone_replica_risk must be in [0, 1], got 1.5"),
        ({"scaling": {"lone_replica_share": -0.1}}, "scaling.lone_replica_share must be >= 0, got -0.1"),
        ({"scaling": {"enabled": True}}, "scaling.enabled needs scaling.model"),
        ({"scaling": {"enabled": "yes"}}, "expected <class 'bool'>, got str"),
    ],
)
def test_bad_values_are_refused_with_the_key_named(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert message in err.value.message


def test_listen_address_parses_ipv6() -> None:
    assert parse_config({"listen": "[::1]:9000"}).listen_address == ("::1", 9000)


def test_token_hashes_file_holds_hashes_only(tmp_path: Path) -> None:
    good = tmp_path / "tokens"
    good.write_text(f"# ops tokens\n{hash_token('s3cret')} alice\nsha256:{hash_token('other')}\n\n")
    tokens = TokenHashes.load(str(good))
    assert tokens.match("s3cret") == "alice"
    assert tokens.match("other") == f"token-{hash_token('other')[:8]}"
    assert tokens.match("s3cret ") is None and tokens.match("") is None
    plain = tmp_path / "plain"
    plain.write_text("s3cret\n")
    with pytest.raises(ConfigError, match="expected a SHA-256 hex digest"):
        TokenHashes.load(str(plain))
    with pytest.raises(ConfigError, match="cannot read"):
        TokenHashes.load(str(tmp_path / "missing"))


def test_the_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, "systemd-analyze missing: apt-get install systemd"
    root = tmp_path / "root"
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "usr/lib/systemd").mkdir(parents=True)
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    shutil.copy(UNIT, root / "etc/systemd/system/")
    # The unit's programs, as stubs: its ExecStart and ExecReload's kill.
    for binary in (root / "opt/ferryman/venv/bin/ferryman-coordinator", root / "bin/kill"):
        binary.parent.mkdir(parents=True)
        binary.write_text("#!/bin/sh\nexit 0\n")
        binary.chmod(0o755)
    res = subprocess.run(
        [analyze, "verify", f"--root={root}", "/etc/systemd/system/ferryman-coordinator.service"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0 and not res.stdout.strip() and not res.stderr.strip(), res.stderr


def test_the_daemon_runs_numpy_on_one_blas_thread_and_collects_young_objects_seldom(tmp_path: Path) -> None:
    # Whatever the environment asks for (4 here), the daemon's drain features run on one thread, and
    # the garbage collector runs after 50 000 allocations, not 700; both set before the config is
    # read, so even a refused config shows them.
    script = (
        "from threadpoolctl import threadpool_info\n"
        "from coordinator import daemon\n"
        f"code = daemon.main(['--config', {str(tmp_path / 'absent.toml')!r}])\n"
        "import gc\n"
        "blas = sorted({i['num_threads'] for i in threadpool_info() if i['user_api'] == 'blas'})\n"
        "print(code, blas, gc.get_threshold()[0])\n"
    )
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "4", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "2 [1] 50000", done.stderr
