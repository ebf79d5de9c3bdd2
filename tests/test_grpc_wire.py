"""The Trio-free halves of the gRPC cluster service: the protobuf codec of
``heartbeat.proto``'s messages (against the ``protobuf`` package, the reference
implementation) and the sans-IO gRPC server connection (against ``h2``'s
client side): calls and their answers, what a bad client costs, flow control.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import attrs
import pytest
from grpcclient import PREFIX, GrpcTestClient
from heartbeat_pb import PB
from hypothesis import given
from hypothesis import strategies as st

from trio_embarcadero.broker import protobuf as pb
from trio_embarcadero.broker.grpcwire import (
    CallCancelled,
    CallStarted,
    ConnectionEnded,
    Event,
    MessageReceived,
    RequestEnded,
    ServerConnection,
    encode_grpc_message,
    parse_timeout,
)
from trio_embarcadero.errors import RpcStatus

PACKAGE = Path(__file__).resolve().parent.parent / "trio_embarcadero"
METHOD = "/heartbeat_system.HeartBeat/GetClusterStatus"


def test_the_sans_io_modules_import_no_trio() -> None:
    for name in ("protobuf", "grpcwire"):
        tree = ast.parse((PACKAGE / "broker" / f"{name}.py").read_text())
        imported = {
            alias.name.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
        } | {
            (node.module or "").split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and not node.level
        }
        assert "trio" not in imported, name


# -- the protobuf codec ---------------------------------------------------------------------


def test_golden_bytes() -> None:
    # Written out from the protobuf encoding rules, not by either implementation.
    message = pb.CreateTopicRequest(topic="T", order=5, replication_factor=-1, sequencer_type=3)
    golden = bytes.fromhex("0a0154" + "1805" + "20" + "ff" * 9 + "01" + "3003")
    assert pb.encode(message) == golden
    assert pb.decode(pb.CreateTopicRequest, golden) == message
    # Repeated numbers are packed; defaults are left out.
    assert pb.encode(pb.ClientInfo(nodes_info=(0, 1, 300))) == bytes.fromhex("0a0400" + "01ac02")
    assert pb.encode(pb.ClusterStatus()) == b""
    assert pb.encode(pb.HeartbeatResponse(cluster_info=(pb.BrokerInfo(broker_id=2),))) == (
        bytes.fromhex("22020802")
    )


def test_reading_follows_protobufs_rules() -> None:
    # Unpacked repeated numbers, a field given twice (the last wins), an
    # unknown field of each wire type, a known field of another wire type.
    data = (
        bytes.fromhex("0800" + "0805")  # nodes_info 0 and 5, unpacked
        + bytes.fromhex("0a020102")  # and 1, 2 packed
        + bytes.fromhex("1001" + "19" + "00" * 8 + "22026869" + "2d00000000")  # unknown
    )
    assert pb.decode(pb.ClientInfo, data) == pb.ClientInfo(nodes_info=(0, 5, 1, 2))
    twice = bytes.fromhex("0a0161" + "0a0162" + "1801" + "1803")
    assert pb.decode(pb.CreateTopicRequest, twice) == pb.CreateTopicRequest(topic="b", order=3)
    # The topic as a varint is not a string: skipped as an unknown field.
    assert pb.decode(pb.CreateTopicRequest, bytes.fromhex("0805")) == pb.CreateTopicRequest()


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"\x0a\x05ab", "field 1 claims 5 bytes; 2 are left"),
        (b"\x18", "a varint at byte 1 is cut short"),
        (b"\x18" + b"\xff" * 11, "the varint at byte 1 is longer than 10 bytes"),
        (b"\x0b", "field 1 has wire type 3, which proto3 never uses"),
        (b"\x00\x01", "field number 0"),
        (b"\x0a\x02\xc3\x28", "topic is not UTF-8"),
        (b"\x19\x00", "field 3 is cut short"),
    ],
)
def test_malformed_messages_say_what_is_wrong(data: bytes, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        pb.decode(pb.CreateTopicRequest, data)


def test_values_out_of_range_are_refused() -> None:
    with pytest.raises(ValueError, match="order: 2147483648 is not a int32 value"):
        pb.encode(pb.CreateTopicRequest(order=2**31))
    with pytest.raises(ValueError, match="cluster_version: -1 is not a uint64 value"):
        pb.encode(pb.HeartbeatRequest(cluster_version=-1))


_INT32 = st.integers(-(2**31), 2**31 - 1)
_TEXT = st.text(max_size=40)

_REQUESTS = st.builds(
    pb.CreateTopicRequest,
    topic=_TEXT,
    replicate_tinode=st.booleans(),
    order=_INT32,
    replication_factor=_INT32,
    ack_level=_INT32,
    sequencer_type=st.integers(0, 3),
)
_RESPONSES = st.builds(
    pb.HeartbeatResponse,
    alive=st.booleans(),
    shutdown=st.booleans(),
    cluster_version=st.integers(0, 2**64 - 1),
    cluster_info=st.lists(
        st.builds(pb.BrokerInfo, broker_id=_INT32, address=_TEXT, network_mgr_addr=_TEXT),
        max_size=3,
    ).map(tuple),
)
_STATUSES = st.builds(
    pb.ClusterStatus,
    new_nodes=st.lists(_TEXT, max_size=4).map(tuple),
    removed_nodes=st.lists(_INT32, max_size=4).map(tuple),
)


def _pb(message: object) -> Any:
    """``message`` as the protobuf package's message."""
    return PB[type(message).__name__](**_as_dict(message))


