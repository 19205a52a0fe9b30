"""The upstream helper: ``gateway.upstream`` mounted in real upstream apps.

Real servers only: the gateway (in-process ``create_app`` on a real socket) in front of an
aiohttp app using ``aiohttp_middleware`` and a Starlette app using ``ASGIMiddleware`` served by
uvicorn in the test's event loop. What is proved:

- through the gateway, handlers see the verified identity (``request[WX_IDENTITY]``,
  ``request.state.wx_identity``), for ES256, RS256 and EdDSA; WebSockets through the gateway too;
- called directly, bypassing the gateway, the upstream answers 401 (JSON, ``WWW-Authenticate``)
  for no assertion, a forged one (another key, with the gateway's kid or its own; ``alg: none``;
  HS256 keyed with the public key), a tampered one, another route's audience, another issuer,
  missing claims, an expiry beyond the leeway; within the leeway it is accepted; a direct
  WebSocket without assertion never reaches its endpoint;
- a genuine assertion captured from the gateway can be replayed directly until it expires (the
  documented model: keep ``ttl`` short), and not after;
- the JWKS is fetched once for many verifications, again for an unknown ``kid`` after a key
  rotation, not once per forged ``kid``; a JWKS endpoint that is down or broken gives 401, not
  500, and verification recovers when it is back.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import hashlib
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
import jwt
import pytest
import yaml
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from conftest import (APPID, WECOM_APPS, WECOM_CORPID, GatewayFactory, Upstream, bearer, login,
                      make_wecom_session, uvicorn_serving)
from gateway import reload as reload_
from gateway.testing.embedded import free_port
from gateway.state import SERVICES
from gateway.upstream import WX_IDENTITY, ASGIMiddleware, Verifier, aiohttp_middleware

HEADER = "X-WX-Assertion"
AUDIENCE = "orders-service"
CHALLENGE = 'Bearer error="invalid_token"'
WAIT = 10.0
KINDS = ("aiohttp", "starlette")


# --- keys ---------------------------------------------------------------------------------------------


def new_key(algorithm: str = "ES256") -> str:
    key: Any
    if algorithm == "ES256":
        key = ec.generate_private_key(ec.SECP256R1())
    elif algorithm == "RS256":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        key = ed25519.Ed25519PrivateKey.generate()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def private(pem: str) -> Any:
    return serialization.load_pem_private_key(pem.encode(), password=None)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def kid_of(pem: str, algorithm: str = "ES256") -> str:
    """The key's RFC 7638 thumbprint, as the gateway names it."""
    jwk = json.loads(jwt.get_algorithm_by_name(algorithm).to_jwk(private(pem).public_key()))
    required = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n"),
                "OKP": ("crv", "kty", "x")}[jwk["kty"]]
    canonical = json.dumps({k: jwk[k] for k in required}, separators=(",", ":"), sort_keys=True)
    return b64url(hashlib.sha256(canonical.encode()).digest())


def claims(openid: str = "o-test-user", **changes: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {"iss": "wx-gateway", "sub": openid, "aud": AUDIENCE, "appid": APPID,
                            "iat": now, "exp": now + 60, "jti": uuid.uuid4().hex}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def sign(body: dict[str, Any], pem: str, kid: str | None, algorithm: str = "ES256") -> str:
    headers = {"kid": kid} if kid is not None else {}
    token: str = jwt.encode(body, private(pem), algorithm=algorithm, headers=headers)
    if kid is None:
        header, rest = token.split(".", 1)
        decoded = json.loads(base64.urlsafe_b64decode(header + "=="))
        decoded.pop("kid", None)
        token = b64url(json.dumps(decoded).encode()) + "." + rest
    return token


def unsigned(header: dict[str, Any], body: dict[str, Any]) -> str:
    return (b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(body).encode()))


def hs256_with(secret: bytes, body: dict[str, Any], kid: str) -> str:
    """Algorithm confusion: an HMAC keyed with something public, built by hand (PyJWT refuses)."""
    signing_input = unsigned({"alg": "HS256", "typ": "JWT", "kid": kid}, body)
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


