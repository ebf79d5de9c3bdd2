"""Order 5 across broker processes: one total order, whatever is killed.

Two broker processes (``open_cluster``) on one region, a topic of order 5,
and publishers with a connection to each broker. Mid-load the non-head broker
and then the head (the sequencer) are killed with SIGKILL and come back.
Afterwards an ordered subscriber on each broker reads the whole total order:
both see the same sequence, total orders gap-free from 0 (every record's
``total_order`` field checked by the decoder), every acked message in it,
each connection's messages in the order it sent them, a message stored but
not acked before a kill at most twice; ``subscribe --ordered`` prints it.
"""

from __future__ import annotations

import collections
import os
import signal
import sys
from pathlib import Path

import trio
from conftest import wait_until
from test_cli import clean_env
from test_cluster import HOST, TIMEOUT, parse, payload, write_config

from trio_embarcadero import open_publisher, open_subscriber
from trio_embarcadero.broker.cluster import Cluster, open_cluster
from trio_embarcadero.config import load_config
from trio_embarcadero.errors import BrokerError, ConnectionLost
from trio_embarcadero.log import open_log


def committed_and_ordered(cxl_path: str) -> tuple[int, int]:
    with open_log(cxl_path) as log:
        topic = next((t for t in log.topics() if t.name == "t"), None)
        committed = sum(s.messages for s in topic.streams) if topic is not None else 0
        return committed, log.ordered_end("t")


async def read_order(port: int, total: int) -> list[tuple[int, int, int]]:
    """(total order, connection, index) of the first ``total`` messages of the
    total order, read from the broker at ``port``."""
    got: list[tuple[int, int, int]] = []
    async with open_subscriber(HOST, port, "t", ordered=True) as sub:
        while len(got) < total:
            got += [(m.offset, *parse(m.payload)) for m in await sub.receive_messages()]
        assert sub.skipped == 0
    return got


async def test_two_brokers_one_total_order_through_kills_of_either(
    tmp_path: Path, cxl_path: str
) -> None:
    path = write_config(tmp_path, cxl_path)
    path.write_text(path.read_text() + "sequencer_interval_ms = 2.0\n\n[topics]\norder = 5\n")
    config = load_config(path, env={})
    acked: dict[int, int] = {}
    progress: dict[int, int] = collections.Counter()
    errors: dict[int, int] = collections.Counter()
    finish = trio.Event()

    async def connection(cluster: Cluster, conn: int, broker_id: int) -> None:
        """Publish ``conn``'s messages 0, 1, ... to ``broker_id`` until told to
        finish; after a lost connection, again from its last ack."""
        done = 0  # acked so far, over every connection of this one's
        while not finish.is_set() or not done:
            member = await cluster.wait_serving(broker_id)
            starts = member.starts
            try:
                # Without the client's failover: the test resumes by itself.
                async with open_publisher(
                    HOST, member.port, "t", ack=1, batch_bytes=4096, linger=None,
                    delivery_timeout_s=0,
                ) as pub:  # fmt: skip
                    sent = done
                    while not finish.is_set():
                        await pub.publish_many(payload(conn, i) for i in range(sent, sent + 50))
                        sent += 50
                        progress[conn] = done + pub.acked
                        await trio.sleep(0.004)  # a steady load, not a flood
                    await pub.flush()
                    done = sent
            except (BrokerError, ConnectionLost, OSError) as error:
                errors[conn] += 1
                # Resume from the last ack; what was stored unacked comes again.
                done += (error.acked or 0) if isinstance(error, BrokerError) else 0
                await cluster.wait_serving(broker_id, starts=starts + 1)
        acked[conn] = done

    async def more_acks(connections: tuple[int, ...], more: int) -> None:
        """Until each of ``connections`` has ``more`` acks more than now."""
        start = {c: progress[c] for c in connections}
        await wait_until(lambda: all(progress[c] >= start[c] + more for c in connections))

    with trio.fail_after(TIMEOUT):
        async with open_cluster(config, 2, reset=True) as cluster:
            async with trio.open_nursery() as nursery:
                # Connections 0, 2 to the head, 1, 3 to the other broker.
                for conn in range(4):
                    nursery.start_soon(connection, cluster, conn, conn % 2)
                for victim in (1, 0):
                    await more_acks((0, 1, 2, 3), 200)
                    pid = cluster.brokers[victim].pid
                    assert pid is not None
                    os.kill(pid, signal.SIGKILL)  # mid-load
                    await cluster.wait_serving(victim, starts=2)
                await more_acks((0, 1, 2, 3), 100)  # all go on after both kills
                finish.set()
            # Everything committed gets its place (the restarted head resumed).
            await wait_until(lambda: len(set(committed_and_ordered(cxl_path))) == 1)
            _, ordered = committed_and_ordered(cxl_path)
            views = [await read_order(port, ordered) for port in cluster.ports]
            # The command line reads it too (from the other broker, from total order 3).
            command = [sys.executable, "-m", "trio_embarcadero", "subscribe", "--config",
                       str(path), "--port", str(cluster.ports[1]), "--topic", "t", "--ordered",
                       "--from", "3", "--count", "4", "--offsets"]  # fmt: skip
            printed = await trio.run_process(command, capture_stdout=True, env=clean_env())
    lines = [line.split(b"\t") for line in printed.stdout.splitlines()]
    assert [(int(line[0]), *parse(line[3])) for line in lines] == views[0][3:7]
    assert views[0] == views[1]  # every broker serves the same sequence
    order = views[0]
    assert [t for t, _, _ in order] == list(range(ordered))
    assert errors[0] + errors[2] >= 1  # the head's kill hit its connections
    assert errors[1] + errors[3] >= 1  # and the other's kill, its own
    for conn in range(4):
        mine = [i for _, c, i in order if c == conn]
        assert set(range(acked[conn])) <= set(mine)  # every acked message
        firsts = list(dict.fromkeys(mine))
        assert firsts == sorted(firsts)  # in the order the connection sent them
        assert max(collections.Counter(mine).values()) <= 2
    # The region agrees with the subscribers.
    with open_log(cxl_path) as log:
        assert [(m.offset, *parse(m.payload)) for m in log.ordered_messages("t")] == order
