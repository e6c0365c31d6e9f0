"""The coordinator's scaling service: what leads what in a deployment (`explain`).

For each edge of a deployment's plan (a component and one it requires: the dependent calls the
dependency, so the dependent is upstream and the dependency downstream) the behaviour series the
coordinator keeps are put on whole seconds both components cover (coordinator/scaling/resample.py)
and handed to the correlation engine, off the event loop. An edge whose shared history is shorter
than the engine needs is answered as such, with how many seconds there are and how many it needs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from coordinator.deployments.states import DeploymentRecord
from coordinator.scaling.correlation import CorrelationConfig, NotEnoughData, lead, pair_links
from coordinator.scaling.resample import Span, per_second, shared_span
from core.errors import Conflict

if TYPE_CHECKING:
    from coordinator.scaling.autoscaler import Autoscaler


class Deployments(Protocol):
    async def get(self, deployment_id: str) -> DeploymentRecord: ...


class Behaviour(Protocol):
    def of(self, deployment: str, component: str) -> dict[str, Any]: ...


def edges(record: DeploymentRecord) -> list[tuple[str, str]]:
    """(upstream, downstream) for every requirement in the deployment, in start order."""
    names = {c.name for c in record.components}
    return [(c.name, r) for c in record.components for r in c.requires if r in names]


def needed_seconds(config: CorrelationConfig) -> int:
    """The shortest shared history the engine answers on (pair_links' own bound)."""
    return max(config.min_samples, 5 * config.max_lag_s)


def explain_pair(
    upstream: str,
    up: Mapping[str, Any],
    downstream: str,
    down: Mapping[str, Any],
    config: CorrelationConfig,
) -> dict[str, Any]:
    """One edge's answer: its significant links and the lead into CPU, or why there are none. CPU work."""
    need = needed_seconds(config)
    window = shared_span(up, down)
    have = window.seconds if window is not None else 0
    answer: dict[str, Any] = {"upstream": upstream, "downstream": downstream, "seconds": have, "needed": need}
    if window is None or have < need:
        return {**answer, "status": "not_enough_history", "message": _short(have, need), "links": [], "lead": None}
    try:
        links = pair_links(upstream, per_second(up, window), downstream, per_second(down, window), config)
    except NotEnoughData as exc:
        return {**answer, "status": "not_enough_history", "message": str(exc), "links": [], "lead": None}
    found = [link for link in links if link.significant]
    strongest = lead(found)
    return {
        **answer,
        "status": "ok",
        "window": _window(window),
        "message": f"{len(found)} leading metric pair(s)" if found else "no metric of the upstream leads",
        "links": [link.to_dict() for link in found],
        "lead": strongest.to_dict() if strongest is not None else None,
    }


def _short(have: int, need: int) -> str:
    return f"not enough history: {have} s of {need} needed"


def _window(window: Span) -> dict[str, float]:
    return {"start": window.start, "stop": window.start + window.seconds}


class ScalingService:
    def __init__(
        self,
        deployments: Deployments,
        behaviour: Behaviour,
        correlation: CorrelationConfig,
        autoscaler: Autoscaler | None = None,
    ) -> None:
        """`autoscaler`: the leader's decisions ([scaling] enabled), None when it is off."""
        self._deployments = deployments
        self._behaviour = behaviour
        self._correlation = correlation
        self.autoscaler = autoscaler

    async def status(self, deployment_id: str) -> dict[str, Any]:
        """Per downstream component, the last decision of this coordinator (none while disabled)."""
        record = await self._deployments.get(deployment_id)
        last = await self.autoscaler.status(record.id) if self.autoscaler is not None else {}
        policy = await self.autoscaler.policy(record.id) if self.autoscaler is not None else "off"
        return {"deployment": record.id, "enabled": self.autoscaler is not None, "policy": policy, "components": last}

    async def set_policy(self, deployment_id: str, policy: str) -> dict[str, Any]:
        """Follow `policy` (predictive, reactive, off) for the deployment; Conflict while scaling is off."""
        record = await self._deployments.get(deployment_id)
        if self.autoscaler is None:
            raise Conflict("scaling is off on this coordinator ([scaling] enabled = false)")
        await self.autoscaler.set_policy(record.id, policy)
        return await self.status(record.id)

    async def history(self, deployment_id: str) -> dict[str, Any]:
        """Every decision kept for the deployment, oldest first."""
        record = await self._deployments.get(deployment_id)
        kept = await self.autoscaler.history(record.id) if self.autoscaler is not None else []
        return {"deployment": record.id, "enabled": self.autoscaler is not None, "decisions": kept}

    async def explain(self, deployment_id: str) -> dict[str, Any]:
        """Every edge's leading metrics, lags and confidence (DeploymentNotFound for an unknown id)."""
        record = await self._deployments.get(deployment_id)
        pairs = []
        for up, down in edges(record):
            up_series = self._behaviour.of(record.id, up)
            down_series = self._behaviour.of(record.id, down)
            pairs.append(await asyncio.to_thread(explain_pair, up, up_series, down, down_series, self._correlation))
        return {
            "deployment": record.id,
            "max_lag_s": self._correlation.max_lag_s,
            "alpha": self._correlation.alpha,
            "pairs": pairs,
        }
