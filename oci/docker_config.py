"""Registry credentials from a Docker config file and its credential helpers.

Understands `$DOCKER_CONFIG/config.json` (else `~/.docker/config.json`), a
Kubernetes `.dockerconfigjson` secret file and the legacy `.dockercfg` layout:
`auths` entries, per-registry `credHelpers` and the global `credsStore`.
Secrets are never logged; `Credentials` hides them from its repr.
"""

import base64
import binascii
import json
import logging
import os
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from .docker_config_path import default_config_path as default_config_path

log = logging.getLogger(__name__)

DOCKER_HUB_HOSTS = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})
# What `docker login` writes for Docker Hub, and what helpers expect to be asked for.
DOCKER_HUB_SERVER_URL = "https://index.docker.io/v1/"
HELPER_TIMEOUT_SECONDS = 30.0
# Helpers may hand out short-lived tokens (ECR, GCR): ask again after a while.
HELPER_CACHE_SECONDS = 300.0


class CredentialsError(Exception):
    """The Docker config or a credential helper is broken (not: has no entry)."""


@dataclass(frozen=True)
class Credentials:
    """A username and password, or an identity (refresh) token."""

    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)

    @property
    def has_password(self) -> bool:
        return bool(self.username and self.password)


class CredentialSource(Protocol):
    def get(self, registry_host: str) -> Credentials | None: ...


class StaticCredentials:
    """Credentials given directly (command-line flags, tests), by registry host."""

    def __init__(self, by_host: Mapping[str, Credentials]):
        self._by_host = {normalize_registry_key(k): v for k, v in by_host.items()}

    def get(self, registry_host: str) -> Credentials | None:
        return self._by_host.get(normalize_registry_key(registry_host))


def normalize_registry_key(key: str) -> str:
    """`https://index.docker.io/v1/` -> `docker.io`; `http://host:5000/x` -> `host:5000`."""
    host = key.strip()
    for scheme in ("https://", "http://"):
        if host.lower().startswith(scheme):
            host = host[len(scheme):]
    host = host.split("/", 1)[0].lower()
    return "docker.io" if host in DOCKER_HUB_HOSTS else host


def helper_server_url(registry_host: str) -> str:
    return DOCKER_HUB_SERVER_URL if normalize_registry_key(registry_host) == "docker.io" \
        else registry_host


def _decode_auth_entry(host: str, entry: Mapping[str, Any]) -> Credentials | None:
    username = entry.get("username") or ""
    password = entry.get("password") or ""
    encoded = entry.get("auth") or ""
    if encoded:
        try:
            decoded = base64.b64decode(encoded, validate=False).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise CredentialsError(f"auths entry for {host}: 'auth' is not base64") from None
        username, sep, password = decoded.partition(":")
        if not sep:
            raise CredentialsError(f"auths entry for {host}: 'auth' is not user:password")
    identity_token = entry.get("identitytoken") or ""
    if not (username and password) and not identity_token:
        return None
    return Credentials(username=username, password=password, identity_token=identity_token)


def run_credential_helper(helper: str, server_url: str) -> Credentials | None:
    """Ask `docker-credential-<helper> get`; None when it has nothing for the server."""
    program = f"docker-credential-{helper}"
    try:
        done = subprocess.run([program, "get"], input=server_url.encode(),
                              capture_output=True, timeout=HELPER_TIMEOUT_SECONDS, check=False)
    except FileNotFoundError:
        raise CredentialsError(f"credential helper {program} is not on PATH") from None
    except subprocess.TimeoutExpired:
        raise CredentialsError(f"credential helper {program} did not answer in time") from None
    output = done.stdout.decode(errors="replace").strip()
    if done.returncode != 0:
        message = output or done.stderr.decode(errors="replace").strip()
        if "credentials not found" in message.lower():
            return None
        # The message comes from the helper; it does not carry the secret.
        raise CredentialsError(f"credential helper {program} failed: {message[:200]}")
    try:
        answer = json.loads(output)
    except ValueError:
        raise CredentialsError(f"credential helper {program} did not answer JSON") from None
    if not isinstance(answer, dict):
        raise CredentialsError(f"credential helper {program} did not answer a JSON object")
    username, secret = answer.get("Username") or "", answer.get("Secret") or ""
    if not secret:
        return None
    if username == "<token>":  # how helpers hand back an identity token
        return Credentials(identity_token=secret)
    return Credentials(username=username, password=secret)


