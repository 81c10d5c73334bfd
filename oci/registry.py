"""OCI Distribution client (httpx, asyncio) and the registry-backed ImageStore.

`RegistryClient` talks to registries: endpoints from containerd's hosts.toml
(mirrors first, capability-filtered), credentials from the Docker config,
Basic/Bearer auth, retries with backoff on connection errors, 429 and 5xx, and
verification of every manifest and blob against its digest and size.
`RegistryStore` is the ImageStore for one repository.
"""

import asyncio
import contextlib
import email.utils
import functools
import gc
import json
import logging
import os
import random
import re
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar
from urllib.request import getproxies

import httpx

from . import mediatypes as mt
from .auth import RegistryAuthenticator, repository_scope
from .digest import Digester, DigestMismatchError, is_digest, sha256_of
from .docker_config import CredentialSource, CredentialStore
from .hosts import PULL, PUSH, RESOLVE, Endpoint, HostsConfig, TLSSettings
from .http1 import Http1Transport
from .manifest import Descriptor
from .reference import Reference
from .store import AuthError, NotFoundError, StoreError

log = logging.getLogger(__name__)

MiB = 1024 * 1024
MAX_MANIFEST_SIZE = 4 * MiB
DEFAULT_CHUNK_SIZE = 16 * MiB
MAX_REDIRECTS = 5
MAX_ERROR_BODY = 64 * 1024
RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})
USER_AGENT = "lazypull/0.1"
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_UPLOAD_RANGE = re.compile(r"(?:bytes=)?0-(\d+)")

T = TypeVar("T")


class RegistryDigestError(StoreError, DigestMismatchError):
    """A manifest or blob from a registry does not hash to its digest."""


class RegistryUnavailableError(StoreError):
    """The registry could not be reached, or kept answering 429/5xx, within the retries."""


class _RangeRetry(Exception):
    """An answer to a range request that another attempt may get right; `delay` is
    what the registry asked to wait (Retry-After), if it did."""

    def __init__(self, reason: str, delay: float | None = None):
        super().__init__(reason)
        self.delay = delay


class PushResult(StrEnum):
    EXISTS = "exists"
    MOUNTED = "mounted"
    UPLOADED = "uploaded"


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with exponential backoff and jitter."""

    max_attempts: int = 4
    base_delay: float = 0.2
    max_delay: float = 8.0
    max_retry_after: float = 60.0  # longest Retry-After we are willing to wait

    def backoff(self, attempt: int) -> float:
        """Delay before retry number `attempt` (1-based): up to base * 2^(attempt-1)."""
        ceiling = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)

    def retry_after(self, response: httpx.Response, attempt: int) -> float:
        value = response.headers.get("retry-after", "").strip()
        seconds: float | None = None
        if value.isdigit():
            seconds = float(value)
        elif value:
            try:
                when = email.utils.parsedate_to_datetime(value)
                seconds = max(0.0, when.timestamp() - time.time())
            except (TypeError, ValueError):
                seconds = None
        if seconds is None:
            return self.backoff(attempt)
        return min(seconds, self.max_retry_after)


def _display(reference: Reference, tag_or_digest: str | None = None) -> str:
    obj = tag_or_digest or reference.object
    return f"{reference.registry}/{reference.repository}{'@' if is_digest(obj) else ':'}{obj}"


def _environment_proxies() -> bool:
    """Whether the environment names a proxy for HTTP(S), as httpx reads it."""
    proxies = getproxies()
    return any(proxies.get(scheme) for scheme in ("http", "https", "all"))


def _media_type_of(response: httpx.Response) -> str:
    return response.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _content_length(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length", "")
    return int(value) if value.isdigit() else None


async def _read_limited(response: httpx.Response, limit: int) -> bytes:
    """The body, or at most limit + 1 bytes of it (so callers can tell it was too long)."""
    parts, size = [], 0
    async for chunk in response.aiter_bytes():
        parts.append(chunk)
        size += len(chunk)
        if size > limit:
            break
    return b"".join(parts)[: limit + 1]


def _transport_problem(exc: httpx.TransportError, timeout: httpx.Timeout) -> str:
    """What went wrong, for a person: where, and how."""
    try:
        host = exc.request.url.netloc.decode("ascii")
    except RuntimeError:  # raised before a request existed
        host = "the registry"
    kind = type(exc).__name__
    if isinstance(exc, httpx.ReadTimeout):
        return f"{host} sent nothing for {timeout.read:g}s ({kind})"
    return f"cannot reach {host} ({kind}: {exc})" if str(exc) else f"cannot reach {host} ({kind})"


def _answered_by(response: httpx.Response, endpoint: Endpoint) -> str:
    """The host that answered: the endpoint, or where it redirected to."""
    host = response.url.netloc.decode("ascii")
    return endpoint.host if host == endpoint.host else f"{host} (redirected from {endpoint.host})"


def _content_range_problem(response: httpx.Response, first: int, last: int) -> str | None:
    value = response.headers.get("content-range", "")
    match = _CONTENT_RANGE.fullmatch(value.strip())
    if match and (int(match[1]), int(match[2])) == (first, last):
        return None
    return f"asked for bytes {first}-{last}, registry sent Content-Range {value[:80]!r}"


def _registry_errors(body: bytes) -> str:
    """`CODE: message` items of a registry's JSON error body, if it is one."""
    try:
        doc = json.loads(body)
        items = [f"{e.get('code', '?')}: {e.get('message', '')}".strip()
                 for e in doc.get("errors", []) if isinstance(e, dict)]
    except (ValueError, AttributeError, RecursionError):
        return ""
    return "; ".join(items)


