"""Everything a request handler needs, built once per application in its ``cleanup_ctx``."""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp
from aiohttp import web

from .auth import Authenticator
from .config import Config
from .credentials import AccessTokens
from .metrics import Metrics
from .ratelimit import LoginLimiter
from .sessions import SessionStore
from .tokens import TokenCodec
from .wechat import WeChatClient


@dataclass(frozen=True, slots=True)
class Services:
    config: Config
    http: aiohttp.ClientSession
    wechat: WeChatClient
    sessions: SessionStore
    tokens: TokenCodec
    authenticator: Authenticator
    metrics: Metrics
    access_tokens: AccessTokens
    limiter: LoginLimiter


SERVICES = web.AppKey("services", Services)
METRICS = web.AppKey("metrics", Metrics)
# Per-request facts the error/metrics middleware reports (set by the handlers).
ROUTE_LABEL = web.RequestKey("route", str)
REQUEST_ID = web.RequestKey("request_id", str)
