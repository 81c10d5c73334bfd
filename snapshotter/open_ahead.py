"""The service's side of opening layers ahead: a pull handed over on pull.sock tells
the FUSE manager about its image as soon as it has the manifest (before it reads the
image's config), so the manager fetches the layers' TOCs, builds their indexes and
starts their prefetch while containerd is still on its way to the first Prepare
(lazy.pull_ahead).

Fire and forget: the pull never waits for it, and a failure is only logged (the
mounts open their layers themselves as before).
"""

import asyncio
import logging

from .fusemanager.client import FuseManagerClient

log = logging.getLogger(__name__)


class OpenAhead:
    def __init__(self, lazy: FuseManagerClient, snapshotter: str):
        self.lazy = lazy
        self.snapshotter = snapshotter  # containerd's name for this service
        self._asking: set[asyncio.Task[None]] = set()

    def manifest_chosen(self, snapshotter: str, name: str, manifest_digest: str,
                        layers: list[str]) -> None:
        """A handed-over pull for `snapshotter` of image `name` has its manifest."""
        if snapshotter != self.snapshotter or not layers:
            return
        task = asyncio.create_task(self._ask(name, manifest_digest, layers))
        self._asking.add(task)
        task.add_done_callback(self._asking.discard)

    async def _ask(self, reference: str, manifest_digest: str, layers: list[str]) -> None:
        try:
            started = await self.lazy.pull_ahead(reference, manifest_digest, layers)
        except Exception as exc:
            log.info("pull of %s: layers not opened ahead: %s", reference, exc)
            return
        log.debug("pull of %s: %d lazy layers opened ahead", reference, started)

    async def close(self) -> None:
        for task in list(self._asking):
            task.cancel()
        await asyncio.gather(*self._asking, return_exceptions=True)
