"""The upstream connection pool (gateway/pool.py): keep-alive reuse, what must not be reused,
the one retry on a stale connection, response framing, request bodies, timeouts and closing.

Most tests talk to ``Pool`` directly, against small real servers: raw asyncio servers where the
exact bytes and the moment of each close matter (``RawServer``), aiohttp's server otherwise.
The last ones go through the whole gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence

import pytest
from aiohttp import web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.streams import StreamReader
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from checks import unaccepting_port
from gateway import pool as pool_module
from gateway.testing.embedded import free_port
from gateway.pool import FAILURES, Body, Pool

WAIT = 5.0  # seconds: the bound on anything a test waits for (they all take far less)
CONNECT = 2.0

GatewayFactory = Callable[..., Awaitable["TestClient[web.Request, web.Application]"]]


# --- a raw HTTP/1.1 server: exact bytes, exact closes, every connection and request counted ----


@dataclass
class Req:
    conn: int  # the server-side connection (1, 2, ...) it came on
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    raw_body: bytes = b""  # the body's bytes as framed on the wire

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


class Conn:
    """One accepted connection, handed to the test's script."""

    def __init__(self, number: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 server: RawServer) -> None:
        self.number, self.reader, self.writer, self.server = number, reader, writer, server
        self.eof = asyncio.Event()  # the pool closed its end (the server read EOF)
        self.closed = asyncio.Event()  # the server closed it

    async def head(self) -> Req | None:
        """The next request's line and headers (recorded); None when the pool closed."""
        try:
            data = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            if isinstance(exc, asyncio.IncompleteReadError):
                assert not exc.partial, f"truncated request head {exc.partial!r}"
            self.eof.set()
            return None
        line, *lines = data[:-4].decode("latin-1").split("\r\n")
        method, target, version = line.split(" ")
        assert version == "HTTP/1.1", line
        headers = [(k.strip(), v.strip()) for k, _, v in (h.partition(":") for h in lines)]
        req = Req(self.number, method, target, headers)
        self.server.requests.append(req)
        return req

    async def body(self, req: Req) -> None:
        """Read the body ``req``'s framing announces."""
        if any("chunked" in v.lower() for v in req.header("Transfer-Encoding")):
            raw, body = bytearray(), bytearray()
            while True:
                size_line = await self.reader.readuntil(b"\r\n")
                raw += size_line
                size = int(size_line.split(b";")[0], 16)
                chunk = await self.reader.readexactly(size + 2)
                raw += chunk
                body += chunk[:-2]
                if size == 0:
                    break
            req.raw_body, req.body = bytes(raw), bytes(body)
        elif req.header("Content-Length"):
            req.body = req.raw_body = await self.reader.readexactly(
                int(req.header("Content-Length")[0]))

    async def request(self) -> Req | None:
        req = await self.head()
        if req is not None:
            await self.body(req)
        return req

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def until_eof(self) -> None:
        """Discard whatever else comes until the pool closes the connection."""
        with contextlib.suppress(ConnectionError):
            while await self.reader.read(65536):
                pass
        self.eof.set()


Script = Callable[[Conn], Awaitable[None]]


class RawServer:
    """Runs ``script`` on every accepted connection, then closes it."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.conns: list[Conn] = []
        self.requests: list[Req] = []
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[Any]] = set()
        self.broken: list[BaseException] = []

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    @property
    def origin(self) -> URL:
        return URL(f"http://127.0.0.1:{self.port}")

    def seen(self) -> list[tuple[int, str, str]]:
        """(connection, method, target) of every request, in order."""
        return [(r.conn, r.method, r.target) for r in self.requests]

    async def start(self, host: str = "127.0.0.1") -> RawServer:
        self.server = await asyncio.start_server(self._serve, host, 0)
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        conn = Conn(len(self.conns) + 1, reader, writer, self)
        self.conns.append(conn)
        try:
            await self.script(conn)
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            self.broken.append(exc)  # the pool closed or reset the connection mid-request
            conn.eof.set()
        finally:
            writer.close()
            conn.closed.set()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for conn in self.conns:
            conn.writer.close()  # its script reads EOF and ends
        if self.tasks:
            _, pending = await asyncio.wait(self.tasks, timeout=WAIT)
            assert not pending, "a connection's script did not end"


def reply(status: int = 200, body: bytes = b"", headers: Sequence[str] = (), *,
          version: str = "HTTP/1.1", length: bool = True, reason: str = "Whatever") -> bytes:
    """A response's bytes: these header lines verbatim, plus Content-Length when ``length``."""
    lines = [f"{version} {status} {reason}", *headers]
    if length:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def keep_alive(respond: Callable[[Req], bytes]) -> Script:
    """Answer every request on the connection with ``respond(request)``, until the pool closes."""
    async def script(conn: Conn) -> None:
        while (req := await conn.request()) is not None:
            conn.send(respond(req))
    return script


