"""The Python clients through a broker's ``kill -9`` and restart, across processes.

Two broker processes (``open_cluster``) on one region, a topic of order 5. A
publisher that knows both brokers publishes under a steady load; an ordered
subscriber reads the total order, and a plain subscriber reads broker 1's own
stream. Mid-load broker 1 is killed with SIGKILL and the cluster starts it
again (same id, same port). The application sees no error: the publisher
sends what broker 1 had not acknowledged to broker 0 and dials broker 1 again
once it is back; the ordered subscriber goes on at broker 0 from the next
total order; the plain one waits for broker 1 and goes on from the next
logical offset. Afterwards every message is in the total order (0 lost; a
plain publisher's resend may store a message twice: counted; a session's
never does), and each subscriber saw each total order, or offset, exactly once.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
from pathlib import Path

import trio
from conftest import wait_until
from test_cli import clean_env
from test_cluster import HOST, TIMEOUT, parse, payload, write_config
from test_order5_cluster import committed_and_ordered

from trio_embarcadero import Message, open_publisher, open_subscriber
from trio_embarcadero.broker.cluster import open_cluster
from trio_embarcadero.config import load_config
from trio_embarcadero.log import open_log
from trio_embarcadero.log.topics import create_topic_file


def committed(cxl_path: str, topic: str, broker_id: int) -> int:
    with open_log(cxl_path) as log:
        found = next(t for t in log.topics() if t.name == topic)
        return next(s.messages for s in found.streams if s.broker_id == broker_id)


async def test_clients_ride_out_the_kill_of_a_broker(tmp_path: Path, cxl_path: str) -> None:
    path = write_config(tmp_path, cxl_path)
    # No HTTP endpoint: a broker restarted on its pinned port would serve HTTP
    # on the fixed base port + id, which another process may hold (then the
    # restart fails and the broker comes back on another port).
    path.write_text(path.read_text() + "sequencer_interval_ms = 2.0\n\n[http]\nenabled = false\n")
    config = load_config(path, env={})
    published: dict[str, int] = {}
    sessions: dict[str, bool] = {}  # the publisher ran a session (the default decides)
    ordered: list[Message] = []  # topic t (order 5), from any broker
    own: list[Message] = []  # topic p (order 0), broker 1's stream
    killed = trio.Event()
    done = trio.Event()
    targets: dict[str, int] = {}
    printed: list[subprocess.CompletedProcess[bytes]] = []
    with trio.fail_after(TIMEOUT):
        async with open_cluster(config, 2, reset=True) as cluster:
            create_topic_file(cxl_path, "t", order=5)
            zero, one = ((HOST, port) for port in cluster.ports)

            async def publish(topic: str, client: int) -> None:
                """Until 10 chunks after the publisher is back on broker 1."""
                # Topic p's publisher hands batches to both brokers (a
                # session may on an order-0 topic), so broker 1's stream of
                # it goes on after the restart.
                async with open_publisher(
                    topic=topic, brokers=[one, zero], client_id=client, batch_bytes=4096,
                    linger=None, spread=True if topic == "p" else None,
                ) as pub:  # fmt: skip
                    sent = back = 0
                    while back < 10:
                        await pub.publish_many(payload(client, i) for i in range(sent, sent + 50))
                        sent += 50
                        if sent == 500 and client == 1:
                            await kill(1)
                        back += pub.reconnects > 0
                        await trio.sleep(0.004)  # a steady load, not a flood
                assert pub.acked == sent
                published[topic] = sent
                sessions[topic] = pub.idempotent

            async def kill(broker_id: int) -> None:
                pid = cluster.brokers[broker_id].pid
                assert pid is not None
                os.kill(pid, signal.SIGKILL)
                killed.set()
                # The command line takes several brokers too; the first is down.
                nursery.start_soon(command_line)

            async def command_line() -> None:
                command = [sys.executable, "-m", "trio_embarcadero", "subscribe", "--config",
                           str(path), "--topic", "t", "--ordered", "--from", "3", "--count", "4",
                           "--offsets", "--broker", "{}:{}".format(*one), "--broker",
                           "{}:{}".format(*zero)]  # fmt: skip
                printed[:] = [await trio.run_process(command, capture_stdout=True, env=clean_env())]

            async def read_ordered() -> None:
                async with open_subscriber(topic="t", brokers=[one, zero], ordered=True) as sub:
                    await killed.wait()
                    while not done.is_set() or len(ordered) < targets["t"]:
                        with trio.move_on_after(0.05):
                            ordered.extend(await sub.receive_messages())
                    assert sub.broker == f"{HOST}:{cluster.ports[0]}"  # moved on
                    assert sub.reconnects >= 1

            async def read_own() -> None:
                async with open_subscriber(*one, "p") as sub:
                    while not done.is_set() or len(own) < targets["p"]:
                        with trio.move_on_after(0.05):
                            own.extend(await sub.receive_messages())
                    assert sub.reconnects >= 1

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_ordered)
                nursery.start_soon(read_own)
                async with trio.open_nursery() as publishers:
                    publishers.start_soon(publish, "t", 1)
                    publishers.start_soon(publish, "p", 2)
                # Everything committed gets its place, duplicates included.
                await wait_until(lambda: len(set(committed_and_ordered(cxl_path))) == 1)
                targets["t"] = committed_and_ordered(cxl_path)[1]
                targets["p"] = committed(cxl_path, "p", 1)
                done.set()
            assert cluster.brokers[1].starts == 2
    lines = [line.split(b"\t") for line in printed[0].stdout.splitlines()]
    assert [(int(line[0]), line[3]) for line in lines] == [
        (m.offset, m.payload) for m in ordered[3:7]
    ]
    with open_log(cxl_path) as log:
        log_order = [(m.offset, bytes(m.payload)) for m in log.ordered_messages("t")]
        stream_one = [(m.offset, bytes(m.payload)) for m in log.messages("p", 1)]
        stream_zero = [bytes(m.payload) for m in log.messages("p", 0)]
    # The ordered subscriber: each total order once, from 0, as the region has them.
    assert [(m.offset, m.payload) for m in ordered] == log_order
    # The plain one: broker 1's offsets once each, across the restart.
    assert [(m.offset, m.payload) for m in own] == stream_one
    # Nothing lost; what a plain publisher's resend stored twice is counted,
    # at most once more; a session stores each message once.
    for topic, payloads in (
        ("t", [p for _, p in log_order]),
        ("p", [p for _, p in stream_one] + stream_zero),
    ):
        indices = collections.Counter(parse(p)[1] for p in payloads)
        assert set(indices) == set(range(published[topic]))
        assert max(indices.values()) <= (1 if sessions[topic] else 2)
        print(f"{topic}: {len(payloads) - published[topic]} duplicates of {published[topic]}")