# --- upstream apps ------------------------------------------------------------------------------------


@dataclass
class Seen:
    """What an upstream's handlers saw: one entry per request that got past the middleware."""

    identities: list[dict[str, Any]] = field(default_factory=list)


def identity_body(identity: Any, path: str) -> dict[str, Any]:
    return {"openid": identity.openid, "appid": identity.appid, "unionid": identity.unionid,
            "platform": identity.platform, "corpid": identity.corpid,
            "aud": identity.claims["aud"], "path": path}


def aiohttp_app(verifier: Verifier, seen: Seen) -> web.Application:
    async def handle(request: web.Request) -> web.StreamResponse:
        body = identity_body(request[WX_IDENTITY], request.path)
        seen.identities.append(body)
        return web.json_response(body)

    app = web.Application(middlewares=[aiohttp_middleware(verifier)])
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def starlette_app(verifier: Verifier, seen: Seen) -> Starlette:
    async def handle(request: Request) -> JSONResponse:
        body = identity_body(request.state.wx_identity, request.url.path)
        seen.identities.append(body)
        return JSONResponse(body)

    async def socket(websocket: WebSocket) -> None:
        body = identity_body(websocket.state.wx_identity, websocket.url.path)
        seen.identities.append(body)
        await websocket.accept()
        await websocket.send_json(body)
        try:
            while True:
                await websocket.send_text(f"echo:{await websocket.receive_text()}")
        except WebSocketDisconnect:
            pass

    return Starlette(routes=[Route("/{path:path}", handle, methods=["GET", "POST"]),
                             WebSocketRoute("/{path:path}", socket)],
                     middleware=[Middleware(ASGIMiddleware, verifier=verifier)])


StartUpstream = Callable[[str, Verifier, int], Awaitable[Seen]]


@pytest.fixture
async def start_upstream(aiohttp_server: Any) -> AsyncIterator[StartUpstream]:
    """``await start_upstream(kind, verifier, port)``: a real server on 127.0.0.1:port."""
    async with contextlib.AsyncExitStack() as servers:
        async def start(kind: str, verifier: Verifier, port: int) -> Seen:
            seen = Seen()
            if kind == "aiohttp":
                await aiohttp_server(aiohttp_app(verifier, seen), port=port)
                return seen
            await servers.enter_async_context(
                uvicorn_serving(starlette_app(verifier, seen), port, lifespan="on"))
            return seen

        yield start


@dataclass
class Stack:
    """The gateway in front of a real upstream app, and what is needed to call either."""

    gw: TestClient
    upstream_url: str
    seen: Seen
    verifier: Verifier
    key: str  # the gateway's signing key (PEM), so the tests can sign what they need
    data: dict[str, Any]  # the gateway's configuration

    @property
    def jwks_url(self) -> str:
        return str(self.gw.make_url("/.well-known/jwks.json"))


MakeStack = Callable[..., Awaitable[Stack]]


@pytest.fixture
def make_stack(make_gateway: GatewayFactory, start_upstream: StartUpstream,
               config_dict: dict[str, Any], upstream: Upstream) -> MakeStack:
    """``await make_stack(kind)``: routes ``/svc/`` → the verifying app (audience
    ``orders-service``), ``/capture/`` → the recording upstream with the same audience (to
    capture genuine assertions), ``/other/`` → the recording upstream with another audience."""

    async def make(kind: str = "aiohttp", *, algorithm: str = "ES256", ttl: str = "60s",
                   key: str | None = None, jwks_url: str | None = None,
                   **verifier_options: Any) -> Stack:
        key = key or new_key(algorithm)
        port = free_port()
        upstream_url = f"http://127.0.0.1:{port}"
        routes = [
            {"path": "/svc/", "upstream": upstream_url, "audience": AUDIENCE, "timeout": "5s"},
            {"path": "/capture/", "upstream": upstream.url, "audience": AUDIENCE},
            {"path": "/other/", "upstream": upstream.url, "audience": "billing-service"},
            {"path": "/public/", "upstream": upstream_url, "auth": "public"},
        ]
        assertion = {"enabled": True, "algorithm": algorithm, "ttl": ttl, "keys": [key]}
        gw = await make_gateway(routes=routes, identity_assertion=assertion)
        data = {**copy.deepcopy(config_dict), "routes": routes, "identity_assertion": assertion}
        verifier_options.setdefault("algorithms", [algorithm])
        verifier = Verifier(jwks_url or str(gw.make_url("/.well-known/jwks.json")),
                            audience=AUDIENCE, **verifier_options)
        seen = await start_upstream(kind, verifier, port)
        return Stack(gw, upstream_url, seen, verifier, key, data)

    return make


