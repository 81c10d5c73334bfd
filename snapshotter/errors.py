"""Snapshotter errors, one class per gRPC status code containerd maps back to errdefs."""

import grpc


class SnapshotError(Exception):
    code = grpc.StatusCode.UNKNOWN


class NotFound(SnapshotError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(SnapshotError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(SnapshotError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class InvalidArgument(SnapshotError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class Unavailable(SnapshotError):
    code = grpc.StatusCode.UNAVAILABLE
