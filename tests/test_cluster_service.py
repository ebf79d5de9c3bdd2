"""The head's gRPC cluster service (``heartbeat_system.HeartBeat``) with a real
gRPC client, ``grpcio``, speaking real protobuf (the ``protobuf`` package):
the calls of the stock C++ client and what the service answers.

The head is a broker in this process; a second broker of the region is a
``serve --broker-id 1`` process with the same config file, killed with
SIGKILL to leave. grpcio blocks, so its calls run on worker threads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import trio
from conftest import MakeConfig
from heartbeat_pb import PB
from memory import MemoryListener

from trio_embarcadero import open_publisher
from trio_embarcadero.broker import open_broker
from trio_embarcadero.broker.heartbeat import ClusterView, LiveBroker, cluster_status
from trio_embarcadero.cli import main
from trio_embarcadero.config import load_config
from trio_embarcadero.errors import ListenError
from trio_embarcadero.tools.noloss import BrokerProcess

SERVICE = "/heartbeat_system.HeartBeat/"


def write_config(tmp_path: Path, cxl_path: str) -> Path:
    path = tmp_path / "broker.toml"
    path.write_text(
        f"""
[broker]
port = 0

[cluster]
grpc_port = 12140

[network]
staging_pool_buffer_size_mb = 1
staging_pool_num_buffers = 4
shutdown_grace_s = 3.0

[cxl]
path = "{cxl_path}"
size_mb = 16
segment_mb = 4
prefault = false

[http]
enabled = false
"""
    )
    return path


class HeartBeat:
    """A grpcio client of the service, with protobuf's serializers."""

    def __init__(self, port: int) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")

    def unary(self, method: str, response: str) -> Callable[..., Any]:
        return self.channel.unary_unary(
            SERVICE + method,
            request_serializer=_serialize,
            response_deserializer=PB[response].FromString,
        )

    def subscribe(self, known: list[int], timeout: float = 30) -> Any:
        call = self.channel.unary_stream(
            SERVICE + "SubscribeToCluster",
            request_serializer=_serialize,
            response_deserializer=PB["ClusterStatus"].FromString,
        )
        return call(PB["ClientInfo"](nodes_info=known), timeout=timeout)


def _serialize(message: Any) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()  # type: ignore[no-any-return]


async def next_update(stream: Iterator[Any]) -> tuple[list[str], list[int]]:
    status = await trio.to_thread.run_sync(next, stream, abandon_on_cancel=True)
    return list(status.new_nodes), list(status.removed_nodes)


def read_to_end(stream: Iterator[Any]) -> tuple[list[tuple[list[str], list[int]]], Any]:
    """The updates left in ``stream`` and the error that ended it."""
    updates = []
    try:
        for status in stream:
            updates.append((list(status.new_nodes), list(status.removed_nodes)))  # noqa: PERF401
    except grpc.RpcError as error:
        return updates, error
    raise AssertionError("the stream ended without an error")


async def rpc(function: Callable[..., Any], request: Any) -> Any:
    return await trio.to_thread.run_sync(
        lambda: function(request, timeout=10), abandon_on_cancel=True
    )


