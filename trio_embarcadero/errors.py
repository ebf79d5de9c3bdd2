"""The one exception hierarchy of trio-embarcadero, and the wire error codes.

Low-level failures (``OSError``, trio's stream errors, struct/numpy errors) are
translated into these classes once, at the I/O boundary that sees them; code
above that boundary only ever catches :class:`EmbarcaderoError` subclasses.
"""

from __future__ import annotations

import enum
import errno as _errno
import os


class ErrorCode(enum.IntEnum):
    """Codes carried by an error frame (wire protocol section 4)."""

    BAD_HANDSHAKE = 1
    BAD_BATCH_HEADER = 2
    BAD_MESSAGE_RECORDS = 3
    LOG_FULL = 4
    SHUTTING_DOWN = 5
    NOT_ALLOWED = 6
    TIMEOUT = 7
    STORAGE_FAILURE = 8
    #: A publish session's batch waited too long for another connection's
    #: copy of its batch_seq (or a duplicate for its stored copy's ack level).
    SESSION_BUSY = 9
    #: A batch of an order-5 topic that the sequencer went past (it stayed
    #: in flight for the hole timeout while a later batch of its stream was
    #: committed): it gets no place in the total order and is not acked.
    NOT_ORDERED = 10


#: The code a client reports when the broker closed the connection without an
#: error frame (the broker failed); never sent on the wire.
BROKER_FAILED = 0


