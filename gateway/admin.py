"""The admin API, on its own listener (``admin.listen``): a user's sessions listed and ended,
bans applied and lifted. Authorised by ``Authorization: Bearer`` with one of ``admin.tokens``."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from typing import Any, Awaitable, Callable

from aiohttp import web

from .app import pipeline
from .auth import bearer_token
from .endpoints import MAX_BODY_BYTES, json_response
from .errors import GatewayError, InvalidRequest, NotFound, PayloadTooLarge, Unauthorized
from .loader import parse_duration
from .services import Services
from .logs import openid_hash
from .state import ADMIN_TOKEN, CONFIG, IN_FLIGHT, LOGGED_PATH, METRICS, SERVICES

# WeChat openids are 28 characters of this set; other platforms' user ids are longer.
_OPENID = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")  # \Z: "$" lets a final newline through

Operation = Callable[[web.Request, Services, str, str], Awaitable[web.Response]]


def create_admin_app(main: web.Application) -> web.Application:
    """The admin application, sharing the main one's services (``main`` is set up)."""
    admin = web.Application(middlewares=[pipeline], client_max_size=MAX_BODY_BYTES)
    admin[CONFIG] = main[CONFIG]
    admin[METRICS] = main[METRICS]
    admin[SERVICES] = main[SERVICES]
    admin[IN_FLIGHT] = set()
    admin.router.add_get("/admin/sessions", _call("sessions", _query, list_sessions),
                         allow_head=False)
    admin.router.add_delete("/admin/sessions", _call("revoke", _query, revoke))
    admin.router.add_put("/admin/bans/{appid}/{openid}", _call("ban", _path, ban))
    admin.router.add_delete("/admin/bans/{appid}/{openid}", _call("unban", _path, unban))
    return admin


def _query(request: web.Request) -> tuple[Any, Any]:
    return request.query.get("appid"), request.query.get("openid")


def _path(request: web.Request) -> tuple[Any, Any]:
    return request.match_info["appid"], request.match_info["openid"]


def _call(endpoint: str, user: Callable[[web.Request], tuple[Any, Any]],
          operation: Operation) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        s = request.app[SERVICES].current
        if "openid" in request.match_info and not s.config.logging.log_openid:
            # the openid is in the path: logged as the keyed hash, like every other openid
            head = request.raw_path.partition("?")[0].rpartition("/")[0][:192]
            request[LOGGED_PATH] = f"{head}/{openid_hash(s.keyring.log_key, _path(request)[1])}"
        token = "none"
        try:
            token = str(authorise(request, s.config.admin.tokens))
            appid, openid = _user(s, *user(request))
            response = await operation(request, s, appid, openid)
        except GatewayError as exc:
            s.metrics.admin_requests.labels(endpoint, exc.code, token).inc()
            raise
        s.metrics.admin_requests.labels(endpoint, "ok", token).inc()
        return response
    return handler


def authorise(request: web.Request, tokens: tuple[bytes, ...]) -> int:
    """The position of the admin token the request carries; else ``Unauthorized``."""
    token = bearer_token(request.headers.getall("Authorization", []))
    if token is None:
        raise Unauthorized("an admin token is required (Authorization: Bearer)")
    given = token.encode("utf-8", "surrogateescape")
    # Compared with every token, in constant time each: the time taken says neither whether
    # nor which one matched.
    matches = [hmac.compare_digest(given, known) for known in tokens]
    if True not in matches:
        raise Unauthorized("the admin token is not one of admin.tokens")
    position = matches.index(True)
    request[ADMIN_TOKEN] = position
    return position


def _user(s: Services, appid: Any, openid: Any) -> tuple[str, str]:
    if not appid or not isinstance(appid, str):
        raise InvalidRequest("appid is required")
    if not openid or not isinstance(openid, str):
        raise InvalidRequest("openid is required")
    if not _OPENID.match(openid):
        raise InvalidRequest("openid must be 1 to 64 letters, digits, '_' or '-'")
    if s.config.app(appid) is None:
        raise NotFound(f"appid {appid[:64]!r} is not configured")
    return appid, openid


async def list_sessions(request: web.Request, s: Services, appid: str,
                        openid: str) -> web.Response:
    found = await s.sessions.sessions_of(appid, openid)
    return json_response({"sessions": [
        {"id": session_id(s.keyring.log_key, sid), "created_at": created, "expires_at": expires}
        for sid, created, expires in found]})


def session_id(key: bytes, sid: str) -> str:
    """What the admin API shows for a session: tells sessions apart, and is neither the
    session id nor usable as a token."""
    return hmac.new(key, sid.encode(), hashlib.sha256).hexdigest()[:16]


async def revoke(request: web.Request, s: Services, appid: str, openid: str) -> web.Response:
    ended = _forget(s, await s.sessions.revoke(appid, openid))
    return json_response({"revoked": ended})


async def ban(request: web.Request, s: Services, appid: str, openid: str) -> web.Response:
    ttl = _ttl(await _body(request))
    _forget(s, await s.sessions.ban(appid, openid, ttl))
    s.metrics.bans.labels("ban").inc()
    return web.Response(status=204)


def _forget(s: Services, sids: list[str]) -> int:
    """This process drops the ended sessions now; other replicas on the invalidations."""
    for sid in sids:
        s.authenticator.forget(sid)
    s.metrics.sessions_revoked.inc(len(sids))
    return len(sids)


async def unban(request: web.Request, s: Services, appid: str, openid: str) -> web.Response:
    if not await s.sessions.unban(appid, openid):
        raise NotFound("this user is not banned")
    s.metrics.bans.labels("unban").inc()
    return web.Response(status=204)


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"the request body must be at most {MAX_BODY_BYTES} bytes") from None
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise InvalidRequest("the request body must be a JSON object") from None
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    unknown = sorted(set(body) - {"ttl"})
    if unknown:
        raise InvalidRequest(f"unknown field {unknown[0][:64]!r} (only ttl is read)")
    return body


def _ttl(body: dict[str, Any]) -> float | None:
    """None: until lifted."""
    value = body.get("ttl")
    if value is None:
        return None
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise InvalidRequest("ttl must be a duration such as 30d, or seconds")
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise InvalidRequest(f"ttl: {exc}") from None
