"""A small gRPC server on Trio: unary and server-streaming calls.

The protocol is :mod:`.grpcwire`'s (gRPC over ``h2``'s HTTP/2, sans-IO);
this module is the Trio loop around it, in the broker's style, as
:mod:`.http` is for the HTTP endpoint: :func:`serve_grpc` serves any
``trio.abc.Listener`` (bound by the broker before it opens its logs),
starts with ``nursery.start`` and stops by cancellation.

Each call runs in a task of its own, started once its one request message
is in (unary and server-streaming calls have exactly one), within the
client's deadline (``grpc-timeout``: the call then ends with
``DEADLINE_EXCEEDED``) and cancelled when the client cancels it. A handler
sends response messages with :meth:`Call.send` and ends the call by
returning (status ``OK``) or raising :class:`~trio_embarcadero.errors.RpcError`
(that status); anything else it raises is logged and answered ``INTERNAL``.

Limits keep a client from holding the service: a request message is
:data:`MAX_REQUEST_BYTES` at most and must be whole within
:data:`REQUEST_TIMEOUT_S` of its call's start; a connection must open its
first call within :data:`REQUEST_TIMEOUT_S` and is closed (GOAWAY) after
:data:`IDLE_TIMEOUT_S` without a call; :data:`MAX_CONNECTIONS` are served
at once (more get a GOAWAY and are closed), each with
:data:`MAX_CONCURRENT_STREAMS` calls at most; a client that does not read
what it is sent for :data:`SEND_TIMEOUT_S` loses its connection. A client
that breaks HTTP/2 costs its connection only, one that breaks gRPC only
its call.

Draining: when :func:`serve_grpc` is cancelled, every connection ends its
open calls with ``UNAVAILABLE`` ("the broker is shutting down") and sends a
GOAWAY, within :data:`GOODBYE_TIMEOUT_S`, then closes.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import partial
from typing import NoReturn

import attrs
import trio

from ..errors import RpcError, RpcStatus
from ..transport import is_ip_socket
from .grpcwire import (
    CallCancelled,
    CallStarted,
    ConnectionEnded,
    MessageReceived,
    RequestEnded,
    ServerConnection,
)
from .http import serve_connections

logger = logging.getLogger(__name__)

#: Bytes a request message may have (the cluster service's are a few dozen).
MAX_REQUEST_BYTES = 64 * 1024
#: Seconds from a call's start to its whole request, and from a connection's
#: start to its first call.
REQUEST_TIMEOUT_S = 10.0
#: Seconds a connection may go without a call before it is closed.
IDLE_TIMEOUT_S = 300.0
#: Seconds a write to a client may take before its connection is given up.
SEND_TIMEOUT_S = 10.0
#: Seconds a draining connection has to say goodbye.
GOODBYE_TIMEOUT_S = 1.0
#: Connections served at once.
MAX_CONNECTIONS = 64
#: Calls one connection may have open at once.
MAX_CONCURRENT_STREAMS = 32

_RECEIVE_BYTES = 64 * 1024


class Call:
    """One call, as its handler sees it.

    Attributes:
        method: ``/<package.Service>/<Method>``.
        request: The request message's bytes.
        local_host: The address the client reached the server at (this
            host's side of the connection), "" when unknown.
    """

    def __init__(self, connection: _Connection, stream_id: int, method: str) -> None:
        self._connection = connection
        self._stream_id = stream_id
        self.method = method
        self.request = b""
        self.local_host = connection.local_host

    async def send(self, message: bytes) -> None:
        """Send a response message; returns once the client's flow-control
        window took it (the next waits for it to read)."""
        await self._connection.send_message(self._stream_id, message)


#: Serves one call (see the module docstring).
Handler = Callable[[Call], Awaitable[None]]


async def serve_grpc(
    methods: Mapping[str, Handler],
    listeners: Sequence[trio.abc.Listener[trio.abc.Stream]],
    *,
    max_connections: int = MAX_CONNECTIONS,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Serve ``methods`` on ``listeners`` until cancelled, then drain.

    Args:
        methods: Handler of each method, by path (``/<package.Service>/<Method>``);
            a call of another gets ``UNIMPLEMENTED``.
        listeners: Where connections come from (bound by the caller).
        max_connections: Connections served at once.
        task_status: Told once the listeners accept.
    """
    await serve_connections(
        partial(_serve_connection, methods), listeners, max_connections, task_status=task_status
    )


async def _serve_connection(
    methods: Mapping[str, Handler], limiter: trio.CapacityLimiter, stream: trio.abc.Stream
) -> None:
    connection = _Connection(stream, methods)
    try:
        try:
            limiter.acquire_nowait()
        except trio.WouldBlock:
            await connection.refuse("too many gRPC connections; try again")
            return
        try:
            await connection.run()
        except Exception:
            # A bug, not a client's fault: the other connections go on, loudly.
            logger.exception("gRPC connection from %s: internal error", connection.peer)
        finally:
            limiter.release()
    finally:
        await trio.aclose_forcefully(stream)


@attrs.define(eq=False)
class _CallState:
    call: Call
    scope: trio.CancelScope
    request_done: trio.Event = attrs.field(factory=trio.Event)
    #: Why the call is over before its handler ended it (None: it is not).
    ended: str | None = None
    messages: int = 0


class _Connection:
    """The I/O of one client connection."""

    def __init__(self, stream: trio.abc.Stream, methods: Mapping[str, Handler]) -> None:
        self.stream = stream
        self.methods = methods
        self.protocol = ServerConnection(
            max_request_bytes=MAX_REQUEST_BYTES, max_concurrent_streams=MAX_CONCURRENT_STREAMS
        )
        self.calls: dict[int, _CallState] = {}
        self.local_host = _local_host(stream)
        self._send_lock = trio.StrictFIFOLock()
        self._progress = trio.Event()  # set (and replaced) whenever the client sent something
        self._nursery: trio.Nursery | None = None
        self._receiving: trio.CancelScope | None = None
        self._idle_deadline = float("inf")
        self.peer = _peer(stream)

    async def refuse(self, reason: str) -> None:
        self.protocol.initiate()
        self.protocol.close(reason)
        with trio.move_on_after(GOODBYE_TIMEOUT_S):
            await self.flush()

    async def run(self) -> None:
        self.protocol.initiate()
        cancelled = True
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await self.flush()
                await self._receive_loop(nursery)
                nursery.cancel_scope.cancel()  # the client is gone: its calls end
            cancelled = False
        finally:
            if cancelled:
                await self._goodbye()

    async def _receive_loop(self, nursery: trio.Nursery) -> None:
        # A new connection has REQUEST_TIMEOUT_S to open a call; one with no
        # call open, IDLE_TIMEOUT_S since its last call ended.
        self._idle_deadline = trio.current_time() + REQUEST_TIMEOUT_S
        while not self.protocol.closed:
            with trio.CancelScope(deadline=self._idle_deadline) as self._receiving:
                try:
                    data = await self.stream.receive_some(_RECEIVE_BYTES)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
            if self._receiving.cancelled_caught:
                self.protocol.close("idle for too long")
                await self.flush()
                return
            if not data:
                return
            for event in self.protocol.receive(data):
                if isinstance(event, CallStarted):
                    self._start(nursery, event)
                elif isinstance(event, MessageReceived):
                    self._message(event)
                elif isinstance(event, RequestEnded):
                    state = self.calls.get(event.stream_id)
                    if state is not None:
                        state.request_done.set()
                elif isinstance(event, CallCancelled):
                    self._cancelled(event.stream_id)
                elif isinstance(event, ConnectionEnded):
                    level = logging.INFO if event.error else logging.DEBUG
                    logger.log(level, "gRPC connection from %s: %s", self.peer, event.reason)
            self._progress.set()
            self._progress = trio.Event()
            await self.flush()

    def _set_idle(self) -> None:
        """Time the connection out from now if it has no call, never while it has one."""
        self._idle_deadline = (
            trio.current_time() + IDLE_TIMEOUT_S if not self.calls else float("inf")
        )
        if self._receiving is not None:
            self._receiving.deadline = self._idle_deadline

    def _start(self, nursery: trio.Nursery, event: CallStarted) -> None:
        handler = self.methods.get(event.method)
        if handler is None:
            known = ", ".join(sorted(m.rsplit("/", 1)[-1] for m in self.methods))
            self.protocol.end_call(
                event.stream_id,
                RpcStatus.UNIMPLEMENTED,
                f"no method {event.method}; this server has {known}",
            )
            return
        scope = trio.CancelScope()
        if event.timeout_s is not None:
            scope.deadline = trio.current_time() + event.timeout_s
        state = _CallState(Call(self, event.stream_id, event.method), scope)
        self.calls[event.stream_id] = state
        self._set_idle()
        nursery.start_soon(self._run_call, handler, event.stream_id, state)

    def _message(self, event: MessageReceived) -> None:
        state = self.calls.get(event.stream_id)
        if state is None:
            return
        state.messages += 1
        if state.messages > 1:
            # Unary and server-streaming calls take one request message.
            self.protocol.end_call(
                event.stream_id, RpcStatus.INTERNAL, "a request of this method has one message"
            )
            self._cancelled(event.stream_id, "ended")
            return
        state.call.request = event.message

    def _cancelled(self, stream_id: int, why: str = "cancelled") -> None:
        state = self.calls.get(stream_id)
        if state is not None:
            state.ended = why
            state.scope.cancel()

    async def _run_call(self, handler: Handler, stream_id: int, state: _CallState) -> None:
        status, message = RpcStatus.OK, ""
        with state.scope:
            try:
                with trio.move_on_after(REQUEST_TIMEOUT_S) as waiting:
                    await state.request_done.wait()
                if waiting.cancelled_caught:
                    status = RpcStatus.DEADLINE_EXCEEDED
                    message = f"the request did not arrive whole within {REQUEST_TIMEOUT_S:g} s"
                elif state.messages == 0:
                    status, message = RpcStatus.INTERNAL, "the request has no message"
                else:
                    await handler(state.call)
            except RpcError as exc:
                status, message = exc.status, exc.message
            except Exception:
                logger.exception("gRPC %s: internal error", state.call.method)
                status, message = RpcStatus.INTERNAL, "internal error; the broker's log says more"
        del self.calls[stream_id]
        self._set_idle()
        if state.ended is not None:
            return  # reset by the client, or answered by the protocol already
        if state.scope.cancelled_caught:
            status, message = RpcStatus.DEADLINE_EXCEEDED, "the call's deadline passed"
        self.protocol.end_call(stream_id, status, message)
        await self.flush()

    async def send_message(self, stream_id: int, message: bytes) -> None:
        self.protocol.send_message(stream_id, message)
        await self.flush()
        while self.protocol.pending(stream_id):
            await self._progress.wait()  # the client's next frames may open its window

    async def flush(self) -> None:
        """Send what the protocol has to send; a client that does not take
        it within :data:`SEND_TIMEOUT_S` (or is gone) loses the connection."""
        async with self._send_lock:
            data = self.protocol.data_to_send()
            if not data:
                return
            try:
                with trio.fail_after(SEND_TIMEOUT_S):
                    await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
                if self._nursery is not None:
                    self._nursery.cancel_scope.cancel()  # its calls and the receive loop end

    async def _goodbye(self) -> None:
        # Shielded: this runs because the server is cancelled (draining).
        with trio.CancelScope(shield=True), trio.move_on_after(GOODBYE_TIMEOUT_S):
            for stream_id in self.protocol.calls:
                self.protocol.end_call(
                    stream_id, RpcStatus.UNAVAILABLE, "the broker is shutting down"
                )
            self.protocol.close("the broker is shutting down")
            await self.flush()


def _local_host(stream: trio.abc.Stream) -> str:
    if isinstance(stream, trio.SocketStream):
        try:
            host = stream.socket.getsockname()[0]
        except OSError:
            return ""
        # An IPv4 client of an IPv6 socket: the IPv4 address.
        return str(host).removeprefix("::ffff:")
    return ""


def _peer(stream: trio.abc.Stream) -> str:
    if isinstance(stream, trio.SocketStream) and is_ip_socket(stream.socket):
        try:
            host, port, *_ = stream.socket.getpeername()
        except OSError:
            return "a client"
        return f"{host}:{port}"
    return "a client"


__all__ = [
    "GOODBYE_TIMEOUT_S",
    "IDLE_TIMEOUT_S",
    "MAX_CONCURRENT_STREAMS",
    "MAX_CONNECTIONS",
    "MAX_REQUEST_BYTES",
    "REQUEST_TIMEOUT_S",
    "SEND_TIMEOUT_S",
    "Call",
    "Handler",
    "serve_grpc",
]