async def captured(stack: Stack, upstream: Upstream, token: str, path: str = "/capture/x") -> str:
    """A genuine assertion, as the gateway sent it for this user and path's audience."""
    resp = await stack.gw.get(path, headers=bearer(token))
    assert resp.status == 200, await resp.text()
    values = upstream.last.header(HEADER)
    assert len(values) == 1, upstream.last.headers
    return values[0]


async def direct(url: str, assertion: str | None = None,
                 header: str = HEADER) -> tuple[int, Any, Any]:
    headers = {header: assertion} if assertion is not None else {}
    async with aiohttp.ClientSession() as http:
        async with http.get(url, headers=headers) as resp:
            text = await resp.text()
            try:
                body = json.loads(text)
            except ValueError:
                body = text
            return resp.status, body, resp.headers


async def reply(resp: aiohttp.ClientResponse) -> tuple[int, Any, Any]:
    text = await resp.text()
    try:
        return resp.status, json.loads(text), resp.headers
    except ValueError:
        return resp.status, text, resp.headers


def assert_refused(status: int, body: Any, headers: Any, what: str) -> None:
    assert status == 401, (what, status, body)
    assert isinstance(body, dict) and body.get("error") == "unauthorized", (what, body)
    assert isinstance(body.get("message"), str) and body["message"], (what, body)
    assert headers.get("Content-Type", "").startswith("application/json"), (what, headers)
    assert headers.get("WWW-Authenticate") == CHALLENGE, (what, headers)


async def jwks_fetches(gw: TestClient) -> int:
    """How many times the gateway answered its JWKS (from its own metrics)."""
    resp = await gw.get("/metrics")
    text = await resp.text()
    total = 0.0
    for line in text.splitlines():
        if (line.startswith("wxgw_requests_total{") and 'route="/.well-known/jwks.json"' in line
                and 'status="200"' in line):
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


# --- (1) and (2): real upstream apps behind the real gateway ---------------------------------------


@pytest.mark.parametrize("algorithm", ("ES256", "RS256", "EdDSA"))
async def test_aiohttp_upstream_sees_the_verified_identity(
        make_stack: MakeStack, algorithm: str) -> None:
    stack = await make_stack("aiohttp", algorithm=algorithm)
    user = await login(stack.gw)
    resp = await stack.gw.get("/svc/orders/1", headers=bearer(user["token"]))
    assert resp.status == 200, await resp.text()
    assert await resp.json() == {"openid": user["openid"], "appid": APPID,
                                 "unionid": user["unionid"], "platform": "wechat",
                                 "corpid": None, "aud": AUDIENCE,
                                 "path": "/svc/orders/1"}
    assert stack.seen.identities[-1]["openid"] == user["openid"]

    # A user without unionid: None on the identity.
    lone = await login(stack.gw, code=f"nounionid-{uuid.uuid4().hex[:8]}")
    resp = await stack.gw.post("/svc/orders", headers=bearer(lone["token"]), json={"n": 1})
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["openid"] == lone["openid"] and body["unionid"] is None

    # Without a token the gateway answers itself; on a public route the upstream refuses.
    resp = await stack.gw.get("/svc/orders/1")
    assert resp.status == 401 and (await resp.json())["error"] == "unauthorized"
    resp = await stack.gw.get("/public/x")
    assert_refused(*await reply(resp), "public route")
    assert len(stack.seen.identities) == 2


