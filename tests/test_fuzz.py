"""Property-based fuzzing of the parsers and of whole byte streams sent to a live broker.

Two layers:

* The three parsers (``parse_handshake``, ``parse_batch_header``,
  ``scan_records``) take any bytes they can be handed and either return a
  value or raise :class:`ProtocolError` with the right code, never anything
  else; what they accept is compared with a plain-Python reading of the spec
  (:func:`spec_handshake`, :func:`spec_header`, :func:`spec_records`).
* Whole streams (valid handshakes followed by valid, mutated and random
  batches; mutated and fully random handshakes) go to one live broker per
  test over loopback TCP. A stream model (:func:`expected_outcome`) built on
  the same spec functions predicts, for every stream, the exact reply (ack
  counts, error frame code or silence) and the exact log contents; after
  every example the broker must have no connection left, no staging buffer in
  use, no internal error, and exactly the predicted error counters and
  committed records.

The broker runs in a thread of its own (``trio.run``) for the whole test, and
each Hypothesis example talks to it with a blocking socket whose every
operation has a timeout; broker state is read on the broker's own thread with
``trio.from_thread``.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import attrs
import numpy as np
import pytest
import trio
from conftest import MakeConfig, wait_until
from hypothesis import example, given, settings
from hypothesis import strategies as st
from rawclient import BATCH_HEADER, HANDSHAKE, MESSAGE_HEADER, parse_ack_stream, payload_for, record

from trio_embarcadero import open_broker
from trio_embarcadero.broker import Broker, BrokerStatistics
from trio_embarcadero.config import Config
from trio_embarcadero.errors import ErrorCode, ProtocolError
from trio_embarcadero.wire import parse_batch_header, parse_handshake, scan_records

T = TypeVar("T")

U64 = 2**64 - 1
U32 = 2**32 - 1
MAX_BATCH = 4096  # network.max_batch_bytes of the live broker: fuzzed sizes reach past it
TOPIC = "fuzz"
OTHER = "fuzz-other"
IO_TIMEOUT = 5.0
TOPIC_RE_CHARS = set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")


# == the spec, read plainly =======================================================================


@attrs.frozen
class SpecHandshake:
    client_id: int
    ack: int
    last_addr: int
    port: int
    req: int
    topic: str


def spec_handshake(data: bytes) -> SpecHandshake | None:
    """The handshake the spec (section 1) accepts, or None."""
    if len(data) != 64:
        return None
    client_id, ack, _num, last_addr, port, req, raw_topic = HANDSHAKE.unpack(data)
    if req not in (0, 1, 2, 3) or ack > 2 or port > 65535:
        return None
    nul = raw_topic.find(b"\0")
    name = raw_topic if nul < 0 else raw_topic[:nul]
    rest = b"" if nul < 0 else raw_topic[nul:]
    if not 1 <= len(name) <= 31 or not set(name) <= TOPIC_RE_CHARS or rest.strip(b"\0"):
        return None
    # A publish session (section 4.5) needs acks and a non-zero token.
    if req == 2 and (ack == 0 or last_addr == 0):
        return None
    return SpecHandshake(client_id, ack, last_addr, port, req, name.decode())


def spec_header(
    data: bytes, max_batch: int, client_id: int | None = None
) -> tuple[int, int] | None:
    """``(num_msg, total_size)`` of a batch header the broker accepts, or None.

    Beyond the spec's ``0 < total_size <= max`` and ``num_msg >= 1``, a size
    that no run of 64-byte-padded records can fill is refused up front (a
    multiple of 64 holding at least ``num_msg`` 64-byte records). With
    ``client_id``, the header must carry it.
    """
    fields = BATCH_HEADER.unpack(data)
    num, total = fields[2], fields[7]
    if not 0 < total <= max_batch or total % 64 or not 1 <= num <= total // 64:
        return None
    if client_id is not None and fields[1] != client_id:
        return None
    return num, total


def spec_records(payload: bytes, num_msg: int, client_id: int | None = None) -> list[int] | None:
    """Record start offsets of a valid payload (section 3), or None.

    With ``client_id``, every record must carry it.
    """
    starts: list[int] = []
    pos = 0
    while pos < len(payload):
        if pos + 64 > len(payload):
            return None
        padded, *_, owner, size = MESSAGE_HEADER.unpack_from(payload, pos)
        if padded < 64 or padded % 64 or pos + padded > len(payload):
            return None
        if padded != 64 + -(-size // 64) * 64:
            return None
        if client_id is not None and owner != client_id:
            return None
        starts.append(pos)
        pos += padded
    return starts if len(starts) == num_msg else None


# == strategies ===================================================================================

INTERESTING_U64 = [0, 1, 63, 64, 65, 128, 192, 4096, 4160, 2**32, 2**63, U64 - 63, U64]
INTERESTING_U32 = [0, 1, 2, 3, 7, 63, 64, 65, U32 - 1, U32]
SIZES = st.one_of(st.integers(0, 200), st.sampled_from([0, 1, 63, 64, 65, 127, 128, 129, 192]))


@st.composite
def valid_batches(draw: st.DrawFn, max_records: int = 20, client: int | None = None) -> bytes:
    """A batch the spec accepts (header + records) of ``client`` (else of a
    random one), sometimes past MAX_BATCH."""
    sizes = draw(st.lists(SIZES, min_size=1, max_size=max_records))
    if client is None:
        client = draw(st.integers(1, 9))
    first = draw(st.integers(0, 1000))
    body = b"".join(
        record(payload_for(client, first + i, n), first + i, client) for i, n in enumerate(sizes)
    )
    seq = draw(st.integers(0, U64))
    return BATCH_HEADER.pack(seq, client, len(sizes), 0, 0, 0, 0, len(body), 0, 0, 0, 0) + body


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[bytes]) -> bytes:
    """``base`` with one to three mutations: words, u32 fields and bytes overwritten,
    bytes cut out or inserted."""
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["record", "u64", "u64", "u32", "byte", "cut", "insert"]))
        starts = record_starts(data)
        if kind == "record" and starts:
            # paddedSize, client_id or size of one record of the (possibly damaged) payload
            at = draw(st.sampled_from(starts)) + draw(st.sampled_from([0, 48, 56]))
            value = draw(st.one_of(st.sampled_from(INTERESTING_U64), st.integers(0, 300)))
            struct.pack_into("<Q", data, at, value)
        elif kind == "u64" and len(data) >= 8:
            at = 8 * draw(st.integers(0, len(data) // 8 - 1))
            total = len(data) - 128
            value = draw(
                st.one_of(
                    st.sampled_from([*INTERESTING_U64, max(total, 0), total + 64, total - 64]),
                    st.integers(0, U64),
                )
            )
            struct.pack_into("<Q", data, at, max(value, 0))
        elif kind == "u32" and len(data) >= 4:
            at = 4 * draw(st.integers(0, len(data) // 4 - 1))
            struct.pack_into("<I", data, at, draw(st.sampled_from(INTERESTING_U32)))
        elif kind == "byte" and data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        elif kind == "cut" and data:
            at = draw(st.integers(0, len(data) - 1))
            del data[at : at + draw(st.sampled_from([1, 8, 64, 100]))]
        else:
            at = draw(st.integers(0, len(data)))
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
    return bytes(data)


def record_starts(batch: bytes | bytearray) -> list[int]:
    """Offsets in ``batch`` of the records a payload walk finds after its header."""
    starts, pos = [], 128
    while pos + 64 <= len(batch):
        starts.append(pos)
        (padded,) = struct.unpack_from("<Q", batch, pos)
        if padded < 64 or padded % 64:
            break
        pos += padded
    return starts


def chunks(client: int | None = None) -> st.SearchStrategy[bytes]:
    """What follows a handshake: batches of ``client`` (else of random
    clients), valid and mutated, and random bytes."""
    return st.one_of(
        valid_batches(client=client),
        valid_batches(client=client),
        mutated(valid_batches(client=client)),
        mutated(valid_batches(client=client)),
        st.binary(min_size=1, max_size=300),
    )


CHUNKS = chunks()


@st.composite
def publish_streams(draw: st.DrawFn) -> bytes:
    """Batches, good and bad, after a valid ack-1 handshake; sometimes cut short.

    Mostly batches of the handshake's client, sometimes of a random one.
    """
    client = draw(st.integers(1, 9))
    stream = HANDSHAKE.pack(client, 1, 0, 0, 0, 0, TOPIC.encode().ljust(32, b"\0"))
    own = chunks(client)
    stream += b"".join(draw(st.lists(st.one_of(own, own, CHUNKS), max_size=5)))
    if draw(st.booleans()):
        stream = stream[: draw(st.integers(64, len(stream)))]
    return stream


def structured_handshakes() -> st.SearchStrategy[bytes]:
    topics = st.sampled_from(
        [
            TOPIC.encode(),
            OTHER.encode(),
            b"",
            b"a/b",
            b"a b",
            b"x" * 31,
            b"x" * 32,
            b"ab\0c",
            "tö".encode(),
            b"\xff",
        ]
    )
    return st.builds(
        lambda client, ack, num, last, port, req, topic: HANDSHAKE.pack(
            client, ack, num, last, port, req, topic[:32].ljust(32, b"\0")
        ),
        st.integers(0, U32),
        st.sampled_from([0, 1, 1, 2, 3, 2**31, U32]),
        st.integers(0, U64),
        st.sampled_from([0, 1, 2, 5, 2**63, U64]),
        # A dial-back port would make the broker dial whatever listens there.
        st.sampled_from([0, 0, 0, 65536, U32]),
        st.sampled_from([0, 0, 1, 2, 3, U32]),
        topics,
    )


VALID_HANDSHAKES = st.builds(
    lambda client, ack, last, req, topic: HANDSHAKE.pack(
        client, ack, 0, last, 0, req, topic.encode().ljust(32, b"\0")
    ),
    st.integers(0, U32),
    st.sampled_from([0, 1]),
    st.sampled_from([0, 1, 5, 2**40]),
    st.sampled_from([0, 0, 1]),
    st.sampled_from([TOPIC, OTHER]),
)
ANY_STREAMS = st.one_of(
    st.binary(max_size=400),
    st.tuples(
        st.one_of(
            VALID_HANDSHAKES,
            structured_handshakes(),
            mutated(VALID_HANDSHAKES),
            mutated(structured_handshakes()),
        ),
        st.lists(CHUNKS, max_size=3),
    ).map(lambda parts: parts[0] + b"".join(parts[1])),
    st.tuples(VALID_HANDSHAKES, st.lists(CHUNKS, max_size=3)).map(
        lambda parts: parts[0] + b"".join(parts[1])
    ),
)


# == 1. the parsers on any bytes ==================================================================


@settings(database=None, max_examples=600, deadline=None)
@given(
    data=st.one_of(
        st.binary(max_size=80), structured_handshakes(), mutated(structured_handshakes())
    )
)
def test_parse_handshake_accepts_what_the_spec_accepts(data: bytes) -> None:
    expected = spec_handshake(data)
    if expected is None:
        with pytest.raises(ProtocolError) as info:
            parse_handshake(data)
        assert info.value.code is ErrorCode.BAD_HANDSHAKE
        return
    got = parse_handshake(data)
    assert (got.client_id, got.ack, got.last_addr, got.port, int(got.request), got.topic) == (
        expected.client_id,
        expected.ack,
        expected.last_addr,
        expected.port,
        expected.req,
        expected.topic,
    )


HEADERS = st.one_of(
    st.binary(min_size=128, max_size=128),
    st.builds(
        lambda seq, num, total, noise: BATCH_HEADER.pack(
            seq, noise & U32, num, noise & 1, 0, 0, noise & 7, total, noise, 0, 0, 0
        ),
        st.integers(0, U64),
        st.one_of(st.sampled_from(INTERESTING_U32), st.integers(0, U32)),
        st.one_of(st.sampled_from(INTERESTING_U64), st.integers(0, 2**20).map(lambda n: 64 * n)),
        st.integers(0, U64),
    ),
)


def client_ids(data: bytes, at: int) -> st.SearchStrategy[int | None]:
    """The client id a parser is asked to check: none, the one at byte ``at``
    of ``data`` (a u32), or another."""
    (own,) = struct.unpack_from("<I", data, at)
    return st.one_of(st.none(), st.just(own), st.just(own), st.sampled_from([0, 1, 3, U32]))


@settings(database=None, max_examples=600, deadline=None)
@given(
    data=HEADERS,
    max_batch=st.one_of(st.just(MAX_BATCH), st.integers(1, 2**40)),
    draw=st.data(),
)
def test_parse_batch_header_accepts_what_the_spec_accepts(
    data: bytes, max_batch: int, draw: st.DataObject
) -> None:
    client = draw.draw(client_ids(data, 8))
    expected = spec_header(data, max_batch, client)
    if expected is None:
        with pytest.raises(ProtocolError) as info:
            parse_batch_header(data, max_batch, client_id=client)
        assert info.value.code is ErrorCode.BAD_BATCH_HEADER
        return
    header = parse_batch_header(data, max_batch, client_id=client)
    assert expected == (header.num_msg, header.total_size)
    assert header.batch_seq == BATCH_HEADER.unpack(data)[0]


@st.composite
def payloads(draw: st.DrawFn) -> tuple[bytes, int]:
    """What the broker can hand to scan_records: whole 64-byte units and a num_msg
    its header check let through."""
    if draw(st.booleans()):
        data = draw(mutated(valid_batches()))[128:]
    else:
        data = draw(st.binary(min_size=64, max_size=1024))
    data = data[: len(data) // 64 * 64]
    if not data:
        data = bytes(64)
    units = len(data) // 64
    words = MESSAGE_HEADER.unpack_from(data, 0)
    guess = max(1, min(units, len(data) // max(words[0], 1)))
    num = draw(st.one_of(st.integers(1, units), st.sampled_from([1, units, guess])))
    return data, num


@settings(database=None, max_examples=800, deadline=None)
@given(case=payloads(), draw=st.data())
def test_scan_records_accepts_what_the_spec_accepts(
    case: tuple[bytes, int], draw: st.DataObject
) -> None:
    data, num = case
    client = draw.draw(client_ids(data, 48))  # the first record's (low half)
    expected = spec_records(data, num, client)
    array = np.frombuffer(bytearray(data), dtype=np.uint8)
    if expected is None:
        with pytest.raises(ProtocolError) as info:
            scan_records(array, num, client_id=client)
        assert info.value.code is ErrorCode.BAD_MESSAGE_RECORDS
    else:
        assert [int(s) for s in scan_records(array, num, client_id=client)] == expected
    assert bytes(array) == data  # validation never writes


# == 2. whole streams against a live broker =======================================================


@attrs.frozen
class Outcome:
    """What a stream must produce.

    Attributes:
        reply: ``"acks"`` (broker id, counts, maybe an error frame), ``"error"``
            (an error frame and nothing else), ``"silent"`` (nothing at all),
            ``"records"`` (a subscription: a prefix of the topic's records) or
            ``"ordered"`` (a subscription to the total order: which of the
            others depends on whether the topic exists).
        error: The error frame's code, None for none.
        topic: Where valid batches go (or what a subscriber reads).
        batches: The valid batches committed, each ``(header bytes, payload)``.
        last_addr: Where a subscription starts.
    """

    reply: str
    error: int | None = None
    topic: str = TOPIC
    batches: tuple[tuple[bytes, bytes], ...] = ()
    last_addr: int = 0


def expected_outcome(stream: bytes) -> Outcome | None:
    """Model of the broker for a stream sent whole, then EOF. None: not modelled
    (a dial-back publisher, whose outcome depends on what listens on the port)."""
    if not stream:
        return Outcome("silent")
    if len(stream) < 64:
        return Outcome("error", ErrorCode.BAD_HANDSHAKE)
    hs = spec_handshake(stream[:64])
    if hs is None:
        return Outcome("error", ErrorCode.BAD_HANDSHAKE)
    if hs.req == 1:
        return Outcome("records", topic=hs.topic, last_addr=hs.last_addr)
    if hs.req == 3:
        return Outcome("ordered", topic=hs.topic)
    if hs.ack == 2:
        return Outcome("error", ErrorCode.NOT_ALLOWED)  # no storage.dir
    if hs.ack == 1 and hs.port != 0:
        return None
    batches: list[tuple[bytes, bytes]] = []
    error: int | None = None
    pos = 64
    while pos < len(stream):
        head = stream[pos : pos + 128]
        if len(head) < 128:
            break  # EOF inside a header: dropped, no error frame
        sizes = spec_header(head, MAX_BATCH, hs.client_id)
        if sizes is None:
            error = ErrorCode.BAD_BATCH_HEADER
            break
        num, total = sizes
        body = stream[pos + 128 : pos + 128 + total]
        if len(body) < total:
            break  # EOF inside a payload: dropped, no error frame
        if spec_records(body, num, hs.client_id) is None:
            error = ErrorCode.BAD_MESSAGE_RECORDS
            break
        batches.append((head, body))
        pos += 128 + total
    return Outcome("acks" if hs.ack else "error", error, hs.topic, tuple(batches))


def exchange(port: int, stream: bytes) -> bytes:
    """Send ``stream`` and EOF over a fresh connection; everything the broker writes."""
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as sock:
        try:
            sock.sendall(stream)
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # EPIPE, ECONNRESET, ENOTCONN
            pass  # the broker refused the stream without reading all of it
        received = bytearray()
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
        return bytes(received)


class LiveBroker:
    """A broker running in a thread of its own, for synchronous Hypothesis tests."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.broker: Broker | None = None
        self.port = 0
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._started = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="live-broker", daemon=True)

    def _main(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as exc:  # reported to the test thread
            self._failure = exc
            self._started.set()

    async def _serve(self) -> None:
        self._stop = trio.Event()
        async with open_broker(self.config) as broker:
            self.broker = broker
            self.port = broker.port
            self._token = trio.lowlevel.current_trio_token()
            self._started.set()
            await self._stop.wait()

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the broker's thread."""
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)

    def idle_statistics(self) -> BrokerStatistics:
        """Statistics once every connection has ended."""

        async def settle() -> BrokerStatistics:
            assert self.broker is not None
            broker = self.broker
            with trio.fail_after(IO_TIMEOUT):
                await wait_until(lambda: not broker.connections)
            return broker.statistics()

        return trio.from_thread.run(settle, trio_token=self._token)

    def committed(self, topic: str, first_batch: int) -> list[tuple[bytes, bytes]]:
        """``(header, payload)`` of the topic's committed batches from ``first_batch`` on."""

        def read() -> list[tuple[bytes, bytes]]:
            assert self.broker is not None
            log = self.broker.log
            stream = log.existing_stream(topic)
            if stream is None:
                return []
            region = log.region
            out = []
            for i in range(first_batch, stream.batches):
                b = stream.committed_batch(i)
                out.append(
                    (
                        bytes(region[b.header_offset : b.payload_offset]),
                        bytes(region[b.payload_offset : b.payload_offset + b.total_size]),
                    )
                )
            return out

        return self.call(read)

    def topic_state(self, topic: str) -> TopicState:
        batches = self.committed(topic, 0)
        return TopicState(
            len(batches),
            sum(BATCH_HEADER.unpack(head)[2] for head, _ in batches),
            b"".join(body for _, body in batches),
        )

    @contextmanager
    def running(self) -> Iterator[LiveBroker]:
        self._thread.start()
        assert self._started.wait(IO_TIMEOUT), "the broker did not start"
        if self._failure is not None:
            raise self._failure
        try:
            yield self
        finally:
            assert self._stop is not None
            self.call(self._stop.set)
            self._thread.join(IO_TIMEOUT + self.config.network.shutdown_grace_s)
            assert not self._thread.is_alive(), "the broker did not stop"
            if self._failure is not None:
                raise self._failure


