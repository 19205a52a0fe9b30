"""Serving an application: the listener, signal handling and a graceful drain, and the limits
on slow and silent clients (nginx's client_header_timeout, client_body_timeout,
keepalive_timeout and worker_connections).

aiohttp internals relied on here, one per line (tests/test_aiohttp_internals.py checks each,
naming the one that changed; pyproject.toml pins aiohttp's minor release for them):
- ``web.Server._kwargs``: ``_Server`` builds ``_Protocol`` with the runner's protocol settings;
- ``web.Server.request_handler``/``request_factory``: ``Runner`` wraps the app's in its server;
- ``web.Server.connection_made``/``connection_lost(handler, ...)``: count open connections;
- ``web.AppRunner._make_server``/``_kwargs``: the server is built with our protocol class and
  request handler;
- ``RawRequestMessage._replace(should_close=True)``: keepalive_timeout 0 closes every answer;
- ``RequestHandler.__init__(manager, **kwargs)`` and the attribute names ``_Protocol`` and
  ``_Server`` add (none may shadow one of aiohttp's);
- ``RequestHandler._messages``: parsed requests waiting for ``start()``; heads are timed there;
- ``RequestHandler._waiter``: set while ``start()`` waits for the next request; a head timeout
  wakes it;
- ``web_protocol._ErrInfo``: a queued parse error answered through ``handle_error``; a request
  head that times out is queued as one (408);
- ``RequestHandler._next_keepalive_close_time``: ``_process_keepalive`` reschedules itself to
  it, so a request head arriving on a kept-alive connection is timed by client_header_timeout
  rather than cut silently at the keep-alive deadline;
- ``RequestHandler`` overridden methods (``data_received``, ``pause_reading``,
  ``resume_reading(resume_parser)``, ``handle_error``, ``connection_made``/``lost``) and
  ``log_exception(..., exc_info=exc)``: a body timeout met while lingering is not logged;
- ``http_exceptions.LineTooLong`` and the parser's "Too many headers" message: those heads
  are answered 431, other parse errors 400;
- ``StreamWriter.output_size``: whether an answer has begun (no 408 or JSON error after it);
- ``UrlMappingMatchInfo({}, route)``, ``add_app``, ``freeze`` and ``web.Request._match_info``
  (the dispatcher): proxied requests and `/auth/verify` skip the router, one prebuilt match each;
- ``web.BaseRequest._version``/``_cache`` (``_refuse_version``): an HTTP/0.9 request is answered
  in HTTP/1.1, and ``version`` is a cached property.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import signal
import ssl
import time
import dataclasses
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from aiohttp import HttpVersion10, HttpVersion11, web
from aiohttp.http import RawRequestMessage
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestHandler, _ErrInfo
from aiohttp.web_urldispatcher import UrlMappingMatchInfo

from . import endpoints, proxy
from .admin import create_admin_app
from .app import create_app, error_response, pipeline
from .state import IN_FLIGHT, TLS_CONTEXT
from .logs import AccessLogger
from .metrics import Metrics
from .reload import reload
from .tls import server_context
from .config import Config
from .errors import GatewayError, HeadersTooLarge, InvalidRequest, RequestTimeout
from .endpoints import json_response
from .state import METRICS

log = logging.getLogger("gateway")
REFUSED_LOG_EVERY = 10.0  # seconds between two "connection limit reached" lines
_FD_MARGIN = 1024  # descriptors beyond two per client (its upstream): Redis, WeChat, logs


@dataclass(frozen=True, slots=True)
class Limits:
    """What one process allows its clients (each one a ``Config`` key)."""

    header_timeout: float
    body_timeout: float
    keepalive_timeout: float
    max_connections: int

    @classmethod
    def of(cls, config: Config) -> Limits:
        return cls(config.client_header_timeout, config.client_body_timeout,
                   config.keepalive_timeout, config.max_connections)

    @classmethod
    def defaults(cls) -> Limits:
        """The configuration's defaults, for apps served without a ``Config`` (the demo's)."""
        d: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(Config)}
        return cls(d["client_header_timeout"], d["client_body_timeout"],
                   d["keepalive_timeout"], d["max_connections"])


class _HeadTimeout(Exception):
    """Queued in place of a request whose head did not arrive within client_header_timeout."""


class _Protocol(RequestHandler):
    """aiohttp answers malformed requests itself, in plain text; ours answer in the contract's
    JSON, and oversize headers get 431 instead of 400.

    It also times the client, as nginx does: a request head from the connection's accept (on
    a kept-alive connection: from its first byte) to its end, and a request body between two
    arrivals of its bytes (not while the gateway itself holds reading back)."""

    def __init__(self, manager: _Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._server = manager
        self._limits = manager.limits
        self._refused = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_begun = False  # some bytes of the timed head have arrived
        self._head_expired = False
        self._heads = True  # request heads to time: none once the connection is upgraded
        self._body: StreamReader | None = None  # the newest request's body
        self._body_deadline = 0.0
        self._body_timer: asyncio.TimerHandle | None = None
        self._held = False  # reading paused: the body's reader is behind, not the client
        self.serving: web.BaseRequest | None = None  # the request being handled

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._server.admit():
            self._refused = True
            transport.close()
            return
        super().connection_made(transport)
        self._time_head()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._refused:  # never counted nor started
            return
        for timer in (self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._head_expired:  # answered 408 and closing: nothing more is read
            return
        queued = len(self._messages)
        body = self._body
        ending_body = body is not None and not body.is_eof()
        super().data_received(data)
        if self._heads:
            self._follow_heads(data, len(self._messages) > queued, ending_body)
        self._time_body()

    def _follow_heads(self, data: bytes, completed: bool, ending_body: bool = False) -> None:
        if completed:  # request heads completed: the newest one's body arrives next
            message, self._body = self._messages[-1]
            self._head_begun = False
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None
            if isinstance(message, RawRequestMessage) and message.upgrade:
                # After its body (if any), the bytes belong to the upgraded protocol (or, if
                # the upgrade is declined, to nothing: the connection closes after it).
                self._heads = False
        elif data and self._head_timer is None and (self._body is None or self._body.is_eof()):
            if ending_body:
                # These bytes ended the last body; whether a head began after them cannot be
                # told (the parser keeps a partial head to itself). Timing them as a head would
                # answer an idle keep-alive connection with 408: keepalive_timeout bounds it
                # until more bytes come, which start the head's timing.
                return
            self._time_head()  # the first bytes of another request on a kept-alive connection
            self._head_begun = True
        elif data and self._head_timer is not None:  # more of the head being timed
            self._head_begun = True

    def pause_reading(self) -> None:
        super().pause_reading()
        self._held = True

    def resume_reading(self, resume_parser: bool = True) -> None:
        self._held = False
        super().resume_reading(resume_parser)
        self._time_body()

    def log_exception(self, *args: Any, **kwargs: Any) -> None:
        # After the answer, aiohttp reads what is left of an unread body ("lingering") and
        # meets the timeout set on it: expected, and the connection just closes.
        if isinstance(kwargs.get("exc_info"), RequestTimeout):
            return
        super().log_exception(*args, **kwargs)

    def _time_head(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._limits.header_timeout
        self._head_timer = loop.call_at(deadline, self._head_timed_out)
        # aiohttp's keep-alive check must not cut this head before its own deadline.
        self._next_keepalive_close_time = max(self._next_keepalive_close_time, deadline + 1)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport is None:
            return
        waiter = self._waiter
        if waiter is None or waiter.done():
            # A request is being handled: the pipelined head after it is timed from when the
            # gateway can read it (as nginx does).
            self._time_head()
            return
        if not self._head_begun:
            self.force_close()  # never sent a byte: nothing to answer (as nginx)
            return
        self._head_expired = True
        self._server.timed_out("header")
        # Answered through handle_error, like a request aiohttp could not parse.
        self._messages.append((_ErrInfo(status=408, exc=_HeadTimeout(), message="timeout"),
                               EMPTY_PAYLOAD))
        waiter.set_result(None)

    def _time_body(self) -> None:
        body = self._body
        if (body is None or body.is_eof() or body.exception() is not None or self._held
                or self.transport is None):
            if self._body_timer is not None:
                self._body_timer.cancel()
                self._body_timer = None
            return
        loop = asyncio.get_running_loop()
        # Moved on every read; the timer only wakes at the old deadline and re-arms (cheap
        # for a body arriving in thousands of pieces).
        self._body_deadline = loop.time() + self._limits.body_timeout
        if self._body_timer is None:
            self._body_timer = loop.call_at(self._body_deadline, self._body_timed_out)

    def _body_timed_out(self) -> None:
        self._body_timer = None
        body = self._body
        if body is None or body.is_eof() or self._held or self.transport is None:
            return
        loop = asyncio.get_running_loop()
        if loop.time() < self._body_deadline:
            self._body_timer = loop.call_at(self._body_deadline, self._body_timed_out)
            return
        self._server.timed_out("body")
        # Whoever reads the body (an endpoint, the proxy, the upstream sender) gets this and
        # answers 408.
        body.set_exception(RequestTimeout(
            f"the request body stopped arriving for {self._limits.body_timeout:g}s"))
        serving = self.serving
        if serving is not None and serving.content is body and serving.writer.output_size:
            # Its answer has begun (an upstream answering before the body's end): no 408 can
            # follow, and the upstream's answer may never end. Closing cancels the handler.
            self.force_close()

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if isinstance(exc, _HeadTimeout):
            timeout = RequestTimeout(f"the request headers did not arrive within "
                                     f"{self._limits.header_timeout:g}s")
            response = json_response({"error": timeout.code, "message": timeout.message},
                                     timeout.status)
            response.force_close()
            return response
        if status != 400 or not isinstance(exc, BadHttpMessage) or request.writer.output_size:
            return super().handle_error(request, status, exc, message)
        error: GatewayError
        if isinstance(exc, LineTooLong) or "too many headers" in str(exc).lower():
            error = HeadersTooLarge("the request line or headers are too large")
        else:
            error = InvalidRequest("the request is not valid HTTP")
        self.logger.info("refused malformed request from %s: %s", request.remote, error.code)
        response = json_response({"error": error.code, "message": error.message}, error.status)
        response.force_close()
        return response


class _Server(web.Server):
    def __init__(self, *args: Any, limits: Limits, metrics: Metrics | None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self._metrics = metrics
        self._open = 0
        self._refused = 0  # since the last log line
        self._refused_logged = float("-inf")

    def __call__(self) -> RequestHandler:
        return _Protocol(self, loop=asyncio.get_running_loop(), **self._kwargs)

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        self._open += 1

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        super().connection_lost(handler, exc)
        self._open -= 1

    def admit(self) -> bool:
        """Whether another connection fits under max_connections; if not, it is counted
        (and logged at most every REFUSED_LOG_EVERY seconds, not per connection)."""
        if self._open < self.limits.max_connections:
            return True
        self._refused += 1
        if self._metrics is not None:
            self._metrics.connections_refused.inc()
        now = time.monotonic()
        if now - self._refused_logged >= REFUSED_LOG_EVERY:
            log.warning("connection limit reached: %d connections open (max_connections); "
                        "refused %d new connection(s) since the last such line",
                        self._open, self._refused)
            self._refused, self._refused_logged = 0, now
        return False

    def timed_out(self, phase: str) -> None:
        if self._metrics is not None:
            self._metrics.client_timeouts.labels(phase).inc()


class Runner(web.AppRunner):
    def __init__(self, app: web.Application, *, limits: Limits, **kwargs: Any) -> None:
        super().__init__(app, keepalive_timeout=limits.keepalive_timeout, **kwargs)
        self.limits = limits

    async def _make_server(self) -> web.Server:
        base = await super()._make_server()
        factory = base.request_factory
        if self.limits.keepalive_timeout == 0:
            # No keep-alive: every request is answered with "Connection: close", as nginx's
            # keepalive_timeout 0 does.
            def factory(message: RawRequestMessage, *args: Any, **kwargs: Any) -> web.BaseRequest:
                return base.request_factory(message._replace(should_close=True), *args, **kwargs)
        return _Server(_closing_on_timeout(dispatcher(self.app, base.request_handler)),
                       request_factory=factory, limits=self.limits,
                       metrics=self.app.get(METRICS), **self._kwargs)


def _closing_on_timeout(handler: Any) -> Any:
    """Lets the protocol see the request it serves; a request whose body timed out cannot be
    followed by another on its connection."""
    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        protocol = request.protocol
        if isinstance(protocol, _Protocol):
            protocol.serving = request
        try:
            response: web.StreamResponse = await handler(request)
        finally:
            if isinstance(protocol, _Protocol):
                protocol.serving = None
        if isinstance(request.content.exception(), RequestTimeout) and not response.prepared:
            response.force_close()
        return response
    return handle


def runner(app: web.Application, shutdown_grace: float, limits: Limits | None = None,
           **kwargs: Any) -> Runner:
    # handler_cancellation: a client that goes away cancels its upstream request too.
    # auto_decompress off: a gzip request body is forwarded as the client sent it (with its
    # Content-Encoding and Content-Length), never inflated on the way.
    return Runner(app, limits=limits or Limits.defaults(), access_log_class=AccessLogger,
                  handler_cancellation=True, auto_decompress=False,
                  shutdown_timeout=shutdown_grace, **kwargs)


def raise_file_limit(max_connections: int) -> None:
    """Raise the soft RLIMIT_NOFILE toward what max_connections clients need (each proxied one
    holds an upstream connection too), as far as the hard limit allows; warn when the clients
    alone would not fit."""
    want = 2 * max_connections + _FD_MARGIN
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        target = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
    if soft != resource.RLIM_INFINITY and soft < max_connections + _FD_MARGIN:
        log.warning("open-file limit %d is too low for max_connections %d (%d wanted): raise "
                    "the hard limit (ulimit -n, LimitNOFILE=, docker --ulimit nofile=) or "
                    "lower max_connections", soft, max_connections, want)


async def serve(config: Config, path: str | None = None, reuse_port: bool = False,
                admin: bool = True) -> None:
    """Serve until SIGTERM or SIGINT, then drain in-flight requests within shutdown_grace.
    SIGHUP re-reads ``path`` (see reload.py). ``admin``: this process serves ``admin.listen``
    (under ``workers: N``, one process only)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    app = create_app(config)
    tls = (server_context(config.tls.cert_file, config.tls.key_file) if config.tls.enabled
           else None)
    if tls is not None:
        app[TLS_CONTEXT] = tls
    if path is not None:
        loop.add_signal_handler(signal.SIGHUP, reload, app, path)
    raise_file_limit(config.max_connections)
    app_runner = runner(app, config.shutdown_grace, Limits.of(config))
    await app_runner.setup()
    try:
        await web.TCPSite(app_runner, config.listen_host, config.listen_port,
                          reuse_port=reuse_port or None).start()
        if tls is not None and config.listen_tls is not None:
            await _listen_tls(app_runner, config.listen_tls, tls, reuse_port)
    except BaseException:
        await app_runner.cleanup()
        raise
    log.info("wx-gateway listening on %s:%d (%d route(s), %d app(s))%s", config.listen_host,
             config.listen_port, len(config.routes), len(config.apps),
             "" if config.listen_tls is None else
             ", HTTPS on {}:{}".format(*config.listen_tls))
    admin_runner = None
    if admin and config.admin.listen is not None:
        try:
            admin_runner = await _serve_admin(app, config)
        except BaseException:
            await app_runner.cleanup()
            raise
    await stop.wait()
    if admin_runner is not None:
        await admin_runner.cleanup()
    log.info("stopping: draining in-flight requests (up to %gs)", config.shutdown_grace)
    # cleanup() closes the listener, waits for in-flight handlers, then runs cleanup_ctx.
    # aiohttp would wait up to twice shutdown_timeout for a handler that ignores its
    # request's cancellation (one blocked on an upstream), so the grace is enforced here.
    drain = asyncio.ensure_future(app_runner.cleanup())
    if not (await asyncio.wait({drain}, timeout=config.shutdown_grace))[0]:
        late = app_runner.app[IN_FLIGHT]
        log.warning("cancelling %d request(s) still running after %gs", len(late),
                    config.shutdown_grace)
        for task in list(late):
            task.cancel()
    await drain


