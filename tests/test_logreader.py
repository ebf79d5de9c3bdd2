"""The log reader: committed messages straight from the CXL file, and the
``topics`` / ``inspect`` commands built on it."""

from __future__ import annotations

import os

import pytest
import trio
from conftest import MakeConfig, wait_until
from rawclient import batch, handshake, parse_ack_stream, payload_for, read_all

from trio_embarcadero import LayoutError, open_broker
from trio_embarcadero.cli import main
from trio_embarcadero.client import Message, open_publisher, open_subscriber
from trio_embarcadero.log import open_log

HOST = "127.0.0.1"


def plain(messages: list[Message]) -> list[tuple[int, int, int, bytes]]:
    return [(m.offset, m.client_id, m.client_order, bytes(m.payload)) for m in messages]


async def subscribed(port: int, topic: str, count: int, start: int = 0) -> list[Message]:
    out: list[Message] = []
    async with open_subscriber(HOST, port, topic, start=start) as sub:
        while len(out) < count:
            out.extend(await sub.receive_messages())
    return out


async def raw_publish(port: int, topic: str, client_id: int, batches: list[bytes]) -> None:
    async with await trio.open_tcp_stream(HOST, port) as stream:
        await stream.send_all(handshake(topic, client_id=client_id))
        for data in batches:
            await stream.send_all(data)
        await stream.send_eof()
        _, _, error = parse_ack_stream(await read_all(stream))
    assert error is None


async def test_the_log_reader_sees_what_subscribers_see(
    make_config: MakeConfig, cxl_path: str
) -> None:
    # Small segments, so the stream spans several of them.
    config = make_config(**{"cxl.segment_mb": 2, "cxl.size_mb": 16})
    with trio.fail_after(10):
        async with open_broker(config) as broker:
            async with trio.open_nursery() as nursery:
                for cid in (31, 32, 33):

                    async def publish(cid: int = cid) -> None:
                        async with open_publisher(
                            HOST, broker.port, "same", client_id=cid, batch_bytes=64 * 1024
                        ) as pub:
                            await pub.publish_many(
                                payload_for(cid, i, (i * 37) % 2000) for i in range(1500)
                            )

                    nursery.start_soon(publish)
            async with open_publisher(HOST, broker.port, "other", client_id=40) as pub:
                await pub.publish_many([b"a", b"bb"])
            via_tcp = await subscribed(broker.port, "same", 4500)
            via_tcp_late = await subscribed(broker.port, "same", 4500 - 1234, start=1234)
            with open_log(cxl_path) as log:
                assert plain(list(log.messages("same"))) == plain(via_tcp)
                assert plain(list(log.messages("same", start=1234))) == plain(via_tcp_late)
                assert log.units_used > 3
                topics = {t.name: t for t in log.topics()}
                stream = broker.log.existing_stream("same")
                assert stream is not None
                (info,) = topics["same"].streams
                assert (info.broker_id, info.messages, info.batches, info.payload_bytes) == (
                    0,
                    4500,
                    stream.batches,
                    stream.payload_bytes,
                )
                assert info.segments == stream.num_segments > 1
                assert topics["other"].messages == 2
                assert [bytes(m.payload) for m in log.messages("other")] == [b"a", b"bb"]
    # The file outlives the broker; a reader needs no broker at all.
    with open_log(cxl_path) as log:
        assert plain(list(log.messages("same"))) == plain(via_tcp)


async def test_never_an_inflight_batch_and_reading_resumes(
    make_config: MakeConfig, cxl_path: str
) -> None:
    config = make_config(**{"network.use_nonblocking": False})
    first, first_payloads = batch(0, 1, 0, 5, 100)
    held, held_payloads = batch(0, 2, 0, 6, 300)
    with trio.fail_after(10):
        async with open_broker(config) as broker:
            await raw_publish(broker.port, "inflight", 1, [first])
            with open_log(cxl_path) as log:
                async with await trio.open_tcp_stream(HOST, broker.port) as slow:
                    await slow.send_all(handshake("inflight", client_id=2))
                    await slow.send_all(held[:-64])
                    stream = broker.log.existing_stream("inflight")
                    assert stream is not None
                    await wait_until(lambda: len(stream.pending) == 1)
                    seen = list(log.messages("inflight"))
                    assert [bytes(m.payload) for m in seen] == first_payloads
                    assert [b.state for b in log.batches("inflight")] == ["committed", "reserved"]
                    assert list(log.messages("inflight", start=5)) == []
                    await slow.send_all(held[-64:])
                    await slow.send_eof()
                    await read_all(slow)
                # Called again, it continues where the reserved batch was.
                rest = list(log.messages("inflight", start=5))
                assert [m.offset for m in rest] == list(range(5, 11))
                assert [bytes(m.payload) for m in rest] == held_payloads
                assert plain(list(log.messages("inflight"))) == plain(
                    await subscribed(broker.port, "inflight", 11)
                )


