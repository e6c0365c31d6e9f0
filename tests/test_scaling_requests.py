"""Request rate, latency and errors per component, and each component's measured cold start.

The metrics page a component serves (Prometheus text) is parsed by prometheus_client; two reads of
the copies' summed counters become a point of the behaviour series; the scaling series read rate,
latency and errors from those points (coordinator/scaling/resample.py). The replica service keeps
the time from a scale request to a healthy replica, and the leader's decision uses it as the cold
start. The relay through a real agent and container is in tests/test_scaling_metrics_relay.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from coordinator.deployments.behaviour import ComponentSeries, StartTimes, request_point
from coordinator.deployments.requestmetrics import MetricsUnreadable, RequestCounts, parse_counts
from coordinator.scaling.resample import Span, per_second

PAGE = """\
# HELP requests_total Requests answered.
# TYPE requests_total counter
requests_total{path="/work",code="200"} 90
requests_total{path="/work",code="503"} 10
# TYPE request_errors_total counter
request_errors_total 10
# TYPE request_duration_seconds summary
request_duration_seconds_sum 2.5
request_duration_seconds_count 100
# TYPE unrelated gauge
unrelated 7
"""


def test_a_page_gives_its_counters_every_label_set_summed() -> None:
    assert parse_counts(PAGE) == RequestCounts(100.0, 10.0, 2.5, 100.0)
    histogram = (
        "# TYPE request_duration_seconds histogram\n"
        'request_duration_seconds_bucket{le="0.1"} 3\n'
        'request_duration_seconds_bucket{le="+Inf"} 4\n'
        "request_duration_seconds_sum 0.9\n"
        "request_duration_seconds_count 4\n"
        "requests_total 4\n"
    )
    assert parse_counts(histogram) == RequestCounts(4.0, 0.0, 0.9, 4.0)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("unrelated 7\n", "no requests_total"),
        ("<html>not found</html>", "not Prometheus text"),
        ("requests_total seven\n", "not Prometheus text"),
    ],
)
def test_a_page_without_the_request_counter_is_refused(text: str, why: str) -> None:
    with pytest.raises(MetricsUnreadable, match=why):
        parse_counts(text)


def test_two_reads_make_a_rate_a_mean_latency_and_an_error_rate() -> None:
    before = RequestCounts(100.0, 10.0, 2.5, 100.0)
    after = RequestCounts(150.0, 20.0, 4.5, 150.0)
    point = request_point(5.0, after, (0.0, before))
    assert point is not None
    assert (point.requests_per_second, point.latency_ms, point.errors_per_second) == pytest.approx((10.0, 40.0, 2.0))
    idle = request_point(10.0, after, (5.0, after))
    assert idle is not None and (idle.requests_per_second, idle.latency_ms) == (0.0, 0.0)
    assert request_point(5.0, after, None) is None  # a first read
    assert request_point(5.0, before, (0.0, after)) is None  # a copy restarted or left: counters went down
    assert request_point(0.0, after, (0.0, before)) is None  # no time between


def test_the_series_keep_request_points_and_the_scaling_series_read_them() -> None:
    series = ComponentSeries()
    copies = [RequestCounts(0.0), RequestCounts(0.0)]
    t0 = 1000.0
    for step in range(1, 5):
        rate = 10.0 * step  # per copy and second
        copies = [
            RequestCounts(c.requests + 5 * rate, step, c.duration_sum_s + 5 * rate * 0.02, c.duration_count + 5 * rate)
            for c in copies
        ]
        series.observe_requests("d1", "b", t0 + 5 * step, copies[0] + copies[1])
    points = series.of("d1", "b")["requests"]
    assert [p["requests_per_second"] for p in points] == pytest.approx([40.0, 60.0, 80.0])
    assert [p["latency_ms"] for p in points] == pytest.approx([20.0, 20.0, 20.0])
    assert [p["errors_per_second"] for p in points] == pytest.approx([0.4, 0.4, 0.4])
    for ts in (t0, t0 + 20):
        series.observe(
            "h1",
            [
                (
                    ts,
                    {
                        "containers": [
                            {
                                "cpu_millis": 100.0,
                                "memory_bytes": "0",
                                "labels": {"ferryman.deployment": "d1", "ferryman.component": "b"},
                            }
                        ]
                    },
                )
            ],
        )
    # The balancer's counter is there too, but the endpoint's requests win: they count requests.
    series.observe_traffic("d1", "b", t0, 0, {})
    series.observe_traffic("d1", "b", t0 + 5, 5000, {})
    got = per_second(series.of("d1", "b"), Span(t0, t0 + 20))
    assert list(got.rate) == [0.0] * 10 + [40.0] * 5 + [60.0] * 5
    assert list(got.latency) == [0.0] * 10 + [20.0] * 10
    assert np.allclose(got.errors[10:], 0.4)
    series.forget("d1")
    assert series.of("d1", "b")["requests"] == []


def test_without_an_endpoint_the_rate_is_the_balancers_and_latency_and_errors_zero() -> None:
    series = ComponentSeries()
    series.observe("h1", [(0.0, {"containers": []})])
    series.observe_traffic("d1", "a", 0.0, 0, {})
    series.observe_traffic("d1", "a", 5.0, 50, {})
    got = per_second(series.of("d1", "a"), Span(0.0, 10.0))
    assert list(got.rate) == [0.0] * 5 + [10.0] * 5
    assert not got.latency.any() and not got.errors.any()


def test_a_components_cold_start_is_the_median_of_its_last_starts() -> None:
    starts = StartTimes(keep=3)
    assert starts.cold_start("d1", "b") is None
    for seconds in (4.0, 30.0, 5.0):  # one slow image pull
        starts.observe("d1", "b", seconds)
    assert starts.cold_start("d1", "b") == 5.0
    for seconds in (6.0, 7.0):
        starts.observe("d1", "b", seconds)
    assert starts.cold_start("d1", "b") == 6.0  # the oldest went
    assert starts.cold_start("d1", "c") is None
    starts.forget("d1")
    assert starts.cold_start("d1", "b") is None
