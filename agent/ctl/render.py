"""Human output for ferryctl: rich tables, sizes, and pull progress bars."""

from __future__ import annotations

from datetime import UTC, datetime
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def human_size(n: int | float | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def short_digest(digest: str, n: int = 12) -> str:
    _, _, hexpart = digest.partition(":")
    return (hexpart or digest)[:n]


def age(iso: str, now: datetime | None = None) -> str:
    """'5m ago'-style age of an ISO-8601 time; the raw text when it does not parse."""
    try:
        then = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return iso
    if then.tzinfo is None:
        then = then.replace(tzinfo=UTC)
    secs = int(((now or datetime.now(UTC)) - then).total_seconds())
    if secs < 0:
        return iso
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m")):
        if secs >= size:
            return f"{secs // size}{unit} ago"
    return f"{secs}s ago"


def containers_table(containers: list[dict[str, Any]]) -> Table:
    table = Table(box=None, header_style="bold")
    for col in ("ID", "IMAGE", "STATE", "PID", "EXIT", "CREATED"):
        table.add_column(col, overflow="fold")
    for c in sorted(containers, key=lambda c: str(c.get("id", ""))):
        state = str(c.get("state", ""))
        style = {"running": "green", "stopped": "dim", "unknown": "red"}.get(state, "")
        table.add_row(  # escape: cells are rich markup, values come from the agent
            escape(str(c.get("id", ""))),
            escape(str(c.get("image", ""))),
            f"[{style}]{escape(state)}[/]" if style else escape(state),
            "-" if c.get("pid") is None else str(c["pid"]),
            "-" if c.get("exit_status") is None else str(c["exit_status"]),
            age(str(c.get("created_at", ""))),
        )
    return table


def images_table(images: list[dict[str, Any]]) -> Table:
    table = Table(box=None, header_style="bold")
    for col in ("NAME", "DIGEST", "SIZE"):
        table.add_column(col, overflow="fold")
    table.columns[2].justify = "right"
    for img in sorted(images, key=lambda i: str(i.get("name", ""))):
        table.add_row(
            escape(str(img.get("name", ""))),
            escape(short_digest(str(img.get("digest", "")))),
            human_size(img.get("size")),
        )
    return table


class PullView:
    """Progress bars for a streamed pull: one per layer plus an overall bar, fed with snapshots."""

    def __init__(self, console: Console, ref: str) -> None:
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self._ref = ref
        self._layers: dict[str, TaskID] = {}
        self._overall = self._progress.add_task(escape(f"{ref} [resolving]"), total=None)

    def __enter__(self) -> PullView:
        self._progress.start()
        return self

    def __exit__(self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._progress.stop()

    def update(self, snap: dict[str, Any]) -> None:
        for layer in snap.get("layers") or []:
            digest = str(layer.get("digest", ""))
            size = int(layer.get("size") or 0)
            status = str(layer.get("status", ""))
            # A layer already present counts as complete: nothing will be downloaded for it.
            done = size if status in ("exists", "done", "unpacked") else int(layer.get("done") or 0)
            label = escape(f"  {short_digest(digest)} [{status}]")  # escape: "[...]" is rich markup
            task = self._layers.get(digest)
            if task is None:
                self._layers[digest] = self._progress.add_task(label, total=size or None, completed=done)
            else:
                self._progress.update(task, description=label, total=size or None, completed=done)
        total = snap.get("total")
        self._progress.update(
            self._overall,
            description=escape(f"{self._ref} [{snap.get('status', '')}]"),
            total=total or None,
            completed=int(snap.get("done") or 0),
        )

    def finish(self, ok: bool) -> None:
        state = "done" if ok else "failed"
        task = next(t for t in self._progress.tasks if t.id == self._overall)
        total = task.total if task.total is not None else task.completed
        self._progress.update(
            self._overall,
            description=escape(f"{self._ref} [{state}]"),
            total=total,
            completed=total if ok else task.completed,
        )
