"""The sequencer alone: how many batches a second it orders over a prepared region.

``python -m trio_embarcadero.tools.seqbench [--batches N] [--brokers B]
[--messages M] [--path P]`` commits N batches of an order-5 topic, spread
round-robin over B brokers' streams of one region (not timed), then times a
fresh sequencer ordering all of them, step by step, as the head broker would
after a restart with that backlog (the first step finds each stream's
frontier, as a restart does). It prints one line; ``--json`` prints the
result as JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
import uuid
from contextlib import ExitStack

import attrs
import numpy as np

from ..log import CxlLog, remove_region
from ..wire import BatchHeader, encode_batch, scan_records


@attrs.frozen
class SequencerBench:
    """One run.

    Attributes:
        batches: Batches ordered.
        messages: Their messages.
        brokers: Streams they were spread over.
        seconds: Time the sequencer took to order all of them.
    """

    batches: int
    messages: int
    brokers: int
    seconds: float

    @property
    def batches_per_second(self) -> float:
        return self.batches / self.seconds if self.seconds > 0 else 0.0


def run(path: str, *, batches: int, brokers: int = 2, messages: int = 1) -> SequencerBench:
    """Prepare a region at ``path`` (removed afterwards) and time the sequencer on it.

    Raises:
        RuntimeError: The sequencer did not order every batch committed.
    """
    batch = encode_batch([b"m" * 100] * messages, client_id=1)[128:]
    payload = np.frombuffer(batch, dtype=np.uint8)
    starts = scan_records(payload, messages)
    # Room for every batch, with a margin for segment rounding and the index.
    size = max(64 << 20, 2 * batches * (128 + len(batch)) + (32 << 20))
    with ExitStack() as stack:
        stack.callback(remove_region, path)
        logs = []
        for broker in range(brokers):
            log = CxlLog.open(
                path,
                size=size,
                segment_size=8 << 20,
                unit_size=64 << 10,
                max_topics=4,
                max_brokers=brokers,
                broker_id=broker,
                prefault=False,
                reset=False,
            )
            stack.callback(log.close)
            stack.callback(gc.collect)  # views of the region, before its close
            log.topic_order = lambda _topic: 5
            logs.append(log)
        for i in range(batches):
            log = logs[i % brokers]
            reservation = log.get_cxl_buffer("bench", BatchHeader(i, 1, messages, len(batch)))
            reservation.payload[:] = payload
            log.complete(reservation, starts)
            del reservation
        sequencer = logs[0].sequencer(hole_timeout_ns=10**9)
        stack.callback(sequencer.close)
        ordered = 0
        started = time.perf_counter()
        while step := sequencer.step(0):
            ordered += len(step)
        seconds = time.perf_counter() - started
        if ordered != batches:
            raise RuntimeError(f"the sequencer ordered {ordered} of {batches} batches")
        return SequencerBench(batches, batches * messages, brokers, seconds)


def main(argv: list[str] | None = None) -> int:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m trio_embarcadero.tools.seqbench")
    parser.add_argument("--batches", type=int, default=200_000)
    parser.add_argument("--brokers", type=int, default=2)
    parser.add_argument("--messages", type=int, default=1, help="messages a batch")
    parser.add_argument("--path", default=f"/dev/shm/trio-embarcadero-seqbench-{uuid.uuid4().hex}")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = run(args.path, batches=args.batches, brokers=args.brokers, messages=args.messages)
    if args.json:
        print(json.dumps({**attrs.asdict(result), "batches_per_second": result.batches_per_second}))
    else:
        print(
            f"sequencer: {result.batches} batches ({result.messages} messages) over "
            f"{result.brokers} brokers ordered in {result.seconds:.3f} s: "
            f"{result.batches_per_second:,.0f} batches/s"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
