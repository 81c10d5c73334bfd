"""Metrics of lazy layers, kept in the FUSE manager process (fetch and cache metrics
live with the fetcher and the cache). Their own registry: the snapshotter service
exposes it beside its own, fetched from the manager."""

from ..prometheus import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry()

LAYERS_MOUNTED = Gauge("lazypull_lazy_layers_mounted", "Lazy layers served through FUSE",
                       registry=REGISTRY)
GZIP_INDEX_LAYERS_MOUNTED = Gauge("lazypull_gzip_index_layers_mounted",
                                  "Of the lazy layers served, the unmodified gzip layers read "
                                  "through their gzip index", registry=REGISTRY)
PREFETCH_FAILURES = Counter("lazypull_prefetch_failures_total",
                            "Mounts refused because lazy layers could not be prefetched in time",
                            registry=REGISTRY)
FUSE_LATENCY = Histogram("lazypull_fuse_operation_duration_seconds",
                         "Time to answer a FUSE request, by operation", ["operation"],
                         registry=REGISTRY,
                         buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
                                  0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
