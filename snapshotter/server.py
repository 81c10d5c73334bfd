"""Run the snapshotter service until SIGTERM or SIGINT."""

import asyncio
import contextlib
import logging
import os
import signal
import subprocess

import grpc

from oci.docker_config import CredentialStore
from oci.hosts import HostsConfig
from oci.registry import RegistryClient

from .api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from .config import Config, metrics_host_port
from .http_endpoint import HttpEndpoint
from .lazy.chunk_cache import ChunkCache
from .lazy.manager import LazyLayers
from .lazy.profiles import ProfileRecorder
from .lazy.remote import LayerSource, RemoteLayer, open_remote_layer
from .overlay import OverlaySnapshotter
from .service import SnapshotsService
from .warm.http import warm_routes
from .warm.manager import WarmSet
from .warm.spec import parse_entries

log = logging.getLogger("lazypull.snapshotter")
# containerd's own limit for gRPC messages, so large label maps fail the same way.
MAX_MESSAGE_SIZE = 16 << 20
SHUTDOWN_GRACE_SECONDS = 5


def _prepare_socket(path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", mode=0o711, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # a socket left by a killed instance


def _unmount_stale(mountpoint: str) -> None:
    """A killed service leaves its FUSE mount behind, disconnected: clear it first."""
    with open("/proc/self/mounts") as f:
        mounted = any(line.split()[1] == mountpoint for line in f)
    if mounted:
        log.info("unmounting the FUSE mount a previous instance left at %s", mountpoint)
        subprocess.run(["umount", "-l", mountpoint], check=False, capture_output=True)


async def _lazy_layers(config: Config) -> tuple[LazyLayers, RegistryClient]:
    client = RegistryClient(hosts=HostsConfig(config.hosts_dir),
                            credentials=CredentialStore(config.docker_config or None))
    # Whole chunks (4 MiB by default) must fit the memory tier: FUSE reads 128 KiB at a
    # time, and each read of a chunk only on disk reads and re-hashes all of it.
    cache = ChunkCache(config.cache_dir, config.cache_max_bytes, config.cache_memory_bytes,
                       memory_item_limit=min(16 << 20, config.cache_memory_bytes // 4))
    _unmount_stale(config.fuse_mountpoint)
    profiles = None
    if config.profile_window_seconds > 0:
        profiles = ProfileRecorder(config.profiles_dir, max_files=config.profile_max_files,
                                   window_seconds=config.profile_window_seconds)
    lazy = LazyLayers(config.fuse_mountpoint, cache, client,
                      concurrency=config.fetch_concurrency, background=config.background_fetch,
                      background_bytes_per_second=config.background_bytes_per_second,
                      background_quiet_seconds=config.background_quiet_seconds,
                      small_file_window_bytes=config.small_file_window_bytes,
                      profiles=profiles)
    await lazy.start()
    return lazy, client


def _warm_set(config: Config, lazy: LazyLayers | None,
              client: RegistryClient | None) -> WarmSet | None:
    """The warm set, if the config names one (no warm_set and no warm_set_dir: None)."""
    if not config.warm_set and not config.warm_set_dir:
        return None
    registry = client or RegistryClient(hosts=HostsConfig(config.hosts_dir),
                                        credentials=CredentialStore(config.docker_config or None))
    return WarmSet(parse_entries(config.warm_set, "warm_set"), registry=registry,
                   containerd_address=config.containerd_address, lazy=lazy,
                   directory=config.warm_set_dir, concurrency=config.warm_concurrency)


async def serve(config: Config) -> None:
    lazy = client = None
    if config.lazy:
        os.makedirs(config.root, mode=0o700, exist_ok=True)
        lazy, client = await _lazy_layers(config)

    async def open_remote(source: LayerSource) -> RemoteLayer:
        assert client is not None
        return await open_remote_layer(client, source)

    snapshotter = OverlaySnapshotter(config.root, lazy, open_remote if lazy else None,
                                     config.prefetch_timeout_seconds)
    removed = snapshotter.recover()
    if removed:
        log.info("recovered: removed %d leftover directories", len(removed))
    restored = await snapshotter.restore_lazy_layers()
    if restored:
        log.info("serving %d lazy layers again", restored)
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE_SIZE),
        ("grpc.max_send_message_length", MAX_MESSAGE_SIZE),
    ])
    pb_grpc.add_SnapshotsServicer_to_server(SnapshotsService(snapshotter), server)
    _prepare_socket(config.address)
    server.add_insecure_port(f"unix:{config.address}")
    endpoint = None
    warm = _warm_set(config, lazy, client)
    if config.metrics_address:
        host, port = metrics_host_port(config.metrics_address)
        endpoint = HttpEndpoint(host, port, ready=warm.ready if warm else lambda: (True, "ready"),
                                routes=warm_routes(warm) if warm else None)
        await endpoint.start()
    await server.start()
    os.chmod(config.address, 0o660)
    os.chown(config.address, 0, 0)
    log.info("serving containerd snapshots on %s (root %s)", config.address, config.root)
    if warm is not None:  # after recovery; containerd pulls through the socket just opened
        await warm.start()

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    log.info("shutting down")
    if warm is not None:
        await warm.close()
    await server.stop(SHUTDOWN_GRACE_SECONDS)
    if endpoint:
        await endpoint.stop()
    if warm is not None and client is None:
        await warm.registry.aclose()
    if lazy is not None and client is not None:
        await lazy.close()
        await client.aclose()
    await snapshotter.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(config.address)


def run(config: Config) -> int:
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(config))
    return 0
