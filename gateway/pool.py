"""Upstream HTTP/1.1: a keep-alive connection pool and one request/response exchange at a time.

A reverse proxy needs none of what makes aiohttp's ``ClientSession`` costly per request (cookie
jar, redirects, tracing, auto headers, ``ClientRequest``/``ClientResponse`` objects); on the
benchmark the session alone cost more than the rest of the gateway. This keeps aiohttp's own
connection protocol (``ResponseHandler``: parser, flow control, connection-loss errors) and
request writer (``StreamWriter``) and replaces only the bookkeeping around them.

aiohttp internals relied on here, one per line (tests/test_aiohttp_internals.py checks each,
naming the one that changed; pyproject.toml pins aiohttp's minor release for them):
- ``client_proto.ResponseHandler(loop)``: the connection protocol (parser, flow control, errors);
- ``ResponseHandler.set_response_params``: HEAD without a body, read to EOF, no decompression;
- ``ResponseHandler.read``/``should_close``/``is_connected``/``close``/``abort``: read an
  answer, and decide whether the connection goes back idle or closes;
- ``http.StreamWriter(protocol, loop)``: writes the request upstream;
- ``StreamWriter.write_headers``/``send_headers``/``enable_chunking``/``write``/``write_eof``:
  headers go at once before a streamed body, chunked when it has no length.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from typing import Callable

import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.http import StreamWriter
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import StreamReader
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

# Everything a failed exchange raises besides TimeoutError: connecting (OSError), the
# connection breaking (aiohttp.ClientError), a malformed response (HttpProcessingError).
FAILURES = (OSError, aiohttp.ClientError, HttpProcessingError)
KEEPALIVE = 15.0  # seconds an idle upstream connection is kept (aiohttp's default too)
# Methods safe to send again when a pooled connection turns out to have been closed by the
# upstream just as it was reused (RFC 9110 §9.2.2; Go's and aiohttp's clients do the same).
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
CHUNK = 64 * 1024  # bytes per read of a streamed body
# What a connection closed by the upstream raises; a malformed answer is not sent again.
_CLOSED_UNDER_US = (OSError, aiohttp.ClientConnectionError)
_Key = tuple[str, str, int]

Body = bytes | StreamReader | None


class Exchange:
    """One upstream response: status line and headers read, body still on the connection."""

    __slots__ = ("status", "reason", "headers", "body", "_conn", "_pool", "_key", "_sender")

    def __init__(self, status: int, reason: str, headers: CIMultiDictProxy[str],
                 body: StreamReader, conn: ResponseHandler, pool: Pool, key: _Key,
                 sender: asyncio.Task[None] | None) -> None:
        self.status, self.reason, self.headers, self.body = status, reason, headers, body
        self._conn, self._pool, self._key, self._sender = conn, pool, key, sender

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("Content-Length")
        return int(value) if value is not None and value.isdigit() else None

    async def read(self) -> bytes:
        return await self.body.read()

    def release(self) -> None:
        """Done with the exchange: the connection goes back to the pool when it is clean
        (body read to its end, request fully sent, no ``Connection: close``), else closes."""
        conn, sender = self._conn, self._sender
        sent = sender is None or (sender.done() and not sender.cancelled()
                                  and sender.exception() is None)
        if sender is not None and not sender.done():
            sender.cancel()
        if sent and self.body.is_eof() and not conn.should_close and conn.is_connected():
            self._pool._put(self._key, conn)
        else:
            conn.close()


class Pool:
    """Keep-alive connections per upstream origin, most recently used first; no cap on their
    number (as with nginx, the OS's file limit is the bound)."""

    def __init__(self) -> None:
        self._idle: dict[_Key, deque[tuple[float, ResponseHandler]]] = {}
        self._tls: ssl.SSLContext | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    async def send(self, origin: URL, method: str, target: str, headers: CIMultiDict[str],
                   body: Body, connect_timeout: float,
                   read_timeout: float | None = None,
                   deadline: float | None = None) -> Exchange:
        """Send ``method target`` to ``origin`` and read the response's status and headers.

        ``headers`` go as given (plus ``Host`` when absent, and ``Transfer-Encoding: chunked``
        for a streamed body without ``Content-Length``). Once connected, ``read_timeout`` is the
        longest silence allowed until the response's headers: each chunk of a streamed body
        written upstream restarts it, so a slow upload that keeps moving is not cut, while an
        upstream that neither reads nor answers is (TimeoutError). ``deadline`` (the loop's
        clock) bounds all of it, connecting included, on the same timers: one per exchange
        rather than one more around it. The caller must ``release()`` the result.
        """
        assert origin.host is not None and origin.port is not None
        key = (origin.scheme, origin.host, origin.port)
        if "Host" not in headers:
            headers["Host"] = origin.host_port_subcomponent or origin.host
        if isinstance(body, bytes) and "Content-Length" not in headers:
            headers["Content-Length"] = str(len(body))
        head = f"{method} {target} HTTP/1.1"
        replayable = method in _IDEMPOTENT and not isinstance(body, StreamReader)
        while True:
            conn = self._take(key)
            reused = conn is not None
            if conn is None:
                conn = await self._connect(key, connect_timeout, deadline)
            try:
                return await self._exchange(conn, key, method, head, headers, body,
                                            read_timeout, deadline)
            except BaseException as exc:
                conn.close()
                # TimeoutError is an OSError, but a silent upstream is not one that closed
                # the connection: sending again would double the wait and the request.
                if (reused and replayable and isinstance(exc, _CLOSED_UNDER_US)
                        and not isinstance(exc, TimeoutError)):
                    # Closed under us before answering (an upstream's idle timeout, or a
                    # restart, which makes every idle connection stale): once more, fresh.
                    self._drop(key)
                    continue
                raise

    async def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for idle in self._idle.values():
            for _, conn in idle:
                conn.close()
        self._idle.clear()

    async def _exchange(self, conn: ResponseHandler, key: _Key, method: str, head: str,
                        headers: CIMultiDict[str], body: Body,
                        read_timeout: float | None, deadline: float | None) -> Exchange:
        loop = asyncio.get_running_loop()

        def silence_ends(client_turn: bool = False) -> float | None:
            at = None if client_turn or read_timeout is None else loop.time() + read_timeout
            return deadline if at is None else at if deadline is None else min(at, deadline)

        conn.set_response_params(skip_payload=method == "HEAD", read_until_eof=True,
                                 auto_decompress=False)
        writer = StreamWriter(conn, loop)
        sender = None
        answered = False
        async with asyncio.timeout_at(silence_ends()) as silence:

            def progress(client_turn: bool = False) -> None:
                # nginx's proxy_send_timeout, at the read timeout's value: silence is measured
                # between writes too, and only until the answer's headers (the sender may
                # outlive this block when the upstream answers early). While the next bytes
                # are awaited from the client, the upstream is owed nothing: that wait is
                # client_body_timeout's (and the route's timeout's) to bound.
                if not answered and (read_timeout is not None or deadline is not None):
                    silence.reschedule(silence_ends(client_turn))

            if isinstance(body, StreamReader):
                if "Content-Length" not in headers:
                    headers["Transfer-Encoding"] = "chunked"
                    writer.enable_chunking()
                await writer.write_headers(head, headers)
                writer.send_headers()
                # Sent alongside reading the response: an upstream may answer (413, 401) early.
                sender = asyncio.ensure_future(_send(writer, body, conn, progress))
                sender.add_done_callback(_retrieve)
            else:
                await writer.write_headers(head, headers)
                await writer.write_eof(body or b"")  # headers and a small body in one write
            try:
                while True:
                    message, payload = await conn.read()
                    # 1xx are interim (100 Continue, 103 Early Hints): the final answer follows.
                    if not 100 <= message.code < 200 or message.code == 101:
                        break
                if message.code == 101 and "Upgrade" not in headers:
                    # RFC 9110 §15.2.2: a server switches only to a protocol the request asked
                    # for; the connection now speaks something nobody asked to relay.
                    raise HttpProcessingError(message="101 Switching Protocols, unasked")
            except BaseException:
                if sender is not None:
                    sender.cancel()
                raise
            finally:
                answered = True
        return Exchange(message.code, message.reason, message.headers, payload, conn, self,
                        key, sender)

    async def _connect(self, key: _Key, timeout: float,
                       deadline: float | None = None) -> ResponseHandler:
        scheme, host, port = key
        tls = None
        if scheme == "https":
            if self._tls is None:
                self._tls = ssl.create_default_context()
            tls = self._tls
        loop = asyncio.get_running_loop()
        at = loop.time() + timeout
        async with asyncio.timeout_at(at if deadline is None else min(at, deadline)):
            _, conn = await loop.create_connection(lambda: ResponseHandler(loop), host, port,
                                                   ssl=tls)
        return conn

    def _take(self, key: _Key) -> ResponseHandler | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        deadline = asyncio.get_running_loop().time() - KEEPALIVE
        while idle:
            since, conn = idle.pop()
            # should_close also covers bytes the upstream sent unasked while the connection
            # sat idle (a "408 Request Timeout" before closing): never the next answer.
            if since > deadline and conn.is_connected() and not conn.should_close:
                return conn
            conn.close()
        return None

    def _drop(self, key: _Key) -> None:
        for _, conn in self._idle.pop(key, ()):
            conn.close()

    def _put(self, key: _Key, conn: ResponseHandler) -> None:
        if self._closed:  # an exchange that outlived the pool
            conn.close()
            return
        loop = asyncio.get_running_loop()
        self._idle.setdefault(key, deque()).append((loop.time(), conn))
        if self._sweeper is None:
            self._sweeper = loop.call_later(KEEPALIVE, self._sweep)

    def _sweep(self) -> None:
        """Close what sat idle for KEEPALIVE seconds (oldest are on the left)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() - KEEPALIVE
        for idle in self._idle.values():
            while idle and (idle[0][0] <= deadline or not idle[0][1].is_connected()):
                idle.popleft()[1].close()
        self._idle = {k: v for k, v in self._idle.items() if v}
        self._sweeper = loop.call_later(KEEPALIVE, self._sweep) if self._idle else None


def _retrieve(task: asyncio.Task[None]) -> None:
    # Its failure already surfaced as the exchange's (see _send): keep asyncio quiet about it.
    if not task.cancelled():
        task.exception()


async def _send(writer: StreamWriter, body: StreamReader, conn: ResponseHandler,
                progress: Callable[[bool], None]) -> None:
    try:
        while True:
            progress(True)  # the client's turn: its silence is not the upstream's
            chunk = await body.read(CHUNK)
            progress(False)  # the upstream's turn: it must take the chunk, then answer
            if not chunk:
                break
            await writer.write(chunk)
        await writer.write_eof()
    except asyncio.CancelledError:
        raise
    except Exception:
        # The client's body broke off (or the upstream went away): the upstream must not
        # wait for the rest, so the exchange fails now rather than at its timeout.
        with contextlib.suppress(Exception):
            conn.abort()
        raise
