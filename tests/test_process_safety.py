"""Another process writing a broker's log: the commit and the reader notice.

* The commit that finds its batch changed by another process refuses: no overwrite, no ack,
  and the broker stops.
* The reader raises on an offset gap between committed batches instead of skipping it.
"""

from __future__ import annotations

import mmap
import struct

import pytest
import trio
from conftest import MakeConfig
from memory import close_log, memory_broker, open_client, open_small_log, settle, walk_file
from rawclient import batch, handshake
from test_cxl import commit, reserve

from trio_embarcadero.errors import LayoutError
from trio_embarcadero.log import open_log
from trio_embarcadero.log.layout import BATCH_ABANDONED, BATCH_RESERVED
from trio_embarcadero.wire import BATCH_HEADER_SIZE, BH_BATCH_COMPLETE, scan_records

# -- the commit checks its batch is still reserved ------------------------------------------------


def set_state(path: str, header_offset: int, state: int) -> None:
    """Write a batch's state word through a mapping of our own, as another process would."""
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as region:
        struct.pack_into("<I", region, header_offset + BH_BATCH_COMPLETE, state)


def test_a_commit_refuses_a_batch_another_process_changed(cxl_path: str) -> None:
    log = open_small_log(cxl_path)
    commit(log, "a", [10] * 3)
    taken = reserve(log, "a", [10] * 4, seq=1)
    behind = reserve(log, "a", [10] * 5, seq=2)
    assert log.complete(behind, scan_records(behind.payload, 5)) == []  # waits for `taken`
    # Another process's recovery marks our in-flight batch abandoned; a reader may
    # already have walked past it.
    set_state(cxl_path, taken.header_offset, BATCH_ABANDONED)
    with pytest.raises(LayoutError, match=r"is no longer reserved.*another process"):
        log.complete(taken, scan_records(taken.payload, 4))
    # Nothing overwritten, nothing committed, nothing returned to ack.
    assert [h.batch_complete for h in walk_file(cxl_path)] == [1, 2, 0]
    assert not taken.resolved
    assert not behind.resolved
    assert log.stream("a").next_offset == 3
    # The handle writes nothing more.
    with pytest.raises(LayoutError, match="no longer reserved"):
        reserve(log, "a", [10], seq=3)
    assert log.abandon(behind) == []
    assert [h.batch_complete for h in walk_file(cxl_path)] == [1, 2, 0]
    del taken, behind
    close_log(log)


async def test_a_broker_whose_batch_another_process_changed_stops_without_acking(
    make_config: MakeConfig, cxl_path: str, autojump_clock: trio.testing.MockClock
) -> None:
    config = make_config(**{"network.use_nonblocking": False})  # reserve, then receive
    data, _ = batch(0, 5, 0, 10, 100)
    with trio.fail_after(60), pytest.RaisesGroup(LayoutError, flatten_subgroups=True):
        async with memory_broker(config) as (broker, listener), trio.open_nursery() as nursery:
            client = await open_client(listener, nursery)
            await client.send(handshake("t", client_id=5) + data[:BATCH_HEADER_SIZE])
            await settle()  # its log space is reserved, the payload not yet here
            ((offset, header),) = broker.log.walk(broker.log.topics()["t"], 0)
            assert header.batch_complete == BATCH_RESERVED
            set_state(cxl_path, offset, BATCH_ABANDONED)
            await client.send(data[BATCH_HEADER_SIZE:])
            await trio.sleep_forever()  # until the broker stops
    assert client.acks()[1] == []  # no ack for a batch the log refused
    assert [h.batch_complete for h in walk_file(cxl_path)] == [BATCH_ABANDONED]


# -- the reader reports a gap ----------------------------------------------------------------------


def test_the_reader_raises_on_an_offset_gap(cxl_path: str) -> None:
    log = open_small_log(cxl_path)
    commit(log, "a", [10] * 10)
    second = reserve(log, "a", [10] * 10, seq=1)
    third = reserve(log, "a", [10] * 10, seq=2)
    log.complete(third, scan_records(third.payload, 10))
    with open_log(cxl_path) as tailing:
        # A tailing reader has read up to the batch in flight.
        assert [m.offset for m in tailing.messages("a")] == list(range(10))
        assert log.complete(second, scan_records(second.payload, 10)) == [second, third]
        # Another process marks the batch abandoned (as a second broker's recovery did),
        # just as the reader walks past it: offsets 10-19 are not there for it, and it
        # says so instead of going on from 20.
        set_state(cxl_path, second.header_offset, BATCH_ABANDONED)
        with pytest.raises(LayoutError, match="starts at logical offset 20 where 10 is due"):
            list(tailing.messages("a", start=10))
    with open_log(cxl_path) as fresh:
        with pytest.raises(LayoutError, match="starts at logical offset 20 where 10 is due"):
            list(fresh.messages("a"))
        # Inspection still shows the stream as it is.
        assert [(b.state, b.first_offset) for b in fresh.batches("a")] == [
            ("committed", 0),
            ("abandoned", -1),
            ("committed", 20),
        ]
    del second, third
    close_log(log)
