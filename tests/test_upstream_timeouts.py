"""Upstream timeouts that let streams live as long as data flows: a route's ``read_timeout`` is
the longest silence while waiting for or reading the upstream's answer (nginx's
proxy_read_timeout), its optional ``timeout`` bounds the whole exchange, and an idle WebSocket
is closed after ``read_timeout``.

Server-sent events and chunked answers (a mini-program's ``wx.request({enableChunked: true})``)
go through a real gateway process and a real aiohttp upstream, with heartbeats compressed in
time: a 1 s read timeout, an event every 0.3 s, streams lasting ten times the read timeout.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient

from checks import expect_error
from conftest import APPID, SECRET, SIGNING_KEY, GatewayFactory, Served
from gateway import loader
from gateway.config import Config
from gateway.testing.embedded import EmbeddedRedis, free_port
from process import GatewayProcess, Launch

READ = 1.0  # the routes' read_timeout here, in seconds
BEAT = 0.3  # seconds between heartbeats: well inside READ
WAIT = 10.0  # every wait in this file is bounded by this many seconds (past any timeout here)


@dataclass
class StreamUpstream(Served):
    """An SSE backend. ``/beats/<n>``: n events, one every BEAT seconds. ``/stall/<n>``: n
    events, then silence while the connection lives. ``/stepped/<n>``: event i+1 only once the
    test has acknowledged event i (``acks``). ``/flood/<n>``: n events of 64 KiB, as fast as
