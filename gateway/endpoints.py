"""The gateway's own endpoints: ``/auth/*``, ``/healthz``, ``/readyz``, ``/metrics``."""

from __future__ import annotations

import asyncio
import functools
import json
import re
import time
from typing import Any, Awaitable, Callable

from aiohttp import web
from multidict import CIMultiDictProxy

from . import expectation, userdata
from .auth import Identity, bearer_token, identity_headers
from .config import Config
from .forwarded import client_address
from .errors import (GatewayError, InvalidCode, InvalidRequest, MethodNotAllowed, NotFound,
                     PayloadTooLarge,
                     StoreUnavailable, Unauthorized, UnknownApp, UserBlocked, WeChatError)
from .login_hook import LoginHook
from .metrics import CONTENT_TYPE
from .platform import Code2Session
from .services import Services
from .sessions import Session
from .state import HOOK_OUTCOME, IDENTITY, METRICS, SERVICES

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_BODY_BYTES = 16 * 1024
MAX_CODE_LENGTH = 128
# Every platform's ids become identity header values and assertion claims: a control
# character would break the forwarded request, a space be trimmed into another id.
_HEADER_SAFE_ID = re.compile(r"[\x21-\x7e]{1,128}")


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(body, ensure_ascii=False), status=status,
                        content_type="application/json", charset="utf-8")


def add_routes(app: web.Application, config: Config) -> None:
    p = config.auth_prefix
    # Registered for every method so a wrong one gets 405 here instead of falling through
    # to the proxy's catch-all route.
    for path, methods, handler in (
            (f"{p}/login", ("POST",), login), (f"{p}/logout", ("POST",), logout),
            (f"{p}/refresh", ("POST",), refresh), (f"{p}/session", ("GET", "HEAD"), session),
            (f"{p}/phone", ("POST",), _with_body(userdata.phone)),
            (f"{p}/decrypt", ("POST",), _with_body(userdata.decrypt)),
            (f"{p}/check-signature", ("POST",), _with_body(userdata.check_signature)),
            ("/healthz", ("GET", "HEAD"), healthz), ("/readyz", ("GET", "HEAD"), readyz),
            ("/metrics", ("GET", "HEAD"), metrics),
            ("/.well-known/jwks.json", ("GET", "HEAD"), jwks)):
        app.router.add_route("*", path, _only(methods, handler), expect_handler=expectation.expect_handler)
    # Forward-auth callers (nginx auth_request, Traefik, Caddy) may use the original method.
    app.router.add_route("*", f"{p}/verify", verify, expect_handler=expectation.expect_handler)


def _only(methods: tuple[str, ...], handler: Handler) -> Handler:
    async def guarded(request: web.Request) -> web.StreamResponse:
        if request.method not in methods:
            raise MethodNotAllowed(f"{request.path} accepts {', '.join(methods)}",
                                   headers={"Allow": ", ".join(methods)})
        return await handler(request)
    return guarded


def _with_body(operation: Callable[[Services, Identity, dict[str, Any]],
                                   Awaitable[dict[str, Any]]]) -> Handler:
    """An endpoint that needs a live session and a JSON object body."""
    async def handler(request: web.Request) -> web.StreamResponse:
        identity = await _identity(request)
        body = await _json_object(request)
        return json_response(await operation(request.app[SERVICES].current, identity, body))
    return handler


