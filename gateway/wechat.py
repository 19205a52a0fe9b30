"""WeChat server API client: ``auth.code2Session`` with every outcome mapped to an error."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

import aiohttp
from yarl import URL

from .config import App
from .errors import (GatewayError, InvalidCode, RateLimited, UserBlocked, WeChatError,
                     WeChatTimeout, WeChatUnavailable)

log = logging.getLogger("gateway.wechat")
MAX_REPLY_BYTES = 64 * 1024

# errcode → the error the mini-program gets (SPEC.md, login error table)
_ERRCODES: dict[int, tuple[type[GatewayError], str]] = {
    40029: (InvalidCode, "the login code is invalid"),
    40163: (InvalidCode, "the login code has already been used"),
    40226: (UserBlocked, "WeChat blocked this user as high-risk"),
    45011: (RateLimited, "WeChat's login frequency limit was reached; try again shortly"),
    -1: (WeChatUnavailable, "WeChat is busy; try again shortly"),
}


@dataclass(frozen=True, slots=True)
class Code2Session:
    openid: str
    unionid: str | None
    session_key: str

    def __repr__(self) -> str:  # the session_key must never reach a log line
        return f"Code2Session(openid={self.openid!r}, unionid={self.unionid!r})"


class WeChatClient:
    def __init__(self, http: aiohttp.ClientSession, api_base: URL, timeout: float) -> None:
        self._http = http
        self._base = api_base
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    async def code2session(self, app: App, code: str) -> Code2Session:
        reply = await self._get("sns/jscode2session", {
            "appid": app.appid, "secret": app.secret, "js_code": code,
            "grant_type": "authorization_code"})
        openid, session_key = reply.get("openid"), reply.get("session_key")
        unionid = reply.get("unionid")
        if not (isinstance(openid, str) and openid and isinstance(session_key, str) and session_key):
            log.warning("jscode2session reply for appid %s lacks openid/session_key", app.appid)
            raise WeChatError("WeChat's reply had no openid or session_key")
        return Code2Session(openid, unionid if isinstance(unionid, str) and unionid else None,
                            session_key)

    async def _get(self, path: str, query: dict[str, str]) -> dict[str, Any]:
        url = self._base.with_path(self._base.path.rstrip("/") + "/" + path)
        name = "/" + path
        try:
            async with self._http.get(url.with_query(query), timeout=self._timeout,
                                      auto_decompress=True) as resp:
                body = bytearray()
                async for chunk in resp.content.iter_chunked(8192):
                    body += chunk
                    if len(body) > MAX_REPLY_BYTES:
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
            reply = json.loads(body) if len(body) <= MAX_REPLY_BYTES else None
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            log.warning("WeChat %s reply is not a JSON object", name)
            raise WeChatError("WeChat's reply was not JSON")
        errcode = reply.get("errcode", 0)
        if errcode not in (0, None):
            log.warning("WeChat %s errcode %s: %s", name, errcode, str(reply.get("errmsg"))[:200])
            known = _ERRCODES.get(errcode) if isinstance(errcode, int) else None
            kind, message = known or (WeChatError, f"WeChat answered errcode {errcode!r}")
            raise kind(message)
        return reply
