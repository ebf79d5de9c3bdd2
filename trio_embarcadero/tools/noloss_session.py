"""No-loss checker, session mode: a cluster, the Python client in sessions, every fault.

::

    python -m trio_embarcadero.tools.noloss --mode session --brokers 3 --seconds 60
        [--publishers 4] [--seed S] [--faults kill,head,stop,disconnect]
        [--lease-s 1.0] [--fault-every 2.0] [--rate 1000] [--json]

It runs ``--brokers`` broker processes (``serve --broker-id i``, each a
:class:`~.noloss_base.BrokerProcess` the checker kills and starts again
itself) on one private region under /dev/shm, with a topic of order 5: one
total order, made by the sequencer of whichever broker holds the lease in
the region. In this process run:

* ``--publishers`` publishers, each :func:`~trio_embarcadero.client.open_publisher`
  with every broker (``idempotent=True``: a publish session, acks at level 1)
  and a client id of its own; message ``i`` of client ``c`` has the payload
  :func:`~.noloss_base.payload` computes from ``(c, i)``. A publisher that
  raises is recorded with its error, and a new session (a new client id)
  takes its place;
* one ordered subscriber (``client_req 3``) per broker, starting there, that
  reads the whole run and fails over with the brokers.

Faults come on a seeded schedule (each broker fault once first, in a random
order, then drawn at random every ``--fault-every`` seconds or so; client
disconnects on a schedule of their own):

* ``kill``: SIGKILL of a broker that does not hold the sequencer lease, then
  a restart;
* ``head``: SIGKILL of the lease holder (the sequencer dies with it), then a
  restart; another broker takes the sequencer over;
* ``stop``: SIGSTOP of the lease holder (at a moment it holds neither the
  region's lock nor the session table's) for 1.5-2.5 lease times, then SIGCONT: another broker must
  have taken the lease over meanwhile, and the deposed one must write
  nothing into the total order (a write would show as a repeated or
  misplaced total order, or a message twice);
* ``disconnect``: a publisher's busiest connection is reset under it (the
  checker hands the client streams it can cut), so the client's failover
  resends on another connection.

At the end the faults stop, the publishers flush and close, the subscribers
read up to the end of the total order, every broker is stopped gracefully,
and the region's total order is read record by record. The checks:

* the total orders run from 0 without a gap or a repeat, and every record's
  ``total_order`` field is its place;
* every message is one a publisher accepted, byte for byte, and appears at
  most once (sessions promise it: 0 duplicates);
* per session, its messages appear in the order they were published, without
  a hole before a later one (per-session FIFO in the total order);
* every acknowledged message is in the total order (0 lost);
* every subscriber saw exactly the total order (a prefix of it, if it ended
  early: the report names it), with offsets counting from 0;
* no publisher raised (one that did is a failure, with its error), no broker
  logged an internal error or exited other than 0 at the stop, and every
  stop of the lease holder saw the lease taken over.

``--json`` prints the report as JSON, with a ``timeline``: each fault (and
each publisher that raised) with the second of the run it came at.

The exit status is 0 when every check holds, 1 when one fails, 2 when the
run itself could not be done.
"""

from __future__ import annotations

import argparse
import collections
import gc
import mmap
import os
import random
import signal
import socket
import struct
import sys
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar, NamedTuple

import attrs
import numpy as np
import trio

from ..client import Publisher, open_publisher, open_subscriber
from ..client.connect import connect
from ..client.failover import Dialer
from ..errors import BrokerError, ConnectionLost, ProtocolError
from ..log import open_log
from ..log.layout import read_geometry, read_topics
from ..log.ordered import OrderedIndex
from ..wire import (
    MESSAGE_HEADER_SIZE,
    MH_CLIENT_ID,
    MH_CLIENT_ORDER,
    MH_SIZE,
    MH_TOTAL_ORDER,
    scan_records,
)
from .failover import stop_outside_the_lock
from .noloss_base import (
    BrokerProcess,
    RunError,
    Verdict,
    check_and_print,
    parse_faults,
    payload,
    verdict_lines,
    write_broker_config,
)

TOPIC = "nlsess"
FAULTS = ("kill", "head", "stop", "disconnect")
#: The faults that act on a broker; one at a time, each once first.
BROKER_FAULTS = ("kill", "head", "stop")
HOST = "127.0.0.1"
_MAX_BATCH_MESSAGES = 64
#: After the publishers closed, how long the subscribers get to read to the end.
_CATCH_UP_S = 20.0
#: A publisher that failed waits this long before its next session starts.
_RESTART_PAUSE_S = 0.1


