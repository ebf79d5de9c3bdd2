"""The bench command: make the plan, run it, print and write the report.

``trio-embarcadero bench`` and ``python -m trio_embarcadero.tools.bench`` both
end up in :func:`run`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import trio

from ...errors import ConfigError
from .plan import add_arguments, make_plan
from .report import build_report, plot, render_table
from .runner import Bench
from .stalls import StallProbeError


def run(args: argparse.Namespace) -> int:
    """Run ``trio-embarcadero bench``; returns the exit status (1 if a run failed)."""
    if args.plot:
        try:
            import matplotlib  # type: ignore[import-not-found, unused-ignore]  # noqa: F401
        except ImportError:
            print(
                "trio-embarcadero bench: --plot needs matplotlib, which is not installed "
                "(pip install matplotlib); run without --plot or install it",
                file=sys.stderr,
            )
            return 2
    try:
        plan = make_plan(args)
    except ValueError as exc:
        print(f"trio-embarcadero bench: {exc}", file=sys.stderr)
        return 2
    table_out = sys.stderr if args.json == "-" else sys.stdout
    bench = Bench(plan, live=None if args.quiet else sys.stderr)
    try:
        try:
            bench.check_broker_config()
        except ConfigError as exc:
            print(
                f"trio-embarcadero bench: the broker config would be refused:\n{exc}",
                file=sys.stderr,
            )
            return 2
        problem = bench.check_storage_dir()
        if problem:
            print(f"trio-embarcadero bench: {problem}", file=sys.stderr)
            return 2
        shapes = dict.fromkeys(
            f"{plan.batches_per_run(v) * plan.batch_payload(v) / 1e9:.2f} GB per run "
            f"({plan.batches_per_run(v)} batches of {v.batch_messages} x {plan.message_size} B)"
            for v in plan.variants
        )
        regions = dict.fromkeys(
            f"{v.name} {plan.cxl_size_mb(v)} MiB" for v in plan.variants if v.is_broker
        )
        bench.say(
            f"bench: {len(plan.variants)} variant(s) x {plan.rounds} round(s), "
            f"{' or '.join(shapes)}, {plan.connections} connection(s)"
            + (
                f"; {len(plan.rates)} paced run(s) after each ingest run with acks"
                if plan.rates
                else ""
            )
            + (f"; broker CXL regions: {', '.join(regions)}" if regions else "")
            + (f"; {plan.pin.describe()}" if plan.pin is not None else "")
        )
        storage = bench.storage_setup()
        if storage is not None:
            bench.say(
                f"bench: ack-2 disk logs under {storage['dir']} ({storage['filesystem']}), "
                f"sync after {storage['sync_interval_ms']:g} ms or "
                f"{storage['sync_bytes'] / 2**20:g} MiB"
            )
            if storage["filesystem"].split()[0] in ("tmpfs", "ramfs"):
                print(
                    f"trio-embarcadero bench: warning: --storage-dir {storage['dir']} is "
                    f"{storage['filesystem']}, memory rather than a disk: ack 2 will not "
                    "measure a disk",
                    file=sys.stderr,
                )
        probe_failed = False
        try:
            trio.run(bench.run)
        except* KeyboardInterrupt:
            print("trio-embarcadero bench: interrupted; reporting the runs done", file=sys.stderr)
        except* StallProbeError as group:
            probe_failed = True
            for failure in group.exceptions:
                print(
                    f"trio-embarcadero bench: {failure}; reporting the runs done", file=sys.stderr
                )
        if bench.stopped_by is not None:
            print(
                f"trio-embarcadero bench: {bench.stopped_by}: stopped; reporting the runs done",
                file=sys.stderr,
            )
        report = build_report(bench)
    finally:
        bench.close()
    print(render_table(report), file=table_out, flush=True)
    if args.json == "-":
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        plot(report, bench.runs, args.plot)
        print(f"plot written to {args.plot}", file=table_out)
    return 0 if report["ok"] and bench.runs and not probe_failed else 1


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``trio-embarcadero bench``'s options."""
    parser = argparse.ArgumentParser(prog="trio-embarcadero bench")
    add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``trio-embarcadero bench`` (also ``python -m trio_embarcadero.tools.bench``)."""
    return run(build_parser().parse_args(sys.argv[1:] if argv is None else argv))
