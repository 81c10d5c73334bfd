"""The snapshotter's side of the FUSE manager: calls over the socket, and a new
connection (starting the manager again in spawn mode) when the old one drops."""

import asyncio
import contextlib
import itertools
import logging
import subprocess
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ..errors import NotFound, SnapshotError, Unavailable
from ..lazy.layer_source import LayerSource, NotLazy
from ..lazy.prefetch_wait import WHOLE
from .protocol import (
    MAX_LINE_BYTES,
    NOT_FOUND,
    NOT_LAZY,
    PROTOCOL_VERSION,
    UNAVAILABLE,
    ManagerError,
    answer_of,
    connected_socket,
    decode,
    encode,
)

log = logging.getLogger(__name__)
CONNECT_TIMEOUT_SECONDS = 30.0
# A call made while the connection is down waits this long for the next one.
RECONNECT_WAIT_SECONDS = 10.0
RECONNECT_BACKOFF_MAX_SECONDS = 5.0
# pull_ahead answers once the manager has read the manifest: one registry round trip.
PULL_AHEAD_ANSWER_SECONDS = 30.0


def _error(kind: str, message: str) -> Exception:
    if kind == NOT_LAZY:
        return NotLazy(message)
    if kind == UNAVAILABLE:
        return Unavailable(message)
    if kind == NOT_FOUND:
        return NotFound(message)
    return SnapshotError(f"FUSE manager: {message}")