async def login(request: web.Request) -> web.Response:
    s = request.app[SERVICES].current
    try:
        body = await _json_object(request)
        code, appid = body.get("code"), body.get("appid")
        if not isinstance(code, str) or not code:
            raise InvalidRequest("code is required and must be a non-empty string")
        if len(code) > MAX_CODE_LENGTH or not (code.isascii() and code.isprintable()):
            raise InvalidRequest(f"code must be printable ASCII, at most {MAX_CODE_LENGTH} chars")
        app = _app_for(s.config, appid)
        ip = client_address(request, s.config)
        await s.limiter.admit(ip, app.appid)
        try:
            reply = _usable(await s.logins[app.platform].code2session(app, code), app.platform)
        except InvalidCode:
            await s.limiter.failed(ip)
            raise
        user = None
        if s.login_hook is not None:  # before the session: a refused user gets none
            user = await s.login_hook.ask(app.appid, reply.openid, reply.unionid, None,
                                          functools.partial(request.__setitem__, HOOK_OUTCOME),
                                          platform=app.platform, corpid=reply.corpid)
        new = await s.sessions.create(app.appid, reply.openid, reply.unionid, reply.session_key,
                                      s.config.session.ttl, user, reply.corpid, app.platform)
        if new is None:  # only now is the openid known: the ban is checked as the session is made
            s.metrics.logins_banned.inc()
            raise UserBlocked("this user is banned from logging in")
        await s.limiter.succeeded(ip)
        s.metrics.sessions_created.labels(app.appid).inc()
    except GatewayError as exc:
        s.metrics.logins.labels(exc.code).inc()
        raise
    s.metrics.logins.labels("ok").inc()
    return json_response(_token_body(s, new.sid, new.openid, new.unionid, new.appid,
                                     new.created_at, new.expires_at))


def _usable(reply: Code2Session, platform: str) -> Code2Session:
    """The platform's ids, refused as a whole (no session) when one could not be a header."""
    for name, value in (("user id", reply.openid), ("union id", reply.unionid),
                        ("corpid", reply.corpid)):
        if value is not None and not _HEADER_SAFE_ID.fullmatch(value):
            raise WeChatError(f"the {platform} login reply's {name} is not 1 to 128 printable "
                              "ASCII characters without spaces")
    return reply


async def logout(request: web.Request) -> web.Response:
    s = request.app[SERVICES].current
    identity = await _identity(request)
    deleted = await s.sessions.delete(identity.session.sid)
    s.authenticator.forget(identity.session.sid)
    if not deleted:
        raise Unauthorized("the session has ended (logged out or expired)")
    return web.Response(status=204)


async def refresh(request: web.Request) -> web.Response:
    s = request.app[SERVICES].current
    identity = await _identity(request)
    current = identity.session
    # A ban ended the user's sessions already; this catches one created before sessions
    # were indexed by user, which the ban could not find.
    if await s.sessions.banned(current.appid, current.openid):
        raise UserBlocked("this user is banned")
    if s.login_hook is not None and s.login_hook.stale(current.user):
        current = await _ask_again(request, s, s.login_hook, current)
    renewed = await s.sessions.renew(current, s.config.session.ttl)
    if renewed is None:
        raise Unauthorized("the session has ended (logged out or expired)")
    return json_response(_token_body(s, renewed.sid, renewed.openid, renewed.unionid,
                                     renewed.appid, int(time.time()), renewed.expires_at))


# Refreshes of one session asking the login hook at the same moment share one call: a client
# firing many at once would otherwise make as many calls, and hold as many of the hook's
# connections (logins wait for those too).
_ASKING: dict[str, asyncio.Future[Session]] = {}


async def _ask_again(request: web.Request, s: Services, hook: LoginHook,
                     current: Session) -> Session:
    """The login hook's answer renewed before the session's lifetime is. A ban ends the
    session; a hook that cannot answer fails this refresh only (503): the session and its
    token keep working until they expire, and no lifetime is granted on data not confirmed."""
    asking = _ASKING.get(current.sid)
    if asking is None:
        asking = asyncio.ensure_future(_ask_hook(request, s, hook, current))
        _ASKING[current.sid] = asking
        asking.add_done_callback(functools.partial(_asked, current.sid))
    # shielded: the call goes on for the others when this client leaves
    return await asyncio.shield(asking)


def _asked(sid: str, done: asyncio.Future[Session]) -> None:
    if _ASKING.get(sid) is done:
        del _ASKING[sid]
    if not done.cancelled():
        done.exception()  # retrieved: every waiter may have left


