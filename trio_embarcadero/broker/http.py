"""A small HTTP/1.1 server on Trio for the broker's operator endpoint.

The protocol is h11's (parsing, framing, keep-alive, ``Expect:
100-continue``); this module is the Trio loop around it, in the broker's
style: it serves any ``trio.abc.Listener`` (bound by the broker before it
opens its logs, like the data port), starts with ``nursery.start`` and stops
by cancellation.

The endpoint answers short requests from operators and scrapers, so each
connection is held on a tight rein: a request must arrive whole (headers
within :data:`MAX_HEADER_BYTES`, a body within :data:`MAX_BODY_BYTES`)
within :data:`REQUEST_TIMEOUT_S` of the wait for it starting, else the
connection is closed; at most ``max_connections`` are served at once and
the others are answered 503 and closed. A malformed request gets a 400 and
a close, a body too large a 413. Nothing a client sends raises out of here;
a handler that raises is logged and answered 500.
"""

from __future__ import annotations

import http
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any, NoReturn
from urllib.parse import parse_qsl, unquote, urlsplit

import attrs
import h11
import trio

logger = logging.getLogger(__name__)

#: Bytes a request's start line and headers may take.
MAX_HEADER_BYTES = 16 * 1024
#: Bytes a request's body may take (the admin API's are a few hundred).
MAX_BODY_BYTES = 64 * 1024
#: Seconds from the wait for a request to its last byte; an idle keep-alive
#: connection is closed after as long.
REQUEST_TIMEOUT_S = 30.0
#: Connections served at once.
MAX_CONNECTIONS = 64

_RECEIVE_BYTES = 16 * 1024

JSON_TYPE = "application/json"


@attrs.frozen
class Request:
    """One request, read whole.

    Attributes:
        method: ``GET``, ``POST``, ...
        path: The target's path, percent-decoded.
        query: The target's query parameters (the last of each name).
        headers: Header names (lower case) to values.
        body: The body.
    """

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes


@attrs.frozen
class Response:
    """What to answer.

    Attributes:
        status: The HTTP status.
        body: The body.
        content_type: Its media type.
        headers: More headers.
    """

    status: int
    body: bytes = b""
    content_type: str = JSON_TYPE
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def json(
        cls, status: int, value: Any, *, headers: tuple[tuple[str, str], ...] = ()
    ) -> Response:
        """A JSON response (indented: people read these with curl)."""
        return cls(status, json.dumps(value, indent=1).encode() + b"\n", JSON_TYPE, headers)

    @classmethod
    def error(cls, status: int, message: str, **headers: str) -> Response:
        """An error, as ``{"error": <reason phrase>, "message": message}``."""
        body = {"error": http.HTTPStatus(status).phrase, "message": message}
        return cls.json(status, body, headers=tuple(headers.items()))


Handler = Callable[[Request], Awaitable[Response]]


async def serve_http(
    handler: Handler,
    listeners: Sequence[trio.abc.Listener[trio.abc.Stream]],
    *,
    max_connections: int = MAX_CONNECTIONS,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve ``handler`` on ``listeners`` until cancelled.

    Args:
        handler: Answers each request.
        listeners: Where connections come from (bound by the caller).
        max_connections: Connections served at once; more get a 503.
        task_status: Told once the listeners accept.
    """
    await serve_connections(
        partial(_serve_connection, handler), listeners, max_connections, task_status=task_status
    )


async def serve_connections(
    serve: Callable[[trio.CapacityLimiter, trio.abc.Stream], Awaitable[None]],
    listeners: Sequence[trio.abc.Listener[trio.abc.Stream]],
    max_connections: int,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Run ``serve(limiter, stream)`` for every connection of ``listeners``
    until cancelled (the HTTP endpoint's and the gRPC service's loop).

    Args:
        serve: Serves one connection; ``limiter`` counts the connections
            served, ``max_connections`` at most (``serve`` takes and gives
            back its place, or refuses the connection).
        listeners: Where connections come from (bound by the caller).
        max_connections: The limiter's size.
        task_status: Told once the listeners accept.
    """
    limiter = trio.CapacityLimiter(max_connections)
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, partial(serve, limiter), list(listeners))
        task_status.started()
    raise AssertionError("unreachable")  # pragma: no cover - serve_listeners never returns


