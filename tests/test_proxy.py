"""The reverse proxy: auth modes, header hygiene, faithful forwarding, errors and path safety."""

from __future__ import annotations

import asyncio
import gzip
import os
import re
import time
import uuid
from typing import Any, AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from checks import SPOOF, expect_error, identity_headers_seen
from conftest import (APPID, WECOM_APPS, WECOM_CORPID, GatewayFactory, Upstream, bearer,
                      closed_port_url, login, make_wecom_session)
from gateway.testing.embedded import free_port
from process import Launch
from rawhttp import build_request, raw_exchange, raw_request


# --- auth modes ------------------------------------------------------------------------------


async def test_required_without_token_is_401_and_nothing_reaches_upstream(
        gw: TestClient, upstream: Upstream) -> None:
    resp = await gw.get("/api/orders")
    await expect_error(resp, 401, "unauthorized")
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert upstream.seen == []


@pytest.mark.parametrize("authorization", [
    "Bearer not-a-token", "Bearer ", "Bearer a.b.c", "Basic dXNlcjpwYXNz", "bearer"])
async def test_required_with_bad_credentials_is_401(
        gw: TestClient, upstream: Upstream, authorization: str) -> None:
    resp = await gw.get("/api/orders", headers={"Authorization": authorization})
    await expect_error(resp, 401, "unauthorized")
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert upstream.seen == []


async def test_required_with_logged_out_token_is_401(gw: TestClient, upstream: Upstream) -> None:
    session = await login(gw)
    resp = await gw.post("/auth/logout", headers=bearer(session["token"]))
    assert resp.status == 204
    resp = await gw.get("/api/orders", headers=bearer(session["token"]))
    await expect_error(resp, 401, "unauthorized")
    assert upstream.seen == []


async def test_required_with_valid_token_injects_identity(
        gw: TestClient, upstream: Upstream) -> None:
    session = await login(gw)
    assert session["unionid"]
    resp = await gw.get("/api/orders", headers=bearer(session["token"]))
    assert resp.status == 200
    assert await resp.json() == {"ok": True, "body_bytes": 0}
    seen = upstream.last
    assert seen.header("X-WX-OpenID") == [session["openid"]]
    assert seen.header("X-WX-AppID") == [APPID]
    assert seen.header("X-WX-UnionID") == [session["unionid"]]
    assert seen.header("Authorization") == []


async def test_login_then_protected_call_reaches_upstream_with_identity(
        gw: TestClient, upstream: Upstream) -> None:
    session = await login(gw)
    resp = await gw.get("/api/orders?page=2", headers=bearer(session["token"]))
    assert resp.status == 200
    seen = upstream.last
    assert seen.raw_path == "/api/orders?page=2"
    assert seen.header("X-WX-OpenID") == [session["openid"]]
    assert seen.header("X-WX-AppID") == [APPID]
    assert seen.header("Authorization") == []


async def test_identity_without_unionid_sends_no_unionid_header_even_if_client_forges_one(
        gw: TestClient, upstream: Upstream) -> None:
    session = await login(gw, code=f"nounionid-{uuid.uuid4().hex[:8]}")
    assert session["unionid"] is None
    resp = await gw.get("/api/me", headers={**bearer(session["token"]), "X-WX-UnionID": SPOOF})
    assert resp.status == 200
    assert upstream.last.header("X-WX-OpenID") == [session["openid"]]
    assert upstream.last.header("X-WX-UnionID") == []


async def test_optional_with_valid_token_injects_identity(
        gw: TestClient, upstream: Upstream) -> None:
    session = await login(gw)
    resp = await gw.get("/maybe/feed", headers=bearer(session["token"]))
    assert resp.status == 200
    assert upstream.last.header("X-WX-OpenID") == [session["openid"]]
    assert upstream.last.header("X-WX-AppID") == [APPID]
    assert upstream.last.header("X-WX-UnionID") == [session["unionid"]]
    assert upstream.last.header("Authorization") == []


