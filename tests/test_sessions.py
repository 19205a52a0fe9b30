"""Sessions: what lands in Redis, /auth/session, /auth/logout, /auth/refresh, /auth/verify,
expiry, and failing closed when Redis is gone."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
import uuid
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

import checks
from conftest import (APPID, SIGNING_KEY, GatewayFactory, Upstream, bearer, claims_of,
                      closed_port_url, fresh, login)
from gateway.testing import simulator
from gateway.testing.embedded import EmbeddedRedis
from gateway.keys import Keyring
from gateway import sessions as S
from gateway.sessions import Session, SessionStore

TTL = 3600  # conftest's session.ttl ("1h")
KEYRING = Keyring((SIGNING_KEY.encode(),))


def wechat_session_key(appid: str, code: str) -> str:
    """What the simulator hands out as session_key for this app and code."""
    return base64.b64encode(hashlib.sha256(f"sk/{appid}/{code}".encode()).digest()[:16]).decode()


def sid_of(token: str) -> str:
    return str(claims_of(token)["sid"])


async def expect_error(resp: Any, status: int, code: str) -> dict[str, Any]:
    """The JSON error (checks.py), and a 401 asks for a Bearer token."""
    body = await checks.expect_error(resp, status, code)
    if status == 401:
        assert resp.headers.get("WWW-Authenticate") == "Bearer"
    return body


def user_key(prefix: str, sid: str) -> str:
    """The index of the user's sessions: the sid starts with the user's hash tag."""
    return f"{prefix}user:{sid[:sid.index('}') + 1]}"


# --- Redis contents -----------------------------------------------------------------------------

async def test_session_hash_in_redis(gw: TestClient, redis: Any, key_prefix: str) -> None:
    code = fresh()
    before = int(time.time())
    data = await login(gw, code)
    after = int(time.time())
    sid = sid_of(data["token"])
    key = f"{key_prefix}session:{sid}"

    # the session and its user's index of sessions, nothing else
    assert sorted(k.decode() for k in await redis.keys(f"{key_prefix}*")) == [
        key, user_key(key_prefix, sid)]
    assert await redis.zrange(user_key(key_prefix, sid), 0, -1, withscores=True) == [
        (sid.encode(), float(claims_of(data["token"])["exp"]))]
    assert await redis.type(key) == b"hash"
    raw = {k.decode(): v for k, v in (await redis.hgetall(key)).items()}
    assert set(raw) == {S.OPENID, S.UNIONID, S.APPID, S.CREATED_AT, S.EXPIRES_AT, S.SESSION_KEY}
    fields = {k: v.decode() for k, v in raw.items() if k != S.SESSION_KEY}  # that one is binary
    assert fields[S.OPENID] == data["openid"] == simulator.openid_for(APPID, code)
    assert fields[S.UNIONID] == data["unionid"] == simulator.unionid_for(code)
    assert fields[S.APPID] == APPID
    assert before <= int(fields[S.CREATED_AT]) <= after
    assert int(fields[S.EXPIRES_AT]) == int(fields[S.CREATED_AT]) + TTL
    assert int(fields[S.EXPIRES_AT]) == claims_of(data["token"])["exp"]
    assert TTL - 5 <= await redis.ttl(key) <= TTL
    assert abs(time.time() + await redis.ttl(key) - int(fields[S.EXPIRES_AT])) <= 2
    # One-letter fields and a binary sealed key keep a session in the compact encoding.
    assert await redis.object("encoding", key) in (b"ziplist", b"listpack")
    assert await redis.memory_usage(key) <= 320
    # the index: one more small key per user (a listpack sorted set). MEMORY USAGE counts the
    # allocator's size classes, which moved it from ~140 to 171 bytes once in a full run on the
    # shared server; a skiplist sorted set would be well over 200.
    assert await redis.object("encoding", user_key(key_prefix, sid)) in (b"ziplist", b"listpack")
    assert await redis.memory_usage(user_key(key_prefix, sid)) <= 200


async def test_every_key_written_starts_with_the_prefix(
        make_gateway: GatewayFactory, redis: Any, redis_server: EmbeddedRedis) -> None:
    prefix = f"custom-{uuid.uuid4().hex[:6]}|"
    gw2 = await make_gateway(redis={"url": redis_server.url, "key_prefix": prefix})
    before = {k for k in await redis.keys("*")}
    data = await login(gw2)
    written = {k for k in await redis.keys("*")} - before
    sid = sid_of(data["token"])
    assert written == {f"{prefix}session:{sid}".encode(), user_key(prefix, sid).encode()}


async def test_user_without_unionid_is_stored_without_one(
        gw: TestClient, redis: Any, key_prefix: str) -> None:
    data = await login(gw, fresh("nounionid-"))
    key = f"{key_prefix}session:{sid_of(data['token'])}"
    assert await redis.hget(key, S.UNIONID) in (None, b"")
    resp = await gw.get("/auth/session", headers=bearer(data["token"]))
    assert (await resp.json())["unionid"] is None


async def test_session_key_is_sealed_at_rest(gw: TestClient, redis: Any, key_prefix: str) -> None:
    code = fresh()
    data = await login(gw, code)
    sid = sid_of(data["token"])
    plain = wechat_session_key(APPID, code)
    raw_plain = base64.b64decode(plain)

    dump = await redis.hgetall(f"{key_prefix}session:{sid}")
    sealed = dump[S.SESSION_KEY.encode()]
    assert sealed != plain.encode()
    for field_name, value in dump.items():  # in no field, in no common encoding
        for needle in (plain.encode(), raw_plain, raw_plain.hex().encode(),
                       base64.urlsafe_b64encode(raw_plain)):
            assert needle not in value, field_name

    store = SessionStore(redis, key_prefix, KEYRING)
    session = await store.get(sid)
    assert session is not None
    assert await store.session_key(session) == plain.encode()


async def test_two_sessions_seal_differently(gw: TestClient, redis: Any, key_prefix: str) -> None:
    a, b = await login(gw), await login(gw)
    sa = await redis.hget(f"{key_prefix}session:{sid_of(a['token'])}", S.SESSION_KEY)
    sb = await redis.hget(f"{key_prefix}session:{sid_of(b['token'])}", S.SESSION_KEY)
    assert sa != sb


async def test_tampered_sealed_session_key_fails_to_decrypt(
        gw: TestClient, redis: Any, key_prefix: str) -> None:
    data = await login(gw)
    sid = sid_of(data["token"])
    key = f"{key_prefix}session:{sid}"
    store = SessionStore(redis, key_prefix, KEYRING)
    session = await store.get(sid)
    assert session is not None
    sealed = await redis.hget(key, S.SESSION_KEY)  # 9-byte key id, 12-byte nonce, ciphertext
    kid, raw = sealed[:9], sealed[9:]

    for i in (0, 12, len(raw) - 1):  # nonce, ciphertext, tag
        altered = bytearray(raw)
        altered[i] ^= 0x01
        await redis.hset(key, S.SESSION_KEY, kid + bytes(altered))
        with pytest.raises(ValueError):
            await store.session_key(session)
    for bad in (kid, kid + b"\x00" * 5, b"\xff" * 9 + raw, raw, b""):
        await redis.hset(key, S.SESSION_KEY, bad)
        with pytest.raises(ValueError):
            await store.session_key(session)

    await redis.hset(key, S.SESSION_KEY, sealed)  # control: the original still opens
    assert await store.session_key(session)


async def test_sealed_session_key_is_bound_to_its_session(
        gw: TestClient, redis: Any, key_prefix: str) -> None:
    """A sealed value copied into another session's hash does not open there."""
    a, b = await login(gw), await login(gw)
    ka = f"{key_prefix}session:{sid_of(a['token'])}"
    kb = f"{key_prefix}session:{sid_of(b['token'])}"
    await redis.hset(kb, S.SESSION_KEY, await redis.hget(ka, S.SESSION_KEY))
    store = SessionStore(redis, key_prefix, KEYRING)
    session_b = await store.get(sid_of(b["token"]))
    assert session_b is not None
    with pytest.raises(ValueError):
        await store.session_key(session_b)