class EmbarcaderoError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(EmbarcaderoError):
    """The configuration is invalid.

    Attributes:
        problems: One line per problem, each ending with the ``$.section.key``
            path it concerns, so a user can fix them all in one go.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in self.problems))


class ProtocolError(EmbarcaderoError):
    """A peer broke the wire protocol; the connection is closed with ``code``.

    Attributes:
        code: The error code sent to the peer in an error frame.
    """

    def __init__(self, code: ErrorCode, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code.name.lower()}: {message}")


class ConnectionLost(EmbarcaderoError):
    """The peer went away (EOF, reset or a local close) before a frame was whole.

    Attributes:
        received: Bytes of the unfinished frame that had arrived.
    """

    def __init__(self, message: str, received: int = 0) -> None:
        self.received = received
        super().__init__(message)


class LogFullError(EmbarcaderoError):
    """The CXL log cannot take a batch right now.

    Attributes:
        transient: True when space may come back without intervention (the
            stream's in-flight window is full); False when the region itself
            has no free segment left.
    """

    def __init__(self, message: str, *, transient: bool) -> None:
        self.transient = transient
        super().__init__(message)


class LayoutError(EmbarcaderoError):
    """An existing CXL file has another layout or size than the config asks for,
    or the log's contents contradict themselves (another process wrote them)."""


class SequencerDeposed(EmbarcaderoError):
    """This process's sequencer lease is stale: another broker took the
    sequencer over (a newer epoch), so this one writes nothing more to the
    order. Raised under the region's lock, before any store."""


class TopicBusyError(EmbarcaderoError):
    """A topic cannot be deleted now: publishers are attached to it."""


class TopicExistsError(EmbarcaderoError):
    """A topic to be created exists already; nothing was changed."""


class StartupError(EmbarcaderoError):
    """The broker refuses to start; the message says why and how to go on
    (the command line prints it as it is)."""


class AlreadyServedError(StartupError):
    """Another live broker process serves this broker id on this CXL region or disk log.

    Attributes:
        path: The CXL file or disk log directory.
        broker_id: The broker id that is taken.
        pid: The process that holds it, None when it could not be read.
    """

    def __init__(self, path: str, broker_id: int, pid: int | None, hint: str) -> None:
        self.path = path
        self.broker_id = broker_id
        self.pid = pid
        who = f"pid {pid}" if pid is not None else "another process (pid unknown)"
        super().__init__(f"{path} broker {broker_id} is already served by {who}: {hint}")


class UnsafeFileError(StartupError):
    """A file the broker would use is a symbolic link or belongs to another user."""


class ListenError(StartupError):
    """A listener could not be bound.

    Attributes:
        host: The address asked for.
        port: The port asked for.
        errno: The ``OSError``'s errno (negative for a name resolution error).
    """

    def __init__(self, host: str, port: int, error: OSError, what: str = "") -> None:
        self.host = host
        self.port = port
        self.errno = error.errno
        reason = error.strerror or str(error)
        address = f"[{host}]" if ":" in host else host
        super().__init__(
            f"cannot listen on {address}:{port}: {reason[:1].lower()}{reason[1:]}"
            + (f" ({what})" if what else "")
        )


class ClusterError(EmbarcaderoError):
    """A cluster of broker processes could not go on: a broker kept failing at
    start-up and was given up (the others were drained and stopped).

    Attributes:
        broker_id: The broker given up.
        statuses: Its exit statuses, oldest first (negative: killed by that signal).
    """

    def __init__(self, broker_id: int, statuses: list[int], message: str) -> None:
        self.broker_id = broker_id
        self.statuses = list(statuses)
        super().__init__(message)


class StorageError(EmbarcaderoError):
    """The disk log behind ack level 2 could not be written or synced.

    A running broker that meets one stops gracefully (its waiting ack-2
    publishers get error 8) and :func:`~trio_embarcadero.serve` /
    :func:`~trio_embarcadero.open_broker` raise it afterwards.

    Attributes:
        operation: What failed: ``"create"``, ``"write"``, ``"fdatasync"``,
            ``"fsync directory"`` or ``"read"`` (a subscriber served from disk).
        path: The file (or directory) it failed on.
        errno: The ``OSError``'s errno (0 when it had none).
    """

    def __init__(self, operation: str, path: str, errno: int | None) -> None:
        self.operation = operation
        self.path = path
        self.errno = errno or 0
        super().__init__(f"disk log {path}: {operation} failed: {self.reason}")

    @property
    def reason(self) -> str:
        """The errno's symbol and text, e.g. ``EIO (Input/output error)``."""
        name = _errno.errorcode.get(self.errno, f"errno {self.errno}")
        return f"{name} ({os.strerror(self.errno)})"


class BrokerError(EmbarcaderoError):
    """The broker told a client about a failure with an error frame.

    Attributes:
        code: The error frame's code (an :class:`ErrorCode` when known), or
            :data:`BROKER_FAILED` when the connection ended without one.
        message: The error frame's text.
        acked: For a publisher, the last cumulative ack count received
            before the error; None for a subscriber, which has no acks.
    """

    def __init__(self, code: int, message: str, acked: int | None = None) -> None:
        self.code = code
        self.message = message
        self.acked = acked
        if code == BROKER_FAILED:
            name = "broker_failed"
        else:
            try:
                name = ErrorCode(code).name.lower()
            except ValueError:
                name = f"error {code}"
        suffix = "" if acked is None else f" (acked {acked})"
        super().__init__(f"broker error {name}: {message}{suffix}")


class NoBrokerError(BrokerError):
    """A client went on without any broker for longer than it was told to wait.

    Raised by a publisher after ``delivery_timeout_s`` (by a subscriber after
    ``reconnect_timeout_s``) in which it reached none of its brokers. Its
    ``code`` and the end of its ``message`` are those of the last failure.

    Attributes:
        brokers: The brokers it tried (``host:port``), in the order given.
        timeout: The time it waited, in seconds.
    """

    def __init__(
        self,
        code: int,
        message: str,
        acked: int | None = None,
        *,
        brokers: tuple[str, ...] = (),
        timeout: float = 0.0,
    ) -> None:
        self.brokers = brokers
        self.timeout = timeout
        super().__init__(code, message, acked)


class AdminApiError(EmbarcaderoError):
    """A broker's admin API (HTTP) refused a request, or gave no answer.

    Attributes:
        status: The HTTP status of the answer, or 0 when there was none.
        message: What the broker (or the connection) said.
    """

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message
        super().__init__(f"HTTP {status}: {message}" if status else message)


class RpcStatus(enum.IntEnum):
    """The status codes of gRPC (sent as a call's ``grpc-status`` trailer)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class RpcError(EmbarcaderoError):
    """A gRPC call ends with this status (raised by the broker's gRPC handlers).

    Attributes:
        status: The call's status.
        message: What the client is told (its ``grpc-message``).
    """

    def __init__(self, status: RpcStatus, message: str) -> None:
        self.status = status
        self.message = message
        super().__init__(f"{status.name}: {message}")
