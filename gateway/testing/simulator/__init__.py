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
- For an app on platform ``wecom`` (``--app wecom:APPID:SECRET``, its corp ``--corpid
  APPID=CORPID`` or derived: ``corpid_for(appid)``): WeCom's ``GET /cgi-bin/gettoken`` and
  ``GET /cgi-bin/miniprogram/jscode2session`` (``testing/simulator/wecom.py``).
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

Other platforms' apps (``platforms``, or ``--app PLATFORM:APPID:SECRET``) are answered their
platform's way: a QQ appid at ``/sns/jscode2session`` as QQ does (``simulator/qq.py``), Douyin's
``POST /api/apps/v2/jscode2session`` (``simulator/douyin.py``). The prefixes above work there
with the platform's own numbers; ``app-<appid>-...`` is a code another app's login gave, which
every other app refuses as an invalid code.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Mapping

from aiohttp import web

from . import alipay, douyin, wechat, wecom
from .core import (CALLS, STATE, SimulatorState, corpid_for, encrypt_user_data, openid_for,
                   phone_for, session_key_for, unionid_for)

__all__ = ["CALLS", "STATE", "SimulatorState", "corpid_for", "create_app", "encrypt_user_data",
           "main", "openid_for", "phone_for", "serve", "session_key_for", "unionid_for"]
PLATFORMS = ("wechat", "wecom", "qq", "douyin", "alipay")


def create_app(apps: Mapping[str, str], *, single_use: bool = False,
               token_ttl: int = 7200, force_interval: float = 30.0,
               platforms: Mapping[str, str] | None = None,
               corpids: Mapping[str, str] | None = None,
               alipay_keys: alipay.AlipayKeys | None = None) -> web.Application:
    """A simulator that knows ``apps`` (appid → secret), each on its platform (appid →
    ``wechat``, ``wecom``, ``qq``, ``douyin`` or ``alipay``; absent: ``wechat``); a WeCom app's
    corp is ``corpids[appid]``, else ``corpid_for(appid)``. ``alipay_keys``: its own key and
    the Alipay apps' public keys (default: new ones, in ``app[alipay.ALIPAY_KEYS]``)."""
    app = web.Application()
    app[STATE] = SimulatorState(dict(apps), single_use, token_ttl,
                                force_interval=force_interval, platforms=dict(platforms or {}),
                                corpids=dict(corpids or {}))
    app[CALLS] = Counter()
    wechat.add_routes(app)
    douyin.add_routes(app)
    wecom.add_routes(app)
    on_alipay = [a for a, p in (platforms or {}).items() if p == "alipay"]
    if alipay_keys is not None or on_alipay:  # RSA keys take a while to make: only if used
        alipay.add_routes(app, alipay_keys or alipay.AlipayKeys.generate(on_alipay))
    return app


def _app_arg(text: str) -> tuple[str, str, str]:
    """``APPID:SECRET``, or ``PLATFORM:APPID:SECRET`` for another platform than WeChat."""
    head, sep, rest = text.partition(":")
    platform = "wechat"
    if head == "alipay" and rest and ":" not in rest:  # Alipay apps have no secret
        return rest, "", head
    if head in PLATFORMS and rest.count(":") >= 1:
        platform, (head, sep, rest) = head, rest.partition(":")
    elif ":" in rest:  # no secret has a colon: this is a platform, and not one we know
        raise argparse.ArgumentTypeError(
            f"expected [PLATFORM:]APPID:SECRET, PLATFORM one of {', '.join(PLATFORMS)}; "
            f"got {text!r}")
    elif head in PLATFORMS:  # an appid and secret named like a platform: one was left out
        sep = ""
    if not sep or not head or not rest:
        raise argparse.ArgumentTypeError(f"expected [PLATFORM:]APPID:SECRET, got {text!r}")
    return head, rest, platform


def _corpid_arg(text: str) -> tuple[str, str]:
    appid, sep, corpid = text.partition("=")
    if not sep or not appid or not corpid:
        raise argparse.ArgumentTypeError(f"expected APPID=CORPID, got {text!r}")
    return appid, corpid


async def serve(apps: Mapping[str, str], host: str, port: int, *,
                single_use: bool = False, token_ttl: int = 7200,
                platforms: Mapping[str, str] | None = None,
                corpids: Mapping[str, str] | None = None,
                alipay_keys: alipay.AlipayKeys | None = None) -> None:
    """Serve the simulator on ``host:port`` until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    simulator = create_app(apps, single_use=single_use, token_ttl=token_ttl,
                           platforms=platforms, corpids=corpids, alipay_keys=alipay_keys)
    runner = web.AppRunner(simulator, shutdown_timeout=2)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        print(f"WeChat simulator listening on http://{host}:{port} "
              f"(apps: {', '.join(apps)}): set wechat.api_base to it", flush=True)
        state = simulator[STATE]
        for appid in (a for a in apps if state.platform(a) == "wecom"):
            print(f"WeCom app {appid}: corpid {state.corpid(appid)}", flush=True)
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
                        metavar="[PLATFORM:]APPID:SECRET",
                        help="a mini-program it knows (repeatable); PLATFORM: wechat (default), "
                             "wecom, qq, douyin or alipay")
    parser.add_argument("--single-use", action="store_true",
                        help="a login code works once, then errcode 40163 (as on WeChat)")
    parser.add_argument("--token-ttl", type=int, default=7200,
                        help="access token lifetime in seconds (default 7200)")
    parser.add_argument("--corpid", type=_corpid_arg, action="append", default=[],
                        metavar="APPID=CORPID",
                        help="a WeCom app's corpid (repeatable; default: derived from the "
                             "appid and printed at start)")
    parser.add_argument("--alipay-keys", type=Path, metavar="DIR",
                        help="keep the Alipay keys as PEM files in DIR, made on first use: "
                             "alipay_public_key.pem and <appid>_private_key.pem for the "
                             "gateway's config (or bring your <appid>_public_key.pem)")
    args = parser.parse_args(argv)
    platforms = {appid: p for appid, _, p in args.app}
    keys = (alipay.AlipayKeys.directory(args.alipay_keys,
                                        [a for a, p in platforms.items() if p == "alipay"])
            if args.alipay_keys is not None else None)
    try:
        asyncio.run(serve({appid: secret for appid, secret, _ in args.app}, args.host,
                          args.port, single_use=args.single_use, token_ttl=args.token_ttl,
                          platforms=platforms, corpids=dict(args.corpid),
                          alipay_keys=keys))
    except OSError as exc:
        print(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
