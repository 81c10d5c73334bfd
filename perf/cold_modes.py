"""The cold-start modes and one timed sample of each (perf/cold_start.py has the method).

A sample runs on a fresh node with the page cache dropped; the clock starts when the
pull command starts (or, for modes whose image is already on the node, when `ctr run`
starts) and stops when the workload's READY line arrives. Each sample keeps its phases
in the order they happen, measured from outside the systems wherever possible, so that
lazypull, stargz-snapshotter and a full pull are timed the same way:

- client start: the pull command's start to its own clock's start (what it reports);
- resolve: the pull's own time less its layers' handshakes (manifest, config, content);
- TOC + mounts: the layers' remote-snapshot handshakes: footer and TOC fetched, layer
  mounted (lazypull: its per-layer figures; stargz: its `mount` latency metric);
- fetch + unpack: a full pull's whole pull command;
- container start: `ctr run` starting to containerd's /tasks/start event (snapshot
  prepared and mounted, runc created and started the process), or to READY if that
  came first;
- run to READY: /tasks/start to the READY line.

Prefetch overlaps the phases after the mounts: its bytes and requests up to READY are
kept from each system's own counters.
"""

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from perf import stargz
from perf.cold_setup import (
    INDEX_PREFETCH_REPO_SUFFIX,
    INDEX_REPO_SUFFIX,
    LAZY_PREFETCH_TAG,
    LAZY_TAG,
    PLAIN_TAG,
    STARGZ_NOOPT_TAG,
    STARGZ_OPT_TAG,
    Link,
    Setup,
)
from perf.harness import (
    MB,
    NAMESPACE,
    PULL_TIMEOUT,
    Node,
    TaskEvents,
    drop_caches,
    fetch_metrics,
    fetch_summary,
    lazy_pull,
    run,
    run_to_ready,
    start_node,
    stop_node,
)
from perf.index_phases import index_phases
from perf.node_memory import node_memory
from perf.workspace_images import WorkspaceImage

PHASES = ("client start", "resolve", "TOC + mounts", "fetch + unpack", "container start",
          "run to READY")


@dataclass(frozen=True)
class Mode:
    name: str
    label: str
    system: str  # overlayfs, stargz or lazypull
    tag: str
    repository_suffix: str = ""  # ws/IMAGE<suffix>: the indexed copies of the image

    def ref(self, setup: Setup, image: str) -> str:
        return setup.ref(image + self.repository_suffix, self.tag)


MODES: dict[str, Mode] = {m.name: m for m in (
    Mode("full-overlayfs", "full pull: ctr images pull (overlayfs) + ctr run", "overlayfs",
         PLAIN_TAG),
    Mode("stargz-noopt", "stargz-snapshotter: rpull of ctr-remote optimize --no-optimize "
         "+ ctr run", "stargz", STARGZ_NOOPT_TAG),
    Mode("stargz-opt", "stargz-snapshotter: rpull of ctr-remote optimize (workload run "
         "once) + ctr run", "stargz", STARGZ_OPT_TAG),
    Mode("lazy", "lazypull without a profile: lazypull pull of the eStargz image + ctr run",
         "lazypull", LAZY_TAG),
    Mode("lazy-prefetch", "lazypull with a profile: the workload's files first, prefetched",
         "lazypull", LAZY_PREFETCH_TAG),
    Mode("index-lazy", "lazypull through a gzip index without a profile: lazypull pull of "
         "the unmodified image + ctr run", "lazypull", PLAIN_TAG, INDEX_REPO_SUFFIX),
    Mode("index-lazy-prefetch", "lazypull through a gzip index with the workload's profile "
         "(its hot list prefetched)", "lazypull", PLAIN_TAG, INDEX_PREFETCH_REPO_SUFFIX),
    Mode("index-lazy-prefetch-noahead", "index-lazy-prefetch, service with "
         "gzip_index_ahead = false (each mount fetches its own index)", "lazypull", PLAIN_TAG,
         INDEX_PREFETCH_REPO_SUFFIX),
    Mode("lazy-warm-set", "lazypull, first start on a node whose warm set already holds "
         "the profiled image (policy full: its layers written out as directories; clock "
         "from ctr run)", "lazypull", LAZY_PREFETCH_TAG),
    Mode("lazy-nobg", "lazy, service with background_fetch = false", "lazypull", LAZY_TAG),
    Mode("lazy-prefetch-nobg", "lazy-prefetch, service with background_fetch = false",
         "lazypull", LAZY_PREFETCH_TAG),
    # measured on the node of another mode's sample once its run is over
    Mode("local-cold", "fully local floor: ctr run alone, image unpacked in overlayfs, "
         "page cache dropped", "overlayfs", PLAIN_TAG),
    Mode("local-warm", "ctr run alone, image unpacked in overlayfs, page cache warm",
         "overlayfs", PLAIN_TAG),
    Mode("lazy-prefetch-second", "second start on lazy-prefetch's lazy mounts, page "
         "cache warm", "lazypull", LAZY_PREFETCH_TAG),
)}
TIMED = ("full-overlayfs", "stargz-noopt", "stargz-opt", "lazy", "lazy-prefetch",
         "lazy-warm-set", "lazy-nobg", "lazy-prefetch-nobg", "index-lazy",
         "index-lazy-prefetch", "index-lazy-prefetch-noahead")
