"""The server side of gRPC over HTTP/2, without I/O.

:class:`ServerConnection` turns the bytes a gRPC client sends on one
connection into events (a call starts, its request message arrives, the
client is done sending, the client cancelled) and the broker's answers
(response messages, a final status) into bytes to send. HTTP/2 itself
(framing, HPACK, flow control, settings, pings) is the ``h2`` library's,
sans-IO like ``h11`` for the HTTP endpoint; this module adds gRPC's part
on top of it:

* a call is a stream whose request is ``POST /<package.Service>/<Method>``
  with ``content-type: application/grpc``; another method gets HTTP 405,
  another content type HTTP 415, as gRPC's HTTP/2 protocol asks;
* messages are length-prefixed: a flag byte (compressed or not) and a
  4-byte big-endian length before each message; a request message larger
  than ``max_request_bytes`` ends its call with ``RESOURCE_EXHAUSTED``, a
  compressed one with ``UNIMPLEMENTED`` (the broker offers no compression),
  and a request that ends inside a message with ``INTERNAL``;
* the answer is response headers (``:status 200``, the content type), the
  response messages, then trailers with ``grpc-status`` and
  ``grpc-message`` (percent-encoded); a call that ends before any message
  gets the "trailers-only" form, one HEADERS frame with both;
* ``grpc-timeout`` is read into seconds for the I/O layer to enforce.

Data is sent as the peer's flow-control windows allow; what does not fit
waits per stream (:meth:`ServerConnection.pending`) and goes out as windows
open, the call's trailers after it. A client that breaks HTTP/2 costs its
connection only: the events end with :class:`ConnectionEnded` and a GOAWAY
is queued; a client that breaks gRPC costs only that call.

The I/O layer (:mod:`.grpc`) feeds :meth:`ServerConnection.receive` and
sends :meth:`ServerConnection.data_to_send`.
"""

from __future__ import annotations

import struct
from typing import Final

import attrs
import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from ..errors import RpcStatus

#: The content type of gRPC (a suffix such as ``+proto`` may follow).
CONTENT_TYPE: Final = b"application/grpc"
#: A message's prefix: the compressed flag and the length.
MESSAGE_PREFIX: Final = struct.Struct(">BI")

_TIMEOUT_UNITS: Final = {
    b"H": 3600.0,
    b"M": 60.0,
    b"S": 1.0,
    b"m": 1e-3,
    b"u": 1e-6,
    b"n": 1e-9,
}


@attrs.frozen
class CallStarted:
    """A client began a call.

    Attributes:
        stream_id: The call's HTTP/2 stream.
        method: The request's path, ``/<package.Service>/<Method>``.
        timeout_s: The client's deadline from now (``grpc-timeout``), or None.
    """

    stream_id: int
    method: str
    timeout_s: float | None


@attrs.frozen
class MessageReceived:
    """A whole request message arrived.

    Attributes:
        stream_id: The call's stream.
        message: The message's bytes (a serialized protobuf).
    """

    stream_id: int
    message: bytes


@attrs.frozen
class RequestEnded:
    """The client is done sending on a call (it half-closed the stream).

    Attributes:
        stream_id: The call's stream.
    """

    stream_id: int


@attrs.frozen
class CallCancelled:
    """A call is over before it was answered: the client reset its stream,
    or it broke gRPC and was answered here already.

    Attributes:
        stream_id: The call's stream.
    """

    stream_id: int


@attrs.frozen
class ConnectionEnded:
    """The connection is over: the client sent GOAWAY or broke HTTP/2 (then a
    GOAWAY saying why is queued to send).

    Attributes:
        reason: Why, for the log.
        error: Whether the client broke the protocol.
    """

    reason: str
    error: bool


Event = CallStarted | MessageReceived | RequestEnded | CallCancelled | ConnectionEnded


def parse_timeout(value: bytes) -> float:
    """A ``grpc-timeout`` header's value (e.g. ``b"100m"``) in seconds.

    Raises:
        ValueError: It is not 1-8 digits and a unit (H, M, S, m, u, n).
    """
    digits, unit = value[:-1], value[-1:]
    if not 1 <= len(digits) <= 8 or not digits.isdigit() or unit not in _TIMEOUT_UNITS:
        raise ValueError(f"grpc-timeout {value!r} is not 1-8 digits and one of H M S m u n")
    return int(digits) * _TIMEOUT_UNITS[unit]


def encode_grpc_message(text: str) -> bytes:
    """``text`` as a ``grpc-message`` value: UTF-8, percent-encoding every byte
    outside printable ASCII and ``%`` itself."""
    out = bytearray()
    for byte in text.encode("utf-8"):
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(byte)
        else:
            out += b"%%%02X" % byte
    return bytes(out)


