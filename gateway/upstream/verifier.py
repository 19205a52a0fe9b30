"""Verifying the gateway's signed identity assertion: keys from its JWKS, claims checked."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import jwt


class InvalidAssertion(Exception):
    """The request carries no valid identity assertion."""


@dataclass(frozen=True, slots=True)
class WxIdentity:
    openid: str
    appid: str
    unionid: str | None
    claims: dict[str, Any] = field(repr=False)
    # from the app's login hook, when the gateway has one
    user_id: str | None = None
    roles: tuple[str, ...] = ()
    user_claims: dict[str, str] = field(default_factory=dict)
    # wechat, wecom, qq, douyin or alipay: key users by (appid, openid), never openid alone
    platform: str | None = None
    corpid: str | None = None  # WeCom: the user's corp


class Verifier:
    def __init__(self, jwks_url: str, *, audience: str, issuer: str = "wx-gateway",
                 algorithms: Iterable[str] = ("ES256",), leeway: float = 5.0,
                 jwks_ttl: float = 300.0) -> None:
        self.audience = audience
        self.issuer = issuer
        self.algorithms = list(algorithms)
        self.leeway = leeway
        # cooldown: an unknown kid (a key the gateway just started signing with) is fetched
        # after at most a second, yet forged kids cannot make us hammer the JWKS.
        self._jwks = jwt.PyJWKClient(jwks_url, cache_jwk_set=True, lifespan=int(jwks_ttl),
                                     timeout=5, cooldown_duration=1.0)
        self._keys: dict[str, tuple[Any, float]] = {}
        self._ttl = jwks_ttl

    async def verify(self, assertion: str | None) -> WxIdentity:
        if not assertion:
            raise InvalidAssertion("no identity assertion")
        try:
            kid = jwt.get_unverified_header(assertion).get("kid")
        except jwt.PyJWTError:
            raise InvalidAssertion("the identity assertion is malformed") from None
        if not isinstance(kid, str) or not kid:
            raise InvalidAssertion("the identity assertion names no key")
        key = await self._key(kid)
        try:
            claims = jwt.decode(assertion, key, algorithms=self.algorithms,
                                audience=self.audience, issuer=self.issuer, leeway=self.leeway,
                                options={"require": ["exp", "iat", "iss", "aud", "sub"]})
        except jwt.PyJWTError as exc:
            raise InvalidAssertion(f"the identity assertion is not valid: {exc}") from None
        appid, unionid = claims.get("appid"), claims.get("unionid")
        if not isinstance(appid, str) or not isinstance(claims["sub"], str):
            raise InvalidAssertion("the identity assertion lacks sub or appid")
        user_id, roles, user_claims = (claims.get("user_id"), claims.get("roles"),
                                       claims.get("claims"))
        platform, corpid = claims.get("platform"), claims.get("corpid")
        return WxIdentity(
            claims["sub"], appid, unionid if isinstance(unionid, str) else None, claims,
            user_id if isinstance(user_id, str) else None,
            tuple(r for r in roles if isinstance(r, str)) if isinstance(roles, list) else (),
            ({k: v for k, v in user_claims.items() if isinstance(v, str)}
             if isinstance(user_claims, dict) else {}),
            platform if isinstance(platform, str) else None,
            corpid if isinstance(corpid, str) else None)

    async def _key(self, kid: str) -> Any:
        cached = self._keys.get(kid)
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]
        try:
            # PyJWKClient uses blocking urllib: keep it off the event loop.
            signing = await asyncio.to_thread(self._jwks.get_signing_key, kid)
        except (jwt.PyJWTError, ValueError, OSError) as exc:  # unreachable, not JSON, no keys
            raise InvalidAssertion(f"no usable key {kid!r} in the gateway's JWKS "
                                   f"({type(exc).__name__})") from None
        self._keys[kid] = (signing.key, time.monotonic() + self._ttl)
        return signing.key
