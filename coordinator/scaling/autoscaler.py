"""The leader's predictive scaling round: per downstream component, a `decide` from the model's
prediction, recorded with its inputs, applied through the deployment's replica scale.

Each round (every `[scaling] period` seconds, when `enabled`), for every HEALTHY or DEGRADED
deployment and every component that another requires (a downstream), the first of its upstreams the
correlation engine finds leading its CPU gives the lag; the model predicts the component's CPU need
at its horizon from the two series (coordinator/scaling/resample.py); `policy.decide` turns need,
prediction and replica counts into a decision, which is kept (the last `HISTORY` per deployment, in
the coordinator's store: a new leader shows them and adds to them) and, if it changes the count and
no scale of that component is under way, handed to the replica service. A component without enough
history is recorded as skipped, with why. The round asks the engine only for the links into CPU
(the one it uses; `explain` shows all), so alpha is shared by 5 metric pairs and a round costs a
fifth of the CPU; the lead's metric, correlation, threshold and Granger p-value are recorded with
the decision (`lead`). A lead the engine found on an edge is kept for
`lead_keep_s` (`[scaling] lead_keep`) while later rounds find none on it (a burst's lead is missed
on some rounds of a short, noisy window; the lag itself changes slowly): such a decision records
the kept lead, when it was found and its age (`lead_kept`); a lead found with another lag replaces
it. One without a leading upstream (none found, none kept) is decided on the naive
forecast (its need now), said in the reason; so is one whose pairs have too little history for
the engine yet (a new deployment), on its own CPU series. One without any usage yet is skipped.

Each deployment follows one policy, `predictive` by default; `reactive` (set through
`PUT /v1/scaling/{id}/policy`, kept in the store) makes the same round compute each
downstream component's count the way the Kubernetes HPA does (coordinator/scaling/hpa.py: a pass every
15 s on the component's mean CPU over the last 15 s, 70 % of each replica's CPU limit as the target,
no standbys), applied through the same replica scale: the baseline the benchmark measures against
on the same deployment. `off` records nothing and scales nothing.

The policy and the decisions' state (the predictive hold window, the HPA's last sync and its
recommendations) are in the store too: each round reads a deployment's state at its start and puts
it back at its end, so a new leader continues where the last one stopped (a scale-in held for 40 s
of 60 is held 20 s more, not 60) and follows the policy that was set. Without a store (tests), in
memory.

The model and the engine are CPU work: they run in a thread.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
from collections.abc import Callable, Collection
from typing import Any, Protocol

import numpy as np

from coordinator.deployments.states import TERMINAL, WATCHED, DeploymentRecord, ReplicaState
from coordinator.scaling.correlation import CorrelationConfig
from coordinator.scaling.hpa import HpaConfig, HpaState, hpa_step
from coordinator.scaling.model import ScalingModel
from coordinator.scaling.policy import Action, ScalingConfig, ScalingInputs, ScalingState, decide
from coordinator.scaling.resample import Span, per_second, shared_span, span
from coordinator.scaling.service import Behaviour, edges, explain_pair
from core.errors import FerrymanError, InvalidRequest

log = logging.getLogger(__name__)

HISTORY = 200
"""Decisions kept per deployment."""
POLICIES = ("predictive", "reactive", "off")
LINK_RECORDED = ("upstream_metric", "correlation", "threshold", "granger_p")
"""What a decision records of the engine's lead (its lag is recorded as `lag_s`)."""
REACTIVE_WINDOW_S = 15
"""Seconds of CPU the reactive pass averages (the metrics the HPA reads are such a window)."""


class DeploymentList(Protocol):
    async def all(self) -> list[DeploymentRecord]: ...


class ScalingStore(Protocol):
    """The coordinator store's part for decisions (coordinator/store.py ScalingStore)."""

    async def record_scaling_decision(self, deployment: str, entry: dict[str, Any], keep: int) -> None: ...
    async def scaling_decisions(self, deployment: str) -> list[dict[str, Any]]: ...
    async def forget_scaling_decisions(self, deployment: str) -> None: ...
    async def put_scaling_policy(self, deployment: str, policy: str) -> None: ...
    async def scaling_policy(self, deployment: str) -> str | None: ...
    async def put_scaling_state(self, deployment: str, state: dict[str, Any]) -> None: ...
    async def scaling_state(self, deployment: str) -> dict[str, Any] | None: ...


