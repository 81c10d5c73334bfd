"""Prometheus metrics of the warm set."""

import contextlib

from ..metrics import REGISTRY
from ..prometheus import Counter, Gauge

STATES = ("pending", "warming", "warm", "failed")

WARM_STATE = Gauge("lazypull_warm_image_state",
                   "1 for the state each warm-set image is in, 0 for the others",
                   ["namespace", "ref", "state"], registry=REGISTRY)
WARM_BYTES = Gauge("lazypull_warm_image_bytes",
                   "Bytes of each warm-set image's layers: cached locally, and in total",
                   ["namespace", "ref", "kind"], registry=REGISTRY)
WARM_LAST_SUCCESS = Gauge("lazypull_warm_image_last_success_timestamp_seconds",
                          "When each warm-set image was last found or made warm",
                          ["namespace", "ref"], registry=REGISTRY)
WARM_FAILURES = Counter("lazypull_warm_refresh_failures_total",
                        "Warm or refresh attempts of a warm-set image that failed",
                        ["namespace", "ref"], registry=REGISTRY)
WARM_IMAGE_BOOT_SECONDS = Gauge("lazypull_warm_image_boot_seconds",
                                "Time from service start until each warm-set image was "
                                "first warm", ["namespace", "ref"], registry=REGISTRY)
WARM_BOOT_SECONDS = Gauge("lazypull_warm_boot_seconds",
                          "Time from service start until every warm-set image was first "
                          "warm (or failed without blocking readiness)", registry=REGISTRY)


def set_state(namespace: str, ref: str, state: str) -> None:
    for name in STATES:
        WARM_STATE.labels(namespace, ref, name).set(1 if name == state else 0)


def forget(namespace: str, ref: str) -> None:
    """An entry left the warm set: its series go too."""
    for name in STATES:
        _remove(WARM_STATE, namespace, ref, name)
    for kind in ("cached", "total"):
        _remove(WARM_BYTES, namespace, ref, kind)
    _remove(WARM_LAST_SUCCESS, namespace, ref)
    _remove(WARM_IMAGE_BOOT_SECONDS, namespace, ref)
    _remove(WARM_FAILURES, namespace, ref)


def _remove(metric, *labels: str) -> None:
    with contextlib.suppress(KeyError):
        metric.remove(*labels)
