"""Crash-safe journal of migration records: one JSON file per migration, replaced atomically."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

from agent.migration.record import MigrationId, MigrationRecord
from core.files import atomic_write, confined

log = logging.getLogger(__name__)


class Journal:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, migration_id: MigrationId) -> Path:
        return confined(self.directory, f"{migration_id}.json")

    async def write(self, record: MigrationRecord) -> None:
        """A crash leaves the old or the new record. The fsyncs run in a worker thread: on a busy
        disk they take milliseconds, and a write during the freeze must not stall the event loop
        that carries the migration's stream."""
        data = json.dumps(record.for_storage(), indent=1)
        await asyncio.to_thread(atomic_write, self._path(record.id), data, mode=0o600)

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
