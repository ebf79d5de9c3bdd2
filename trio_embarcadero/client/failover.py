"""What publishers and subscribers share to survive a broker's failure: the
brokers they know, how they dial them, and how long they wait between tries.

Both clients take ``host, port`` or ``brokers=[...]``; :func:`endpoints` turns
either into :class:`Endpoint` objects. A broker is a ``(host, port)`` pair or
an async function that opens a stream to it (a Unix socket, TLS, an
in-memory stream to a broker in the same process). :class:`Backoff` spaces
out the reconnects to a broker that is down: exponential, with jitter, so
that the clients of a restarted broker do not all knock at the same instant.

A failure is worth another broker (or the same one later) when the broker
went away or is going: the connection ended without an error frame (EOF,
reset), a connect was refused, or error 5 (shutting down); and in a publish
session error 9 (a batch that waited in vain for another connection's copy
of it). Every other error frame is about the client or its data and would
fail anywhere (:func:`fails_over`).
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeAlias

import attrs
import trio

from ..errors import BROKER_FAILED, ConnectionLost, ErrorCode
from .connect import connect

#: An async function that opens a stream to a broker; it raises
#: :class:`~trio_embarcadero.errors.ConnectionLost` (or ``OSError``) when the
#: broker cannot be reached.
Dialer: TypeAlias = Callable[[], Awaitable[trio.abc.Stream]]
#: A broker as the clients take it: ``(host, port)`` or a :data:`Dialer`.
BrokerAddress: TypeAlias = tuple[str, int] | Dialer

#: Default seconds a client goes on without any broker before it gives up.
DEFAULT_FAILOVER_TIMEOUT = 60.0
#: First pause before dialling a broker again, and the longest pause (seconds).
BACKOFF_INITIAL = 0.05
BACKOFF_MAX = 1.0


@attrs.frozen
class Endpoint:
    """One broker a client may connect to.

    Attributes:
        name: ``host:port``, or the dialer's name; error messages use it.
        dial: Opens a new stream to the broker.
    """

    name: str
    dial: Dialer

    async def open(self) -> trio.abc.Stream:
        """A new stream to the broker.

        Raises:
            ConnectionLost: It cannot be reached (an ``OSError`` of a dialer
                becomes one).
        """
        try:
            return await self.dial()
        except OSError as exc:
            raise ConnectionLost(f"cannot connect to a broker at {self.name}: {exc}") from exc


def endpoints(host: str, port: int, brokers: Sequence[BrokerAddress] | None) -> list[Endpoint]:
    """The brokers a client was given, as endpoints, in the order given.

    Args:
        host: One broker's address ("" when ``brokers`` is given).
        port: Its data port (0 when ``brokers`` is given).
        brokers: Several brokers: ``(host, port)`` pairs or dialers.

    Raises:
        ValueError: Neither or both forms, an empty list, a port that is not
            a TCP port, or a broker listed twice.
    """
    if brokers is None:
        if not host or not port:
            raise ValueError("give a broker's host and port, or brokers=[(host, port), ...]")
        brokers = [(host, port)]
    elif host or port:
        raise ValueError("give either host and port or brokers=[...], not both")
    if not brokers:
        raise ValueError("brokers is empty: give at least one (host, port)")
    out: list[Endpoint] = []
    for broker in brokers:
        if callable(broker):
            out.append(Endpoint(getattr(broker, "__qualname__", repr(broker)), broker))
            continue
        broker_host, broker_port = broker
        if not isinstance(broker_port, int) or not 0 < broker_port <= 0xFFFF:
            raise ValueError(f"broker {broker!r}: the port must be 1..65535")
        name = (
            f"[{broker_host}]:{broker_port}"
            if ":" in broker_host
            else f"{broker_host}:{broker_port}"
        )
        if any(e.name == name for e in out):
            raise ValueError(f"broker {name} is listed twice")
        out.append(Endpoint(name, _tcp_dialer(broker_host, broker_port)))
    return out


def _tcp_dialer(host: str, port: int) -> Dialer:
    async def dial() -> trio.abc.Stream:
        return await connect(host, port)

    return dial


def fails_over(code: int) -> bool:
    """Whether a failure with this code (an error frame's, or
    :data:`~trio_embarcadero.errors.BROKER_FAILED`) is one another broker, or
    the same one later, may not have."""
    # 9: a session's batch waited in vain for another connection's copy of
    # it; 10: the sequencer went past a batch (never ordered). Nothing of
    # either is stored in the order: sent again, it may succeed.
    return code in (
        BROKER_FAILED,
        ErrorCode.SHUTTING_DOWN,
        ErrorCode.SESSION_BUSY,
        ErrorCode.NOT_ORDERED,
    )


def check_timeout(name: str, seconds: float) -> float:
    """``seconds`` if it is a finite number >= 0.

    Raises:
        ValueError: It is not.
    """
    if not (seconds >= 0 and seconds < float("inf")):
        raise ValueError(f"{name} must be a finite number of seconds >= 0, not {seconds}")
    return float(seconds)


class Backoff:
    """Pauses between the tries to reach a broker: exponential with jitter.

    The n-th pause is drawn uniformly from the upper half of
    ``min(initial * 2**n, maximum)``: it grows fast to the cap, and clients
    that lost the same broker at the same instant spread their retries over
    half the interval instead of meeting in the same millisecond.

    Args:
        initial: The first pause's upper bound (seconds).
        maximum: The longest pause.
        rng: Where the jitter comes from (tests pass a seeded one).
    """

    def __init__(
        self,
        initial: float = BACKOFF_INITIAL,
        maximum: float = BACKOFF_MAX,
        rng: random.Random | None = None,
    ) -> None:
        self._initial = initial
        self._maximum = maximum
        self._rng = rng if rng is not None else random.Random()
        self._ceiling = initial

    def next_delay(self) -> float:
        """The pause before the next try; each call doubles the next ceiling."""
        ceiling = self._ceiling
        self._ceiling = min(ceiling * 2, self._maximum)
        return ceiling / 2 + self._rng.uniform(0, ceiling / 2)

    def reset(self) -> None:
        """Start over from ``initial`` (the broker was reached)."""
        self._ceiling = self._initial


async def connect_first(links: Sequence[Endpoint]) -> tuple[int, trio.abc.Stream]:
    """Open a stream to the first broker of ``links`` that can be reached,
    trying each once, in order; its index and the stream.

    Raises:
        ConnectionLost: None can be reached (one broker: its error; several:
            every broker's).
    """
    problems: list[ConnectionLost] = []
    for index, endpoint in enumerate(links):
        try:
            return index, await endpoint.open()
        except ConnectionLost as exc:
            problems.append(exc)
    if len(problems) == 1:
        raise problems[0]
    raise ConnectionLost(
        "cannot connect to any broker: " + "; ".join(str(problem) for problem in problems)
    ) from problems[-1]
