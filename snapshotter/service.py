"""containerd's Snapshots gRPC service over an OverlaySnapshotter (grpclib).

Caller mistakes come back as the status codes containerd maps to its errdefs
(NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION, INVALID_ARGUMENT).
"""

import errno
import functools
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream

from .api.containerd.services.snapshots.v1 import snapshots_wire as pb
from .api.containerd.types import mount_wire
from .api.wellknown import Empty, Timestamp
from .api.wire import WireCodec
from .errors import InvalidArgument, SnapshotError
from .metadata import Info, validate_labels
from .metrics import RPC_ERRORS, RPC_LATENCY, RPC_REQUESTS
from .overlay import Mount, OverlaySnapshotter

log = logging.getLogger(__name__)
_LIST_BATCH = 100  # infos per List response message, as containerd batches them
# containerd's own limit for gRPC messages, so large label maps fail the same way.
MAX_MESSAGE_SIZE = 16 << 20


def codec() -> WireCodec:
    """The service's gRPC codec: refuses requests over MAX_MESSAGE_SIZE, as containerd's
    server does."""
    return WireCodec(max_size=MAX_MESSAGE_SIZE)


def _info(info: Info) -> pb.Info:
    return pb.Info(name=info.name, parent=info.parent, kind=int(info.kind),
                   created_at=Timestamp.from_nanoseconds(info.created_ns),
                   updated_at=Timestamp.from_nanoseconds(info.updated_ns),
                   labels=info.labels)


def _mounts(mounts: list[Mount]) -> list[mount_wire.Mount]:
    return [mount_wire.Mount(type=m.type, source=m.source, options=m.options) for m in mounts]


def _labels(labels: Any) -> dict[str, str]:
    out = dict(labels)
    validate_labels(out)
    return out


def _status(name: str, exc: Exception) -> GRPCError:
    """The gRPC status for a failed call: a snapshotter error's own code, else INTERNAL."""
    if isinstance(exc, GRPCError):
        RPC_ERRORS.labels(name, exc.status.name).inc()
        return exc
    if isinstance(exc, SnapshotError):
        RPC_ERRORS.labels(name, exc.code).inc()
        return GRPCError(Status[exc.code], str(exc))
    if _disk_full(exc):  # not a bug: no traceback, a code the caller can tell apart
        log.warning("%s failed: the state root is full: %s", name, exc)
        RPC_ERRORS.labels(name, "RESOURCE_EXHAUSTED").inc()
        return GRPCError(Status.RESOURCE_EXHAUSTED, f"{name}: the state root is full: {exc}")
    log.error("%s failed", name, exc_info=exc)
    RPC_ERRORS.labels(name, "INTERNAL").inc()
    return GRPCError(Status.INTERNAL, f"{name}: {exc}")


def _disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(exc, sqlite3.Error) and \
        (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF == sqlite3.SQLITE_FULL


Handler = Callable[[Any, Stream], Awaitable[None]]


def _unary(method: Callable[[Any, Any], Awaitable[Any]]) -> Handler:
    """A grpclib handler around `method(self, request) -> reply`: counted, timed, and
    its errors turned into gRPC statuses."""
    name = method.__name__

    @functools.wraps(method)
    async def handler(self: Any, stream: Stream) -> None:
        RPC_REQUESTS.labels(name).inc()
        started = time.perf_counter()
        try:
            reply = await method(self, await stream.recv_message())
        except Exception as exc:
            raise _status(name, exc) from None
        finally:
            RPC_LATENCY.labels(name).observe(time.perf_counter() - started)
        await stream.send_message(reply)
    return handler


def _server_streaming(method: Callable[[Any, Any], AsyncIterator[Any]]) -> Handler:
    """As `_unary`, for a method that yields its replies."""
    name = method.__name__

    @functools.wraps(method)
    async def handler(self: Any, stream: Stream) -> None:
        RPC_REQUESTS.labels(name).inc()
        started = time.perf_counter()
        try:
            async for reply in method(self, await stream.recv_message()):
                await stream.send_message(reply)
        except Exception as exc:
            raise _status(name, exc) from None
        finally:
            RPC_LATENCY.labels(name).observe(time.perf_counter() - started)
    return handler


class SnapshotsService(pb.SnapshotsBase):
    def __init__(self, snapshotter: OverlaySnapshotter):
        self.sn = snapshotter

    @_unary
    async def Prepare(self, request: pb.PrepareSnapshotRequest) -> pb.PrepareSnapshotResponse:
        mounts = await self.sn.prepare(request.key, request.parent, _labels(request.labels))
        return pb.PrepareSnapshotResponse(mounts=_mounts(mounts))

    @_unary
    async def View(self, request: pb.ViewSnapshotRequest) -> pb.ViewSnapshotResponse:
        mounts = await self.sn.view(request.key, request.parent, _labels(request.labels))
        return pb.ViewSnapshotResponse(mounts=_mounts(mounts))

    @_unary
    async def Mounts(self, request: pb.MountsRequest) -> pb.MountsResponse:
        return pb.MountsResponse(mounts=_mounts(await self.sn.mounts(request.key)))

    @_unary
    async def Commit(self, request: pb.CommitSnapshotRequest) -> Empty:
        await self.sn.commit(request.name, request.key, _labels(request.labels))
        return Empty()

    @_unary
    async def Remove(self, request: pb.RemoveSnapshotRequest) -> Empty:
        await self.sn.remove(request.key)
        return Empty()

    @_unary
    async def Stat(self, request: pb.StatSnapshotRequest) -> pb.StatSnapshotResponse:
        return pb.StatSnapshotResponse(info=_info(await self.sn.stat(request.key)))

    @_unary
    async def Update(self, request: pb.UpdateSnapshotRequest) -> pb.UpdateSnapshotResponse:
        if not request.info.name:
            raise InvalidArgument("update needs the snapshot's name")
        paths = list(request.update_mask.paths) if request.has("update_mask") else []
        info = await self.sn.update(request.info.name, dict(request.info.labels), paths)
        return pb.UpdateSnapshotResponse(info=_info(info))

    @_server_streaming
    async def List(self, request: pb.ListSnapshotsRequest) -> AsyncIterator[pb.ListSnapshotsResponse]:  # noqa: E501
        infos = await self.sn.walk(list(request.filters))
        for start in range(0, len(infos), _LIST_BATCH):
            batch = infos[start:start + _LIST_BATCH]
            yield pb.ListSnapshotsResponse(info=[_info(i) for i in batch])

    @_unary
    async def Usage(self, request: pb.UsageRequest) -> pb.UsageResponse:
        size, inodes = await self.sn.usage(request.key)
        return pb.UsageResponse(size=size, inodes=inodes)

    @_unary
    async def Cleanup(self, request: pb.CleanupRequest) -> Empty:
        await self.sn.cleanup()
        return Empty()
