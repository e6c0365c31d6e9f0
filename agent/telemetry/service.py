"""The telemetry loop: sample every period, export the sample as metrics, hand it to the pusher."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from agent.metrics import AgentMetrics
from agent.telemetry.push import TelemetryPusher
from agent.telemetry.sampler import Sampler
from proto.ferryman.v1 import fleet_pb2 as pb

log = logging.getLogger(__name__)


class TelemetryService:
    def __init__(
        self, sampler: Sampler, metrics: AgentMetrics, period: float, pusher: TelemetryPusher | None = None
    ) -> None:
        self.sampler = sampler
        self.metrics = metrics
        self.period = period
        self.pusher = pusher
        """None when no coordinator is configured: samples only become metrics."""
        self.latest: pb.TelemetrySample | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.pusher is not None:
            await self.pusher.start()
        self._task = asyncio.create_task(self._run(), name="telemetry-sampler")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.sampler.close()
        if self.pusher is not None:
            await self.pusher.close()

    def layers_changed(self) -> None:
        """Register again with the next push: the registration lists the layers this host holds."""
        if self.pusher is not None:
            self.pusher.registered = False

    async def tick(self) -> pb.TelemetrySample:
        """Take one sample and pass it on (the loop's body; tests call it directly too)."""
        sample = await self.sampler.sample()
        self.latest = sample
        self.metrics.observe_sample(sample)
        if self.pusher is not None:
            self.pusher.offer(sample)
        return sample

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            try:
                await self.tick()
            except Exception:
                # A bad reading must not end telemetry for the life of the agent.
                log.exception("telemetry sample failed")
            due += self.period
            now = loop.time()
            if due < now:  # fell behind (a stalled host): skip the missed ticks instead of bursting
                due = now + self.period
            await asyncio.sleep(due - now)
