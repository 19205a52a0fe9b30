"""Session tokens: forged, altered and misplaced tokens are refused; signing-key rotation."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
import warnings
from typing import Any, Callable

import jwt
import pytest
from aiohttp.test_utils import TestClient
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from multidict import CIMultiDict

from checks import expect_error
from conftest import (APPID, APPID2, OLD_SIGNING_KEY, SECRET, SECRET2, SIGNING_KEY,
                      GatewayFactory, Upstream, bearer, claims_of, login)
from gateway import sessions as sessions_
from gateway.keys import Keyring
from rawhttp import raw_request

KEYRING = Keyring(signing_keys=(SIGNING_KEY.encode(),))
KID, KEY = KEYRING.current_kid, KEYRING.current_key
OTHER_KEY = b"another-signing-key-that-is-32-bytes-or-more!"
OTHER_KID = Keyring((OTHER_KEY,)).current_kid
OLD_KID = Keyring((OLD_SIGNING_KEY.encode(),)).current_kid

REQUIRED = "/api/orders"
SESSION = "/auth/session"
TARGETS = [REQUIRED, SESSION, "/auth/verify"]


async def expect_unauthorized(resp: Any) -> None:
    await expect_error(resp, 401, "unauthorized")
    assert resp.headers.get("WWW-Authenticate") == "Bearer"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(header: dict[str, Any], payload: dict[str, Any], signature: str = "") -> str:
    return ".".join([b64url(json.dumps(header).encode()), b64url(json.dumps(payload).encode()),
                     signature])


def raw_hs256(header: dict[str, Any], payload: dict[str, Any], key: bytes = KEY) -> str:
    """An HS256 JWS built by hand, for headers PyJWT will not produce."""
    signing_input = unsigned(header, payload).rstrip(".")
    mac = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


def sign(payload: dict[str, Any], key: Any = KEY, alg: str = "HS256",
         kid: Any = KID) -> str:
    headers = {} if kid is None else {"kid": kid}
    return jwt.encode(payload, key, algorithm=alg, headers=headers)


def without(d: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k != key}


def tamper_payload(token: str, **changes: Any) -> str:
    header, _, signature = token.split(".")
    payload = {**claims_of(token), **changes}
    return ".".join([header, b64url(json.dumps(payload).encode()), signature])


def raw_hs_alg(alg: str, payload: dict[str, Any]) -> str:
    """HS384/HS512 under the right key (PyJWT warns about the key length, so by hand)."""
    digest = {"HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    signing_input = unsigned({"alg": alg, "typ": "JWT", "kid": KID}, payload).rstrip(".")
    mac = hmac.new(KEY, signing_input.encode(), digest).digest()
    return f"{signing_input}.{b64url(mac)}"


def rsa_pem() -> Any:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def ec_pem() -> Any:
    return ec.generate_private_key(ec.SECP256R1())


# Each builds a token from a real live session's token and claims; all must be refused.
Forge = Callable[[str, dict[str, Any]], str]
FORGERIES: dict[str, Forge] = {
    "alg-none": lambda t, c: jwt.encode(c, None, algorithm="none", headers={"kid": KID}),
    "alg-none-with-signature": lambda t, c: unsigned({"alg": "none", "typ": "JWT", "kid": KID}, c,
                                                     t.split(".")[2]),
    "alg-None-capitalised": lambda t, c: unsigned({"alg": "None", "kid": KID}, c),
    "alg-missing": lambda t, c: unsigned({"typ": "JWT", "kid": KID}, c, t.split(".")[2]),
    "HS512-right-key": lambda t, c: raw_hs_alg("HS512", c),
    "HS384-right-key": lambda t, c: raw_hs_alg("HS384", c),
    "HS256-other-key-right-kid": lambda t, c: sign(c, key=OTHER_KEY),
    "HS256-other-key-no-kid": lambda t, c: sign(c, key=OTHER_KEY, kid=None),
    "HS256-other-key-own-kid": lambda t, c: sign(c, key=OTHER_KEY, kid=OTHER_KID),
    "HS256-right-key-no-kid": lambda t, c: sign(c, kid=None),
    "kid-unknown": lambda t, c: sign(c, kid="unknown-kid"),
    "kid-number": lambda t, c: raw_hs256({"alg": "HS256", "typ": "JWT", "kid": 12345}, c),
    "kid-list": lambda t, c: raw_hs256({"alg": "HS256", "typ": "JWT", "kid": [KID]}, c),
    "kid-empty": lambda t, c: sign(c, kid=""),
    "RS256-right-kid": lambda t, c: sign(c, key=rsa_pem(), alg="RS256"),
    "ES256-right-kid": lambda t, c: sign(c, key=ec_pem(), alg="ES256"),
    "RS256-no-kid": lambda t, c: sign(c, key=rsa_pem(), alg="RS256", kid=None),
    "HS256-keyed-with-kid": lambda t, c: sign(c, key=KID.encode() * 4),
    "payload-sub-changed-signature-kept": lambda t, c: tamper_payload(t, sub="o-someone-else"),
    "payload-exp-extended-signature-kept": lambda t, c: tamper_payload(t, exp=c["exp"] + 86400),
    "payload-aud-changed-signature-kept": lambda t, c: tamper_payload(t, aud=APPID2),
    "signature-stripped": lambda t, c: t.rsplit(".", 1)[0] + ".",
    "signature-flipped": lambda t, c: t[:-4] + ("AAAA" if t[-4:] != "AAAA" else "BBBB"),
    "expired": lambda t, c: sign({**c, "exp": int(time.time()) - 5}),
    "exp-missing": lambda t, c: sign(without(c, "exp")),
    "exp-not-a-number": lambda t, c: sign({**c, "exp": "tomorrow"}),
    "sid-missing": lambda t, c: sign(without(c, "sid")),
    "sid-number": lambda t, c: sign({**c, "sid": 12345}),
    "sid-empty": lambda t, c: sign({**c, "sid": ""}),
    "sid-unknown": lambda t, c: sign({**c, "sid": uuid.uuid4().hex}),
    "sub-missing": lambda t, c: sign(without(c, "sub")),
    "sub-other-user-same-sid": lambda t, c: sign({**c, "sub": "o-someone-else"}),
    "sub-empty": lambda t, c: sign({**c, "sub": ""}),
    "aud-missing": lambda t, c: sign(without(c, "aud")),
    "aud-unknown-appid": lambda t, c: sign({**c, "aud": "wxnotconfigured0000"}),
    "aud-other-app": lambda t, c: sign({**c, "aud": APPID2}),
    "aud-list": lambda t, c: sign({**c, "aud": [c["aud"]]}),
    "aud-list-two": lambda t, c: sign({**c, "aud": [c["aud"], APPID2]}),
    "payload-not-object": lambda t, c: unsigned({"alg": "HS256", "kid": KID}, c).rstrip(".")
    + "." + t.split(".")[2],
    "header-not-object": lambda t, c: ".".join([b64url(b"[1]")] + t.split(".")[1:]),
    "over-4096-chars": lambda t, c: sign({**c, "pad": "x" * 4200}),
}


@pytest.fixture
async def live(gw: TestClient) -> tuple[str, dict[str, Any]]:
    """A real session: its token and the token's claims."""
    data = await login(gw)
    return data["token"], claims_of(data["token"])


