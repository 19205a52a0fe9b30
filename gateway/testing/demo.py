"""``python -m gateway.testing.demo``: the whole gateway on one machine, nothing to install or sign up for.

Starts an embedded Redis, the simulator (a WeChat and a Douyin mini-program), a login hook (the app's own user directory)
and an echo upstream that shows the headers it receives, then the gateway in front of them,
and prints curl commands to try it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
import signal
import sys

from aiohttp import web

from .. import loader
from ..config import Config
from ..app import create_app
from ..server import runner
from . import simulator
from .embedded import EmbeddedRedis, free_port

DEMO_APPID = "wxdemo0000000001"
DEMO_SECRET = "demo-secret"
# A second platform beside WeChat, in the same gateway: a Douyin (ByteDance) mini-program.
DOUYIN_APPID = "ttdemo0000000001"
DOUYIN_SECRET = "demo-douyin-secret"


def echo_app() -> web.Application:
    """An upstream that answers every request with what it received, as JSON."""
    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response({
            "method": request.method, "path": request.raw_path.partition("?")[0],
            "query": request.query_string, "headers": dict(request.headers),
            "body_bytes": len(body)})
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


def hook_app() -> web.Application:
    """A login hook as an app would write one: every user is ``u-<openid's start>`` with the
    role ``user`` (so /admin/, which needs ``admin``, answers 403 forbidden_role)."""
    async def hook(request: web.Request) -> web.Response:
        asked = await request.json()
        return web.json_response({"user_id": f"u-{str(asked['openid'])[:8]}",
                                  "roles": ["user"]})
    app = web.Application()
    app.router.add_post("/login-hook", hook)
    return app


async def _serve(app: web.Application, host: str, port: int, *,
                 gateway: bool = False) -> web.AppRunner:
    # Only the gateway's requests go to its access log; the simulator's and the echo
    # server's would show every call twice.
    app_runner = (runner(app, shutdown_grace=2) if gateway
                  else web.AppRunner(app, access_log=None, shutdown_timeout=2))
    await app_runner.setup()
    await web.TCPSite(app_runner, host, port).start()
    return app_runner


def demo_config(redis_url: str, api_base: str, upstream: str, listen: str,
                login_hook: str | None = None) -> Config:
    return loader.parse({
        **({"login_hook": {"url": login_hook}} if login_hook else {}),
        "listen": listen,
        "redis": {"url": redis_url, "key_prefix": "wxgw-demo:"},
        "wechat": {"api_base": api_base, "timeout": "5s"},
        "apps": [{"appid": DEMO_APPID, "secret": DEMO_SECRET},
                 {"appid": DOUYIN_APPID, "secret": DOUYIN_SECRET, "platform": "douyin",
                  "api_base": api_base}],
        "session": {"signing_keys": [secrets.token_urlsafe(32)], "ttl": "1h",
                    "store_phone": True},
        "routes": [
            {"path": "/api/", "upstream": upstream, "auth": "required"},
            {"path": "/public/", "upstream": upstream, "auth": "public"},
            {"path": "/maybe/", "upstream": upstream, "auth": "optional"},
            {"path": "/admin/", "upstream": upstream, "roles": ["admin"]},
        ]}, environ={})


async def run(host: str, port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    with EmbeddedRedis(persist=False) as redis:
        wechat_port, upstream_port, hook_port = free_port(), free_port(), free_port()
        runners = [
            await _serve(simulator.create_app({DEMO_APPID: DEMO_SECRET, DOUYIN_APPID: DOUYIN_SECRET},
                                              platforms={DOUYIN_APPID: "douyin"}),
                         "127.0.0.1", wechat_port),
            await _serve(echo_app(), "127.0.0.1", upstream_port),
            await _serve(hook_app(), "127.0.0.1", hook_port)]
        config = demo_config(redis.url, f"http://127.0.0.1:{wechat_port}",
                             f"http://127.0.0.1:{upstream_port}", f"{host}:{port}",
                             f"http://127.0.0.1:{hook_port}/login-hook")
        runners.append(await _serve(create_app(config), host, port, gateway=True))
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        print(_instructions(f"http://{shown}:{port}", f"http://127.0.0.1:{wechat_port}"),
              flush=True)
        await stop.wait()
        for runner in reversed(runners):
            await runner.cleanup()


def _instructions(base: str, wechat: str) -> str:
    # Every command works pasted in order into one shell: they share $TOKEN, so logging out
    # comes last. The "# NNN" after each is the HTTP status it answers (the demo's test runs
    # them as printed and checks it).
    appid, douyin = DEMO_APPID, DOUYIN_APPID
    token = "python3 -c 'import json,sys; print(json.load(sys.stdin)[\"token\"])'"
    return f"""
