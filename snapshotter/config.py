"""Service configuration: a TOML file, every option with a default, flags on top."""

import tomllib
from dataclasses import dataclass, fields, replace
from typing import Any

DEFAULT_CONFIG_PATH = "/etc/lazypull/config.toml"
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(ValueError):
    """A configuration file or value that the service cannot use."""


@dataclass(frozen=True)
class Config:
    address: str = "/run/lazypull/snapshotter.sock"
    root: str = "/var/lib/lazypull"
    metrics_address: str = ""  # HOST:PORT of /metrics, /healthz and /readyz; off when empty
    log_level: str = "info"

    def with_overrides(self, **values: Any) -> "Config":
        return replace(self, **{k: v for k, v in values.items() if v is not None})

    def validate(self) -> "Config":
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"log_level must be one of {', '.join(LOG_LEVELS)}")
        if not self.address or not self.root:
            raise ConfigError("address and root must not be empty")
        if self.metrics_address:
            metrics_host_port(self.metrics_address)
        return self


def metrics_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"metrics address {address!r} is not HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def load_config(path: str | None) -> Config:
    """The file at `path` (None: the default path if it exists, else all defaults)."""
    import os

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
    known = {f.name: f.type for f in fields(Config)}
    values: dict[str, Any] = {}
    for key, value in doc.items():
        if key not in known:
            raise ConfigError(f"{path}: unknown option {key!r}")
        if not isinstance(value, str):
            raise ConfigError(f"{path}: {key} must be a string")
        values[key] = value
    return Config(**values).validate()