async def test_right_key_forgery_with_true_claims_is_accepted(
        gw: TestClient, upstream: Upstream, live: tuple[str, dict[str, Any]]) -> None:
    """Control: the helpers make tokens the gateway accepts, so each refusal below is due to
    the one thing that forgery changes."""
    token, claims = live
    forged = sign(dict(claims))
    for target in TARGETS:
        resp = await gw.get(target, headers=bearer(forged))
        assert resp.status == 200, (target, await resp.text())
    assert upstream.last.header("X-WX-OpenID") == [claims["sub"]]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", list(FORGERIES))
async def test_forged_token_is_refused(gw: TestClient, upstream: Upstream,
                                       live: tuple[str, dict[str, Any]], name: str,
                                       target: str) -> None:
    token, claims = live
    forged = FORGERIES[name](token, dict(claims))
    assert forged != token
    resp = await gw.get(target, headers=bearer(forged))
    await expect_unauthorized(resp)
    assert upstream.seen == []
    # the genuine token still works: the refusal was about the forgery
    resp = await gw.get(target, headers=bearer(token))
    assert resp.status == 200


async def test_token_just_under_4096_chars_is_accepted(
        gw: TestClient, live: tuple[str, dict[str, Any]]) -> None:
    _, claims = live
    base = len(sign({**claims, "pad": ""}))
    pad = 4096 - base
    token = sign({**claims, "pad": "x" * pad})
    while len(token) > 4096:
        pad -= 1
        token = sign({**claims, "pad": "x" * pad})
    assert 4090 <= len(token) <= 4096
    resp = await gw.get(SESSION, headers=bearer(token))
    assert resp.status == 200, await resp.text()