def _reference(message: object) -> bytes:
    """``message`` encoded by the protobuf package."""
    return _pb(message).SerializeToString()  # type: ignore[no-any-return]


def _as_dict(message: object) -> dict[str, object]:
    values = {}
    for field in attrs.fields(type(message)):
        value = getattr(message, field.name)
        if isinstance(value, tuple):
            value = [_pb(v) if attrs.has(type(v)) else v for v in value]
        values[field.name] = value
    return values


@given(st.one_of(_REQUESTS, _RESPONSES, _STATUSES))
def test_the_codec_agrees_with_the_protobuf_package(message: object) -> None:
    ours = pb.encode(message)
    assert ours == _reference(message)  # both write fields in number order
    assert pb.decode(type(message), ours) == message
    parsed = PB[type(message).__name__].FromString(ours)
    assert parsed.SerializeToString() == ours


# -- the sans-IO server connection ----------------------------------------------------------


def pump(server: ServerConnection, client: GrpcTestClient) -> list[Event]:
    """Move bytes both ways until neither side has any; the server's events."""
    events: list[Event] = []
    while True:
        moved = False
        if data := client.data_to_send():
            events += server.receive(data)
            moved = True
        if data := server.data_to_send():
            client.receive(data)
            moved = True
        if not moved:
            return events


def connected(**limits: int) -> tuple[ServerConnection, GrpcTestClient]:
    server = ServerConnection(
        max_request_bytes=limits.get("max_request_bytes", 1024),
        max_concurrent_streams=limits.get("max_concurrent_streams", 4),
    )
    server.initiate()
    client = GrpcTestClient(window=limits.get("window", 65535))
    pump(server, client)
    return server, client


def test_a_unary_call() -> None:
    server, client = connected()
    stream = client.call(METHOD, b"\x08\x01", timeout=b"250m")
    assert pump(server, client) == [
        CallStarted(stream, METHOD, 0.25),
        MessageReceived(stream, b"\x08\x01"),
        RequestEnded(stream),
    ]
    assert server.calls == [stream]
    server.send_message(stream, b"answer")
    server.end_call(stream, RpcStatus.OK)
    pump(server, client)
    reply = client.replies[stream]
    assert reply.headers == {b":status": b"200", b"content-type": b"application/grpc"}
    assert reply.messages == [b"answer"]
    assert (reply.status, reply.ended, server.calls) == (0, True, [])


def test_an_error_before_any_message_is_trailers_only() -> None:
    server, client = connected()
    stream = client.call(METHOD)
    pump(server, client)
    server.end_call(stream, RpcStatus.INVALID_ARGUMENT, "100% wrong: é\n")
    pump(server, client)
    reply = client.replies[stream]
    assert (reply.trailers, reply.messages, reply.ended) == ({}, [], True)
    assert reply.headers[b"grpc-status"] == b"3"
    assert reply.headers[b"grpc-message"] == b"100%25 wrong: %C3%A9%0A"


def test_a_message_split_over_frames_and_several_calls_at_once() -> None:
    server, client = connected()
    one = client.call(METHOD, None, end=False)
    two = client.call(METHOD, None, end=False)
    framed = PREFIX.pack(0, 3) + b"abc"
    client.send(one, framed[:2])
    client.send(two, framed)
    events = pump(server, client)
    client.send(one, framed[2:], end=True)
    client.end(two)
    events += pump(server, client)
    assert events == [
        CallStarted(one, METHOD, None),
        CallStarted(two, METHOD, None),
        MessageReceived(two, b"abc"),
        MessageReceived(one, b"abc"),
        RequestEnded(one),
        RequestEnded(two),
    ]


