"""Middleware that verifies the assertion on every request: aiohttp and any ASGI app."""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable, MutableMapping

from aiohttp import web

from .verifier import InvalidAssertion, Verifier, WxIdentity

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

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
