"""Where a lazy pull spends its time in the FUSE manager, from its log lines
(snapshotter/lazy/index_lookup.py, index_ahead.py, remote.py, pull_ahead.py,
manager.py): the image's gzip index lookup, each layer's index fetch and tree build
(and whether it was fetched ahead), each converted layer's TOC index build (at pull or
at mount; its time in the build process and queued for it), and when each layer's
index was built, the layer mounted and its prefetch done (and, opened at pull, when
its prefetch region's raw bytes were requested and had all arrived), on the sample's
clock."""

import re
from datetime import datetime

_LOOKUP = re.compile(r"gzip index lookup took ([0-9.]+)s")
_LAYER = re.compile(r"layer (\S+): gzip index \S+ fetched( ahead)? in ([0-9.]+)s, "
                    r"its tree built in ([0-9.]+)s")
_BUILT = re.compile(r"layer (\S+): TOC verified( at pull)?, index of (\d+) entries built"
                    r"(?: in (process|a forked process))? in ([0-9.]+)s \(([0-9.]+)s building, "
                    r"([0-9.]+)s queued\)")
# where a build ran: a process started for it, a thread, or a fork of the template
_WHERE = {None: "child", "process": "thread", "a forked process": "forked"}
# "2026-12-07 01:07:31,123 INFO name: message" (the services' logging format)
_HOT = re.compile(r"layer (\S+): (\d+) bytes of hot spans fetched ahead in ([0-9.]+)s")
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
_EVENTS = (("index built", re.compile(r"layer (sha256:\w+): TOC verified")),
           ("mounted", re.compile(r"layer (sha256:\w+): served lazily (through gzip index|"
                                  r"from its TOC)")),
           ("hot ahead", re.compile(r"layer (sha256:\w+): \d+ bytes of hot spans fetched ahead")),
           ("region requested", re.compile(r"layer (sha256:\w+): \d+ bytes of its prefetch "
                                           r"region requested ahead")),
           ("region arrived", re.compile(r"layer (sha256:\w+): its prefetch region arrived")),
           ("prefetched", re.compile(r"layer \S+ \((sha256:\w+)\): prefetched \d+ bytes")))


def index_phases(log: str, started_wall: float | None = None) -> dict[str, object]:
    """The figures in `log` (lookup and layers only if a layer was read through an
    index). `started_wall`: the sample's clock start (time.time()), for the timeline."""
    out: dict[str, object] = {}
    lookups = [float(m.group(1)) for m in _LOOKUP.finditer(log)]
    layers = [{"layer": m.group(1)[:19], "ahead": bool(m.group(2)),
               "fetch_s": float(m.group(3)), "build_s": float(m.group(4))}
              for m in _LAYER.finditer(log)]
    hot = [{"layer": m.group(1)[:19], "bytes": int(m.group(2)), "seconds": float(m.group(3))}
           for m in _HOT.finditer(log)]
    builds = [{"layer": m.group(1)[:19], "at_pull": bool(m.group(2)),
               "entries": int(m.group(3)), "where": _WHERE[m.group(4)],
               "total_s": float(m.group(5)), "build_s": float(m.group(6)),
               "queued_s": float(m.group(7))}
              for m in _BUILT.finditer(log)]
    if lookups or layers:
        out.update(lookup_s=lookups, layers=layers, hot_ahead=hot)
    if builds:
        out["toc_builds"] = builds
    if started_wall is not None:
        out["timeline_s"] = timeline(log, started_wall)
    return out


def timeline(log: str, started_wall: float) -> list[tuple[float, str, str]]:
    """(seconds since the clock started, event, layer digest prefix) of each layer's
    index built from its TOC, its mount and its prefetch end, in log order."""
    events = []
    for line in log.splitlines():
        stamp = _STAMP.match(line)
        if stamp is None:
            continue
        for name, pattern in _EVENTS:
            found = pattern.search(line)
            if found:
                at = datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                if at >= started_wall - 1:
                    events.append((round(at - started_wall, 3), name, found.group(1)[:19]))
    return events
