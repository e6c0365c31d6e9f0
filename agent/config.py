"""The agent's one typed configuration, loaded from TOML.

Every field has a default, so an empty file is a valid config. Unknown keys are errors: a typo in
a fleet-wide config should fail loudly at start, not be silently ignored.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from core.config import MIGRATION_MODES, build_table
from core.errors import ConfigError
from core.replicas import parse_urls
from core.security.tls import parse_peer_listen

CONFIG_VERSION = 1


@dataclass(frozen=True)
class ContainerdConfig:
    socket: str = "/run/containerd/containerd.sock"
    """The containerd gRPC socket."""
    namespace: str = "ferryman"
    """The containerd namespace the agent owns."""
    snapshotter: str = "overlayfs"
    runtime: str = "io.containerd.runc.v2"
    runc_root: str = ""
    """runc's state dir for our tasks; empty means the shim default (/run/containerd/runc)."""
    connect_timeout: float = 10.0
    """Seconds to wait for the socket at start."""
    content_root: str = "/var/lib/containerd/io.containerd.content.v1.content"
    """containerd's content store directory: blobs are served to peers from its files (faster than
    the Read RPC), blobs still being pulled from its ingests (the API reads committed blobs only)."""


@dataclass(frozen=True)
class RegistryConfig:
    host: str
    """host[:port] as it appears in image references."""
    plain_http: bool = False
    """Use http:// (only for loopback or test registries)."""
    ca_file: str | None = None
    """PEM bundle to trust for this registry's TLS certificate."""
    username: str | None = None
    password: str | None = None
    password_file: str | None = None
    """Read the password from this file instead (keeps secrets out of the config)."""

    def secret(self) -> str | None:
        if self.password_file:
            try:
                return Path(self.password_file).read_text().strip()
            except OSError as exc:
                raise ConfigError(f"cannot read password_file for {self.host}: {exc}") from exc
        return self.password


@dataclass(frozen=True)
class PullConfig:
    max_concurrent_layers: int = 2
    """Layers downloaded at once per pull. Few: earlier layers finish first and unpack while later
    ones download, instead of all finishing together."""
    platform: str = ""
    """os/arch[/variant]; empty means this host's platform."""
    chunk_size: int = 1 << 20
    """Bytes per Content.Write message."""
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    """Seconds without data before a blob download is considered stalled."""
    retries: int = 3
    """Resumed attempts per blob after a broken download."""
    lease_expiry: float = 3600.0
    """A pull's lease expires after this many seconds if the agent dies mid-pull."""
    max_manifest_bytes: int = 4 << 20
    """Largest manifest, index or image config accepted (4 MiB: containerd's resolver allows about as
    much). They are read into memory whole; layers are bounded by the size their manifest declares."""
    ingest_lock_timeout: float = 60.0
    """Seconds to wait for a containerd ingest another writer holds ("ref locked": another process
    writing the same blob, or our own stream still closing after a broken download)."""
    allowed_registries: tuple[str, ...] = ()
    """host[:port] of the registries images may be pulled from; empty allows any. An image reference
    can name any host, so without a list anyone who may pull chooses where this host connects to."""

    def allows_registry(self, host: str) -> bool:
        """True when `host` (as in an image reference) may be pulled from. Host names are
        case-insensitive; ports must match exactly."""
        if not self.allowed_registries:
            return True
        return host.lower() in {allowed.lower() for allowed in self.allowed_registries}


@dataclass(frozen=True)
class CacheConfig:
    """The layer cache: containerd's content store, bounded by bytes (docs/cache.md)."""

    max_bytes: int = 0
    """The bound on the content store's bytes; 0: max_fraction of the filesystem holding
    capacity.disk_path (containerd's root)."""
    max_fraction: float = 0.2
    """With max_bytes = 0, the bound as a fraction of that filesystem's size, in (0, 1]."""
    low_watermark: float = 0.9
    """Over the bound, evict until the store holds this fraction of it, in (0, 1]."""
    interval: float = 300.0
    """Seconds between checks of the bound besides the one after each pull or import."""


