"""How fast the Python client is: its publisher and subscriber against a broker.

Run it by hand::

    python -m trio_embarcadero.tools.clientbench [--rounds 3] [--modes publish,iter-100]

It starts ``python -m trio_embarcadero serve`` in a process of its own (on
127.0.0.1, port 0, with a private CXL file under ``--cxl-dir`` that is
removed afterwards), fills one topic per subscriber mode (not measured), then
measures in this process, round after round, every mode once per round
(interleaved: a shared machine drifts between minutes). The modes:

* ``publish``: 100 B messages, one ``await publisher.publish(m)`` each, ack 1;
* ``publish_nowait``: ``publisher.publish_nowait(m)`` while the in-flight
  window has room, ``await publisher.publish(m)`` when it is full;
* ``publish_many``: one ``await publisher.publish_many(...)`` call;
* each of them with ``-plain`` (``publish-plain``, ...): the same with
  ``idempotent=False``; without it the publisher runs as by default, in a
  publish session (``client_req = 2``), so the pair is the session's cost;
* ``iter-SIZE``: ``async for message in subscriber`` (a ``Message`` each);
* ``receive-SIZE``: ``await subscriber.receive_messages()`` (a list each);
* ``batches-SIZE``: ``async for batch in subscriber.batches()`` (no copy).

``SIZE`` is ``100`` or ``1k`` (1024 B). A publisher figure runs from its
first call to ``flush()`` returning, i.e. every message acknowledged; a
subscriber figure from subscribing to the last message of the topic, read
from offset 0. Payload GB/s count message bytes only (GB = 10**9 B). Rates
are medians over the rounds with their min-max; the client's CPU time per
message (this process only; the broker has its own) is the median too, and
the steadier figure when other work shares the machine.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs
import trio

from ..client import DEFAULT_RECEIVE_BUFFER, open_publisher, open_subscriber
from ..log import remove_region
from ..wire import padded_size
from .noloss import BrokerProcess, RunError

HOST = "127.0.0.1"
_SIZES = {"100": 100, "1k": 1024}
_PUBLISH_MODES = ("publish", "publish_nowait", "publish_many")
#: A publish mode with this suffix publishes plainly (``idempotent=False``).
_PLAIN = "-plain"
_SUBSCRIBE_KINDS = ("iter", "receive", "batches")
MODES = (
    *(mode + suffix for mode in _PUBLISH_MODES for suffix in ("", _PLAIN)),
    *(f"{kind}-{size}" for kind in _SUBSCRIBE_KINDS for size in _SIZES),
)
_PUBLISH_SIZE = 100
_BATCH_BYTES = 2 * 2**20  # the client's default batch size


def _broker_config(path: Path, cxl_path: str, cxl_mb: int) -> None:
    """Shipped defaults (4 MiB staging buffers hold the 2 MiB client batches,
    the region faulted in at start), except what a private, quiet broker on
    port 0 needs. Faulted in on first touch instead, the broker's stores into
    fresh pages set the publishers' pace: publish_many made 1.1-4.6 M msg/s
    so, 3.8-8.2 M with the region faulted in (the same session)."""
    path.write_text(
        f"""[broker]
port = 0

[network]
stats_interval_s = 1000.0

[cxl]
path = "{cxl_path}"
size_mb = {cxl_mb}

