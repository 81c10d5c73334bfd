"""Registry authentication: `WWW-Authenticate` challenges, Basic, and Bearer tokens.

The Docker/OCI token flow: a registry answers 401 with
`Bearer realm="...",service="...",scope="..."`; the client gets a token from the
realm (with Basic credentials, an identity token, or anonymously) and retries.
Each host's challenge is remembered, so later requests carry a token from the
start, and tokens are cached per (realm, service, scopes) until they expire.
Tokens and passwords are never logged.
"""

import asyncio
import base64
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import httpx

from .docker_config import Credentials, CredentialsError, CredentialSource
from .store import AuthError, StoreError

log = logging.getLogger(__name__)

DEFAULT_TOKEN_LIFETIME = 60.0  # seconds, when the token server does not say (Docker's spec)
CLIENT_ID = "lazypull"

Send = Callable[[httpx.Request], Awaitable[httpx.Response]]


@dataclass(frozen=True)
class Challenge:
    scheme: str  # lower case: "basic", "bearer", ...
    params: Mapping[str, str]

    @property
    def realm(self) -> str:
        return self.params.get("realm", "")

    @property
    def service(self) -> str:
        return self.params.get("service", "")

    @property
    def scopes(self) -> list[str]:
        return self.params.get("scope", "").split()


