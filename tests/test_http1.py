"""oci.http1: the registry client's HTTP/1.1 transport, against servers on 127.0.0.1
that behave as each test needs (kept connections, closes, stalls, cut bodies), and
through httpx.AsyncClient as the registry client uses it. The registry client's own
tests run it against docker-registry, plain and with TLS."""

import asyncio
import ssl
from collections.abc import Awaitable, Callable

import httpx
import pytest

from oci.http1 import Http1Transport

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


def no_tls() -> ssl.SSLContext:
    raise AssertionError("a plain-HTTP client made a TLS context")


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """One request: its request line, headers (lower-case names) and body."""
    head = await reader.readuntil(b"\r\n\r\n")
    line, *fields = head[:-4].split(b"\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (f.split(b":", 1) for f in fields)}
    body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
    return line, headers, body


def response(body: bytes, *extra: bytes) -> bytes:
    return b"\r\n".join([b"HTTP/1.1 200 OK", b"Content-Length: %d" % len(body), *extra,
                         b"", body])


class Server:
    """Serves each connection with `handler(reader, writer, connection number)`."""

    def __init__(self, handler: Handler):
        self.handler = handler
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> "Server":
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(reader, writer, self.connections)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"


def client(**timeouts: float) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=Http1Transport(no_tls),
                             timeout=httpx.Timeout(5.0, **timeouts))


async def keep_serving(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       number: int) -> None:
    while True:
        line, _, body = await read_request(reader)
        writer.write(response(b"%d %s %d" % (number, line.split()[1], len(body))))
        await writer.drain()


def test_requests_share_a_kept_connection() -> None:
    async def main() -> None:
        async with Server(keep_serving) as server, client() as http:
            first = await http.get(server.url + "/a?x=1")
            second = await http.get(server.url + "/b")
            head = await http.head(server.url + "/c")
            assert (first.text, second.text) == ("1 /a?x=1 0", "1 /b 0")
            assert head.status_code == 200 and head.content == b""
            assert first.http_version == "HTTP/1.1" and first.reason_phrase == "OK"
            assert server.connections == 1

    asyncio.run(main())


def test_a_request_body_is_sent_whole_with_flow_control() -> None:
    body = bytes(range(256)) * (32 << 10)  # 8 MiB: more than the socket buffers hold

    async def main() -> None:
        async with Server(keep_serving) as server, client() as http:
            answer = await http.put(server.url + "/upload", content=body)
            assert answer.text == f"1 /upload {len(body)}"

    asyncio.run(main())


def test_a_kept_connection_the_server_closed_is_replaced() -> None:
    async def one_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         number: int) -> None:
        await read_request(reader)
        writer.write(response(b"%d" % number))
        await writer.drain()  # then closes, without saying so in the response

    async def main() -> None:
        async with Server(one_answer) as server, client() as http:
            assert (await http.get(server.url)).text == "1"
            assert (await http.get(server.url)).text == "2"
            await asyncio.sleep(0.05)  # the close has arrived: not even tried
            assert (await http.get(server.url)).text == "3"
            assert server.connections == 3

    asyncio.run(main())


