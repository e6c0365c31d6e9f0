"""What this agent tells the coordinator about itself when it registers."""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
from collections.abc import Awaitable, Callable, Sequence

from agent.checkpoint.features import detect as detect_criu
from agent.config import AgentConfig
from agent.telemetry.capacity import HostCapacity
from core.errors import FerrymanError
from proto.ferryman.v1 import fleet_pb2 as pb

log = logging.getLogger(__name__)


def agent_version() -> str:
    try:
        return importlib.metadata.version("ferryman")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class Registrar:
    """Builds the Registration message; CRIU's features are detected once, on first use."""

    def __init__(
        self,
        config: AgentConfig,
        host: str,
        capacity: HostCapacity,
        layers: Callable[[], Awaitable[Sequence[str]]] | None = None,
    ) -> None:
        self._config = config
        self._host = host
        self._capacity = capacity
        self._layers = layers
        self._criu: dict[str, str] | None = None

    async def registration(self) -> pb.Registration:
        if self._criu is None:
            self._criu = await _criu_features()
        api = self._config.api
        return pb.Registration(
            host=self._host,
            peer_address=api.peer_listen,
            blob_address=self._config.sharing.listen,
            api_url=f"https://{api.tls_listen}" if api.tls_listen else "",
            capacity=await asyncio.to_thread(self._capacity.current),
            labels=self._config.coordinator.labels,
            agent_version=agent_version(),
            telemetry_period_s=self._config.telemetry.period,
            criu_features=self._criu,
            layer_digests=list(await self._layers()) if self._layers is not None else [],
        )


async def _criu_features() -> dict[str, str]:
    try:
        features = await detect_criu()
    except FerrymanError as exc:
        # Without CRIU this host can still run containers; the coordinator will not migrate to it.
        log.warning("CRIU features unknown", extra={"error": exc.message})
        return {}
    return {
        "version": features.version,
        "mem_dirty_track": str(features.mem_dirty_track).lower(),
        "uffd": str(features.uffd).lower(),
    }
