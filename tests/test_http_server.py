"""The endpoint's HTTP/1.1 server on in-memory streams, on Trio's mock clock.

Keep-alive, ``Expect: 100-continue``, and the limits that keep a client from
holding the endpoint: a malformed request (400), a body too large (413), too
many connections (503), a request that does not come (closed after
``REQUEST_TIMEOUT_S``), a handler that raises (500, the connection goes on).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import h11
import pytest
import trio
import trio.testing
from memory import MemoryListener

from trio_embarcadero.broker.http import (
    MAX_BODY_BYTES,
    REQUEST_TIMEOUT_S,
    Request,
    Response,
    serve_http,
)


async def echo(request: Request) -> Response:
    await trio.lowlevel.checkpoint()
    if request.path == "/boom":
        raise RuntimeError("a bug")
    return Response.json(
        200,
        {
            "method": request.method,
            "path": request.path,
            "query": request.query,
            "body": len(request.body),
        },
    )


@asynccontextmanager
async def server(max_connections: int = 4) -> AsyncIterator[MemoryListener]:
    listener = MemoryListener()
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(serve_http, echo, [listener], max_connections=max_connections))
        yield listener
        nursery.cancel_scope.cancel()


async def exchange(
    stream: trio.abc.Stream, conn: h11.Connection, method: str, target: str, body: bytes = b""
) -> tuple[int, bytes]:
    """One request and its response on a kept-alive connection (h11's client side)."""
    headers = [("host", "broker"), ("content-length", str(len(body)))]
    data = conn.send(h11.Request(method=method, target=target, headers=headers))
    data += conn.send(h11.Data(data=body)) if body else b""
    data += conn.send(h11.EndOfMessage())
    await stream.send_all(data)
    status, answer = 0, b""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(65536))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            answer += event.data
        elif isinstance(event, h11.EndOfMessage):
            conn.start_next_cycle()
            return status, answer


async def read_to_eof(stream: trio.abc.Stream) -> bytes:
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    return data


def request(method: str, target: str, body: bytes = b"", **headers: str) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "host: broker"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    if body or method == "POST":
        lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def test_keep_alive_serves_requests_in_turn(autojump_clock: trio.abc.Clock) -> None:
    async with server() as listener:
        stream = await listener.connect()
        conn = h11.Connection(h11.CLIENT)
        status, body = await exchange(stream, conn, "GET", "/a%20b?x=1&y=2")
        assert status == 200
        assert json.loads(body) == {
            "method": "GET",
            "path": "/a b",
            "query": {"x": "1", "y": "2"},
            "body": 0,
        }
        status, body = await exchange(stream, conn, "POST", "/v1/topics", b"12345")
        assert (status, json.loads(body)["body"]) == (200, 5)


async def test_expect_100_continue_gets_its_interim_answer(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with server() as listener:
        stream = await listener.connect()
        await stream.send_all(
            b"POST /x HTTP/1.1\r\nhost: b\r\ncontent-length: 3\r\nexpect: 100-continue\r\n\r\n"
        )
        assert (await stream.receive_some(65536)).startswith(b"HTTP/1.1 100 ")
        await stream.send_all(b"abc")
        answer = await stream.receive_some(65536)
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
        assert answer.endswith(b'"body": 3\n}\n')


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"NOT HTTP AT ALL\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"GET / HTTP/1.1\r\nhost: b\r\nx: " + b"y" * 20000 + b"\r\n\r\n", 431),
        (request("POST", "/", b"z" * (MAX_BODY_BYTES + 1)), 413),
    ],
)
async def test_bad_requests_get_an_error_and_a_close(
    autojump_clock: trio.abc.Clock, data: bytes, status: int
) -> None:
    async with server() as listener:
        stream = await listener.connect()
        await stream.send_all(data)
        answer = await read_to_eof(stream)
        assert answer.startswith(f"HTTP/1.1 {status} ".encode())
        assert b"\r\nconnection: close\r\n" in answer
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["message"]


async def test_a_handler_bug_is_a_500_and_the_connection_goes_on(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    async with server() as listener:
        stream = await listener.connect()
        conn = h11.Connection(h11.CLIENT)
        status, body = await exchange(stream, conn, "GET", "/boom")
        assert status == 500
        assert json.loads(body)["message"] == "internal error; the broker's log says more"
        assert "HTTP GET /boom: internal error" in caplog.text
        assert (await exchange(stream, conn, "GET", "/after"))[0] == 200


async def test_a_request_that_does_not_come_is_closed(autojump_clock: trio.abc.Clock) -> None:
    async with server() as listener:
        stream = await listener.connect()
        start = trio.current_time()
        await stream.send_all(b"GET / HT")  # and nothing more
        assert await read_to_eof(stream) == b""
        assert trio.current_time() - start == pytest.approx(REQUEST_TIMEOUT_S)


async def test_connections_beyond_the_limit_get_a_503(autojump_clock: trio.abc.Clock) -> None:
    async with server(max_connections=2) as listener:
        held = [await listener.connect() for _ in range(2)]
        await trio.testing.wait_all_tasks_blocked()
        extra = await listener.connect()
        answer = await read_to_eof(extra)
        assert answer.startswith(b"HTTP/1.1 503 ")
        # The two held ones are still served; once one goes, a new one is.
        await held[0].send_all(request("GET", "/ok", connection="close"))
        assert (await read_to_eof(held[0])).startswith(b"HTTP/1.1 200 ")
        await trio.testing.wait_all_tasks_blocked()
        again = await listener.connect()
        await again.send_all(request("GET", "/ok", connection="close"))
        assert (await read_to_eof(again)).startswith(b"HTTP/1.1 200 ")
        await held[1].aclose()
