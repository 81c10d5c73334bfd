"""proto3's wire format for the service's gRPC messages, without protobuf's runtime.

The service and its containerd client exchange a few dozen proto3 messages
(snapshotter/api/containerd/**/*.proto) made of strings, integers, nested messages,
repeated fields and string-keyed maps. protobuf's runtime (its upb extension with
libstdc++, its descriptor pool and Python modules) would cost the service about 4 MB
of resident memory for that. Here a message class lists its fields (`Field`: number,
name, kind) and `encode`/`decode` walk that list. The classes are generated from the
.proto files by tools/generate-protos.py into a `*_wire.py` module beside each one;
the tests check the bytes against protobuf's own runtime.

Semantics follow proto3: a scalar equal to its default is not sent, a message field is
sent when set (`has`), unknown fields are skipped, a field seen twice keeps the last
scalar and merges messages, and repeated numbers are read packed or not.
"""

from collections.abc import Callable, Iterator
from typing import Any, ClassVar, NamedTuple

from grpclib import client as grpc_client
from grpclib.const import Cardinality, Handler, Status
from grpclib.encoding.base import CodecBase
from grpclib.exceptions import GRPCError

# Wire types (the low three bits of a field's key).
VARINT, I64, LEN, I32 = 0, 1, 2, 5

STRING, BYTES, BOOL, ENUM = "string", "bytes", "bool", "enum"
INT32, INT64, UINT32, UINT64 = "int32", "int64", "uint32", "uint64"
MESSAGE, MAP = "message", "map"
_INTEGERS = {INT32: (-1 << 31, 1 << 31), INT64: (-1 << 63, 1 << 63),
             UINT32: (0, 1 << 32), UINT64: (0, 1 << 64), ENUM: (-1 << 31, 1 << 31)}
_NUMBERS = frozenset(_INTEGERS) | {BOOL}
_DEFAULTS: dict[str, Any] = {STRING: "", BYTES: b"", BOOL: False} | dict.fromkeys(_INTEGERS, 0)
_MASK64 = (1 << 64) - 1


class DecodeError(ValueError):
    """Bytes that are not a valid encoding of the message asked for."""


def _default(kind: str, message: "type[Message] | None") -> Any:
    """The value of a `kind` field that was not sent."""
    return message() if kind == MESSAGE else _DEFAULTS[kind]  # type: ignore[misc]


class Field:
    """One field of a message. `message` is the class of a MESSAGE field; a MAP has
    string keys and values of kind `value` (and class `message` if those are messages)."""

    __slots__ = ("kind", "message", "name", "number", "repeated", "value")

    def __init__(self, number: int, name: str, kind: str, *, repeated: bool = False,
                 message: "type[Message] | None" = None, value: str | None = None):
        self.number, self.name, self.kind = number, name, kind
        self.repeated, self.message, self.value = repeated, message, value



class Message:
    """A proto3 message: fields are attributes; one never set reads as its default
    (an empty list or dict, stored on first read so it can be filled in place)."""

    FIELDS: ClassVar[tuple[Field, ...]] = ()
    _BY_NAME: ClassVar[dict[str, Field]] = {}
    _BY_NUMBER: ClassVar[dict[int, Field]] = {}

    def __init_subclass__(cls) -> None:
        super().__init_subclass__()
        cls._BY_NAME = {f.name: f for f in cls.FIELDS}
        cls._BY_NUMBER = {f.number: f for f in cls.FIELDS}

    def __init__(self, **values: Any):
        for name, value in values.items():
            if value is not None:
                setattr(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        field = self._BY_NAME.get(name)
        if field is None:
            raise AttributeError(f"{type(self).__name__} has no field {name!r}")
        if field.kind == MAP:
            value = dict(value)
        elif field.repeated:
            value = list(value)
        self.__dict__[name] = value

    def __getattr__(self, name: str) -> Any:
        field = self._BY_NAME.get(name)
        if field is None:
            raise AttributeError(f"{type(self).__name__} has no field {name!r}")
        if field.kind == MAP or field.repeated:
            container: dict | list = {} if field.kind == MAP else []
            self.__dict__[name] = container
            return container
        return _default(field.kind, field.message)

    def has(self, name: str) -> bool:
        """Whether the message field `name` was set (sent, for a decoded message)."""
        if self._BY_NAME[name].kind != MESSAGE:
            raise ValueError(f"{name!r} is not a message field: proto3 keeps no presence")
        return name in self.__dict__

    def encode(self) -> bytes:
        out = bytearray()
        _encode_into(self, out)
        return bytes(out)

    @classmethod
    def decode(cls, data: bytes | memoryview) -> "Message":
        message = cls()
        _decode_into(message, memoryview(data))
        return message

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, f.name) == getattr(other, f.name) for f in self.FIELDS)

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={value!r}" for name, value in self.__dict__.items())
        return f"{type(self).__name__}({shown})"


