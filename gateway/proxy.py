"""Reverse proxy: match route → authenticate → rewrite headers → forward → stream back."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from urllib.parse import unquote

from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from . import pool, websocket
from .auth import Identity, bearer_token
from .config import Config, IdentityHeaders, Route, spelling
from .forwarded import forwarded_headers
from .errors import (AppForbidden, InvalidPath, NotFound, StoreUnavailable, Unauthorized,
                     UpstreamTimeout, UpstreamUnavailable)
from .services import IDENTITY, REQUEST_ID, ROUTE_LABEL, SERVICES, UPSTREAM_SECONDS, Services

log = logging.getLogger("gateway.proxy")

# RFC 9110 §7.6.1 connection-specific fields, plus the legacy ones proxies still meet.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authenticate",
                        "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade"})
# Set by the gateway itself, so client copies must never pass.
_REPLACED = frozenset({"host", "authorization", "forwarded", "x-forwarded-for",
                       "x-forwarded-proto", "x-forwarded-host", "x-request-id", "expect"})
_SMALL_BODY = 64 * 1024
SESSION_RECHECK = 15.0  # seconds between checks that an open WebSocket's session still lives


def request_path(raw_path: str) -> str:
    """The decoded path to match routes on; ``InvalidPath`` for anything ambiguous.

    The path is forwarded exactly as received, so rather than normalising it (and forwarding
    something the client did not send), every form that different servers could resolve
    differently is refused: dot segments, empty segments, encoded or back slashes, NUL and
    control characters, invalid UTF-8 (overlong encodings), and double-encoded dots or slashes.
    """
    path = raw_path.partition("?")[0]
    if not path.startswith("/"):
        raise InvalidPath("the request path must start with '/'")
    lowered = path.lower()
    if "//" in path or "\\" in path or "%2f" in lowered or "%5c" in lowered:
        raise InvalidPath("the request path contains an empty segment or an (encoded) slash")
    try:
        decoded = unquote(path, errors="strict")
    except UnicodeDecodeError:
        raise InvalidPath("the request path is not valid UTF-8 once decoded") from None
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in decoded):
        raise InvalidPath("the request path contains a control character")
    # ";params" included: Tomcat, Jetty and Spring drop them before resolving "..;".
    if any(seg.split(";", 1)[0] in (".", "..") for seg in decoded.split("/")):
        raise InvalidPath("the request path contains a '.' or '..' segment")
    if any(enc in decoded.lower() for enc in ("%2e", "%2f", "%5c")):
        raise InvalidPath("the request path contains a double-encoded dot or slash")
    return decoded


def close_after_upgrade_attempt(request: web.Request, response: web.StreamResponse) -> None:
    """aiohttp's parser treats a connection that asked for an upgrade as taken over, whatever
    the answer, so it can carry no further request: close it after this response."""
    if "upgrade" in websocket.connection_tokens(request.headers):
        response.force_close()


@functools.lru_cache(maxsize=8)
def _dropped(names: IdentityHeaders, assertion: str) -> frozenset[str]:
    """Request headers never forwarded, as spelled by ``spelling``: built once per config."""
    return HOP_BY_HOP | _REPLACED | {spelling(n) for n in (*names.names(), assertion)}


def forward_headers(request: web.Request, identity: Identity | None, services: Services,
                    route: Route, request_id: str) -> CIMultiDict[str]:
    config = services.config
    drop = _dropped(config.identity_headers, config.identity_assertion.header)
    if "Connection" in request.headers:
        drop = drop | websocket.connection_tokens(request.headers)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in request.headers.items():
        # Clients (and some proxies) spell header names loosely; any spelling that an upstream
        # framework could read as an identity header is a forgery attempt and goes.
        if spelling(name) not in drop:
            out.add(name, value)
    out.update(forwarded_headers(request, config))
    out["X-Request-ID"] = request_id
    if route.preserve_host and request.host:
        out["Host"] = request.host
    if identity is not None:
        out.update(identity_headers(identity, config))
        if services.asserter is not None:
            out[config.identity_assertion.header] = services.asserter.assertion(
                identity.session, route.audience or route.origin)
    return out


def identity_headers(identity: Identity, config: Config) -> dict[str, str]:
    """The verified identity, as upstreams (and forward-auth callers) receive it."""
    names, session = config.identity_headers, identity.session
    headers = {names.openid: session.openid, names.appid: session.appid}
    if session.unionid:
        headers[names.unionid] = session.unionid
    if session.phone and config.session.store_phone:
        headers[names.phone] = session.phone
    return headers


async def handle(request: web.Request) -> web.StreamResponse:
    services = request.app[SERVICES].current
    request[ROUTE_LABEL] = "none"  # until a route matches: never the raw path (cardinality)
    path = request_path(request.raw_path)
    route = services.config.route_for(path)
    if route is None:
        raise NotFound(f"no route for {path}")
    request[ROUTE_LABEL] = route.path
    identity = await _authenticate(request, route)
    headers = forward_headers(request, identity, services, route, request[REQUEST_ID])
    if websocket.is_upgrade(request):
        url = URL(f"{route.origin}{route.base_path}{request.raw_path}", encoded=True)
        end = session_end(services, identity) if identity is not None else None
        return await websocket.relay(request, services.http, url, headers, route, end)

    body = await _request_body(request)
    started = time.perf_counter()
    # read_timeout bounds each silence (pool.send until the headers, _relay between reads of
    # the body); the route's timeout, when set, bounds the whole exchange, body included.
    deadline = (None if route.timeout is None
                else asyncio.get_running_loop().time() + route.timeout)
    try:
        async with asyncio.timeout_at(deadline):
            upstream = await services.pool.send(
                route.upstream, request.method, route.base_path + request.raw_path, headers,
                body, route.connect_timeout, route.read_timeout)
    except TimeoutError:
        log.warning("upstream for %s timed out (read_timeout %gs, timeout %s)", route.path,
                    route.read_timeout, route.timeout)
        raise UpstreamTimeout(f"the upstream for {route.path} did not answer in time") from None
    except pool.FAILURES as exc:
        log.warning("upstream for %s unavailable: %s", route.path, type(exc).__name__)
        raise UpstreamUnavailable(f"the upstream for {route.path} is unavailable") from None
    request[UPSTREAM_SECONDS] = elapsed = time.perf_counter() - started
    services.metrics.upstream_answered(route.path, elapsed)
    try:
        return await _relay(request, upstream, deadline, route.read_timeout)
    finally:
        upstream.release()


async def _request_body(request: web.Request) -> pool.Body:
    """A small body is read whole, to go out with the headers in one write (and be sent again
    if a pooled connection fails under it); anything else streams."""
    if not request.body_exists:
        return None
    length = request.content_length
    if length is not None and length <= _SMALL_BODY:
        return await request.content.read()  # not request.read(): client_max_size is ours
    return request.content


async def session_end(services: Services, identity: Identity) -> None:
    """Complete when the session ends: at once on its invalidation (logout, any replica),
    and in any case within SESSION_RECHECK seconds (the cache may be off)."""
    ended = asyncio.Event()
    cache = services.authenticator.cache
    unwatch = cache.watch(identity.session.sid, ended.set) if cache is not None else None
    try:
        while True:
            try:
                await asyncio.wait_for(ended.wait(), SESSION_RECHECK)
                return
            except asyncio.TimeoutError:
                pass
            try:
                if await services.sessions.get(identity.session.sid) is None:
                    return
            except StoreUnavailable:
                pass  # an open socket is not cut for a Redis blip; new ones fail closed
    finally:
        if unwatch is not None:
            unwatch()


async def _authenticate(request: web.Request, route: Route) -> Identity | None:
    if route.auth == "public":
        return None
    authenticator = request.app[SERVICES].current.authenticator
    token = bearer_token(request.headers.getall("Authorization", []))
    if route.auth == "required":
        hit = authenticator.cached(token) if token is not None else None
        # fresh: the cache was just asked; a miss goes to Redis (and fills the cache)
        identity = hit or await authenticator.authenticate(token, fresh=True)
    elif token is None:
        return None
    else:
        try:
            identity = await authenticator.authenticate(token)
        except Unauthorized:
            return None  # optional: an invalid token just means anonymous
        # StoreUnavailable propagates: a token that cannot be checked is never downgraded.
    if route.apps and identity.session.appid not in route.apps:
        raise AppForbidden(f"tokens of {identity.session.appid} are not accepted on {route.path}")
    request[IDENTITY] = identity
    return identity


def _next_read(deadline: float | None, read_timeout: float) -> float:
    """When the next read of the upstream's body must have returned: after ``read_timeout``
    of silence, and never past the whole exchange's deadline."""
    silence = asyncio.get_running_loop().time() + read_timeout
    return silence if deadline is None else min(silence, deadline)


