"""The Python client: publisher and subscriber against a real broker on loopback.

Every test runs a broker on 127.0.0.1, port 0, with a private CXL file, and is
bounded by ``trio.fail_after``.
"""

from __future__ import annotations

import random
import struct
import subprocess
import sys
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing
from conftest import MakeConfig, wait_until
from rawclient import (
    batch,
    handshake,
    parse_ack_stream,
    parse_records,
    payload_for,
    read_all,
)

from trio_embarcadero import BrokerError, ConnectionLost, ConnectionPhase, ErrorCode, open_broker
from trio_embarcadero.broker import Broker
from trio_embarcadero.client import (
    BROKER_FAILED,
    Message,
    Publisher,
    open_publisher,
    open_publisher_on_stream,
    open_subscriber,
)
from trio_embarcadero.log import open_log
from trio_embarcadero.wire import BATCH_HEADER, HANDSHAKE_SIZE, MESSAGE_HEADER

HOST = "127.0.0.1"
KIB = 1024


def sizes(seed: int, count: int, largest: int = 3000) -> list[int]:
    """Message sizes with the awkward ones included: 0, 1, 63, 64, 65."""
    rng = random.Random(seed)
    edge = [0, 1, 63, 64, 65]
    return [edge[i] if i < len(edge) else rng.randrange(largest) for i in range(count)]


async def read_messages(port: int, topic: str, count: int, *, start: int = 0) -> list[Message]:
    """``count`` messages from ``start``."""
    out: list[Message] = []
    async with open_subscriber(HOST, port, topic, start=start) as sub:
        while len(out) < count:
            out.extend(await sub.receive_messages())
    return out


def check_stream(messages: list[Message], expected: dict[int, list[bytes]], first: int = 0) -> None:
    """Gap-free offsets from ``first``; every client's messages exactly once,
    in its order, byte for byte."""
    assert [m.offset for m in messages] == list(range(first, first + len(messages)))
    got: dict[int, list[bytes]] = {cid: [] for cid in expected}
    for m in messages:
        assert m.client_order == len(got[m.client_id])
        got[m.client_id].append(bytes(m.payload))
    assert got == expected


async def test_publish_then_subscribe_round_trip(make_config: MakeConfig) -> None:
    lengths = sizes(1, 2000)
    with trio.fail_after(10):
        async with open_broker(make_config()) as broker:
            async with open_publisher(
                HOST, broker.port, "round", client_id=77, batch_bytes=64 * KIB
            ) as pub:
                for i, n in enumerate(lengths):
                    await pub.publish(payload_for(77, i, n))
                await pub.flush()
                assert pub.acked == pub.published == len(lengths)
                assert pub.broker_id == 0
            stats = broker.statistics()
            assert stats.batches_received > 1  # sealed on size, not one batch
            messages = await read_messages(broker.port, "round", len(lengths))
    check_stream(messages, {77: [payload_for(77, i, n) for i, n in enumerate(lengths)]})


async def test_many_publishers_every_message_exactly_once(make_config: MakeConfig) -> None:
    clients = {100 + k: sizes(k, 3000, largest=1500) for k in range(4)}
    expected = {
        cid: [payload_for(cid, i, n) for i, n in enumerate(ls)] for cid, ls in clients.items()
    }
    total = sum(len(v) for v in expected.values())
    early: list[Message] = []
    with trio.fail_after(20):
        async with open_broker(make_config()) as broker:

            async def publish(cid: int, *, task_status: trio.TaskStatus[None]) -> None:
                async with open_publisher(
                    HOST, broker.port, "many", client_id=cid, batch_bytes=128 * KIB
                ) as pub:
                    task_status.started()
                    # Half through publish(), half through publish_many().
                    half = len(expected[cid]) // 2
                    for p in expected[cid][:half]:
                        await pub.publish(p)
                    await pub.publish_many(expected[cid][half:])
                assert pub.acked == len(expected[cid])

            async def subscribe_early(*, task_status: trio.TaskStatus[None]) -> None:
                # Attached before anything is published (the topic does not
                # exist yet): sees everything.
                async with open_subscriber(HOST, broker.port, "many") as sub:
                    task_status.started()
                    async for m in sub:
                        early.append(m)
                        if len(early) == total:
                            return

            async with trio.open_nursery() as nursery:
                await nursery.start(subscribe_early)
                for cid in expected:
                    await nursery.start(publish, cid)
            late = await read_messages(broker.port, "many", total)
            with open_log(broker.config.cxl.path) as log:
                logged = [m.payload for m in log.messages("many")]
    check_stream(early, expected)
    check_stream(late, expected)
    assert logged == [m.payload for m in late]