# -- encoding -------------------------------------------------------------------------

def _put_varint(out: bytearray, value: int) -> None:
    value &= _MASK64
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)


def _put_key(out: bytearray, number: int, wire_type: int) -> None:
    _put_varint(out, number << 3 | wire_type)


def _put_bytes(out: bytearray, number: int, data: bytes | bytearray | memoryview) -> None:
    _put_key(out, number, LEN)
    _put_varint(out, len(data))
    out += data


def _scalar_int(field: Field, kind: str, value: Any) -> int:
    """The varint of a number field's value, checked against its type's range."""
    if kind == BOOL:
        if not isinstance(value, bool):
            raise TypeError(f"{field.name}: {value!r} is not a bool")
        return int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{field.name}: {value!r} is not an integer")
    low, high = _INTEGERS[kind]
    if not low <= value < high:
        raise ValueError(f"{field.name}: {value} is out of range for {kind}")
    return value


def _put_value(out: bytearray, field: Field, number: int, kind: str, value: Any) -> None:
    """One value of `kind` as field `number` (always written: the caller decides)."""
    if kind == STRING:
        if not isinstance(value, str):
            raise TypeError(f"{field.name}: {value!r} is not a str")
        _put_bytes(out, number, value.encode())
    elif kind == BYTES:
        if not isinstance(value, bytes | bytearray | memoryview):
            raise TypeError(f"{field.name}: {value!r} is not bytes")
        _put_bytes(out, number, value)
    elif kind == MESSAGE:
        if not isinstance(value, field.message):  # type: ignore[arg-type]
            raise TypeError(f"{field.name}: {value!r} is not a {field.message.__name__}")  # type: ignore[union-attr]
        inner = bytearray()
        _encode_into(value, inner)
        _put_bytes(out, number, inner)
    else:
        _put_key(out, number, VARINT)
        _put_varint(out, _scalar_int(field, kind, value))


def _encode_into(message: Message, out: bytearray) -> None:
    values = message.__dict__
    for field in message.FIELDS:
        value = values.get(field.name)
        if value is None:
            continue
        kind = field.kind
        if kind == MAP:
            for key, item in value.items():
                entry = bytearray()
                _put_value(entry, field, 1, STRING, key)
                _put_value(entry, field, 2, field.value, item)  # type: ignore[arg-type]
                _put_bytes(out, field.number, entry)
        elif field.repeated and kind in _NUMBERS:
            if value:
                packed = bytearray()
                for item in value:
                    _put_varint(packed, _scalar_int(field, kind, item))
                _put_bytes(out, field.number, packed)
        elif field.repeated:
            for item in value:
                _put_value(out, field, field.number, kind, item)
        elif kind == MESSAGE or value != _DEFAULTS[kind] or \
                type(value) is not type(_DEFAULTS[kind]):  # a wrong type is refused, not skipped
            _put_value(out, field, field.number, kind, value)


# -- decoding -------------------------------------------------------------------------

def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    end = len(data)
    while True:
        if pos >= end:
            raise DecodeError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result & _MASK64, pos
        shift += 7
        if shift >= 70:
            raise DecodeError("varint longer than 10 bytes")