def stamped(body: bytes, first_offset: int) -> bytes:
    """A valid payload as the log holds it: the broker-set record fields filled in."""
    out = bytearray(body)
    pos, offset = 0, first_offset
    while pos < len(out):
        (padded,) = struct.unpack_from("<Q", out, pos)
        struct.pack_into("<QQQ", out, pos + 8, 0, offset, padded)
        pos += padded
        offset += 1
    return bytes(out)


@attrs.frozen
class TopicState:
    batches: int
    messages: int
    records: bytes  # every committed record, as the log holds it


def counter_delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


def run_example(live: LiveBroker, stream: bytes, outcome: Outcome) -> None:
    """Send ``stream`` and check the reply and the broker against ``outcome``.

    Everything is compared with the broker's state just before the example, so
    a failing example does not make the next ones fail too.
    """
    topic = outcome.topic
    stats_before = live.idle_statistics()
    before = live.topic_state(topic)
    if outcome.reply == "ordered":
        # client_req 3 reads the total order of an order-5 topic, and these
        # topics are order 0: once the topic exists (its first batch made it)
        # the handshake is refused; before, the subscription waits for the
        # topic, and the client's EOF ends it without a word.
        exists = before.batches > 0
        outcome = Outcome("error", ErrorCode.BAD_HANDSHAKE) if exists else Outcome("silent")
    reply = exchange(live.port, stream)
    stats = live.idle_statistics()
    # -- the reply on the wire
    if outcome.reply == "silent":
        assert reply == b""
    elif outcome.reply == "records":
        # The subscriber left at once (EOF): whatever arrived is a prefix of
        # the topic's records from last_addr on.
        assert records_from(before.records, outcome.last_addr).startswith(reply), (
            "a subscriber got bytes that are not the topic's records"
        )
    else:
        broker_id, counts, error = parse_ack_stream(reply, with_broker_id=outcome.reply == "acks")
        assert broker_id == (0 if outcome.reply == "acks" else None)
        assert (error[0] if error else None) == outcome.error, f"reply {reply[:64]!r}"
        boundaries, total = set(), 0
        for head, _ in outcome.batches:
            total += BATCH_HEADER.unpack(head)[2]
            boundaries.add(total)
        assert counts == sorted(set(counts)), f"counts not growing: {counts}"
        assert set(counts) <= boundaries, f"a count is not a batch boundary: {counts}"
        if outcome.reply == "acks":
            assert counts[-1:] == ([total] if outcome.batches else [])
        else:
            assert counts == []
    # -- the broker's books
    assert stats.internal_errors == 0
    assert stats.pool.used == 0, "a staging buffer leaked"
    assert stats.queued_batches == 0
    expected_errors = {} if outcome.error is None else {ErrorCode(outcome.error).name.lower(): 1}
    assert counter_delta(stats.errors, stats_before.errors) == expected_errors
    # -- the log: exactly the valid batches, whole, with gap-free offsets
    got = live.committed(topic, before.batches)
    assert len(got) == len(outcome.batches), "committed batches differ from the valid ones"
    offset = before.messages
    for (head, body), (log_head, log_body) in zip(outcome.batches, got, strict=True):
        seq, client, num, *_ = BATCH_HEADER.unpack(head)
        fields = BATCH_HEADER.unpack(log_head)
        assert fields[:4] == (seq, client, num, 1)  # batch_complete = 1
        assert fields[7:9] == (len(body), offset)  # total_size, start offset
        assert log_body == stamped(body, offset)
        offset += num
    assert stats.messages_committed - stats_before.messages_committed == offset - before.messages