INDEX_MODES = ("index-lazy", "index-lazy-prefetch", "index-lazy-prefetch-noahead")
DEFAULT_TIMED = ("full-overlayfs", "stargz-noopt", "stargz-opt", "lazy", "lazy-prefetch",
                 "lazy-warm-set")
STARGZ_MODES = ("stargz-noopt", "stargz-opt")
DERIVED = {"full-overlayfs": ("local-cold", "local-warm"),
           "lazy-prefetch": ("lazy-prefetch-second",)}


@dataclass
class Sample:
    link: str
    image: str
    mode: str
    rep: int
    ready_s: float | None = None
    exit_s: float | None = None
    phases: dict[str, float] = field(default_factory=dict)
    wire_bytes: int | None = None  # the whole sample, to the workload's exit
    wire_bytes_at_ready: int | None = None
    counters_at_ready: dict[str, float] = field(default_factory=dict)  # the system's own
    # lazypull: each layer's mount (from the pull's figures) and the gzip index phases
    # from the FUSE manager's log (perf/index_phases.py)
    mounts: dict[str, object] = field(default_factory=dict)
    # the snapshotter's processes at READY (perf/node_memory.py)
    memory_at_ready: dict[str, object] = field(default_factory=dict)
    error: str | None = None

    def to_json(self) -> dict[str, object]:
        return {"link": self.link, "image": self.image, "mode": self.mode, "rep": self.rep,
                "ready_s": _round(self.ready_s), "exit_s": _round(self.exit_s),
                "phases_s": {k: round(v, 4) for k, v in self.phases.items()},
                "wire_bytes": self.wire_bytes, "wire_bytes_at_ready": self.wire_bytes_at_ready,
                "counters_at_ready": self.counters_at_ready, "mounts": self.mounts,
                "memory_at_ready": self.memory_at_ready, "error": self.error}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


@dataclass
class Clock:
    """One sample's clock: perf_counter for spans, the wall clock to place containerd's
    event timestamps on it."""
    started: float = field(default_factory=time.perf_counter)
    wall: float = field(default_factory=time.time)

    def now(self) -> float:
        return time.perf_counter() - self.started

    def at_wall(self, wall: float) -> float:
        return wall - self.wall


def timed_run(setup: Setup, node: Node, image: WorkspaceImage, ref: str, snapshotter: str | None,
              clock: Clock, sample: Sample, wire0: int,
              read_counters: Callable[[], dict[str, float]]) -> None:
    """`ctr run` to READY on `clock`; fills the container-start and run phases, READY,
    exit, wire bytes (to READY and to exit) and the system's counters at READY."""
    run_started = clock.now()
    at_ready: dict[str, float] = {}
    wire_at_ready: list[int] = []

    def on_ready() -> None:
        wire_at_ready.append(setup.path.bytes_to_host() - wire0)
        at_ready.update(read_counters())
        if node.service is not None or node.stargz is not None:
            sample.memory_at_ready = node_memory(node)

    assert node.events is not None
    node.events.first.pop("/tasks/start", None)
    ready, ended, _ = run_to_ready(node, ref, f"cs{setup.seq}-{sample.mode}", image.command,
                                   snapshotter, clock.started, on_ready)
    task_start = node.events.wait_for("/tasks/start")
    # containerd publishes /tasks/start once `runc start` returned: a workload quicker
    # than that has printed READY before it, and its run counts as container start
    container_start = (min(clock.at_wall(task_start) - run_started, ready - run_started)
                       if task_start is not None else math.nan)
    sample.phases["container start"] = container_start
    sample.phases["run to READY"] = ready - run_started - container_start
    sample.ready_s, sample.exit_s = ready, ended
    sample.wire_bytes_at_ready = wire_at_ready[0] if wire_at_ready else None
    sample.wire_bytes = setup.path.bytes_to_host() - wire0
    sample.counters_at_ready = at_ready


def pull_phases(sample: Sample, pulled: float, reported: float, mounts: float) -> None:
    sample.phases["client start"] = max(0.0, pulled - reported)
    sample.phases["resolve"] = max(0.0, reported - mounts)
    sample.phases["TOC + mounts"] = mounts


def describe(sample: Sample) -> str:
    if sample.error:
        return f"FAILED: {sample.error.splitlines()[0][:200]}"
    wire = sample.wire_bytes_at_ready or 0
    phases = ", ".join(f"{k} {v:.2f}" for k, v in sample.phases.items() if v)
    line = f"READY {sample.ready_s:6.2f} s ({wire / MB:6.1f} MB to READY; {phases})"
    summary = fetch_summary(sample.counters_at_ready)
    return line + (f" at READY: {summary}" if summary else "")


# -- one sample of each mode --------------------------------------------------------------


