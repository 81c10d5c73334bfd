"""Service configuration: a TOML file, every option with a default, flags on top."""

import os
import tomllib
from dataclasses import dataclass, fields, replace
from typing import Any

from .lazy.prefetch_wait import FIRST_BYTES, UNTIL
from .warm.spec import WarmSpecError, parse_entries

DEFAULT_CONFIG_PATH = "/etc/lazypull/config.toml"
LOG_LEVELS = ("debug", "info", "warning", "error")
FUSE_MANAGER_MODES = ("spawn", "external")


class ConfigError(ValueError):
    """A configuration file or value that the service cannot use."""


@dataclass(frozen=True)
class Config:
    address: str = "/run/lazypull/snapshotter.sock"
    # `lazypull pull` hands its pulls to this service on pull.sock beside `address`
    # (pull_protocol): the command then loads next to nothing.
    take_pulls: bool = True
    # A pull handed over for this snapshotter name (containerd's name for this service)
    # has the FUSE manager open the image's lazy layers and start their prefetch as
    # soon as the manifest is resolved, before containerd's Prepares. Empty: off.
    pull_ahead_snapshotter: str = "lazypull"
    root: str = "/var/lib/lazypull"
    metrics_address: str = ""  # HOST:PORT of /metrics, /healthz and /readyz; off when empty
    log_level: str = "info"
    # Lazy layers: registries are reached as containerd would (hosts.toml, Docker config).
    lazy: bool = True
    # The FUSE mount lives in a separate process (`lazypull fuse-manager`) so running
    # containers survive a restart of this service. "spawn": start it when it is not
    # running; "external": wait for one started otherwise (a second container, a unit).
    fuse_manager: str = "spawn"
    hosts_dir: str = "/etc/containerd/certs.d"
    docker_config: str = ""  # empty: $DOCKER_CONFIG/config.json or ~/.docker/config.json
    cache_max_bytes: int = 20 << 30
    # Recently read chunks also kept in memory: the kernel reads a file 128 KiB at a
    # time, and each read of a chunk that is packed in the index or not sealed reads
    # (and hashes) all of it; sealed chunk files are read in part, past the tier. The
    # kernel keeps what it read in its page cache, so this needs to hold the chunks
    # being read, not the image: 16 MiB holds three whole 4 MiB chunks. The FUSE
    # manager's memory grows by up to this much (docs/node-memory.md).
    cache_memory_bytes: int = 16 << 20
    # How long a Mounts of a snapshot over lazy layers waits for their prefetch.
    prefetch_timeout_seconds: float = 60.0
    # What that wait is for: "first-bytes", each layer's first prefetch request verified
    # and cached (a registry that is down still refuses the container; its reads wait
    # for the chunks on their way, so it is created while the prefetch's tail arrives),
    # or "whole", every prefetched chunk cached (lazy.prefetch_wait).
    prefetch_wait: str = FIRST_BYTES
    # The longest a read of a lazy file waits for bytes from the registry, retries
    # included; then it fails with EIO (counted in lazypull_read_failures_total and
    # logged). A registry connection silent for a quarter of this is dropped and the
    # request tried again (4 attempts), so a request under way when a read gives up
    # ends soon after too: the kernel's second read of a page whose readahead failed
    # waits for that request, so a program's read(2) can take up to about 1.5 s more.
    read_timeout_seconds: float = 30.0
    fetch_concurrency: int = 8
    background_fetch: bool = True
    background_bytes_per_second: float = 0.0  # 0: no cap
    # Background fetch starts (and goes on) once no container has read from a lazy
    # layer for this long.
    background_quiet_seconds: float = 3.0
    # A miss on a small file also fetches the files after it in the blob, up to this.
    small_file_window_bytes: int = 512 << 10
    # A miss in a large file fetches its chunk and at most this much of the blob after it.
    demand_readahead_bytes: int = 0
    # A layer whose TOC is larger than this, compressed or not, is not served lazily
    # (10^6 files make a TOC of about 300 MB); it falls back to an ordinary pull.
    max_toc_bytes: int = 1 << 30
    # Layer indexes are built in processes forked from a template process that the FUSE
    # manager keeps (about 23 MB RSS, 13 MB PSS): each build starts in a millisecond,
    # not the 0.1 s of CPU an interpreter's start costs while a pull needs the cores
    # (docs/start-speed.md). false: each build starts a process of its own.
    index_build_template: bool = True
    # Access profiles (ROOT/profiles): files read in this long after a container
    # starts on freshly mounted lazy layers, at most this many per image. 0: off.
    profile_window_seconds: float = 60.0
    profile_max_files: int = 10_000
    # Unmodified gzip layers are served lazily through a gzip index published beside
    # their image (`lazypull index`). The lookup of an image's indexes may take this
    # long before the layer is pulled the ordinary way; an image found without any is
    # not asked about again for the TTL.
    gzip_index_lookup: bool = True
    gzip_index_lookup_seconds: float = 3.0
    gzip_index_negative_ttl_seconds: float = 300.0
    # The first lookup of an image fetches every layer's index and builds its tree at
    # once (false: each layer's mount fetches its own when it comes).
    gzip_index_ahead: bool = True
    # The warm set: images pulled through containerd at start and kept fresh; readiness
    # waits for them. `warm_set` holds tables (ref, policy, namespace, refresh_seconds,
    # block_readiness), `warm_set_dir` files *.toml of [[warm_set]] tables (re-read).
    containerd_address: str = "/run/containerd/containerd.sock"
    warm_set: tuple = ()
    warm_set_dir: str = ""
    warm_concurrency: int = 2

    def with_overrides(self, **values: Any) -> "Config":
        return replace(self, **{k: v for k, v in values.items() if v is not None})

    def validate(self) -> "Config":
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"log_level must be one of {', '.join(LOG_LEVELS)}")
        if not self.address or not self.root:
            raise ConfigError("address and root must not be empty")
        if self.prefetch_wait not in UNTIL:
            raise ConfigError(f"prefetch_wait must be one of {', '.join(UNTIL)}")
        if self.fuse_manager not in FUSE_MANAGER_MODES:
            raise ConfigError(f"fuse_manager must be one of {', '.join(FUSE_MANAGER_MODES)}")
        if self.metrics_address:
            metrics_host_port(self.metrics_address)
        for name in ("cache_max_bytes", "cache_memory_bytes", "fetch_concurrency",
                     "profile_max_files", "warm_concurrency", "max_toc_bytes",
                     "small_file_window_bytes"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        if self.prefetch_timeout_seconds <= 0 or self.background_bytes_per_second < 0 \
                or self.background_quiet_seconds < 0:
            raise ConfigError("prefetch_timeout_seconds must be positive and "
                              "background_bytes_per_second not negative")
        if self.read_timeout_seconds <= 0:
            raise ConfigError("read_timeout_seconds must be positive")
        if self.demand_readahead_bytes < 0:
            raise ConfigError("demand_readahead_bytes must not be negative")
        if self.gzip_index_lookup_seconds <= 0 or self.gzip_index_negative_ttl_seconds < 0:
            raise ConfigError("gzip_index_lookup_seconds must be positive and "
                              "gzip_index_negative_ttl_seconds not negative")
        if self.profile_window_seconds < 0:
            raise ConfigError("profile_window_seconds must not be negative (0: off)")
        try:
            parse_entries(self.warm_set, "warm_set")
        except WarmSpecError as exc:
            raise ConfigError(str(exc)) from None
        return self

    @property
    def registry_stall_seconds(self) -> float:
        """How long a registry connection of the lazy layers may stay silent."""
        return self.read_timeout_seconds / 4

    @property
    def fuse_mountpoint(self) -> str:
        return os.path.join(self.root, "fuse")

    @property
    def fuse_manager_address(self) -> str:
        return os.path.join(self.root, "fuse-manager.sock")

    @property
    def fuse_manager_pidfile(self) -> str:
        return os.path.join(self.root, "fuse-manager.pid")

    @property
    def cache_dir(self) -> str:
        return os.path.join(self.root, "cache")

    @property
    def profiles_dir(self) -> str:
        return os.path.join(self.root, "profiles")


def metrics_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"metrics address {address!r} is not HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def _typed(path: str, key: str, value: Any, kind: type) -> Any:
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
        raise ConfigError(f"{path}: {key} must be a {kind.__name__}")
    return value


def load_config(path: str | None) -> Config:
    """The file at `path` (None: the default path if it exists, else all defaults)."""
    if path is None:
        if not os.path.exists(DEFAULT_CONFIG_PATH):
            return Config()
        path = DEFAULT_CONFIG_PATH
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    kinds = {f.name: type(f.default) for f in fields(Config)}
    values: dict[str, Any] = {}
    for key, value in doc.items():
        if key not in kinds:
            raise ConfigError(f"{path}: unknown option {key!r}")
        if key == "warm_set" and isinstance(value, list):
            value = tuple(value)  # of tables, checked by validate()
        values[key] = _typed(path, key, value, kinds[key])
    return Config(**values).validate()
