"""The coordinator's one typed configuration, loaded from TOML.

Same rules as the agent's (agent/config.py, whose generic table builder is reused): every key has a
default, unknown keys are errors, values that parse but make no sense are rejected before start.
"""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from core.config import build_table
from core.errors import ConfigError
from core.event_loop import EVENT_LOOPS
from core.logs import parse_level
from core.security.tls import parse_peer_listen

CONFIG_VERSION = 1


@dataclass(frozen=True)
class CoordinatorTlsConfig:
    """The coordinator's server identity: a host certificate (role agent) issued by the fleet CA."""

    ca_file: str = "/etc/ferryman/pki/ca.pem"
    cert_file: str = "/etc/ferryman/pki/host.pem"
    key_file: str = "/etc/ferryman/pki/host-key.pem"


@dataclass(frozen=True)
class OpsTlsConfig:
    """The ops (role ops) certificate the coordinator presents to agents' ops APIs."""

    cert_file: str = "/etc/ferryman/ops/client.pem"
    key_file: str = "/etc/ferryman/ops/client-key.pem"


@dataclass(frozen=True)
class AuthConfig:
    token_hashes_file: str = ""
    """A file of ops bearer-token SHA-256 hashes (hex, one per line, '#' comments); empty: no tokens."""


@dataclass(frozen=True)
class HeartbeatConfig:
    suspect_after: float = 20.0
    """Seconds without a telemetry push before a ready host is `suspect`."""
    down_after: float = 60.0
    """Seconds without a telemetry push before a host is `down`."""
    check_period: float = 2.0
    """Seconds between liveness checks."""


@dataclass(frozen=True)
class RegistrationConfig:
    max_in_flight: int = 64
    """Agents' registrations this replica handles at once (each a few guarded etcd round trips); the
    next ones wait their turn."""
    max_queued: int = 1000
    """Registrations that may wait for their turn; one more is answered 503 `registrations_busy`
    with `Retry-After`, and the agent comes back later. A fleet starting at once registers at the
    pace the store takes, and what cannot wait is told when to come back instead of piling up."""
    max_wait: float = 5.0
    """Seconds a registration waits for its turn before it is answered 503 as well: an agent whose
    request would time out meanwhile would register again, and the store do the work twice."""
    retry_after: int = 2
    """Seconds an agent waits at least before it tries a refused registration again (it adds up to
    as much again at random)."""


LEADER_TAKES_PUSHES = ("when_alone", "always")


@dataclass(frozen=True)
class TelemetryConfig:
    max_samples_per_host: int = 1440
    """Samples kept per host (2 h at 5 s)."""
    max_age: float = 7200.0
    """Seconds of history kept per host."""
    max_future_skew: float = 30.0
    """A sample stamped further than this in the future is refused (a broken clock)."""
    max_batch: int = 1000
    """Samples accepted in one push."""
    flush_period: float = 1.0
    """Seconds between writes of the telemetry summaries held back to a shared store (etcd: one
    transaction for up to 126 hosts' summaries instead of one per push). How stale the other
    replicas' view of a host's heartbeat and usage may be; below heartbeat.suspect_after / 2."""
    leader_takes_pushes: str = "always"
    """On etcd, whether the leading replica serves telemetry pushes and sessions: "when_alone" (only
    while no other replica is live: with followers it refuses them, 503 push_elsewhere, and its
    agents push to the next URL, so its core serves the tick; every agent must know push_elsewhere)
    or "always" (the default). SQLite: always."""


