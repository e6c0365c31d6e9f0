"""The correlation engine: which upstream metrics lead which downstream metric, by what lag, and how sure.

For one upstream/downstream pair of components (an edge of a deployment or chain), every pair of
metrics (upstream m_u, downstream m_d, METRICS x METRICS) is tested on the components' per-second
series over the same window:

1. **Prewhitened, as normal scores.** An autoregressive model of order `ar_order` is fitted to the
   upstream series (`statsmodels.tsa.ar_model.AutoReg`) and both series are passed through its filter
   (Box-Jenkins prewhitening): the upstream becomes white noise, so a wave, a trend or a burst's
   plateau shared by two components no longer correlates them at every lag, while what upstream
   adds at time t still shows downstream at t + lag. Per-second request counts are mostly counting
   noise; first differences would double that noise and leave a 25 s lead's correlation at the
   threshold over an 8-minute window, prewhitening keeps it well above. The filtered series are
   then replaced by their normal scores (rank-based, van der Waerden): spiky series such as errors
   otherwise pass the tests below on a few coincident spikes of two unrelated components.
2. **Cross-correlation** (`statsmodels.tsa.stattools.ccf`): r(k) = corr(d_{t+k}, u_t) for k in
   1..max_lag; the candidate lag is the k with the largest |r(k)|. It counts only if |r| is above the
   threshold two independent series would pass with probability alpha/M over all lags (M metric
   pairs): the normal quantile times Bartlett's standard error, sqrt((1 + 2 sum_j acf_u(j) acf_d(j)) / n),
   which allows for each series' own autocorrelation.
3. **Granger test** (`statsmodels.tsa.stattools.grangercausalitytests`, the SSR F test) with the
   candidate lag as the order: do the last k seconds of the upstream change predict the downstream
   change beyond its own past? Its p-value must also be below alpha/M.

A link is the two together: the lag, the correlation (strength) and the Granger p-value (confidence).
alpha is then a bound on the chance that two independent components show any link at all
(Bonferroni over metric pairs and lags). Pure CPU work: the coordinator runs it off the event loop.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import norm, rankdata
from statsmodels.tsa.ar_model import AutoReg
from statsmodels.tsa.filters.filtertools import convolution_filter
from statsmodels.tsa.stattools import acf, ccf, grangercausalitytests

from coordinator.scaling.series import METRICS, Array, ComponentSeries


@dataclass(frozen=True)
class CorrelationConfig:
    max_lag_s: int = 60
    """Longest lead looked for, seconds."""
    alpha: float = 0.01
    """Bound on the chance that two independent components show any link (per component pair)."""
    upstream_metrics: tuple[str, ...] = METRICS
    downstream_metrics: tuple[str, ...] = METRICS
    min_samples: int = 300
    """Fewer seconds than this (or than 5x max_lag) is too little to say anything."""
    ar_order: int = 10
    """Order of the upstream's autoregressive model that prewhitens both series."""

    def __post_init__(self) -> None:
        if self.max_lag_s < 1:
            raise ValueError(f"max_lag_s must be >= 1, not {self.max_lag_s}")
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), not {self.alpha}")
        if self.ar_order < 1:
            raise ValueError(f"ar_order must be >= 1, not {self.ar_order}")
        unknown = set(self.upstream_metrics + self.downstream_metrics) - set(METRICS)
        if unknown:
            raise ValueError(f"unknown metrics {sorted(unknown)} (known: {', '.join(METRICS)})")


@dataclass(frozen=True)
class Link:
    """One upstream metric leading one downstream metric."""

    upstream: str
    upstream_metric: str
    downstream: str
    downstream_metric: str
    lag_s: int
    """The upstream change shows downstream this many seconds later."""
    correlation: float
    """r at the lag, of the prewhitened series (signed; its size is the strength)."""
    threshold: float
    """|r| two independent series exceed with probability alpha/M over all lags."""
    granger_p: float
    """The Granger SSR F test's p-value at the lag (NaN when the correlation did not pass)."""
    significant: bool

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


FLAT = 1e-9
"""A series whose range is within this share of its largest value is taken as constant."""


class NotEnoughData(ValueError):
    """The window is too short, or the two series are not the same seconds."""


def _normal_scores(x: Array, scale: float) -> Array:
    """x replaced by its normal scores (ties share their mean rank); zeros for an x flat against
    `scale`, the size of the series it was filtered from."""
    if np.ptp(x) <= FLAT * scale:
        # Flat up to rounding (a constant through the AR filter): ranks would spread the rounding
        # over the whole normal range, and the Granger test cannot use a constant column.
        return np.zeros_like(x)
    ranks = rankdata(x)
    return np.asarray(norm.ppf((ranks - 0.5) / len(x)), np.float64)


