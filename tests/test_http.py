"""The broker's HTTP endpoint: Prometheus metrics, health, stats and the admin API.

Every test talks to a real broker over loopback TCP with a real HTTP client
(the standard library's, on a worker thread), under ``trio.fail_after``; the
scraped text is read back with ``prometheus_client.parser``.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from conftest import MakeConfig, wait_until
from memory import MemoryListener
from prometheus_client.parser import text_string_to_metric_families
from rawclient import batch, handshake

from trio_embarcadero import open_broker, open_publisher, serve
from trio_embarcadero.broker import Broker
from trio_embarcadero.broker.connection import ConnectionPhase
from trio_embarcadero.config import Config
from trio_embarcadero.errors import ListenError
from trio_embarcadero.log.ownership import settings_path

TIMEOUT = 10.0

Answer = tuple[int, dict[str, str], bytes]


def _call(method: str, url: str, body: bytes | None) -> Answer:
    request = urllib.request.Request(url, data=body, method=method)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            headers = {k.lower(): v for k, v in response.headers.items()}
            return response.status, headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


async def http(method: str, url: str, body: Any = None) -> Answer:
    """One request with the standard library's client (on a worker thread)."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    return await trio.to_thread.run_sync(_call, method, url, data)


async def get_json(url: str) -> tuple[int, Any]:
    status, _, body = await http("GET", url)
    return status, json.loads(body)


def base_url(broker: Broker) -> str:
    assert broker.http_port
    return f"http://127.0.0.1:{broker.http_port}"


@asynccontextmanager
async def http_broker(config: Config) -> AsyncIterator[tuple[Broker, str]]:
    with trio.fail_after(TIMEOUT):
        async with open_broker(config) as broker:
            yield broker, base_url(broker)


def exists(path: str) -> bool:
    return os.path.exists(path)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape: (name, sorted labels) -> value."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


# -- metrics ------------------------------------------------------------------------------


