"""QQ mini-program server API: login (``code2Session``), every documented errcode mapped.

QQ's API is a copy of WeChat's on another host: the same query, the same ``errcode``/``errmsg``
reply labelled text/plain (q.qq.com/wiki/develop/miniprogram/server/open_port/port_login.html).
"""

from __future__ import annotations

import logging

from yarl import URL

from .config import App
from .errors import InvalidCode, RateLimited, WeChatError, WeChatUnavailable
from .platform import Code2Session, Errcodes, Exchange, text

log = logging.getLogger("gateway.qq")
API_BASE = URL("https://api.q.qq.com")

# code2Session's "errcode 的合法值": -1 系统繁忙, 40029 code 无效, 45011 频率限制 (100 a minute
# per user). QQ documents no "code already used" errcode: a used code is an invalid one.
_LOGIN: Errcodes = {
    40029: (InvalidCode, "the login code is invalid"),
    45011: (RateLimited, "QQ's login frequency limit was reached; try again shortly"),
    -1: (WeChatUnavailable, "QQ is busy; try again shortly"),
}


class QQClient(Exchange):
    platform = "QQ"

    async def code2session(self, app: App, code: str) -> Code2Session:
        with self.measured("qq.jscode2session"):
            return await self._code2session(app, code)

    async def _code2session(self, app: App, code: str) -> Code2Session:
        raw = await self.fetch("GET", self.url(app, "sns/jscode2session"), "jscode2session",
                               query={"appid": app.appid, "secret": app.secret, "js_code": code,
                                      "grant_type": "authorization_code"})
        reply = self.json_object(raw, "/sns/jscode2session")
        self.check(reply, "/sns/jscode2session", _LOGIN, hidden=(app.secret, code))
        openid, session_key = text(reply.get("openid")), text(reply.get("session_key"))
        if openid is None or session_key is None:
            log.warning("QQ jscode2session reply for appid %s lacks openid/session_key",
                        app.appid)
            raise WeChatError("QQ's reply had no openid or session_key")
        return Code2Session(openid, text(reply.get("unionid")), session_key)
