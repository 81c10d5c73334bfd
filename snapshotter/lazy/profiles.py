"""Access profiles recorded on the node: which files of an image a container read
first, in that order, and which parts of its large files.

Recording is per image (the reference its layers were pulled with: layers of one
image share it). It is armed when layers of the image are mounted, starts at the
first open or read of a file in any of them (a container starting on a cold
mount) and ends `window_seconds` later, when `max_files` files have been seen, or
when the image's last layer goes. Each file counts once, at its first access; for
files over `large_file_bytes` the byte ranges read are kept too, merged, at most
`max_ranges` of them. Profiles go to DIRECTORY/<name>.json (see `profile_path`) in
the schema the converter reads (docs/access-profile.md): when the window closes,
every `flush_seconds` while it is open, and at shutdown; always by atomic rename.

The filesystem calls an observer on every open and read, so the work per call is
a dict look-up once the image is not being recorded.
"""

import asyncio
import bisect
import contextlib
import hashlib
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from estargz import Node
from estargz.layer import WHITEOUT_PREFIX
from oci.access_profile import AccessProfile, FileAccess, ImageProfile, ProfileError, parse_profile
from oci.reference import Reference, ReferenceError

from .presentation import LANDMARKS

log = logging.getLogger(__name__)

PROFILES_DIR = "profiles"
WINDOW_SECONDS = 60.0
MAX_FILES = 10_000
LARGE_FILE_BYTES = 1 << 20
MAX_RANGES = 64
FLUSH_SECONDS = 10.0

Observer = Callable[[Node, int, int], None]
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def profile_path(directory: str, reference: str) -> str:
    """Where the profile of `reference` (as recorded) is kept: a readable name, and a
    hash of the whole reference so that no two references share a file."""
    readable = _UNSAFE.sub("_", reference).strip("._-")[:96] or "image"
    tag = hashlib.sha256(reference.encode()).hexdigest()[:12]
    return os.path.join(directory, f"{readable}-{tag}.json")


def _hidden(path: str) -> bool:
    """Landmarks and whiteouts are layer bookkeeping, never files a workload reads."""
    return path in LANDMARKS or any(part.startswith(WHITEOUT_PREFIX) for part in path.split("/"))


def add_range(ranges: list[tuple[int, int]], start: int, end: int, limit: int) -> None:
    """Add [start, end) to sorted, disjoint, non-touching `ranges`, merging as needed;
    past `limit` ranges, the two with the smallest gap between them become one."""
    if end <= start:
        return
    i = bisect.bisect_left(ranges, (start,))  # first range starting at or after `start`
    if i > 0 and ranges[i - 1][1] >= start:
        i -= 1
        start = ranges[i][0]
    j = i
    while j < len(ranges) and ranges[j][0] <= end:
        end = max(end, ranges[j][1])
        j += 1
    ranges[i:j] = [(start, end)]
    if len(ranges) > limit:
        k = min(range(len(ranges) - 1), key=lambda n: ranges[n + 1][0] - ranges[n][1])
        ranges[k:k + 2] = [(ranges[k][0], ranges[k + 1][1])]


@dataclass(slots=True)
class _File:
    path: str
    layer: str
    at: float
    ranges: list[tuple[int, int]] | None  # None: a small file, its ranges are not kept


@dataclass(eq=False)
class _Recording:
    reference: str
    manifest_digest: str | None
    started: float | None = None  # clock() at the first access
    started_wall: float = 0.0
    ended: float | None = None
    files: dict[Node, _File | None] = field(default_factory=dict)  # None: seen, not kept
    paths: set[str] = field(default_factory=set)
    order: list[_File] = field(default_factory=list)
    dirty: bool = False
    timer: asyncio.TimerHandle | None = None

    def profile(self, now: float, window: float) -> ImageProfile:
        assert self.started is not None
        end = self.ended if self.ended is not None else now
        recorded_at = datetime.fromtimestamp(self.started_wall, UTC)
        return ImageProfile(
            files=[FileAccess(path=f.path, layer=f.layer if _DIGEST.fullmatch(f.layer) else None,
                              ranges=tuple((s, e - s) for s, e in f.ranges or ()), at=f.at)
                   for f in self.order],
            reference=self.reference,
            manifest_digest=self.manifest_digest,
            recorded_at=recorded_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
            window_seconds=round(max(0.0, min(end - self.started, window)), 3),
        )


