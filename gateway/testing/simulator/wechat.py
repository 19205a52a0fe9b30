"""WeChat's server API, as documented (developers.weixin.qq.com/miniprogram/dev/OpenApiDoc/)."""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import time

from aiohttp import web

from . import qq
from .core import (CALLS, STATE, current_token, encrypt_user_data, fault, openid_for, phone_for,
                   reply, session_key_for, token_app, unionid_for)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/sns/jscode2session", jscode2session)
    app.router.add_post("/cgi-bin/stable_token", stable_token)
    app.router.add_post("/wxa/business/getuserphonenumber", phone_number)
    app.router.add_get("/wxa/checksession", check_session)
    app.router.add_get("/_simulator/userdata", userdata)


async def jscode2session(request: web.Request) -> web.StreamResponse:
    if request.app[STATE].platform(request.query.get("appid", "")) == "qq":
        return await qq.jscode2session(request)  # QQ's login is WeChat's path on its own host
    request.app[CALLS]["jscode2session"] += 1
    state, q = request.app[STATE], request.query
    appid, secret, code = q.get("appid", ""), q.get("secret", ""), q.get("js_code", "")
    if q.get("grant_type") != "authorization_code":
        return reply({"errcode": 40002, "errmsg": "invalid grant_type"})
    if appid not in state.apps:
        return reply({"errcode": 40013, "errmsg": "invalid appid"})
    if state.apps[appid] != secret:
        return reply({"errcode": 40125, "errmsg": "invalid appsecret"})
    if not code:
        return reply({"errcode": 41008, "errmsg": "missing code"})
    failure = await fault(request, code)
    if failure is not None:
        return failure
    if code.startswith("noopenid-"):
        return reply({"errcode": 0, "errmsg": "ok"})
    if state.single_use:
        if code in state.used:
            return reply({"errcode": 40163, "errmsg": "code been used"})
        state.used.add(code)
    openid = openid_for(appid, code)
    state.session_keys[openid] = session_key_for(appid, code)
    body: dict[str, object] = {"openid": openid, "session_key": state.session_keys[openid]}
    if not code.startswith("nounionid-"):
        body["unionid"] = unionid_for(code)
    return reply(body)


async def stable_token(request: web.Request) -> web.StreamResponse:
    request.app[CALLS]["stable_token"] += 1
    state = request.app[STATE]
    try:
        body = await request.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return reply({"errcode": 47001, "errmsg": "data format error"})
    appid, secret = body.get("appid", ""), body.get("secret", "")
    if body.get("grant_type") != "client_credential":
        return reply({"errcode": 40002, "errmsg": "invalid grant_type"})
    if appid not in state.apps or state.apps[appid] != secret:
        return reply({"errcode": 40125, "errmsg": "invalid appsecret"})
    # getStableAccessToken ("获取稳定版接口调用凭据", developers.weixin.qq.com/doc/service/api/
    # base/api_getstableaccesstoken.html): normal mode returns the current token while it is
    # valid; force_refresh "会导致上次获取的access_token失效,并返回新的access_token", is limited
    # to 20 calls a day, and "连续使用该模式时,请保证调用时间隔至少为30s,否则不会刷新": a force
    # within 30 s of the previous one refreshes nothing (the doc names no errcode for it).
    now = time.time()
    if body.get("force_refresh") is True:
        state.force_calls[appid] += 1
        forced = [t for t in state.forced_at.get(appid, []) if t > now - 86400]
        if len(forced) >= state.force_daily_limit:
            return reply({"errcode": 45009, "errmsg": "reach max api daily quota limit"})
        if not forced or now - forced[-1] >= state.force_interval:
            state.forced_at[appid] = [*forced, now]
            for token in [t for t, (a, _) in state.tokens.items() if a == appid]:
                del state.tokens[token]
                state.rejected.discard(token)
    token, expires = current_token(state, appid, now)
    return reply({"access_token": token, "expires_in": math.ceil(expires - now)})


async def phone_number(request: web.Request) -> web.StreamResponse:
    request.app[CALLS]["getuserphonenumber"] += 1
    appid = token_app(request)
    if appid is None:
        return reply({"errcode": 40001, "errmsg": "invalid credential, access_token is invalid"})
    try:
        code = str((await request.json()).get("code", ""))
    except ValueError:
        return reply({"errcode": 47001, "errmsg": "data format error"})
    failure = await fault(request, code)
    if failure is not None:
        return failure
    if not code:
        return reply({"errcode": 40029, "errmsg": "invalid code"})
    pure = phone_for(code)
    watermark = "wx0000000000000000" if code.startswith("otherapp-") else appid
    return reply({"errcode": 0, "errmsg": "ok", "phone_info": {
        "phoneNumber": f"+86{pure}", "purePhoneNumber": pure, "countryCode": "86",
        "watermark": {"timestamp": int(time.time()), "appid": watermark}}})


async def check_session(request: web.Request) -> web.StreamResponse:
    request.app[CALLS]["checksession"] += 1
    if token_app(request) is None:
        return reply({"errcode": 40001, "errmsg": "invalid credential, access_token is invalid"})
    key = request.app[STATE].session_keys.get(request.query.get("openid", ""))
    expected = hmac.new(key.encode(), b"", hashlib.sha256).hexdigest() if key else ""
    if request.query.get("sig_method") != "hmac_sha256" or not key or not hmac.compare_digest(
            expected, request.query.get("signature", "")):
        return reply({"errcode": 87009, "errmsg": "invalid signature"})
    return reply({"errcode": 0, "errmsg": "ok"})


async def userdata(request: web.Request) -> web.StreamResponse:
    appid, code = request.query.get("appid", ""), request.query.get("code", "")
    if appid not in request.app[STATE].apps or not code:
        raise web.HTTPBadRequest(text="appid (configured) and code are required")
    key = session_key_for(appid, code)
    user = {"openId": openid_for(appid, code), "nickName": "Demo User", "gender": 0,
            "language": "zh_CN", "watermark": {"timestamp": int(time.time()), "appid": appid}}
    encrypted, iv = encrypt_user_data(key, user)
    raw_data = json.dumps({"nickName": "Demo User", "gender": 0})
    signature = hashlib.sha1((raw_data + key).encode()).hexdigest()
    return web.json_response({"encrypted_data": encrypted, "iv": iv, "raw_data": raw_data,
                              "signature": signature})


