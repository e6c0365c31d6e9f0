"""The default `Store`: one SQLite database in WAL mode, driven from one dedicated thread.

Every call runs on a single-thread executor that owns the connection, so the event loop never
blocks on disk and writes are serialised. Writes still open `BEGIN IMMEDIATE` transactions: the
reservation check-and-insert must stay atomic even if another process opened the same file.
The schema is versioned with `PRAGMA user_version`; newer files than this code knows are refused.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

from coordinator.catalog.model import Catalog, CatalogChanged, CatalogEntry, CatalogEntryExists
from coordinator.chains.states import ChainRecord
from coordinator.deployments.states import DeploymentRecord
from coordinator.model import (
    Capacity,
    ContainerUsage,
    Decision,
    Drain,
    Host,
    HostAdmin,
    HostHealth,
    HostNotFound,
    InsufficientCapacity,
    Migration,
    MigrationState,
    Prediction,
    Reservation,
    StartRecord,
)
from coordinator.store import ModelSlots, StoredModel, TelemetryUpdate
from core.errors import ConfigError, FerrymanError

T = TypeVar("T")

# Index i holds the script that upgrades user_version i to i + 1. Append only, never edit.
_SCHEMA: tuple[str, ...] = (
    """
    CREATE TABLE hosts (
        name TEXT PRIMARY KEY,
        capacity TEXT NOT NULL,
        peer_address TEXT NOT NULL,
        api_url TEXT NOT NULL,
        labels TEXT NOT NULL,
        agent_version TEXT NOT NULL,
        layer_digests TEXT NOT NULL,
        criu_features TEXT NOT NULL,
        telemetry_period REAL NOT NULL,
        health TEXT NOT NULL,
        admin TEXT NOT NULL,
        registered_at REAL NOT NULL,
        last_heartbeat REAL NOT NULL,
        used TEXT NOT NULL DEFAULT '{}',
        containers TEXT NOT NULL DEFAULT '[]',
        pressure TEXT NOT NULL DEFAULT '{}'
    );
    CREATE TABLE telemetry (
        host TEXT NOT NULL REFERENCES hosts(name) ON DELETE CASCADE,
        ts REAL NOT NULL,
        sample TEXT NOT NULL
    );
    CREATE INDEX telemetry_host_ts ON telemetry(host, ts);
    CREATE TABLE reservations (
        id TEXT PRIMARY KEY,
        host TEXT NOT NULL REFERENCES hosts(name) ON DELETE CASCADE,
        cpu_millis INTEGER NOT NULL,
        memory_bytes INTEGER NOT NULL,
        disk_bytes INTEGER NOT NULL,
        expires_at REAL NOT NULL,
        purpose TEXT NOT NULL,
        created_at REAL NOT NULL,
        held_by_agent INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX reservations_host ON reservations(host, expires_at);
    CREATE TABLE migrations (
        id TEXT PRIMARY KEY,
        container TEXT NOT NULL,
        source TEXT NOT NULL,
        target TEXT NOT NULL,
        state TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        record TEXT NOT NULL
    );
    CREATE INDEX migrations_state ON migrations(state);
    CREATE TABLE migration_states (
        migration TEXT NOT NULL REFERENCES migrations(id) ON DELETE CASCADE,
        state TEXT NOT NULL,
        ts REAL NOT NULL,
        detail TEXT NOT NULL
    );
    CREATE TABLE predictions (
        host TEXT NOT NULL,
        ts REAL NOT NULL,
        probability REAL NOT NULL,
        model_version TEXT NOT NULL
    );
    CREATE INDEX predictions_host_ts ON predictions(host, ts);
    CREATE TABLE decisions (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        ts REAL NOT NULL,
        host TEXT NOT NULL,
        kind TEXT NOT NULL,
        probability REAL,
        model_version TEXT NOT NULL,
        detail TEXT NOT NULL
    );
    CREATE TABLE drains (
        id TEXT PRIMARY KEY,
        host TEXT NOT NULL,
        reason TEXT NOT NULL,
        started_at REAL NOT NULL,
        state TEXT NOT NULL,
        finished_at REAL NOT NULL,
        probability REAL,
        model_version TEXT NOT NULL
    );
    """,
    """
    ALTER TABLE hosts ADD COLUMN blob_address TEXT NOT NULL DEFAULT '';
    """,
    # 3: the catalog (coordinator/catalog/): entries in registration order and one revision counter.
    """
    CREATE TABLE catalog (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL,
        version TEXT NOT NULL,
        entry TEXT NOT NULL,
        UNIQUE (name, version)
    );
    CREATE TABLE catalog_revision (
        id INTEGER PRIMARY KEY CHECK (id = 0),
        revision INTEGER NOT NULL
    );
    INSERT INTO catalog_revision (id, revision) VALUES (0, 0);
    """,
    # 4: deployments (coordinator/deployments/): one record each, as JSON.
    """
    CREATE TABLE deployments (
        id TEXT PRIMARY KEY,
        created_at REAL NOT NULL,
        state TEXT NOT NULL,
        record TEXT NOT NULL
    );
    """,
    # 5: chains (coordinator/chains/): one record each, as JSON, rewritten on every transition.
    """
    CREATE TABLE chains (
        id TEXT PRIMARY KEY,
        created_at REAL NOT NULL,
        state TEXT NOT NULL,
        record TEXT NOT NULL
    );
    """,
    # 6: task starts (the layer predictor's history, coordinator/warm_features.py).
    """
    CREATE TABLE starts (
        host TEXT NOT NULL,
        ts REAL NOT NULL,
        signature TEXT NOT NULL,
        record TEXT NOT NULL
    );
    CREATE INDEX starts_host_ts ON starts(host, ts);
    CREATE INDEX starts_ts ON starts(ts);
    """,
    # 7: the drain models activated at run time (ModelStore): slot "active" and "previous".
    """
    CREATE TABLE models (
        slot TEXT PRIMARY KEY CHECK (slot IN ('active', 'previous')),
        sha256 TEXT NOT NULL,
        data BLOB NOT NULL
    );
    """,
    # scaling decisions with their inputs (ScalingStore), the last few hundred per deployment.
    """
    CREATE TABLE scaling_decisions (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        deployment TEXT NOT NULL,
        record TEXT NOT NULL
    );
    CREATE INDEX scaling_decisions_deployment ON scaling_decisions(deployment, id);
    """,
    # per deployment, the scaling policy and the decisions' state (ScalingStore): a new leader continues them
    """
    CREATE TABLE scaling_state (
        deployment TEXT NOT NULL,
        kind TEXT NOT NULL,
        record TEXT NOT NULL,
        PRIMARY KEY (deployment, kind)
    );
    """,
)
SCHEMA_VERSION = len(_SCHEMA)
PREDICTIONS_KEPT_PER_HOST = 1000


class StoreError(FerrymanError):
    code = "store_error"
    http_status = 500


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def _host_from_row(row: sqlite3.Row) -> Host:
    return Host(
        name=row["name"],
        capacity=Capacity.from_dict(json.loads(row["capacity"])),
        peer_address=row["peer_address"],
        api_url=row["api_url"],
        labels=json.loads(row["labels"]),
        agent_version=row["agent_version"],
        layer_digests=tuple(json.loads(row["layer_digests"])),
        blob_address=row["blob_address"],
        criu_features=json.loads(row["criu_features"]),
        telemetry_period=row["telemetry_period"],
        health=HostHealth(row["health"]),
        admin=HostAdmin(row["admin"]),
        registered_at=row["registered_at"],
        last_heartbeat=row["last_heartbeat"],
        used=Capacity.from_dict(json.loads(row["used"])),
        containers=tuple(ContainerUsage.from_record(c) for c in json.loads(row["containers"])),
        pressure=json.loads(row["pressure"]),
    )


def _start_from_json(text: str) -> StartRecord:
    data = json.loads(text)
    for key in ("layers", "hits", "warm_hits", "sizes"):
        data[key] = tuple(data.get(key, ()))
    return StartRecord(**data)


def _reservation_from_row(row: sqlite3.Row) -> Reservation:
    return Reservation(
        id=row["id"],
        host=row["host"],
        capacity=Capacity(row["cpu_millis"], row["memory_bytes"], row["disk_bytes"]),
        expires_at=row["expires_at"],
        purpose=row["purpose"],
        created_at=row["created_at"],
        held_by_agent=bool(row["held_by_agent"]),
    )


def _migration_from_row(row: sqlite3.Row) -> Migration:
    data = json.loads(row["record"])
    data["state"] = MigrationState(data["state"])
    data["tried_targets"] = tuple(data.get("tried_targets", ()))
    data["history"] = tuple(tuple(h) for h in data.get("history", ()))
    return Migration(**data)


class SqliteStore:
    """`Store` on one SQLite file. Open with `await SqliteStore.open(path)`."""

    def __init__(self, path: Path, executor: ThreadPoolExecutor) -> None:
        self.path = path
        self._executor = executor
        self._conn: sqlite3.Connection | None = None
        self._closed = False

    @classmethod
    async def open(cls, path: str | Path) -> SqliteStore:
        store = cls(Path(path), ThreadPoolExecutor(max_workers=1, thread_name_prefix="coordinator-db"))
        try:
            await store._run(store._open)
        except BaseException:
            store._executor.shutdown(wait=False)
            raise
        return store

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # ----- connection and schema (db thread)

    def _open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=10.0)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"cannot open the database {self.path}: {exc}") from exc
        conn.row_factory = sqlite3.Row
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode != "wal":
                raise ConfigError(f"{self.path}: cannot switch to WAL mode (got {mode})")
            conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
            conn.execute("PRAGMA foreign_keys=ON")
            self._conn = conn
            self._migrate()
        except sqlite3.DatabaseError as exc:
            conn.close()
            self._conn = None
            raise ConfigError(f"{self.path} is not a usable coordinator database: {exc}") from exc
        except BaseException:
            conn.close()
            self._conn = None
            raise

    def _migrate(self) -> None:
        conn = self._db
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise ConfigError(
                f"{self.path} has schema version {version}, newer than this coordinator knows ({SCHEMA_VERSION})"
            )
        for target in range(version, SCHEMA_VERSION):
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _SCHEMA[target].split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version={target + 1}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError("the store is closed")
        return self._conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        conn = self._db
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    async def schema_version(self) -> int:
        return await self._run(lambda: int(self._db.execute("PRAGMA user_version").fetchone()[0]))

    async def close(self) -> None:
        """Close the connection and stop the db thread; a second call does nothing."""
        if self._closed:
            return
        self._closed = True

        def _close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        try:
            await self._run(_close)
        finally:
            self._executor.shutdown(wait=True)

    # ----- hosts

    async def register_host(self, host: Host) -> Host:
        def op() -> Host:
            with self._write() as db:
                db.execute(
                    """INSERT INTO hosts (name, capacity, peer_address, api_url, labels, agent_version, layer_digests,
                           criu_features, telemetry_period, health, admin, registered_at, last_heartbeat,
                           blob_address)
                       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                       ON CONFLICT(name) DO UPDATE SET capacity=excluded.capacity,
                           peer_address=excluded.peer_address, api_url=excluded.api_url, labels=excluded.labels,
                           agent_version=excluded.agent_version, layer_digests=excluded.layer_digests,
                           criu_features=excluded.criu_features, telemetry_period=excluded.telemetry_period,
                           health=excluded.health, registered_at=excluded.registered_at,
                           last_heartbeat=excluded.last_heartbeat, blob_address=excluded.blob_address""",
                    (
                        host.name,
                        _dumps(host.capacity.to_dict()),
                        host.peer_address,
                        host.api_url,
                        _dumps(host.labels),
                        host.agent_version,
                        _dumps(list(host.layer_digests)),
                        _dumps(host.criu_features),
                        host.telemetry_period,
                        HostHealth.READY.value,
                        host.admin.value,
                        host.registered_at,
                        host.last_heartbeat,
                        host.blob_address,
                    ),
                )
                row = db.execute("SELECT * FROM hosts WHERE name = ?", (host.name,)).fetchone()
            return _host_from_row(row)

        return await self._run(op)

    async def get_host(self, name: str) -> Host | None:
        def op() -> Host | None:
            row = self._db.execute("SELECT * FROM hosts WHERE name = ?", (name,)).fetchone()
            return _host_from_row(row) if row else None

        return await self._run(op)

    async def list_hosts(self) -> list[Host]:
        return await self._run(
            lambda: [_host_from_row(r) for r in self._db.execute("SELECT * FROM hosts ORDER BY name")]
        )

    def _update_host(self, name: str, column: str, value: str) -> None:
        with self._write() as db:
            cur = db.execute(f"UPDATE hosts SET {column} = ? WHERE name = ?", (value, name))
            if cur.rowcount == 0:
                raise HostNotFound(f"no host {name!r} is registered")

    async def set_health(self, name: str, health: HostHealth) -> None:
        await self._run(self._update_host, name, "health", health.value)

    async def set_admin(self, name: str, admin: HostAdmin) -> None:
        await self._run(self._update_host, name, "admin", admin.value)

    # ----- telemetry

    async def record_telemetry(self, update: TelemetryUpdate, keep: int, max_age: float) -> int:
        def op() -> int:
            with self._write() as db:
                if update.heartbeat_only:
                    cur = db.execute(
                        "UPDATE hosts SET last_heartbeat = ?, health = ? WHERE name = ?",
                        (update.received_at, HostHealth.READY.value, update.host),
                    )
                else:
                    cur = db.execute(
                        """UPDATE hosts SET last_heartbeat = ?, health = ?, used = ?, containers = ?, pressure = ?
                           WHERE name = ?""",
                        (
                            update.received_at,
                            HostHealth.READY.value,
                            _dumps(update.used.to_dict()),
                            _dumps([asdict(c) for c in update.containers]),
                            _dumps(dict(update.pressure)),
                            update.host,
                        ),
                    )
                if cur.rowcount == 0:
                    raise HostNotFound(f"no host {update.host!r} is registered")
                db.executemany(
                    "INSERT INTO telemetry (host, ts, sample) VALUES (?, ?, ?)",
                    [(update.host, ts, _dumps(sample)) for ts, sample in update.samples],
                )
                # Bounded history: by age, then by count (newest kept).
                db.execute(
                    "DELETE FROM telemetry WHERE host = ? AND ts < ?", (update.host, update.received_at - max_age)
                )
                db.execute(
                    """DELETE FROM telemetry WHERE host = ? AND rowid NOT IN (
                           SELECT rowid FROM telemetry WHERE host = ? ORDER BY ts DESC, rowid DESC LIMIT ?)""",
                    (update.host, update.host, keep),
                )
            return len(update.samples)

        return await self._run(op)

    async def flush_telemetry(self) -> None:
        """Nothing is held back: every push is written at once."""

    async def telemetry(self, host: str, since: float = 0.0) -> list[tuple[float, dict[str, Any]]]:
        def op() -> list[tuple[float, dict[str, Any]]]:
            rows = self._db.execute(
                "SELECT ts, sample FROM telemetry WHERE host = ? AND ts >= ? ORDER BY ts, rowid", (host, since)
            )
            return [(r["ts"], json.loads(r["sample"])) for r in rows]

        return await self._run(op)

    async def telemetry_all(self, since: float = 0.0) -> dict[str, list[tuple[float, dict[str, Any]]]]:
        def op() -> dict[str, list[tuple[float, dict[str, Any]]]]:
            out: dict[str, list[tuple[float, dict[str, Any]]]] = {}
            rows = self._db.execute(
                "SELECT host, ts, sample FROM telemetry WHERE ts >= ? ORDER BY host, ts, rowid", (since,)
            )
            for r in rows:
                out.setdefault(r["host"], []).append((r["ts"], json.loads(r["sample"])))
            return out

        return await self._run(op)

    # ----- reservations

    @staticmethod
    def _free(db: sqlite3.Connection, host: str, now: float) -> Capacity:
        row = db.execute("SELECT capacity, used FROM hosts WHERE name = ?", (host,)).fetchone()
        if row is None:
            raise HostNotFound(f"no host {host!r} is registered")
        held = db.execute(
            """SELECT COALESCE(SUM(cpu_millis), 0), COALESCE(SUM(memory_bytes), 0), COALESCE(SUM(disk_bytes), 0)
               FROM reservations WHERE host = ? AND expires_at > ?""",
            (host, now),
        ).fetchone()
        capacity = Capacity.from_dict(json.loads(row["capacity"]))
        used = Capacity.from_dict(json.loads(row["used"]))
        return capacity - used - Capacity(int(held[0]), int(held[1]), int(held[2]))

    async def reserve(self, reservation: Reservation, now: float) -> Reservation:
        def op() -> Reservation:
            with self._write() as db:
                free = self._free(db, reservation.host, now)
                if not free.fits(reservation.capacity):
                    raise InsufficientCapacity(
                        f"host {reservation.host!r} cannot hold {reservation.capacity.to_dict()}: free {free.to_dict()}"
                    )
                c = reservation.capacity
                db.execute(
                    """INSERT INTO reservations (id, host, cpu_millis, memory_bytes, disk_bytes, expires_at, purpose,
                           created_at, held_by_agent) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                    (
                        reservation.id,
                        reservation.host,
                        c.cpu_millis,
                        c.memory_bytes,
                        c.disk_bytes,
                        reservation.expires_at,
                        reservation.purpose,
                        reservation.created_at,
                        int(reservation.held_by_agent),
                    ),
                )
            return reservation

        return await self._run(op)

    async def free_capacity(self, host: str, now: float) -> Capacity:
        return await self._run(lambda: self._free(self._db, host, now))

    async def mark_held(self, reservation_id: str) -> None:
        def op() -> None:
            with self._write() as db:
                db.execute("UPDATE reservations SET held_by_agent = 1 WHERE id = ?", (reservation_id,))

        await self._run(op)

    async def get_reservation(self, reservation_id: str) -> Reservation | None:
        def op() -> Reservation | None:
            row = self._db.execute("SELECT * FROM reservations WHERE id = ?", (reservation_id,)).fetchone()
            return _reservation_from_row(row) if row else None

        return await self._run(op)

    async def release(self, reservation_id: str) -> Reservation | None:
        def op() -> Reservation | None:
            with self._write() as db:
                row = db.execute("SELECT * FROM reservations WHERE id = ?", (reservation_id,)).fetchone()
                if row is None:
                    return None
                db.execute("DELETE FROM reservations WHERE id = ?", (reservation_id,))
            return _reservation_from_row(row)

        return await self._run(op)

    async def expired_reservations(self, now: float) -> list[Reservation]:
        return await self._run(
            lambda: [
                _reservation_from_row(r)
                for r in self._db.execute(
                    "SELECT * FROM reservations WHERE expires_at <= ? ORDER BY expires_at", (now,)
                )
            ]
        )

    async def list_reservations(self, now: float | None = None) -> list[Reservation]:
        def op() -> list[Reservation]:
            if now is None:
                rows = self._db.execute("SELECT * FROM reservations ORDER BY created_at, id")
            else:
                rows = self._db.execute(
                    "SELECT * FROM reservations WHERE expires_at > ? ORDER BY created_at, id", (now,)
                )
            return [_reservation_from_row(r) for r in rows]

        return await self._run(op)

    # ----- migrations

    async def put_migration(self, migration: Migration) -> None:
        def op() -> None:
            record = migration.to_dict()
            record.pop("done")
            record["history"] = [list(h) for h in migration.history]
            with self._write() as db:
                prev = db.execute("SELECT state FROM migrations WHERE id = ?", (migration.id,)).fetchone()
                db.execute(
                    """INSERT INTO migrations (id, container, source, target, state, created_at, updated_at, record)
                       VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                       ON CONFLICT(id) DO UPDATE SET target=excluded.target, state=excluded.state,
                           updated_at=excluded.updated_at, record=excluded.record""",
                    (
                        migration.id,
                        migration.container,
                        migration.source,
                        migration.target,
                        migration.state.value,
                        migration.created_at,
                        migration.updated_at,
                        _dumps(record),
                    ),
                )
                if prev is None or prev["state"] != migration.state.value:
                    detail = migration.history[-1][2] if migration.history else ""
                    db.execute(
                        "INSERT INTO migration_states (migration, state, ts, detail) VALUES (?, ?, ?, ?)",
                        (migration.id, migration.state.value, migration.updated_at, detail),
                    )

        await self._run(op)

    async def get_migration(self, migration_id: str) -> Migration | None:
        def op() -> Migration | None:
            row = self._db.execute("SELECT record FROM migrations WHERE id = ?", (migration_id,)).fetchone()
            return _migration_from_row(row) if row else None

        return await self._run(op)

    async def list_migrations(self, *, active_only: bool = False) -> list[Migration]:
        def op() -> list[Migration]:
            sql = "SELECT record FROM migrations"
            if active_only:
                sql += " WHERE state NOT IN ('committed', 'abandoned')"
            return [_migration_from_row(r) for r in self._db.execute(sql + " ORDER BY created_at, id")]

        return await self._run(op)

    # ----- predictions, decisions, drains

    async def record_predictions(self, predictions: Sequence[Prediction]) -> None:
        def op() -> None:
            with self._write() as db:
                db.executemany(
                    "INSERT INTO predictions (host, ts, probability, model_version) VALUES (?, ?, ?, ?)",
                    [(p.host, p.ts, p.probability, p.model_version) for p in predictions],
                )
                for host in {p.host for p in predictions}:
                    db.execute(
                        """DELETE FROM predictions WHERE host = ? AND rowid NOT IN (
                               SELECT rowid FROM predictions WHERE host = ? ORDER BY ts DESC LIMIT ?)""",
                        (host, host, PREDICTIONS_KEPT_PER_HOST),
                    )

        await self._run(op)

    async def latest_predictions(self) -> dict[str, Prediction]:
        def op() -> dict[str, Prediction]:
            rows = self._db.execute(
                """SELECT p.host, p.ts, p.probability, p.model_version FROM predictions p
                   JOIN (SELECT host, MAX(ts) AS ts FROM predictions GROUP BY host) m
                   ON p.host = m.host AND p.ts = m.ts"""
            )
            return {r["host"]: Prediction(r["host"], r["ts"], r["probability"], r["model_version"]) for r in rows}

        return await self._run(op)

    async def record_decision(self, decision: Decision) -> Decision:
        def op() -> Decision:
            with self._write() as db:
                cur = db.execute(
                    """INSERT INTO decisions (ts, host, kind, probability, model_version, detail)
                       VALUES (?, ?, ?, ?, ?, ?)""",
                    (
                        decision.ts,
                        decision.host,
                        decision.kind,
                        decision.probability,
                        decision.model_version,
                        decision.detail,
                    ),
                )
            return Decision(**{**asdict(decision), "id": int(cur.lastrowid or 0)})

        return await self._run(op)

    async def list_decisions(self, host: str | None = None, limit: int = 100) -> list[Decision]:
        def op() -> list[Decision]:
            if host is None:
                rows = self._db.execute("SELECT * FROM decisions ORDER BY id DESC LIMIT ?", (limit,))
            else:
                rows = self._db.execute(
                    "SELECT * FROM decisions WHERE host = ? ORDER BY id DESC LIMIT ?", (host, limit)
                )
            return [Decision(**dict(r)) for r in rows]

        return await self._run(op)

    # ----- scaling decisions

    async def record_scaling_decision(self, deployment: str, entry: Mapping[str, Any], keep: int) -> None:
        record = json.dumps(entry, separators=(",", ":"))

        def op() -> None:
            with self._write() as db:
                db.execute("INSERT INTO scaling_decisions (deployment, record) VALUES (?, ?)", (deployment, record))
                db.execute(
                    """DELETE FROM scaling_decisions WHERE deployment = ? AND id <= (
                           SELECT id FROM scaling_decisions WHERE deployment = ? ORDER BY id DESC LIMIT 1 OFFSET ?)""",
                    (deployment, deployment, keep),
                )

        await self._run(op)

    async def scaling_decisions(self, deployment: str) -> list[dict[str, Any]]:
        def op() -> list[dict[str, Any]]:
            rows = self._db.execute(
                "SELECT record FROM scaling_decisions WHERE deployment = ? ORDER BY id", (deployment,)
            )
            return [json.loads(r["record"]) for r in rows]

        return await self._run(op)

    async def put_scaling_policy(self, deployment: str, policy: str) -> None:
        await self._put_scaling("policy", deployment, policy)

    async def scaling_policy(self, deployment: str) -> str | None:
        policy = await self._scaling("policy", deployment)
        return policy if isinstance(policy, str) else None

    async def put_scaling_state(self, deployment: str, state: Mapping[str, Any]) -> None:
        await self._put_scaling("state", deployment, dict(state))

    async def scaling_state(self, deployment: str) -> dict[str, Any] | None:
        state = await self._scaling("state", deployment)
        return state if isinstance(state, dict) else None

    async def _put_scaling(self, kind: str, deployment: str, value: Any) -> None:
        record = json.dumps(value, separators=(",", ":"))

        def op() -> None:
            with self._write() as db:
                db.execute(
                    "INSERT OR REPLACE INTO scaling_state (deployment, kind, record) VALUES (?, ?, ?)",
                    (deployment, kind, record),
                )

        await self._run(op)

    async def _scaling(self, kind: str, deployment: str) -> Any:
        def op() -> Any:
            row = self._db.execute(
                "SELECT record FROM scaling_state WHERE deployment = ? AND kind = ?", (deployment, kind)
            ).fetchone()
            return None if row is None else json.loads(row["record"])

        return await self._run(op)

    async def forget_scaling_decisions(self, deployment: str) -> None:
        def op() -> None:
            with self._write() as db:
                db.execute("DELETE FROM scaling_decisions WHERE deployment = ?", (deployment,))
                db.execute("DELETE FROM scaling_state WHERE deployment = ?", (deployment,))

        await self._run(op)

    # ----- start history

    async def record_start(self, start: StartRecord, keep: int, max_age: float) -> None:
        def op() -> None:
            with self._write() as db:
                db.execute(
                    "INSERT INTO starts (host, ts, signature, record) VALUES (?, ?, ?, ?)",
                    (start.host, start.ts, start.signature, _dumps(asdict(start))),
                )
                db.execute("DELETE FROM starts WHERE host = ? AND ts < ?", (start.host, start.ts - max_age))
                db.execute(
                    """DELETE FROM starts WHERE host = ? AND rowid NOT IN (
                           SELECT rowid FROM starts WHERE host = ? ORDER BY ts DESC, rowid DESC LIMIT ?)""",
                    (start.host, start.host, max(keep, 0)),
                )

        await self._run(op)

    async def starts(self, host: str | None = None, since: float = 0.0) -> list[StartRecord]:
        def op() -> list[StartRecord]:
            if host is None:
                rows = self._db.execute("SELECT record FROM starts WHERE ts >= ? ORDER BY ts, rowid", (since,))
            else:
                rows = self._db.execute(
                    "SELECT record FROM starts WHERE host = ? AND ts >= ? ORDER BY ts, rowid", (host, since)
                )
            return [_start_from_json(r["record"]) for r in rows]

        return await self._run(op)

    async def put_drain(self, drain: Drain) -> None:
        def op() -> None:
            with self._write() as db:
                db.execute(
                    """INSERT INTO drains (id, host, reason, started_at, state, finished_at, probability,
                           model_version) VALUES (?, ?, ?, ?, ?, ?, ?, ?)
                       ON CONFLICT(id) DO UPDATE SET state=excluded.state, finished_at=excluded.finished_at""",
                    (
                        drain.id,
                        drain.host,
                        drain.reason,
                        drain.started_at,
                        drain.state,
                        drain.finished_at,
                        drain.probability,
                        drain.model_version,
                    ),
                )

        await self._run(op)

    async def list_drains(self, host: str | None = None) -> list[Drain]:
        def op() -> list[Drain]:
            if host is None:
                rows = self._db.execute("SELECT * FROM drains ORDER BY started_at")
            else:
                rows = self._db.execute("SELECT * FROM drains WHERE host = ? ORDER BY started_at", (host,))
            return [Drain(**dict(r)) for r in rows]

        return await self._run(op)

    # ----- catalog

    @staticmethod
    def _catalog_revision(db: sqlite3.Connection) -> int:
        return int(db.execute("SELECT revision FROM catalog_revision WHERE id = 0").fetchone()[0])

    def _bump_catalog(self, db: sqlite3.Connection, revision: int) -> int:
        current = self._catalog_revision(db)
        if current != revision:
            raise CatalogChanged(f"the catalog moved from revision {revision} to {current}")
        db.execute("UPDATE catalog_revision SET revision = ? WHERE id = 0", (revision + 1,))
        return revision + 1

    async def catalog(self) -> Catalog:
        def op() -> Catalog:
            db = self._db
            db.execute("BEGIN")  # one snapshot for the entries and their revision
            try:
                revision = self._catalog_revision(db)
                rows = db.execute("SELECT entry FROM catalog ORDER BY seq").fetchall()
            finally:
                db.execute("COMMIT")
            return Catalog(tuple(CatalogEntry.from_dict(json.loads(r["entry"])) for r in rows), revision)

        return await self._run(op)

    async def add_catalog_entry(self, entry: CatalogEntry, revision: int) -> int:
        def op() -> int:
            with self._write() as db:
                new = self._bump_catalog(db, revision)
                try:
                    db.execute(
                        "INSERT INTO catalog (name, version, entry) VALUES (?, ?, ?)",
                        (entry.name, entry.version, _dumps(entry.to_dict())),
                    )
                except sqlite3.IntegrityError as exc:
                    raise CatalogEntryExists(f"{entry.id} is already in the catalog") from exc
            return new

        return await self._run(op)

    async def remove_catalog_entries(self, ids: Sequence[str], revision: int) -> int:
        def op() -> int:
            with self._write() as db:
                new = self._bump_catalog(db, revision)
                for entry_id in ids:
                    name, _, version = entry_id.partition("@")
                    db.execute("DELETE FROM catalog WHERE name = ? AND version = ?", (name, version))
            return new

        return await self._run(op)

    # ----- deployments (coordinator/deployments/store.py)

    async def put_deployment(self, record: DeploymentRecord) -> None:
        def op() -> None:
            with self._write() as db:
                db.execute(
                    "INSERT OR REPLACE INTO deployments (id, created_at, state, record) VALUES (?, ?, ?, ?)",
                    (record.id, record.created_at, record.state.value, _dumps(record.for_storage())),
                )

        await self._run(op)

    async def get_deployment(self, deployment_id: str) -> DeploymentRecord | None:
        def op() -> DeploymentRecord | None:
            row = self._db.execute("SELECT record FROM deployments WHERE id = ?", (deployment_id,)).fetchone()
            return DeploymentRecord.from_storage(json.loads(row["record"])) if row else None

        return await self._run(op)

    async def list_deployments(self) -> list[DeploymentRecord]:
        def op() -> list[DeploymentRecord]:
            rows = self._db.execute("SELECT record FROM deployments ORDER BY created_at, id").fetchall()
            return [DeploymentRecord.from_storage(json.loads(r["record"])) for r in rows]

        return await self._run(op)

    # ----- chains (coordinator/chains/store.py)

    async def put_chain(self, record: ChainRecord) -> None:
        def op() -> None:
            with self._write() as db:
                db.execute(
                    "INSERT OR REPLACE INTO chains (id, created_at, state, record) VALUES (?, ?, ?, ?)",
                    (record.id, record.created_at, record.state.value, _dumps(record.for_storage())),
                )

        await self._run(op)

    async def get_chain(self, chain_id: str) -> ChainRecord | None:
        def op() -> ChainRecord | None:
            row = self._db.execute("SELECT record FROM chains WHERE id = ?", (chain_id,)).fetchone()
            return ChainRecord.from_storage(json.loads(row["record"])) if row else None

        return await self._run(op)

    async def list_chains(self) -> list[ChainRecord]:
        def op() -> list[ChainRecord]:
            rows = self._db.execute("SELECT record FROM chains ORDER BY created_at, id").fetchall()
            return [ChainRecord.from_storage(json.loads(r["record"])) for r in rows]

        return await self._run(op)

    # ----- drain models activated at run time (coordinator/store.py ModelStore)

    async def model_slots(self) -> ModelSlots | None:
        def op() -> ModelSlots | None:
            found = self._db.execute("SELECT slot, sha256, data FROM models").fetchall()
            rows = {r["slot"]: StoredModel(r["sha256"], bytes(r["data"])) for r in found}
            active = rows.get("active")
            return None if active is None else ModelSlots(active, rows.get("previous"))

        return await self._run(op)

    async def set_model_slots(self, slots: ModelSlots) -> None:
        def op() -> None:
            with self._write() as db:
                db.execute("DELETE FROM models")
                for slot, model in (("active", slots.active), ("previous", slots.previous)):
                    if model is not None:
                        db.execute(
                            "INSERT INTO models (slot, sha256, data) VALUES (?, ?, ?)", (slot, model.sha256, model.data)
                        )

        await self._run(op)
