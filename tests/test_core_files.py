"""core/files.py: crash-safe writes and paths confined to their directory."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from agent.migration.journal import Journal
from agent.migration.record import MigrationId, MigrationRecord
from core.errors import InvalidRequest
from core.files import atomic_write, confined


def test_atomic_write_replaces_whole_files_with_the_mode_asked(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "state.json"
    atomic_write(target, "one")
    atomic_write(target, b"two", mode=0o600)
    assert target.read_bytes() == b"two"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in target.parent.iterdir()] == ["state.json"]  # no temp file left


def test_confined_paths_never_leave_their_root(tmp_path: Path) -> None:
    root = tmp_path / "work"
    root.mkdir()
    assert confined(root, "mig-1", "images") == root.resolve() / "mig-1" / "images"
    for parts in (("..",), ("../x",), ("a", "..", "..", "x"), ("/etc/passwd",), (".",)):
        with pytest.raises(InvalidRequest):
            confined(root, *parts)
    (root / "escape").symlink_to("/")  # a symlink already there: resolving sees through it
    with pytest.raises(InvalidRequest):
        confined(root, "escape", "etc")


async def test_the_journal_refuses_a_record_that_would_land_outside_it(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "migrations")
    with pytest.raises(InvalidRequest):
        await journal.write(MigrationRecord(id=MigrationId("../../x"), role="target", container="c", peer="h1"))
    assert not (tmp_path / "x.json").exists() and not (tmp_path.parent / "x.json").exists()
