"""QQ mini-programs: login through QQ's code2Session (WeChat's API on api.q.qq.com), its
errcode table, user data decrypted with the session_key, and what the upstream receives."""

from __future__ import annotations

import json
import uuid
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from checks import expect_error
from conftest import APPID, SECRET, GatewayFactory, Upstream, bearer, fresh, login
from gateway.testing import simulator
from process import Launch, launch_with_client
from test_douyin import documented_failures
from test_login import ScriptedWeChat, text_plain
from test_profile import login_as, userdata

QQ_APPID = "1109876543"
QQ_SECRET = "qq-secret-1"


@pytest.fixture
async def sim(aiohttp_server: Any) -> TestServer:
    """One simulator for a WeChat app and a QQ app: the same path, each answering its way."""
    app = simulator.create_app({APPID: SECRET, QQ_APPID: QQ_SECRET}, single_use=True,
                               platforms={QQ_APPID: "qq"})
    server: TestServer = await aiohttp_server(app)
    return server


def apps(qq_base: str, secret: str = QQ_SECRET) -> list[dict[str, Any]]:
    return [{"appid": APPID, "secret": SECRET},
            {"appid": QQ_APPID, "secret": secret, "platform": "qq", "api_base": qq_base}]


@pytest.fixture
async def gw(make_gateway: GatewayFactory, sim: TestServer) -> TestClient:
    base = f"http://127.0.0.1:{sim.port}"
    return await make_gateway(wechat={"api_base": base, "timeout": "1s"}, apps=apps(base))


def calls(sim: TestServer, name: str = "qq.jscode2session") -> int:
    return sim.app[simulator.CALLS][name]


async def test_login_gives_a_qq_session(gw: TestClient, sim: TestServer) -> None:
    code = fresh()
    body = await login(gw, code, appid=QQ_APPID)
    assert body["openid"] == simulator.openid_for(QQ_APPID, code)
    assert body["unionid"] == simulator.unionid_for(code)
    assert calls(sim) == 1 and calls(sim, "jscode2session") == 0


async def test_qq_calls_are_timed_under_their_own_name(gw: TestClient) -> None:
    await login(gw, appid=QQ_APPID)
    resp = await gw.post("/auth/login", json={"appid": QQ_APPID, "code": "errcode-40029-x"})
    await expect_error(resp, 401, "invalid_code")
    text = await (await gw.get("/metrics")).text()
    for outcome in ("ok", "invalid_code"):
        assert ('wxgw_wechat_duration_seconds_count{endpoint="qq.jscode2session",'
                f'outcome="{outcome}"}} 1.0') in text, outcome
    assert 'endpoint="jscode2session"' not in text


async def test_upstream_receives_the_qq_identity_and_never_a_forged_one(
        gw: TestClient, upstream: Upstream) -> None:
    session = await login(gw, appid=QQ_APPID)
    resp = await gw.get("/api/orders", headers={
        **bearer(session["token"]), "X-MP-Platform": "wechat", "X-WX-AppID": "forged"})
    assert resp.status == 200, await resp.text()
    seen = upstream.last
    assert seen.header("X-MP-Platform") == ["qq"]
    assert seen.header("X-WX-OpenID") == [session["openid"]]
    assert seen.header("X-WX-UnionID") == [session["unionid"]]
    assert seen.header("X-WX-AppID") == [QQ_APPID]


async def test_wechat_app_on_the_same_simulator_still_answers_as_wechat(
        gw: TestClient, sim: TestServer) -> None:
    code = fresh()
    await login(gw, code, appid=APPID)
    resp = await gw.post("/auth/login", json={"appid": APPID, "code": code})
    await expect_error(resp, 401, "invalid_code")  # WeChat's 40163, code been used
    assert calls(sim, "jscode2session") == 2 and calls(sim) == 0


# code2Session's errcodes: -1 系统繁忙, 40029 code 无效, 45011 频率限制
@pytest.mark.parametrize("code,status,error", [
    ("errcode-40029-x", 401, "invalid_code"),
    ("errcode-45011-x", 429, "rate_limited"),
    ("errcode--1-x", 503, "wechat_unavailable"),
    ("errcode-40163-x", 502, "wechat_error"),  # WeChat's "code been used": not QQ's
    ("errcode-40226-x", 502, "wechat_error"),  # WeChat's high-risk user: not QQ's
    ("errcode-99999-x", 502, "wechat_error"),
    ("errstr-40029-x", 401, "invalid_code"),
    ("errstr--1-x", 503, "wechat_unavailable"),
    ("errstr-busy-x", 502, "wechat_error"),
    ("http-502-x", 502, "wechat_error"),
    ("garbage-x", 502, "wechat_error"),
    ("noopenid-x", 502, "wechat_error"),
    ("slow-1500-x", 504, "wechat_timeout"),
])
async def test_qq_outcome_maps_to_error(gw: TestClient, sim: TestServer, redis: Any,
                                        key_prefix: str, code: str, status: int,
                                        error: str) -> None:
    resp = await gw.post("/auth/login", json={"appid": QQ_APPID,
                                              "code": code + uuid.uuid4().hex[:6]})
    await expect_error(resp, status, error)
    assert calls(sim) == 1
    assert await redis.keys(f"{key_prefix}*") == []


