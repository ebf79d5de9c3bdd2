"""The shell every session runs in: a connection's stream, phase and stop signal.

A publish connection moves through::

    INIT -> WAIT_HEADER -> WAIT_PAYLOAD -> WAIT_CXL -> COMPLETE -> WAIT_HEADER ...
                 ^  PAUSED (held at the gate by the pool monitor)
    ... -> DRAINING (EOF, error or shutdown: waiting for its batches to commit)
        -> CLOSED

and a subscribe connection through ``INIT -> SUBSCRIBED -> CLOSED``. The
sessions (:mod:`.publish`, :mod:`.subscribe`) set the phase; the broker
reads it for its statistics and asks for a graceful stop with
:meth:`Connection.request_stop`, which cuts short only the waits a session
marks as batch boundaries (:meth:`Connection.at_boundary`, or a scope the
session hands over with :meth:`Connection.scope_entered`).
"""

from __future__ import annotations

import enum

import trio

from ..transport import Receiver, Sender, receiver_for
from ..wire import Handshake
from .scopes import TrackedScope


class ConnectionPhase(enum.Enum):
    """Where a connection task is (see the module docstring)."""

    INIT = "init"
    WAIT_HEADER = "wait_header"
    PAUSED = "paused"
    WAIT_PAYLOAD = "wait_payload"
    WAIT_CXL = "wait_cxl"
    COMPLETE = "complete"
    SUBSCRIBED = "subscribed"
    DRAINING = "draining"
    CLOSED = "closed"


class Connection:
    """One accepted connection, whichever session it turns out to be.

    Attributes:
        id: Broker-unique connection number (for logs).
        peer: ``"host:port"`` of the peer, or ``"memory"``.
        peer_host: The peer's address (None for in-memory streams).
        stream: The byte stream; the broker closes it when the task ends.
        receiver: Receives into caller buffers (``recv_into`` on sockets).
        phase: The current :class:`ConnectionPhase`.
        handshake: The parsed handshake, once received.
    """

    def __init__(
        self, stream: trio.abc.Stream, conn_id: int, peer: tuple[str, int] | None = None
    ) -> None:
        self.stream = stream
        self.id = conn_id
        self.peer_host: str | None = None
        self.peer = "memory"
        if peer is not None:
            self.peer_host = peer[0]
            self.peer = f"{peer[0]}:{peer[1]}"
        self.phase = ConnectionPhase.INIT
        self.handshake: Handshake | None = None
        self.receiver: Receiver = receiver_for(stream)
        self._sender = Sender(stream)
        self._boundary_scope: trio.CancelScope | None = None
        self._stopping = False

    async def send_frame(self, data: bytes | memoryview) -> None:
        """Write one whole frame to the peer.

        Raises:
            ConnectionLost: The peer is gone.
        """
        await self._sender.send_all(data)

    def send_frame_nowait(self, data: bytes) -> bool:
        """Write one small frame now if the socket takes it at once (see
        :meth:`~trio_embarcadero.transport.Sender.send_nowait`); False: it
        is :meth:`send_frame`'s to write."""
        return self._sender.send_nowait(data)

    @property
    def stopping(self) -> bool:
        """Whether a graceful shutdown asked this connection to stop."""
        return self._stopping

    def request_stop(self) -> None:
        """Stop at the next batch boundary (graceful shutdown)."""
        self._stopping = True
        if self._boundary_scope is not None:
            self._boundary_scope.cancel()

    def at_boundary(self) -> TrackedScope:
        """A scope around waits that hold no work; :meth:`request_stop` cancels it."""
        return TrackedScope(self)

    def scope_entered(self, scope: trio.CancelScope) -> None:
        """As a :class:`~.scopes.ScopeTracker`: ``scope`` is around a wait at
        a batch boundary, which :meth:`request_stop` cancels."""
        if self._stopping:
            scope.cancel()
        self._boundary_scope = scope

    def scope_exited(self, scope: trio.CancelScope) -> None:
        """As a :class:`~.scopes.ScopeTracker`: the wait is over."""
        self._boundary_scope = None
