"""WeCom (企业微信) mini-program login: the corp app's access token, then the login code.

A mini-program running inside WeCom gets its code from ``wx.qy.login()``; the server exchanges
it with ``GET cgi-bin/miniprogram/jscode2session?access_token=&js_code=&grant_type=
authorization_code``, where the access token is the corp's, from ``cgi-bin/gettoken?corpid=
&corpsecret=`` with the secret of the corp app the mini-program is associated with ("登录流程 /
code2Session", developer.work.weixin.qq.com/document/path/91507; "获取access_token",
developer.work.weixin.qq.com/document/path/91039). The reply names the user by ``userid``
(unique within the corp, not an openid) and the corp by ``corpid``.
"""

from __future__ import annotations

import hashlib
import logging
import re
from typing import Any, Awaitable, Callable, Mapping, Protocol, TypeVar

from yarl import URL

from .config import App
from .errors import InvalidCode, RateLimited, WeChatError, WeChatUnavailable
from .platform import Code2Session, Errcodes, Exchange, text
from .wechat import AccessToken

__all__ = ["WECOM_API", "WeComClient", "WeComLogin", "corp_app"]
log = logging.getLogger("gateway.wecom")
WECOM_API = URL("https://qyapi.weixin.qq.com")

_T = TypeVar("_T")

# WeCom's global return codes ("全局错误码", developer.work.weixin.qq.com/document/path/90313).
# Its 40001 is "不合法的secret参数" (WeChat's is an invalid token): from gettoken it means the
# configured secret is wrong, and stays a 502.
_COMMON: Errcodes = {
    -1: (WeChatUnavailable, "WeCom is busy; try again shortly"),
    45009: (RateLimited, "WeCom's API call limit for this corp app was reached; try again later"),
    45011: (RateLimited, "WeCom's frequency limit was reached; try again shortly"),
    40013: (WeChatError, "WeCom refused the corpid (apps[].corpid)"),
    60020: (WeChatError, "WeCom refused the gateway's IP address: add it to the corp app's "
                         "trusted IPs (企业可信IP)"),
}
_TOKEN: Errcodes = {
    **_COMMON,
    40001: (WeChatError, "WeCom refused the corp app's secret (apps[].secret)"),
}
_LOGIN: Errcodes = {
    **_COMMON,
    # WeCom answers 40029 for a code that is invalid, expired or already used; 40163 is
    # WeChat's "code been used", kept for a front end that answers it.
    40029: (InvalidCode, "the login code is invalid"),
    40163: (InvalidCode, "the login code has already been used"),
}
# The token itself is bad: refresh it and try once more, as WxJava's BaseWxCpServiceImpl does
# for WxConsts.ACCESS_TOKEN_ERROR_CODES (40001, 40014, 42001). WeCom: "企业微信可能会出于运营
# 需要,提前使access_token失效,开发者应实现access_token失效时重新获取的逻辑" (获取access_token).
TOKEN_REJECTED = frozenset({40014, 42001, 40001})
# A member's UserID is 1 to 64 bytes of letters, digits and "_-@." ("创建成员",
# developer.work.weixin.qq.com/document/path/90195); any printable ASCII is let through, in case
# older accounts differ, but no space, control character or anything longer.
_USERID = re.compile(r"[!-~]{1,64}")


class TokenCalls(Protocol):
    """Runs a call with the app's cached access token, refreshing it once if rejected
    (``access_tokens.AccessTokens``)."""

    async def call(self, app: App, operation: Callable[[str], Awaitable[_T]]) -> _T: ...


class WeComClient(Exchange):
    platform = "WeCom"

    async def gettoken(self, app: App) -> AccessToken:
        with self.measured("wecom.gettoken"):
            return await self._gettoken(app)

    async def _gettoken(self, app: App) -> AccessToken:
        """The corp app's access token. WeCom gives the same token again while it is valid
        and rate-limits frequent calls, so callers cache it (``AccessTokens``)."""
        assert app.corpid is not None  # the loader requires it on platform wecom
        reply = await self._call(app, "cgi-bin/gettoken", _TOKEN, rejected=frozenset(), query={
            "corpid": app.corpid, "corpsecret": app.secret})
        token, expires_in = reply.get("access_token"), reply.get("expires_in")
        if not (isinstance(token, str) and token and isinstance(expires_in, int)
                and not isinstance(expires_in, bool) and expires_in > 0):
            raise WeChatError("WeCom's gettoken reply had no access_token or expires_in")
        return AccessToken(token, expires_in)

    async def jscode2session(self, app: App, access_token: str, code: str) -> Code2Session:
        with self.measured("wecom.jscode2session"):
            return await self._jscode2session(app, access_token, code)

    async def _jscode2session(self, app: App, access_token: str, code: str) -> Code2Session:
        reply = await self._call(app, "cgi-bin/miniprogram/jscode2session", _LOGIN,
                                 rejected=TOKEN_REJECTED, query={
                                     "access_token": access_token, "js_code": code,
                                     "grant_type": "authorization_code"})
        userid, session_key = text(reply.get("userid")), text(reply.get("session_key"))
        if userid is None or session_key is None:
            log.warning("WeCom jscode2session reply for appid %s lacks userid/session_key",
                        app.appid)
            raise WeChatError("WeCom's reply had no userid or session_key")
        if not _USERID.fullmatch(userid):
            # It becomes the openid header and the token's subject: nothing else gets through.
            log.warning("WeCom jscode2session reply for appid %s has a malformed userid",
                        app.appid)
            raise WeChatError("WeCom's reply had a malformed userid")
        corpid = reply.get("corpid")
        if corpid != app.corpid:
            # The token is the configured corp's, so WeCom answers that corp's users; any other
            # corp (or none) means the reply cannot be trusted to name the user's corp, and
            # backends trust X-WX-CorpID.
            log.warning("WeCom jscode2session reply for appid %s names corp %.40r, not the "
                        "configured %s", app.appid, corpid, app.corpid)
            raise WeChatError("WeCom's reply named another corp than apps[].corpid")
        return Code2Session(userid, None, session_key, app.corpid)

    async def _call(self, app: App, path: str, errcodes: Errcodes, *,
                    rejected: frozenset[int], query: Mapping[str, str]) -> dict[str, Any]:
        raw = await self.fetch("GET", self.url(app, path), "/" + path, query=query)
        reply = self.json_object(raw, "/" + path)
        self.check(reply, "/" + path, errcodes, rejected=rejected, hidden=(
            app.secret, query.get("access_token"), query.get("js_code")))
        return reply


def corp_app(app: App) -> str:
    """Whose token a WeCom app's is, in cache keys: a token of the corp an app was configured
    with before a reload must not serve it after (it would answer for the other corp), nor
    one got with another secret: a token is the corp app's whose secret it was got with, and
    only the app the mini-program is associated with may exchange its codes (a digest, so
    Redis key names do not hold the secret)."""
    digest = hashlib.sha256(app.secret.encode()).hexdigest()[:16]
    return f"{app.corpid}/{app.appid}/{digest}"


class WeComLogin:
    """The ``Login`` of platform wecom: the code exchanged with the corp's cached token."""

    def __init__(self, client: WeComClient, tokens: TokenCalls) -> None:
        self._client = client
        self._tokens = tokens

    async def code2session(self, app: App, code: str) -> Code2Session:
        return await self._tokens.call(
            app, lambda token: self._client.jscode2session(app, token, code))
