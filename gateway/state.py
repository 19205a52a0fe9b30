"""Typed keys for what the application and each request carry (aiohttp ``AppKey`` and
``RequestKey``), in one place so any layer can read them without importing the one that sets
them."""

from __future__ import annotations

import asyncio
import ssl
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from .cache import Identity
    from .config import Config
    from .login_hook import Outcome
    from .metrics import Metrics
    from .services import Live

CONFIG: web.AppKey[Config] = web.AppKey("config")
SERVICES: web.AppKey[Live] = web.AppKey("services")
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
# The TLS context of the listen_tls listener, when set (reloaded in place on SIGHUP).
TLS_CONTEXT = web.AppKey("tls_context", ssl.SSLContext)
# Tasks handling a request right now: a graceful stop cancels what outlives shutdown_grace.
IN_FLIGHT: web.AppKey[set[asyncio.Task[object]]] = web.AppKey("in_flight")

# Per-request facts the middleware, metrics and access log report (set by the handlers).
ROUTE_LABEL = web.RequestKey("route", str)
REQUEST_ID = web.RequestKey("request_id", str)
IDENTITY: web.RequestKey[Identity] = web.RequestKey("identity")
UPSTREAM_SECONDS = web.RequestKey("upstream_seconds", float)
# The login hook's outcome and latency, on a login or refresh that asked it.
HOOK_OUTCOME: web.RequestKey[Outcome] = web.RequestKey("login_hook")
# Which admin token authorised an admin API call: its position in admin.tokens.
ADMIN_TOKEN = web.RequestKey("admin_token", int)
# The path the access log shows when the raw one holds what must not be logged (an openid).
LOGGED_PATH = web.RequestKey("logged_path", str)
STARTED = web.RequestKey("started", float)  # time.perf_counter() when the request arrived
# Set once "100 Continue" went out: the client was told to send its body.
CONTINUED = web.RequestKey("continued", bool)