@pytest.mark.parametrize("kind", ["none", "garbage", "basic", "logged_out"])
async def test_optional_without_valid_token_is_forwarded_anonymously(
        gw: TestClient, upstream: Upstream, kind: str) -> None:
    headers: dict[str, str] = {}
    if kind == "garbage":
        headers = bearer("garbage.token.value")
    elif kind == "basic":
        headers = {"Authorization": "Basic dXNlcjpwYXNz"}
    elif kind == "logged_out":
        session = await login(gw)
        assert (await gw.post("/auth/logout", headers=bearer(session["token"]))).status == 204
        headers = bearer(session["token"])
    resp = await gw.get("/maybe/feed", headers=headers)
    assert resp.status == 200
    assert len(upstream.seen) == 1
    assert identity_headers_seen(upstream.last.headers) == []
    assert upstream.last.header("Authorization") == []


async def test_public_never_gets_identity_even_with_valid_token(
        gw: TestClient, upstream: Upstream) -> None:
    session = await login(gw)
    resp = await gw.get("/public/page", headers=bearer(session["token"]))
    assert resp.status == 200
    assert len(upstream.seen) == 1
    assert identity_headers_seen(upstream.last.headers) == []
    assert upstream.last.header("Authorization") == []


# --- identity header stripping ----------------------------------------------------------------

SPELLINGS = ["X-WX-OpenID", "x-wx-openid", "X-WX-OPENID", "X_WX_OpenID", "x_wx_unionid",
             "X-Wx-AppId", "X-WX-UnionID", "X_WX_APPID", "x-wx_openid", "X-MP-Platform",
             "x_mp_platform", "X_MP-PLATFORM", "X-WX-CorpID", "x_wx_corpid", "X-Wx_CORPID"]
# (path, send a valid token?, identity expected upstream?)
ROUTE_CASES = {
    "required": ("/api/p", True, True),
    "optional-token": ("/maybe/p", True, True),
    "optional-anonymous": ("/maybe/p", False, False),
    "optional-bad-token": ("/maybe/p", None, False),
    "public": ("/public/p", True, False),
    "public-anonymous": ("/public/p", False, False),
}


@pytest.mark.parametrize("case", list(ROUTE_CASES))
@pytest.mark.parametrize("spelling", SPELLINGS)
async def test_client_identity_headers_never_reach_upstream(
        gw: TestClient, upstream: Upstream, case: str, spelling: str) -> None:
    path, with_token, identified = ROUTE_CASES[case]
    headers: list[tuple[str, str | bytes]] = [(spelling, SPOOF), ("X-Other", "kept")]
    session: dict[str, Any] = {}
    if with_token:
        session = await login(gw)
        headers.append(("Authorization", f"Bearer {session['token']}"))
    elif with_token is None:
        headers.append(("Authorization", "Bearer invalid.token.here"))
    resp = await raw_request(gw, "GET", path, headers)
    assert resp.status == 200, resp.body
    seen = upstream.last
    assert seen.header("X-Other") == ["kept"]  # the request did go through the filter
    assert all(SPOOF not in v for _, v in seen.headers), seen.headers
    got = sorted((k.lower(), v) for k, v in identity_headers_seen(seen.headers))
    if identified:
        assert got == sorted([("x-wx-openid", session["openid"]), ("x-wx-appid", APPID),
                              ("x-wx-unionid", session["unionid"]),
                              ("x-mp-platform", "wechat")])
    else:
        assert got == []


async def test_all_forged_identity_spellings_at_once_are_removed(
        gw: TestClient, upstream: Upstream) -> None:
    session = await login(gw)
    headers: list[tuple[str, str | bytes]] = [(s, SPOOF) for s in SPELLINGS]
    headers.append(("Authorization", f"Bearer {session['token']}"))
    resp = await raw_request(gw, "GET", "/api/p", headers)
    assert resp.status == 200
    assert all(SPOOF not in v for _, v in upstream.last.headers)
    assert upstream.last.header("X-WX-OpenID") == [session["openid"]]
    assert upstream.last.header("X-MP-Platform") == ["wechat"]
    assert len(identity_headers_seen(upstream.last.headers)) == 4  # no corpid: not WeCom


