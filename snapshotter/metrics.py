"""Prometheus metrics of the service (exposed only when a metrics address is set)."""

from .prometheus import CollectorRegistry, Counter, Histogram

REGISTRY = CollectorRegistry()

RPC_REQUESTS = Counter("lazypull_snapshotter_rpc_requests_total",
                       "Snapshots API calls handled", ["method"], registry=REGISTRY)
RPC_ERRORS = Counter("lazypull_snapshotter_rpc_errors_total",
                     "Snapshots API calls that failed, by gRPC status code", ["method", "code"],
                     registry=REGISTRY)
RPC_LATENCY = Histogram("lazypull_snapshotter_rpc_duration_seconds",
                        "Time to handle a Snapshots API call", ["method"], registry=REGISTRY,
                        buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                 0.5, 1, 2.5, 5, 10))
FALLBACKS = Counter("lazypull_remote_snapshot_fallbacks_total",
                    "Remote-snapshot requests served by an ordinary snapshot instead, by reason",
                    ["reason"], registry=REGISTRY)