class Replicas(Protocol):
    async def scale(
        self,
        deployment_id: str,
        name: str,
        replicas: int,
        drain_timeout: float | None = None,
        standbys: int | None = None,
    ) -> DeploymentRecord: ...

    def scaling(self, deployment_id: str, name: str | None = None, standbys: bool = True) -> bool:
        """Whether a scale is under way; with `standbys` False, not counting standbys being started."""
        ...

    def cold_start(self, deployment_id: str, name: str) -> float | None:
        """The component's measured cold start (scale request to replica healthy); None before one."""
        ...

    def starting_standbys(self, deployment_id: str, name: str) -> tuple[int, ...]:
        """Indexes of the component's standbys being started (listed as starting until frozen)."""
        ...


@dataclasses.dataclass(frozen=True)
class ReplicaCounts:
    serving: int
    """Copies in the balancer, the component's own container counting as one."""
    starting: int
    """Copies started and not serving yet (standbys being started are not copies)."""
    standbys: int
    """Frozen standbys, ready to thaw."""
    standbys_starting: int = 0
    """Standbys being started: frozen once healthy, not copies while they start."""


def replica_counts(record: DeploymentRecord, name: str, starting_standbys: Collection[int] = ()) -> ReplicaCounts:
    """A component's copies and standbys. A standby being started is listed as a starting replica;
    counted as a copy, the next decision would take the count as already one higher (and a scale to
    it would start a copy it never asked for)."""
    component = record.component(name)
    starting = [r.index for r in component.replicas if r.state is ReplicaState.STARTING]
    return ReplicaCounts(
        serving=1 + sum(r.state is ReplicaState.SERVING for r in component.replicas),
        starting=sum(i not in starting_standbys for i in starting),
        standbys=sum(r.state is ReplicaState.STANDBY for r in component.replicas),
        standbys_starting=sum(i in starting_standbys for i in starting),
    )


def _infer(
    model: ScalingModel,
    up: dict[str, Any],
    down: dict[str, Any],
    upstream: str,
    downstream: str,
    config: CorrelationConfig,
    kept_lag: int | None = None,
) -> dict[str, Any]:
    """The lead and the prediction for one edge (CPU work): {"skip": why} or lag, need now, predicted,
    and `last_ts`, the time of the last second they were read at. `kept_lag`: the lead an earlier
    round found on this edge, still kept; used (with `"kept": True`) when the engine names none now."""
    answer = explain_pair(upstream, up, downstream, down, config)
    if answer["status"] != "ok":
        own = span(down)
        if own is None or own.seconds < 1:
            return {"skip": answer["message"]}
        # Too little history for a lead (a new deployment): the naive forecast on the component's
        # own CPU, as the reactive policy would see it, so a component overloaded now still scales.
        now = float(per_second(down, own).cpu[-1])
        return {"naive": answer["message"], "need_now": now, "predicted_need": now, "last_ts": _last(own)}
    window = shared_span(up, down)
    assert window is not None  # explain_pair answered ok
    if answer["lead"] is None and kept_lag is None:
        # Nothing upstream tells the future: the naive forecast (the need stays as it is now), so a
        # component overloaded now still gets replicas.
        now = float(per_second(down, window).cpu[-1])
        return {
            "naive": f"no metric of {upstream} leads {downstream}'s cpu",
            "need_now": now,
            "predicted_need": now,
            "last_ts": _last(window),
        }
    up_s, down_s = per_second(up, window), per_second(down, window)
    kept = answer["lead"] is None
    lag = int(kept_lag if kept_lag is not None and kept else answer["lead"]["lag_s"])
    last = np.array([len(down_s) - 1], np.int64)
    predicted = float(model.predict_need(up_s, down_s, lag, last)[0])
    return {
        "lag_s": lag,
        "kept": kept,
        "link": None if kept else {k: answer["lead"][k] for k in LINK_RECORDED},
        "need_now": float(down_s.cpu[-1]),
        "predicted_need": max(0.0, predicted),
        "last_ts": _last(window),
    }


def _last(window: Span) -> float:
    """The time of a window's last whole second (per_second's last value)."""
    return window.start + window.seconds - 1