async def _ask_hook(request: web.Request, s: Services, hook: LoginHook,
                    current: Session) -> Session:
    app = s.config.app(current.appid)
    if app is None:  # removed by a reload while this session lived
        raise Unauthorized("this session's mini-program is no longer configured")
    try:
        user = await hook.ask(current.appid, current.openid, current.unionid, current.phone,
                              functools.partial(request.__setitem__, HOOK_OUTCOME),
                              platform=current.platform, corpid=current.corpid)
    except UserBlocked:
        await s.sessions.delete(current.sid)
        s.authenticator.forget(current.sid)
        raise
    updated = await s.sessions.set_user(current, user)
    s.authenticator.forget(current.sid)
    if updated is None:
        raise Unauthorized("the session has ended (logged out or expired)")
    return updated


async def session(request: web.Request) -> web.Response:
    identity = await _identity(request)
    check = request.query.get("check", "false").strip().lower()
    if check not in ("true", "1", "false", "0"):
        raise InvalidRequest("check must be true or false")
    if check in ("true", "1"):  # ask WeChat whether the session_key is still current
        await userdata.check_session_key(request.app[SERVICES].current, identity)
    return json_response(_session_body(identity))


async def verify(request: web.Request) -> web.Response:
    services = request.app[SERVICES].current
    token = bearer_token(request.headers.getall("Authorization", []))
    hit = services.authenticator.cached(token) if token is not None else None
    # as on proxied requests: the cache's answer without a coroutine; a miss asks Redis
    identity = hit or await services.authenticator.authenticate(token, fresh=True)
    request[IDENTITY] = identity
    config = services.config
    # Forward-auth callers ask once per request of theirs: the answer depends on the identity
    # and the configuration only, so it is built once per cached identity.
    built = identity.memo.get("verify")
    if built is None or built[0] is not config:
        first = json_response(_session_body(identity))
        first.headers.update(identity_headers(identity, config))
        assert isinstance(first.body, bytes)
        built = identity.memo["verify"] = (config, first.body, CIMultiDictProxy(first.headers))
    return web.Response(body=built[1], headers=built[2])


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    try:
        await request.app[SERVICES].current.sessions.ping()
    except StoreUnavailable:
        raise StoreUnavailable("Redis does not answer") from None
    return json_response({"status": "ready"})


async def jwks(request: web.Request) -> web.Response:
    asserter = request.app[SERVICES].current.asserter
    if asserter is None:
        raise NotFound("identity assertions are not enabled (identity_assertion.enabled)")
    response = json_response(asserter.jwks)
    # Short enough that a newly added key is seen well before it signs anything.
    response.headers["Cache-Control"] = "public, max-age=300"
    return response


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].render(),
                        headers={"Content-Type": CONTENT_TYPE})


async def _identity(request: web.Request) -> Identity:
    token = bearer_token(request.headers.getall("Authorization", []))
    identity = await request.app[SERVICES].current.authenticator.authenticate(token)
    request[IDENTITY] = identity
    return identity


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        raw = await request.read()  # bounded by the app's client_max_size (MAX_BODY_BYTES)
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"the request body must be at most {MAX_BODY_BYTES} bytes") from None
    try:
        body = json.loads(raw)  # any Content-Type: wx.request's defaults vary by version
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        raise InvalidRequest("the request body must be a JSON object") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return body


def _app_for(config: Config, appid: Any) -> Any:
    if appid is None:
        if len(config.apps) == 1:
            return config.apps[0]
        raise UnknownApp("appid is required: this gateway serves several mini-programs")
    if not isinstance(appid, str):
        raise InvalidRequest("appid must be a string")
    app = config.app(appid)
    if app is None:
        raise UnknownApp(f"appid {appid[:64]!r} is not configured")
    return app


def _token_body(s: Services, sid: str, openid: str, unionid: str | None, appid: str,
                issued_at: int, expires_at: int) -> dict[str, Any]:
    token = s.tokens.mint(sid, openid, appid, issued_at, expires_at)
    return {"token": token, "token_type": "Bearer",
            "expires_in": max(0, expires_at - int(time.time())),
            "openid": openid, "unionid": unionid}


def _session_body(identity: Identity) -> dict[str, Any]:
    s = identity.session
    body: dict[str, Any] = {"openid": s.openid, "unionid": s.unionid, "appid": s.appid,
                            "expires_at": s.expires_at, "platform": s.platform}
    if s.corpid:
        body["corpid"] = s.corpid
    return body
