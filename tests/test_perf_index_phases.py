"""perf/index_phases.py reads the FUSE manager's log lines of a converted layer's
index build, mount and prefetch as the services write them."""

import logging
import math
from collections.abc import AsyncIterator
from datetime import datetime

import pytest

from perf.index_phases import index_phases
from snapshotter.lazy.index_build import BuiltIndex


@pytest.mark.parametrize("where", ["child", "thread", "forked"])
def test_converted_layer_phases_are_read_from_the_log_lines(where: str) -> None:
    built = BuiltIndex(layer=None, entries=6654, build_seconds=0.1304,  # type: ignore[arg-type]
                       queued_seconds=0.012, total_seconds=0.2513,
                       where=where)
    digest = "sha256:" + "ab" * 32
    # The services' logging format, and the messages remote.py, pull_ahead.py,
    # fusemanager/service.py and manager.py log.
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    lines = []
    for seconds, message in ((0.25, f"layer {digest}: TOC verified at pull, {built.describe()}"),
                             (0.5, f"layer {digest}: served lazily from its TOC (opened at pull)"),
                             (1.75, f"layer m1 ({digest}): prefetched 10 bytes")):
        record = logging.LogRecord("x", logging.INFO, "", 0, message, None, None)
        record.created, record.msecs = 1_800_000_000 + seconds, seconds % 1 * 1000
        lines.append(formatter.format(record))
    started = datetime.fromtimestamp(1_800_000_000).timestamp()

    phases = index_phases("\n".join(lines), started)

    assert phases["toc_builds"] == [{"layer": digest[:19], "at_pull": True, "entries": 6654,
                                     "where": where, "total_s": 0.251, "build_s": 0.130,
                                     "queued_s": 0.012}]
    assert phases["timeline_s"] == [(0.25, "index built", digest[:19]),
                                    (0.5, "mounted", digest[:19]),
                                    (1.75, "prefetched", digest[:19])]


def test_the_raw_prefetch_regions_lines_are_read_as_they_are_logged() -> None:
    """RawAhead's own log lines, formatted as the services format them, give the
    timeline's "region requested" and "region arrived" events."""
    import asyncio

    from snapshotter.lazy.raw_ahead import RawAhead

    digest = "sha256:" + "cd" * 32
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("snapshotter.lazy.raw_ahead")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)

    async def stream_range(offset: int, length: int) -> AsyncIterator[bytes]:
        await asyncio.sleep(0.01)
        yield bytes(length)

    async def run() -> None:
        RawAhead(stream_range, [(0, 3 << 20)], digest).start()
        await asyncio.sleep(0.2)

    # Cut to the millisecond, as the log lines' times are: an event logged in the same
    # millisecond reads 0, not -0.001.
    started = math.floor(datetime.now().timestamp() * 1000) / 1000
    try:
        asyncio.run(run())
    finally:
        logger.removeHandler(handler)
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    events = index_phases("\n".join(formatter.format(r) for r in records), started)["timeline_s"]
    assert [(name, layer) for _, name, layer in events] == [
        ("region requested", digest[:19]), ("region arrived", digest[:19])]
    assert 0 <= events[0][0] <= events[1][0] < 5
