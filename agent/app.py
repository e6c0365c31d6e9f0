"""The agent's object graph: adapters and services built once from the config."""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path
from types import TracebackType

from agent.cache.service import CacheService
from agent.checkpoint.criuconf import CriuConfigs
from agent.checkpoint.features import KDAT_CACHE, network_lock_method, prime_kdat_cache
from agent.composition.service import CompositionService
from agent.config import AgentConfig
from agent.containerd import Containerd
from agent.health.metrics import HealthMetrics
from agent.health.monitor import HealthMonitor
from agent.images.directory import PeerDirectory, StaticPeers, TrackedPeers
from agent.images.peersource import PeerSharing
from agent.images.service import ImageService
from agent.images.shared import SharedBlobs
from agent.metrics import AgentMetrics
from agent.migration.failpoints import Failpoints
from agent.migration.service import MigrationService
from agent.migration.sessions import KIND as MIGRATION_SESSIONS
from agent.migration.sessions import MigrationSessions
from agent.network import ServiceNetwork
from agent.peers import PeerEndpoint
from agent.registry.client import RegistryClient
from agent.reservations import Amount, Reservations
from agent.runtime.service import ContainerService
from agent.runtime.supervisor import RestartSupervisor
from agent.runtime.volumes import VolumeDirs
from agent.sharing.client import Peer, PeerBlobClient
from agent.sharing.server import BlobServer
from agent.telemetry.capacity import HostCapacity
from agent.telemetry.containers import ContainerUsageReader
from agent.telemetry.push import TelemetryPusher
from agent.telemetry.registration import Registrar
from agent.telemetry.sampler import Sampler
from agent.telemetry.service import TelemetryService
from agent.telemetry.tracker import TrackerClient
from core.security.reload import TlsContexts

log = logging.getLogger(__name__)


