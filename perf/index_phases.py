"""Where a lazy pull through gzip indexes spends its time, from the FUSE manager's log
lines (snapshotter/lazy/index_lookup.py, index_ahead.py): the image's index lookup,
each layer's index fetch and tree build, and whether it was fetched ahead."""

import re

_LOOKUP = re.compile(r"gzip index lookup took ([0-9.]+)s")
_LAYER = re.compile(r"layer (\S+): gzip index \S+ fetched( ahead)? in ([0-9.]+)s, "
                    r"its tree built in ([0-9.]+)s")


def index_phases(log: str) -> dict[str, object]:
    """The figures in `log` (empty if it has none: no layer was read through an index)."""
    lookups = [float(m.group(1)) for m in _LOOKUP.finditer(log)]
    layers = [{"layer": m.group(1)[:19], "ahead": bool(m.group(2)),
               "fetch_s": float(m.group(3)), "build_s": float(m.group(4))}
              for m in _LAYER.finditer(log)]
    if not lookups and not layers:
        return {}
    return {"lookup_s": lookups, "layers": layers}
