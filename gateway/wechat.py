"""WeChat server API client: every call, its outcome mapped to one of our errors."""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass
from typing import Any, Mapping

from .config import App
from .errors import (InvalidCode, InvalidPhoneCode, RateLimited,
                     SessionKeyExpired, UserBlocked, WeChatError, WeChatUnavailable)
from .platform import AccessTokenRejected, Code2Session, Errcodes, Exchange, text

__all__ = ["ACCESS_TOKEN_REJECTED", "AccessToken", "AccessTokenRejected", "Code2Session",
           "WeChatClient"]
log = logging.getLogger("gateway.wechat")

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


@dataclass(frozen=True, slots=True)
class AccessToken:
    token: str
    expires_in: int

    def __repr__(self) -> str:
        return f"AccessToken(expires_in={self.expires_in})"


class WeChatClient(Exchange):
    async def code2session(self, app: App, code: str) -> Code2Session:
        reply = await self._call(app, "GET", "sns/jscode2session", _LOGIN, query={
            "appid": app.appid, "secret": app.secret, "js_code": code,
            "grant_type": "authorization_code"})
        openid, session_key = text(reply.get("openid")), text(reply.get("session_key"))
        if openid is None or session_key is None:
            log.warning("jscode2session reply for appid %s lacks openid/session_key", app.appid)
            raise WeChatError("WeChat's reply had no openid or session_key")
        return Code2Session(openid, text(reply.get("unionid")), session_key)

    async def stable_token(self, app: App, force_refresh: bool = False) -> AccessToken:
        """``cgi-bin/stable_token``. In normal mode it hands out the current token and revokes
        nobody; ``force_refresh`` revokes the token every other holder of the appid uses."""
        reply = await self._call(app, "POST", "cgi-bin/stable_token", _TOKEN, body={
            "grant_type": "client_credential", "appid": app.appid, "secret": app.secret,
            "force_refresh": force_refresh})
        token, expires_in = reply.get("access_token"), reply.get("expires_in")
        if not (isinstance(token, str) and token and isinstance(expires_in, int)
                and not isinstance(expires_in, bool) and expires_in > 0):
            raise WeChatError("WeChat's stable_token reply had no access_token or expires_in")
        return AccessToken(token, expires_in)

    async def phone_number(self, app: App, access_token: str, code: str) -> dict[str, Any]:
        reply = await self._call(app, "POST", "wxa/business/getuserphonenumber", _PHONE,
                                 query={"access_token": access_token}, body={"code": code})
        info = reply.get("phone_info")
        if not isinstance(info, dict):
            raise WeChatError("WeChat's reply had no phone_info")
        return info

    async def check_session(self, app: App, access_token: str, openid: str,
                            session_key: bytes) -> None:
        """Raise ``SessionKeyExpired`` unless WeChat still holds this session_key."""
        signature = hmac.new(session_key, b"", hashlib.sha256).hexdigest()
        await self._call(app, "GET", "wxa/checksession", _CHECK_SESSION, query={
            "access_token": access_token, "openid": openid, "signature": signature,
            "sig_method": "hmac_sha256"})

    async def _call(self, app: App, method: str, path: str, errcodes: Errcodes, *,
                    query: Mapping[str, str] | None = None,
                    body: Mapping[str, Any] | None = None) -> dict[str, Any]:
        with self.measured(path.rsplit("/", 1)[-1]):
            raw = await self.fetch(method, self.url(app, path), "/" + path, query=query,
                                   json_body=body)
            sent = {**(query or {}), **(body or {})}
            return self._read(path, raw, errcodes, (app.secret, *(
                str(sent[k]) for k in ("access_token", "js_code", "code") if k in sent)))

    def _read(self, path: str, raw: bytes, errcodes: Errcodes,
              hidden: tuple[str, ...]) -> dict[str, Any]:
        reply = self.json_object(raw, "/" + path)
        self.check(reply, "/" + path, errcodes, hidden=hidden, rejected=ACCESS_TOKEN_REJECTED)
        return reply