def test_connections_opened_ahead_serve_the_requests_that_follow() -> None:
    """preconnect opens connections until that many are idle; requests side by side
    then use them (no further connection); one the server closed unused is replaced."""
    async def close_the_third(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                              number: int) -> None:
        if number == 3:
            return  # accepted, then closed before any request
        await keep_serving(reader, writer, number)

    async def main() -> None:
        transport = Http1Transport(no_tls)
        async with Server(keep_serving) as server, \
                httpx.AsyncClient(transport=transport, timeout=5.0) as http:
            url = httpx.URL(server.url)
            assert await transport.preconnect(url, 3, 5.0) == 3
            assert await transport.preconnect(url, 3, 5.0) == 0  # 3 idle already
            # Two at once (an index's manifest, then the platform's): 3 in all, not 6.
            while transport._idle:
                transport._idle.pop().close()
            both = await asyncio.gather(*(transport.preconnect(url, 3, 5.0) for _ in "ab"))
            assert sorted(both) == [0, 3] and server.connections == 6
            answers = await asyncio.gather(*(http.get(f"{url}/{i}") for i in range(3)))
            assert sorted(a.text.split()[0] for a in answers) == ["4", "5", "6"]
            assert server.connections == 6
        transport = Http1Transport(no_tls)
        async with Server(close_the_third) as server, \
                httpx.AsyncClient(transport=transport, timeout=5.0) as http:
            assert await transport.preconnect(httpx.URL(server.url), 3, 5.0) == 3
            await asyncio.sleep(0.05)  # the third one's close has arrived
            answers = await asyncio.gather(*(http.get(f"{server.url}/{i}") for i in range(3)))
            assert sorted(a.text.split()[0] for a in answers) == ["1", "2", "4"]

    asyncio.run(main())


def test_a_body_cut_short_is_an_error_and_its_connection_is_dropped() -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                  number: int) -> None:
        while True:
            await read_request(reader)
            if number == 1:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 50)
                await writer.drain()
                return
            writer.write(response(b"whole"))
            await writer.drain()

    async def main() -> None:
        async with Server(cut) as server, client() as http:
            with pytest.raises(httpx.RemoteProtocolError):
                await http.get(server.url)
            assert (await http.get(server.url)).text == "whole"
            assert server.connections == 2

    asyncio.run(main())


def test_a_response_closed_before_its_end_leaves_no_connection_to_reuse() -> None:
    big = b"y" * (4 << 20)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    number: int) -> None:
        while True:
            await read_request(reader)
            writer.write(response(big))
            await writer.drain()

    async def main() -> None:
        async with Server(serve) as server, client() as http:
            async with http.stream("GET", server.url) as answer:
                async for part in answer.aiter_raw():
                    assert part
                    break
            whole = await http.get(server.url)
            assert whole.content == big
            assert server.connections == 2

    asyncio.run(main())


def test_chunked_and_close_delimited_bodies() -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    number: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        await read_request(reader)  # kept: the next request comes on this connection
        writer.write(b"HTTP/1.0 200 OK\r\n\r\nuntil the end")  # ends with the connection
        await writer.drain()

    async def main() -> None:
        async with Server(serve) as server, client() as http:
            assert (await http.get(server.url)).text == "hello world"
            assert (await http.get(server.url)).text == "until the end"
            assert (await http.get(server.url)).text == "hello world"
            assert server.connections == 2

    asyncio.run(main())


def test_timeouts_and_refusals_are_httpx_errors() -> None:
    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    number: int) -> None:
        await read_request(reader)
        if number == 2:  # the head, then nothing
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
            await writer.drain()
        await asyncio.sleep(30)

    async def main() -> None:
        async with Server(stall) as server, client(read=0.3) as http:
            with pytest.raises(httpx.ReadTimeout):
                await http.get(server.url)  # no head at all
            with pytest.raises(httpx.ReadTimeout):
                await http.get(server.url)  # the head, no body
        refused = Server(keep_serving)
        async with refused:
            url = refused.url
        async with client() as http:
            with pytest.raises(httpx.ConnectError):
                await http.get(url)

    asyncio.run(main())


def test_the_pool_waits_for_a_slot_and_times_out() -> None:
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   number: int) -> None:
        await read_request(reader)
        await asyncio.sleep(0.5)
        writer.write(response(b"late"))
        await writer.drain()

    async def main() -> None:
        async with Server(slow) as server:
            transport = Http1Transport(no_tls, max_connections=1)
            async with httpx.AsyncClient(transport=transport,
                                         timeout=httpx.Timeout(5.0, pool=0.1)) as http:
                first = asyncio.create_task(http.get(server.url))
                await asyncio.sleep(0.1)
                with pytest.raises(httpx.PoolTimeout):
                    await http.get(server.url)
                assert (await first).text == "late"

    asyncio.run(main())