@pytest.mark.parametrize(
    ("kwargs", "status"),
    [({"http_method": b"GET"}, b"405"), ({"content_type": b"application/json"}, b"415")],
)
def test_not_grpc_gets_an_http_status(kwargs: dict[str, bytes], status: bytes) -> None:
    server, client = connected()
    stream = client.call(METHOD, **kwargs)  # type: ignore[arg-type]
    assert pump(server, client) == []
    assert client.replies[stream].headers == {b":status": status}
    assert client.replies[stream].ended


@pytest.mark.parametrize(
    ("send", "status", "message"),
    [
        (
            PREFIX.pack(0, 1025),
            RpcStatus.RESOURCE_EXHAUSTED,
            "a request message has 1025 bytes; this server takes 1024 at most",
        ),
        (PREFIX.pack(1, 2) + b"xx", RpcStatus.UNIMPLEMENTED, "a compressed message"),
        (PREFIX.pack(0, 9) + b"abc", RpcStatus.INTERNAL, "the request ended inside a message"),
    ],
)
def test_a_bad_request_costs_its_call_only(send: bytes, status: RpcStatus, message: str) -> None:
    server, client = connected()
    good = client.call(METHOD, None, end=False)
    bad = client.call(METHOD, None, end=False)
    pump(server, client)
    client.send(bad, send, end=True)
    assert pump(server, client)[-1] == CallCancelled(bad)
    reply = client.replies[bad]
    assert (reply.status, reply.ended) == (status, True)
    assert message in reply.message
    # The other call goes on.
    client.send(good, PREFIX.pack(0, 1) + b"x", end=True)
    assert pump(server, client) == [MessageReceived(good, b"x"), RequestEnded(good)]
    assert server.calls == [good]


def test_bad_headers_of_a_grpc_call() -> None:
    server, client = connected()
    stream = client.call(METHOD, timeout=b"1 hour")
    assert pump(server, client) == []
    assert client.replies[stream].status == RpcStatus.INVALID_ARGUMENT
    assert "grpc-timeout b'1 hour'" in client.replies[stream].message


def test_the_client_cancels_a_call() -> None:
    server, client = connected()
    stream = client.call(METHOD)
    pump(server, client)
    client.h2.reset_stream(stream)
    assert pump(server, client) == [CallCancelled(stream)]
    assert server.calls == []
    server.send_message(stream, b"late")  # the handler had not noticed yet: nothing happens
    server.end_call(stream, RpcStatus.OK)
    assert pump(server, client) == []


def test_broken_http2_costs_the_connection() -> None:
    server, _ = connected()
    # A DATA frame on stream 0, which HTTP/2 forbids.
    events = server.receive(b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x")
    assert len(events) == 1
    assert isinstance(events[0], ConnectionEnded)
    assert events[0].error
    assert server.closed
    assert server.data_to_send()  # a GOAWAY saying why


def test_responses_wait_for_the_clients_window() -> None:
    server, client = connected(window=10)
    client.auto_window = False
    stream = client.call(METHOD)
    pump(server, client)
    server.send_message(stream, b"0123456789abcdef")  # 21 bytes with its prefix
    server.end_call(stream, RpcStatus.OK)
    pump(server, client)
    assert server.pending(stream) == 11
    assert not client.replies[stream].ended
    client.h2.acknowledge_received_data(10, stream)
    pump(server, client)
    assert server.pending(stream) == 1
    client.h2.acknowledge_received_data(10, stream)
    pump(server, client)
    reply = client.replies[stream]
    assert (reply.messages, reply.status, reply.ended) == ([b"0123456789abcdef"], 0, True)


def test_goaway_from_the_server() -> None:
    server, client = connected()
    server.close("bye")
    pump(server, client)
    assert client.goaway is not None
    assert client.goaway.additional_data == b"bye"


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(b"1S", 1.0), (b"250m", 0.25), (b"3M", 180.0), (b"2H", 7200.0), (b"5u", 5e-6)],
)
def test_parse_timeout(value: bytes, seconds: float) -> None:
    assert parse_timeout(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", [b"", b"S", b"123456789S", b"1s", b"-1S", b"1.5S"])
def test_parse_timeout_refuses(value: bytes) -> None:
    with pytest.raises(ValueError, match="is not 1-8 digits"):
        parse_timeout(value)


def test_encode_grpc_message() -> None:
    assert encode_grpc_message("plain text: ok") == b"plain text: ok"
    assert encode_grpc_message("50%\t") == b"50%25%09"
