"""Crash-safe journal of migration records: one JSON file per migration, replaced atomically."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from agent.migration.record import MigrationId, MigrationRecord

log = logging.getLogger(__name__)


class Journal:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, migration_id: MigrationId) -> Path:
        return self.directory / f"{migration_id}.json"

    def write(self, record: MigrationRecord) -> None:
        """temp file, fsync, rename, fsync the directory: a crash leaves the old or the new record."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self._path(record.id)
        tmp = path.with_suffix(".tmp")
        data = json.dumps(record.for_storage(), indent=1).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(path)
        dir_fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def load(self, migration_id: MigrationId) -> MigrationRecord | None:
        try:
            return MigrationRecord.from_storage(json.loads(self._path(migration_id).read_text()))
        except FileNotFoundError:
            return None

    def all(self) -> list[MigrationRecord]:
        if not self.directory.exists():
            return []
        out = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                out.append(MigrationRecord.from_storage(json.loads(path.read_text())))
            except (ValueError, KeyError, TypeError) as exc:
                # Keep serving: one unreadable record must not hide the others.
                log.error("unreadable migration record", extra={"path": str(path), "error": str(exc)})
        return sorted(out, key=lambda r: r.started_at)
