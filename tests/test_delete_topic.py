"""Deleting a topic (log core, synchronous): every segment and the table slot
come back, the name starts again from offset 0, a deletion cut short at any
step is finished by the next start, and a topic with publishers attached is
refused."""

from __future__ import annotations

import signal
import socket
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from memory import close_log
from rawclient import ERROR_MARKER, batch, handshake, parse_ack_stream
from test_cli import (
    TIMEOUT,
    Served,
    committed_messages,
    recv_all,
    recv_exactly,
    run_cli,
    serve_cli,  # noqa: F401 (a fixture)
    write_config,
)
from test_process_safety import snapshot, wait_detached
from test_retention import fill, open_units

from trio_embarcadero.errors import TopicBusyError
from trio_embarcadero.log import open_log
from trio_embarcadero.log.layout import TOPIC_DELETING, TOPIC_STATE_OFFSET, U32, file_name
from trio_embarcadero.log.topics import delete_topic, delete_topic_file, finish_deletion


def test_a_deleted_topic_frees_every_segment_and_its_slot(cxl_path: str) -> None:
    log = open_units(cxl_path, max_topics=2)
    try:
        fill(log, "keep", 3)
        used = log.map.statistics().used
        fill(log, "gone", 60)
        assert log.map.statistics().used > used
        done = delete_topic_file(cxl_path, "gone")
        assert done.segments > 0
        assert log.map.statistics().used == used
        assert set(log.topics()) == {"keep"}
        # The slot is free: the table (2 slots) takes a new topic, and the
        # old name starts again from offset 0.
        fill(log, "other", 1)
        close_log(log)
        log = open_units(cxl_path, max_topics=2)
        assert log.stream("keep").next_offset == 3 * 8
        with open_log(cxl_path) as reader:
            assert {t.name for t in reader.topics()} == {"keep", "other"}
    finally:
        close_log(log)


def test_the_running_broker_notices_and_the_name_starts_from_zero(cxl_path: str) -> None:
    log = open_units(cxl_path)
    try:
        fill(log, "t", 60)
        delete_topic_file(cxl_path, "t")
        assert log.streams() == []
        fill(log, "t", 2)
        stream = log.stream("t")
        assert (stream.start_offset, stream.index_first[0], stream.batches) == (0, 0, 2)
        with open_log(cxl_path) as reader:
            assert [m.offset for m in reader.messages("t")][:1] == [0]
    finally:
        close_log(log)


def test_a_topic_with_publishers_attached_is_refused(cxl_path: str) -> None:
    log = open_units(cxl_path)
    try:
        fill(log, "t", 3)
        stream = log.attach_publisher("t")
        used = log.map.statistics().used
        with pytest.raises(TopicBusyError):
            delete_topic(log._mmap, log.geometry, log.map, "t", running={0})
        assert log.topics() == {"t": stream.topic_index}
        assert log.map.statistics().used == used
        # A broker that is not running has no publishers, whatever its count says.
        assert delete_topic(log._mmap, log.geometry, log.map, "t", running=set()) > 0
        log.detach_publisher(stream)  # of a deleted topic: nothing to undo
        assert log.topics() == {}
    finally:
        close_log(log)


@pytest.mark.parametrize("cut", ["marked", "streams-emptied", "one-freed"])
def test_a_deletion_cut_short_is_finished_at_the_next_start(cxl_path: str, cut: str) -> None:
    log = open_units(cxl_path)
    fill(log, "keep", 2)
    used = log.map.statistics().used
    fill(log, "gone", 60)
    index = log.topics()["gone"]
    segments = [s.unit for s in log.stream("gone").segments]
    g = log.geometry
    # The steps of a deletion, stopped where a kill -9 could stop them.
    U32.pack_into(log._mmap, g.topic_offset(index) + TOPIC_STATE_OFFSET, TOPIC_DELETING)
    if cut != "marked":
        entry = g.stream_offset(index, 0)
        U32.pack_into(log._mmap, entry, 0xFFFFFFFF)
    if cut == "one-freed":
        log.map.free(segments[0])
    log.close()
    log = open_units(cxl_path)
    try:
        assert set(log.topics()) == {"keep"}
        assert log.map.statistics().used == used
        assert log.stream("keep").batches == 2
        fill(log, "gone", 1)
        assert log.stream("gone").index_first == [0]
    finally:
        close_log(log)


