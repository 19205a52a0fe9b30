"""Signed identity assertions: ``identity_assertion`` and the JWKS.

What is proved here:

- a request forwarded with an identity carries ``X-WX-Assertion``, a JWT that verifies with the
  key the gateway publishes at ``/.well-known/jwks.json`` (fetched and turned into a key with
  ``jwt.PyJWK``, as any upstream would): ``iss`` (configured), ``sub`` = openid, ``aud`` = the
  route's upstream origin or its ``audience``, ``appid``, ``unionid`` only when the user has one,
  ``iat``, ``exp`` = ``iat`` + ``ttl`` (never past the session's end), ``jti``; the header's
  ``alg`` is the configured one and its ``kid`` the key's RFC 7638 thumbprint (recomputed here
  from the key's numbers); for ES256, RS256 and EdDSA alike;
- the JWKS holds ``kid``, ``alg``, ``use: sig`` and public members only;
- public routes and anonymous optional requests carry no assertion; a client's own copy, in any
  spelling (case, ``_`` for ``-``, over a raw socket), never reaches an upstream, on any route,
  also when assertions are disabled or the header is renamed;
- one assertion per session and audience, reused across requests (never re-signed per
  request), a new one once less than a fifth of its lifetime is left;
- disabled: no header, and the JWKS is 404 ``not_found``;
- configuration mistakes are refused under their key path;
- keys as file paths; rotation: the first key signs, all are published; a real process
  reloaded (SIGHUP) without a key keeps publishing it for ``ttl``, then drops it;
- WebSocket upgrades carry the assertion too.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import aiohttp
import jwt
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from conftest import (APPID, WECOM_APPS, WECOM_CORPID, GatewayFactory, Served, Upstream,
                      base_config, bearer, login, make_wecom_session)
from gateway import loader
from gateway.testing.embedded import EmbeddedRedis
from gateway.errors import ConfigError
from process import Launch
from rawhttp import raw_request

HEADER = "X-WX-Assertion"
FORGED = "forged.assertion.value"
ALGORITHMS = ("ES256", "RS256", "EdDSA")
REQUIRED_CLAIMS = ["iss", "sub", "aud", "iat", "exp", "jti"]
PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")
WAIT = 10.0


# --- keys and their independently computed thumbprints -----------------------------------------


def pem(key: Any) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def new_key(algorithm: str) -> str:
    """A fresh unencrypted PKCS8 PEM private key for ``algorithm``."""
    if algorithm == "ES256":
        return pem(ec.generate_private_key(ec.SECP256R1()))
    if algorithm == "RS256":
        return pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    if algorithm == "EdDSA":
        return pem(ed25519.Ed25519PrivateKey.generate())
    raise AssertionError(algorithm)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def uint(n: int, length: int | None = None) -> bytes:
    return n.to_bytes(length or max(1, (n.bit_length() + 7) // 8), "big")


def public_members(private_pem: str) -> dict[str, str]:
    """The JWK members RFC 7638 hashes, computed from the key's numbers (not from a JWK)."""
    key = serialization.load_pem_private_key(private_pem.encode(), password=None)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        numbers = key.public_key().public_numbers()
        return {"crv": "P-256", "kty": "EC", "x": b64url(uint(numbers.x, 32)),
                "y": b64url(uint(numbers.y, 32))}
    if isinstance(key, rsa.RSAPrivateKey):
        rnumbers = key.public_key().public_numbers()
        return {"e": b64url(uint(rnumbers.e)), "kty": "RSA", "n": b64url(uint(rnumbers.n))}
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.public_key().public_bytes(serialization.Encoding.Raw,
                                            serialization.PublicFormat.Raw)
        return {"crv": "Ed25519", "kty": "OKP", "x": b64url(raw)}
    raise AssertionError(type(key))


def thumbprint_of_members(members: dict[str, str]) -> str:
    # RFC 7638 §3: the required members in lexicographic order, no whitespace, UTF-8.
    canonical = "{" + ",".join(f'"{k}":"{members[k]}"' for k in sorted(members)) + "}"
    return b64url(hashlib.sha256(canonical.encode()).digest())


def thumbprint(private_pem: str) -> str:
    return thumbprint_of_members(public_members(private_pem))


