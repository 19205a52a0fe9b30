"""What every mini-program platform's login client shares: the login's outcome, the interface a
client offers, and one bounded, error-mapped HTTP exchange with a platform's server API.

Each platform (WeChat, WeCom, QQ, Douyin, Alipay) documents its own request and reply; the
failures they share -- no answer, an HTTP error page, a reply that is not what was asked for --
map to the same errors, named after WeChat as the contract names them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Protocol

import aiohttp
from yarl import URL

from .config import App
from .errors import GatewayError, WeChatError, WeChatTimeout
from .metrics import Metrics

MAX_REPLY_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class Code2Session:
    """A login code exchanged: the platform's user id (the openid header), its union id where
    the platform has one, the key its user data is encrypted with ("" where there is none) and,
    on WeCom, the user's corp."""

    openid: str
    unionid: str | None
    session_key: str
    corpid: str | None = None

    def __repr__(self) -> str:  # the session_key must never reach a log line
        return (f"Code2Session(openid={self.openid!r}, unionid={self.unionid!r}, "
                f"corpid={self.corpid!r})")


Errcodes = Mapping[int, tuple[type[GatewayError], str]]


class AccessTokenRejected(WeChatError):
    """The platform refused the access token the call carried; the caller refreshes it and
    tries once more."""


class Login(Protocol):
    """A platform's login: its ``login()`` code in, the user out, or one of our errors."""

    async def code2session(self, app: App, code: str) -> Code2Session: ...


