"""`ferryman-agent`: load the config, open the agent, serve the API until SIGTERM/SIGINT.

SIGHUP (`systemctl reload ferryman-agent`) reloads the CA, certificate and key in place.

Exit codes: 0 after a clean shutdown, 2 for configuration errors, 1 for anything else that stops
the agent from starting or running.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import logging
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from agent.api import build_app, parse_listen, serve
from agent.config import AgentConfig, load_config
from agent.malloc import keep_freed_memory
from agent.migration.failpoints import Failpoints
from core.errors import ConfigError
from core.lifecycle import EXIT_CONFIG, EXIT_OK, reload_on_hangup, run_to_exit_code, serve_until, stop_on_signals
from core.logs import parse_level, setup_logging
from core.security.reload import TlsContexts

log = logging.getLogger("agent.daemon")

DEFAULT_CONFIG = "/etc/ferryman/agent.toml"

AgentFactory = Callable[[AgentConfig], Awaitable[Any]]
"""Opens an agent (an object with images, containers, metrics, `tls_contexts` and `async close()`)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ferryman-agent", description="The ferryman host agent.")
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=None,
        help=f"TOML config file (default {DEFAULT_CONFIG}; all defaults when that file does not exist)",
    )
    parser.add_argument(
        "--log-level", metavar="LEVEL", default=None, help="DEBUG, INFO, WARNING or ERROR (overrides the config)"
    )
    return parser.parse_args(argv)


def resolve_config(path: str | None) -> AgentConfig:
    """The config from `path`; with no path, the default file if it exists, else all defaults.

    An explicitly named file that is missing is an error (load_config raises ConfigError).
    """
    if path is None:
        path = DEFAULT_CONFIG
        if not Path(path).exists():
            return load_config(None)
    return load_config(path)


async def _open_real_agent(config: AgentConfig) -> Any:
    # Imported here so this module (and its tests) load without containerd's stubs and services.
    from agent.app import Agent

    return await Agent.open(config)


async def run(
    config: AgentConfig,
    *,
    open_agent: AgentFactory | None = None,
    stop: asyncio.Event | None = None,
) -> int:
    """Run until SIGTERM/SIGINT (or `stop` is set); returns the exit code."""
    stop = stop if stop is not None else asyncio.Event()
    with stop_on_signals(stop):
        agent = await (open_agent or _open_real_agent)(config)
        try:
            contexts: TlsContexts = agent.tls_contexts
            server = await serve(build_app(agent), config.api.listen, config.api.tls_listen, config.tls, contexts)
            try:
                with reload_on_hangup(contexts.reload_logged):
                    await serve_until(stop, "agent", listen=server.url, host_name=config.host_name or None)
            finally:
                await server.close()  # stop accepting, end streams, finish in-flight requests
        finally:
            await agent.close()
    log.info("agent stopped")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        # Log as JSON from the first line, at the requested level if it is valid.
        setup_logging(args.log_level or "INFO")
    except ValueError as exc:
        setup_logging("INFO")
        log.error("invalid --log-level", extra={"error": str(exc)})
        return EXIT_CONFIG
    try:
        config = resolve_config(args.config)
        level = args.log_level or config.log_level
        parse_level(level)
        parse_listen(config.api.listen)  # fail here, not after containerd has been connected
        Failpoints.from_env()  # armed fault injection outside the test harness is refused
    except ConfigError as exc:
        log.error(f"configuration error: {exc.message}", extra={"code": exc.code, "config": args.config})
        return EXIT_CONFIG
    except ValueError as exc:
        log.error(f"configuration error: log_level: {exc}", extra={"code": ConfigError.code})
        return EXIT_CONFIG
    setup_logging(level)
    keep_freed_memory()
    # systemd's watchdog aborts a hung agent with SIGABRT: every thread's stack then goes to the journal.
    faulthandler.enable()
    return run_to_exit_code("agent", run(config))


if __name__ == "__main__":
    sys.exit(main())