class Agent:
    def __init__(
        self, config: AgentConfig, cd: Containerd, registry: RegistryClient, criu_configs: CriuConfigs | None = None
    ) -> None:
        self.config = config
        self.metrics = AgentMetrics()
        self.metrics.migration_downtime_target.set(config.migration.downtime_target_ms / 1000)
        self.containerd = cd
        self.registry = registry
        self.tls_contexts = TlsContexts()
        """Every TLS context of this agent, reloaded in place on SIGHUP (agent.daemon)."""
        host = config.host_name or socket.gethostname()
        failpoints = Failpoints.from_env()  # fault tests only: empty unless FERRYMAN_FAILPOINTS is set
        # Blob sharing: this host's blobs to its peers, and pulls from theirs before the registry.
        self.blob_client = PeerBlobClient(config.sharing, config.tls, self.tls_contexts)
        self.blob_server = BlobServer(
            SharedBlobs(cd, config.containerd.content_root, config.sharing.partial_wait),
            config.sharing,
            config.tls,
            failpoints,
            self.metrics.peer_bytes.labels("out").inc,
            self.tls_contexts,
        )

        def static_peers() -> list[Peer]:
            return [Peer(p.name, p.blobs) for p in config.peers if p.blobs]

        self.tracker: TrackerClient | None = None
        directory: PeerDirectory = StaticPeers(static_peers)
        if config.coordinator.endpoints:  # the coordinator's layer tracker names holders; [[peers]] still count
            self.tracker = TrackerClient(
                host, config.coordinator, self.tls_contexts.client(config.tls), config.sharing.probe_timeout
            )
            directory = TrackedPeers(self.tracker, static_peers, self.metrics)
        sharing = PeerSharing(
            self.blob_client,
            directory,
            config.sharing,
            host,
            config.pull.max_manifest_bytes,
        )
        self.images = ImageService(cd, registry, config.pull, self.metrics, sharing=sharing)
        # Capacity, container usage and reservations come first: the container service admits against them.
        self.capacity = HostCapacity(config.capacity, config.state_dir)
        network = ServiceNetwork(config.network, cd.namespace)
        self.container_usage = ContainerUsageReader(
            lambda: self.containers.list(), config.runtime.cgroup_parent, cd.namespace, packets_in=network.packets_in
        )
        self.reservations = Reservations(host, config.state_dir, self._capacity_now, self.container_usage.read)
        self.containers = ContainerService(
            cd,
            config.containerd,
            config.runtime,
            self.images.platform,
            network=network,
            criu_configs=criu_configs or CriuConfigs(config.state_dir),
            admission=self.reservations,
            volumes=VolumeDirs(Path(config.state_dir, "volumes")),
            checkpoints=Path(config.state_dir, "standby"),
        )
        self.cache = CacheService(
            cd,
            config.cache,
            config.capacity.disk_path,
            self.metrics.cache,
            self.images.platform,
            self._busy_images,
            self.images.pull,
        )
        self.cache.on_peers = sharing.held_elsewhere  # what peers hold goes first (docs/cache.md)
        self.images.uses = self.containers.uses = self.cache
        # Composition manifests assembled into images through the pull's blob path (docs/composition.md).
        self.assembly = CompositionService(
            cd,
            registry,
            self.images.puller,
            config.pull,
            self.images.platform,
            Path(config.state_dir),
            lambda: not directory.empty,
            config.containerd.socket,
        )
        self.assembly.uses = self.cache
        self.assembly.on_warmed = self.metrics.cache.warmed
        self.assembly.on_kept = self.metrics.cache.kept
        self.assembly.on_local = self.metrics.cache.found_local
        self.host_name = config.host_name or socket.gethostname()
        self.peers = PeerEndpoint(
            config, self.host_name, failpoints, totals=self.metrics.streams, contexts=self.tls_contexts
        )
        migration_sessions = MigrationSessions(self.peers, config)
        self.migrations = MigrationService(
            config,
            cd,
            self.images,
            self.containers,
            self.metrics,
            migration_sessions,
            self.host_name,
            failpoints,
            admission=self.reservations,
        )
        # Restarts exited containers by their policy, leaving alone those a migration holds.
        self.restarts = RestartSupervisor(cd.events, self.containers, self.migrations.migrating, config.restart)
        # Runs containers' health checks while they run, skipping those a migration holds.
        self.health = HealthMonitor(
            cd,
            Path(config.state_dir, "health"),
            HealthMetrics(self.metrics.registry),
            # Held by a migration or frozen as a standby: not probed (it could not answer).
            lambda cid: self.migrations.migrating(cid) or self.containers.frozen(cid),
        )
        self.containers.health = self.health
        # The peer port's session kinds: migrations today.
        self.peers.router.add(
            MIGRATION_SESSIONS,
            migration_sessions.handler(self.migrations.handle_session),
            MigrationSessions.check_id,
            speaks=MigrationSessions.speaks,
        )
        self.telemetry = TelemetryService(
            Sampler(
                config.telemetry,
                self.container_usage.read,
                lambda: self.reservations.reserved().to_pb(),
                layer_costs=self.assembly.costs.measured,
            ),
            self.metrics,
            config.telemetry.period,
            self._pusher(host),
        )
        self.cache.layers_changed = self.telemetry.layers_changed

    def _busy_images(self) -> dict[str, str]:
        """Images the cache must keep though no container holds them yet: pulls, imports, container
        creations and migrations in progress."""
        busy = dict.fromkeys(self.images.pulling(), "being pulled or imported")
        busy.update(dict.fromkeys(self.containers.creating(), "a container is being created from it"))
        busy.update(dict.fromkeys(self.assembly.assembling(), "being assembled from its composition"))
        for record in self.migrations.list():
            if not record.done and record.image:
                busy[record.image] = f"migration {record.id} in progress"
        return busy

    def _pusher(self, host: str) -> TelemetryPusher | None:
        """None without a coordinator: telemetry then only feeds the metrics."""
        config = self.config
        if not config.coordinator.endpoints:
            return None
        registrar = Registrar(config, host, self.capacity, self.images.layer_digests)
        ctx = self.tls_contexts.client(config.tls)
        return TelemetryPusher(host, config.coordinator, config.telemetry, ctx, registrar.registration, self.metrics)

    async def _capacity_now(self) -> Amount:
        return Amount.of(await asyncio.to_thread(self.capacity.current))

    @classmethod
    async def open(cls, config: AgentConfig) -> Agent:
        cd = await Containerd.connect(
            config.containerd.socket,
            config.containerd.namespace,
            config.containerd.snapshotter,
            connect_timeout=config.containerd.connect_timeout,
        )
        # CRIU's kernel probe cached for this boot, and its cheaper network lock where it has one: both
        # come out of every freeze (see features.prime_kdat_cache, criuconf.CriuConfigs).
        primed, lock = await asyncio.gather(prime_kdat_cache(), network_lock_method())
        if primed:
            log.info("CRIU kernel-feature cache written", extra={"path": str(KDAT_CACHE)})
        criu_configs = CriuConfigs(config.state_dir, lock)
        agent = cls(config, cd, RegistryClient(config), criu_configs)
        try:
            await agent.migrations.recover()  # finish or roll back what a previous run left in flight
            agent.restarts.start()  # after recovery: a source it resumed runs, a copy it removed is gone
            agent.health.start()
            await agent.peers.serve()
            await agent.blob_server.start()
            await agent.reservations.open()
            await agent.telemetry.start()
            await agent.cache.start()
        except BaseException:
            await agent.close()
            raise
        return agent

    async def close(self) -> None:
        await self.restarts.close()  # first: no restart may start while the rest shuts down
        await self.health.close()
        await self.cache.close()
        await self.telemetry.close()
        await self.reservations.close()
        await self.peers.close()
        await self.blob_server.close()
        await self.blob_client.close()
        if self.tracker is not None:
            await self.tracker.close()
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
