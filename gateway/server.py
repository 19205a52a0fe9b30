"""Serving an application: the listener, signal handling and a graceful drain."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_protocol import RequestHandler

from .app import IN_FLIGHT, create_app, dispatcher
from .logs import AccessLogger
from .reload import reload
from .config import Config
from .errors import GatewayError, HeadersTooLarge, InvalidRequest
from .endpoints import json_response

log = logging.getLogger("gateway")


class _Protocol(RequestHandler):
    """aiohttp answers malformed requests itself, in plain text; ours answer in the contract's
    JSON, and oversize headers get 431 instead of 400."""

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
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
    def __call__(self) -> RequestHandler:
        return _Protocol(self, loop=asyncio.get_running_loop(), **self._kwargs)


class Runner(web.AppRunner):
    async def _make_server(self) -> web.Server:
        base = await super()._make_server()
        return _Server(dispatcher(self.app, base.request_handler),
                       request_factory=base.request_factory, **self._kwargs)


def runner(app: web.Application, shutdown_grace: float, **kwargs: Any) -> Runner:
    # handler_cancellation: a client that goes away cancels its upstream request too.
    # auto_decompress off: a gzip request body is forwarded as the client sent it (with its
    # Content-Encoding and Content-Length), never inflated on the way.
    return Runner(app, access_log_class=AccessLogger, handler_cancellation=True,
                  auto_decompress=False, shutdown_timeout=shutdown_grace, **kwargs)


async def serve(config: Config, path: str | None = None, reuse_port: bool = False) -> None:
    """Serve until SIGTERM or SIGINT, then drain in-flight requests within shutdown_grace.
    SIGHUP re-reads ``path`` (see reload.py)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    app = create_app(config)
    if path is not None:
        loop.add_signal_handler(signal.SIGHUP, reload, app, path)
    app_runner = runner(app, config.shutdown_grace)
    await app_runner.setup()
    try:
        await web.TCPSite(app_runner, config.listen_host, config.listen_port,
                          reuse_port=reuse_port or None).start()
    except BaseException:
        await app_runner.cleanup()
        raise
    log.info("wx-gateway listening on %s:%d (%d route(s), %d app(s))", config.listen_host,
             config.listen_port, len(config.routes), len(config.apps))
    await stop.wait()
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
