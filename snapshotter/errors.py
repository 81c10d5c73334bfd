"""Snapshotter errors, one class per gRPC status code containerd maps back to errdefs.

Codes are named, not grpc.StatusCode members: the FUSE manager raises these too and
has no other use for grpc, which would cost it 20 MB of memory to import."""


class SnapshotError(Exception):
    code = "UNKNOWN"


class NotFound(SnapshotError):
    code = "NOT_FOUND"


class AlreadyExists(SnapshotError):
    code = "ALREADY_EXISTS"


class FailedPrecondition(SnapshotError):
    code = "FAILED_PRECONDITION"


class InvalidArgument(SnapshotError):
    code = "INVALID_ARGUMENT"


class Unavailable(SnapshotError):
    code = "UNAVAILABLE"
