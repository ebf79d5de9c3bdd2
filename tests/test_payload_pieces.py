"""A batch payload is read in pieces of at most 256 KiB, on both ingest paths.

A check of a batch's records right after its last byte finds them in the CPU
cache only if the last reads were small; one 2 MiB read left them in memory
(see ``_RECEIVE_PIECE``). The batch still arrives whole and is stored as sent.
"""

from __future__ import annotations

import pytest
import rawclient
import trio
from conftest import MakeConfig, wait_until
from memory import memory_broker, open_client

from trio_embarcadero.broker.publish import _RECEIVE_PIECE
from trio_embarcadero.log import open_log


@pytest.mark.parametrize("staged", [True, False], ids=["staged", "direct"])
async def test_a_large_payload_is_read_in_pieces_and_stored_whole(
    make_config: MakeConfig, staged: bool
) -> None:
    config = make_config(
        **{"network.use_nonblocking": staged, "network.staging_pool_buffer_size_mb": 2}
    )
    data, payloads = rawclient.batch(0, 3, 0, 1500, 1000)  # 1.6 MB of records
    assert len(data) > 4 * _RECEIVE_PIECE
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery, memory_broker(config) as (_, listener):
            client = await open_client(listener, nursery)
            await client.send(rawclient.handshake("pieces", client_id=3, ack=1))
            await client.send(data)
            await client.close()
            await wait_until(lambda: client.eof_at is not None)
            assert client.acks() == (0, [1500], None)
            asked = client.server.asked
            assert all(n is not None and n <= _RECEIVE_PIECE for n in asked), asked
            # The payload took at least as many reads as it has pieces.
            assert len(asked) >= (len(data) - rawclient.BATCH_HEADER.size) / _RECEIVE_PIECE
    with open_log(config.cxl.path) as log:
        stored = [m.payload for m in log.messages("pieces")]
    assert stored == payloads
