"""Run the snapshotter service until SIGTERM or SIGINT."""

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from grpclib.server import Server

from . import allocator
from .config import Config, metrics_host_port
from .fusemanager.client import FuseManagerClient
from .http_endpoint import HttpEndpoint, Route
from .open_ahead import OpenAhead
from .overlay import OverlaySnapshotter
from .pull_handoff import PullHandoff
from .pull_protocol import socket_path
from .service import SnapshotsService, codec
from .state_dir import StateDirError, ensure_private_dir

if TYPE_CHECKING:
    from .warm.manager import WarmSet

log = logging.getLogger("lazypull.snapshotter")
SHUTDOWN_GRACE_SECONDS = 5
# An external FUSE manager (a second container) may start after this service.
EXTERNAL_MANAGER_WAIT_SECONDS = 120.0


def _prepare_socket(path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", mode=0o711, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # a socket left by a killed instance


def fuse_manager_argv(config: Config, config_path: str | None) -> list[str]:
    """How to start the FUSE manager for this config: the same program, its own command."""
    argv = [sys.executable, "-m", "cli.main", "fuse-manager", "--root", config.root,
            "--log-level", config.log_level]
    return argv + (["--config", config_path] if config_path else [])


async def _fuse_manager(config: Config, config_path: str | None) -> FuseManagerClient:
    spawn = fuse_manager_argv(config, config_path) if config.fuse_manager == "spawn" else None
    manager = FuseManagerClient(config.fuse_manager_address, config.fuse_mountpoint, spawn)
    timeout = 30.0 if spawn else EXTERNAL_MANAGER_WAIT_SECONDS
    await manager.connect(timeout)
    return manager


def _warm_routes(warm: "WarmSet") -> Route:
    from .warm.http import warm_routes

    return warm_routes(warm)


def _warm_set(config: Config, lazy: FuseManagerClient | None,
              snapshotter: OverlaySnapshotter) -> "WarmSet | None":
    """The warm set, if the config names one (no warm_set and no warm_set_dir: None)."""
    if not config.warm_set and not config.warm_set_dir:
        return None
    # Here, not at the top: a service without a warm set talks to no registry and
    # need not carry an HTTP client in memory.
    from oci import asyncio_only  # noqa: F401  (before httpx: see there)
    from oci.docker_config import CredentialStore
    from oci.hosts import HostsConfig
    from oci.registry import RegistryClient

    from .warm.manager import WarmSet
    from .warm.spec import parse_entries

    registry = RegistryClient(hosts=HostsConfig(config.hosts_dir),
                              credentials=CredentialStore(config.docker_config or None))
    return WarmSet(parse_entries(config.warm_set, "warm_set"), registry=registry,
                   containerd_address=config.containerd_address, lazy=lazy,
                   directory=config.warm_set_dir, concurrency=config.warm_concurrency,
                   materialize=snapshotter.materialize if lazy is not None else None)


async def serve(config: Config, config_path: str | None = None) -> None:
    ensure_private_dir(config.root)
    lazy = await _fuse_manager(config, config_path) if config.lazy else None

    snapshotter = OverlaySnapshotter(config.root, lazy, config.prefetch_timeout_seconds,
                                     config.prefetch_wait)
    removed = snapshotter.recover()
    if removed:
        log.info("recovered: removed %d leftover directories", len(removed))
    if lazy is not None:
        restored = await snapshotter.restore_lazy_layers()
        log.info("%d lazy layers served, %d of them mounted again",
                 len(lazy.layers), restored)
        lazy.on_reconnect = _resync(snapshotter)
    server = Server([SnapshotsService(snapshotter)], codec=codec())
    endpoint = None
    warm = _warm_set(config, lazy, snapshotter)
    if config.metrics_address:
        host, port = metrics_host_port(config.metrics_address)
        endpoint = HttpEndpoint(host, port, ready=warm.ready if warm else lambda: (True, "ready"),
                                routes=_warm_routes(warm) if warm else None,
                                more_metrics=lazy.metrics if lazy else None)
        await endpoint.start()
    # The socket accepts connections from here on: whoever waits for it finds the
    # probes up already.
    _prepare_socket(config.address)
    await server.start(path=config.address)
    os.chmod(config.address, 0o660)
    os.chown(config.address, 0, 0)
    log.info("serving containerd snapshots on %s (root %s)", config.address, config.root)
    ahead = OpenAhead(lazy, config.pull_ahead_snapshotter) \
        if lazy is not None and config.pull_ahead_snapshotter else None
    handoff = PullHandoff(socket_path(config.address), lazy,
                          on_manifest=ahead.manifest_chosen if ahead else None) \
        if config.take_pulls else None
    if handoff is not None:
        await handoff.start()
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
    if handoff is not None:
        await handoff.stop()
    if ahead is not None:
        await ahead.close()
    server.close()  # no new calls; the ones under way may finish within the grace period
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(server.wait_closed(), SHUTDOWN_GRACE_SECONDS)
    if endpoint:
        await endpoint.stop()
    if lazy is not None:
        await lazy.close()  # the manager keeps serving the running containers
    if warm is not None:
        await warm.registry.aclose()
    await snapshotter.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(config.address)


def _resync(snapshotter: OverlaySnapshotter) -> Callable[[], Awaitable[None]]:
    async def resync() -> None:
        mounted = await snapshotter.restore_lazy_layers()
        log.info("FUSE manager back: %d lazy layers mounted again", mounted)
    return resync


def run(config: Config, config_path: str | None = None) -> int:
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    allocator.tune()  # before the worker threads exist
    try:
        asyncio.run(serve(config, config_path))
    except StateDirError as exc:
        log.error("%s", exc)
        return 1
    return 0
