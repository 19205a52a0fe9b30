"""WeCom's (企业微信) server API for mini-programs, as documented: ``gettoken``
(developer.work.weixin.qq.com/document/path/91039) and ``miniprogram/jscode2session``
(developer.work.weixin.qq.com/document/path/91507). WeCom labels its replies
``application/json``."""

from __future__ import annotations

import math
import time

from aiohttp import web

from .core import CALLS, STATE, current_token, fault, openid_for, session_key_for


def add_routes(app: web.Application) -> None:
    app.router.add_get("/cgi-bin/gettoken", gettoken)
    app.router.add_get("/cgi-bin/miniprogram/jscode2session", jscode2session)


async def gettoken(request: web.Request) -> web.StreamResponse:
    request.app[CALLS]["wecom_gettoken"] += 1
    state, q = request.app[STATE], request.query
    corpid, secret = q.get("corpid", ""), q.get("corpsecret", "")
    apps = [a for a in state.apps if state.platform(a) == "wecom" and state.corpid(a) == corpid]
    if not apps:
        return web.json_response({"errcode": 40013, "errmsg": "invalid corpid"})
    appid = next((a for a in apps if state.apps[a] == secret), None)
    if appid is None:
        return web.json_response({"errcode": 40001, "errmsg": "invalid credential"})
    # "有效期内重复获取返回相同结果,过期后获取会返回新的access_token" (获取access_token); like
    # WeChat's, the next token is issued a little before the current one expires.
    now = time.time()
    token, expires = current_token(state, appid, now)
    return web.json_response({"errcode": 0, "errmsg": "ok", "access_token": token,
                              "expires_in": math.ceil(expires - now)})


async def jscode2session(request: web.Request) -> web.StreamResponse:
    request.app[CALLS]["wecom_jscode2session"] += 1
    state, q = request.app[STATE], request.query
    entry = state.tokens.get(q.get("access_token", ""))
    if entry is None or q.get("access_token") in state.rejected:
        return web.json_response({"errcode": 40014, "errmsg": "invalid access_token"})
    appid, expires = entry
    if expires < time.time():
        return web.json_response({"errcode": 42001, "errmsg": "access_token expired"})
    code = q.get("js_code", "")
    if q.get("grant_type") != "authorization_code":
        return web.json_response({"errcode": 40002, "errmsg": "invalid grant_type"})
    if not code:
        return web.json_response({"errcode": 41008, "errmsg": "missing code"})
    failure = await fault(request, code)
    if failure is not None:
        return failure
    if code.startswith("noopenid-"):
        return web.json_response({"errcode": 0, "errmsg": "ok", "corpid": state.corpid(appid)})
    if state.single_use:
        if code in state.used:  # WeCom answers a used code as an invalid one
            return web.json_response({"errcode": 40029, "errmsg": "invalid code"})
        state.used.add(code)
    userid = openid_for(appid, code)
    state.session_keys[userid] = session_key_for(appid, code)
    corpid = "ww0000000000000000" if code.startswith("othercorp-") else state.corpid(appid)
    return web.json_response({"errcode": 0, "errmsg": "ok", "corpid": corpid, "userid": userid,
                              "session_key": state.session_keys[userid]})
