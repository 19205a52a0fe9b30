"""Douyin (ByteDance) mini-programs: login through code2Session v2, its err_no table, its reply
quirks (JSON, err_no as int or string, the user nested in ``data``, anonymous users), user data
decrypted with the session_key, and what the upstream receives."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from checks import expect_error
from conftest import APPID, SECRET, GatewayFactory, Served, Upstream, bearer, fresh, login
from gateway.testing import simulator
from test_config import minimal, problems, with_problem
from test_profile import login_as, userdata

DOUYIN_APPID = "tt5daf2b12c2857910"
DOUYIN_SECRET = "douyin-secret-1"


@pytest.fixture
async def sim(aiohttp_server: Any) -> TestServer:
    """One simulator for a WeChat app and a Douyin app, codes single-use as on both."""
    app = simulator.create_app({APPID: SECRET, DOUYIN_APPID: DOUYIN_SECRET}, single_use=True,
                               platforms={DOUYIN_APPID: "douyin"})
    server: TestServer = await aiohttp_server(app)
    return server


def apps(douyin_base: str, secret: str = DOUYIN_SECRET) -> list[dict[str, Any]]:
    return [{"appid": APPID, "secret": SECRET},
            {"appid": DOUYIN_APPID, "secret": secret, "platform": "douyin",
             "api_base": douyin_base}]


@pytest.fixture
async def gw(make_gateway: GatewayFactory, sim: TestServer) -> TestClient:
    base = f"http://127.0.0.1:{sim.port}"
    return await make_gateway(wechat={"api_base": base, "timeout": "1s"}, apps=apps(base))


def calls(sim: TestServer) -> int:
    return sim.app[simulator.CALLS]["douyin.jscode2session"]


async def test_login_gives_a_douyin_session(gw: TestClient, sim: TestServer) -> None:
    code = fresh()
    body = await login(gw, code, appid=DOUYIN_APPID)
    assert body["openid"] == simulator.openid_for(DOUYIN_APPID, code)
    assert body["unionid"] == simulator.unionid_for(code)
    assert calls(sim) == 1 and sim.app[simulator.CALLS]["jscode2session"] == 0


async def test_upstream_receives_the_douyin_identity_and_never_a_forged_one(
        gw: TestClient, upstream: Upstream) -> None:
    session = await login(gw, appid=DOUYIN_APPID)
    resp = await gw.get("/api/orders", headers={
        **bearer(session["token"]), "X-MP-Platform": "wechat", "X-WX-OpenID": "forged",
        "X-WX-CorpID": "forged"})
    assert resp.status == 200, await resp.text()
    seen = upstream.last
    assert seen.header("X-MP-Platform") == ["douyin"]
    assert seen.header("X-WX-OpenID") == [session["openid"]]
    assert seen.header("X-WX-UnionID") == [session["unionid"]]
    assert seen.header("X-WX-AppID") == [DOUYIN_APPID]
    assert seen.header("X-WX-CorpID") == []


async def test_wechat_and_douyin_apps_log_in_side_by_side(
        gw: TestClient, upstream: Upstream) -> None:
    wechat = await login(gw, appid=APPID)
    douyin = await login(gw, appid=DOUYIN_APPID)
    for session, platform in ((wechat, "wechat"), (douyin, "douyin")):
        resp = await gw.get("/api/who", headers=bearer(session["token"]))
        assert resp.status == 200
        assert upstream.last.header("X-MP-Platform") == [platform]


# The err_no table of code2Session: 40014 bad params, 40015 bad appid, 40017 bad secret,
# 40018 bad code, 40019 bad anonymous_code, -1 system error.
@pytest.mark.parametrize("code,status,error", [
    ("errcode-40018-x", 401, "invalid_code"),
    ("errcode-40019-x", 401, "invalid_code"),
    ("errcode-40014-x", 502, "wechat_error"),
    ("errcode-40015-x", 502, "wechat_error"),
    ("errcode-40017-x", 502, "wechat_error"),
    ("errcode--1-x", 503, "wechat_unavailable"),
    ("errcode-40029-x", 502, "wechat_error"),  # WeChat's invalid code means nothing here
    ("errcode-99999-x", 502, "wechat_error"),
    ("errstr-40018-x", 401, "invalid_code"),
    ("errstr--1-x", 503, "wechat_unavailable"),
    ("errstr-bad-x", 502, "wechat_error"),
    ("http-502-x", 502, "wechat_error"),
    ("garbage-x", 502, "wechat_error"),
    ("noopenid-x", 502, "wechat_error"),
    ("slow-1500-x", 504, "wechat_timeout"),
])
async def test_douyin_outcome_maps_to_error(gw: TestClient, sim: TestServer, redis: Any,
                                            key_prefix: str, code: str, status: int,
                                            error: str) -> None:
    resp = await gw.post("/auth/login", json={"appid": DOUYIN_APPID,
                                              "code": code + uuid.uuid4().hex[:6]})
    await expect_error(resp, status, error)
    assert calls(sim) == 1
    assert await redis.keys(f"{key_prefix}*") == []


async def test_reused_code_is_invalid_code(gw: TestClient) -> None:
    code = fresh()
    await login(gw, code, appid=DOUYIN_APPID)
    resp = await gw.post("/auth/login", json={"appid": DOUYIN_APPID, "code": code})
    await expect_error(resp, 401, "invalid_code")


async def test_code_another_app_was_given_is_invalid_code(gw: TestClient, sim: TestServer,
                                                          redis: Any, key_prefix: str) -> None:
    # wx.login's code for the WeChat app, sent with the Douyin appid
    resp = await gw.post("/auth/login", json={"appid": DOUYIN_APPID, "code": f"app-{APPID}-1"})
    await expect_error(resp, 401, "invalid_code")
    assert calls(sim) == 1
    assert await redis.keys(f"{key_prefix}*") == []
    await login(gw, f"app-{APPID}-2", appid=APPID)  # where it belongs, it works


async def test_wrong_secret_configured_is_wechat_error(make_gateway: GatewayFactory,
                                                       sim: TestServer) -> None:
    gw2 = await make_gateway(apps=apps(f"http://127.0.0.1:{sim.port}", secret="not-it"))
    resp = await gw2.post("/auth/login", json={"appid": DOUYIN_APPID, "code": fresh()})
    body = await expect_error(resp, 502, "wechat_error")
    assert "secret" in body["message"]


async def test_wechat_appid_configured_as_douyin_is_wechat_error(
        make_gateway: GatewayFactory, sim: TestServer) -> None:
    # Douyin answers 40015 (bad appid) for an appid it does not know
    gw2 = await make_gateway(apps=[{"appid": APPID, "secret": SECRET, "platform": "douyin",
                                    "api_base": f"http://127.0.0.1:{sim.port}"}])
    resp = await gw2.post("/auth/login", json={"code": fresh()})
    await expect_error(resp, 502, "wechat_error")


@pytest.mark.parametrize("body", [
    {"appid": DOUYIN_APPID, "anonymous_code": "anon-1"},
    {"appid": DOUYIN_APPID, "code": "", "anonymous_code": "anon-1"},
], ids=["anonymous-only", "empty-code"])
async def test_anonymous_code_alone_makes_no_session(gw: TestClient, sim: TestServer,
                                                     body: dict[str, Any]) -> None:
    resp = await gw.post("/auth/login", json=body)
    await expect_error(resp, 400, "invalid_request")
    assert calls(sim) == 0


# --- the reply as Douyin words it ----------------------------------------------------------------

@dataclass
class ScriptedDouyin(Served):
    requests: list[tuple[str, str, Any]] = field(default_factory=list)
    reply: Any = None
    content_type: str = "application/json"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.path, request.content_type, await request.json()))
        return web.Response(text=json.dumps(self.reply), content_type=self.content_type)


@pytest.fixture
async def scripted(aiohttp_server: Any) -> ScriptedDouyin:
    fake = ScriptedDouyin()
    app = web.Application()
    app.router.add_post("/api/apps/v2/jscode2session", fake.handle)
    fake.server = await aiohttp_server(app)
    return fake


async def test_published_success_example_logs_in(make_gateway: GatewayFactory,
                                                 scripted: ScriptedDouyin) -> None:
    scripted.reply = {"err_no": 0, "err_tips": "success", "log_id": "2024102117013250E8ABC6F2D070B",
                      "data": {
        "session_key": "hZy6t19VPjFqm********", "openid": "V3xoQ3Z3OmQvHT******",
        "anonymous_openid": "", "unionid": "f7510d9ab***********"}}
    gw2 = await make_gateway(apps=apps(scripted.url))
    code = fresh()
    body = await login(gw2, code, appid=DOUYIN_APPID)
    assert (body["openid"], body["unionid"]) == ("V3xoQ3Z3OmQvHT******", "f7510d9ab***********")
    # the request as the doc shows it: a JSON body, the code and no anonymous_code
    assert scripted.requests == [("/api/apps/v2/jscode2session", "application/json", {
        "appid": DOUYIN_APPID, "secret": DOUYIN_SECRET, "code": code})]


@pytest.mark.parametrize("reply,status,error", [
    ({"err_no": 40018, "err_tips": "bad code", "data": None}, 401, "invalid_code"),
    ({"err_no": "40018", "err_tips": "bad code"}, 401, "invalid_code"),
    ({"err_no": 40017, "err_tips": "bad secret", "data": {
        "session_key": "", "openid": "", "anonymous_openid": "", "unionid": ""}},
     502, "wechat_error"),
    ({"err_no": -1, "err_tips": "system error"}, 503, "wechat_unavailable"),
    # success without a user: only the anonymous id, or data missing, null or not an object
    ({"err_no": 0, "err_tips": "success", "data": {
        "session_key": "", "openid": "", "anonymous_openid": "anon-openid", "unionid": ""}},
     502, "wechat_error"),
    ({"err_no": 0, "err_tips": "success", "data": {"anonymous_openid": "anon-openid"}},
     502, "wechat_error"),
    ({"err_no": 0, "err_tips": "success"}, 502, "wechat_error"),
    ({"err_no": 0, "data": None}, 502, "wechat_error"),
    ({"err_no": 0, "data": ["V3xoQ3Z3OmQvHT", "hZy6t19VPjFqm"]}, 502, "wechat_error"),
    # the user at the top level, as WeChat puts it, is not Douyin's reply
    ({"err_no": 0, "openid": "o-top", "session_key": "c2s="}, 502, "wechat_error"),
    ({"err_no": 0, "data": {"openid": 7, "session_key": "c2s="}}, 502, "wechat_error"),
    ({"err_no": True, "data": {"openid": "o", "session_key": "c2s="}}, 502, "wechat_error"),
    ({"errcode": 40018, "errmsg": "bad code", "error": 3}, 502, "wechat_error"),
], ids=["40018-data-null", "err_no-string", "40017-empty-data", "system-error",
        "anonymous-only", "anonymous-only-short", "no-data", "data-null", "data-list",
        "user-at-top", "openid-number", "err_no-bool", "v1-shape-no-user"])
async def test_douyin_reply_quirks(make_gateway: GatewayFactory, scripted: ScriptedDouyin,
                                   redis: Any, key_prefix: str, reply: dict[str, Any],
                                   status: int, error: str) -> None:
    scripted.reply = reply
    gw2 = await make_gateway(apps=apps(scripted.url))
    resp = await gw2.post("/auth/login", json={"appid": DOUYIN_APPID, "code": fresh()})
    await expect_error(resp, status, error)
    assert await redis.keys(f"{key_prefix}*") == []


async def test_reply_labelled_text_plain_is_still_read(make_gateway: GatewayFactory,
                                                       scripted: ScriptedDouyin) -> None:
    scripted.reply = {"err_no": 0, "err_tips": "success",
                      "data": {"openid": "o-plain", "session_key": "c2Vzc2lvbmtleQ=="}}
    scripted.content_type = "text/plain"
    gw2 = await make_gateway(apps=apps(scripted.url))
    body = await login(gw2, appid=DOUYIN_APPID)
    assert body["openid"] == "o-plain" and body["unionid"] is None


# --- user data: tt.getUserInfo and getPhoneNumber's encryptedData ------------------------------

async def _douyin_session(gw: TestClient) -> tuple[str, dict[str, Any]]:
    return await login_as(gw, DOUYIN_APPID)


async def test_user_data_is_decrypted_and_signature_checked(gw: TestClient,
                                                            sim: TestServer) -> None:
    code, session = await _douyin_session(gw)
    data = await userdata(sim, DOUYIN_APPID, code)
    auth = bearer(session["token"])
    resp = await gw.post("/auth/decrypt", headers=auth,
                         json={"encrypted_data": data["encrypted_data"], "iv": data["iv"]})
    assert resp.status == 200, await resp.text()
    decrypted = await resp.json()
    assert decrypted["openId"] == session["openid"]
    assert decrypted["watermark"]["appid"] == DOUYIN_APPID
    resp = await gw.post("/auth/check-signature", headers=auth, json={
        "raw_data": data["raw_data"], "signature": data["signature"]})
    assert resp.status == 200 and await resp.json() == {"valid": True}
    resp = await gw.post("/auth/check-signature", headers=auth, json={
        "raw_data": data["raw_data"] + " ", "signature": data["signature"]})
    await expect_error(resp, 400, "invalid_signature")


async def test_phone_number_is_read_with_decrypt(gw: TestClient) -> None:
    code, session = await _douyin_session(gw)
    phone = {"phoneNumber": "+8613800138000", "purePhoneNumber": "13800138000",
             "countryCode": "86", "watermark": {"appid": DOUYIN_APPID, "timestamp": 1700000000}}
    encrypted, iv = simulator.encrypt_user_data(
        simulator.session_key_for(DOUYIN_APPID, code), phone)
    resp = await gw.post("/auth/decrypt", headers=bearer(session["token"]),
                         json={"encrypted_data": encrypted, "iv": iv})
    assert resp.status == 200, await resp.text()
    assert await resp.json() == phone


@pytest.mark.parametrize("watermark", [{"appid": APPID, "timestamp": 1}, {}, None])
async def test_phone_number_for_another_app_is_refused(gw: TestClient, watermark: Any) -> None:
    code, session = await _douyin_session(gw)
    phone: dict[str, Any] = {"phoneNumber": "+8613800138000", "purePhoneNumber": "13800138000"}
    if watermark is not None:
        phone["watermark"] = watermark
    encrypted, iv = simulator.encrypt_user_data(
        simulator.session_key_for(DOUYIN_APPID, code), phone)
    resp = await gw.post("/auth/decrypt", headers=bearer(session["token"]),
                         json={"encrypted_data": encrypted, "iv": iv})
    await expect_error(resp, 400, "watermark_mismatch")


async def test_data_under_another_session_key_fails_without_asking_wechat(
        gw: TestClient, sim: TestServer) -> None:
    _, session = await _douyin_session(gw)
    encrypted, iv = simulator.encrypt_user_data(
        simulator.session_key_for(DOUYIN_APPID, "someone-else"),
        {"watermark": {"appid": DOUYIN_APPID}})
    resp = await gw.post("/auth/decrypt", headers=bearer(session["token"]),
                         json={"encrypted_data": encrypted, "iv": iv})
    await expect_error(resp, 400, "decrypt_failed")
    assert sim.app[simulator.CALLS]["checksession"] == 0


async def test_phone_by_code_points_to_decrypt(gw: TestClient) -> None:
    _, session = await _douyin_session(gw)
    resp = await gw.post("/auth/phone", headers=bearer(session["token"]), json={"code": "p"})
    body = await expect_error(resp, 400, "not_on_platform")
    assert "douyin" in body["message"] and "/auth/decrypt" in body["message"]


async def test_session_key_check_is_not_on_douyin(gw: TestClient, sim: TestServer) -> None:
    _, session = await _douyin_session(gw)
    resp = await gw.get("/auth/session?check=true", headers=bearer(session["token"]))
    body = await expect_error(resp, 400, "not_on_platform")
    assert "douyin" in body["message"]
    assert sim.app[simulator.CALLS]["checksession"] == 0


async def test_simulator_answers_as_douyin_does(sim: TestServer) -> None:
    url = f"http://127.0.0.1:{sim.port}/api/apps/v2/jscode2session"
    body = {"appid": DOUYIN_APPID, "secret": DOUYIN_SECRET}
    async with aiohttp.ClientSession() as http:
        async with http.post(url, json={**body, "code": "d-1"}) as resp:
            assert resp.content_type == "application/json"
            ok = await resp.json()
        async with http.post(url, json={**body, "code": "errcode-40018-x"}) as resp:
            bad = await resp.json()
        async with http.post(url, json={**body, "anonymous_code": "a-1"}) as resp:
            anonymous = await resp.json()
    assert ok["err_no"] == 0 and ok["data"]["openid"] == simulator.openid_for(DOUYIN_APPID, "d-1")
    assert bad["err_no"] == 40018 and isinstance(bad["err_tips"], str)
    assert anonymous["err_no"] == 0 and anonymous["data"]["openid"] == ""
    assert anonymous["data"]["anonymous_openid"]


def documented_failures(platform: str) -> list[tuple[str, int, str]]:
    """docs/simulator.md's rows for ``platform``: (code, login status, error)."""
    page = (Path(__file__).resolve().parent.parent / "docs" / "simulator.md").read_text("utf-8")
    rows = [(m.group(1), int(m.group(2)), m.group(3)) for m in re.finditer(
        rf"^\| {platform} \| `([a-z0-9-]+-x)` \| [^|]+ \| (\d{{3}}) `(\w+)`", page, re.M)]
    assert len(rows) >= 4, rows
    return rows