@attrs.define
class _Call:
    """What the connection keeps of one call."""

    inbound: bytearray = attrs.field(factory=bytearray)
    #: Events were reported for it (the I/O layer runs it).
    started: bool = False
    #: Its response headers went out.
    headers_sent: bool = False
    #: Response bytes the peer's window has no room for yet.
    outbound: bytearray = attrs.field(factory=bytearray)
    #: Its final trailers, once given, sent after ``outbound``.
    trailers: list[tuple[bytes, bytes]] | None = None


class ServerConnection:
    """One HTTP/2 connection of a gRPC server, sans-IO.

    Args:
        max_request_bytes: The largest request message taken.
        max_concurrent_streams: Calls a client may have open at once
            (announced in the connection's settings).
    """

    def __init__(self, *, max_request_bytes: int, max_concurrent_streams: int) -> None:
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self._h2 = h2.connection.H2Connection(config=config)
        self._h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: max_concurrent_streams,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 16 * 1024,
            },
        )
        self._max_request = max_request_bytes
        self._calls: dict[int, _Call] = {}
        self.closed = False

    @property
    def calls(self) -> list[int]:
        """The streams of the calls not ended yet."""
        return [sid for sid, call in self._calls.items() if call.trailers is None]

    def initiate(self) -> None:
        """Queue the server's connection preface (its settings)."""
        self._h2.initiate_connection()

    def data_to_send(self) -> bytes:
        """The bytes to send now (may be empty)."""
        return self._h2.data_to_send()

    def pending(self, stream_id: int) -> int:
        """Response bytes of a call that wait for the peer's window (0 once
        sent, or when the call is gone)."""
        call = self._calls.get(stream_id)
        return len(call.outbound) if call is not None else 0

    # -- receiving -------------------------------------------------------------------

    def receive(self, data: bytes | bytearray) -> list[Event]:
        """Take bytes the client sent; return what they mean.

        A protocol error is not raised: it ends the list with a
        :class:`ConnectionEnded`, and a GOAWAY saying why is queued.
        """
        try:
            h2_events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self.closed = True
            return [ConnectionEnded(f"HTTP/2 protocol error: {exc}", error=True)]
        events: list[Event] = []
        for event in h2_events:
            events.extend(self._handle(event))
        self._flush_all()  # windows may have opened, settings changed
        return events

    def _handle(self, event: h2.events.Event) -> list[Event]:
        if isinstance(event, h2.events.RequestReceived):
            assert event.stream_id is not None
            assert event.headers is not None
            return self._request(event.stream_id, event.headers)
        if isinstance(event, h2.events.DataReceived):
            assert event.stream_id is not None
            assert event.data is not None
            self._h2.acknowledge_received_data(event.flow_controlled_length or 0, event.stream_id)
            return self._data(event.stream_id, event.data)
        if isinstance(event, h2.events.StreamEnded):
            assert event.stream_id is not None
            return self._request_ended(event.stream_id)
        if isinstance(event, h2.events.StreamReset):
            assert event.stream_id is not None
            call = self._calls.pop(event.stream_id, None)
            return [CallCancelled(event.stream_id)] if call is not None and call.started else []
        if isinstance(event, h2.events.ConnectionTerminated):
            self.closed = True
            code = event.error_code
            name = getattr(code, "name", code)
            return [ConnectionEnded(f"the client sent GOAWAY ({name})", error=False)]
        return []  # settings, pings (h2 answers them), priority, window updates

    def _request(self, stream_id: int, raw: list[tuple[bytes, bytes]]) -> list[Event]:
        headers = dict(raw)
        self._calls[stream_id] = _Call()
        if headers.get(b":method") != b"POST":
            self._refuse_http(stream_id, b"405")
            return []
        content_type = headers.get(b"content-type", b"")
        if not (content_type == CONTENT_TYPE or content_type.startswith(CONTENT_TYPE + b"+")):
            self._refuse_http(stream_id, b"415")
            return []
        timeout: float | None = None
        try:
            if b"grpc-timeout" in headers:
                timeout = parse_timeout(headers[b"grpc-timeout"])
        except ValueError as exc:
            self.end_call(stream_id, RpcStatus.INVALID_ARGUMENT, str(exc))
            return []
        encoding = headers.get(b"grpc-encoding", b"identity")
        if encoding != b"identity":
            self.end_call(
                stream_id,
                RpcStatus.UNIMPLEMENTED,
                f"grpc-encoding {encoding.decode('latin-1')!r} is not supported; "
                "send messages uncompressed",
                extra=[(b"grpc-accept-encoding", b"identity")],
            )
            return []
        self._calls[stream_id].started = True
        method = headers.get(b":path", b"").decode("utf-8", "replace")
        return [CallStarted(stream_id, method, timeout)]

    def _data(self, stream_id: int, data: bytes) -> list[Event]:
        call = self._calls.get(stream_id)
        if call is None or call.trailers is not None:
            return []  # a call answered already: the rest of its request is dropped
        call.inbound += data
        events: list[Event] = []
        while len(call.inbound) >= MESSAGE_PREFIX.size:
            compressed, size = MESSAGE_PREFIX.unpack_from(call.inbound)
            if size > self._max_request:
                return self._fail(
                    stream_id,
                    RpcStatus.RESOURCE_EXHAUSTED,
                    f"a request message has {size} bytes; this server takes "
                    f"{self._max_request} at most",
                )
            if compressed:
                return self._fail(
                    stream_id,
                    RpcStatus.UNIMPLEMENTED,
                    "a compressed message without a grpc-encoding; send messages uncompressed",
                )
            end = MESSAGE_PREFIX.size + size
            if len(call.inbound) < end:
                break
            events.append(
                MessageReceived(stream_id, bytes(call.inbound[MESSAGE_PREFIX.size : end]))
            )
            del call.inbound[:end]
        return events

    def _request_ended(self, stream_id: int) -> list[Event]:
        call = self._calls.get(stream_id)
        if call is None or call.trailers is not None:
            return []
        if call.inbound:
            return self._fail(
                stream_id,
                RpcStatus.INTERNAL,
                f"the request ended inside a message ({len(call.inbound)} bytes of it)",
            )
        return [RequestEnded(stream_id)]

    def _fail(self, stream_id: int, status: RpcStatus, message: str) -> list[Event]:
        self.end_call(stream_id, status, message)
        return [CallCancelled(stream_id)]

    def _refuse_http(self, stream_id: int, status: bytes) -> None:
        # Not a gRPC request: an HTTP status, as gRPC's HTTP/2 protocol asks.
        self._send_headers(stream_id, [(b":status", status)], end_stream=True)
        self._calls.pop(stream_id, None)

    # -- sending ---------------------------------------------------------------------

    def send_message(self, stream_id: int, message: bytes) -> None:
        """Queue a response message of a call (after its response headers, the
        first time); nothing when the call is gone."""
        call = self._calls.get(stream_id)
        if call is None or call.trailers is not None:
            return
        if not call.headers_sent:
            call.headers_sent = True
            self._send_headers(stream_id, [(b":status", b"200"), (b"content-type", CONTENT_TYPE)])
        call.outbound += MESSAGE_PREFIX.pack(0, len(message)) + message
        self._flush(stream_id, call)

    def end_call(
        self,
        stream_id: int,
        status: RpcStatus,
        message: str = "",
        *,
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        """Queue a call's final status (after the messages still waiting);
        nothing when it is gone or ended already.

        Args:
            stream_id: The call's stream.
            status: Its status.
            message: The ``grpc-message`` (none when empty).
            extra: More trailers.
        """
        call = self._calls.get(stream_id)
        if call is None or call.trailers is not None:
            return
        trailers = [(b"grpc-status", b"%d" % status)]
        if message:
            trailers.append((b"grpc-message", encode_grpc_message(message)))
        trailers += extra or []
        if not call.headers_sent:  # trailers-only: one HEADERS frame ends the call
            call.headers_sent = True
            head = [(b":status", b"200"), (b"content-type", CONTENT_TYPE)]
            call.trailers = head + trailers
        else:
            call.trailers = trailers
        self._flush(stream_id, call)

    def close(self, message: str = "") -> None:
        """Queue a GOAWAY (no error): the client opens no more calls here."""
        if self.closed:
            return
        self.closed = True
        self._h2.close_connection(additional_data=message.encode("utf-8")[:256] or None)

    def _send_headers(
        self, stream_id: int, headers: list[tuple[bytes, bytes]], *, end_stream: bool = False
    ) -> bool:
        try:
            self._h2.send_headers(stream_id, headers, end_stream=end_stream)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self._calls.pop(stream_id, None)  # reset by the client meanwhile
            return False
        return True

    def _flush_all(self) -> None:
        for stream_id, call in list(self._calls.items()):
            if call.outbound or call.trailers is not None:
                self._flush(stream_id, call)

    def _flush(self, stream_id: int, call: _Call) -> None:
        """Send what the windows allow of a call's bytes, then its trailers."""
        try:
            while call.outbound:
                room = min(
                    self._h2.local_flow_control_window(stream_id), self._h2.max_outbound_frame_size
                )
                if room <= 0:
                    return  # the rest when the client opens its window
                self._h2.send_data(stream_id, bytes(call.outbound[:room]))
                del call.outbound[:room]
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self._calls.pop(stream_id, None)
            return
        if call.trailers is not None and self._send_headers(
            stream_id, call.trailers, end_stream=True
        ):
            self._calls.pop(stream_id, None)


__all__ = [
    "CONTENT_TYPE",
    "MESSAGE_PREFIX",
    "CallCancelled",
    "CallStarted",
    "ConnectionEnded",
    "Event",
    "MessageReceived",
    "RequestEnded",
    "ServerConnection",
    "encode_grpc_message",
    "parse_timeout",
]
