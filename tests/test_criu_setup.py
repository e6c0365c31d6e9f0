"""What the agent prepares for CRIU at start: its kernel-feature cache and the network lock method."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from agent.checkpoint.criuconf import CriuConfigs
from agent.checkpoint.features import KDAT_CACHE, _is_tmpfs, network_lock_method, prime_kdat_cache


async def test_kdat_cache_is_primed_and_criu_loads_it(tmp_path: Path) -> None:
    written = await prime_kdat_cache()
    if _is_tmpfs(KDAT_CACHE.parent):
        assert written is False  # CRIU keeps its own cache on a tmpfs /run
    else:
        assert written is True
        assert KDAT_CACHE.stat().st_mode & 0o777 == 0o600
    log = tmp_path / "check.log"
    subprocess.run(["criu", "check", "-v4", "--log-file", str(log)], check=True, capture_output=True)
    assert f"Loaded kdat cache from {KDAT_CACHE}" in log.read_text()


async def test_network_lock_prefers_nftables(tmp_path: Path) -> None:
    supported = subprocess.run(["criu", "check", "--feature", "network_lock_nftables"], capture_output=True)
    method = await network_lock_method()
    assert method == ("nftables" if supported.returncode == 0 else "iptables")
    configs = CriuConfigs(str(tmp_path), method)
    text = configs.write("c1", "lazy-pages\n").read_text()
    assert f"network-lock {method}\n" in text and "tcp-established\n" in text and text.endswith("lazy-pages\n")
    empty = tmp_path / "criu" / "masked"
    assert "ext-mount-map /proc/acpi:fm-masked-proc-acpi\n" in text  # the dump's name for the mount
    assert f"ext-mount-map fm-masked-proc-acpi:{empty}\n" in text  # what the restore binds there
    assert empty.is_dir() and not any(empty.iterdir()) and empty.stat().st_mode & 0o777 == 0o555
    assert await network_lock_method("/nonexistent/criu") == "iptables"
    with pytest.raises(ValueError, match="network lock"):
        CriuConfigs(str(tmp_path), "ebtables")
