"""WeChat server API client: every call, its outcome mapped to one of our errors."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Mapping

import aiohttp
from yarl import URL

from .config import App
from .errors import (GatewayError, InvalidCode, InvalidPhoneCode, RateLimited,
                     SessionKeyExpired, UserBlocked, WeChatError, WeChatTimeout,
                     WeChatUnavailable)
from .metrics import Metrics

log = logging.getLogger("gateway.wechat")
MAX_REPLY_BYTES = 64 * 1024
Errcodes = Mapping[int, tuple[type[GatewayError], str]]

_BUSY = (WeChatUnavailable, "WeChat is busy; try again shortly")
# auth.code2Session → the login error table (docs/endpoints.md)
_LOGIN: Errcodes = {
    40029: (InvalidCode, "the login code is invalid"),
    40163: (InvalidCode, "the login code has already been used"),
    40226: (UserBlocked, "WeChat blocked this user as high-risk"),
    45011: (RateLimited, "WeChat's login frequency limit was reached; try again shortly"),
    -1: _BUSY,
}
_PHONE: Errcodes = {
    40029: (InvalidPhoneCode, "the phone number code is invalid or expired"),
    45011: (RateLimited, "WeChat's frequency limit was reached; try again shortly"),
    -1: _BUSY,
}
_CHECK_SESSION: Errcodes = {
    87009: (SessionKeyExpired, "the WeChat session has expired; log in again"),
    -1: _BUSY,
}
_TOKEN: Errcodes = {
    45009: (RateLimited, "WeChat's access_token quota is exhausted"),
    -1: _BUSY,
}
# WeChat's answer when the access_token itself is bad: refresh it and try once more.
ACCESS_TOKEN_REJECTED = frozenset({40001, 42001, 40014})


class AccessTokenRejected(WeChatError):
    """WeChat refused the access_token (40001/42001/40014); the caller refreshes and retries."""


@dataclass(frozen=True, slots=True)
class Code2Session:
    openid: str
    unionid: str | None
    session_key: str

    def __repr__(self) -> str:  # the session_key must never reach a log line
        return f"Code2Session(openid={self.openid!r}, unionid={self.unionid!r})"


@dataclass(frozen=True, slots=True)
class AccessToken:
    token: str
    expires_in: int

    def __repr__(self) -> str:
        return f"AccessToken(expires_in={self.expires_in})"


class WeChatClient:
    def __init__(self, http: aiohttp.ClientSession, api_base: URL, timeout: float,
                 metrics: Metrics | None = None) -> None:
        self._http = http
        self._base = api_base
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._metrics = metrics

    async def code2session(self, app: App, code: str) -> Code2Session:
        reply = await self._call("GET", "sns/jscode2session", _LOGIN, query={
            "appid": app.appid, "secret": app.secret, "js_code": code,
            "grant_type": "authorization_code"})
        openid, session_key = reply.get("openid"), reply.get("session_key")
        unionid = reply.get("unionid")
        if not (isinstance(openid, str) and openid and isinstance(session_key, str) and session_key):
            log.warning("jscode2session reply for appid %s lacks openid/session_key", app.appid)
            raise WeChatError("WeChat's reply had no openid or session_key")
        return Code2Session(openid, unionid if isinstance(unionid, str) and unionid else None,
                            session_key)

    async def stable_token(self, app: App, force_refresh: bool = False) -> AccessToken:
        """``cgi-bin/stable_token``. In normal mode it hands out the current token and revokes
        nobody; ``force_refresh`` revokes the token every other holder of the appid uses."""
        reply = await self._call("POST", "cgi-bin/stable_token", _TOKEN, body={
            "grant_type": "client_credential", "appid": app.appid, "secret": app.secret,
            "force_refresh": force_refresh})
        token, expires_in = reply.get("access_token"), reply.get("expires_in")
        if not (isinstance(token, str) and token and isinstance(expires_in, int)
                and not isinstance(expires_in, bool) and expires_in > 0):
            raise WeChatError("WeChat's stable_token reply had no access_token or expires_in")
        return AccessToken(token, expires_in)

    async def phone_number(self, access_token: str, code: str) -> dict[str, Any]:
        reply = await self._call("POST", "wxa/business/getuserphonenumber", _PHONE,
                                 query={"access_token": access_token}, body={"code": code})
        info = reply.get("phone_info")
        if not isinstance(info, dict):
            raise WeChatError("WeChat's reply had no phone_info")
        return info

    async def check_session(self, access_token: str, openid: str, session_key: bytes) -> None:
        """Raise ``SessionKeyExpired`` unless WeChat still holds this session_key."""
        signature = hmac.new(session_key, b"", hashlib.sha256).hexdigest()
        await self._call("GET", "wxa/checksession", _CHECK_SESSION, query={
            "access_token": access_token, "openid": openid, "signature": signature,
            "sig_method": "hmac_sha256"})

    async def _call(self, method: str, path: str, errcodes: Errcodes, *,
                    query: Mapping[str, str] | None = None,
                    body: Mapping[str, Any] | None = None) -> dict[str, Any]:
        started, outcome = time.perf_counter(), "ok"
        try:
            return await self._exchange(method, path, errcodes, query, body)
        except GatewayError as exc:
            outcome = exc.code
            raise
        finally:
            if self._metrics is not None:
                self._metrics.wechat_seconds.labels(path.rsplit("/", 1)[-1], outcome).observe(
                    time.perf_counter() - started)

    async def _exchange(self, method: str, path: str, errcodes: Errcodes,
                        query: Mapping[str, str] | None,
                        body: Mapping[str, Any] | None) -> dict[str, Any]:
        url = self._base.with_path(self._base.path.rstrip("/") + "/" + path)
        name = "/" + path
        try:
            async with self._http.request(method, url.with_query(query or {}), json=body,
                                          timeout=self._timeout, auto_decompress=True) as resp:
                raw = bytearray()
                async for chunk in resp.content.iter_chunked(8192):
                    raw += chunk
                    if len(raw) > MAX_REPLY_BYTES:
                        break
                status = resp.status
        except asyncio.TimeoutError:
            log.warning("WeChat %s timed out", name)
            raise WeChatTimeout("WeChat did not answer in time") from None
        except aiohttp.ClientError as exc:
            log.warning("WeChat %s unreachable: %s", name, type(exc).__name__)
            raise WeChatError("WeChat could not be reached") from None
        if status != 200:
            log.warning("WeChat %s answered HTTP %d", name, status)
            raise WeChatError(f"WeChat answered HTTP {status}")
        try:
            # WeChat sends JSON labelled text/plain, so the content type is ignored.
            reply = json.loads(raw) if len(raw) <= MAX_REPLY_BYTES else None
        except (ValueError, RecursionError):
            reply = None
        if not isinstance(reply, dict):
            log.warning("WeChat %s reply is not a JSON object", name)
            raise WeChatError("WeChat's reply was not JSON")
        errcode = _errcode(reply.get("errcode"))
        if errcode is None:
            log.warning("WeChat %s errcode is not a number: %.40r", name, reply.get("errcode"))
            raise WeChatError("WeChat answered an errcode that is not a number")
        if errcode != 0:
            log.warning("WeChat %s errcode %d: %s", name, errcode, str(reply.get("errmsg"))[:200])
            if errcode in ACCESS_TOKEN_REJECTED:
                raise AccessTokenRejected(f"WeChat rejected the access_token ({errcode})")
            kind, message = errcodes.get(errcode) or (WeChatError,
                                                      f"WeChat answered errcode {errcode}")
            raise kind(message)
        return reply


_ERRCODE = re.compile(r"-?[0-9]{1,12}")


def _errcode(value: Any) -> int | None:
    """WeChat's errcode as an int (0 when absent), or None when it is not a number.

    Some WeChat front ends send it as a string ("40001", "-1"); wechatpy reads it with
    ``int(result["errcode"])`` (wechatpy/client/base.py) and so do we, but strictly: no
    whitespace, underscores, non-ASCII digits or booleans.
    """
    if value is None:
        return 0
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, str) and _ERRCODE.fullmatch(value):
        return int(value)
    return None
