"""Prometheus metrics of one agent, in a registry of its own (no process-global collectors)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.pull_bytes = Counter(
            "ferryman_pull_bytes", "Layer bytes downloaded from registries", registry=self.registry
        )
        self.pulls = Counter("ferryman_pulls", "Image pulls by result", ["result"], registry=self.registry)
        self.pull_duration = Histogram(
            "ferryman_pull_duration_seconds",
            "Whole-image pull time",
            ["result"],
            buckets=_DURATION_BUCKETS,
            registry=self.registry,
        )
        self.layer_duration = Histogram(
            "ferryman_layer_duration_seconds",
            "Per-layer time by phase (fetch, unpack)",
            ["phase"],
            buckets=_DURATION_BUCKETS,
            registry=self.registry,
        )
        self.containers = Gauge(
            "ferryman_containers",
            "Containers in this agent's namespace by state",
            ["state"],
            registry=self.registry,
        )