@pytest.mark.parametrize("kind", ("aiohttp", "starlette"))
async def test_upstreams_see_a_wecom_users_platform_and_corp(
        make_stack: MakeStack, make_gateway: GatewayFactory, redis: Any, key_prefix: str,
        kind: str) -> None:
    stack = await make_stack(kind)
    user = await login(stack.gw)
    await make_wecom_session(redis, key_prefix, user["token"])
    wecom = await make_gateway(apps=WECOM_APPS, routes=stack.data["routes"],
                               identity_assertion=stack.data["identity_assertion"])
    resp = await wecom.get("/svc/orders/1", headers=bearer(user["token"]))
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert (body["openid"], body["appid"]) == (user["openid"], APPID)
    assert (body["platform"], body["corpid"]) == ("wecom", WECOM_CORPID)


async def test_starlette_upstream_sees_the_verified_identity_over_http_and_websocket(
        make_stack: MakeStack) -> None:
    stack = await make_stack("starlette")
    user = await login(stack.gw)
    resp = await stack.gw.get("/svc/orders/7", headers=bearer(user["token"]))
    assert resp.status == 200, await resp.text()
    assert await resp.json() == {"openid": user["openid"], "appid": APPID,
                                 "unionid": user["unionid"], "platform": "wechat",
                                 "corpid": None, "aud": AUDIENCE,
                                 "path": "/svc/orders/7"}

    async with stack.gw.ws_connect("/svc/live", headers=bearer(user["token"])) as ws:
        hello = await asyncio.wait_for(ws.receive_json(), WAIT)
        assert hello["openid"] == user["openid"] and hello["aud"] == AUDIENCE
        await ws.send_str("ping-1")
        msg = await asyncio.wait_for(ws.receive(), WAIT)
        assert msg.type == WSMsgType.TEXT and msg.data == "echo:ping-1"
    assert stack.seen.identities[-1]["path"] == "/svc/live"


async def test_direct_websocket_without_assertion_never_reaches_the_endpoint(
        make_stack: MakeStack) -> None:
    stack = await make_stack("starlette")
    before = len(stack.seen.identities)
    async with aiohttp.ClientSession() as http:
        for headers in ({}, {HEADER: "not-a-jwt"}):
            try:
                async with http.ws_connect(f"{stack.upstream_url}/svc/live",
                                           headers=headers) as ws:
                    msg = await asyncio.wait_for(ws.receive(), WAIT)
                    assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED), msg
                    assert ws.close_code == 1008, ws.close_code
            except aiohttp.WSServerHandshakeError as exc:
                assert exc.status in (401, 403), exc
    assert len(stack.seen.identities) == before


async def test_direct_websocket_without_assertion_is_closed_with_1008(
        make_stack: MakeStack) -> None:
    """As ``ASGIMiddleware`` documents (and the README): the client sees close code 1008."""
    stack = await make_stack("starlette")
    async with aiohttp.ClientSession() as http:
        try:
            async with http.ws_connect(f"{stack.upstream_url}/svc/live") as ws:
                msg = await asyncio.wait_for(ws.receive(), WAIT)
                assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED), msg
                code = ws.close_code
        except aiohttp.WSServerHandshakeError as exc:
            pytest.fail(f"the handshake was refused with HTTP {exc.status} instead: the client "
                        f"never sees close code 1008")
    assert code == 1008


