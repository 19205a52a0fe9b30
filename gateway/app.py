"""Builds the aiohttp ``Application`` from a ``Config``: middleware, routes and resources."""

from __future__ import annotations

import asyncio
import os
import contextlib
import logging
import re
import time
from typing import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import HttpVersion10, HttpVersion11, web
from aiohttp.web_urldispatcher import UrlMappingMatchInfo

from . import endpoints, proxy, sessions
from .cache import SessionCache, follow_invalidations
from .config import Config
from .errors import (GatewayError, InternalError, InvalidRequest, MethodNotAllowed, NotFound,
                     PayloadTooLarge, StoreUnavailable)
from .metrics import Metrics
from .pool import Pool
from .services import (METRICS, REQUEST_ID, ROUTE_LABEL, SERVICES, STARTED, Connections, Live,
                       Services)

log = logging.getLogger("gateway")
CONFIG = web.AppKey("config", Config)
# Tasks handling a request right now: a graceful stop cancels what outlives shutdown_grace.
IN_FLIGHT = web.AppKey("in_flight", set[asyncio.Task[object]])
_CATCH_ALL = r"/{tail:[\s\S]*}"  # [\s\S]: also paths with (decoded) newlines, refused later
_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")
_BY_STATUS: dict[int, type[GatewayError]] = {
    404: NotFound, 405: MethodNotAllowed, 413: PayloadTooLarge}


def create_app(config: Config) -> web.Application:
    # client_max_size bounds what the gateway's own endpoints read; proxied bodies stream
    # through request.content and are not limited by it.
    app = web.Application(middlewares=[_pipeline], client_max_size=endpoints.MAX_BODY_BYTES)
    app[CONFIG] = config
    app[METRICS] = Metrics()
    app[IN_FLIGHT] = set()
    app.cleanup_ctx.append(_services)
    endpoints.add_routes(app, config)
    app.router.add_route("*", _CATCH_ALL, proxy.handle)
    return app


async def _services(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    async with contextlib.AsyncExitStack() as stack:
        redis = sessions.connect(config.redis)
        stack.push_async_callback(redis.aclose)
        upstreams = Pool()
        stack.push_async_callback(upstreams.close)
        # For WebSockets. No cookie jar: one client session serves every user, so it must
        # never remember cookies. No connection cap: long-lived WebSockets must not starve
        # each other (as with nginx, the OS's file limit is the bound).
        http = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar(),
                                     connector=aiohttp.TCPConnector(limit=0))
        stack.push_async_callback(http.close)
        # WeChat gets its own small pool, so busy upstreams can never delay a login.
        wechat_http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))
        stack.push_async_callback(wechat_http.close)
        cache = (SessionCache(config.session.cache_size, app[METRICS])
                 if config.session.cache_size else None)
        if cache is not None:
            follower = asyncio.ensure_future(follow_invalidations(
                lambda: sessions.subscriber(config.redis, redis),
                sessions.invalidation_channel(config.redis.key_prefix), cache,
                config.redis.timeout))
            stack.push_async_callback(_cancel, follower)
        connections = Connections(redis, upstreams, http, wechat_http, cache, app[METRICS])
        app[SERVICES] = Live(Services.build(config, connections), connections)
        yield


async def _cancel(task: asyncio.Future[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def error_response(error: GatewayError) -> web.Response:
    response = endpoints.json_response({"error": error.code, "message": error.message},
                                       status=error.status)
    response.headers.update(error.headers)
    return response


@web.middleware
async def _pipeline(request: web.Request, handler: endpoints.Handler) -> web.StreamResponse:
    """Request id, error mapping and metrics around every request, gateway's or proxied."""
    request[STARTED] = started = time.perf_counter()
    sent = request.headers.get("X-Request-ID", "")
    request_id = sent if _SANE_REQUEST_ID.match(sent) else os.urandom(16).hex()
    request[REQUEST_ID] = request_id
    task = asyncio.current_task()
    in_flight = request.app[IN_FLIGHT]
    if task is not None:
        in_flight.add(task)
    try:
        proxy.refuse_expectation(request)
        response = await handler(request)
    except GatewayError as exc:
        if isinstance(exc, StoreUnavailable):
            request.app[METRICS].redis_errors.inc()
        response = error_response(exc)
    except web.HTTPException as exc:  # raised by aiohttp itself (body too large, ...)
        kind = _BY_STATUS.get(exc.status) or (InvalidRequest if exc.status < 500 else InternalError)
        response = error_response(kind(exc.reason, headers=_allow(exc)))
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        response = error_response(InternalError("the gateway failed to handle this request"))
    finally:
        if task is not None:
            in_flight.discard(task)
    if not response.prepared:
        response.headers["X-Request-ID"] = request_id
        proxy.close_after_upgrade_attempt(request, response)
        if proxy.body_refused(request):
            response.force_close()
            with contextlib.suppress(ConnectionError):  # the client may be gone already
                await response.prepare(request)
                await response.write_eof()
            # Closed now: aiohttp would otherwise read (and discard) the body for a while.
            request.protocol.force_close()
    label = request.get(ROUTE_LABEL) or _resource_label(request)
    request[ROUTE_LABEL] = label
    request.app[METRICS].answered(label, response.status, time.perf_counter() - started)
    return response


def dispatcher(app: web.Application, routed: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
               ) -> Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]:
    """The server's request handler. Gateway endpoints go through ``routed``, aiohttp's router
    and middleware; every other path can only reach the catch-all proxy route, so it goes to
    the same pipeline directly: the router's per-request work was a tenth of a proxied
    request. That also keeps the router's ``Expect`` handler, which sends "100 Continue"
    before any middleware runs, away from proxied requests: they answer it once authorised."""
    catch_all = next((r for r in app.router.routes() if r.handler is proxy.handle), None)
    if catch_all is None:  # not a gateway (the demo serves its other apps with our runner)
        return routed
    endpoint_paths = frozenset(r.resource.canonical for r in app.router.routes()
                               if r.resource is not None and r is not catch_all)
    match_info = UrlMappingMatchInfo({}, catch_all)
    match_info.add_app(app)
    match_info.freeze()

    async def dispatch(request: web.BaseRequest) -> web.StreamResponse:
        assert isinstance(request, web.Request)  # the app's request_factory makes them
        if request.version not in (HttpVersion10, HttpVersion11):
            return _refuse_version(request)
        # path_safe: what the router itself matches endpoints on
        if request.rel_url.path_safe in endpoint_paths:
            return await routed(request)
        request._match_info = match_info  # what the router would have set; request.app needs it
        return await _pipeline(request, proxy.handle)

    return dispatch


def _refuse_version(request: web.Request) -> web.StreamResponse:
    """A request line without a version (HTTP/0.9, which llhttp accepts): no headers could be
    checked and none answered, so it is refused, in HTTP/1.1, and the connection closed. So is
    "HTTP/2.0" in an HTTP/1 request line (llhttp accepts that too): the answer would claim a
    protocol it does not speak."""
    message = ("the request line has no HTTP version" if request.version < HttpVersion10
               else f"HTTP/{request.version.major}.{request.version.minor} in an HTTP/1 "
                    "request line")
    # The status line echoes the request's version (a reified property: cached already).
    request._version = HttpVersion11
    request._cache.pop("version", None)
    response = error_response(InvalidRequest(message))
    response.force_close()
    return response


def _resource_label(request: web.Request) -> str:
    """A gateway endpoint's path; proxied requests set their label themselves."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "none"


def _allow(exc: web.HTTPException) -> dict[str, str]:
    allow = exc.headers.get("Allow")
    return {"Allow": allow} if allow else {}