async def test_subscribers_at_arbitrary_offsets(make_config: MakeConfig) -> None:
    count = 500
    payloads = [payload_for(5, i, 200 + i) for i in range(count)]
    with trio.fail_after(10):
        async with open_broker(make_config()) as broker:
            async with open_publisher(
                HOST, broker.port, "offs", client_id=5, batch_bytes=8 * KIB
            ) as pub:
                await pub.publish_many(payloads)
            # Batch boundaries, the middle of batches, the last message.
            for start in (0, 1, 7, 8, 9, 250, count - 1):
                got = await read_messages(broker.port, "offs", count - start, start=start)
                assert [m.offset for m in got] == list(range(start, count))
                assert [bytes(m.payload) for m in got] == payloads[start:]
                assert [m.client_order for m in got] == list(range(start, count))

            # At the end, and beyond it: the subscriber waits for the data.
            async def publish_more() -> None:
                async with open_publisher(HOST, broker.port, "offs", client_id=6) as more:
                    await more.publish_many(payload_for(6, i, 10) for i in range(20))

            async with trio.open_nursery() as nursery:
                results: dict[int, list[Message]] = {}

                async def read_from(start: int, n: int) -> None:
                    results[start] = await read_messages(broker.port, "offs", n, start=start)

                nursery.start_soon(read_from, count, 20)
                nursery.start_soon(read_from, count + 15, 5)
                await trio.testing.wait_all_tasks_blocked()
                assert not results
                nursery.start_soon(publish_more)
    assert [m.offset for m in results[count]] == list(range(count, count + 20))
    assert [bytes(m.payload) for m in results[count + 15]] == [
        payload_for(6, i, 10) for i in range(15, 20)
    ]


async def test_linger_sends_a_partial_batch_without_flush(make_config: MakeConfig) -> None:
    with trio.fail_after(10):
        async with open_broker(make_config()) as broker:
            async with open_publisher(HOST, broker.port, "linger", linger=0.05) as pub:
                await pub.publish(b"hello")
                assert pub.sent == 0  # waiting for more messages
                start = trio.current_time()
                await wait_until(lambda: pub.acked == 1, poll=0.005)
                assert trio.current_time() - start >= 0.04
            async with open_publisher(HOST, broker.port, "linger", linger=None) as pub:
                await pub.publish(b"at once")
                await wait_until(lambda: pub.acked == 1, poll=0.005)
            got = await read_messages(broker.port, "linger", 2)
    assert [bytes(m.payload) for m in got] == [b"hello", b"at once"]


async def test_a_message_larger_than_a_batch_travels_alone(make_config: MakeConfig) -> None:
    big = bytes(range(256)) * 100
    with trio.fail_after(10):
        async with open_broker(make_config()) as broker:
            async with open_publisher(HOST, broker.port, "big", batch_bytes=4 * KIB) as pub:
                await pub.publish(b"small")
                await pub.publish(big)
                await pub.publish(b"after")
            assert pub.acked == 3
            got = await read_messages(broker.port, "big", 3)
    assert [bytes(m.payload) for m in got] == [b"small", big, b"after"]


async def test_the_inflight_window_bounds_memory() -> None:
    """A broker that never acks: publish() stops once the window is full."""
    client, server = trio.testing.memory_stream_pair()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:

            async def broker_reads_handshake_only() -> None:
                got = b""
                while len(got) < HANDSHAKE_SIZE:
                    got += await server.receive_some(HANDSHAKE_SIZE - len(got))

            nursery.start_soon(broker_reads_handshake_only)
            async with open_publisher_on_stream(
                client, "window", batch_bytes=4 * KIB, max_inflight_bytes=16 * KIB
            ) as pub:
                with trio.move_on_after(0.2) as scope:
                    for _ in range(1000):
                        await pub.publish(bytes(1000))
                assert scope.cancelled_caught
                # 1088-byte records: 15 fit in 16 KiB; the 16th waits.
                assert pub.published == 15
                assert pub.sent == 15  # all written: only the missing acks hold it
                nursery.cancel_scope.cancel()  # leave without waiting for acks


