"""``main``: parse the command line, load the config, run the command.

Each command's module is loaded only when it runs. ``serve`` starts itself
again once, to set a glibc tunable (``cxl.streaming_copies``), and it
decides that having loaded only the config: loading the broker first, and
again after the new start, cost every broker start 0.6-1.2 s of CPU.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
from collections.abc import Sequence

from ..config import Config, config_to_toml, load_config
from ..errors import ConfigError
from .logs import set_up_logging
from .parser import CLIENT_COMMANDS, build_parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit status.

    Args:
        argv: The arguments after the program's name (default: ``sys.argv``).

    Returns:
        0 after a clean run (a broker that drained after SIGINT/SIGTERM), 1 on
        a runtime failure (also a broker that drained and stopped because its
        disk log failed), 2 on a usage or configuration error.
    """
    parser = build_parser()
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    if args.command == "bench":  # its own options; the broker configs are its own too
        from ..tools.bench import main as bench_main

        return bench_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        config = _load(args)
    except ConfigError as exc:
        print(f"trio-embarcadero: {exc}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        print(config_to_toml(config), end="")
        return 0
    if args.command in CLIENT_COMMANDS:
        from .clients import run_client_command

        set_up_logging(config)
        return run_client_command(args, config)
    if args.command == "cluster":
        from .serving import run_cluster_command

        return run_cluster_command(config, args.brokers, reset=args.reset)
    if args.supervisor_fd is not None and not _is_socket(args.supervisor_fd):
        print(
            f"trio-embarcadero: --supervisor-fd {args.supervisor_fd} is not an open socket "
            "(it is for a supervisor such as the cluster command, which passes one)",
            file=sys.stderr,
        )
        return 2
    if argv is None and config.cxl.streaming_copies:
        # Only as the process's own program: a caller's process is not replaced.
        _run_with_streaming_copies()
    from .serving import run_serve_command

    # Under a supervisor the brokers share its stderr: each line says whose it is.
    set_up_logging(config, f"broker {config.broker.id} " if args.supervisor_fd is not None else "")
    return run_serve_command(config, reset=args.reset, supervisor_fd=args.supervisor_fd)


def _load(args: argparse.Namespace) -> Config:
    overrides: dict[str, object] = {}
    for flag, key in (
        ("broker_id", "broker.id"),
        ("host", "broker.host"),
        ("port", "broker.port"),
        ("http_port", "http.port"),
        ("log_level", "logging.level"),
        ("log_format", "logging.format"),
    ):
        value = getattr(args, flag, None)
        if value is not None:
            overrides[key] = value
    return load_config(args.config, overrides=overrides)


#: glibc copies at least this many bytes with non-temporal stores, when set.
_STREAMING_TUNABLE = "glibc.cpu.x86_non_temporal_threshold"
_STREAMING_THRESHOLD = 256 * 1024


def _run_with_streaming_copies() -> None:
    """Run this command again, in this process, with glibc's threshold for
    non-temporal copies lowered (``cxl.streaming_copies``), unless it is set
    already or this is not x86-64 with glibc.

    glibc reads ``GLIBC_TUNABLES`` once, at process start, so the only way
    to set it for ourselves is to start again; ``exec`` keeps the pid, the
    arguments and every open descriptor (none is open yet).
    """
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if _STREAMING_TUNABLE in tunables or not _is_x86_64_glibc():
        return
    setting = f"{_STREAMING_TUNABLE}={_STREAMING_THRESHOLD:#x}"
    env = dict(os.environ, GLIBC_TUNABLES=f"{tunables}:{setting}" if tunables else setting)
    sys.stdout.flush()
    sys.stderr.flush()
    # orig_argv: the interpreter's own options too (-X, -W ...), and the
    # program as it was named (a console script or -m).
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def _is_x86_64_glibc() -> bool:
    import platform

    return platform.machine() in ("x86_64", "AMD64") and platform.libc_ver()[0] == "glibc"


def _is_socket(fd: int) -> bool:
    try:
        return stat.S_ISSOCK(os.fstat(fd).st_mode)
    except OSError:
        return False
