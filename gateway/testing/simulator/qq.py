"""QQ's login API, as documented (q.qq.com/wiki/develop/miniprogram/server/open_port/
port_login.html): WeChat's ``GET /sns/jscode2session`` on api.q.qq.com, so the shared route
hands a QQ appid's call here."""

from __future__ import annotations

from aiohttp import web

from .core import (CALLS, STATE, fault, for_other_app, openid_for, reply, session_key_for,
                   unionid_for)


async def jscode2session(request: web.Request) -> web.StreamResponse:
    request.app[CALLS]["qq.jscode2session"] += 1
    state, q = request.app[STATE], request.query
    appid, secret, code = q.get("appid", ""), q.get("secret", ""), q.get("js_code", "")
    # QQ documents only -1, 40029 and 45011; a wrong appid or secret gets WeChat's numbers.
    if appid not in state.apps:
        return reply({"errcode": 40013, "errmsg": "invalid appid"})
    if state.apps[appid] != secret:
        return reply({"errcode": 40125, "errmsg": "invalid appsecret"})
    if not code or for_other_app(code, appid):
        return reply({"errcode": 40029, "errmsg": "invalid code"})
    failure = await fault(request, code)
    if failure is not None:
        return failure
    if code.startswith("noopenid-"):
        return reply({"errcode": 0, "errmsg": ""})
    if state.single_use:
        if code in state.used:  # no "code used" errcode on QQ: it is an invalid code
            return reply({"errcode": 40029, "errmsg": "invalid code"})
        state.used.add(code)
    openid = openid_for(appid, code)
    state.session_keys[openid] = session_key_for(appid, code)
    body: dict[str, object] = {"errcode": 0, "errmsg": "", "openid": openid,
                               "session_key": state.session_keys[openid]}
    if not code.startswith("nounionid-"):
        body["unionid"] = unionid_for(code)
    return reply(body)
