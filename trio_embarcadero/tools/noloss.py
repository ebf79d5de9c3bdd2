"""No-loss checker: publish under faults, then prove from the log that nothing acked was lost.

::

    python -m trio_embarcadero.tools.noloss --seconds 20 [--publishers 4] [--seed S]
        [--ack 1|2] [--faults disconnect,kill,pressure]

It runs a broker as a subprocess (``python -m trio_embarcadero serve``) on a
private CXL file (and, for ``--ack 2``, a private disk-log directory), and
publishers in this process that speak the wire protocol directly. For the
given time it injects faults:

* ``disconnect``: publishers drop their connection in the middle of a batch,
  by a reset or by an EOF;
* ``kill``: the broker is killed with SIGKILL and started again on the same
  CXL file (and disk log); with ``--ack 2`` every other kill (the first,
  the third...) also deletes the CXL file first, as a reboot would;
* ``pressure``: the broker runs with a two-buffer staging pool that pauses
  receivers at one buffer in use, so pauses happen all the time.

``--order 5`` makes the topic one of order 5: the broker (broker 0, the
head) runs the sequencer, acks wait for the total order, and a kill stops
the sequencer too. The log is then also read in its total order
(:meth:`~trio_embarcadero.log.LogReader.ordered_messages`): total orders run
without a gap or a repeat, every record's ``total_order`` is its place, the
total order is the stream's commit order (one broker), and every
acknowledged message is ordered.

``--path direct`` runs the broker on its direct receive path instead
(payloads received straight into reserved log space), where a kill often
finds batches half received in the log.

A publisher that loses its connection reconnects and resumes from its last
*acknowledged* message, as a client must to lose nothing; messages that were
committed but not acknowledged are then sent again, and show up twice in the
log. Those are counted apart ("duplicates"), not as loss.

Message ``i`` of client ``c`` has a payload computed from ``(c, i)``. Every
batch carries a per-client ``batch_seq`` that is never reused. At the end the
broker is stopped gracefully and the log is read back with
:class:`~trio_embarcadero.log.LogReader`:

* logical offsets run from 0 without a gap or a repeat;
* every committed batch is one the checker sent, at most once, holding
  exactly the messages it was sent with, byte for byte;
* per client, messages first appear in index order;
* every acknowledged message is present (``lost`` must be 0).

With retention, the messages below the stream's log-start offset are gone on
purpose: they count as ``reclaimed``, not lost, and the checks above start
there. Per client, the acknowledged messages below the first one the
retained log holds count as reclaimed (``acked_reclaimed``); the ones from it
on must all be present. A client's messages first appear in index order, so
at least that many of its messages lie below the start: if their sum over
the clients exceeds the start offset, something below it was lost. (A loss
just below the start, among the reclaimed messages, cannot be told apart
from retention: the log no longer holds them.)

The exit status is 0 when every check holds, 1 when one fails, 2 when the
run itself could not be done (bad options, a broker that does not start).

``--mode session`` is the other mode (:mod:`.noloss_session`): a cluster of
two or three brokers, publishers through the Python client in publish
sessions, kills of any broker and of the sequencer's, stops of the
sequencer's, and client disconnects::

    python -m trio_embarcadero.tools.noloss --mode session --brokers 3 --seconds 60
"""

from __future__ import annotations

import argparse
import collections
import mmap
import os
import random
import socket
import struct
import sys
from collections.abc import Sequence
from pathlib import Path

import attrs
import trio

from .. import wire
from ..log import open_log
from ..log.layout import read_geometry, read_stream_entry, read_topics
from ..wire import AckCount, AckDecoder, ErrorFrame
from .noloss_base import (
    BrokerProcess,
    RunError,
    Verdict,
    check_and_print,
    clean_environment,
    parse_faults,
    payload,
    proc_status_kib,
    verdict_lines,
    write_broker_config,
)
from .rawwire import publish_handshake

TOPIC = "noloss"
FAULTS = ("disconnect", "kill", "pressure")
#: Client ids of the half batches sent just before kills start here.
_VICTIM_ID = 1_000_000
#: Messages a publisher may have sent beyond its last ack.
_WINDOW = 256
_MAX_BATCH_MESSAGES = 64
_CONNECT_RETRY = 0.05
_FINAL_ACKS_TIMEOUT = 10.0


