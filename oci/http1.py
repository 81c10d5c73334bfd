"""HTTP/1.1 for the registry client, on asyncio and h11.

httpx's own transport (httpcore) drives asyncio through anyio and loads HTTP/2
support whether or not a client asks for it: about 6 MB of modules in every node
process that talks to a registry, for connections that only ever speak HTTP/1.1.
`Http1Transport` speaks HTTP/1.1 only, keeps idle connections per origin for the
next request, and raises httpx's exceptions (ConnectError, ReadTimeout,
RemoteProtocolError, ...), so a client above it behaves as it does with httpx's
transport. It does not go through proxies: a client whose environment names one
keeps httpx's transport (see `oci.registry`).
"""

import asyncio
import collections
import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterator

import h11
import httpx

READ_HIGH_WATER = 256 << 10  # bytes buffered before the socket stops being read
# As httpx's default limits.
MAX_CONNECTIONS = 100
MAX_IDLE_CONNECTIONS = 20
IDLE_SECONDS = 5.0
# A request sent again on a new connection when a kept one turns out closed.
_REPLAYABLE = frozenset({"GET", "HEAD", "OPTIONS"})
_DEFAULT_PORTS = {b"http": 80, b"https": 443}

Origin = tuple[bytes, bytes, int]  # scheme, host, port


def _origin_of(url: httpx.URL) -> Origin:
    return url.raw_scheme, url.raw_host, url.port or _DEFAULT_PORTS.get(url.raw_scheme, 80)


