"""The coordinator: its store, services and background loops, wired from one config."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from coordinator.agents import AgentClient, AgentClientLike
from coordinator.alerts import Alerter
from coordinator.auth import TokenHashes
from coordinator.catalog.service import CatalogService
from coordinator.chains.prediction import UsageModel
from coordinator.chains.service import ChainService
from coordinator.config import CoordinatorConfig
from coordinator.costs import CostBook
from coordinator.deployments.behaviour import TRAFFIC_PERIOD, ComponentSeries
from coordinator.deployments.replicas import ReplicaService
from coordinator.deployments.service import DeploymentService, held_addresses
from coordinator.layers import LayerService
from coordinator.leadership import Role, Term, takes_pushes
from coordinator.metrics import CoordinatorMetrics
from coordinator.orchestrator import Orchestrator
from coordinator.placement import Placer
from coordinator.policy import DrainPolicy
from coordinator.predictions import PredictionService, RiskModel, activate_at_start
from coordinator.predictor import ModelLoadError, ModelRegistry
from coordinator.registry import HostRegistry
from coordinator.reservations import ReservationService
from coordinator.retraining import Retrainer
from coordinator.scaling.autoscaler import Autoscaler
from coordinator.scaling.correlation import CorrelationConfig
from coordinator.scaling.model import ScalingModel
from coordinator.scaling.policy import ScalingConfig
from coordinator.scaling.retraining import ScalingRetrainer
from coordinator.scaling.retraining import active_model as active_model_for_scaling
from coordinator.scaling.service import ScalingService
from coordinator.sqlite_store import SqliteStore
from coordinator.starts import ContainerStarts
from coordinator.store import Store
from coordinator.warm import WarmService
from coordinator.warm_predictor import LayerPredictor
from coordinator.warm_retraining import WarmRetrainer, active_model
from coordinator.waste_control import ControlLimits
from core.errors import ConfigError, FerrymanError
from core.security.reload import TlsContexts
from core.security.tls import check_files

if TYPE_CHECKING:
    from coordinator.etcd.election import Election

log = logging.getLogger(__name__)


async def open_store(config: CoordinatorConfig) -> Store:
    """The backend `[store] backend` names: the SQLite file, or a client of the etcd cluster.

    The etcd modules are imported only for the etcd backend: their client's generated protobuf
    files must not load into a process that has no use for them (a name like "rpc.proto" is taken
    by more than one package, and the default descriptor pool holds one of each)."""
    if config.store.backend == "etcd":
        from coordinator.etcd.kv import EtcdKV, EtcdTls
        from coordinator.etcd.store import EtcdStore

        s = config.store
        tls = EtcdTls(s.etcd_ca_file, s.etcd_cert_file, s.etcd_key_file, s.etcd_server_name) if s.etcd_ca_file else None
        return EtcdStore(EtcdKV(s.etcd_endpoints, tls=tls, timeout=s.etcd_timeout), s.etcd_prefix)
    return await SqliteStore.open(config.database)


def _usage_model(path: str) -> UsageModel | None:
    """The chain usage model named by `[chains] usage_model` (ConfigError for a bad one), or None."""
    if not path:
        return None
    try:
        return UsageModel(path)
    except ModelLoadError as exc:
        raise ConfigError(f"chains.usage_model {path}: {exc}") from exc


@runtime_checkable
class ReloadsTls(Protocol):
    """A store whose client has TLS files of its own (etcd's), read again on SIGHUP."""

    def reload_tls(self) -> bool: ...


class Coordinator:
    def __init__(
        self,
        config: CoordinatorConfig,
        store: Store,
        agents: AgentClientLike,
        tokens: TokenHashes,
        model: RiskModel | ModelRegistry | None,
        clock: Callable[[], float],
        warm_model: LayerPredictor | None = None,
        tls_contexts: TlsContexts | None = None,
    ) -> None:
        """`model`: the registry of loaded models, or a fixed model (tests), or None (no predictions).
        `warm_model`: the layer predictor (None: the start history is kept, nothing predicted)."""
        self.config = config
        self.tls_contexts = tls_contexts if tls_contexts is not None else TlsContexts()
        """Every TLS context of this coordinator, reloaded in place on SIGHUP (coordinator.daemon)."""
        self.store = store
        self.agents = agents
        self.tokens = tokens
        self.clock = clock
        self.metrics = CoordinatorMetrics()
        registry = model if isinstance(model, ModelRegistry) else ModelRegistry()
        pinned = None if isinstance(model, ModelRegistry) else model
        self.predictions = PredictionService(store, config, clock, self.metrics, registry, pinned)
        self.layers = LayerService(store, config.tracker.fetching_ttl, clock, self.metrics)
        self.costs = CostBook()
        self.warm = WarmService(store, warm_model, clock, self.metrics)
        self.warm_retrainer = WarmRetrainer(store, self.warm, config, clock)

        self.behaviour = ComponentSeries()

        def observe(host: str, samples: Sequence[tuple[float, Mapping[str, Any]]]) -> None:
            self.predictions.observe(host, samples)
            self.costs.observe(host, samples)
            self.behaviour.observe(host, samples)

        self.hosts = HostRegistry(
            store, config, clock, self.metrics, observer=observe, on_register=self.layers.registered
        )
        self.reservations = ReservationService(store, agents, config, clock, self.metrics)
        self.placer = Placer(
            store,
            self.reservations,
            config.placement,
            self.predictions.threshold,
            clock,
            holders=self._holders,
            costs=self.costs.of,
            held=self.layers.tracker.held_by,
        )
        self.starts = ContainerStarts(
            store,
            self.placer,
            self.reservations,
            agents,
            config.agents.create_timeout,
            self.costs,
            on_started=lambda host, digests: self.layers.tracker.announced(host, clock(), holding=digests),
            history=(config.warm.history_per_host, config.warm.history_max_age),
            clock=clock,
            on_recorded=self.warm.started,
            warming=self.warm.warming,
        )
        self.migrations = Orchestrator(store, self.placer, self.reservations, agents, config, clock, self.metrics)
        self.policy = DrainPolicy(store, self.hosts, self.predictions, self.migrations, config, clock, self.metrics)
        self.retrainer = Retrainer(store, self.predictions, config, clock)
        self.catalog = CatalogService(store, clock)
        self.alerter = Alerter(config.alerts, self.metrics)
        addressing = asyncio.Lock()  # deployments and chains take service addresses from one pool
        self.chains = ChainService(
            store,
            store,
            self.catalog,
            self.placer,
            self.reservations,
            agents,
            self.alerter,
            config.deployments,
            config.agents.create_timeout,
            clock,
            self.metrics,
            addresses_taken=lambda: held_addresses(store),
            admit=addressing,
            usage_model=_usage_model(config.chains.usage_model),
            predict_period=config.chains.predict_period,
            migrations=self.migrations,
        )
        self.deployments = DeploymentService(
            store,
            store,
            self.catalog,
            self.placer,
            self.reservations,
            agents,
            self.alerter,
            config.deployments,
            config.agents.create_timeout,
            clock,
            self.metrics,
            addresses_taken=self.chains.addresses,
            admit=addressing,
        )
        self.replicas = ReplicaService(
            store,
            self.deployments,
            self.placer,
            self.reservations,
            agents,
            config.deployments,
            config.agents.create_timeout,
            clock,
            self.behaviour,
        )
        correlation = CorrelationConfig(max_lag_s=config.scaling.max_lag)
        self.scaling = ScalingService(
            self.deployments, self.behaviour, correlation, self._autoscaler(config, correlation, clock)
        )
        self.scaling_retrainer = (
            ScalingRetrainer(store, self.deployments, self.behaviour, self.scaling.autoscaler, config, clock)
            if self.scaling.autoscaler is not None
            else None
        )
        self._stop = asyncio.Event()
        self._loops: list[asyncio.Task[None]] = []
        self.election: Election | None = None
        """Set on the etcd backend: only the elected replica runs the leader's loops."""
        if config.store.backend == "etcd":
            from coordinator.etcd.election import Election
            from coordinator.etcd.store import EtcdStore

            assert isinstance(store, EtcdStore)
            host, port = config.listen_address
            url = config.store.advertise_url or f"https://{f'[{host}]' if ':' in host else host}:{port}"
            # A client of its own: the election runs on its own thread (run_in_thread).
            self.election = Election(
                store.kv.copy(),
                store,
                url,
                ttl=config.store.leader_ttl,
                on_change=self._role_changed,
                reads_replicas=config.telemetry.leader_takes_pushes != "always",
            )
            # Agents may push to any replica: each shares its part of the drain-risk histories.
            store.share_histories(url, self.predictions.share)
            self.predictions.read_shares_from(store)
            self.policy.list_for_tick = store.followed_hosts
        self._leader_loops: list[asyncio.Task[None]] = []
        self._role_tasks: set[asyncio.Task[None]] = set()
        self._role_lock = asyncio.Lock()

    def _autoscaler(
        self, config: CoordinatorConfig, correlation: CorrelationConfig, clock: Callable[[], float]
    ) -> Autoscaler | None:
        """The leader's scaling decisions when `[scaling] enabled` (ConfigError for a bad model)."""
        s = config.scaling
        if not s.enabled:
            return None
        path = active_model_for_scaling(config)
        try:
            model = ScalingModel.load(path)
        except ModelLoadError as exc:
            raise ConfigError(f"scaling.model {path}: {exc}") from exc
        policy = ScalingConfig(
            min_replicas=s.min_replicas,
            max_replicas=s.max_replicas,
            # what one replica serves within the SLO: its CPU limit at the target utilization
            replica_capacity=config.deployments.cpu_millis / 1000.0 * s.utilization,
            replica_cost=s.replica_cost,
            violation_cost=s.violation_cost,
            max_standbys=s.standbys,
            standby_cost=s.standby_cost,
            lone_replica_risk=s.lone_replica_risk,
            lone_replica_share=s.lone_replica_share,
        )
        return Autoscaler(
            self.deployments,
            self.behaviour,
            self.replicas,
            model,
            policy,
            correlation,
            s.cold_start,
            clock,
            utilization=s.utilization,
            store=self.store,
            period_s=s.period,
            lead_keep_s=s.lead_keep,
        )

    @classmethod
    async def open(
        cls,
        config: CoordinatorConfig,
        *,
        agents: AgentClientLike | None = None,
        model: RiskModel | None = None,
        clock: Callable[[], float] = time.time,
    ) -> Coordinator:
        """Check the TLS files and tokens, load the model, open the store (ConfigError on any problem)."""
        check_files(config.tls)  # the server certificate must be from the fleet CA and valid now
        tokens = TokenHashes.load(config.auth.token_hashes_file)
        models: RiskModel | ModelRegistry | None = model
        if model is None:
            models = ModelRegistry()
            if config.model.path:
                await asyncio.to_thread(activate_at_start, models, config.model.path)
        warm_model = await asyncio.to_thread(WarmService.load_model, active_model(config))
        store = await open_store(config)
        try:
            contexts = TlsContexts()
            client = agents if agents is not None else AgentClient.from_config(config, contexts)
            coordinator = cls(config, store, client, tokens, models, clock, warm_model, tls_contexts=contexts)
            replayed = await coordinator.predictions.rebuild()
            await coordinator.layers.seed()
            await coordinator.warm.seed()
        except BaseException:
            await store.close()
            raise
        log.info("telemetry histories rebuilt", extra={"samples": replayed})
        return coordinator

    async def start(self) -> None:
        """Start the background loops. With one store of its own (SQLite) this coordinator leads at
        once; on etcd it campaigns, and leads (resumes migrations, takes over deployments left in flight,
        runs the ticks, liveness checks, sweeps and retraining) only while elected."""
        self._loops.append(asyncio.create_task(self.hosts.run_flusher(self._stop), name="telemetry-flusher"))
        if self.election is None:
            await self._start_leading()
        else:
            self._loops.append(asyncio.create_task(self.election.run_in_thread(self._stop), name="election"))

    def acting(self) -> bool:
        """This replica may decide and write as the leader now."""
        return self.election is None or self.election.acting()

    def takes_pushes(self) -> bool:
        """This replica serves agents' telemetry now (coordinator.leadership.takes_pushes)."""
        election = self.election
        if election is None:
            return True
        return takes_pushes(self.config.telemetry.leader_takes_pushes, election.role, len(election.others_live))

    @property
    def role(self) -> str:
        return "single" if self.election is None else self.election.role.value

    def _role_changed(self, role: Role, term: Term | None) -> None:
        task = asyncio.get_running_loop().create_task(self._become(role), name=f"become-{role.value}")
        self._role_tasks.add(task)
        task.add_done_callback(self._role_tasks.discard)

    async def _become(self, role: Role) -> None:
        async with self._role_lock:  # one change at a time, in the order they happened
            if role is Role.LEADER:
                await self._start_leading()
            else:
                await self._stop_leading()

    async def _start_leading(self) -> None:
        await self._stop_leading()  # a previous term's loops, if any, end first
        await self.predictions.lead()
        try:
            if await self.predictions.sync():  # the model the previous leader activated, if another
                model = self.predictions.model
                log.info("drain model loaded from the store", extra={"model_version": model and model.version})
        except FerrymanError as exc:  # scoring goes on with the model loaded here
            log.error("cannot read the active drain model from the store", extra={"error": exc.message})
        resumed = await self.migrations.resume()
        if resumed:
            log.info("resumed migrations", extra={"count": resumed})
        taken = await self.deployments.recover()
        if taken:
            log.info("took over deployments", extra={"count": taken})
        self.replicas.follow_all(await self.deployments.all())
        chains = await self.chains.recover()
        if chains:
            log.info("resumed chains", extra={"count": chains})
        self._leader_loops = [
            asyncio.create_task(self._while_leading(self.hosts.run_liveness), name="liveness"),
            asyncio.create_task(self._while_leading(self.reservations.run_sweeper), name="reservation-sweeper"),
            asyncio.create_task(self._every(self.config.model.tick_period, self._tick), name="policy"),
            asyncio.create_task(self._every(TRAFFIC_PERIOD, self.replicas.sample_traffic), name="traffic"),
            asyncio.create_task(self._every(TRAFFIC_PERIOD, self.replicas.sample_requests), name="requests"),
        ]
        if self.election is not None:  # etcd: the host keys followed as they change (EtcdStore.follow_hosts)
            self._leader_loops.append(
                asyncio.create_task(self._while_leading(self.election.store.follow_hosts), name="hosts-watch")
            )
            # The followers' history shares come with those keys, one flush period apart: decoded as
            # they come, not all in the tick.
            self._leader_loops.append(
                asyncio.create_task(
                    self._every(self.config.telemetry.flush_period, self.predictions.take_shares), name="shares"
                )
            )
        if self.config.warm.period and self.warm.predictor is not None:
            self._leader_loops.append(
                asyncio.create_task(self._every(self.config.warm.period, self.warm_round), name="warm")
            )
        if self.config.warm.retrain_interval and self.warm.predictor is not None:
            self._leader_loops.append(
                asyncio.create_task(
                    self._every(self.config.warm.retrain_interval, self.warm_retrainer.run_once, first_after=True),
                    name="warm-retrain",
                )
            )
        if self.scaling.autoscaler is not None:
            self._leader_loops.append(
                asyncio.create_task(
                    self._every(self.config.scaling.period, self.scaling.autoscaler.round), name="scaling"
                )
            )
        if self.scaling_retrainer is not None and self.config.scaling.retrain_interval:
            self._leader_loops.append(
                asyncio.create_task(
                    self._every(
                        self.config.scaling.retrain_interval, self.scaling_retrainer.run_once, first_after=True
                    ),
                    name="scaling-retrain",
                )
            )
        if self.config.model.retrain_interval:
            self._leader_loops.append(
                asyncio.create_task(
                    self._every(self.config.model.retrain_interval, self.retrainer.run_once, first_after=True),
                    name="retrain",
                )
            )

    def _holders(self, digest: str) -> dict[str, bool]:
        """Hosts that hold or fetch `digest` (the layer tracker), and those it was warmed on since
        their last registration."""
        now = self.clock()
        out = {h: True for h in self.warm.warmed_on(digest, now)}
        out.update({h.host: h.complete for h in self.layers.tracker.holders(digest, now)})
        return out

    async def warm_round(self) -> dict[str, list[str]]:
        """One round of warming; hosts with a migration in flight (either end) get nothing."""
        busy: set[str] = set()
        for m in await self.store.list_migrations(active_only=True):
            busy.update(h for h in (m.source, m.target) if h)
        limits = ControlLimits(max_waste=self.config.warm.max_waste, setpoint=0.8 * self.config.warm.max_waste)
        return await self.warm.round(self.agents, self.config.warm, limits, busy)

    async def _stop_leading(self) -> None:
        """Stop the leader's loops and stop following migrations and running deployments (the next
        leader resumes them)."""
        loops, self._leader_loops = self._leader_loops, []
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        await self.predictions.stop_writing()
        await self.migrations.close()
        await self.chains.close()
        await self.deployments.stop_following()
        await self.replicas.stop_following()
        if self.election is not None and self.election.role is Role.FOLLOWER:
            # The ended term's fence kept what was still running from writing; with all of it
            # stopped, this replica writes as a follower again (agents' pushes, reservations).
            self.election.store.fence(None)

    async def _tick(self) -> None:
        with self.metrics.tick_seconds.time():
            await self.policy.tick()

    async def _while_leading(self, loop: Callable[[asyncio.Event], Awaitable[None]]) -> None:
        """Run a loop that takes a stop event until the coordinator stops (the loop is cancelled when
        this replica stops leading)."""
        await loop(self._stop)

    async def _every(self, period: float, step: Callable[[], Awaitable[object]], *, first_after: bool = False) -> None:
        if first_after:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), period)
        while not self._stop.is_set():
            # Past the leader's deadline: skip this round. Not return: a renewal that lands late
            # keeps the lead without a change of role, and nothing would start the loop again (a
            # lost lead cancels it).
            if self.acting():
                try:
                    await step()
                except Exception:
                    log.exception("periodic step failed", extra={"step": getattr(step, "__qualname__", str(step))})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), period)

    def reload_tls(self) -> bool:
        """SIGHUP (`systemctl reload`): every TLS context's files, and the store client's (etcd), read
        again without a restart; each refusal is logged and keeps that part's current files."""
        reloaded = self.tls_contexts.reload_logged()
        if isinstance(self.store, ReloadsTls):
            reloaded = self.store.reload_tls() and reloaded
        if self.election is not None:
            self.election.reload_tls()  # its own client, same files (a refusal was logged just above)
        return reloaded

    async def close(self) -> None:
        self._stop.set()
        try:
            await asyncio.gather(*self._loops, return_exceptions=True)
            await asyncio.gather(*self._role_tasks, return_exceptions=True)
            await self.predictions.flush()  # the last tick's writes that follow its decisions
            await self._stop_leading()
            await self.replicas.close()
            await self.deployments.close()
            await self.alerter.close()
            await self.agents.close()
        finally:
            await self.store.close()
