"""A WeChat API simulator for the demo, the test suite and users' own integration tests.

As a command, for a staging stack or a mini-program's integration tests::

    python -m gateway.testing.simulator --port 9100 --app wx1234567890abcdef:secret [--app ...]

then point the gateway's ``wechat.api_base`` at it (``http://127.0.0.1:9100``); each ``--app``
is an appid and the secret the gateway's ``apps`` give it. It prints where it listens and runs
until SIGTERM or SIGINT. In Python: ``simulator.create_app({"wx...": "secret"})``.
It answers, like WeChat (JSON labelled ``text/plain``):

- ``GET /sns/jscode2session``: any code logs in as a stable fake user (openid per app and code,
  unionid per code); session_key per app and code.
- ``POST /cgi-bin/stable_token``: access tokens that expire after ``token_ttl`` seconds. Normal
  mode hands out the current token (same token, decreasing ``expires_in``); ``force_refresh``
  revokes it and issues a new one, unless the previous force was under ``force_interval``
  seconds ago (then the current token is returned and nothing is revoked); a force beyond
  ``force_daily_limit`` a day gets errcode 45009. ``SimulatorState.force_calls`` counts force
  requests per appid; ``SimulatorState.reject_access_token`` makes WeChat refuse a token that
  normal mode still hands out.
- ``POST /wxa/business/getuserphonenumber``: a stable fake phone number per code.
- ``GET /wxa/checksession``: errcode 87009 unless the signature matches the user's current
  session_key (``SimulatorState.revoke_session_key`` makes it stale).
- ``GET /_simulator/userdata?appid=&code=``: not WeChat's: what a mini-program would get from
  ``wx.getUserInfo`` for that login code (``encrypted_data``, ``iv``, ``raw_data``,
  ``signature``), to try ``/auth/decrypt`` and ``/auth/check-signature`` by hand.

A code asks for a failure by its prefix (login and phone codes alike):

=====================  ===================================================================
``errcode-<N>-...``    WeChat's error ``<N>`` (e.g. ``errcode-40029-x``, ``errcode--1-x``)
``errstr-<S>-...``     errcode as the JSON string ``<S>`` (``errstr-40029-x``, ``errstr-busy-x``)
``slow-<ms>-...``      answer after ``<ms>`` milliseconds
``http-<status>-...``  an HTTP error status with an HTML page, as WeChat's front ends do
``garbage-...``        a 200 reply that is not JSON
``reset-...``          close the connection without answering
``noopenid-...``       a 200 reply without openid and session_key (login)
``nounionid-...``      a normal reply without unionid (app not bound to an Open Platform)
``otherapp-...``       a phone number whose watermark names another appid
=====================  ===================================================================

With ``single_use=True`` a login code works once and then gets errcode 40163, as on WeChat.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import math
import os
import re
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping

from aiohttp import web
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

CALLS = web.AppKey("calls", Counter[str])
_PREFIXED = re.compile(r"^(errcode|slow|http)-(-?\d+)-")
_ERRSTR = re.compile(r"^errstr-(-?[^-]*)-")


@dataclass
class SimulatorState:
    apps: dict[str, str]
    single_use: bool = False
    token_ttl: int = 7200
    used: set[str] = field(default_factory=set)
    tokens: dict[str, tuple[str, float]] = field(default_factory=dict)  # token → (appid, exp)
    session_keys: dict[str, str] = field(default_factory=dict)  # openid → current session_key
    force_interval: float = 30.0
    force_daily_limit: int = 20
    force_calls: Counter[str] = field(default_factory=Counter)  # appid → force_refresh requests
    forced_at: dict[str, list[float]] = field(default_factory=dict)  # appid → effective forces
    rejected: set[str] = field(default_factory=set)  # refused by the APIs, still handed out

    def expire_access_tokens(self) -> None:
        """Make every issued access_token invalid (WeChat then answers 40001)."""
        self.tokens.clear()

    def reject_access_token(self, appid: str) -> str:
        """WeChat refuses ``appid``'s current token (40001) yet normal mode keeps handing it out:
        the state ``force_refresh`` exists for (a leaked token). Returns that token."""
        token, _ = _current_token(self, appid, time.time())
        self.rejected.add(token)
        return token

    def revoke_session_key(self, openid: str) -> None:
        """The user logged in elsewhere: the session_key the gateway holds is now stale."""
        self.session_keys[openid] = base64.b64encode(os.urandom(16)).decode()


STATE = web.AppKey("state", SimulatorState)


def create_app(apps: Mapping[str, str], *, single_use: bool = False,
               token_ttl: int = 7200, force_interval: float = 30.0) -> web.Application:
    """A simulator that knows ``apps`` (appid → secret)."""
    app = web.Application()
    app[STATE] = SimulatorState(dict(apps), single_use, token_ttl,
                                force_interval=force_interval)
    app[CALLS] = Counter()
    app.router.add_get("/sns/jscode2session", jscode2session)
    app.router.add_post("/cgi-bin/stable_token", stable_token)
    app.router.add_post("/wxa/business/getuserphonenumber", phone_number)
    app.router.add_get("/wxa/checksession", check_session)
    app.router.add_get("/_simulator/userdata", userdata)
    return app


def openid_for(appid: str, code: str) -> str:
    return "o" + _digest(f"openid/{appid}/{code}")[:27]


def unionid_for(code: str) -> str:
    return "u" + _digest(f"unionid/{code}")[:27]


def session_key_for(appid: str, code: str) -> str:
    return base64.b64encode(hashlib.sha256(f"sk/{appid}/{code}".encode()).digest()[:16]).decode()


def phone_for(code: str) -> str:
    return "138" + str(int(hashlib.sha256(f"phone/{code}".encode()).hexdigest(), 16))[:8]


def encrypt_user_data(session_key: str, data: Mapping[str, Any]) -> tuple[str, str]:
    """What WeChat gives a mini-program: AES-128-CBC/PKCS#7 under the session_key."""
    iv = os.urandom(16)
    padder = padding.PKCS7(128).padder()
    plain = padder.update(json.dumps(data).encode()) + padder.finalize()
    encryptor = Cipher(algorithms.AES(base64.b64decode(session_key)), modes.CBC(iv)).encryptor()
    sealed = encryptor.update(plain) + encryptor.finalize()
    return base64.b64encode(sealed).decode(), base64.b64encode(iv).decode()


