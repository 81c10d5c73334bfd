"""Where to send a registry's requests: containerd's `hosts.toml` configuration.

A hosts directory (e.g. /etc/containerd/certs.d) holds `<host[:port]>/hosts.toml`
(or `<host>_<port>_/`) and a `_default/hosts.toml` fallback. The hosts listed in
a file are tried in file order, then `server`; without a file the registry itself
is the only endpoint (https, Docker Hub at registry-1.docker.io). A directory
without hosts.toml may hold Docker-style certificates (*.crt, *.cert + *.key).
"""

import ipaddress
import logging
import os
import posixpath
import ssl
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

PULL, RESOLVE, PUSH = "pull", "resolve", "push"
ALL_CAPABILITIES = frozenset({PULL, RESOLVE, PUSH})
DOCKER_HUB = "docker.io"
DOCKER_HUB_API_HOST = "registry-1.docker.io"
DEFAULT_NAMESPACE = "_default"


class HostsConfigError(ValueError):
    """A hosts.toml file that cannot be used."""


@dataclass(frozen=True)
class TLSSettings:
    verify: bool = True
    ca_files: tuple[str, ...] = ()
    client_certs: tuple[tuple[str, str], ...] = ()  # (cert, key); key "" = inside cert file

    @property
    def is_default(self) -> bool:
        return self == TLSSettings()

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        for ca_file in self.ca_files:
            context.load_verify_locations(cafile=ca_file)
        if not self.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        # One TLS connection presents one certificate: the first pair wins.
        if self.client_certs:
            cert, key = self.client_certs[0]
            context.load_cert_chain(cert, key or None)
        return context


@dataclass(frozen=True)
class Endpoint:
    """One place that serves a registry's API, and what it may be trusted with."""

    url: str  # scheme://host[:port]
    path: str = "/v2"  # API root; "/v2" unless the file says override_path
    capabilities: frozenset[str] = ALL_CAPABILITIES
    tls: TLSSettings = field(default_factory=TLSSettings)
    headers: tuple[tuple[str, str], ...] = ()
    # The registry this endpoint stands in for, when it is a mirror (sent as `ns=`).
    mirror_of: str | None = None

    @property
    def host(self) -> str:
        return urlsplit(self.url).netloc

    @property
    def scheme(self) -> str:
        return urlsplit(self.url).scheme

    def can(self, capability: str) -> bool:
        return capability in self.capabilities

    def api_url(self, suffix: str) -> str:
        """`suffix` starts with "/" and follows the API root, e.g. "/repo/blobs/sha256:..."."""
        return f"{self.url}{self.path}{suffix}"


def is_localhost(host: str) -> bool:
    name = split_host_port(host)[0]
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def split_host_port(host: str) -> tuple[str, str]:
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        return name, rest.lstrip(":")
    if host.count(":") == 1:
        name, _, port = host.partition(":")
        return name, port
    return host, ""


def _host_dir_candidates(hosts_dir: str, registry: str) -> list[str]:
    names = []
    port = split_host_port(registry)[1]
    if port:
        names.append(f"{registry[: registry.rfind(':')]}_{port}_")
    names += [registry, DEFAULT_NAMESPACE]
    return [os.path.join(hosts_dir, n) for n in names]