@dataclass(frozen=True)
class ModelConfig:
    path: str = ""
    """The drain model (.onnx); empty: no predictions, drains only by ops."""
    threshold: float = 0.0
    """P(drain) above which a host drains; 0 means the model's own threshold."""
    hysteresis: float = 0.1
    """A draining host returns to service only below threshold - hysteresis."""
    confirm_ticks: int = 2
    """Ticks in a row at or above the threshold before the model alone drains a host (a notice with a
    stated time drains at once)."""
    false_alarm_budget: int = 2
    """Model-only drains of one host that were cancelled (the host returned to service, by the policy's
    hysteresis or an operator's uncordon, before it was empty) allowed per `false_alarm_window`; once
    spent, the model alone no longer drains that host (notices still do)."""
    false_alarm_window: float = 7 * 86400.0
    """Seconds over which `false_alarm_budget` counts."""
    tick_period: float = 15.0
    """Seconds between scoring rounds."""
    prediction_deadband: float = 0.05
    """A host's stored prediction is rewritten when its P(drain) moved more than this since the value
    stored (or it crossed the threshold, or the model changed); readers see at most this far off."""
    prediction_refresh: float = 300.0
    """Seconds after which a host's stored prediction is rewritten even if nothing changed (its `ts`
    shows readers how recent the score is)."""
    retrain_interval: float = 0.0
    """Seconds between retraining rounds on recorded telemetry and drains; 0 never retrains."""
    retrain_holdout: float = 3600.0
    """The most recent seconds of telemetry kept out of training to compare candidate and active model."""
    retrain_unseen_every: int = 5
    """One host in this many (by a hash of its name) is kept out of retraining altogether: a candidate
    must also beat the active model on those hosts it never saw; 0 or 1 keeps none out."""
    retrain_timeout: float = 1800.0
    """Upper bound for one training run (a niced child process)."""
    retrain_dir: str = ""
    """Where candidate models are written; empty: a `models` directory next to the database."""


@dataclass(frozen=True)
class PlacementConfig:
    """Weights of the target score; each term is normalised to 0..1 first."""

    free_capacity: float = 1.0
    drain_risk: float = 2.0
    pull_bytes: float = 0.5
    pressure: float = 0.5
    registry_bytes_per_second: float = 50.0 * (1 << 20)
    """New containers (predicted time to running): a host's registry rate until it has measured one."""
    peer_bytes_per_second: float = 200.0 * (1 << 20)
    """... its rate from fleet peers, until measured."""
    apply_seconds_per_byte: float = 1.0 / (100 * (1 << 20))
    """... the seconds containerd takes to apply a layer byte there, until measured."""
    start_seconds: float = 0.15
    """... the time to create and start a container once its layers are in place (at no CPU
    pressure), until the host has started some."""
    affinity_slack: float = 0.1
    """New containers: hosts predicted within this fraction of the fastest count as equally fast, and
    among them the one holding the fewest layers the container does not use is chosen (it keeps
    hosts that hold other images' layers free for those images' containers). 0: the fastest only."""
    spill_slack: float = 0.25
    """New containers, when the fastest host has layers to fetch too: hosts that fetch at most this
    fraction of the container's bytes more than it count as near it as well (see affinity_slack)."""


@dataclass(frozen=True)
class ReservationConfig:
    ttl: float = 600.0
    """Seconds a placement reservation lives unless committed or released."""
    max_ttl: float = 3600.0
    sweep_period: float = 5.0
    """Seconds between expiry sweeps."""


@dataclass(frozen=True)
class MigrationLimits:
    max_per_host: int = 2
    """Concurrent migrations out of (or into) one host."""
    max_per_fleet: int = 8
    max_attempts: int = 3
    """Targets tried for one container before the migration is given up."""
    poll_period: float = 1.0
    """Seconds between status polls of a running migration on its source agent."""
    timeout: float = 1800.0
    """Upper bound for one migration attempt."""


@dataclass(frozen=True)
class TrackerConfig:
    fetching_ttl: float = 600.0
    """Seconds a host's "fetching this blob" announcement names it to peers, unless a registration
    confirms it holds the blob (a host that crashed mid-pull stops being named after that)."""


