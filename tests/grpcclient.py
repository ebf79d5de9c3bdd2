"""A gRPC client without I/O (``h2``'s client side), for tests of the broker's gRPC server.

It sends what a test asks for, also what no real client would (another
method or content type, a compressed flag, a message cut short), and keeps
what each stream got back: response headers, messages, trailers, a reset.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import attrs
import h2.config
import h2.connection
import h2.events
import h2.settings
import trio

PREFIX = struct.Struct(">BI")


@attrs.define
class Reply:
    """What came back on one stream."""

    headers: dict[bytes, bytes] = attrs.field(factory=dict)
    messages: list[bytes] = attrs.field(factory=list)
    trailers: dict[bytes, bytes] = attrs.field(factory=dict)
    ended: bool = False
    reset: bool = False
    buffer: bytearray = attrs.field(factory=bytearray)

    @property
    def status(self) -> int | None:
        """The ``grpc-status`` (from the trailers, or a trailers-only answer)."""
        raw = self.trailers.get(b"grpc-status", self.headers.get(b"grpc-status"))
        return None if raw is None else int(raw)

    @property
    def message(self) -> str:
        raw = self.trailers.get(b"grpc-message", self.headers.get(b"grpc-message", b""))
        return raw.decode()


class GrpcTestClient:
    """One client connection, sans-IO.

    Args:
        window: The initial flow-control window it announces for each stream.
    """

    def __init__(self, window: int = 65535) -> None:
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.h2 = h2.connection.H2Connection(config=config)
        self.h2.local_settings = h2.settings.Settings(
            client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window}
        )
        self.h2.initiate_connection()
        self.replies: dict[int, Reply] = {}
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.auto_window = True

    def call(
        self,
        method: str,
        message: bytes | None = b"",
        *,
        timeout: bytes | None = None,
        content_type: bytes = b"application/grpc",
        http_method: bytes = b"POST",
        end: bool = True,
    ) -> int:
        """Open a call; send ``message`` (None: none) and half-close (``end``)."""
        stream_id = self.h2.get_next_available_stream_id()
        headers = [
            (b":method", http_method),
            (b":scheme", b"http"),
            (b":path", method.encode()),
            (b":authority", b"broker"),
            (b"content-type", content_type),
            (b"te", b"trailers"),
        ]
        if timeout is not None:
            headers.append((b"grpc-timeout", timeout))
        self.replies[stream_id] = Reply()
        self.h2.send_headers(stream_id, headers, end_stream=message is None and end)
        if message is not None:
            self.send(stream_id, PREFIX.pack(0, len(message)) + message, end=end)
        return stream_id

    def send(self, stream_id: int, data: bytes, *, end: bool = False) -> None:
        self.h2.send_data(stream_id, data, end_stream=end)

    def end(self, stream_id: int) -> None:
        self.h2.end_stream(stream_id)

    def data_to_send(self) -> bytes:
        return self.h2.data_to_send()

    def receive(self, data: bytes) -> None:
        for event in self.h2.receive_data(data):
            stream_id = getattr(event, "stream_id", None)
            reply = self.replies.get(stream_id) if stream_id else None
            if isinstance(event, h2.events.ResponseReceived) and reply is not None:
                reply.headers = dict(event.headers or [])
            elif isinstance(event, h2.events.DataReceived) and reply is not None:
                assert event.data is not None
                if self.auto_window:
                    self.h2.acknowledge_received_data(
                        event.flow_controlled_length or 0, event.stream_id
                    )
                reply.buffer += event.data
                while len(reply.buffer) >= PREFIX.size:
                    _, size = PREFIX.unpack_from(reply.buffer)
                    if len(reply.buffer) < PREFIX.size + size:
                        break
                    reply.messages.append(bytes(reply.buffer[PREFIX.size : PREFIX.size + size]))
                    del reply.buffer[: PREFIX.size + size]
            elif isinstance(event, h2.events.TrailersReceived) and reply is not None:
                reply.trailers = dict(event.headers or [])
            elif isinstance(event, h2.events.StreamEnded) and reply is not None:
                reply.ended = True
            elif isinstance(event, h2.events.StreamReset) and reply is not None:
                reply.reset = True
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.goaway = event


async def converse(
    stream: trio.abc.Stream, client: GrpcTestClient, done: Callable[[], bool]
) -> bool:
    """Send what ``client`` has to send and read what comes back until
    ``done()`` holds; False when the server closed the connection first."""
    while True:
        data = client.data_to_send()
        if data:
            await stream.send_all(data)
        if done():
            return True
        chunk = await stream.receive_some(65536)
        if not chunk:
            return False
        client.receive(chunk)
