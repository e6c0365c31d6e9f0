"""Which coordinator replica a client talks to: the rules for following the leader. No I/O.

A client (an agent, ferryctl) knows the replicas' URLs. It talks to one of them, `current`, and
keeps it as long as it answers. Two answers move it:

- a replica that does not lead refuses leader-only work with 503 `not_leader` and names the leader:
  the client goes there (`redirected`), even when that URL is not in its list (a replica advertises
  the URL it was configured with);
- a replica that cannot be reached (`unreachable`): the client tries the next URL in its list.

A follower also names the leader on the requests it serves (the `Ferryman-Leader` header, LEADER_HEADER),
and a client moves there for the next ones; except on an agent's registration and telemetry, which
any replica serves in full (its drain-risk samples reach the leader through the store): agents
start at a replica chosen by their host name (`spread`) and stay there, so a fleet's pushes spread
over the replicas. A leader may refuse telemetry with 503 `push_elsewhere` while other replicas
are live (its core serves the tick): the agent sends the same batch to the next URL at once.

One request moves at most `budget()` times, so a fleet with no leader at all (or none reachable)
ends in an error instead of a loop; the caller reports the last answer.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from urllib.parse import urlsplit

LEADER_HEADER = "Ferryman-Leader"
"""On a follower's answers: the leader's URL, as the follower last saw it."""


def parse_urls(urls: Sequence[str], what: str) -> tuple[str, ...]:
    """`urls` without trailing slashes, each https://host:port; ValueError naming `what` otherwise."""
    if not urls:
        raise ValueError(f"{what}: at least one URL")
    out: list[str] = []
    for url in urls:
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"{what} {url!r}: {exc}") from None
        if parts.scheme != "https" or not parts.hostname or port is None or parts.path not in ("", "/"):
            raise ValueError(f"{what} {url!r}: expected https://host:port")
        clean = url.rstrip("/")
        if clean in out:
            raise ValueError(f"{what} {url!r}: listed twice")
        out.append(clean)
    return tuple(out)


class Replicas:
    """The known replica URLs, in the configured order, and the one in use."""

    def __init__(self, urls: Sequence[str], start: int = 0) -> None:
        if not urls:
            raise ValueError("no coordinator URL")
        self.urls = tuple(u.rstrip("/") for u in urls)
        self.current = self.urls[start % len(self.urls)]

    def budget(self) -> int:
        """Moves one request may make: every listed replica once, plus one redirect to a leader."""
        return len(self.urls) + 1

    def redirected(self, leader: str) -> str:
        """A replica answered not_leader naming `leader` ("" when it knows none): the URL to try next."""
        leader = leader.rstrip("/")
        if leader and leader != self.current:
            self.current = leader
            return leader
        return self.unreachable()

    def unreachable(self) -> str:
        """`current` did not answer: the next listed URL (after an unlisted leader, the first)."""
        try:
            i = self.urls.index(self.current)
        except ValueError:
            i = -1
        self.current = self.urls[(i + 1) % len(self.urls)]
        return self.current


def spread(key: str, count: int) -> int:
    """Which of `count` replicas a client named `key` starts at: the same on every run and every host
    of the fleet, and even over a fleet's names (CRC-32)."""
    return zlib.crc32(key.encode()) % count if count else 0


def push_elsewhere(body: str) -> bool:
    """From an error response's body: the replica leads and leaves telemetry to the others
    (`push_elsewhere`): the same batch goes to the next replica at once."""
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(error, dict) and error.get("code") == "push_elsewhere"


def not_leader(body: str) -> str | None:
    """From an error response's body: the leader's URL a replica named in its not_leader answer ("" if
    it knows none); None when the body is no not_leader error."""
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(error, dict) or error.get("code") != "not_leader":
        return None
    return str(error.get("leader") or "")
