"""Named failpoints in the migration path, for crash and fault tests.

Switched on by the environment of the agent process, never by its config file:
  FERRYMAN_FAILPOINTS="target.restore=exit,source.precopy.round2=sleep:5"
Fault injection is for tests only: it also needs FERRYMAN_TEST_HARNESS=1, which only the test
harness sets. An agent that finds FERRYMAN_FAILPOINTS without it refuses to start (a configuration
error), so a stray variable in a production unit can neither corrupt a stream nor kill a migration.
Actions: exit (the process dies on the spot, like kill -9), error (the step fails), sleep:SECONDS,
until:PATH (the step waits until the file PATH exists: a test holds a step open for exactly as long
as it needs, and releases it by creating the file), and step-specific words a caller asks for with
`action()` (e.g. corrupt).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from pathlib import Path

from core.errors import ConfigError, FerrymanError

log = logging.getLogger(__name__)
ENV = "FERRYMAN_FAILPOINTS"
HARNESS_ENV = "FERRYMAN_TEST_HARNESS"
"""Set to "1" by the test harness only; without it armed failpoints are refused."""


class FailpointError(FerrymanError):
    code = "failpoint"


class FailpointsRefused(ConfigError):
    code = "failpoints_refused"


class Failpoints:
    def __init__(self, spec: Mapping[str, str] | None = None) -> None:
        self._spec = dict(spec or {})

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Failpoints:
        spec: dict[str, str] = {}
        for item in filter(None, (part.strip() for part in environ.get(ENV, "").split(","))):
            name, _, action = item.partition("=")
            spec[name] = action or "error"
        if spec and environ.get(HARNESS_ENV) != "1":
            raise FailpointsRefused(
                f"{ENV} is set, but fault injection is test-only (the test harness also sets {HARNESS_ENV}=1): "
                f"remove {ENV} from the agent's environment"
            )
        if spec:
            log.warning("failpoints armed", extra={"failpoints": spec})
        return cls(spec)

    def action(self, name: str) -> str | None:
        return self._spec.get(name)

    async def hit(self, name: str) -> None:
        action = self._spec.get(name)
        if action is None:
            return
        log.warning("failpoint hit", extra={"failpoint": name, "action": action})
        if action == "exit":
            os._exit(137)
        if action.startswith("sleep:"):
            await asyncio.sleep(float(action.split(":", 1)[1]))
            return
        if action.startswith("until:"):
            release = Path(action.split(":", 1)[1])
            # The release comes from another process (the test): a file, polled; no event to wait on.
            while not await asyncio.to_thread(release.exists):  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            return
        if action == "error":
            raise FailpointError(f"failpoint {name}")
