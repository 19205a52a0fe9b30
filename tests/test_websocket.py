"""WebSocket upgrades through the gateway: the same auth rules and identity headers as plain
requests, frames both ways, ping/pong, close codes, subprotocols, the upstream's own answer
when it refuses the upgrade, and upgrades the gateway refuses or cuts itself."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient

from checks import SPOOF, expect_error, identity_headers_seen
from conftest import APPID, GatewayFactory, Served, bearer, login
from gateway.testing.embedded import free_port
from rawhttp import raw_request
from test_cache import wait_live

WAIT = 5.0  # every wait in this file is bounded by this many seconds
UPGRADE = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
           "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}


@dataclass
class Handshake:
    raw_path: str
    headers: list[tuple[str, str]]

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


@dataclass
class WsUpstream(Served):
    """A WebSocket backend that records handshakes and every frame it receives.

    ``/<anything>/echo``: echoes text (prefixed ``echo:``) and binary; answers pings itself
    (autoping off, so the ping is observed). ``/<anything>/ping``: pings the client first, then
    echoes. ``/<anything>/close``: closes with 4002 straight away. ``/<anything>/refuse``:
    answers 403 with ``X-Why`` instead of upgrading."""

    handshakes: list[Handshake] = field(default_factory=list)
    events: asyncio.Queue[tuple[str, Any, Any]] = field(default_factory=asyncio.Queue)

    async def next_event(self, kind: str) -> tuple[Any, Any]:
        """The next recorded frame of this kind (others before it are skipped)."""
        async with asyncio.timeout(WAIT):
            while True:
                got, data, extra = await self.events.get()
                if got == kind:
                    return data, extra

    async def handle(self, request: web.Request) -> web.StreamResponse:
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers]
        self.handshakes.append(Handshake(request.raw_path, headers))
        mode = request.path.rstrip("/").rsplit("/", 1)[-1]
        if mode == "refuse":
            return web.Response(status=403, text="no sockets for you",
                                headers={"X-Why": "upstream-policy"})
        # autoping and autoclose off: pings, pongs and the peer's close frame are observed.
        ws = web.WebSocketResponse(protocols=("v2",), autoping=False, autoclose=False,
                                   max_msg_size=0)
        await ws.prepare(request)
        if mode == "close":
            await ws.close(code=4002, message=b"upstream-bye")
            return ws
        if mode == "ping":
            await ws.ping(b"from-upstream")
        while True:
            msg = await ws.receive()
            if msg.type == WSMsgType.TEXT:
                self.events.put_nowait(("text", msg.data, None))
                await ws.send_str("echo:" + msg.data)
            elif msg.type == WSMsgType.BINARY:
                self.events.put_nowait(("binary", msg.data, None))
                await ws.send_bytes(msg.data)
            elif msg.type == WSMsgType.PING:
                self.events.put_nowait(("ping", msg.data, None))
                await ws.pong(msg.data)
            elif msg.type == WSMsgType.PONG:
                self.events.put_nowait(("pong", msg.data, None))
            elif msg.type == WSMsgType.CLOSE:
                self.events.put_nowait(("close", msg.data, msg.extra))
                await ws.close()
                break
            else:
                self.events.put_nowait(("gone", msg.type, None))
                break
        return ws


@pytest.fixture
async def ws_upstream(aiohttp_server: Any) -> WsUpstream:
    up = WsUpstream()
    app = web.Application()

    async def handle(request: web.Request) -> web.StreamResponse:
        return await up.handle(request)

    app.router.add_get("/{tail:.*}", handle)
    up.server = await aiohttp_server(app)
    return up


@pytest.fixture
async def ws_gw(make_gateway: GatewayFactory, ws_upstream: WsUpstream) -> TestClient:
    return await make_gateway(routes=[
        {"path": "/ws/", "upstream": ws_upstream.url, "auth": "required", "timeout": "3s"},
        {"path": "/pub/", "upstream": ws_upstream.url, "auth": "public", "timeout": "3s"},
    ])


async def receive(ws: aiohttp.ClientWebSocketResponse) -> aiohttp.WSMessage:
    return await ws.receive(timeout=WAIT)


async def close_and_settle(ws: aiohttp.ClientWebSocketResponse, up: WsUpstream) -> None:
    """Close from the client, then wait until the upstream has seen its side end too."""
    await ws.close()
    async with asyncio.timeout(WAIT):
        while True:
            kind, _, _ = await up.events.get()
            if kind in ("close", "gone"):
                return


# --- auth on the handshake -------------------------------------------------------------------


async def test_required_route_without_token_refuses_handshake(
        ws_gw: TestClient, ws_upstream: WsUpstream) -> None:
    # As a plain upgrade request: the gateway's JSON 401, no 101.
    resp = await ws_gw.get("/ws/chat/echo", headers=UPGRADE)
    await expect_error(resp, 401, "unauthorized")
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert "Sec-WebSocket-Accept" not in resp.headers
    # And as a real WebSocket client: the handshake fails with that status.
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await ws_gw.ws_connect("/ws/chat/echo")
    assert refused.value.status == 401
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await ws_gw.ws_connect("/ws/chat/echo", headers=bearer("not.a.token"))
    assert refused.value.status == 401
    assert ws_upstream.handshakes == []


async def test_valid_token_upgrades_with_identity_and_no_forgeries(
        ws_gw: TestClient, ws_upstream: WsUpstream) -> None:
    session = await login(ws_gw)
    headers = {**bearer(session["token"]), "X-WX-OpenID": SPOOF, "x_wx_appid": SPOOF,
               "X-Wx-UnionId": SPOOF, "X_MP_Platform": SPOOF, "x-wx-corpid": SPOOF,
               "X-Other": "kept"}
    ws = await ws_gw.ws_connect("/ws/chat/echo", headers=headers)
    try:
        await ws.send_str("hello")
        msg = await receive(ws)
        assert (msg.type, msg.data) == (WSMsgType.TEXT, "echo:hello")
    finally:
        await close_and_settle(ws, ws_upstream)
    (seen,) = ws_upstream.handshakes
    assert seen.header("X-WX-OpenID") == [session["openid"]]
    assert seen.header("X-WX-AppID") == [APPID]
    assert seen.header("X-WX-UnionID") == [session["unionid"]]
    assert sorted((k.lower(), v) for k, v in identity_headers_seen(seen.headers)) == sorted([
        ("x-wx-openid", session["openid"]), ("x-wx-appid", APPID),
        ("x-wx-unionid", session["unionid"]), ("x-mp-platform", "wechat")])
    assert all(SPOOF not in v for _, v in seen.headers)
    assert seen.header("Authorization") == []
    assert all(session["token"] not in v for _, v in seen.headers)
    assert seen.header("X-Other") == ["kept"]


async def test_public_route_upgrades_without_token_and_without_identity(
        ws_gw: TestClient, ws_upstream: WsUpstream) -> None:
    ws = await ws_gw.ws_connect("/pub/feed/echo", headers={"X-WX-OpenID": SPOOF,
                                                           "x_mp_platform": SPOOF,
                                                           "X-WX-CorpID": SPOOF})
    try:
        await ws.send_str("anon")
        msg = await receive(ws)
        assert (msg.type, msg.data) == (WSMsgType.TEXT, "echo:anon")
    finally:
        await close_and_settle(ws, ws_upstream)
    (seen,) = ws_upstream.handshakes
    assert identity_headers_seen(seen.headers) == []
    assert seen.header("Authorization") == []


async def test_query_string_reaches_upstream(ws_gw: TestClient, ws_upstream: WsUpstream) -> None:
    ws = await ws_gw.ws_connect("/pub/room/echo?room=42&name=a%20b&tag=1&tag=2")
    await close_and_settle(ws, ws_upstream)
    assert ws_upstream.handshakes[0].raw_path == "/pub/room/echo?room=42&name=a%20b&tag=1&tag=2"


# --- frames ----------------------------------------------------------------------------------


async def test_text_and_binary_messages_both_ways(
        ws_gw: TestClient, ws_upstream: WsUpstream) -> None:
    session = await login(ws_gw)
    ws = await ws_gw.ws_connect("/ws/chat/echo", headers=bearer(session["token"]))
    try:
        await ws.send_str("你好, gateway")
        assert await ws_upstream.next_event("text") == ("你好, gateway", None)
        msg = await receive(ws)
        assert (msg.type, msg.data) == (WSMsgType.TEXT, "echo:你好, gateway")

        small = b"\x00\x01\xfe\xff binary"
        await ws.send_bytes(small)
        assert await ws_upstream.next_event("binary") == (small, None)
        msg = await receive(ws)
        assert (msg.type, msg.data) == (WSMsgType.BINARY, small)

        big = os.urandom(1024 * 1024)
        await ws.send_bytes(big)
        got, _ = await ws_upstream.next_event("binary")
        assert len(got) == len(big) and got == big
        msg = await receive(ws)
        assert msg.type == WSMsgType.BINARY
        assert len(msg.data) == len(big) and msg.data == big
    finally:
        await close_and_settle(ws, ws_upstream)


async def test_client_ping_reaches_upstream_and_its_pong_comes_back(
        ws_gw: TestClient, ws_upstream: WsUpstream) -> None:
    ws = await ws_gw.ws_connect("/pub/live/echo", autoping=False)
    try:
        await ws.ping(b"from-client")
        assert await ws_upstream.next_event("ping") == (b"from-client", None)
        msg = await receive(ws)
        assert (msg.type, msg.data) == (WSMsgType.PONG, b"from-client")
    finally:
        await close_and_settle(ws, ws_upstream)


async def test_upstream_ping_reaches_client_and_its_pong_goes_back(
        ws_gw: TestClient, ws_upstream: WsUpstream) -> None:
    ws = await ws_gw.ws_connect("/pub/live/ping", autoping=False)
    try:
        msg = await receive(ws)
        assert (msg.type, msg.data) == (WSMsgType.PING, b"from-upstream")
        await ws.pong(msg.data)
        assert await ws_upstream.next_event("pong") == (b"from-upstream", None)
    finally:
        await close_and_settle(ws, ws_upstream)


# --- closing ---------------------------------------------------------------------------------


async def test_client_close_code_and_reason_reach_upstream(
        ws_gw: TestClient, ws_upstream: WsUpstream) -> None:
    ws = await ws_gw.ws_connect("/pub/bye/echo")
    await ws.send_str("before-close")
    assert await ws_upstream.next_event("text") == ("before-close", None)  # the relay is live
    await ws.close(code=4001, message=b"client-going-away")
    assert await ws_upstream.next_event("close") == (4001, "client-going-away")


async def test_upstream_close_code_reaches_client(ws_gw: TestClient) -> None:
    ws = await ws_gw.ws_connect("/pub/done/close")
    msg = await receive(ws)
    assert msg.type == WSMsgType.CLOSE
    assert msg.data == 4002
    assert msg.extra == "upstream-bye"
    await ws.close()
    assert ws.close_code == 4002


# --- handshake details -----------------------------------------------------------------------


async def test_subprotocol_chosen_by_upstream_reaches_client(
        ws_gw: TestClient, ws_upstream: WsUpstream) -> None:
    ws = await ws_gw.ws_connect("/pub/proto/echo", protocols=("chat", "v2"))
    try:
        assert ws.protocol == "v2"  # the upstream only speaks v2; the gateway must not pick
    finally:
        await close_and_settle(ws, ws_upstream)
    offered = [p.strip() for v in ws_upstream.handshakes[0].header("Sec-WebSocket-Protocol")
               for p in v.split(",")]
    assert offered == ["chat", "v2"]


async def test_upstream_refusing_the_upgrade_gives_the_client_its_answer(
        ws_gw: TestClient, ws_upstream: WsUpstream) -> None:
    resp = await ws_gw.get("/pub/nope/refuse", headers=UPGRADE)
    assert resp.status == 403
    assert resp.headers["X-Why"] == "upstream-policy"
    assert "Sec-WebSocket-Accept" not in resp.headers
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await ws_gw.ws_connect("/pub/nope/refuse")
    assert refused.value.status == 403
    assert refused.value.headers is not None
    assert refused.value.headers["X-Why"] == "upstream-policy"
    assert len(ws_upstream.handshakes) == 2


async def test_unreachable_upstream_is_502(make_gateway: GatewayFactory) -> None:
    client = await make_gateway(routes=[
        {"path": "/pub/", "upstream": f"http://127.0.0.1:{free_port()}", "auth": "public"}])
    resp = await client.get("/pub/x", headers=UPGRADE)
    await expect_error(resp, 502, "upstream_unavailable")
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await client.ws_connect("/pub/x")
    assert refused.value.status == 502


# --- upgrades refused or cut by the gateway itself ------------------------------------------


async def test_non_websocket_upgrade_closes_the_connection(gw: TestClient) -> None:
    resp = await raw_request(gw, "GET", "/public/x",
                             [("Connection", "Upgrade"), ("Upgrade", "foo")])
    assert resp.status == 200
    assert [v.lower() for v in resp.header("Connection")] == ["close"]


async def ws_gateway(make_gateway: GatewayFactory, aiohttp_server: Any,
                     handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                     auth: str) -> TestClient:
    """A gateway whose /ws/ route (with this ``auth``) leads to an upstream served by
    ``handler``."""
    up = web.Application()
    up.router.add_get("/{t:.*}", handler)
    server = await aiohttp_server(up)
    return await make_gateway(routes=[{"path": "/ws/", "auth": auth,
                                       "upstream": f"http://127.0.0.1:{server.port}"}])


async def test_broken_websocket_handshake_never_dials_the_upstream(
        make_gateway: GatewayFactory, aiohttp_server: Any) -> None:
    dialled = []

    async def ws_handler(request: web.Request) -> web.StreamResponse:
        dialled.append(request.path)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        return ws

    gw = await ws_gateway(make_gateway, aiohttp_server, ws_handler, "public")
    resp = await raw_request(gw, "GET", "/ws/x", [("Connection", "Upgrade"),
                                                  ("Upgrade", "websocket")])
    assert resp.status == 400 and resp.json()["error"] == "invalid_request"
    assert dialled == []


async def test_oversize_websocket_message_is_refused_not_buffered(
        make_gateway: GatewayFactory, aiohttp_server: Any) -> None:
    received: list[int] = []

    async def ws_handler(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        async for msg in ws:
            received.append(len(msg.data))
        return ws

    gw = await ws_gateway(make_gateway, aiohttp_server, ws_handler, "public")
    async with gw.session.ws_connect(gw.make_url("/ws/x"), max_msg_size=0) as ws:
        # The gateway stops reading mid-frame, so the send may never finish: run it aside.
        sending = asyncio.ensure_future(ws.send_bytes(b"x" * (5 * 1024 * 1024)))
        msg = await asyncio.wait_for(ws.receive(), 5)
        sending.cancel()
    assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING)
    assert ws.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
    assert received == []


async def test_logout_closes_an_open_websocket_at_once(
        make_gateway: GatewayFactory, aiohttp_server: Any) -> None:
    async def ws_handler(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            await ws.send_str("echo:" + msg.data)
        return ws

    gw = await ws_gateway(make_gateway, aiohttp_server, ws_handler, "required")
    await wait_live(gw)
    session = await login(gw)
    async with gw.session.ws_connect(gw.make_url("/ws/x"), headers=bearer(session["token"])) as ws:
        await ws.send_str("hi")
        assert (await asyncio.wait_for(ws.receive(), 5)).data == "echo:hi"
        resp = await gw.post("/auth/logout", headers=bearer(session["token"]))
        assert resp.status == 204
        msg = await asyncio.wait_for(ws.receive(), 2)
        assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED)
        assert ws.close_code == aiohttp.WSCloseCode.POLICY_VIOLATION
