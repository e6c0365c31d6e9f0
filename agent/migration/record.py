"""A migration's durable record: what each side journals and what the API and ferryctl show."""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass, field
from typing import Any, NewType

from agent.migration.states import TERMINAL, Event, State, next_state

MigrationId = NewType("MigrationId", str)


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class MigrationOptions:
    downtime_target_ms: int = 300
    max_iterations: int = 8
    mode: str = ""
    """precopy | lazy | hybrid; empty means the agent's default, and the agent resolves `auto` from the
    CRIU features before the record is made."""
    reservation: str = ""
    """A reservation the coordinator holds on the target for this migration; empty for none."""

    def validated(self) -> MigrationOptions:
        from core.errors import InvalidRequest

        if not 1 <= self.downtime_target_ms <= 600_000:
            raise InvalidRequest("downtime_target_ms must be between 1 and 600000")
        if not 1 <= self.max_iterations <= 64:
            raise InvalidRequest("max_iterations must be between 1 and 64")
        if self.mode not in ("", "precopy", "lazy", "hybrid", "auto"):
            raise InvalidRequest(f"migration mode {self.mode!r} is not supported (use precopy, lazy, hybrid or auto)")
        return self


@dataclass(frozen=True)
class MigrationStats:
    iterations: int = 0
    dirty_pages: tuple[int, ...] = ()
    """Pages sent in each pre-copy round (the first is the whole working set)."""
    bytes_raw: int = 0
    bytes_wire: int = 0
    rate_mbps: float = 0.0
    downtime_ms: float = 0.0
    downtime_target_missed: bool = False
    """The measured downtime exceeded the migration's downtime_target_ms (it still committed)."""
    total_ms: float = 0.0
    freeze_dump_ms: float = 0.0
    """CRIU's freeze + final dump on the source."""
    restore_ms: float = 0.0
    """CRIU's restore on the target."""
    image_ms: float = 0.0
    """The target's fetch of the image layers it lacked (alongside the page transfer)."""
    image_from: str = ""
    """Where most of them came from: "local" (nothing fetched), "peer" (the source agent) or "registry"."""
    stop_reason: str = ""
    round_source: str = ""
    """How pre-copy rounds read memory: proc-mem (/proc/PID/mem, running), criu-pre-dump (soft-dirty)
    or criu-dump (a dump that leaves the tasks running, frozen while it copies)."""
    lazy_pages: int = 0
    """Pages the final dump left on the source for post-copy."""
    pages_remote: int = 0
    """Of those, pages not on the target yet (POSTCOPY progress)."""
    pages_local: int = 0
    """Of the post-copy pages, those the target took from its own pre-copied copy (hybrid)."""
    pages_pushed: int = 0
    """Of the post-copy pages, those the source pushed (or named as held) before they were asked for."""
    pages_served: int = 0
    """Pages the source sent in answer to the target's requests (faults, read-ahead, the daemon's own)."""
    pages_resent: int = 0
    """Of those, pages that had crossed before (pushed or answered earlier): each is a page sent twice."""
    held_packets: int = 0
    """Packets clients sent to the service address during the freeze, kept on the source and
    delivered to the restored copy once it held the address."""
    postcopy_ms: float = 0.0
    """From the target's resume until every page was there."""
    released_ms: float = 0.0
    """From the start until the source no longer held anything of the workload."""

    @property
    def compression_ratio(self) -> float:
        return self.bytes_raw / self.bytes_wire if self.bytes_wire else 0.0


@dataclass(frozen=True)
class MigrationRecord:
    id: MigrationId
    role: str  # "source" | "target"
    container: str
    peer: str
    """The other agent's host identity."""
    state: State = State.PREPARE
    options: MigrationOptions = field(default_factory=MigrationOptions)
    stats: MigrationStats = field(default_factory=MigrationStats)
    error: str | None = None
    started_at: str = field(default_factory=now_iso)
    updated_at: str = field(default_factory=now_iso)
    history: tuple[tuple[str, str], ...] = ()
    """(state, time) for every state entered."""
    peer_address: str = ""
    image: str = ""
    group: tuple[tuple[str, str], ...] = ()
    """(container, migration id) of every member of the volume group migrating together (group.py);
    empty for a container that moves alone."""

    @property
    def done(self) -> bool:
        return self.state in TERMINAL

    def advance(self, event: Event, error: str | None = None) -> MigrationRecord:
        state = next_state(self.state, event)
        stamp = now_iso()
        return dataclasses.replace(
            self,
            state=state,
            updated_at=stamp,
            history=(*self.history, (state.value, stamp)),
            error=error if error is not None else self.error,
        )

    def with_stats(self, **changes: Any) -> MigrationRecord:
        return dataclasses.replace(self, stats=dataclasses.replace(self.stats, **changes), updated_at=now_iso())

    def for_storage(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["state"] = self.state.value
        out["history"] = [list(h) for h in self.history]
        out["group"] = [list(g) for g in self.group]
        out["stats"]["dirty_pages"] = list(self.stats.dirty_pages)
        out["stats"]["compression_ratio"] = round(self.stats.compression_ratio, 3)
        out["done"] = self.done
        return out

    @classmethod
    def from_storage(cls, data: dict[str, Any]) -> MigrationRecord:
        stats = dict(data.get("stats") or {})
        stats.pop("compression_ratio", None)
        stats["dirty_pages"] = tuple(stats.get("dirty_pages") or ())
        return cls(
            id=MigrationId(data["id"]),
            role=data["role"],
            container=data["container"],
            peer=data["peer"],
            state=State(data["state"]),
            options=MigrationOptions(**(data.get("options") or {})),
            stats=MigrationStats(**stats),
            error=data.get("error"),
            started_at=data["started_at"],
            updated_at=data["updated_at"],
            history=tuple(tuple(h) for h in data.get("history") or ()),  # type: ignore[misc]
            peer_address=data.get("peer_address", ""),
            image=data.get("image", ""),
            group=tuple(tuple(g) for g in data.get("group") or ()),  # type: ignore[misc]
        )