def _skip_spaces(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t":
        i += 1
    return i


def _read_token(text: str, i: int) -> tuple[str, int]:
    start = i
    while i < len(text) and text[i] not in " \t,=\"":
        i += 1
    return text[start:i], i


def _read_quoted(text: str, i: int) -> tuple[str, int]:
    out, i = [], i + 1  # past the opening quote
    while i < len(text) and text[i] != '"':
        if text[i] == "\\" and i + 1 < len(text):
            i += 1
        out.append(text[i])
        i += 1
    return "".join(out), i + 1


def parse_www_authenticate(values: str | Iterable[str]) -> list[Challenge]:
    """Parse one or more `WWW-Authenticate` values (RFC 7235) into challenges."""
    challenges: list[Challenge] = []
    for text in [values] if isinstance(values, str) else values:
        i, scheme, params = 0, "", {}
        while i < len(text):
            i = _skip_spaces(text, i)
            if i < len(text) and text[i] == ",":
                i += 1
                continue
            word, j = _read_token(text, i)
            if not word:  # stray character: skip it rather than loop forever
                i += 1
                continue
            after = _skip_spaces(text, j)
            if after < len(text) and text[after] == "=" and scheme:
                value_at = _skip_spaces(text, after + 1)
                if value_at < len(text) and text[value_at] == '"':
                    value, i = _read_quoted(text, value_at)
                else:
                    value, i = _read_token(text, value_at)
                params[word.lower()] = value
            else:  # a new auth-scheme starts here
                if scheme:
                    challenges.append(Challenge(scheme, params))
                scheme, params, i = word.lower(), {}, j
        if scheme:
            challenges.append(Challenge(scheme, params))
    return challenges


def repository_scope(repository: str, actions: Iterable[str]) -> str:
    return f"repository:{repository}:{','.join(actions)}"


def basic_header(credentials: Credentials) -> str:
    pair = f"{credentials.username}:{credentials.password}".encode()
    return "Basic " + base64.b64encode(pair).decode()


def _scope_actions(scopes: Iterable[str]) -> dict[str, frozenset[str]]:
    """`repository:a:pull,push` -> {"repository:a": {"pull", "push"}}, merged per resource."""
    merged: dict[str, set[str]] = {}
    for scope in scopes:
        resource, _, actions = scope.rpartition(":")
        merged.setdefault(resource or scope, set()).update(a for a in actions.split(",") if a)
    return {resource: frozenset(actions) for resource, actions in merged.items()}


@dataclass
class _Token:
    value: str
    expires_at: float
    scopes: dict[str, frozenset[str]]  # what it was asked for

    def covers(self, wanted: dict[str, frozenset[str]]) -> bool:
        return all(actions <= self.scopes.get(resource, frozenset())
                   for resource, actions in wanted.items())


def _identity(credentials: Credentials | None) -> str:
    """Who tokens are fetched as, to keep their caches apart (a digest, never the secret)."""
    if credentials is None:
        return ""
    if credentials.identity_token:
        return "identity:" + hashlib.sha256(credentials.identity_token.encode()).hexdigest()[:16]
    return f"user:{credentials.username}"


class RegistryAuthenticator:
    """Produces Authorization headers for registry hosts and answers their 401s.

    `credentials.get(host)` is asked with the host[:port] being talked to;
    `send` sends a request with the caller's retry policy (used for the realm).
    """

    def __init__(self, credentials: CredentialSource | None, send: Send,
                 clock: Callable[[], float] = time.monotonic):
        self._credentials = credentials
        self._send = send
        self._clock = clock
        self._challenges: dict[str, Challenge] = {}
        # Per (realm, service, user): tokens, any of which serves scopes it was asked for.
        self._tokens: dict[tuple[str, str, str], list[_Token]] = {}
        self._locks: dict[tuple[str, str, str], asyncio.Lock] = {}
        self.token_requests = 0

    async def _credentials_for(self, host: str) -> Credentials | None:
        if self._credentials is None:
            return None
        try:
            # A credential helper is a subprocess: keep it off the event loop.
            return await asyncio.to_thread(self._credentials.get, host)
        except (CredentialsError, OSError) as exc:  # a broken config or helper
            raise AuthError(f"cannot get credentials for {host}: {exc}") from exc

    async def headers_for(self, host: str, scopes: Sequence[str]) -> dict[str, str]:
        """Authorization for a request to `host`, from what its last challenge asked for."""
        challenge = self._challenges.get(host)
        if challenge is None:
            return {}
        return await self._authorize(host, challenge, scopes, rejected=None)

    async def answer(self, host: str, response: httpx.Response, scopes: Sequence[str],
                     sent: Mapping[str, str]) -> dict[str, str]:
        """Headers to retry a request that got 401 (having sent `sent`), or AuthError."""
        challenges = parse_www_authenticate(response.headers.get_list("www-authenticate"))
        usable = [c for c in challenges if c.scheme in ("bearer", "basic")]
        if not usable:
            raise AuthError(f"{host} requires authentication but sent no usable challenge")
        # Prefer Bearer: it scopes access to the repository at hand.
        challenge = next((c for c in usable if c.scheme == "bearer"), usable[0])
        self._challenges[host] = challenge
        wanted = list(dict.fromkeys([*scopes, *challenge.scopes]))
        rejected = sent.get("Authorization", "").removeprefix("Bearer ") or None
        return await self._authorize(host, challenge, wanted, rejected)

    async def _authorize(self, host: str, challenge: Challenge, scopes: Sequence[str],
                         rejected: str | None) -> dict[str, str]:
        credentials = await self._credentials_for(host)
        if challenge.scheme == "basic":
            if credentials is None or not credentials.has_password:
                raise AuthError(f"{host} requires a username and password, and none are "
                                "configured for it")
            return {"Authorization": basic_header(credentials)}
        token = await self._bearer_token(host, challenge, scopes, credentials, rejected)
        return {"Authorization": f"Bearer {token}"}

    async def _bearer_token(self, host: str, challenge: Challenge, scopes: Sequence[str],
                            credentials: Credentials | None, rejected: str | None) -> str:
        if not challenge.realm.startswith(("https://", "http://")):
            raise AuthError(f"{host} sent a Bearer challenge without a usable realm")
        key = (challenge.realm, challenge.service, _identity(credentials))
        wanted = _scope_actions(scopes)
        async with self._locks.setdefault(key, asyncio.Lock()):
            now = self._clock()
            # A token the registry refused is dropped, even if it has not expired yet.
            tokens = [t for t in self._tokens.get(key, [])
                      if t.expires_at > now and t.value != rejected]
            for token in tokens:
                if token.covers(wanted):
                    self._tokens[key] = tokens
                    return token.value
            merged = [f"{resource}:{','.join(sorted(actions))}" if actions else resource
                      for resource, actions in wanted.items()]
            token = await self._fetch_token(host, challenge, merged, credentials)
            self._tokens[key] = [*tokens, token]
            return token.value

    async def _fetch_token(self, host: str, challenge: Challenge, scopes: Sequence[str],
                           credentials: Credentials | None) -> _Token:
        self.token_requests += 1
        realm = challenge.realm
        if credentials and credentials.identity_token:
            form = {"grant_type": "refresh_token", "refresh_token": credentials.identity_token,
                    "service": challenge.service, "client_id": CLIENT_ID,
                    "scope": " ".join(scopes)}
            request = httpx.Request("POST", realm, data=form)
        else:
            params: list[tuple[str, str]] = []
            if challenge.service:
                params.append(("service", challenge.service))
            params += [("scope", s) for s in scopes]
            headers = {}
            if credentials and credentials.has_password:
                params.append(("account", credentials.username))
                headers["Authorization"] = basic_header(credentials)
            request = httpx.Request("GET", realm, params=params, headers=headers)
        started = self._clock()
        response = await self._send(request)
        realm_host = httpx.URL(realm).host
        if response.status_code in (401, 403):
            user = f" for user {credentials.username!r}" if credentials and \
                credentials.username else " for anonymous access"
            raise AuthError(f"token server {realm_host} refused a token for {host}{user} "
                            f"(HTTP {response.status_code})")
        if response.status_code != 200:
            raise StoreError(f"token server {realm_host} answered HTTP {response.status_code} "
                             f"for {host}")
        try:
            doc = response.json()
        except ValueError:
            kind = response.headers.get("content-type", "no content type")
            raise StoreError(f"token server {realm_host} returned {kind}, not JSON") from None
        value = (doc.get("token") or doc.get("access_token")) if isinstance(doc, dict) else None
        if not isinstance(value, str) or not value:
            raise StoreError(f"token server {realm_host} returned no token for {host}")
        lifetime = doc.get("expires_in")
        if isinstance(lifetime, bool) or not isinstance(lifetime, int | float) or lifetime <= 0:
            lifetime = DEFAULT_TOKEN_LIFETIME
        # Renew a little early so a token does not expire in flight.
        margin = min(10.0, lifetime * 0.1)
        log.debug("got a token from %s for %s (%d scope(s), %ss)", realm_host, host,
                  len(scopes), lifetime)
        return _Token(value, started + lifetime - margin, _scope_actions(scopes))