async def test_token_of_another_sessions_user_is_refused(gw: TestClient) -> None:
    """Signed claims that mix one session's sid with another user's openid are refused."""
    a = claims_of((await login(gw))["token"])
    b = claims_of((await login(gw))["token"])
    resp = await gw.get(SESSION, headers=bearer(sign({**a, "sub": b["sub"]})))
    await expect_unauthorized(resp)


async def test_aud_of_other_configured_app_with_session_of_first_is_refused(
        make_gateway: GatewayFactory) -> None:
    gw2 = await make_gateway(apps=[{"appid": APPID, "secret": SECRET},
                                   {"appid": APPID2, "secret": SECRET2}])
    data = await login(gw2, appid=APPID)
    claims = claims_of(data["token"])
    resp = await gw2.get(SESSION, headers=bearer(sign({**claims, "aud": APPID2})))
    await expect_unauthorized(resp)
    resp = await gw2.get(SESSION, headers=bearer(data["token"]))
    assert resp.status == 200


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("authorization", [
    "garbage",
    "a.b.c",
    "..",
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.x",
    "eyJhbGciOiJIUzI1NiJ9",
    "x" * 5000,
    "null",
    "{}",
], ids=["word", "three-parts", "dots", "truncated-jwt", "header-only", "5000-chars", "null",
        "braces"])
async def test_garbage_bearer_token_is_refused(gw: TestClient, upstream: Upstream, target: str,
                                               authorization: str) -> None:
    resp = await gw.get(target, headers=bearer(authorization))
    await expect_unauthorized(resp)
    assert upstream.seen == []


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("make_header", [
    lambda t: "Bearer",
    lambda t: "Bearer ",
    lambda t: "Bearer     ",
    lambda t: f"Token {t}",
    lambda t: "Basic " + base64.b64encode(b"user:pass").decode(),
    lambda t: f"Basic {t}",
    lambda t: t,
    lambda t: f"Bearer{t}",
    lambda t: f"JWT {t}",
    lambda t: "",
], ids=["bearer-only", "bearer-space", "bearer-spaces", "token-scheme", "basic", "basic-token",
        "bare-token", "no-space", "jwt-scheme", "empty"])
async def test_missing_or_wrong_scheme_is_refused(
        gw: TestClient, upstream: Upstream, live: tuple[str, dict[str, Any]], target: str,
        make_header: Callable[[str], str]) -> None:
    token, _ = live
    resp = await gw.get(target, headers={"Authorization": make_header(token)})
    await expect_unauthorized(resp)
    assert upstream.seen == []


@pytest.mark.parametrize("route,status", [("/api/x", 401), ("/maybe/x", 200)])
async def test_undecodable_authorization_bytes_are_an_invalid_token(
        gw: TestClient, upstream: Upstream, route: str, status: int) -> None:
    resp = await raw_request(gw, "GET", route, [("Authorization", b"Bearer \xff\xfe\x80")])
    assert resp.status == status, resp.body
    if status == 401:
        assert resp.json()["error"] == "unauthorized"
    else:
        assert not [v for k, v in upstream.last.headers if k.lower() == "x-wx-openid"]


