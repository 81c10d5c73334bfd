"""Run the FUSE manager until SIGTERM or SIGINT.

One manager serves one service root: a lock file keeps a second one out. It keeps
running when the snapshotter stops; stopping the manager itself unmounts the lazy
layers, which the containers still running on them then lose.
"""

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import subprocess
import sys
from typing import Any

from oci import asyncio_only  # noqa: F401  (before httpx: httpcore would load trio)
from oci.docker_config import CredentialStore
from oci.hosts import HostsConfig
from oci.registry import RegistryClient

from .. import allocator, memory_trace
from ..config import Config
from ..lazy.chunk_cache import ChunkCache
from ..lazy.index_ahead import INDEX_AHEAD_DIR, IndexAhead
from ..lazy.index_lookup import IndexLookup
from ..lazy.manager import LazyLayers
from ..lazy.profiles import ProfileRecorder
from ..state_dir import StateDirError, ensure_private_dir, open_lock_file, write_pid_file
from .protocol import (
    INTERNAL,
    MAX_ERROR_MESSAGE,
    MAX_LINE_BYTES,
    ManagerError,
    bound_socket,
    decode,
    encode,
    request_of,
)
from .registry_relay import RegistryRelay, registry_key
from .service import FuseManagerService

log = logging.getLogger("lazypull.fuse-manager")
# FUSE requests are served on the loop's thread while worker threads verify and store
# fetched chunks. The loop gives up the GIL in every SQLite call of a lookup and then
# waits up to this long for it: measured (perf fetch-memory) during a background fetch
# of tiny files, index lookups' p99 went from about 10 ms to 5 ms at 0.5 ms instead of
# Python's 5 ms.
GIL_SWITCH_INTERVAL_SECONDS = 0.0005


class AlreadyRunning(RuntimeError):
    pass


def _lock(root: str) -> int:
    fd = open_lock_file(os.path.join(root, "fuse-manager.lock"))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AlreadyRunning(f"a FUSE manager already serves {root}") from None
    return fd


def _unmount_stale(mountpoint: str) -> None:
    """A killed manager leaves its FUSE mount behind, disconnected: clear it first."""
    with open("/proc/self/mounts") as f:
        mounted = any(line.split()[1] == mountpoint for line in f)
    if mounted:
        log.info("unmounting the FUSE mount a previous manager left at %s", mountpoint)
        subprocess.run(["umount", "-l", mountpoint], check=False, capture_output=True)