# --- GET /auth/session --------------------------------------------------------------------------

async def test_get_session(gw: TestClient) -> None:
    code = fresh()
    data = await login(gw, code)
    resp = await gw.get("/auth/session", headers=bearer(data["token"]))
    assert resp.status == 200
    assert resp.content_type == "application/json" and resp.charset == "utf-8"
    text = await resp.text()
    body = json.loads(text)
    assert set(body) == {"openid", "unionid", "appid", "expires_at", "platform"}
    assert body["platform"] == "wechat"
    assert body["openid"] == data["openid"]
    assert body["unionid"] == data["unionid"]
    assert body["appid"] == APPID
    assert body["expires_at"] == claims_of(data["token"])["exp"]
    assert abs(body["expires_at"] - (time.time() + TTL)) <= 5
    assert "session_key" not in text
    assert wechat_session_key(APPID, code) not in text
    assert "session_key" not in json.dumps(dict(resp.headers))
    assert wechat_session_key(APPID, code) not in json.dumps(dict(resp.headers))


async def test_session_wrong_method_is_405(gw: TestClient) -> None:
    data = await login(gw)
    resp = await gw.post("/auth/session", headers=bearer(data["token"]))
    await expect_error(resp, 405, "method_not_allowed")
    assert "GET" in resp.headers["Allow"]