@dataclass(frozen=True)
class WarmConfig:
    """Predictive layer warming (prefetch): the start history it learns from and its model."""

    model: str = ""
    """The layer predictor (.onnx, models/prefetch/); empty: no predictions."""
    history_per_host: int = 2000
    """Task starts kept per host (signature, time, layers, hits and misses)."""
    history_max_age: float = 14 * 86400.0
    """Seconds of start history kept per host."""
    period: float = 0.0
    """Seconds between warming rounds (each host's predicted layers warmed on its agent); 0: never."""
    link_bytes_per_second: float = 12.5e6
    """A host's link to its layer sources; warms get a share of what running work leaves of it."""
    request_timeout: float = 120.0
    """Upper bound for one warm request to an agent."""
    max_waste: float = 0.25
    """Wasted bytes over warmed bytes the warming rounds hold under (coordinator/waste_control.py)."""
    keep_bytes: int = 0
    """Bytes of predicted layers a host holds already that the warming rounds keep under a lease (no
    fetch) so its cache bound leaves them, per host; about half the hosts' `[cache] max_bytes` (a
    lease the bound cannot evict). 0: no keeps."""
    retrain_interval: float = 0.0
    """Seconds between retraining rounds of the layer predictor on the recorded starts; 0: never."""
    retrain_holdout: float = 6 * 3600.0
    """The most recent seconds of starts kept out of training to judge the candidate against the active model."""
    retrain_min_starts: int = 200
    """Recorded starts a round needs before it trains anything."""
    retrain_timeout: float = 1800.0
    """Upper bound for one training run (a niced child process)."""


STORE_BACKENDS = ("sqlite", "etcd")


@dataclass(frozen=True)
class StoreConfig:
    """Where the coordinator keeps its state (docs/coordinator.md, "Running on etcd")."""

    backend: str = "sqlite"
    """"sqlite": the `database` file, for one coordinator. "etcd": the cluster at `etcd_endpoints`,
    shared by several coordinator replicas (telemetry samples stay in each replica's memory)."""
    etcd_endpoints: tuple[str, ...] = ()
    """host:port of the etcd members' client URLs; the coordinator moves on when one is unreachable."""
    etcd_prefix: str = "/ferryman/"
    """Every key the coordinator writes starts with this (several fleets can share one cluster)."""
    etcd_timeout: float = 5.0
    """Seconds for one etcd call before the next endpoint is tried."""
    etcd_ca_file: str = ""
    """The CA of the members' client certificates; empty: plain gRPC (loopback tests only)."""
    etcd_cert_file: str = ""
    """The coordinator's client certificate for etcd (with etcd_key_file); empty: none."""
    etcd_key_file: str = ""
    etcd_server_name: str = ""
    """The name in the members' certificates when the endpoints are addresses; empty: the endpoint's host."""
    leader_ttl: int = 5
    """Seconds of the leading replica's etcd lease: a replica that dies is replaced within about
    this plus a third of it; one cut off from etcd stops acting after 80 % of it."""
    advertise_url: str = ""
    """This replica's API URL as other replicas name it when it leads; empty: https://<listen>."""


@dataclass(frozen=True)
class AgentClientConfig:
    request_timeout: float = 30.0
    """Seconds for one call to an agent's ops API."""
    create_timeout: float = 600.0
    """Seconds for an agent to create and start a container the coordinator placed (it may pull or
    assemble its image first)."""


@dataclass(frozen=True)
class DeploymentsConfig:
    address_pool: str = ""
    """Service addresses for deployments' components: a CIDR block on the hosts' segment; empty: none."""
    health_timeout: float = 120.0
    """Seconds a component may take from its create to healthy before the deployment fails."""
    cpu_millis: int = 100
    """What each component reserves on its host until it is healthy, and its container's limits."""
    memory_bytes: int = 64 << 20
    restart_policy: str = "on-failure"
    """The agent's restart policy for every component: `on-failure` or `always` (docker's names)."""
    crash_loop_exits: int = 3
    """Exits of one component while it starts that fail the deployment as a crash loop."""
    drain_timeout: float = 60.0
    """Seconds a replica scaled in may keep its open connections before it is stopped anyway."""
    max_replicas: int = 16
    """The most replicas one component may be scaled to."""