async def test_the_documented_douyin_failure_codes_give_the_documented_answers(
        gw: TestClient) -> None:
    for code, status, error in documented_failures("douyin"):
        resp = await gw.post("/auth/login", json={"appid": DOUYIN_APPID, "code": code + fresh()})
        await expect_error(resp, status, error)


async def test_long_code_with_dashes_logs_in(gw: TestClient) -> None:
    # tt.login codes seen in the wild run to 123 characters with '-' inside
    code = ("T9loKB1gsyl92x5s7wiTwKteJgeA5Pjq21JNWPtXfx1BUXz0PIzl2ruw2fnPjc9VDA97LlXkKvQW6qTM-"
            "0jUNN-frfnVZ5nBluYdVos3FJw8mGe0iaH" + uuid.uuid4().hex[:8])
    assert len(code) == 123
    body = await login(gw, code, appid=DOUYIN_APPID)
    assert body["openid"] == simulator.openid_for(DOUYIN_APPID, code)


@pytest.mark.parametrize("platform", ["tiktok", "Douyin", "toutiao", "bytedance"])
def test_a_platform_the_gateway_does_not_know_is_a_config_error(platform: str) -> None:
    data = minimal()
    data["apps"] = [{"appid": APPID, "secret": SECRET},
                    {"appid": DOUYIN_APPID, "secret": DOUYIN_SECRET, "platform": platform}]
    with_problem(problems(data), "apps[1].platform", "douyin")


def test_a_wecom_key_on_a_douyin_app_is_a_config_error() -> None:
    data = minimal()
    data["apps"] = [{"appid": DOUYIN_APPID, "secret": DOUYIN_SECRET, "platform": "douyin",
                     "corpid": "ww1234567890abcdef"}]
    with_problem(problems(data), "apps[0].corpid", "wecom", "douyin")
