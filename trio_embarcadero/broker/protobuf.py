"""Protocol Buffers (proto3) for the messages of the C++ client's cluster service.

The stock C++ Embarcadero client talks to the head broker's
``heartbeat_system.HeartBeat`` gRPC service (:mod:`.heartbeat`) with the
dozen small messages of the original's ``heartbeat.proto``, each a few
scalar fields. They are declared here as frozen attrs classes whose fields
carry their field number and type (:func:`field`), and read and written by
a small codec of the protobuf wire format: varints, length-delimited
fields, packed repeated numbers. No generated code and no protobuf runtime:
the messages are few and fixed, and this needs no compiler at install time
and nothing to import at start-up.

Reading follows the protobuf library's rules, so any conforming writer
(the C++ client's generated code) is understood: fields may come in any
order and more than once (the last value of a singular field wins, repeated
ones add up), repeated numbers packed or not, unknown fields (and known
ones of an unexpected wire type) are skipped, ``int32`` values are the low
32 bits of the varint taken as signed. Writing is proto3's: fields at their
default value are left out, repeated numbers are packed.

Nothing here does I/O; malformed input raises :class:`ValueError` saying
what is wrong.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from typing import Any, Final, TypeVar

import attrs

_M = TypeVar("_M")

#: Wire types (the low 3 bits of a field's key).
VARINT: Final = 0
FIXED64: Final = 1
LENGTH_DELIMITED: Final = 2
FIXED32: Final = 5

_U64: Final = (1 << 64) - 1
_MAX_VARINT_BYTES: Final = 10
_METADATA_KEY: Final = "protobuf"


class Kind(enum.Enum):
    """A scalar field's protobuf type."""

    INT32 = "int32"
    INT64 = "int64"
    UINT64 = "uint64"
    BOOL = "bool"
    STRING = "string"
    #: An enum: an open set of int32 values in proto3 (unknown ones are kept).
    ENUM = "enum"


_RANGES: Final = {
    Kind.INT32: (-(1 << 31), (1 << 31) - 1),
    Kind.ENUM: (-(1 << 31), (1 << 31) - 1),
    Kind.INT64: (-(1 << 63), (1 << 63) - 1),
    Kind.UINT64: (0, _U64),
}
_DEFAULTS: Final[dict[Kind, object]] = {
    Kind.INT32: 0,
    Kind.INT64: 0,
    Kind.UINT64: 0,
    Kind.BOOL: False,
    Kind.STRING: "",
    Kind.ENUM: 0,
}


@attrs.frozen
class _Spec:
    number: int
    kind: Kind | type  # a Kind, or a message class
    repeated: bool


def field(number: int, kind: Kind | type, *, repeated: bool = False) -> Any:
    """An attrs field of a message: protobuf field ``number`` of type ``kind``.

    Args:
        number: The field number (1 to 2**29 - 1).
        kind: A scalar :class:`Kind`, or a message class (declared with
            these fields too) for a nested message.
        repeated: A repeated field, held as a tuple.
    """
    spec = _Spec(number, kind, repeated)
    if repeated:
        return attrs.field(factory=tuple, converter=tuple, metadata={_METADATA_KEY: spec})
    if isinstance(kind, Kind):
        return attrs.field(default=_DEFAULTS[kind], metadata={_METADATA_KEY: spec})
    return attrs.field(default=None, metadata={_METADATA_KEY: spec})


_SPECS: dict[type, dict[int, tuple[str, _Spec]]] = {}


def _specs(cls: type) -> dict[int, tuple[str, _Spec]]:
    """A message class's fields by number, in number order (read from its
    attrs fields once)."""
    found = _SPECS.get(cls)
    if found is None:
        fields = [a for a in attrs.fields(cls) if _METADATA_KEY in a.metadata]
        found = _SPECS[cls] = {
            a.metadata[_METADATA_KEY].number: (a.name, a.metadata[_METADATA_KEY])
            for a in sorted(fields, key=lambda a: a.metadata[_METADATA_KEY].number)
        }
    return found


# -- varints ---------------------------------------------------------------------------