wx-gateway demo is running on {base}
  Redis: embedded   WeChat and Douyin: built-in simulator   upstream: echo server (shows what
  it receives)   apps: {appid} (WeChat), {douyin} (Douyin)
  login hook: every user gets X-User-ID and the role "user"
  routes: /api/ (auth: required)  /public/ (auth: public)  /maybe/ (auth: optional)
          /admin/ (auth: required, role admin)

Paste these into one shell, in order (the number after # is the HTTP status to expect):

1. Log in to the WeChat app with any code (the simulator turns each code into a stable fake
   user):
   curl -s -X POST {base}/auth/login -H 'Content-Type: application/json' -d '{{"appid": "{appid}", "code": "alice"}}'  # 200

2. Call a protected route with the token (the upstream sees X-WX-OpenID, X-User-ID and
   X-User-Roles from the login hook, never the token):
   TOKEN=$(curl -s -X POST {base}/auth/login -d '{{"appid": "{appid}", "code": "alice"}}' | {token})  # 200
   curl -s '{base}/api/orders?page=1' -H "Authorization: Bearer $TOKEN"  # 200

   The same gateway serves a Douyin mini-program: its code (tt.login) goes to Douyin, and the
   upstream sees X-MP-Platform: douyin instead of wechat:
   DOUYIN=$(curl -s -X POST {base}/auth/login -d '{{"appid": "{douyin}", "code": "bob"}}' | {token})  # 200
   curl -s '{base}/api/orders?page=1' -H "Authorization: Bearer $DOUYIN"  # 200

3. Without a token, with forged identity headers, without the role a route needs:
   curl -s -i {base}/api/orders  # 401
   curl -s {base}/public/hello -H 'X-WX-OpenID: forged' -H 'X-User-Roles: admin'  # 200
   curl -s -i {base}/admin/users -H "Authorization: Bearer $TOKEN"  # 403

4. The session, and a fresh token for it:
   curl -s {base}/auth/session -H "Authorization: Bearer $TOKEN"  # 200
   TOKEN=$(curl -s -X POST {base}/auth/refresh -H "Authorization: Bearer $TOKEN" | {token})  # 200

5. Phone number (the code a getPhoneNumber button gives; any code works here):
   curl -s -X POST {base}/auth/phone -H "Authorization: Bearer $TOKEN" -d '{{"code": "phone-1"}}'  # 200

6. Legacy user data: what wx.getUserInfo would hand the mini-program for login code "alice",
   decrypted and signature-checked by the gateway with the session's session_key:
   USERDATA=$(curl -s '{wechat}/_simulator/userdata?appid={appid}&code=alice')  # 200
   curl -s -X POST {base}/auth/decrypt -H "Authorization: Bearer $TOKEN" -d "$USERDATA"  # 200
   curl -s -X POST {base}/auth/check-signature -H "Authorization: Bearer $TOKEN" -d "$USERDATA"  # 200
   curl -s '{base}/auth/session?check=true' -H "Authorization: Bearer $TOKEN"  # 200

7. Log out: the token stops working at once.
   curl -s -i -X POST {base}/auth/logout -H "Authorization: Bearer $TOKEN"  # 204
   curl -s -i {base}/auth/session -H "Authorization: Bearer $TOKEN"  # 401

WeChat errors on request: code "errcode-40029-x" (invalid code), "errcode-40226-x" (blocked),
"errcode-45011-x" (rate limited), "errcode--1-x" (busy), "slow-6000-x" (timeout); Douyin's
invalid code is "errcode-40018-x".
Press Ctrl+C to stop.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.testing.demo", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(run(args.host, args.port))
    except OSError as exc:
        print(f"cannot start the demo on {args.host}:{args.port}: {exc.strerror or exc} "
              f"(try --port)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