@dataclass(frozen=True)
class ApiConfig:
    listen: str = "unix:///run/ferryman/agent.sock"
    """unix:///path or tcp://host:port."""
    peer_listen: str = ""
    """host:port for agent-to-agent mTLS ([::1]:port for IPv6); empty disables."""
    tls_listen: str = ""
    """host:port serving this same API over mTLS to ops certificates only (the coordinator, operators);
    empty disables."""
    peer_handshake_timeout: float = 10.0
    """Seconds a peer connection may take for its TLS handshake and session preamble together."""
    peer_max_pending: int = 16
    """Peer connections in their handshake at once; more are closed on arrival."""
    peer_max_pending_per_address: int = 4
    """Of those, from one remote address."""
    peer_max_sessions: int = 64
    """Established peer sessions at once; more are refused."""
    peer_max_sessions_per_peer: int = 16
    """Of those, with one peer host."""


@dataclass(frozen=True)
class TlsConfig:
    """The mutual-TLS files for agent-to-agent traffic (see docs/security.md)."""

    ca_file: str = "/etc/ferryman/pki/ca.pem"
    """The fleet CA certificate; peers are verified against it and nothing else."""
    cert_file: str = "/etc/ferryman/pki/host.pem"
    """This host's certificate (CN and DNS SAN = host identity), issued by the fleet CA."""
    key_file: str = "/etc/ferryman/pki/host-key.pem"
    """This host's private key (mode 0600)."""


@dataclass(frozen=True)
class RuntimeConfig:
    stop_timeout: float = 10.0
    """Seconds between SIGTERM and SIGKILL on stop."""
    log_dir: str = "/var/log/ferryman/containers"
    """Per-container stdout/stderr files live here."""
    cgroup_parent: str = "/ferryman"
    """Containers get the cgroup <cgroup_parent>/<namespace>/<id>."""


@dataclass(frozen=True)
class RestartConfig:
    """How the agent restarts exited containers as their restart policy says (docker's backoff)."""

    initial_delay: float = 0.1
    """Seconds before the first restart after an exit."""
    max_delay: float = 10.0
    """The delay doubles with each quick failure, up to this many seconds."""
    reset_after: float = 10.0
    """A run that lasted this many seconds starts the delay over at initial_delay."""
    resync_interval: float = 30.0
    """Seconds between re-reads of every container, for exits whose events were lost (containerd
    restarted, or the exit came while the agent was subscribing again)."""


@dataclass(frozen=True)
class PeerConfig:
    name: str
    """The peer agent's host identity (its certificate name)."""
    address: str
    """host:port of its peer_listen."""
    blobs: str = ""
    """host:port of its [sharing] listen (blobs over mTLS); empty: never asked for blobs."""


@dataclass(frozen=True)
class SharingConfig:
    """Blobs served to, and fetched from, fleet peers (agent/sharing, agent/images/peersource.py)."""

    listen: str = ""
    """host:port serving this host's blobs over mutual TLS to agent certificates of the fleet CA;
    empty: serve none (this host still fetches from peers)."""
    max_uploads: int = 16
    """Range requests served at once, to all peers (more wait)."""
    max_uploads_per_peer: int = 4
    """Of those, to one peer host."""
    upload_rate: int = 0
    """Bytes per second served to all peers together; 0: unlimited. Keeps a workload's or a
    migration stream's share of the NIC."""
    range_size: int = 8 << 20
    """Bytes per range when one blob is striped across several peers."""
    max_peers_per_blob: int = 4
    """Peers one blob is fetched from at once."""
    ranges_per_peer: int = 2
    """Ranges in flight from one peer at once (at most 2 * max_peers_per_blob * ranges_per_peer ranges
    are held in memory)."""
    stall_timeout: float = 5.0
    """Seconds without a byte before a peer's range is abandoned, and the peer with it for that blob."""
    probe_timeout: float = 1.0
    """Seconds a peer may take to say whether it holds a blob."""
    partial_wait: float = 10.0
    """Seconds the server waits for the next bytes of a blob it is itself still pulling."""
    rendezvous_delay: float = 0.3
    """Seconds per rank a host waits for a peer to start a blob nobody holds yet, before it fetches
    the blob from the registry itself (striping.rendezvous_rank: hosts pulling one image at once
    then download each blob from the registry once); 0: never wait."""
    min_peer_size: int = 1 << 20
    """Blobs smaller than this come straight from the registry (a probe costs more than they do)."""


