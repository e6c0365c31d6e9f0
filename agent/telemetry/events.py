"""Turning what the host shows into discrete events: notice files and kernel error counters.

Each watcher remembers what it saw last and reports only a change, so one drain notice is one
event however many samples see the file.
"""

from __future__ import annotations

import logging
from pathlib import Path

from agent.telemetry.notices import NoticeParseError, parse_notice_file_deadline
from proto.ferryman.v1 import fleet_pb2 as pb

log = logging.getLogger(__name__)

MAX_DETAIL = 4096
"""Bytes of a notice file carried in an event; a provider's notice is short, a runaway file is not."""


class NoticeFile:
    """A file someone writes to tell this host something (drain, maintenance, pre-emption).

    Appearing, or changing content, is one event whose detail is the content; a line
    `deadline=<unix seconds or ISO 8601>` in it is the time the host goes away. A file present when the
    agent starts counts as appearing: a restarted agent still reports a pending notice. Removing the
    file produces nothing, and a later file is new again.
    """

    def __init__(self, path: str, kind: pb.HostEventKind) -> None:
        self.path = Path(path) if path else None
        self.kind = kind
        self._last: bytes | None = None

    def poll(self, now: float) -> pb.HostEvent | None:
        """Blocking (reads the file): call from a thread."""
        if self.path is None:
            return None
        try:
            with self.path.open("rb") as fh:
                content = fh.read(MAX_DETAIL + 1)
        except FileNotFoundError:
            self._last = None
            return None
        except OSError as exc:
            content = f"unreadable notice file {self.path}: {exc.strerror}".encode()
        if content == self._last:
            return None
        self._last = content
        detail = content[:MAX_DETAIL].decode(errors="replace").strip()
        try:
            deadline = parse_notice_file_deadline(detail)
        except NoticeParseError as exc:
            log.warning("notice file states an unreadable deadline", extra={"path": str(self.path), "error": str(exc)})
            deadline = 0.0
        return pb.HostEvent(kind=self.kind, ts=now, detail=detail, deadline=deadline, source="notice-file")


class CounterDelta:
    """A cumulative kernel counter: an increase since the previous reading is one event.

    The first reading is the baseline (kills before the agent started are not news); a counter that
    goes back (a reset) becomes the new baseline too.
    """

    def __init__(self, kind: pb.HostEventKind, what: str) -> None:
        self.kind = kind
        self.what = what
        self._last: int | None = None

    def update(self, value: int | None, now: float) -> pb.HostEvent | None:
        if value is None:
            return None
        last, self._last = self._last, value
        if last is None or value <= last:
            return None
        return pb.HostEvent(kind=self.kind, ts=now, detail=f"{value - last} {self.what} (total {value})")


class EdacErrors:
    """Corrected and uncorrected memory errors (EDAC): any increase is one HW_ERROR event."""

    def __init__(self) -> None:
        self._corrected = CounterDelta(pb.HW_ERROR, "corrected memory errors")
        self._uncorrected = CounterDelta(pb.HW_ERROR, "uncorrected memory errors")

    def update(self, counts: tuple[int, int] | None, now: float) -> list[pb.HostEvent]:
        if counts is None:
            return []
        events = [self._corrected.update(counts[0], now), self._uncorrected.update(counts[1], now)]
        return [e for e in events if e is not None]