class FuseManagerClient:
    """Lazy layers served by the FUSE manager, as the snapshotter sees them.

    `spawn_argv`: how to start the manager when nothing answers on its socket (None:
    wait for one started by someone else). `on_reconnect` runs after each new
    connection but the first, to bring the manager's layers in line with the
    snapshots (a manager that restarted serves none)."""

    def __init__(self, address: str, mountpoint: str, spawn_argv: list[str] | None = None):
        self.address = address
        self.mountpoint = mountpoint
        self.spawn_argv = spawn_argv
        self.on_reconnect: Callable[[], Awaitable[None]] | None = None
        self.layers: dict[str, str] = {}  # name -> blob digest, as the manager serves them
        self.pid: int | None = None  # of the manager
        self.spawned: subprocess.Popen[bytes] | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._reader: asyncio.Task[None] | None = None
        self._reconnect: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        # Connected, and the manager's layers brought in line with the snapshots: a
        # manager that came back serves nothing until `on_reconnect` has run.
        self._in_line = asyncio.Event()
        self._closed = False

    # -- connection ----------------------------------------------------------------------

    async def connect(self, timeout: float = CONNECT_TIMEOUT_SECONDS) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                sock = connected_socket(self.address)
                break
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                if self.spawn_argv is not None and (self.spawned is None
                                                    or self.spawned.poll() is not None):
                    self._spawn()
                if time.monotonic() > deadline:
                    raise Unavailable(f"no FUSE manager answers on {self.address}: {exc}"
                                      f"{self._spawn_failure()}") from None
                await asyncio.sleep(0.05)
        reader, self._writer = await asyncio.open_unix_connection(sock=sock,
                                                                  limit=MAX_LINE_BYTES)
        self._reader = asyncio.create_task(self._read(reader))
        try:
            hello = await self._call("hello", None, protocol=PROTOCOL_VERSION)
        except ManagerError as exc:
            raise _error(exc.kind, str(exc)) from None
        if hello["mountpoint"] != self.mountpoint:
            raise SnapshotError(f"the FUSE manager on {self.address} mounts at "
                                f"{hello['mountpoint']}, not {self.mountpoint}")
        self.pid = hello["pid"]
        self.layers = {layer["name"]: layer["digest"] for layer in hello["layers"]}
        self._connected.set()
        if self.on_reconnect is None:  # the first connection: the service restores first
            self._in_line.set()
        log.info("FUSE manager %d: serving %d lazy layers", self.pid, len(self.layers))

    def _spawn(self) -> None:
        assert self.spawn_argv is not None
        log.info("starting the FUSE manager: %s", " ".join(self.spawn_argv))
        # Its own session, so signals for the service (a terminal's ^C, a stop) pass it by.
        self.spawned = subprocess.Popen(self.spawn_argv, stdin=subprocess.DEVNULL,
                                        start_new_session=True)

    def _spawn_failure(self) -> str:
        if self.spawned is not None and self.spawned.poll() is not None:
            return f" (the manager started exited with status {self.spawned.returncode})"
        return ""

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while line := await reader.readline():
                answer = answer_of(decode(line))
                # Ids are the ints this client sent; anything else answers nothing.
                future = self._pending.pop(answer.id, None) \
                    if isinstance(answer.id, int) else None
                if future is None or future.done():
                    continue
                if answer.error is not None:
                    future.set_exception(answer.error)  # what it means: `call` says
                else:
                    future.set_result(answer.result)
        except (ConnectionError, ValueError, asyncio.LimitOverrunError, ManagerError) as exc:
            # A malformed answer means the two sides no longer agree: start afresh.
            log.warning("FUSE manager connection: %s", exc)
        finally:
            self._lost()

    def _lost(self) -> None:
        self._connected.clear()
        self._in_line.clear()
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(Unavailable("lost the connection to the FUSE manager"))
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if not self._closed and (self._reconnect is None or self._reconnect.done()):
            log.warning("lost the FUSE manager (pid %s); connecting again", self.pid)
            self._reconnect = asyncio.create_task(self._connect_again())

    async def _connect_again(self) -> None:
        delay = 0.1
        while not self._closed:
            try:
                await self.connect()
                if self.on_reconnect is not None:
                    await self.on_reconnect()
                self._in_line.set()
                return
            except Exception as exc:
                log.warning("FUSE manager: %s; trying again in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RECONNECT_BACKOFF_MAX_SECONDS)

    async def wait_in_line(self, timeout: float) -> None:
        """Wait until the manager serves every lazy layer again after it was lost;
        UNAVAILABLE if that takes longer than `timeout` seconds."""
        try:
            await asyncio.wait_for(self._in_line.wait(), timeout)
        except TimeoutError:
            raise Unavailable(f"the FUSE manager has not served the lazy layers again "
                              f"within {timeout:.0f}s") from None

    async def close(self) -> None:
        """Close the connection; the manager keeps serving."""
        self._closed = True
        for task in (self._reconnect, self._reader):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self._writer is not None:
            self._writer.close()

    # -- calls ---------------------------------------------------------------------------

    async def _call(self, op: str, answer_within: float | None, **args: Any) -> Any:
        if self._writer is None:
            raise Unavailable("not connected to the FUSE manager")
        request_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            self._writer.write(encode({"id": request_id, "op": op, "args": args}))
            await self._writer.drain()
            return await asyncio.wait_for(future, answer_within)
        except ConnectionError as exc:
            raise Unavailable(f"FUSE manager: {exc}") from None
        except TimeoutError:
            raise Unavailable(f"the FUSE manager did not answer {op} in "
                              f"{answer_within:.0f}s") from None
        finally:
            self._pending.pop(request_id, None)

    async def call(self, op: str, answer_within: float | None = None, **args: Any) -> Any:
        """The answer to `op`; a refusal as the snapshotter's own error (NotLazy,
        Unavailable, NotFound or SnapshotError)."""
        try:
            return await self.call_as_sent(op, answer_within, **args)
        except ManagerError as exc:
            raise _error(exc.kind, str(exc)) from None

    async def call_as_sent(self, op: str, answer_within: float | None = None,
                           **args: Any) -> Any:
        """The answer to `op`; a refusal as the ManagerError the manager sent, its kind
        kept (Unavailable if the manager cannot be reached)."""
        if not self._connected.is_set():
            try:
                await asyncio.wait_for(self._connected.wait(), RECONNECT_WAIT_SECONDS)
            except TimeoutError:
                raise Unavailable("the FUSE manager is not reachable") from None
        return await self._call(op, answer_within, **args)

    # -- lazy layers ---------------------------------------------------------------------

    def path_of(self, name: str) -> str:
        return f"{self.mountpoint}/{name}"

    async def mount(self, name: str, directory: str, restored: bool = False) -> int:
        """Serve the lazy layer stored in `directory` (its toc and layer.json) as
        MOUNT/<name>; returns the bytes of its regular files."""
        served = await self.call("mount", name=name, directory=directory, restored=restored)
        self.layers[name] = served["digest"]
        return int(served["size"])

    async def mount_remote(self, name: str, directory: str, source: LayerSource) -> int:
        """Have the manager fetch and verify the remote layer's TOC, store it in
        `directory` and serve the layer as MOUNT/<name>; returns the bytes of its
        regular files. NotLazy when the layer cannot be served lazily."""
        served = await self.call("mount_remote", name=name, directory=directory, source={
            "target": source.target, "reference": str(source.reference),
            "layer_digest": source.layer_digest, "manifest_digest": source.manifest_digest})
        self.layers[name] = served["digest"]
        return int(served["size"])

    async def pull_ahead(self, reference: str, manifest_digest: str,
                         layers: list[str]) -> int:
        """Have the manager open the image's lazy layers and start their prefetch now,
        before their Prepares; returns how many it started."""
        return int(await self.call("pull_ahead", PULL_AHEAD_ANSWER_SECONDS,
                                   reference=reference, manifest_digest=manifest_digest,
                                   layers=layers))

    async def unmount(self, name: str) -> None:
        self.layers.pop(name, None)
        await self.call("unmount", name=name)

    async def materialize(self, name: str, directory: str) -> dict[str, Any]:
        """Have the manager write the layer out to DIRECTORY/tree (lazy.materialize)."""
        return dict(await self.call("materialize", name=name, directory=directory))

    async def wait_prefetched(self, names: list[str], timeout: float,
                              until: str = WHOLE) -> None:
        await self.call("wait_prefetched", timeout + RECONNECT_WAIT_SECONDS, names=names,
                        timeout=timeout, until=until)

    def serves(self, digest: str) -> bool:
        return digest in self.layers.values()

    async def fetch(self, digest: str, full: bool) -> None:
        await self.call("fetch", digest=digest, full=full)

    async def chunks_missing(self, digest: str, full: bool) -> bool:
        return bool(await self.call("chunks_missing", digest=digest, full=full))

    async def layer_bytes(self, digest: str) -> tuple[int, int]:
        cached, total = await self.call("layer_bytes", digest=digest)
        return int(cached), int(total)

    async def protect(self, owner: str, digests: list[str], full: bool) -> None:
        await self.call("protect", owner=owner, digests=digests, full=full)

    async def release(self, owner: str) -> None:
        await self.call("release", owner=owner)

    async def release_others(self, prefix: str, keep: list[str]) -> list[str]:
        return list(await self.call("release_others", prefix=prefix, keep=keep))

    async def metrics(self) -> str:
        return str(await self.call("metrics", 10.0))
