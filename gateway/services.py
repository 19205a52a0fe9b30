"""Everything a request handler needs, built from a Config in the app's ``cleanup_ctx`` and
rebuilt on reload (SIGHUP) around the same connections."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import aiohttp
import redis.asyncio as aioredis

from .assertion import Asserter
from .keys import load_private_key
from .auth import Authenticator
from .cache import SessionCache
from .config import Config
from .access_tokens import AccessTokens
from .keys import Keyring
from .login_hook import LoginHook
from .metrics import Metrics
from .pool import Pool
from .ratelimit import LoginLimiter
from .sessions import SessionStore
from .session_tokens import TokenCodec
from .platform import Login
from .wechat import WeChatClient
from . import douyin, qq
from .wecom import WECOM_API, WeComClient, WeComLogin, corp_app
from .alipay import ALIPAY_API, AlipayClient


@dataclass(frozen=True, slots=True)
class Connections:
    """What outlives a reload: pools and the session cache."""

    redis: aioredis.Redis
    pool: Pool  # upstream HTTP
    http: aiohttp.ClientSession  # upstream WebSockets
    wechat_http: aiohttp.ClientSession
    cache: SessionCache | None
    metrics: Metrics
    hook_http: aiohttp.ClientSession | None = None  # the login hook's own small pool


@dataclass(frozen=True, slots=True)
class Services:
    config: Config
    pool: Pool
    http: aiohttp.ClientSession
    wechat: WeChatClient
    keyring: Keyring
    sessions: SessionStore
    tokens: TokenCodec
    authenticator: Authenticator
    metrics: Metrics
    access_tokens: AccessTokens
    limiter: LoginLimiter
    asserter: Asserter | None
    # platform → its login (apps[].platform); every platform the configuration names is here
    logins: Mapping[str, Login]
    login_hook: LoginHook | None = None

    @classmethod
    def build(cls, config: Config, c: Connections) -> Services:
        keyring = Keyring(config.session.signing_keys)
        store = SessionStore(c.redis, config.redis.key_prefix, keyring)
        codec = TokenCodec(keyring, tuple(a.appid for a in config.apps))
        wechat = WeChatClient(c.wechat_http, config.wechat.api_base, config.wechat.timeout,
                              c.metrics)
        timeout = config.wechat.timeout
        qq_login = qq.QQClient(c.wechat_http, qq.API_BASE, timeout, c.metrics)
        douyin_login = douyin.DouyinClient(c.wechat_http, douyin.API_BASE, timeout, c.metrics)
        wecom = WeComClient(c.wechat_http, WECOM_API, config.wechat.timeout, c.metrics)
        wecom_tokens = AccessTokens(c.redis, config.redis.key_prefix, keyring, None,
                                    lock_ttl=config.wechat.timeout + 1, fetch=wecom.gettoken,
                                    namespace="wecom_access_token", scope=corp_app,
                                    platform=wecom.platform)
        return cls(
            config=config, pool=c.pool, http=c.http, wechat=wechat, keyring=keyring, sessions=store,
            tokens=codec, authenticator=Authenticator(codec, store, c.cache, config), metrics=c.metrics,
            access_tokens=AccessTokens(c.redis, config.redis.key_prefix, keyring, wechat,
                                       # a refresh may take two WeChat calls (normal, force)
                                       lock_ttl=2 * config.wechat.timeout + 1,
                                       force_refresh=config.wechat.force_refresh),
            limiter=LoginLimiter(c.redis, config.redis.key_prefix, config.rate_limit),
            asserter=_asserter(config),
            logins={"wechat": wechat, "qq": qq_login, "douyin": douyin_login,
                    "wecom": WeComLogin(wecom, wecom_tokens),
                    "alipay": AlipayClient(c.wechat_http, ALIPAY_API, config.wechat.timeout,
                                           c.metrics, config.apps)},
            login_hook=(LoginHook(c.hook_http, config.login_hook, c.metrics)
                        if config.login_hook is not None and c.hook_http is not None
                        else None))


def _asserter(config: Config) -> Asserter | None:
    a = config.identity_assertion
    if not a.enabled:
        return None
    keys = tuple(load_private_key(pem, a.algorithm) for pem in a.keys)
    return Asserter(a.algorithm, keys, a.issuer, a.ttl)


class Live:
    """The Services in force. A handler reads ``current`` once; a reload replaces it, so each
    request sees one configuration from start to end."""

    def __init__(self, services: Services, connections: Connections) -> None:
        self.current = services
        self.connections = connections