def message_key(client_id: int, index: int) -> int:
    """One int for (client, message index): what the sequences are compared by."""
    return (client_id << 32) | index


# -- books ------------------------------------------------------------------------------------


@attrs.define
class SessionBooks:
    """One publisher session (one client id): what it was told.

    Attributes:
        client_id: Its client id.
        published: Messages :meth:`~trio_embarcadero.client.Publisher.publish_many`
            accepted: indices ``0 .. published-1``.
        acked: Messages acknowledged, without a gap from the first.
        error: What it raised, if it did.
        error_code: The code of the broker error it raised, if it did.
        resent: Batches its client sent again after a connection failed.
        reconnects: Connections its client opened again.
        disconnects: Connections the checker reset under it.
    """

    client_id: int
    published: int = 0
    acked: int = 0
    error: str | None = None
    error_code: int | None = None
    resent: int = 0
    reconnects: int = 0
    disconnects: int = 0


@attrs.define
class ReaderBooks:
    """What one ordered subscriber received.

    Attributes:
        name: Which one (``subscriber i``: it started at broker ``i``).
        keys: :func:`message_key` of each message, in the order received.
        offset_errors: Receives whose offsets (total orders) did not run on
            from the messages before.
        first_offset_error: The first of them, in words.
        error: What its receive raised, if it did.
        reconnects: Connections it opened again.
    """

    name: str
    keys: array[int] = attrs.Factory(lambda: array("q"))
    offset_errors: int = 0
    first_offset_error: str | None = None
    error: str | None = None
    reconnects: int = 0


class OrderedRecord(NamedTuple):
    """One message of the total order as the region holds it.

    Attributes:
        place: Its place: the ordered index entry's total order plus its
            index in the batch.
        total_order: The record's own ``total_order`` field.
        client_id: Its publisher.
        client_order: Its index among the publisher's messages.
        intact: Its payload is the one (client, index) gives.
    """

    place: int
    total_order: int
    client_id: int
    client_order: int
    intact: bool


