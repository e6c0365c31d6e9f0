"""The health monitor's Prometheus metrics, in the agent's registry (agent/metrics.py)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_PROBE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class HealthMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.probes = Counter(
            "ferryman_health_probes",
            "Health probes run, by kind (http, tcp, grpc, exec) and result (pass, fail, skipped: a "
            "migration held the container)",
            ["kind", "result"],
            registry=registry,
        )
        self.probe_seconds = Histogram(
            "ferryman_health_probe_duration_seconds",
            "Time one health probe took, by kind",
            ["kind"],
            buckets=_PROBE_BUCKETS,
            registry=registry,
        )
        self.transitions = Counter(
            "ferryman_health_transitions",
            "Changes of a container's health status, by the status left and the one entered",
            ["from", "to"],
            registry=registry,
        )
        self.containers = Gauge(
            "ferryman_health_containers",
            "Containers with a health check, by status (starting, healthy, unhealthy, stopped)",
            ["status"],
            registry=registry,
        )