they are taken. ``/late``: headers after 3×READ. ``/small-stall``:
    a Content-Length of 100 and 10 bytes of it. ``/upload``: reads the body, answers its size.
    ``/ignore-body``: reads nothing, answers after 3×READ."""

    sent: dict[int, float] = field(default_factory=dict)  # event → when it left, perf_counter
    acks: dict[int, asyncio.Event] = field(default_factory=dict)
    cut: asyncio.Event = field(default_factory=asyncio.Event)  # a stream's client went away
    late_requests: int = 0

    def ack(self, i: int) -> asyncio.Event:
        return self.acks.setdefault(i, asyncio.Event())

    async def sse(self, request: web.Request) -> web.StreamResponse:
        mode, n = request.match_info["mode"], int(request.match_info["n"])
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        try:
            for i in range(n):
                if mode == "beats" and i:
                    await asyncio.sleep(BEAT)
                if mode == "stepped" and i:
                    await self.ack(i - 1).wait()
                self.sent[i] = time.perf_counter()
                padding = "x" * 65536 if mode == "flood" else ""
                await response.write(f"id: {i}\ndata: event {i}{padding}\n\n".encode())
            if mode == "stall":
                await until_gone(request)
        except (asyncio.CancelledError, ConnectionResetError):
            self.cut.set()
            raise
        await response.write_eof()
        return response

    async def late(self, request: web.Request) -> web.Response:
        self.late_requests += 1
        await asyncio.sleep(3 * READ)
        return web.Response(text="too late")

    async def small_stall(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": "100"})
        await response.prepare(request)
        await response.write(b"x" * 10)
        await until_gone(request)
        return response

    async def upload(self, request: web.Request) -> web.Response:
        return web.json_response({"bytes": len(await request.read())})

    async def ignore_body(self, request: web.Request) -> web.Response:
        # Not until_gone: with the body unread, aiohttp stops reading the socket and cannot
        # see the gateway leave.
        await asyncio.sleep(3 * READ)
        return web.Response()


async def until_gone(request: web.Request) -> None:
    """Silence until the gateway drops the connection (aiohttp does not cancel the handler,
    and a handler still running holds up the server's shutdown)."""
    async with asyncio.timeout(WAIT):
        while request.transport is not None and not request.transport.is_closing():
            await asyncio.sleep(0.02)


@pytest.fixture
async def stream_upstream(aiohttp_server: Any) -> StreamUpstream:
    up = StreamUpstream()
    app = web.Application()
    # Paths arrive with the route's prefix (/sse/..., /bounded/...).
    app.router.add_get("/{route}/{mode:beats|stall|stepped|flood}/{n:\\d+}", up.sse)
    app.router.add_get("/{route}/late", up.late)
    app.router.add_get("/{route}/small-stall", up.small_stall)
    app.router.add_post("/{route}/upload", up.upload)
    app.router.add_post("/{route}/ignore-body", up.ignore_body)
    up.server = await aiohttp_server(app)
    return up


def stream_routes(upstream_url: str) -> list[dict[str, Any]]:
    return [
        {"path": "/sse/", "upstream": upstream_url, "auth": "public", "read_timeout": f"{READ}s"},
        # The whole exchange bounded at 1.5 s: past it even a flowing stream is cut.
        {"path": "/bounded/", "upstream": upstream_url, "auth": "public",
         "read_timeout": f"{READ}s", "timeout": "1500ms"},
    ]


@pytest.fixture
async def gateway(redis_server: EmbeddedRedis, stream_upstream: StreamUpstream,
                  launch: Launch) -> AsyncIterator[GatewayProcess]:
    config = {
        "listen": f"127.0.0.1:{free_port()}",
        "redis": {"url": redis_server.url, "key_prefix": f"wxgw-rt-{uuid.uuid4().hex[:8]}:"},
        "wechat": {"api_base": "http://127.0.0.1:1", "timeout": "1s"},
        "apps": [{"appid": APPID, "secret": SECRET}],
        "session": {"signing_keys": [SIGNING_KEY], "ttl": "1h"},
        "logging": {"format": "json"},
        "routes": stream_routes(stream_upstream.url),
    }
    gw = await launch(config, graceful_stop=True)
    async with aiohttp.ClientSession() as http:
        await gw.wait_healthy(http)
    yield gw
    gw.assert_no_internal_failure()


@pytest.fixture
async def sse_gw(make_gateway: GatewayFactory, stream_upstream: StreamUpstream) -> TestClient:
    return await make_gateway(routes=stream_routes(stream_upstream.url))


async def next_event(resp: aiohttp.ClientResponse) -> bytes:
    return await resp.content.readuntil(b"\n\n")


def event(i: int) -> bytes:
    return f"id: {i}\ndata: event {i}\n\n".encode()


# --- streams that flow ----------------------------------------------------------------------


async def test_heartbeat_stream_outlives_the_read_timeout_whole_in_order_unbuffered(
        gateway: GatewayProcess, stream_upstream: StreamUpstream) -> None:
    n = int(10 * READ / BEAT) + 1  # 34 events over 9.9 s: ten read timeouts
    received: list[bytes] = []
    latency: list[float] = []
    started = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        async with http.get(f"{gateway.url}/sse/beats/{n}") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "text/event-stream"
            assert resp.headers.get("Transfer-Encoding") == "chunked"
            while chunk := await next_event(resp):
                latency.append(time.perf_counter() - stream_upstream.sent[len(received)])
                received.append(chunk)
    lasted = time.monotonic() - started
    assert received == [event(i) for i in range(n)]
    assert lasted > 9 * READ, lasted
    print(f"\n{n} events over {lasted:.1f}s (read_timeout {READ}s): upstream → client "
          f"latency median {statistics.median(latency) * 1000:.2f} ms, "
          f"max {max(latency) * 1000:.2f} ms")
    assert max(latency) < 1.0, latency  # a sanity bound only: buffering would hold events


async def test_each_event_reaches_the_client_before_the_next_is_sent(
        gateway: GatewayProcess, stream_upstream: StreamUpstream) -> None:
    """The upstream sends event i+1 only after the client has received event i: a gateway
    that held back any part of an event would stall this stream for good."""
    n = 20
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        async with http.get(f"{gateway.url}/sse/stepped/{n}") as resp:
            assert resp.status == 200
            for i in range(n):
                async with asyncio.timeout(READ / 2):  # never waits on a timeout: on data
                    assert await next_event(resp) == event(i)
                stream_upstream.ack(i).set()
            assert await resp.content.read() == b""


async def test_the_route_timeout_cuts_even_a_flowing_stream(
        gateway: GatewayProcess, stream_upstream: StreamUpstream) -> None:
    received: list[bytes] = []
    started = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as http:
        async with http.get(f"{gateway.url}/bounded/beats/30") as resp:
            assert resp.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                while chunk := await next_event(resp):
                    received.append(chunk)
    cut_after = time.monotonic() - started
    assert 1.3 < cut_after < 3.0, cut_after
    assert received == [event(i) for i in range(len(received))] and len(received) >= 3
    async with asyncio.timeout(WAIT):
        await stream_upstream.cut.wait()  # the upstream's side was closed as well


# --- streams that stop ----------------------------------------------------------------------


async def test_a_stalled_stream_is_aborted_after_the_read_timeout(
        gateway: GatewayProcess, stream_upstream: StreamUpstream) -> None:
    received: list[bytes] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as http:
        async with http.get(f"{gateway.url}/sse/stall/3") as resp:
            assert resp.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):  # not a clean end: an abort
                while True:
                    received.append(await next_event(resp))
                    stalled = time.monotonic()
    silent_for = time.monotonic() - stalled
    assert received == [event(i) for i in range(3)]
    assert READ * 0.9 < silent_for < READ + 1.5, silent_for
    async with asyncio.timeout(WAIT):
        await stream_upstream.cut.wait()