def _records(data: memoryview) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of each record: an int for VARINT, a
    memoryview for LEN, None for the fixed-size types (which no field here has)."""
    pos, end = 0, len(data)
    while pos < end:
        key, pos = _varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if number == 0:
            raise DecodeError("field number 0")
        if wire_type == VARINT:
            value, pos = _varint(data, pos)
            yield number, wire_type, value
            continue
        if wire_type == LEN:
            size, pos = _varint(data, pos)
        elif wire_type in (I64, I32):
            size = 8 if wire_type == I64 else 4
        else:
            raise DecodeError(f"field {number}: wire type {wire_type} (groups) not supported")
        if pos + size > end:
            raise DecodeError(f"field {number}: {size} bytes past the end of the message")
        yield number, wire_type, data[pos:pos + size] if wire_type == LEN else None
        pos += size


def _number(kind: str, raw: int) -> Any:
    if kind == BOOL:
        return raw != 0
    if kind == UINT64:
        return raw
    if kind == UINT32:
        return raw & 0xFFFFFFFF
    if kind == INT64:
        return raw - (1 << 64) if raw >> 63 else raw
    raw &= 0xFFFFFFFF  # int32 and enums: the low 32 bits, signed
    return raw - (1 << 32) if raw >> 31 else raw


def _value(field: Field, kind: str, wire_type: int, raw: Any) -> Any:
    """A singular value of `kind` (the field's own, or its map's key or value) from its
    record."""
    if kind in _NUMBERS:
        if wire_type != VARINT:
            raise DecodeError(f"{field.name}: wire type {wire_type} for a {kind}")
        return _number(kind, raw)
    if wire_type != LEN:
        raise DecodeError(f"{field.name}: wire type {wire_type} for a {kind}")
    if kind == STRING:
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError(f"{field.name}: not UTF-8: {exc}") from None
    if kind == BYTES:
        return bytes(raw)
    inner = field.message()  # type: ignore[misc]
    _decode_into(inner, raw)
    return inner


def _decode_into(message: Message, data: memoryview) -> None:
    values = message.__dict__
    by_number = message._BY_NUMBER
    for number, wire_type, raw in _records(data):
        field = by_number.get(number)
        if field is None:
            continue
        kind = field.kind
        if kind == MAP:
            if wire_type != LEN:
                raise DecodeError(f"{field.name}: a map entry of wire type {wire_type}")
            key, item = "", None
            for entry_number, entry_type, entry_raw in _records(raw):
                if entry_number == 1:
                    key = _value(field, STRING, entry_type, entry_raw)
                elif entry_number == 2:
                    item = _value(field, field.value, entry_type, entry_raw)  # type: ignore[arg-type]
            if item is None:  # an entry may leave out its value, as its key
                item = _default(field.value, field.message)  # type: ignore[arg-type]
            values.setdefault(field.name, {})[key] = item
        elif field.repeated:
            items = values.setdefault(field.name, [])
            if kind in _NUMBERS and wire_type == LEN:  # packed
                pos = 0
                while pos < len(raw):
                    number_raw, pos = _varint(raw, pos)
                    items.append(_number(kind, number_raw))
            else:
                items.append(_value(field, kind, wire_type, raw))
        elif kind == MESSAGE and field.name in values:
            if wire_type != LEN:
                raise DecodeError(f"{field.name}: wire type {wire_type} for a message")
            _decode_into(values[field.name], raw)  # a message seen twice merges
        else:
            values[field.name] = _value(field, kind, wire_type, raw)


# -- gRPC -----------------------------------------------------------------------------

class Method(NamedTuple):
    name: str
    cardinality: Cardinality
    request: type[Message]
    reply: type[Message]


class WireCodec(CodecBase):
    """grpclib's codec for these messages (content type application/grpc+proto).
    Refuses messages over `max_size` bytes, as containerd's server does."""

    __content_subtype__ = "proto"

    def __init__(self, max_size: int | None = None):
        self.max_size = max_size

    def encode(self, message: Any, message_type: Any) -> bytes:
        if not isinstance(message, message_type):
            raise TypeError(f"{message!r} is not a {message_type.__name__}")
        return message.encode()

    def decode(self, data: bytes, message_type: Any) -> Any:
        if self.max_size is not None and len(data) > self.max_size:
            raise GRPCError(Status.RESOURCE_EXHAUSTED,
                            f"message of {len(data)} bytes is over the limit of {self.max_size}")
        try:
            return message_type.decode(data)
        except DecodeError as exc:
            raise GRPCError(Status.INVALID_ARGUMENT,
                            f"not a valid {message_type.__name__}: {exc}") from None


class Service:
    """A gRPC service served with grpclib: subclasses of a generated `...Base` define
    an `async def Name(self, stream)` per method of `METHODS`."""

    NAME: ClassVar[str]
    METHODS: ClassVar[tuple[Method, ...]]

    def __mapping__(self) -> dict[str, Handler]:
        return {f"/{self.NAME}/{m.name}": Handler(getattr(self, m.name), m.cardinality,
                                                  m.request, m.reply)
                for m in self.METHODS}


_CLIENT_METHODS: dict[Cardinality, Callable[..., Any]] = {
    Cardinality.UNARY_UNARY: grpc_client.UnaryUnaryMethod,
    Cardinality.UNARY_STREAM: grpc_client.UnaryStreamMethod,
    Cardinality.STREAM_UNARY: grpc_client.StreamUnaryMethod,
    Cardinality.STREAM_STREAM: grpc_client.StreamStreamMethod,
}


class Stub:
    """A client of a gRPC service: one grpclib method object per method, by name."""

    NAME: ClassVar[str]
    METHODS: ClassVar[tuple[Method, ...]]

    def __init__(self, channel: grpc_client.Channel):
        for m in self.METHODS:
            method = _CLIENT_METHODS[m.cardinality](channel, f"/{self.NAME}/{m.name}",
                                                    m.request, m.reply)
            setattr(self, m.name, method)
