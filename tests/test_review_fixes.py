"""Regressions from the second review: each test pins down a hole that was found and closed."""

from __future__ import annotations

import asyncio
import copy
from typing import Any, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient

from conftest import GatewayFactory, Upstream, bearer, login
from gateway import loader
from gateway.errors import ConfigError
from rawhttp import raw_request


def problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        loader.parse(data, environ={})
    return info.value.problems


async def test_underscored_identity_header_names_strip_every_spelling(
        make_gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = await make_gateway(identity_headers={"openid": "X_WX_OPENID"})
    for spelling in ("X-WX-OPENID", "X_WX_OPENID", "x_wx_openid", "x-Wx-OpenId"):
        resp = await raw_request(gw, "GET", "/public/p", [(spelling, "forged")])
        assert resp.status == 200
        seen = [v for k, v in upstream.last.headers
                if k.strip().lower().replace("_", "-") == "x-wx-openid"]
        assert seen == [], (spelling, upstream.last.headers)


@pytest.mark.parametrize("key,value", [
    ("ttl", float("inf")), ("ttl", float("nan")), ("ttl", "400d")])
def test_infinite_nan_and_huge_durations_are_rejected(
        config_dict: dict[str, Any], key: str, value: Any) -> None:
    data = copy.deepcopy(config_dict)
    data["session"][key] = value
    assert any(p.startswith(f"session.{key}: ") for p in problems(data))


@pytest.mark.parametrize("url", ["redis://127.0.0.1:99999/0", "redis://[::1/0",
                                 "redis://h/0?socket_timeout=abc"])
def test_unusable_redis_urls_are_config_errors(config_dict: dict[str, Any], url: str) -> None:
    data = copy.deepcopy(config_dict)
    data["redis"]["url"] = url
    assert [p for p in problems(data) if p.startswith("redis.url: ")]


@pytest.mark.parametrize("target", ["http://h:9000/a b", "http://h:9000/base%2f..",
                                    "http://h:9000/a/../b", "http://h:9000/é", "http://h:9000/a//b"])
def test_upstream_base_paths_must_be_plain(config_dict: dict[str, Any], target: str) -> None:
    data = copy.deepcopy(config_dict)
    data["routes"] = [{"path": "/x", "upstream": target}]
    assert [p for p in problems(data) if p.startswith("routes[0].upstream: ")]


def test_credentials_in_a_rejected_url_are_not_echoed(config_dict: dict[str, Any]) -> None:
    data = copy.deepcopy(config_dict)
    data["routes"] = [{"path": "/x", "upstream": "ftp://user:hunter2@h"}]
    assert not any("hunter2" in p for p in problems(data))


@pytest.mark.parametrize("name", ["X-Forwarded-For", "X-Request-ID", "Upgrade", "TE",
                                  "Sec-WebSocket-Key", "Content-Type", "Via"])
def test_identity_header_names_cannot_be_reserved_headers(
        config_dict: dict[str, Any], name: str) -> None:
    data = copy.deepcopy(config_dict)
    data["identity_headers"] = {"openid": name}
    assert [p for p in problems(data) if p.startswith("identity_headers.openid: ")]


def test_duplicate_yaml_keys_and_non_utf8_files_are_one_line_each(tmp_path: Any) -> None:
    dup = tmp_path / "dup.yaml"
    dup.write_text("listen: '127.0.0.1:1'\nlisten: '127.0.0.1:2'\n")
    with pytest.raises(ConfigError) as info:
        loader.load(dup)
    assert len(info.value.problems) == 1 and "duplicate key 'listen'" in info.value.problems[0]
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError) as info:
        loader.load(binary)
    assert len(info.value.problems) == 1 and "UTF-8" in info.value.problems[0]


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


async def _live_cache(client: TestClient) -> None:
    from gateway.state import SERVICES
    cache = client.app[SERVICES].connections.cache
    assert cache is not None
    async with asyncio.timeout(5):
        while not cache.live:
            await asyncio.sleep(0.02)


