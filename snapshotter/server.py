"""Run the snapshotter service until SIGTERM or SIGINT."""

import asyncio
import contextlib
import logging
import os
import signal

import grpc

from .api.containerd.services.snapshots.v1 import snapshots_pb2_grpc as pb_grpc
from .config import Config, metrics_host_port
from .http_endpoint import HttpEndpoint
from .overlay import OverlaySnapshotter
from .service import SnapshotsService

log = logging.getLogger("lazypull.snapshotter")
# containerd's own limit for gRPC messages, so large label maps fail the same way.
MAX_MESSAGE_SIZE = 16 << 20
SHUTDOWN_GRACE_SECONDS = 5


def _prepare_socket(path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", mode=0o711, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # a socket left by a killed instance


async def serve(config: Config) -> None:
    snapshotter = OverlaySnapshotter(config.root)
    removed = snapshotter.recover()
    if removed:
        log.info("recovered: removed %d leftover directories", len(removed))
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE_SIZE),
        ("grpc.max_send_message_length", MAX_MESSAGE_SIZE),
    ])
    pb_grpc.add_SnapshotsServicer_to_server(SnapshotsService(snapshotter), server)
    _prepare_socket(config.address)
    server.add_insecure_port(f"unix:{config.address}")
    endpoint = None
    if config.metrics_address:
        host, port = metrics_host_port(config.metrics_address)
        endpoint = HttpEndpoint(host, port, ready=lambda: (True, "ready"))
        await endpoint.start()
    await server.start()
    os.chmod(config.address, 0o660)
    os.chown(config.address, 0, 0)
    log.info("serving containerd snapshots on %s (root %s)", config.address, config.root)

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    log.info("shutting down")
    await server.stop(SHUTDOWN_GRACE_SECONDS)
    if endpoint:
        await endpoint.stop()
    await snapshotter.close()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(config.address)


def run(config: Config) -> int:
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(config))
    return 0
