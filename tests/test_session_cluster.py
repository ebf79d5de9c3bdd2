"""Publish sessions across two broker processes on one region, with raw wire clients.

* A session's batches sent to broker 0 and then again to broker 1 are acked by
  both and stored once; a client that drew the same client id (another token)
  is refused by broker 1 at its handshake.
* Broker 1 is killed with SIGKILL while a session streams batches to it; the
  client sends every batch again, from the first, to broker 0: broker 0 acks
  them all and stores exactly those broker 1 had not stored (the claims broker
  1 held when it died are judged from the region), so 0 are lost and 0 stored
  twice.
"""

from __future__ import annotations

import collections
import re
from pathlib import Path

import rawclient
import trio
import trio.lowlevel
from tcpclient import connect, exchange, recv_ack_item, recv_broker_id

from trio_embarcadero.log import open_log
from trio_embarcadero.tools.noloss import BrokerProcess, write_broker_config

TIMEOUT = 30.0
TOPIC = "s"
MESSAGES = 4  # per batch


def hello(client_id: int, token: int) -> bytes:
    return rawclient.handshake(TOPIC, client_id=client_id, ack=1, req=2, last_addr=token)


def batch(client_id: int, seq: int) -> bytes:
    return rawclient.batch(seq, client_id, MESSAGES * seq, MESSAGES, 200)[0]


def acks_of(data: bytes) -> tuple[list[int], tuple[int, str] | None]:
    refused = data[:8] == b"\xff" * 8
    _, counts, error = rawclient.parse_ack_stream(data, with_broker_id=not refused)
    return counts, error


def stored(cxl_path: str) -> dict[int, collections.Counter[int]]:
    """Per client, how often each client order is in the region (any broker's stream)."""
    found: dict[int, collections.Counter[int]] = collections.defaultdict(collections.Counter)
    with open_log(cxl_path) as log:
        for message in log.messages(TOPIC, broker_id=0):
            found[message.client_id][message.client_order] += 1
        for message in log.messages(TOPIC, broker_id=1):
            found[message.client_id][message.client_order] += 1
    return found


async def stream_until_killed(port: int, victim: BrokerProcess, batches: int) -> int:
    """Send session batches 0.. to ``port`` a little at a time, reading acks;
    SIGKILL ``victim`` once a fifth of them are acked. Returns the last count."""
    count = 0
    async with await connect(port) as stream:
        await stream.send_all(hello(2, 0xBEEF))

        async def send() -> None:
            try:
                for seq in range(batches):
                    await stream.send_all(batch(2, seq))
                    await trio.lowlevel.checkpoint()
            except trio.BrokenResourceError:
                pass  # it died

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            assert await recv_broker_id(stream) == 1
            while count < MESSAGES * batches // 5:
                item = await recv_ack_item(stream)
                assert isinstance(item, int), item
                count = item
            await victim.kill()  # mid-stream: batches on their way, claims held
            nursery.cancel_scope.cancel()
    return count


async def test_sessions_across_two_broker_processes(tmp_path: Path, cxl_path: str) -> None:
    config = tmp_path / "broker.toml"
    write_broker_config(config, cxl_path=cxl_path, cxl_mb=64)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            zero, one = BrokerProcess(config), BrokerProcess(config)
            await zero.start(nursery, "--reset")
            await one.start(nursery, "--broker-id", "1")

            # Sent to broker 0, then again (and more) to broker 1.
            sent = [batch(1, s) for s in range(9)]
            first = await exchange(zero.port, hello(1, 0xA), *sent[:6], eof=True)
            assert acks_of(first)[0][-1] == 6 * MESSAGES
            again = await exchange(one.port, hello(1, 0xA), *sent, eof=True)
            counts, error = acks_of(again)
            assert (counts[-1], error) == (9 * MESSAGES, None)
            # Another client that drew id 1: refused at its handshake.
            stranger = await exchange(one.port, hello(1, 0xB), sent[0], eof=True)
            assert acks_of(stranger) == (
                [],
                (
                    6,
                    "client id 1 on topic 's' is in use by another publish session (another "
                    "token): two clients share the id; reconnect with another client_id",
                ),
            )

            # Broker 1 dies mid-stream; everything goes again, to broker 0.
            total = 200
            acked = await stream_until_killed(one.port, one, total)
            assert acked >= total * MESSAGES // 5
            resent = await exchange(
                zero.port, hello(2, 0xBEEF), *(batch(2, s) for s in range(total)), eof=True
            )
            counts, error = acks_of(resent)
            assert error is None
            assert counts[-1] == total * MESSAGES  # every batch acked, stored or not
            assert await zero.stop() == 0

    found = stored(cxl_path)
    assert found[1] == collections.Counter(range(9 * MESSAGES))  # once each
    assert found[2] == collections.Counter(range(total * MESSAGES))  # 0 lost, 0 twice
    with open_log(cxl_path) as log:
        by_broker_1 = sum(1 for m in log.messages(TOPIC, broker_id=1) if m.client_id == 2)
    # Broker 1 stored what it had acked, maybe more; broker 0 acked each of
    # those as a duplicate, and stored the rest.
    assert by_broker_1 >= acked
    final = re.findall(r"(\d+) duplicates acked without storing them again", zero.stderr)
    assert int(final[-1]) == by_broker_1 // MESSAGES