async def _relay(request: web.Request, upstream: pool.Exchange, deadline: float | None,
                 read_timeout: float) -> web.StreamResponse:
    drop = HOP_BY_HOP | websocket.connection_tokens(upstream.headers)
    headers = CIMultiDict((k, v) for k, v in upstream.headers.items() if k.lower() not in drop)
    headers["X-Request-ID"] = request[REQUEST_ID]
    length = upstream.content_length
    if length is not None and length <= _SMALL_BODY and request.method != "HEAD":
        # A small body is read whole (bounded by its Content-Length) and sent with the
        # headers in one write; an upstream failing mid-body still gets an honest 502.
        try:
            parts = []
            while True:
                async with asyncio.timeout_at(_next_read(deadline, read_timeout)):
                    chunk = await upstream.body.readany()
                if not chunk:
                    break
                parts.append(chunk)
            body = b"".join(parts)
        except TimeoutError:
            raise UpstreamTimeout("the upstream did not finish its response in time") from None
        except pool.FAILURES:
            raise UpstreamUnavailable("the upstream broke off its response") from None
        small = web.Response(status=upstream.status, reason=upstream.reason, body=body,
                             headers=headers)
        close_after_upgrade_attempt(request, small)
        return small
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason,
                                  headers=headers)
    close_after_upgrade_attempt(request, response)
    await response.prepare(request)
    try:
        while True:
            # read(n) returns what has arrived, up to n bytes: each chunk goes on at once.
            async with asyncio.timeout_at(_next_read(deadline, read_timeout)):
                chunk = await upstream.body.read(pool.CHUNK)
            if not chunk:
                break
            # A client that takes nothing for as long is cut too (nginx's send_timeout, here
            # the read timeout): else it could hold the upstream's stream open forever.
            async with asyncio.timeout_at(_next_read(deadline, read_timeout)):
                await response.write(chunk)
    except (TimeoutError, *pool.FAILURES) as exc:
        # Headers are gone already: the only honest signal left is a broken connection.
        log.warning("relaying the body for %s stopped: %s", request[ROUTE_LABEL],
                    type(exc).__name__)
        if request.transport is not None:
            request.transport.abort()
        return response
    await response.write_eof()
    return response
