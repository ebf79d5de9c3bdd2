"""The gRPC server's Trio layer on in-memory streams, on Trio's mock clock.

Calls and their statuses (a handler's error, a bug, an unknown method, a
second request message), the client's deadline, cancelling a call, and the
limits that keep a client from holding the service: a request or a first
call that does not come, an idle connection, too many connections, a client
that does not read; and the drain when the server is cancelled.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from grpcclient import PREFIX, GrpcTestClient, converse
from memory import MemoryListener

from trio_embarcadero.broker.grpc import (
    IDLE_TIMEOUT_S,
    REQUEST_TIMEOUT_S,
    SEND_TIMEOUT_S,
    Call,
    serve_grpc,
)
from trio_embarcadero.errors import RpcError, RpcStatus

ECHO = "/test.Service/Echo"
STREAM = "/test.Service/Stream"
FAIL = "/test.Service/Fail"
BUG = "/test.Service/Bug"


class Handlers:
    """The service under test; it notes what became of its calls."""

    def __init__(self) -> None:
        self.cancelled = 0

    async def echo(self, call: Call) -> None:
        await call.send(call.request)

    async def stream(self, call: Call) -> None:
        try:
            for i in range(int(call.request or b"0")):
                await call.send(b"%d" % i)
            await trio.sleep_forever()
        except trio.Cancelled:
            self.cancelled += 1
            raise

    async def fail(self, call: Call) -> None:
        await trio.lowlevel.checkpoint()
        raise RpcError(RpcStatus.NOT_FOUND, f"no {call.request.decode()}")

    async def bug(self, call: Call) -> None:
        await trio.lowlevel.checkpoint()
        raise RuntimeError("a bug")


@asynccontextmanager
async def server(
    handlers: Handlers, max_connections: int = 4
) -> AsyncIterator[tuple[MemoryListener, trio.CancelScope]]:
    listener = MemoryListener()
    methods = {
        ECHO: handlers.echo,
        STREAM: handlers.stream,
        FAIL: handlers.fail,
        BUG: handlers.bug,
    }
    # The server's own scope: cancelling it drains the server, not the test.
    scope = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[None]) -> None:
        with scope:
            await serve_grpc(
                methods, [listener], max_connections=max_connections, task_status=task_status
            )

    # A bound for the tests on the mock clock (virtual seconds): a hang fails.
    with trio.fail_after(10 * IDLE_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            await nursery.start(run)
            yield listener, scope
            scope.cancel()


async def connect(listener: MemoryListener) -> tuple[trio.abc.Stream, GrpcTestClient]:
    stream = await listener.connect()
    return stream, GrpcTestClient()


async def call(
    stream: trio.abc.Stream, client: GrpcTestClient, method: str, message: bytes = b""
) -> tuple[int | None, str, list[bytes]]:
    sid = client.call(method, message)
    assert await converse(stream, client, lambda: client.replies[sid].ended)
    reply = client.replies[sid]
    return reply.status, reply.message, reply.messages


async def streaming(stream: trio.abc.Stream, client: GrpcTestClient) -> int:
    """A streaming call, once its first message is in."""
    sid = client.call(STREAM, b"1")
    assert await converse(stream, client, lambda: bool(client.replies[sid].messages))
    return sid


async def test_calls_and_their_statuses(caplog: pytest.LogCaptureFixture) -> None:
    with trio.fail_after(5):
        async with server(Handlers()) as (listener, _):
            stream, client = await connect(listener)
            assert await call(stream, client, ECHO, b"hello") == (0, "", [b"hello"])
            assert await call(stream, client, FAIL, b"topic") == (5, "no topic", [])
            status, message, _ = await call(stream, client, BUG)
            assert (status, message) == (13, "internal error; the broker's log says more")
            assert "gRPC /test.Service/Bug: internal error" in caplog.text
            status, message, _ = await call(stream, client, "/test.Service/Nope")
            assert status == RpcStatus.UNIMPLEMENTED
            assert (
                message == "no method /test.Service/Nope; this server has Bug, Echo, Fail, Stream"
            )
            # The connection served every one of them and goes on.
            assert await call(stream, client, ECHO, b"again") == (0, "", [b"again"])


async def test_one_request_message_only() -> None:
    with trio.fail_after(5):
        async with server(Handlers()) as (listener, _):
            stream, client = await connect(listener)
            sid = client.call(ECHO, b"one", end=False)
            client.send(sid, PREFIX.pack(0, 3) + b"two", end=True)
            assert await converse(stream, client, lambda: client.replies[sid].ended)
            reply = client.replies[sid]
            assert (reply.status, reply.message, reply.messages) == (
                RpcStatus.INTERNAL,
                "a request of this method has one message",
                [],
            )
            sid = client.call(ECHO, None)  # and a call with none
            assert await converse(stream, client, lambda: client.replies[sid].ended)
            assert client.replies[sid].message == "the request has no message"


async def test_the_clients_deadline(autojump_clock: trio.testing.MockClock) -> None:
    handlers = Handlers()
    async with server(handlers) as (listener, _):
        stream, client = await connect(listener)
        sid = client.call(STREAM, b"2", timeout=b"1500m")
        start = trio.current_time()
        assert await converse(stream, client, lambda: client.replies[sid].ended)
        assert trio.current_time() - start == pytest.approx(1.5)
        reply = client.replies[sid]
        assert (reply.messages, reply.status) == ([b"0", b"1"], RpcStatus.DEADLINE_EXCEEDED)
        assert handlers.cancelled == 1


async def test_the_client_cancels_a_call(autojump_clock: trio.testing.MockClock) -> None:
    handlers = Handlers()
    async with server(handlers) as (listener, _):
        stream, client = await connect(listener)
        sid = await streaming(stream, client)
        client.h2.reset_stream(sid)
        await stream.send_all(client.data_to_send())
        await trio.testing.wait_all_tasks_blocked()
        assert handlers.cancelled == 1
        assert await call(stream, client, ECHO, b"still") == (0, "", [b"still"])


async def test_a_request_that_does_not_come_whole(autojump_clock: trio.testing.MockClock) -> None:
    async with server(Handlers()) as (listener, _):
        stream, client = await connect(listener)
        sid = client.call(ECHO, None, end=False)
        client.send(sid, PREFIX.pack(0, 10) + b"part")
        start = trio.current_time()
        assert await converse(stream, client, lambda: client.replies[sid].ended)
        assert trio.current_time() - start == pytest.approx(REQUEST_TIMEOUT_S)
        reply = client.replies[sid]
        assert reply.status == RpcStatus.DEADLINE_EXCEEDED
        assert reply.message == f"the request did not arrive whole within {REQUEST_TIMEOUT_S:g} s"


async def test_a_connection_that_opens_no_call(autojump_clock: trio.testing.MockClock) -> None:
    async with server(Handlers()) as (listener, _):
        stream, client = await connect(listener)
        start = trio.current_time()
        assert not await converse(stream, client, lambda: False)  # until the server closes
        assert trio.current_time() - start == pytest.approx(REQUEST_TIMEOUT_S)
        assert client.goaway is not None
        assert client.goaway.additional_data == b"idle for too long"


async def test_an_idle_connection_is_closed(autojump_clock: trio.testing.MockClock) -> None:
    async with server(Handlers()) as (listener, _):
        stream, client = await connect(listener)
        # A streaming call keeps it open however long it lasts...
        sid = client.call(STREAM, b"0")
        await stream.send_all(client.data_to_send())
        await trio.sleep(IDLE_TIMEOUT_S * 3)
        client.h2.reset_stream(sid)
        # ...and the idle time counts from the end of the last call.
        done = trio.current_time()
        assert not await converse(stream, client, lambda: False)
        assert trio.current_time() - done == pytest.approx(IDLE_TIMEOUT_S)
        assert client.goaway is not None


async def test_the_drain_ends_open_calls(autojump_clock: trio.testing.MockClock) -> None:
    handlers = Handlers()
    async with server(handlers) as (listener, scope):
        stream, client = await connect(listener)
        sid = await streaming(stream, client)
        scope.cancel()
        assert not await converse(stream, client, lambda: False)
    reply = client.replies[sid]
    assert (reply.status, reply.message) == (
        RpcStatus.UNAVAILABLE,
        "the broker is shutting down",
    )
    assert client.goaway is not None
    assert client.goaway.additional_data == b"the broker is shutting down"
    assert handlers.cancelled == 1


async def test_too_many_connections(autojump_clock: trio.testing.MockClock) -> None:
    async with server(Handlers(), max_connections=1) as (listener, _):
        first, one = await connect(listener)
        assert await call(first, one, ECHO, b"1") == (0, "", [b"1"])
        second, two = await connect(listener)
        assert not await converse(second, two, lambda: False)
        assert two.goaway is not None
        assert two.goaway.additional_data == b"too many gRPC connections; try again"
        assert await call(first, one, ECHO, b"2") == (0, "", [b"2"])


async def test_a_client_that_does_not_read(autojump_clock: trio.testing.MockClock) -> None:
    async with server(Handlers(), max_connections=1) as (listener, _):
        stuck = await listener.connect_lockstep()
        start = trio.current_time()
        # The server's settings wait for a reader; it gives up, closes, and
        # its connection slot is free again.
        with pytest.raises(trio.BrokenResourceError):
            await stuck.send_all(GrpcTestClient().data_to_send())
        assert trio.current_time() - start == pytest.approx(SEND_TIMEOUT_S)
        stream, client = await connect(listener)
        assert await call(stream, client, ECHO, b"ok") == (0, "", [b"ok"])