def test_thumbprint_helper_matches_rfc7638_example() -> None:
    """The test's own thumbprint function, checked against RFC 7638 §3.1."""
    n = ("0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_"
         "BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0"
         "_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTW"
         "hAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw")
    assert (thumbprint_of_members({"e": "AQAB", "kty": "RSA", "n": n})
            == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs")


_KEYS: dict[str, str] = {}


def key_for(algorithm: str) -> str:
    """One key per algorithm for the whole module (RSA generation is slow)."""
    if algorithm not in _KEYS:
        _KEYS[algorithm] = new_key(algorithm)
    return _KEYS[algorithm]


def assertion_config(algorithm: str = "ES256", keys: list[str] | None = None,
                     **extra: Any) -> dict[str, Any]:
    return {"enabled": True, "algorithm": algorithm,
            "keys": keys if keys is not None else [key_for(algorithm)], **extra}


# --- verifying what the upstream received ------------------------------------------------------


async def fetch_jwks(client: TestClient) -> dict[str, Any]:
    resp = await client.get("/.well-known/jwks.json")
    assert resp.status == 200, await resp.text()
    assert resp.headers["Content-Type"].startswith("application/json")
    body: dict[str, Any] = await resp.json()
    return body


def jwk_for(jwks: dict[str, Any], kid: str) -> dict[str, Any]:
    found = [k for k in jwks["keys"] if k.get("kid") == kid]
    assert len(found) == 1, (kid, jwks)
    return found[0]


def verify(token: str, jwks: dict[str, Any], *, algorithm: str, audience: str,
           issuer: str = "wx-gateway", **options: Any) -> dict[str, Any]:
    """Verify as an upstream would: the key by ``kid`` from the JWKS, the algorithm pinned."""
    kid = jwt.get_unverified_header(token)["kid"]
    key = jwt.PyJWK(jwk_for(jwks, kid))
    claims: dict[str, Any] = jwt.decode(token, key.key, algorithms=[algorithm], audience=audience,
                                        issuer=issuer,
                                        options={"require": REQUIRED_CLAIMS, **options})
    return claims


def spelled_like(name: str, wanted: str = HEADER) -> bool:
    return name.strip().lower().replace("_", "-") == wanted.lower()


def assertions_in(headers: list[tuple[str, str]], wanted: str = HEADER) -> list[str]:
    """Every value of a header an upstream framework could read as ``wanted``."""
    return [v for k, v in headers if spelled_like(k, wanted)]


async def get_assertion(client: TestClient, upstream: Upstream, path: str, token: str) -> str:
    resp = await client.get(path, headers=bearer(token))
    assert resp.status == 200, await resp.text()
    found = assertions_in(upstream.last.headers)
    assert len(found) == 1, upstream.last.headers
    return found[0]


# --- the assertion and the JWKS ------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
async def test_assertion_verifies_with_the_published_jwks(
        make_gateway: GatewayFactory, upstream: Upstream, algorithm: str) -> None:
    key = key_for(algorithm)
    gw = await make_gateway(identity_assertion=assertion_config(algorithm))
    user = await login(gw)
    before = time.time()
    token = await get_assertion(gw, upstream, "/api/orders", user["token"])
    after = time.time()
    # The plain identity headers are still there alongside it.
    assert upstream.last.header("X-WX-OpenID") == [user["openid"]]

    jwks = await fetch_jwks(gw)
    assert len(jwks["keys"]) == 1
    jwk = jwks["keys"][0]
    members = public_members(key)
    assert {k: jwk[k] for k in members} == members  # the public numbers, exactly
    assert jwk["kid"] == thumbprint(key)
    assert jwk["alg"] == algorithm and jwk["use"] == "sig"
    assert not set(PRIVATE_MEMBERS) & set(jwk), jwk
    assert set(jwk) <= {*members, "kid", "alg", "use", "key_ops"}, jwk
    assert jwk.get("key_ops", ["verify"]) == ["verify"]  # if present, consistent with "sig"

    header = jwt.get_unverified_header(token)
    assert header["alg"] == algorithm
    assert header["kid"] == jwk["kid"]

    claims = verify(token, jwks, algorithm=algorithm, audience=upstream.url)
    assert claims["iss"] == "wx-gateway"
    assert claims["sub"] == user["openid"]
    assert claims["aud"] == upstream.url  # the route's upstream origin, "http://127.0.0.1:port"
    assert claims["appid"] == APPID
    assert user["unionid"] and claims["unionid"] == user["unionid"]
    assert int(before) <= claims["iat"] <= after
    assert claims["exp"] == claims["iat"] + 60
    assert isinstance(claims["jti"], str) and len(claims["jti"]) >= 16

    # The algorithm is the configured one only: the same token is refused under any other.
    other = next(a for a in ALGORITHMS if a != algorithm)
    with pytest.raises(jwt.InvalidAlgorithmError):
        jwt.decode(token, jwt.PyJWK(jwk).key, algorithms=[other], audience=upstream.url)
    # And it really is a signature over the content: another key of the same kind refuses it.
    impostor = jwt.PyJWK(json.loads(jwt.get_algorithm_by_name(algorithm).to_jwk(
        serialization.load_pem_private_key(new_key(algorithm).encode(), None).public_key())))
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(token, impostor.key, algorithms=[algorithm], audience=upstream.url)


async def test_jwks_head_and_caching_headers(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(identity_assertion=assertion_config())
    resp = await gw.get("/.well-known/jwks.json")
    assert resp.status == 200
    assert resp.headers["Content-Type"].replace(" ", "").lower() == "application/json;charset=utf-8"
    assert "Cache-Control" in resp.headers
    head = await gw.head("/.well-known/jwks.json")
    assert head.status == 200
    post = await gw.post("/.well-known/jwks.json")
    assert post.status == 405


async def test_unionid_claim_only_when_the_user_has_one(
        make_gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = await make_gateway(identity_assertion=assertion_config())
    jwks = await fetch_jwks(gw)
    without = await login(gw, code=f"nounionid-{uuid.uuid4().hex[:8]}")
    assert without["unionid"] is None
    claims = verify(await get_assertion(gw, upstream, "/api/a", without["token"]), jwks,
                    algorithm="ES256", audience=upstream.url)
    assert claims["sub"] == without["openid"]
    assert "unionid" not in claims

    with_union = await login(gw)
    claims = verify(await get_assertion(gw, upstream, "/api/a", with_union["token"]), jwks,
                    algorithm="ES256", audience=upstream.url)
    assert claims["unionid"] == with_union["unionid"]


async def test_platform_claim_always_corpid_claim_for_a_wecom_user(
        make_gateway: GatewayFactory, upstream: Upstream, redis: Any, key_prefix: str) -> None:
    gw = await make_gateway(identity_assertion=assertion_config())
    user = await login(gw)
    claims = verify(await get_assertion(gw, upstream, "/api/a", user["token"]),
                    await fetch_jwks(gw), algorithm="ES256", audience=upstream.url)
    assert claims["platform"] == "wechat" and "corpid" not in claims

    await make_wecom_session(redis, key_prefix, user["token"])
    wecom = await make_gateway(apps=WECOM_APPS, identity_assertion=assertion_config())
    claims = verify(await get_assertion(wecom, upstream, "/api/a", user["token"]),
                    await fetch_jwks(wecom), algorithm="ES256", audience=upstream.url)
    assert (claims["sub"], claims["appid"]) == (user["openid"], APPID)
    assert (claims["platform"], claims["corpid"]) == ("wecom", WECOM_CORPID)


async def test_route_audience_issuer_and_ttl_are_configurable(
        make_gateway: GatewayFactory, upstream: Upstream, config_dict: dict[str, Any]) -> None:
    routes = copy.deepcopy(config_dict["routes"])
    routes.append({"path": "/orders/", "upstream": f"{upstream.url}/base",
                   "audience": "orders-service"})
    gw = await make_gateway(routes=routes, identity_assertion=assertion_config(
        issuer="https://gw.example.com", ttl="30s"))
    jwks = await fetch_jwks(gw)
    user = await login(gw)

    token = await get_assertion(gw, upstream, "/orders/1", user["token"])
    assert upstream.last.raw_path == "/base/orders/1"
    claims = verify(token, jwks, algorithm="ES256", audience="orders-service",
                    issuer="https://gw.example.com")
    assert claims["aud"] == "orders-service"
    assert claims["exp"] == claims["iat"] + 30

    # A route without audience: the upstream's origin (scheme://host:port, no path).
    token = await get_assertion(gw, upstream, "/api/1", user["token"])
    assert verify(token, jwks, algorithm="ES256", audience=upstream.url,
                  issuer="https://gw.example.com")["aud"] == upstream.url
    with pytest.raises(jwt.InvalidAudienceError):
        verify(token, jwks, algorithm="ES256", audience="orders-service",
               issuer="https://gw.example.com")


async def test_assertion_never_outlives_the_session(
        make_gateway: GatewayFactory, upstream: Upstream, config_dict: dict[str, Any]) -> None:
    session = {**config_dict["session"], "ttl": "20s"}
    gw = await make_gateway(session=session, identity_assertion=assertion_config(ttl="60s"))
    user = await login(gw)
    resp = await gw.get("/auth/session", headers=bearer(user["token"]))
    expires_at = (await resp.json())["expires_at"]
    token = await get_assertion(gw, upstream, "/api/x", user["token"])
    claims = verify(token, await fetch_jwks(gw), algorithm="ES256", audience=upstream.url)
    assert claims["exp"] <= expires_at
    assert claims["exp"] - claims["iat"] <= 20


async def test_public_routes_and_anonymous_requests_carry_no_assertion(
        make_gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = await make_gateway(identity_assertion=assertion_config())
    user = await login(gw)
    cases: list[tuple[str, dict[str, str], bool]] = [
        ("/public/x", {}, False),
        ("/public/x", bearer(user["token"]), False),  # public: a token is not even looked at
        ("/maybe/x", {}, False),
        ("/maybe/x", bearer("not-a-valid-token"), False),  # optional: invalid → anonymous
        ("/maybe/x", bearer(user["token"]), True),
        ("/api/x", bearer(user["token"]), True),
    ]
    for path, headers, expected in cases:
        resp = await gw.get(path, headers=headers)
        assert resp.status == 200, (path, await resp.text())
        found = assertions_in(upstream.last.headers)
        assert len(found) == (1 if expected else 0), (path, headers, upstream.last.headers)


SPELLINGS = ("X-WX-Assertion", "x-wx-assertion", "X-WX-ASSERTION", "X_WX_Assertion",
             "x_wx_assertion", "X-Wx_assertion")


async def test_client_sent_assertions_are_stripped_on_every_route(
        make_gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = await make_gateway(identity_assertion=assertion_config())
    jwks = await fetch_jwks(gw)
    user = await login(gw)
    forged = [(name, f"{FORGED}-{i}") for i, name in enumerate(SPELLINGS)]
    for path, token in (("/public/p", None), ("/maybe/m", None), ("/maybe/m", user["token"]),
                        ("/api/a", user["token"]), ("/public/p", user["token"])):
        auth = [("Authorization", f"Bearer {token}")] if token else []
        before = len(upstream.seen)
        resp = await raw_request(gw, "GET", path, [*auth, *forged])
        assert resp.status == 200, (path, resp.body)
        assert len(upstream.seen) == before + 1
        seen = upstream.last.headers
        assert not [v for _, v in seen if FORGED in v], (path, seen)
        found = assertions_in(seen)
        if token is None or path.startswith("/public/"):
            assert found == [], (path, seen)
        else:
            assert len(found) == 1, (path, seen)
            assert verify(found[0], jwks, algorithm="ES256",
                          audience=upstream.url)["sub"] == user["openid"]


async def test_client_copies_are_stripped_when_disabled_and_when_renamed(
        make_gateway: GatewayFactory, upstream: Upstream) -> None:
    # Disabled: nothing is added, and a client's copy still never passes.
    gw = await make_gateway()
    user = await login(gw)
    resp = await raw_request(gw, "GET", "/api/x", [("Authorization", f"Bearer {user['token']}"),
                                                   *[(n, FORGED) for n in SPELLINGS]])
    assert resp.status == 200, resp.body
    assert assertions_in(upstream.last.headers) == []
    assert not [v for _, v in upstream.last.headers if FORGED in v]

    # Renamed: the configured name is the one that is sent and stripped.
    gw = await make_gateway(identity_assertion=assertion_config(header="X-Identity-Proof"))
    user = await login(gw)
    resp = await raw_request(gw, "GET", "/api/x", [
        ("Authorization", f"Bearer {user['token']}"), ("x_identity_proof", FORGED),
        ("X-IDENTITY-PROOF", FORGED)])
    assert resp.status == 200, resp.body
    found = assertions_in(upstream.last.headers, "X-Identity-Proof")
    assert len(found) == 1 and FORGED not in found[0]
    assert verify(found[0], await fetch_jwks(gw), algorithm="ES256",
                  audience=upstream.url)["sub"] == user["openid"]
    assert assertions_in(upstream.last.headers) == []  # not also under the default name


async def test_one_assertion_per_session_and_audience_reused_across_requests(
        make_gateway: GatewayFactory, upstream: Upstream, config_dict: dict[str, Any]) -> None:
    routes = copy.deepcopy(config_dict["routes"])
    routes.append({"path": "/orders/", "upstream": upstream.url, "audience": "orders"})
    routes.append({"path": "/billing/", "upstream": upstream.url, "audience": "billing"})
    gw = await make_gateway(routes=routes, identity_assertion=assertion_config())
    jwks = await fetch_jwks(gw)
    alice, bob = await login(gw), await login(gw)

    first = await get_assertion(gw, upstream, "/api/a", alice["token"])
    # Same session, same audience (also through another route with the same upstream origin):
    # the very same token, not a re-signed one (ECDSA signatures and jti are random).
    for path in ["/api/b", "/maybe/c", *[f"/api/{i}" for i in range(20)]]:
        assert await get_assertion(gw, upstream, path, alice["token"]) == first

    orders = await get_assertion(gw, upstream, "/orders/1", alice["token"])
    billing = await get_assertion(gw, upstream, "/billing/1", alice["token"])
    assert len({first, orders, billing}) == 3
    assert verify(orders, jwks, algorithm="ES256", audience="orders")["aud"] == "orders"
    assert verify(billing, jwks, algorithm="ES256", audience="billing")["aud"] == "billing"
    assert await get_assertion(gw, upstream, "/orders/2", alice["token"]) == orders
    assert await get_assertion(gw, upstream, "/billing/2", alice["token"]) == billing

    # Another session gets its own.
    other = await get_assertion(gw, upstream, "/api/a", bob["token"])
    assert other != first
    assert verify(other, jwks, algorithm="ES256", audience=upstream.url)["sub"] == bob["openid"]
    assert await get_assertion(gw, upstream, "/api/a", alice["token"]) == first


async def test_a_new_assertion_is_minted_when_the_old_nears_its_expiry(
        make_gateway: GatewayFactory, upstream: Upstream) -> None:
    ttl = 3.0  # reused while more than a fifth (0.6 s) of it is left
    gw = await make_gateway(identity_assertion=assertion_config(ttl="3s"))
    jwks = await fetch_jwks(gw)
    user = await login(gw)
    started = time.time()
    first = await get_assertion(gw, upstream, "/api/a", user["token"])
    await asyncio.sleep(max(0.0, started + 1.5 - time.time()))  # 1.5 s left: still reused
    assert await get_assertion(gw, upstream, "/api/a", user["token"]) == first
    await asyncio.sleep(max(0.0, started + 2.75 - time.time()))  # ≤ 0.25 s left: a new one
    second = await get_assertion(gw, upstream, "/api/a", user["token"])
    assert second != first
    old, new = (verify(t, jwks, algorithm="ES256", audience=upstream.url,
                       verify_exp=False) for t in (first, second))
    assert new["jti"] != old["jti"]
    assert new["exp"] > old["exp"] and new["exp"] == new["iat"] + int(ttl)
    verify(second, jwks, algorithm="ES256", audience=upstream.url)  # valid now
    # ... and that one is then reused in turn.
    assert await get_assertion(gw, upstream, "/api/a", user["token"]) == second


async def test_disabled_sends_no_assertion_and_jwks_is_not_found(
        make_gateway: GatewayFactory, upstream: Upstream) -> None:
    for overrides in ({}, {"identity_assertion": {"enabled": False}},
                      {"identity_assertion": {"enabled": False, "keys": [key_for("ES256")]}}):
        gw = await make_gateway(**overrides)
        user = await login(gw)
        resp = await gw.get("/api/x", headers=bearer(user["token"]))
        assert resp.status == 200
        assert assertions_in(upstream.last.headers) == []
        assert upstream.last.header("X-WX-OpenID") == [user["openid"]]
        resp = await gw.get("/.well-known/jwks.json")
        assert resp.status == 404
        assert resp.headers["Content-Type"].startswith("application/json")
        body = await resp.json()
        assert body["error"] == "not_found" and body["message"], body


# --- configuration ---------------------------------------------------------------------------------


def _config(assertion: Any, **top: Any) -> dict[str, Any]:
    data = base_config("redis://127.0.0.1:6379/0", "wxgw-test:", "http://127.0.0.1:1",
                       "http://127.0.0.1:9000")
    data["identity_assertion"] = assertion
    data.update(top)
    return data


def _problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        loader.parse(data, environ={})
    return info.value.problems


def _encrypted_key() -> str:
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase")).decode()


GARBAGE_PEM = "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5IGF0IGFsbA==\n-----END PRIVATE KEY-----\n"

CONFIG_ERRORS: list[tuple[str, Callable[[], Any], dict[str, Any], str]] = [
    ("enabled without keys", lambda: {"enabled": True}, {}, "identity_assertion.keys"),
    ("enabled with an empty key list", lambda: {"enabled": True, "keys": []}, {},
     "identity_assertion.keys"),
    ("garbage PEM", lambda: assertion_config(keys=[GARBAGE_PEM]), {},
     "identity_assertion.keys[0]"),
    ("encrypted PEM", lambda: assertion_config(keys=[_encrypted_key()]), {},
     "identity_assertion.keys[0]"),
    ("RSA key for ES256", lambda: assertion_config("ES256", keys=[key_for("RS256")]), {},
     "identity_assertion.keys[0]"),
    ("P-384 key for ES256",
     lambda: assertion_config("ES256", keys=[pem(ec.generate_private_key(ec.SECP384R1()))]), {},
     "identity_assertion.keys[0]"),
    ("Ed25519 key for ES256", lambda: assertion_config("ES256", keys=[key_for("EdDSA")]), {},
     "identity_assertion.keys[0]"),
    ("P-256 key for EdDSA", lambda: assertion_config("EdDSA", keys=[key_for("ES256")]), {},
     "identity_assertion.keys[0]"),
    ("P-256 key for RS256", lambda: assertion_config("RS256", keys=[key_for("ES256")]), {},
     "identity_assertion.keys[0]"),
    ("1024-bit RSA", lambda: assertion_config("RS256", keys=[pem(rsa.generate_private_key(
        public_exponent=65537, key_size=1024))]), {}, "identity_assertion.keys[0]"),
    ("second key wrong", lambda: assertion_config(
        "ES256", keys=[key_for("ES256"), key_for("EdDSA")]), {}, "identity_assertion.keys[1]"),
    ("missing key file", lambda: assertion_config(keys=["/nonexistent/assertion-key.pem"]), {},
     "identity_assertion.keys[0]"),
    ("unknown algorithm HS256", lambda: assertion_config("HS256", keys=[key_for("ES256")]), {},
     "identity_assertion.algorithm"),
    ("unknown algorithm none", lambda: assertion_config("none", keys=[key_for("ES256")]), {},
     "identity_assertion.algorithm"),
    ("algorithm in the wrong case", lambda: assertion_config("es256", keys=[key_for("ES256")]),
     {}, "identity_assertion.algorithm"),
    ("header is the openid header", lambda: assertion_config(header="X-WX-OpenID"), {},
     "identity_assertion.header"),
    ("header is the appid header in another case", lambda: assertion_config(header="x-wx-appid"),
     {}, "identity_assertion.header"),
    ("header is a renamed identity header", lambda: assertion_config(header="X-User"),
     {"identity_headers": {"openid": "X-User"}}, "identity_assertion.header"),
    ("header is Authorization", lambda: assertion_config(header="Authorization"), {},
     "identity_assertion.header"),
    ("header is Host", lambda: assertion_config(header="host"), {}, "identity_assertion.header"),
    ("header is X-Request-ID", lambda: assertion_config(header="X-Request-ID"), {},
     "identity_assertion.header"),
    ("header is X-Forwarded-For", lambda: assertion_config(header="X-Forwarded-For"), {},
     "identity_assertion.header"),
    ("header is not a header name", lambda: assertion_config(header="X WX Assertion"), {},
     "identity_assertion.header"),
    ("ttl of zero", lambda: assertion_config(ttl="0s"), {}, "identity_assertion.ttl"),
    ("unknown key", lambda: {**assertion_config(), "secret": "x"}, {},
     "identity_assertion.secret"),
]


@pytest.mark.parametrize(("assertion", "top", "key"), [c[1:] for c in CONFIG_ERRORS],
                         ids=[c[0] for c in CONFIG_ERRORS])
def test_configuration_mistakes_are_named(assertion: Callable[[], Any], top: dict[str, Any],
                                          key: str) -> None:
    problems = _problems(_config(assertion(), **top))
    assert [p for p in problems if p.startswith(f"{key}: ")], problems
    # Nothing outside the section is blamed.
    assert all(p.startswith("identity_assertion") for p in problems), problems


def test_one_bad_key_is_one_problem_line() -> None:
    """As every configuration error: one ``key.path: message`` line per problem. A key that is
    given but unusable is one problem (under ``keys[i]``), not also "no key at all"."""
    for keys in ([GARBAGE_PEM], [key_for("RS256")], ["/nonexistent/assertion-key.pem"]):
        problems = _problems(_config(assertion_config("ES256", keys=keys)))
        assert problems == [p for p in problems if p.startswith("identity_assertion.keys[0]: ")], \
            problems


def test_private_key_text_never_appears_in_problems() -> None:
    key = key_for("RS256")
    problems = _problems(_config(assertion_config("ES256", keys=[key])))
    body = "".join(key.strip().splitlines()[1:-1])
    assert not any(body[i:i + 16] in "".join(problems) for i in range(0, len(body) - 16, 16))


def test_valid_configurations_parse() -> None:
    for algorithm in ALGORITHMS:
        config = loader.parse(_config(assertion_config(algorithm)), environ={})
        assert config.identity_assertion.enabled
        assert config.identity_assertion.algorithm == algorithm
        assert config.identity_assertion.header == HEADER
        assert config.identity_assertion.ttl == 60.0
        assert config.identity_assertion.issuer == "wx-gateway"
    default = loader.parse(_config(None), environ={})
    assert not default.identity_assertion.enabled


async def test_keys_given_as_file_paths(make_gateway: GatewayFactory, upstream: Upstream,
                                        tmp_path: Path) -> None:
    first, second = new_key("ES256"), new_key("ES256")
    (tmp_path / "first.pem").write_text(first)
    (tmp_path / "second.pem").write_text(second)
    gw = await make_gateway(identity_assertion=assertion_config(
        keys=[str(tmp_path / "first.pem"), str(tmp_path / "second.pem")]))
    jwks = await fetch_jwks(gw)
    assert [k["kid"] for k in jwks["keys"]] == [thumbprint(first), thumbprint(second)]
    user = await login(gw)
    token = await get_assertion(gw, upstream, "/api/x", user["token"])
    assert jwt.get_unverified_header(token)["kid"] == thumbprint(first)
    assert verify(token, jwks, algorithm="ES256", audience=upstream.url)["sub"] == user["openid"]


@pytest.mark.parametrize("algorithm", ALGORITHMS)
async def test_rotation_first_key_signs_every_key_is_published(
        make_gateway: GatewayFactory, upstream: Upstream, algorithm: str) -> None:
    new, old = new_key(algorithm), key_for(algorithm)
    gw = await make_gateway(identity_assertion=assertion_config(algorithm, keys=[new, old]))
    jwks = await fetch_jwks(gw)
    assert [k["kid"] for k in jwks["keys"]] == [thumbprint(new), thumbprint(old)]
    assert all(k["alg"] == algorithm and k["use"] == "sig" for k in jwks["keys"])
    user = await login(gw)
    token = await get_assertion(gw, upstream, "/api/x", user["token"])
    assert jwt.get_unverified_header(token)["kid"] == thumbprint(new)
    verify(token, jwks, algorithm=algorithm, audience=upstream.url)
    # What the old key signed (before the rotation) still verifies against the published set.
    now = int(time.time())
    signed_by_old = jwt.encode(
        {"iss": "wx-gateway", "sub": user["openid"], "aud": upstream.url, "appid": APPID,
         "iat": now, "exp": now + 30, "jti": "x" * 16},
        serialization.load_pem_private_key(old.encode(), None), algorithm=algorithm,
        headers={"kid": thumbprint(old)})
    verify(signed_by_old, jwks, algorithm=algorithm, audience=upstream.url)


# --- a real process, reloaded ----------------------------------------------------------------------


async def test_sighup_dropped_key_stays_published_for_ttl_then_goes(
        launch: Launch, redis_server: EmbeddedRedis, wechat: TestServer,
        upstream: Upstream) -> None:
    new, old = new_key("ES256"), new_key("ES256")
    data = base_config(redis_server.url, f"wxgw-assert-{uuid.uuid4().hex[:8]}:",
                       f"http://127.0.0.1:{wechat.port}", upstream.url)
    data["identity_assertion"] = assertion_config(keys=[new, old], ttl="2s")
    gw = await launch(data, healthy_within=WAIT, graceful_stop=True)
    async with aiohttp.ClientSession() as http:
        await gw.wait_healthy(http)

        async def jwks() -> dict[str, Any]:
            async with http.get(f"{gw.url}/.well-known/jwks.json") as resp:
                assert resp.status == 200, await resp.text()
                body: dict[str, Any] = await resp.json()
                return body

        async def kids() -> list[str]:
            return [k["kid"] for k in (await jwks())["keys"]]

        async with http.post(f"{gw.url}/auth/login", json={"code": "rotating-user"}) as resp:
            assert resp.status == 200, await resp.text()
            user = await resp.json()
        async with http.get(f"{gw.url}/api/x", headers=bearer(user["token"])) as resp:
            assert resp.status == 200, await resp.text()
        [before] = assertions_in(upstream.last.headers)
        assert jwt.get_unverified_header(before)["kid"] == thumbprint(new)
        assert await kids() == [thumbprint(new), thumbprint(old)]

        # What OLD signed before the reload, with its full ttl still ahead.
        now = int(time.time())
        by_old = jwt.encode({"iss": "wx-gateway", "sub": user["openid"], "aud": upstream.url,
                             "appid": APPID, "iat": now, "exp": now + 5, "jti": "o" * 16},
                            serialization.load_pem_private_key(old.encode(), None),
                            algorithm="ES256", headers={"kid": thumbprint(old)})

        data["identity_assertion"] = assertion_config(keys=[new], ttl="2s")
        gw.rewrite({**data, "listen": f"127.0.0.1:{gw.port}"})
        gw.hup()
        await gw.wait_for_line(lambda line: "configuration reloaded" in line, within=WAIT)
        reloaded = time.time()

        # Right after the reload, and a second later: OLD is still published and what it
        # signed still verifies; NEW signs.
        for _ in range(2):
            published = await jwks()
            assert [k["kid"] for k in published["keys"]] == [thumbprint(new), thumbprint(old)]
            verify(by_old, published, algorithm="ES256", audience=upstream.url)
            async with http.get(f"{gw.url}/api/y", headers=bearer(user["token"])) as resp:
                assert resp.status == 200, await resp.text()
            [after] = assertions_in(upstream.last.headers)
            assert jwt.get_unverified_header(after)["kid"] == thumbprint(new)
            verify(after, published, algorithm="ES256", audience=upstream.url)
            await asyncio.sleep(max(0.0, reloaded + 1.0 - time.time()))

        # Once ttl has passed since the reload, OLD is gone; NEW stays.
        await asyncio.sleep(max(0.0, reloaded + 2.3 - time.time()))
        assert await kids() == [thumbprint(new)]
        assert gw.proc.returncode is None


# --- WebSocket -------------------------------------------------------------------------------------


@dataclass
class WsUpstream(Served):
    handshakes: list[list[tuple[str, str]]] = field(default_factory=list)

    @classmethod
    async def serve(cls, aiohttp_server: Any) -> WsUpstream:
        """An upstream recording each handshake's headers and echoing text frames."""
        up = cls()
        app = web.Application()
        app.router.add_get("/{tail:.*}", up.handle)
        up.server = await aiohttp_server(app)
        return up

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.handshakes.append([(k.decode("latin-1"), v.decode("latin-1"))
                                for k, v in request.raw_headers])
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return web.json_response({"plain": True})
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await ws.send_str(f"echo:{msg.data}")
        return ws


async def test_websocket_upgrades_carry_the_assertion(
        make_gateway: GatewayFactory, upstream: Upstream, aiohttp_server: Any,
        config_dict: dict[str, Any]) -> None:
    ws_up = await WsUpstream.serve(aiohttp_server)
    routes = copy.deepcopy(config_dict["routes"])
    routes.append({"path": "/ws/", "upstream": ws_up.url, "auth": "required"})
    routes.append({"path": "/live/", "upstream": ws_up.url, "auth": "public"})
    gw = await make_gateway(routes=routes, identity_assertion=assertion_config())
    jwks = await fetch_jwks(gw)
    user = await login(gw)

    async with gw.ws_connect("/ws/echo", headers={**bearer(user["token"]),
                                                  "X_WX_Assertion": FORGED,
                                                  "x-wx-assertion": FORGED}) as ws:
        await ws.send_str("hi")
        msg = await asyncio.wait_for(ws.receive(), WAIT)
        assert msg.type == WSMsgType.TEXT and msg.data == "echo:hi"
    handshake = ws_up.handshakes[-1]
    found = assertions_in(handshake)
    assert len(found) == 1 and FORGED not in found[0], handshake
    claims = verify(found[0], jwks, algorithm="ES256", audience=ws_up.url)
    assert claims["sub"] == user["openid"] and claims["appid"] == APPID

    # The same session and audience over plain HTTP: the same assertion.
    plain = await gw.get("/ws/plain", headers=bearer(user["token"]))
    assert plain.status == 200, await plain.text()
    assert assertions_in(ws_up.handshakes[-1]) == found

    # A public WebSocket route: none, and the client's copy is still stripped.
    async with gw.ws_connect("/live/echo", headers={**bearer(user["token"]),
                                                    "X-WX-Assertion": FORGED}) as ws:
        await ws.send_str("x")
        await asyncio.wait_for(ws.receive(), WAIT)
    assert assertions_in(ws_up.handshakes[-1]) == []
