"""The wire codec (snapshotter/api/wire.py) against protobuf's own runtime: every
containerd message the service and its client use, with generated values, encodes to
bytes protobuf reads back as the same message and reads what protobuf writes; bad
bytes give DecodeError and nothing else."""

import importlib
import inspect
from pathlib import Path

import pytest
from google.protobuf import message as pb_message
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapshotter.api import wellknown, wire

ROOT = Path(__file__).resolve().parents[1]
WIRE_MODULES = sorted(
    str(p.relative_to(ROOT).with_suffix("")).replace("/", ".")
    for p in (ROOT / "snapshotter" / "api").rglob("*_wire.py"))
_PB2_OF_WELL_KNOWN = {wellknown.Timestamp: "google.protobuf.timestamp_pb2",
                      wellknown.FieldMask: "google.protobuf.field_mask_pb2",
                      wellknown.Empty: "google.protobuf.empty_pb2",
                      wellknown.Any: "google.protobuf.any_pb2"}


def _pairs() -> list[tuple[type[wire.Message], type]]:
    """Each wire message class with protobuf's class for the same .proto message."""
    found = []
    for name in WIRE_MODULES:
        module = importlib.import_module(name)
        pb2 = importlib.import_module(name.removesuffix("_wire") + "_pb2")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, wire.Message) and cls.__module__ == name:
                found.append((cls, getattr(pb2, cls.__name__)))
    found += [(cls, getattr(importlib.import_module(m), cls.__name__))
              for cls, m in _PB2_OF_WELL_KNOWN.items()]
    return found


PAIRS = _pairs()
IDS = [f"{cls.__module__.rsplit('.', 1)[1]}.{cls.__name__}" for cls, _ in PAIRS]

_SCALARS = {
    wire.STRING: st.text(max_size=20),
    wire.BYTES: st.binary(max_size=20),
    wire.BOOL: st.booleans(),
    wire.INT32: st.integers(-(1 << 31), (1 << 31) - 1),
    wire.ENUM: st.integers(0, 3),
    wire.INT64: st.integers(-(1 << 63), (1 << 63) - 1),
    wire.UINT32: st.integers(0, (1 << 32) - 1),
    wire.UINT64: st.integers(0, (1 << 64) - 1),
}


def _values(field: wire.Field) -> st.SearchStrategy:
    if field.kind == wire.MAP:
        item = _messages(field.message) if field.value == wire.MESSAGE else _SCALARS[field.value]
        return st.dictionaries(st.text(max_size=8), item, max_size=3)
    one = _messages(field.message) if field.kind == wire.MESSAGE else _SCALARS[field.kind]
    return st.lists(one, max_size=3) if field.repeated else one


def _messages(cls: type[wire.Message]) -> st.SearchStrategy:
    fields = {f.name: st.none() | _values(f) for f in cls.FIELDS}
    return st.fixed_dictionaries(fields).map(lambda values: cls(**values))


def _to_pb(message: wire.Message, pb_cls: type) -> pb_message.Message:
    """The same message built with protobuf's class, field by field."""
    out = pb_cls()
    for field in message.FIELDS:
        if field.name not in message.__dict__:
            continue
        value = message.__dict__[field.name]
        target = getattr(out, field.name)
        if field.kind == wire.MAP:
            for key, item in value.items():
                if field.value == wire.MESSAGE:
                    entry = target[key]
                    entry.CopyFrom(_to_pb(item, type(entry)))
                else:
                    target[key] = item
        elif field.kind == wire.MESSAGE and field.repeated:
            for item in value:
                element = target.add()
                element.CopyFrom(_to_pb(item, type(element)))
        elif field.kind == wire.MESSAGE:
            target.CopyFrom(_to_pb(value, type(target)))
        elif field.repeated:
            target.extend(value)
        else:
            setattr(out, field.name, value)
    return out


def _has_map(cls: type[wire.Message]) -> bool:
    return any(f.kind == wire.MAP or (f.kind == wire.MESSAGE and _has_map(f.message))
               for f in cls.FIELDS)


@pytest.mark.parametrize(("cls", "pb_cls"), PAIRS, ids=IDS)
def test_each_message_has_protobufs_fields_numbers_and_types(cls, pb_cls) -> None:
    descriptor = pb_cls.DESCRIPTOR
    assert {f.name: f.number for f in descriptor.fields} == \
        {f.name: f.number for f in cls.FIELDS}
    for field in cls.FIELDS:
        pb_field = descriptor.fields_by_name[field.name]
        is_map = pb_field.message_type is not None and pb_field.message_type.GetOptions().map_entry
        assert (field.kind == wire.MAP) == is_map, field.name
        if not is_map:
            assert field.repeated == pb_field.is_repeated, field.name