def encode_batch(client_id: int, seq: int, first: int, count: int, max_size: int) -> bytes:
    """Batch ``seq`` of a client: header and messages ``first .. first+count-1``."""
    payloads = (payload(client_id, first + i, max_size) for i in range(count))
    return bytes(wire.encode_batch(payloads, client_id=client_id, batch_seq=seq, first_order=first))


# -- publishers -------------------------------------------------------------------------------


@attrs.frozen
class SentBatch:
    """A batch as sent: its first message index and its message count."""

    first: int
    count: int


@attrs.define
class Client:
    """One publisher's books.

    Attributes:
        client_id: Its id (message headers, batch headers).
        acked: Messages acknowledged so far: indices ``0 .. acked-1``.
        published: Messages sent in whole batches, resends included.
        next_seq: The ``batch_seq`` of its next batch (never reused).
        sent: Every whole batch sent, by ``batch_seq``.
        sessions: Connections opened.
        disconnects: Connections it dropped mid-batch on purpose.
        errors: Error frames received, by code.
        error_texts: The first few error frames' texts.
    """

    client_id: int
    acked: int = 0
    published: int = 0
    next_seq: int = 0
    sent: dict[int, SentBatch] = attrs.Factory(dict)
    sessions: int = 0
    disconnects: int = 0
    errors: collections.Counter[int] = attrs.Factory(collections.Counter)
    error_texts: list[str] = attrs.Factory(list)


@attrs.frozen
class Options:
    """The checker's options, as given on the command line (see :func:`build_parser`)."""

    seconds: float
    publishers: int
    seed: int
    ack: int
    faults: frozenset[str]
    max_size: int
    rate: float
    cxl_mb: int
    keep: bool
    direct: bool = False
    broker_log: str | None = None
    order: int = 0