async def test_reused_code_is_invalid_code(gw: TestClient) -> None:
    code = fresh()
    await login(gw, code, appid=QQ_APPID)
    resp = await gw.post("/auth/login", json={"appid": QQ_APPID, "code": code})
    await expect_error(resp, 401, "invalid_code")


async def test_code_another_app_was_given_is_invalid_code(gw: TestClient, redis: Any,
                                                          key_prefix: str) -> None:
    resp = await gw.post("/auth/login", json={"appid": QQ_APPID, "code": f"app-{APPID}-1"})
    await expect_error(resp, 401, "invalid_code")
    assert await redis.keys(f"{key_prefix}*") == []


async def test_wrong_secret_configured_is_wechat_error(make_gateway: GatewayFactory,
                                                       sim: TestServer) -> None:
    gw2 = await make_gateway(apps=apps(f"http://127.0.0.1:{sim.port}", secret="not-it"))
    resp = await gw2.post("/auth/login", json={"appid": QQ_APPID, "code": fresh()})
    await expect_error(resp, 502, "wechat_error")


# --- the reply as QQ words it --------------------------------------------------------------------

@pytest.fixture
async def scripted(aiohttp_server: Any) -> ScriptedWeChat:
    fake = ScriptedWeChat()
    app = web.Application()
    app.router.add_get("/sns/jscode2session", fake.handle)
    fake.server = await aiohttp_server(app)
    return fake


async def test_published_example_logs_in_with_the_documented_query(
        make_gateway: GatewayFactory, scripted: ScriptedWeChat) -> None:
    async def answer(request: web.Request) -> web.Response:
        return text_plain({"errcode": 0, "errmsg": "", "openid": "OPENID",
                           "session_key": "SESSIONKEY", "unionid": "UNIONID"})
    scripted.reply = answer
    gw2 = await make_gateway(apps=apps(scripted.url))
    code = fresh()
    body = await login(gw2, code, appid=QQ_APPID)
    assert (body["openid"], body["unionid"]) == ("OPENID", "UNIONID")
    assert scripted.queries == [{"appid": [QQ_APPID], "secret": [QQ_SECRET], "js_code": [code],
                                 "grant_type": ["authorization_code"]}]


@pytest.mark.parametrize("reply,status,error", [
    ({"errcode": 40029, "errmsg": "invalid code"}, 401, "invalid_code"),
    ({"errcode": "45011", "errmsg": "api minute-quota reach limit"}, 429, "rate_limited"),
    ({"errcode": -1, "errmsg": "system error"}, 503, "wechat_unavailable"),
    ({"errcode": 0, "errmsg": "", "openid": "OPENID"}, 502, "wechat_error"),
    ({"errcode": 0, "errmsg": "", "session_key": "SESSIONKEY"}, 502, "wechat_error"),
    ({"openid": "", "session_key": "SESSIONKEY"}, 502, "wechat_error"),
    ({"errcode": [0], "openid": "OPENID", "session_key": "SESSIONKEY"}, 502, "wechat_error"),
], ids=["40029", "45011-string", "busy", "no-session-key", "no-openid", "empty-openid",
        "errcode-list"])
async def test_qq_reply_quirks(make_gateway: GatewayFactory, scripted: ScriptedWeChat,
                               redis: Any, key_prefix: str, reply: dict[str, Any], status: int,
                               error: str) -> None:
    async def answer(request: web.Request) -> web.Response:
        return text_plain(reply)
    scripted.reply = answer
    gw2 = await make_gateway(apps=apps(scripted.url))
    resp = await gw2.post("/auth/login", json={"appid": QQ_APPID, "code": fresh()})
    await expect_error(resp, status, error)
    assert await redis.keys(f"{key_prefix}*") == []


# --- user data ---------------------------------------------------------------------------------