def echo_target(req: Req) -> bytes:
    body = f"{req.method} {req.target} on {req.conn}".encode()
    if req.method == "HEAD":  # the length a GET would get, and no body
        return reply(headers=[f"Content-Length: {len(body)}"], length=False)
    return reply(body=body)


RawFactory = Callable[[Script], Awaitable[RawServer]]


@pytest.fixture
async def raw_server() -> AsyncIterator[RawFactory]:
    servers: list[RawServer] = []

    async def make(script: Script) -> RawServer:
        server = await RawServer(script).start()
        servers.append(server)
        return server
    yield make
    for server in servers:
        await server.close()


@pytest.fixture
async def pool() -> AsyncIterator[Pool]:
    p = Pool()
    yield p
    await p.close()


# --- talking to the pool ---------------------------------------------------------------------


@dataclass
class Result:
    status: int
    reason: str
    headers: CIMultiDictProxy[str]
    body: bytes
    content_length: int | None


async def fetch(p: Pool, origin: URL, method: str = "GET", target: str = "/",
                headers: Mapping[str, str] | None = None, body: Body = None,
                connect_timeout: float = CONNECT) -> Result:
    """One whole exchange as the proxy does it: send, read the body, release."""
    async with asyncio.timeout(WAIT):
        exchange = await p.send(origin, method, target, CIMultiDict(headers or {}), body,
                                connect_timeout)
        try:
            data = await exchange.read()
        finally:
            exchange.release()
    return Result(exchange.status, exchange.reason, exchange.headers, data,
                  exchange.content_length)


class _Client(BaseProtocol):
    """Stands for the gateway's client connection a streamed body comes from."""

    @property
    def connected(self) -> bool:
        return True  # a StreamReader only waits for data from a connected protocol


def stream(*chunks: bytes, eof: bool = True) -> StreamReader:
    """A request body as the proxy passes a large one on: an aiohttp StreamReader, fed here."""
    loop = asyncio.get_running_loop()
    # A limit far above what the tests feed: flow control never pauses the stand-in client.
    body = StreamReader(_Client(loop), 1 << 26, loop=loop)
    for chunk in chunks:
        body.feed_data(chunk)
    if eof:
        body.feed_eof()
    return body


async def wait_for(event: asyncio.Event, timeout: float = WAIT) -> None:
    await asyncio.wait_for(event.wait(), timeout)


@contextlib.contextmanager
def raises_failure() -> Iterator[pytest.ExceptionInfo[BaseException]]:
    """One of pool.FAILURES, and not a timeout: TimeoutError is an OSError, so a hang cut
    short by a test's own timeout would match FAILURES too."""
    with pytest.raises(FAILURES) as caught:
        yield caught
    assert not isinstance(caught.value, TimeoutError), "timed out instead of failing"


# --- keep-alive reuse ------------------------------------------------------------------------


async def test_sequential_exchanges_of_every_kind_share_one_connection(
        pool: Pool, aiohttp_server: Any) -> None:
    ports: list[int] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        ports.append(request.transport.get_extra_info("peername")[1])
        body = await request.read()
        if request.path == "/empty":
            return web.Response(status=204)
        return web.Response(body=b"got:" + body)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    server: TestServer = await aiohttp_server(app)
    origin = URL(f"http://127.0.0.1:{server.port}")

    for i in range(5):
        assert (await fetch(pool, origin, target=f"/get/{i}")).body == b"got:"
    assert (await fetch(pool, origin, "POST", "/post", {"Content-Length": "5"},
                        b"small")).body == b"got:small"
    assert (await fetch(pool, origin, "PUT", "/stream", {},
                        stream(b"streamed ", b"body"))).body == b"got:streamed body"
    head = await fetch(pool, origin, "HEAD", "/head")
    assert (head.status, head.body, head.content_length) == (200, b"", 4)
    assert (await fetch(pool, origin, target="/empty")).status == 204
    assert (await fetch(pool, origin, target="/last")).body == b"got:"
    assert len(ports) == 10
    assert len(set(ports)) == 1, ports


async def test_sequential_requests_reuse_one_raw_connection(
        pool: Pool, raw_server: RawFactory) -> None:
    server = await raw_server(keep_alive(echo_target))
    for i in range(8):
        result = await fetch(pool, server.origin, target=f"/r{i}")
        assert result.body == f"GET /r{i} on 1".encode()
    assert len(server.conns) == 1
    assert [r.conn for r in server.requests] == [1] * 8


async def test_concurrent_exchanges_take_separate_connections_then_reuse_them(
        pool: Pool, raw_server: RawFactory) -> None:
    n = 5
    all_in = asyncio.Event()

    async def script(conn: Conn) -> None:
        while (req := await conn.request()) is not None:
            if len(server.requests) == n:
                all_in.set()
            # Nobody is answered before all n arrived: each needs a connection of its own.
            await wait_for(all_in)
            conn.send(echo_target(req))

    server = await raw_server(script)
    for round_ in range(3):
        results = await asyncio.gather(*(
            fetch(pool, server.origin, target=f"/{round_}/{i}") for i in range(n)))
        assert [r.body.decode().split(" on ")[0] for r in results] == \
            [f"GET /{round_}/{i}" for i in range(n)]
    assert len(server.conns) == n  # the 2nd and 3rd batches went over the 1st's connections
    assert sorted(r.conn for r in server.requests[n:]) == sorted(list(range(1, n + 1)) * 2)


