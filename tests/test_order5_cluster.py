"""Order 5 across broker processes: one total order, whatever is killed or stopped.

Broker processes (``open_cluster``) on one region, a topic of order 5, and
publishers with a connection to each broker; afterwards ordered subscribers on
each broker read the whole total order: all see the same sequence, total
orders gap-free from 0 (every record's ``total_order`` field checked by the
decoder), every acked message in it, each connection's messages in the order
it sent them, a message stored but not acked before a kill at most twice; the
region's ordered index names every committed batch exactly once.

* Two brokers: mid-load the non-head broker and then the head (the sequencer)
  are killed with SIGKILL and come back; ``subscribe --ordered`` prints it.
* Three brokers: the sequencer's holder is killed mid-load; another broker
  takes the sequencer over within ``sequencer_lease_s`` and the acks go on.
* Two brokers: the holder is stopped (SIGSTOP, outside the region's lock);
  the other takes the sequencer over once the lease expires; the holder,
  continued (SIGCONT), finds its epoch stale and writes nothing.
* Two brokers with disk logs: the region file is lost (a reboot) and both are
  killed; they replay their disk logs and every broker serves the total order
  of before, new messages after it without a gap.
"""

from __future__ import annotations

import collections
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio
from conftest import wait_until
from memory import read_only_region
from test_cli import clean_env
from test_cluster import HOST, TIMEOUT, parse, payload, write_config

from trio_embarcadero import open_publisher, open_subscriber
from trio_embarcadero.broker.cluster import Cluster, open_cluster
from trio_embarcadero.config import Config, load_config
from trio_embarcadero.errors import BrokerError, ConnectionLost
from trio_embarcadero.log import open_log
from trio_embarcadero.log.layout import (
    BATCH_COMMITTED,
    index_chain,
    iter_batches,
    read_geometry,
    read_index_entry,
    read_ordered_count,
    read_topics,
)
from trio_embarcadero.log.lease import LeaseRecord
from trio_embarcadero.tools.failover import fault_round, stop_outside_the_lock


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


def order5_config(tmp_path: Path, cxl_path: str, cxl: str = "") -> Config:
    path = write_config(tmp_path, cxl_path)
    path.write_text(path.read_text() + f"sequencer_interval_ms = 2.0\n{cxl}\n[topics]\norder = 5\n")
    return load_config(path, env={})


