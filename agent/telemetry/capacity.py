"""What this host offers: [capacity] from the config, or detected when a value is 0."""

from __future__ import annotations

import os
from pathlib import Path

from agent.config import CapacityConfig
from agent.telemetry import procfs
from agent.telemetry.host import online_cpus
from core.errors import ConfigError
from proto.ferryman.v1 import fleet_pb2 as pb


class HostCapacity:
    """CPU and memory are fixed at start; detected disk capacity is the free space now, so what
    containers and images already wrote is not offered again."""

    def __init__(self, config: CapacityConfig, state_dir: str, proc: Path = Path("/proc")) -> None:
        self._config = config
        self.cpu_millis = config.cpu_millis or online_cpus() * 1000
        if config.memory_bytes:
            self.memory_bytes = config.memory_bytes
        else:
            try:
                self.memory_bytes = procfs.parse_meminfo((proc / "meminfo").read_text())["MemTotal"]
            except OSError as exc:
                raise ConfigError(f"capacity.memory_bytes is 0 (detect), but /proc/meminfo: {exc}") from exc
        disk_path = Path(config.disk_path)
        self.disk_path = disk_path if disk_path.exists() else Path(state_dir)

    def disk_bytes(self) -> int:
        """Blocking (statvfs)."""
        if self._config.disk_bytes:
            return self._config.disk_bytes
        path = self.disk_path
        while not path.exists() and path != path.parent:  # state_dir may not be made yet
            path = path.parent
        st = os.statvfs(path)
        return st.f_bavail * st.f_frsize

    def current(self) -> pb.Capacity:
        """Blocking (statvfs): call from a thread."""
        return pb.Capacity(cpu_millis=self.cpu_millis, memory_bytes=self.memory_bytes, disk_bytes=self.disk_bytes())