def _digest(text: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).decode()


def _reply(body: Mapping[str, object]) -> web.Response:
    # WeChat labels its JSON replies text/plain; clients must parse them anyway.
    return web.Response(text=json.dumps(body), content_type="text/plain")


async def _fault(request: web.Request, code: str) -> web.StreamResponse | None:
    """The failure a prefixed code asks for, or None to answer normally."""
    text = _ERRSTR.match(code)
    if text:  # some WeChat front ends send errcode as a string
        return _reply({"errcode": text.group(1), "errmsg": "simulated error"})
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
    return None


def _token_app(request: web.Request) -> str | None:
    state = request.app[STATE]
    token = request.query.get("access_token", "")
    entry = state.tokens.get(token)
    if entry is None or entry[1] < time.time() or token in state.rejected:
        return None
    return entry[0]


async def jscode2session(request: web.Request) -> web.StreamResponse:
    request.app[CALLS]["jscode2session"] += 1
    state, q = request.app[STATE], request.query
    appid, secret, code = q.get("appid", ""), q.get("secret", ""), q.get("js_code", "")
    if q.get("grant_type") != "authorization_code":
        return _reply({"errcode": 40002, "errmsg": "invalid grant_type"})
    if appid not in state.apps:
        return _reply({"errcode": 40013, "errmsg": "invalid appid"})
    if state.apps[appid] != secret:
        return _reply({"errcode": 40125, "errmsg": "invalid appsecret"})
    if not code:
        return _reply({"errcode": 41008, "errmsg": "missing code"})
    fault = await _fault(request, code)
    if fault is not None:
        return fault
    if code.startswith("noopenid-"):
        return _reply({"errcode": 0, "errmsg": "ok"})
    if state.single_use:
        if code in state.used:
            return _reply({"errcode": 40163, "errmsg": "code been used"})
        state.used.add(code)
    openid = openid_for(appid, code)
    state.session_keys[openid] = session_key_for(appid, code)
    body: dict[str, object] = {"openid": openid, "session_key": state.session_keys[openid]}
    if not code.startswith("nounionid-"):
        body["unionid"] = unionid_for(code)
    return _reply(body)


async def stable_token(request: web.Request) -> web.StreamResponse:
    request.app[CALLS]["stable_token"] += 1
    state = request.app[STATE]
    try:
        body = await request.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return _reply({"errcode": 47001, "errmsg": "data format error"})
    appid, secret = body.get("appid", ""), body.get("secret", "")
    if body.get("grant_type") != "client_credential":
        return _reply({"errcode": 40002, "errmsg": "invalid grant_type"})
    if appid not in state.apps or state.apps[appid] != secret:
        return _reply({"errcode": 40125, "errmsg": "invalid appsecret"})
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
            return _reply({"errcode": 45009, "errmsg": "reach max api daily quota limit"})
        if not forced or now - forced[-1] >= state.force_interval:
            state.forced_at[appid] = [*forced, now]
            for token in [t for t, (a, _) in state.tokens.items() if a == appid]:
                del state.tokens[token]
                state.rejected.discard(token)
    token, expires = _current_token(state, appid, now)
    return _reply({"access_token": token, "expires_in": math.ceil(expires - now)})


