"""The service's HTTP endpoint: /metrics for Prometheus, /healthz and /readyz for probes,
and whatever routes the service adds (the warm set's GET /warm and POST /warm/refresh).

/metrics holds the service's own metrics and those of the FUSE manager, which keeps its
in its own process: their names differ, so the two expositions are simply joined."""

import asyncio
import logging
from collections.abc import Awaitable, Callable

from .metrics import REGISTRY
from .prometheus import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger(__name__)
_MAX_REQUEST_HEAD = 8192
_REASONS = {200: "OK", 202: "Accepted", 400: "Bad Request", 404: "Not Found",
            405: "Method Not Allowed", 500: "Internal Server Error",
            503: "Service Unavailable"}
# (method, path, query string) -> (status, content type, body), or None: not this route.
Route = Callable[[str, str, str], Awaitable[tuple[int, str, bytes] | None]]


class HttpEndpoint:
    def __init__(self, host: str, port: int, ready: Callable[[], tuple[bool, str]],
                 routes: Route | None = None,
                 more_metrics: Callable[[], Awaitable[str]] | None = None):
        self.host, self.port = host, port
        self.ready = ready
        self.routes = routes
        self.more_metrics = more_metrics
        self.server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self.server.sockets[0].getsockname()[1]
        log.info("metrics and probes on http://%s:%d", self.host, self.port)

    async def stop(self) -> None:
        if self.server:
            self.server.close()
            await self.server.wait_closed()

    async def _metrics(self) -> bytes:
        text = generate_latest(REGISTRY)
        if self.more_metrics is not None:
            try:
                text += (await self.more_metrics()).encode()
            except Exception as exc:  # the service's own metrics still count
                log.warning("metrics of the FUSE manager: %s", exc)
        return text

    async def _respond(self, path: str) -> tuple[int, str, bytes]:
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, await self._metrics()
        if path == "/healthz":
            return 200, "text/plain", b"ok\n"
        if path == "/readyz":
            ok, why = self.ready()
            return (200 if ok else 503), "text/plain", (why + "\n").encode()
        return 404, "text/plain", b"not found\n"

    async def _route(self, method: str, path: str, query: str
                     ) -> tuple[int, str, bytes] | None:
        if self.routes is None:
            return None
        try:
            return await self.routes(method, path, query)
        except Exception:
            log.exception("%s %s failed", method, path)
            return 500, "text/plain", b"internal error\n"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
            if len(head) > _MAX_REQUEST_HEAD:
                return
            parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            method, target = (parts[0], parts[1]) if len(parts) >= 2 else ("", "")
            path, _, query = target.partition("?")
            answer = await self._route(method, path, query)
            if answer is None:
                answer = (405, "text/plain", b"method not allowed\n") \
                    if method not in ("GET", "HEAD") else await self._respond(path)
            status, ctype, body = answer
            reason = _REASONS.get(status, "Unknown")
            writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                         f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode())
            if method != "HEAD":
                writer.write(body)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                ConnectionError):
            pass
        finally:
            writer.close()
