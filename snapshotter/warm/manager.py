"""The warm set: chosen images pulled into containerd at start and kept fresh.

Each entry is pulled through the same path as `lazypull pull` (containerd, the
remote-snapshot handshake with this service), then its lazy layers are fetched as its
policy says: `prefetch` (the prioritized region of each layer) or `full` (every
chunk; for layers that are not lazy, the pull itself fetched everything). The chunks
are protected in the cache under an owner per entry and digest.

Each entry has a task: warm, then sleep until its (jittered) refresh interval or a
forced refresh, then resolve the reference again. A new digest is warmed and the old
digest's protection released once the new one is warm; an unchanged digest whose
image, snapshot or cached chunks went missing is warmed again. Failures retry with
exponential backoff. An entry that was warm stays warm (with the error as its reason)
while a refresh fails but its image is still complete locally.
"""

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from oci.reference import Reference

from ..containerd_client import (
    ContainerdClient,
    LayerResult,
    Platform,
    Puller,
    PullPlan,
    PullProgress,
    Unavailable,
)
from ..fusemanager.client import FuseManagerClient
from . import metrics as m
from .spec import WarmSpec, merge, read_dir

if TYPE_CHECKING:  # made by the service only when a warm set is configured
    from oci.registry import RegistryClient

log = logging.getLogger(__name__)

PENDING, WARMING, WARM, FAILED = "pending", "warming", "warm", "failed"
BACKOFF_MIN_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 300.0
JITTER = 0.1  # refresh intervals are spread by +-10%
PREFETCH_SETTLE_ROUNDS = 20  # chunks another request is fetching: wait this many times
# For this long after start, a pull that containerd could not pass on to this service
# (its reconnect backoff) is tried again every REACH_POLL_SECONDS.
REACH_TIMEOUT_SECONDS = 30.0
REACH_POLL_SECONDS = 0.1


