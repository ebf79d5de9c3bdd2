"""Client failover in memory, on the autojump clock: a broker goes away, the
clients go on.

* Fake brokers (the broker's end of in-memory connections, acking and failing
  on command) pin down the protocol: what a publisher sends again and with
  which ``batch_seq``, session handshakes, which errors fail over and which
  fail, the backoff, and the delivery timeout to the virtual second; an
  ordered subscriber that moves to the next broker at the next total order.
* Real in-memory brokers on one region, stopped and started again: a
  publisher and a subscriber ride out the restart, every message stored and
  read once.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from conftest import MakeConfig
from memory import MemoryListener, memory_broker
from rawclient import committed, payload_for
from tcpclient import closed_port
from test_client_checkpoints import FakeBroker as BrokerEnd

from trio_embarcadero import BrokerError, ConnectionLost, ErrorCode, NoBrokerError, open_broker
from trio_embarcadero.cli import build_parser, main
from trio_embarcadero.client import (
    BROKER_FAILED,
    Message,
    open_publisher,
    open_subscriber,
)
from trio_embarcadero.client import publisher as publisher_module
from trio_embarcadero.client.failover import BACKOFF_MAX, Backoff, endpoints
from trio_embarcadero.log import open_log
from trio_embarcadero.wire import (
    ACK_BROKER_ID,
    ACK_COUNT,
    BATCH_HEADER_SIZE,
    HANDSHAKE,
    HANDSHAKE_SIZE,
    encode_batch_metadata,
    padded_size,
    unpack_batch_header,
)

RECORD = padded_size(100)
BATCH = 4 * RECORD  # four 100-byte messages a batch


@attrs.frozen
class Hello:
    """A handshake as a fake broker read it."""

    client_id: int
    ack: int
    last_addr: int
    request: int
    topic: str


@attrs.frozen
class Received:
    """A batch as a fake broker read it."""

    seq: int
    first: int  # client_order of its first message
    count: int
    data: bytes


class FakeConnection(BrokerEnd):
    """The broker's end of one publish connection: reads the handshake and
    batches, sends the broker id, acks when told to (or at once)."""

    def __init__(
        self, stream: trio.abc.Stream, broker_id: int, auto_ack: bool, refuse: bool = False
    ) -> None:
        super().__init__(stream)
        self.broker_id = broker_id
        self.auto_ack = auto_ack
        self.refuse = refuse
        self.reading = trio.Event()  # cleared: it reads no further batch
        self.reading.set()
        self.hello: Hello | None = None
        self.got: list[Received] = []  # the batches received
        self.received = 0  # messages
        self.acked = 0

    async def run(self) -> None:
        try:
            client_id, ack, _, last_addr, _, request, topic = HANDSHAKE.unpack(
                await self._receive(HANDSHAKE_SIZE)
            )
            self.hello = Hello(client_id, ack, last_addr, request, topic.rstrip(b"\0").decode())
            if self.refuse:  # a broker draining: error 5 in place of the broker id
                await self.fail(ErrorCode.SHUTTING_DOWN, "broker is shutting down")
                return
            if ack:  # ack level 0: no ack stream at all
                await self._send(ACK_BROKER_ID.pack(self.broker_id))
            while True:
                await self.reading.wait()
                head = await self._receive(BATCH_HEADER_SIZE)
                header = unpack_batch_header(head)
                body = await self._receive(header.total_size)
                first = struct.unpack_from("<Q", body, 40)[0]  # the first record's client_order
                self.got.append(Received(header.batch_seq, first, header.num_msg, head + body))
                self.received += header.num_msg
                if self.auto_ack and ack:
                    await self.ack()
        except EOFError:
            await self.stream.aclose()  # the end of the stream is confirmed
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def ack(self, count: int | None = None) -> None:
        """Ack the first ``count`` messages received (all, by default)."""
        self.acked = self.received if count is None else count
        await self._send(ACK_COUNT.pack(self.acked))

    async def fail(self, code: int | None = None, text: str = "") -> None:
        """End the connection: with an error frame, or (None) without one."""
        if code is not None:
            await super().fail(code, text)
        await self.stream.aclose()


class FakeBroker:
    """A broker whose connections are in memory; it can refuse them."""

    def __init__(self, broker_id: int, nursery: trio.Nursery, *, auto_ack: bool = True) -> None:
        self.broker_id = broker_id
        self.nursery = nursery
        self.auto_ack = auto_ack
        # Lockstep connections: a write returns once the broker read it all,
        # so a broker that stops reading holds the publisher's sender.
        self.lockstep = False
        self.reachable = True
        self.refuse = False  # connections are refused with error 5
        self.dials = 0
        self.connections: list[FakeConnection] = []

    async def dial(self) -> trio.abc.Stream:
        self.dials += 1
        await trio.lowlevel.checkpoint()
        if not self.reachable:
            raise ConnectionLost(f"broker {self.broker_id} refused the connection")
        pair = (
            trio.testing.lockstep_stream_pair if self.lockstep else trio.testing.memory_stream_pair
        )
        client, server = pair()
        connection = FakeConnection(server, self.broker_id, self.auto_ack, self.refuse)
        self.connections.append(connection)
        self.nursery.start_soon(connection.run)
        return client

    @property
    def last(self) -> FakeConnection:
        return self.connections[-1]

    def batches(self) -> list[Received]:
        return [b for c in self.connections for b in c.got]


def messages(count: int, first: int = 0) -> list[bytes]:
    return [payload_for(7, i, 100) for i in range(first, first + count)]


def stored(*brokers: FakeBroker) -> dict[int, list[bytes]]:
    """batch_seq -> the wire bytes of each time a batch arrived (acked or not)."""
    out: dict[int, list[bytes]] = {}
    for broker in brokers:
        for batch in broker.batches():
            out.setdefault(batch.seq, []).append(batch.data)
    return out


@asynccontextmanager
async def bounded_nursery() -> AsyncIterator[trio.Nursery]:
    """A nursery under a deadline of 600 virtual seconds: a test that
    deadlocks fails instead of hanging."""
    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            yield nursery


@asynccontextmanager
async def fake_brokers(
    count: int, *, auto_ack: bool = True
) -> AsyncIterator[tuple[trio.Nursery, list[FakeBroker]]]:
    async with bounded_nursery() as nursery:
        yield nursery, [FakeBroker(i, nursery, auto_ack=auto_ack) for i in range(count)]
        nursery.cancel_scope.cancel()


def options(**more: Any) -> dict[str, Any]:
    """Batches of four messages, a window of 100 batches, a plain publisher
    (whatever the default)."""
    return {
        "topic": "t",
        "batch_bytes": BATCH,
        "max_inflight_bytes": 100 * BATCH,
        "linger": None,
        "client_id": 7,
        "idempotent": False,
        **more,
    }


# -- the publisher ----------------------------------------------------------------------


async def test_a_failed_brokers_unacked_batches_go_to_the_other_with_their_batch_seq(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with fake_brokers(2, auto_ack=False) as (_, (zero, one)):
        async with open_publisher(brokers=[zero.dial, one.dial], **options()) as pub:
            assert pub.brokers == (zero.dial.__qualname__, one.dial.__qualname__)
            await pub.publish_many(messages(40))  # ten batches
            await trio.sleep(0.1)
            assert pub.connected == 2
            # Spread over both: each broker has some of them.
            seqs = sorted(b.seq for b in zero.batches() + one.batches())
            assert seqs == list(range(10))
            assert zero.batches()
            assert one.batches()
            # Broker 0 acks its first batch, then dies (EOF, no error frame).
            first_on_zero = zero.last.got[0]
            await zero.last.ack(first_on_zero.count)
            zero.reachable = False
            await zero.last.fail()
            await trio.sleep(0.1)
            # Its other batches went to broker 1, byte for byte the same.
            lost = [b.seq for b in zero.batches()[1:]]
            assert [b.seq for b in one.last.got[-len(lost) :]] == lost
            for seq in lost:
                sent = stored(zero, one)[seq]
                assert len(sent) == 2
                assert sent[0] == sent[1]
            assert pub.resent == len(lost)
            await one.last.ack()
            await pub.flush()
            assert pub.acked == pub.published == 40
        assert pub.reconnects == 0  # broker 0 never came back
    # Every message once at the broker that acked it (batch 0's first
    # broker, the rest at broker 1).
    acked = [first_on_zero, *one.batches()]
    assert sorted(b.seq for b in acked) == list(range(10))


async def test_the_same_broker_is_dialled_again_with_a_growing_backoff(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with fake_brokers(1) as (_, (broker,)):
        async with open_publisher(brokers=[broker.dial], **options()) as pub:
            await pub.publish_many(messages(8))
            await pub.flush()
            broker.reachable = False
            await broker.last.fail(ErrorCode.SHUTTING_DOWN, "broker is shutting down")
            down = trio.current_time()
            await pub.publish_many(messages(8, 8))  # waits for the broker, does not raise
            await trio.sleep(2.0)
            # Dialled at once, then after pauses of about 50, 100, 200 ms ... 1 s.
            assert 5 <= broker.dials - 1 <= 7
            broker.reachable = True
            await pub.flush()
            back = trio.current_time() - down
            assert 2.0 < back <= 2.0 + BACKOFF_MAX
            assert pub.acked == 16
            assert pub.reconnects == 1
    # Error 5 came after the acks: nothing was stored twice.
    assert [b.seq for b in broker.batches()] == [0, 1, 2, 3]


async def test_a_broker_that_refuses_every_handshake_is_not_dialled_in_a_loop(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with fake_brokers(1) as (_, (broker,)):
        async with open_publisher(brokers=[broker.dial], **options()) as pub:
            await pub.publish(b"x")
            await pub.flush()
            broker.refuse = True  # it drains: each connection gets error 5 at once
            await broker.last.fail(ErrorCode.SHUTTING_DOWN, "broker is shutting down")
            await pub.publish(b"y")
            await trio.sleep(3.0)
            # About 50, 100, 200, 400, 800 ms, 1 s, 1 s: the backoff went on growing.
            assert 5 <= broker.dials - 1 <= 8
            broker.refuse = False
            await pub.flush()


async def test_no_broker_for_the_delivery_timeout_fails_the_publisher(
    autojump_clock: trio.testing.MockClock,
) -> None:
    seen: dict[str, Any] = {}
    async with fake_brokers(2) as (_, brokers):

        async def publish() -> None:
            async with open_publisher(
                brokers=[b.dial for b in brokers], delivery_timeout_s=7.5, **options()
            ) as pub:
                seen["pub"] = pub
                await pub.publish_many(messages(4))
                await pub.flush()
                for broker in brokers:
                    broker.reachable = False
                    await broker.last.fail()
                lost = trio.current_time()
                await pub.publish_many(messages(4, 4))
                try:
                    await pub.flush()
                finally:
                    seen["waited"] = trio.current_time() - lost
                    seen["failed"] = pub.failed

        with pytest.raises(NoBrokerError) as info:
            await publish()
    pub = seen["pub"]
    assert 7.5 <= seen["waited"] < 7.5 + 0.01
    assert seen["failed"]
    error = info.value
    assert error.code == BROKER_FAILED
    assert error.acked == 4
    assert error.timeout == 7.5
    assert error.brokers == pub.brokers
    names = ", ".join(pub.brokers)
    assert error.message.startswith(f"no broker for 7.5 s (tried {names}); last failure: ")
    assert error.message.endswith("refused the connection")


async def test_an_idle_publisher_without_a_broker_fails_only_once_a_message_waits(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with fake_brokers(1) as (_, (broker,)):
        waited: list[float] = []

        async def publish() -> None:
            async with open_publisher(
                brokers=[broker.dial], delivery_timeout_s=5.0, **options()
            ) as pub:
                broker.reachable = False
                await broker.last.fail()
                await trio.sleep(60)
                assert not pub.failed  # nothing to deliver
                await pub.publish(b"now")
                start = trio.current_time()
                await trio.sleep(4.9)
                assert not pub.failed
                try:
                    await pub.flush()
                finally:
                    waited.append(trio.current_time() - start)

        with pytest.raises(NoBrokerError):
            await publish()
    assert waited == [pytest.approx(5.0, abs=0.01)]


async def test_a_failed_publisher_closes_its_connection_to_every_broker(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with fake_brokers(2) as (_, brokers):
        streams: list[trio.abc.Stream] = []  # the publisher's ends

        def recorded(broker: FakeBroker) -> Any:
            async def dial() -> trio.abc.Stream:
                stream = await broker.dial()
                streams.append(stream)
                return stream

            return dial

        async def publish() -> None:
            async with open_publisher(brokers=[recorded(b) for b in brokers], **options()) as pub:
                await pub.publish_many(messages(8))
                await pub.flush()
                assert pub.connected == 2
                await brokers[0].last.fail(ErrorCode.BAD_MESSAGE_RECORDS, "bad records")
                await pub.publish_many(messages(8, 8))
                await pub.flush()

        with pytest.raises(BrokerError):
            await publish()
        assert len(streams) == 2
        for stream in streams:  # closed by the publisher, not only by the broker
            with pytest.raises(trio.ClosedResourceError):
                await stream.send_all(b"x")


@pytest.mark.parametrize(
    ("code", "delivery_timeout_s"),
    [(ErrorCode.BAD_MESSAGE_RECORDS, 60.0), (ErrorCode.SHUTTING_DOWN, 0.0), (None, 0.0)],
    ids=["error-3", "no-failover-error-5", "no-failover-eof"],
)
async def test_errors_that_do_not_fail_over(
    autojump_clock: trio.testing.MockClock, code: int | None, delivery_timeout_s: float
) -> None:
    async with fake_brokers(1) as (_, (broker,)):

        async def publish() -> None:
            async with open_publisher(
                brokers=[broker.dial], delivery_timeout_s=delivery_timeout_s, **options()
            ) as pub:
                await pub.publish_many(messages(4))
                await pub.flush()
                await broker.last.fail(code, "the text")
                await pub.publish_many(messages(4, 4))
                await pub.flush()

        with pytest.raises(BrokerError) as info:
            await publish()
    assert not isinstance(info.value, NoBrokerError)
    assert info.value.code == (BROKER_FAILED if code is None else code)
    assert info.value.acked == 4
    assert broker.dials == 1  # not dialled again


async def test_a_session_sends_its_token_and_numbers_batches_across_connections(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with fake_brokers(2, auto_ack=False) as (_, (zero, one)):
        async with open_publisher(brokers=[zero.dial, one.dial], **options(idempotent=True)) as pub:
            await pub.publish_many(messages(16))
            await trio.sleep(0.1)
            token = pub.session_token
            assert 0 < token < 2**64
            zero.reachable = False
            await zero.last.fail()
            await trio.sleep(0.1)
            await one.last.ack()
            await pub.flush()
    hellos = [c.hello for b in (zero, one) for c in b.connections]
    assert set(hellos) == {Hello(7, 1, token, 2, "t")}
    # batch_seq runs from 0 over both connections; a resend keeps its number.
    assert sorted(set(stored(zero, one))) == [0, 1, 2, 3]
    assert sorted(b.seq for b in one.batches()) == [0, 1, 2, 3]


async def test_a_session_keeps_at_most_256_batches_unacked_and_resends_after_error_9(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with fake_brokers(2, auto_ack=False) as (_, (zero, one)):
        one.reachable = False
        async with open_publisher(
            brokers=[zero.dial, one.dial],
            **options(batch_bytes=RECORD, max_inflight_bytes=1000 * RECORD, idempotent=True),
        ) as pub:
            await pub.publish_many(messages(300))  # 300 batches of one message
            await trio.sleep(1)
            assert [b.seq for b in zero.batches()] == list(range(256))
            await zero.last.ack(10)
            await trio.sleep(0.1)
            assert len(zero.batches()) == 266
            # Error 9: a batch waited in vain for another connection's copy.
            first = zero.last
            one.reachable = True
            await first.fail(9, "batch_seq 10 is being written by another connection")
            await trio.sleep(2)
            again = [c for c in zero.connections + one.connections if c is not first]
            assert sorted(b.seq for c in again for b in c.got) == list(range(10, 266))
            while pub.acked < 300:  # the rest goes out as acks open the window
                for connection in again:
                    await connection.ack()
                await trio.sleep(0.1)
            assert sorted(b.seq for c in again for b in c.got) == list(range(10, 300))
            assert pub.acked == 300
            assert not pub.failed


@pytest.mark.parametrize("by_default", [False, True])
async def test_sessions_by_default_means_for_publishers_with_acks(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch, by_default: bool
) -> None:
    monkeypatch.setattr(publisher_module, "SESSIONS_BY_DEFAULT", by_default)
    async with fake_brokers(1) as (_, (broker,)):
        async with open_publisher(brokers=[broker.dial], **options(idempotent=None)) as acked:
            await acked.publish(b"x")
        default = options(ack=0, idempotent=None)
        async with open_publisher(brokers=[broker.dial], **default) as unacked:
            await unacked.publish(b"y")
    assert (acked.idempotent, unacked.idempotent) == (by_default, False)
    hellos = [c.hello for c in broker.connections]
    assert [(h.request, h.last_addr != 0) for h in hellos if h is not None] == [
        (2, True) if by_default else (0, False),
        (0, False),
    ]


async def test_a_session_spreads_over_the_brokers_by_default(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with fake_brokers(2) as (_, brokers):
        async with open_publisher(
            brokers=[b.dial for b in brokers], **options(idempotent=True)
        ) as pub:
            await pub.publish_many(messages(40))
            await pub.flush()
    seqs = [[b.seq for b in broker.batches()] for broker in brokers]
    assert all(seqs)
    assert sorted(seqs[0] + seqs[1]) == list(range(10))


async def test_a_session_that_does_not_spread_sends_on_one_broker_at_a_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with fake_brokers(3) as (_, brokers):
        zero, one, two = brokers
        zero.reachable = False
        async with open_publisher(
            brokers=[b.dial for b in brokers], **options(idempotent=True, spread=False)
        ) as pub:
            await pub.publish_many(messages(40))
            await pub.flush()
            assert pub.connected == 2
            # All on broker 1, the first of the list that answered.
            assert ([b.seq for b in one.batches()], two.batches()) == (list(range(10)), [])
            zero.reachable = True
            await trio.sleep(2)  # broker 0 is back: the publisher stays on broker 1
            await pub.publish_many(messages(8, 40))
            await pub.flush()
            assert (zero.batches(), len(one.batches())) == ([], 12)
            one.reachable = False
            await one.last.fail()
            await pub.publish_many(messages(8, 48))
            await pub.flush()
    # Then on broker 0, the first of the list that answers.
    assert ([b.seq for b in zero.batches()], two.batches()) == ([12, 13], [])


@pytest.mark.parametrize("idempotent", [True, False], ids=["session", "plain"])
async def test_a_failed_brokers_batches_go_out_again_before_any_newer_batch(
    autojump_clock: trio.testing.MockClock, idempotent: bool
) -> None:
    # Broker 0 stops reading with batches 0-4 unacked and batch 5 half
    # written; 6-9 wait for a sender. When it dies, broker 1 must get 0-5
    # before 6: stored behind 6 in one broker's stream, a session's resent
    # batches would be held up by the sequencer of an order-5 topic, and
    # skipped after cxl.sequencer_hole_timeout_s (error 2).
    async with fake_brokers(2, auto_ack=False) as (_, (zero, one)):
        zero.lockstep = True
        async with open_publisher(
            brokers=[zero.dial, one.dial], spread=False, **options(idempotent=idempotent)
        ) as pub:
            await pub.publish_many(messages(16))
            await trio.sleep(0.1)
            assert [b.seq for b in zero.batches()] == [0, 1, 2, 3]
            zero.last.reading = trio.Event()  # after the batch it waits for
            await pub.publish_many(messages(24, 16))
            await trio.sleep(0.1)
            assert [b.seq for b in zero.batches()] == [0, 1, 2, 3, 4]
            assert not one.batches()
            zero.reachable = False
            await zero.last.fail()
            await trio.sleep(0.1)
            await one.last.ack()
            await pub.flush()
            assert pub.acked == 40
    assert [b.seq for b in one.batches()] == list(range(10))


async def test_plain_publishers_send_client_req_0_and_a_zero_token(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with fake_brokers(1) as (_, (broker,)):
        async with open_publisher(brokers=[broker.dial], **options()) as pub:
            await pub.publish(b"x")
    assert broker.last.hello == Hello(7, 1, 0, 0, "t")
    assert pub.session_token == 0


async def test_with_several_brokers_a_connection_gets_batches_once_its_broker_answers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with fake_brokers(1) as (_, (live,)):
        silent: list[trio.abc.Stream] = []

        async def stopped() -> trio.abc.Stream:
            """A broker that accepts connections and never answers (SIGSTOP)."""
            client, server = trio.testing.memory_stream_pair()
            silent.append(server)
            return client

        async with open_publisher(brokers=[stopped, live.dial], **options()) as pub:
            await pub.publish_many(messages(40))
            await pub.flush()
            assert pub.connected == 1
            assert len(live.batches()) == 10
            # The stopped broker got the handshake and nothing else.
            (server,) = silent
            assert len(await server.receive_some()) == HANDSHAKE_SIZE
            with trio.move_on_after(1) as scope:
                await server.receive_some()
            assert scope.cancelled_caught


async def test_connecting_at_entry_tries_each_broker_once() -> None:
    async with fake_brokers(2) as (_, (zero, one)):
        zero.reachable = False
        async with open_publisher(brokers=[zero.dial, one.dial], **options()) as pub:
            await pub.publish(b"x")
        assert one.last.got
        one.reachable = False
        with pytest.raises(ConnectionLost, match="cannot connect to any broker: broker 0 "):
            async with open_publisher(brokers=[zero.dial, one.dial], **options()):
                pass  # pragma: no cover


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ({}, "give a broker's host and port"),
        ({"host": "h", "port": 1, "brokers": [("h", 2)]}, "not both"),
        ({"brokers": []}, "empty"),
        ({"brokers": [("h", 0)]}, "1..65535"),
        ({"brokers": [("h", 1), ("h", 1)]}, "listed twice"),
    ],
)
def test_invalid_broker_lists(args: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        endpoints(args.get("host", ""), args.get("port", 0), args.get("brokers"))


@pytest.mark.parametrize(
    ("more", "match"),
    [
        ({"delivery_timeout_s": -1.0}, "delivery_timeout_s"),
        ({"delivery_timeout_s": float("inf")}, "delivery_timeout_s"),
        ({"idempotent": True, "ack": 0}, "idempotent needs ack"),
    ],
)
async def test_invalid_failover_options(more: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        async with open_publisher("127.0.0.1", 1, **options(**more)):
            pass  # pragma: no cover
    with pytest.raises(ValueError, match="reconnect_timeout_s"):
        async with open_subscriber("127.0.0.1", 1, "t", reconnect_timeout_s=-1):
            pass  # pragma: no cover
    with pytest.raises(ValueError, match="ordered=True"):
        async with open_subscriber(topic="t", brokers=[("h", 1), ("h", 2)]):
            pass  # pragma: no cover


def test_backoff_doubles_to_its_cap_with_jitter_in_the_upper_half() -> None:
    backoff = Backoff(0.05, 1.0)
    delays = [backoff.next_delay() for _ in range(8)]
    ceilings = [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]
    assert all(c / 2 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert len(set(delays[5:])) == 3  # jittered, not one fixed value
    backoff.reset()
    assert backoff.next_delay() <= 0.05


# -- the subscriber ---------------------------------------------------------------------


class OrderedBroker:
    """Serves the total order ``0 .. total-1`` (one record each, batches of
    three) from a handshake's ``last_addr``; it can end a stream early,
    in the middle of a record."""

    def __init__(self, name: str, total: int) -> None:
        self.name = name
        self.total = total
        self.reachable = True
        self.starts: list[int] = []
        self.cut_after: int | None = None  # bytes to send before dying

    async def dial(self) -> trio.abc.Stream:
        await trio.lowlevel.checkpoint()
        if not self.reachable:
            raise ConnectionLost(f"{self.name} is down")
        client, server = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self._serve, server)
        return client

    nursery: trio.Nursery

    async def _serve(self, stream: trio.abc.Stream) -> None:
        data = b""
        while len(data) < HANDSHAKE_SIZE:
            data += await stream.receive_some()
        start = HANDSHAKE.unpack(data[:HANDSHAKE_SIZE])[3]
        self.starts.append(start)
        out = b""
        for first in range(start, self.total, 3):
            last = min(first + 3, self.total)
            out += encode_batch_metadata(first, last - first)
            for order in range(first, last):
                record = bytearray(committed(b"m%d" % order, 0, client_order=order))
                struct.pack_into("<Q", record, 32, order)  # its total order
                out += record
        if self.cut_after is not None:
            await stream.send_all(out[: self.cut_after])
            self.reachable = False
            await stream.aclose()
            return
        await stream.send_all(out)
        await trio.sleep_forever()


async def test_an_ordered_subscriber_goes_on_at_the_next_broker_from_the_next_total_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a, b = OrderedBroker("a", 30), OrderedBroker("b", 30)
    # Broker a dies after two batches and part of a record of the third.
    a.cut_after = 2 * (16 + 3 * 128) + 16 + 100
    got: list[Message] = []
    async with bounded_nursery() as nursery:
        a.nursery = b.nursery = nursery
        async with open_subscriber(topic="t", brokers=[a.dial, b.dial], ordered=True) as sub:
            assert sub.broker == a.dial.__qualname__
            while len(got) < 30:
                got.extend(await sub.receive_messages())
            assert sub.broker == b.dial.__qualname__
            assert sub.reconnects == 1
        nursery.cancel_scope.cancel()
    assert [m.offset for m in got] == list(range(30))  # each once
    assert [m.payload for m in got] == [b"m%d" % i for i in range(30)]
    assert (a.starts, b.starts) == ([0], [6])


async def test_a_subscriber_without_a_broker_for_its_timeout_raises(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a = OrderedBroker("a", 6)
    a.cut_after = 16 + 3 * 128
    async with bounded_nursery() as nursery:
        a.nursery = nursery
        async with open_subscriber(
            topic="t", brokers=[a.dial], ordered=True, reconnect_timeout_s=3.0
        ) as sub:
            got = await sub.receive_messages()
            lost = trio.current_time()
            with pytest.raises(NoBrokerError) as info:
                await sub.receive_messages()
            assert trio.current_time() - lost == pytest.approx(3.0, abs=0.01)
    assert [m.offset for m in got] == [0, 1, 2]
    assert info.value.brokers == (a.dial.__qualname__,)
    assert info.value.message.endswith("; last failure: a is down")
    assert info.value.acked is None


async def test_receives_cut_short_by_a_timeout_do_not_restart_the_reconnect_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a = OrderedBroker("a", 3)
    a.cut_after = 16 + 3 * 128
    async with bounded_nursery() as nursery:
        a.nursery = nursery
        async with open_subscriber(
            topic="t", brokers=[a.dial], ordered=True, reconnect_timeout_s=3.0
        ) as sub:
            await sub.receive_messages()
            lost = trio.current_time()
            while True:  # polling, as `subscribe --idle` does
                with trio.move_on_after(0.4):
                    try:
                        await sub.receive_messages()
                    except NoBrokerError:
                        break
            assert trio.current_time() - lost == pytest.approx(3.0, abs=0.01)
            with pytest.raises(NoBrokerError):  # at once, from now on
                await sub.receive_messages()
            assert trio.current_time() - lost == pytest.approx(3.0, abs=0.01)


async def test_receives_shorter_than_the_backoff_still_reconnect(
    autojump_clock: trio.testing.MockClock,
) -> None:
    a = OrderedBroker("a", 6)
    a.cut_after = 16 + 3 * 128  # the first batch, then the broker is down
    got: list[Message] = []
    async with bounded_nursery() as nursery:
        a.nursery = nursery
        async with open_subscriber(topic="t", brokers=[a.dial], ordered=True) as sub:
            while len(got) < 3:
                got.extend(await sub.receive_messages())
            lost = trio.current_time()
            while len(got) < 6:
                if trio.current_time() - lost >= 3 and not a.reachable:
                    a.cut_after, a.reachable = None, True  # back, with everything
                with trio.move_on_after(0.05):  # far shorter than the pauses
                    got.extend(await sub.receive_messages())
            assert 3 < trio.current_time() - lost <= 3 + BACKOFF_MAX + 0.1
        nursery.cancel_scope.cancel()
    assert [m.offset for m in got] == list(range(6))
    assert a.starts == [0, 3]


# -- real in-memory brokers, restarted --------------------------------------------------


@attrs.define
class Restartable:
    """Dials whichever in-memory broker runs now; refuses while none does."""

    listener: MemoryListener | None = None

    async def dial(self) -> trio.abc.Stream:
        await trio.lowlevel.checkpoint()
        listener = self.listener
        if listener is None or listener.closed:
            raise ConnectionLost("no broker is listening")
        return await listener.connect()


async def test_a_reconnect_cancelled_after_its_connect_closes_the_new_stream(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ends: list[trio.abc.Stream] = []  # the broker's end of each connection

    async def dial() -> trio.abc.Stream:
        # A connect that completes just as the caller's deadline passes.
        with trio.CancelScope(shield=True):
            await trio.sleep(1)
        client, server = trio.testing.memory_stream_pair()
        ends.append(server)
        return client

    async with open_subscriber(topic="t", brokers=[dial]) as sub:
        await ends[0].aclose()  # the broker goes away
        with trio.move_on_after(0.5) as scope:
            await sub.receive_messages()
        assert scope.cancelled_caught
        assert len(ends) == 2
        assert sub.reconnects == 0
        # The connection the cancelled reconnect opened is closed, the
        # handshake unsent.
        with trio.fail_after(1):
            assert await ends[1].receive_some() == b""


async def test_a_publisher_and_a_subscriber_ride_out_a_broker_restart(
    make_config: MakeConfig, cxl_path: str, autojump_clock: trio.testing.MockClock
) -> None:
    config = make_config(**{"network.shutdown_grace_s": 1.0})
    count = 3000
    payloads = [payload_for(3, i, 300) for i in range(count)]
    target = Restartable()
    halfway = trio.Event()
    done = trio.Event()
    got: list[Message] = []

    async def run_brokers() -> None:
        for generation in range(2):
            async with memory_broker(config) as (_, listener):
                target.listener = listener
                if generation == 0:
                    await halfway.wait()
                else:
                    await done.wait()
                target.listener = None  # refuses from the start of the drain
            await trio.sleep(0.5)  # down for a while

    async def publish() -> None:
        async with open_publisher(
            brokers=[target.dial], topic="r", client_id=3, batch_bytes=16 * 1024
        ) as pub:
            for first in range(0, count, 100):
                await pub.publish_many(payloads[first : first + 100])
                if first == count // 2:
                    halfway.set()
                await trio.sleep(0.01)
        assert pub.acked == count
        assert pub.reconnects == 1

    async def subscribe() -> None:
        async with open_subscriber(brokers=[target.dial], topic="r") as sub:
            while len(got) < count:
                got.extend(await sub.receive_messages())
        assert sub.reconnects == 1

    async with bounded_nursery() as nursery:
        nursery.start_soon(run_brokers)
        await trio.sleep(0.01)
        async with trio.open_nursery() as clients:
            clients.start_soon(publish)
            clients.start_soon(subscribe)
        done.set()
    # The shutdown acked everything it stored before error 5: no duplicates.
    assert [m.offset for m in got] == list(range(count))
    assert [m.payload for m in got] == payloads
    with open_log(cxl_path) as log:
        assert [m.payload for m in log.messages("r")] == payloads


async def test_a_dial_back_publisher_and_a_subscriber_follow_a_broker_restart_over_tcp(
    make_config: MakeConfig, cxl_path: str
) -> None:
    port = await closed_port()  # the same port for both brokers
    config = make_config(**{"broker.port": port, "http.enabled": False})  # no fixed HTTP port
    payloads = [payload_for(31, i, 200) for i in range(1000)]
    halfway, back, done = trio.Event(), trio.Event(), trio.Event()
    got: list[Message] = []

    async def publish() -> None:
        async with open_publisher(
            "127.0.0.1", port, "d", client_id=31, dial_back=True, batch_bytes=8192
        ) as pub:
            await pub.publish_many(payloads[:500])
            await pub.flush()
            halfway.set()
            await back.wait()
            await pub.publish_many(payloads[500:])
        assert pub.acked == 1000
        # At least once: a dial while the old broker drains gets error 5 too.
        assert pub.reconnects >= 1

    async def subscribe() -> None:
        async with open_subscriber("127.0.0.1", port, "d") as sub:
            while len(got) < 1000:
                got.extend(await sub.receive_messages())
        assert sub.reconnects >= 1
        done.set()

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            async with open_broker(config):
                nursery.start_soon(publish)
                nursery.start_soon(subscribe)
                await halfway.wait()
            # Drained and closed: the clients wait for the broker to come back.
            async with open_broker(config) as broker:
                back.set()
                await done.wait()
                assert broker.statistics().dial_backs.dialed == 1
    assert [(m.offset, m.payload) for m in got] == list(enumerate(payloads))
    with open_log(cxl_path) as log:
        assert [m.payload for m in log.messages("d")] == payloads


# -- the command line -------------------------------------------------------------------


def test_publish_and_subscribe_take_several_brokers() -> None:
    args = build_parser().parse_args(
        ["publish", "--topic", "t", "--broker", "h:1", "--broker", "[::1]:2"]
    )
    assert args.brokers == [("h", 1), ("::1", 2)]


@pytest.mark.parametrize("value", ["1214", "host:", ":1214", "host:0", "host:70000", "host:x"])
def test_a_bad_broker_address_is_a_usage_error(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc_info:
        main(["publish", "--topic", "t", "--broker", value])
    assert exc_info.value.code == 2
    assert "argument --broker: must be HOST:PORT with a port of 1..65535" in capsys.readouterr().err


def test_several_brokers_for_one_brokers_stream_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["subscribe", "--topic", "t", "--broker", "h:1", "--broker", "h:2"]) == 2
    assert "several --broker need --ordered" in capsys.readouterr().err
