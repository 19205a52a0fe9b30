"""Signed identity assertions: a short-lived JWT per session and audience, for upstreams that
can be reached other than through the gateway and so must not trust plain headers.

Signed with the first of ``identity_assertion.keys`` (ES256, RS256 or EdDSA); every listed
key is published at ``/.well-known/jwks.json`` under its RFC 7638 thumbprint as ``kid``, so
an old key stays verifiable while it is listed. A signed assertion is reused for its session
and audience until shortly before it expires, so signing costs nothing per request.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import jwt
from jwt.algorithms import get_default_algorithms

from .keys import PrivateKey
from .sessions import Session, UserData

_REUSE_MARGIN = 0.2  # re-sign once less than this share of the lifetime is left


def public_jwk(key: PrivateKey, algorithm: str) -> dict[str, Any]:
    jwk: dict[str, Any] = json.loads(
        get_default_algorithms()[algorithm].to_jwk(key.public_key()))
    # RFC 7638 thumbprint: the required members, sorted, no whitespace.
    required = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n"),
                "OKP": ("crv", "kty", "x")}[jwk["kty"]]
    canonical = json.dumps({k: jwk[k] for k in required}, separators=(",", ":"),
                           sort_keys=True)
    kid = base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=")
    return {**jwk, "kid": kid.decode(), "alg": algorithm, "use": "sig"}


@dataclass
class Asserter:
    algorithm: str
    keys: tuple[PrivateKey, ...]
    issuer: str
    ttl: float
    size: int = 100_000
    _published: list[dict[str, Any]] = field(init=False)
    _retired: list[tuple[dict[str, Any], float]] = field(init=False, default_factory=list)
    _kid: str = field(init=False)
    _issued: OrderedDict[tuple[str, str], tuple[str, float, UserData | None]] = field(
        init=False)

    def __post_init__(self) -> None:
        self._published = [public_jwk(key, self.algorithm) for key in self.keys]
        self._kid = self._published[0]["kid"]
        self._issued = OrderedDict()

    @property
    def jwks(self) -> dict[str, Any]:
        now = time.time()
        self._retired = [(jwk, until) for jwk, until in self._retired if until > now]
        return {"keys": self._published + [jwk for jwk, _ in self._retired]}

    def succeed(self, previous: Asserter) -> None:
        """Keep publishing the keys a reload dropped until what they signed has expired."""
        kids = {jwk["kid"] for jwk in self._published}
        until = time.time() + previous.ttl
        earlier = {jwk["kid"]: end for jwk, end in previous._retired}
        # A key retired before keeps its own deadline; one this reload drops gets a new one.
        self._retired = [(jwk, earlier.get(jwk["kid"], until)) for jwk in previous.jwks["keys"]
                         if jwk["kid"] not in kids]

    def assertion(self, session: Session, audience: str) -> str:
        now = time.time()
        key = (session.sid, audience)
        cached = self._issued.get(key)
        # a refreshed login hook answer (new roles) is signed anew at once
        if (cached is not None and cached[1] - now > self.ttl * _REUSE_MARGIN
                and cached[2] == session.user):
            self._issued.move_to_end(key)
            return cached[0]
        expires = min(now + self.ttl, float(session.expires_at))
        claims: dict[str, Any] = {
            "iss": self.issuer, "sub": session.openid, "aud": audience,
            "appid": session.appid, "iat": int(now), "exp": int(expires),
            "jti": secrets.token_urlsafe(12)}
        if session.unionid:
            claims["unionid"] = session.unionid
        # an openid means nothing without its platform: a Douyin openid is not a WeChat one
        claims["platform"] = session.platform
        if session.corpid:
            claims["corpid"] = session.corpid
        user = session.user
        if user is not None:
            if user.user_id is not None:
                claims["user_id"] = user.user_id
            claims["roles"] = list(user.roles)
            claims["claims"] = dict(user.claims)
        token = jwt.encode(claims, self.keys[0], algorithm=self.algorithm,
                           headers={"kid": self._kid})
        self._issued[key] = (token, expires, session.user)
        while len(self._issued) > self.size:
            self._issued.popitem(last=False)
        return token
