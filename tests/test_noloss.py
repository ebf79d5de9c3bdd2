"""The no-loss checker: short runs under every fault, and the checks it makes, made to fail.

The long run is on demand::

    python -m trio_embarcadero.tools.noloss --seconds 60 --faults disconnect,kill,pressure --ack 2
"""

from __future__ import annotations

import gc
import json
import sys

import numpy as np
import pytest
import trio

from trio_embarcadero.log import CxlLog
from trio_embarcadero.tools.noloss import (
    TOPIC,
    Client,
    Report,
    SentBatch,
    clean_environment,
    encode_batch,
    format_summary,
    verify,
)
from trio_embarcadero.wire import parse_batch_header, scan_records

MAX_SIZE = 100


async def run_checker(*args: str) -> tuple[int, dict[str, object], str]:
    with trio.fail_after(60):
        result = await trio.run_process(
            [sys.executable, "-m", "trio_embarcadero.tools.noloss", "--json", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=clean_environment(),
        )
    stdout = result.stdout.decode()
    assert stdout, result.stderr.decode()
    return result.returncode, json.loads(stdout.splitlines()[-1]), result.stderr.decode()


async def test_no_loss_under_every_fault_with_ack_2() -> None:
    status, report, stderr = await run_checker(
        "--seconds", "4", "--publishers", "3", "--seed", "7", "--ack", "2"
    )
    assert report["problems"] == [], stderr
    assert report["ok"] is True
    assert status == 0
    assert report["lost"] == 0
    assert report["faults"] == ["disconnect", "kill", "pressure"]
    # Every fault really happened, and the load was real.
    assert report["kills"] >= 1
    assert report["reboots"] >= 1  # the first kill also removes the CXL file
    assert report["replayed_from_disk"] > 0
    assert report["disconnects"] >= 1
    assert report["pauses"] >= 1
    assert isinstance(report["acked"], int)
    assert report["acked"] > 1000
    assert report["present"] >= report["acked"]


async def test_no_loss_on_the_direct_path() -> None:
    status, report, stderr = await run_checker(
        "--seconds", "2.5", "--publishers", "2", "--seed", "8", "--path", "direct",
        "--faults", "disconnect,kill",
    )  # fmt: skip
    assert report["problems"] == [], stderr
    assert status == 0
    assert report["path"] == "direct"
    assert report["kills"] >= 1
    # Each kill found a batch half received into the log, and the restart dropped it.
    assert report["discarded_at_restart"] >= report["kills"]
    assert report["lost"] == 0
    assert isinstance(report["acked"], int)
    assert report["acked"] > 0


async def test_no_loss_and_one_total_order_at_order_5() -> None:
    status, report, stderr = await run_checker(
        "--seconds", "2.5", "--publishers", "2", "--seed", "9", "--order", "5",
        "--faults", "disconnect,kill",
    )  # fmt: skip
    assert report["problems"] == [], stderr
    assert status == 0
    assert report["order"] == 5
    assert report["kills"] >= 1  # the head, its sequencer with it
    assert report["lost"] == report["total_order_errors"] == report["corrupt_messages"] == 0
    assert report["ordered_messages"] == report["log_messages"]
    assert isinstance(report["acked"], int)
    assert report["acked"] > 0


def test_bad_options_exit_2() -> None:
    from trio_embarcadero.tools.noloss import main

    assert main(["--path", "direct", "--faults", "pressure", "--seconds", "1"]) == 2
    with pytest.raises(SystemExit) as info:
        main(["--faults", "flood"])
    assert info.value.code == 2


# -- the verifier, on logs written directly -------------------------------------------------------


class Books:
    """A log written batch by batch, and the publishers' books beside it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.clients = {cid: Client(client_id=cid) for cid in (1, 2)}
        self._log = CxlLog.open(
            path,
            size=8192 + 4 * 65536,
            segment_size=65536,
            max_topics=2,
            max_brokers=1,
            broker_id=0,
            prefault=False,
        )

    def send(self, cid: int, seq: int, first: int, count: int) -> bytes:
        """Record a batch as sent; returns its bytes."""
        self.clients[cid].sent[seq] = SentBatch(first, count)
        self.clients[cid].published += count
        return encode_batch(cid, seq, first, count, MAX_SIZE)

    def commit(self, data: bytes) -> None:
        header = parse_batch_header(data[:128], 1 << 20)
        reservation = self._log.get_cxl_buffer(TOPIC, header)
        reservation.payload[:] = np.frombuffer(data[128:], dtype=np.uint8)
        self._log.complete(reservation, scan_records(reservation.payload, header.num_msg))

    def order(self, batches: int) -> None:
        """Give the first ``batches`` batches not ordered yet their place."""
        sequencer = self._log.sequencer(10**9)
        sequencer.step(0, budget=batches)
        sequencer.close()

    def verify(self, order: int = 0) -> Report:
        gc.collect()
        self._log.close()
        return verify(self.path, list(self.clients.values()), MAX_SIZE, order=order)


@pytest.fixture
def books(cxl_path: str) -> Books:
    return Books(cxl_path)


def publish_clean(books: Books) -> None:
    """Client 1: batches 0-9 and 10-19, both acked; client 2: 0-4, acked."""
    books.commit(books.send(1, 0, 0, 10))
    books.commit(books.send(2, 0, 0, 5))
    books.commit(books.send(1, 1, 10, 10))
    books.clients[1].acked = 20
    books.clients[2].acked = 5


def test_a_clean_log_passes(books: Books) -> None:
    publish_clean(books)
    report = books.verify()
    assert report.problems == []
    assert (report.acked, report.present, report.lost, report.duplicates) == (25, 25, 0, 0)
    assert (report.log_messages, report.log_batches) == (25, 3)


def test_resends_of_unacked_messages_are_duplicates_not_problems(books: Books) -> None:
    publish_clean(books)
    books.clients[1].acked = 15  # the ack of 15-19 was lost with the connection...
    books.commit(books.send(1, 2, 15, 10))  # ...so they are sent again, with 20-24
    books.clients[1].acked = 25
    report = books.verify()
    assert report.problems == []
    assert report.duplicates == 5
    assert report.present == 30


def test_a_missing_acked_message_is_loss(books: Books) -> None:
    publish_clean(books)
    books.send(1, 2, 20, 10)  # sent, "acked", never committed
    books.clients[1].acked = 30
    report = books.verify()
    assert report.lost == 10
    assert not report.ok
    assert "client 1: 10 acked message(s) missing, first [20, 21, 22, 23, 24]" in report.problems[0]


def test_a_changed_byte_is_corruption(books: Books) -> None:
    publish_clean(books)
    data = bytearray(books.send(2, 1, 5, 5))
    data[128 + 64 + 3] ^= 0xFF  # the first message's payload
    books.commit(bytes(data))
    books.clients[2].acked = 10
    report = books.verify()
    assert report.corrupt_messages == 1
    assert report.lost == 1  # the corrupt copy does not count as the message
    assert not report.ok


def test_a_batch_never_sent_or_committed_twice_is_caught(books: Books) -> None:
    publish_clean(books)
    books.commit(encode_batch(2, 9, 5, 5, MAX_SIZE))  # not in client 2's books
    books.commit(books.send(2, 1, 5, 2))
    books.commit(encode_batch(2, 1, 5, 2, MAX_SIZE))  # the same batch again
    report = books.verify()
    assert (report.foreign_batches, report.repeated_batches) == (1, 1)
    assert not report.ok


def test_messages_out_of_order_are_caught(books: Books) -> None:
    first = books.send(1, 0, 0, 10)
    books.commit(books.send(1, 1, 10, 10))  # the second batch is committed first
    books.commit(first)
    books.clients[1].acked = 20
    report = books.verify()
    # 10 comes before 0, then each of 0-9 comes after 19.
    assert report.order_violations == 11
    assert report.lost == 0
    assert not report.ok


def test_an_acked_message_without_a_place_in_the_total_order_is_caught(books: Books) -> None:
    books._log.topic_order = lambda _topic: 5
    publish_clean(books)
    books.order(2)  # the third batch (client 1's 10-19, acked) has no place yet
    report = books.verify(order=5)
    assert report.ordered_messages == 15
    assert report.total_order_errors == 10
    assert report.problems == [
        "client 1: 10 acked message(s) without a place in the total order, first "
        "[10, 11, 12, 13, 14]"
    ]


def test_the_report_says_failed() -> None:
    report = Report(acked=5, lost=1)
    report.problem("client 1: 1 acked message(s) missing")
    text = format_summary(
        {
            "ok": report.ok,
            "seconds": 1.0,
            "publishers": 1,
            "ack": 1,
            "path": "staged",
            "faults": [],
            "seed": 1,
            "kills": 0,
            "reboots": 0,
            "disconnects": 0,
            "pauses": 0,
            "sessions": 1,
            "discarded_at_restart": 0,
            "replayed_from_disk": 0,
            "error_frames": {},
            "error_texts": [],
            "published": 5,
            "acked": 5,
            "log_messages": 4,
            "log_batches": 1,
            "abandoned_batches": 0,
            "present": 4,
            "duplicates": 0,
            "unacked_present": 0,
            "offset_errors": 0,
            "foreign_batches": 0,
            "repeated_batches": 0,
            "corrupt_messages": 0,
            "order_violations": 0,
            "reclaimed": 0,
            "acked_reclaimed": 0,
            "lost": 1,
            "log_full": False,
            "problems": report.problems,
        }
    )
    assert text.splitlines()[-1] == "FAILED"
    assert "lost 1" in text
    assert "PROBLEM: client 1: 1 acked message(s) missing" in text