async def test_logout_closes_an_open_websocket_at_once(
        make_gateway: GatewayFactory, aiohttp_server: Any) -> None:
    async def ws_handler(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            await ws.send_str("echo:" + msg.data)
        return ws

    gw = await ws_gateway(make_gateway, aiohttp_server, ws_handler, "required")
    await _live_cache(gw)
    session = await login(gw)
    async with gw.session.ws_connect(gw.make_url("/ws/x"), headers=bearer(session["token"])) as ws:
        await ws.send_str("hi")
        assert (await asyncio.wait_for(ws.receive(), 5)).data == "echo:hi"
        resp = await gw.post("/auth/logout", headers=bearer(session["token"]))
        assert resp.status == 204
        msg = await asyncio.wait_for(ws.receive(), 2)
        assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED)
        assert ws.close_code == aiohttp.WSCloseCode.POLICY_VIOLATION


# --- final review -------------------------------------------------------------------------


async def test_real_process_forwards_a_gzip_request_body_untouched(
        launch: Any, config_dict: dict[str, Any], upstream: Any) -> None:
    import gzip

    from rawhttp import build_request, raw_exchange
    gw = await launch(config_dict)
    async with aiohttp.ClientSession() as http:
        await gw.wait_healthy(http)
    body = gzip.compress(b"A" * 5000)
    request = build_request("POST", "/public/upload",
                            [b"Content-Encoding: gzip", b"Content-Type: text/plain"], body=body)
    resp = await raw_exchange("127.0.0.1", gw.port, request)
    assert resp.status == 200
    seen = upstream.last
    # The test upstream is an aiohttp server, which inflates what it receives itself: the full
    # 5000 bytes mean it got the whole gzip stream, as sent (the gateway used to inflate it
    # and forward a body cut to the compressed Content-Length).
    assert seen.body == b"A" * 5000
    assert seen.header("Content-Encoding") == ["gzip"]
    assert seen.header("Content-Length") == [str(len(body))]
    # and a gzip login body is bad input (400), not a crash
    login_req = build_request("POST", "/auth/login", [b"Content-Encoding: gzip"],
                              body=b"\x1f\x8bnot really gzip")
    answer = await raw_exchange("127.0.0.1", gw.port, login_req)
    assert answer.status == 400 and answer.json()["error"] == "invalid_request"


@pytest.mark.parametrize("route,status", [("/api/x", 401), ("/maybe/x", 200)])
async def test_undecodable_authorization_bytes_are_an_invalid_token(
        gw: TestClient, upstream: Upstream, route: str, status: int) -> None:
    resp = await raw_request(gw, "GET", route, [("Authorization", b"Bearer \xff\xfe\x80")])
    assert resp.status == status, resp.body
    if status == 401:
        assert resp.json()["error"] == "unauthorized"
    else:
        assert not [v for k, v in upstream.last.headers if k.lower() == "x-wx-openid"]


def test_header_names_differing_only_by_underscore_are_duplicates(
        config_dict: dict[str, Any]) -> None:
    data = copy.deepcopy(config_dict)
    data["identity_headers"] = {"openid": "X_WX_AppID"}  # the appid header keeps X-WX-AppID
    assert [p for p in problems(data) if p.startswith("identity_headers.appid: ")]
    data = copy.deepcopy(config_dict)
    data["identity_assertion"] = {"header": "X_WX_OpenID"}
    assert [p for p in problems(data) if p.startswith("identity_assertion.header: ")]


def test_tls_redis_url_with_sentinels_is_refused(config_dict: dict[str, Any]) -> None:
    data = copy.deepcopy(config_dict)
    data["redis"] = {"url": "rediss://:secret@h/0", "sentinels": ["127.0.0.1:26379"]}
    assert [p for p in problems(data) if p.startswith("redis.url: ")]