@dataclass(frozen=True)
class PredictiveScalingConfig:
    """Predictive scaling of deployments' components (docs/scaling.md)."""

    enabled: bool = False
    """Whether the leader scales components itself; `explain` answers either way."""
    period: float = 15.0
    """Seconds between two scaling decisions per component."""
    model: str = ""
    """The scaling model (.onnx, models/scaling/); `enabled` needs it."""
    replica_cost: float = 1.0
    """Cost of one replica for one second."""
    violation_cost: float = 20.0
    """Cost of one second of SLO violation, in the unit of replica_cost (must exceed it)."""
    min_replicas: int = 1
    max_replicas: int = 8
    """Bounds of a component's replica count (max at most deployments.max_replicas)."""
    max_lag: int = 60
    """Longest lead, in seconds, the correlation engine looks for."""
    cold_start: float = 30.0
    """Seconds from a replica's start to serving, as the decisions assume it until one is measured."""
    utilization: float = 0.7
    """Share of a replica's CPU limit (deployments.cpu_millis) it uses within the SLO: what one
    replica serves, in (0, 1] (the HPA's usual 70 % target)."""
    standbys: int = 1
    """Warm standbys (created, started, frozen replicas) kept at most per component; 0: none."""
    standby_cost: float = 0.2
    """Cost of a standby for one second, as a fraction of replica_cost (memory, no CPU), in (0, 1]."""
    lone_replica_risk: float = 0.0
    """Share of its seconds one replica alone answers late on a busy machine, in [0, 1]; with a known
    lead, 2 replicas are kept when this x violation_cost exceeds replica_cost (0: never)."""
    lone_replica_share: float = 0.5
    """Share of one replica's capacity the need must exceed for lone_replica_risk to count, >= 0."""
    lead_keep: float = 120.0
    """Seconds a lead the correlation engine found on an edge is used while later rounds find none
    on it, >= 0 (0: each round uses only what it finds)."""
    retrain_interval: float = 0.0
    """Seconds between two retraining rounds of the scaling model on the recorded behaviour; 0: never."""
    retrain_holdout: float = 120.0
    """Seconds at the end of the recorded behaviour both models are judged on (not trained on)."""
    retrain_timeout: float = 600.0
    """Seconds one retraining child process may take."""


@dataclass(frozen=True)
class AlertsConfig:
    webhook_url: str = ""
    """An Alertmanager-compatible webhook (http or https) told about failed deployments; empty: none."""
    timeout: float = 5.0
    """Seconds for one webhook POST."""


@dataclass(frozen=True)
class ChainsConfig:
    """Chains' predicted pre-allocation (docs/chains.md, "Predicted pre-allocation")."""

    usage_model: str = ""
    """The chain usage model (.onnx, models/chains/); empty: the manifests' `predicted` only."""
    predict_period: float = 5.0
    """Seconds between two predictions of the next stage's usage while a stage serves."""