def encode_varint(value: int) -> bytes:
    """``value`` (0 to 2**64 - 1) as a base-128 varint."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def decode_varint(data: bytes | memoryview, pos: int) -> tuple[int, int]:
    """The varint at ``data[pos:]`` and the position after it.

    Raises:
        ValueError: The varint is cut short or longer than 10 bytes.
    """
    result = shift = 0
    for i in range(pos, min(pos + _MAX_VARINT_BYTES, len(data))):
        byte = data[i]
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result & _U64, i + 1
        shift += 7
    if len(data) - pos < _MAX_VARINT_BYTES:
        raise ValueError(f"a varint at byte {pos} is cut short")
    raise ValueError(f"the varint at byte {pos} is longer than {_MAX_VARINT_BYTES} bytes")


def _signed(value: int, bits: int) -> int:
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


# -- writing ---------------------------------------------------------------------------


def _key(number: int, wire_type: int) -> bytes:
    return encode_varint(number << 3 | wire_type)


def _scalar_varint(kind: Kind, value: Any, name: str) -> bytes:
    if kind is Kind.BOOL:
        return b"\x01" if value else b"\x00"
    low, high = _RANGES[kind]
    if not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name}: {value!r} is not a {kind.value} value")
    # Negative int32/int64 values are sign-extended to 64 bits (10 bytes).
    return encode_varint(value & _U64)


def encode(message: object) -> bytes:
    """``message`` (a class of this module's kind) in the protobuf wire format.

    Raises:
        ValueError: A field's value does not fit its type.
    """
    out = bytearray()
    for number, (name, spec) in _specs(type(message)).items():
        value = getattr(message, name)
        kind = spec.kind
        if spec.repeated:
            if not value:
                continue
            if kind is Kind.STRING or not isinstance(kind, Kind):
                for item in value:
                    out += _length_delimited(number, kind, item, name)
            else:  # numbers are packed (proto3's default)
                packed = b"".join(_scalar_varint(kind, item, name) for item in value)
                out += _key(number, LENGTH_DELIMITED) + encode_varint(len(packed)) + packed
        elif isinstance(kind, Kind) and kind is not Kind.STRING:
            if value != _DEFAULTS[kind]:
                out += _key(number, VARINT) + _scalar_varint(kind, value, name)
        elif value is not None and value != "":
            out += _length_delimited(number, kind, value, name)
    return bytes(out)


def _length_delimited(number: int, kind: Kind | type, value: Any, name: str) -> bytes:
    if kind is Kind.STRING:
        if not isinstance(value, str):
            raise ValueError(f"{name}: {value!r} is not a string")
        raw = value.encode("utf-8")
    else:
        raw = encode(value)
    return _key(number, LENGTH_DELIMITED) + encode_varint(len(raw)) + raw


# -- reading ---------------------------------------------------------------------------


def _fields(data: bytes | memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value) of each field: an int for varints,
    the bytes of a length-delimited field, 0 for fixed-size ones."""
    view = memoryview(data)
    pos, end = 0, len(view)
    while pos < end:
        key, pos = decode_varint(view, pos)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise ValueError(f"field number 0 at byte {pos}")
        value: int | memoryview = 0
        if wire_type == VARINT:
            value, pos = decode_varint(view, pos)
        elif wire_type == LENGTH_DELIMITED:
            size, pos = decode_varint(view, pos)
            if size > end - pos:
                raise ValueError(f"field {number} claims {size} bytes; {end - pos} are left")
            value, pos = view[pos : pos + size], pos + size
        elif wire_type in (FIXED64, FIXED32):
            size = 8 if wire_type == FIXED64 else 4
            if size > end - pos:
                raise ValueError(f"field {number} is cut short")
            pos += size
        else:  # 3 and 4 are proto2 groups; 6 and 7 are not wire types
            raise ValueError(f"field {number} has wire type {wire_type}, which proto3 never uses")
        yield number, wire_type, value


def _from_varint(kind: Kind, raw: int) -> int | bool:
    if kind is Kind.BOOL:
        return raw != 0
    if kind in (Kind.INT32, Kind.ENUM):
        return _signed(raw, 32)
    if kind is Kind.INT64:
        return _signed(raw, 64)
    return raw


def decode(cls: type[_M], data: bytes | memoryview) -> _M:
    """A ``cls`` message read from ``data`` (the protobuf wire format).

    Raises:
        ValueError: ``data`` is not a well-formed message (a field cut
            short, a string that is not UTF-8, a proto2 group).
    """
    specs = _specs(cls)
    values: dict[str, Any] = {}
    for number, wire_type, value in _fields(data):
        found = specs.get(number)
        if found is None:
            continue  # an unknown field: skipped, as protobuf does
        name, spec = found
        kind = spec.kind
        decoded: list[Any]
        if isinstance(kind, Kind) and kind is not Kind.STRING:
            if wire_type == VARINT:
                assert isinstance(value, int)
                decoded = [_from_varint(kind, value)]
            elif wire_type == LENGTH_DELIMITED and spec.repeated:
                assert isinstance(value, memoryview)
                decoded = [_from_varint(kind, raw) for raw in _packed(value, name)]
            else:
                continue  # a wire type this field cannot have: an unknown field
        elif wire_type == LENGTH_DELIMITED:
            assert isinstance(value, memoryview)
            decoded = [_string(value, name) if kind is Kind.STRING else decode(kind, value)]
        else:
            continue
        if spec.repeated:
            values[name] = values.get(name, ()) + tuple(decoded)
        else:
            values[name] = decoded[-1]
    return cls(**values)


def _packed(data: memoryview, name: str) -> Iterator[int]:
    pos = 0
    while pos < len(data):
        try:
            raw, pos = decode_varint(data, pos)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
        yield raw


def _string(data: memoryview, name: str) -> str:
    try:
        return str(data, "utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{name} is not UTF-8: {exc.reason} at byte {exc.start}") from None


# -- the messages of heartbeat.proto (package heartbeat_system) ------------------------


class SequencerType(enum.IntEnum):
    """``heartbeat_system.SequencerType``: who orders a topic in the original."""

    EMBARCADERO = 0
    KAFKA = 1
    SCALOG = 2
    CORFU = 3


@attrs.frozen
class Empty:
    """``google.protobuf.Empty``."""


@attrs.frozen
class ClientInfo:
    """``ClientInfo``: the broker ids a client knows."""

    nodes_info: tuple[int, ...] = field(1, Kind.INT32, repeated=True)


@attrs.frozen
class ClusterStatus:
    """``ClusterStatus``: brokers a client did not know (``"host:port"``), and
    ids of brokers it knew that are gone."""

    new_nodes: tuple[str, ...] = field(1, Kind.STRING, repeated=True)
    removed_nodes: tuple[int, ...] = field(2, Kind.INT32, repeated=True)


@attrs.frozen
class NodeInfo:
    """``NodeInfo``: a C++ broker registering with the head."""

    node_id: str = field(1, Kind.STRING)
    address: str = field(2, Kind.STRING)


@attrs.frozen
class BrokerInfo:
    """``BrokerInfo``: one broker of the cluster."""

    broker_id: int = field(1, Kind.INT32)
    address: str = field(2, Kind.STRING)
    network_mgr_addr: str = field(3, Kind.STRING)


@attrs.frozen
class RegistrationStatus:
    """``RegistrationStatus``: the answer to ``RegisterNode``."""

    success: bool = field(1, Kind.BOOL)
    broker_id: int = field(2, Kind.INT64)
    message: str = field(3, Kind.STRING)


@attrs.frozen
class HeartbeatRequest:
    """``HeartbeatRequest``: a C++ follower broker's heartbeat."""

    node_id: str = field(1, Kind.STRING)
    cluster_version: int = field(2, Kind.UINT64)


@attrs.frozen
class HeartbeatResponse:
    """``HeartbeatResponse``."""

    alive: bool = field(1, Kind.BOOL)
    shutdown: bool = field(2, Kind.BOOL)
    cluster_version: int = field(3, Kind.UINT64)
    cluster_info: tuple[BrokerInfo, ...] = field(4, BrokerInfo, repeated=True)


@attrs.frozen
class KillBrokersRequest:
    """``KillBrokersRequest``."""

    num_brokers: int = field(1, Kind.INT64)


@attrs.frozen
class KillBrokersResponse:
    """``KillBrokersResponse``."""

    success: bool = field(1, Kind.BOOL)


@attrs.frozen
class CreateTopicRequest:
    """``CreateTopicRequest``: a topic with the original's per-topic settings."""

    topic: str = field(1, Kind.STRING)
    replicate_tinode: bool = field(2, Kind.BOOL)
    order: int = field(3, Kind.INT32)
    replication_factor: int = field(4, Kind.INT32)
    ack_level: int = field(5, Kind.INT32)
    sequencer_type: int = field(6, Kind.ENUM)


@attrs.frozen
class CreateTopicResponse:
    """``CreateTopicResponse``."""

    success: bool = field(1, Kind.BOOL)


__all__ = [
    "BrokerInfo",
    "ClientInfo",
    "ClusterStatus",
    "CreateTopicRequest",
    "CreateTopicResponse",
    "Empty",
    "HeartbeatRequest",
    "HeartbeatResponse",
    "KillBrokersRequest",
    "KillBrokersResponse",
    "Kind",
    "NodeInfo",
    "RegistrationStatus",
    "SequencerType",
    "decode",
    "decode_varint",
    "encode",
    "encode_varint",
    "field",
]
