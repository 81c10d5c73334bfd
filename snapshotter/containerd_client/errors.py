"""containerd's errors as Python exceptions, from the gRPC status codes it maps them to."""

import grpc


class ContainerdError(Exception):
    """containerd (or a plugin behind it) refused or failed a call."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class NotFound(ContainerdError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ContainerdError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(ContainerdError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class InvalidArgument(ContainerdError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class Unavailable(ContainerdError):
    """containerd, or a plugin it forwards to, is not answering (or a ref is locked)."""

    code = grpc.StatusCode.UNAVAILABLE


class ContainerdUnreachable(ContainerdError):
    """Nothing (or no containerd) answers on the socket."""

    code = grpc.StatusCode.UNAVAILABLE


_BY_CODE: dict[grpc.StatusCode, type[ContainerdError]] = {
    cls.code: cls for cls in (NotFound, AlreadyExists, FailedPrecondition, InvalidArgument,
                              Unavailable)
}


def from_rpc_error(exc: grpc.aio.AioRpcError, what: str) -> ContainerdError:
    """The ContainerdError for a failed call; `what` says which call, for the message."""
    code = exc.code()
    cls = _BY_CODE.get(code, ContainerdError)
    return cls(f"{what}: {exc.details() or code.name.lower()}", code)
