"""Crash recovery: the broker is a subprocess, killed with SIGKILL under load and started again.

* Re-attaching to the same CXL file keeps every acknowledged message; a batch
  that was in flight is discarded (marked abandoned, never half visible);
  logical offsets go on without a gap or a repeat when publishers resume from
  their last acknowledged message.
* ``serve --reset`` starts from an empty region.
* A CXL file of another size or layout, or not a region at all, is refused
  with exit status 1 and a message on stderr, and left as it was.
* Ack level 2: after SIGKILL *and* the loss of the CXL file (a reboot), every
  message acknowledged at level 2 comes back from the disk log.

The publishers speak the wire protocol directly (``noloss.encode_batch``,
deterministic payloads); the log is read back with
:class:`~trio_embarcadero.log.LogReader` and checked with
:func:`trio_embarcadero.tools.noloss.verify` (offsets gap-free, every committed batch
one that was sent, whole and byte-identical, per-client order, nothing acked
missing), plus the exact per-client sequence each scenario implies.
"""

from __future__ import annotations

import hashlib
import os
import sys
from functools import partial
from pathlib import Path

import pytest
import trio
from conftest import wait_until

from trio_embarcadero.log import CxlLog, open_log
from trio_embarcadero.tools.noloss import (
    TOPIC,
    BrokerProcess,
    Client,
    SentBatch,
    clean_environment,
    encode_batch,
    verify,
    write_broker_config,
)
from trio_embarcadero.tools.rawwire import publish_handshake
from trio_embarcadero.wire import AckCount, AckDecoder, ErrorFrame

MAX_SIZE = 200
PER_BATCH = 20
CXL_MB = 32
SEGMENT_MB = 4
TIMEOUT = 20


async def publish(port: int, client: Client, *, ack: int = 1, batches: int | None = None) -> None:
    """Publish from ``client.acked`` on, updating its books.

    With ``batches``: send that many, then EOF, and wait for the last acks.
    Without: keep sending (at most 10 batches ahead of the acks) until the
    connection breaks.
    """
    first = client.acked
    next_index = first
    news = trio.lowlevel.ParkingLot()
    done = trio.Event()
    async with await trio.open_tcp_stream("127.0.0.1", port) as stream:

        async def read_acks() -> None:
            decoder = AckDecoder()
            try:
                async for chunk in stream:
                    for event in decoder.feed(chunk):
                        if isinstance(event, AckCount):
                            client.acked = first + event.count
                            news.unpark_all()
                        elif isinstance(event, ErrorFrame):
                            client.errors[event.code] += 1
            except trio.BrokenResourceError:
                pass
            finally:
                done.set()
                news.unpark_all()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_acks)
            try:
                await stream.send_all(publish_handshake(client.client_id, ack=ack, topic=TOPIC))
                sent = 0
                while batches is None or sent < batches:
                    while next_index - client.acked >= 10 * PER_BATCH and not done.is_set():
                        await news.park()
                    if done.is_set():
                        break
                    seq = client.next_seq
                    client.next_seq += 1
                    data = encode_batch(client.client_id, seq, next_index, PER_BATCH, MAX_SIZE)
                    client.sent[seq] = SentBatch(next_index, PER_BATCH)
                    await stream.send_all(data)
                    client.published += PER_BATCH
                    next_index += PER_BATCH
                    sent += 1
                else:
                    await stream.send_eof()
            except trio.BrokenResourceError:
                pass
            await done.wait()


def committed_orders(cxl_path: str) -> dict[int, list[int]]:
    """Per client, the client_order of each committed message, in log order."""
    out: dict[int, list[int]] = {}
    with open_log(cxl_path) as log:
        for m in log.messages(TOPIC):
            out.setdefault(m.client_id, []).append(m.client_order)
    return out


def batch_states(cxl_path: str, topic: str) -> list[str]:
    with open_log(cxl_path) as log:
        return [b.state for b in log.batches(topic)]