def read_total_order(cxl_path: str, topic: str, max_size: int) -> list[OrderedRecord]:
    """The total order of ``topic`` in the region at ``cxl_path``, record by record.

    Unlike :meth:`~trio_embarcadero.log.LogReader.ordered_messages` it reads
    each record's own ``total_order`` field too, which the sequencer wrote.

    Raises:
        RunError: An ordered batch is gone (nothing reclaims here).
    """
    out: list[OrderedRecord] = []
    with open(cxl_path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as m:
        geometry = read_geometry(m)
        index = read_topics(m, geometry).get(topic)
        if index is None:
            return out
        ordered = OrderedIndex(m, geometry, index)
        for k in range(ordered.count()):
            entry = ordered.entry(k)
            records = None if entry is None else ordered.records(entry)
            if entry is None or records is None:
                raise RunError(f"ordered batch {k} of {topic!r} is gone")
            try:
                starts = scan_records(records, entry.num_msg)
            except ProtocolError as exc:
                header = m[entry.header_offset : entry.header_offset + 128]
                raise RunError(
                    f"ordered batch {k} of {topic!r} ({entry}) does not hold what its index "
                    f"entry says: {exc}; its header: {bytes(header).hex()}"
                ) from exc
            words = records.view("<u8")
            heads = starts // 8
            data = records.tobytes()
            fields = zip(
                words[heads + MH_TOTAL_ORDER].tolist(),
                words[heads + MH_CLIENT_ID].tolist(),
                words[heads + MH_CLIENT_ORDER].tolist(),
                words[heads + MH_SIZE].tolist(),
                (starts + MESSAGE_HEADER_SIZE).tolist(),
                strict=True,
            )
            for i, (total, client, order, size, at) in enumerate(fields):
                body = data[at : at + size]
                intact = body == payload(client, order, max_size)
                out.append(OrderedRecord(entry.total_order + i, total, client, order, intact))
        del ordered, records, words
        gc.collect()  # no numpy view of the mapping may outlive it
    return out


# -- the verdict ------------------------------------------------------------------------------


@attrs.define
class SessionReport(Verdict):
    """The region's total order, the subscribers' and the publishers' books, compared."""

    published: int = 0
    acked: int = 0
    ordered_messages: int = 0
    present: int = 0
    lost: int = 0
    duplicates: int = 0
    fifo_violations: int = 0
    holes: int = 0
    place_errors: int = 0
    record_order_errors: int = 0
    foreign_messages: int = 0
    corrupt_messages: int = 0
    subscriber_mismatches: int = 0
    subscribers_short: list[str] = attrs.Factory(list)
    publisher_errors: int = 0

    limit: ClassVar[int] = 40


def verify_sessions(
    records: Sequence[OrderedRecord],
    sessions: Sequence[SessionBooks],
    readers: Sequence[ReaderBooks],
) -> SessionReport:
    """Check the total order against the sessions' and subscribers' books
    (see the module docstring for what is checked)."""
    report = SessionReport(
        published=sum(s.published for s in sessions),
        acked=sum(s.acked for s in sessions),
        ordered_messages=len(records),
    )
    by_id = {s.client_id: s for s in sessions}
    seen: dict[int, set[int]] = collections.defaultdict(set)
    last: dict[int, int] = collections.defaultdict(lambda: -1)
    # Per session: (place, message, the session's message before it) of
    # each message whose predecessors are not all in the order before it.
    holes: dict[int, list[tuple[int, int, int]]] = collections.defaultdict(list)
    keys = array("q")
    for position, record in enumerate(records):
        place, total, client, index = record[:4]
        keys.append(message_key(client, index))
        if place != position:
            report.place_errors += 1
            report.problem(f"message {position} of the total order has the place {place}")
        if total != place:
            report.record_order_errors += 1
            report.problem(f"the record at total order {place} says {total} in its header")
        session = by_id.get(client)
        if session is None or index >= session.published:
            report.foreign_messages += 1
            report.problem(f"total order {place}: client {client} never published message {index}")
            continue
        if not record.intact:
            report.corrupt_messages += 1
            report.problem(f"total order {place}: client {client} message {index} is corrupt")
        done = seen[client]
        if index in done:
            report.duplicates += 1
            report.problem(f"total order {place}: client {client} message {index} again")
            continue
        done.add(index)
        previous = last[client]
        if index < previous:
            report.fifo_violations += 1
            report.problem(
                f"total order {place}: client {client} message {index} after its message {previous}"
            )
        elif index > previous + 1:
            holes[client].append((place, index, previous))
        last[client] = max(previous, index)
    for client, found in holes.items():
        skipped = sum(index - previous - 1 for _, index, previous in found)
        report.holes += skipped
        place, index, previous = found[0]
        after = f"follows its message {previous}" if previous >= 0 else "is its first"
        report.problem(
            f"client {client}: {skipped} message(s) in {len(found)} hole(s) of its order, the "
            f"first at total order {place}: message {index} {after}"
        )
    for session in sessions:
        done = seen[session.client_id]
        report.present += len(done)
        missing = [i for i in range(session.acked) if i not in done]
        report.lost += len(missing)
        if missing:
            report.problem(
                f"client {session.client_id}: {len(missing)} acked message(s) not in the total "
                f"order, first {missing[:5]} (acked {session.acked})"
            )
        if session.error is not None:
            report.publisher_errors += 1
            report.problem(f"publisher {session.client_id} raised {session.error}")
    for reader in readers:
        got = len(reader.keys)
        if reader.keys != keys[:got]:
            report.subscriber_mismatches += 1
            at = next(
                (i for i, (a, b) in enumerate(zip(reader.keys, keys, strict=False)) if a != b),
                len(keys),
            )
            report.problem(
                f"{reader.name} saw another sequence: it differs from the total order at {at} "
                f"(it received {got} messages, the order holds {len(keys)})"
            )
        elif got < len(keys):
            report.subscribers_short.append(f"{reader.name}: {got} of {len(keys)}")
        if reader.offset_errors:
            report.problem(
                f"{reader.name}: {reader.offset_errors} receive(s) with offsets out of "
                f"sequence, first: {reader.first_offset_error}"
            )
        if reader.error is not None:
            report.problem(f"{reader.name} raised {reader.error}")
    return report


# -- the run ----------------------------------------------------------------------------------


class SeverableStream(trio.abc.HalfCloseableStream):
    """A client's TCP stream that the checker can reset under it.

    :meth:`sever` resets the connection (SO_LINGER 0, then close); the
    client's pending and later calls then fail as on a connection the peer
    reset (``trio.BrokenResourceError``), which is what its failover handles.
    """

    def __init__(self, inner: trio.SocketStream) -> None:
        self._inner = inner
        self.severed = False
        self.closed = False
        self.last_send = 0.0

    def _broken(self, exc: trio.ClosedResourceError) -> BaseException:
        if self.severed:
            return trio.BrokenResourceError("the connection was reset")
        return exc

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self._inner.send_all(data)
        except trio.ClosedResourceError as exc:
            raise self._broken(exc) from exc
        self.last_send = trio.current_time()

    async def wait_send_all_might_not_block(self) -> None:
        try:
            await self._inner.wait_send_all_might_not_block()
        except trio.ClosedResourceError as exc:
            raise self._broken(exc) from exc

    async def send_eof(self) -> None:
        try:
            await self._inner.send_eof()
        except trio.ClosedResourceError as exc:
            raise self._broken(exc) from exc

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        try:
            return await self._inner.receive_some(max_bytes)
        except trio.ClosedResourceError as exc:
            raise self._broken(exc) from exc

    async def aclose(self) -> None:
        self.closed = True
        await self._inner.aclose()

    def sever(self) -> None:
        """Reset the connection: the broker gets an RST, the client an error."""
        self.severed = True
        sock = self._inner.socket
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass  # closed already
        sock.close()


@attrs.frozen
class SessionOptions:
    """The session mode's options (see :func:`build_parser`)."""

    seconds: float
    brokers: int
    publishers: int
    seed: int
    faults: frozenset[str]
    max_size: int
    rate: float
    cxl_mb: int
    lease_s: float
    fault_every: float
    delivery_timeout_s: float
    keep: bool = False
    broker_log: str | None = None


class SessionRun:
    """A run: the brokers, the publishers, the subscribers and the faults."""

    def __init__(self, options: SessionOptions, cxl_path: str, config_path: Path) -> None:
        self.options = options
        self.cxl_path = cxl_path
        self.brokers = [
            BrokerProcess(
                config_path,
                log_path=f"{options.broker_log}.{i}" if options.broker_log else None,
            )
            for i in range(options.brokers)
        ]
        self.sessions: list[SessionBooks] = []
        self.readers = [ReaderBooks(f"subscriber {i}") for i in range(options.brokers)]
        self.faults: collections.Counter[str] = collections.Counter()
        #: Each fault as it came: seconds into the run, what was done.
        self.timeline: list[str] = []
        self._started = trio.current_time()
        self.takeovers = 0
        self.problems: list[str] = []
        self.stopping = False
        self.stopped = trio.Event()  # the run is over: fault loops return
        self.finished = trio.Event()  # the run ends early (a restart failed)
        self.first_ack = trio.Event()
        self._streams: dict[int, list[SeverableStream]] = collections.defaultdict(list)
        self._active: set[int] = set()  # client ids of sessions publishing now
        self._received = trio.lowlevel.ParkingLot()  # a subscriber got messages or ended

    # -- brokers ------------------------------------------------------------------------

    async def start_broker(self, nursery: trio.Nursery, broker_id: int, *extra: str) -> None:
        """Start broker ``broker_id`` (again) and wait until it listens.

        Raises:
            RunError: It exited or did not listen in time.
        """
        await self.brokers[broker_id].start(nursery, "--broker-id", str(broker_id), *extra)

    def holder(self) -> int | None:
        """The broker id holding the sequencer lease, if it is one of ours, running."""
        with open_log(self.cxl_path) as region:
            lease = region.sequencer_lease()
        if lease.epoch == 0 or not 0 <= lease.holder < len(self.brokers):
            return None
        broker = self.brokers[lease.holder]
        if not broker.running or broker.process is None or broker.process.pid != lease.pid:
            return None
        return lease.holder

    def _note(self, what: str) -> None:
        self.timeline.append(f"{trio.current_time() - self._started:.2f} s: {what}")

    def epoch(self) -> int:
        """The sequencer lease's epoch in the region (one more at each takeover)."""
        with open_log(self.cxl_path) as region:
            return region.sequencer_lease().epoch

    async def _pause(self, seconds: float) -> bool:
        """Sleep, unless the run ends first; whether it goes on."""
        with trio.move_on_after(seconds):
            await self.stopped.wait()
        return not self.stopping

    async def chaos(self, nursery: trio.Nursery, rng: random.Random) -> None:
        """The broker faults, one at a time: each kind once first, then at random."""
        kinds = [k for k in BROKER_FAULTS if k in self.options.faults]
        first = rng.sample(kinds, len(kinds))
        every = self.options.fault_every
        while await self._pause(rng.uniform(0.5, 1.5) * every):
            kind = first.pop(0) if first else rng.choice(kinds)
            try:
                await self._broker_fault(kind, nursery, rng)
            except RunError as exc:
                self.problems.append(f"{kind}: {exc}")
                self.finished.set()
                return

    async def _broker_fault(self, kind: str, nursery: trio.Nursery, rng: random.Random) -> None:
        holder = self.holder()
        if holder is None:
            self.faults["skipped (no lease holder)"] += 1
            self._note(f"{kind} skipped: no broker holds the lease")
            return
        if kind == "kill":
            victim = rng.choice([i for i in range(len(self.brokers)) if i != holder])
        else:
            victim = holder
        broker = self.brokers[victim]
        if kind == "stop":
            assert broker.process is not None
            pid = broker.process.pid
            epoch = self.epoch()
            await stop_outside_the_lock(pid, self.cxl_path)
            self._note(f"SIGSTOP broker {victim}, the lease holder (epoch {epoch})")
            try:
                await trio.sleep(self.options.lease_s * rng.uniform(1.5, 2.5))
                if self.epoch() == epoch:
                    self.problems.append(
                        f"broker {victim} was stopped for more than its lease, and no other "
                        f"broker took the sequencer over (epoch {epoch})"
                    )
                else:
                    self.takeovers += 1
            finally:
                os.kill(pid, signal.SIGCONT)
                self._note(f"SIGCONT broker {victim} (epoch {self.epoch()})")
            self.faults["stop"] += 1
            return
        await broker.kill()
        self.faults[kind] += 1
        self._note(f"SIGKILL broker {victim}" + (", the lease holder" if kind == "head" else ""))
        await trio.sleep(rng.uniform(0.0, 0.5))  # down a while: clients notice
        await self.start_broker(nursery, victim)
        self._note(f"broker {victim} listens again")

    async def disconnects(self, rng: random.Random) -> None:
        """Reset a publishing session's busiest connection now and then."""
        every = self.options.fault_every
        while await self._pause(rng.uniform(0.2, 0.6) * every):
            candidates = sorted(self._active)
            if not candidates:
                continue
            client_id = rng.choice(candidates)
            streams = [s for s in self._streams[client_id] if not s.closed and not s.severed]
            if not streams:
                continue
            max(streams, key=lambda s: s.last_send).sever()
            self.faults["disconnect"] += 1
            self._note(f"reset a connection of client {client_id}")
            next(s for s in self.sessions if s.client_id == client_id).disconnects += 1

    # -- clients ------------------------------------------------------------------------

    def _dialer(self, broker_id: int, client_id: int | None) -> Dialer:
        """Opens a connection to broker ``broker_id`` wherever it listens now;
        a publisher's (``client_id``) can be severed."""
        broker = self.brokers[broker_id]

        async def dial() -> trio.abc.Stream:
            if not broker.running or not broker.port:
                raise ConnectionLost(f"broker {broker_id} is down")
            stream = await connect(HOST, broker.port)
            if client_id is None:
                return stream
            severable = SeverableStream(stream)
            streams = self._streams[client_id]
            streams[:] = [s for s in streams if not s.closed]
            streams.append(severable)
            return severable

        dial.__qualname__ = f"broker {broker_id}"
        return dial

    def _order(self, first: int) -> list[int]:
        n = len(self.brokers)
        return [(first + j) % n for j in range(n)]

    async def publisher(self, slot: int, rng: random.Random) -> None:
        """Sessions of one publisher slot, one after the other while they fail,
        until the run ends."""
        opts = self.options
        generation = 0
        while not self.stopping:
            client_id = 1 + slot + opts.publishers * generation
            generation += 1
            books = SessionBooks(client_id)
            self.sessions.append(books)
            brokers = [self._dialer(i, client_id) for i in self._order(slot)]
            self._active.add(client_id)
            pub: Publisher | None = None
            try:
                async with open_publisher(
                    topic=TOPIC,
                    brokers=brokers,
                    ack=1,
                    idempotent=True,
                    client_id=client_id,
                    delivery_timeout_s=opts.delivery_timeout_s,
                ) as pub:
                    await self._publish(pub, books, rng)
            except (BrokerError, ConnectionLost) as exc:
                books.error = f"{type(exc).__name__}: {exc}"
                if isinstance(exc, BrokerError):
                    books.error_code = exc.code
                    if exc.acked is not None:
                        books.acked = max(books.acked, exc.acked)
                self._note(f"client {client_id} raised {type(exc).__name__} {books.error_code}")
            finally:
                self._active.discard(client_id)
                if pub is not None:
                    # Closed in order, it flushed: every message it accepted is acked.
                    books.published, books.acked = pub.published, max(books.acked, pub.acked)
                    books.resent, books.reconnects = pub.resent, pub.reconnects
            if books.error is not None:
                await trio.sleep(_RESTART_PAUSE_S)

    async def _publish(self, pub: Publisher, books: SessionBooks, rng: random.Random) -> None:
        opts = self.options
        started = trio.current_time()
        sent = 0
        while not self.stopping:
            count = rng.randint(1, _MAX_BATCH_MESSAGES)
            first = pub.published
            await pub.publish_many(
                payload(books.client_id, first + k, opts.max_size) for k in range(count)
            )
            books.published = pub.published
            books.acked = pub.acked
            if books.acked and not self.first_ack.is_set():
                self.first_ack.set()
            sent += count
            if opts.rate > 0:
                await trio.sleep_until(started + sent / opts.rate)

    async def subscriber(self, reader: ReaderBooks, first: int) -> None:
        """Read the total order from broker ``first`` on (failing over to the
        others) until cancelled."""
        brokers = [self._dialer(i, None) for i in self._order(first)]
        try:
            async with open_subscriber(
                topic=TOPIC,
                brokers=brokers,
                ordered=True,
                reconnect_timeout_s=self.options.delivery_timeout_s,
            ) as sub:
                try:
                    while True:
                        batch = await sub.receive_batch()
                        expected = len(reader.keys)
                        offsets = batch.offsets
                        if not np.array_equal(
                            offsets, np.arange(expected, expected + len(offsets))
                        ):
                            reader.offset_errors += 1
                            if reader.first_offset_error is None:
                                reader.first_offset_error = (
                                    f"offsets {int(offsets[0])}..{int(offsets[-1])} after "
                                    f"{expected} messages"
                                )
                        keys = (batch.client_ids << 32) | batch.client_orders
                        reader.keys.frombytes(keys.astype(np.int64).tobytes())
                        self._received.unpark_all()
                finally:
                    reader.reconnects = sub.reconnects
        except (BrokerError, ProtocolError, ConnectionLost) as exc:
            reader.error = f"{type(exc).__name__}: {exc}"
            self._received.unpark_all()

    # -- the whole run --------------------------------------------------------------------

    async def run(self) -> None:
        """Start the brokers, publish under faults, wind everything down."""
        opts = self.options
        master = random.Random(opts.seed)
        async with trio.open_nursery() as nursery:
            # Broker 0 recreates the region; the others join it once it serves.
            await self.start_broker(nursery, 0, "--reset")
            for broker_id in range(1, opts.brokers):
                await self.start_broker(nursery, broker_id)
            async with trio.open_nursery() as reading:
                async with trio.open_nursery() as load:
                    for slot in range(opts.publishers):
                        load.start_soon(self.publisher, slot, random.Random(master.random()))
                    with trio.move_on_after(opts.seconds):
                        await self.first_ack.wait()
                        # The topic exists (order 5) once a batch is acked.
                        for i, reader in enumerate(self.readers):
                            reading.start_soon(self.subscriber, reader, i)
                        if set(BROKER_FAULTS) & opts.faults:
                            load.start_soon(self.chaos, nursery, random.Random(master.random()))
                        if "disconnect" in opts.faults:
                            load.start_soon(self.disconnects, random.Random(master.random()))
                        await self.finished.wait()
                    # Fault loops return (a fault under way ends first: a killed
                    # broker is started again, a stopped one continued), and
                    # the publishers flush and close.
                    self.stopping = True
                    self.stopped.set()
                with open_log(self.cxl_path) as region:
                    end = region.ordered_end(TOPIC)
                with trio.move_on_after(_CATCH_UP_S):
                    while any(len(r.keys) < end and r.error is None for r in self.readers):
                        await self._received.park()
                reading.cancel_scope.cancel()
            for broker_id, broker in enumerate(self.brokers):
                status = await broker.stop() if broker.running else broker.returncode
                if status != 0:
                    tail = "\n".join(broker.stderr.splitlines()[-10:])
                    self.problems.append(
                        f"broker {broker_id} exited with status {status} at the end:\n{tail}"
                    )
                if broker.internal_errors:
                    self.problems.append(
                        f"broker {broker_id} logged {broker.internal_errors} internal error(s)"
                    )
            nursery.cancel_scope.cancel()


def write_session_config(path: Path, cxl_path: str, options: SessionOptions) -> None:
    """The brokers' configuration: the region for ``--brokers``, an order-5
    topic, the lease time asked for."""
    write_broker_config(
        path,
        cxl_path=cxl_path,
        cxl_mb=options.cxl_mb,
        order=5,
        cxl_extra=(
            f"max_brokers = {max(4, options.brokers)}\nsequencer_lease_s = {options.lease_s}\n"
        ),
    )


async def run_sessions(
    options: SessionOptions, workdir: Path, cxl_path: str
) -> tuple[SessionRun, SessionReport]:
    """Do one run; returns it and the verdict.

    Raises:
        RunError: A broker did not start in the first place.
    """
    config_path = workdir / "broker.toml"
    write_session_config(config_path, cxl_path, options)
    run = SessionRun(options, cxl_path, config_path)
    await run.run()
    records = read_total_order(cxl_path, TOPIC, options.max_size)
    report = verify_sessions(records, run.sessions, run.readers)
    for text in run.problems:
        report.problem(text)
    return run, report


def summary(
    options: SessionOptions, run: SessionRun, report: SessionReport, elapsed: float
) -> dict[str, object]:
    """The run and its verdict as one JSON-ready record (what ``--json`` prints)."""
    sessions = run.sessions
    return {
        "ok": report.ok,
        "mode": "session",
        "seconds": round(elapsed, 2),
        "brokers": options.brokers,
        "publishers": options.publishers,
        "faults": sorted(options.faults),
        "seed": options.seed,
        "lease_s": options.lease_s,
        "faults_injected": dict(run.faults),
        "takeovers": run.takeovers,
        "broker_starts": [b.starts for b in run.brokers],
        "sessions": len(sessions),
        "publisher_errors": report.publisher_errors,
        "publisher_errors_by_code": dict(
            collections.Counter(str(s.error_code) for s in sessions if s.error is not None)
        ),
        "resent_batches": sum(s.resent for s in sessions),
        "publisher_reconnects": sum(s.reconnects for s in sessions),
        "subscriber_reconnects": [r.reconnects for r in run.readers],
        "subscriber_messages": [len(r.keys) for r in run.readers],
        "subscribers_short": report.subscribers_short,
        "published": report.published,
        "acked": report.acked,
        "ordered_messages": report.ordered_messages,
        "present": report.present,
        "lost": report.lost,
        "duplicates": report.duplicates,
        "fifo_violations": report.fifo_violations,
        "holes": report.holes,
        "place_errors": report.place_errors,
        "record_order_errors": report.record_order_errors,
        "foreign_messages": report.foreign_messages,
        "corrupt_messages": report.corrupt_messages,
        "subscriber_mismatches": report.subscriber_mismatches,
        "problems": report.problems,
        "timeline": run.timeline,
    }


def format_summary(s: dict[str, object]) -> str:
    """A :func:`summary` record as the human-readable report."""
    faults = ",".join(s["faults"]) if isinstance(s["faults"], list) else s["faults"]
    lines = [
        f"no-loss check, session mode: {s['seconds']} s, {s['brokers']} brokers, "
        f"{s['publishers']} publishers, faults {faults or 'none'}, seed {s['seed']}, "
        f"lease {s['lease_s']} s",
        f"faults injected: {s['faults_injected']}; the lease was taken over from a stopped "
        f"holder {s['takeovers']} time(s); broker starts {s['broker_starts']}",
        f"sessions {s['sessions']} ({s['publisher_errors']} raised, by error code "
        f"{s['publisher_errors_by_code']}), batches resent "
        f"{s['resent_batches']}, publisher reconnects {s['publisher_reconnects']}",
        f"published {s['published']} messages, acked {s['acked']}; the total order holds "
        f"{s['ordered_messages']} ({s['present']} distinct)",
        f"lost {s['lost']}, duplicates {s['duplicates']}, FIFO violations "
        f"{s['fifo_violations']}, holes {s['holes']}, place errors {s['place_errors']}, "
        f"record total_order errors {s['record_order_errors']}, foreign "
        f"{s['foreign_messages']}, corrupt {s['corrupt_messages']}",
        f"subscribers: {s['subscriber_messages']} messages received, reconnects "
        f"{s['subscriber_reconnects']}, {s['subscriber_mismatches']} saw another sequence",
    ]
    short = s["subscribers_short"]
    assert isinstance(short, list)
    if short:
        lines.append(f"ended early (a prefix of the total order): {'; '.join(short)}")
    return "\n".join([*lines, *verdict_lines(s)])


def _faults(text: str) -> frozenset[str]:
    return parse_faults(text, FAULTS)


def build_parser() -> argparse.ArgumentParser:
    """The session mode's command line."""
    parser = argparse.ArgumentParser(
        prog="python -m trio_embarcadero.tools.noloss --mode session",
        description="Publish in sessions through the Python client to a cluster of broker "
        "processes under injected faults, then check the total order: nothing acked lost, "
        "nothing twice, each session in order, every subscriber the same sequence.",
    )
    parser.add_argument("--mode", choices=("session",), default="session")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long to publish")
    parser.add_argument("--brokers", type=int, choices=(2, 3), default=3, help="broker processes")
    parser.add_argument("--publishers", type=int, default=4, help="concurrent publishers")
    parser.add_argument("--seed", type=int, help="random seed (default: random, printed)")
    parser.add_argument(
        "--faults",
        type=_faults,
        default=frozenset(FAULTS),
        help=f"comma-separated faults to inject, from {','.join(FAULTS)}, or none (default: all)",
    )
    parser.add_argument("--max-size", type=int, default=300, help="largest message payload (bytes)")
    parser.add_argument(
        "--rate",
        type=float,
        default=1000.0,
        help="messages per second per publisher, 0 for as fast as possible",
    )
    parser.add_argument("--cxl-mb", type=int, default=256, help="CXL region size (MiB)")
    parser.add_argument("--lease-s", type=float, default=1.0, help="cxl.sequencer_lease_s")
    parser.add_argument(
        "--fault-every", type=float, default=2.0, help="mean seconds between broker faults"
    )
    parser.add_argument(
        "--delivery-timeout-s",
        type=float,
        default=30.0,
        help="the publishers' delivery_timeout_s and the subscribers' reconnect timeout",
    )
    parser.add_argument("--keep", action="store_true", help="keep the region and broker config")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--broker-log", metavar="PATH", help="append broker i's stderr (every start) to PATH.i"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the session mode; returns 0 (every check held), 1 (one failed) or 2 (no run)."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    if (
        args.seconds <= 0
        or args.publishers < 1
        or args.max_size < 0
        or args.cxl_mb < 8
        or args.lease_s <= 0
        or args.fault_every <= 0
        or args.delivery_timeout_s <= 0
    ):
        print(
            "noloss: --seconds, --publishers, --max-size, --cxl-mb, --lease-s, --fault-every, "
            "--delivery-timeout-s out of range",
            file=sys.stderr,
        )
        return 2
    options = SessionOptions(
        seconds=args.seconds,
        brokers=args.brokers,
        publishers=args.publishers,
        seed=args.seed if args.seed is not None else random.SystemRandom().randrange(2**32),
        faults=args.faults,
        max_size=args.max_size,
        rate=args.rate,
        cxl_mb=args.cxl_mb,
        lease_s=args.lease_s,
        fault_every=args.fault_every,
        delivery_timeout_s=args.delivery_timeout_s,
        keep=args.keep,
        broker_log=args.broker_log,
    )
    return check_and_print(
        run_sessions,
        options,
        kept="config",
        summary=summary,
        format_summary=format_summary,
        as_json=args.json,
    )


__all__ = [
    "FAULTS",
    "OrderedRecord",
    "ReaderBooks",
    "SessionBooks",
    "SessionReport",
    "SeverableStream",
    "main",
    "message_key",
    "read_total_order",
    "verify_sessions",
]