# --- POST /auth/logout --------------------------------------------------------------------------

async def test_logout_ends_the_session_everywhere(
        gw: TestClient, make_gateway: GatewayFactory, upstream: Upstream, redis: Any,
        key_prefix: str) -> None:
    replica = await make_gateway()  # another replica sharing Redis
    data = await login(gw)
    token = data["token"]
    key = f"{key_prefix}session:{sid_of(token)}"
    assert (await replica.get("/auth/session", headers=bearer(token))).status == 200
    assert await redis.exists(key) == 1

    resp = await gw.post("/auth/logout", headers=bearer(token))
    assert resp.status == 204
    assert await resp.read() == b""
    assert await redis.exists(key) == 0

    seen = len(upstream.seen)
    await expect_error(await gw.get("/auth/session", headers=bearer(token)), 401, "unauthorized")
    await expect_error(await gw.get("/api/orders", headers=bearer(token)), 401, "unauthorized")
    await expect_error(await gw.get("/auth/verify", headers=bearer(token)), 401, "unauthorized")
    await expect_error(await replica.get("/auth/session", headers=bearer(token)), 401,
                       "unauthorized")
    await expect_error(await replica.get("/api/orders", headers=bearer(token)), 401,
                       "unauthorized")
    assert len(upstream.seen) == seen
    # optional routes forward it, but without identity
    resp = await replica.get("/maybe/x", headers=bearer(token))
    assert resp.status == 200
    assert upstream.last.header("X-WX-OpenID") == []
    # a second logout is refused too
    await expect_error(await replica.post("/auth/logout", headers=bearer(token)), 401,
                       "unauthorized")


async def test_logout_ends_only_that_session(gw: TestClient) -> None:
    a, b = await login(gw), await login(gw)
    assert (await gw.post("/auth/logout", headers=bearer(a["token"]))).status == 204
    assert (await gw.get("/auth/session", headers=bearer(b["token"]))).status == 200


async def test_logout_also_ends_refreshed_tokens_of_the_session(gw: TestClient) -> None:
    data = await login(gw)
    resp = await gw.post("/auth/refresh", headers=bearer(data["token"]))
    refreshed = (await resp.json())["token"]
    assert (await gw.post("/auth/logout", headers=bearer(data["token"]))).status == 204
    await expect_error(await gw.get("/auth/session", headers=bearer(refreshed)), 401,
                       "unauthorized")


async def test_logout_without_token_is_401(gw: TestClient) -> None:
    await expect_error(await gw.post("/auth/logout"), 401, "unauthorized")
    await expect_error(await gw.post("/auth/logout", headers=bearer("garbage")), 401,
                       "unauthorized")


async def test_logout_wrong_method_is_405(gw: TestClient) -> None:
    data = await login(gw)
    resp = await gw.get("/auth/logout", headers=bearer(data["token"]))
    await expect_error(resp, 405, "method_not_allowed")
    assert resp.headers["Allow"] == "POST"
    assert (await gw.get("/auth/session", headers=bearer(data["token"]))).status == 200


# --- POST /auth/refresh -------------------------------------------------------------------------

