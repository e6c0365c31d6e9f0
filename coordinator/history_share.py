"""What one coordinator replica tells the leader of the telemetry pushed to it, as data. No I/O.

Any replica takes an agent's push, but only the leader scores drain risk. So each replica shares,
per host it took pushes for, a bounded summary of them: its newest `SHARED_BINS` one-minute bins of
that host's `HostHistory` (per-field sums, counts and squares, event sums; 37 numbers a bin, the
features' own binning) and the notices with a stated time it saw. Never raw samples. The etcd store
writes a host's share into its host key with each telemetry flush; the leader reads the host keys
at every tick and sets each replica's bins into that replica's copy of the host's history, which it
merges with its own to score (`coordinator/predictions.py`).

A bin is shared whole (everything the replica holds for that minute, not what changed), so the leader
only ever needs the latest share it reads: a share it misses is superseded by the next one, as long
as it reads the host keys at least once every `SHARED_BINS - 1` minutes (it does every tick).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from coordinator.features import BIN_S, N_ROWS, Float32Array
from coordinator.notices import Notice

SHARED_BINS = 3
"""Bins in a share: the current minute and the two before it. A tick period up to a minute (15 s by
default) reads every bin at least once after its last sample; samples pushed more than two minutes
after their time (a backlog after an outage) reach the leader's scoring only if pushed to it."""


@dataclass(frozen=True)
class HostShare:
    """One replica's summary of one host's recent pushes."""

    bins: Mapping[int, Float32Array]
    """Bin id (unix seconds // BIN_S) -> that bin's rows [N_ROWS] as this replica holds them."""
    notices: tuple[Notice, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """{"ids": [bin ids], "rows": base64 of float32 [len(ids), N_ROWS], "notices": [...]}: one
        blob per host, as the leader decodes thousands of them per tick."""
        ids = sorted(self.bins)
        rows = np.stack([np.asarray(self.bins[b], "<f4") for b in ids]) if ids else np.empty((0, N_ROWS), "<f4")
        return {
            "ids": ids,
            "rows": base64.b64encode(rows.tobytes()).decode(),
            "notices": [n.to_dict() for n in self.notices],
        }

    @staticmethod
    def rows_from_json(raw: Mapping[str, Any]) -> tuple[list[int], Float32Array]:
        """The bin ids and their rows [len(ids), N_ROWS] of a share's JSON; ValueError (or KeyError,
        TypeError) if it is not one."""
        ids = [int(b) for b in raw["ids"]]
        rows = np.frombuffer(base64.b64decode(raw["rows"], validate=True), "<f4")
        if rows.size != len(ids) * N_ROWS:
            raise ValueError(f"a share of {len(ids)} bins has {rows.size} values, not {len(ids) * N_ROWS}")
        return ids, rows.reshape(len(ids), N_ROWS).astype(np.float32)

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> HostShare:
        """A share as written by `to_json`; ValueError (or KeyError, TypeError) if it is not one."""
        ids, rows = cls.rows_from_json(raw)
        return cls(dict(zip(ids, rows, strict=True)), notices_from_json(raw))


def notices_from_json(raw: Mapping[str, Any]) -> tuple[Notice, ...]:
    return tuple(Notice(**n) for n in raw.get("notices", ()))


def current_shares(shares: Mapping[str, Mapping[str, Any]], now: float) -> dict[str, Mapping[str, Any]]:
    """The shares (replica -> share JSON) worth keeping in a host key at `now`: those whose newest
    bin is still within the shared window (a replica that stopped taking the host's pushes drops
    out, so a host key holds a share from one or two replicas, not from every one that ever took a
    push)."""
    oldest = int(now // BIN_S) - SHARED_BINS + 1
    kept: dict[str, Mapping[str, Any]] = {}
    for replica, share in shares.items():
        try:
            newest = max((int(b) for b in share["ids"]), default=-1)
        except (KeyError, TypeError, ValueError):
            continue  # not a share this code understands: do not carry it on
        if newest >= oldest:
            kept[replica] = share
    return kept