async def test_user_data_is_decrypted_and_signature_checked(gw: TestClient,
                                                            sim: TestServer) -> None:
    code, session = await login_as(gw, QQ_APPID)
    data = await userdata(sim, QQ_APPID, code)
    auth = bearer(session["token"])
    resp = await gw.post("/auth/decrypt", headers=auth,
                         json={"encrypted_data": data["encrypted_data"], "iv": data["iv"]})
    assert resp.status == 200, await resp.text()
    decrypted = await resp.json()
    assert decrypted["openId"] == session["openid"]
    assert decrypted["watermark"]["appid"] == QQ_APPID
    resp = await gw.post("/auth/check-signature", headers=auth, json={
        "raw_data": data["raw_data"], "signature": data["signature"]})
    assert resp.status == 200 and await resp.json() == {"valid": True}


async def test_user_data_of_the_wechat_app_is_refused(gw: TestClient, sim: TestServer) -> None:
    code, session = await login_as(gw, QQ_APPID)
    user = {"openId": session["openid"], "watermark": {"appid": APPID, "timestamp": 1}}
    encrypted, iv = simulator.encrypt_user_data(simulator.session_key_for(QQ_APPID, code), user)
    resp = await gw.post("/auth/decrypt", headers=bearer(session["token"]),
                         json={"encrypted_data": encrypted, "iv": iv})
    await expect_error(resp, 400, "watermark_mismatch")


async def test_phone_number_is_read_with_decrypt(gw: TestClient) -> None:
    code, session = await login_as(gw, QQ_APPID)
    phone = {"phoneNumber": "13800138000", "purePhoneNumber": "13800138000",
             "countryCode": "86", "watermark": {"appid": QQ_APPID, "timestamp": 1700000000}}
    encrypted, iv = simulator.encrypt_user_data(simulator.session_key_for(QQ_APPID, code), phone)
    auth = bearer(session["token"])
    resp = await gw.post("/auth/decrypt", headers=auth, json={"encrypted_data": encrypted,
                                                              "iv": iv})
    assert resp.status == 200 and await resp.json() == phone
    resp = await gw.post("/auth/phone", headers=auth, json={"code": "p"})
    body = await expect_error(resp, 400, "not_on_platform")
    assert "qq" in body["message"] and "/auth/decrypt" in body["message"]


async def test_session_key_check_is_not_on_qq(gw: TestClient, sim: TestServer) -> None:
    _, session = await login_as(gw, QQ_APPID)
    resp = await gw.get("/auth/session?check=true", headers=bearer(session["token"]))
    body = await expect_error(resp, 400, "not_on_platform")
    assert "qq" in body["message"]
    assert calls(sim, "checksession") == 0


async def test_simulator_answers_a_qq_appid_as_qq_does(sim: TestServer) -> None:
    query = {"appid": QQ_APPID, "secret": QQ_SECRET, "grant_type": "authorization_code"}
    async with aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{sim.port}/sns/jscode2session"
        async with http.get(url, params={**query, "js_code": "q-1"}) as resp:
            assert resp.content_type == "text/plain"  # JSON, labelled as QQ labels it
            first = json.loads(await resp.text())
        async with http.get(url, params={**query, "js_code": "q-1"}) as resp:
            again = json.loads(await resp.text())
    assert first["errcode"] == 0 and first["openid"] == simulator.openid_for(QQ_APPID, "q-1")
    assert again["errcode"] == 40029  # used once: QQ has no "code been used" errcode


async def test_the_documented_qq_failure_codes_give_the_documented_answers(gw: TestClient) -> None:
    for code, status, error in documented_failures("qq"):
        resp = await gw.post("/auth/login", json={"appid": QQ_APPID, "code": code + fresh()})
        await expect_error(resp, status, error)


async def test_a_real_gateway_process_serves_qq_and_wechat_apps(
        launch: Launch, config_dict: dict[str, Any], sim: TestServer,
        upstream: Upstream) -> None:
    base = f"http://127.0.0.1:{sim.port}"
    data = {**config_dict, "wechat": {"api_base": base, "timeout": "2s"}, "apps": apps(base)}
    async with aiohttp.ClientSession() as http:
        _, client = await launch_with_client(launch, data, http)
        for appid, platform in ((QQ_APPID, "qq"), (APPID, "wechat")):
            session = (await client.login(fresh(), appid=appid)).json()
            await client.call("GET", "/api/me", token=session["token"], route="/api/",
                              auth="required", headers={"X-MP-Platform": "forged"},
                              appid=appid, openid=session["openid"], upstream=True, expect=200)
            assert upstream.last.header("X-MP-Platform") == [platform]
            assert upstream.last.header("X-WX-OpenID") == [session["openid"]]
        await client.login(f"errcode-45011-{fresh()}", appid=QQ_APPID, expect=429)
