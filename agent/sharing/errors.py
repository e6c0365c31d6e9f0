"""Blob sharing's errors.

PeerBlobError               a peer could not serve a range (refused, broke, short, unreachable): 502
└── PeerStalled             no byte from the peer within [sharing] stall_timeout
BlobNotHeld                 this host holds no such blob, nor is pulling it (404, to the asking peer)
"""

from __future__ import annotations

from core.errors import FerrymanError, NotFound


class PeerBlobError(FerrymanError):
    code = "peer_blob_failed"
    http_status = 502


class PeerStalled(PeerBlobError):
    code = "peer_blob_stalled"


class BlobNotHeld(NotFound):
    code = "blob_not_held"