async def _listen_tls(app_runner: web.AppRunner, address: tuple[str, int],
                      context: ssl.SSLContext, reuse_port: bool) -> None:
    """The HTTPS listener, beside the plain one (health checks and in-cluster callers keep
    plain HTTP); the same application serves both."""
    try:
        await web.TCPSite(app_runner, *address, ssl_context=context,
                          reuse_port=reuse_port or None).start()
    except OSError as exc:  # named, so the command line says which listener failed
        raise OSError(exc.errno, exc.strerror or str(exc), "listen_tls") from exc


async def _serve_admin(app: web.Application, config: Config) -> Runner:
    """The admin API's own listener, on the main application's services."""
    assert config.admin.listen is not None
    host, port = config.admin.listen
    admin_runner = runner(create_admin_app(app), config.shutdown_grace)
    await admin_runner.setup()
    try:
        await web.TCPSite(admin_runner, host, port).start()
    except OSError as exc:  # named, so the command line says which listener failed
        await admin_runner.cleanup()
        raise OSError(exc.errno, exc.strerror or str(exc), "admin.listen") from exc
    except BaseException:
        await admin_runner.cleanup()
        raise
    log.info("admin API listening on %s:%d", host, port)
    return admin_runner


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
    match_info = _prebuilt_match(app, catch_all)
    # /auth/verify is asked once per request by forward-auth callers: it skips the router
    # too, unless an Expect header needs the router's expect handler.
    verify = next(r for r in app.router.routes() if r.handler is endpoints.verify)
    assert verify.resource is not None
    verify_path, verify_match = verify.resource.canonical, _prebuilt_match(app, verify)

    # Not a coroutine: it hands on the pipeline's, so a request awaits one frame less.
    def dispatch(request: web.BaseRequest) -> Awaitable[web.StreamResponse]:
        assert isinstance(request, web.Request)  # the app's request_factory makes them
        if request.version not in (HttpVersion10, HttpVersion11):
            return _answered(_refuse_version(request))
        # path_safe: what the router itself matches endpoints on
        path = request.rel_url.path_safe
        if path in endpoint_paths:
            if path == verify_path and "Expect" not in request.headers:
                request._match_info = verify_match
                return pipeline(request, endpoints.verify)
            return routed(request)
        request._match_info = match_info  # what the router would have set; request.app needs it
        return pipeline(request, proxy.handle)

    return dispatch


async def _answered(response: web.StreamResponse) -> web.StreamResponse:
    return response


def _prebuilt_match(app: web.Application, route: web.AbstractRoute) -> UrlMappingMatchInfo:
    """What the router would set on a request for ``route`` (a path without parameters):
    one frozen match shared by every such request."""
    match_info = UrlMappingMatchInfo({}, route)
    match_info.add_app(app)
    match_info.freeze()
    return match_info


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