async def test_large_answer_read_slowly_is_intact_and_reused(
        pool: Pool, aiohttp_server: Any) -> None:
    # Far more than the connection buffers: reading must pause and resume, and end resumed.
    size = 8 * 1024 * 1024
    block = bytes(range(256)) * 256
    ports: list[int] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        ports.append(request.transport.get_extra_info("peername")[1])
        response = web.StreamResponse()
        response.content_length = size
        await response.prepare(request)
        for _ in range(size // len(block)):
            await response.write(block)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/", handler)
    server: TestServer = await aiohttp_server(app)
    origin = URL(f"http://127.0.0.1:{server.port}")
    for _ in range(2):
        async with asyncio.timeout(WAIT):
            exchange = await pool.send(origin, "GET", "/", CIMultiDict(), None, CONNECT)
            received = bytearray()
            while chunk := await exchange.body.read(pool_module.CHUNK):
                received += chunk
                if len(received) % (1 << 20) < len(chunk):
                    await asyncio.sleep(0.005)  # a slow client, now and then
            exchange.release()
        assert received == block * (size // len(block))
    assert len(ports) == 2 and len(set(ports)) == 1, ports


# --- what must not go back to the pool --------------------------------------------------------


@pytest.mark.parametrize(("version", "headers", "reused"), [
    ("HTTP/1.1", ["Connection: close"], False),
    ("HTTP/1.1", ["Connection: Keep-Alive, close"], False),
    ("HTTP/1.0", [], False),
    ("HTTP/1.0", ["Connection: keep-alive"], True),  # 1.0 keep-alive is honoured
])
async def test_connection_close_and_http10_answers_are_not_reused(
        pool: Pool, raw_server: RawFactory, version: str, headers: list[str],
        reused: bool) -> None:
    # The server keeps the connection open whatever it said: only the pool's own reading of
    # the answer decides whether the next request goes over it again.
    server = await raw_server(keep_alive(
        lambda req: reply(body=f"on {req.conn}".encode(), headers=headers, version=version)))
    assert (await fetch(pool, server.origin, target="/one")).body == b"on 1"
    second = await fetch(pool, server.origin, target="/two")
    if reused:
        assert second.body == b"on 1"
        assert len(server.conns) == 1
    else:
        assert second.body == b"on 2"
        assert len(server.conns) == 2
        await wait_for(server.conns[0].eof)  # and the pool closed the first one


async def test_unfinished_body_is_not_reused(pool: Pool, raw_server: RawFactory) -> None:
    async def script(conn: Conn) -> None:
        while (req := await conn.request()) is not None:
            if req.target == "/partial":  # 10 of the 100 bytes announced, the rest not yet
                conn.send(reply(headers=["Content-Length: 100"], length=False) + b"x" * 10)
            else:
                conn.send(echo_target(req))

    server = await raw_server(script)
    async with asyncio.timeout(WAIT):
        exchange = await pool.send(server.origin, "GET", "/partial", CIMultiDict(), None,
                                   CONNECT)
        assert await exchange.body.read(10) == b"x" * 10
        exchange.release()  # mid-body: the connection cannot carry another request
    await wait_for(server.conns[0].eof)
    assert (await fetch(pool, server.origin)).body == b"GET / on 2"
    assert len(server.conns) == 2


@pytest.mark.parametrize("close", [True, False])
async def test_unsolicited_answer_on_an_idle_connection_is_not_taken_for_the_next_one(
        pool: Pool, raw_server: RawFactory, close: bool) -> None:
    # Some servers send "408 Request Timeout" on a keep-alive connection they are about to
    # close for idleness (Go's client ignores such a 408 on an idle connection, golang/go#32310).
    # If the pool takes the connection between the 408's bytes and the close, or if the upstream
    # does not close at all, the 408 must still not become the next request's answer. (With
    # close=False, a pool checking only is_connected() and age in _take() would give /b the 408
    # and /c the answer meant for /b: every later exchange on the connection one response
    # behind.)
    sent = asyncio.Event()

    async def script(conn: Conn) -> None:
        first = await conn.request()
        if first is None:
            return
        conn.send(echo_target(first))
        if conn.number == 1:
            await asyncio.sleep(0.02)
            conn.send(reply(408, b"idle too long", ["Connection: close"] if close else []))
            await conn.writer.drain()
            sent.set()
            if close:
                return
        while (req := await conn.request()) is not None:
            conn.send(echo_target(req))

    server = await raw_server(script)
    assert (await fetch(pool, server.origin, target="/a")).body == b"GET /a on 1"
    await wait_for(sent)
    await asyncio.sleep(0.1)  # the 408 reached the pooled connection's parser
    b = await fetch(pool, server.origin, target="/b")
    assert (b.status, b.body) == (200, b"GET /b on 2")
    c = await fetch(pool, server.origin, target="/c")
    assert (c.status, c.body) == (200, b"GET /c on 2")


# --- stale pooled connections: the one retry --------------------------------------------------


def close_on_second_request(answer: Callable[[Req], bytes]) -> Script:
    """Answer the connection's first request; read the second in full, then close without a
    word, as an upstream whose idle timeout fires just as the request arrives."""
    async def script(conn: Conn) -> None:
        first = await conn.request()
        if first is None:
            return
        conn.send(answer(first))
        await conn.request()
    return script


@pytest.mark.parametrize(("method", "body"), [
    ("GET", None), ("HEAD", None), ("DELETE", None), ("PUT", b"replayable"),
    ("OPTIONS", None)])
async def test_idempotent_request_on_stale_connection_is_sent_again_on_a_fresh_one(
        pool: Pool, raw_server: RawFactory, method: str, body: bytes | None) -> None:
    server = await raw_server(close_on_second_request(echo_target))
    assert (await fetch(pool, server.origin, target="/warm")).body == b"GET /warm on 1"
    headers = {"Content-Length": str(len(body))} if body else {}
    result = await fetch(pool, server.origin, method, "/again", headers, body)
    assert result.status == 200
    if method != "HEAD":
        assert result.body == f"{method} /again on 2".encode()
    # Seen twice: once on the stale connection (closed unanswered), once on a fresh one.
    assert server.seen() == [(1, "GET", "/warm"), (1, method, "/again"), (2, method, "/again")]
    if body:
        assert [r.body for r in server.requests[1:]] == [body, body]


@pytest.mark.parametrize(("method", "streamed"), [
    ("POST", False), ("POST", True), ("PATCH", False),
    ("PUT", True),  # idempotent, but a stream cannot be sent twice
])
async def test_unreplayable_request_on_stale_connection_fails_without_retry(
        pool: Pool, raw_server: RawFactory, method: str, streamed: bool) -> None:
    server = await raw_server(close_on_second_request(echo_target))
    await fetch(pool, server.origin, target="/warm")
    body: Body = stream(b"once ", b"only") if streamed else b"once only"
    headers = {} if streamed else {"Content-Length": "9"}
    with raises_failure():
        await fetch(pool, server.origin, method, "/upload", headers, body)
    assert server.seen() == [(1, "GET", "/warm"), (1, method, "/upload")]
    assert server.requests[1].body == b"once only"
    assert len(server.conns) == 1
    # The pool is fine afterwards: the next request gets a fresh connection.
    assert (await fetch(pool, server.origin, target="/after")).body == b"GET /after on 2"


async def test_upstream_closing_idle_connections_after_each_answer(
        pool: Pool, raw_server: RawFactory) -> None:
    # Closes after every response, without saying so (no Connection: close).
    async def script(conn: Conn) -> None:
        req = await conn.request()
        if req is not None:
            conn.send(echo_target(req))
            conn.writer.write_eof()
            await conn.until_eof()  # the pool saw the close, and closed its end too

    server = await raw_server(script)
    for i in range(4):
        assert (await fetch(pool, server.origin, target=f"/{i}")).body == \
            f"GET /{i} on {i + 1}".encode()
        await wait_for(server.conns[i].eof)  # before the next request is made
    assert server.seen() == [(i + 1, "GET", f"/{i}") for i in range(4)]


async def test_fresh_connection_failing_is_not_retried(
        pool: Pool, raw_server: RawFactory) -> None:
    async def script(conn: Conn) -> None:
        await conn.request()  # and close unanswered

    server = await raw_server(script)
    with raises_failure():
        await fetch(pool, server.origin, target="/x")
    assert server.seen() == [(1, "GET", "/x")]


async def test_most_recently_used_connection_is_taken_first(
        pool: Pool, raw_server: RawFactory) -> None:
    both_in = asyncio.Event()

    async def script(conn: Conn) -> None:
        while (req := await conn.request()) is not None:
            if len(server.requests) == 2:
                both_in.set()
            await wait_for(both_in)  # the first two need a connection each
            conn.send(echo_target(req))

    server = await raw_server(script)
    async with asyncio.timeout(WAIT):
        first, second = await asyncio.gather(*(
            pool.send(server.origin, "GET", f"/{i}", CIMultiDict(), None, CONNECT)
            for i in range(2)))
        bodies = [await first.read(), await second.read()]
        conns = [int(b.split(b" on ")[1]) for b in bodies]
        assert sorted(conns) == [1, 2]
        first.release()
        second.release()  # the most recently used: the oldest may expire, this one goes on
    assert (await fetch(pool, server.origin, target="/next")).body == \
        f"GET /next on {conns[1]}".encode()


async def test_one_stale_connection_drops_the_origins_other_idle_ones(
        pool: Pool, raw_server: RawFactory) -> None:
    # An upstream restart makes every idle connection stale: after the first one fails, the
    # request goes to a fresh connection, not to the next stale one.
    both_in = asyncio.Event()

    async def script(conn: Conn) -> None:
        if conn.number > 2:
            return await keep_alive(echo_target)(conn)
        first = await conn.request()
        if first is None:
            return
        if len(server.requests) == 2:
            both_in.set()
        await wait_for(both_in)
        conn.send(echo_target(first))
        await conn.request()  # and close unanswered, as after a restart

    server = await raw_server(script)
    await asyncio.gather(*(fetch(pool, server.origin, target=f"/warm{i}") for i in range(2)))
    assert len(server.conns) == 2
    result = await fetch(pool, server.origin, target="/again")
    assert result.body == b"GET /again on 3"
    assert [(c, t) for c, _, t in server.seen()[2:]] == [(2, "/again"), (3, "/again")] or \
        [(c, t) for c, _, t in server.seen()[2:]] == [(1, "/again"), (3, "/again")]
    await wait_for(server.conns[0].closed)  # the other idle one is closed too
    await wait_for(server.conns[1].closed)


# --- response framing ------------------------------------------------------------------------


async def test_head_answer_with_content_length_has_no_body_and_is_reused(
        pool: Pool, raw_server: RawFactory) -> None:
    def respond(req: Req) -> bytes:
        if req.method == "HEAD":  # the length of the body a GET would get, and no body
            return reply(headers=["Content-Length: 12345"], length=False)
        return reply(body=b"after head")

    server = await raw_server(keep_alive(respond))
    head = await fetch(pool, server.origin, "HEAD", "/")
    assert (head.status, head.body, head.content_length) == (200, b"", 12345)
    assert (await fetch(pool, server.origin)).body == b"after head"
    assert len(server.conns) == 1


@pytest.mark.parametrize(("status", "headers"), [
    (204, []), (304, ["Content-Length: 10", "ETag: \"v1\""])])
async def test_bodiless_status_is_empty_and_reused(
        pool: Pool, raw_server: RawFactory, status: int, headers: list[str]) -> None:
    def respond(req: Req) -> bytes:
        if req.target == "/empty":
            return reply(status, headers=headers, length=False)
        return reply(body=b"next")

    server = await raw_server(keep_alive(respond))
    result = await fetch(pool, server.origin, target="/empty")
    assert (result.status, result.body) == (status, b"")
    assert (await fetch(pool, server.origin)).body == b"next"
    assert len(server.conns) == 1


async def test_chunked_answer_is_read_intact_and_reused(
        pool: Pool, raw_server: RawFactory) -> None:
    big = bytes(range(256)) * 1000

    def respond(req: Req) -> bytes:
        if req.target != "/chunked":
            return reply(body=b"next")
        parts = [b"hello ", b"chunked;ext ", big, b" world"]
        body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts)
        return reply(headers=["Transfer-Encoding: chunked"], length=False,
                     body=body + b"0\r\nX-Trailer: t\r\n\r\n")

    server = await raw_server(keep_alive(respond))
    result = await fetch(pool, server.origin, target="/chunked")
    assert result.body == b"hello chunked;ext " + big + b" world"
    assert result.content_length is None
    assert (await fetch(pool, server.origin)).body == b"next"
    assert len(server.conns) == 1


async def test_answer_delimited_by_close_is_read_intact_and_not_reused(
        pool: Pool, raw_server: RawFactory) -> None:
    big = b"0123456789" * 30000

    async def script(conn: Conn) -> None:
        req = await conn.request()
        if req is None:
            return
        # No Content-Length, not chunked, no Connection: close: the body ends with the connection.
        conn.send(reply(body=b"until close:", length=False))
        await conn.writer.drain()
        await asyncio.sleep(0.01)  # the rest in a separate write
        conn.send(big + f" on {conn.number}".encode())
        await conn.writer.drain()

    server = await raw_server(script)
    first = await fetch(pool, server.origin)
    assert first.body == b"until close:" + big + b" on 1"
    assert first.content_length is None
    assert (await fetch(pool, server.origin)).body == b"until close:" + big + b" on 2"
    assert len(server.conns) == 2


@pytest.mark.parametrize("apart", [False, True])
@pytest.mark.parametrize("interim", [
    ["HTTP/1.1 103 Early Hints\r\nLink: </app.css>; rel=preload\r\n\r\n"],
    ["HTTP/1.1 100 Continue\r\n\r\n"],
    ["HTTP/1.1 100 Continue\r\n\r\n", "HTTP/1.1 103 Early Hints\r\nLink: </a.js>\r\n\r\n"],
])
async def test_interim_1xx_answers_are_skipped(
        pool: Pool, raw_server: RawFactory, interim: list[str], apart: bool) -> None:
    async def script(conn: Conn) -> None:
        while (req := await conn.request()) is not None:
            if req.target == "/hints":
                for message in interim:
                    conn.send(message.encode())
                    if apart:
                        await conn.writer.drain()
                        await asyncio.sleep(0.01)
            conn.send(reply(body=f"final {req.target}".encode(), headers=["X-Final: yes"]))

    server = await raw_server(script)
    result = await fetch(pool, server.origin, target="/hints")
    assert (result.status, result.body) == (200, b"final /hints")
    assert result.headers["X-Final"] == "yes"
    assert "Link" not in result.headers  # the final answer's headers, not the hints'
    assert (await fetch(pool, server.origin, target="/next")).body == b"final /next"
    assert len(server.conns) == 1


@pytest.mark.parametrize("garbage", [
    b"garbage\r\n\r\n", b"HTTP/1.1 abc OK\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nX-Huge: " + b"h" * 20_000 + b"\r\nContent-Length: 0\r\n\r\n"])
async def test_malformed_answer_raises_a_failure(
        pool: Pool, raw_server: RawFactory, garbage: bytes) -> None:
    async def script(conn: Conn) -> None:
        await conn.request()
        conn.send(garbage)
        await conn.until_eof()

    server = await raw_server(script)
    with raises_failure():
        await fetch(pool, server.origin)
    await wait_for(server.conns[0].eof)  # the broken connection is closed, not pooled
    assert len(server.requests) == 1


async def test_malformed_answer_on_a_reused_connection_is_not_sent_again(
        pool: Pool, raw_server: RawFactory) -> None:
    # The upstream did receive the request: only a connection closed under us is retried.
    async def script(conn: Conn) -> None:
        first = await conn.request()
        if first is None:
            return
        conn.send(reply(body=b"fine"))
        if await conn.request() is not None:
            conn.send(b"NOT HTTP AT ALL\r\n\r\n")
            await conn.until_eof()

    server = await raw_server(script)
    assert (await fetch(pool, server.origin, target="/a")).body == b"fine"
    with raises_failure():
        await fetch(pool, server.origin, target="/b")
    assert server.seen() == [(1, "GET", "/a"), (1, "GET", "/b")]


# --- request bodies and headers ---------------------------------------------------------------


async def test_streamed_body_without_length_goes_out_chunked(
        pool: Pool, raw_server: RawFactory) -> None:
    server = await raw_server(keep_alive(lambda req: reply(body=b"%d" % len(req.body))))
    parts = [bytes([i]) * (70_000 + i) for i in range(5)]
    body = stream(parts[0], eof=False)

    async def feed_rest() -> None:  # the rest arrives while the exchange is under way
        for part in parts[1:]:
            await asyncio.sleep(0.005)
            body.feed_data(part)
        body.feed_eof()

    feeder = asyncio.ensure_future(feed_rest())
    result = await fetch(pool, server.origin, "POST", "/up", {"X-Other": "1"}, body)
    await feeder
    assert result.body == b"%d" % sum(map(len, parts))
    seen = server.requests[0]
    assert seen.header("Transfer-Encoding") == ["chunked"]
    assert seen.header("Content-Length") == []
    assert seen.header("X-Other") == ["1"]
    assert seen.body == b"".join(parts)
    assert seen.raw_body.endswith(b"0\r\n\r\n")
    # Reused afterwards: the chunked body was terminated properly.
    await fetch(pool, server.origin)
    assert len(server.conns) == 1


async def test_streamed_body_with_length_goes_out_as_is(
        pool: Pool, raw_server: RawFactory) -> None:
    server = await raw_server(keep_alive(lambda req: reply(body=b"%d" % len(req.body))))
    data = b"abcdefghij" * 20_000
    result = await fetch(pool, server.origin, "PUT", "/up",
                         {"Content-Length": str(len(data))}, stream(data[:1000], data[1000:]))
    assert result.body == b"%d" % len(data)
    seen = server.requests[0]
    assert seen.header("Transfer-Encoding") == []
    assert seen.header("Content-Length") == [str(len(data))]
    assert seen.raw_body == data
    await fetch(pool, server.origin)
    assert len(server.conns) == 1


async def test_small_body_goes_out_as_given(pool: Pool, raw_server: RawFactory) -> None:
    server = await raw_server(keep_alive(lambda req: reply(body=b"ok")))
    await fetch(pool, server.origin, "POST", "/small?x=1", {"Content-Length": "11"},
                b"hello world")
    seen = server.requests[0]
    assert (seen.method, seen.target, seen.body) == ("POST", "/small?x=1", b"hello world")
    assert seen.header("Transfer-Encoding") == []


async def test_bytes_body_without_length_gets_one(pool: Pool, raw_server: RawFactory) -> None:
    server = await raw_server(keep_alive(lambda req: reply(body=b"ok")))
    await fetch(pool, server.origin, "POST", "/small", {}, b"twelve bytes")
    seen = server.requests[0]
    assert seen.header("Content-Length") == ["12"]
    assert seen.body == b"twelve bytes"


async def test_host_is_set_from_the_origin_when_absent(
        pool: Pool, raw_server: RawFactory) -> None:
    server = await raw_server(keep_alive(lambda req: reply()))
    await fetch(pool, server.origin)
    await fetch(pool, URL(f"http://localhost:{server.port}"))
    assert [r.header("Host") for r in server.requests] == [
        [f"127.0.0.1:{server.port}"], [f"localhost:{server.port}"]]


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback")
async def test_host_of_an_ipv6_origin_is_bracketed(pool: Pool) -> None:
    server = await RawServer(keep_alive(lambda req: reply())).start("::1")
    try:
        await fetch(pool, URL(f"http://[::1]:{server.port}"))
        assert server.requests[0].header("Host") == [f"[::1]:{server.port}"]
    finally:
        await server.close()


async def test_host_given_is_kept(pool: Pool, raw_server: RawFactory) -> None:
    server = await raw_server(keep_alive(lambda req: reply()))
    await fetch(pool, server.origin, headers={"host": "api.example.test"})
    assert server.requests[0].header("Host") == ["api.example.test"]


# --- connecting -------------------------------------------------------------------------------


async def test_connecting_to_a_closed_port_raises_oserror(pool: Pool) -> None:
    with raises_failure() as caught:
        await fetch(pool, URL(f"http://127.0.0.1:{free_port()}"))
    assert isinstance(caught.value, OSError)


async def test_connect_timeout_raises_timeout_error(pool: Pool) -> None:
    with unaccepting_port() as port:
        with pytest.raises(TimeoutError):  # the trick works on this machine
            await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 0.3)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await pool.send(URL(f"http://127.0.0.1:{port}"), "GET", "/", CIMultiDict(), None,
                            0.3)
        assert 0.25 <= time.monotonic() - started < 1.5


