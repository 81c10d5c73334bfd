"""An asyncio client for containerd's gRPC API, and `pull`: fetch an image into containerd
and unpack it through a (remote) snapshotter, as stargz-snapshotter's `ctr-remote rpull`."""

from .client import DEFAULT_ADDRESS, DEFAULT_NAMESPACE, ContainerdClient, ContentDescriptor
from .errors import (
    AlreadyExists,
    ContainerdError,
    ContainerdUnreachable,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from .pull import (
    LayerResult,
    LayerSource,
    Platform,
    PlatformNotFoundError,
    Puller,
    PullError,
    PullPlan,
    PullProgress,
    PullResult,
    SnapshotterNotFoundError,
    pull,
)

__all__ = [
    "DEFAULT_ADDRESS", "DEFAULT_NAMESPACE", "AlreadyExists", "ContainerdClient",
    "ContainerdError", "ContainerdUnreachable", "ContentDescriptor", "FailedPrecondition",
    "InvalidArgument", "LayerResult", "LayerSource", "NotFound", "Platform",
    "PlatformNotFoundError", "PullError", "PullPlan", "PullProgress", "PullResult", "Puller",
    "SnapshotterNotFoundError", "Unavailable", "pull",
]
