"""An in-process Agent wired to the test containerd and registries, in a namespace of its own."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from agent.app import Agent
from agent.config import AgentConfig, ContainerdConfig, PullConfig, RegistryConfig, RuntimeConfig
from core.errors import FerrymanError
from tests.harness.containerd import PrivateContainerd


def agent_config(
    ctrd: PrivateContainerd,
    registries: Sequence[RegistryConfig],
    workdir: Path,
    namespace: str | None = None,
    pull: PullConfig | None = None,
) -> AgentConfig:
    return AgentConfig(
        host_name="test-host",
        state_dir=str(workdir / "state"),
        containerd=ContainerdConfig(
            socket=ctrd.socket, namespace=namespace or f"t-{secrets.token_hex(4)}", runc_root=str(ctrd.runc_root)
        ),
        registries=tuple(registries),
        pull=pull or PullConfig(read_timeout=10.0, retries=2),
        runtime=RuntimeConfig(log_dir=str(workdir / "logs"), stop_timeout=5.0, cgroup_parent=ctrd.cgroup_parent),
    )


@contextlib.asynccontextmanager
async def running_agent(config: AgentConfig, *, keep: bool = False) -> AsyncIterator[Agent]:
    """An Agent that, on exit, removes every container and image it made in its namespace; with
    `keep`, it leaves them (and its containers' tasks running), as a stopped daemon does."""
    agent = await Agent.open(config)
    try:
        yield agent
    finally:
        try:
            if not keep:
                await _remove_everything(agent)
        finally:
            await agent.close()


async def _remove_everything(agent: Agent) -> None:
    for c in await agent.containers.list():
        with contextlib.suppress(FerrymanError):
            await agent.containers.delete(c.id, force=True)
    for image in await agent.images.list():
        with contextlib.suppress(FerrymanError):
            await agent.images.remove(image.name)