class ProfileRecorder:
    """Records access profiles of the images whose lazy layers are mounted."""

    def __init__(self, directory: str, *, window_seconds: float = WINDOW_SECONDS,
                 max_files: int = MAX_FILES, large_file_bytes: int = LARGE_FILE_BYTES,
                 max_ranges: int = MAX_RANGES, flush_seconds: float = FLUSH_SECONDS,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time):
        self.directory = directory
        self.window = window_seconds
        self.max_files = max_files
        self.large_file_bytes = large_file_bytes
        self.max_ranges = max(1, max_ranges)
        self.flush_seconds = flush_seconds
        self._clock = clock
        self._wall_clock = wall_clock
        self._active: dict[str, _Recording] = {}  # reference -> armed or recording
        self._layers: dict[str, str] = {}  # layer name -> reference
        self._finished: list[_Recording] = []  # closed, not written yet
        self._wake = asyncio.Event()
        self._closing = False
        self._flusher: asyncio.Task[None] | None = None
        self._write_lock = asyncio.Lock()

    # -- layers ------------------------------------------------------------

    def attach(self, name: str, reference: str, layer_digest: str,
               manifest_digest: str | None = None, *, fresh: bool = True) -> Observer:
        """Layer `name` of image `reference` is mounted: the observer to hand the
        filesystem. A fresh mount (a pull) arms a new recording for the image unless
        one is under way; a layer served again after a restart arms one only if the
        image has no profile yet."""
        self._layers[name] = reference
        recording = self._active.get(reference)
        if recording is None:
            if fresh or not os.path.exists(profile_path(self.directory, reference)):
                self._active[reference] = _Recording(reference, manifest_digest)
        elif recording.manifest_digest is None:
            recording.manifest_digest = manifest_digest
        return self._observer(reference, layer_digest)

    def detach(self, name: str) -> None:
        """Layer `name` is unmounted; the image's recording ends with its last layer."""
        reference = self._layers.pop(name, None)
        if reference is None or reference in self._layers.values():
            return
        recording = self._active.get(reference)
        if recording is not None:
            if recording.started is None:
                del self._active[reference]  # armed, never used: nothing to keep
            else:
                self._finish(recording, self._clock())

    def _observer(self, reference: str, layer_digest: str) -> Observer:
        active = self._active
        record = self._record

        def observe(node: Node, offset: int, length: int) -> None:
            recording = active.get(reference)
            if recording is not None:
                record(recording, layer_digest, node, offset, length)

        return observe

    # -- recording ---------------------------------------------------------

    def _record(self, recording: _Recording, layer: str, node: Node, offset: int,
                length: int) -> None:
        now = self._clock()
        if recording.started is None:
            recording.started = now
            recording.started_wall = self._wall_clock()
            with contextlib.suppress(RuntimeError):  # no loop: expire() closes windows
                recording.timer = asyncio.get_running_loop().call_later(
                    self.window, self._finish, recording, now + self.window)
        elif now - recording.started >= self.window:
            self._finish(recording, recording.started + self.window)
            return
        entry = recording.files.get(node, False)
        if entry is False:
            if len(recording.order) >= self.max_files:
                self._finish(recording, now)
                return
            path = "/" + node.path
            if path in recording.paths or _hidden(node.path):
                recording.files[node] = None  # another layer's copy came first, or bookkeeping
                return
            entry = _File(path, layer, round(now - recording.started, 3),
                          [] if node.size > self.large_file_bytes else None)
            recording.files[node] = entry
            recording.paths.add(path)
            recording.order.append(entry)
            recording.dirty = True
        if entry is not None and entry.ranges is not None and length > 0:
            add_range(entry.ranges, offset, offset + length, self.max_ranges)
            recording.dirty = True

    def _finish(self, recording: _Recording, end: float) -> None:
        if recording.ended is not None:
            return
        recording.ended = end
        if recording.timer is not None:
            recording.timer.cancel()
            recording.timer = None
        if self._active.get(recording.reference) is recording:
            del self._active[recording.reference]
        self._finished.append(recording)
        self._wake.set()
        log.info("access profile of %s: %d files in %.1fs", recording.reference,
                 len(recording.order), end - (recording.started or end))

    def expire(self) -> None:
        """Close every window that has run its time (the timers do this in a loop)."""
        now = self._clock()
        for recording in list(self._active.values()):
            if recording.started is not None and now - recording.started >= self.window:
                self._finish(recording, recording.started + self.window)

    # -- writing -----------------------------------------------------------

    def _collect(self) -> list[tuple[_Recording, str, ImageProfile]]:
        """What to write now: finished recordings and open ones with new accesses (a
        copy, so the loop may go on recording while a thread writes)."""
        now = self._clock()
        finished, self._finished = self._finished, []
        todo = finished + [r for r in self._active.values()
                           if r.dirty and r.started is not None]
        out = []
        for recording in todo:
            recording.dirty = False
            out.append((recording, profile_path(self.directory, recording.reference),
                        recording.profile(now, self.window)))
        return out

    @staticmethod
    def _write(items: list[tuple[_Recording, str, ImageProfile]]) -> list[_Recording]:
        """Write the profiles (in any thread); returns the recordings that failed."""
        failed = []
        for recording, path, profile in items:
            try:
                write_atomically(path, AccessProfile([profile]).to_json_bytes())
            except OSError as exc:
                log.warning("cannot write the access profile of %s to %s: %s",
                            recording.reference, path, exc)
                failed.append(recording)
        return failed

    def _retry(self, failed: list[_Recording]) -> None:
        """Write these again at the next flush."""
        for recording in failed:
            recording.dirty = True
            if recording.ended is not None:
                self._finished.append(recording)

    def flush_now(self) -> None:
        """Write what is due, in this thread (for tests and callers without a loop)."""
        self._retry(self._write(self._collect()))

    async def flush(self) -> None:
        async with self._write_lock:
            items = self._collect()
            if items:
                self._retry(await asyncio.to_thread(self._write, items))

    async def start(self) -> None:
        self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())

    async def _flush_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.flush_seconds):
                    await self._wake.wait()
            self._wake.clear()
            if self._closing:
                return
            try:
                await self.flush()
            except Exception:
                log.exception("writing access profiles failed")

    async def close(self) -> None:
        """Stop the periodic writes and write everything recorded so far."""
        self._closing = True
        if self._flusher is not None:
            self._wake.set()  # not cancelled: a write under way completes
            await self._flusher
            self._flusher = None
        for recording in self._active.values():
            if recording.timer is not None:
                recording.timer.cancel()
                recording.timer = None
            recording.dirty = recording.started is not None  # its window so far
        await self.flush()