def config_file(
    tmp_path: Path, cxl_path: str, *, direct: bool = False, storage_dir: str = "", extra: str = ""
) -> Path:
    path = tmp_path / "broker.toml"
    write_broker_config(
        path,
        cxl_path=cxl_path,
        cxl_mb=CXL_MB,
        segment_mb=SEGMENT_MB,
        direct=direct,
        storage_dir=storage_dir,
        extra=extra,
    )
    return path


def assert_verified(cxl_path: str, clients: list[Client]) -> None:
    report = verify(cxl_path, clients, MAX_SIZE)
    assert report.problems == []
    assert report.lost == 0
    assert report.present >= report.acked > 0


# -- kill -9 under load, re-attach ----------------------------------------------------------------


@pytest.mark.parametrize("direct", [False, True], ids=["staged", "direct"])
async def test_kill_9_under_load_then_reattach(tmp_path: Path, cxl_path: str, direct: bool) -> None:
    # The stalled batch below must still be in flight when the broker is killed.
    config = config_file(
        tmp_path, cxl_path, direct=direct, extra="payload_stall_timeout_s = 60.0\n"
    )
    clients = [Client(client_id=k) for k in (1, 2, 3)]
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            broker = BrokerProcess(config)
            port = await broker.start(nursery)
            async with trio.open_nursery() as load:
                for client in clients:
                    load.start_soon(publish, port, client)
                # A publisher stalled in the middle of its second batch, on a topic of its own.
                stalled = await trio.open_tcp_stream("127.0.0.1", port)
                await stalled.send_all(
                    publish_handshake(99, ack=1, topic="stall")
                    + encode_batch(99, 0, 0, 50, MAX_SIZE)
                    + encode_batch(99, 1, 50, 50, MAX_SIZE)[:1000]
                )
                await wait_until(lambda: all(c.acked >= 2000 for c in clients))
                # Direct: its second batch is received straight into reserved log space.
                in_flight = ["committed", "reserved"] if direct else ["committed"]
                await wait_until(lambda: batch_states(cxl_path, "stall") == in_flight)
                assert await broker.kill() == -9
                acked_at_kill = [c.acked for c in clients]
            await stalled.aclose()
            committed_at_kill = committed_orders(cxl_path)
            for client, acked in zip(clients, acked_at_kill, strict=True):
                # Nothing was acked that is not committed (and in order).
                orders = committed_at_kill[client.client_id]
                assert orders == list(range(len(orders)))
                assert len(orders) >= acked

            port = await broker.start(nursery)
            if direct:
                assert "discarded 1 uncommitted batch(es)" in broker.stderr
                assert batch_states(cxl_path, "stall") == ["committed", "abandoned"]
            else:
                assert batch_states(cxl_path, "stall") == ["committed"]
            assert "reserved" not in batch_states(cxl_path, TOPIC)
            # Every acked message is there, and every visible batch is whole and ours.
            assert_verified(cxl_path, clients)
            assert committed_orders(cxl_path) == committed_at_kill

            # Publishers resume from their last ack: offsets go on from where they were.
            async with trio.open_nursery() as load:
                for client in clients:
                    load.start_soon(partial(publish, port, client, batches=5))
            assert await broker.stop() == 0

    assert_verified(cxl_path, clients)
    after = committed_orders(cxl_path)
    for client, acked in zip(clients, acked_at_kill, strict=True):
        c = len(committed_at_kill[client.client_id])
        assert client.acked == acked + 5 * PER_BATCH
        # Committed-but-unacked messages come twice: that is the resend, never a gap.
        assert after[client.client_id] == list(range(c)) + list(range(acked, client.acked))
    with open_log(cxl_path) as log:
        offsets = [m.offset for m in log.messages(TOPIC)]
    assert offsets == list(range(len(offsets)))


# -- reset, and refusing what is not ours ---------------------------------------------------------