async def rpc_error(function: Callable[..., Any], request: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        await rpc(function, request)
    return info.value.code(), info.value.details()


async def test_the_cxx_clients_calls(
    tmp_path: Path, cxl_path: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config_path = write_config(tmp_path, cxl_path)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            async with open_broker(load_config(config_path, env={})) as head:
                assert head.grpc_port is not None
                client = HeartBeat(head.grpc_port)
                # The C++ publisher knows the head (id 0) and waits for a first
                # message, empty or not, to start.
                stream = client.subscribe([0])
                assert await next_update(stream) == ([], [])
                # Its subscriber knows no broker: it learns of the head too.
                status = client.unary("GetClusterStatus", "ClusterStatus")
                answer = await rpc(status, PB["ClientInfo"]())
                assert list(answer.new_nodes) == [f"127.0.0.1:{head.port}"]
                answer = await rpc(status, PB["ClientInfo"](nodes_info=[0, 3]))
                assert (list(answer.new_nodes), list(answer.removed_nodes)) == ([], [3])

                # A second broker joins the region (the same config: it serves no gRPC).
                one = BrokerProcess(config_path)
                port = await one.start(nursery, "--broker-id", "1")
                assert await next_update(stream) == ([f"127.0.0.1:{port}"], [])
                assert "broker 0 serves the gRPC cluster service, not broker 1" in one.stderr

                # Topics: created with their order; again with the same order is
                # fine, with another not.
                create = client.unary("CreateNewTopic", "CreateTopicResponse")
                request = PB["CreateTopicRequest"]
                answer = await rpc(create, request(topic="TestTopic", order=5, ack_level=1))
                assert answer.success
                assert (await rpc(create, request(topic="TestTopic", order=5))).success
                async with open_publisher("127.0.0.1", head.port, "TestTopic") as publisher:
                    await publisher.publish_many([b"message"] * 10)  # acked once ordered
                assert await rpc_error(create, request(topic="TestTopic")) == (
                    grpc.StatusCode.ALREADY_EXISTS,
                    "topic 'TestTopic' exists with order 5, not 0; delete it "
                    "(trio-embarcadero delete-topic TestTopic) to create it anew",
                )

                # Bad requests cost their call (or their connection) only.
                assert await rpc_error(create, request(topic="orders", order=3)) == (
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "order 3 is not an order level: 0 (each broker's stream in its own order) "
                    "or 5 (one total order across brokers)",
                )
                assert await rpc_error(create, request(topic="no space", order=5)) == (
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "invalid topic name 'no space': want 1-31 of [A-Za-z0-9._-]",
                )
                assert await rpc_error(create, request(topic="c", sequencer_type=3)) == (
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "sequencer type 3 is not EMBARCADERO (0), the only one this broker has "
                    "(order 5 is its sequencer)",
                )
                assert await rpc_error(create, b"\x0b") == (
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "the request is not a heartbeat_system.CreateTopicRequest: field 1 has "
                    "wire type 3, which proto3 never uses",
                )
                code, _ = await rpc_error(client.unary("Nope", "Empty"), PB["Empty"]())
                assert code == grpc.StatusCode.UNIMPLEMENTED
                async with await trio.open_tcp_stream("127.0.0.1", head.grpc_port) as raw:
                    await raw.send_all(b"GET / HTTP/1.1\r\nhost: broker\r\n\r\n")
                    while await raw.receive_some(65536):
                        pass  # a GOAWAY, then the close

                # The rest of the service.
                heartbeat = client.unary("Heartbeat", "HeartbeatResponse")
                assert one.process is not None
                answer = await rpc(heartbeat, PB["HeartbeatRequest"](node_id=str(one.process.pid)))
                assert (answer.alive, answer.shutdown) == (True, False)
                assert [(b.broker_id, b.network_mgr_addr) for b in answer.cluster_info] == [
                    (0, f"127.0.0.1:{head.port}"),
                    (1, f"127.0.0.1:{port}"),
                ]
                current = PB["HeartbeatRequest"](
                    node_id="1", cluster_version=answer.cluster_version
                )
                answer = await rpc(heartbeat, current)
                assert (answer.alive, list(answer.cluster_info)) == (False, [])
                register = client.unary("RegisterNode", "RegistrationStatus")
                answer = await rpc(register, PB["NodeInfo"](node_id="7", address="10.0.0.1"))
                assert (answer.success, answer.broker_id) == (False, -1)
                kill = client.unary("KillBrokers", "KillBrokersResponse")
                code, _ = await rpc_error(kill, PB["KillBrokersRequest"](num_brokers=1))
                assert code == grpc.StatusCode.PERMISSION_DENIED

                # kill -9: its entry still says live, its lock is gone.
                await one.kill()
                assert await next_update(stream) == ([], [1])
            # The head drained: the stream ends with its status (after an
            # update saying the head is gone, if the watch saw it draining).
            updates, error = await trio.to_thread.run_sync(read_to_end, stream)
            assert updates in ([], [([], [0])])
            assert (error.code(), error.details()) == (
                grpc.StatusCode.UNAVAILABLE,
                "the broker is shutting down",
            )
            client.channel.close()
    assert main(["topics", "--cxl-path", cxl_path]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert rows[1][:4] == ["TestTopic", "5", "0", "10"]


async def test_a_taken_grpc_port_fails_the_start_first(make_config: MakeConfig) -> None:
    with trio.socket.socket() as taken:
        await taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # A fixed data port (served in memory here), so the gRPC port is fixed too.
        config = make_config(
            **{"broker.port": 1214, "http.enabled": False, "cluster.grpc_port": port}
        )
        with pytest.raises(ListenError) as info:
            async with open_broker(config, listeners=[MemoryListener()]):
                pass  # pragma: no cover
    assert str(info.value) == (
        f"cannot listen on 127.0.0.1:{port}: address already in use (the gRPC cluster "
        "service: set cluster.grpc_port, or 0 to turn it off)"
    )
    assert not await trio.Path(config.cxl.path).exists(), "nothing opened before the ports"


async def test_only_the_head_serves_it(make_config: MakeConfig) -> None:
    async with open_broker(make_config()) as broker:
        assert broker.grpc_port is None  # off by default
    async with open_broker(make_config(**{"cluster.grpc_port": 12140, "broker.id": 1})) as one:
        assert one.grpc_port is None


def test_what_a_client_is_told() -> None:
    def view(version: int, *brokers: tuple[int, str, int]) -> ClusterView:
        return ClusterView(
            version, {i: LiveBroker(i, host, port, 100 + i) for i, host, port in brokers}
        )

    known: dict[int, str | None] = {0: None}  # the C++ publisher's start
    head = (0, "127.0.0.1", 1214)
    status = cluster_status(known, view(1, head), "127.0.0.1")
    assert (status.new_nodes, status.removed_nodes) == ((), ())
    status = cluster_status(known, view(2, head, (1, "0.0.0.0", 1215)), "10.1.2.3")
    assert (status.new_nodes, status.removed_nodes) == (("10.1.2.3:1215",), ())
    # Broker 1 comes back on another address: told again; a broker gone: removed.
    status = cluster_status(known, view(3, (1, "::1", 1216), (2, "h", 1)), "10.1.2.3")
    assert (status.new_nodes, status.removed_nodes) == (("[::1]:1216", "h:1"), (0,))
    assert known == {1: "[::1]:1216", 2: "h:1"}
    status = cluster_status(known, view(4, (1, "::1", 1216), (2, "h", 1)), "10.1.2.3")
    assert (status.new_nodes, status.removed_nodes) == ((), ())
