"""The ``trio-embarcadero`` command line.

``main(argv) -> int`` returns the exit status: 0 after a clean run (a broker
that drained after SIGINT/SIGTERM), 1 on a runtime failure, 2 on a usage or
configuration error. Only this module configures logging and signals; the
library never does.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from functools import partial

import trio

from .broker import Broker, serve
from .config import Config, config_to_toml, load_config
from .errors import ConfigError, EmbarcaderoError

logger = logging.getLogger(__name__)


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="PATH", help="TOML config file (default: built-ins)")
    parser.add_argument("--broker-id", type=int, metavar="N", help="overrides broker.id")
    parser.add_argument("--host", metavar="ADDR", help="overrides broker.host")
    parser.add_argument("--port", type=int, metavar="N", help="overrides broker.port (base port)")
    parser.add_argument("--log-level", metavar="LEVEL", help="overrides logging.level")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="trio-embarcadero",
        description="Embarcadero broker ingest path on Trio.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve_cmd = commands.add_parser("serve", help="run a broker until SIGINT/SIGTERM")
    _add_config_options(serve_cmd)
    serve_cmd.add_argument(
        "--reset", action="store_true", help="discard the CXL file's contents and start empty"
    )
    check = commands.add_parser("check-config", help="validate a config and print it in full")
    _add_config_options(check)
    return parser


def _load(args: argparse.Namespace) -> Config:
    overrides: dict[str, object] = {}
    for flag, key in (
        ("broker_id", "broker.id"),
        ("host", "broker.host"),
        ("port", "broker.port"),
        ("log_level", "logging.level"),
    ):
        value = getattr(args, flag, None)
        if value is not None:
            overrides[key] = value
    return load_config(args.config, overrides=overrides)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit status."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        config = _load(args)
    except ConfigError as exc:
        print(f"trio-embarcadero: {exc}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        print(config_to_toml(config), end="")
        return 0
    logging.basicConfig(
        level=config.logging.level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    failures: list[BaseException] = []
    try:
        trio.run(partial(_serve_until_signalled, config, reset=args.reset))
    except* (EmbarcaderoError, OSError) as group:
        failures.extend(_leaves(group))
    for failure in failures:
        logger.error("cannot serve: %s", failure)
    return 1 if failures else 0


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


async def _serve_until_signalled(config: Config, *, reset: bool) -> None:
    """Serve until the first SIGINT/SIGTERM, then drain; a second one aborts."""
    serve_scope = trio.CancelScope()
    brokers: list[Broker] = []

    async def watch_signals(*, task_status: trio.TaskStatus[None]) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as received:
            task_status.started()
            async for signum in received:
                name = signal.Signals(signum).name
                if not serve_scope.cancel_called:
                    logger.info("%s: draining (send it again to stop at once)", name)
                    serve_scope.cancel()
                else:
                    logger.warning("%s: stopping without finishing the drain", name)
                    for broker in brokers:
                        broker.abort()

    async with trio.open_nursery() as nursery:

        async def run_broker(*, task_status: trio.TaskStatus[Broker]) -> None:
            with serve_scope:
                await serve(config, reset=reset, task_status=task_status)
            nursery.cancel_scope.cancel()  # drained: stop watching signals

        await nursery.start(watch_signals)
        brokers.append(await nursery.start(run_broker))