async def test_serve_reset_starts_empty(tmp_path: Path, cxl_path: str) -> None:
    config = config_file(tmp_path, cxl_path)
    client = Client(client_id=1)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            broker = BrokerProcess(config)
            port = await broker.start(nursery)
            await publish(port, client, batches=3)
            assert await broker.stop() == 0
            assert client.acked == 3 * PER_BATCH
            with open_log(cxl_path) as log:
                assert log.topic(TOPIC).messages == 3 * PER_BATCH

            port = await broker.start(nursery, "--reset")
            with open_log(cxl_path) as log:
                assert log.topics() == []
                assert log.units_used == 0
            assert os.stat(cxl_path).st_size == CXL_MB << 20
            # A fresh history: offsets and counts from 0.
            fresh = Client(client_id=2)
            await publish(port, fresh, batches=1)
            assert await broker.stop() == 0
    with open_log(cxl_path) as log:
        assert [(m.offset, m.client_id) for m in log.messages(TOPIC)] == [
            (i, 2) for i in range(PER_BATCH)
        ]


def make_region(path: str, size_mb: int, segment_mb: int) -> None:
    log = CxlLog.open(
        path,
        size=size_mb << 20,
        segment_size=segment_mb << 20,
        unit_size=64 << 10,  # the config's defaults
        max_topics=1024,
        max_brokers=4,
        broker_id=0,
        prefault=False,
    )
    log.close()


def zeros(path: str, size_mb: int, segment_mb: int) -> None:
    del segment_mb
    Path(path).write_bytes(bytes(size_mb << 20))


def digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


REFUSALS = {
    # What is in the file, what the config asks for, what stderr must say.
    "another-size": (
        lambda p: make_region(p, 16, SEGMENT_MB),
        f"is {16 << 20} bytes but the config asks for {CXL_MB << 20} (cxl.size_mb)",
    ),
    "another-segment-size": (
        lambda p: make_region(p, CXL_MB, 2),
        f"was made with another layout: segment size {2 << 20} (config: {SEGMENT_MB << 20})",
    ),
    "not-a-region": (
        lambda p: zeros(p, CXL_MB, SEGMENT_MB),
        "is not a trio-embarcadero CXL region",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
async def test_a_cxl_file_of_another_layout_is_refused(
    tmp_path: Path, cxl_path: str, case: str
) -> None:
    make, message = REFUSALS[case]
    make(cxl_path)
    before = digest(cxl_path)
    config = config_file(tmp_path, cxl_path)
    with trio.fail_after(TIMEOUT):
        result = await trio.run_process(
            [sys.executable, "-m", "trio_embarcadero", "serve", "--config", str(config)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=clean_environment(),
        )
    stderr = result.stderr.decode()
    assert result.returncode == 1
    assert message in stderr
    assert "--reset" in stderr  # it says how to get past it
    assert "listening on" not in stderr
    assert "Traceback" not in stderr
    assert digest(cxl_path) == before


# -- ack level 2: kill -9 and a lost region -------------------------------------------------------


async def test_ack2_survives_kill_9_and_the_loss_of_the_cxl_file(
    tmp_path: Path, cxl_path: str
) -> None:
    config = config_file(tmp_path, cxl_path, storage_dir=str(tmp_path / "disk"))
    clients = [Client(client_id=k) for k in (1, 2)]
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            broker = BrokerProcess(config)
            port = await broker.start(nursery)
            async with trio.open_nursery() as load:
                for client in clients:
                    load.start_soon(partial(publish, port, client, ack=2))
                await wait_until(lambda: all(c.acked >= 2000 for c in clients))
                assert await broker.kill() == -9
                acked_at_kill = [c.acked for c in clients]
            os.unlink(cxl_path)  # the reboot: /dev/shm is gone, the disk is not

            port = await broker.start(nursery)
            assert broker.replayed > 0
            assert "replayed" in broker.stderr
            assert_verified(cxl_path, clients)
            orders = committed_orders(cxl_path)
            for client, acked in zip(clients, acked_at_kill, strict=True):
                assert orders[client.client_id][:acked] == list(range(acked))
            async with trio.open_nursery() as load:
                for client in clients:
                    load.start_soon(partial(publish, port, client, ack=2, batches=5))
            assert await broker.stop() == 0
    assert_verified(cxl_path, clients)
    for client, acked in zip(clients, acked_at_kill, strict=True):
        assert client.acked == acked + 5 * PER_BATCH
    with open_log(cxl_path) as log:
        offsets = [m.offset for m in log.messages(TOPIC)]
    assert offsets == list(range(len(offsets)))
