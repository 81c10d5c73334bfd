"""Metrics of lazy layers (fetch and cache metrics live with the fetcher and the cache)."""

from prometheus_client import Counter, Gauge

from ..metrics import REGISTRY

LAYERS_MOUNTED = Gauge("lazypull_lazy_layers_mounted", "Lazy layers served through FUSE",
                       registry=REGISTRY)
FALLBACKS = Counter("lazypull_remote_snapshot_fallbacks_total",
                    "Remote-snapshot requests served by an ordinary snapshot instead, by reason",
                    ["reason"], registry=REGISTRY)
PREFETCH_FAILURES = Counter("lazypull_prefetch_failures_total",
                            "Mounts refused because lazy layers could not be prefetched in time",
                            registry=REGISTRY)