def _prewhitened(u: Array, d: Array, order: int) -> tuple[Array, Array]:
    """u and d through the filter that turns u into white noise (u's AR model), as normal scores."""
    u = np.asarray(u, np.float64) - float(np.mean(u))
    d = np.asarray(d, np.float64) - float(np.mean(d))
    if np.std(u) == 0:
        return u[order:], d[order:]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # near-singular fits on almost flat series: the filter still holds
        phi = np.asarray(AutoReg(u, lags=order, trend="n").fit().params, np.float64)
    taps = np.concatenate([[1.0], -phi])
    wu = np.asarray(convolution_filter(u, taps, nsides=1), np.float64)[order:]
    wd = np.asarray(convolution_filter(d, taps, nsides=1), np.float64)[order:]
    return _normal_scores(wu, float(np.max(np.abs(u)))), _normal_scores(wd, float(np.max(np.abs(d))))


def _bartlett_se(u: Array, d: Array, n: int, nlags: int) -> float:
    """Standard error of a cross-correlation between two independent autocorrelated series."""
    if np.std(u) == 0 or np.std(d) == 0:
        return 1.0 / math.sqrt(n)
    au = acf(u, nlags=nlags, fft=True)[1:]
    ad = acf(d, nlags=nlags, fft=True)[1:]
    return math.sqrt(max(1.0 + 2.0 * float(np.dot(au, ad)), 1.0) / n)


def _granger_p(d: Array, u: Array, lag: int) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # statsmodels warns about its verbose argument across versions
        result = grangercausalitytests(np.column_stack([d, u]), maxlag=[lag])
    return float(result[lag][0]["ssr_ftest"][1])


def metric_link(
    upstream: str,
    u_metric: str,
    u: Array,
    downstream: str,
    d_metric: str,
    d: Array,
    config: CorrelationConfig,
    tests: int,
) -> Link:
    """The best lag of upstream series u against downstream series d (raw, per second), `tests`
    metric pairs sharing the error budget."""
    du, dd = _prewhitened(u, d, config.ar_order)
    n = len(du)
    quantile = float(norm.ppf(1.0 - config.alpha / (2.0 * tests * config.max_lag_s)))
    threshold = quantile * _bartlett_se(du, dd, n, config.max_lag_s)
    if np.std(du) == 0 or np.std(dd) == 0:
        return Link(upstream, u_metric, downstream, d_metric, 0, 0.0, threshold, math.nan, False)
    r = np.asarray(ccf(dd, du, adjusted=False, nlags=config.max_lag_s + 1), np.float64)
    lag = 1 + int(np.argmax(np.abs(r[1:])))
    corr = float(r[lag])
    if abs(corr) <= threshold:
        return Link(upstream, u_metric, downstream, d_metric, lag, corr, threshold, math.nan, False)
    p = _granger_p(dd, du, lag)
    return Link(upstream, u_metric, downstream, d_metric, lag, corr, threshold, p, p < config.alpha / tests)


def pair_links(
    upstream: str,
    up: ComponentSeries,
    downstream: str,
    down: ComponentSeries,
    config: CorrelationConfig | None = None,
) -> list[Link]:
    """Every metric pair's best lag for one component pair, significant ones first, strongest first."""
    config = config or CorrelationConfig()
    if len(up) != len(down):
        raise NotEnoughData(f"{upstream} has {len(up)} s of metrics, {downstream} {len(down)} s: not the same window")
    need = max(config.min_samples, 5 * config.max_lag_s)
    if len(up) < need:
        raise NotEnoughData(f"{len(up)} s of metrics; the correlation needs at least {need}")
    tests = len(config.upstream_metrics) * len(config.downstream_metrics)
    links = [
        metric_link(upstream, mu, up.metric(mu), downstream, md, down.metric(md), config, tests)
        for mu in config.upstream_metrics
        for md in config.downstream_metrics
    ]
    return sorted(links, key=lambda link: (not link.significant, -abs(link.correlation)))


def lead(links: Sequence[Link], downstream_metric: str = "cpu") -> Link | None:
    """The strongest significant link into `downstream_metric`: the lag the scaling model uses."""
    for link in links:  # pair_links' order: significant first, strongest first
        if link.significant and link.downstream_metric == downstream_metric:
            return link
    return None


def explain(
    edges: Sequence[tuple[str, str]],
    series: Mapping[str, ComponentSeries],
    config: CorrelationConfig | None = None,
) -> dict[tuple[str, str], list[Link]]:
    """The significant links of every (upstream, downstream) edge."""
    out: dict[tuple[str, str], list[Link]] = {}
    for up, down in edges:
        missing = [c for c in (up, down) if c not in series]
        if missing:
            raise NotEnoughData(f"no metrics for {', '.join(missing)}")
        out[(up, down)] = [lk for lk in pair_links(up, series[up], down, series[down], config) if lk.significant]
    return out
