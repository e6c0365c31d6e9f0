"""The one error a probe raises: the container did not answer as a healthy one would."""

from __future__ import annotations

from core.errors import FerrymanError


class ProbeFailed(FerrymanError):
    """A probe's failure, with what went wrong as its message (shown as the probe's output)."""

    code = "probe_failed"
    http_status = 502
