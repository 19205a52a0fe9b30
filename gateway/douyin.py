"""Douyin (ByteDance: Douyin, Toutiao) mini-program server API: login (``code2Session`` v2),
every documented ``err_no`` mapped.

The doc (developer.open-douyin.com/docs/resource/zh-CN/mini-app/develop/server/basic-abilities/
log-in/code-2-session) still sends the call to developer.toutiao.com
(``POST https://developer.toutiao.com/api/apps/v2/jscode2session``, JSON body); its answer is
JSON with ``err_no``/``err_tips`` and the user nested in ``data``.
"""

from __future__ import annotations

import logging

from yarl import URL

from .config import App
from .errors import InvalidCode, WeChatError, WeChatUnavailable
from .platform import Code2Session, Errcodes, Exchange, text

log = logging.getLogger("gateway.douyin")
API_BASE = URL("https://developer.toutiao.com")

# code2Session's error table: -1 系统错误, 40014 参数错误, 40015 appid 错误, 40017 secret 错误,
# 40018 code 错误, 40019 acode (anonymous_code) 错误. A code is single-use and valid 5 minutes
# (tt.login), so a used or expired one is 40018 too.
_LOGIN: Errcodes = {
    40018: (InvalidCode, "the login code is invalid"),
    40019: (InvalidCode, "the anonymous login code is invalid"),
    40014: (WeChatError, "Douyin refused the login request's parameters"),
    40015: (WeChatError, "Douyin does not know this appid"),
    40017: (WeChatError, "Douyin refused the app's secret"),
    -1: (WeChatUnavailable, "Douyin is busy; try again shortly"),
}


class DouyinClient(Exchange):
    platform = "Douyin"

    async def code2session(self, app: App, code: str) -> Code2Session:
        with self.measured("douyin.jscode2session"):
            return await self._code2session(app, code)

    async def _code2session(self, app: App, code: str) -> Code2Session:
        # Only ``code``: tt.login gives it to users logged in to the host app. An
        # ``anonymous_code`` alone yields only ``anonymous_openid``, a device, not a user, and
        # the gateway does not make sessions for it.
        raw = await self.fetch("POST", self.url(app, "api/apps/v2/jscode2session"),
                               "jscode2session", json_body={
                                   "appid": app.appid, "secret": app.secret, "code": code})
        reply = self.json_object(raw, "/api/apps/v2/jscode2session")
        self.check(reply, "/api/apps/v2/jscode2session", _LOGIN, hidden=(app.secret, code),
                   code="err_no", message="err_tips")
        data = reply.get("data")
        user = data if isinstance(data, dict) else {}
        openid, session_key = text(user.get("openid")), text(user.get("session_key"))
        if openid is None or session_key is None:
            # e.g. only anonymous_openid: never let a device id pass for a user
            log.warning("Douyin jscode2session reply for appid %s lacks openid/session_key",
                        app.appid)
            raise WeChatError("Douyin's reply had no openid or session_key")
        return Code2Session(openid, text(user.get("unionid")), session_key)