# --- (3) calling the upstream directly ---------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
async def test_direct_calls_without_a_genuine_assertion_are_refused(
        make_stack: MakeStack, upstream: Upstream, kind: str) -> None:
    stack = await make_stack(kind, leeway=5.0)
    user = await login(stack.gw)
    genuine = await captured(stack, upstream, user["token"])
    other_audience = await captured(stack, upstream, user["token"], "/other/x")
    kid = kid_of(stack.key)
    impostor = new_key()
    jwks = (await (await stack.gw.get("/.well-known/jwks.json")).json())
    public = jwt.PyJWK(jwks["keys"][0]).key
    public_pem = public.public_bytes(serialization.Encoding.PEM,
                                     serialization.PublicFormat.SubjectPublicKeyInfo)
    public_der = public.public_bytes(serialization.Encoding.DER,
                                     serialization.PublicFormat.SubjectPublicKeyInfo)
    mine = claims(user["openid"])
    header, payload, signature = genuine.split(".")
    tampered_body = json.loads(base64.urlsafe_b64decode(payload + "=="))
    tampered_body["sub"] = "o-somebody-else"
    now = int(time.time())

    cases: dict[str, str | None] = {
        "no assertion": None,
        "empty assertion": "",
        "not a JWT": "not-a-jwt",
        "three garbage parts": "a.b.c",
        "another key, the gateway's kid": sign(mine, impostor, kid),
        "another key, its own kid": sign(mine, impostor, kid_of(impostor)),
        "another key, no kid": sign(mine, impostor, None),
        "genuine key, no kid": sign(mine, stack.key, None),
        "genuine key, numeric kid": unsigned({"alg": "ES256", "kid": 7}, mine) + ".x",
        "alg none": unsigned({"alg": "none", "typ": "JWT", "kid": kid}, mine) + ".",
        "alg None spelled": unsigned({"alg": "None", "kid": kid}, mine) + ".",
        "HS256 keyed with the public PEM": hs256_with(public_pem, mine, kid),
        "HS256 keyed with the public DER": hs256_with(public_der, mine, kid),
        "HS256 keyed with the JWK": hs256_with(json.dumps(jwks["keys"][0]).encode(), mine, kid),
        "genuine signature, tampered sub": ".".join(
            (header, b64url(json.dumps(tampered_body).encode()), signature)),
        "genuine signature, header says ES384": ".".join(
            (b64url(json.dumps({"alg": "ES384", "kid": kid}).encode()), payload, signature)),
        "another route's audience (replayed)": other_audience,
        "wrong audience": sign(claims(user["openid"], aud="billing-service"), stack.key, kid),
        "audience list without ours": sign(claims(user["openid"], aud=["a", "b"]), stack.key,
                                           kid),
        "wrong issuer": sign(claims(user["openid"], iss="evil-gateway"), stack.key, kid),
        "expired beyond the leeway": sign(claims(user["openid"], iat=now - 120, exp=now - 30),
                                          stack.key, kid),
        "issued in the future": sign(claims(user["openid"], iat=now + 600, exp=now + 660),
                                     stack.key, kid),
        "not yet valid (nbf)": sign(claims(user["openid"], nbf=now + 600), stack.key, kid),
        "no exp": sign(claims(user["openid"], exp=None), stack.key, kid),
        "no iat": sign(claims(user["openid"], iat=None), stack.key, kid),
        "no aud": sign(claims(user["openid"], aud=None), stack.key, kid),
        "no iss": sign(claims(user["openid"], iss=None), stack.key, kid),
        "no sub": sign(claims(user["openid"], sub=None), stack.key, kid),
        "no appid": sign(claims(user["openid"], appid=None), stack.key, kid),
        "numeric sub": sign(claims(user["openid"], sub=12345), stack.key, kid),
    }
    url = f"{stack.upstream_url}/svc/orders"
    wrong: dict[str, Any] = {}
    for what, assertion in cases.items():
        status, body, headers = await direct(url, assertion)
        try:
            assert_refused(status, body, headers, what)
        except AssertionError as exc:
            wrong[what] = exc
    assert not wrong, wrong
    assert stack.seen.identities == []

    # The header in another spelling is not read either (only the configured one counts)...
    status, body, headers = await direct(url, genuine, header="X-WX-OpenID")
    assert_refused(status, body, headers, "assertion under another header")
    # ... while the genuine assertion, and one signed by the gateway's key within the leeway,
    # are accepted.
    for what, assertion in {
            "genuine": genuine,
            "expired within the leeway": sign(claims(user["openid"], iat=now - 62, exp=now - 2),
                                              stack.key, kid)}.items():
        status, body, _ = await direct(url, assertion)
        assert status == 200, (what, body)
        assert body["openid"] == user["openid"], (what, body)


