"""Authentication: from an ``Authorization`` header to a verified identity.

This is the one place that decides whether a request carries a live session, so a later
in-process cache of verified sessions (with Redis pub/sub invalidation) slots in here
without touching the endpoints or the proxy.
"""

from __future__ import annotations

from .cache import Identity, SessionCache
from .config import Config
from .errors import InvalidRequest, Unauthorized
from .headers import CLAIM_PREFIX
from .session_tokens import TokenCodec
from .sessions import SessionStore

__all__ = ["Authenticator", "Identity", "bearer_token", "identity_headers"]


def bearer_token(authorization: list[str]) -> str | None:
    """The token of a single ``Authorization: Bearer`` header; None when there is none.

    Other schemes are not ours and carry no identity. Two Authorization headers are refused:
    proxies disagree about which one counts, and that disagreement is an attack surface.
    """
    if len(authorization) > 1:
        raise InvalidRequest("more than one Authorization header")
    if not authorization:
        return None
    scheme, _, token = authorization[0].strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


class Authenticator:
    def __init__(self, codec: TokenCodec, store: SessionStore,
                 cache: SessionCache | None = None, config: Config | None = None) -> None:
        self.codec = codec
        self.store = store
        self.cache = cache
        self.config = config

    def cached(self, token: str) -> Identity | None:
        """The cache's answer alone: the hot path, without a coroutine's cost."""
        return self.cache.get(token) if self.cache is not None else None

    async def authenticate(self, token: str | None, *, fresh: bool = False) -> Identity:
        """Raise ``Unauthorized`` unless the token is genuine and its session is live.

        Raises ``StoreUnavailable`` when Redis cannot say: callers fail closed. ``fresh``
        skips the cache, for callers about to change the session.
        """
        if token is None:
            raise Unauthorized("a Bearer token is required")
        cache = self.cache
        if cache is not None and not fresh:
            hit = cache.get(token)
            if hit is not None:
                return hit
        epoch = cache.epoch if cache is not None else 0
        claims = self.codec.verify(token)
        session = await self.store.get(claims.sid)
        if session is None:
            raise Unauthorized("the session has ended (logged out or expired)")
        if session.openid != claims.openid or session.appid != claims.appid:
            raise Unauthorized("token does not match its session")
        app = self.config.app(session.appid) if self.config is not None else None
        if app is not None and (session.platform, session.corpid) != (app.platform, app.corpid):
            # A reload moved the app to another platform or corp: the session's user id is
            # the old one's, and would reach upstreams under the new platform's name.
            raise Unauthorized(f"the session was made on platform {session.platform}"
                               f"{' for corp ' + session.corpid if session.corpid else ''}; "
                               "the app has moved: log in again")
        identity = Identity(claims, session)
        if cache is not None:
            cache.put(token, identity, epoch)
        return identity

    def forget(self, sid: str) -> None:
        """This process just changed the session: drop it now, not when its own
        invalidation message comes back round."""
        if self.cache is not None:
            self.cache.invalidate(sid)


def identity_headers(identity: Identity, config: Config) -> dict[str, str]:
    """The verified identity, as upstreams (and forward-auth callers) receive it."""
    names, session = config.identity_headers, identity.session
    headers = {names.openid: session.openid, names.appid: session.appid}
    if session.unionid:
        headers[names.unionid] = session.unionid
    headers[names.platform] = session.platform  # the app's: checked as the session was read
    if session.corpid:
        headers[names.corpid] = session.corpid
    if session.phone and config.session.store_phone:
        headers[names.phone] = session.phone
    user = session.user
    if user is not None and config.login_hook is not None:  # its names are checked with it
        if user.user_id is not None:
            headers[names.user_id] = user.user_id
        if user.roles:
            headers[names.roles] = ",".join(user.roles)
        for name, value in user.claims:
            headers[CLAIM_PREFIX + name] = value
    return headers
