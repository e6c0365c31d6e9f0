"""The deployments' narrow storage protocol: one record per deployment, written whole.

Only the deployment service (coordinator/deployments/service.py) writes these records, one
deployment at a time from one task, so a put is a plain upsert; `sqlite_store.py` implements it
(schema version 4). A backend on a distributed store keeps one key per deployment.
"""

from __future__ import annotations

from typing import Protocol

from coordinator.deployments.states import DeploymentRecord


class DeploymentStore(Protocol):
    async def put_deployment(self, record: DeploymentRecord) -> None:
        """Insert or replace the record with its id."""
        ...

    async def get_deployment(self, deployment_id: str) -> DeploymentRecord | None: ...

    async def list_deployments(self) -> list[DeploymentRecord]:
        """Every deployment, oldest first."""
        ...
