"""A WeChat API simulator for the demo, the test suite and users' own integration tests.

Start it with ``simulator.create_app({"wx...": "secret"})`` and point ``wechat.api_base`` at it.
``jscode2session`` answers any code with a stable fake openid (per app and code) and unionid
(per code), so logging in twice with the same code gives the same user. A code can ask for a
failure by its prefix:

=====================  ===================================================================
``errcode-<N>-...``    WeChat's error ``<N>`` (e.g. ``errcode-40029-x``, ``errcode--1-x``)
``slow-<ms>-...``      answer after ``<ms>`` milliseconds
``http-<status>-...``  an HTTP error status with an HTML page, as WeChat's front ends do
``garbage-...``        a 200 reply that is not JSON
``reset-...``          close the connection without answering
``noopenid-...``       a 200 reply without openid and session_key
``nounionid-...``      a normal reply without unionid (app not bound to an Open Platform)
=====================  ===================================================================

With ``single_use=True`` a code works once and then gets errcode 40163, as on WeChat.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
from collections import Counter
from typing import Mapping

from aiohttp import web

CALLS = web.AppKey("calls", Counter[str])
_APPS = web.AppKey("apps", dict[str, str])
_USED = web.AppKey("used", set[str])
_SINGLE_USE = web.AppKey("single_use", bool)
_PREFIXED = re.compile(r"^(errcode|slow|http)-(-?\d+)-")


def create_app(apps: Mapping[str, str], *, single_use: bool = False) -> web.Application:
    """A simulator that knows ``apps`` (appid → secret)."""
    app = web.Application()
    app[_APPS] = dict(apps)
    app[CALLS] = Counter()
    app[_USED] = set()
    app[_SINGLE_USE] = single_use
    app.router.add_get("/sns/jscode2session", jscode2session)
    return app


def openid_for(appid: str, code: str) -> str:
    return "o" + _digest(f"openid/{appid}/{code}")[:27]


def unionid_for(code: str) -> str:
    return "u" + _digest(f"unionid/{code}")[:27]


def _digest(text: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).decode()


def _reply(body: dict[str, object]) -> web.Response:
    # WeChat labels its JSON replies text/plain; clients must parse them anyway.
    return web.Response(text=json.dumps(body), content_type="text/plain")


async def jscode2session(request: web.Request) -> web.StreamResponse:
    request.app[CALLS]["jscode2session"] += 1
    q = request.query
    appid, secret, code = q.get("appid", ""), q.get("secret", ""), q.get("js_code", "")
    apps = request.app[_APPS]
    if q.get("grant_type") != "authorization_code":
        return _reply({"errcode": 40002, "errmsg": "invalid grant_type"})
    if appid not in apps:
        return _reply({"errcode": 40013, "errmsg": "invalid appid"})
    if apps[appid] != secret:
        return _reply({"errcode": 40125, "errmsg": "invalid appsecret"})
    if not code:
        return _reply({"errcode": 41008, "errmsg": "missing code"})
    match = _PREFIXED.match(code)
    if match and match.group(1) == "errcode":
        return _reply({"errcode": int(match.group(2)), "errmsg": "simulated error"})
    if match and match.group(1) == "http":
        return web.Response(status=int(match.group(2)), text="<html>502 Bad Gateway</html>",
                            content_type="text/html")
    if match and match.group(1) == "slow":
        await asyncio.sleep(int(match.group(2)) / 1000)
    if code.startswith("garbage-"):
        return web.Response(text="<html>not json</html>", content_type="text/plain")
    if code.startswith("reset-"):
        assert request.transport is not None
        request.transport.abort()
        return web.Response()
    if code.startswith("noopenid-"):
        return _reply({"errcode": 0, "errmsg": "ok"})
    if request.app[_SINGLE_USE]:
        if code in request.app[_USED]:
            return _reply({"errcode": 40163, "errmsg": "code been used"})
        request.app[_USED].add(code)
    body: dict[str, object] = {
        "openid": openid_for(appid, code),
        "session_key": base64.b64encode(hashlib.sha256(f"sk/{appid}/{code}".encode())
                                        .digest()[:16]).decode()}
    if not code.startswith("nounionid-"):
        body["unionid"] = unionid_for(code)
    return _reply(body)
