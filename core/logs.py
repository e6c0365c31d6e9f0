"""JSON-lines logging to stderr: one object per record, easy for journald and log shippers to parse."""

from __future__ import annotations

import json
import logging
import sys
import traceback
from datetime import UTC, datetime
from typing import Any, TextIO

# Attributes every LogRecord has; anything else on a record came from `extra=` and is emitted as a field.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("x", logging.INFO, __file__, 0, "", None, None)).keys()) | {
    "message",
    "asctime",
    "taskName",
}

# Reserved output keys; an `extra=` field with one of these names is prefixed so it cannot overwrite them.
_RESERVED = frozenset({"ts", "level", "logger", "msg", "exc", "stack"})


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object: ts, level, logger, msg, extras, and exc when present."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, tz=UTC)
        out: dict[str, Any] = {
            "ts": ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key in _STANDARD_ATTRS or key.startswith("_"):
                continue
            out[f"extra_{key}" if key in _RESERVED else key] = value
        if record.exc_info and record.exc_info[0] is not None:
            out["exc"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        elif record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = record.stack_info
        # default=str: extras may hold paths, enums or exceptions; a log line must never fail to format.
        return json.dumps(out, default=str, ensure_ascii=False)


def parse_level(level: str | int) -> int:
    """A logging level from a name ("info", "DEBUG") or a number; ValueError for anything else."""
    if isinstance(level, int) and not isinstance(level, bool):
        return level
    if isinstance(level, str):
        value = logging.getLevelNamesMapping().get(level.strip().upper())
        if value is not None:
            return value
    raise ValueError(f"unknown log level {level!r} (expected DEBUG, INFO, WARNING, ERROR or CRITICAL)")


def setup_logging(level: str | int = "INFO", stream: TextIO | None = None) -> None:
    """Route every logger through one JSON handler on stderr, replacing handlers set up before."""
    numeric = parse_level(level)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(numeric)