class Run:
    """A checker run: the broker, the publishers and the fault injector."""

    def __init__(self, options: Options, broker: BrokerProcess) -> None:
        self.options = options
        self.broker = broker
        self.clients = [Client(client_id=k + 1) for k in range(options.publishers)]
        self.stopping = False
        self.log_full = False
        self.kills = 0
        self.reboots = 0
        self.restart_failure: str | None = None
        self.finished = trio.Event()  # set early: the log filled up, or a restart failed
        self._up = trio.Event()
        self._changes = trio.lowlevel.ParkingLot()

    def broker_up(self) -> None:
        """The broker listens (again): wake the publishers waiting for it."""
        self._up.set()
        self._changes.unpark_all()

    def broker_down(self) -> None:
        """The broker is about to be killed: publishers wait until :meth:`broker_up`."""
        if self._up.is_set():
            self._up = trio.Event()

    async def wait_broker(self) -> int | None:
        """The broker's port once it is up; None when the run is over."""
        while not self._up.is_set():
            if self.stopping:
                return None
            await self._changes.park()
        return self.broker.port

    def stop(self) -> None:
        """End the run: publishers finish their sessions and return."""
        self.stopping = True
        self._changes.unpark_all()

    async def publisher(self, client: Client, rng: random.Random) -> None:
        """One publisher: sessions, each resuming from the last ack, until the run ends."""
        started = trio.current_time()
        sent_total = 0
        while not self.stopping:
            port = await self.wait_broker()
            if port is None:
                return
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(_CONNECT_RETRY)
                continue
            client.sessions += 1
            try:
                sent_total = await self._session(client, rng, stream, started, sent_total)
            finally:
                await trio.aclose_forcefully(stream)

    async def _session(
        self,
        client: Client,
        rng: random.Random,
        stream: trio.SocketStream,
        started: float,
        sent_total: int,
    ) -> int:
        """One connection: publish from the last acked message on until the
        connection fails, a fault drops it, or the run ends."""
        opts = self.options
        first = client.acked
        next_index = first
        news = trio.lowlevel.ParkingLot()
        done = trio.Event()
        accepted = trio.Event()  # the broker's connection task answered the handshake

        async def read_acks() -> None:
            decoder = AckDecoder(expect_broker_id=True)
            try:
                async for chunk in stream:
                    events = list(decoder.feed(chunk))
                    if decoder.broker_id is not None:
                        accepted.set()
                    for event in events:
                        if isinstance(event, AckCount):
                            client.acked = max(client.acked, first + event.count)
                            news.unpark_all()
                        elif isinstance(event, ErrorFrame):
                            client.errors[event.code] += 1
                            if len(client.error_texts) < 5:
                                client.error_texts.append(f"{event.code}: {event.text}")
                            if event.code == 4:
                                self.log_full = True
                                self.finished.set()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                done.set()
                news.unpark_all()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_acks)
            try:
                await stream.send_all(publish_handshake(client.client_id, opts.ack, TOPIC))
                while not self.stopping and not done.is_set():
                    while next_index - client.acked >= _WINDOW and not done.is_set():
                        await news.park()
                    if done.is_set():
                        break
                    count = rng.randint(1, _MAX_BATCH_MESSAGES)
                    seq = client.next_seq
                    client.next_seq += 1
                    data = encode_batch(client.client_id, seq, next_index, count, opts.max_size)
                    # Only once the broker answered: a reset before its connection
                    # task starts crashes it (a bug tests/test_faults.py shows),
                    # which is not what this checker is about.
                    if "disconnect" in opts.faults and accepted.is_set() and rng.random() < 0.02:
                        await stream.send_all(data[: rng.randint(1, len(data) - 1)])
                        client.disconnects += 1
                        if rng.random() < 0.5:
                            # A reset: whatever the broker had not read is gone.
                            stream.socket.setsockopt(
                                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                            )
                            nursery.cancel_scope.cancel()
                            return sent_total
                        await stream.send_eof()  # an EOF inside the batch
                        break
                    client.sent[seq] = SentBatch(next_index, count)
                    await stream.send_all(data)
                    client.published += count
                    next_index += count
                    sent_total += count
                    if opts.rate > 0:
                        await trio.sleep_until(started + sent_total / opts.rate)
                else:
                    if not done.is_set():
                        await stream.send_eof()  # the run is over: collect the last acks
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            with trio.move_on_after(_FINAL_ACKS_TIMEOUT):
                await done.wait()
            nursery.cancel_scope.cancel()
        return sent_total

    async def _half_batch(self, rng: random.Random) -> trio.SocketStream | None:
        """A connection in the middle of a batch when the kill comes, so that
        every kill finds one: on the direct path it is log space reserved and
        half written, which a restart must discard. Its client id is in no
        publisher's books: if any of it became visible, the check would fail."""
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", self.broker.port)
        except OSError:
            return None
        client_id = _VICTIM_ID + self.kills
        data = encode_batch(client_id, 0, 0, _MAX_BATCH_MESSAGES, self.options.max_size)
        handshake = publish_handshake(client_id, 1, TOPIC)
        try:
            await stream.send_all(handshake + data[: rng.randint(129, len(data) - 1)])
        except trio.BrokenResourceError:
            await trio.aclose_forcefully(stream)
            return None
        await trio.sleep(0.05)  # for the broker to take it in
        return stream

    async def chaos(self, nursery: trio.Nursery, rng: random.Random, cxl_path: str) -> None:
        """Kill the broker now and then (each time with a batch half received)
        and start it again."""
        end = trio.current_time() + self.options.seconds - 1.0
        # The first kill comes within the first third of the run, so short runs get one.
        delay = min(rng.uniform(1.0, 3.0), self.options.seconds / 3)
        while True:
            await trio.sleep(delay)
            delay = rng.uniform(1.0, 3.0)
            if self.stopping or trio.current_time() >= end:
                return
            victim = await self._half_batch(rng)
            self.broker_down()
            await self.broker.kill()
            self.kills += 1
            if victim is not None:
                await trio.aclose_forcefully(victim)
            if self.options.ack == 2 and self.kills % 2 == 1:
                os.unlink(cxl_path)  # a reboot: the region is gone, the disk log is not
                self.reboots += 1
            try:
                await self.broker.start(nursery)
            except RunError as exc:
                # Not the checker's failure: the broker cannot recover its own files.
                self.restart_failure = f"restart after kill {self.kills} failed: {exc}"
                self.finished.set()
                return
            self.broker_up()