class _Stream(asyncio.Protocol):
    """One connection's bytes: what arrived and not yet read, with flow control both
    ways, and whether the peer has closed."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.closed = False  # the peer's end: EOF or a lost connection
        self.error: BaseException | None = None
        self._readable: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None
        self._reading_paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > READ_HIGH_WATER and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]
        self._wake_reader()

    def eof_received(self) -> bool:
        self.closed = True
        self._wake_reader()
        return False  # nothing more to send either: close

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.error = exc
        self._wake_reader()
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    def pause_writing(self) -> None:
        self._writable = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None

    def _wake_reader(self) -> None:
        if self._readable is not None and not self._readable.done():
            self._readable.set_result(None)

    @property
    def idle_and_open(self) -> bool:
        """Nothing arrived since the last response and the peer has not closed: a
        kept connection that may carry another request."""
        return not self.buffer and not self.closed and self.transport is not None \
            and not self.transport.is_closing()

    async def read(self) -> bytes:
        """What has arrived (waiting for something); b"" once the peer has closed."""
        while not self.buffer and not self.closed:
            self._readable = asyncio.get_running_loop().create_future()
            await self._readable
        if self.buffer:
            data = bytes(self.buffer)
            self.buffer.clear()
            if self._reading_paused and self.transport is not None:
                self._reading_paused = False
                self.transport.resume_reading()
            return data
        if self.error is not None:
            raise ConnectionError(f"connection lost: {self.error}")
        return b""

    async def write(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            raise ConnectionError("the connection is closed")
        self.transport.write(data)
        if self._writable is not None:
            await self._writable
            if self.closed:
                raise ConnectionError(f"connection lost: {self.error}")

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


@contextlib.contextmanager
def _mapped(timeout_error: type[httpx.TimeoutException],
            error: type[httpx.TransportError]) -> Iterator[None]:
    """The failures of one step of a request as the httpx exceptions for that step."""
    try:
        yield
    except TimeoutError:
        raise timeout_error("timed out") from None
    except h11.RemoteProtocolError as exc:
        raise httpx.RemoteProtocolError(str(exc)) from None
    except h11.LocalProtocolError as exc:
        raise httpx.LocalProtocolError(str(exc)) from None
    except (OSError, ssl.SSLError) as exc:  # ConnectionError, resets, TLS failures
        raise error(str(exc) or type(exc).__name__) from None


class _Connection:
    def __init__(self, origin: Origin, stream: _Stream):
        self.origin = origin
        self.stream = stream
        self.protocol = h11.Connection(h11.CLIENT)
        self.idle_since = time.monotonic()
        self.requests = 0
        self.opened_ahead = False  # by `preconnect`: kept, though nothing was sent yet

    @property
    def reusable(self) -> bool:
        return self.stream.idle_and_open and self.protocol.our_state is h11.IDLE

    async def send(self, request: httpx.Request, timeout: float | None) -> None:
        self.requests += 1
        head = h11.Request(method=request.method, target=request.url.raw_path,
                           headers=request.headers.raw)
        await self._send(head, timeout)
        assert isinstance(request.stream, httpx.AsyncByteStream)
        async for part in request.stream:
            if part:
                await self._send(h11.Data(data=part), timeout)
        await self._send(h11.EndOfMessage(), timeout)

    async def _send(self, event: h11.Event, timeout: float | None) -> None:
        with _mapped(httpx.WriteTimeout, httpx.WriteError):
            data = self.protocol.send(event)
            if data:
                async with asyncio.timeout(timeout):
                    await self.stream.write(data)

    async def next_event(self, timeout: float | None) -> h11.Event | type[h11.PAUSED]:
        with _mapped(httpx.ReadTimeout, httpx.ReadError):
            while True:
                event = self.protocol.next_event()
                if event is not h11.NEED_DATA:
                    return event
                async with asyncio.timeout(timeout):
                    data = await self.stream.read()
                self.protocol.receive_data(data)

    async def response_head(self, timeout: float | None) -> h11.Response:
        while True:
            event = await self.next_event(timeout)
            if isinstance(event, h11.Response):
                return event
            if not isinstance(event, h11.InformationalResponse):
                raise httpx.RemoteProtocolError(
                    "the server closed the connection without a response"
                    if isinstance(event, h11.ConnectionClosed) else f"unexpected {event!r}")

    def finished_cleanly(self) -> bool:
        """After a whole response: ready for the next request on this connection."""
        if self.protocol.our_state is h11.DONE and self.protocol.their_state is h11.DONE:
            self.protocol.start_next_cycle()
            self.idle_since = time.monotonic()
            return True
        return False

    def close(self) -> None:
        self.stream.close()


class _ResponseBody(httpx.AsyncByteStream):
    def __init__(self, transport: "Http1Transport", connection: _Connection,
                 read_timeout: float | None):
        self._transport = transport
        self._connection = connection
        self._read_timeout = read_timeout
        self._complete = False
        self._released = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while not self._complete:
            event = await self._connection.next_event(self._read_timeout)
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self._complete = True
            else:
                raise httpx.RemoteProtocolError(
                    "the server closed the connection before the response ended")

    async def aclose(self) -> None:
        if not self._released:
            self._released = True
            reuse = self._complete and self._connection.finished_cleanly()
            self._transport._release(self._connection, reuse)


class Http1Transport(httpx.AsyncBaseTransport):
    """HTTP/1.1 connections for an httpx.AsyncClient (`transport=`).

    `ssl_context` makes the TLS settings for https origins; it is called at the first
    https connection only, so that a client of plain-HTTP registries never loads a
    CA bundle."""

    def __init__(self, ssl_context: Callable[[], ssl.SSLContext], *,
                 max_connections: int = MAX_CONNECTIONS,
                 max_idle_connections: int = MAX_IDLE_CONNECTIONS,
                 idle_seconds: float = IDLE_SECONDS):
        self._make_ssl_context = ssl_context
        self._ssl_context: ssl.SSLContext | None = None
        self._max_idle = max_idle_connections
        self._idle_seconds = idle_seconds
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[_Connection] = []  # oldest first
        self._busy: set[_Connection] = set()
        self._opening: collections.Counter[Origin] = collections.Counter()  # by preconnect
        self._closed = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise RuntimeError("the transport is closed")
        timeouts = request.extensions.get("timeout", {})
        origin = _origin_of(request.url)
        with _mapped(httpx.PoolTimeout, httpx.ConnectError):
            async with asyncio.timeout(timeouts.get("pool")):
                await self._slots.acquire()
        try:
            connection, head = await self._exchange(request, origin, timeouts)
        except BaseException:
            self._slots.release()
            raise
        return httpx.Response(
            status_code=head.status_code, headers=head.headers,
            stream=_ResponseBody(self, connection, timeouts.get("read")),
            extensions={"http_version": b"HTTP/" + head.http_version,
                        "reason_phrase": head.reason})

    async def _exchange(self, request: httpx.Request, origin: Origin,
                        timeouts: dict[str, float | None]
                        ) -> tuple[_Connection, h11.Response]:
        """Send the request and read the response's head, on a kept connection when one
        is open (once more on a new one if a kept one turns out closed)."""
        connection = self._idle_connection(origin)
        while True:
            if connection is None:
                connection = await self._connect(origin, timeouts.get("connect"))
            self._busy.add(connection)
            reused = connection.requests > 0 or connection.opened_ahead
            try:
                await connection.send(request, timeouts.get("write"))
                return connection, await connection.response_head(timeouts.get("read"))
            except BaseException as exc:
                self._busy.discard(connection)
                connection.close()
                # The server may close a kept connection just as a request goes out: not
                # the request's failure (no whole response head came), so once more anew.
                if not (reused and request.method in _REPLAYABLE and isinstance(
                        exc, (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError))):
                    raise
            connection = None

    async def preconnect(self, url: httpx.URL, count: int, timeout: float | None) -> int:
        """Open connections to the URL's origin until `count` of them are idle, for the
        requests about to come: each new connection costs a round trip before its first
        request can go. Returns how many were opened; one that cannot be opened is
        left to the requests (which report it)."""
        origin = _origin_of(url)
        # Those a preconnect under way is opening count too (an index's manifest, then
        # the platform's, each ask for them).
        kept = sum(1 for connection in self._idle if connection.origin == origin) \
            + self._opening[origin]
        wanted = min(count - kept, self._max_idle - len(self._idle) - self._opening.total())
        if wanted <= 0 or self._closed:
            return 0
        self._opening[origin] += wanted
        try:
            opened = await asyncio.gather(*(self._connect(origin, timeout)
                                            for _ in range(wanted)), return_exceptions=True)
        finally:
            self._opening[origin] -= wanted
        added = 0
        for connection in opened:
            if not isinstance(connection, _Connection):
                continue
            if self._closed or len(self._idle) >= self._max_idle:
                connection.close()
                continue
            connection.opened_ahead = True
            connection.idle_since = time.monotonic()
            self._idle.append(connection)
            added += 1
        return added

    def _idle_connection(self, origin: Origin) -> _Connection | None:
        now = time.monotonic()
        for connection in reversed(self._idle.copy()):  # the most recently used first
            if connection.origin != origin:
                continue
            self._idle.remove(connection)
            if connection.reusable and now - connection.idle_since < self._idle_seconds:
                return connection
            connection.close()
        return None

    async def _connect(self, origin: Origin, timeout: float | None) -> _Connection:
        scheme, host, port = origin
        context = None
        if scheme == b"https":
            if self._ssl_context is None:
                self._ssl_context = self._make_ssl_context()
            context = self._ssl_context
        stream = _Stream()
        hostname = host.decode("ascii")
        with _mapped(httpx.ConnectTimeout, httpx.ConnectError):
            async with asyncio.timeout(timeout):
                await asyncio.get_running_loop().create_connection(
                    lambda: stream, hostname, port, ssl=context,
                    server_hostname=hostname if context is not None else None)
        return _Connection(origin, stream)

    def _release(self, connection: _Connection, reuse: bool) -> None:
        self._busy.discard(connection)
        self._slots.release()
        if reuse and not self._closed and connection.reusable:
            self._idle.append(connection)
            now = time.monotonic()
            while self._idle and (len(self._idle) > self._max_idle
                                  or now - self._idle[0].idle_since >= self._idle_seconds):
                self._idle.pop(0).close()
        else:
            connection.close()

    async def aclose(self) -> None:
        self._closed = True
        for connection in [*self._idle, *self._busy]:
            connection.close()
        self._idle.clear()
        self._busy.clear()
