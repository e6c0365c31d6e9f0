"""A component's request counters from its metrics endpoint (Prometheus text), parsed.

A component that declares `metrics_port` in its catalog manifest serves, at `GET /metrics` on its
service address, three families (any labels; every label set is summed):

    requests_total                  counter: requests answered
    request_errors_total            counter: of those, the failed ones
    request_duration_seconds        summary or histogram: its _sum and _count (the time spent answering)

The coordinator reads every copy of the component (through each copy's agent,
agent/api/componentmetrics.py), sums the copies' counters (`RequestCounts.__add__`), and turns two
reads into a rate, a mean latency and an error rate (coordinator/deployments/behaviour.py). Parsing
is prometheus_client's; a page without `requests_total` is refused, so a wrong port is not mistaken
for a component at rest.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from core.errors import InvalidRequest

REQUESTS = "requests_total"
ERRORS = "request_errors_total"
DURATION_SUM = "request_duration_seconds_sum"
DURATION_COUNT = "request_duration_seconds_count"


class MetricsUnreadable(InvalidRequest):
    """The page is not Prometheus text or lacks `requests_total`."""

    code = "metrics_unreadable"


@dataclass(frozen=True)
class RequestCounts:
    """Counters since the copy started (they restart from 0 with it)."""

    requests: float
    errors: float = 0.0
    duration_sum_s: float = 0.0
    duration_count: float = 0.0

    def __add__(self, other: RequestCounts) -> RequestCounts:
        return RequestCounts(
            self.requests + other.requests,
            self.errors + other.errors,
            self.duration_sum_s + other.duration_sum_s,
            self.duration_count + other.duration_count,
        )


def parse_counts(text: str) -> RequestCounts:
    """The page's counters, every label set summed (MetricsUnreadable when it has none)."""
    sums = {REQUESTS: 0.0, ERRORS: 0.0, DURATION_SUM: 0.0, DURATION_COUNT: 0.0}
    seen = False
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in sums:
                    sums[sample.name] += float(sample.value)
                    seen = seen or sample.name == REQUESTS
    except ValueError as exc:
        raise MetricsUnreadable(f"not Prometheus text: {exc}") from exc
    if not seen:
        raise MetricsUnreadable(f"no {REQUESTS} in the metrics page")
    return RequestCounts(sums[REQUESTS], sums[ERRORS], sums[DURATION_SUM], sums[DURATION_COUNT])