class Load:
    """Publishers on a cluster, connection ``c`` to broker ``brokers[c]``:
    each publishes its messages 0, 1, ... until :attr:`finish` is set, and
    after a lost connection goes on from its last ack (what was stored but
    not acked comes again).

    Attributes:
        acked: Messages acked per connection, once it finished.
        progress: Messages acked so far per connection.
        errors: Connections lost per connection.
        finish: Set to make them flush and stop.
    """

    def __init__(self, cluster: Cluster, brokers: Sequence[int]) -> None:
        self.cluster = cluster
        self.brokers = list(brokers)
        self.acked: dict[int, int] = {}
        self.progress: collections.Counter[int] = collections.Counter()
        self.errors: collections.Counter[int] = collections.Counter()
        self.finish = trio.Event()

    def start(self, nursery: trio.Nursery) -> None:
        for conn, broker_id in enumerate(self.brokers):
            nursery.start_soon(self._connection, conn, broker_id)

    async def _connection(self, conn: int, broker_id: int) -> None:
        done = 0  # acked so far, over every connection of this one's
        while not self.finish.is_set() or not done:
            member = await self.cluster.wait_serving(broker_id)
            starts = member.starts
            try:
                # Without the client's failover: the test resumes by itself.
                async with open_publisher(
                    HOST, member.port, "t", ack=1, batch_bytes=4096, linger=None,
                    delivery_timeout_s=0,
                ) as pub:  # fmt: skip
                    sent = done
                    while not self.finish.is_set():
                        await pub.publish_many(payload(conn, i) for i in range(sent, sent + 50))
                        sent += 50
                        self.progress[conn] = done + pub.acked
                        await trio.sleep(0.004)  # a steady load, not a flood
                    await pub.flush()
                    done = sent
            except (BrokerError, ConnectionLost, OSError) as error:
                self.errors[conn] += 1
                done += (error.acked or 0) if isinstance(error, BrokerError) else 0
                await self.cluster.wait_serving(broker_id, starts=starts + 1)
        self.acked[conn] = done

    async def more_acks(self, more: int, connections: Sequence[int] | None = None) -> None:
        """Until each of ``connections`` (default: all) has ``more`` acks more than now."""
        conns = range(len(self.brokers)) if connections is None else connections
        start = {c: self.progress[c] for c in conns}
        await wait_until(lambda: all(self.progress[c] >= start[c] + more for c in conns))

    async def check(self, cxl_path: str) -> list[tuple[int, int, int]]:
        """Once finished: the total order is read whole from every broker,
        the same everywhere, gap-free, with every acked message once at least
        and in its connection's order; the ordered index names every
        committed batch once. Returns the order."""
        # Everything committed gets its place (the sequencer went on).
        with trio.move_on_after(5):
            await wait_until(lambda: len(set(committed_and_ordered(cxl_path))) == 1)
        check_ordered_index(cxl_path)
        committed, ordered = committed_and_ordered(cxl_path)
        assert committed == ordered
        views = [await read_order(port, ordered) for port in self.cluster.ports]
        assert all(view == views[0] for view in views)  # every broker serves one sequence
        order = views[0]
        assert [t for t, _, _ in order] == list(range(ordered))
        for conn in range(len(self.brokers)):
            mine = [i for _, c, i in order if c == conn]
            assert set(range(self.acked[conn])) <= set(mine)  # every acked message
            firsts = list(dict.fromkeys(mine))
            assert firsts == sorted(firsts)  # in the order the connection sent them
            assert max(collections.Counter(mine).values()) <= 2
        check_ordered_index(cxl_path)
        with open_log(cxl_path) as log:  # the region agrees with the subscribers
            assert [(m.offset, *parse(m.payload)) for m in log.ordered_messages("t")] == order
        return order


def check_ordered_index(cxl_path: str) -> None:
    """No batch got two total orders, none was skipped: the index's entries
    follow each other gap-free, each names another batch, whose header says
    it is ordered at that total order, and they are as many as the batches
    committed."""
    with read_only_region(cxl_path) as region:
        g = read_geometry(region)
        index = read_topics(region, g)["t"]
        chain = index_chain(region, g, index)
        entries = [
            read_index_entry(region, g, chain, k)
            for k in range(read_ordered_count(region, g, index))
        ]
        headers = {
            offset: h
            for broker in range(g.max_brokers)
            for offset, h in iter_batches(region, g, index, broker)
            if h.batch_complete == BATCH_COMMITTED
        }
    assert len({(e.header_offset, e.generation) for e in entries}) == len(entries)
    assert [e.total_order for e in entries] == [
        sum(e.num_msg for e in entries[:k]) for k in range(len(entries))
    ]
    for e in entries:
        h = headers[e.header_offset]
        assert (h.ordered, h.total_order, h.num_msg) == (1, e.total_order, e.num_msg)
    assert len(entries) == len(headers)


def lease_of(cxl_path: str) -> LeaseRecord:
    with open_log(cxl_path) as log:
        return log.sequencer_lease()


async def test_two_brokers_one_total_order_through_kills_of_either(
    tmp_path: Path, cxl_path: str
) -> None:
    config = order5_config(tmp_path, cxl_path)
    with trio.fail_after(TIMEOUT):
        async with open_cluster(config, 2, reset=True) as cluster:
            # Connections 0, 2 to the head, 1, 3 to the other broker.
            load = Load(cluster, [0, 1, 0, 1])
            async with trio.open_nursery() as nursery:
                load.start(nursery)
                for victim in (1, 0):
                    await load.more_acks(200)
                    pid = cluster.brokers[victim].pid
                    assert pid is not None
                    os.kill(pid, signal.SIGKILL)  # mid-load
                    await cluster.wait_serving(victim, starts=2)
                await load.more_acks(100)  # all go on after both kills
                load.finish.set()
            order = await load.check(cxl_path)
            # The command line reads it too (from the other broker, from total order 3).
            command = [sys.executable, "-m", "trio_embarcadero", "subscribe", "--config",
                       str(tmp_path / "cluster.toml"), "--port", str(cluster.ports[1]),
                       "--topic", "t", "--ordered", "--from", "3", "--count", "4",
                       "--offsets"]  # fmt: skip
            printed = await trio.run_process(command, capture_stdout=True, env=clean_env())
    lines = [line.split(b"\t") for line in printed.stdout.splitlines()]
    assert [(int(line[0]), *parse(line[3])) for line in lines] == order[3:7]
    assert load.errors[0] + load.errors[2] >= 1  # the head's kill hit its connections
    assert load.errors[1] + load.errors[3] >= 1  # and the other's kill, its own