@dataclass(frozen=True)
class MigrationConfig:
    work_dir: str = "/dev/shm/ferryman"
    """Where dumps and received images live: tmpfs, so CRIU reads and writes memory, not disk."""
    downtime_target_ms: int = 300
    """Default stop-copy downtime target; ferryctl migrate --downtime-target overrides it."""
    max_iterations: int = 8
    """Default pre-copy round limit."""
    idle_timeout: float = 30.0
    """Seconds without a message from the peer before a migration is abandoned (link cut)."""
    decision_timeout: float = 300.0
    """How long a restored, paused target waits to learn the source's decision before keeping it paused and
    asking again in the background."""
    phase_timeout: float = 1800.0
    """Upper bound on one migration from start to decision."""
    mode: str = "auto"
    """Default mode: precopy, lazy (post-copy), hybrid (pre-copy rounds, then post-copy) or auto (the
    fastest these CRIU features allow: lazy without soft-dirty, hybrid with it, precopy without uffd)."""
    live_precopy: bool = True
    """Without soft-dirty, pre-copy rounds read the workload's memory from /proc/PID/mem while it runs.
    False dumps each round with CRIU instead, which freezes the workload while it copies all of memory."""
    stream_tls_records: bool = False
    """Keep TLS record encryption under the stream's AES-GCM frames for the whole migration. By default
    a migration leaves TLS records once mTLS has authenticated both agents and carried the key
    agreement: the frames are then encrypted once (masked headers, sealed payloads), which is ~30 %
    faster on a small host. True encrypts everything twice."""
    postcopy_reconnect_timeout: float = 30.0
    """In POSTCOPY, how long a cut link or a restarting agent may take to come back. After that the
    target kills its copy (it would read missing pages as zeros) and the source keeps its frozen one."""
    lazy_daemon_idle_class: bool = True
    """Run the target's criu lazy-pages daemon SCHED_IDLE. It polls without sleeping for all of
    POSTCOPY; idle class, that takes only spare CPU. Set false on targets without spare CPU, where
    an idle-class daemon would serve every fault last."""


@dataclass(frozen=True)
class NetworkConfig:
    """Service addresses (agent/network): routed /32s that follow a container between hosts."""

    uplink: str = ""
    """The interface facing the hosts' shared segment (proxy ARP, gratuitous ARP); empty means the
    interface of the IPv4 default route."""
    link_local_gateway: str = "169.254.1.1"
    """The containers' default gateway: answered by the host end of each veth, never assigned."""
    netns_dir: str = "/run/netns"
    """Where the containers' network namespaces are bound (`ip netns` lists /run/netns). Hosts
    simulated on one machine each give theirs a directory of its own, so that whoever removes a
    host also finds, and unmounts, its containers' namespaces."""


# ---- telemetry, coordinator and capacity (agent/telemetry, agent/reservations.py)


@dataclass(frozen=True)
class CoordinatorConfig:
    """Where telemetry goes. Without a url the agent samples and exports metrics but pushes nothing."""

    url: str = ""
    """https://host:port of the coordinator; empty: no coordinator (or `urls`)."""
    urls: tuple[str, ...] = ()
    """Every replica of a coordinator on etcd, https://host:port each (instead of `url`): the agent
    talks to one and moves to the next when it cannot reach it, or to the leader a replica names."""
    server_name: str = ""
    """The name the coordinator's certificate must carry; empty means each url's host."""

    request_timeout: float = 10.0
    """Seconds for one register or push request."""
    labels: dict[str, str] = field(default_factory=dict)
    """Sent with the registration (e.g. zone, rack); placement may use them."""

    @property
    def endpoints(self) -> tuple[str, ...]:
        """The coordinator replicas' URLs (`urls`, or the one `url`); empty: no coordinator."""
        return self.urls if self.urls else ((self.url,) if self.url else ())