# -- verification -----------------------------------------------------------------------------


@attrs.define
class Report(Verdict):
    """What the log holds, against what the publishers sent and were told."""

    published: int = 0
    acked: int = 0
    present: int = 0
    lost: int = 0
    duplicates: int = 0
    unacked_present: int = 0
    log_messages: int = 0
    log_batches: int = 0
    abandoned_batches: int = 0
    reserved_batches: int = 0
    offset_errors: int = 0
    foreign_batches: int = 0
    repeated_batches: int = 0
    corrupt_messages: int = 0
    order_violations: int = 0
    reclaimed: int = 0
    acked_reclaimed: int = 0
    ordered_messages: int = 0
    total_order_errors: int = 0


def log_start_offset(cxl_path: str, topic: str = TOPIC, broker_id: int = 0) -> int:
    """A stream's log-start offset: retention let the messages before it go."""
    with open(cxl_path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as m:
        geometry = read_geometry(m)
        index = read_topics(m, geometry).get(topic)
        return 0 if index is None else read_stream_entry(m, geometry, index, broker_id).start_offset


def verify_total_order(cxl_path: str, clients: Sequence[Client], report: Report) -> None:
    """Order 5, one broker: check the topic's total order against its stream
    and the publishers' acks (see the module docstring)."""
    with open_log(cxl_path) as log:
        ordered = [(m.offset, m.client_id, m.client_order) for m in log.ordered_messages(TOPIC)]
        stream = [(m.client_id, m.client_order) for m in log.messages(TOPIC)]
    report.ordered_messages = len(ordered)
    first = ordered[0][0] if ordered else 0
    places = [t for t, _, _ in ordered]
    if places != list(range(first, first + len(ordered))):
        report.total_order_errors += 1
        gap = next(i for i, t in enumerate(places) if t != first + i)
        report.problem(f"total orders skip or repeat at {first + gap}: {places[gap : gap + 3]}")
    # Batches committed at the very end may not be ordered yet: a prefix.
    if [(c, o) for _, c, o in ordered] != stream[: len(ordered)]:
        report.total_order_errors += 1
        report.problem("the total order is not the stream's commit order")
    in_order: dict[int, set[int]] = collections.defaultdict(set)
    for _, owner, index in ordered:
        in_order[owner].add(index)
    in_stream: dict[int, set[int]] = collections.defaultdict(set)
    for owner, index in stream:
        in_stream[owner].add(index)
    for client in clients:
        unordered = sorted(
            i for i in in_stream[client.client_id] - in_order[client.client_id] if i < client.acked
        )
        if unordered:
            report.total_order_errors += len(unordered)
            report.problem(
                f"client {client.client_id}: {len(unordered)} acked message(s) without a "
                f"place in the total order, first {unordered[:5]}"
            )


def verify(cxl_path: str, clients: Sequence[Client], max_size: int, *, order: int = 0) -> Report:
    """Check the log at ``cxl_path`` against the publishers' books (see the
    module docstring for what is checked; ``order`` 5: its total order too)."""
    start = log_start_offset(cxl_path)
    report = Report(
        published=sum(c.published for c in clients),
        acked=sum(c.acked for c in clients),
        reclaimed=start,
    )
    by_id = {c.client_id: c for c in clients}
    seen: dict[int, collections.Counter[int]] = {
        c.client_id: collections.Counter() for c in clients
    }
    highest: dict[int, int] = {c.client_id: -1 for c in clients}
    # Per client, its first message in the retained log (the ones before are
    # below the log start); without retention, 0.
    first_kept: dict[int, int] = {c.client_id: 0 if start == 0 else -1 for c in clients}
    batches_seen: set[tuple[int, int]] = set()
    with open_log(cxl_path) as log:
        batches = log.batches(TOPIC)
        report.abandoned_batches = sum(b.state == "abandoned" for b in batches)
        report.reserved_batches = sum(b.state == "reserved" for b in batches)
        if report.reserved_batches:
            report.problem(f"{report.reserved_batches} batch(es) left reserved after the stop")
        # A reclaim cut short may leave batches below the start linked: gone all the same.
        committed = [b for b in batches if b.state == "committed" and b.first_offset >= start]
        report.log_batches = len(committed)
        messages = log.messages(TOPIC)
        expected_offset = start
        for batch in committed:
            if batch.first_offset != expected_offset:
                report.offset_errors += 1
                report.problem(
                    f"batch at byte {batch.header_offset} starts at offset {batch.first_offset}, "
                    f"expected {expected_offset}"
                )
            expected_offset = batch.first_offset + batch.num_msg
            client = by_id.get(batch.client_id)
            key = (batch.client_id, batch.batch_seq)
            sent = client.sent.get(batch.batch_seq) if client is not None else None
            if sent is None or sent.count != batch.num_msg:
                report.foreign_batches += 1
                report.problem(f"batch {key} ({batch.num_msg} messages) was never sent")
            if key in batches_seen:
                report.repeated_batches += 1
                report.problem(f"batch {key} is in the log twice")
            batches_seen.add(key)
            for k in range(batch.num_msg):
                message = next(messages, None)
                if message is None:
                    report.offset_errors += 1
                    report.problem(f"batch {key} has fewer readable messages than it says")
                    break
                report.log_messages += 1
                if message.offset != batch.first_offset + k:
                    report.offset_errors += 1
                    report.problem(
                        f"message offset {message.offset}, expected {batch.first_offset + k}"
                    )
                index = message.client_order
                owner = message.client_id
                if (
                    sent is None
                    or owner != batch.client_id
                    or index != sent.first + k
                    or message.payload != payload(owner, index, max_size)
                ):
                    report.corrupt_messages += 1
                    report.problem(
                        f"offset {message.offset}: client {owner} message {index} is not "
                        f"message {k} of batch {key} as sent"
                    )
                    continue
                counts = seen[owner]
                if first_kept[owner] < 0:
                    first_kept[owner] = index
                    highest[owner] = index - 1
                if counts[index] == 0:
                    if index != highest[owner] + 1:
                        report.order_violations += 1
                        report.problem(
                            f"client {owner}: message {index} first appears after "
                            f"{highest[owner]} (offset {message.offset})"
                        )
                    highest[owner] = max(highest[owner], index)
                counts[index] += 1
        if next(messages, None) is not None:
            report.offset_errors += 1
            report.problem("the log holds messages beyond its committed batches")
    below_start = 0  # messages that must lie below the log start
    for client in clients:
        counts = seen[client.client_id]
        report.present += len(counts)
        report.duplicates += sum(n - 1 for n in counts.values())
        report.unacked_present += sum(1 for i in counts if i >= client.acked)
        # Not in the retained log at all: every acked message was below the start.
        kept = first_kept[client.client_id]
        below = client.acked if kept < 0 else min(kept, client.acked)
        report.acked_reclaimed += below
        below_start += below if kept < 0 else kept
        missing = [i for i in range(below, client.acked) if counts[i] == 0]
        report.lost += len(missing)
        if missing:
            report.problem(
                f"client {client.client_id}: {len(missing)} acked message(s) missing, "
                f"first {missing[:5]} (acked {client.acked})"
            )
    if below_start > start:
        report.lost += below_start - start
        report.problem(
            f"the clients' first retained messages imply {below_start} messages below the "
            f"log start, which holds {start}: messages below it were lost"
        )
    if order == 5:
        verify_total_order(cxl_path, clients, report)
    return report


# -- the command ------------------------------------------------------------------------------


async def run_checker(options: Options, workdir: Path, cxl_path: str) -> tuple[Run, Report]:
    """Do one run; returns it and the verification report.

    Raises:
        RunError: The broker did not start in the first place.
    """
    storage_dir = str(workdir / "disk") if options.ack == 2 else ""
    config_path = workdir / "broker.toml"
    write_broker_config(
        config_path,
        cxl_path=cxl_path,
        cxl_mb=options.cxl_mb,
        storage_dir=storage_dir,
        pressure="pressure" in options.faults,
        direct=options.direct,
        order=options.order,
    )
    broker = BrokerProcess(config_path, log_path=options.broker_log)
    run = Run(options, broker)
    master = random.Random(options.seed)
    async with trio.open_nursery() as nursery:
        await broker.start(nursery, "--reset")
        run.broker_up()
        async with trio.open_nursery() as load:
            for client in run.clients:
                load.start_soon(run.publisher, client, random.Random(master.random()))
            if "kill" in options.faults:
                load.start_soon(run.chaos, nursery, random.Random(master.random()), cxl_path)
            with trio.move_on_after(options.seconds):
                await run.finished.wait()
            run.stop()
        # Not running at the end: it crashed (or failed to restart) on its own.
        status = await broker.stop() if broker.running else broker.returncode
        nursery.cancel_scope.cancel()
    report = verify(cxl_path, run.clients, options.max_size, order=options.order)
    tail = "\n".join(broker.stderr.splitlines()[-15:])
    if run.restart_failure is not None:
        report.problem(run.restart_failure)
    elif status != 0:
        report.problem(
            f"the broker exited with status {status} at the end; its last words:\n{tail}"
        )
    if broker.internal_errors:
        report.problem(f"the broker logged {broker.internal_errors} internal error(s)")
    return run, report


def summary(options: Options, run: Run, report: Report, elapsed: float) -> dict[str, object]:
    """The run and its verdict as one JSON-ready record (what ``--json`` prints)."""
    broker = run.broker
    return {
        "ok": report.ok,
        "seconds": round(elapsed, 2),
        "publishers": options.publishers,
        "ack": options.ack,
        "order": options.order,
        "path": "direct" if options.direct else "staged",
        "faults": sorted(options.faults),
        "seed": options.seed,
        "broker_starts": broker.starts,
        "kills": run.kills,
        "reboots": run.reboots,
        "disconnects": sum(c.disconnects for c in run.clients),
        "sessions": sum(c.sessions for c in run.clients),
        "pauses": broker.pauses,
        "discarded_at_restart": broker.discarded,
        "replayed_from_disk": broker.replayed,
        "log_full": run.log_full,
        "error_frames": dict(sum((c.errors for c in run.clients), collections.Counter[int]())),
        "error_texts": sorted({t for c in run.clients for t in c.error_texts}),
        "published": report.published,
        "acked": report.acked,
        "present": report.present,
        "duplicates": report.duplicates,
        "unacked_present": report.unacked_present,
        "lost": report.lost,
        "log_messages": report.log_messages,
        "log_batches": report.log_batches,
        "abandoned_batches": report.abandoned_batches,
        "offset_errors": report.offset_errors,
        "foreign_batches": report.foreign_batches,
        "repeated_batches": report.repeated_batches,
        "corrupt_messages": report.corrupt_messages,
        "order_violations": report.order_violations,
        "reclaimed": report.reclaimed,
        "acked_reclaimed": report.acked_reclaimed,
        "ordered_messages": report.ordered_messages,
        "total_order_errors": report.total_order_errors,
        "problems": report.problems,
    }


def format_summary(s: dict[str, object]) -> str:
    """A :func:`summary` record as the human-readable report."""
    faults = ",".join(s["faults"]) if isinstance(s["faults"], list) else s["faults"]
    lines = [
        f"no-loss check: {s['seconds']} s, {s['publishers']} publishers, ack {s['ack']}, "
        f"{s['path']} path, faults {faults or 'none'}, seed {s['seed']}",
        f"faults injected: {s['kills']} broker kills ({s['reboots']} with the CXL file removed), "
        f"{s['disconnects']} disconnects mid-batch, {s['pauses']} pauses; "
        f"{s['sessions']} connections in all",
        f"recovery: {s['discarded_at_restart']} uncommitted batch(es) discarded at restart, "
        f"{s['replayed_from_disk']} batch(es) replayed from disk",
        f"published {s['published']} messages (resends included), acked {s['acked']}, "
        f"error frames {s['error_frames']} {s['error_texts'] or ''}",
        f"log: {s['log_messages']} messages in {s['log_batches']} committed batches "
        f"({s['abandoned_batches']} abandoned)",
        f"present {s['present']} distinct messages, duplicates (unacked resends) "
        f"{s['duplicates']}, committed but not acked {s['unacked_present']}",
        f"offset errors {s['offset_errors']}, foreign batches {s['foreign_batches']}, "
        f"repeated batches {s['repeated_batches']}, corrupt messages {s['corrupt_messages']}, "
        f"order violations {s['order_violations']}",
        f"reclaimed by retention {s['reclaimed']} (acked {s['acked_reclaimed']}), lost {s['lost']}",
    ]
    if s.get("order") == 5:
        lines.append(
            f"order 5: {s['ordered_messages']} messages in the total order, "
            f"{s['total_order_errors']} total-order errors"
        )
    if s["log_full"]:
        lines.append("note: the log filled up, the run ended early (raise --cxl-mb)")
    return "\n".join([*lines, *verdict_lines(s)])


def _faults(text: str) -> frozenset[str]:
    return parse_faults(text, FAULTS)


def build_parser() -> argparse.ArgumentParser:
    """The checker's command line."""
    parser = argparse.ArgumentParser(
        prog="python -m trio_embarcadero.tools.noloss",
        description="Publish to a broker subprocess under injected faults, then check from "
        "the CXL log that every acknowledged message is there, once, intact and in order.",
    )
    parser.add_argument(
        "--mode",
        choices=("broker", "session"),
        default="broker",
        help="broker: one broker, raw-wire publishers (this help); session: a cluster, the "
        "Python client in publish sessions (--mode session --help)",
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="how long to publish")
    parser.add_argument("--publishers", type=int, default=4, help="concurrent publishers")
    parser.add_argument("--seed", type=int, help="random seed (default: random, printed)")
    parser.add_argument("--ack", type=int, choices=(1, 2), default=1, help="ack level")
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
        default=2000.0,
        help="messages per second per publisher, 0 for as fast as possible",
    )
    parser.add_argument("--cxl-mb", type=int, default=256, help="CXL region size (MiB)")
    parser.add_argument(
        "--path",
        choices=("staged", "direct"),
        default="staged",
        help="the broker's receive path (network.use_nonblocking true / false)",
    )
    parser.add_argument(
        "--order",
        type=int,
        choices=(0, 5),
        default=0,
        help="the topic's order level (5: one total order, the broker runs the sequencer)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the CXL file, disk log and broker config"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--broker-log", metavar="PATH", help="append the broker's stderr (every start) to PATH"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the checker; returns 0 (every check held), 1 (one failed) or 2 (no run)."""
    arguments = sys.argv[1:] if argv is None else list(argv)
    # The modes' options differ (their --faults, say): the mode picks the parser.
    choose = argparse.ArgumentParser(add_help=False)
    choose.add_argument("--mode", choices=("broker", "session"), default="broker")
    mode, _ = choose.parse_known_args(arguments)
    if mode.mode == "session":
        from . import noloss_session  # its own options (--brokers, --lease-s, ...)

        return noloss_session.main(arguments)
    args = build_parser().parse_args(arguments)
    if args.seconds <= 0 or args.publishers < 1 or args.max_size < 0 or args.cxl_mb < 8:
        print("noloss: --seconds, --publishers, --max-size, --cxl-mb out of range", file=sys.stderr)
        return 2
    options = Options(
        seconds=args.seconds,
        publishers=args.publishers,
        seed=args.seed if args.seed is not None else random.SystemRandom().randrange(2**32),
        ack=args.ack,
        faults=args.faults,
        max_size=args.max_size,
        rate=args.rate,
        cxl_mb=args.cxl_mb,
        keep=args.keep,
        direct=args.path == "direct",
        broker_log=args.broker_log,
        order=args.order,
    )
    if options.direct and "pressure" in options.faults:
        print("noloss: the direct path has no staging pool: drop 'pressure'", file=sys.stderr)
        return 2
    return check_and_print(
        run_checker,
        options,
        kept="config, disk log",
        summary=summary,
        format_summary=format_summary,
        as_json=args.json,
    )


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "BrokerProcess",
    "Client",
    "Report",
    "RunError",
    "SentBatch",
    "clean_environment",
    "encode_batch",
    "main",
    "payload",
    "proc_status_kib",
    "verify",
    "verify_total_order",
    "write_broker_config",
]
