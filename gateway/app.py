"""Builds the aiohttp ``Application`` from a ``Config``: middleware, routes and resources."""

from __future__ import annotations

import asyncio
import os
import contextlib
import itertools
import logging
import re
import time
from typing import AsyncIterator, Iterator

import aiohttp
from aiohttp import web

from . import endpoints, expectation, proxy, sessions, store
from .cache import SessionCache, follow_invalidations
from .config import Config
from .errors import (GatewayError, InternalError, InvalidRequest, MethodNotAllowed, NotFound,
                     PayloadTooLarge, StoreUnavailable)
from .metrics import Metrics
from .pool import Pool
from .state import CONFIG, IN_FLIGHT, METRICS, REQUEST_ID, ROUTE_LABEL, SERVICES, STARTED
from .services import Connections, Live, Services

log = logging.getLogger("gateway")
_CATCH_ALL = r"/{tail:[\s\S]*}"  # [\s\S]: also paths with (decoded) newlines, refused later
_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,128}$")


def _new_request_ids() -> Iterator[str]:
    """32 hex digits: 80 random bits drawn once per process, then a counter. Unique across
    processes and restarts as a random id per request would be, without a getrandom call
    each time."""
    return map(f"{os.urandom(10).hex()}{{:012x}}".format, itertools.count())


def _reseed_request_ids() -> None:
    global _request_ids
    _request_ids = _new_request_ids()


_request_ids = _new_request_ids()
# A forked child (multiprocessing, an app embedding the gateway) draws its own random bits.
os.register_at_fork(after_in_child=_reseed_request_ids)
_BY_STATUS: dict[int, type[GatewayError]] = {
    404: NotFound, 405: MethodNotAllowed, 413: PayloadTooLarge}


def create_app(config: Config) -> web.Application:
    # client_max_size bounds what the gateway's own endpoints read; proxied bodies stream
    # through request.content and are not limited by it.
    app = web.Application(middlewares=[pipeline], client_max_size=endpoints.MAX_BODY_BYTES)
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
        redis = store.connect(config.redis)
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
        # Every platform's calls: stateless APIs, so no cookie of one app's reply is kept to
        # ride along with the next call, another app's included.
        wechat_http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64),
                                            cookie_jar=aiohttp.DummyCookieJar())
        stack.push_async_callback(wechat_http.close)
        # The login hook too: a slow user directory must not hold WeChat's pool, nor the
        # reverse. Made even without a hook configured, so a reload may add one.
        hook_http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64),
                                          cookie_jar=aiohttp.DummyCookieJar())
        stack.push_async_callback(hook_http.close)
        cache = (SessionCache(config.session.cache_size, app[METRICS])
                 if config.session.cache_size else None)
        if cache is not None:
            follower = asyncio.ensure_future(follow_invalidations(
                lambda: store.subscriber(config.redis, redis),
                sessions.invalidation_channel(config.redis.key_prefix), cache,
                config.redis.timeout))
            stack.push_async_callback(_cancel, follower)
        connections = Connections(redis, upstreams, http, wechat_http, cache, app[METRICS],
                                  hook_http=hook_http)
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
async def pipeline(request: web.Request, handler: endpoints.Handler) -> web.StreamResponse:
    """Request id, error mapping and metrics around every request, gateway's or proxied."""
    request[STARTED] = started = time.perf_counter()
    sent = request.headers.get("X-Request-ID", "")
    request_id = sent if sent and _SANE_REQUEST_ID.match(sent) else next(_request_ids)
    request[REQUEST_ID] = request_id
    task = asyncio.current_task()
    in_flight = request.app[IN_FLIGHT]
    if task is not None:
        in_flight.add(task)
    try:
        if handler is not proxy.handle:  # proxied requests answer Expect once authorised
            expectation.refuse_unanswered(request)
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
        if expectation.body_refused(request):
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


def _resource_label(request: web.Request) -> str:
    """A gateway endpoint's path; proxied requests set their label themselves."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "none"


def _allow(exc: web.HTTPException) -> dict[str, str]:
    allow = exc.headers.get("Allow")
    return {"Allow": allow} if allow else {}
