"""Prometheus metrics for the node processes: counters, gauges and histograms with
labels, written in the text exposition format (version 0.0.4).

The node service and the FUSE manager run on every node, and prometheus_client
(with the HTTP, WSGI and e-mail modules it loads) cost them about 4 MB together;
this is the part of it they use. Names and output follow the client library's
conventions: a counter's name gets `_total` if it lacks it (in HELP, TYPE and its
sample); a histogram writes cumulative `_bucket` samples with `le`, `_sum` and
`_count`. Updates are thread-safe (the chunk cache counts from worker threads).
"""

import math
import threading
from collections.abc import Iterable, Iterator, Sequence

CONTENT_TYPE_LATEST = "text/plain; version=0.0.4; charset=utf-8"
DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                   7.5, 10.0)

Sample = tuple[str, dict[str, str], float]


class CollectorRegistry:
    """The metrics one exposition page shows, in the order they were made."""

    def __init__(self) -> None:
        self._metrics: list[_Metric] = []
        self._lock = threading.Lock()

    def register(self, metric: "_Metric") -> None:
        with self._lock:
            if any(m.name == metric.name for m in self._metrics):
                raise ValueError(f"metric {metric.name} is registered already")
            self._metrics.append(metric)

    def metrics(self) -> list["_Metric"]:
        with self._lock:
            return list(self._metrics)

    def get_sample_value(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """The value of one sample (by its full name, e.g. `x_total`), or None."""
        wanted = labels or {}
        for metric in self.metrics():
            for sample_name, sample_labels, value in metric.samples():
                if sample_name == name and sample_labels == wanted:
                    return value
        return None


class _Metric:
    kind = ""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (),
                 registry: CollectorRegistry | None = None):
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], _Metric] = {}
        self._lock = threading.Lock()
        if registry is not None:
            registry.register(self)

    def labels(self, *values: object, **by_name: object) -> "_Metric":
        """The series with these label values (given in order, or by name)."""
        if by_name and not values and set(by_name) == set(self.labelnames):
            values = tuple(by_name[name] for name in self.labelnames)
        elif by_name or len(values) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, "
                             f"got {values or by_name}")
        key = tuple(str(v) for v in values)
        with self._lock:
            child = self._children.get(key)
            if child is None:
                child = self._children[key] = self._new_child()
            return child

    def remove(self, *values: object) -> None:
        """Drop one labelled series (KeyError if it does not exist)."""
        with self._lock:
            del self._children[tuple(str(v) for v in values)]

    def _new_child(self) -> "_Metric":
        return type(self)(self.name, self.documentation)

    def _series(self) -> Iterator[tuple[dict[str, str], "_Metric"]]:
        if not self.labelnames:
            yield {}, self
            return
        with self._lock:
            children = list(self._children.items())
        for key, child in children:
            yield dict(zip(self.labelnames, key, strict=True)), child

    @property
    def family(self) -> str:
        return self.name

    def samples(self) -> Iterator[Sample]:
        for labels, child in self._series():
            yield from child._own_samples(labels)

    def _own_samples(self, labels: dict[str, str]) -> Iterable[Sample]:
        raise NotImplementedError


class _Value(_Metric):
    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (),
                 registry: CollectorRegistry | None = None):
        super().__init__(name, documentation, labelnames, registry)
        self._value = 0.0

    def _add(self, amount: float) -> None:
        with self._lock:
            self._value += amount


class Counter(_Value):
    kind = "counter"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (),
                 registry: CollectorRegistry | None = None):
        super().__init__(name.removesuffix("_total"), documentation, labelnames, registry)

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("counters only go up")
        self._add(amount)

    @property
    def family(self) -> str:
        return f"{self.name}_total"

    def _own_samples(self, labels: dict[str, str]) -> Iterable[Sample]:
        return [(self.family, labels, self._value)]


class Gauge(_Value):
    kind = "gauge"

    def inc(self, amount: float = 1) -> None:
        self._add(amount)

    def dec(self, amount: float = 1) -> None:
        self._add(-amount)

    def set(self, value: float) -> None:
        with self._lock:
            self._value = float(value)

    def _own_samples(self, labels: dict[str, str]) -> Iterable[Sample]:
        return [(self.name, labels, self._value)]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (),
                 registry: CollectorRegistry | None = None,
                 buckets: Sequence[float] = DEFAULT_BUCKETS):
        bounds = sorted(float(b) for b in buckets)
        if not bounds or bounds[-1] != math.inf:
            bounds.append(math.inf)
        self.buckets = tuple(bounds)
        super().__init__(name, documentation, labelnames, registry)
        self._counts = [0] * len(self.buckets)
        self._sum = 0.0

    def _new_child(self) -> "Histogram":
        return Histogram(self.name, self.documentation, buckets=self.buckets)

    def observe(self, value: float) -> None:
        with self._lock:
            self._sum += value
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    self._counts[i] += 1
                    break

    def _own_samples(self, labels: dict[str, str]) -> Iterable[Sample]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        out: list[Sample] = []
        cumulative = 0
        for bound, count in zip(self.buckets, counts, strict=True):
            cumulative += count
            out.append((f"{self.name}_bucket", {**labels, "le": _number(bound)}, cumulative))
        out.append((f"{self.name}_count", labels, cumulative))
        out.append((f"{self.name}_sum", labels, total))
        return out


def generate_latest(registry: CollectorRegistry) -> bytes:
    """The registry's metrics as a Prometheus text exposition page."""
    lines: list[str] = []
    for metric in registry.metrics():
        lines.append(f"# HELP {metric.family} {_escape_help(metric.documentation)}")
        lines.append(f"# TYPE {metric.family} {metric.kind}")
        for name, labels, value in metric.samples():
            lines.append(f"{name}{_labels(labels)} {_number(value)}")
    return ("\n".join(lines) + "\n").encode() if lines else b""


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    pairs = ",".join(f'{key}="{_escape_value(value)}"' for key, value in sorted(labels.items()))
    return "{" + pairs + "}"


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    if value == -math.inf:
        return "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value))