def _manifest_media_type(doc: object, content_type: str) -> str:
    declared = doc.get("mediaType") if isinstance(doc, dict) else None
    if content_type and content_type not in ("application/json", "application/octet-stream"):
        return content_type
    if isinstance(declared, str) and declared:
        return declared
    # OCI lets mediaType be absent: tell an index from a manifest by its shape.
    return mt.OCI_INDEX if isinstance(doc, dict) and "manifests" in doc else mt.OCI_MANIFEST


class RegistryClient:
    """One connection pool for all registries, with hosts, credentials and retries.

    `credentials` None means the Docker config's (CredentialStore()); pass
    StaticCredentials({}) for anonymous access. `event_hooks` are passed to httpx
    (tests count requests with them); `trust_env` lets httpx honour HTTPS_PROXY,
    NO_PROXY and SSL_CERT_FILE. Blobs up to `chunk_size` bytes are uploaded in one
    PUT, larger ones in PATCH chunks of that size.
    """

    def __init__(self, hosts: HostsConfig | None = None,
                 credentials: CredentialSource | None = None,
                 retry: RetryPolicy | None = None, *,
                 chunk_size: int = DEFAULT_CHUNK_SIZE,
                 max_manifest_size: int = MAX_MANIFEST_SIZE,
                 timeout: float = 60.0,
                 event_hooks: Mapping[str, list[Callable[..., object]]] | None = None,
                 trust_env: bool = True):
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        self.hosts = hosts or HostsConfig()
        self.retry = retry or RetryPolicy()
        self.chunk_size = chunk_size
        self.max_manifest_size = max_manifest_size
        self._timeout = httpx.Timeout(timeout, connect=min(timeout, 10.0))
        self._event_hooks = {k: list(v) for k, v in (event_hooks or {}).items()}
        self._trust_env = trust_env
        # Our own HTTP/1.1 transport of each client that has one (not with proxies).
        self._transports: dict[httpx.AsyncClient, Http1Transport] = {}
        self._http = self._new_http_client(True)
        # Endpoints with their own CA, client certificate or skip_verify need their own pool.
        self._tls_clients: dict[TLSSettings, httpx.AsyncClient] = {}
        # A token realm on a registry's own host is reached with that host's TLS settings.
        self._client_by_host: dict[str, httpx.AsyncClient] = {}
        self.auth = RegistryAuthenticator(
            credentials if credentials is not None else CredentialStore(), self._send_for_auth)

    def _new_http_client(self, verify: ssl.SSLContext | bool) -> httpx.AsyncClient:
        options = {"timeout": self._timeout, "headers": {"User-Agent": USER_AGENT},
                   "follow_redirects": False, "event_hooks": self._event_hooks,
                   "trust_env": self._trust_env}
        if self._trust_env and _environment_proxies():  # httpx's transport uses them
            return httpx.AsyncClient(verify=verify, **options)  # type: ignore[arg-type]

        def ssl_context() -> ssl.SSLContext:  # at the first https connection
            if isinstance(verify, ssl.SSLContext):
                return verify
            return httpx.create_ssl_context(verify=verify, trust_env=self._trust_env)

        transport = Http1Transport(ssl_context)
        client = httpx.AsyncClient(transport=transport, **options)  # type: ignore[arg-type]
        self._transports[client] = transport
        return client

    async def __aenter__(self) -> "RegistryClient":
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        for client in [self._http, *self._tls_clients.values()]:
            await client.aclose()
        self._tls_clients.clear()
        self._client_by_host.clear()

    def _client_for(self, endpoint: Endpoint) -> httpx.AsyncClient:
        if endpoint.tls.is_default:
            return self._http
        client = self._tls_clients.get(endpoint.tls)
        if client is None:
            client = self._new_http_client(endpoint.tls.ssl_context())
            self._tls_clients[endpoint.tls] = client
        self._client_by_host[endpoint.host] = client
        return client

    # -- sending ------------------------------------------------------------------------

    async def _send_for_auth(self, request: httpx.Request) -> httpx.Response:
        client = self._client_by_host.get(request.url.netloc.decode("ascii"), self._http)
        return await self._send_retrying(functools.partial(client.send, request),
                                         what=f"token request to {request.url.host}",
                                         attempts=self.retry.max_attempts)

    async def _send_retrying(self, send: Callable[[], Awaitable[httpx.Response]], *,
                             what: str, attempts: int) -> httpx.Response:
        """Call `send` until it answers other than 429/5xx, retrying those and connection
        errors with backoff; after `attempts` the last answer is returned. Each attempt
        starts again at the registry, so a redirect target that failed (blob storage, a
        CDN) is reached through a fresh redirect."""
        for attempt in range(1, attempts + 1):
            try:
                response = await send()
            except httpx.TransportError as exc:
                if attempt == attempts:
                    raise RegistryUnavailableError(
                        f"{what}: {_transport_problem(exc, self._timeout)}") from exc
                delay = self.retry.backoff(attempt)
                log.info("%s: %s, retrying in %.2fs", what, type(exc).__name__, delay)
                await asyncio.sleep(delay)
                continue
            if response.status_code in RETRYABLE_STATUS and attempt < attempts:
                delay = self.retry.retry_after(response, attempt)
                await response.aclose()
                log.info("%s: HTTP %d from %s, retrying in %.2fs", what, response.status_code,
                         response.url.netloc.decode("ascii"), delay)
                await asyncio.sleep(delay)
                continue
            return response
        raise AssertionError("unreachable")

    async def _send_following(self, client: httpx.AsyncClient, method: str, url: httpx.URL,
                              headers: list[tuple[str, str]], content: bytes | None, *,
                              stream: bool, what: str,
                              follow_redirects: bool) -> httpx.Response:
        """One try: the request, and the redirects it is answered with if followed."""
        for _hop in range(MAX_REDIRECTS + 1):
            request = client.build_request(method, url, headers=headers, content=content)
            response = await client.send(request, stream=stream)
            location = response.headers.get("location")
            if not follow_redirects or response.status_code not in REDIRECT_STATUS \
                    or not location:
                return response
            await response.aclose()
            target = response.url.join(location)
            if (target.scheme, target.netloc) != (url.scheme, url.netloc):
                # Blob storage on another host must not see the registry's credentials.
                headers = [(k, v) for k, v in headers if k.lower() != "authorization"]
            if response.status_code == 303:
                method, content = "GET", None
            url = target
        raise StoreError(f"{what}: more than {MAX_REDIRECTS} redirects")

    async def _request(self, endpoint: Endpoint, method: str, url: httpx.URL, *,
                       scopes: Sequence[str], what: str,
                       headers: Mapping[str, str] | None = None, content: bytes | None = None,
                       stream: bool = False, retry: bool = True, last_endpoint: bool = True,
                       follow_redirects: bool = False) -> httpx.Response:
        """One authorized request; a 401 is answered once, then it is an AuthError."""
        client = self._client_for(endpoint)
        # A mirror that is not the last resort gets one try: the next host is the retry.
        attempts = self.retry.max_attempts if retry and last_endpoint else 1
        base = [*endpoint.headers, *(headers or {}).items()]
        auth = await self.auth.headers_for(endpoint.host, scopes)
        for answered in (False, True):
            send = functools.partial(self._send_following, client, method, url,
                                     [*base, *auth.items()], content, stream=stream, what=what,
                                     follow_redirects=follow_redirects)
            response = await self._send_retrying(send, what=what, attempts=attempts)
            if response.status_code != 401 or answered:
                break
            await response.aclose()
            sent, auth = auth, await self.auth.answer(endpoint.host, response, scopes, auth)
            if auth == sent:  # the same credentials again would only be refused again
                raise AuthError(f"{what}: {endpoint.host} refused the credentials (HTTP 401)")
        return response

    async def _check(self, response: httpx.Response, what: str, endpoint: Endpoint,
                     repository: str, ok: Iterable[int] = (200,)) -> None:
        """Raise the StoreError that the response's status stands for, if it is not ok."""
        status = response.status_code
        if status in ok:
            return
        body = b""
        if response.request.method != "HEAD":
            with contextlib.suppress(httpx.HTTPError):  # the status says enough
                body = await _read_limited(response, MAX_ERROR_BODY)
        await response.aclose()
        detail = _registry_errors(body)
        detail = f": {detail}" if detail else ""
        host = _answered_by(response, endpoint)
        if status in (401, 403):
            raise AuthError(f"{what}: {host} denied access to repository {repository} "
                            f"(HTTP {status}{detail})")
        if status == 404:
            raise NotFoundError(f"{what}: not found on {host}{detail}")
        if status in RETRYABLE_STATUS:
            raise RegistryUnavailableError(f"{what}: {host} answered HTTP {status}, "
                                           f"and retries did not help{detail}")
        raise StoreError(f"{what}: {host} answered HTTP {status}{detail}")

    async def _on_endpoints(self, registry: str, capability: str, what: str,
                            operation: Callable[[Endpoint, bool], Awaitable[T]]) -> T:
        """Run `operation` on each endpoint that may do `capability` until one succeeds."""
        endpoints = [e for e in self.hosts.endpoints(registry) if e.can(capability)]
        if not endpoints:
            raise StoreError(f"{what}: no configured host of {registry} may {capability}")
        for index, endpoint in enumerate(endpoints):
            last = index == len(endpoints) - 1
            try:
                return await operation(endpoint, last)
            except StoreError as exc:
                if last:
                    raise
                log.info("%s: %s failed (%s); trying the next host", what, endpoint.url, exc)
        raise AssertionError("unreachable")

    @staticmethod
    def _url(endpoint: Endpoint, repository: str, suffix: str,
             params: Sequence[tuple[str, str]] = ()) -> httpx.URL:
        url = httpx.URL(endpoint.api_url(f"/{repository}{suffix}"))
        if endpoint.mirror_of:  # containerd tells mirrors which registry is meant
            params = [*params, ("ns", endpoint.mirror_of)]
        return url.copy_merge_params(list(params)) if params else url

    async def preconnect(self, reference: Reference, count: int) -> int:
        """Open connections to the registry's first host for pulls, until `count` are
        idle: a pull about to request many ranges at once (TOCs, prefetch regions) finds
        them open instead of paying a round trip for each. Returns how many were opened;
        nothing fails here (the requests report what is wrong)."""
        endpoints = [e for e in self.hosts.endpoints(reference.registry) if e.can("pull")]
        if not endpoints:
            return 0
        endpoint = endpoints[0]
        transport = self._transports.get(self._client_for(endpoint))
        if transport is None:
            return 0
        return await transport.preconnect(httpx.URL(endpoint.url), count,
                                          self._timeout.connect)

    # -- manifests ------------------------------------------------------------------------

    async def resolve(self, reference: Reference, tag_or_digest: str | None = None) -> Descriptor:
        """The manifest's descriptor (media type, digest, size): HEAD, else GET."""
        obj = tag_or_digest or reference.object
        what = f"manifest {_display(reference, obj)}"
        scopes = [repository_scope(reference.repository, ["pull"])]

        async def head(endpoint: Endpoint, last: bool) -> Descriptor:
            url = self._url(endpoint, reference.repository, f"/manifests/{obj}")
            response = await self._request(endpoint, "HEAD", url, scopes=scopes, what=what,
                                           headers={"Accept": mt.MANIFEST_ACCEPT},
                                           last_endpoint=last)
            if response.status_code in (401, 403, 404):
                await self._check(response, what, endpoint, reference.repository)
            digest = response.headers.get("docker-content-digest", "")
            media_type, size = _media_type_of(response), _content_length(response)
            if response.status_code == 200 and is_digest(digest) and size is not None and \
                    media_type not in ("", "application/json", "text/html", "text/plain"):
                if is_digest(obj) and digest != obj:
                    raise RegistryDigestError(f"{what}: registry says its digest is {digest}")
                return Descriptor(media_type=media_type, digest=digest, size=size)
            # Not every registry answers HEAD fully: GET it and see for ourselves.
            data, media_type, digest = await self._get_manifest_from(
                endpoint, last, reference, obj)
            return Descriptor(media_type=media_type, digest=digest, size=len(data))

        return await self._on_endpoints(reference.registry, PULL if is_digest(obj) else RESOLVE,
                                        what, head)

    async def get_manifest(self, reference: Reference,
                           tag_or_digest: str | None = None) -> tuple[bytes, str, str]:
        """(bytes, media type, digest) of a manifest or index, verified against its digest."""
        obj = tag_or_digest or reference.object
        what = f"manifest {_display(reference, obj)}"

        async def get(endpoint: Endpoint, last: bool) -> tuple[bytes, str, str]:
            return await self._get_manifest_from(endpoint, last, reference, obj)

        return await self._on_endpoints(reference.registry, PULL if is_digest(obj) else RESOLVE,
                                        what, get)

    async def _get_manifest_from(self, endpoint: Endpoint, last: bool, reference: Reference,
                                 obj: str) -> tuple[bytes, str, str]:
        what = f"manifest {_display(reference, obj)}"
        url = self._url(endpoint, reference.repository, f"/manifests/{obj}")
        response = await self._request(
            endpoint, "GET", url, scopes=[repository_scope(reference.repository, ["pull"])],
            what=what, headers={"Accept": mt.MANIFEST_ACCEPT}, stream=True, last_endpoint=last)
        try:
            await self._check(response, what, endpoint, reference.repository)
            content_type = _media_type_of(response)
            if content_type.startswith("text/") or content_type == "application/xhtml+xml":
                raise StoreError(f"registry returned {content_type} for {what} from "
                                 f"{endpoint.host}, not a manifest (is {endpoint.url} really a "
                                 "registry, or a login page or proxy in the way?)")
            declared = _content_length(response)
            if declared is not None and declared > self.max_manifest_size:
                raise StoreError(f"{what}: manifest of {declared} bytes is larger than the "
                                 f"{self.max_manifest_size} bytes allowed")
            data = await _read_limited(response, self.max_manifest_size)
        except httpx.HTTPError as exc:
            raise RegistryUnavailableError(f"{what}: reading from {endpoint.host} failed "
                                           f"({type(exc).__name__})") from exc
        finally:
            await response.aclose()
        if len(data) > self.max_manifest_size:
            raise StoreError(f"{what}: manifest is larger than the {self.max_manifest_size} "
                             "bytes allowed")
        digest = self._verify_manifest_digest(what, data, obj,
                                              response.headers.get("docker-content-digest"))
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError):  # RecursionError: nested too deeply
            shown = content_type or "no content type"
            raise StoreError(f"registry returned {shown} for {what} from {endpoint.host}, and "
                             "it is not JSON") from None
        if not isinstance(doc, dict):
            raise StoreError(f"{what}: manifest is JSON but not an object")
        return data, _manifest_media_type(doc, content_type), digest

    @staticmethod
    def _verify_manifest_digest(what: str, data: bytes, obj: str, header: str | None) -> str:
        expected = obj if is_digest(obj) else (header or "").strip()
        if not expected:
            return sha256_of(data)  # fetched by tag and the registry did not say: trust the bytes
        if not is_digest(expected):
            raise StoreError(f"{what}: registry sent an invalid Docker-Content-Digest "
                             f"{expected[:80]!r}")
        digester = Digester(expected)
        digester.update(data)
        if digester.digest != expected:
            source = "requested" if is_digest(obj) else "the registry's Docker-Content-Digest"
            raise RegistryDigestError(f"{what}: content is {digester.digest}, not {expected} "
                                      f"({source})")
        return expected

    async def put_manifest(self, reference: Reference, data: bytes, media_type: str,
                           tag: str | None = None) -> str:
        """Store a manifest under `tag` (and so its digest), or by digest alone."""
        digest = sha256_of(data)
        target = tag or digest
        what = f"manifest {_display(reference, target)}"
        scopes = [repository_scope(reference.repository, ["pull", "push"])]

        async def put(endpoint: Endpoint, last: bool) -> str:
            url = self._url(endpoint, reference.repository, f"/manifests/{target}")
            response = await self._request(endpoint, "PUT", url, scopes=scopes, what=what,
                                           headers={"Content-Type": media_type},
                                           content=data, last_endpoint=last)
            await self._check(response, what, endpoint, reference.repository, ok=(200, 201, 202))
            answered = response.headers.get("docker-content-digest")
            if answered and answered != digest:
                raise RegistryDigestError(f"{what}: registry stored it as {answered}, "
                                          f"expected {digest}")
            return digest

        return await self._on_endpoints(reference.registry, PUSH, what, put)

    # -- blobs ----------------------------------------------------------------------------

    async def blob_size(self, reference: Reference, digest: str) -> int | None:
        """The blob's size if the repository has it, else None (HEAD)."""
        what = f"blob {digest} of {_display(reference)}"

        async def head(endpoint: Endpoint, last: bool) -> int | None:
            return await self._blob_size_on(endpoint, last, reference, digest, what)

        return await self._on_endpoints(reference.registry, PULL, what, head)

    async def has_blob(self, reference: Reference, digest: str) -> bool:
        return await self.blob_size(reference, digest) is not None

    async def _blob_size_on(self, endpoint: Endpoint, last: bool, reference: Reference,
                            digest: str, what: str, push: bool = False) -> int | None:
        url = self._url(endpoint, reference.repository, f"/blobs/{digest}")
        actions = ["pull", "push"] if push else ["pull"]
        response = await self._request(
            endpoint, "HEAD", url, scopes=[repository_scope(reference.repository, actions)],
            what=what, last_endpoint=last, follow_redirects=True)
        if response.status_code == 404:
            return None
        await self._check(response, what, endpoint, reference.repository)
        size = _content_length(response)
        if size is None:
            raise StoreError(f"{what}: {endpoint.host} did not say the blob's size")
        return size

    async def _open_blob(self, endpoint: Endpoint, last: bool, reference: Reference,
                         digest: str, what: str, byte_range: str | None = None,
                         ok: Iterable[int] = (200,)) -> httpx.Response:
        url = self._url(endpoint, reference.repository, f"/blobs/{digest}")
        headers = {"Range": byte_range} if byte_range else {}
        response = await self._request(
            endpoint, "GET", url, scopes=[repository_scope(reference.repository, ["pull"])],
            what=what, headers=headers, stream=True, last_endpoint=last, follow_redirects=True)
        await self._check(response, what, endpoint, reference.repository, ok=ok)
        return response

    async def stream_blob(self, reference: Reference,
                          descriptor: Descriptor) -> AsyncIterator[bytes]:
        """Yield the blob's bytes; raises once they fail the descriptor's size or digest.

        A connection that breaks mid-stream, or a body that ends early, is resumed with
        a Range request.
        """
        digest, size = descriptor.digest, descriptor.size
        what = f"blob {digest} of {_display(reference)}"

        async def open_whole(endpoint: Endpoint, last: bool) -> tuple[Endpoint, httpx.Response]:
            return endpoint, await self._open_blob(endpoint, last, reference, digest, what)

        endpoint, response = await self._on_endpoints(reference.registry, PULL, what, open_whole)
        digester, resumes = Digester(digest), 0
        try:
            while True:
                try:
                    async for chunk in response.aiter_bytes():
                        if digester.size + len(chunk) > size:
                            raise StoreError(f"{what}: registry sent more than the {size} bytes "
                                             "the descriptor gives")
                        digester.update(chunk)
                        yield chunk
                    if digester.size == size:
                        break
                    problem = "the body ended early"  # the registry said it was complete
                except httpx.TransportError as exc:
                    if digester.size >= size:
                        raise RegistryUnavailableError(
                            f"{what}: download broke after all {size} bytes "
                            f"({type(exc).__name__})") from exc
                    problem = type(exc).__name__
                broke = f"truncated: got {digester.size} of {size} bytes ({problem})"
                resumes += 1
                if resumes >= self.retry.max_attempts:
                    raise RegistryUnavailableError(f"{what}: {broke}, also after resuming")
                await response.aclose()
                await asyncio.sleep(self.retry.backoff(resumes))
                log.info("%s: %s; resuming", what, broke)
                try:
                    response = await self._open_blob(
                        endpoint, True, reference, digest, what,
                        f"bytes={digester.size}-{size - 1}", ok=(206,))
                    self._check_content_range(what, response, digester.size, size - 1)
                except StoreError as exc:
                    reason = str(exc).removeprefix(f"{what}: ")
                    raise StoreError(f"{what}: {broke}; resuming failed: {reason}") from None
            try:
                digester.verify(what)
            except DigestMismatchError as exc:
                raise RegistryDigestError(str(exc)) from None
        finally:
            await response.aclose()

    @staticmethod
    def _check_content_range(what: str, response: httpx.Response, first: int, last: int) -> None:
        problem = _content_range_problem(response, first, last)
        if problem:
            raise StoreError(f"{what}: {problem}")

    async def fetch_range(self, reference: Reference, digest: str, offset: int,
                          length: int) -> bytes:
        """`length` bytes of a blob from `offset`: one Range request, answered with 206.

        An answer that does not hold exactly those bytes (a 200 with the whole blob, another
        Content-Range, a short body, a connection that breaks) is asked for again with
        backoff, like a 429 or 5xx, each time from the registry; none reaches the caller.
        """
        if offset < 0 or length < 0:
            raise ValueError("offset and length must not be negative")
        if length == 0:
            return b""
        first, last_byte = offset, offset + length - 1
        what = f"bytes {first}-{last_byte} of blob {digest} of {_display(reference)}"

        async def fetch(endpoint: Endpoint, last: bool) -> bytes:
            return await self._range_attempts(last, what, functools.partial(
                self._fetch_range_once, endpoint, last, reference, digest, what, first,
                last_byte))

        return await self._on_endpoints(reference.registry, PULL, what, fetch)

    async def _fetch_range_once(self, endpoint: Endpoint, last: bool, reference: Reference,
                                digest: str, what: str, first: int, last_byte: int,
                                attempt: int) -> bytes:
        """One attempt of fetch_range; _RangeRetry if another attempt may do better."""
        response = await self._open_range_once(endpoint, last, reference, digest, what,
                                               first, last_byte, attempt)
        try:
            try:
                data = await _read_limited(response, last_byte + 1 - first)
            except httpx.TransportError as exc:
                raise _RangeRetry(f"reading the body failed ({type(exc).__name__})") from None
            if len(data) != last_byte + 1 - first:
                raise _RangeRetry(f"got {len(data)} bytes, expected {last_byte + 1 - first}")
            return data
        finally:
            await response.aclose()

    async def _open_range_once(self, endpoint: Endpoint, last: bool, reference: Reference,
                               digest: str, what: str, first: int, last_byte: int,
                               attempt: int) -> httpx.Response:
        """A 206 answer for bytes first..last_byte, its body still to read; _RangeRetry if
        another attempt may do better."""
        url = self._url(endpoint, reference.repository, f"/blobs/{digest}")
        try:
            response = await self._request(
                endpoint, "GET", url, scopes=[repository_scope(reference.repository, ["pull"])],
                what=what, headers={"Range": f"bytes={first}-{last_byte}"}, stream=True,
                retry=False, last_endpoint=last, follow_redirects=True)
        except RegistryUnavailableError as exc:  # no answer at all
            raise _RangeRetry(str(exc).removeprefix(f"{what}: ")) from None
        try:
            status = response.status_code
            if status in RETRYABLE_STATUS:
                raise _RangeRetry(f"{_answered_by(response, endpoint)} answered HTTP {status}",
                                  self.retry.retry_after(response, attempt))
            if status == 200:
                raise _RangeRetry(f"{_answered_by(response, endpoint)} ignored the Range "
                                  "request (HTTP 200 with the whole blob)")
            await self._check(response, what, endpoint, reference.repository, ok=(206,))
            problem = _content_range_problem(response, first, last_byte)
            if problem:
                raise _RangeRetry(problem)
        except BaseException:
            await response.aclose()
            raise
        return response

    async def stream_range(self, reference: Reference, digest: str, offset: int,
                           length: int) -> AsyncIterator[bytes]:
        """fetch_range's bytes, yielded as they arrive: a reader can start on the first
        ones while the rest are on the wire. An answer that breaks or ends early is
        resumed where it stopped (a Range request for the rest), and a bad answer asked
        for again, with backoff, within the retry policy's attempts; nothing beyond
        `length` bytes is yielded. Once bytes were yielded, the rest comes from the same
        host."""
        if offset < 0 or length < 0:
            raise ValueError("offset and length must not be negative")
        end = offset + length
        what = f"bytes {offset}-{end - 1} of blob {digest} of {_display(reference)}"
        position = offset

        async def open_rest(endpoint: Endpoint, last: bool) -> tuple[Endpoint, httpx.Response]:
            return endpoint, await self._range_attempts(last, what, functools.partial(
                self._open_range_once, endpoint, last, reference, digest, what, position,
                end - 1))

        if length == 0:
            return
        endpoint, response = await self._on_endpoints(reference.registry, PULL, what, open_rest)
        resumes = 0
        try:
            while True:
                try:
                    # Read to the body's end, not just to the last byte wanted: a response
                    # left unfinished closes its connection, and the next request would
                    # open another (a round trip, and slow start again).
                    async for data in response.aiter_bytes():
                        data = data[:end - position]
                        if data:
                            position += len(data)
                            yield data
                    if position == end:
                        return
                    problem = "the body ended early"
                except httpx.TransportError as exc:
                    problem = f"reading the body failed ({type(exc).__name__})"
                await response.aclose()
                resumes += 1
                if resumes >= self.retry.max_attempts:
                    raise RegistryUnavailableError(
                        f"{what}: {problem} at byte {position}, also after resuming")
                await self._pause(what, _RangeRetry(f"{problem} at byte {position}"), resumes)
                _, response = await open_rest(endpoint, True)
        finally:
            await response.aclose()

    async def _range_attempts(self, last: bool, what: str,
                              once: Callable[[int], Awaitable[T]]) -> T:
        """`once(attempt)` until an answer is right (it raises _RangeRetry while one is
        not), with backoff. A mirror that is not the last resort gets one try: the next
        host is the retry."""
        attempts = self.retry.max_attempts if last else 1
        for attempt in range(1, attempts + 1):
            try:
                return await once(attempt)
            except _RangeRetry as exc:
                if attempt == attempts:
                    raise RegistryUnavailableError(
                        f"{what}: {exc}, in each of {attempts} attempts") from None
                await self._pause(what, exc, attempt)
        raise AssertionError("unreachable")

    async def _pause(self, what: str, retry: _RangeRetry, attempt: int) -> None:
        delay = self.retry.backoff(attempt) if retry.delay is None else retry.delay
        log.info("%s: %s, retrying in %.2fs", what, retry, delay)
        await asyncio.sleep(delay)

    # -- pushing blobs --------------------------------------------------------------------

    async def push_blob(self, reference: Reference, descriptor: Descriptor, path: str,
                        mount_from: Iterable[str] = ()) -> PushResult:
        """Put the file at `path` (the descriptor's bytes) into the repository.

        Skipped if the blob is there; mounted from a repository in `mount_from` (same
        registry) if the registry agrees; else uploaded in one PUT or in chunks.
        """
        digest, size = descriptor.digest, descriptor.size
        what = f"blob {digest} of {_display(reference)}"
        local_size = os.path.getsize(path)
        if local_size != size:
            raise StoreError(f"{what}: {path} has {local_size} bytes, the descriptor says {size}")
        sources = [s for s in dict.fromkeys(mount_from) if s != reference.repository]

        async def push(endpoint: Endpoint, last: bool) -> PushResult:
            if await self._blob_size_on(endpoint, last, reference, digest, what,
                                        push=True) == size:
                return PushResult.EXISTS
            location: httpx.URL | None = None
            for source in sources:
                if location is not None:  # the previous source did not have it
                    await self._cancel_upload(endpoint, reference, location, what)
                location = await self._try_mount(endpoint, last, reference, digest, source, what)
                if location is None:
                    await self._verify_pushed(endpoint, reference, digest, size, what)
                    return PushResult.MOUNTED
            # A refused mount (202) opened an upload session: the upload goes there.
            for attempt in range(1, self.retry.max_attempts + 1):
                try:
                    await self._upload(endpoint, last, reference, descriptor, path, what,
                                       location)
                    break
                except RegistryUnavailableError as exc:
                    if attempt == self.retry.max_attempts or not last:
                        raise
                    location = None  # the session may be broken: start a new one
                    delay = self.retry.backoff(attempt)
                    log.info("%s: upload failed (%s), starting again in %.2fs", what, exc, delay)
                    await asyncio.sleep(delay)
            await self._verify_pushed(endpoint, reference, digest, size, what)
            return PushResult.UPLOADED

        return await self._on_endpoints(reference.registry, PUSH, what, push)

    async def _try_mount(self, endpoint: Endpoint, last: bool, reference: Reference,
                         digest: str, source: str, what: str) -> httpx.URL | None:
        """None if mounted from `source`, else the upload session the registry opened."""
        url = self._url(endpoint, reference.repository, "/blobs/uploads/",
                        [("mount", digest), ("from", source)])
        scopes = [repository_scope(reference.repository, ["pull", "push"]),
                  repository_scope(source, ["pull"])]
        response = await self._request(endpoint, "POST", url, scopes=scopes, what=what,
                                       content=b"", last_endpoint=last)
        await self._check(response, f"{what} (mount from {source})", endpoint,
                          reference.repository, ok=(201, 202))
        if response.status_code == 201:
            log.debug("%s: mounted from %s", what, source)
            return None
        return self._location(response, what)

    async def _cancel_upload(self, endpoint: Endpoint, reference: Reference,
                             location: httpx.URL, what: str) -> None:
        scopes = [repository_scope(reference.repository, ["pull", "push"])]
        try:
            response = await self._request(endpoint, "DELETE", location, scopes=scopes,
                                           what=what, retry=False)
            await response.aclose()
        except StoreError as exc:  # an abandoned session expires on its own
            log.debug("%s: cancelling an upload session failed: %s", what, exc)

    @staticmethod
    def _location(response: httpx.Response, what: str) -> httpx.URL:
        location = response.headers.get("location")
        if not location:
            raise StoreError(f"{what}: registry opened an upload without a Location")
        return response.url.join(location)

    async def _upload(self, endpoint: Endpoint, last: bool, reference: Reference,
                      descriptor: Descriptor, path: str, what: str,
                      location: httpx.URL | None) -> None:
        scopes = [repository_scope(reference.repository, ["pull", "push"])]
        if location is None:
            url = self._url(endpoint, reference.repository, "/blobs/uploads/")
            response = await self._request(endpoint, "POST", url, scopes=scopes, what=what,
                                           content=b"", last_endpoint=last)
            await self._check(response, what, endpoint, reference.repository, ok=(202,))
            location = self._location(response, what)
        digester = Digester(descriptor.digest)
        offset = 0
        body = b""
        if descriptor.size <= self.chunk_size:
            body = await asyncio.to_thread(_read_at, path, 0, descriptor.size)
            digester.update(body)
        else:
            while offset < descriptor.size:
                chunk = await asyncio.to_thread(_read_at, path, offset, self.chunk_size)
                if not chunk:
                    raise StoreError(f"{what}: {path} ended at byte {offset}")
                digester.update(chunk)
                location = await self._patch_chunk(endpoint, reference, location, chunk, offset,
                                                   scopes, what)
                offset += len(chunk)
                # httpx's request and response objects form reference cycles that hold
                # the chunk until the cyclic collector runs, which it seldom does: left
                # to it, pushing a blob of 164 MB took 112 MiB more, not 48.
                gc.collect()
        try:
            digester.verify(f"{what}: local file {path}")
        except DigestMismatchError as exc:
            raise RegistryDigestError(str(exc)) from None
        final = location.copy_merge_params({"digest": descriptor.digest})
        headers = {"Content-Type": "application/octet-stream"}
        # Requests inside an upload session are not retried one by one: see push_blob.
        response = await self._request(endpoint, "PUT", final, scopes=scopes, what=what,
                                       headers=headers, content=body, retry=False)
        await self._check(response, what, endpoint, reference.repository, ok=(201, 204))

    async def _patch_chunk(self, endpoint: Endpoint, reference: Reference, location: httpx.URL,
                           chunk: bytes, offset: int, scopes: Sequence[str],
                           what: str) -> httpx.URL:
        end = offset + len(chunk) - 1
        headers = {"Content-Type": "application/octet-stream",
                   "Content-Range": f"{offset}-{end}"}
        response = await self._request(endpoint, "PATCH", location, scopes=scopes, what=what,
                                       headers=headers, content=chunk, retry=False)
        await self._check(response, f"{what} (chunk at {offset})", endpoint,
                          reference.repository, ok=(202,))
        stored = _UPLOAD_RANGE.fullmatch(response.headers.get("range", "").strip())
        if stored and int(stored[1]) != end:
            raise StoreError(f"{what}: registry holds bytes 0-{stored[1]} after the chunk "
                             f"ending at {end}")
        return self._location(response, what)

    async def _verify_pushed(self, endpoint: Endpoint, reference: Reference, digest: str,
                             size: int, what: str) -> None:
        found = await self._blob_size_on(endpoint, True, reference, digest, what, push=True)
        if found != size:
            raise StoreError(f"{what}: after the push the registry reports "
                             f"{'no blob' if found is None else f'{found} bytes'}, "
                             f"expected {size}")

    # -- referrers ------------------------------------------------------------------------

    async def get_referrers(self, reference: Reference, digest: str,
                            artifact_type: str | None = None) -> bytes | None:
        """The OCI 1.1 referrers index of manifest `digest`, or None where the registry
        has no referrers API (it answers 404 there; one that has it never does)."""
        what = f"referrers of {_display(reference, digest)}"
        params = [("artifactType", artifact_type)] if artifact_type else []

        async def get(endpoint: Endpoint, last: bool) -> bytes | None:
            url = self._url(endpoint, reference.repository, f"/referrers/{digest}", params)
            response = await self._request(
                endpoint, "GET", url, scopes=[repository_scope(reference.repository, ["pull"])],
                what=what, headers={"Accept": mt.OCI_INDEX}, stream=True, last_endpoint=last)
            try:
                if response.status_code == 404:
                    return None
                await self._check(response, what, endpoint, reference.repository)
                data = await _read_limited(response, self.max_manifest_size)
            finally:
                await response.aclose()
            if len(data) > self.max_manifest_size:
                raise StoreError(f"{what}: the index is larger than the "
                                 f"{self.max_manifest_size} bytes allowed")
            return data

        return await self._on_endpoints(reference.registry, PULL, what, get)


