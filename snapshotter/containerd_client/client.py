"""An asyncio client for containerd 1.6's gRPC API (grpclib over its unix socket).

Only what a pull needs: version, leases, content (Info/Update/List/Write), images,
snapshots (through any snapshotter containerd has loaded) and diff (Apply).
As in containerd's Go client, the namespace travels in the `containerd-namespace`
gRPC metadata of every call and the lease in `containerd-lease`: inside
`async with client.lease():` every call (from any task started in it) is made
under that lease, so containerd's garbage collector leaves what it creates alone.
"""

import asyncio
import contextlib
import contextvars
import os
import secrets
import stat
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass

from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError

from snapshotter.api.containerd.services.content.v1 import content_wire
from snapshotter.api.containerd.services.diff.v1 import diff_wire
from snapshotter.api.containerd.services.images.v1 import images_wire
from snapshotter.api.containerd.services.leases.v1 import leases_wire
from snapshotter.api.containerd.services.snapshots.v1 import snapshots_wire
from snapshotter.api.containerd.services.version.v1 import version_wire
from snapshotter.api.containerd.types import descriptor_wire, mount_wire
from snapshotter.api.wellknown import Empty, FieldMask
from snapshotter.api.wire import WireCodec

from .errors import (
    AlreadyExists,
    ContainerdError,
    ContainerdUnreachable,
    NotFound,
    Unavailable,
)
from .errors import from_rpc_error as _error

DEFAULT_ADDRESS = "/run/containerd/containerd.sock"
DEFAULT_NAMESPACE = "default"
NAMESPACE_HEADER = "containerd-namespace"
LEASE_HEADER = "containerd-lease"
LEASE_EXPIRE_LABEL = "containerd.io/gc.expire"
# containerd's gRPC server takes messages up to 16 MiB; content is written in smaller pieces.
WRITE_CHUNK = 1 << 20
# What a call that never reached containerd raises: the socket refused, closed or vanished.
_CONNECTION_ERRORS = (OSError, StreamTerminatedError)

_lease: contextvars.ContextVar[str | None] = contextvars.ContextVar("containerd_lease",
                                                                    default=None)


@dataclass(frozen=True)
class ContentDescriptor:
    """What containerd's content, images and diff services call a Descriptor."""

    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] | None = None

    def to_pb(self) -> descriptor_wire.Descriptor:
        return descriptor_wire.Descriptor(media_type=self.media_type, digest=self.digest,
                                          size=self.size, annotations=dict(self.annotations or {}))

    @classmethod
    def from_pb(cls, d: descriptor_wire.Descriptor) -> "ContentDescriptor":
        return cls(d.media_type, d.digest, d.size, dict(d.annotations))