def _current_token(state: SimulatorState, appid: str, now: float) -> tuple[str, float]:
    """``appid``'s current token and its expiry, issuing one when due.

    The doc: "平台会提前5分钟更新access_token ... 新旧access_token都可用" — a new token is issued
    in the last 5 minutes of the current one's life (the last fifth, for short test lifetimes),
    and the old one stays valid until it expires, so ``expires_in`` is never under that window.
    """
    window = min(300.0, state.token_ttl / 5)
    current = [(t, e) for t, (a, e) in state.tokens.items() if a == appid and e > now + window]
    if current:
        return max(current, key=lambda item: item[1])
    token = f"AT.{appid}.{base64.urlsafe_b64encode(os.urandom(12)).decode()}"
    state.tokens[token] = (appid, now + state.token_ttl)
    return token, now + state.token_ttl


async def phone_number(request: web.Request) -> web.StreamResponse:
    request.app[CALLS]["getuserphonenumber"] += 1
    appid = _token_app(request)
    if appid is None:
        return _reply({"errcode": 40001, "errmsg": "invalid credential, access_token is invalid"})
    try:
        code = str((await request.json()).get("code", ""))
    except ValueError:
        return _reply({"errcode": 47001, "errmsg": "data format error"})
    fault = await _fault(request, code)
    if fault is not None:
        return fault
    if not code:
        return _reply({"errcode": 40029, "errmsg": "invalid code"})
    pure = phone_for(code)
    watermark = "wx0000000000000000" if code.startswith("otherapp-") else appid
    return _reply({"errcode": 0, "errmsg": "ok", "phone_info": {
        "phoneNumber": f"+86{pure}", "purePhoneNumber": pure, "countryCode": "86",
        "watermark": {"timestamp": int(time.time()), "appid": watermark}}})


async def check_session(request: web.Request) -> web.StreamResponse:
    request.app[CALLS]["checksession"] += 1
    if _token_app(request) is None:
        return _reply({"errcode": 40001, "errmsg": "invalid credential, access_token is invalid"})
    key = request.app[STATE].session_keys.get(request.query.get("openid", ""))
    expected = hmac.new(key.encode(), b"", hashlib.sha256).hexdigest() if key else ""
    if request.query.get("sig_method") != "hmac_sha256" or not key or not hmac.compare_digest(
            expected, request.query.get("signature", "")):
        return _reply({"errcode": 87009, "errmsg": "invalid signature"})
    return _reply({"errcode": 0, "errmsg": "ok"})


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


def _app_arg(text: str) -> tuple[str, str]:
    appid, sep, secret = text.partition(":")
    if not sep or not appid or not secret:
        raise argparse.ArgumentTypeError(f"expected APPID:SECRET, got {text!r}")
    return appid, secret


async def serve(apps: Mapping[str, str], host: str, port: int, *,
                single_use: bool = False, token_ttl: int = 7200) -> None:
    """Serve the simulator on ``host:port`` until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(create_app(apps, single_use=single_use, token_ttl=token_ttl),
                           shutdown_timeout=2)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        print(f"WeChat simulator listening on http://{host}:{port} "
              f"(apps: {', '.join(apps)}): set wechat.api_base to it", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gateway.testing.simulator",
        description="A WeChat API simulator: point the gateway's wechat.api_base at it.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; 0.0.0.0 in a container)")
    parser.add_argument("--port", type=int, default=9100, help="default 9100")
    parser.add_argument("--app", type=_app_arg, action="append", required=True,
                        metavar="APPID:SECRET", help="a mini-program it knows (repeatable)")
    parser.add_argument("--single-use", action="store_true",
                        help="a login code works once, then errcode 40163 (as on WeChat)")
    parser.add_argument("--token-ttl", type=int, default=7200,
                        help="access token lifetime in seconds (default 7200)")
    args = parser.parse_args(argv)
    try:
        asyncio.run(serve(dict(args.app), args.host, args.port,
                          single_use=args.single_use, token_ttl=args.token_ttl))
    except OSError as exc:
        print(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