def _as_path_list(value: Any, base_dir: str, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise HostsConfigError(f"{what} must be a path or a list of paths")
    return tuple(os.path.join(base_dir, v) for v in value)


def _client_pairs(value: Any, base_dir: str) -> tuple[tuple[str, str], ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise HostsConfigError("client must be a path, a list of paths or a list of pairs")
    pairs = []
    for item in items:
        if isinstance(item, str):
            pairs.append((os.path.join(base_dir, item), ""))
        elif isinstance(item, list) and len(item) == 2 and all(isinstance(p, str) for p in item):
            cert, key = item
            pairs.append((os.path.join(base_dir, cert), os.path.join(base_dir, key) if key else ""))
        else:
            raise HostsConfigError(f"client entry {item!r} is not a path or a [cert, key] pair")
    return tuple(pairs)


def _headers(value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise HostsConfigError("header must be a table")
    out = []
    for name, values in value.items():
        items = [values] if isinstance(values, str) else values
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
            raise HostsConfigError(f"header {name!r} must be a string or list of strings")
        out.extend((name, v) for v in items)
    return tuple(out)


def _capabilities(value: Any) -> frozenset[str]:
    if value is None or value == []:
        return ALL_CAPABILITIES  # containerd: none listed means all
    if not isinstance(value, list):
        raise HostsConfigError("capabilities must be a list")
    caps = frozenset(str(c).lower() for c in value)
    unknown = caps - ALL_CAPABILITIES
    if unknown:
        raise HostsConfigError(f"unknown capabilities {sorted(unknown)}")
    return caps


def _api_path(url_path: str, override_path: bool) -> str:
    path = posixpath.normpath(url_path) if url_path not in ("", "/") else ""
    if override_path:
        return path
    return path if path.endswith("/v2") else f"{path}/v2"


def _tls_settings(table: dict[str, Any], base_dir: str) -> TLSSettings:
    return TLSSettings(
        verify=table.get("skip_verify", False) is not True,
        ca_files=_as_path_list(table["ca"], base_dir, "ca") if "ca" in table else (),
        client_certs=_client_pairs(table["client"], base_dir) if "client" in table else (),
    )


def _endpoint(url: str, table: Any, base_dir: str, registry: str) -> Endpoint:
    if not isinstance(table, dict):
        raise HostsConfigError(f"host {url!r} must be a table")
    if not url.startswith(("http://", "https://")):
        url = f"https://{url}"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises for a port that is not a number from 0 to 65535)
    except ValueError as exc:
        raise HostsConfigError(f"host {url!r} is not a URL: {exc}") from None
    if not parts.netloc:
        raise HostsConfigError(f"host {url!r} has no host name")
    if any(c.isspace() or not c.isprintable() for c in parts.netloc):
        raise HostsConfigError(f"host {url!r} has white space or control characters")
    host = parts.netloc.lower()
    return Endpoint(
        url=f"{parts.scheme}://{host}",
        path=_api_path(parts.path, bool(table.get("override_path", False))),
        capabilities=_capabilities(table.get("capabilities")),
        tls=_tls_settings(table, base_dir),
        headers=_headers(table.get("header", {})),
        mirror_of=None if host == registry else registry,
    )


def _docker_cert_files(directory: str) -> TLSSettings:
    """Docker's certs.d layout: *.crt are CAs, X.cert + X.key are client pairs."""
    names = sorted(os.listdir(directory))
    cas = tuple(os.path.join(directory, n) for n in names if n.endswith(".crt"))
    pairs = tuple(
        (os.path.join(directory, n), os.path.join(directory, n[:-5] + ".key"))
        for n in names if n.endswith(".cert") and n[:-5] + ".key" in names
    )
    return TLSSettings(ca_files=cas, client_certs=pairs)


class HostsConfig:
    """Endpoints for a registry from a hosts directory, with containerd's semantics.

    `insecure` names registries (host[:port]) whose default endpoint is plain
    HTTP; `plain_http` makes every default endpoint plain HTTP (like ctr
    --plain-http). Loopback registries default to plain HTTP too, as containerd
    and skopeo treat localhost. Files are re-read when they change.
    """

    def __init__(self, hosts_dir: str | None = None, insecure: Iterable[str] = (),
                 plain_http: bool = False):
        self.hosts_dir = hosts_dir
        self.insecure = frozenset(h.lower() for h in insecure)
        self.plain_http = plain_http
        self._cache: dict[str, tuple[tuple[int, int], list[Endpoint]]] = {}

    def default_endpoint(self, registry: str, tls: TLSSettings | None = None) -> Endpoint:
        if registry == DOCKER_HUB:
            return Endpoint(url=f"https://{DOCKER_HUB_API_HOST}", tls=tls or TLSSettings())
        # Like containerd, a loopback registry on a port other than 443 speaks plain HTTP.
        local_plain = is_localhost(registry) and split_host_port(registry)[1] not in ("", "443")
        plain = self.plain_http or registry in self.insecure or local_plain
        scheme = "http" if plain else "https"
        return Endpoint(url=f"{scheme}://{registry}", tls=tls or TLSSettings())

    def endpoints(self, registry: str) -> list[Endpoint]:
        """The endpoints to try for `registry` (host[:port]), in order."""
        registry = registry.lower()
        directory = self._host_dir(registry)
        if directory is None:
            return [self.default_endpoint(registry)]
        hosts_file = os.path.join(directory, "hosts.toml")
        if not os.path.isfile(hosts_file):
            return [self.default_endpoint(registry, _docker_cert_files(directory))]
        return self._load(hosts_file, registry)

    def _host_dir(self, registry: str) -> str | None:
        if not self.hosts_dir:
            return None
        for candidate in _host_dir_candidates(self.hosts_dir, registry):
            if os.path.isdir(candidate):
                return candidate
        return None

    def _load(self, hosts_file: str, registry: str) -> list[Endpoint]:
        stat = os.stat(hosts_file)
        stamp = (stat.st_mtime_ns, stat.st_size)
        key = f"{hosts_file}\0{registry}"
        cached = self._cache.get(key)
        if cached and cached[0] == stamp:
            return cached[1]
        with open(hosts_file, "rb") as f:
            try:
                doc = tomllib.load(f)
            except tomllib.TOMLDecodeError as exc:
                raise HostsConfigError(f"{hosts_file}: {exc}") from None
        try:
            found = self._parse(doc, os.path.dirname(hosts_file), registry)
        except HostsConfigError as exc:
            raise HostsConfigError(f"{hosts_file}: {exc}") from None
        log.debug("%s: %d endpoint(s) for %s", hosts_file, len(found), registry)
        self._cache[key] = (stamp, found)
        return found

    def _parse(self, doc: dict[str, Any], base_dir: str, registry: str) -> list[Endpoint]:
        hosts = doc.get("host", {})
        if not isinstance(hosts, dict):
            raise HostsConfigError("host must be a table of [host.\"URL\"] tables")
        # tomllib keeps the file's order, which is the order to try hosts in.
        found = [_endpoint(url, table, base_dir, registry) for url, table in hosts.items()]
        server = doc.get("server")
        if server is not None and not isinstance(server, str):
            raise HostsConfigError("server must be a URL")
        if server:
            found.append(_endpoint(server, doc, base_dir, registry))
        else:
            # No server: the registry itself, with the root level's TLS settings and headers.
            default = self.default_endpoint(registry, _tls_settings(doc, base_dir))
            found.append(Endpoint(url=default.url, tls=default.tls,
                                  headers=_headers(doc.get("header", {}))))
        return found
