"""A subscriber as a separate program: print a topic's messages as they arrive.

It may start before the publisher, even before the topic exists: the broker
holds the subscription until messages are committed. ``--start`` picks the
logical offset to begin at (0 is the beginning of the topic).
"""

from __future__ import annotations

import argparse

import trio

from trio_embarcadero import BrokerError, ConnectionLost, open_subscriber


async def subscribe(host: str, port: int, topic: str, start: int, count: int) -> int:
    """Print ``count`` messages from offset ``start``; returns how many were read."""
    read = 0
    async with open_subscriber(host, port, topic, start=start) as subscriber:
        async for message in subscriber:
            text = message.payload.decode(errors="replace")  # bytes, yours to keep
            print(f"{message.offset} (client {message.client_id}): {text}")
            read += 1
            if read == count:
                break
    return read


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print a topic's messages.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1214)
    parser.add_argument("--topic", default="sensors")
    parser.add_argument("--start", type=int, default=0)
    parser.add_argument("--count", type=int, default=1000, help="stop after this many")
    args = parser.parse_args(argv)
    try:
        trio.run(subscribe, args.host, args.port, args.topic, args.start, args.count)
    except BrokerError as exc:  # e.g. code 5: the broker is shutting down
        print(f"broker error {exc.code}: {exc.message}")
        return 1
    except ConnectionLost as exc:
        print(exc)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
