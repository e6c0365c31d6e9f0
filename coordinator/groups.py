"""Volume groups as the coordinator sees them: the containers of one host that share a volume
(agent/runtime/volumes.py) migrate together, with the volume (agent/migration/group.py). Pure.

The coordinator learns who mounts what from the `io.ferryman.volumes` label its hosts' telemetry
reports. A migration of any member is one migration of the group: its record (the lead) drives it,
and every other member gets a record of its own (a follower, `requested_by` "group:<lead id>") that
the lead's driver keeps in step, so each container's history, and the deployments that follow
their components through migrations, see it move like any other container.
"""

from __future__ import annotations

from collections.abc import Sequence

from coordinator.model import ContainerUsage, Migration

LABEL_VOLUMES = "io.ferryman.volumes"
"""The agent's label: the shared volumes a container mounts, comma-separated (agent/model.py)."""
FOLLOWER_PREFIX = "group:"


def volumes_of(container: ContainerUsage) -> set[str]:
    return {v for v in container.labels.get(LABEL_VOLUMES, "").split(",") if v}


def volume_group(container: str, running: Sequence[ContainerUsage]) -> list[str]:
    """`container` and every container of `running` (its host's) that shares a volume with it,
    transitively: `container` first, then sorted. Just `[container]` when it mounts none."""
    mounts = {c.id: volumes_of(c) for c in running}
    members, volumes = {container}, set(mounts.get(container, ()))
    grew = True
    while grew:
        grew = False
        for other, mounted in mounts.items():
            if other not in members and volumes & mounted:
                members.add(other)
                volumes |= mounted
                grew = True
    return [container, *sorted(members - {container})]


def follower_tag(lead_id: str) -> str:
    """The `requested_by` of a group member's record that the lead `lead_id` drives."""
    return FOLLOWER_PREFIX + lead_id


def lead_of(migration: Migration) -> str | None:
    """The lead's id when `migration` is a follower, else None."""
    if migration.requested_by.startswith(FOLLOWER_PREFIX):
        return migration.requested_by[len(FOLLOWER_PREFIX) :]
    return None


def group_outcome(states: Sequence[str]) -> str | None:
    """The agents' terminal state of a group from its members' (COMMIT, ROLLBACK, NEEDS_OPERATOR),
    or None while any member still runs: COMMIT only when all committed; otherwise a rollback
    (the members decide together, so a mix means one of them needs an operator)."""
    if not states or any(s not in ("COMMIT", "ROLLBACK", "NEEDS_OPERATOR") for s in states):
        return None
    if all(s == "COMMIT" for s in states):
        return "COMMIT"
    if all(s == "ROLLBACK" for s in states):
        return "ROLLBACK"
    return "NEEDS_OPERATOR"
