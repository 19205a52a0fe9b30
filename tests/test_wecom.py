"""WeCom (企业微信) mini-programs: the code exchanged with the corp app's access token, every
documented reply, the token shared by replicas, what the backend receives, the configuration.

WeCom's own examples ("登录 / code2Session", developer.work.weixin.qq.com/document/path/91507;
"获取access_token", .../path/91039) are served verbatim by a scripted server; the rest runs
against the simulator's WeCom API.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from checks import expect_error
from conftest import APPID, SECRET, GatewayFactory, Upstream, base_config, bearer, fresh
from gateway.testing import simulator
from gateway.testing.embedded import EmbeddedRedis
from process import Launch, launch_with_client, write_config
from test_cli import assert_problems, run, valid_config

WECOM_APPID = "wx00000000000ec0de"
WECOM_SECRET = "corp-app-secret"
CORPID = "ww0123456789abcdef"


def wecom_app(api_base: str, **extra: Any) -> dict[str, Any]:
    return {"appid": WECOM_APPID, "secret": WECOM_SECRET, "platform": "wecom",
            "corpid": CORPID, "api_base": api_base, **extra}


@pytest.fixture
async def sim(aiohttp_server: Any) -> TestServer:
    """The simulator, knowing one WeChat app and one WeCom app of corp CORPID."""
    app = simulator.create_app({APPID: SECRET, WECOM_APPID: WECOM_SECRET}, single_use=True,
                               platforms={WECOM_APPID: "wecom"}, corpids={WECOM_APPID: CORPID})
    server: TestServer = await aiohttp_server(app)
    return server


def sim_url(sim: TestServer) -> str:
    return f"http://127.0.0.1:{sim.port}"


def calls(sim: TestServer, name: str) -> int:
    return sim.app[simulator.CALLS][name]


@pytest.fixture
async def gw(make_gateway: GatewayFactory, sim: TestServer) -> TestClient:
    return await make_gateway(apps=[{"appid": APPID, "secret": SECRET, "api_base": sim_url(sim)},
                                    wecom_app(sim_url(sim))])


async def wecom_login(gw: TestClient, code: str | None = None) -> aiohttp.ClientResponse:
    resp: aiohttp.ClientResponse = await gw.post(
        "/auth/login", json={"code": code or fresh(), "appid": WECOM_APPID})
    return resp


# --- login -----------------------------------------------------------------------------------


async def test_login_gives_the_userid_as_openid_and_no_unionid(gw: TestClient,
                                                               sim: TestServer) -> None:
    code = fresh()
    resp = await wecom_login(gw, code)
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["openid"] == simulator.openid_for(WECOM_APPID, code)
    assert body["unionid"] is None
    session = await (await gw.get("/auth/session", headers=bearer(body["token"]))).json()
    assert session["appid"] == WECOM_APPID and session["openid"] == body["openid"]


async def test_corp_token_is_fetched_once_and_reused(gw: TestClient, sim: TestServer) -> None:
    for _ in range(3):
        assert (await wecom_login(gw)).status == 200
    assert calls(sim, "wecom_gettoken") == 1
    assert calls(sim, "wecom_jscode2session") == 3
    assert calls(sim, "jscode2session") == 0  # never WeChat's login


async def test_wechat_app_beside_it_still_logs_in_at_wechat(gw: TestClient,
                                                            sim: TestServer) -> None:
    resp = await gw.post("/auth/login", json={"code": fresh(), "appid": APPID})
    assert resp.status == 200
    assert calls(sim, "jscode2session") == 1 and calls(sim, "wecom_gettoken") == 0


async def test_backend_receives_userid_corpid_and_platform_never_the_clients(
        gw: TestClient, upstream: Upstream) -> None:
    code = fresh()
    body = await (await wecom_login(gw, code)).json()
    forged = {"X-WX-CorpID": "ww-forged", "X_WX_CorpID": "ww-forged",
              "X-MP-Platform": "wechat", "X-WX-OpenID": "forged"}
    resp = await gw.get("/api/who", headers={**bearer(body["token"]), **forged})
    assert resp.status == 200
    seen = upstream.last
    assert seen.header("X-WX-CorpID") == [CORPID]
    assert seen.header("X-MP-Platform") == ["wecom"]
    assert seen.header("X-WX-OpenID") == [simulator.openid_for(WECOM_APPID, code)]
    assert seen.header("X-WX-AppID") == [WECOM_APPID]
    assert seen.header("X-WX-UnionID") == []
    assert not [v for _, v in seen.headers if "forged" in v]
    assert not [k for k, _ in seen.headers if k.lower() == "x_wx_corpid"]


@pytest.mark.parametrize("code, status, error", [
    ("errcode-40029-x", 401, "invalid_code"),
    ("errcode-40163-x", 401, "invalid_code"),
    ("errstr-40029-x", 401, "invalid_code"),  # errcode as a JSON string
    ("errcode--1-x", 503, "wechat_unavailable"),
    ("errstr--1-x", 503, "wechat_unavailable"),
    ("errcode-45009-x", 429, "rate_limited"),
    ("errcode-45011-x", 429, "rate_limited"),
    ("errcode-60020-x", 502, "wechat_error"),  # the gateway's IP is not a trusted IP
    ("errcode-48002-x", 502, "wechat_error"),  # any other errcode
    ("errstr-busy-x", 502, "wechat_error"),  # an errcode that is not a number
    ("http-502-x", 502, "wechat_error"),
    ("garbage-x", 502, "wechat_error"),
    ("reset-x", 502, "wechat_error"),
    ("noopenid-x", 502, "wechat_error"),  # no userid nor session_key
    ("othercorp-x", 502, "wechat_error"),  # a user of another corp than apps[].corpid
    ("slow-1500-x", 504, "wechat_timeout"),  # wechat.timeout is 1s
])
async def test_login_errors(gw: TestClient, code: str, status: int, error: str) -> None:
    await expect_error(await wecom_login(gw, code + fresh("-")), status, error)


async def test_untrusted_ip_error_says_what_to_configure(gw: TestClient) -> None:
    body = await expect_error(await wecom_login(gw, "errcode-60020-" + fresh()), 502,
                              "wechat_error")
    assert "trusted IP" in body["message"]


async def test_used_code_is_invalid(gw: TestClient) -> None:
    code = fresh()
    assert (await wecom_login(gw, code)).status == 200
    await expect_error(await wecom_login(gw, code), 401, "invalid_code")


# --- the corp access token -------------------------------------------------------------------


async def test_expired_token_is_refreshed_once_and_the_login_succeeds(
        gw: TestClient, sim: TestServer) -> None:
    assert (await wecom_login(gw)).status == 200
    sim.app[simulator.STATE].expire_access_tokens()  # WeCom now answers 40014
    assert (await wecom_login(gw)).status == 200
    assert calls(sim, "wecom_gettoken") == 2
    assert calls(sim, "wecom_jscode2session") == 3


async def test_token_rejected_but_still_handed_out_fails_503_without_looping(
        gw: TestClient, sim: TestServer) -> None:
    assert (await wecom_login(gw)).status == 200
    sim.app[simulator.STATE].reject_access_token(WECOM_APPID)
    body = await expect_error(await wecom_login(gw), 503, "wechat_unavailable")
    assert "WeCom" in body["message"] and "WeChat" not in body["message"], body
    # one refresh (same token back: WeCom has no forced refresh), no second retry
    assert calls(sim, "wecom_gettoken") == 2
    assert calls(sim, "wecom_jscode2session") == 2


async def test_a_token_of_the_previously_configured_corp_is_not_reused(
        make_gateway: GatewayFactory, sim: TestServer) -> None:
    assert (await wecom_login(await make_gateway(apps=[wecom_app(sim_url(sim))]))).status == 200
    # The mini-program now belongs to another corp, and the configuration says so.
    sim.app[simulator.STATE].corpids[WECOM_APPID] = "ww1111111111111111"
    moved = await make_gateway(apps=[wecom_app(sim_url(sim), corpid="ww1111111111111111")])
    assert (await wecom_login(moved)).status == 200
    assert calls(sim, "wecom_gettoken") == 2


async def test_a_token_of_the_corp_app_whose_secret_was_replaced_is_not_reused(
        make_gateway: GatewayFactory, aiohttp_server: Any) -> None:
    """The secret of another app of the same corp gets a token, of that app: the mini-program
    is not associated with it. Once the secret is fixed, its token must not be served on."""
    async def gettoken(request: web.Request) -> web.Response:
        return web.json_response({"errcode": 0, "errmsg": "ok", "expires_in": 7200,
                                  "access_token": "token-of-" + request.query["corpsecret"]})

    async def jscode2session(request: web.Request) -> web.Response:
        if request.query["access_token"] != "token-of-" + WECOM_SECRET:
            return web.json_response({"errcode": 60011, "errmsg": "no privilege"})
        return web.json_response({"errcode": 0, "errmsg": "ok", "corpid": CORPID,
                                  "userid": "zhangsan", "session_key": "c2Vzc2lvbmtleQ=="})
    app = web.Application()
    app.router.add_get("/cgi-bin/gettoken", gettoken)
    app.router.add_get("/cgi-bin/miniprogram/jscode2session", jscode2session)
    server = await aiohttp_server(app)
    base = f"http://127.0.0.1:{server.port}"
    wrong = await make_gateway(apps=[wecom_app(base, secret="secret-of-the-contacts-app")])
    await expect_error(await wecom_login(wrong), 502, "wechat_error")
    fixed = await make_gateway(apps=[wecom_app(base)])  # the same Redis, as after a reload
    resp = await wecom_login(fixed)
    assert resp.status == 200, await resp.text()


@pytest.mark.parametrize("override, says", [
    ({"secret": "wrong-secret"}, "secret"),  # gettoken errcode 40001
    ({"corpid": "ww9999999999999999"}, "corpid"),  # gettoken errcode 40013
])
async def test_wrong_corp_credentials_are_502_naming_the_key(
        make_gateway: GatewayFactory, sim: TestServer, override: dict[str, str],
        says: str) -> None:
    gw = await make_gateway(apps=[wecom_app(sim_url(sim), **override)])
    body = await expect_error(await wecom_login(gw), 502, "wechat_error")
    assert f"apps[].{says}" in body["message"]
    assert calls(sim, "wecom_jscode2session") == 0


async def test_replicas_share_one_corp_token(
        launch: Launch, redis_server: EmbeddedRedis, key_prefix: str, sim: TestServer,
        upstream: Upstream) -> None:
    data = base_config(redis_server.url, key_prefix, sim_url(sim), upstream.url)
    data["apps"] = [wecom_app(sim_url(sim))]
    async with aiohttp.ClientSession() as http:
        clients = [(await launch_with_client(launch, data, http))[1] for _ in range(3)]
        replies = await asyncio.gather(*(c.login(fresh()) for c in clients for _ in range(4)))
    assert {r.status for r in replies} == {200}
    assert calls(sim, "wecom_gettoken") == 1
    assert calls(sim, "wecom_jscode2session") == 12


# --- WeCom's published examples --------------------------------------------------------------


@pytest.fixture
async def scripted(aiohttp_server: Any) -> tuple[TestServer, list[Any]]:
    """A WeCom that answers gettoken with its documented example and jscode2session with the
    next body of the returned list (as ``application/json``, like WeCom)."""
    replies: list[Any] = []

    async def gettoken(request: web.Request) -> web.Response:
        return web.json_response({"errcode": 0, "errmsg": "ok",
                                  "access_token": "accesstoken000001", "expires_in": 7200})

    async def jscode2session(request: web.Request) -> web.Response:
        assert request.query["access_token"] == "accesstoken000001"
        assert request.query["grant_type"] == "authorization_code"
        return web.Response(text=json.dumps(replies.pop(0)), content_type="application/json")

    app = web.Application()
    app.router.add_get("/cgi-bin/gettoken", gettoken)
    app.router.add_get("/cgi-bin/miniprogram/jscode2session", jscode2session)
    return await aiohttp_server(app), replies


async def test_documented_success_reply(make_gateway: GatewayFactory,
                                        scripted: tuple[TestServer, list[Any]]) -> None:
    server, replies = scripted
    gw = await make_gateway(apps=[wecom_app(sim_url(server), corpid="CORPID")])
    replies.append({"corpid": "CORPID", "userid": "USERID",
                    "session_key": "kJtdi6RF+Dv67QkbLlPGjw==", "errcode": 0, "errmsg": "ok"})
    resp = await wecom_login(gw)
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["openid"] == "USERID"


async def test_documented_error_reply(make_gateway: GatewayFactory,
                                      scripted: tuple[TestServer, list[Any]]) -> None:
    server, replies = scripted
    gw = await make_gateway(apps=[wecom_app(sim_url(server), corpid="CORPID")])
    replies.append({"errcode": 40029, "errmsg": "invalid code"})
    await expect_error(await wecom_login(gw), 401, "invalid_code")


@pytest.mark.parametrize("reply", [
    {"errcode": 0, "errmsg": "ok", "corpid": "CORPID", "session_key": "a2V5"},  # no userid
    {"errcode": 0, "errmsg": "ok", "corpid": "CORPID", "userid": "", "session_key": "a2V5"},
    {"errcode": 0, "errmsg": "ok", "corpid": "CORPID", "userid": 12, "session_key": "a2V5"},
    {"errcode": 0, "errmsg": "ok", "userid": "USERID", "session_key": "a2V5"},  # no corpid
    {"errcode": 0, "errmsg": "ok", "corpid": "corpid", "userid": "USERID", "session_key": "a2V5"},
    {"errcode": 0, "errmsg": "ok", "corpid": "CORPID", "userid": "USERID"},  # no session_key
    {"errcode": 0, "corpid": "CORPID", "userid": "a\r\nX-WX-CorpID: ww1", "session_key": "a2V5"},
    {"errcode": 0, "corpid": "CORPID", "userid": "u" * 65, "session_key": "a2V5"},
    {"errcode": 0, "corpid": "CORPID", "userid": "Zhang San", "session_key": "a2V5"},
    {"errcode": True, "corpid": "CORPID", "userid": "USERID", "session_key": "a2V5"},
    ["not", "an", "object"],
])
async def test_reply_without_a_trustworthy_user_is_502(
        make_gateway: GatewayFactory, scripted: tuple[TestServer, list[Any]],
        reply: Any) -> None:
    server, replies = scripted
    gw = await make_gateway(apps=[wecom_app(sim_url(server), corpid="CORPID")])
    replies.append(reply)
    await expect_error(await wecom_login(gw), 502, "wechat_error")


# --- what else a WeCom session can do --------------------------------------------------------


async def test_phone_by_code_is_not_on_wecom(gw: TestClient) -> None:
    body = await (await wecom_login(gw)).json()
    resp = await gw.post("/auth/phone", json={"code": "abc"}, headers=bearer(body["token"]))
    assert "platform wecom" in (await expect_error(resp, 400, "not_on_platform"))["message"]


async def test_decrypt_uses_the_wecom_session_key(gw: TestClient, sim: TestServer) -> None:
    code = fresh()
    body = await (await wecom_login(gw, code)).json()
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{sim_url(sim)}/_simulator/userdata",
                            params={"appid": WECOM_APPID, "code": code}) as resp:
            data = await resp.json()
    resp = await gw.post("/auth/decrypt", headers=bearer(body["token"]), json={
        "encrypted_data": data["encrypted_data"], "iv": data["iv"]})
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["openId"] == body["openid"]


# --- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize("app, message", [
    ({"platform": "wecom"}, "is required when platform is wecom"),
    ({"platform": "wecom", "corpid": ""}, "must not be empty"),
    # it reaches upstreams as X-WX-CorpID: a pasted space or newline would fail every login
    ({"platform": "wecom", "corpid": CORPID + " "}, "printable ASCII without spaces"),
    ({"platform": "wecom", "corpid": CORPID + "\n"}, "printable ASCII without spaces"),
    ({"corpid": CORPID}, "applies only to platform wecom, not wechat"),
    ({"platform": "qq", "corpid": CORPID}, "applies only to platform wecom, not qq"),
])
def test_check_names_the_corpid_key(tmp_path: Path, app: dict[str, str], message: str) -> None:
    data = valid_config()
    data["apps"] = [{"appid": APPID, "secret": SECRET}, {"appid": WECOM_APPID,
                                                          "secret": WECOM_SECRET, **app}]
    result = run(["--config", str(write_config(tmp_path / "gw.yaml", data)), "--check"],
                 tmp_path)
    assert_problems(result, ["apps[1].corpid"])
    assert message in result.stderr


def test_check_accepts_a_wecom_app(tmp_path: Path) -> None:
    data = valid_config(apps=[wecom_app("http://127.0.0.1:1")])
    result = run(["--config", str(write_config(tmp_path / "gw.yaml", data)), "--check"],
                 tmp_path)
    assert result.returncode == 0, result.stderr


def test_check_names_an_unknown_platform(tmp_path: Path) -> None:
    data = valid_config(apps=[{**wecom_app("http://127.0.0.1:1"), "platform": "wework"}])
    result = run(["--config", str(write_config(tmp_path / "gw.yaml", data)), "--check"],
                 tmp_path)
    assert_problems(result, ["apps[0].platform"])
    assert "wework" in result.stderr
