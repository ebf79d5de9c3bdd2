"""A publisher as a separate program: send N messages to a running broker.

Start a broker (``trio-embarcadero serve --config config.toml``), then::

    python examples/subscriber.py --topic sensors --count 1000 &
    python examples/publisher.py --topic sensors --count 1000
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import trio

from trio_embarcadero import BrokerError, ConnectionLost, open_publisher


async def publish(host: str, port: int, topic: str, count: int, *, dial_back: bool) -> int:
    """Publish ``count`` readings; returns how many the broker acknowledged."""
    started = time.perf_counter()
    async with open_publisher(host, port, topic, ack=1, dial_back=dial_back) as publisher:
        for i in range(count):
            reading = f"sensor-{i % 8} reading {i} value {(i * 7919) % 1000}"
            await publisher.publish(reading.encode())
        # Exiting the block flushes: it returns once every message is acked.
    elapsed = time.perf_counter() - started
    print(f"acked {publisher.acked} of {publisher.published} messages in {elapsed:.3f} s")
    return publisher.acked


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Publish messages to a broker.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1214)
    parser.add_argument("--topic", default="sensors")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--dial-back", action="store_true", help="acks on a second connection")
    args = parser.parse_args(argv)
    try:
        acked = trio.run(
            partial(publish, args.host, args.port, args.topic, args.count, dial_back=args.dial_back)
        )
    except BrokerError as exc:
        # exc.acked messages are stored; the rest may not be.
        print(f"broker error {exc.code}: {exc.message}; {exc.acked} messages acked")
        return 1
    except ConnectionLost as exc:
        print(exc)
        return 1
    return 0 if acked == args.count else 1


if __name__ == "__main__":
    raise SystemExit(main())