async def test_sessions_spread_over_two_brokers_are_ordered_each_in_its_order(
    tmp_path: Path, cxl_path: str
) -> None:
    """Three publish sessions (client_req 2), each spreading its batches over
    both broker processes (the client's default), on an order-5 topic: every
    message is in the total order exactly once, each session's in the order
    it published them, and no batch_seq was skipped (a skip fails its
    publisher with error 2). The hole timeout is a minute: a session batch
    that held its stream until then (crossed sessions: each broker holding
    one session's later batch before the other's earlier one) would stall
    the test past its deadline."""
    config = order5_config(tmp_path, cxl_path, "sequencer_hole_timeout_s = 60.0")
    sessions, messages = 3, 300
    with trio.fail_after(TIMEOUT):
        async with open_cluster(config, 2, reset=True) as cluster:
            brokers = [(HOST, port) for port in cluster.ports]

            async def publish(client: int) -> None:
                async with open_publisher(
                    topic="t", brokers=brokers, ack=1, batch_bytes=1024, linger=None,
                    idempotent=True,
                ) as pub:  # fmt: skip
                    for first in range(0, messages, 20):
                        await pub.publish_many(payload(client, i) for i in range(first, first + 20))
                    await pub.flush()
                    assert pub.acked == messages

            async with trio.open_nursery() as nursery:
                for client in range(sessions):
                    nursery.start_soon(publish, client)
            committed, ordered = committed_and_ordered(cxl_path)
            assert committed == ordered == sessions * messages  # acked once ordered
            check_ordered_index(cxl_path)
            order = await read_order(cluster.ports[1], ordered)
    assert [t for t, _, _ in order] == list(range(sessions * messages))
    for client in range(sessions):
        assert [i for _, c, i in order if c == client] == list(range(messages))
    with open_log(cxl_path) as log:
        stored_by = {b: sum(1 for _ in log.messages("t", broker_id=b)) for b in (0, 1)}
    assert min(stored_by.values()) > 0  # the sessions did spread over both


async def test_a_killed_sequencer_is_taken_over_within_its_lease(
    tmp_path: Path, cxl_path: str
) -> None:
    config = order5_config(tmp_path, cxl_path, "sequencer_lease_s = 0.5")
    with trio.fail_after(TIMEOUT):
        async with open_cluster(config, 3, reset=True) as cluster:
            load = Load(cluster, [0, 1, 2])
            async with trio.open_nursery() as nursery:
                load.start(nursery)
                await load.more_acks(100)
                assert lease_of(cxl_path).holder == 0
                # The failover measurement's round: the holder is killed
                # mid-load, its acked publishers on the others send a batch.
                with open_log(cxl_path) as region:
                    measured = await fault_round(cluster, region, "kill")
                # Another broker took it over at once: the head's process was
                # gone (its lock free), no need to wait for the lease to expire;
                # the batches sent meanwhile were acked once it had.
                assert (measured.victim, lease_of(cxl_path).epoch) == (0, 2)
                assert measured.new_holder in (1, 2)
                assert measured.takeover_s < config.cxl.sequencer_lease_s / 2
                assert measured.takeover_s <= measured.first_ack_s
                await load.more_acks(100)  # all go on, the restarted head's too
                load.finish.set()
            await load.check(cxl_path)
            assert lease_of(cxl_path).epoch == 2  # the restarted head did not take it back