def write_atomically(path: str, data: bytes) -> None:
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o755, exist_ok=True)
    fd, staging = tempfile.mkstemp(prefix=".profile-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(staging, 0o644)
        os.replace(staging, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staging)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# -- reading (for `lazypull profile`) -----------------------------------------


def _names_for(image: str) -> list[str]:
    """The exact string first, then the reference as Reference normalizes it."""
    names = [image]
    with contextlib.suppress(ReferenceError):
        normalized = str(Reference.parse(image))
        if normalized != image:
            names.append(normalized)
    return names


def list_profiles(directory: str) -> list[tuple[str, AccessProfile]]:
    """Every readable profile under `directory`, by file name; unreadable ones are
    logged and left out."""
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        if not name.endswith(".json") or name.startswith("."):
            continue
        path = os.path.join(directory, name)
        try:
            with open(path, "rb") as f:
                out.append((path, parse_profile(f.read())))
        except (OSError, ProfileError) as exc:
            log.warning("skipping %s: %s", path, exc)
    return out


def find_profile(directory: str, image: str) -> tuple[str, AccessProfile] | None:
    """The profile recorded for `image` (as given, or normalized), or None."""
    names = _names_for(image)
    for name in names:
        path = profile_path(directory, name)
        if os.path.exists(path):
            with open(path, "rb") as f:
                return path, parse_profile(f.read())
    for path, profile in list_profiles(directory):
        if any(i.reference in names for i in profile.images):
            return path, profile
    return None