async def test_a_client_that_stops_reading_is_cut_after_the_read_timeout(
        gateway: GatewayProcess, stream_upstream: StreamUpstream) -> None:
    """Without a whole-exchange timeout, a client that never reads must not hold the
    upstream's stream open for ever (nginx's send_timeout)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        writer.write(b"GET /sse/flood/100000 HTTP/1.1\r\nHost: gw\r\n\r\n")
        async with asyncio.timeout(WAIT):  # never read: the socket buffers fill, then nothing
            await stream_upstream.cut.wait()
        assert len(stream_upstream.sent) < 1000  # far from the 6.5 GB it would have sent
    finally:
        writer.close()


async def test_no_headers_within_the_read_timeout_is_504(
        sse_gw: TestClient, stream_upstream: StreamUpstream) -> None:
    assert (await sse_gw.post("/sse/upload", data=b"warm")).status == 200  # a pooled connection
    started = time.monotonic()
    resp = await sse_gw.get("/sse/late")
    await expect_error(resp, 504, "upstream_timeout")
    assert READ * 0.9 < time.monotonic() - started < READ + 0.5
    # A silent upstream is not a connection closed under us: the GET is not sent again.
    assert stream_upstream.late_requests == 1


async def test_a_small_body_that_stops_arriving_is_504(sse_gw: TestClient) -> None:
    """A body with a small Content-Length is read whole before answering, so its stall is
    still a clean 504 (no headers went to the client yet)."""
    started = time.monotonic()
    resp = await sse_gw.get("/sse/small-stall")
    await expect_error(resp, 504, "upstream_timeout")
    assert READ * 0.9 < time.monotonic() - started < READ + 1.5


async def test_a_slow_upload_that_keeps_moving_is_not_cut(sse_gw: TestClient) -> None:
    """Each chunk written upstream restarts the silence, as nginx's proxy_send_timeout."""
    async def trickle() -> AsyncIterator[bytes]:
        for _ in range(8):  # 2.4 s in all, more than twice the read timeout
            yield b"y" * 1000
            await asyncio.sleep(BEAT)

    started = time.monotonic()
    resp = await sse_gw.post("/sse/upload", data=trickle())
    assert resp.status == 200, await resp.text()
    assert await resp.json() == {"bytes": 8000}
    assert time.monotonic() - started > 2 * READ


async def test_an_upstream_that_ignores_a_streamed_upload_is_504(sse_gw: TestClient) -> None:
    answered = asyncio.Event()

    async def endless() -> AsyncIterator[bytes]:
        while not answered.is_set():  # until the upstream's buffers are full: then it stalls
            yield b"z" * 65536

    started = time.monotonic()
    resp = await sse_gw.post("/sse/ignore-body", data=endless())
    answered.set()
    await expect_error(resp, 504, "upstream_timeout")
    assert READ * 0.9 < time.monotonic() - started < 2 * READ


# --- WebSocket ------------------------------------------------------------------------------


@dataclass
class EchoUpstream(Served):
    closed: asyncio.Queue[int | None] = field(default_factory=asyncio.Queue)  # close codes

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=False)
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await ws.send_str(msg.data)
        self.closed.put_nowait(ws.close_code)
        return ws


@pytest.fixture
async def ws_gw(make_gateway: GatewayFactory, aiohttp_server: Any) -> tuple[TestClient,
                                                                          EchoUpstream]:
    up = EchoUpstream()
    app = web.Application()
    app.router.add_get("/{tail:.*}", up.handle)
    up.server = await aiohttp_server(app)
    client = await make_gateway(routes=[
        {"path": "/ws/", "upstream": up.url, "auth": "public", "read_timeout": f"{READ}s"}])
    return client, up