async def test_a_stopped_sequencer_is_taken_over_and_writes_nothing_when_it_resumes(
    tmp_path: Path, cxl_path: str, capfd: pytest.CaptureFixture[str]
) -> None:
    config = order5_config(tmp_path, cxl_path, "sequencer_lease_s = 0.5")
    lease_s = config.cxl.sequencer_lease_s
    with trio.fail_after(TIMEOUT):
        async with open_cluster(config, 2, reset=True) as cluster:
            load = Load(cluster, [0, 1])
            async with trio.open_nursery() as nursery:
                load.start(nursery)
                await load.more_acks(100)
                before = lease_of(cxl_path)
                assert (before.epoch, before.holder) == (1, 0)
                await stop_outside_the_lock(before.pid, cxl_path)
                stopped_at = trio.current_time()
                try:
                    await wait_until(lambda: lease_of(cxl_path).epoch > 1, poll=0.002)
                    took = trio.current_time() - stopped_at
                    after = lease_of(cxl_path)
                    assert (after.epoch, after.holder) == (2, 1)
                    # Not before the lease ran out (a quarter lease at most
                    # since its last renewal), within a tenth of one after.
                    assert 0.75 * lease_s <= took < lease_s + 0.5
                    await load.more_acks(100, (1,))  # acks go on while it is stopped
                finally:
                    os.kill(before.pid, signal.SIGCONT)
                await load.more_acks(100)  # its own connection goes on too
                load.finish.set()
            await load.check(cxl_path)
            assert lease_of(cxl_path).epoch == 2  # the resumed broker took nothing back
    err = capfd.readouterr().err
    assert "broker 1 took the sequencer over at epoch 2: broker 0" in err
    assert "stopped renewing it" in err
    assert (
        "broker 0's sequencer lease (epoch 1) is stale: broker 1 "
        f"(pid {after.pid}) took it over at epoch 2; this broker stops ordering"
    ) in err


async def test_an_order_5_region_rebuilt_from_the_disk_logs_keeps_its_total_order(
    tmp_path: Path, cxl_path: str
) -> None:
    """Two brokers with disk logs; the region file is lost (a reboot empties
    /dev/shm) and both are killed. They come back, replay their disk logs,
    and ordered subscribers on each see the sequence they saw before; new
    messages follow it without a gap."""
    path = write_config(tmp_path, cxl_path)
    disk = tmp_path / "disk"
    path.write_text(
        path.read_text()
        + f'sequencer_interval_ms = 2.0\n\n[topics]\norder = 5\n\n[storage]\ndir = "{disk}"\n'
    )
    config = load_config(path, env={})

    async def publish(cluster: Cluster, conn: int, first: int, count: int) -> None:
        port = cluster.ports[conn % 2]
        async with open_publisher(HOST, port, "t", ack=2, batch_bytes=2048, linger=None) as pub:
            for i in range(first, first + count, 10):
                await pub.publish_many(payload(conn, j) for j in range(i, i + 10))
                await trio.sleep(0.001)  # the connections' batches interleave
            await pub.flush()

    with trio.fail_after(TIMEOUT):
        async with open_cluster(config, 2, reset=True) as cluster:
            async with trio.open_nursery() as nursery:
                for conn in range(4):  # two connections to each broker
                    nursery.start_soon(publish, cluster, conn, 0, 150)
            before = await read_order(cluster.ports[1], 600)  # all acked at level 2
            os.unlink(cxl_path)  # the reboot: /dev/shm is gone, the disk is not
            for member in cluster.brokers:
                assert member.pid is not None
                os.kill(member.pid, signal.SIGKILL)
            for broker_id in (0, 1):
                await cluster.wait_serving(broker_id, starts=2)
            await wait_until(lambda: committed_and_ordered(cxl_path) == (600, 600))
            assert [await read_order(port, 600) for port in cluster.ports] == [before] * 2
            async with trio.open_nursery() as nursery:
                for conn in range(4):
                    nursery.start_soon(publish, cluster, conn, 150, 20)
            after = await read_order(cluster.ports[0], 680)
    assert [t for t, _, _ in before] == list(range(600))
    assert after[:600] == before
    assert [t for t, _, _ in after] == list(range(680))
    for conn in range(4):
        assert [i for _, c, i in after if c == conn] == list(range(170))