@dataclass(frozen=True)
class CoordinatorConfig:
    version: int = CONFIG_VERSION
    listen: str = "127.0.0.1:7543"
    """host:port of the mTLS API ([::1]:port for IPv6)."""
    database: str = "/var/lib/ferryman/coordinator.db"
    log_level: str = "INFO"
    event_loop: str = "asyncio"
    """The event loop: "asyncio" (the standard library's) or "uvloop" (libuv's, PyPI uvloop; the same
    CPU per telemetry push as asyncio where measured: docs/coordinator.md, "Sizing")."""
    tls: CoordinatorTlsConfig = field(default_factory=CoordinatorTlsConfig)
    ops_tls: OpsTlsConfig = field(default_factory=OpsTlsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    heartbeat: HeartbeatConfig = field(default_factory=HeartbeatConfig)
    registrations: RegistrationConfig = field(default_factory=RegistrationConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    reservations: ReservationConfig = field(default_factory=ReservationConfig)
    migrations: MigrationLimits = field(default_factory=MigrationLimits)
    agents: AgentClientConfig = field(default_factory=AgentClientConfig)
    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    warm: WarmConfig = field(default_factory=WarmConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    deployments: DeploymentsConfig = field(default_factory=DeploymentsConfig)
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    scaling: PredictiveScalingConfig = field(default_factory=PredictiveScalingConfig)
    chains: ChainsConfig = field(default_factory=ChainsConfig)

    @property
    def listen_address(self) -> tuple[str, int]:
        address = parse_peer_listen(self.listen)
        if address is None:
            raise ConfigError("listen must not be empty")
        return address


def _validate(config: CoordinatorConfig) -> None:
    positive: dict[str, float] = {
        "heartbeat.suspect_after": config.heartbeat.suspect_after,
        "heartbeat.down_after": config.heartbeat.down_after,
        "heartbeat.check_period": config.heartbeat.check_period,
        "registrations.max_in_flight": config.registrations.max_in_flight,
        "registrations.retry_after": config.registrations.retry_after,
        "registrations.max_wait": config.registrations.max_wait,
        "telemetry.max_samples_per_host": config.telemetry.max_samples_per_host,
        "telemetry.max_age": config.telemetry.max_age,
        "telemetry.max_future_skew": config.telemetry.max_future_skew,
        "telemetry.max_batch": config.telemetry.max_batch,
        "telemetry.flush_period": config.telemetry.flush_period,
        "model.tick_period": config.model.tick_period,
        "model.retrain_holdout": config.model.retrain_holdout,
        "model.retrain_timeout": config.model.retrain_timeout,
        "reservations.ttl": config.reservations.ttl,
        "reservations.max_ttl": config.reservations.max_ttl,
        "reservations.sweep_period": config.reservations.sweep_period,
        "migrations.max_per_host": config.migrations.max_per_host,
        "migrations.max_per_fleet": config.migrations.max_per_fleet,
        "migrations.max_attempts": config.migrations.max_attempts,
        "migrations.poll_period": config.migrations.poll_period,
        "migrations.timeout": config.migrations.timeout,
        "agents.request_timeout": config.agents.request_timeout,
        "agents.create_timeout": config.agents.create_timeout,
        "tracker.fetching_ttl": config.tracker.fetching_ttl,
        "warm.history_per_host": config.warm.history_per_host,
        "warm.history_max_age": config.warm.history_max_age,
        "warm.link_bytes_per_second": config.warm.link_bytes_per_second,
        "warm.request_timeout": config.warm.request_timeout,
        "warm.retrain_holdout": config.warm.retrain_holdout,
        "warm.retrain_timeout": config.warm.retrain_timeout,
        "deployments.health_timeout": config.deployments.health_timeout,
        "deployments.cpu_millis": config.deployments.cpu_millis,
        "deployments.memory_bytes": config.deployments.memory_bytes,
        "deployments.crash_loop_exits": config.deployments.crash_loop_exits,
        "deployments.drain_timeout": config.deployments.drain_timeout,
        "deployments.max_replicas": config.deployments.max_replicas,
        "alerts.timeout": config.alerts.timeout,
        "scaling.period": config.scaling.period,
        "chains.predict_period": config.chains.predict_period,
        "scaling.replica_cost": config.scaling.replica_cost,
        "scaling.max_replicas": config.scaling.max_replicas,
        "scaling.max_lag": config.scaling.max_lag,
        "scaling.cold_start": config.scaling.cold_start,
        "scaling.retrain_holdout": config.scaling.retrain_holdout,
        "scaling.retrain_timeout": config.scaling.retrain_timeout,
        "placement.registry_bytes_per_second": config.placement.registry_bytes_per_second,
        "placement.peer_bytes_per_second": config.placement.peer_bytes_per_second,
        "placement.apply_seconds_per_byte": config.placement.apply_seconds_per_byte,
    }
    for name, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{name} must be greater than 0, got {value}")
    if config.telemetry.flush_period > config.heartbeat.suspect_after / 2:
        raise ConfigError("telemetry.flush_period must be at most heartbeat.suspect_after / 2")
    if config.telemetry.leader_takes_pushes not in LEADER_TAKES_PUSHES:
        raise ConfigError(
            f"telemetry.leader_takes_pushes must be one of {list(LEADER_TAKES_PUSHES)},"
            f" got {config.telemetry.leader_takes_pushes!r}"
        )
    if config.heartbeat.down_after <= config.heartbeat.suspect_after:
        raise ConfigError("heartbeat.down_after must be greater than heartbeat.suspect_after")
    if config.reservations.ttl > config.reservations.max_ttl:
        raise ConfigError("reservations.ttl must not exceed reservations.max_ttl")
    if config.migrations.max_per_host > config.migrations.max_per_fleet:
        raise ConfigError("migrations.max_per_host must not exceed migrations.max_per_fleet")
    if not 0.0 <= config.model.threshold < 1.0:
        raise ConfigError(f"model.threshold must be in [0, 1), got {config.model.threshold}")
    if config.warm.period < 0:
        raise ConfigError(f"warm.period must not be negative, got {config.warm.period}")
    if not 0.0 < config.warm.max_waste < 1.0:
        raise ConfigError(f"warm.max_waste must be in (0, 1), got {config.warm.max_waste}")
    if config.scaling.retrain_interval < 0:
        raise ConfigError(f"scaling.retrain_interval must not be negative, got {config.scaling.retrain_interval}")
    if config.registrations.max_queued < 0:
        raise ConfigError(f"registrations.max_queued must not be negative, got {config.registrations.max_queued}")
    if config.warm.retrain_interval < 0:
        raise ConfigError(f"warm.retrain_interval must not be negative, got {config.warm.retrain_interval}")
    if config.model.retrain_interval < 0:
        raise ConfigError(f"model.retrain_interval must not be negative, got {config.model.retrain_interval}")
    if config.model.retrain_interval and config.model.retrain_holdout >= config.telemetry.max_age:
        raise ConfigError("model.retrain_holdout must be shorter than telemetry.max_age (nothing left to train on)")
    if not 0.0 <= config.model.hysteresis < 1.0:
        raise ConfigError(f"model.hysteresis must be in [0, 1), got {config.model.hysteresis}")
    if config.model.retrain_unseen_every < 0:
        raise ConfigError(f"model.retrain_unseen_every must not be negative, got {config.model.retrain_unseen_every}")
    if not 0.0 <= config.model.prediction_deadband < 1.0:
        raise ConfigError(f"model.prediction_deadband must be in [0, 1), got {config.model.prediction_deadband}")
    if config.model.prediction_refresh < 0:
        raise ConfigError(f"model.prediction_refresh must not be negative, got {config.model.prediction_refresh}")
    if config.model.confirm_ticks < 1:
        raise ConfigError(f"model.confirm_ticks must be at least 1, got {config.model.confirm_ticks}")
    if config.model.false_alarm_budget < 0 or config.model.false_alarm_window <= 0:
        raise ConfigError("model.false_alarm_budget must not be negative and model.false_alarm_window must be > 0")
    for name in (
        "free_capacity",
        "drain_risk",
        "pull_bytes",
        "pressure",
        "start_seconds",
        "affinity_slack",
        "spill_slack",
    ):
        if getattr(config.placement, name) < 0:
            raise ConfigError(f"placement.{name} must not be negative")
    if config.deployments.address_pool:
        try:
            ipaddress.ip_network(config.deployments.address_pool, strict=True)
        except ValueError as exc:
            raise ConfigError(f"deployments.address_pool: {exc}") from exc
    if config.deployments.restart_policy not in ("on-failure", "always"):
        raise ConfigError(
            f"deployments.restart_policy: expected on-failure or always, got {config.deployments.restart_policy!r}"
        )
    if config.alerts.webhook_url and urlsplit(config.alerts.webhook_url).scheme not in ("http", "https"):
        raise ConfigError(f"alerts.webhook_url: expected an http(s) URL, got {config.alerts.webhook_url!r}")
    _validate_scaling(config.scaling, config.deployments.max_replicas)
    if not config.database:
        raise ConfigError("database must name a file")
    _validate_store(config.store)
    try:
        parse_level(config.log_level)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if config.event_loop not in EVENT_LOOPS:
        raise ConfigError(f"event_loop must be one of {list(EVENT_LOOPS)}, got {config.event_loop!r}")
    try:
        config.listen_address  # noqa: B018 (parsing is the check)
    except ConfigError as exc:
        raise ConfigError(exc.message.replace("api.peer_listen", "listen")) from exc


def _validate_scaling(scaling: PredictiveScalingConfig, most: int) -> None:
    if scaling.violation_cost <= scaling.replica_cost:
        raise ConfigError(
            f"scaling.violation_cost ({scaling.violation_cost}) must exceed scaling.replica_cost "
            f"({scaling.replica_cost}): otherwise no replica is ever worth adding"
        )
    if not 1 <= scaling.min_replicas <= scaling.max_replicas:
        raise ConfigError(
            f"scaling.min_replicas must be in [1, scaling.max_replicas = {scaling.max_replicas}], "
            f"got {scaling.min_replicas}"
        )
    if scaling.max_replicas > most:
        raise ConfigError(
            f"scaling.max_replicas ({scaling.max_replicas}) must not exceed deployments.max_replicas ({most})"
        )
    if scaling.standbys < 0 or scaling.standbys > scaling.max_replicas:
        raise ConfigError(f"scaling.standbys must be in [0, scaling.max_replicas], got {scaling.standbys}")
    if not 0 < scaling.utilization <= 1:
        raise ConfigError(f"scaling.utilization must be in (0, 1], got {scaling.utilization}")
    if not 0 < scaling.standby_cost <= 1:
        raise ConfigError(f"scaling.standby_cost must be in (0, 1], got {scaling.standby_cost}")
    if not 0 <= scaling.lone_replica_risk <= 1:
        raise ConfigError(f"scaling.lone_replica_risk must be in [0, 1], got {scaling.lone_replica_risk}")
    if not scaling.lone_replica_share >= 0:
        raise ConfigError(f"scaling.lone_replica_share must be >= 0, got {scaling.lone_replica_share}")
    if not scaling.lead_keep >= 0:
        raise ConfigError(f"scaling.lead_keep must be >= 0, got {scaling.lead_keep}")
    if scaling.enabled and not scaling.model:
        raise ConfigError("scaling.enabled needs scaling.model (the .onnx file models/scaling/ trains)")


def _validate_store(store: StoreConfig) -> None:
    if store.backend not in STORE_BACKENDS:
        raise ConfigError(f"store.backend must be one of {list(STORE_BACKENDS)}, got {store.backend!r}")
    if store.etcd_timeout <= 0:
        raise ConfigError(f"store.etcd_timeout must be greater than 0, got {store.etcd_timeout}")
    if not store.etcd_prefix.startswith("/") or not store.etcd_prefix.endswith("/"):
        raise ConfigError(f"store.etcd_prefix must start and end with '/', got {store.etcd_prefix!r}")
    if bool(store.etcd_cert_file) != bool(store.etcd_key_file):
        raise ConfigError("store.etcd_cert_file and store.etcd_key_file go together")
    if (store.etcd_cert_file or store.etcd_server_name) and not store.etcd_ca_file:
        raise ConfigError("store.etcd_cert_file and store.etcd_server_name need store.etcd_ca_file (TLS)")
    for endpoint in store.etcd_endpoints:
        host, sep, port = endpoint.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"store.etcd_endpoints: {endpoint!r} is not host:port")
    if store.leader_ttl < 2:
        raise ConfigError(f"store.leader_ttl must be at least 2 seconds, got {store.leader_ttl}")
    if store.advertise_url and not store.advertise_url.startswith("https://"):
        raise ConfigError(f"store.advertise_url must be an https:// URL, got {store.advertise_url!r}")
    if store.backend == "etcd" and not store.etcd_endpoints:
        raise ConfigError('store.backend = "etcd" needs store.etcd_endpoints')


def parse_config(data: dict[str, Any]) -> CoordinatorConfig:
    version = data.get("version", CONFIG_VERSION)
    if version != CONFIG_VERSION:
        raise ConfigError(f"config version {version} is not supported (expected {CONFIG_VERSION})")
    config = build_table(CoordinatorConfig, data, "")
    _validate(config)
    return config


def load_config(path: str | Path) -> CoordinatorConfig:
    try:
        with Path(path).open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    return parse_config(data)