async def test_an_idle_websocket_is_closed_with_1001_after_the_read_timeout(
        ws_gw: tuple[TestClient, EchoUpstream]) -> None:
    client, up = ws_gw
    async with client.ws_connect("/ws/chat", autoping=False) as ws:
        await ws.send_str("hello")
        assert (await ws.receive(timeout=WAIT)).data == "hello"
        quiet_since = time.monotonic()
        msg = await ws.receive(timeout=WAIT)
        idle = time.monotonic() - quiet_since
        assert msg.type == WSMsgType.CLOSE, msg
        assert (msg.data, msg.extra) == (1001, "idle timeout")
        assert READ * 0.9 < idle < READ + 1.5, idle
    async with asyncio.timeout(WAIT):
        assert await up.closed.get() == 1001  # the upstream was told too


async def test_a_websocket_handshake_the_upstream_never_answers_is_504(
        make_gateway: GatewayFactory, stream_upstream: StreamUpstream) -> None:
    client = await make_gateway(routes=[
        {"path": "/sse/", "upstream": stream_upstream.url, "auth": "public",
         "read_timeout": f"{READ}s", "connect_timeout": "200ms"}])
    upgrade = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
    started = time.monotonic()
    resp = await client.get("/sse/late", headers=upgrade)  # answers after 3×READ
    await expect_error(resp, 504, "upstream_timeout")
    assert READ * 0.9 < time.monotonic() - started < 2 * READ


async def test_a_websocket_exchanging_frames_stays_open(
        ws_gw: tuple[TestClient, EchoUpstream]) -> None:
    client, up = ws_gw
    async with client.ws_connect("/ws/chat", autoping=False) as ws:
        started = time.monotonic()
        beats = 0
        while time.monotonic() - started < 4 * READ:
            # Client heartbeats alone keep it: upstream → client answers are not needed,
            # but pings every BEAT seconds are what mini-programs send.
            await ws.ping(b"beat")
            beats += 1
            await asyncio.sleep(BEAT)
        await ws.send_str("still here")
        msg = await ws.receive(timeout=WAIT)
        while msg.type in (WSMsgType.PING, WSMsgType.PONG):  # autoping off upstream: relayed
            msg = await ws.receive(timeout=WAIT)
        assert (msg.type, msg.data) == (WSMsgType.TEXT, "still here"), msg
        assert beats >= 10 and up.closed.empty()


# --- configuration --------------------------------------------------------------------------


def route_config(config_dict: dict[str, Any], **keys: Any) -> Config:
    route = {"path": "/api/", "upstream": "http://127.0.0.1:9000", **keys}
    return loader.parse({**config_dict, "routes": [route]}, environ={})


def test_defaults_follow_nginx_and_leave_the_whole_exchange_unbounded(
        config_dict: dict[str, Any]) -> None:
    r = route_config(config_dict).routes[0]
    assert (r.read_timeout, r.connect_timeout, r.timeout) == (60.0, 5.0, None)
    r = route_config(config_dict, read_timeout="2m", timeout="10m").routes[0]
    assert (r.read_timeout, r.connect_timeout, r.timeout) == (120.0, 5.0, 600.0)


def test_no_phase_outlasts_a_whole_exchange_timeout(config_dict: dict[str, Any]) -> None:
    r = route_config(config_dict, timeout="2s").routes[0]
    assert (r.read_timeout, r.connect_timeout, r.timeout) == (2.0, 2.0, 2.0)
    r = route_config(config_dict, read_timeout="10m", connect_timeout="10m").routes[0]
    assert (r.read_timeout, r.connect_timeout) == (600.0, 600.0)  # no timeout: no clamp


async def test_a_client_pausing_its_upload_longer_than_the_read_timeout_is_not_504(
        sse_gw: TestClient) -> None:
    """Waiting for the client's next body bytes is no silence of the upstream's: that wait is
    client_body_timeout's to bound, and an upstream reading all it is given is no timeout."""
    async def paused() -> AsyncIterator[bytes]:
        yield b"y" * 1000
        await asyncio.sleep(2 * READ)  # the client thinks; the upstream has read everything
        yield b"y" * 1000

    resp = await sse_gw.post("/sse/upload", data=paused())
    assert resp.status == 200, await resp.text()
    assert await resp.json() == {"bytes": 2000}
