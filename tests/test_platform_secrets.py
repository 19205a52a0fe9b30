"""No app secret, login code or Alipay private key reaches a log line or an error body, whatever a broken
platform answers: an error page, a non-JSON body, an errmsg echoing the request, no answer."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from checks import expect_error
from conftest import GatewayFactory, closed_port_url, fresh
from test_alipay import ALIPAY, APP_KEY, alipay_app
from gateway.testing.simulator.alipay import private_pem

WECHAT_SECRET = "wxSecret0123456789abcdefWX"
QQ_SECRET = "qqSecret0123456789abcdefQQ"
DOUYIN_SECRET = "dySecret0123456789abcdefDY"
WECOM_SECRET = "wcSecret0123456789abcdefWC"
APPS = {
    "wechat": {"appid": "wx0123456789abcdef", "secret": WECHAT_SECRET},
    "qq": {"appid": "1109876543", "secret": QQ_SECRET, "platform": "qq"},
    "douyin": {"appid": "tt0123456789abcdef", "secret": DOUYIN_SECRET, "platform": "douyin"},
    "wecom": {"appid": "wx0123456789ec0de0", "secret": WECOM_SECRET, "platform": "wecom",
              "corpid": "ww0123456789abcdef"},
    "alipay": {k: v for k, v in alipay_app("").items() if k != "api_base"},
}
# what must never be written: each secret, and a line from the middle of the private key
NEVER = (WECHAT_SECRET, QQ_SECRET, DOUYIN_SECRET, WECOM_SECRET, private_pem(APP_KEY).splitlines()[5])


async def echo_request(request: web.Request) -> str:
    """What a broken front end might put in its error: the request it was sent, in full."""
    return f"{request.method} {request.path_qs} {(await request.read()).decode()}"


MODE = web.AppKey("mode", dict[str, str])  # {"now": one of MODES}
MODES = {
    "error-page": lambda said: web.Response(status=500, text=f"<pre>{said}</pre>"),
    "not-json": lambda said: web.Response(text=said),
    "errmsg-echoes": lambda said: web.json_response(
        {"errcode": 40013, "errmsg": said, "err_no": 40014, "err_tips": said,
         "error_response": {"code": "40002", "msg": said, "sub_code": "isv.x", "sub_msg": said}}),
}


@pytest.fixture
async def broken(aiohttp_server: Any) -> TestServer:
    async def handle(request: web.Request) -> web.StreamResponse:
        response: web.StreamResponse = MODES[request.app[MODE]["now"]](await echo_request(request))
        return response
    app = web.Application()
    app[MODE] = {"now": "error-page"}
    app.router.add_route("*", "/{tail:.*}", handle)
    server: TestServer = await aiohttp_server(app)
    return server


@pytest.mark.parametrize("platform", sorted(APPS))
@pytest.mark.parametrize("mode", [*MODES, "unreachable"])
async def test_no_secret_is_logged_or_answered_when_the_platform_fails(
        make_gateway: GatewayFactory, broken: TestServer, caplog: pytest.LogCaptureFixture,
        platform: str, mode: str) -> None:
    base = (closed_port_url().replace("redis://", "http://").removesuffix("/0")
            if mode == "unreachable" else f"http://127.0.0.1:{broken.port}")
    broken.app[MODE]["now"] = mode if mode in MODES else "error-page"
    gw = await make_gateway(apps=[{**APPS[platform], "api_base": base}])
    code = fresh("code-never-logged-")
    with caplog.at_level(logging.DEBUG):
        resp = await gw.post("/auth/login", json={"code": code,
                                                  "appid": APPS[platform]["appid"]})
        body = await expect_error(resp, 502, "wechat_error")
    # the fake platform's own server logs its requests: what it logs is the platform's
    ours = [r.getMessage() for r in caplog.records if not r.name.startswith("aiohttp.")]
    written = "\n".join(ours) + repr(body)
    assert ours, "the failure was not logged at all"
    for secret in (*NEVER, code):
        assert secret not in written, f"{secret[:6]}... written by {platform} on {mode}"


@pytest.mark.parametrize("platform", sorted(APPS))
@pytest.mark.parametrize("status", [302, 307, 308])
async def test_a_redirect_is_not_followed_with_the_secret(
        make_gateway: GatewayFactory, aiohttp_server: Any, platform: str, status: int) -> None:
    """No platform's API redirects; a front end that does (broken, or not the platform's)
    would otherwise receive the secret again, a 307 or 308 with Douyin's and Alipay's body,
    at any host it names, over plain HTTP too."""
    elsewhere: list[str] = []

    async def record(request: web.Request) -> web.Response:
        elsewhere.append(await echo_request(request))
        return web.json_response({})
    catcher = web.Application()
    catcher.router.add_route("*", "/{tail:.*}", record)
    caught: TestServer = await aiohttp_server(catcher)

    async def redirect(request: web.Request) -> web.Response:
        return web.Response(status=status, headers={
            "Location": f"http://127.0.0.1:{caught.port}{request.path_qs}"})
    redirecting = web.Application()
    redirecting.router.add_route("*", "/{tail:.*}", redirect)
    front: TestServer = await aiohttp_server(redirecting)

    gw = await make_gateway(apps=[{**APPS[platform], "api_base": f"http://127.0.0.1:{front.port}"}])
    resp = await gw.post("/auth/login", json={"code": fresh(), "appid": APPS[platform]["appid"]})
    body = await expect_error(resp, 502, "wechat_error")
    assert str(status) in body["message"]
    assert elsewhere == []


async def test_a_cookie_a_platform_sets_is_not_sent_with_the_next_call(
        make_gateway: GatewayFactory, aiohttp_server: Any) -> None:
    """Platform APIs keep no state: a cookie one app's reply set must not ride along with
    another app's calls, nor grow with every reply of a front end that sets new ones."""
    cookies: list[str | None] = []

    async def answer(request: web.Request) -> web.Response:
        cookies.append(request.headers.get("Cookie"))
        resp = web.json_response({"errcode": 40029, "errmsg": "invalid code"})
        resp.set_cookie(f"tracker{len(cookies)}", "x" * 100)
        return resp
    platform = web.Application()
    platform.router.add_route("*", "/{tail:.*}", answer)
    server: TestServer = await aiohttp_server(platform)
    base = f"http://localhost:{server.port}"  # a name: cookies of IP hosts are never kept
    gw = await make_gateway(apps=[{**APPS["wechat"], "api_base": base},
                                  {**APPS["qq"], "api_base": base}])
    for appid in (APPS["wechat"]["appid"], APPS["qq"]["appid"], APPS["wechat"]["appid"]):
        resp = await gw.post("/auth/login", json={"code": fresh(), "appid": appid})
        await expect_error(resp, 401, "invalid_code")
    assert cookies == [None, None, None]