@pytest.mark.parametrize("target", TARGETS)
async def test_no_authorization_header_is_refused(gw: TestClient, upstream: Upstream,
                                                  target: str) -> None:
    await expect_unauthorized(await gw.get(target))
    assert upstream.seen == []


@pytest.mark.parametrize("target", TARGETS)
async def test_scheme_is_case_insensitive(gw: TestClient, live: tuple[str, dict[str, Any]],
                                          target: str) -> None:
    token, _ = live
    resp = await gw.get(target, headers={"Authorization": f"bearer {token}"})
    assert resp.status == 200


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("param", ["access_token", "token", "jwt"])
async def test_token_in_query_string_is_not_accepted(
        gw: TestClient, upstream: Upstream, live: tuple[str, dict[str, Any]], target: str,
        param: str) -> None:
    token, _ = live
    resp = await gw.get(f"{target}?{param}={token}")
    await expect_unauthorized(resp)
    assert upstream.seen == []


@pytest.mark.parametrize("target", TARGETS)
async def test_token_in_cookie_or_other_header_is_not_accepted(
        gw: TestClient, upstream: Upstream, live: tuple[str, dict[str, Any]],
        target: str) -> None:
    token, _ = live
    resp = await gw.get(target, headers={"Cookie": f"access_token={token}",
                                         "X-Access-Token": token,
                                         "Proxy-Authorization": f"Bearer {token}"})
    await expect_unauthorized(resp)
    assert upstream.seen == []


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("second", ["same", "garbage", "other-session"])
async def test_two_authorization_headers_are_invalid_request(
        gw: TestClient, upstream: Upstream, live: tuple[str, dict[str, Any]], target: str,
        second: str) -> None:
    token, _ = live
    other = {"same": token, "garbage": "garbage",
             "other-session": (await login(gw))["token"]}[second]
    headers = CIMultiDict([("Authorization", f"Bearer {token}"),
                           ("Authorization", f"Bearer {other}")])
    await expect_error(await gw.get(target, headers=headers), 400, "invalid_request")
    assert upstream.seen == []


async def test_token_of_a_gateway_with_another_key_is_refused(
        gw: TestClient, make_gateway: GatewayFactory) -> None:
    """Same Redis, same prefix, different signing key: its tokens are not ours."""
    other = await make_gateway(session={"signing_keys": [OTHER_KEY.decode()], "ttl": "1h"})
    data = await login(other)
    resp = await other.get(SESSION, headers=bearer(data["token"]))
    assert resp.status == 200
    await expect_unauthorized(await gw.get(SESSION, headers=bearer(data["token"])))


# --- rotation -----------------------------------------------------------------------------------

def keys(*names: str) -> dict[str, Any]:
    return {"signing_keys": list(names), "ttl": "1h"}


