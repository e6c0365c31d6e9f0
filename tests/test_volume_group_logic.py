"""Volume groups' decisions, pure: who moves with whom (agent and coordinator), the group's outcome,
the files that carry volumes, the spec policy's volume mounts, and the members' steps in step
(agent/migration/group.py, coordinator/groups.py, agent/runtime/specpolicy.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.migration.group import (
    GroupBroken,
    MigrationGroup,
    pack_volume,
    unpack_volume,
    volume_file,
    volume_group,
    volume_of_file,
)
from agent.model import CreateRequest, Resources, Volume
from agent.runtime.spec import build_spec
from agent.runtime.specpolicy import SpecRefused, check_restorable_spec
from agent.runtime.volumes import mounts
from coordinator.groups import follower_tag, group_outcome, lead_of
from coordinator.groups import volume_group as coordinator_group
from coordinator.model import ContainerUsage, Migration


def test_a_group_is_every_container_sharing_a_volume_transitively() -> None:
    mounts_of = {"a": {"v1"}, "b": {"v1", "v2"}, "c": {"v2"}, "d": {"v3"}, "e": set()}
    assert volume_group("c", mounts_of) == (["c", "a", "b"], {"v1", "v2"})
    assert volume_group("d", mounts_of) == (["d"], {"v3"})
    assert volume_group("e", mounts_of) == (["e"], set())
    running = [ContainerUsage(id=c, labels={"io.ferryman.volumes": ",".join(sorted(v))}) for c, v in mounts_of.items()]
    assert coordinator_group("a", running) == ["a", "b", "c"]
    assert coordinator_group("e", running) == ["e"]
    assert coordinator_group("gone", running) == ["gone"]


def test_a_group_commits_only_when_every_member_did() -> None:
    assert group_outcome(["COMMIT", "COMMIT"]) == "COMMIT"
    assert group_outcome(["COMMIT", "STOPCOPY"]) is None
    assert group_outcome(["ROLLBACK", "ROLLBACK"]) == "ROLLBACK"
    assert group_outcome(["COMMIT", "ROLLBACK"]) == "NEEDS_OPERATOR"
    assert group_outcome([]) is None
    lead = Migration(id="mig-1", container="a", source="h1")
    follower = Migration(id="mig-2", container="b", source="h1", requested_by=follower_tag("mig-1"))
    assert lead_of(lead) is None and lead_of(follower) == "mig-1"


def test_volumes_travel_as_tars_and_unpack_inside_their_directory(tmp_path: Path) -> None:
    assert volume_of_file(volume_file("d1-detect-1")) == "d1-detect-1"
    assert volume_of_file("pages-1.img") is None
    source = tmp_path / "src"
    (source / "sub").mkdir(parents=True)
    (source / "frame").write_text("detected\n")
    (source / "sub" / "deep").write_text("x")
    tar = tmp_path / volume_file("v")
    pack_volume(source, tar)
    unpack_volume(tar, tmp_path / "dst")
    assert (tmp_path / "dst" / "frame").read_text() == "detected\n"
    assert (tmp_path / "dst" / "sub" / "deep").read_text() == "x"


def test_the_target_accepts_bind_mounts_only_of_the_volumes_the_labels_name() -> None:
    volume = Volume(name="d1-detect-1", path="/shared/frames")
    req = CreateRequest(id="render", image="r/app:1", resources=Resources(cpus=0.5, memory=64 << 20))
    spec = build_spec(
        {"config": {"Cmd": ["/bin/sh"]}},
        req,
        netns_path="/run/netns/fm-render",
        volume_mounts=mounts([volume], [Path("/var/lib/ferryman/volumes/d1-detect-1")]),
    )
    check_restorable_spec(spec, {"d1-detect-1"})
    with pytest.raises(SpecRefused, match="/shared/frames"):
        check_restorable_spec(spec)  # no volume label: a host path of the peer's choosing
    with pytest.raises(SpecRefused, match="/shared/frames"):
        check_restorable_spec(spec, {"other"})
    spec["mounts"][-1]["options"] = ["rbind", "rw", "suid"]
    with pytest.raises(SpecRefused):
        check_restorable_spec(spec, {"d1-detect-1"})


async def test_members_go_on_together_and_one_failure_stops_them_all() -> None:
    group = MigrationGroup(["a", "b"], "a", {})
    both = asyncio.gather(group.all_frozen(), group.all_frozen())
    await asyncio.wait_for(both, 1)
    waiting = asyncio.ensure_future(group.all_restored())
    placed = asyncio.ensure_future(group.volumes_placed())
    await asyncio.sleep(0.01)
    assert not waiting.done()
    group.break_group("b", "restore failed")
    with pytest.raises(GroupBroken, match="b of the volume group failed: restore failed"):
        await asyncio.wait_for(waiting, 1)
    with pytest.raises(GroupBroken):
        await asyncio.wait_for(placed, 1)
    with pytest.raises(GroupBroken):
        await group.all_frozen()  # a member arriving later does not wait