def test_finishing_a_deletion_twice_changes_nothing(cxl_path: str) -> None:
    log = open_units(cxl_path)
    try:
        fill(log, "t", 30)
        index = log.topics()["t"]
        delete_topic(log._mmap, log.geometry, log.map, "t", running=())
        used = log.map.statistics().used
        assert finish_deletion(log._mmap, log.geometry, log.map, index) == 0
        assert log.map.statistics().used == used
    finally:
        close_log(log)


# -- the command against a running broker (real processes) ------------------------------


def test_delete_topic_against_a_running_broker(
    tmp_path: Path,
    cxl_path: str,
    serve_cli: Callable[..., Served],  # noqa: F811 (the fixture)
) -> None:
    storage = tmp_path / "disk"
    config = str(write_config(tmp_path, cxl_path, f'\n[storage]\ndir = "{storage}"\n'))
    served = serve_cli("--config", config)
    subscriber = socket.create_connection(("127.0.0.1", served.port), timeout=TIMEOUT)
    with socket.create_connection(("127.0.0.1", served.port), timeout=TIMEOUT) as attached:
        attached.sendall(handshake("cli", client_id=4, ack=2) + batch(0, 4, 0, 10, 64)[0])
        assert recv_exactly(attached, 12) == struct.pack("<iQ", 0, 10)
        subscriber.sendall(handshake("cli", client_id=9, ack=0, req=1))
        # A publisher is attached: refused, and nothing changes.
        before = snapshot(cxl_path, str(storage), wait=False)
        refused = run_cli("delete-topic", "cli", "--config", config)
        assert refused.returncode == 1
        assert "publishers attached (broker 0: 1)" in refused.stderr
        assert snapshot(cxl_path, str(storage), wait=False) == before
        attached.shutdown(socket.SHUT_WR)
        assert recv_all(attached) == b""  # no error: its acks were all sent
    wait_detached(cxl_path)
    done = run_cli("delete-topic", "cli", "--config", config)
    assert done.returncode == 0, done.stderr
    assert "deleted topic 'cli'" in done.stdout
    assert committed_messages(cxl_path, "cli") == -1
    first_file = file_name("cli", 0)
    assert [p.name for p in storage.iterdir() if p.name.startswith(f"{first_file}.deleted-")]
    assert not (storage / first_file).exists()
    # Published again, the topic starts from offset 0, on disk too, and the
    # broker goes on serving.
    with socket.create_connection(("127.0.0.1", served.port), timeout=TIMEOUT) as again:
        again.sendall(handshake("cli", client_id=5, ack=2) + batch(0, 5, 0, 7, 64)[0])
        again.shutdown(socket.SHUT_WR)
        assert parse_ack_stream(recv_all(again)) == (0, [7], None)
    # Acked at level 2: in a new disk log file of its own, from its first batch.
    assert (storage / first_file).stat().st_size > 7 * 64
    with open_log(cxl_path) as log:
        assert [m.offset for m in log.messages("cli")] == list(range(7))
    # The subscriber got the deleted topic's messages, then error 6 when it
    # woke up for the new topic's.
    with subscriber:
        received = recv_all(subscriber)
    assert struct.pack("<QI", ERROR_MARKER, 6) in received
    assert received.endswith(b"topic 'cli' was deleted")
    assert run_cli("delete-topic", "nope", "--config", config).returncode == 1
    code, stderr = served.stop(signal.SIGINT)
    assert code == 0, stderr
    assert "topic 'cli' was deleted" in stderr
    # The disk log holds the new topic alone: a restart replays nothing else.
    served = serve_cli("--config", config)
    assert served.stop(signal.SIGINT)[0] == 0
    assert committed_messages(cxl_path, "cli") == 7