@dataclass(frozen=True)
class NoticesConfig:
    """Where drain notices come from besides the notice files (agent/telemetry/notices.py).

    Each metadata URL is off when empty: a bare-metal host has no metadata service. A notice that
    states a time (spot `instance-action`, Azure `NotBefore`, systemd `USEC=`) makes the coordinator
    drain the host before that time whatever its model says."""

    aws_metadata_url: str = ""
    """The EC2 instance metadata service, e.g. "http://169.254.169.254" (IMDSv2, IMDSv1 fallback)."""
    azure_scheduled_events_url: str = ""
    """e.g. "http://169.254.169.254/metadata/scheduledevents?api-version=2020-07-01"."""
    azure_vm_name: str = ""
    """This VM's name in the events' `Resources`; empty: asked of IMDS (`compute/name`)."""
    gce_metadata_url: str = ""
    """e.g. "http://metadata.google.internal/computeMetadata/v1" (maintenance-event, preempted,
    upcoming-maintenance)."""
    request_timeout: float = 1.0
    """Seconds per metadata request; a silent endpoint must not delay the sample much."""
    systemd_shutdown_file: str = "/run/systemd/shutdown/scheduled"
    """Written by `shutdown -r +N` (USEC=, MODE=); empty: not read."""
    smartctl: str = "smartctl"
    """smartctl (smartmontools >= 7, for --json); empty or not installed: no SMART health."""
    smart_interval: float = 600.0
    """Seconds between SMART readings of the disks."""


@dataclass(frozen=True)
class TelemetryConfig:
    period: float = 5.0
    """Seconds between samples."""
    buffer_max_samples: int = 720
    """Samples kept while the coordinator is away (1 h at 5 s); the oldest are dropped first."""
    buffer_max_age: float = 3600.0
    """Seconds a buffered sample is kept before it is dropped as stale."""
    batch_max: int = 100
    """Samples per push when sending a backlog."""
    drain_notice_file: str = "/run/ferryman/drain-notice"
    """Written by whoever learns of a drain (provider notice); appearing or changing -> a DRAIN_NOTICE event."""
    maintenance_file: str = "/run/ferryman/maintenance"
    """A planned-maintenance announcement; appearing or changing -> a MAINTENANCE event."""
    preemption_file: str = "/run/ferryman/preemption"
    """Written by a cloud metadata watcher on a spot-style pre-emption signal -> a PREEMPTION event.
    Any notice file may state its time with a line `deadline=<unix seconds or ISO 8601>`."""
    notices: NoticesConfig = field(default_factory=NoticesConfig)


@dataclass(frozen=True)
class CapacityConfig:
    """What this host offers to containers and reservations; 0 means detect."""

    cpu_millis: int = 0
    """0: online CPUs x 1000."""
    memory_bytes: int = 0
    """0: MemTotal."""
    disk_bytes: int = 0
    """0: the free space of disk_path, measured each time it is needed."""
    disk_path: str = "/var/lib/containerd"
    """The filesystem container data lives on; the state_dir when this path does not exist."""