@pytest.mark.parametrize("kind", KINDS)
async def test_captured_assertion_replays_directly_only_until_it_expires(
        make_stack: MakeStack, upstream: Upstream, kind: str) -> None:
    stack = await make_stack(kind, ttl="2s", leeway=0.5)
    user = await login(stack.gw)
    genuine = await captured(stack, upstream, user["token"])
    exp = jwt.decode(genuine, options={"verify_signature": False})["exp"]
    url = f"{stack.upstream_url}/svc/replayed"
    # The documented model: a bearer credential, valid (and replayable) for its short ttl.
    for _ in range(3):
        status, body, _ = await direct(url, genuine)
        assert status == 200, body
        assert body["openid"] == user["openid"]
    await asyncio.sleep(max(0.0, exp + 0.5 + 0.3 - time.time()))
    status, body, headers = await direct(url, genuine)
    assert_refused(status, body, headers, "replayed after exp + leeway")
    # Through the gateway the same user simply gets a fresh one.
    resp = await stack.gw.get("/svc/again", headers=bearer(user["token"]))
    assert resp.status == 200, await resp.text()


# --- (4) the JWKS: caching, rotation, outages -------------------------------------------------------


async def test_jwks_is_fetched_once_for_many_verifications(
        make_stack: MakeStack, upstream: Upstream) -> None:
    stack = await make_stack("aiohttp")
    assert await jwks_fetches(stack.gw) == 0
    users = [await login(stack.gw) for _ in range(3)]
    for i in range(30):
        user = users[i % len(users)]
        resp = await stack.gw.get(f"/svc/n/{i}", headers=bearer(user["token"]))
        assert resp.status == 200, await resp.text()
    genuine = await captured(stack, upstream, users[0]["token"])
    results = await asyncio.gather(*(direct(f"{stack.upstream_url}/svc/d", genuine)
                                     for _ in range(20)))
    assert [status for status, _, _ in results] == [200] * 20
    assert await jwks_fetches(stack.gw) == 1
    assert len(stack.seen.identities) == 50


async def test_forged_kids_do_not_make_the_upstream_hammer_the_jwks(
        make_stack: MakeStack) -> None:
    stack = await make_stack("aiohttp")
    user = await login(stack.gw)
    resp = await stack.gw.get("/svc/warm", headers=bearer(user["token"]))
    assert resp.status == 200
    assert await jwks_fetches(stack.gw) == 1
    for i in range(30):
        impostor = new_key()
        status, body, headers = await direct(f"{stack.upstream_url}/svc/x",
                                             sign(claims(user["openid"]), impostor,
                                                  kid_of(impostor)))
        assert_refused(status, body, headers, f"forged kid #{i}")
    assert await jwks_fetches(stack.gw) <= 2


async def test_unknown_kid_after_a_gateway_key_rotation_is_fetched(
        make_stack: MakeStack, upstream: Upstream, tmp_path: Path) -> None:
    stack = await make_stack("aiohttp")
    old_kid = kid_of(stack.key)
    user = await login(stack.gw)
    resp = await stack.gw.get("/svc/before", headers=bearer(user["token"]))
    assert resp.status == 200, await resp.text()
    before = await captured(stack, upstream, user["token"])
    assert jwt.get_unverified_header(before)["kid"] == old_kid
    assert await jwks_fetches(stack.gw) == 1

    # Some time later the operator rotates (README: add the new key first, reload).
    await asyncio.sleep(2.0)
    new = new_key()
    data = copy.deepcopy(stack.data)
    data["identity_assertion"]["keys"] = [new, stack.key]
    path = tmp_path / "rotated.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        assert reload_.reload(stack.gw.server.app, str(path))
    finally:  # reload() installs the gateway's own log handler: give pytest its own back
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(level)
    assert stack.gw.server.app[SERVICES].current.asserter is not None

    resp = await stack.gw.get("/svc/after", headers=bearer(user["token"]))
    assert resp.status == 200, await resp.text()
    after = await captured(stack, upstream, user["token"])
    assert jwt.get_unverified_header(after)["kid"] == kid_of(new)
    assert await jwks_fetches(stack.gw) == 2
    # Both keys are now known: no further fetch for either.
    for assertion in (before, after, before, after):
        status, body, _ = await direct(f"{stack.upstream_url}/svc/both", assertion)
        assert status == 200, body
    assert await jwks_fetches(stack.gw) == 2