def _iso(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


@dataclass
class WarmImage:
    spec: WarmSpec
    state: str = PENDING
    reason: str = ""
    progress: str = ""
    name: str = ""
    digest: str = ""  # what the reference resolved to last
    warm_digest: str = ""  # the digest that is (or was last) warm
    layers: list[tuple[str, int]] = field(default_factory=list)  # (digest, size)
    warm_layers: list[tuple[str, int]] = field(default_factory=list)  # of warm_digest
    bytes_cached: int = 0
    bytes_total: int = 0
    last_refresh: float | None = None
    last_success: float | None = None
    next_refresh: float | None = None
    failures: int = 0  # consecutive
    boot_seconds: float | None = None  # from service start to first warm
    task: asyncio.Task[None] | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    waiters: list[asyncio.Future[None]] = field(default_factory=list)

    @property
    def owner(self) -> str:
        return f"warm:{self.spec.key}@{self.warm_digest}"

    def satisfies_readiness(self) -> bool:
        if self.state == WARM:
            return True
        if self.state == WARMING and self.warm_digest:  # a refresh, the old one still warm
            return True
        return self.state == FAILED and not self.spec.block_readiness

    def to_json(self) -> dict[str, Any]:
        spec = self.spec
        return {"ref": spec.ref, "namespace": spec.namespace, "policy": spec.policy,
                "block_readiness": spec.block_readiness, "name": self.name,
                "digest": self.digest, "warm_digest": self.warm_digest, "state": self.state,
                "reason": self.reason, "progress": self.progress,
                "bytes_cached": self.bytes_cached, "bytes_total": self.bytes_total,
                "layers": len(self.layers), "last_refresh": _iso(self.last_refresh),
                "last_success": _iso(self.last_success),
                "next_refresh": _iso(self.next_refresh), "failures": self.failures,
                "boot_seconds": None if self.boot_seconds is None
                else round(self.boot_seconds, 3)}


class _Progress(PullProgress):
    def __init__(self, entry: WarmImage):
        self.entry = entry
        self.total = 0
        self.done = 0

    def resolved(self, plan: PullPlan) -> None:
        self.total = len(plan.layers)
        self.entry.progress = f"pulling: 0/{self.total} layers"

    def layer_done(self, layer: LayerResult) -> None:
        self.done += 1
        self.entry.progress = f"pulling: {self.done}/{self.total} layers"


class _PlannedPuller(Puller):
    """A Puller that pulls exactly what it resolved first (no second resolve)."""

    plan: PullPlan | None = None

    async def resolve(self, reference: Reference) -> PullPlan:
        if self.plan is None:
            self.plan = await super().resolve(reference)
        return self.plan


class WarmSet:
    def __init__(self, specs: Iterable[WarmSpec], *, registry: "RegistryClient",
                 containerd_address: str, lazy: FuseManagerClient | None = None,
                 directory: str = "",
                 snapshotter: str = "lazypull", concurrency: int = 2,
                 platform: Platform | None = None, dir_poll_seconds: float = 30.0,
                 started: float | None = None,
                 containerd_factory: Callable[[str, str], ContainerdClient] | None = None,
                 materialize: Callable[[list[str]], Awaitable[int]] | None = None):
        self.config_specs = list(specs)
        self.directory = directory
        self.registry = registry
        self.containerd_address = containerd_address
        self.lazy = lazy
        self.snapshotter = snapshotter
        self.platform = platform or Platform.host()
        self.dir_poll_seconds = dir_poll_seconds
        self.started = started if started is not None else time.monotonic()
        self.entries: dict[str, WarmImage] = {}
        self.errors: list[str] = []  # from warm_set_dir
        self.boot_seconds: float | None = None
        self._concurrency = concurrency
        self._slots: asyncio.Semaphore | None = None
        self._clients: dict[str, ContainerdClient] = {}
        self._factory = containerd_factory or ContainerdClient
        self._watcher: asyncio.Task[None] | None = None
        # Writes lazy layers out as plain directories (OverlaySnapshotter.materialize),
        # for entries with policy `full`; None: they stay served through FUSE.
        self._materialize = materialize

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        self._slots = asyncio.Semaphore(self._concurrency)
        await self._reconcile()
        if self.lazy is not None:  # what a previous instance protected for images gone
            keep = [f"warm:{key}@" for key in self.entries]
            with contextlib.suppress(Exception):
                await self.lazy.release_others("warm:", keep)
        if self.directory:
            self._watcher = asyncio.create_task(self._watch_dir())
        log.info("warm set: %d image(s)", len(self.entries))
        self._note_boot()

    async def close(self) -> None:
        tasks = [e.task for e in self.entries.values() if e.task is not None]
        if self._watcher is not None:
            tasks.append(self._watcher)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for client in self._clients.values():
            with contextlib.suppress(Exception):
                await client.aclose()
        self._clients.clear()

    def _specs(self) -> list[WarmSpec]:
        from_dir: list[WarmSpec] = []
        if self.directory:
            from_dir, errors = read_dir(self.directory)
            for error in errors:
                if error not in self.errors:  # each once, not at every re-read
                    log.warning("warm set: %s", error)
            self.errors = errors
        return merge(self.config_specs, from_dir)

    async def _reconcile(self) -> None:
        """Start entries that appeared, stop the ones that went, take changed settings."""
        wanted = {spec.key: spec for spec in self._specs()}
        for key in list(self.entries):
            if key not in wanted:
                entry = self.entries.pop(key)
                if entry.task is not None:
                    entry.task.cancel()
                if entry.warm_digest:
                    await self._release(entry.owner)
                m.forget(entry.spec.namespace, entry.spec.ref)
                log.info("warm set: %s left the warm set", key)
        for key, spec in wanted.items():
            entry = self.entries.get(key)
            if entry is None:
                entry = self.entries[key] = WarmImage(spec)
                m.set_state(spec.namespace, spec.ref, PENDING)
                entry.task = asyncio.create_task(self._run(entry))
            elif entry.spec != spec:
                policy_changed = entry.spec.policy != spec.policy
                entry.spec = spec
                if policy_changed:
                    entry.wake.set()

    async def _watch_dir(self) -> None:
        while True:
            await asyncio.sleep(self.dir_poll_seconds)
            try:
                await self._reconcile()
            except Exception:  # never let the watcher die
                log.exception("warm set: reading %s failed", self.directory)

    # -- readiness, status, refresh -----------------------------------------------------

    def ready(self) -> tuple[bool, str]:
        if self._slots is None:
            return False, "warm set not started yet"
        waiting = [e for e in self.entries.values() if not e.satisfies_readiness()]
        if not waiting:
            return True, f"ready ({len(self.entries)} warm-set image(s))"
        parts = []
        for e in waiting[:5]:
            detail = e.reason if e.state == FAILED else (e.progress or e.state)
            parts.append(f"{e.spec.ref}: {e.state}" + (f" ({detail})" if detail else ""))
        more = f"; and {len(waiting) - 5} more" if len(waiting) > 5 else ""
        return False, "warm set not warm: " + "; ".join(parts) + more

    async def status(self) -> dict[str, Any]:
        for entry in list(self.entries.values()):
            await self._count_bytes(entry)
        ok, why = self.ready()
        return {"ready": ok, "reason": why, "errors": list(self.errors),
                "boot_seconds": self.boot_seconds,
                "images": [e.to_json() for e in self.entries.values()]}

    def find(self, ref: str) -> list[WarmImage]:
        return [e for e in self.entries.values() if ref in (e.spec.ref, e.spec.key, e.name)]

    async def refresh(self, ref: str | None = None, timeout: float | None = None
                      ) -> list[WarmImage]:
        """Refresh `ref` (every entry if None) now and wait for that attempt to end
        (at most `timeout` seconds). KeyError if no entry has that reference."""
        if ref is None:
            await self._reconcile()
            entries = list(self.entries.values())
        else:
            entries = self.find(ref)
            if not entries:
                raise KeyError(ref)
        loop = asyncio.get_running_loop()
        futures = []
        for entry in entries:
            future = loop.create_future()
            entry.waiters.append(future)
            futures.append(future)
            entry.wake.set()
        if futures:
            await asyncio.wait(futures, timeout=timeout)
        return entries

    # -- one entry --------------------------------------------------------------------

    async def _run(self, entry: WarmImage) -> None:
        while True:
            entry.wake.clear()
            waiters, entry.waiters = entry.waiters, []
            try:
                ok = await self._attempt(entry)
            except asyncio.CancelledError:
                for future in waiters:
                    future.cancel()
                raise
            except Exception as exc:  # a bug must not end the entry's loop
                log.exception("warm set: %s: unexpected failure", entry.spec.ref)
                ok = self._failed(entry, f"internal error: {exc}")
            self._note_boot()
            for future in waiters:
                if not future.done():
                    future.set_result(None)
            if ok:
                entry.failures = 0
                delay = entry.spec.refresh_seconds * random.uniform(1 - JITTER, 1 + JITTER)
            else:
                backoff = BACKOFF_MIN_SECONDS * 2 ** min(entry.failures - 1, 16)
                delay = min(backoff, BACKOFF_MAX_SECONDS, entry.spec.refresh_seconds)
                delay *= random.uniform(1, 1 + JITTER)
            entry.next_refresh = time.time() + delay
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(entry.wake.wait(), delay)

    def _note_boot(self) -> None:
        if self.boot_seconds is None and self.ready()[0]:
            self.boot_seconds = time.monotonic() - self.started
            m.WARM_BOOT_SECONDS.set(self.boot_seconds)
            log.info("warm set: ready %.1fs after start", self.boot_seconds)

    def _set_state(self, entry: WarmImage, state: str) -> None:
        entry.state = state
        m.set_state(entry.spec.namespace, entry.spec.ref, state)

    def _failed(self, entry: WarmImage, reason: str) -> bool:
        entry.failures += 1
        entry.reason = reason
        entry.progress = ""
        m.WARM_FAILURES.labels(entry.spec.namespace, entry.spec.ref).inc()
        log.warning("warm set: %s: %s", entry.spec.ref, reason)
        self._set_state(entry, FAILED)
        return False

    def _containerd(self, namespace: str) -> ContainerdClient:
        client = self._clients.get(namespace)
        if client is None:
            client = self._clients[namespace] = self._factory(self.containerd_address,
                                                              namespace)
        return client

    async def _attempt(self, entry: WarmImage) -> bool:
        assert self._slots is not None
        async with self._slots:
            entry.last_refresh = time.time()
            spec = entry.spec
            containerd = self._containerd(spec.namespace)
            puller = _PlannedPuller(containerd, self.registry, snapshotter=self.snapshotter,
                                    platform=self.platform, progress=_Progress(entry))
            entry.progress = "resolving"
            try:
                plan = await puller.resolve(Reference.parse(spec.ref))
            except Exception as exc:
                return await self._refresh_failed(entry, containerd, f"resolve: {_why(exc)}")
            entry.name, entry.digest = plan.name, plan.top.digest
            entry.layers = [(d.digest, d.size) for d in plan.layers]
            if plan.top.digest == entry.warm_digest:
                try:
                    missing = await self._missing(entry, plan, containerd)
                except Exception as exc:
                    return self._failed(entry, f"containerd: {_why(exc)}")
                if not missing:
                    entry.warm_layers = list(entry.layers)
                    await self._write_out(entry)
                    return await self._warm(entry)
                log.info("warm set: %s: %s; warming again", spec.ref, missing)
            elif entry.warm_digest:
                log.info("warm set: %s moved from %s to %s", spec.ref, entry.warm_digest,
                         plan.top.digest)
            self._set_state(entry, WARMING)
            new_owner = f"warm:{spec.key}@{plan.top.digest}"
            try:
                await containerd.version()  # says clearly when containerd is not there
                await self._pull(puller, spec.ref)
                # Protected before they are fetched: a full cache would otherwise
                # evict them again before the check below sees them.
                await self._protect(entry, plan, new_owner)
                await self._fetch(entry, plan)
                missing = await self._missing(entry, plan, containerd)
            except Exception as exc:
                await self._release_unless_current(entry, new_owner)
                return await self._refresh_failed(entry, containerd, _why(exc))
            if missing:
                await self._release_unless_current(entry, new_owner)
                return await self._refresh_failed(entry, containerd,
                                                  f"not warm after warming: {missing}")
            # Before the new digest counts as warm: readiness waits for it.
            await self._write_out(entry)
            entry.warm_digest, entry.warm_layers = plan.top.digest, list(entry.layers)
            if self.lazy is not None:
                # The old digest's protection goes (other owners keep shared chunks),
                # and so does any a previous instance of the service left for this entry.
                with contextlib.suppress(Exception):
                    await self.lazy.release_others(f"warm:{spec.key}@", [entry.owner])
            return await self._warm(entry)

    async def _pull(self, puller: Puller, ref: str) -> None:
        """Pull; while the service is young, retry at once when containerd cannot reach
        it yet. A containerd that started first dialled a socket that did not exist and
        redials only after its backoff: such a failure says nothing lasting."""
        while True:
            try:
                await puller.pull(ref)
                return
            except Unavailable:
                if time.monotonic() - self.started > REACH_TIMEOUT_SECONDS:
                    raise
                await asyncio.sleep(REACH_POLL_SECONDS)

    async def _protect(self, entry: WarmImage, plan: PullPlan, owner: str) -> None:
        if self.lazy is None:
            return
        lazy = self._lazy_layers(d.digest for d in plan.layers)
        await self.lazy.protect(owner, lazy, entry.spec.policy == "full")

    async def _release(self, owner: str) -> None:
        if self.lazy is not None:
            try:
                await self.lazy.release(owner)
            except Exception as exc:  # a later start releases what a failure left
                log.warning("warm set: releasing %s: %s", owner, exc)

    async def _release_unless_current(self, entry: WarmImage, owner: str) -> None:
        if owner != entry.owner:
            await self._release(owner)

    async def _refresh_failed(self, entry: WarmImage, containerd: ContainerdClient,
                              reason: str) -> bool:
        """A refresh failed: still warm (with the reason) if the digest that was warm is
        still complete locally, else failed."""
        if entry.warm_digest:
            try:
                image = await containerd.get_image(entry.name)
                intact = image is not None and image.target.digest == entry.warm_digest \
                    and not await self._missing_chunks(entry, entry.warm_layers)
            except Exception:
                intact = False
            if intact:
                entry.failures += 1
                m.WARM_FAILURES.labels(entry.spec.namespace, entry.spec.ref).inc()
                log.warning("warm set: %s: refresh failed (still warm): %s", entry.spec.ref,
                            reason)
                await self._warm(entry, success=False)
                entry.reason = f"refresh failed: {reason}"
                return False
        return self._failed(entry, reason)

    async def _warm(self, entry: WarmImage, success: bool = True) -> bool:
        entry.reason = entry.progress = ""
        if success:
            if entry.boot_seconds is None:
                entry.boot_seconds = time.monotonic() - self.started
                m.WARM_IMAGE_BOOT_SECONDS.labels(entry.spec.namespace, entry.spec.ref).set(
                    entry.boot_seconds)
            entry.last_success = time.time()
            m.WARM_LAST_SUCCESS.labels(entry.spec.namespace, entry.spec.ref).set(
                entry.last_success)
        self._set_state(entry, WARM)
        await self._count_bytes(entry)
        return True

    async def _write_out(self, entry: WarmImage) -> None:
        """Policy `full`: every byte is kept, so the lazy layers are written out as plain
        directories and starts read local files (lazy.materialize). A failure leaves
        them served through FUSE, as warm as before: it is logged, not fatal."""
        if entry.spec.policy != "full" or self._materialize is None:
            return
        layers = self._lazy_layers(d for d, _ in entry.layers)
        if not layers:
            return
        entry.progress = "writing out"
        try:
            written = await self._materialize(layers)
        except Exception as exc:
            log.warning("warm set: %s: writing its layers out: %s; they stay served "
                        "through FUSE", entry.spec.ref, _why(exc))
            return
        if written:
            log.info("warm set: %s: %d layer(s) written out as directories", entry.spec.ref,
                     written)

    # -- layers and chunks ------------------------------------------------------------

    def _lazy_layers(self, digests: Iterable[str]) -> list[str]:
        """The layer digests among these that are served lazily."""
        lazy = self.lazy
        return [d for d in digests if lazy is not None and lazy.serves(d)]

    async def _missing_chunks(self, entry: WarmImage, layers: list[tuple[str, int]]) -> str:
        if self.lazy is None:
            return ""
        full = entry.spec.policy == "full"
        incomplete = ""
        for digest in self._lazy_layers(d for d, _ in layers):
            # Every layer is asked (no early return): asking also drops the cache's
            # index entries whose files are gone, so the fetch that follows gets them.
            if await self.lazy.chunks_missing(digest, full) and not incomplete:
                incomplete = f"chunks of layer {digest} are not cached"
        return incomplete

    async def _missing(self, entry: WarmImage, plan: PullPlan,
                       containerd: ContainerdClient) -> str:
        """Why the resolved image is not warm locally ("" if it is)."""
        image = await containerd.get_image(plan.name)
        if image is None:
            return f"image {plan.name} is not in containerd"
        if image.target.digest != plan.top.digest:
            return f"image {plan.name} points at {image.target.digest}"
        if plan.top_chain_id and await containerd.stat_snapshot(
                self.snapshotter, plan.top_chain_id) is None:
            return f"snapshot {plan.top_chain_id} is missing"
        return await self._missing_chunks(entry, [(d.digest, d.size) for d in plan.layers])

    async def _fetch(self, entry: WarmImage, plan: PullPlan) -> None:
        """Fetch the lazy layers' chunks the policy wants into the cache."""
        lazy = self._lazy_layers(d.digest for d in plan.layers)
        if not lazy or self.lazy is None:
            return
        full = entry.spec.policy == "full"
        done = 0
        entry.progress = f"{'fetching' if full else 'prefetching'}: 0/{len(lazy)} layers"

        async def one(digest: str) -> None:
            nonlocal done
            await self.lazy.fetch(digest, full)  # type: ignore[union-attr]
            done += 1
            entry.progress = (f"{'fetching' if full else 'prefetching'}: "
                              f"{done}/{len(lazy)} layers")

        await asyncio.gather(*(one(digest) for digest in lazy))
        # Chunks that other requests (readers, background fetch) had in flight land soon.
        for _ in range(PREFETCH_SETTLE_ROUNDS):
            if not await self._missing_chunks(entry, entry.layers):
                return
            await asyncio.sleep(0.1)

    async def _count_bytes(self, entry: WarmImage) -> None:
        cached = total = 0
        local = entry.state == WARM or bool(entry.warm_digest)
        try:
            for digest, size in entry.layers:
                if self.lazy is None or not self.lazy.serves(digest):
                    total += size  # unpacked by containerd: all local once pulled
                    cached += size if local else 0
                    continue
                layer_cached, layer_total = await self.lazy.layer_bytes(digest)
                cached += layer_cached
                total += layer_total
        except Exception as exc:  # the counts stay as they were
            log.debug("warm set: counting bytes of %s: %s", entry.spec.ref, exc)
            return
        entry.bytes_cached, entry.bytes_total = cached, total
        m.WARM_BYTES.labels(entry.spec.namespace, entry.spec.ref, "cached").set(cached)
        m.WARM_BYTES.labels(entry.spec.namespace, entry.spec.ref, "total").set(total)


def _why(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 500 else text[:497] + "..."