async def test_abandoned_batches_are_skipped(make_config: MakeConfig, cxl_path: str) -> None:
    config = make_config(**{"network.use_nonblocking": False})
    a, a_payloads = batch(0, 1, 0, 4, 10)
    cut, _ = batch(0, 2, 0, 4, 10)
    b, b_payloads = batch(1, 1, 4, 4, 20)
    with trio.fail_after(10):
        async with open_broker(config) as broker:
            await raw_publish(broker.port, "skip", 1, [a])
            async with await trio.open_tcp_stream(HOST, broker.port) as stream:
                await stream.send_all(handshake("skip", client_id=2))
                await stream.send_all(cut[:-64])  # then the connection drops
            await wait_until(lambda: broker.log.statistics().batches_abandoned == 1)
            await raw_publish(broker.port, "skip", 1, [b])
            with open_log(cxl_path) as log:
                got = list(log.messages("skip"))
                states = [x.state for x in log.batches("skip")]
    assert states == ["committed", "abandoned", "committed"]
    assert [m.offset for m in got] == list(range(8))
    assert [bytes(m.payload) for m in got] == a_payloads + b_payloads


async def test_unknown_topics_offsets_and_brokers(make_config: MakeConfig, cxl_path: str) -> None:
    with trio.fail_after(10):
        async with open_broker(make_config()) as broker:
            async with open_publisher(HOST, broker.port, "known") as pub:
                await pub.publish_many([b"x"] * 3)
            with open_log(cxl_path) as log:
                assert list(log.messages("unknown")) == []
                assert list(log.messages("known", start=3)) == []
                assert list(log.messages("known", broker_id=1)) == []
                assert log.topic("known").messages == 3
                with pytest.raises(KeyError):
                    log.topic("unknown")
                with pytest.raises(ValueError, match="broker_id"):
                    list(log.messages("known", broker_id=99))
                with pytest.raises(ValueError, match="start"):
                    list(log.messages("known", start=-1))


def test_a_file_that_is_not_a_region(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "junk")
    with open(path, "wb") as f:
        f.write(b"not a region" * 1000)
    with pytest.raises(LayoutError, match="not a trio-embarcadero"):
        open_log(path).__enter__()
    with open(path, "wb") as f:
        f.write(b"tiny")
    with pytest.raises(LayoutError, match="not a CXL region"):
        open_log(path).__enter__()


def test_payload_views_outliving_the_reader_are_harmless(
    make_config: MakeConfig, cxl_path: str
) -> None:
    async def fill() -> None:
        async with open_broker(make_config()) as broker:
            async with open_publisher(HOST, broker.port, "views") as pub:
                await pub.publish(b"kept")

    trio.run(fill)
    with open_log(cxl_path) as log:
        kept = next(log.message_views("views"))
    assert kept.offset == 0  # closing with a view alive left the mapping to the GC


def test_messages_are_copies_and_views_are_the_opt_in(
    make_config: MakeConfig, cxl_path: str
) -> None:
    payloads = [bytes([i]) * (i * 10) for i in range(50)]

    async def fill() -> None:
        async with open_broker(make_config()) as broker:
            async with open_publisher(HOST, broker.port, "copies") as pub:
                await pub.publish_many(payloads)

    trio.run(fill)
    with open_log(cxl_path) as log:
        copies = list(log.messages("copies", start=1))
        views = list(log.message_views("copies", start=1))
        assert [v.payload for v in views] == payloads[1:]
        assert {(type(v.payload), v.payload.readonly) for v in views} == {(memoryview, True)}
        assert [v.to_message() for v in views] == copies
        with pytest.raises(ValueError, match="start"):
            list(log.message_views("copies", start=-1))
    # Copies are bytes of their own: valid after the reader is closed.
    assert {type(m.payload) for m in copies} == {bytes}
    assert [m.payload for m in copies] == payloads[1:]
    assert [m.offset for m in copies] == list(range(1, 50))


def test_topics_and_inspect_commands(
    make_config: MakeConfig, cxl_path: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async def fill() -> None:
        async with open_broker(make_config()) as broker:
            async with open_publisher(
                HOST, broker.port, "cli-topic", batch_bytes=4096, linger=None
            ) as pub:
                # 192-byte records, 21 to a batch: 5 batches.
                await pub.publish_many(bytes(100) for _ in range(100))

    trio.run(fill)
    assert main(["topics", "--cxl-path", cxl_path]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].split() == ["TOPIC", "ORDER", "BROKER", "MESSAGES", "BATCHES", "BYTES", "START"]
    assert rows[1].split() == ["cli-topic", "0", "0", "100", "5", str(100 * 192), "0"]
    assert main(["inspect", "--cxl-path", cxl_path, "--topic", "cli-topic"]) == 0
    out = capsys.readouterr().out
    assert "1 of 1024 topics" in out
    assert out.count(" committed ") == 5
    assert main(["topics", "--cxl-path", cxl_path + "-missing"]) == 1
    assert "No such file" in capsys.readouterr().err
    # A topic that is not there is an error, not an empty listing.
    assert main(["inspect", "--cxl-path", cxl_path, "--topic", "nosuch"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"trio-embarcadero inspect: topic 'nosuch' does not exist in {cxl_path}\n"