async def test_key_rotation(make_gateway: GatewayFactory, upstream: Upstream) -> None:
    old = await make_gateway(session=keys(OLD_SIGNING_KEY))
    rotated = await make_gateway(session=keys(SIGNING_KEY, OLD_SIGNING_KEY))
    new_only = await make_gateway(session=keys(SIGNING_KEY))

    data = await login(old)
    old_token = data["token"]
    assert jwt.get_unverified_header(old_token)["kid"] == OLD_KID
    sid = claims_of(old_token)["sid"]

    # the old token keeps working after rotation: endpoints and proxied routes
    resp = await rotated.get(SESSION, headers=bearer(old_token))
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["openid"] == data["openid"]
    resp = await rotated.get(REQUIRED, headers=bearer(old_token))
    assert resp.status == 200
    assert upstream.last.header("X-WX-OpenID") == [data["openid"]]

    # tokens the rotated gateway mints carry the new key's kid
    resp = await rotated.post("/auth/refresh", headers=bearer(old_token))
    assert resp.status == 200, await resp.text()
    refreshed = (await resp.json())["token"]
    assert jwt.get_unverified_header(refreshed)["kid"] == KID != OLD_KID
    assert claims_of(refreshed)["sid"] == sid
    jwt.decode(refreshed, SIGNING_KEY.encode(), algorithms=["HS256"], audience=APPID)
    fresh = (await login(rotated))["token"]
    assert jwt.get_unverified_header(fresh)["kid"] == KID

    # a gateway that dropped the old key refuses the old token, not the new ones
    await expect_unauthorized(await new_only.get(SESSION, headers=bearer(old_token)))
    await expect_unauthorized(await new_only.get(REQUIRED, headers=bearer(old_token)))
    assert (await new_only.get(SESSION, headers=bearer(refreshed))).status == 200
    assert (await new_only.get(SESSION, headers=bearer(fresh))).status == 200
    # and the old gateway does not know the new key
    await expect_unauthorized(await old.get(SESSION, headers=bearer(fresh)))


async def test_session_key_sealed_under_old_key_is_readable_after_rotation(
        make_gateway: GatewayFactory, redis: Any, key_prefix: str) -> None:
    old = await make_gateway(session=keys(OLD_SIGNING_KEY))
    code = f"rot-{uuid.uuid4().hex[:10]}"
    data = await login(old, code)
    sid = claims_of(data["token"])["sid"]
    plaintext = base64.b64encode(
        hashlib.sha256(f"sk/{APPID}/{code}".encode()).digest()[:16]).decode().encode()

    sealed = await redis.hget(f"{key_prefix}session:{sid}", sessions_.SESSION_KEY)
    assert sealed.startswith(base64.urlsafe_b64decode(OLD_KID))  # the raw key id leads

    rotated_ring = Keyring((SIGNING_KEY.encode(), OLD_SIGNING_KEY.encode()))
    store = sessions_.SessionStore(redis, key_prefix, rotated_ring)
    session = await store.get(sid)
    assert session is not None and session.openid == data["openid"]
    assert await store.session_key(session) == plaintext

    # with the old key gone, it can no longer be opened
    dropped = sessions_.SessionStore(redis, key_prefix, Keyring((SIGNING_KEY.encode(),)))
    with pytest.raises(ValueError):
        await dropped.session_key(session)

    # a session created after rotation is sealed under the new key
    rotated = await make_gateway(session=keys(SIGNING_KEY, OLD_SIGNING_KEY))
    code2 = f"rot-{uuid.uuid4().hex[:10]}"
    data2 = await login(rotated, code2)
    sid2 = claims_of(data2["token"])["sid"]
    sealed2 = await redis.hget(f"{key_prefix}session:{sid2}", sessions_.SESSION_KEY)
    assert sealed2.startswith(base64.urlsafe_b64decode(KID))
    session2 = await store.get(sid2)
    assert session2 is not None
    assert await store.session_key(session2) == base64.b64encode(
        hashlib.sha256(f"sk/{APPID}/{code2}".encode()).digest()[:16]).decode().encode()



def test_hand_built_tokens_are_genuine_signatures() -> None:
    """The hand-built HS tokens are valid for their own algorithm under the right key, so the
    gateway refusing them proves the algorithm pin (not a broken signature)."""
    payload = {"sid": "s", "sub": "o", "aud": APPID, "iat": 1, "exp": 2}
    token = raw_hs256({"alg": "HS256", "typ": "JWT", "kid": KID}, payload)
    assert jwt.decode(token, KEY, algorithms=["HS256"], audience=APPID,
                      options={"verify_exp": False})["sid"] == "s"
    for alg in ("HS384", "HS512"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            decoded = jwt.decode(raw_hs_alg(alg, payload), KEY, algorithms=[alg],
                                 audience=APPID, options={"verify_exp": False})
        assert decoded["sid"] == "s"