class Exchange:
    """HTTP calls to one platform's server API: bounded in time and size, timed in metrics,
    every transport failure one of our errors. Subclasses read the platform's own replies."""

    platform = "WeChat"  # how log lines and error messages name it

    def __init__(self, http: aiohttp.ClientSession, api_base: URL, timeout: float,
                 metrics: Metrics | None = None) -> None:
        self._http = http
        self._base = api_base
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._metrics = metrics
        # each platform's failures under its own module's logger (gateway.wechat, gateway.qq)
        self._log = logging.getLogger(type(self).__module__)

    def base(self, app: App) -> URL:
        """Where ``app``'s calls go: its own ``api_base``, else the platform's."""
        return app.api_base if app.api_base is not None else self._base

    def url(self, app: App, path: str) -> URL:
        base = self.base(app)
        return base.with_path(base.path.rstrip("/") + "/" + path.lstrip("/"))

    @contextlib.contextmanager
    def measured(self, name: str) -> Iterator[None]:
        """Time one call, whole (the exchange and the reading of its reply), in metrics under
        ``name`` with its outcome: "ok" or the error code it ended in."""
        started, outcome = time.perf_counter(), "ok"
        try:
            yield
        except GatewayError as exc:
            outcome = exc.code
            raise
        finally:
            if self._metrics is not None:
                self._metrics.wechat_seconds.labels(name, outcome).observe(
                    time.perf_counter() - started)

    async def fetch(self, method: str, url: URL, name: str, *,
                    query: Mapping[str, str] | None = None, json_body: Any = None,
                    form: Mapping[str, str] | None = None) -> bytes:
        """The body of a 200 answer to one call, at most MAX_REPLY_BYTES; ``name`` names the
        call in logs."""
        return await self._fetch(method, url, name, query, json_body, form)

    async def _fetch(self, method: str, url: URL, name: str, query: Mapping[str, str] | None,
                     json_body: Any, form: Mapping[str, str] | None) -> bytes:
        who = self.platform
        try:
            # No platform's API redirects: following one would send the secret (in the query,
            # or in the body of a 307/308) to whatever host, scheme included, it names.
            async with self._http.request(
                    method, url.with_query(query) if query else url, json=json_body,
                    data=form, timeout=self._timeout, auto_decompress=True,
                    allow_redirects=False) as resp:
                raw = bytearray()
                async for chunk in resp.content.iter_chunked(8192):
                    raw += chunk
                    if len(raw) > MAX_REPLY_BYTES:
                        self._log.warning("%s %s reply is over %d bytes", who, name, MAX_REPLY_BYTES)
                        raise WeChatError(f"{who}'s reply was too large")
                status = resp.status
        except asyncio.TimeoutError:
            self._log.warning("%s %s timed out", who, name)
            raise WeChatTimeout(f"{who} did not answer in time") from None
        except aiohttp.ClientError as exc:
            self._log.warning("%s %s unreachable: %s", who, name, type(exc).__name__)
            raise WeChatError(f"{who} could not be reached") from None
        if status != 200:
            self._log.warning("%s %s answered HTTP %d", who, name, status)
            raise WeChatError(f"{who} answered HTTP {status}")
        return bytes(raw)

    def check(self, reply: Mapping[str, Any], name: str, errcodes: Errcodes, *,
              hidden: tuple[str | None, ...] = (), rejected: frozenset[int] = frozenset(),
              code: str = "errcode", message: str = "errmsg") -> None:
        """Raise the error the reply's error number (``code``; 0 or absent: none) maps to:
        ``AccessTokenRejected`` for one of ``rejected``, else ``errcodes``' entry, else
        WeChatError. The platform's ``message`` is logged without any of ``hidden``."""
        who, number = self.platform, error_number(reply.get(code))
        if number is None:
            self._log.warning("%s %s %s is not a number: %.40r", who, name, code,
                              reply.get(code))
            raise WeChatError(f"{who} answered an {code} that is not a number")
        if number == 0:
            return
        self._log.warning("%s %s %s %d: %s", who, name, code, number,
                          said(reply.get(message), *hidden))
        if number in rejected:
            raise AccessTokenRejected(f"{who} rejected the access_token ({number})")
        kind, text = errcodes.get(number) or (WeChatError, f"{who} answered {code} {number}")
        raise kind(text)

    def json_object(self, raw: bytes, name: str) -> dict[str, Any]:
        """A reply that must be a JSON object, whatever its content type says (WeChat and
        QQ label theirs text/plain)."""
        try:
            reply = json.loads(raw, object_pairs_hook=_unique_keys)
        except (ValueError, RecursionError):
            reply = None
        if not isinstance(reply, dict):
            self._log.warning("%s %s reply is not a JSON object", self.platform, name)
            raise WeChatError(f"{self.platform}'s reply was not JSON")
        return reply


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object whose every key is given once: JSON readers disagree about which copy of a
    repeated one counts, so a reply that repeats ``errcode`` or ``openid`` says two things."""
    reply = dict(pairs)
    if len(reply) != len(pairs):
        raise ValueError("a key is given twice")
    return reply


_NUMBER = re.compile(r"-?[0-9]{1,12}")
_LIMIT = 10 ** 12


def error_number(value: Any) -> int | None:
    """A platform's error code as an int (0 when absent), or None when it is not a number.

    Some front ends send it as a string ("40001", "-1"); wechatpy reads WeChat's with
    ``int(result["errcode"])`` (wechatpy/client/base.py) and so do we, but strictly: no
    whitespace, underscores, non-ASCII digits or booleans.
    """
    if value is None:
        return 0
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        # as many digits as a string may have: a 300-digit code is no platform's, and would be
        # echoed whole in the error message and the log line
        return value if abs(value) < _LIMIT else None
    if isinstance(value, str) and _NUMBER.fullmatch(value):
        return int(value)
    return None


def said(value: Any, *hidden: str | None) -> str:
    """A platform's free text (``errmsg``) for a log line: at most 200 characters, and none of
    ``hidden`` (the app's secret, the code, the access token), which a broken front end may
    echo back with the request it was sent. Values under 8 characters are no secret's and
    would only blot out the message."""
    told = str(value)
    for secret in hidden:
        if secret and len(secret) >= 8:
            told = told.replace(secret, "[redacted]")
    return told[:200]


def text(value: Any) -> str | None:
    """A non-empty string from a reply, else None."""
    return value if isinstance(value, str) and value else None