async def test_metrics_are_read_from_the_statistics_at_scrape_time(
    make_config: MakeConfig, tmp_path: os.PathLike[str]
) -> None:
    config = make_config(**{"storage.dir": str(tmp_path)})
    async with http_broker(config) as (broker, url):
        for topic, ack, count in (("orders", 1, 3000), ("durable", 2, 500)):
            async with open_publisher(
                "127.0.0.1", broker.port, topic, ack=ack, batch_bytes=64 * 1024
            ) as pub:
                await pub.publish_many(b"m" * 100 for _ in range(count))
        stats = broker.statistics()
        status, headers, body = await http("GET", url + "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    text = body.decode()
    families = list(text_string_to_metric_families(text))
    assert all(f.name.startswith("trio_embarcadero_") for f in families)
    got = samples(text)

    def value(name: str, **labels: str) -> float:
        return got[(f"trio_embarcadero_{name}", tuple(sorted(labels.items())))]

    assert value("received_messages_total") == 3500 == stats.messages_received
    assert value("committed_messages_total") == 3500
    assert value("received_bytes_total") == stats.bytes_received
    assert value("committed_batches_total") == stats.batches_committed
    assert value("topic_committed_messages_total", topic="orders") == 3000
    assert value("topic_committed_messages_total", topic="durable") == 500
    assert value("topic_committed_bytes_total", topic="orders") == (
        stats.bytes_received * 3000 // 3500
    )
    assert value("topic_first_offset", topic="orders") == 0
    assert value("topic_retained_bytes", topic="durable") > 0
    # One batch size observation per batch, summing to the bytes received.
    assert value("batch_size_bytes_count") == stats.batches_received
    assert value("batch_size_bytes_sum") == stats.bytes_received
    assert value("batch_size_bytes_bucket", le="+Inf") == stats.batches_received
    # Every acked batch timed, at its own ack level.
    ack1 = stats.ack_latency["1"].count
    ack2 = stats.ack_latency["2"].count
    assert ack1 > 0
    assert ack2 > 0
    assert ack1 + ack2 == stats.batches_received
    assert value("ack_latency_seconds_count", ack="1") == ack1
    assert value("ack_latency_seconds_count", ack="2") == ack2
    assert value("ack_latency_seconds_bucket", ack="2", le="+Inf") == ack2
    assert value("disk_sync_seconds_count") >= 1
    assert value("disk_written_batches_total") == stats.batches_committed
    # Known label values are there at 0, not missing.
    assert value("errors_total", code="bad_batch_header") == 0
    assert value("connections", phase="wait_payload") == 0
    assert value("log_units", state="free") == stats.log.segments_free
    assert value("log_free_bytes") == stats.log.segments_free * stats.unit_bytes
    assert value("staging_buffers", state="free") == stats.pool.num_buffers
    assert value("draining") == 0


# -- health, stats, draining --------------------------------------------------------------


async def test_healthz_answers_503_while_the_broker_drains(make_config: MakeConfig) -> None:
    # A publisher half-way through a batch keeps the drain going (it may
    # finish the batch) while the endpoint stays up and says so.
    config = make_config(
        **{
            "network.payload_stall_timeout_s": 30.0,
            "network.shutdown_grace_s": 30.0,
        }
    )
    serving = trio.CancelScope()
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:

            async def run(*, task_status: trio.TaskStatus[Broker]) -> None:
                with serving:
                    await serve(config, task_status=task_status)

            broker: Broker = await nursery.start(run)
            url = base_url(broker)
            assert await get_json(url + "/healthz") == (200, {"status": "serving"})
            stream = await trio.open_tcp_stream("127.0.0.1", broker.port)
            data, _ = batch(0, 1, 0, 20, 100)
            await stream.send_all(handshake("orders") + data[:300])
            await wait_until(
                lambda: any(c.phase is ConnectionPhase.WAIT_PAYLOAD for c in broker.connections)
            )
            serving.cancel()
            await wait_until(lambda: broker.shutting_down)
            assert await get_json(url + "/healthz") == (503, {"status": "draining"})
            status, stats = await get_json(url + "/v1/stats")
            assert (status, stats["draining"]) == (200, True)
            assert stats["connections"]["wait_payload"] == 1
            await stream.send_all(data[300:])  # the batch completes: the drain can end
    # Gone with the broker.
    with pytest.raises(OSError, match="refused"):
        await trio.to_thread.run_sync(_call, "GET", url + "/healthz", None)
    await stream.aclose()


async def test_stats_is_the_snapshot_as_json(make_config: MakeConfig) -> None:
    async with http_broker(make_config()) as (broker, url):
        async with open_publisher("127.0.0.1", broker.port, "orders") as pub:
            await pub.publish_many(b"x" * 10 for _ in range(100))
        await wait_until(lambda: not broker.connections)  # nothing moves any more
        status, stats = await get_json(url + "/v1/stats")
        assert status == 200
        assert stats == json.loads(json.dumps(broker.statistics().to_json()))
    assert stats["messages_committed"] == 100
    assert stats["batch_bytes"]["counts"][-1] == 0  # nothing above the largest bucket
    assert stats["log_free_bytes"] == stats["log"]["segments_free"] * stats["unit_bytes"]


async def test_unknown_paths_and_methods(make_config: MakeConfig) -> None:
    async with http_broker(make_config()) as (_, url):
        status, _, body = await http("GET", url + "/nope")
        assert status == 404
        assert json.loads(body) == {"error": "Not Found", "message": "no such endpoint: /nope"}
        status, headers, body = await http("PUT", url + "/v1/topics")
        assert (status, headers["allow"]) == (405, "GET, POST")
        assert json.loads(body)["message"] == "PUT is not allowed on /v1/topics"
        status, headers, body = await http("HEAD", url + "/healthz")
        assert (status, body) == (200, b"")
        assert int(headers["content-length"]) > 0


async def test_a_taken_http_port_fails_the_start_first(make_config: MakeConfig) -> None:
    with trio.socket.socket() as taken:
        await taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # A fixed data port (served in memory here), so the HTTP port is fixed too.
        config = make_config(**{"broker.port": 1214, "http.port": port})
        with pytest.raises(ListenError, match=rf"127\.0\.0\.1:{port}: .*\(the HTTP endpoint"):
            async with open_broker(config, listeners=[MemoryListener()]):
                pass  # pragma: no cover
    assert not exists(config.cxl.path), "nothing opened before the ports"


async def test_http_can_be_turned_off(make_config: MakeConfig) -> None:
    async with open_broker(make_config(**{"http.enabled": False})) as broker:
        assert broker.http_port is None


# -- topics -------------------------------------------------------------------------------


async def test_create_list_and_delete_topics(make_config: MakeConfig) -> None:
    config = make_config(**{"cxl.reclaim_interval_ms": 1e9})  # no retention pass meanwhile
    async with http_broker(config) as (broker, url):
        body = {"name": "orders.eu", "order": 0, "retention_bytes": 65536}
        status, headers, answer = await http("POST", url + "/v1/topics", body)
        created = json.loads(answer)
        assert (status, headers["location"]) == (201, "/v1/topics/orders.eu")
        assert created["retention_bytes"] == 65536
        assert created["retention_ms"] == -1
        assert created["retention_source"] == {
            "retention_bytes": "api",
            "retention_ms": "default",
        }
        assert created["order"] == 0
        # The running broker applies it: retention would let the oldest
        # segments of this topic go, and of no other.
        assert broker.settings_for("orders.eu").retention_bytes == 65536
        assert broker.settings_for("orders").retention_bytes == -1
        for topic in ("orders.eu", "orders"):
            async with open_publisher(
                "127.0.0.1", broker.port, topic, batch_bytes=32 * 1024
            ) as pub:
                await pub.publish_many(b"y" * 1000 for _ in range(1000))
        assert broker.statistics().segments_reclaimable > 0
        status, listing = await get_json(url + "/v1/topics")
        assert status == 200
        assert [t["name"] for t in listing["topics"]] == ["orders", "orders.eu"]
        assert [(b["broker_id"], b["status"]) for b in listing["brokers"]] == [(0, "live")]
        eu = listing["topics"][1]
        assert eu["messages"] == 1000
        assert [s["broker"] for s in eu["streams"]] == [0]
        assert eu["streams"][0]["next_offset"] == 1000
        assert eu["streams"][0]["first_offset"] == 0
        assert listing["region"]["units_used"] > 0
        assert await get_json(url + "/v1/topics/orders.eu") == (200, eu)
        # Order 5 (one total order across brokers) is kept with the topic in the region.
        status, _, answer = await http("POST", url + "/v1/topics", {"name": "total", "order": 5})
        assert (status, json.loads(answer)["order"]) == (201, 5)
        assert (await get_json(url + "/v1/topics/total"))[1]["order"] == 5
        # Created again: refused, nothing changed.
        status, answer = (await http("POST", url + "/v1/topics", {"name": "orders"}))[::2]
        assert status == 409
        assert json.loads(answer)["message"] == (
            "topic 'orders' exists; delete it first to create it anew"
        )
        status, _, answer = await http("DELETE", url + "/v1/topics/orders.eu")
        assert status == 200
        assert json.loads(answer)["deleted"] == "orders.eu"
        assert json.loads(answer)["segments_freed"] > 0
        assert (await http("DELETE", url + "/v1/topics/orders.eu"))[0] == 404
        assert (await http("GET", url + "/v1/topics/orders.eu"))[0] == 404
        # Its settings went with it: a topic of the same name starts afresh.
        assert broker.settings_for("orders.eu").retention_bytes == -1
        assert not exists(settings_path(config.cxl.path))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{", "the body is not JSON: "),
        (b"[]", "the body must be a JSON object"),
        (b'{"name": "t", "retention": 5}', "unknown field(s) retention; a topic has name, "),
        (b'{"retention_ms": 5}', '"name" must be given, a string'),
        (b'{"name": "a/b"}', "topic name"),
        (b'{"name": "t", "order": 1}', "order 1 is not an order level: 0 (each broker's"),
        (b'{"name": "t", "order": "0"}', '"order" must be an integer'),
        (b'{"name": "t", "retention_ms": 0}', '"retention_ms" must be -1 (no limit) or > 0: 0'),
        (b'{"name": "t", "retention_bytes": "5"}', '"retention_bytes" must be an integer'),
        (b'{"name": "t", "retention_bytes": true}', '"retention_bytes" must be an integer'),
    ],
)
async def test_create_refuses_bad_bodies(
    make_config: MakeConfig, body: bytes, message: str
) -> None:
    async with http_broker(make_config()) as (_, url):
        status, _, answer = await http("POST", url + "/v1/topics", body)
        assert status == 400
        assert message in json.loads(answer)["message"]
        assert (await get_json(url + "/v1/topics"))[1]["topics"] == []