async def test_exceptions_in_the_block_are_not_wrapped(make_config: MakeConfig) -> None:
    with trio.fail_after(10):
        async with open_broker(make_config()) as broker:
            publishers: list[Publisher] = []

            async def publish_and_fail() -> None:
                async with open_publisher(HOST, broker.port, "wrap") as pub:
                    publishers.append(pub)
                    await pub.publish(b"x")
                    raise KeyError("mine")

            async def subscribe_and_fail() -> None:
                async with open_subscriber(HOST, broker.port, "wrap"):
                    raise KeyError("mine")

            with pytest.raises(KeyError):
                await publish_and_fail()
            with pytest.raises(trio.ClosedResourceError):
                await publishers[0].publish(b"too late")
            with pytest.raises(KeyError):
                await subscribe_and_fail()


async def test_cannot_connect_raises_connection_lost() -> None:
    listener = (await trio.open_tcp_listeners(0, host=HOST))[0]
    port = listener.socket.getsockname()[1]
    await listener.aclose()
    with trio.fail_after(5):
        with pytest.raises(ConnectionLost, match="cannot connect"):
            async with open_publisher(HOST, port, "nobody"):
                pass  # pragma: no cover
        with pytest.raises(ConnectionLost, match="cannot connect"):
            async with open_subscriber(HOST, port, "nobody"):
                pass  # pragma: no cover


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"topic": "no spaces"}, "topic"),
        ({"ack": 3}, "ack"),
        ({"batch_bytes": 64}, "batch_bytes"),
        ({"linger": -1.0}, "linger"),
        ({"max_inflight_bytes": 1000}, "max_inflight_bytes"),
        ({"ack": 0, "dial_back": True}, "dial_back"),
        ({"client_id": 2**32}, "client_id"),
    ],
)
async def test_invalid_publisher_options(options: dict[str, Any], match: str) -> None:
    client, _server = trio.testing.memory_stream_pair()
    topic = options.pop("topic", "ok")
    assert isinstance(topic, str)
    with pytest.raises(ValueError, match=match):
        async with open_publisher_on_stream(client, topic, **options):
            pass  # pragma: no cover


async def test_error_frame_becomes_broker_error(make_config: MakeConfig) -> None:
    # Ack level 2 without a disk log is refused with error 6 after the handshake.
    with trio.fail_after(10):
        async with open_broker(make_config()) as broker:

            async def publish() -> None:
                async with open_publisher(HOST, broker.port, "durable", ack=2) as pub:
                    await pub.publish(b"x")

            with pytest.raises(BrokerError) as info:
                await publish()
    assert info.value.code == ErrorCode.NOT_ALLOWED
    assert info.value.acked == 0
    assert "disk log" in info.value.message
    assert str(info.value).endswith("(acked 0)")  # a publisher's error says how far it got


async def test_broker_failure_without_error_frame() -> None:
    """EOF with no error frame: the broker failed; acked says what is stored."""
    client, server = trio.testing.memory_stream_pair()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:

            async def fake_broker() -> None:
                got = b""
                while len(got) < HANDSHAKE_SIZE + BATCH_HEADER.size:
                    got += await server.receive_some()
                # Broker 3, the first batch (two messages) acked.
                await server.send_all(struct.pack("<iQ", 3, 2))
                await server.aclose()

            nursery.start_soon(fake_broker)
            publishers: list[Publisher] = []

            async def publish() -> None:
                async with open_publisher_on_stream(client, "fails", linger=None) as pub:
                    publishers.append(pub)
                    await pub.publish_many([b"a", b"b"])
                    await pub.publish(b"c")
                    await pub.flush()

            with pytest.raises(BrokerError) as info:
                await publish()
    assert info.value.code == BROKER_FAILED
    assert info.value.acked == 2
    assert publishers[0].broker_id == 3


async def test_log_full_reports_error_4_with_acked_count(
    make_config: MakeConfig, cxl_path: str
) -> None:
    config = make_config(
        **{
            "cxl.size_mb": 8,
            "cxl.segment_mb": 2,
            "network.staging_pool_buffer_size_mb": 1,
            "network.backoff_max_retries": 2,
        }
    )
    payload = bytes(1000)
    with trio.fail_after(10):
        async with open_broker(config) as broker:
            publishers: list[Publisher] = []

            async def publish() -> None:
                async with open_publisher(HOST, broker.port, "full", batch_bytes=256 * KIB) as pub:
                    publishers.append(pub)
                    for _ in range(20_000):  # 21 MiB of records into a 6 MiB log
                        await pub.publish(payload)

            with pytest.raises(BrokerError) as info:
                await publish()
            error = info.value
            assert error.acked == publishers[0].acked
            stream = broker.log.existing_stream("full")
            assert stream is not None
            assert error.acked == stream.next_offset > 0
            with open_log(cxl_path) as log:
                assert sum(1 for _ in log.messages("full")) == error.acked
    assert error.code == ErrorCode.LOG_FULL, error


