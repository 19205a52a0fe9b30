"""Douyin's login API, as documented (developer.open-douyin.com/docs/resource/zh-CN/mini-app/
develop/server/basic-abilities/log-in/code-2-session): ``POST /api/apps/v2/jscode2session``
with a JSON body; JSON replies (application/json) with an int ``err_no``, ``err_tips`` and the
user nested in ``data``."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from .core import (CALLS, STATE, asked_error, fault, for_other_app, openid_for,
                   session_key_for, unionid_for)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/apps/v2/jscode2session", jscode2session)


def _reply(err_no: int | str, err_tips: str, data: dict[str, Any] | None = None) -> web.Response:
    return web.json_response({"err_no": err_no, "err_tips": err_tips, "log_id": "simulated",
                              "data": data})


async def jscode2session(request: web.Request) -> web.StreamResponse:
    request.app[CALLS]["douyin.jscode2session"] += 1
    state = request.app[STATE]
    try:
        body = await request.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return _reply(40014, "bad params")
    appid, secret = str(body.get("appid", "")), str(body.get("secret", ""))
    code, anonymous = str(body.get("code") or ""), str(body.get("anonymous_code") or "")
    if not code and not anonymous:
        return _reply(40014, "bad params")
    if appid not in state.apps or state.platform(appid) != "douyin":
        return _reply(40015, "bad appid")
    if state.apps[appid] != secret:
        return _reply(40017, "bad secret")
    if not code:  # an anonymous login: a device's id and nothing else
        return _reply(0, "", {"session_key": "", "openid": "", "unionid": "",
                              "anonymous_openid": openid_for(appid, "anonymous/" + anonymous)})
    if for_other_app(code, appid):
        return _reply(40018, "bad code")
    asked = asked_error(code)
    if asked is not None:
        return _reply(asked, "simulated error")
    failure = await fault(request, code)
    if failure is not None:
        return failure
    if code.startswith("noopenid-"):
        return _reply(0, "", {"session_key": "", "openid": "", "unionid": "",
                              "anonymous_openid": openid_for(appid, "anonymous/" + code)})
    if state.single_use:
        if code in state.used:  # single-use: a used code is a bad one
            return _reply(40018, "bad code")
        state.used.add(code)
    openid = openid_for(appid, code)
    state.session_keys[openid] = session_key_for(appid, code)
    return _reply(0, "", {
        "session_key": state.session_keys[openid], "openid": openid,
        "anonymous_openid": openid_for(appid, "anonymous/" + code) if anonymous else "",
        "unionid": "" if code.startswith("nounionid-") else unionid_for(code)})
