"""Human output for ferryctl: rich tables, sizes, pull progress bars and migration progress."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.measure import Measurement
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def print_json_line(data: Any) -> None:
    """One NDJSON line (streams: `logs --json`), flushed so a reader sees it at once."""
    sys.stdout.write(json.dumps(data, sort_keys=True) + "\n")
    sys.stdout.flush()


def say(line: str) -> None:
    # Plain lines, not rich: no wrapping at the console width and no markup in image names.
    sys.stdout.write(line + "\n")


def print_table(console: Console, table: Table) -> None:
    """Print a table whole: no cell is wrapped, folded or truncated, whatever the console's width.

    Rich fits a table to the console by wrapping cells, cutting them with an ellipsis and even
    dropping columns. Identifiers must survive intact (they are copied into the next command), so
    a table wider than the console is printed at its own width and the terminal wraps the line.
    """
    natural = Measurement.get(console, console.options.update(width=1 << 16), table).maximum
    if natural <= console.width:
        console.print(table)
        return
    saved = console.width
    console.width = natural
    try:
        console.print(table, crop=False)
    finally:
        console.width = saved


def new_table(*columns: str) -> Table:
    """A borderless table whose cells never wrap (see print_table)."""
    out = Table(box=None, header_style="bold")
    for col in columns:
        out.add_column(col, no_wrap=True)
    return out


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
    table = new_table("ID", "IMAGE", "STATE", "PID", "EXIT", "CREATED")
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
    table = new_table("NAME", "DIGEST", "SIZE")
    table.columns[2].justify = "right"
    for img in sorted(images, key=lambda i: str(i.get("name", ""))):
        table.add_row(
            escape(str(img.get("name", ""))),
            escape(short_digest(str(img.get("digest", "")))),
            human_size(img.get("size")),
        )
    return table


def network_table(data: dict[str, Any]) -> Table:
    table = new_table("SERVICE IP", "CONTAINER", "STATE", "PUBLISHED", "HOST VETH")
    for svc in sorted(data.get("services") or [], key=lambda s: str(s.get("service_ip", ""))):
        table.add_row(
            escape(str(svc.get("service_ip", ""))),
            escape(str(svc.get("container", ""))),
            escape(str(svc.get("state", ""))),
            "yes" if svc.get("published") else "no",
            escape(str(svc.get("host_veth", ""))),
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


# ---------------------------------------------------------------- migrations


def clock_time(ts: float | None, short: bool = False) -> str:
    """A unix time as local date and time (`short`: the time only); "-" for none."""
    if not ts:
        return "-"
    return time.strftime("%H:%M:%S" if short else "%Y-%m-%d %H:%M:%S", time.localtime(ts))


def human_ms(ms: float | int | None) -> str:
    """'182.4 ms', '4.21 s', '2m05s'; '-' for nothing measured."""
    if not ms:
        return "-"
    value = float(ms)
    if value < 1000:
        return f"{value:.1f} ms"
    if value < 60_000:
        return f"{value / 1000:.2f} s"
    secs = int(value // 1000)
    return f"{secs // 60}m{secs % 60:02d}s"


def migration_result(record: dict[str, Any]) -> str:
    state = str(record.get("state", ""))
    return {"COMMIT": "committed", "ROLLBACK": "rolled back", "NEEDS_OPERATOR": "needs the operator"}.get(
        state, "in progress"
    )


def _direction(record: dict[str, Any]) -> str:
    arrow = "<-" if record.get("role") == "target" else "->"
    return f"{record.get('container', '')} {arrow} {record.get('peer', '')}"


def migrations_table(records: list[dict[str, Any]]) -> Table:
    table = new_table("ID", "ROLE", "CONTAINER", "PEER", "STATE", "DOWNTIME", "TOTAL", "STARTED")
    for index in (5, 6):  # durations
        table.columns[index].justify = "right"
    for r in records:  # the agent lists oldest first; keep that order
        state = str(r.get("state", ""))
        style = {"COMMIT": "green", "ROLLBACK": "red", "NEEDS_OPERATOR": "bold red"}.get(state, "yellow")
        downtime, total = migration_durations(r)
        table.add_row(  # escape: cells are rich markup, values come from the agent
            escape(str(r.get("id", ""))),
            escape(str(r.get("role", ""))),
            escape(str(r.get("container", ""))),
            escape(str(r.get("peer", ""))),
            f"[{style}]{escape(state)}[/]",
            escape(downtime),
            human_ms(total),
            age(str(r.get("started_at", ""))),
        )
    return table


def _span_ms(start: object, end: object) -> float | None:
    try:
        a = datetime.fromisoformat(str(start).replace("Z", "+00:00"))
        b = datetime.fromisoformat(str(end).replace("Z", "+00:00"))
    except ValueError:
        return None
    ms = (b - a).total_seconds() * 1000
    return ms if ms > 0 else None


def migration_durations(record: dict[str, Any]) -> tuple[str, float | None]:
    """(downtime text, total ms) of a record, from what its host knows.

    The source measures the downtime (freeze to resume) and the total. A target record has neither
    unless its agent recorded them: it shows its own part instead, the CRIU restore
    (`restore 90.1 ms`, a lower bound of the downtime), and for a finished migration the time from
    its first record to its last (`started_at` to `updated_at`).
    """
    stats = record.get("stats") or {}
    downtime = human_ms(stats.get("downtime_ms"))
    total: float | None = stats.get("total_ms") or None
    if record.get("role") == "target":
        if downtime == "-" and stats.get("restore_ms"):
            downtime = f"restore {human_ms(stats['restore_ms'])}"
        if total is None and record.get("done"):
            total = _span_ms(record.get("started_at"), record.get("updated_at"))
    return downtime, total


def migration_details(record: dict[str, Any], *, history: bool = False) -> list[str]:
    """Plain lines describing a migration's outcome and statistics (`migrate` and `migrations show`)."""
    stats = record.get("stats") or {}
    options = record.get("options") or {}
    rows: list[tuple[str, str]] = [("state", str(record.get("state", "")))]
    if history:
        rows += [("role", str(record.get("role", ""))), ("started", str(record.get("started_at", "")))]
        rows.append(("updated", str(record.get("updated_at", ""))))
    target = options.get("downtime_target_ms")
    downtime, total = migration_durations(record)
    missed = ", missed" if stats.get("downtime_target_missed") else ""
    if downtime.startswith("restore "):  # a target record: the source measured the downtime
        downtime += ", the source measures the downtime"
    rows.append(("downtime", f"{downtime} (target {target} ms{missed})" if target else downtime))
    rows.append(("total time", human_ms(total)))
    dirty = stats.get("dirty_pages") or []
    iterations = str(stats.get("iterations", 0))
    if dirty:
        iterations += f" (pages per round: {', '.join(str(d) for d in dirty)})"
    if stats.get("round_source"):
        iterations += f", read by {stats['round_source']}"
    rows.append(("iterations", iterations))
    ratio = float(stats.get("compression_ratio") or 0)
    sent = f"{human_size(stats.get('bytes_raw', 0))} raw, {human_size(stats.get('bytes_wire', 0))} on the wire"
    if ratio:
        sent += f" (compression {ratio:.2f}x)"
    rows.append(("sent", sent))
    rows.append(
        ("criu", f"freeze+dump {human_ms(stats.get('freeze_dump_ms'))}, restore {human_ms(stats.get('restore_ms'))}")
    )
    if stats.get("image_from"):
        rows.append(("image", f"{stats['image_from']}, ready after {human_ms(stats.get('image_ms'))}"))
    rows.append(("stop reason", str(stats.get("stop_reason") or "-")))
    if options.get("mode"):
        rows.append(("mode", str(options["mode"])))
    if stats.get("lazy_pages"):
        rows.append(
            (
                "post-copy",
                f"{stats['lazy_pages']} pages on demand, {stats.get('pages_remote', 0)} still remote, "
                f"{stats.get('pages_pushed', 0)} pushed, {stats.get('pages_local', 0)} from the target's own copy, "
                f"{stats.get('pages_served', 0)} sent on request ({stats.get('pages_resent', 0)} of them twice), "
                f"{human_ms(stats.get('postcopy_ms'))}; source released after {human_ms(stats.get('released_ms'))}",
            )
        )
    if record.get("error"):
        rows.append(("error", str(record["error"])))
    lines = [f"migration {record.get('id', '')} {migration_result(record)}: {_direction(record)}"]
    lines += [f"  {name:<12} {value}" for name, value in rows]
    if history:
        lines.append("  history")
        lines += [f"    {stamp}  {state}" for state, stamp in record.get("history") or []]
    return lines