# -- interoperability with the raw spec client -------------------------------------


async def test_raw_publisher_to_python_subscriber(make_config: MakeConfig) -> None:
    expected: list[bytes] = []
    with trio.fail_after(10):
        async with open_broker(make_config()) as broker:
            async with await trio.open_tcp_stream(HOST, broker.port) as stream:
                await stream.send_all(handshake("interop", client_id=9))
                for k in range(5):
                    data, payloads = batch(k, 9, 30 * k, 30, 100 + 37 * k)
                    expected += payloads
                    await stream.send_all(data)
                await stream.send_eof()
                _, counts, error = parse_ack_stream(await read_all(stream))
            assert error is None
            assert counts[-1] == 150
            got = await read_messages(broker.port, "interop", 150)
    check_stream(got, {9: expected})


async def test_python_publisher_to_raw_subscriber(make_config: MakeConfig) -> None:
    payloads = [payload_for(11, i, 7 * i) for i in range(300)]
    with trio.fail_after(10):
        async with open_broker(make_config()) as broker:
            async with open_publisher(HOST, broker.port, "interop2", client_id=11) as pub:
                await pub.publish_many(payloads)
            async with await trio.open_tcp_stream(HOST, broker.port) as stream:
                await stream.send_all(handshake("interop2", req=1, last_addr=100))
                want = sum(64 + -(-len(p) // 64) * 64 for p in payloads[100:])
                data = b""
                while len(data) < want:
                    data += await stream.receive_some()
    records = parse_records(data)
    assert [r[0] for r in records] == list(range(100, 300))
    assert [(r[1], r[2], r[3]) for r in records] == [(11, i, payloads[i]) for i in range(100, 300)]


async def test_python_publisher_records_match_the_spec() -> None:
    """Byte-level check of what the publisher sends, against the spec's layouts."""
    client, server = trio.testing.memory_stream_pair()
    received = bytearray()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:

            async def fake_broker() -> None:
                while chunk := await server.receive_some():
                    received.extend(chunk)
                await server.aclose()  # after the publisher's end of stream

            nursery.start_soon(fake_broker)
            async with open_publisher_on_stream(
                client, "spec", ack=0, client_id=4242, linger=None
            ) as pub:
                await pub.publish_many([b"", b"a" * 64, b"b" * 65])
                await pub.publish(b"c")
            assert pub.sent == 4
            assert pub.acked == 0
    client_id, ack, _num, _last, port, req, topic = struct.unpack_from("<IIQQII32s", received)
    assert (client_id, ack, port, req, topic.rstrip(b"\0")) == (4242, 0, 0, 0, b"spec")
    pos = HANDSHAKE_SIZE
    batches = []
    while pos < len(received):
        seq, cid, num, complete, _b, _o, _p, total, *_ = BATCH_HEADER.unpack_from(received, pos)
        assert (cid, complete) == (4242, 0)
        body = received[pos + 128 : pos + 128 + total]
        batches.append((seq, num, parse_records_unassigned(bytes(body))))
        pos += 128 + total
    assert batches == [
        (0, 3, [(0, b""), (1, b"a" * 64), (2, b"b" * 65)]),
        (1, 1, [(3, b"c")]),
    ]


def parse_records_unassigned(body: bytes) -> list[tuple[int, bytes]]:
    out = []
    pos = 0
    while pos < len(body):
        padded, seg, logical, diff, order, client_order, cid, size = MESSAGE_HEADER.unpack_from(
            body, pos
        )
        assert padded == 64 + -(-size // 64) * 64
        assert (seg, logical, diff, order, cid) == (0, 2**64 - 1, 0, 0, 4242)
        out.append((client_order, body[pos + 64 : pos + 64 + size]))
        pos += padded
    return out


async def test_dial_back_acks(make_config: MakeConfig) -> None:
    payloads = [payload_for(21, i, 500) for i in range(3000)]
    with trio.fail_after(10):
        async with open_broker(make_config()) as broker:
            async with open_publisher(
                HOST, broker.port, "dial", client_id=21, dial_back=True, batch_bytes=64 * KIB
            ) as pub:
                await pub.publish_many(payloads)
                await pub.flush()
                assert pub.acked == 3000
                assert pub.broker_id == 0
                assert broker.statistics().dial_backs.dialed == 1
            got = await read_messages(broker.port, "dial", 3000)
    check_stream(got, {21: payloads})


async def test_two_dial_back_publishers_with_one_client_id_on_one_host(
    make_config: MakeConfig,
) -> None:
    with trio.fail_after(10):
        async with open_broker(make_config()) as broker:
            # Plain publishers: two sessions of one client id would be refused first.
            async with open_publisher(
                HOST, broker.port, "dial3", client_id=22, dial_back=True, idempotent=False
            ) as first:
                await first.publish(b"first")
                await first.flush()
                # The second listens on another port: refused, the first unaffected.
                with pytest.raises(BrokerError) as info:
                    async with open_publisher(
                        HOST, broker.port, "dial3", client_id=22, dial_back=True, idempotent=False
                    ) as second:
                        await second.publish(b"second")
                await first.publish(b"again")
                await first.flush()
                assert first.acked == 2
    assert info.value.code == ErrorCode.NOT_ALLOWED
    assert "share one ack port" in info.value.message


async def test_dial_back_error_frame_arrives_on_the_publish_connection(
    make_config: MakeConfig,
) -> None:
    with trio.fail_after(10):
        async with open_broker(make_config()) as broker:

            async def publish() -> None:
                async with open_publisher(HOST, broker.port, "dial2", ack=2, dial_back=True) as pub:
                    await pub.publish(b"x")

            with pytest.raises(BrokerError) as info:
                await publish()
    assert info.value.code == ErrorCode.NOT_ALLOWED


async def test_ack_zero_flush_means_sent(make_config: MakeConfig) -> None:
    with trio.fail_after(10):
        async with open_broker(make_config()) as broker:
            async with open_publisher(HOST, broker.port, "zero", ack=0) as pub:
                await pub.publish_many(payload_for(1, i, 100) for i in range(1000))
                await pub.flush()
                assert pub.sent == 1000
                assert pub.acked == 0
            # Closing waited for the broker to end the stream: all stored.
            stream = broker.log.existing_stream("zero")
            assert stream is not None
            assert stream.next_offset == 1000


async def test_publisher_over_a_memory_listener(make_config: MakeConfig) -> None:
    """The injected-listener path: no sockets at all."""
    listener = MemoryListener()
    with trio.fail_after(10):
        async with open_broker(make_config(), listeners=[listener]) as broker:
            async with open_publisher_on_stream(await listener.connect(), "mem") as pub:
                await pub.publish_many([b"one", b"two"])
            assert pub.acked == 2
            assert broker.log.existing_stream("mem") is not None


class MemoryListener(trio.abc.Listener[trio.abc.Stream]):
    """Hands the broker the server ends of in-memory stream pairs."""

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[trio.abc.Stream](0)

    async def connect(self) -> trio.abc.Stream:
        client, server = trio.testing.memory_stream_pair()
        await self._send.send(server)
        return client

    async def accept(self) -> trio.abc.Stream:
        return await self._receive.receive()

    async def aclose(self) -> None:
        await self._receive.aclose()


def test_publisher_is_exported() -> None:
    import trio_embarcadero

    assert trio_embarcadero.open_publisher is open_publisher
    assert trio_embarcadero.Publisher is Publisher
    assert "trio_embarcadero.client" in sys.modules


# -- the publish and subscribe commands ----------------------------------------------


async def test_publish_and_subscribe_commands(make_config: MakeConfig, cxl_path: str) -> None:
    results: dict[str, subprocess.CompletedProcess[bytes]] = {}
    with trio.fail_after(30):
        async with open_broker(make_config()) as broker:

            async def cli(name: str, *args: str, stdin: bytes = b"") -> None:
                results[name] = await trio.run_process(
                    [sys.executable, "-m", "trio_embarcadero", *args, "--port", str(broker.port)],
                    stdin=stdin,
                    capture_stdout=True,
                    capture_stderr=True,
                    check=False,
                )

            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    partial(cli, "lines", "publish", "--topic", "lines", stdin=b"one\ntwo\n\nfour")
                )
                nursery.start_soon(
                    cli, "gen", "publish", "--topic", "gen", "--count", "1000", "--size", "50"
                )
            async with trio.open_nursery() as nursery:
                # --cxl-path: the broker's file, where the topics are checked.
                sub = ("subscribe", "--cxl-path", cxl_path, "--topic")
                nursery.start_soon(cli, "all", *sub, "lines", "--offsets")
                nursery.start_soon(cli, "two", *sub, "lines", "--from", "1", "--count", "2")
                nursery.start_soon(cli, "summary", *sub, "gen", "--from", "4", "--summary")
            await cli("refused", "publish", "--topic", "x", "--ack", "2", "--count", "1")
    out = {name: r.stdout.decode() for name, r in results.items()}
    for name in ("lines", "gen", "all", "two", "summary"):
        assert results[name].returncode == 0, results[name].stderr.decode()
    assert out["lines"].startswith("published 4 messages to 'lines', acked 4, in ")
    assert out["gen"].startswith("published 1000 messages to 'gen', acked 1000, in ")
    rows = [line.split("\t") for line in out["all"].splitlines()]
    assert [(r[0], r[2], r[3]) for r in rows] == [
        ("0", "0", "one"),
        ("1", "1", "two"),
        ("2", "2", ""),
        ("3", "3", "four"),
    ]
    assert out["two"] == "two\n\n"
    assert (
        results["two"].stderr.decode().strip() == "2 messages, 3 bytes from 'lines', offsets 1..2"
    )
    assert out["summary"].strip() == "996 messages, 49800 bytes from 'gen', offsets 4..999"
    assert results["refused"].returncode == 1
    assert "not_allowed" in results["refused"].stderr.decode()


async def run_cli(port: int, *args: str) -> tuple[int, str, str]:
    """``python -m trio_embarcadero ARGS --port PORT``: exit status, stdout, stderr."""
    result = await trio.run_process(
        [sys.executable, "-m", "trio_embarcadero", *args, "--port", str(port)],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def test_subscribe_command_refuses_a_topic_that_does_not_exist(
    make_config: MakeConfig, cxl_path: str
) -> None:
    with trio.fail_after(30):
        async with open_broker(make_config()) as broker:
            async with open_publisher(HOST, broker.port, "there") as pub:
                await pub.publish(b"x")
            missing = await run_cli(
                broker.port, "subscribe", "--cxl-path", cxl_path, "--topic", "nosuch"
            )
            # Without the broker's file there is no telling: the summary says so.
            unchecked = await run_cli(
                broker.port, "subscribe", "--cxl-path", cxl_path + "-elsewhere", "--topic", "nosuch"
            )
    code, out, err = missing
    assert (code, out) == (1, ""), err
    assert err == (
        f"trio-embarcadero subscribe: topic 'nosuch' does not exist in {cxl_path} "
        "(the topics command lists them; --follow waits for it)\n"
    )
    code, out, err = unchecked
    assert (code, out) == (0, ""), err
    assert err.startswith("0 messages, 0 bytes from 'nosuch' (could not check that 'nosuch' ")
    assert "No such file" in err


def subscribers(broker: Broker) -> int:
    return sum(c.phase == ConnectionPhase.SUBSCRIBED for c in broker.connections)


async def test_subscribe_command_from_the_end_and_the_last_n(
    make_config: MakeConfig, cxl_path: str
) -> None:
    sub = ("subscribe", "--cxl-path", cxl_path, "--topic", "tail", "--offsets")
    results: dict[str, tuple[int, str, str]] = {}
    with trio.fail_after(30):
        async with open_broker(make_config()) as broker:

            async def cli(name: str, *args: str) -> None:
                results[name] = await run_cli(broker.port, *sub, *args)

            async with open_publisher(HOST, broker.port, "tail") as pub:
                await pub.publish_many(b"old %d" % i for i in range(10))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(cli, "last3", "--from", "-3")
                nursery.start_soon(cli, "last30", "--from=-30", "--summary")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(cli, "end", "--from", "end", "--follow", "--count", "2")
                nursery.start_soon(cli, "last1", "--from", "-1", "--follow", "--count", "2")
                # Both resolved --from before subscribing: publish once both wait.
                await wait_until(lambda: subscribers(broker) == 2)
                async with open_publisher(HOST, broker.port, "tail") as pub:
                    await pub.publish_many([b"new 10", b"new 11"])
    for code, _, err in results.values():
        assert code == 0, err
    offsets = {
        name: [line.split("\t")[0] for line in out.splitlines()]
        for name, (_, out, _) in results.items()
    }
    assert offsets["last3"] == ["7", "8", "9"]
    assert results["last30"][1] == "10 messages, 50 bytes from 'tail', offsets 0..9\n"
    assert offsets["end"] == ["10", "11"]
    assert results["end"][1].splitlines()[0].endswith("\tnew 10")
    assert offsets["last1"] == ["9", "10"]