def _rfc3339(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


class ContainerdClient:
    """One channel to containerd; `namespace` applies to every call."""

    def __init__(self, address: str = DEFAULT_ADDRESS, namespace: str = DEFAULT_NAMESPACE, *,
                 connect_timeout: float = 10.0):
        if not namespace:
            raise ValueError("a containerd namespace is required")
        self.address = address
        self.namespace = namespace
        self.connect_timeout = connect_timeout
        # Connects on the first call, from the event loop that makes it.
        self._channel = Channel(path=os.path.abspath(address), codec=WireCodec())
        self._version = version_wire.VersionStub(self._channel)
        self._leases = leases_wire.LeasesStub(self._channel)
        self._content = content_wire.ContentStub(self._channel)
        self._images = images_wire.ImagesStub(self._channel)
        self._snapshots = snapshots_wire.SnapshotsStub(self._channel)
        self._diff = diff_wire.DiffStub(self._channel)

    async def __aenter__(self) -> "ContainerdClient":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._channel.close()

    def _metadata(self) -> list[tuple[str, str]]:
        metadata = [(NAMESPACE_HEADER, self.namespace)]
        lease = _lease.get()
        if lease:
            metadata.append((LEASE_HEADER, lease))
        return metadata

    async def _call(self, what: str, method, request):
        try:
            return await method(request, metadata=self._metadata())
        except GRPCError as exc:
            raise _error(exc, what) from None
        except _CONNECTION_ERRORS as exc:
            raise _unreachable(self.address, exc, what) from None

    # -- connection -------------------------------------------------------------------

    async def version(self) -> tuple[str, str]:
        """(version, revision) of the containerd on the socket; raises
        ContainerdUnreachable, with the reason, when nothing answers there."""
        try:
            mode = os.stat(self.address).st_mode
        except FileNotFoundError:
            raise ContainerdUnreachable(
                f"cannot reach containerd: no socket at {self.address} "
                "(is containerd running? see --address)") from None
        except OSError as exc:
            raise ContainerdUnreachable(f"cannot reach containerd at {self.address}: "
                                        f"{exc.strerror or exc}") from None
        if not stat.S_ISSOCK(mode):
            raise ContainerdUnreachable(f"cannot reach containerd: {self.address} is not a "
                                        "unix socket")
        try:
            reply = await self._version.Version(Empty(), metadata=self._metadata(),
                                                timeout=self.connect_timeout)
        except TimeoutError:  # before OSError, of which it is one
            raise ContainerdUnreachable(f"cannot reach containerd at {self.address}: no answer "
                                        f"within {self.connect_timeout:g} s") from None
        except _CONNECTION_ERRORS as exc:
            raise _unreachable(self.address, exc) from None
        except GRPCError as exc:
            if exc.status in (Status.UNAVAILABLE, Status.DEADLINE_EXCEEDED,
                              Status.UNIMPLEMENTED):
                raise ContainerdUnreachable(f"cannot reach containerd at {self.address}: "
                                            f"{exc.message or exc.status.name.lower()}") from None
            raise _error(exc, "version") from None
        return reply.version, reply.revision

    # -- leases -----------------------------------------------------------------------

    async def create_lease(self, lease_id: str | None = None, expire: float | None = 86400.0,
                           labels: Mapping[str, str] | None = None) -> str:
        """A new lease (id random unless given); it expires after `expire` seconds, as
        containerd's client leases do, so a crashed client does not pin content forever."""
        all_labels = dict(labels or {})
        if expire is not None:
            all_labels[LEASE_EXPIRE_LABEL] = _rfc3339(time.time() + expire)
        lease_id = lease_id or f"lazypull-{secrets.token_hex(8)}"
        reply = await self._call("create lease", self._leases.Create,
                                 leases_wire.CreateRequest(id=lease_id, labels=all_labels))
        return reply.lease.id

    async def delete_lease(self, lease_id: str, sync: bool = False) -> None:
        await self._call(f"delete lease {lease_id}", self._leases.Delete,
                         leases_wire.DeleteRequest(id=lease_id, sync=sync))

    async def list_leases(self, *filters: str) -> list[leases_wire.Lease]:
        reply = await self._call("list leases", self._leases.List,
                                 leases_wire.ListRequest(filters=list(filters)))
        return list(reply.leases)

    @asynccontextmanager
    async def lease(self, expire: float | None = 86400.0) -> AsyncIterator[str]:
        """Make every call inside the block under a new lease; delete it at the end."""
        lease_id = await self.create_lease(expire=expire)
        token = _lease.set(lease_id)
        try:
            yield lease_id
        except BaseException:
            _lease.reset(token)
            # Even when cancelled: a lease left behind pins what it holds until it expires.
            with contextlib.suppress(ContainerdError):
                await asyncio.shield(self.delete_lease(lease_id))
            raise
        _lease.reset(token)
        await self.delete_lease(lease_id)

    # -- content ----------------------------------------------------------------------

    async def content_info(self, digest: str) -> content_wire.Info | None:
        try:
            reply = await self._call(f"content {digest}", self._content.Info,
                                     content_wire.InfoRequest(digest=digest))
        except NotFound:
            return None
        return reply.info

    async def update_content_labels(self, digest: str,
                                    labels: Mapping[str, str]) -> content_wire.Info:
        """Set these labels (an empty value removes one); the others stay."""
        mask = FieldMask(paths=[f"labels.{key}" for key in labels])
        request = content_wire.UpdateRequest(
            info=content_wire.Info(digest=digest, labels=dict(labels)), update_mask=mask)
        reply = await self._call(f"update labels of content {digest}", self._content.Update,
                                 request)
        return reply.info

    async def list_content(self, *filters: str) -> list[content_wire.Info]:
        replies = await self._call("list content", self._content.List,
                                   content_wire.ListContentRequest(filters=list(filters)))
        return [info for reply in replies for info in reply.info]

    async def write_content(self, ref: str, digest: str, size: int,
                            data: AsyncIterable[bytes] | Iterable[bytes],
                            labels: Mapping[str, str] | None = None, *,
                            lock_wait: float = 30.0) -> bool:
        """Write a blob through a Write stream: STAT, WRITE..., COMMIT with the expected
        digest and size (containerd verifies both) and `labels`.

        Returns False, without consuming `data`, if containerd already has the blob.
        While another client writes the same `ref`, waits up to `lock_wait` seconds
        for it to finish.
        """
        deadline = time.monotonic() + lock_wait
        while True:
            try:
                return await self._write_once(ref, digest, size, data, labels or {})
            except Unavailable as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
                if await self.content_info(digest) is not None:
                    return False

    async def _write_once(self, ref: str, digest: str, size: int,
                          data: AsyncIterable[bytes] | Iterable[bytes],
                          labels: Mapping[str, str]) -> bool:
        what = f"write {ref}"
        try:
            async with self._content.Write.open(metadata=self._metadata()) as call:
                reply = await _exchange(call, content_wire.WriteContentRequest(
                    action=content_wire.STAT, ref=ref, total=size, expected=digest))
                offset = 0
                async for piece in _pieces(data, WRITE_CHUNK):
                    reply = await _exchange(call, content_wire.WriteContentRequest(
                        action=content_wire.WRITE, ref=ref, offset=offset, data=piece))
                    offset += len(piece)
                    if reply.offset != offset:
                        raise ContainerdError(f"{what}: containerd holds {reply.offset} bytes "
                                              f"after {offset} were sent")
                # An empty blob still needs a WRITE at offset 0: it truncates a stale ingest.
                if offset == 0:
                    await _exchange(call, content_wire.WriteContentRequest(
                        action=content_wire.WRITE, ref=ref, offset=0))
                # The last message also ends our side: containerd closes the stream
                # once it has answered the commit.
                reply = await _exchange(call, content_wire.WriteContentRequest(
                    action=content_wire.COMMIT, ref=ref, offset=offset, total=size,
                    expected=digest, labels=dict(labels)), end=True)
        except GRPCError as exc:
            error = _error(exc, what)
            if isinstance(error, AlreadyExists):
                return False
            raise error from None
        except _CONNECTION_ERRORS as exc:
            raise _unreachable(self.address, exc, what) from None
        if reply.digest and reply.digest != digest:
            raise ContainerdError(f"{what}: containerd committed {reply.digest}, not {digest}")
        return True

    # -- images -----------------------------------------------------------------------

    async def get_image(self, name: str) -> images_wire.Image | None:
        try:
            reply = await self._call(f"image {name}", self._images.Get,
                                     images_wire.GetImageRequest(name=name))
        except NotFound:
            return None
        return reply.image

    async def create_or_update_image(self, name: str, target: ContentDescriptor,
                                     labels: Mapping[str, str] | None = None
                                     ) -> tuple[images_wire.Image, bool]:
        """(record, created): create the image record, or point the existing one at
        `target` (its other labels stay). As containerd's client does after a pull."""
        image = images_wire.Image(name=name, labels=dict(labels or {}), target=target.to_pb())
        try:
            reply = await self._call(f"create image {name}", self._images.Create,
                                     images_wire.CreateImageRequest(image=image))
            return reply.image, True
        except AlreadyExists:
            pass
        paths = ["target", *(f"labels.{key}" for key in labels or {})]
        reply = await self._call(f"update image {name}", self._images.Update,
                                 images_wire.UpdateImageRequest(
                                     image=image, update_mask=FieldMask(paths=paths)))
        return reply.image, False

    async def delete_image(self, name: str, sync: bool = False) -> None:
        await self._call(f"delete image {name}", self._images.Delete,
                         images_wire.DeleteImageRequest(name=name, sync=sync))

    # -- snapshots --------------------------------------------------------------------

    async def stat_snapshot(self, snapshotter: str, key: str) -> snapshots_wire.Info | None:
        try:
            reply = await self._call(f"snapshotter {snapshotter}: stat {key}",
                                     self._snapshots.Stat,
                                     snapshots_wire.StatSnapshotRequest(snapshotter=snapshotter,
                                                                        key=key))
        except NotFound:
            return None
        return reply.info

    async def prepare_snapshot(self, snapshotter: str, key: str, parent: str,
                               labels: Mapping[str, str] | None = None
                               ) -> list[mount_wire.Mount]:
        reply = await self._call(
            f"snapshotter {snapshotter}: prepare {key}", self._snapshots.Prepare,
            snapshots_wire.PrepareSnapshotRequest(snapshotter=snapshotter, key=key,
                                                  parent=parent, labels=dict(labels or {})))
        return list(reply.mounts)

    async def commit_snapshot(self, snapshotter: str, name: str, key: str,
                              labels: Mapping[str, str] | None = None) -> None:
        await self._call(
            f"snapshotter {snapshotter}: commit {key} as {name}", self._snapshots.Commit,
            snapshots_wire.CommitSnapshotRequest(snapshotter=snapshotter, name=name, key=key,
                                                 labels=dict(labels or {})))

    async def remove_snapshot(self, snapshotter: str, key: str) -> None:
        await self._call(f"snapshotter {snapshotter}: remove {key}", self._snapshots.Remove,
                         snapshots_wire.RemoveSnapshotRequest(snapshotter=snapshotter, key=key))

    async def list_snapshots(self, snapshotter: str, *filters: str) -> list[snapshots_wire.Info]:
        replies = await self._call(f"snapshotter {snapshotter}: list", self._snapshots.List,
                                   snapshots_wire.ListSnapshotsRequest(snapshotter=snapshotter,
                                                                       filters=list(filters)))
        return [info for reply in replies for info in reply.info]

    # -- diff -------------------------------------------------------------------------

    async def apply(self, layer: ContentDescriptor,
                    mounts: Iterable[mount_wire.Mount]) -> ContentDescriptor:
        """Apply a layer blob from the content store onto `mounts`; returns the
        uncompressed layer's descriptor (its digest is the layer's diff ID)."""
        reply = await self._call(f"apply layer {layer.digest}", self._diff.Apply,
                                 diff_wire.ApplyRequest(diff=layer.to_pb(), mounts=list(mounts)))
        return ContentDescriptor.from_pb(reply.applied)


async def _exchange(call, request, end: bool = False):  # type: ignore[no-untyped-def]
    """Send one message on a bidirectional stream and read containerd's answer to it."""
    await call.send_message(request, end=end)
    reply = await call.recv_message()
    if reply is None:  # containerd ended the stream: its status is in the trailers
        await call.recv_trailing_metadata()
        raise ContainerdError("containerd ended the stream without an answer")
    return reply


def _unreachable(address: str, exc: BaseException,
                 what: str | None = None) -> ContainerdUnreachable:
    reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    prefix = f"{what}: " if what else ""
    return ContainerdUnreachable(f"{prefix}cannot reach containerd at {address}: {reason}")


async def _pieces(data: AsyncIterable[bytes] | Iterable[bytes],
                  size: int) -> AsyncIterator[bytes]:
    """Re-cut a byte stream into pieces of at most `size` bytes."""
    source = data if hasattr(data, "__aiter__") else _aiter(data)  # type: ignore[arg-type]
    async for chunk in source:  # type: ignore[union-attr]
        view = memoryview(chunk)
        while len(view) > size:
            yield bytes(view[:size])
            view = view[size:]
        if len(view):
            yield bytes(view)


async def _aiter(data: Iterable[bytes]) -> AsyncIterator[bytes]:
    for chunk in data:
        yield chunk
