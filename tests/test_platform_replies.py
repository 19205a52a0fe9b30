"""Every JSON platform's login reply, broken or hostile: too large, nested too deep, a key
given twice, a user id that could not be a header value. None makes a session."""

from __future__ import annotations

import json
from typing import Any, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from checks import expect_error
from conftest import GatewayFactory, fresh
from test_platform_secrets import APPS

CORPID = APPS["wecom"]["corpid"]
# the reply naming user ``uid``, as text, with ``extra`` raw JSON members added to the object
# that holds the user
REPLIES: dict[str, Callable[[str, str], str]] = {
    "wechat": lambda uid, extra: '{"openid": %s, "session_key": "c2s="%s}' % (uid, extra),
    "qq": lambda uid, extra: '{"openid": %s, "session_key": "c2s="%s}' % (uid, extra),
    "douyin": lambda uid, extra: ('{"err_no": 0, "err_tips": "success", "data": '
                                  '{"openid": %s, "session_key": "c2s="%s}}' % (uid, extra)),
    "wecom": lambda uid, extra: ('{"errcode": 0, "errmsg": "ok", "corpid": "%s", "userid": %s, '
                                 '"session_key": "c2s="%s}' % (CORPID, uid, extra)),
}
DEEP = "[" * 30000 + "]" * 30000


@pytest.fixture
async def platform(aiohttp_server: Any) -> tuple[TestServer, list[str]]:
    """Answers WeCom's gettoken properly, and every login call with the next scripted text."""
    replies: list[str] = []

    async def answer(request: web.Request) -> web.Response:
        if request.path == "/cgi-bin/gettoken":
            return web.json_response({"errcode": 0, "access_token": "t0k3n", "expires_in": 7200})
        return web.Response(text=replies.pop(0), content_type="application/json")
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    server: TestServer = await aiohttp_server(app)
    return server, replies


@pytest.mark.parametrize("name", sorted(REPLIES))
@pytest.mark.parametrize("uid, extra", [
    (json.dumps("o-x\r\nX-WX-OpenID: admin"), ""), (json.dumps("o-x\x00"), ""),
    (json.dumps("o-\u00e9"), ""), ('"o-\\u2028"', ""), (json.dumps("o" * 10240), ""),
    (json.dumps("o x"), ""), ("12345", ""), ("null", ""),
    ('"o-x"', ', "pad": "%s"' % ("y" * 70000)), ('"o-x"', ', "deep": ' + DEEP),
    ('"o-a"', ', "openid": "o-b", "userid": "o-b"'),
], ids=["crlf", "nul", "non-ascii", "line-separator", "10kb", "space", "number", "null",
        "over-64kib", "30000-deep", "id-twice"])
async def test_a_broken_login_reply_makes_no_session(
        make_gateway: GatewayFactory, platform: tuple[TestServer, list[str]], redis: Any,
        key_prefix: str, name: str, uid: str, extra: str) -> None:
    server, replies = platform
    replies.append(REPLIES[name](uid, extra))
    gw = await make_gateway(apps=[{**APPS[name], "api_base": f"http://127.0.0.1:{server.port}"}])
    resp = await gw.post("/auth/login", json={"code": fresh(), "appid": APPS[name]["appid"]})
    await expect_error(resp, 502, "wechat_error")
    assert not [k for k in await redis.keys(f"{key_prefix}*") if b"session" in k]


@pytest.mark.parametrize("name", sorted(REPLIES))
async def test_the_same_reply_with_a_plain_user_id_logs_in(
        make_gateway: GatewayFactory, platform: tuple[TestServer, list[str]], name: str) -> None:
    """The replies above differ from a good one only where they are broken."""
    server, replies = platform
    replies.append(REPLIES[name]('"o-x"', ""))
    gw = await make_gateway(apps=[{**APPS[name], "api_base": f"http://127.0.0.1:{server.port}"}])
    resp = await gw.post("/auth/login", json={"code": fresh(), "appid": APPS[name]["appid"]})
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["openid"] == "o-x"