def cold_sample(setup: Setup, link: Link, image: WorkspaceImage, mode_name: str,
                rep: int) -> list[Sample]:
    """One sample of `mode_name` on a fresh node, and of the modes derived from it on
    that node afterwards."""
    mode = MODES[mode_name]
    sample = Sample(link.name, image.name, mode_name, rep)
    if mode_name == "lazy-warm-set":
        return [warm_set_sample(setup, image, sample)]
    lazy = mode.system == "lazypull"
    config = setup.nobg_config() if mode_name.endswith("-nobg") else \
        setup.noahead_config() if mode_name.endswith("-noahead") else setup.service_config
    node = start_node(setup.next_base("s"), lazy, config,
                      setup.stargz if mode.system == "stargz" else None)
    samples = [sample]
    try:
        ref = mode.ref(setup, image.name)
        drop_caches()
        wire0 = setup.path.bytes_to_host()
        clock = Clock()
        if lazy:
            result = lazy_pull(setup, node, ref)
            pull_phases(sample, clock.now(), result["seconds"],
                        sum(layer["seconds"] for layer in result["layers"]))
            timed_run(setup, node, image, ref, "lazypull", clock, sample, wire0,
                      lambda: fetch_metrics(node))
            sample.mounts = {"layer_s": [layer["seconds"] for layer in result["layers"]],
                             **index_phases(node.service.log if node.service else "",
                                            clock.wall)}
        elif mode.system == "stargz":
            assert setup.stargz is not None and node.stargz is not None
            reported = stargz.rpull(setup.stargz, node.daemon.address, NAMESPACE, ref,
                                    PULL_TIMEOUT)
            mounts = node.stargz.metrics().get("mount_ms", 0.0) / 1000
            pull_phases(sample, clock.now(), reported, mounts)
            daemon = node.stargz
            timed_run(setup, node, image, ref, stargz.PROXY_NAME, clock, sample, wire0,
                      daemon.metrics)
        else:
            run(node.ctr("images", "pull", "--plain-http", ref), what=f"ctr images pull {ref}")
            sample.phases["fetch + unpack"] = clock.now()
            timed_run(setup, node, image, ref, None, clock, sample, wire0, dict)
        for derived in DERIVED.get(mode_name, ()):
            samples.append(rerun_sample(setup, node, image, link, derived, rep))
    except Exception as exc:
        sample.error = failure(exc, node)
    finally:
        stop_node(node)
    return samples


def rerun_sample(setup: Setup, node: Node, image: WorkspaceImage, link: Link, mode_name: str,
                 rep: int) -> Sample:
    """Another start of the image already on `node`: page cache dropped first for
    local-cold, kept for local-warm and the second lazy start."""
    mode = MODES[mode_name]
    sample = Sample(link.name, image.name, mode_name, rep)
    try:
        if mode_name == "local-cold":
            drop_caches()
        snapshotter = "lazypull" if mode.system == "lazypull" else None
        counters = (lambda: fetch_metrics(node)) if snapshotter else dict
        before = counters()
        wire0 = setup.path.bytes_to_host()  # before the clock: reading it takes a while
        timed_run(setup, node, image, setup.ref(image.name, mode.tag), snapshotter, Clock(),
                  sample, wire0, counters)
        sample.counters_at_ready = {k: v - before.get(k, 0.0)
                                    for k, v in sample.counters_at_ready.items()
                                    if v - before.get(k, 0.0)}
    except Exception as exc:
        sample.error = failure(exc, node)
    return sample


def warm_set_sample(setup: Setup, image: WorkspaceImage, sample: Sample) -> Sample:
    """A node whose service's warm set holds the profiled image: boot it and wait for
    /readyz (untimed: the node was warmed before the workspace was asked for), drop the
    page cache, then time `ctr run` to READY."""
    from perf.warm_boot import start_warm_node, wait_ready
    ref = setup.ref(image.name, LAZY_PREFETCH_TAG)
    node = start_warm_node(setup, ref, policy="full")
    node.events = TaskEvents.watch(node)
    try:
        assert node.service is not None
        node.service.start()
        wait_ready(node.service, time.perf_counter())
        drop_caches()
        wire0 = setup.path.bytes_to_host()
        before = fetch_metrics(node)
        timed_run(setup, node, image, ref, "lazypull", Clock(), sample, wire0,
                  lambda: fetch_metrics(node))
        sample.counters_at_ready = {k: v - before.get(k, 0.0)
                                    for k, v in sample.counters_at_ready.items()
                                    if v - before.get(k, 0.0)}
    except Exception as exc:
        sample.error = failure(exc, node)
    finally:
        if node.service is not None and node.service.process is None:
            node.service = None  # never spawned: nothing of it to stop
        stop_node(node)
    return sample


def failure(exc: Exception, node: Node) -> str:
    message = f"{exc}\n-- containerd log tail --\n{node.daemon.log[-2000:]}"
    if node.service is not None:
        message += f"\n-- service log tail --\n{node.service.log[-3000:]}"
    if node.stargz is not None:
        message += f"\n-- stargz log tail --\n{node.stargz.log[-3000:]}"
    return message