async def test_refresh(gw: TestClient, redis: Any, key_prefix: str) -> None:
    data = await login(gw)
    old = data["token"]
    sid = sid_of(old)
    key = f"{key_prefix}session:{sid}"
    await asyncio.sleep(1.1)  # token times are whole seconds: let one pass
    # age the session: 100 s left
    soon = int(time.time()) + 100
    await redis.hset(key, S.EXPIRES_AT, soon)
    await redis.expireat(key, soon)
    resp = await gw.get("/auth/session", headers=bearer(old))
    assert (await resp.json())["expires_at"] == soon

    resp = await gw.post("/auth/refresh", headers=bearer(old))
    assert resp.status == 200, await resp.text()
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert set(body) == {"token", "token_type", "expires_in", "openid", "unionid"}
    assert body["token_type"] == "Bearer"
    assert body["openid"] == data["openid"] and body["unionid"] == data["unionid"]
    assert TTL - 5 <= body["expires_in"] <= TTL
    new = body["token"]
    assert new != old
    assert sid_of(new) == sid
    new_claims = claims_of(new)
    assert new_claims["exp"] > claims_of(old)["exp"]
    assert new_claims["sub"] == data["openid"] and new_claims["aud"] == APPID
    assert abs(new_claims["exp"] - (time.time() + TTL)) <= 5

    # the store was renewed: TTL and expires_at
    assert TTL - 5 <= await redis.ttl(key) <= TTL
    assert abs(int(await redis.hget(key, S.EXPIRES_AT)) - new_claims["exp"]) <= 1
    resp = await gw.get("/auth/session", headers=bearer(new))
    assert resp.status == 200
    session = await resp.json()
    assert session["openid"] == data["openid"]
    assert session["expires_at"] == new_claims["exp"]
    # the new token works on a protected route too
    assert (await gw.get("/api/x", headers=bearer(new))).status == 200
    assert sorted(k.decode() for k in await redis.keys(f"{key_prefix}*")) == [
        key, user_key(key_prefix, sid)]
    # the user's index follows the renewed expiry
    assert await redis.zscore(user_key(key_prefix, sid), sid) == new_claims["exp"]


async def test_refresh_keeps_the_session_key(gw: TestClient, redis: Any, key_prefix: str) -> None:
    code = fresh()
    data = await login(gw, code)
    resp = await gw.post("/auth/refresh", headers=bearer(data["token"]))
    assert resp.status == 200
    store = SessionStore(redis, key_prefix, KEYRING)
    session = await store.get(sid_of(data["token"]))
    assert session is not None
    assert await store.session_key(session) == wechat_session_key(APPID, code).encode()


async def test_refresh_after_logout_is_401(gw: TestClient, redis: Any, key_prefix: str) -> None:
    data = await login(gw)
    assert (await gw.post("/auth/logout", headers=bearer(data["token"]))).status == 204
    await expect_error(await gw.post("/auth/refresh", headers=bearer(data["token"])), 401,
                       "unauthorized")
    assert await redis.keys(f"{key_prefix}*") == []  # not resurrected


async def test_refresh_without_token_is_401(gw: TestClient) -> None:
    await expect_error(await gw.post("/auth/refresh"), 401, "unauthorized")


# --- GET /auth/verify ---------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["GET", "POST", "HEAD", "PUT", "DELETE", "PATCH", "OPTIONS"])
async def test_verify_sets_identity_headers(gw: TestClient, method: str) -> None:
    code = fresh()
    data = await login(gw, code)
    resp = await gw.request(method, "/auth/verify", headers=bearer(data["token"]))
    assert resp.status == 200, await resp.text()
    assert resp.headers["X-WX-OpenID"] == data["openid"] == simulator.openid_for(APPID, code)
    assert resp.headers["X-WX-AppID"] == APPID
    assert resp.headers["X-WX-UnionID"] == data["unionid"] == simulator.unionid_for(code)
    assert wechat_session_key(APPID, code) not in json.dumps(dict(resp.headers))
    if method == "HEAD":
        assert await resp.read() == b""
    else:
        assert "session_key" not in await resp.text()


async def test_verify_omits_unionid_header_when_user_has_none(gw: TestClient) -> None:
    data = await login(gw, fresh("nounionid-"))
    resp = await gw.get("/auth/verify", headers=bearer(data["token"]))
    assert resp.status == 200
    assert resp.headers["X-WX-OpenID"] == data["openid"]
    assert resp.headers["X-WX-AppID"] == APPID
    assert "X-WX-UnionID" not in resp.headers


@pytest.mark.parametrize("method", ["GET", "POST", "HEAD"])
async def test_verify_without_valid_token_is_401(gw: TestClient, method: str) -> None:
    data = await login(gw)
    for headers in ({}, bearer("garbage"), bearer(data["token"] + "x"),
                    {"Authorization": f"Basic {data['token']}"}):
        resp = await gw.request(method, "/auth/verify", headers=headers)
        assert resp.status == 401
        assert resp.headers.get("WWW-Authenticate") == "Bearer"
        assert "X-WX-OpenID" not in resp.headers and "X-WX-AppID" not in resp.headers
        if method != "HEAD":
            await expect_error(resp, 401, "unauthorized")