@dataclass(frozen=True)
class AgentConfig:
    version: int = CONFIG_VERSION
    host_name: str = ""
    """This host's identity; empty means the kernel hostname."""
    state_dir: str = "/var/lib/ferryman"
    log_level: str = "INFO"
    containerd: ContainerdConfig = field(default_factory=ContainerdConfig)
    registries: tuple[RegistryConfig, ...] = ()
    pull: PullConfig = field(default_factory=PullConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    restart: RestartConfig = field(default_factory=RestartConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    migration: MigrationConfig = field(default_factory=MigrationConfig)
    peers: tuple[PeerConfig, ...] = ()
    """Known peer agents (a coordinator can supply addresses instead)."""
    sharing: SharingConfig = field(default_factory=SharingConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    coordinator: CoordinatorConfig = field(default_factory=CoordinatorConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    capacity: CapacityConfig = field(default_factory=CapacityConfig)

    def registry(self, host: str) -> RegistryConfig:
        """The settings for a registry host; unknown hosts get HTTPS with system trust."""
        for reg in self.registries:
            if reg.host == host:
                return reg
        return RegistryConfig(host=host)


# host[:port] as in image references: a DNS name or IPv4 address, or a bracketed IPv6 address.
_REGISTRY_HOST = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _validate(config: AgentConfig) -> None:
    """Reject values that parse but make no sense, before anything starts."""
    positive = {
        "pull.max_concurrent_layers": config.pull.max_concurrent_layers,
        "pull.chunk_size": config.pull.chunk_size,
        "pull.connect_timeout": config.pull.connect_timeout,
        "pull.read_timeout": config.pull.read_timeout,
        "pull.lease_expiry": config.pull.lease_expiry,
        "pull.ingest_lock_timeout": config.pull.ingest_lock_timeout,
        "containerd.connect_timeout": config.containerd.connect_timeout,
        "migration.postcopy_reconnect_timeout": config.migration.postcopy_reconnect_timeout,
        "api.peer_handshake_timeout": config.api.peer_handshake_timeout,
        "api.peer_max_pending": config.api.peer_max_pending,
        "api.peer_max_pending_per_address": config.api.peer_max_pending_per_address,
        "api.peer_max_sessions": config.api.peer_max_sessions,
        "api.peer_max_sessions_per_peer": config.api.peer_max_sessions_per_peer,
        "restart.initial_delay": config.restart.initial_delay,
        "restart.max_delay": config.restart.max_delay,
        "restart.reset_after": config.restart.reset_after,
        "restart.resync_interval": config.restart.resync_interval,
        "sharing.max_uploads": config.sharing.max_uploads,
        "sharing.max_uploads_per_peer": config.sharing.max_uploads_per_peer,
        "sharing.range_size": config.sharing.range_size,
        "sharing.max_peers_per_blob": config.sharing.max_peers_per_blob,
        "sharing.ranges_per_peer": config.sharing.ranges_per_peer,
        "sharing.stall_timeout": config.sharing.stall_timeout,
        "sharing.probe_timeout": config.sharing.probe_timeout,
        "sharing.partial_wait": config.sharing.partial_wait,
    }
    for name, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{name} must be greater than 0, got {value}")
    if config.restart.initial_delay > config.restart.max_delay:
        raise ConfigError("restart.initial_delay must not exceed restart.max_delay")
    if config.sharing.upload_rate < 0 or config.sharing.min_peer_size < 0:
        raise ConfigError("sharing.upload_rate and sharing.min_peer_size must be 0 or more")
    parse_peer_listen(config.sharing.listen)  # ConfigError unless empty or host:port
    if config.pull.chunk_size > 8 << 20:
        raise ConfigError("pull.chunk_size must be at most 8 MiB (containerd's message limit is 16 MiB)")
    if not 0 < config.pull.max_manifest_bytes <= 8 << 20:
        # Manifests and configs go to containerd in one Write message, limited to 16 MiB.
        raise ConfigError(f"pull.max_manifest_bytes must be from 1 to 8 MiB, got {config.pull.max_manifest_bytes}")
    for allowed in config.pull.allowed_registries:
        if not _REGISTRY_HOST.fullmatch(allowed):
            raise ConfigError(f"pull.allowed_registries: {allowed!r} is not host[:port] (no scheme, no path)")
    for name, value in {
        "pull.retries": config.pull.retries,
        "runtime.stop_timeout": config.runtime.stop_timeout,
    }.items():
        if value < 0:
            raise ConfigError(f"{name} must not be negative, got {value}")
    gateway = config.network.link_local_gateway
    try:
        link_local = ipaddress.IPv4Address(gateway).is_link_local
    except ValueError:
        link_local = False
    if not link_local:
        raise ConfigError(f"network.link_local_gateway must be an IPv4 link-local address, got {gateway!r}")
    if not Path(config.network.netns_dir).is_absolute():
        raise ConfigError(f"network.netns_dir must be an absolute path, got {config.network.netns_dir!r}")
    if config.migration.mode not in MIGRATION_MODES:
        raise ConfigError(f"migration.mode must be one of {', '.join(MIGRATION_MODES)}, got {config.migration.mode!r}")
    _validate_telemetry(config)
    _validate_cache(config.cache)
    if config.log_level.upper() not in _LOG_LEVELS:
        raise ConfigError(f"unknown log level {config.log_level!r} (use one of {', '.join(_LOG_LEVELS)})")
    hosts = [r.host for r in config.registries]
    duplicated = sorted({h for h in hosts if hosts.count(h) > 1})
    if duplicated:
        raise ConfigError(f"registries: host listed more than once: {', '.join(duplicated)}")


def _validate_cache(cache: CacheConfig) -> None:
    if cache.max_bytes < 0:
        raise ConfigError(f"cache.max_bytes must not be negative (0 means max_fraction), got {cache.max_bytes}")
    for name, value in {"cache.max_fraction": cache.max_fraction, "cache.low_watermark": cache.low_watermark}.items():
        if not 0 < value <= 1:
            raise ConfigError(f"{name} must be in (0, 1], got {value}")
    if cache.interval <= 0:
        raise ConfigError(f"cache.interval must be greater than 0, got {cache.interval}")


def _validate_telemetry(config: AgentConfig) -> None:
    """[telemetry], [coordinator], [capacity] and api.tls_listen."""
    tel, coord, cap = config.telemetry, config.coordinator, config.capacity
    for name, value in {
        "telemetry.period": tel.period,
        "telemetry.buffer_max_samples": tel.buffer_max_samples,
        "telemetry.buffer_max_age": tel.buffer_max_age,
        "telemetry.batch_max": tel.batch_max,
        "coordinator.request_timeout": coord.request_timeout,
        "telemetry.notices.request_timeout": tel.notices.request_timeout,
        "telemetry.notices.smart_interval": tel.notices.smart_interval,
    }.items():
        if value <= 0:
            raise ConfigError(f"{name} must be greater than 0, got {value}")
    for name, value in {
        "capacity.cpu_millis": cap.cpu_millis,
        "capacity.memory_bytes": cap.memory_bytes,
        "capacity.disk_bytes": cap.disk_bytes,
    }.items():
        if value < 0:
            raise ConfigError(f"{name} must not be negative (0 means detect), got {value}")
    for name in ("aws_metadata_url", "azure_scheduled_events_url", "gce_metadata_url"):
        url = getattr(tel.notices, name)
        if url and (urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname):
            raise ConfigError(f"telemetry.notices.{name} {url!r}: expected http(s)://host[:port][/path]")
    if coord.url and coord.urls:
        raise ConfigError("coordinator.url and coordinator.urls exclude each other: list every replica in urls")
    if coord.endpoints:
        try:
            parse_urls(coord.endpoints, "coordinator.urls" if coord.urls else "coordinator.url")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    listen = config.api.tls_listen
    if listen:
        host, sep, port_text = listen.rpartition(":")
        if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ConfigError(f"api.tls_listen {listen!r}: expected host:port ([::1]:port for IPv6)")


def parse_config(data: dict[str, Any]) -> AgentConfig:
    version = data.get("version", CONFIG_VERSION)
    if version != CONFIG_VERSION:
        raise ConfigError(f"config version {version} is not supported (expected {CONFIG_VERSION})")
    config = build_table(AgentConfig, data, "")
    _validate(config)
    return config


def load_config(path: str | Path | None) -> AgentConfig:
    """Load the agent config; a missing path means all defaults."""
    if path is None:
        return AgentConfig()
    try:
        with Path(path).open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    return parse_config(data)