@pytest.mark.parametrize(("cls", "pb_cls"), PAIRS, ids=IDS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_protobuf_reads_what_the_codec_writes_and_back(cls, pb_cls, data) -> None:
    message = data.draw(_messages(cls))
    expected = _to_pb(message, pb_cls)
    encoded = message.encode()
    assert pb_cls.FromString(encoded) == expected
    if not _has_map(cls):  # map entries may come in any order
        assert encoded == expected.SerializeToString()
    assert cls.decode(expected.SerializeToString()) == message


@given(st.binary(max_size=64))
@settings(max_examples=400, deadline=None)
def test_arbitrary_bytes_decode_or_raise_decode_error(data: bytes) -> None:
    from snapshotter.api.containerd.services.diff.v1 import diff_wire
    from snapshotter.api.containerd.services.snapshots.v1 import snapshots_wire
    for cls in (snapshots_wire.UpdateSnapshotRequest, snapshots_wire.ListSnapshotsResponse,
                diff_wire.ApplyRequest):
        try:
            decoded = cls.decode(data)
        except wire.DecodeError:
            continue
        assert isinstance(decoded, cls)


class Sample(wire.Message):
    FIELDS = (wire.Field(1, "name", wire.STRING),
              wire.Field(2, "sizes", wire.INT64, repeated=True),
              wire.Field(3, "small", wire.INT32),
              wire.Field(4, "when", wire.MESSAGE, message=wellknown.Timestamp))


def test_repeated_numbers_are_read_packed_and_one_by_one() -> None:
    packed = Sample(sizes=[1, -2, 300]).encode()
    assert packed == bytes([0x12, 13, 1]) + bytes([0xFE] + [0xFF] * 8 + [0x01]) + b"\xac\x02"
    one_by_one = bytes([0x10, 1, 0x10, 5])
    assert Sample.decode(packed + one_by_one).sizes == [1, -2, 300, 1, 5]


def test_unknown_fields_of_every_wire_type_are_skipped() -> None:
    unknown = (bytes([0x78, 0x96, 0x01])            # 15: varint
               + bytes([0x81, 0x01]) + bytes(8)     # 16: 64-bit
               + bytes([0x8A, 0x01, 2]) + b"hi"     # 17: length-delimited
               + bytes([0x95, 0x01]) + bytes(4))    # 18: 32-bit
    assert Sample.decode(unknown + Sample(name="x").encode()) == Sample(name="x")


def test_a_message_field_sent_twice_is_merged_and_a_scalar_keeps_the_last() -> None:
    first = Sample(name="a", when=wellknown.Timestamp(seconds=5)).encode()
    second = Sample(name="b", when=wellknown.Timestamp(nanos=7)).encode()
    decoded = Sample.decode(first + second)
    assert decoded.name == "b"
    assert (decoded.when.seconds, decoded.when.nanos) == (5, 7)


def test_map_entries_without_a_key_or_value_read_as_their_defaults() -> None:
    from google.protobuf import any_pb2

    from snapshotter.api.containerd.services.diff.v1 import diff_pb2, diff_wire
    from snapshotter.api.containerd.types import descriptor_wire
    # ApplyRequest.payloads (3) is map<string, Any>: an entry with only a key, one empty
    raw = bytes([0x1A, 3, 0x0A, 1]) + b"a" + bytes([0x1A, 0])
    assert diff_wire.ApplyRequest.decode(raw).payloads == \
        {"a": wellknown.Any(), "": wellknown.Any()}
    assert dict(diff_pb2.ApplyRequest.FromString(raw).payloads) == \
        {"a": any_pb2.Any(), "": any_pb2.Any()}  # as protobuf's runtime reads them
    # Descriptor.annotations (5) is map<string, string>: an entry with only a value
    raw = bytes([0x2A, 3, 0x12, 1]) + b"v"
    assert descriptor_wire.Descriptor.decode(raw).annotations == {"": "v"}


def test_presence_is_kept_for_message_fields_only() -> None:
    assert not Sample().has("when")
    assert Sample().when == wellknown.Timestamp()  # read as its default, still not set
    assert Sample.decode(Sample(when=wellknown.Timestamp()).encode()).has("when")
    assert Sample(when=wellknown.Timestamp()).encode() == bytes([0x22, 0])
    with pytest.raises(ValueError, match="no presence"):
        Sample().has("name")


@pytest.mark.parametrize(("data", "complaint"), [
    (bytes([0x0A, 5]) + b"abc", "past the end"),
    (bytes([0x18]), "truncated varint"),
    (bytes([0x18]) + bytes([0xFF] * 11), "longer than 10 bytes"),
    (bytes([0x0A, 2, 0xC3, 0x28]), "not UTF-8"),
    (bytes([0x08, 1]), "wire type 0 for a string"),
    (bytes([0x1A, 1, 0]), "wire type 2 for a int32"),
    (bytes([0x0B]), "groups"),
    (bytes([0x00, 1]), "field number 0"),
    (bytes([0x22, 2, 0x08]) + b"", "past the end"),
])
def test_malformed_bytes_raise_a_decode_error_that_says_why(data: bytes, complaint: str) -> None:
    with pytest.raises(wire.DecodeError, match=complaint):
        Sample.decode(data)


def test_values_of_the_wrong_type_or_range_are_refused_when_encoding() -> None:
    with pytest.raises(TypeError, match="name"):
        Sample(name=3).encode()
    with pytest.raises(TypeError, match="small"):
        Sample(small="3").encode()
    with pytest.raises(ValueError, match="out of range for int32"):
        Sample(small=1 << 31).encode()
    with pytest.raises(TypeError, match="not a Timestamp"):
        Sample(when=Sample()).encode()
    with pytest.raises(AttributeError, match="no field 'nmae'"):
        Sample(nmae="x")


def test_the_codec_refuses_oversized_and_malformed_messages_with_grpc_statuses() -> None:
    codec = wire.WireCodec(max_size=16)
    assert codec.decode(Sample(name="ok").encode(), Sample) == Sample(name="ok")
    with pytest.raises(GRPCError) as too_big:
        codec.decode(Sample(name="x" * 20).encode(), Sample)
    assert too_big.value.status is Status.RESOURCE_EXHAUSTED
    with pytest.raises(GRPCError) as malformed:
        codec.decode(bytes([0x0A, 5]), Sample)
    assert malformed.value.status is Status.INVALID_ARGUMENT
    assert "not a valid Sample" in malformed.value.message
    with pytest.raises(TypeError):
        codec.encode(wellknown.Empty(), Sample)


def test_timestamps_are_made_from_nanoseconds() -> None:
    stamp = wellknown.Timestamp.from_nanoseconds(1_700_000_000_123_456_789)
    assert (stamp.seconds, stamp.nanos) == (1_700_000_000, 123_456_789)
