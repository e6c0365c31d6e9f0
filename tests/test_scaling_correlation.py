"""The correlation engine (coordinator/scaling/correlation.py) on the scaling generator's traces: it
finds the true lags on seeds and a regime the model never saw, and finds nothing between independent
components."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from coordinator.scaling.correlation import CorrelationConfig, NotEnoughData, explain, lead, pair_links
from coordinator.scaling.series import METRICS, ComponentSeries
from models.scaling.generate import HELD_OUT_REGIME, REGIMES, TraceSpec, generate, with_lags

CPU_ONLY = CorrelationConfig(downstream_metrics=("cpu",))


@pytest.mark.parametrize(
    ("regime", "seed", "lags"),
    [
        (HELD_OUT_REGIME, 9101, None),
        (HELD_OUT_REGIME, 9102, (7, 41)),
        ("bursty", 9103, (33, 3)),
    ],
)
def test_finds_the_true_lags_within_a_second(regime: str, seed: int, lags: tuple[int, int] | None) -> None:
    spec = TraceSpec(REGIMES[regime] if lags is None else with_lags(REGIMES[regime], lags), seed, duration_s=3600)
    trace = generate(spec)
    for up, down, true_lag in trace.edges:
        link = lead(pair_links(up, trace.components[up], down, trace.components[down], CPU_ONLY))
        assert link is not None, (up, down)
        assert abs(link.lag_s - true_lag) <= 1, (up, down, link)
        assert link.granger_p < 1e-6 and abs(link.correlation) > 3 * link.threshold


def test_explain_lists_every_metric_that_leads_with_its_confidence() -> None:
    trace = generate(TraceSpec(REGIMES[HELD_OUT_REGIME], 9104, duration_s=1200))
    links = explain([("A", "B")], trace.components)[("A", "B")]
    found = {(lk.upstream_metric, lk.downstream_metric): lk for lk in links}
    # A's traffic leads B's traffic, CPU and memory by the true lag, and each link says how sure
    for pair in [("rate", "rate"), ("rate", "cpu"), ("cpu", "cpu")]:
        assert found[pair].lag_s == trace.edges[0][2]
        assert 0 <= found[pair].granger_p < 0.01 / len(METRICS) ** 2
        assert found[pair].to_dict()["significant"] is True
    assert all(lk.significant for lk in links)
    assert [abs(lk.correlation) for lk in links] == sorted((abs(lk.correlation) for lk in links), reverse=True)


def test_independent_components_show_no_link() -> None:
    # alpha bounds the chance of any link between two independent components at 0.01 per pair; over
    # 12 pairs of unrelated stages (other regimes, other seeds) we allow 1
    config = CorrelationConfig(alpha=0.01)
    linked = []
    for i in range(12):
        a = generate(TraceSpec(REGIMES["bursty"], 5000 + i, duration_s=1800))
        b = generate(TraceSpec(REGIMES[HELD_OUT_REGIME], 6000 + i, duration_s=1800))
        links = [lk for lk in pair_links("A", a.components["A"], "B", b.components["B"], config) if lk.significant]
        if links:
            linked.append(links)
    assert len(linked) <= 1, linked


def test_white_noise_and_constants_give_nothing() -> None:
    rng = np.random.default_rng(3)
    n = 1200

    def noise() -> ComponentSeries:
        return ComponentSeries(*(rng.normal(size=n) for _ in METRICS))

    assert not [lk for lk in pair_links("x", noise(), "y", noise()) if lk.significant]
    flat = ComponentSeries(*(np.ones(n) for _ in METRICS))
    links = pair_links("x", noise(), "y", flat)
    assert not any(lk.significant for lk in links) and lead(links) is None


def test_a_metric_flat_but_for_a_step_in_its_first_seconds_leads_nothing() -> None:
    # A replica's first memory sample a few seconds into the window: past the AR filter's first
    # `ar_order` seconds the series is constant up to rounding, which once reached the Granger test
    # as a constant column (InfeasibleTestError, the whole pair lost).
    trace = generate(TraceSpec(REGIMES["bursty"], 3, duration_s=700))
    a, b = trace.components["A"], trace.components["B"]
    step = np.where(np.arange(len(a)) < 5, 95.0, 190.0)
    links = pair_links("A", replace(a, memory=step), "B", replace(b, memory=step), CorrelationConfig(max_lag_s=40))
    assert not [lk for lk in links if lk.significant and "memory" in (lk.upstream_metric, lk.downstream_metric)]
    assert lead(links) is not None  # the other metrics still lead B's CPU


def test_bad_input_is_refused_clearly() -> None:
    trace = generate(TraceSpec(REGIMES["diurnal"], 1, duration_s=900))
    a, b = trace.components["A"], trace.components["B"]
    with pytest.raises(NotEnoughData, match="not the same window"):
        pair_links("A", a, "B", b.window(0, 800))
    with pytest.raises(NotEnoughData, match="at least 300"):
        pair_links("A", a.window(0, 200), "B", b.window(0, 200))
    with pytest.raises(NotEnoughData, match="no metrics for C"):
        explain([("A", "C")], {"A": a})
    with pytest.raises(ValueError, match="unknown metrics"):
        CorrelationConfig(downstream_metrics=("gpu",))
    with pytest.raises(ValueError, match="alpha"):
        replace(CorrelationConfig(), alpha=0.0)
    with pytest.raises(ValueError, match="different lengths"):
        ComponentSeries(np.ones(3), np.ones(3), np.ones(3), np.ones(3), np.ones(2))


def _thinned_window(
    seed: int, seconds: int = 480, scale: float = 0.35
) -> tuple[list[tuple[str, str, int]], dict[str, ComponentSeries]]:
    """An 8-minute window around the biggest burst of a bursty trace (true lags 15 s and 25 s), each
    second's requests thinned to `scale` as bench/scaling.py replays them, CPU from those requests:
    mostly counting noise, as the coordinator sees a lightly loaded pipeline."""
    trace = generate(TraceSpec(REGIMES["bursty"], seed, duration_s=3600))
    smooth = np.convolve(trace.offered, np.ones(10) / 10, mode="same")
    lo = int(np.argmax(smooth[seconds:-seconds])) + seconds // 2
    rng = np.random.default_rng(seed)
    out = {}
    for name, c in trace.components.items():
        part = c.window(lo, lo + seconds)
        rate = rng.binomial(part.rate.astype(np.int64), scale).astype(np.float64)
        cpu = 0.005 + 0.002 * rate * np.exp(rng.normal(0.0, 0.05, seconds))
        out[name] = replace(part, rate=rate, cpu=cpu)
    return trace.edges, out


@pytest.mark.parametrize("seed", [2, 3, 5, 8])
def test_finds_a_25_s_lead_in_a_short_noisy_window(seed: int) -> None:
    edges, series = _thinned_window(seed)
    assert [lag for _, _, lag in edges] == [15, 25]
    config = CorrelationConfig(max_lag_s=40, downstream_metrics=("cpu",))
    for up, down, true_lag in edges:
        link = lead(pair_links(up, series[up], down, series[down], config))
        assert link is not None, (up, down)
        assert abs(link.lag_s - true_lag) <= 1, (up, down, link)