async def test_verify_ignores_identity_headers_sent_by_the_client(gw: TestClient) -> None:
    data = await login(gw)
    resp = await gw.get("/auth/verify", headers={**bearer(data["token"]),
                                                 "X-WX-OpenID": "o-spoofed",
                                                 "X-WX-AppID": "wx-spoofed"})
    assert resp.headers.getall("X-WX-OpenID") == [data["openid"]]
    assert resp.headers.getall("X-WX-AppID") == [APPID]
    resp = await gw.get("/auth/verify", headers={"X-WX-OpenID": "o-spoofed"})
    await expect_error(resp, 401, "unauthorized")
    assert "X-WX-OpenID" not in resp.headers


async def test_verify_uses_custom_identity_header_names(make_gateway: GatewayFactory) -> None:
    gw2 = await make_gateway(identity_headers={"openid": "X-User-Id", "unionid": "X-Union-Id",
                                               "appid": "X-Mini-App"})
    data = await login(gw2)
    resp = await gw2.get("/auth/verify", headers=bearer(data["token"]))
    assert resp.status == 200
    assert resp.headers["X-User-Id"] == data["openid"]
    assert resp.headers["X-Union-Id"] == data["unionid"]
    assert resp.headers["X-Mini-App"] == APPID
    for default in ("X-WX-OpenID", "X-WX-UnionID", "X-WX-AppID"):
        assert default not in resp.headers


# --- expiry -------------------------------------------------------------------------------------

async def test_session_expires_with_its_ttl(make_gateway: GatewayFactory, redis: Any,
                                            key_prefix: str) -> None:
    gw2 = await make_gateway(session={"signing_keys": [SIGNING_KEY], "ttl": "1s"})
    # start just after a second boundary: timestamps are whole seconds, so the session then
    # lives close to its full second
    await asyncio.sleep(1.02 - time.time() % 1)
    data = await login(gw2)
    token = data["token"]
    key = f"{key_prefix}session:{sid_of(token)}"
    assert 0 < data["expires_in"] <= 1
    assert 0 < await redis.pttl(key) <= 1000
    assert (await gw2.get("/auth/session", headers=bearer(token))).status == 200

    await asyncio.sleep(2)
    await expect_error(await gw2.get("/auth/session", headers=bearer(token)), 401,
                       "unauthorized")
    await expect_error(await gw2.get("/api/x", headers=bearer(token)), 401, "unauthorized")
    await expect_error(await gw2.get("/auth/verify", headers=bearer(token)), 401,
                       "unauthorized")
    await expect_error(await gw2.post("/auth/refresh", headers=bearer(token)), 401,
                       "unauthorized")
    assert await redis.exists(key) == 0


async def test_session_past_expires_at_is_refused_even_if_redis_key_lingers(
        gw: TestClient, redis: Any, key_prefix: str) -> None:
    """There is no grace: a session whose expires_at passed is over."""
    data = await login(gw)
    key = f"{key_prefix}session:{sid_of(data['token'])}"
    await redis.hset(key, S.EXPIRES_AT, int(time.time()) - 1)  # Redis TTL still ~1 h
    await expect_error(await gw.get("/auth/session", headers=bearer(data["token"])), 401,
                       "unauthorized")


# --- Redis unreachable --------------------------------------------------------------------------

@pytest.mark.parametrize("method,path", [
    ("GET", "/auth/session"), ("POST", "/auth/refresh"), ("POST", "/auth/logout"),
    ("GET", "/auth/verify"), ("POST", "/auth/verify"), ("GET", "/api/x"),
])
async def test_redis_unreachable_is_store_unavailable(
        gw: TestClient, make_gateway: GatewayFactory, upstream: Upstream, key_prefix: str,
        method: str, path: str) -> None:
    token = (await login(gw))["token"]  # a genuine token: only the store is missing
    down = await make_gateway(redis={"url": closed_port_url(), "key_prefix": key_prefix})
    started = time.monotonic()
    resp = await down.request(method, path, headers=bearer(token))
    await expect_error(resp, 503, "store_unavailable")
    assert time.monotonic() - started < 3
    assert "X-WX-OpenID" not in resp.headers
    assert upstream.seen == []
    # the session itself is untouched
    assert (await gw.get("/auth/session", headers=bearer(token))).status == 200


async def test_session_store_api_fails_closed_when_redis_is_down(key_prefix: str) -> None:
    import redis.asyncio as aioredis
    from gateway.errors import StoreUnavailable
    client = aioredis.from_url(closed_port_url())
    try:
        store = SessionStore(client, key_prefix, KEYRING)
        with pytest.raises(StoreUnavailable):
            await store.get("anything")
        with pytest.raises(StoreUnavailable):
            await store.session_key(Session("s", "o", None, APPID, 0, 1))
    finally:
        await client.aclose()
