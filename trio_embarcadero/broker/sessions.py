"""Publish sessions on the broker (``client_req = 2``, the wire protocol's section 4.5).

The region's session table (:mod:`trio_embarcadero.log.sessions`) knows which
batch_seqs of a session are stored, on any broker. Around a session
connection's publish path this module:

* checks at the handshake that no client with another token holds the
  session (error 6);
* admits every batch before its payload is read (:meth:`SessionLink.admit`):
  a new batch_seq is claimed and goes on as any batch, its claim riding on
  its reservation (the log core records where it is and settles it at the
  commit); a batch_seq another connection is writing waits for it, polling
  the table, at most ``network.batch_timeout_s`` (then error 9); a stored one
  is a duplicate; refusals become error frames;
* waits, for a duplicate, until its stored copy has reached the connection's
  ack level (:meth:`SessionLink.wait_acked`): ordered on an order-5 topic,
  synced to the disk log of the broker that stored it at ack level 2;
* keeps the sessions of open connections active in the table
  (:meth:`Sessions.run`), and marks the batches this broker stored durable
  once its disk log synced them.

The table's locks are taken on the event loop: they are held for a few
stores at a time, by any broker process.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import NoReturn

import attrs
import trio

from ..errors import ErrorCode, ProtocolError
from ..log.sessions import Admission, Claim, SessionKey, SessionTable, Verdict
from ..wire import BatchHeader
from .connection import Connection

logger = logging.getLogger(__name__)

#: How often a waiting batch looks at the table again (other broker
#: processes change it without telling this one).
POLL_S = 0.002


@attrs.frozen
class SessionStatistics:
    """What the broker counts of publish sessions.

    Attributes:
        sessions: Sessions in the region's table (every broker's; those that
            expired are counted until their entry is taken over).
        connections: Session connections open on this broker.
        duplicates: Batches acked here as duplicates, not stored again.
        duplicate_messages: Their messages.
        waits: Batches that waited for another connection's copy of their batch_seq.
        busy: Batches refused with error 9 after waiting in vain.
    """

    sessions: int
    connections: int
    duplicates: int
    duplicate_messages: int
    waits: int
    busy: int


class Sessions:
    """This broker's side of the region's session table.

    Args:
        table: The broker's handle on the table.
        wait_limit: The longest a batch waits for another copy or for its
            stored copy's ack level (``network.batch_timeout_s``).
        poll: How often such a wait looks at the table again.
    """

    def __init__(self, table: SessionTable, wait_limit: float, poll: float = POLL_S) -> None:
        self.table = table
        self.wait_limit = wait_limit
        self.poll = poll
        self._open: Counter[tuple[int, int]] = Counter()
        self._durable: list[tuple[int, int, int]] = []
        self.duplicates = 0
        self.duplicate_messages = 0
        self.waits = 0
        self.busy = 0

    def statistics(self) -> SessionStatistics:
        """A snapshot of the counters."""
        return SessionStatistics(
            sessions=self.table.live_sessions(),
            connections=sum(self._open.values()),
            duplicates=self.duplicates,
            duplicate_messages=self.duplicate_messages,
            waits=self.waits,
            busy=self.busy,
        )

    def opened(self, entry: int, token: int) -> None:
        """A connection of the session in ``entry`` is open here."""
        self._open[(entry, token)] += 1

    def closed(self, entry: int, token: int) -> None:
        """It closed."""
        self._open[(entry, token)] -= 1
        if not self._open[(entry, token)]:
            del self._open[(entry, token)]

    def stored_durable(self, claim: Claim) -> None:
        """A batch this broker stored is synced to its disk log (marked at
        the next :meth:`flush_durable`)."""
        self._durable.append((claim.entry, claim.token, claim.seq))

    def flush_durable(self) -> None:
        """Mark what the last sync made durable (one visit of the table)."""
        if self._durable:
            batches, self._durable = self._durable, []
            self.table.mark_durable(batches)

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> NoReturn:
        """Keep the sessions of open connections active, until cancelled: a
        session whose client only keeps its connection open is not forgotten."""
        task_status.started()
        while True:
            await trio.sleep(self.table.timeout_ns / 4e9)
            if self._open:
                self.table.touch(list(self._open))


class SessionLink:
    """One session connection's way to the table.

    Args:
        sessions: The broker's sessions.
        key: The session (client id, topic slot and incarnation, token); None
            until the topic exists.
        order5: Whether the topic has order 5 (a duplicate's ack waits for
            its copy's order).
        ack: The connection's ack level.
    """

    def __init__(self, sessions: Sessions, key: SessionKey | None, order5: bool, ack: int) -> None:
        self.sessions = sessions
        self.key = key
        self.order5 = order5
        self.ack = ack
        self.entry: int | None = None

    def opened(self, entry: int | None) -> None:
        """The connection is one of the session in ``entry`` (once)."""
        if self.entry is None and entry is not None and self.key is not None:
            self.entry = entry
            self.sessions.opened(entry, self.key.token)

    def close(self) -> None:
        """The connection is over."""
        if self.entry is not None and self.key is not None:
            self.sessions.closed(self.entry, self.key.token)
            self.entry = None

    async def admit(
        self,
        header: BatchHeader,
        connection: Connection,
        on_wait: Callable[[], None] | None = None,
    ) -> Admission:
        """Admit the batch whose header arrived: ``NEW`` (its claim to go on
        its reservation) or ``DUPLICATE``; waits while another connection
        writes the batch_seq, calling ``on_wait`` first.

        Raises:
            ProtocolError: The batch is refused (collision 6, window or
                skipped 2, no room 4, waited in vain 9), or the broker is
                shutting down meanwhile (5).
        """
        sessions = self.sessions
        key = self.key
        assert key is not None
        deadline = trio.current_time() + sessions.wait_limit
        waited = False
        while True:
            admission = sessions.table.admit(key, header.batch_seq)
            if admission.entry >= 0 and admission.verdict is not Verdict.COLLISION:
                self.opened(admission.entry)
            verdict = admission.verdict
            if verdict in (Verdict.NEW, Verdict.DUPLICATE):
                return admission
            if verdict is not Verdict.BUSY:
                raise ProtocolError(_CODES[verdict], admission.reason)
            if not waited:
                waited = True
                sessions.waits += 1
            if trio.current_time() >= deadline:
                sessions.busy += 1
                who = (
                    f"broker {admission.writer} is writing it"
                    if admission.writer >= 0
                    else admission.reason
                )
                raise ProtocolError(
                    ErrorCode.SESSION_BUSY,
                    f"batch_seq {header.batch_seq} of this session was not stored here: "
                    f"{who} and did not finish within {sessions.wait_limit} s; send it again",
                )
            if on_wait is not None:
                on_wait()
            await self._pause(connection, deadline, header.batch_seq)

    async def wait_acked(self, entry: int, seq: int, connection: Connection) -> None:
        """Return once the stored copy of duplicate ``seq`` has reached this
        connection's ack level.

        Raises:
            ProtocolError: Its batch_seq was skipped (2), the copy did not get
                there within the wait limit (9), or the broker is shutting
                down meanwhile (5).
        """
        sessions = self.sessions
        assert self.key is not None
        deadline = trio.current_time() + sessions.wait_limit
        while True:
            state = sessions.table.state(entry, self.key.token, seq)
            if state.skipped:
                raise ProtocolError(
                    ErrorCode.BAD_BATCH_HEADER,
                    f"batch_seq {seq} of this session was skipped by the sequencer (missing "
                    "for cxl.sequencer_hole_timeout_s while a later batch_seq waited for it): "
                    "it is never ordered",
                )
            missing = []
            if not state.known:
                missing.append("its session or batch_seq is no longer in the session table")
            else:
                if self.order5 and not state.ordered:
                    missing.append("it is not ordered yet")
                if self.ack == 2 and not state.durable:
                    missing.append(f"broker {state.writer} has not synced it to its disk log")
            if not missing:
                return
            if trio.current_time() >= deadline or not state.known:
                sessions.busy += 1
                raise ProtocolError(
                    ErrorCode.SESSION_BUSY,
                    f"batch_seq {seq} of this session is stored, but {' and '.join(missing)} "
                    f"after {sessions.wait_limit} s; send it again",
                )
            # Beside the receiving task, which may be at a batch boundary:
            # a plain sleep, and a look at the stop request after it.
            await self._pause(connection, deadline, seq, boundary=False)

    async def _pause(
        self, connection: Connection, deadline: float, seq: int, *, boundary: bool = True
    ) -> None:
        """Sleep one poll (not past ``deadline``); a graceful shutdown ends the
        wait (at once with ``boundary``: the receiving task's own wait)."""
        until = min(deadline, trio.current_time() + self.sessions.poll)
        if boundary:
            with connection.at_boundary():
                await trio.sleep_until(until)
        else:
            await trio.sleep_until(until)
        if connection.stopping:
            raise ProtocolError(
                ErrorCode.SHUTTING_DOWN,
                f"broker is shutting down (batch_seq {seq} of this session not acked here)",
            )


_CODES = {
    Verdict.COLLISION: ErrorCode.NOT_ALLOWED,
    Verdict.OUTSIDE: ErrorCode.BAD_BATCH_HEADER,
    Verdict.SKIPPED: ErrorCode.BAD_BATCH_HEADER,
    Verdict.FULL: ErrorCode.LOG_FULL,
}
