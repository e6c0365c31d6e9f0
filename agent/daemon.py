"""`ferryman-agent`: load the config, open the agent, serve the API until SIGTERM/SIGINT.

Exit codes: 0 after a clean shutdown, 2 for configuration errors, 1 for anything else that stops
the agent from starting or running.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

from agent import sdnotify
from agent.api import build_app, parse_listen, serve
from agent.config import AgentConfig, load_config
from agent.errors import ConfigError, FerrymanError
from agent.logs import parse_level, setup_logging
from agent.malloc import keep_freed_memory

log = logging.getLogger("agent.daemon")

DEFAULT_CONFIG = "/etc/ferryman/agent.toml"
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2

AgentFactory = Callable[[AgentConfig], Awaitable[Any]]
"""Opens an agent (an object with images, containers, metrics and `async close()`)."""


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


@contextlib.contextmanager
def stop_on_signals(stop: asyncio.Event) -> Iterator[None]:
    """SIGTERM and SIGINT only set `stop`: all shutdown work happens in order after it."""
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        yield
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


async def serve_until(stop: asyncio.Event, what: str, **ready: object) -> None:
    """Tell systemd and the log that `what` is ready, wait for `stop`, then say it is stopping."""
    sdnotify.notify("READY=1")
    log.info(f"{what} ready", extra=ready)
    await stop.wait()
    log.info("shutting down")
    sdnotify.notify("STOPPING=1")


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
            server = await serve(build_app(agent), config.api.listen, config.api.tls_listen, config.tls)
            try:
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
    except ConfigError as exc:
        log.error(f"configuration error: {exc.message}", extra={"code": exc.code, "config": args.config})
        return EXIT_CONFIG
    except ValueError as exc:
        log.error(f"configuration error: log_level: {exc}", extra={"code": ConfigError.code})
        return EXIT_CONFIG
    setup_logging(level)
    keep_freed_memory()
    return run_to_exit_code("agent", run(config))


def run_to_exit_code(what: str, main: Coroutine[Any, Any, int]) -> int:
    """asyncio.run(main) with the exit codes and last words every ferryman daemon uses."""
    try:
        return asyncio.run(main)
    except ConfigError as exc:
        # Some settings (listen address, password files) are only checked when used.
        log.error(f"configuration error: {exc.message}", extra={"code": exc.code})
        return EXIT_CONFIG
    except FerrymanError as exc:
        log.error(f"{what} failed: {exc.message}", extra={"code": exc.code})
        return EXIT_FAILURE
    except OSError as exc:
        log.error(f"{what} failed: {exc}", extra={"code": "os_error"})
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130  # Ctrl-C before the handlers were installed
    except Exception:
        log.exception(f"{what} crashed")
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
