"""The service's pull socket: `lazypull pull` hands its pull to this process, which
has the registry and containerd clients loaded (and their connections warm), so the
command that each workspace start runs does almost nothing itself.

The pull is the one `lazypull pull` would do (containerd_client.pull), with the
request's containerd socket, namespace, hosts directory and Docker config file. The
socket is the service's own kind: a root-only directory, mode 0600, so whoever may
ask could run the pull themselves. A pull under way when its command goes away runs
to its end (containerd's lease keeps what it made consistent either way).

With a FUSE manager, the pull reads manifests and configs through it
(relayed_registry): the service loads an HTTP client of its own only for a layer
downloaded whole.
"""

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import allocator
from .pull_protocol import (
    EXIT_FAILURE,
    EXIT_USAGE,
    MAX_LINE,
    ProtocolError,
    check_request,
    classify,
    decode,
    encode,
)

if TYPE_CHECKING:
    from oci.registry import RegistryClient

    from .containerd_client import PullResult, Registry
    from .fusemanager.client import FuseManagerClient

log = logging.getLogger(__name__)
RegistryKey = tuple[str | None, bool, str | None]  # hosts dir, plain HTTP, Docker config


class PullHandoff:
    def __init__(self, path: str, manager: "FuseManagerClient | None" = None,
                 on_manifest: Callable[[str, str, str, list[str]], None] | None = None):
        self.path = path
        self.manager = manager  # None: the pull reads the registry itself
        # Told (snapshotter, image name, manifest digest, layer digests) as soon as a
        # pull knows its image's manifest, before the config is read: open_ahead.
        self.on_manifest = on_manifest
        self._server: asyncio.base_events.Server | None = None
        self._loading: asyncio.Task[None] | None = None
        # Kept between pulls: their connections to the registry stay open and warm.
        self._registries: dict[RegistryKey, RegistryClient] = {}

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # left by a killed instance
        self._server = await asyncio.start_unix_server(self._serve, self.path, limit=MAX_LINE)
        os.chmod(self.path, 0o600)
        log.info("taking pulls on %s", self.path)
        # Loaded now, in a thread beside the snapshots the service serves meanwhile,
        # rather than by the first pull: on a node just booted, their files are not in
        # the page cache and reading them took that pull half a second. Not awaited:
        # the service goes on starting (its signal handlers).
        self._loading = asyncio.create_task(asyncio.to_thread(
            _load_pull_modules, self.manager is not None))

    async def stop(self) -> None:
        if self._loading is not None:
            with contextlib.suppress(Exception):  # a pull would report the import's error
                await self._loading
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for registry in self._registries.values():
            await registry.aclose()
        self._registries.clear()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def send(message: dict[str, Any]) -> None:
            with contextlib.suppress(ConnectionError):  # the command went away: pull on
                writer.write(encode(message))
                await writer.drain()

        try:
            try:
                request = check_request(decode(await reader.readline()))
            except (ProtocolError, ValueError) as exc:
                await send({"error": {"code": EXIT_USAGE, "message": f"bad pull request: {exc}"}})
                return
            try:
                result = await self._pull(request, send)
            except Exception as exc:
                known = classify(exc)
                if known is None:
                    log.exception("pull of %s failed", request["reference"])
                code, message = known or (EXIT_FAILURE, f"{type(exc).__name__}: {exc}")
                await send({"error": {"code": code, "message": message}})
                return
            await send({"result": result.to_json()})
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
            # What the pull freed goes back to the system (about 0.6 MB of the heap).
            await asyncio.to_thread(allocator.trim)

    def _registry(self, request: dict[str, Any]) -> "RegistryClient":
        from oci import asyncio_only  # noqa: F401  (before httpx: see there)
        from oci.docker_config import CredentialStore
        from oci.hosts import HostsConfig
        from oci.registry import RegistryClient

        key = (request["hosts_dir"], request["plain_http"], request["docker_config"])
        registry = self._registries.get(key)
        if registry is None:
            registry = RegistryClient(
                hosts=HostsConfig(request["hosts_dir"], plain_http=request["plain_http"]),
                credentials=CredentialStore(request["docker_config"]))
            self._registries[key] = registry
        return registry

    def _registry_of(self, request: dict[str, Any]) -> "Registry":
        if self.manager is None:
            return self._registry(request)
        from .relayed_registry import RelayedRegistry

        settings = {k: request[k] for k in ("hosts_dir", "plain_http", "docker_config")}
        return RelayedRegistry(self.manager, settings, lambda: self._registry(request))

    async def _pull(self, request: dict[str, Any], send: Any) -> "PullResult":
        from .containerd_client import ContainerdClient, Platform, PullProgress, pull

        class Forward(PullProgress):
            def __init__(self) -> None:
                self.sending: list[asyncio.Task[None]] = []

            def manifest_chosen(self, name: str, descriptor: Any, manifest: Any) -> None:
                if on_manifest is not None:
                    on_manifest(request["snapshotter"], name, descriptor.digest,
                                [layer.digest for layer in manifest.layers])

            def resolved(self, plan: Any) -> None:
                self.sending.append(asyncio.ensure_future(send({"resolved": {
                    "name": plan.name, "digest": plan.top.digest,
                    "platform": str(plan.platform), "layers": len(plan.layers)}})))

            def layer_done(self, layer: Any) -> None:
                self.sending.append(asyncio.ensure_future(send({"layer": layer.to_json()})))

        on_manifest = self.on_manifest
        platform = Platform.parse(request["platform"]) if request["platform"] else None
        progress = Forward()
        log.info("pull of %s into %s (namespace %s)", request["reference"],
                 request["address"], request["namespace"])
        async with ContainerdClient(request["address"], request["namespace"]) as containerd:
            await containerd.version()
            result = await pull(containerd, self._registry_of(request), request["reference"],
                                snapshotter=request["snapshotter"], platform=platform,
                                progress=progress)
        await asyncio.gather(*progress.sending)  # events before the result, in order
        return result


def _load_pull_modules(relayed: bool) -> None:
    """`relayed`: the registry is read through the FUSE manager, so no HTTP client."""
    if relayed:
        from . import containerd_client, relayed_registry  # noqa: F401
        return
    from oci import (  # noqa: F401
        asyncio_only,  # first: before httpx, see there
        docker_config,
        hosts,
        registry,
    )

    from . import containerd_client  # noqa: F401