def records_from(records: bytes, first: int) -> bytes:
    """A record stream from its ``first``-th record on."""
    pos = 0
    for _ in range(first):
        if pos >= len(records):
            break
        (padded,) = struct.unpack_from("<Q", records, pos)
        pos += padded
    return records[pos:]


GOOD_HANDSHAKE = HANDSHAKE.pack(3, 1, 0, 0, 0, 0, TOPIC.encode().ljust(32, b"\0"))
GOOD_BODY = b"".join(record(payload_for(3, i, 100), i, 3) for i in range(2))
GOOD_BATCH = BATCH_HEADER.pack(0, 3, 2, 0, 0, 0, 0, len(GOOD_BODY), 0, 0, 0, 0) + GOOD_BODY
GOOD_BATCH_SIZE = len(GOOD_BATCH) - 128

PATHS = pytest.mark.parametrize("use_nonblocking", [True, False], ids=["staged", "direct"])


def fuzz_config(make_config: MakeConfig, use_nonblocking: bool) -> Config:
    return make_config(
        **{
            "network.use_nonblocking": use_nonblocking,
            "network.max_batch_bytes": MAX_BATCH,
            "network.staging_pool_num_buffers": 4,
            "network.stats_interval_s": 1000.0,
            # Mutated handshakes name new topics now and then: room for them all.
            "cxl.size_mb": 128,
            "cxl.segment_mb": 1,
            "cxl.max_topics": 128,
        }
    )


