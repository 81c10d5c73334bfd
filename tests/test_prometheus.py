"""The node processes' own Prometheus metrics, read back by the reference parser."""

import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from snapshotter.prometheus import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


def parsed(registry: CollectorRegistry) -> dict[str, tuple[str, dict[tuple, float]]]:
    """family -> (type, {(sample name, sorted labels): value}) as Prometheus reads it."""
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        out[family.name] = (family.type, {(s.name, tuple(sorted(s.labels.items()))): s.value
                                          for s in family.samples})
    return out


def test_counters_gauges_and_histograms_read_back_as_written() -> None:
    registry = CollectorRegistry()
    requests = Counter("demo_requests_total", "Requests, by method", ["method"],
                       registry=registry)
    mounted = Gauge("demo_mounted", "Mounted layers", registry=registry)
    latency = Histogram("demo_seconds", "Latency", ["op"], registry=registry,
                        buckets=(0.001, 0.01, 0.1))
    requests.labels("Prepare").inc()
    requests.labels("Prepare").inc(2)
    requests.labels(method="Commit").inc()
    mounted.set(5)
    mounted.dec(2)
    mounted.inc()
    for value in (0.0005, 0.005, 0.005, 0.5):
        latency.labels("read").observe(value)

    families = parsed(registry)
    kind, samples = families["demo_requests"]
    assert kind == "counter"
    assert samples[("demo_requests_total", (("method", "Prepare"),))] == 3
    assert samples[("demo_requests_total", (("method", "Commit"),))] == 1
    assert families["demo_mounted"] == ("gauge", {("demo_mounted", ()): 4})
    kind, samples = families["demo_seconds"]
    assert kind == "histogram"
    buckets = {dict(labels)["le"]: value for (name, labels), value in samples.items()
               if name == "demo_seconds_bucket"}
    assert buckets == {"0.001": 1, "0.01": 3, "0.1": 3, "+Inf": 4}
    assert samples[("demo_seconds_count", (("op", "read"),))] == 4
    assert samples[("demo_seconds_sum", (("op", "read"),))] == pytest.approx(0.5105)
    assert registry.get_sample_value("demo_requests_total", {"method": "Prepare"}) == 3
    assert registry.get_sample_value("demo_requests_total", {"method": "nope"}) is None


def test_label_values_and_help_are_escaped() -> None:
    registry = CollectorRegistry()
    refs = Gauge("demo_state", 'State of "each" image\\ref\nsecond line', ["ref"],
                 registry=registry)
    odd = 'r.io/a:b"\\\nc'
    refs.labels(odd).set(1)
    _, samples = parsed(registry)["demo_state"]
    assert samples == {("demo_state", (("ref", odd),)): 1}


def test_removed_series_are_gone_and_wrong_labels_are_refused() -> None:
    registry = CollectorRegistry()
    state = Gauge("demo_warm", "Warm", ["ns", "ref"], registry=registry)
    state.labels("default", "a").set(1)
    state.labels("default", "b").set(0)
    state.remove("default", "a")
    assert parsed(registry)["demo_warm"][1] == {("demo_warm", (("ns", "default"),
                                                               ("ref", "b"))): 0}
    with pytest.raises(KeyError):
        state.remove("default", "a")
    with pytest.raises(ValueError):
        state.labels("only-one")
    with pytest.raises(ValueError):
        state.labels(ns="default", nope="x")
    with pytest.raises(ValueError):
        Counter("demo_c", "c").inc(-1)
    with pytest.raises(ValueError):
        Gauge("demo_warm", "again", registry=registry)


def test_updates_from_many_threads_all_count() -> None:
    registry = CollectorRegistry()
    hits = Counter("demo_hits_total", "Hits", ["tier"], registry=registry)
    seen = Histogram("demo_size", "Sizes", registry=registry, buckets=(10,))

    def work() -> None:
        for _ in range(20000):
            hits.labels("memory").inc()
            seen.observe(1)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert registry.get_sample_value("demo_hits_total", {"tier": "memory"}) == 160000
    assert registry.get_sample_value("demo_size_count") == 160000
