"""The per-connection task: read the handshake, run the session it asks for.

Every way a connection can end is handled here: protocol violations get an
error frame and a close, timeouts get error 7, a vanished peer is logged.
None of them reach the broker's nursery.
"""

from __future__ import annotations

import logging

import trio

from ..errors import ConnectionLost, ErrorCode, ProtocolError
from ..transport import receive_exactly
from ..wire import HANDSHAKE_SIZE, ClientRequest, Handshake, encode_error_frame, parse_handshake
from .connection import Connection, ConnectionPhase
from .publish import IngestPath, PublishSession
from .statistics import error_frame_log_level
from .subscribe import serve_subscriber

logger = logging.getLogger(__name__)


async def serve_connection(connection: Connection, ingest: IngestPath) -> None:
    """Serve one connection until it ends; never raises for peer faults.

    The caller closes the stream afterwards.
    """
    try:
        handshake = connection.handshake = await _receive_handshake(connection, ingest)
        if handshake.request in (ClientRequest.SUBSCRIBE, ClientRequest.SUBSCRIBE_ORDERED):
            connection.phase = ConnectionPhase.SUBSCRIBED
            await serve_subscriber(
                connection,
                handshake,
                ingest.log,
                ingest.commits,
                ingest.network.subscriber_send_timeout_s,
                ingest.durability.disk if ingest.durability is not None else None,
            )
        else:
            await PublishSession(connection, handshake, ingest).run()
    except ConnectionLost as exc:
        logger.info("conn %d %s: %s", connection.id, connection.peer, exc)
    except ProtocolError as exc:
        await _refuse(connection, exc, ingest)
    finally:
        connection.phase = ConnectionPhase.CLOSED


async def _receive_handshake(connection: Connection, ingest: IngestPath) -> Handshake:
    timeout = ingest.network.handshake_timeout_s
    buf = bytearray(HANDSHAKE_SIZE)
    try:
        with trio.fail_after(timeout):
            await receive_exactly(connection.receiver, memoryview(buf))
    except trio.TooSlowError:
        raise ProtocolError(ErrorCode.TIMEOUT, f"no handshake within {timeout} s") from None
    except ConnectionLost as exc:
        if exc.received == 0:
            raise
        raise ProtocolError(
            ErrorCode.BAD_HANDSHAKE, f"short handshake: {exc.received} of {HANDSHAKE_SIZE} bytes"
        ) from None
    return parse_handshake(buf)


async def _refuse(connection: Connection, error: ProtocolError, ingest: IngestPath) -> None:
    ingest.counters.count_error(error.code)
    logger.log(
        error_frame_log_level(error.code),
        "conn %d %s closed: %s",
        connection.id,
        connection.peer,
        error,
    )
    with trio.move_on_after(ingest.network.ack_connect_timeout_s) as scope:
        scope.shield = True
        try:
            await connection.send_frame(encode_error_frame(error.code, error.message))
        except ConnectionLost:
            pass