class Autoscaler:
    def __init__(
        self,
        deployments: DeploymentList,
        behaviour: Behaviour,
        replicas: Replicas,
        model: ScalingModel,
        policy: ScalingConfig,
        correlation: CorrelationConfig,
        cold_start_s: float,
        clock: Callable[[], float],
        utilization: float = 1.0,
        store: ScalingStore | None = None,
        period_s: float = 0.0,
        lead_keep_s: float = 0.0,
    ) -> None:
        """`utilization`: the share of a replica's CPU limit its `policy.replica_capacity` is (the
        reactive pass targets 70 % of the limit itself, as the HPA does). `store`: where decisions
        are kept (the coordinator's, so a new leader shows them); None: in memory. `period_s`: the
        seconds between two rounds (a need the prediction misses now is seen that much later).
        `lead_keep_s`: how long a lead the engine found on an edge is kept while later rounds find
        none on it (0: not kept)."""
        self._deployments = deployments
        self._behaviour = behaviour
        self._replicas = replicas
        self._model = model
        self._policy = policy
        # A round uses only the leads into CPU: the engine tests those alone, so its error budget
        # (alpha) is shared by 5 metric pairs, not 25, and a round costs a fifth of the CPU (about
        # 0.2 s an edge over a 10-minute window, where the 25 pairs cost 0.8 s, every period).
        self._correlation = dataclasses.replace(correlation, downstream_metrics=("cpu",))
        self._cold_start_s = cold_start_s
        self._clock = clock
        self._utilization = utilization
        self._store = store
        self._period_s = period_s
        self._recorded: set[str] = set()
        self._states: dict[tuple[str, str], ScalingState] = {}
        self._hpa: dict[tuple[str, str], HpaState] = {}
        self._policies: dict[str, str] = {}
        self._history: dict[str, collections.deque[dict[str, Any]]] = {}
        self._leads: dict[tuple[str, str, str], tuple[float, int]] = {}
        """(deployment, upstream, downstream) -> (when, lag) of the last lead the engine found."""
        self._lead_keep_s = lead_keep_s

    @property
    def model(self) -> ScalingModel:
        """The scaling model served now."""
        return self._model

    def use_model(self, model: ScalingModel) -> None:
        """Serve `model` from the next decision on (a retrained one, coordinator/scaling/retraining.py)."""
        self._model = model

    async def policy(self, deployment_id: str) -> str:
        if self._store is not None:
            kept = await self._store.scaling_policy(deployment_id)
            return kept if kept in POLICIES else POLICIES[0]
        return self._policies.get(deployment_id, POLICIES[0])

    async def set_policy(self, deployment_id: str, policy: str) -> None:
        """Follow `policy` for the deployment from the next round on, its decisions' state started
        again (InvalidRequest for another name)."""
        if policy not in POLICIES:
            raise InvalidRequest(f"policy: expected one of {', '.join(POLICIES)}, got {policy!r}")
        self._forget_state(deployment_id)
        if self._store is not None:
            await self._store.put_scaling_policy(deployment_id, policy)
            await self._store.put_scaling_state(deployment_id, {})
        else:
            self._policies[deployment_id] = policy

    def _forget_state(self, deployment_id: str) -> None:
        for key in [k for k in (*self._states, *self._hpa) if k[0] == deployment_id]:
            self._states.pop(key, None)
            self._hpa.pop(key, None)

    async def _load_state(self, deployment_id: str, policy: str) -> None:
        """The deployment's decisions' state as the store has it (another leader may have put it);
        a state kept under another policy is not this one's."""
        if self._store is None:
            return
        self._forget_state(deployment_id)
        kept = await self._store.scaling_state(deployment_id) or {}
        if kept.get("policy") != policy:
            return
        for name, state in kept.get("components", {}).items():
            if "predictive" in state:
                self._states[(deployment_id, name)] = ScalingState.from_storage(state["predictive"])
            if "hpa" in state:
                self._hpa[(deployment_id, name)] = HpaState.from_storage(state["hpa"])

    async def _save_state(self, deployment_id: str, policy: str) -> None:
        if self._store is None:
            return
        components: dict[str, dict[str, Any]] = {}
        for (d, name), state in self._states.items():
            if d == deployment_id:
                components.setdefault(name, {})["predictive"] = state.for_storage()
        for (d, name), hpa in self._hpa.items():
            if d == deployment_id:
                components.setdefault(name, {})["hpa"] = hpa.for_storage()
        await self._store.put_scaling_state(deployment_id, {"policy": policy, "components": components})

    async def history(self, deployment_id: str) -> list[dict[str, Any]]:
        """Its decisions, oldest first."""
        if self._store is not None:
            return await self._store.scaling_decisions(deployment_id)
        return list(self._history.get(deployment_id, ()))

    async def status(self, deployment_id: str) -> dict[str, dict[str, Any]]:
        """Per component, its last decision."""
        last: dict[str, dict[str, Any]] = {}
        for entry in await self.history(deployment_id):
            last[entry["component"]] = entry
        return last

    async def round(self) -> list[dict[str, Any]]:
        """One decision per downstream component of every watched deployment; the entries recorded."""
        out = []
        live = set()
        for record in await self._deployments.all():
            if record.state in TERMINAL and record.id in self._recorded and self._store is not None:
                await self._store.forget_scaling_decisions(record.id)
                self._recorded.discard(record.id)
            if record.state not in WATCHED:
                continue
            live.add(record.id)
            downstreams: dict[str, list[str]] = {}
            for up, down in edges(record):
                downstreams.setdefault(down, []).append(up)
            policy = await self.policy(record.id)
            if policy == "off":
                continue
            await self._load_state(record.id, policy)
            for down, ups in downstreams.items():
                if policy == "predictive":
                    out.append(await self._component(record, down, ups))
                elif policy == "reactive" and (entry := await self._reactive(record, down)) is not None:
                    out.append(entry)
            await self._save_state(record.id, policy)
        for gone in [d for d in self._history if d not in live]:
            del self._history[gone]
        for key in [k for k in self._states if k[0] not in live]:
            del self._states[key]
        for key in [k for k in self._hpa if k[0] not in live]:
            del self._hpa[key]
        for lead_key in [k for k in self._leads if k[0] not in live]:
            del self._leads[lead_key]
        return out

    async def _reactive(self, record: DeploymentRecord, down: str) -> dict[str, Any] | None:
        """The HPA's pass for one component (None between its 15 s syncs)."""
        now = self._clock()
        behaviour = self._behaviour.of(record.id, down)
        whole = span(behaviour)
        cpu = 0.0
        if whole is not None and whole.seconds > 0:
            cpu_s = per_second(behaviour, whole).cpu
            cpu = float(np.mean(cpu_s[-REACTIVE_WINDOW_S:]))
        counts = replica_counts(record, down, self._replicas.starting_standbys(record.id, down))
        serving, starting, standby = counts.serving, counts.starting, counts.standbys
        config = HpaConfig(
            replica_cores=self._policy.replica_capacity / self._utilization,
            min_replicas=max(1, self._policy.min_replicas),
            max_replicas=self._policy.max_replicas,
        )
        key = (record.id, down)
        decision, self._hpa[key] = hpa_step(
            self._hpa.get(key, HpaState()), now, serving + starting, serving, cpu, config
        )
        if decision is None:
            return None
        entry: dict[str, Any] = {
            "ts": now,
            "deployment": record.id,
            "component": down,
            "policy": "reactive",
            "action": "hold"
            if decision.desired == decision.current
            else ("scale-out" if decision.desired > decision.current else "scale-in"),
            "target": decision.desired,
            "reason": decision.reason,
            "inputs": {"ready": serving, "starting": starting, "cpu_used": cpu, "utilization": decision.utilization},
        }
        if decision.desired != serving + starting or standby:
            entry["applied"] = await self._apply(record.id, down, decision.desired, 0)
        return await self._record(entry)

    async def _apply(self, deployment_id: str, down: str, target: int, standbys: int) -> str:
        # Standbys being started do not hold back a scale (the replica service starts them beside it).
        if self._replicas.scaling(deployment_id, down, standbys=False):
            return f"no: a scale of {down} is under way"
        try:
            await self._replicas.scale(deployment_id, down, target, standbys=standbys)
        except FerrymanError as exc:
            log.warning("scaling decision not applied", extra={"deployment": deployment_id, "error": exc.message})
            return f"no: {exc.message}"
        return f"scaling to {target}, {standbys} standby"

    async def _component(self, record: DeploymentRecord, down: str, ups: list[str]) -> dict[str, Any]:
        now = self._clock()
        entry: dict[str, Any] = {"ts": now, "deployment": record.id, "component": down, "policy": "predictive"}
        down_series = self._behaviour.of(record.id, down)
        inferred: dict[str, Any] = {"skip": "no upstream"}
        naive: dict[str, Any] | None = None
        for up in ups:
            kept = self._kept_lead(record.id, up, down, now)
            inferred = await asyncio.to_thread(
                _infer,
                self._model,
                self._behaviour.of(record.id, up),
                down_series,
                up,
                down,
                self._correlation,
                None if kept is None else kept[1],
            )
            if "lag_s" in inferred and not inferred["kept"]:
                self._leads[(record.id, up, down)] = (now, int(inferred["lag_s"]))
                entry["lead"] = inferred["link"]
            elif "lag_s" in inferred and kept is not None:
                entry["lead_kept"] = {"lag_s": kept[1], "found_at": kept[0], "age_s": now - kept[0]}
            if "naive" in inferred:
                naive = naive or inferred
                continue
            if "skip" not in inferred:
                entry["upstream"] = up
                break
        if "skip" in inferred or "naive" in inferred:
            inferred = naive or inferred
        if "skip" in inferred:
            return await self._record({**entry, "action": "skip", "reason": inferred["skip"]})
        counts = replica_counts(record, down, self._replicas.starting_standbys(record.id, down))
        serving, starting, standby = counts.serving, counts.starting, counts.standbys
        measured = self._replicas.cold_start(record.id, down)
        cold_start = measured if measured is not None else self._cold_start_s
        inputs = ScalingInputs(
            now=now,
            component=down,
            ready=serving,
            starting=starting,
            standbys=standby,
            standbys_starting=counts.standbys_starting,
            need_now=inferred["need_now"],
            predicted_need=inferred["predicted_need"],
            horizon_s=float(self._model.info.horizon_s),
            prediction_error=self._model.info.prediction_error,
            cold_start_s=cold_start,
            warm_start_s=cold_start,
            lead_s=None if "naive" in inferred else float(inferred["lag_s"]),
            data_age_s=max(0.0, now - inferred["last_ts"]),
            period_s=self._period_s,
        )
        decision, self._states[(record.id, down)] = decide(
            inputs, self._states.get((record.id, down), ScalingState()), self._policy
        )
        entry.update(decision.to_dict())
        entry.pop("config", None)
        if "naive" in inferred:
            entry["reason"] = f"{inferred['naive']}: the need now taken as the forecast; {entry['reason']}"
        else:
            entry["lag_s"] = inferred["lag_s"]
            if "lead_kept" in entry:
                kept = entry["lead_kept"]
                entry["reason"] = (
                    f"no lead found this round: the {kept['lag_s']} s lead found {kept['age_s']:.0f} s ago "
                    f"kept (for {self._lead_keep_s:g} s); {entry['reason']}"
                )
        entry["cold_start"] = "measured" if measured is not None else "configured"
        count_changes = decision.action is not Action.HOLD and decision.target != serving + starting
        # Standbys follow the decision's count; warm starts use some of the ones there are. While
        # some are being started the replica service leaves the standbys as they are: a later round.
        standbys_change = not counts.standbys_starting and decision.standbys != standby - decision.warm_starts
        if count_changes or standbys_change:
            target = decision.target if count_changes else serving + starting
            standbys = decision.standbys
            if decision.action is Action.SCALE_OUT:
                # The standbys thawed are topped up by a later round: this scale thaws and starts
                # copies only (the replica service starts standbys beside later scales anyway).
                standbys = min(standbys, standby - decision.warm_starts)
            entry["applied"] = await self._apply(record.id, down, target, standbys)
        return await self._record(entry)

    def _kept_lead(self, deployment_id: str, up: str, down: str, now: float) -> tuple[float, int] | None:
        """The last lead found on the edge, if within `lead_keep_s` (forgotten past it)."""
        found = self._leads.get((deployment_id, up, down))
        if found is None:
            return None
        if now - found[0] > self._lead_keep_s:
            del self._leads[(deployment_id, up, down)]
            return None
        return found

    async def _record(self, entry: dict[str, Any]) -> dict[str, Any]:
        if self._store is not None:
            await self._store.record_scaling_decision(entry["deployment"], entry, HISTORY)
            self._recorded.add(entry["deployment"])
            return entry
        kept = self._history.get(entry["deployment"])
        if kept is None:
            kept = self._history[entry["deployment"]] = collections.deque(maxlen=HISTORY)
        kept.append(entry)
        return entry