class MigrationView:
    """A live two-line status for a streamed migration, fed with records (on stderr, like PullView).

    Two lines rather than a progress bar: a migration has no known total, and the statistics line
    is too wide for one terminal row next to the state.
    """

    def __init__(self, console: Console, container: str, target: str) -> None:
        self._title = f"{container} -> {target}"
        self._state = "starting"
        self._stats = ""
        self._started = time.monotonic()
        self._spinner = Spinner("dots")
        self._live = Live(console=console, refresh_per_second=8, get_renderable=self._render)

    def __enter__(self) -> MigrationView:
        self._live.start()
        return self

    def __exit__(self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._live.stop()

    def _render(self) -> RenderableType:
        elapsed = int(time.monotonic() - self._started)
        head = Text.assemble(self._title, "  ", (self._state, "bold"), f"  {elapsed // 60}:{elapsed % 60:02d}")
        self._spinner.update(text=head)  # Text, not markup: the values come from the agent
        return Group(self._spinner, Text(f"  {self._stats}", style="dim")) if self._stats else self._spinner

    @staticmethod
    def describe(record: dict[str, Any]) -> str:
        """The statistics line: round, dirty pages of the last round, bytes raw and on the wire, rate."""
        stats = record.get("stats") or {}
        dirty = stats.get("dirty_pages") or []
        parts = [
            f"round {stats.get('iterations', 0)}",
            f"dirty {dirty[-1] if dirty else 0} pages",
            *([f"remote {stats.get('pages_remote', 0)} pages"] if stats.get("lazy_pages") else []),
            f"sent {human_size(stats.get('bytes_raw', 0))} raw / {human_size(stats.get('bytes_wire', 0))} wire",
            f"{float(stats.get('rate_mbps') or 0):.1f} MB/s",
        ]
        return "  ".join(parts)

    def update(self, record: dict[str, Any]) -> None:
        self._state = str(record.get("state", ""))
        self._stats = self.describe(record)
        self._live.refresh()


def show(args: argparse.Namespace, data: Any, human: Callable[[], None]) -> None:
    """`data` as JSON with --json, else what `human` prints."""
    if args.json:
        print_json(data)
    else:
        human()


def say_all(lines: list[str]) -> None:
    for line in lines:
        say(line)