async def test_a_wecom_users_corp_replaces_every_forged_copy(
        gw: TestClient, make_gateway: GatewayFactory, upstream: Upstream, redis: Any,
        key_prefix: str) -> None:
    session = await login(gw)
    await make_wecom_session(redis, key_prefix, session["token"])
    wecom = await make_gateway(apps=WECOM_APPS)
    headers: list[tuple[str, str | bytes]] = [(s, SPOOF) for s in SPELLINGS]
    headers.append(("Authorization", f"Bearer {session['token']}"))
    resp = await raw_request(wecom, "GET", "/api/p", headers)
    assert resp.status == 200
    assert all(SPOOF not in v for _, v in upstream.last.headers)
    got = sorted((k.lower(), v) for k, v in identity_headers_seen(upstream.last.headers))
    assert got == sorted([("x-wx-openid", session["openid"]), ("x-wx-appid", APPID),
                          ("x-wx-unionid", session["unionid"]), ("x-mp-platform", "wecom"),
                          ("x-wx-corpid", WECOM_CORPID)])


async def test_underscored_identity_header_names_strip_every_spelling(
        make_gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = await make_gateway(identity_headers={"openid": "X_WX_OPENID"})
    for spelling in ("X-WX-OPENID", "X_WX_OPENID", "x_wx_openid", "x-Wx-OpenId"):
        resp = await raw_request(gw, "GET", "/public/p", [(spelling, "forged")])
        assert resp.status == 200
        seen = [v for k, v in upstream.last.headers
                if k.strip().lower().replace("_", "-") == "x-wx-openid"]
        assert seen == [], (spelling, upstream.last.headers)


@pytest.mark.parametrize("path", ["/api/p", "/maybe/p", "/public/p"])
@pytest.mark.parametrize("scheme", ["Bearer", "Basic"])
async def test_authorization_is_never_forwarded(
        gw: TestClient, upstream: Upstream, path: str, scheme: str) -> None:
    if scheme == "Bearer":
        value = f"Bearer {(await login(gw))['token']}"
    else:
        value = "Basic dXNlcjpwYXNzd29yZA=="
    resp = await gw.get(path, headers={"Authorization": value})
    if path.startswith("/api/") and scheme == "Basic":
        await expect_error(resp, 401, "unauthorized")
        assert upstream.seen == []
        return
    assert resp.status == 200
    assert upstream.last.header("Authorization") == []
    assert all(value not in v for _, v in upstream.last.headers)


# --- method, path, query and body ----------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"])
async def test_method_is_forwarded(gw: TestClient, upstream: Upstream, method: str) -> None:
    body = b"" if method in ("GET", "HEAD", "OPTIONS") else f"payload for {method}".encode()
    resp = await gw.request(method, "/public/thing?x=1", data=body or None)
    assert resp.status == 200
    assert upstream.last.method == method
    assert upstream.last.raw_path == "/public/thing?x=1"
    assert upstream.last.body == body
    if method == "HEAD":
        assert await resp.read() == b""
    else:
        assert await resp.json() == {"ok": True, "body_bytes": len(body)}


@pytest.mark.parametrize("target", [
    "/public/a%20b/caf%C3%A9",
    "/public/caf%c3%a9?name=%E4%B8%AD%E6%96%87&q=a%20b+c",
    "/public/x?tag=1&tag=2&tag=1&empty=&flag",
    "/public/%7Euser/%41b?q=%7E",
    "/public/x?next=/a/../b&enc=%2F%2e%2e%2F&slash=//x",
    "/public/a;b=c/d,e/f:g@h!$'()*",
    "/public",
])
async def test_raw_path_and_query_reach_upstream_unchanged(
        gw: TestClient, upstream: Upstream, target: str) -> None:
    resp = await raw_request(gw, "GET", target)
    assert resp.status == 200, resp.body
    assert upstream.last.raw_path == target


async def test_empty_query_reaches_upstream_as_sent(gw: TestClient, upstream: Upstream) -> None:
    # The request target is forwarded byte for byte, an empty query included.
    for target in ("/public/x?", "/public/x", "/public/x?&", "/public/x?a=%2F&b"):
        resp = await raw_request(gw, "GET", target)
        assert resp.status == 200, resp.body
        assert upstream.last.raw_path == target


async def test_binary_body_of_several_mib_arrives_intact(
        gw: TestClient, upstream: Upstream) -> None:
    data = os.urandom(3 * 1024 * 1024 + 7)
    resp = await gw.post("/public/upload", data=data,
                         headers={"Content-Type": "application/octet-stream"})
    assert resp.status == 200
    assert (await resp.json())["body_bytes"] == len(data)
    assert upstream.last.body == data
    assert upstream.last.header("Content-Type") == ["application/octet-stream"]


async def test_chunked_request_body_streams_to_upstream(
        gw: TestClient, upstream: Upstream) -> None:
    parts = [os.urandom(50_000) for _ in range(20)] + [b"\x00\xff" * 10]

    async def body() -> AsyncIterator[bytes]:
        for part in parts:
            yield part
            await asyncio.sleep(0)

    session = await login(gw)
    resp = await gw.put("/api/stream", data=body(), headers=bearer(session["token"]))
    assert resp.status == 200
    assert upstream.last.method == "PUT"
    assert upstream.last.body == b"".join(parts)


@pytest.mark.parametrize("base", ["/base", "/base/"])
async def test_route_base_path_is_prepended(
        make_gateway: GatewayFactory, upstream: Upstream, base: str) -> None:
    client = await make_gateway(routes=[
        {"path": "/api/", "upstream": upstream.url + base, "auth": "public"}])
    resp = await raw_request(client, "GET", "/api/x/y%20z?q=1&q=2")
    assert resp.status == 200
    assert upstream.last.raw_path == "/base/api/x/y%20z?q=1&q=2"


async def test_longest_prefix_wins(make_gateway: GatewayFactory, upstream: Upstream) -> None:
    client = await make_gateway(routes=[
        {"path": "/api/", "upstream": upstream.url, "auth": "public"},
        {"path": "/api/admin/", "upstream": upstream.url, "auth": "required"}])
    await expect_error(await client.get("/api/admin/users"), 401, "unauthorized")
    await expect_error(await client.get("/api/admin"), 401, "unauthorized")
    assert upstream.seen == []
    assert (await client.get("/api/users")).status == 200
    assert upstream.last.raw_path == "/api/users"
    # a sibling that merely shares the characters is not under /api/admin/
    assert (await client.get("/api/administrator")).status == 200
    assert upstream.last.raw_path == "/api/administrator"
    session = await login(client)
    assert (await client.get("/api/admin/users", headers=bearer(session["token"]))).status == 200
    assert upstream.last.header("X-WX-OpenID") == [session["openid"]]


@pytest.mark.parametrize("path", ["/apiary", "/api-v2/x", "/publicity", "/maybes/x"])
async def test_prefix_matches_whole_segments_only(
        gw: TestClient, upstream: Upstream, path: str) -> None:
    await expect_error(await gw.get(path), 404, "not_found")
    assert upstream.seen == []


@pytest.mark.timeout(120)
@pytest.mark.parametrize("size", [16 * 1024 + 1, 40_000, 64 * 1024, 64 * 1024 + 1])
async def test_bodies_around_the_read_whole_limit_arrive_intact(
        make_gateway: GatewayFactory, upstream: Upstream, size: int) -> None:
    # Up to 64 KiB a request body is read whole and sent with the headers; beyond, it streams.
    # Neither is bound by the 16 KiB limit of the gateway's own endpoints.
    gw = await make_gateway()
    body = os.urandom(size)
    resp = await gw.post("/public/upload", data=body,
                         headers={"Content-Type": "application/octet-stream"})
    assert resp.status == 200, await resp.text()
    assert upstream.last.body == body
    assert upstream.last.header("Content-Length") == [str(size)]


@pytest.mark.timeout(120)
async def test_expect_100_continue_on_a_proxied_route(
        launch: Launch, config_dict: dict[str, Any], upstream: Upstream) -> None:
    gw = await launch(config_dict)
    async with aiohttp.ClientSession() as http:
        await gw.wait_healthy(http)
    body = b"z" * 3000
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(b"POST /public/upload HTTP/1.1\r\nHost: gw.test\r\n"
                     b"Content-Length: 3000\r\nExpect: 100-continue\r\n\r\n")
        await writer.drain()
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim.startswith(b"HTTP/1.1 100"), interim  # asked before the body is sent
        writer.write(body)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200"), head
    finally:
        writer.close()
    assert upstream.last.body == body
    assert upstream.last.header("Expect") == []  # the gateway answered it; not forwarded


async def test_real_process_forwards_a_gzip_request_body_untouched(
        launch: Launch, config_dict: dict[str, Any], upstream: Upstream) -> None:
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
    # 5000 bytes mean it got the whole gzip stream, as sent, not a body inflated by the gateway
    # and cut to the compressed Content-Length.
    assert seen.body == b"A" * 5000
    assert seen.header("Content-Encoding") == ["gzip"]
    assert seen.header("Content-Length") == [str(len(body))]
    # and a gzip login body is bad input (400), not a crash
    login_req = build_request("POST", "/auth/login", [b"Content-Encoding: gzip"],
                              body=b"\x1f\x8bnot really gzip")
    answer = await raw_exchange("127.0.0.1", gw.port, login_req)
    assert answer.status == 400 and answer.json()["error"] == "invalid_request"


# --- headers the gateway sets or removes -----------------------------------------------------


async def test_x_forwarded_headers_are_set_and_client_values_replaced(
        gw: TestClient, upstream: Upstream) -> None:
    resp = await raw_request(gw, "GET", "/public/fw", [
        ("X-Forwarded-For", "6.6.6.6"), ("X-Forwarded-For", "7.7.7.7, 8.8.8.8"),
        ("X-Forwarded-Proto", "https"), ("X-Forwarded-Host", "evil.example"),
        ("Forwarded", "for=6.6.6.6;proto=https;host=evil.example")],
        host="mini.example.com:8443")
    assert resp.status == 200
    seen = upstream.last
    assert seen.header("X-Forwarded-For") == ["127.0.0.1"]
    assert seen.header("X-Forwarded-Proto") == ["http"]
    assert seen.header("X-Forwarded-Host") == ["mini.example.com:8443"]
    assert seen.header("Forwarded") == []


async def test_x_forwarded_host_is_the_host_the_client_used(
        gw: TestClient, upstream: Upstream) -> None:
    resp = await gw.get("/public/fw")
    assert resp.status == 200
    assert upstream.last.header("X-Forwarded-Host") == [f"{gw.server.host}:{gw.server.port}"]
    assert upstream.last.header("X-Forwarded-For") == ["127.0.0.1"]


async def test_host_sent_upstream_is_the_upstreams(gw: TestClient, upstream: Upstream) -> None:
    resp = await raw_request(gw, "GET", "/public/h", host="mini.example.com")
    assert resp.status == 200
    assert upstream.last.header("Host") == [f"127.0.0.1:{upstream.server.port}"]  # type: ignore[union-attr]


async def test_sane_request_id_is_kept_and_returned(gw: TestClient, upstream: Upstream) -> None:
    rid = "req-42_abc.DEF:9@x/y+z="
    resp = await gw.get("/public/rid", headers={"X-Request-ID": rid})
    assert resp.status == 200
    assert upstream.last.header("X-Request-ID") == [rid]
    assert resp.headers.getall("X-Request-ID") == [rid]


@pytest.mark.parametrize("rid", [
    b"x" * 129, b"has space", "caf\u00e9".encode(), b"a\tb", b"<script>", b"a,b", b""])
async def test_insane_request_id_is_replaced_by_a_generated_one(
        gw: TestClient, upstream: Upstream, rid: bytes) -> None:
    resp = await raw_request(gw, "GET", "/public/rid", [("X-Request-ID", rid)])
    assert resp.status == 200
    sent_upstream = upstream.last.header("X-Request-ID")
    assert len(sent_upstream) == 1
    generated = sent_upstream[0]
    assert generated.encode("latin-1") != rid
    assert re.fullmatch(r"[A-Za-z0-9._:@/+=-]{8,128}", generated)
    assert resp.header("X-Request-ID") == [generated]


async def test_request_id_is_generated_when_none_is_sent(
        gw: TestClient, upstream: Upstream) -> None:
    first = await gw.get("/public/a")
    first_upstream = upstream.last.header("X-Request-ID")
    second = await gw.get("/public/b")
    assert first.status == second.status == 200
    assert len(first_upstream) == 1 and re.fullmatch(r"[A-Za-z0-9._:@/+=-]{8,128}",
                                                      first_upstream[0])
    assert first.headers.getall("X-Request-ID") == first_upstream
    assert second.headers["X-Request-ID"] == upstream.last.header("X-Request-ID")[0]
    assert second.headers["X-Request-ID"] != first.headers["X-Request-ID"]


async def test_request_id_is_on_gateway_error_responses(gw: TestClient) -> None:
    resp = await gw.get("/api/x", headers={"X-Request-ID": "err-trace-1"})
    await expect_error(resp, 401, "unauthorized")
    assert resp.headers["X-Request-ID"] == "err-trace-1"
    resp = await gw.get("/nowhere")
    await expect_error(resp, 404, "not_found")
    assert re.fullmatch(r"[A-Za-z0-9._:@/+=-]{8,128}", resp.headers["X-Request-ID"])


async def test_hop_by_hop_headers_are_not_forwarded(gw: TestClient, upstream: Upstream) -> None:
    resp = await raw_request(gw, "GET", "/public/hop", [
        ("Connection", "close, X-Secret-Hop"), ("X-SECRET-HOP", "secret"),
        ("Keep-Alive", "timeout=5, max=100"), ("TE", "trailers"), ("Trailer", "X-Checksum"),
        ("Upgrade", "h2c"), ("Proxy-Authorization", "Basic cHJveHk6cGFzcw=="),
        ("Proxy-Connection", "keep-alive"), ("X-End-To-End", "kept")])
    assert resp.status == 200
    seen = upstream.last
    for name in ("X-Secret-Hop", "Keep-Alive", "TE", "Trailer", "Upgrade",
                 "Proxy-Authorization", "Proxy-Connection"):
        assert seen.header(name) == [], name
    assert all("x-secret-hop" not in v.lower() and "close" not in v.lower()
               for v in seen.header("Connection"))
    assert all("secret" not in v and "cHJveHk6cGFzcw" not in v for _, v in seen.headers)
    assert seen.header("X-End-To-End") == ["kept"]


async def test_connection_listed_header_in_a_second_connection_header_is_dropped(
        gw: TestClient, upstream: Upstream) -> None:
    resp = await raw_request(gw, "GET", "/public/hop", [
        ("Connection", "close"), ("Connection", "x-hop-one, X-Hop-Two"),
        ("X-Hop-One", "1"), ("x-hop-two", "2"), ("X-Stays", "3")])
    assert resp.status == 200
    assert upstream.last.header("X-Hop-One") == []
    assert upstream.last.header("X-Hop-Two") == []
    assert upstream.last.header("X-Stays") == ["3"]


# --- the response side -----------------------------------------------------------------------


@pytest.fixture
async def custom_upstream(aiohttp_server: Any) -> Any:
    """A second upstream with answers the recording one does not give."""
    payload = gzip.compress(b"compressed hello " * 2000)

    async def gzipped(request: web.Request) -> web.Response:
        return web.Response(body=payload, headers={
            "Content-Encoding": "gzip", "Content-Type": "text/plain; charset=utf-8",
            "Vary": "Accept-Encoding"})

    async def created(request: web.Request) -> web.Response:
        resp = web.Response(status=201, text="made", headers={
            "X-Custom": "custom-value", "Cache-Control": "no-store", "Location": "/things/7",
            "Connection": "X-Upstream-Hop", "X-Upstream-Hop": "private",
            "Keep-Alive": "timeout=1", "X-Request-ID": "upstream-chosen"})
        resp.headers.add("X-Multi", "one")
        resp.headers.add("X-Multi", "two")
        return resp

    app = web.Application()
    app.router.add_get("/gz", gzipped)
    app.router.add_route("*", "/created", created)
    server = await aiohttp_server(app)
    server.gzip_payload = payload
    return server


async def test_upstream_status_and_headers_pass_through(
        make_gateway: GatewayFactory, custom_upstream: Any) -> None:
    client = await make_gateway(routes=[
        {"path": "/", "upstream": f"http://127.0.0.1:{custom_upstream.port}", "auth": "public"}])
    resp = await raw_request(client, "POST", "/created", [("X-Request-ID", "client-rid-1")],
                             body=b"{}")
    assert resp.status == 201
    assert resp.body == b"made"
    assert resp.header("X-Custom") == ["custom-value"]
    assert resp.header("Cache-Control") == ["no-store"]
    assert resp.header("Location") == ["/things/7"]
    assert resp.header("X-Multi") == ["one", "two"]
    assert resp.header("X-Upstream-Hop") == []  # named in the upstream's Connection header
    assert resp.header("Keep-Alive") == []
    assert resp.header("X-Request-ID") == ["client-rid-1"]  # the gateway's id, not upstream's


async def test_two_set_cookie_headers_stay_two(gw: TestClient, upstream: Upstream) -> None:
    resp = await raw_request(gw, "GET", "/public/cookies")
    assert resp.status == 200
    assert resp.header("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]
    assert resp.body == b"cookies"


@pytest.mark.parametrize("code", [400, 401, 403, 404, 409, 418, 429, 500, 502, 503, 504])
async def test_upstream_errors_pass_through_unchanged(
        gw: TestClient, upstream: Upstream, code: int) -> None:
    resp = await gw.get(f"/public/status/{code}")
    assert resp.status == code
    assert await resp.text() == "upstream says"
    assert resp.headers["Content-Type"].startswith("text/plain")
    assert len(upstream.seen) == 1


async def test_multi_mib_streamed_download_arrives_complete(
        gw: TestClient, upstream: Upstream) -> None:
    n = 6 * 1024 * 1024 + 321
    session = await login(gw)
    resp = await gw.get(f"/api/bytes/{n}", headers=bearer(session["token"]))
    assert resp.status == 200
    body = await resp.read()
    assert len(body) == n
    assert body == b"x" * n
    assert resp.headers["X-Request-ID"]


async def test_gzip_response_is_passed_through_still_compressed(
        make_gateway: GatewayFactory, custom_upstream: Any) -> None:
    client = await make_gateway(routes=[
        {"path": "/", "upstream": f"http://127.0.0.1:{custom_upstream.port}", "auth": "public"}])
    resp = await raw_request(client, "GET", "/gz", [("Accept-Encoding", "gzip")])
    assert resp.status == 200
    assert resp.header("Content-Encoding") == ["gzip"]
    assert resp.body == custom_upstream.gzip_payload
    assert gzip.decompress(resp.body) == b"compressed hello " * 2000
    lengths = resp.header("Content-Length")
    assert lengths in ([], [str(len(custom_upstream.gzip_payload))])


async def test_cookies_are_not_kept_between_users(gw: TestClient, upstream: Upstream) -> None:
    alice, bob = await login(gw), await login(gw)
    resp = await raw_request(gw, "GET", "/api/cookies",
                             [("Authorization", f"Bearer {alice['token']}")])
    assert resp.status == 200
    assert resp.header("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]
    resp = await raw_request(gw, "GET", "/api/next",
                             [("Authorization", f"Bearer {bob['token']}")])
    assert resp.status == 200
    assert upstream.last.header("X-WX-OpenID") == [bob["openid"]]
    assert upstream.last.header("Cookie") == []
    # a client's own cookie passes alone, nothing remembered is merged in
    resp = await raw_request(gw, "GET", "/public/next", [("Cookie", "c=3")])
    assert resp.status == 200
    assert upstream.last.header("Cookie") == ["c=3"]


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/nowhere", "/auth", "/auth/unknown", "/health"])
async def test_unknown_path_is_404(gw: TestClient, upstream: Upstream, path: str) -> None:
    await expect_error(await gw.get(path), 404, "not_found")
    assert upstream.seen == []


async def test_unreachable_upstream_is_502(make_gateway: GatewayFactory) -> None:
    client = await make_gateway(routes=[
        {"path": "/api/", "upstream": f"http://127.0.0.1:{free_port()}", "auth": "public"}])
    await expect_error(await client.get("/api/x"), 502, "upstream_unavailable")
    await expect_error(await client.post("/api/x", data=b"body"), 502, "upstream_unavailable")


async def test_slow_upstream_is_504_after_the_route_timeout(
        make_gateway: GatewayFactory, upstream: Upstream) -> None:
    client = await make_gateway(routes=[
        {"path": "/api/", "upstream": upstream.url, "auth": "public", "timeout": "300ms"}])
    started = time.monotonic()
    resp = await client.get("/api/slow/1500")
    elapsed = time.monotonic() - started
    await expect_error(resp, 504, "upstream_timeout")
    assert 0.25 <= elapsed < 1.2
    assert (await client.get("/api/slow/10")).status == 200  # within the timeout: fine


@pytest.fixture
async def redis_down(make_gateway: GatewayFactory) -> TestClient:
    return await make_gateway(redis={"url": closed_port_url(), "key_prefix": "x:"})


async def test_redis_down_required_route_fails_closed(
        gw: TestClient, redis_down: TestClient, upstream: Upstream) -> None:
    session = await login(gw)  # a genuine token, signed with the same key
    resp = await redis_down.get("/api/x", headers=bearer(session["token"]))
    await expect_error(resp, 503, "store_unavailable")
    assert upstream.seen == []


async def test_redis_down_optional_route_with_token_fails_closed(
        gw: TestClient, redis_down: TestClient, upstream: Upstream) -> None:
    session = await login(gw)
    resp = await redis_down.get("/maybe/x", headers=bearer(session["token"]))
    await expect_error(resp, 503, "store_unavailable")
    assert upstream.seen == []


async def test_redis_down_optional_route_without_token_is_forwarded(
        redis_down: TestClient, upstream: Upstream) -> None:
    resp = await redis_down.get("/maybe/x")
    assert resp.status == 200
    assert upstream.last.raw_path == "/maybe/x"
    assert identity_headers_seen(upstream.last.headers) == []


async def test_redis_down_public_route_keeps_working(
        gw: TestClient, redis_down: TestClient, upstream: Upstream) -> None:
    session = await login(gw)
    resp = await redis_down.get("/public/x", headers=bearer(session["token"]))
    assert resp.status == 200
    assert await resp.json() == {"ok": True, "body_bytes": 0}
    assert upstream.last.raw_path == "/public/x"
    assert identity_headers_seen(upstream.last.headers) == []


# --- path safety -----------------------------------------------------------------------------


@pytest.mark.parametrize("target", [
    "/public/../api/x", "/public/%2e%2e/api/x", "/public/%2E%2e/api/x", "/public/.%2e/api/x",
    "/public//x", "/public/a%2fb", "/public/a%2Fb", "/public/a%5cb", "/public/a\\b",
    "/public/%00", "/public/a%0db", "/public/a%0ab", "/public/%c0%ae%c0%ae/api", "/public/./x",
    "/public/%252e%252e/api", "/public/%252fapi", "/public/..", "/public/x/%2e",
    "/public/../healthz", "/maybe/../api/x?y=1", "//public/x",
])
async def test_ambiguous_paths_are_refused(
        gw: TestClient, upstream: Upstream, target: str) -> None:
    session = await login(gw)
    resp = await raw_request(gw, "GET", target, [("Authorization", f"Bearer {session['token']}")])
    await expect_error(resp, 400, "invalid_path")
    assert upstream.seen == []


@pytest.mark.parametrize("target", ["/public/a%20b", "/public/a.b/c..d/...", "/public/%2e%2ex"])
async def test_plain_paths_with_escapes_or_dots_pass(
        gw: TestClient, upstream: Upstream, target: str) -> None:
    resp = await raw_request(gw, "GET", target)
    assert resp.status == 200, resp.body
    assert upstream.last.raw_path == target


async def test_gateway_endpoints_win_over_a_catch_all_route(
        make_gateway: GatewayFactory, upstream: Upstream) -> None:
    client = await make_gateway(routes=[
        {"path": "/", "upstream": upstream.url, "auth": "public"}])
    resp = await client.get("/healthz")
    assert resp.status == 200
    assert await resp.json() == {"status": "ok"}
    session = await login(client)
    assert session["token_type"] == "Bearer"
    await expect_error(await client.get("/auth/login"), 405, "method_not_allowed")
    resp = await client.get("/metrics")
    assert resp.status == 200 and "wxgw_requests_total" in await resp.text()
    assert upstream.seen == []
    resp = await client.get("/anything/else?x=1")
    assert resp.status == 200
    assert upstream.last.raw_path == "/anything/else?x=1"
    assert (await client.get("/")).status == 200
    assert upstream.last.raw_path == "/"