def lazy_layers(config: Config) -> tuple[LazyLayers, RegistryClient]:
    client = RegistryClient(hosts=HostsConfig(config.hosts_dir),
                            credentials=CredentialStore(config.docker_config or None),
                            timeout=config.registry_stall_seconds)
    # Whole chunks (4 MiB by default) must fit the memory tier: FUSE reads 128 KiB at a
    # time, and each read of a chunk on disk that is not a sealed file reads and hashes
    # all of it.
    cache = ChunkCache(config.cache_dir, config.cache_max_bytes, config.cache_memory_bytes,
                       memory_item_limit=min(16 << 20, config.cache_memory_bytes // 4))
    profiles = None
    if config.profile_window_seconds > 0:
        profiles = ProfileRecorder(config.profiles_dir, max_files=config.profile_max_files,
                                   window_seconds=config.profile_window_seconds)
    lazy = LazyLayers(config.fuse_mountpoint, cache, client,
                      concurrency=config.fetch_concurrency, background=config.background_fetch,
                      background_bytes_per_second=config.background_bytes_per_second,
                      background_quiet_seconds=config.background_quiet_seconds,
                      small_file_window_bytes=config.small_file_window_bytes,
                      demand_readahead_bytes=config.demand_readahead_bytes,
                      read_timeout=config.read_timeout_seconds, profiles=profiles)
    return lazy, client


class _Connection:
    """One snapshotter's connection: requests run concurrently, answers go out whole."""

    def __init__(self, service: FuseManagerService, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter):
        self.service = service
        self.reader, self.writer = reader, writer
        self.tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        try:
            while line := await self.reader.readline():
                task = asyncio.create_task(self._answer(line))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
        except (ConnectionError, asyncio.LimitOverrunError, ValueError) as exc:
            log.warning("dropping a connection: %s", exc)
        finally:
            for task in list(self.tasks):
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            self.writer.close()

    async def _answer(self, line: bytes) -> None:
        answer: dict[str, Any] = {"id": None}
        try:
            message = decode(line)
            answer["id"] = message.get("id")  # so that even a refusal reaches its caller
            request = request_of(message)
            answer["result"] = await self.service.handle(request.op, request.args)
        except ManagerError as exc:
            answer["error"] = {"kind": exc.kind, "message": str(exc)[:MAX_ERROR_MESSAGE]}
        except Exception as exc:  # a bug answers the request; it must not end the loop
            log.exception("%s failed", line[:200])
            answer["error"] = {"kind": INTERNAL,
                               "message": f"{type(exc).__name__}: {exc}"[:MAX_ERROR_MESSAGE]}
        with contextlib.suppress(ConnectionError):
            self.writer.write(encode(answer))
            await self.writer.drain()


async def serve(config: Config) -> None:
    ensure_private_dir(config.root)
    lock = _lock(config.root)
    _unmount_stale(config.fuse_mountpoint)
    lazy, client = lazy_layers(config)
    await lazy.start()
    index_lookup = IndexLookup(client, timeout=config.gzip_index_lookup_seconds,
                               negative_ttl=config.gzip_index_negative_ttl_seconds,
                               ahead=IndexAhead(client, os.path.join(config.root,
                                                                     INDEX_AHEAD_DIR),
                                                cache=lazy.cache)
                               if config.gzip_index_ahead else None) \
        if config.gzip_index_lookup else None
    relay = RegistryRelay(client, registry_key(config.hosts_dir, False,
                                               config.docker_config or None),
                          config.registry_stall_seconds)
    service = FuseManagerService(lazy, max_toc_bytes=config.max_toc_bytes,
                                 index_lookup=index_lookup, registry_relay=relay,
                                 ahead_dir=os.path.join(config.root, "pull-ahead"),
                                 index_build_template=config.index_build_template)
    if service.pull_ahead is not None:
        service.pull_ahead.start()
    if service.index_builder is not None:
        service.index_builder.start()  # its template, ready before the first pull

    connections: set[asyncio.Task[None]] = set()

    async def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        connections.add(task)
        try:
            await _Connection(service, reader, writer).run()
        finally:
            connections.discard(task)

    server = await asyncio.start_unix_server(
        connected, sock=bound_socket(config.fuse_manager_address), limit=MAX_LINE_BYTES)
    write_pid_file(config.fuse_manager_pidfile, os.getpid())
    log.info("FUSE manager %d: lazy layers under %s, requests on %s", os.getpid(),
             config.fuse_mountpoint, config.fuse_manager_address)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    memory_trace.install(loop)
    await stopping.wait()
    log.info("FUSE manager shutting down: unmounting %d lazy layers", len(lazy.layers))
    server.close()
    for task in list(connections):
        task.cancel()
    await asyncio.gather(*connections, return_exceptions=True)
    if service.pull_ahead is not None:
        await service.pull_ahead.close()
    if service.index_builder is not None:
        await service.index_builder.close()
    await lazy.close()
    if index_lookup is not None and index_lookup.ahead is not None:
        index_lookup.ahead.close()  # index trees no mount claimed
    await asyncio.to_thread(lazy.cache.close)  # writes out the recent uses (LRU order)
    await relay.aclose()
    await client.aclose()
    for path in (config.fuse_manager_address, config.fuse_manager_pidfile):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    os.close(lock)


def run(config: Config) -> int:
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    allocator.tune()  # before the worker threads exist
    memory_trace.start()
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_SECONDS)
    try:
        asyncio.run(serve(config))
    except (AlreadyRunning, StateDirError) as exc:
        log.error("%s", exc)
        return 1
    return 0
