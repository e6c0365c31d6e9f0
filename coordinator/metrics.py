"""Prometheus metrics of the coordinator, in a registry of its own (no process-global collectors)."""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from coordinator.model import Host, HostAdmin, HostHealth, Migration, MigrationState, host_state


class CoordinatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.hosts = Gauge("ferryman_coordinator_hosts", "Hosts by state", ["state"], registry=self.registry)
        self.tick_seconds = Histogram(
            "ferryman_coordinator_tick_seconds",
            "One policy tick on the leader: score every host, apply the decisions, progress the drains",
            buckets=(0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0),
            registry=self.registry,
        )
        self.tick_phase_seconds = Histogram(
            "ferryman_coordinator_tick_phase_seconds",
            "One policy tick's phases: list (the hosts), prepare (the histories, the followers' shares), "
            "score (the model, the explanations), store (the predictions written before the decisions), "
            "decide (the decisions and the drains' progress)",
            ["phase"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0),
            registry=self.registry,
        )
        self.telemetry_samples = Counter(
            "ferryman_coordinator_telemetry_samples", "Telemetry samples accepted", registry=self.registry
        )
        self.telemetry_dropped = Counter(
            "ferryman_coordinator_telemetry_dropped",
            "Samples agents reported lost in their buffers",
            registry=self.registry,
        )
        self.registrations_deferred = Counter(
            "ferryman_coordinator_registrations_deferred",
            "Registrations answered 503 registrations_busy (max_in_flight under way, max_queued waiting)",
            registry=self.registry,
        )
        self.pushes_sent_elsewhere = Counter(
            "ferryman_coordinator_pushes_sent_elsewhere",
            "Telemetry pushes and sessions a leader refused (503 push_elsewhere): followers take them",
            registry=self.registry,
        )
        self.telemetry_rejected = Counter(
            "ferryman_coordinator_telemetry_rejected", "Telemetry pushes refused as invalid", registry=self.registry
        )
        self.reservations = Counter(
            "ferryman_coordinator_reservations", "Reservation attempts by result", ["result"], registry=self.registry
        )
        self.migrations = Gauge(
            "ferryman_coordinator_migrations", "Coordinator migrations by state", ["state"], registry=self.registry
        )
        self.migration_transitions = Counter(
            "ferryman_coordinator_migration_transitions",
            "Coordinator migrations entering each state (failed: an attempt rolled back or did not start; "
            "abandoned: given up, never retried)",
            ["state"],
            registry=self.registry,
        )
        for state in MigrationState:  # from 0, so increase() sees the first abandoned migration
            self.migration_transitions.labels(state=state.value)
        self.drain_probability = Gauge(
            "ferryman_coordinator_drain_probability", "Latest P(drain) per host", ["host"], registry=self.registry
        )
        self._drain_probability_series: dict[str, Gauge] = {}
        """Each host's child of `drain_probability`: `labels()` per host and tick costs more than the
        set itself (10 000 hosts: some 0.2 s of the tick's CPU)."""
        self.tracker_lookups = Counter(
            "ferryman_coordinator_tracker_lookups",
            "Holder lookups answered, by whether any holder was named (hit) or none (miss), per digest",
            ["result"],
            registry=self.registry,
        )
        self.tracker_announcements = Counter(
            "ferryman_coordinator_tracker_announcements",
            "Blob announcements from agents, by kind",
            ["kind"],
            registry=self.registry,
        )
        self.tracker_digests = Gauge(
            "ferryman_coordinator_tracker_digests",
            "Distinct blobs the tracker names a holder for",
            registry=self.registry,
        )
        self.starts = Counter(
            "ferryman_coordinator_starts",
            "Starts placed through the coordinator, by whether the host held every layer (local), "
            "some (partial) or none (cold)",
            ["result"],
            registry=self.registry,
        )
        self.start_layers = Counter(
            "ferryman_coordinator_start_layers",
            "Layers those starts needed, by whether the host held them (hit; warm_hit: held because they were "
            "warmed) or had to fetch them (miss)",
            ["kind"],
            registry=self.registry,
        )
        for result in ("local", "partial", "cold"):
            self.starts.labels(result=result)
        for kind in ("hit", "warm_hit", "miss"):
            self.start_layers.labels(kind=kind)
        self.warm_model = Gauge(
            "ferryman_coordinator_warm_model_info",
            "The layer predictor served (1 for its version; no series without one)",
            ["version"],
            registry=self.registry,
        )
        self.warm_bytes = Counter(
            "ferryman_coordinator_warm_bytes",
            "Bytes of layers warmed ahead of use (warmed), then used by a start (used) or whose lease ended "
            "unused (wasted); of layers a host held kept under a lease (kept), then used by a start (kept_used)",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in ("warmed", "used", "wasted", "kept", "kept_used"):
            self.warm_bytes.labels(outcome=outcome)
        self.registry_pushes = Counter(
            "ferryman_coordinator_registry_pushes",
            "Image pushes a registry notified (POST /v1/registry/events): a new image of a repository the "
            "fleet runs (release: its hosts are warmed for it) or anything else (ignored)",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in ("release", "ignored"):
            self.registry_pushes.labels(outcome=outcome)
        self.warm_control = Gauge(
            "ferryman_coordinator_warm_control",
            "The waste controller's state after the last warming round: the probability threshold, layers "
            "per host and round, share of the idle link, and the waste it measured",
            ["value"],
            registry=self.registry,
        )
        self.drain_threshold = Gauge(
            "ferryman_coordinator_drain_threshold",
            "P(drain) at or above which the policy drains a host (above 1 without a model)",
            registry=self.registry,
        )

        self.deployments = Gauge(
            "ferryman_coordinator_deployments", "Deployments by state", ["state"], registry=self.registry
        )
        self.deployment_failures = Counter(
            "ferryman_coordinator_deployment_failures",
            "Deployments that failed and were rolled back, by the kind of failure",
            ["reason"],
            registry=self.registry,
        )
        self.deployment_component_changes = Counter(
            "ferryman_coordinator_deployment_component_changes",
            "Components of running deployments that went degraded, or healthy again (to)",
            ["to"],
            registry=self.registry,
        )
        self.chain_handovers = Counter(
            "ferryman_coordinator_chain_handovers",
            "Chain handovers that ended, by outcome (done, rolled_back)",
            ["outcome"],
            registry=self.registry,
        )
        self.chain_handover_failures = Counter(
            "ferryman_coordinator_chain_handover_failures",
            "Chain handovers rolled back, by the phase that failed",
            ["phase"],
            registry=self.registry,
        )
        self.alert_webhooks = Counter(
            "ferryman_coordinator_alert_webhooks",
            "Alert webhook deliveries by result (sent, failed)",
            ["result"],
            registry=self.registry,
        )

    def set_hosts(self, hosts: Iterable[Host]) -> None:
        counts = dict.fromkeys([h.value for h in HostHealth] + [HostAdmin.DRAINING.value, HostAdmin.DRAINED.value], 0)
        # Counted by (health, admin) first: Host.state for each of 10 000 hosts every check_period
        # cost more than the liveness check itself.
        for (health, admin), n in collections.Counter((h.health, h.admin) for h in hosts).items():
            counts[host_state(health, admin)] += n
        for state, n in counts.items():
            self.hosts.labels(state=state).set(n)

    def set_drain_probabilities(self, probabilities: Mapping[str, float]) -> None:
        """The latest P(drain) of every host scored; the series of a host no longer scored goes."""
        series = self._drain_probability_series
        for host in series.keys() - probabilities.keys():
            del series[host]
            self.drain_probability.remove(host)
        for host, probability in probabilities.items():
            child = series.get(host)
            if child is None:
                child = series[host] = self.drain_probability.labels(host=host)
            child.set(probability)

    def set_migrations(self, migrations: Iterable[Migration]) -> None:
        counts = dict.fromkeys([s.value for s in MigrationState], 0)
        for m in migrations:
            counts[m.state.value] += 1
        for state, n in counts.items():
            self.migrations.labels(state=state).set(n)
