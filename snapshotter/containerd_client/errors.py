"""containerd's errors as Python exceptions, from the gRPC status codes it maps them to."""

from grpclib.const import Status
from grpclib.exceptions import GRPCError


class ContainerdError(Exception):
    """containerd (or a plugin behind it) refused or failed a call."""

    code: Status = Status.UNKNOWN

    def __init__(self, message: str, code: Status | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class NotFound(ContainerdError):
    code = Status.NOT_FOUND


class AlreadyExists(ContainerdError):
    code = Status.ALREADY_EXISTS


class FailedPrecondition(ContainerdError):
    code = Status.FAILED_PRECONDITION


class InvalidArgument(ContainerdError):
    code = Status.INVALID_ARGUMENT


class Unavailable(ContainerdError):
    """containerd, or a plugin it forwards to, is not answering (or a ref is locked)."""

    code = Status.UNAVAILABLE


class ContainerdUnreachable(ContainerdError):
    """Nothing (or no containerd) answers on the socket."""

    code = Status.UNAVAILABLE


_BY_CODE: dict[Status, type[ContainerdError]] = {
    cls.code: cls for cls in (NotFound, AlreadyExists, FailedPrecondition, InvalidArgument,
                              Unavailable)
}


def from_rpc_error(exc: GRPCError, what: str) -> ContainerdError:
    """The ContainerdError for a failed call; `what` says which call, for the message."""
    cls = _BY_CODE.get(exc.status, ContainerdError)
    return cls(f"{what}: {exc.message or exc.status.name.lower()}", exc.status)