# --- idle lifetime and closing ----------------------------------------------------------------


async def test_idle_connection_older_than_keepalive_is_not_reused(
        pool: Pool, raw_server: RawFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    server = await raw_server(keep_alive(echo_target))
    monkeypatch.setattr(pool_module, "KEEPALIVE", 60.0)  # the sweeper stays far away
    assert (await fetch(pool, server.origin)).body == b"GET / on 1"
    assert (await fetch(pool, server.origin)).body == b"GET / on 1"  # young: reused
    monkeypatch.setattr(pool_module, "KEEPALIVE", 0.2)
    await asyncio.sleep(0.25)
    assert not server.conns[0].eof.is_set()  # still open: only the reuse check can refuse it
    assert (await fetch(pool, server.origin)).body == b"GET / on 2"
    await wait_for(server.conns[0].eof)  # and it was closed, not left behind


async def test_sweeper_closes_connections_idle_for_keepalive(
        pool: Pool, raw_server: RawFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pool_module, "KEEPALIVE", 0.2)
    server = await raw_server(keep_alive(echo_target))
    await fetch(pool, server.origin)
    released = time.monotonic()
    await wait_for(server.conns[0].eof, 2.0)
    # Closed by the sweeper, KEEPALIVE after release at the earliest (at most twice that).
    assert 0.18 <= time.monotonic() - released < 1.0
    assert (await fetch(pool, server.origin)).body == b"GET / on 2"
    # And it keeps sweeping: the second connection goes the same way.
    await wait_for(server.conns[1].eof, 2.0)


async def test_close_closes_idle_connections(raw_server: RawFactory) -> None:
    server = await raw_server(keep_alive(echo_target))
    other = await raw_server(keep_alive(echo_target))
    p = Pool()
    await fetch(p, server.origin)
    await fetch(p, other.origin)
    assert not server.conns[0].eof.is_set()
    await p.close()
    await wait_for(server.conns[0].eof)
    await wait_for(other.conns[0].eof)


async def test_exchange_released_after_close_is_not_pooled(raw_server: RawFactory) -> None:
    server = await raw_server(keep_alive(echo_target))
    p = Pool()
    async with asyncio.timeout(WAIT):
        exchange = await p.send(server.origin, "GET", "/late", CIMultiDict(), None, CONNECT)
        assert await exchange.read() == b"GET /late on 1"
        await p.close()
        exchange.release()  # an exchange that outlived its pool: closed, not kept
    await wait_for(server.conns[0].eof)


# --- early answers to streamed uploads --------------------------------------------------------


@pytest.mark.parametrize("close", [True, False])
async def test_early_answer_to_streamed_upload_is_relayed_and_connection_dropped(
        pool: Pool, raw_server: RawFactory, close: bool) -> None:
    answered = asyncio.Event()

    async def script(conn: Conn) -> None:
        req = await conn.head()
        if req is None:
            return
        if req.target != "/upload":
            await conn.body(req)
            conn.send(reply(body=f"on {conn.number}".encode()))
            await conn.until_eof()
            return
        # Refuse at once, without reading the body the pool is still sending.
        headers = ["Connection: close"] if close else []
        conn.send(reply(413, b"too large", headers))
        await conn.writer.drain()
        answered.set()
        if not close:
            await conn.until_eof()  # left open: only the pool can decide not to reuse it

    server = await raw_server(script)
    body = stream(b"u" * 256 * 1024, eof=False)  # the rest of the upload never comes
    async with asyncio.timeout(WAIT):
        exchange = await pool.send(server.origin, "POST", "/upload", CIMultiDict(), body,
                                   CONNECT)
        assert exchange.status == 413
        assert await exchange.read() == b"too large"
        exchange.release()
    assert answered.is_set()
    # Closed: by the server itself, or else (left open) by the pool's release().
    await wait_for(server.conns[0].closed if close else server.conns[0].eof)
    assert (await fetch(pool, server.origin, target="/next")).body == b"on 2"
    assert len(server.conns) == 2


async def test_request_body_breaking_off_fails_the_exchange_at_once(
        pool: Pool, raw_server: RawFactory) -> None:
    got_head = asyncio.Event()

    async def script(conn: Conn) -> None:
        await conn.head()
        got_head.set()
        await conn.until_eof()  # waits for a body that will never be complete

    server = await raw_server(script)
    body = stream(b"partial", eof=False)
    sending = asyncio.ensure_future(
        pool.send(server.origin, "POST", "/upload", CIMultiDict(), body, CONNECT))
    await wait_for(got_head)
    body.set_exception(ConnectionResetError("the client went away"))
    with raises_failure():
        await asyncio.wait_for(sending, 1.0)  # now, not at the caller's timeout
    await wait_for(server.conns[0].eof)


async def test_upstream_closing_mid_upload_fails_and_stops_reading_the_body(
        pool: Pool, raw_server: RawFactory) -> None:
    async def script(conn: Conn) -> None:
        await conn.head()  # and close, without reading the body or answering

    server = await raw_server(script)
    body = stream(b"u" * 100_000, eof=False)
    with raises_failure():
        async with asyncio.timeout(WAIT):
            await pool.send(server.origin, "POST", "/upload", CIMultiDict(), body, CONNECT)
    # The exchange is over: nothing keeps consuming the client's body.
    body.feed_data(b"more")
    await asyncio.sleep(0.05)
    assert body.read_nowait() == b"more"


# --- through the gateway ----------------------------------------------------------------------


async def test_gateway_reuses_one_upstream_connection(
        make_gateway: GatewayFactory, aiohttp_server: Any) -> None:
    ports: list[int] = []

    async def handler(request: web.Request) -> web.Response:
        assert request.transport is not None
        ports.append(request.transport.get_extra_info("peername")[1])
        return web.Response(text=f"{request.method} {request.path} {len(await request.read())}")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    server: TestServer = await aiohttp_server(app)
    client = await make_gateway(routes=[
        {"path": "/pooled/", "upstream": f"http://127.0.0.1:{server.port}", "auth": "public",
         "timeout": "2s"}])
    for i in range(20):
        if i % 4 == 3:
            resp = await client.post(f"/pooled/{i}", data=b"x" * i)
            assert await resp.text() == f"POST /pooled/{i} {i}"
        else:
            resp = await client.get(f"/pooled/{i}")
            assert await resp.text() == f"GET /pooled/{i} 0"
        assert resp.status == 200
    assert len(ports) == 20
    assert len(set(ports)) == 1, ports


async def test_gateway_through_upstream_answering_connection_close(
        make_gateway: GatewayFactory, aiohttp_server: Any) -> None:
    ports: list[int] = []

    async def handler(request: web.Request) -> web.Response:
        assert request.transport is not None
        ports.append(request.transport.get_extra_info("peername")[1])
        response = web.Response(text=request.path)
        response.force_close()  # Connection: close, and closes
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    server: TestServer = await aiohttp_server(app)
    client = await make_gateway(routes=[
        {"path": "/closing/", "upstream": f"http://127.0.0.1:{server.port}", "auth": "public",
         "timeout": "2s"}])
    for i in range(8):
        resp = await client.get(f"/closing/{i}")
        assert resp.status == 200
        assert await resp.text() == f"/closing/{i}"
    assert len(set(ports)) == 8  # a new connection each time


async def test_gateway_retries_gets_on_connections_the_upstream_dropped(
        make_gateway: GatewayFactory, raw_server: RawFactory) -> None:
    # Every connection answers one request and drops the next one unanswered: each request
    # after the first meets a stale connection and must be sent again on a fresh one.
    server = await raw_server(close_on_second_request(echo_target))
    client = await make_gateway(routes=[
        {"path": "/flaky/", "upstream": str(server.origin), "auth": "public", "timeout": "2s"}])
    for i in range(6):
        resp = await client.get(f"/flaky/{i}")
        assert resp.status == 200, await resp.text()
        assert await resp.text() == f"GET /flaky/{i} on {i + 1}"
    assert [target for _, _, target in server.seen()] == \
        ["/flaky/0"] + [f"/flaky/{i}" for i in range(1, 6) for _ in range(2)]