[logging]
level = "INFO"
"""
    )


# -- the measurements ----------------------------------------------------------------


class _Timer:
    """Wall and CPU time (this process's: the client's, not the broker's) of a block."""

    def __enter__(self) -> _Timer:
        self.wall = time.perf_counter()
        self.cpu = time.process_time()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def _publishes(mode: str) -> bool:
    return mode.removesuffix(_PLAIN) in _PUBLISH_MODES


async def _publish(port: int, topic: str, count: int, mode: str) -> tuple[_Timer, bool]:
    """Time one publish run; the timer, and whether the publisher ran a session."""
    payload = b"p" * _PUBLISH_SIZE
    plain = mode.endswith(_PLAIN)
    mode = mode.removesuffix(_PLAIN)
    async with open_publisher(
        HOST,
        port,
        topic,
        ack=1,
        batch_bytes=_BATCH_BYTES,
        idempotent=False if plain else None,
    ) as publisher:
        with _Timer() as timer:
            if mode == "publish_many":
                await publisher.publish_many(itertools.repeat(payload, count))
            elif mode == "publish_nowait":
                publish_nowait = publisher.publish_nowait
                for _ in range(count):
                    try:
                        publish_nowait(payload)
                    except trio.WouldBlock:
                        await publisher.publish(payload)
            else:
                publish = publisher.publish
                for _ in range(count):
                    await publish(payload)
            await publisher.flush()
    return timer, publisher.idempotent


async def _subscribe(port: int, topic: str, count: int, kind: str, buffer_bytes: int) -> _Timer:
    last = count - 1
    async with open_subscriber(HOST, port, topic, buffer_bytes=buffer_bytes) as subscriber:
        with _Timer() as timer:
            if kind == "iter":
                async for message in subscriber:
                    if message.offset == last:
                        break
            elif kind == "receive":
                while (await subscriber.receive_messages())[-1].offset != last:
                    pass
            else:
                async for batch in subscriber.batches():
                    if batch.last_offset == last:
                        break
    return timer


async def _fill(port: int, topic: str, count: int, size: int) -> None:
    async with open_publisher(HOST, port, topic, ack=1, batch_bytes=_BATCH_BYTES) as publisher:
        await publisher.publish_many(itertools.repeat(bytes(size), count))


# -- the run ---------------------------------------------------------------------------


class _Plan:
    def __init__(self, args: argparse.Namespace) -> None:
        self.modes: list[str] = args.modes
        self.rounds: int = args.rounds
        self.buffer_bytes: int = args.buffer_bytes
        self.counts = {mode: self._count(mode, args) for mode in self.modes}

    @staticmethod
    def _count(mode: str, args: argparse.Namespace) -> int:
        if _publishes(mode):
            many = mode.removesuffix(_PLAIN) == "publish_many"
            return int(args.publish_messages * (3 if many else 1))
        return int(args.subscribe_messages)

    def message_size(self, mode: str) -> int:
        return _PUBLISH_SIZE if _publishes(mode) else _SIZES[mode.split("-")[1]]

    def fills(self) -> dict[str, int]:
        """Subscriber topics (one per message size) and their message counts."""
        wanted: dict[str, int] = {}
        for mode in self.modes:
            if not _publishes(mode):
                size = mode.split("-")[1]
                wanted[size] = max(wanted.get(size, 0), self.counts[mode])
        return wanted

    def region_mb(self) -> int:
        """Enough for every message the run publishes, and a segment per topic."""
        total = sum(
            self.counts[m] * padded_size(_PUBLISH_SIZE) * self.rounds
            for m in self.modes
            if _publishes(m)
        )
        total += sum(n * padded_size(_SIZES[s]) for s, n in self.fills().items())
        return int(total * 1.25 / 2**20) + 64 * (len(self.modes) + 2)


@attrs.define
class Result:
    """One mode's runs.

    Attributes:
        mode: The mode's name.
        message_size: Payload bytes per message.
        messages: Messages per run.
        msgs_per_s: Each round's rate (wall time).
        cpu_ns_per_msg: Each round's CPU time of this process (the client) per message.
        session: A publish mode whose publisher ran a publish session.
    """

    mode: str
    message_size: int
    messages: int
    msgs_per_s: list[float] = attrs.field(factory=list)
    cpu_ns_per_msg: list[float] = attrs.field(factory=list)
    session: bool = False

    def add(self, timer: _Timer) -> None:
        self.msgs_per_s.append(self.messages / timer.wall)
        self.cpu_ns_per_msg.append(timer.cpu / self.messages * 1e9)

    def row(self) -> str:
        """A line of the summary table."""
        rates = self.msgs_per_s
        rate = statistics.median(rates)
        return (
            f"| {self.mode} | {self.message_size} B | {rate / 1e6:.3f} "
            f"[{min(rates) / 1e6:.3f}-{max(rates) / 1e6:.3f}] | "
            f"{rate * self.message_size / 1e9:.3f} | "
            f"{statistics.median(self.cpu_ns_per_msg):.0f} |"
        )


async def _measure(plan: _Plan, port: int, say: Callable[[str], None]) -> list[Result]:
    for size, count in plan.fills().items():
        say(f"filling topic sub-{size} with {count} messages of {_SIZES[size]} B")
        await _fill(port, f"sub-{size}", count, _SIZES[size])
    results = [Result(m, plan.message_size(m), plan.counts[m]) for m in plan.modes]
    for rnd in range(1, plan.rounds + 1):
        for result in results:
            mode = result.mode
            timer: _Timer
            if _publishes(mode):
                timer, result.session = await _publish(port, f"pub-{mode}", result.messages, mode)
            else:
                kind, size = mode.split("-")
                timer = await _subscribe(
                    port, f"sub-{size}", result.messages, kind, plan.buffer_bytes
                )
            result.add(timer)
            say(
                f"round {rnd} {mode}: {result.msgs_per_s[-1] / 1e6:.3f} M msg/s, "
                f"client CPU {result.cpu_ns_per_msg[-1]:.0f} ns/msg ({timer.wall:.2f} s)"
            )
    return results


async def _main(plan: _Plan, cxl_dir: str, say: Callable[[str], None]) -> list[Result]:
    cxl_path = os.path.join(cxl_dir, f"clientbench-{uuid.uuid4().hex[:12]}")
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "broker.toml"
        _broker_config(config, cxl_path, plan.region_mb())
        broker = BrokerProcess(config)
        try:
            async with trio.open_nursery() as nursery:
                port = await broker.start(nursery, "--reset")
                say(f"broker on {HOST}:{port}, region {plan.region_mb()} MiB")
                try:
                    return await _measure(plan, port, say)
                finally:
                    await broker.stop()
        finally:
            remove_region(cxl_path)


TABLE_HEAD = (
    "| mode | msg size | M msg/s median [min-max] | payload GB/s | client CPU ns/msg |\n"
    "|---|---|---|---|---|"
)


def _modes(text: str) -> list[str]:
    """``--modes``: a comma-separated list of :data:`MODES`."""
    modes = [m.strip() for m in text.split(",") if m.strip()]
    for mode in modes:
        if mode not in MODES:
            raise argparse.ArgumentTypeError(f"unknown mode {mode!r}; one of {', '.join(MODES)}")
    if not modes:
        raise argparse.ArgumentTypeError("no mode given")
    return modes


def _count(text: str) -> int:
    """A number of rounds, messages or bytes: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"not an integer of at least 1: {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m trio_embarcadero.tools.clientbench``."""
    parser = argparse.ArgumentParser(
        prog="python -m trio_embarcadero.tools.clientbench",
        description="Publisher and subscriber speed of the Python client (module docstring).",
    )
    parser.add_argument("--modes", type=_modes, default=list(MODES), help=", ".join(MODES))
    for flag, default, text in (
        ("--rounds", 3, "rounds"),
        ("--publish-messages", 300_000, "per publish run (publish_many: three times as many)"),
        ("--subscribe-messages", 1_000_000, "per subscriber run"),
        ("--buffer-bytes", DEFAULT_RECEIVE_BUFFER, "the subscribers' receive buffer"),
    ):
        parser.add_argument(flag, type=_count, default=default, help=f"{text} (default {default})")
    parser.add_argument("--cxl-dir", default="/dev/shm")
    parser.add_argument("--json", help="also write the results here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the client benchmark; 0 on success, 1 if the broker failed."""
    args = build_parser().parse_args(argv)
    plan = _Plan(args)

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    try:
        results = trio.run(_main, plan, args.cxl_dir, say)
    except RunError as exc:
        print(f"clientbench: {exc}", file=sys.stderr)
        return 1
    print("\n".join([TABLE_HEAD, *(r.row() for r in results)]))
    if args.json:
        Path(args.json).write_text(json.dumps([attrs.asdict(r) for r in results], indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
