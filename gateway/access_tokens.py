"""WeChat access tokens: cached in Redis (sealed), refreshed ahead of expiry, once for all replicas.

Every replica reads the same cached token. When it is due (``REFRESH_AT`` of its lifetime),
missing or rejected by WeChat, one caller takes a Redis lock (SET NX PX with a random owner,
released only by that owner) and calls ``stable_token``; every other caller, in this process or
another, keeps using the still-valid token or waits for the new one instead of calling WeChat.
Within one process, concurrent callers share a single refresh.

A token WeChat rejects (40001/42001/40014) is refreshed in normal mode, as WxJava's
``BaseWxMaServiceImpl`` does: it returns the current token, which is a new one when another
holder revoked ours, and revokes nobody. ``force_refresh`` revokes the token every other holder
of the appid (the company's other backends) uses, is limited to 20 calls a day and does nothing
within 30 s of the previous one ("获取稳定版接口调用凭据", developers.weixin.qq.com/doc/service/
api/base/api_getstableaccesstoken.html). So it is used only when normal mode hands back the very
token just rejected, at most once per ``FORCE_INTERVAL`` per appid for the whole deployment, and
never when ``wechat.force_refresh`` is false; otherwise the call fails with 503.

Another platform's corp or app token (WeCom's ``gettoken``) goes through the same cache and lock
under its own key ``namespace``, with its ``fetch`` in place of ``stable_token``; such a platform
has no forced refresh, so a rejected token it keeps handing out fails the call with 503.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, TypeVar

import redis.asyncio as aioredis

from .config import App
from .errors import GatewayError, WeChatUnavailable
from .keys import Keyring
from .store import guarded
from .wechat import AccessToken, AccessTokenRejected, WeChatClient

log = logging.getLogger("gateway.access_tokens")
REFRESH_AT = 0.8
_POLL = 0.05
_RETRY_PAUSE = 1.0
FORCE_INTERVAL = 30.0  # WeChat ignores a force_refresh sooner than 30 s after the previous one
_T = TypeVar("_T")
_STUCK = "{} rejects the access_token it hands out; try again shortly"

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass(frozen=True, slots=True)
class _Cached:
    token: str
    refresh_at: float
    expires_at: float


class AccessTokens:
    def __init__(self, client: aioredis.Redis, key_prefix: str, keyring: Keyring,
                 wechat: WeChatClient | None, lock_ttl: float, force_refresh: bool = True, *,
                 fetch: Callable[[App], Awaitable[AccessToken]] | None = None,
                 namespace: str = "access_token",
                 scope: Callable[[App], str] | None = None, platform: str = "WeChat") -> None:
        """WeChat's tokens from ``wechat``; or, with ``wechat`` None, another platform's from
        ``fetch``, kept under ``namespace`` (no forced refresh). ``scope(app)`` names whose
        token it is in keys (default: the appid); ``platform`` names the platform in errors."""
        if wechat is None and fetch is None:
            raise ValueError("AccessTokens needs the WeChat client or a fetch")
        self._redis = client
        self._prefix = key_prefix
        self._keyring = keyring
        self._wechat = wechat
        self._normal = fetch if fetch is not None else self._stable_token
        self._namespace = namespace
        self._scope = scope if scope is not None else _appid
        self._lock_ttl = lock_ttl
        self._force_refresh = force_refresh
        self._who = platform
        self._release = client.register_script(_RELEASE)
        self._flights: dict[str, asyncio.Future[str]] = {}
        self._quiet_until: dict[str, float] = {}  # appid → no refresh attempt before this
        # appid → (a rejected token normal mode still hands out, until when not to ask again)
        self._stuck: dict[str, tuple[str, float]] = {}

    async def call(self, app: App, operation: Callable[[str], Awaitable[_T]]) -> _T:
        """Run ``operation(access_token)``; if WeChat rejects the token, refresh once and retry."""
        token = await self.get(app)
        try:
            return await operation(token)
        except AccessTokenRejected:
            log.info("access_token for %s rejected by %s; refreshing", app.appid, self._who)
            return await operation(await self.get(app, rejected=token))

    async def get(self, app: App, rejected: str | None = None) -> str:
        cached = await self._read(app)
        if cached is not None and cached.token == rejected:
            cached = None
            stuck_token, stuck_until = self._stuck.get(app.appid, ("", 0.0))
            if stuck_token == rejected and time.time() < stuck_until:
                # WeChat handed out this very token a moment ago: do not ask on every call.
                raise WeChatUnavailable(_STUCK.format(self._who))
        now = time.time()
        if cached is not None and (now < cached.refresh_at
                                   or now < self._quiet_until.get(app.appid, 0)):
            return cached.token
        try:
            token = await self._join(app, rejected, start_new=False)
        except GatewayError:
            if cached is None or time.time() >= cached.expires_at:
                raise
            # An early refresh failed but the current token still works: keep using it,
            # and give WeChat a moment before the next attempt.
            log.warning("early access_token refresh for %s failed; using the current one",
                        app.appid)
            self._quiet_until[app.appid] = time.time() + _RETRY_PAUSE
            return cached.token
        if rejected is not None and token == rejected:
            # We joined a refresh that started before WeChat rejected this token.
            token = await self._join(app, rejected, start_new=True)
        return token

    async def _join(self, app: App, rejected: str | None, start_new: bool) -> str:
        flight = self._flights.get(app.appid)
        if start_new or flight is None or flight.done():
            flight = asyncio.ensure_future(self._refresh(app, rejected))
            self._flights[app.appid] = flight
        return await asyncio.shield(flight)

    async def _refresh(self, app: App, rejected: str | None) -> str:
        lock = f"{self._prefix}{self._namespace}_lock:{self._scope(app)}"
        owner = secrets.token_hex(16)
        deadline = time.monotonic() + self._lock_ttl * 2
        while True:
            if await guarded(lambda: self._redis.set(lock, owner, nx=True,
                                                         px=int(self._lock_ttl * 1000))):
                try:
                    return await self._fetch(app, rejected)
                finally:
                    await guarded(lambda: self._release(keys=[lock], args=[owner]))
            # Another caller (maybe another replica) is refreshing: use what is still valid.
            cached = await self._read(app)
            if cached is not None and cached.token != rejected and time.time() < cached.expires_at:
                return cached.token
            if time.monotonic() > deadline:
                raise WeChatUnavailable(f"timed out waiting for {self._who} access_token refresh")
            await asyncio.sleep(_POLL)

    async def _fetch(self, app: App, rejected: str | None) -> str:
        # Re-read under the lock: the previous holder may have just stored a fresh token.
        cached = await self._read(app)
        if cached is not None and cached.token != rejected and time.time() < cached.refresh_at:
            return cached.token
        fresh = await self._normal(app)
        if rejected is not None and fresh.token == rejected:
            wechat = await self._allow_force(app, rejected)
            log.warning("WeChat rejects the access_token for %s that it still hands out; "
                        "forcing a new one (this revokes it for every other holder)", app.appid)
            fresh = await wechat.stable_token(app, force_refresh=True)
            if fresh.token == rejected:
                # WeChat ignores a force within 30 s of another holder's: nothing to retry with.
                log.warning("WeChat ignored the forced access_token refresh for %s", app.appid)
                self._stuck[app.appid] = (rejected, time.time() + _RETRY_PAUSE)
                raise WeChatUnavailable(_STUCK.format(self._who))
        now = time.time()
        entry: dict[str, Any] = {"token": fresh.token, "refresh_at": now + fresh.expires_in * REFRESH_AT,
                 "expires_at": now + fresh.expires_in}
        sealed = self._keyring.seal(json.dumps(entry).encode(), self._context(app))
        await guarded(lambda: self._redis.set(self._key(app), sealed,
                                                  pxat=int(entry["expires_at"] * 1000)))
        log.info("refreshed the %s for %s (valid %ds)", self._namespace, app.appid,
                 fresh.expires_in)
        return fresh.token

    async def _stable_token(self, app: App) -> AccessToken:
        assert self._wechat is not None
        return await self._wechat.stable_token(app)

    async def _allow_force(self, app: App, rejected: str) -> WeChatClient:
        """The client to force a refresh with, if this replica may now; else WeChatUnavailable."""
        if self._wechat is None:
            reason = f"{app.platform} has no forced refresh"
        elif not self._force_refresh:
            reason = "wechat.force_refresh is off"
        elif await guarded(lambda: self._redis.set(self._force_key(app), "1", nx=True,
                                                   px=int(FORCE_INTERVAL * 1000))):
            return self._wechat
        else:
            reason = f"it was forced less than {FORCE_INTERVAL:.0f}s ago"
        log.warning("%s rejects the access_token for %s that it still hands out, and %s",
                    self._who, app.appid, reason)
        self._stuck[app.appid] = (rejected, time.time() + _RETRY_PAUSE)
        raise WeChatUnavailable(_STUCK.format(self._who))

    async def _read(self, app: App) -> _Cached | None:
        sealed: Any = await guarded(lambda: self._redis.get(self._key(app)))
        if sealed is None:
            return None
        try:
            entry = json.loads(self._keyring.open(sealed.decode(), self._context(app)))
            cached = _Cached(entry["token"], float(entry["refresh_at"]), float(entry["expires_at"]))
        except (ValueError, KeyError, TypeError):
            return None  # sealed under a retired signing key, or damaged: fetch a new one
        return cached if time.time() < cached.expires_at else None

    def _force_key(self, app: App) -> str:
        return f"{self._prefix}{self._namespace}_force:{self._scope(app)}"

    def _key(self, app: App) -> str:
        return f"{self._prefix}{self._namespace}:{self._scope(app)}"

    def _context(self, app: App) -> bytes:
        return f"{self._namespace}/{self._scope(app)}".encode()


def _appid(app: App) -> str:
    return app.appid