@dataclass
class FakeJwks:
    """A JWKS endpoint in front of the gateway's: relays it, or fails in a chosen way."""

    url: str = ""
    target: str = ""
    mode: str = "relay"
    hits: int = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        if self.mode == "relay":
            async with aiohttp.ClientSession() as http:
                async with http.get(self.target) as resp:
                    return web.Response(status=resp.status, body=await resp.read(),
                                        content_type="application/json")
        if self.mode == "503":
            return web.json_response({"error": "unavailable"}, status=503)
        if self.mode == "html":
            return web.Response(text="<html><body>Bad gateway</body></html>",
                                content_type="text/html")
        if self.mode == "empty":
            return web.json_response({"keys": []})
        if self.mode == "not-a-set":
            return web.json_response({"keys": "nope"})
        if self.mode == "list":
            return web.json_response([1, 2, 3])
        if self.mode == "truncated":
            response = web.StreamResponse(headers={"Content-Type": "application/json",
                                                   "Content-Length": "5000"})
            await response.prepare(request)
            await response.write(b'{"keys": [')
            assert request.transport is not None
            request.transport.abort()
            return response
        raise AssertionError(self.mode)


@pytest.fixture
async def fake_jwks(aiohttp_server: Any) -> FakeJwks:
    fake = FakeJwks()
    app = web.Application()
    app.router.add_get("/jwks.json", fake.handle)
    server = await aiohttp_server(app)
    fake.url = f"http://127.0.0.1:{server.port}/jwks.json"
    return fake


@pytest.mark.parametrize("mode", ("503", "html", "empty", "not-a-set", "list", "truncated"))
async def test_a_broken_jwks_endpoint_gives_401_not_500(
        make_stack: MakeStack, fake_jwks: FakeJwks, mode: str) -> None:
    fake_jwks.mode = mode
    stack = await make_stack("aiohttp", jwks_url=fake_jwks.url)
    fake_jwks.target = stack.jwks_url
    user = await login(stack.gw)
    resp = await stack.gw.get("/svc/x", headers=bearer(user["token"]))
    assert_refused(*await reply(resp), f"JWKS {mode}")
    assert fake_jwks.hits >= 1
    assert stack.seen.identities == []

    # Once the JWKS is served again, verification recovers.
    fake_jwks.mode = "relay"
    resp = await stack.gw.get("/svc/y", headers=bearer(user["token"]))
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["openid"] == user["openid"]


@pytest.mark.parametrize("kind", KINDS)
async def test_jwks_endpoint_down_gives_401(make_stack: MakeStack, make_gateway: GatewayFactory,
                                            kind: str) -> None:
    # Nobody listens there.
    stack = await make_stack(kind, jwks_url=f"http://127.0.0.1:{free_port()}/jwks.json")
    user = await login(stack.gw)
    resp = await stack.gw.get("/svc/x", headers=bearer(user["token"]))
    assert_refused(*await reply(resp), "JWKS connection refused")
    status, body, headers = await direct(f"{stack.upstream_url}/svc/x",
                                         sign(claims(user["openid"]), stack.key,
                                              kid_of(stack.key)))
    assert_refused(status, body, headers, "direct, JWKS connection refused")

    # A gateway with assertions off answers its JWKS with 404.
    disabled = await make_gateway()
    stack = await make_stack(kind, jwks_url=str(disabled.make_url("/.well-known/jwks.json")))
    user = await login(stack.gw)
    resp = await stack.gw.get("/svc/x", headers=bearer(user["token"]))
    assert_refused(*await reply(resp), "JWKS 404")
    assert stack.seen.identities == []
