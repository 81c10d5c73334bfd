"""containerd's Snapshots gRPC service over an OverlaySnapshotter.

Caller mistakes come back as the status codes containerd maps to its errdefs
(NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION, INVALID_ARGUMENT).
"""

import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from .api.containerd.services.snapshots.v1 import snapshots_pb2 as pb
from .api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from .api.containerd.types import mount_pb2
from .errors import InvalidArgument, SnapshotError
from .metadata import Info, validate_labels
from .metrics import RPC_ERRORS, RPC_LATENCY, RPC_REQUESTS
from .overlay import Mount, OverlaySnapshotter

log = logging.getLogger(__name__)
_LIST_BATCH = 100  # infos per List response message, as containerd batches them


def _timestamp(ns: int) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(ns)
    return ts


def _info(info: Info) -> pb.Info:
    return pb.Info(name=info.name, parent=info.parent, kind=int(info.kind),
                   created_at=_timestamp(info.created_ns), updated_at=_timestamp(info.updated_ns),
                   labels=info.labels)


def _mounts(mounts: list[Mount]) -> list[mount_pb2.Mount]:
    return [mount_pb2.Mount(type=m.type, source=m.source, options=m.options) for m in mounts]


def _labels(labels: Any) -> dict[str, str]:
    out = dict(labels)
    validate_labels(out)
    return out


def _observed(method: Callable) -> Callable:
    """Count and time the call, and turn snapshotter errors into gRPC statuses."""
    name = method.__name__

    async def fail(context: grpc.aio.ServicerContext, exc: Exception) -> None:
        if isinstance(exc, SnapshotError):
            RPC_ERRORS.labels(name, exc.code).inc()
            await context.abort(grpc.StatusCode[exc.code], str(exc))
        log.exception("%s failed", name)
        RPC_ERRORS.labels(name, "INTERNAL").inc()
        await context.abort(grpc.StatusCode.INTERNAL, f"{name}: {exc}")

    if name == "List":
        @functools.wraps(method)
        async def streaming(self, request, context):  # type: ignore[no-untyped-def]
            RPC_REQUESTS.labels(name).inc()
            started = time.perf_counter()
            try:
                async for item in method(self, request, context):
                    yield item
            except Exception as exc:
                await fail(context, exc)
            finally:
                RPC_LATENCY.labels(name).observe(time.perf_counter() - started)
        return streaming

    @functools.wraps(method)
    async def unary(self, request, context):  # type: ignore[no-untyped-def]
        RPC_REQUESTS.labels(name).inc()
        started = time.perf_counter()
        try:
            return await method(self, request, context)
        except Exception as exc:
            await fail(context, exc)
        finally:
            RPC_LATENCY.labels(name).observe(time.perf_counter() - started)
    return unary


class SnapshotsService(pb_grpc.SnapshotsServicer):
    def __init__(self, snapshotter: OverlaySnapshotter):
        self.sn = snapshotter

    @_observed
    async def Prepare(self, request: pb.PrepareSnapshotRequest, context) -> pb.PrepareSnapshotResponse:  # noqa: E501
        mounts = await self.sn.prepare(request.key, request.parent, _labels(request.labels))
        return pb.PrepareSnapshotResponse(mounts=_mounts(mounts))

    @_observed
    async def View(self, request: pb.ViewSnapshotRequest, context) -> pb.ViewSnapshotResponse:
        mounts = await self.sn.view(request.key, request.parent, _labels(request.labels))
        return pb.ViewSnapshotResponse(mounts=_mounts(mounts))

    @_observed
    async def Mounts(self, request: pb.MountsRequest, context) -> pb.MountsResponse:
        return pb.MountsResponse(mounts=_mounts(await self.sn.mounts(request.key)))

    @_observed
    async def Commit(self, request: pb.CommitSnapshotRequest, context) -> empty_pb2.Empty:
        await self.sn.commit(request.name, request.key, _labels(request.labels))
        return empty_pb2.Empty()

    @_observed
    async def Remove(self, request: pb.RemoveSnapshotRequest, context) -> empty_pb2.Empty:
        await self.sn.remove(request.key)
        return empty_pb2.Empty()

    @_observed
    async def Stat(self, request: pb.StatSnapshotRequest, context) -> pb.StatSnapshotResponse:
        return pb.StatSnapshotResponse(info=_info(await self.sn.stat(request.key)))

    @_observed
    async def Update(self, request: pb.UpdateSnapshotRequest, context) -> pb.UpdateSnapshotResponse:
        if not request.info.name:
            raise InvalidArgument("update needs the snapshot's name")
        paths = list(request.update_mask.paths) if request.HasField("update_mask") else []
        info = await self.sn.update(request.info.name, dict(request.info.labels), paths)
        return pb.UpdateSnapshotResponse(info=_info(info))

    @_observed
    async def List(self, request: pb.ListSnapshotsRequest, context) -> AsyncIterator[pb.ListSnapshotsResponse]:  # noqa: E501
        infos = await self.sn.walk(list(request.filters))
        for start in range(0, len(infos), _LIST_BATCH):
            batch = infos[start:start + _LIST_BATCH]
            yield pb.ListSnapshotsResponse(info=[_info(i) for i in batch])

    @_observed
    async def Usage(self, request: pb.UsageRequest, context) -> pb.UsageResponse:
        size, inodes = await self.sn.usage(request.key)
        return pb.UsageResponse(size=size, inodes=inodes)

    @_observed
    async def Cleanup(self, request: pb.CleanupRequest, context) -> empty_pb2.Empty:
        await self.sn.cleanup()
        return empty_pb2.Empty()