def _read_at(path: str, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


class RegistryStore:
    """The ImageStore of one registry repository.

    `mount_from` names repositories of the same registry that may already hold the
    blobs being pushed (e.g. the source image), so they are mounted, not uploaded.
    """

    def __init__(self, reference: Reference, client: RegistryClient, *,
                 mount_from: Iterable[str] = (), owns_client: bool = False):
        self.client = client
        self.reference = reference
        self.mount_from = tuple(mount_from)
        self._owns_client = owns_client

    @property
    def name(self) -> str:
        return f"docker://{self.reference}"

    @property
    def default_object(self) -> str | None:
        return self.reference.digest or self.reference.tag

    async def resolve(self, tag_or_digest: str | None = None) -> Descriptor:
        return await self.client.resolve(self.reference, tag_or_digest)

    async def get_manifest(self, tag_or_digest: str) -> tuple[bytes, str, str]:
        return await self.client.get_manifest(self.reference, tag_or_digest)

    async def get_blob(self, descriptor: Descriptor) -> AsyncIterator[bytes]:
        async for chunk in self.client.stream_blob(self.reference, descriptor):
            yield chunk

    async def has_blob(self, descriptor: Descriptor) -> bool:
        return await self.client.has_blob(self.reference, descriptor.digest)

    async def put_blob(self, descriptor: Descriptor, path: str) -> None:
        await self.client.push_blob(self.reference, descriptor, path, self.mount_from)

    async def put_manifest(self, data: bytes, media_type: str, tag: str | None) -> str:
        return await self.client.put_manifest(self.reference, data, media_type, tag)

    async def fetch_range(self, digest: str, offset: int, length: int) -> bytes:
        return await self.client.fetch_range(self.reference, digest, offset, length)

    async def aclose(self) -> None:
        if self._owns_client:
            await self.client.aclose()


def open_registry_store(reference: Reference | str, client: RegistryClient | None = None, *,
                        mount_from: Iterable[str] = ()) -> RegistryStore:
    """A RegistryStore for `reference` (`[docker://]HOST/REPO[:TAG|@DIGEST]`).

    Without `client`, the store makes its own (default hosts and Docker config) and
    closes it in aclose().
    """
    if isinstance(reference, str):
        reference = Reference.parse(reference.removeprefix("docker://"))
    owns = client is None
    return RegistryStore(reference, client or RegistryClient(), mount_from=mount_from,
                         owns_client=owns)
