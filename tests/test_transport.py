"""The I/O boundary's shortcuts past Trio's scheduler, on real sockets.

``SocketReceiver.receive_into_nowait`` takes bytes that have arrived without
a wait or a checkpoint; ``Sender.send_nowait`` writes a small frame at once
when the socket takes it whole and no ``send_all`` is under way. An ack
count written that way must not be written a second time by the ack sender,
and a frame the socket took only in part must be finished before anything
else goes out.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from trio_embarcadero.broker.acks import AckCounter, run_ack_sender
from trio_embarcadero.errors import ConnectionLost
from trio_embarcadero.transport import Sender, SocketReceiver, is_ip_socket, receiver_for
from trio_embarcadero.wire import encode_ack, encode_ack_start


@asynccontextmanager
async def socket_pair() -> AsyncIterator[tuple[trio.SocketStream, trio.SocketStream]]:
    a, b = trio.socket.socketpair()
    async with trio.SocketStream(a) as near, trio.SocketStream(b) as far:
        yield near, far


async def read_exactly(stream: trio.SocketStream, count: int) -> bytes:
    data = b""
    with trio.fail_after(5):
        while len(data) < count:
            data += await stream.receive_some(count - len(data))
    return data


async def test_receive_into_nowait_takes_what_has_arrived_and_tells_eof() -> None:
    async with socket_pair() as (near, far):
        receiver = receiver_for(near)
        assert isinstance(receiver, SocketReceiver)
        view = memoryview(bytearray(16))
        assert receiver.receive_into_nowait(view) is None  # nothing yet: no wait
        await far.send_all(b"abcdef")
        await trio.lowlevel.wait_readable(near.socket)
        got = receiver.receive_into_nowait(view)
        assert got is not None
        assert bytes(view[:got]) == b"abcdef"
        await far.send_eof()
        await trio.lowlevel.wait_readable(near.socket)
        assert receiver.receive_into_nowait(view) == 0  # EOF


@pytest.mark.parametrize("wait_first", [False, True])
async def test_receive_into_waits_reads_and_consumes_nothing_when_cancelled(
    wait_first: bool,
) -> None:
    """With or without ``wait_first`` (the caller found nothing waiting), a
    receive takes what has arrived, waits for what has not, and a receive
    cancelled before it reads leaves every byte in the socket."""
    async with socket_pair() as (near, far):
        receiver = receiver_for(near)
        view = memoryview(bytearray(16))
        await far.send_all(b"abc")
        await trio.lowlevel.wait_readable(near.socket)
        with trio.fail_after(5):
            assert await receiver.receive_into(view, wait_first=wait_first) == 3
        assert bytes(view[:3]) == b"abc"
        async with trio.open_nursery() as nursery:

            async def later() -> None:
                await trio.testing.wait_all_tasks_blocked()  # the receive waits
                await far.send_all(b"defg")

            nursery.start_soon(later)
            with trio.fail_after(5):
                assert await receiver.receive_into(view, wait_first=wait_first) == 4
        assert bytes(view[:4]) == b"defg"
        await far.send_all(b"hij")
        await trio.lowlevel.wait_readable(near.socket)
        with trio.CancelScope() as scope:
            scope.cancel()
            await receiver.receive_into(view, wait_first=wait_first)
        assert scope.cancelled_caught
        assert receiver.receive_into_nowait(view) == 3  # still there
        assert bytes(view[:3]) == b"hij"


async def test_receive_into_nowait_reports_a_reset_as_connection_lost() -> None:
    with trio.fail_after(5):
        (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
        async with listener:
            client = await trio.open_tcp_stream("127.0.0.1", listener.socket.getsockname()[1])
            server = await listener.accept()
            async with server:
                # Linger 0: closing sends the peer a reset.
                client.socket.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                await client.aclose()
                await trio.lowlevel.wait_readable(server.socket)
                receiver = receiver_for(server)
                with pytest.raises(ConnectionLost):
                    receiver.receive_into_nowait(memoryview(bytearray(16)))


async def test_send_nowait_writes_a_frame_at_once_but_never_beside_a_send_all() -> None:
    async with socket_pair() as (near, far):
        sender = Sender(near)
        assert sender.send_nowait(b"12345678")
        assert await read_exactly(far, 8) == b"12345678"
        # While a send_all holds the stream (here: blocked on a full socket),
        # nothing is written past it.
        big = b"x" * (8 << 20)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender.send_all, big)
            await trio.testing.wait_all_tasks_blocked()
            assert not sender.send_nowait(b"ABCDEFGH")
            assert await read_exactly(far, len(big)) == big
        assert sender.send_nowait(b"ABCDEFGH")
        assert await read_exactly(far, 8) == b"ABCDEFGH"


async def test_a_frame_written_in_part_is_finished_first(monkeypatch: pytest.MonkeyPatch) -> None:
    async with socket_pair() as (near, far):
        sender = Sender(near)
        real_write = os.write
        monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, data[:3]))
        assert not sender.send_nowait(b"ABCDEFGH")  # only "ABC" went out
        monkeypatch.setattr(os, "write", real_write)
        assert not sender.send_nowait(b"later")  # the rest must go first
        await sender.send_all(b"XY")
        assert await read_exactly(far, 10) == b"ABCDEFGHXY"


async def start_ack_sender(
    nursery: trio.Nursery, counter: AckCounter, stream: trio.SocketStream, broker_id: int
) -> None:
    """An ack sender for ``counter`` on ``stream``, writing counts at once where it can."""
    sender = Sender(stream)
    await nursery.start(
        lambda task_status: run_ack_sender(
            counter, sender.send_all, broker_id, send_nowait=sender.send_nowait,
            task_status=task_status,
        )
    )  # fmt: skip


async def test_counts_written_at_once_are_not_written_again() -> None:
    async with socket_pair() as (near, far):
        counter = AckCounter()
        async with trio.open_nursery() as nursery:
            await start_ack_sender(nursery, counter, near, 3)
            counter.advance(5)  # written here, at once: the sender stays asleep
            assert counter.sent == 5
            counter.advance(2)
            await trio.lowlevel.checkpoint()
            counter.advance(1)
            counter.close()
        expected = encode_ack_start(3) + encode_ack(5) + encode_ack(7) + encode_ack(8)
        assert await read_exactly(far, len(expected)) == expected


async def test_closing_a_held_counter_sends_its_final_count() -> None:
    async with socket_pair() as (near, far):
        counter = AckCounter(hold_bytes=10**6)
        async with trio.open_nursery() as nursery:
            await start_ack_sender(nursery, counter, near, 1)
            counter.hold()
            counter.advance(5, 100)
            counter.advance(6, 100)
            assert counter.sent == 0  # held
            counter.close()
        expected = encode_ack_start(1) + encode_ack(11)
        assert await read_exactly(far, len(expected)) == expected


async def test_only_ip_sockets_have_a_peer_address() -> None:
    a, b = trio.socket.socketpair()
    with a, b:
        assert not is_ip_socket(a)  # a Unix socket: getpeername() gives no (host, port)
    tcp = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    with tcp:
        assert is_ip_socket(tcp)
