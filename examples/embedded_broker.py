"""Embed a broker in a Trio application, and publish and consume in the same program.

The broker is one more task in the application's nursery: ``nursery.start``
returns once it accepts connections and hands back the :class:`Broker` (its
``port`` is the real one when the config asks for port 0). Cancelling the
nursery drains the broker gracefully.

Run it: ``python examples/embedded_broker.py --orders 10000``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from functools import partial

import trio

from trio_embarcadero import BrokerError, load_config, open_publisher, open_subscriber, serve
from trio_embarcadero.log import remove_region


async def run(orders: int, cxl_path: str) -> float:
    """Publish ``orders`` orders and add up their amounts from a subscriber."""
    config = load_config(
        None,
        overrides={
            "broker.port": 0,  # any free port
            "cxl.path": cxl_path,
            "cxl.size_mb": 64,
            "cxl.segment_mb": 8,
            "cxl.prefault": False,
        },
    )
    async with trio.open_nursery() as nursery:
        broker = await nursery.start(partial(serve, config, reset=True))
        print(f"broker listening on 127.0.0.1:{broker.port}")
        total = 0.0

        async def consume(*, task_status: trio.TaskStatus[None]) -> None:
            nonlocal total
            async with open_subscriber("127.0.0.1", broker.port, "orders") as orders_in:
                task_status.started()
                async for message in orders_in:
                    total += json.loads(message.payload)["amount"]
                    if message.offset == orders - 1:
                        return

        async with trio.open_nursery() as app:
            await app.start(consume)
            async with open_publisher("127.0.0.1", broker.port, "orders") as orders_out:
                for i in range(orders):
                    order = {"id": i, "amount": round(1 + (i % 100) * 0.25, 2)}
                    await orders_out.publish(json.dumps(order).encode())
            # Leaving the publisher's block waited until every order was acked.
            print(f"published {orders_out.published} orders, {orders_out.acked} acked")
        stats = broker.statistics()
        print(f"broker committed {stats.messages_committed} messages")
        nursery.cancel_scope.cancel()  # graceful shutdown of the broker
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=10_000)
    args = parser.parse_args(argv)
    directory = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    path = os.path.join(directory, f"trio-embarcadero-example-{os.getpid()}")
    try:
        total = trio.run(run, args.orders, path)
    except BrokerError as exc:
        print(f"broker error: {exc}")
        return 1
    finally:
        remove_region(path)  # the CXL file and its lock file
    print(f"total amount: {total:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