@dataclass
class _ParsedConfig:
    auths: dict[str, Mapping[str, Any]]
    cred_helpers: dict[str, str]
    creds_store: str


def _parse_config(path: str, raw: bytes) -> _ParsedConfig:
    try:
        doc = json.loads(raw) if raw.strip() else {}
    except ValueError:
        raise CredentialsError(f"{path} is not valid JSON") from None
    if not isinstance(doc, dict):
        raise CredentialsError(f"{path} is not a JSON object")
    auths = doc.get("auths")
    if auths is None and doc and all(isinstance(v, dict) and "auth" in v for v in doc.values()):
        auths = doc  # the legacy ~/.dockercfg layout: registries at the top level
    auths = auths or {}
    helpers = doc.get("credHelpers") or {}
    if not isinstance(auths, dict) or not isinstance(helpers, dict):
        raise CredentialsError(f"{path}: 'auths' and 'credHelpers' must be objects")
    return _ParsedConfig(
        auths={normalize_registry_key(k): v for k, v in auths.items() if isinstance(v, dict)},
        cred_helpers={normalize_registry_key(k): str(v) for k, v in helpers.items()},
        creds_store=str(doc.get("credsStore") or ""),
    )


_Stamp = tuple[str, int, int, int, int]


def _file_stamp(path: str) -> _Stamp:
    """What identifies the file `path` leads to now: where its symlinks lead, its
    inode, mtime and size. A Kubernetes Secret volume swaps a `..data` symlink to a
    new directory, and the replacement can have the old file's size and, with
    coarse file timestamps, its mtime: the target path and inode still differ."""
    stat = os.stat(path)
    return (os.path.realpath(path), stat.st_dev, stat.st_ino, stat.st_mtime_ns, stat.st_size)


class CredentialStore:
    """Credentials from a Docker config file, reloaded when the file changes (also when
    it is a symlink that now leads elsewhere, as in a Kubernetes Secret volume)."""

    def __init__(self, config_path: str | None = None):
        self.path = config_path or default_config_path()
        self._lock = threading.Lock()
        self._stamp: _Stamp | None = None
        self._config = _ParsedConfig({}, {}, "")
        self._helper_cache: dict[str, tuple[float, Credentials | None]] = {}

    def _forget(self) -> _ParsedConfig:
        self._stamp, self._config = None, _ParsedConfig({}, {}, "")
        self._helper_cache.clear()
        return self._config

    def _reload_if_changed(self) -> _ParsedConfig:
        try:
            stamp = _file_stamp(self.path)
        except FileNotFoundError:
            return self._forget()
        if stamp != self._stamp:
            # The stamp is taken before the read: a change in between only means
            # one more reload, never a stale config kept.
            try:
                with open(self.path, "rb") as f:
                    self._config = _parse_config(self.path, f.read())
            except FileNotFoundError:
                return self._forget()
            self._stamp = stamp
            self._helper_cache.clear()
            log.debug("loaded Docker config %s", self.path)
        return self._config

    def _from_helper(self, helper: str, host: str) -> Credentials | None:
        key = f"{helper}\0{host}"
        cached = self._helper_cache.get(key)
        if cached and time.monotonic() - cached[0] < HELPER_CACHE_SECONDS:
            return cached[1]
        found = run_credential_helper(helper, helper_server_url(host))
        self._helper_cache[key] = (time.monotonic(), found)
        return found

    def get(self, registry_host: str) -> Credentials | None:
        """Credentials for `registry_host` (host[:port]), or None for anonymous access."""
        with self._lock:
            config = self._reload_if_changed()
            key = normalize_registry_key(registry_host)
            helper = config.cred_helpers.get(key)
            if helper:
                return self._from_helper(helper, key)
            if config.creds_store:
                # Like Docker's native store: the helper first, then the file's own entry.
                found = self._from_helper(config.creds_store, key)
                if found:
                    return found
            entry = config.auths.get(key)
            return _decode_auth_entry(key, entry) if entry else None