async def test_delete_is_refused_while_publishers_are_attached(make_config: MakeConfig) -> None:
    async with http_broker(make_config()) as (broker, url):
        async with open_publisher("127.0.0.1", broker.port, "orders") as pub:
            await pub.publish(b"first")
            await pub.flush()
            status, _, answer = await http("DELETE", url + "/v1/topics/orders")
            assert status == 409
            assert json.loads(answer)["message"] == (
                "topic 'orders' has publishers attached (broker 0: 1); stop them and try again"
            )
        assert (await http("DELETE", url + "/v1/topics/orders"))[0] == 200


async def test_topic_settings_outlive_the_broker_but_not_a_reset(make_config: MakeConfig) -> None:
    config = make_config()
    async with http_broker(config) as (_, url):
        body = {"name": "kept", "retention_ms": 60000}
        assert (await http("POST", url + "/v1/topics", body))[0] == 201
    async with http_broker(config) as (broker, url):
        assert broker.settings_for("kept").retention_ms == 60000
        status, topic = await get_json(url + "/v1/topics/kept")
        assert (status, topic["retention_source"]["retention_ms"]) == (200, "api")
    async with open_broker(config, reset=True) as broker:
        assert broker.log.topics() == {}
        assert broker.settings_for("kept").retention_ms == -1
    assert not exists(settings_path(config.cxl.path))
