"""The well-known protobuf types containerd's messages use (google/protobuf/*.proto),
for the wire codec (snapshotter/api/wire.py)."""

from .wire import BYTES, INT32, INT64, STRING, Field, Message


class Empty(Message):
    """google.protobuf.Empty"""


class Timestamp(Message):
    """google.protobuf.Timestamp: seconds since the Unix epoch and nanoseconds within."""

    FIELDS = (Field(1, "seconds", INT64), Field(2, "nanos", INT32))
    seconds: int
    nanos: int

    @classmethod
    def from_nanoseconds(cls, ns: int) -> "Timestamp":
        seconds, nanos = divmod(ns, 1_000_000_000)
        return cls(seconds=seconds, nanos=nanos)


class FieldMask(Message):
    """google.protobuf.FieldMask"""

    FIELDS = (Field(1, "paths", STRING, repeated=True),)
    paths: list[str]


class Any(Message):
    """google.protobuf.Any: a message of the type `type_url` names, encoded."""

    FIELDS = (Field(1, "type_url", STRING), Field(2, "value", BYTES))
    type_url: str
    value: bytes