async def _serve_connection(
    handler: Handler, limiter: trio.CapacityLimiter, stream: trio.abc.Stream
) -> None:
    try:
        try:
            limiter.acquire_nowait()
        except trio.WouldBlock:
            await _send_raw(stream, Response.error(503, "too many HTTP connections; try again"))
            return
        try:
            await _serve_requests(handler, stream)
        finally:
            limiter.release()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client went away
    finally:
        await trio.aclose_forcefully(stream)


async def _serve_requests(handler: Handler, stream: trio.abc.Stream) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
    while True:
        request = None
        try:
            with trio.move_on_after(REQUEST_TIMEOUT_S):
                request = await _receive_request(conn, stream)
        except h11.RemoteProtocolError as exc:
            await _send_raw(stream, Response.error(exc.error_status_hint, str(exc)))
            return
        except _TooLarge:
            response = Response.error(
                413, f"a request body may have {MAX_BODY_BYTES} bytes at most"
            )
            await _send_raw(stream, response)
            return
        if request is None:
            return  # closed by the client, or too slow
        response = await _answer(handler, request)
        break_after = await _send(conn, stream, request, response)
        if break_after or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            return
        conn.start_next_cycle()


class _TooLarge(Exception):
    pass


async def _receive_request(conn: h11.Connection, stream: trio.abc.Stream) -> Request | None:
    """The next request, whole; None when the client closed the connection."""
    head: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            if conn.they_are_waiting_for_100_continue:
                await stream.send_all(
                    conn.send(h11.InformationalResponse(status_code=100, headers=[]))
                )
            conn.receive_data(bytes(await stream.receive_some(_RECEIVE_BYTES)))
        elif isinstance(event, h11.Request):
            # h11 bounds what it buffers of an incomplete head; one that
            # arrived whole is bounded here.
            size = len(event.target) + sum(len(k) + len(v) + 4 for k, v in event.headers)
            if size > MAX_HEADER_BYTES:
                raise h11.RemoteProtocolError(
                    f"the request's head has more than {MAX_HEADER_BYTES} bytes",
                    error_status_hint=431,
                )
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY_BYTES:
                raise _TooLarge
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None
            return _request(head, bytes(body))
        elif isinstance(event, h11.ConnectionClosed):
            return None


def _request(head: h11.Request, body: bytes) -> Request:
    target = urlsplit(head.target.decode("ascii", "replace"))
    return Request(
        method=head.method.decode("ascii", "replace").upper(),
        path=unquote(target.path),
        query=dict(parse_qsl(target.query)),
        headers={k.decode("latin-1"): v.decode("latin-1") for k, v in head.headers},
        body=body,
    )


async def _answer(handler: Handler, request: Request) -> Response:
    try:
        return await handler(request)
    except Exception:
        logger.exception("HTTP %s %s: internal error", request.method, request.path)
        return Response.error(500, "internal error; the broker's log says more")


async def _send(
    conn: h11.Connection, stream: trio.abc.Stream, request: Request, response: Response
) -> bool:
    """Send ``response``; True when the connection closes after it."""
    headers = [
        ("content-type", response.content_type),
        ("content-length", str(len(response.body))),
        *response.headers,
    ]
    reason = http.HTTPStatus(response.status).phrase.encode()
    data = conn.send(h11.Response(status_code=response.status, headers=headers, reason=reason))
    if request.method != "HEAD" and response.body:
        data += conn.send(h11.Data(data=response.body))
    data += conn.send(h11.EndOfMessage())
    await stream.send_all(data)  # one write: a scrape is one segment or a few
    return conn.our_state is h11.MUST_CLOSE


async def _send_raw(stream: trio.abc.Stream, response: Response) -> None:
    """Send ``response`` and close, outside h11's state (it refuses to
    answer a request it could not parse)."""
    reason = http.HTTPStatus(response.status).phrase
    head = (
        f"HTTP/1.1 {response.status} {reason}\r\n"
        f"content-type: {response.content_type}\r\n"
        f"content-length: {len(response.body)}\r\n"
        "connection: close\r\n\r\n"
    )
    with trio.move_on_after(1):  # an answer to a client that may not read
        await stream.send_all(head.encode("latin-1") + response.body)
