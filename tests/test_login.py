"""POST /auth/login: every login row of the error table in docs/endpoints.md, the success body, and the
call to WeChat's jscode2session as it goes over the wire."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from checks import expect_error
from conftest import (APPID, APPID2, SECRET, SECRET2, TWO_APPS, GatewayFactory, Served, Upstream,
                      bearer,
                      WECOM_APPS, WECOM_CORPID, claims_of, closed_port_url, fresh, login,
                      make_wecom_session)
from gateway.testing import simulator
from gateway.testing.embedded import free_port


# --- a scriptable WeChat, for replies the simulator cannot make and to see the query ------------

Reply = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class ScriptedWeChat(Served):
    queries: list[dict[str, list[str]]] = field(default_factory=list)
    raw_queries: list[str] = field(default_factory=list)
    reply: Reply | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        assert request.path == "/sns/jscode2session", request.path
        self.raw_queries.append(request.query_string)
        self.queries.append({k: request.query.getall(k) for k in request.query})
        if self.reply is not None:
            return await self.reply(request)
        return text_plain({"openid": "o-scripted", "session_key": "c2Vzc2lvbmtleQ==",
                           "unionid": "u-scripted"})


def text_plain(body: Any) -> web.Response:
    return web.Response(text=json.dumps(body), content_type="text/plain")


@pytest.fixture
async def scripted(aiohttp_server: Any) -> ScriptedWeChat:
    fake = ScriptedWeChat()
    app = web.Application()
    app.router.add_get("/sns/jscode2session", fake.handle)
    fake.server = await aiohttp_server(app)
    return fake


@pytest.fixture
def with_wechat(make_gateway: GatewayFactory) -> Callable[..., Awaitable[TestClient]]:
    async def make(api_base: str, timeout: str = "1s", **overrides: Any) -> TestClient:
        return await make_gateway(wechat={"api_base": api_base, "timeout": timeout}, **overrides)
    return make


# --- invalid requests ---------------------------------------------------------------------------

@pytest.mark.parametrize("raw", [
    b"", b"not json", b"{\"code\": ", b"\xff\xfe\x00", b"code=abc",
], ids=["empty", "text", "truncated", "not-utf8", "form"])
async def test_body_not_json_is_invalid_request(gw: TestClient, raw: bytes) -> None:
    resp = await gw.post("/auth/login", data=raw, headers={"Content-Type": "application/json"})
    await expect_error(resp, 400, "invalid_request")


@pytest.mark.parametrize("body", [
    [], [{"code": "abc"}], "abc", 42, 4.2, True, None,
], ids=["empty-array", "array", "string", "int", "float", "bool", "null"])
async def test_json_that_is_not_an_object_is_invalid_request(gw: TestClient, body: Any) -> None:
    resp = await gw.post("/auth/login", data=json.dumps(body))
    await expect_error(resp, 400, "invalid_request")


@pytest.mark.parametrize("body", [
    {},
    {"appid": APPID},
    {"code": None},
    {"code": 12345},
    {"code": ["abc"]},
    {"code": {"value": "abc"}},
    {"code": True},
    {"code": ""},
    {"code": "a" * 129},
    {"code": "abc\x01def"},
    {"code": "abc\ndef"},
    {"code": "abc\tdef"},
    {"code": "abc\x7fdef"},
    {"code": "c\u00f3digo"},
    {"code": "\u5fae\u4fe1"},
    {"code": "abc\u00a0"},
], ids=["missing", "missing-with-appid", "null", "number", "list", "object", "bool", "empty",
        "129-chars", "control-char", "newline", "tab", "DEL", "latin1", "cjk", "nbsp"])
async def test_bad_code_is_invalid_request_naming_code(
        gw: TestClient, wechat: TestServer, body: dict[str, Any]) -> None:
    resp = await gw.post("/auth/login", json=body)
    error = await expect_error(resp, 400, "invalid_request")
    assert "code" in error["message"]
    # rejected before any call to WeChat
    assert wechat.app[simulator.CALLS]["jscode2session"] == 0


async def test_code_of_exactly_128_printable_chars_is_accepted(gw: TestClient) -> None:
    code = ("x-" + uuid.uuid4().hex + "!~ ").ljust(128, "z")
    assert len(code) == 128
    data = await login(gw, code)
    assert data["openid"] == simulator.openid_for(APPID, code)


async def test_body_of_any_content_type_is_parsed(gw: TestClient) -> None:
    # wx.request's default Content-Type differs between versions
    code = fresh()
    resp = await gw.post("/auth/login", data=json.dumps({"code": code}),
                         headers={"Content-Type": "text/plain"})
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["openid"] == simulator.openid_for(APPID, code)


async def test_login_body_sent_in_chunks_is_read_whole(gw: TestClient) -> None:
    """A chunked request body (no Content-Length) that arrives in pieces is still one JSON."""
    code = fresh()
    raw = json.dumps({"code": code}).encode()

    async def pieces() -> AsyncIterator[bytes]:
        yield raw[:5]
        await asyncio.sleep(0.05)
        yield raw[5:]

    resp = await gw.post("/auth/login", data=pieces())
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["openid"] == simulator.openid_for(APPID, code)


# --- apps ---------------------------------------------------------------------------------------

async def test_unconfigured_appid_is_unknown_app(gw: TestClient, wechat: TestServer) -> None:
    resp = await gw.post("/auth/login", json={"code": fresh(), "appid": APPID2})
    await expect_error(resp, 400, "unknown_app")
    resp = await gw.post("/auth/login", json={"code": fresh(), "appid": "wxdoesnotexist00"})
    await expect_error(resp, 400, "unknown_app")
    assert wechat.app[simulator.CALLS]["jscode2session"] == 0


async def test_appid_omitted_while_two_apps_are_configured_is_unknown_app(
        make_gateway: GatewayFactory, wechat: TestServer) -> None:
    gw2 = await make_gateway(apps=TWO_APPS)
    resp = await gw2.post("/auth/login", json={"code": fresh()})
    await expect_error(resp, 400, "unknown_app")
    assert wechat.app[simulator.CALLS]["jscode2session"] == 0


@pytest.mark.parametrize("appid,secret", [(APPID, SECRET), (APPID2, SECRET2)])
async def test_explicit_appid_with_two_apps_logs_in_to_that_app(
        make_gateway: GatewayFactory, appid: str, secret: str) -> None:
    gw2 = await make_gateway(apps=TWO_APPS)
    code = fresh()
    data = await login(gw2, code, appid=appid)
    assert data["openid"] == simulator.openid_for(appid, code)
    assert claims_of(data["token"])["aud"] == appid
    resp = await gw2.get("/auth/verify", headers=bearer(data["token"]))
    assert resp.status == 200
    assert resp.headers["X-WX-AppID"] == appid
    resp = await gw2.get("/auth/session", headers=bearer(data["token"]))
    assert (await resp.json())["appid"] == appid


async def test_single_app_accepts_its_appid_explicitly(gw: TestClient) -> None:
    data = await login(gw, appid=APPID)
    assert claims_of(data["token"])["aud"] == APPID


# --- WeChat's answers ---------------------------------------------------------------------------

@pytest.mark.parametrize("code,status,error", [
    ("errcode-40029-x", 401, "invalid_code"),
    ("errcode-40163-x", 401, "invalid_code"),
    ("errcode-40226-x", 403, "user_blocked"),
    ("errcode-45011-x", 429, "rate_limited"),
    ("errcode--1-x", 503, "wechat_unavailable"),
    ("errcode-99999-x", 502, "wechat_error"),
    ("errcode-40125-x", 502, "wechat_error"),
    ("errcode-41008-x", 502, "wechat_error"),
    # errcode as a JSON string, read as the number it spells
    ("errstr-40029-x", 401, "invalid_code"),
    ("errstr-40163-x", 401, "invalid_code"),
    ("errstr-40226-x", 403, "user_blocked"),
    ("errstr-45011-x", 429, "rate_limited"),
    ("errstr--1-x", 503, "wechat_unavailable"),
    ("errstr-99999-x", 502, "wechat_error"),
    ("errstr-busy-x", 502, "wechat_error"),
    ("errstr--x", 502, "wechat_error"),
    ("http-500-x", 502, "wechat_error"),
    ("http-502-x", 502, "wechat_error"),
    ("http-404-x", 502, "wechat_error"),
    ("garbage-x", 502, "wechat_error"),
    ("noopenid-x", 502, "wechat_error"),
    ("reset-x", 502, "wechat_error"),
])
async def test_wechat_outcome_maps_to_error(gw: TestClient, redis: Any, key_prefix: str,
                                            wechat: TestServer, code: str, status: int,
                                            error: str) -> None:
    resp = await gw.post("/auth/login", json={"code": code + uuid.uuid4().hex[:6]})
    await expect_error(resp, status, error)
    calls = wechat.app[simulator.CALLS]["jscode2session"]
    # aiohttp retries an idempotent GET once when the server drops the connection
    assert calls == 1 or (code.startswith("reset-") and calls == 2), calls
    assert await redis.keys(f"{key_prefix}*") == []  # no session was created


async def test_reused_single_use_code_is_invalid_code(gw: TestClient) -> None:
    code = fresh()
    await login(gw, code)
    resp = await gw.post("/auth/login", json={"code": code})
    await expect_error(resp, 401, "invalid_code")


async def test_wrong_secret_configured_is_wechat_error(make_gateway: GatewayFactory) -> None:
    gw2 = await make_gateway(apps=[{"appid": APPID, "secret": "not-the-secret"}])
    resp = await gw2.post("/auth/login", json={"code": fresh()})
    await expect_error(resp, 502, "wechat_error")


@pytest.mark.parametrize("reply", [
    {"session_key": "c2s="},
    {"openid": "o-x"},
    {"openid": "", "session_key": "c2s="},
    {"openid": "o-x", "session_key": ""},
    {"openid": 123, "session_key": "c2s="},
    {"openid": "o-x", "session_key": None},
    {"errcode": 0, "errmsg": "ok"},
], ids=["no-openid", "no-session-key", "empty-openid", "empty-session-key", "openid-number",
        "session-key-null", "only-errcode-0"])
async def test_reply_without_openid_or_session_key_is_wechat_error(
        with_wechat: Any, scripted: ScriptedWeChat, redis: Any, key_prefix: str,
        reply: dict[str, Any]) -> None:
    async def answer(request: web.Request) -> web.Response:
        return text_plain(reply)
    scripted.reply = answer
    gw2 = await with_wechat(scripted.url)
    resp = await gw2.post("/auth/login", json={"code": fresh()})
    await expect_error(resp, 502, "wechat_error")
    assert len(scripted.queries) == 1
    assert await redis.keys(f"{key_prefix}*") == []


@pytest.mark.parametrize("raw", [
    '{"errcode": 40029, "errcode": 0, "openid": "o-x", "session_key": "c2s="}',
    '{"openid": "o-a", "session_key": "c2s=", "openid": "o-b"}',
    '{"openid": "o-x", "session_key": "c2s=", "x": {"a": 1, "a": 2}}',
    '{"openid": "o-x", "session_key": "c2s=", "x": ' + "[" * 30000 + "]" * 30000 + "}",
], ids=["errcode-twice", "openid-twice", "nested-key-twice", "nested-30000-deep"])
async def test_reply_with_a_key_given_twice_or_nested_too_deep_is_wechat_error(
        with_wechat: Any, scripted: ScriptedWeChat, redis: Any, key_prefix: str,
        raw: str) -> None:
    # Which copy of a key counts differs between JSON readers: a reply that says two things
    # is not trusted to name the user.
    async def answer(request: web.Request) -> web.Response:
        return web.Response(text=raw, content_type="text/plain")
    scripted.reply = answer
    gw2 = await with_wechat(scripted.url)
    resp = await gw2.post("/auth/login", json={"code": fresh()})
    await expect_error(resp, 502, "wechat_error")
    assert await redis.keys(f"{key_prefix}*") == []


@pytest.mark.parametrize("field,value", [
    ("openid", "o-x\r\nX-WX-OpenID: admin"), ("openid", "o-x\n"), ("openid", "o x"),
    ("openid", " o-x"), ("openid", "o-\u00e9"), ("openid", "o-\x00"), ("openid", "o" * 129),
    ("unionid", "u-x\r\nX-Evil: 1"), ("unionid", "u x"),
])
async def test_ids_that_could_not_be_header_values_are_wechat_error(
        with_wechat: Any, scripted: ScriptedWeChat, redis: Any, key_prefix: str, field: str,
        value: str) -> None:
    reply = {"openid": "o-x", "unionid": "u-x", "session_key": "c2s=", field: value}

    async def answer(request: web.Request) -> web.Response:
        return text_plain(reply)
    scripted.reply = answer
    gw2 = await with_wechat(scripted.url)
    resp = await gw2.post("/auth/login", json={"code": fresh()})
    body = await expect_error(resp, 502, "wechat_error")
    assert value not in body["message"]
    assert await redis.keys(f"{key_prefix}*") == []


async def test_the_longest_usable_openid_reaches_the_upstream(
        with_wechat: Any, scripted: ScriptedWeChat, upstream: Upstream) -> None:
    openid = "o" + "-_.@~!" * 21 + "x"  # 128 printable characters

    async def answer(request: web.Request) -> web.Response:
        return text_plain({"openid": openid, "session_key": "c2s="})
    scripted.reply = answer
    gw2 = await with_wechat(scripted.url)
    data = await login(gw2)
    assert data["openid"] == openid
    assert (await gw2.get("/api/x", headers=bearer(data["token"]))).status == 200
    assert upstream.last.header("X-WX-OpenID") == [openid]


@pytest.mark.parametrize("errcode,status,error", [
    ("40029", 401, "invalid_code"),
    (40029.0, 401, "invalid_code"),
    ("-1", 503, "wechat_unavailable"),
    (" 40029", 502, "wechat_error"),  # int() would strip it; WeChat never pads
    ("4_0029", 502, "wechat_error"),  # int() would accept it
    ("\u0664\u0660\u0660\u0662\u0669", 502, "wechat_error"),  # Arabic-Indic digits
    ("40029.0", 502, "wechat_error"),
    (40029.5, 502, "wechat_error"),
    (True, 502, "wechat_error"),
    ([40029], 502, "wechat_error"),
    ("9" * 5000, 502, "wechat_error"),
])
async def test_errcode_is_read_as_a_number_strictly(
        with_wechat: Any, scripted: ScriptedWeChat, redis: Any, key_prefix: str,
        errcode: Any, status: int, error: str) -> None:
    async def answer(request: web.Request) -> web.Response:
        return text_plain({"errcode": errcode, "errmsg": "x", "openid": "o-x",
                           "session_key": "c2s="})
    scripted.reply = answer
    gw2 = await with_wechat(scripted.url)
    resp = await gw2.post("/auth/login", json={"code": fresh()})
    await expect_error(resp, status, error)
    assert await redis.keys(f"{key_prefix}*") == []


@pytest.mark.parametrize("errcode", [1e300, 10 ** 40, -(10 ** 40)])
async def test_an_errcode_beyond_any_platforms_is_not_a_number(
        with_wechat: Any, scripted: ScriptedWeChat, errcode: Any) -> None:
    async def answer(request: web.Request) -> web.Response:
        return text_plain({"errcode": errcode, "errmsg": "x"})
    scripted.reply = answer
    gw2 = await with_wechat(scripted.url)
    resp = await gw2.post("/auth/login", json={"code": fresh()})
    body = await expect_error(resp, 502, "wechat_error")
    assert "0000000000000" not in body["message"], body  # not echoed, hundreds of digits long


@pytest.mark.parametrize("body,content_type", [
    (b"[1, 2]", "application/json"),
    (b"\"openid\"", "text/plain"),
    (b"", "text/plain"),
    (b"<html><body>upstream error</body></html>", "text/html"),
])
async def test_reply_not_a_json_object_is_wechat_error(
        with_wechat: Any, scripted: ScriptedWeChat, body: bytes, content_type: str) -> None:
    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type=content_type)
    scripted.reply = answer
    gw2 = await with_wechat(scripted.url)
    resp = await gw2.post("/auth/login", json={"code": fresh()})
    await expect_error(resp, 502, "wechat_error")


async def test_wechat_unreachable_is_wechat_error(with_wechat: Any) -> None:
    gw2 = await with_wechat(f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    resp = await gw2.post("/auth/login", json={"code": fresh()})
    await expect_error(resp, 502, "wechat_error")
    assert time.monotonic() - started < 1.0


async def test_wechat_slower_than_timeout_is_wechat_timeout(
        with_wechat: Any, wechat: TestServer) -> None:
    gw2 = await with_wechat(f"http://127.0.0.1:{wechat.port}", timeout="300ms")
    started = time.monotonic()
    resp = await gw2.post("/auth/login", json={"code": fresh("slow-1000-")})
    await expect_error(resp, 504, "wechat_timeout")
    elapsed = time.monotonic() - started
    assert 0.25 < elapsed < 0.9, elapsed


async def test_wechat_slower_but_within_timeout_succeeds(
        with_wechat: Any, wechat: TestServer) -> None:
    gw2 = await with_wechat(f"http://127.0.0.1:{wechat.port}", timeout="1s")
    code = fresh("slow-200-")
    data = await login(gw2, code)
    assert data["openid"] == simulator.openid_for(APPID, code)


async def test_redis_unreachable_is_store_unavailable(
        make_gateway: GatewayFactory, key_prefix: str) -> None:
    gw2 = await make_gateway(redis={"url": closed_port_url(), "key_prefix": key_prefix})
    started = time.monotonic()
    resp = await gw2.post("/auth/login", json={"code": fresh()})
    await expect_error(resp, 503, "store_unavailable")
    assert time.monotonic() - started < 3.0


# --- success ------------------------------------------------------------------------------------

async def test_success_body_shape(gw: TestClient, wechat: TestServer) -> None:
    code = fresh()
    before = int(time.time())
    resp = await gw.post("/auth/login", json={"code": code})
    assert resp.status == 200, await resp.text()
    assert resp.content_type == "application/json"
    assert resp.charset == "utf-8"
    data = await resp.json()
    assert set(data) == {"token", "token_type", "expires_in", "openid", "unionid"}
    assert data["token_type"] == "Bearer"
    assert isinstance(data["expires_in"], int) and 3590 <= data["expires_in"] <= 3600
    assert data["openid"] == simulator.openid_for(APPID, code)
    assert data["unionid"] == simulator.unionid_for(code)
    assert isinstance(data["token"], str) and data["token"].count(".") == 2
    c = claims_of(data["token"])
    assert c["sub"] == data["openid"] and c["aud"] == APPID and c["sid"]
    assert before + 3590 <= c["exp"] <= int(time.time()) + 3600
    assert wechat.app[simulator.CALLS]["jscode2session"] == 1
    # the token works
    resp = await gw.get("/auth/session", headers=bearer(data["token"]))
    assert resp.status == 200
    assert (await resp.json())["openid"] == data["openid"]


async def test_session_and_verify_bodies_name_the_platform_and_the_users_corp(
        gw: TestClient, make_gateway: GatewayFactory, redis: Any, key_prefix: str) -> None:
    data = await login(gw)
    for path in ("/auth/session", "/auth/verify"):
        resp = await gw.get(path, headers=bearer(data["token"]))
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        assert set(body) == {"openid", "unionid", "appid", "expires_at", "platform"}, body
        assert (body["openid"], body["appid"], body["platform"]) == (
            data["openid"], APPID, "wechat")
    assert resp.headers["X-MP-Platform"] == "wechat" and "X-WX-CorpID" not in resp.headers

    await make_wecom_session(redis, key_prefix, data["token"])
    wecom = await make_gateway(apps=WECOM_APPS)
    for path in ("/auth/session", "/auth/verify"):
        resp = await wecom.get(path, headers=bearer(data["token"]))
        assert resp.status == 200, await resp.text()
        body = await resp.json()
        assert set(body) == {"openid", "unionid", "appid", "expires_at", "platform", "corpid"}
        assert (body["platform"], body["corpid"]) == ("wecom", WECOM_CORPID)
    assert resp.headers["X-MP-Platform"] == "wecom"
    assert resp.headers["X-WX-CorpID"] == WECOM_CORPID


async def test_expires_in_follows_session_ttl(make_gateway: GatewayFactory) -> None:
    gw2 = await make_gateway(session={"signing_keys": ["k" * 40], "ttl": "7d"})
    data = await login(gw2)
    assert 7 * 86400 - 5 <= data["expires_in"] <= 7 * 86400


async def test_unionid_null_when_wechat_gives_none(gw: TestClient) -> None:
    code = fresh("nounionid-")
    data = await login(gw, code)
    assert "unionid" in data and data["unionid"] is None
    assert data["openid"] == simulator.openid_for(APPID, code)


async def test_two_logins_give_two_sessions(gw: TestClient) -> None:
    first = await login(gw)
    second = await login(gw)
    assert first["openid"] != second["openid"]
    assert first["token"] != second["token"]
    assert claims_of(first["token"])["sid"] != claims_of(second["token"])["sid"]


async def test_text_plain_json_reply_is_parsed(with_wechat: Any, scripted: ScriptedWeChat) -> None:
    async def answer(request: web.Request) -> web.Response:
        resp = text_plain({"openid": "o-plain", "session_key": "c2Vzc2lvbmtleQ==",
                           "unionid": "u-plain"})
        assert resp.content_type == "text/plain"
        return resp
    scripted.reply = answer
    gw2 = await with_wechat(scripted.url)
    data = await login(gw2)
    assert data["openid"] == "o-plain" and data["unionid"] == "u-plain"


async def test_wechat_reply_delivered_in_pieces_is_read_whole(
        with_wechat: Any, scripted: ScriptedWeChat) -> None:
    body = json.dumps({"openid": "o-pieces", "session_key": "c2Vzc2lvbmtleQ==",
                       "unionid": "u-pieces"}).encode()

    async def answer(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/plain"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(body[:10])
        await asyncio.sleep(0.05)
        await resp.write(body[10:])
        await resp.write_eof()
        return resp
    scripted.reply = answer
    gw2 = await with_wechat(scripted.url)
    resp = await gw2.post("/auth/login", json={"code": fresh()})
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["openid"] == "o-pieces"


@pytest.mark.parametrize("code", [
    "a+b&c=d/e", "x=1&appid=wxevil&secret=s", "%2B%26 ?#/+==", "a&grant_type=client_credential",
])
async def test_query_to_wechat_is_url_encoded(with_wechat: Any, scripted: ScriptedWeChat,
                                              code: str) -> None:
    gw2 = await with_wechat(scripted.url)
    await login(gw2, code)
    assert scripted.queries == [{"appid": [APPID], "secret": [SECRET], "js_code": [code],
                                 "grant_type": ["authorization_code"]}]
    raw = scripted.raw_queries[0]
    assert "&secret=wxevil" not in raw and raw.count("&") == 3, raw


async def test_api_base_with_path_prefix_is_kept(with_wechat: Any, aiohttp_server: Any) -> None:
    hits: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        hits.append(request.path)
        return text_plain({"openid": "o-base", "session_key": "c2s="})
    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    server = await aiohttp_server(app)
    gw2 = await with_wechat(f"http://127.0.0.1:{server.port}/wx-egress/")
    data = await login(gw2)
    assert data["openid"] == "o-base"
    assert hits == ["/wx-egress/sns/jscode2session"]


# --- HTTP plumbing ------------------------------------------------------------------------------

async def test_body_over_16_kib_is_payload_too_large(gw: TestClient, wechat: TestServer) -> None:
    body = json.dumps({"code": fresh(), "pad": "x" * (16 * 1024)}).encode()
    assert len(body) > 16 * 1024
    resp = await gw.post("/auth/login", data=body)
    await expect_error(resp, 413, "payload_too_large")
    assert wechat.app[simulator.CALLS]["jscode2session"] == 0


async def test_body_of_exactly_16_kib_is_accepted(gw: TestClient) -> None:
    code = fresh()
    head = json.dumps({"code": code, "pad": ""}).encode()
    body = json.dumps({"code": code, "pad": "x" * (16 * 1024 - len(head))}).encode()
    assert len(body) == 16 * 1024
    resp = await gw.post("/auth/login", data=body)
    assert resp.status == 200, await resp.text()


async def test_chunked_body_over_16_kib_is_payload_too_large(
        gw: TestClient, wechat: TestServer) -> None:
    raw = json.dumps({"code": fresh(), "pad": "x" * (20 * 1024)}).encode()

    async def pieces() -> AsyncIterator[bytes]:
        for i in range(0, len(raw), 1024):
            yield raw[i:i + 1024]
            await asyncio.sleep(0.002)

    resp = await gw.post("/auth/login", data=pieces())
    await expect_error(resp, 413, "payload_too_large")
    assert wechat.app[simulator.CALLS]["jscode2session"] == 0


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
async def test_wrong_method_is_405_with_allow_post(gw: TestClient, method: str) -> None:
    resp = await gw.request(method, "/auth/login")
    await expect_error(resp, 405, "method_not_allowed")
    assert resp.headers["Allow"] == "POST"


async def test_custom_auth_prefix_moves_the_endpoints(make_gateway: GatewayFactory) -> None:
    gw2 = await make_gateway(auth={"prefix": "/wx"})
    code = fresh()
    resp = await gw2.post("/wx/login", json={"code": code})
    assert resp.status == 200, await resp.text()
    data = await resp.json()
    assert data["openid"] == simulator.openid_for(APPID, code)
    resp = await gw2.get("/wx/session", headers=bearer(data["token"]))
    assert resp.status == 200
    resp = await gw2.get("/wx/verify", headers=bearer(data["token"]))
    assert resp.status == 200
    resp = await gw2.post("/auth/login", json={"code": fresh()})
    await expect_error(resp, 404, "not_found")
    resp = await gw2.get("/auth/session", headers=bearer(data["token"]))
    await expect_error(resp, 404, "not_found")


# --- metrics ------------------------------------------------------------------------------------

async def test_metrics_count_logins_by_outcome(gw: TestClient) -> None:
    await login(gw)
    await login(gw)
    resp = await gw.post("/auth/login", json={"code": fresh("errcode-40029-")})
    await expect_error(resp, 401, "invalid_code")
    resp = await gw.post("/auth/login", json={"code": fresh("errcode-45011-")})
    await expect_error(resp, 429, "rate_limited")
    resp = await gw.post("/auth/login", json={"code": ""})
    await expect_error(resp, 400, "invalid_request")

    resp = await gw.get("/metrics")
    assert resp.status == 200
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(await resp.text()):
        for sample in family.samples:
            if sample.name == "wxgw_logins_total":
                counts[sample.labels["outcome"]] = sample.value
    assert counts.get("ok") == 2
    assert counts.get("invalid_code") == 1
    assert counts.get("rate_limited") == 1
    assert counts.get("invalid_request") == 1


async def test_login_responses_do_not_leak_secret_or_session_key(
        gw: TestClient, wechat: TestServer) -> None:
    code = fresh()
    resp = await gw.post("/auth/login", json={"code": code})
    text = await resp.text()
    session_key = base64.b64encode(
        hashlib.sha256(f"sk/{APPID}/{code}".encode()).digest()[:16]).decode()
    assert SECRET not in text and session_key not in text
    assert SECRET not in json.dumps(claims_of(json.loads(text)["token"]))
    assert session_key not in json.dumps(claims_of(json.loads(text)["token"]))
