"""The C++ original's ``heartbeat.proto`` as protobuf's own message classes, for tests.

The reference implementation (the ``protobuf`` package) on the other side of
the broker's hand-written codec: the descriptors are built here field by
field (no compiler), so tests can encode with one and decode with the other,
and the gRPC tests' client speaks real protobuf.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_F = descriptor_pb2.FieldDescriptorProto
_TYPES = {
    "int32": _F.TYPE_INT32,
    "int64": _F.TYPE_INT64,
    "uint64": _F.TYPE_UINT64,
    "bool": _F.TYPE_BOOL,
    "string": _F.TYPE_STRING,
}

#: Message name -> its fields: (name, number, type, repeated). A type that is
#: not a scalar names a message or the enum.
MESSAGES: dict[str, list[tuple[str, int, str, bool]]] = {
    "ClientInfo": [("nodes_info", 1, "int32", True)],
    "ClusterStatus": [("new_nodes", 1, "string", True), ("removed_nodes", 2, "int32", True)],
    "NodeInfo": [("node_id", 1, "string", False), ("address", 2, "string", False)],
    "BrokerInfo": [
        ("broker_id", 1, "int32", False),
        ("address", 2, "string", False),
        ("network_mgr_addr", 3, "string", False),
    ],
    "RegistrationStatus": [
        ("success", 1, "bool", False),
        ("broker_id", 2, "int64", False),
        ("message", 3, "string", False),
    ],
    "HeartbeatRequest": [("node_id", 1, "string", False), ("cluster_version", 2, "uint64", False)],
    "HeartbeatResponse": [
        ("alive", 1, "bool", False),
        ("shutdown", 2, "bool", False),
        ("cluster_version", 3, "uint64", False),
        ("cluster_info", 4, "BrokerInfo", True),
    ],
    "KillBrokersRequest": [("num_brokers", 1, "int64", False)],
    "KillBrokersResponse": [("success", 1, "bool", False)],
    "CreateTopicRequest": [
        ("topic", 1, "string", False),
        ("replicate_tinode", 2, "bool", False),
        ("order", 3, "int32", False),
        ("replication_factor", 4, "int32", False),
        ("ack_level", 5, "int32", False),
        ("sequencer_type", 6, "SequencerType", False),
    ],
    "CreateTopicResponse": [("success", 1, "bool", False)],
    "Empty": [],
}


def _build() -> dict[str, Any]:
    proto = descriptor_pb2.FileDescriptorProto(
        name="trio_embarcadero_test/heartbeat.proto", package="heartbeat_system", syntax="proto3"
    )
    enum = proto.enum_type.add(name="SequencerType")
    for number, name in enumerate(["EMBARCADERO", "KAFKA", "SCALOG", "CORFU"]):
        enum.value.add(name=name, number=number)
    for message_name, fields in MESSAGES.items():
        message = proto.message_type.add(name=message_name)
        for name, number, type_name, repeated in fields:
            label = _F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL
            field = message.field.add(name=name, number=number, label=label)
            if type_name in _TYPES:
                field.type = _TYPES[type_name]
            else:
                field.type = _F.TYPE_ENUM if type_name == "SequencerType" else _F.TYPE_MESSAGE
                field.type_name = f".heartbeat_system.{type_name}"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    find = pool.FindMessageTypeByName
    return {
        name: message_factory.GetMessageClass(find(f"heartbeat_system.{name}")) for name in MESSAGES
    }


#: Message name -> protobuf's class for it.
PB: dict[str, Any] = _build()
