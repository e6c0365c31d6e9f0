"""`ferryman-coordinator`: load the config, open the coordinator, serve the API until SIGTERM/SIGINT.

SIGHUP (`systemctl reload ferryman-coordinator`) reloads the CA, certificates and keys in place, and the
etcd client's TLS files (`[store] etcd_*_file`).

Exit codes: 0 after a clean shutdown, 2 for configuration errors (config, TLS files, tokens, model,
database), 1 for anything else that stops the coordinator from starting or running.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import sys

from threadpoolctl import threadpool_limits

from coordinator.api import serve
from coordinator.app import Coordinator
from coordinator.config import CoordinatorConfig, load_config
from core.errors import ConfigError
from core.event_loop import loop_factory
from core.lifecycle import EXIT_CONFIG, EXIT_OK, reload_on_hangup, run_to_exit_code, serve_until, stop_on_signals
from core.logs import setup_logging

log = logging.getLogger("coordinator.daemon")

DEFAULT_CONFIG = "/etc/ferryman/coordinator.toml"
YOUNG_COLLECTION_EVERY = 50_000
"""Allocations between two collections of the youngest generation (Python's default: 700)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ferryman-coordinator", description="The ferryman fleet coordinator.")
    parser.add_argument(
        "--config", metavar="PATH", default=DEFAULT_CONFIG, help=f"TOML config (default {DEFAULT_CONFIG})"
    )
    return parser.parse_args(argv)


async def run(config: CoordinatorConfig, stop: asyncio.Event | None = None) -> int:
    stop = stop if stop is not None else asyncio.Event()
    with stop_on_signals(stop):
        coordinator = await Coordinator.open(config)
        try:
            server = await serve(coordinator)
            try:
                await coordinator.start()
                with reload_on_hangup(coordinator.reload_tls):
                    loop = type(asyncio.get_running_loop())
                    await serve_until(
                        stop,
                        "coordinator",
                        url=server.url,
                        database=config.database,
                        model=config.model.path or None,
                        event_loop=f"{loop.__module__}.{loop.__qualname__}",
                    )
            finally:
                await server.close()
        finally:
            await coordinator.close()
    log.info("coordinator stopped")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging("INFO")
    # The drain features reduce 256 hosts at a time: OpenBLAS's threads (one per core by default)
    # cost 2-3x the CPU there and, on a busy host, more wall time than they save; one thread, as the
    # model's own session (intra_op_threads=1).
    threadpool_limits(limits=1, user_api="blas")
    # The leader's watch re-reads some 2 000 host keys a second at 10 000 hosts, and what it parses
    # outlives the young generation: at the default 700 allocations a collection, full collections
    # over the whole heap came every few seconds, 50-150 ms each, in the middle of the tick.
    gc.set_threshold(YOUNG_COLLECTION_EVERY, *gc.get_threshold()[1:])
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        log.error(f"configuration error: {exc.message}", extra={"code": exc.code, "config": args.config})
        return EXIT_CONFIG
    setup_logging(config.log_level)
    try:
        factory = loop_factory(config.event_loop)
    except ConfigError as exc:
        log.error(f"configuration error: {exc.message}", extra={"code": exc.code, "config": args.config})
        return EXIT_CONFIG
    return run_to_exit_code("coordinator", run(config), factory)


if __name__ == "__main__":
    sys.exit(main())
