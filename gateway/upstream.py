"""For upstreams: verify the gateway's signed identity assertion (``identity_assertion``).

An upstream that can be reached other than through the gateway must not trust plain
``X-WX-OpenID`` headers; it mounts one of these instead and reads a verified identity::

    # aiohttp
    from gateway.upstream import Verifier, aiohttp_middleware, WX_IDENTITY
    verifier = Verifier("https://gw.example.com/.well-known/jwks.json",
                        audience="http://orders:9000")
    app = web.Application(middlewares=[aiohttp_middleware(verifier)])
    # in a handler: request[WX_IDENTITY].openid

    # Starlette / FastAPI (any ASGI app)
    app.add_middleware(ASGIMiddleware, verifier=verifier)
    # in an endpoint: request.state.wx_identity.openid

Keys come from the gateway's JWKS (fetched with PyJWT's ``PyJWKClient``, cached, fetched
again for an unknown ``kid``); algorithms are pinned; audience and issuer are required;
clock skew is bounded by ``leeway``. Anything else is answered 401.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable, MutableMapping

import jwt
from aiohttp import web

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class InvalidAssertion(Exception):
    """The request carries no valid identity assertion."""


@dataclass(frozen=True, slots=True)
class WxIdentity:
    openid: str
    appid: str
    unionid: str | None
    claims: dict[str, Any] = field(repr=False)


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
        return WxIdentity(claims["sub"], appid, unionid if isinstance(unionid, str) else None,
                          claims)

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


WX_IDENTITY = web.RequestKey("wx_identity", WxIdentity)
_CHALLENGE = 'Bearer error="invalid_token"'


def aiohttp_middleware(verifier: Verifier, header: str = "X-WX-Assertion") -> Any:
    @web.middleware
    async def verify_assertion(request: web.Request,
                               handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                               ) -> web.StreamResponse:
        try:
            request[WX_IDENTITY] = await verifier.verify(request.headers.get(header))
        except InvalidAssertion as exc:
            return web.json_response({"error": "unauthorized", "message": str(exc)},
                                     status=401, headers={"WWW-Authenticate": _CHALLENGE})
        return await handler(request)
    return verify_assertion


class ASGIMiddleware:
    """Puts the verified identity at ``scope["state"]["wx_identity"]`` (Starlette's
    ``request.state.wx_identity``); answers 401 (HTTP) or closes with 1008 (WebSocket)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], verifier: Verifier,
                 header: str = "X-WX-Assertion") -> None:
        self.app = app
        self.verifier = verifier
        self.header = header.lower().encode("latin-1")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        value = next((v.decode("latin-1") for k, v in scope.get("headers", ())
                      if k.lower() == self.header), None)
        try:
            identity = await self.verifier.verify(value)
        except InvalidAssertion as exc:
            await _refuse(scope, receive, send, str(exc))
            return
        scope.setdefault("state", {})["wx_identity"] = identity
        await self.app(scope, receive, send)


async def _refuse(scope: Scope, receive: Receive, send: Send, message: str) -> None:
    if scope["type"] == "websocket":
        # Closing before accepting would make the server answer a bare 403; accept, then
        # close with 1008 (policy violation) so the client learns why.
        if (await receive())["type"] == "websocket.connect":
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.close", "code": 1008, "reason": message[:120]})
        return
    body = json.dumps({"error": "unauthorized", "message": message}).encode()
    await send({"type": "http.response.start", "status": 401, "headers": [
        (b"content-type", b"application/json; charset=utf-8"),
        (b"www-authenticate", _CHALLENGE.encode()),
        (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