@PATHS
def test_publish_streams_of_good_and_bad_batches(
    make_config: MakeConfig, use_nonblocking: bool
) -> None:
    with LiveBroker(fuzz_config(make_config, use_nonblocking)).running() as live:

        @settings(database=None, max_examples=60, deadline=None)
        @given(stream=publish_streams())
        @example(stream=GOOD_HANDSHAKE + GOOD_BATCH + GOOD_BATCH[:128] + bytes(GOOD_BATCH_SIZE))
        @example(stream=GOOD_HANDSHAKE + GOOD_BATCH + bytes(128))
        def check(stream: bytes) -> None:
            outcome = expected_outcome(stream)
            assert outcome is not None
            run_example(live, stream, outcome)

        check()
        # The fuzzing reached the interesting outcomes.
        stats = live.idle_statistics()
        assert stats.messages_committed > 0
        assert stats.errors.keys() >= {"bad_batch_header", "bad_message_records"}


@PATHS
def test_any_stream(make_config: MakeConfig, use_nonblocking: bool) -> None:
    with LiveBroker(fuzz_config(make_config, use_nonblocking)).running() as live:
        seen: set[str] = set()

        ordered = HANDSHAKE.pack(3, 1, 0, 0, 0, 3, TOPIC.encode().ljust(32, b"\0"))

        @settings(database=None, max_examples=60, deadline=None)
        @given(stream=ANY_STREAMS)
        @example(stream=ordered)  # the topic is not there yet: it waits, then EOF
        @example(stream=GOOD_HANDSHAKE + GOOD_BATCH)
        @example(stream=ordered + GOOD_BATCH)  # order 0: refused, the bytes after ignored
        def check(stream: bytes) -> None:
            outcome = expected_outcome(stream)
            if outcome is None:
                return  # a valid dial-back handshake: not modelled
            seen.add(outcome.reply)
            run_example(live, stream, outcome)

        check()
        assert "error" in seen
        assert seen & {"acks", "records"}
