"""The agent's object graph: adapters and services built once from the config."""

from __future__ import annotations

import socket
from types import TracebackType

from agent.checkpoint.criuconf import ensure_criu_config
from agent.config import AgentConfig
from agent.containerd import Containerd
from agent.images.service import ImageService
from agent.metrics import AgentMetrics
from agent.migration.failpoints import Failpoints
from agent.migration.peer import PeerEndpoint
from agent.migration.service import MigrationService
from agent.network import ServiceNetwork
from agent.registry.client import RegistryClient
from agent.runtime.service import ContainerService


class Agent:
    def __init__(self, config: AgentConfig, cd: Containerd, registry: RegistryClient) -> None:
        self.config = config
        self.metrics = AgentMetrics()
        self.containerd = cd
        self.registry = registry
        self.images = ImageService(cd, registry, config.pull, self.metrics)
        self.containers = ContainerService(
            cd,
            config.containerd,
            config.runtime,
            self.images.platform,
            network=ServiceNetwork(config.network, cd.namespace),
            criu_config=ensure_criu_config(config.state_dir),
        )
        self.host_name = config.host_name or socket.gethostname()
        failpoints = Failpoints.from_env()  # fault tests only: empty unless FERRYMAN_FAILPOINTS is set
        self.peers = PeerEndpoint(config, self.host_name, failpoints)
        self.migrations = MigrationService(
            config, cd, self.images, self.containers, self.metrics, self.peers, self.host_name, failpoints
        )

    @classmethod
    async def open(cls, config: AgentConfig) -> Agent:
        cd = await Containerd.connect(
            config.containerd.socket,
            config.containerd.namespace,
            config.containerd.snapshotter,
            connect_timeout=config.containerd.connect_timeout,
        )
        agent = cls(config, cd, RegistryClient(config))
        try:
            await agent.migrations.recover()  # finish or roll back what a previous run left in flight
            await agent.peers.serve(agent.migrations.handle_session)
        except BaseException:
            await agent.close()
            raise
        return agent

    async def close(self) -> None:
        await self.peers.close()
        await self.migrations.close()
        await self.containers.network.close()
        await self.registry.close()
        await self.containerd.close()

    async def __aenter__(self) -> Agent:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
