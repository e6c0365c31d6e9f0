"""ferryctl's exit codes: the one table scripts rely on (documented in docs/ferryctl.md).

A script tells outcomes apart by the code alone; stderr says the same in words
(`error: <code>: <message>`), and with `--json` stdout carries `{"error": {"code", "message"}}`.
"""

from __future__ import annotations

from enum import IntEnum


class Exit(IntEnum):
    OK = 0
    """Done: the command did what it was asked. A migration that committed over its downtime target
    is done too (the workload moved): stderr carries `warning: downtime_target_missed: ...`."""
    ERROR = 1
    """The agent or coordinator refused or failed the request (an API error code), or a local file
    operation failed (`certs`; `image import` and `image export`: `io_error`)."""
    USAGE = 2
    """Bad arguments or options: nothing was sent."""
    NOT_MIGRATED = 4
    """`migrate`: the migration ended without committing; the workload runs on the source (agent:
    ROLLBACK; coordinator: failed or abandoned)."""
    NEEDS_OPERATOR = 5
    """`migrate`: the migration ended in NEEDS_OPERATOR: the source keeps a frozen copy for an operator."""
    UNREACHABLE = 6
    """No answer: the agent or coordinator could not be reached, or the stream ended early."""
    NOT_DRAINED = 7
    """`drain --wait`: the host was not drained within the wait."""
    NOT_DEPLOYED = 8
    """`deploy`, `undeploy`: the deployment failed and was rolled back (nothing of it runs), or did
    not reach HEALTHY (REMOVED) within the wait; `deployment status` of a FAILED one."""
    INTERRUPTED = 130
    """Ctrl-C (SIGINT); a migration goes on in the agent."""


UNREACHABLE_CODES = frozenset({"agent_unreachable", "coordinator_unreachable", "stream_ended"})
"""API error codes (ferryctl's own) that mean no answer rather than a refusal."""


def for_error(code: str) -> Exit:
    """The exit code for an error with this `code`."""
    return Exit.UNREACHABLE if code in UNREACHABLE_CODES else Exit.ERROR
