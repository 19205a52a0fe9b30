"""Endpoints acting with the session's WeChat credentials: POST /auth/phone (and X-WX-Phone),
POST /auth/decrypt, POST /auth/check-signature, GET /auth/session?check=true, and routes
restricted to some apps (403 app_forbidden)."""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import json
import os
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from checks import expect_error
from conftest import (APPID, APPID2, SIGNING_KEY, TWO_APPS, GatewayFactory, Upstream, base_config,
                      bearer, closed_port_url, fresh, login)
from gateway import loader
from gateway import sessions as S
from gateway.testing import simulator
from gateway.errors import ConfigError
from gateway.testing.embedded import free_port

STORE_PHONE = {"signing_keys": [SIGNING_KEY], "ttl": "1h", "store_phone": True}
IV = base64.b64encode(bytes(16)).decode()


def calls(wechat: TestServer, name: str) -> int:
    return wechat.app[simulator.CALLS][name]


def sim_state(wechat: TestServer) -> simulator.SimulatorState:
    return wechat.app[simulator.STATE]


async def login_as(gw: TestClient, appid: str | None = None) -> tuple[str, dict[str, Any]]:
    code = fresh()
    extra = {"appid": appid} if appid else {}
    return code, await login(gw, code, **extra)


async def userdata(wechat: TestServer, appid: str, code: str) -> dict[str, str]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{wechat.port}/_simulator/userdata",
                            params={"appid": appid, "code": code}) as resp:
            assert resp.status == 200, await resp.text()
            data: dict[str, str] = await resp.json()
            return data


def encrypt_raw(session_key: str, plain: bytes) -> tuple[str, str]:
    """Any bytes, PKCS#7-padded and AES-128-CBC encrypted under the session_key."""
    iv = os.urandom(16)
    padder = padding.PKCS7(128).padder()
    padded = padder.update(plain) + padder.finalize()
    enc = Cipher(algorithms.AES(base64.b64decode(session_key)), modes.CBC(iv)).encryptor()
    return (base64.b64encode(enc.update(padded) + enc.finalize()).decode(),
            base64.b64encode(iv).decode())


def phone_headers(seen_headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in seen_headers
            if k.lower().replace("_", "-").strip() == "x-wx-phone"]


# --- POST /auth/phone ------------------------------------------------------------------------

async def test_phone_number(gw: TestClient, wechat: TestServer) -> None:
    _, session = await login_as(gw)
    resp = await gw.post("/auth/phone", json={"code": "abc"}, headers=bearer(session["token"]))
    assert resp.status == 200, await resp.text()
    assert resp.content_type == "application/json"
    pure = simulator.phone_for("abc")
    assert await resp.json() == {"phone_number": f"+86{pure}", "pure_phone_number": pure,
                                 "country_code": "86"}
    assert calls(wechat, "getuserphonenumber") == 1
    assert calls(wechat, "stable_token") == 1


async def test_phone_number_reuses_the_access_token(gw: TestClient, wechat: TestServer) -> None:
    _, session = await login_as(gw)
    for code in ("a1", "a2", "a3"):
        resp = await gw.post("/auth/phone", json={"code": code}, headers=bearer(session["token"]))
        assert (await resp.json())["pure_phone_number"] == simulator.phone_for(code)
    assert calls(wechat, "stable_token") == 1


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer not-a-token"},
                                     {"Authorization": "Basic dXNlcjpwYXNz"}])
async def test_phone_without_valid_token_is_401(
        gw: TestClient, wechat: TestServer, headers: dict[str, str]) -> None:
    resp = await gw.post("/auth/phone", json={"code": "abc"}, headers=headers)
    await expect_error(resp, 401, "unauthorized")
    assert resp.headers.get("WWW-Authenticate") == "Bearer"
    assert calls(wechat, "getuserphonenumber") == 0


async def test_phone_after_logout_is_401(gw: TestClient) -> None:
    _, session = await login_as(gw)
    assert (await gw.post("/auth/logout", headers=bearer(session["token"]))).status == 204
    resp = await gw.post("/auth/phone", json={"code": "abc"}, headers=bearer(session["token"]))
    await expect_error(resp, 401, "unauthorized")


@pytest.mark.parametrize("body, names_code", [
    (b"not json", False), (b"[1, 2]", False), (b'"code"', False), (b"", False),
    (b"{}", True), (b'{"code": null}', True), (b'{"code": 42}', True), (b'{"code": ""}', True),
    (b'{"code": ["abc"]}', True), (b'{"code": "\xe6\x89\x8b\xe6\x9c\xba"}', True),
    (json.dumps({"code": "x" * 129}).encode(), True),
])
async def test_phone_bad_body_is_invalid_request(
        gw: TestClient, wechat: TestServer, body: bytes, names_code: bool) -> None:
    _, session = await login_as(gw)
    resp = await gw.post("/auth/phone", data=body, headers={
        **bearer(session["token"]), "Content-Type": "application/json"})
    error = await expect_error(resp, 400, "invalid_request")
    if names_code:
        assert "code" in error["message"], error
    assert calls(wechat, "getuserphonenumber") == 0


@pytest.mark.parametrize("code, status, error", [
    ("errcode-40029-x", 400, "invalid_phone_code"),
    ("errcode--1-x", 503, "wechat_unavailable"),
    ("errcode-45011-x", 429, "rate_limited"),
    ("errcode-99999-x", 502, "wechat_error"),
    ("otherapp-x", 400, "watermark_mismatch"),
    ("http-502-x", 502, "wechat_error"),
    ("http-404-x", 502, "wechat_error"),
    ("garbage-x", 502, "wechat_error"),
    ("reset-x", 502, "wechat_error"),
    ("slow-1500-x", 504, "wechat_timeout"),  # wechat.timeout is 1s in the tests
])
async def test_phone_error_mapping(gw: TestClient, wechat: TestServer, code: str, status: int,
                                   error: str) -> None:
    _, session = await login_as(gw)
    resp = await gw.post("/auth/phone", json={"code": code}, headers=bearer(session["token"]))
    await expect_error(resp, status, error)
    assert calls(wechat, "getuserphonenumber") == 1  # not retried: only token errors are


async def test_phone_with_wechat_unreachable_is_502(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway()
    _, session = await login_as(gw)
    # Another replica (same Redis, prefix and keys) that cannot reach WeChat at all.
    down = await make_gateway(wechat={"api_base": f"http://127.0.0.1:{free_port()}",
                                      "timeout": "1s"})
    resp = await down.post("/auth/phone", json={"code": "abc"},
                           headers=bearer(session["token"]))
    await expect_error(resp, 502, "wechat_error")


async def test_phone_with_redis_down_is_503(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway()
    _, session = await login_as(gw)
    down = await make_gateway(redis={"url": closed_port_url(), "key_prefix": "x:"})
    resp = await down.post("/auth/phone", json={"code": "abc"},
                           headers=bearer(session["token"]))
    await expect_error(resp, 503, "store_unavailable")


async def test_phone_wrong_method_is_405(gw: TestClient) -> None:
    _, session = await login_as(gw)
    resp = await gw.get("/auth/phone", headers=bearer(session["token"]))
    await expect_error(resp, 405, "method_not_allowed")
    assert resp.headers.get("Allow") == "POST"


# --- session.store_phone and X-WX-Phone --------------------------------------------------------

async def test_stored_phone_is_injected_upstream_and_on_verify(
        make_gateway: GatewayFactory, upstream: Upstream, redis: Any, key_prefix: str) -> None:
    gw = await make_gateway(session=STORE_PHONE)
    _, session = await login_as(gw)
    auth = bearer(session["token"])
    # Before /auth/phone there is no number to inject.
    assert (await gw.get("/api/before", headers=auth)).status == 200
    assert phone_headers(upstream.last.headers) == []
    verify = await gw.get("/auth/verify", headers=auth)
    assert verify.status == 200 and "X-WX-Phone" not in verify.headers

    resp = await gw.post("/auth/phone", json={"code": "mine"}, headers=auth)
    number = (await resp.json())["phone_number"]
    assert number == "+86" + simulator.phone_for("mine")

    assert (await gw.get("/api/after", headers=auth)).status == 200
    assert phone_headers(upstream.last.headers) == [("X-WX-Phone", number)]
    assert upstream.last.header("X-WX-OpenID") == [session["openid"]]
    verify = await gw.get("/auth/verify", headers=auth)
    assert verify.status == 200 and verify.headers.getall("X-WX-Phone") == [number]
    # Optional routes get the identity of a valid token, phone included.
    assert (await gw.get("/maybe/x", headers=auth)).status == 200
    assert phone_headers(upstream.last.headers) == [("X-WX-Phone", number)]
    # Never on public routes, never for anonymous requests, never for another user.
    assert (await gw.get("/public/x", headers=auth)).status == 200
    assert phone_headers(upstream.last.headers) == []
    assert (await gw.get("/maybe/x")).status == 200
    assert phone_headers(upstream.last.headers) == []
    _, other = await login_as(gw)
    assert (await gw.get("/api/other", headers=bearer(other["token"]))).status == 200
    assert phone_headers(upstream.last.headers) == []
    assert "X-WX-Phone" not in (await gw.get("/auth/verify", headers=bearer(other["token"]))).headers
    # The session body does not grow a phone field, and the number stays in the session hash.
    assert set(await (await gw.get("/auth/session", headers=auth)).json()) == {
        "openid", "unionid", "appid", "expires_at", "platform"}
    keys = [k async for k in redis.scan_iter(match=f"{key_prefix}session:*")]
    phones = [await redis.hget(k, S.PHONE) for k in keys]
    assert sorted(p for p in phones if p) == [number.encode()]


async def test_stored_phone_is_seen_by_every_replica(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(session=STORE_PHONE)
    other = await make_gateway(session=STORE_PHONE)
    _, session = await login_as(gw)
    auth = bearer(session["token"])
    number = (await (await gw.post("/auth/phone", json={"code": "r"}, headers=auth)).json())[
        "phone_number"]
    assert (await other.get("/auth/verify", headers=auth)).headers.getall("X-WX-Phone") == [number]


async def test_phone_is_not_stored_by_default(
        gw: TestClient, upstream: Upstream, redis: Any, key_prefix: str) -> None:
    _, session = await login_as(gw)
    auth = bearer(session["token"])
    assert (await gw.post("/auth/phone", json={"code": "abc"}, headers=auth)).status == 200
    assert (await gw.get("/api/x", headers=auth)).status == 200
    assert phone_headers(upstream.last.headers) == []
    assert "X-WX-Phone" not in (await gw.get("/auth/verify", headers=auth)).headers
    keys = [k async for k in redis.scan_iter(match=f"{key_prefix}session:*")]
    assert keys and [await redis.hget(k, S.PHONE) for k in keys] == [None] * len(keys)


@pytest.mark.parametrize("code", ["otherapp-x", "errcode-40029-x", "errcode--1-x"])
async def test_failed_phone_lookup_stores_nothing(
        make_gateway: GatewayFactory, upstream: Upstream, code: str) -> None:
    gw = await make_gateway(session=STORE_PHONE)
    _, session = await login_as(gw)
    auth = bearer(session["token"])
    assert (await gw.post("/auth/phone", json={"code": code}, headers=auth)).status >= 400
    assert (await gw.get("/api/x", headers=auth)).status == 200
    assert phone_headers(upstream.last.headers) == []


async def raw_request(client: TestClient, lines: list[bytes], path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        head = [f"GET {path} HTTP/1.1".encode(), b"Host: gw.test", *lines, b"Connection: close"]
        writer.write(b"\r\n".join(head) + b"\r\n\r\n")
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), rest


@pytest.mark.parametrize("store_phone", [True, False])
async def test_client_sent_phone_headers_are_always_stripped(
        make_gateway: GatewayFactory, upstream: Upstream, store_phone: bool) -> None:
    gw = await make_gateway(session={**STORE_PHONE, "store_phone": store_phone})
    _, session = await login_as(gw)
    token_line = f"Authorization: Bearer {session['token']}".encode()
    spellings = [b"X-WX-Phone", b"x-wx-phone", b"X-WX-PHONE", b"x_wx_phone", b"X_WX_Phone",
                 b"x-wx_phone", b"X_wx-Phone"]
    for path, auth in [("/api/s", [token_line]), ("/maybe/s", [token_line]), ("/maybe/s", []),
                       ("/public/s", [token_line]), ("/public/s", [])]:
        for name in spellings:
            before = len(upstream.seen)
            status, _ = await raw_request(gw, [*auth, name + b": +10000000000",
                                               b"X-Other: kept"], path)
            assert status == 200, (path, name)
            assert len(upstream.seen) == before + 1
            assert phone_headers(upstream.last.headers) == [], (path, name)
            assert upstream.last.header("X-Other") == ["kept"]
    # /auth/verify answers from the session, never from what the client sent.
    status, rest = await raw_request(gw, [token_line, b"X-WX-Phone: +10000000000"], "/auth/verify")
    assert status == 200 and b"+10000000000" not in rest


async def test_client_cannot_replace_a_stored_phone(
        make_gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = await make_gateway(session=STORE_PHONE)
    _, session = await login_as(gw)
    auth = bearer(session["token"])
    number = (await (await gw.post("/auth/phone", json={"code": "z"}, headers=auth)).json())[
        "phone_number"]
    status, _ = await raw_request(gw, [f"Authorization: Bearer {session['token']}".encode(),
                                       b"x_wx_phone: +10000000000",
                                       b"X-WX-Phone: +10000000001"], "/api/z")
    assert status == 200
    assert phone_headers(upstream.last.headers) == [("X-WX-Phone", number)]


async def test_custom_phone_header_name(make_gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = await make_gateway(session=STORE_PHONE, identity_headers={"phone": "X-Mobile"})
    _, session = await login_as(gw)
    auth = bearer(session["token"])
    number = (await (await gw.post("/auth/phone", json={"code": "m"}, headers=auth)).json())[
        "phone_number"]
    status, _ = await raw_request(gw, [f"Authorization: Bearer {session['token']}".encode(),
                                       b"x_mobile: forged"], "/api/m")
    assert status == 200
    assert upstream.last.header("X-Mobile") == [number]
    assert [k for k, _ in upstream.last.headers if k.lower() in ("x_mobile", "x-wx-phone")] == []


# --- POST /auth/decrypt ------------------------------------------------------------------------

async def test_decrypt_user_data(gw: TestClient, wechat: TestServer) -> None:
    code, session = await login_as(gw)
    data = await userdata(wechat, APPID, code)
    resp = await gw.post("/auth/decrypt", headers=bearer(session["token"]),
                         json={"encrypted_data": data["encrypted_data"], "iv": data["iv"]})
    assert resp.status == 200, await resp.text()
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert body["openId"] == session["openid"] == simulator.openid_for(APPID, code)
    assert body["watermark"]["appid"] == APPID
    assert body["nickName"] == "Demo User"
    assert "session_key" not in json.dumps(body)
    assert calls(wechat, "checksession") == 0  # a good decryption needs no WeChat call


async def test_decrypt_non_ascii_user_data(gw: TestClient) -> None:
    code, session = await login_as(gw)
    user = {"openId": session["openid"], "nickName": "微信用户 🐼",
            "watermark": {"appid": APPID, "timestamp": 1}}
    encrypted, iv = simulator.encrypt_user_data(simulator.session_key_for(APPID, code), user)
    resp = await gw.post("/auth/decrypt", headers=bearer(session["token"]),
                         json={"encrypted_data": encrypted, "iv": iv})
    assert resp.status == 200, await resp.text()
    assert await resp.json() == user
    assert "微信用户".encode() in await resp.read()  # UTF-8, not \\u escapes needed


@pytest.mark.parametrize("watermark", [{"appid": APPID2, "timestamp": 1},
                                       {"appid": "wx0000000000000000"}, {}, "wx1234567890abcdef",
                                       None])
async def test_decrypt_watermark_of_another_app_is_refused(
        gw: TestClient, wechat: TestServer, watermark: Any) -> None:
    code, session = await login_as(gw)
    user: dict[str, Any] = {"openId": session["openid"], "nickName": "x"}
    if watermark is not None:
        user["watermark"] = watermark
    encrypted, iv = simulator.encrypt_user_data(simulator.session_key_for(APPID, code), user)
    resp = await gw.post("/auth/decrypt", headers=bearer(session["token"]),
                         json={"encrypted_data": encrypted, "iv": iv})
    await expect_error(resp, 400, "watermark_mismatch")


async def test_decrypt_data_of_another_apps_session_fails(
        gw: TestClient, wechat: TestServer) -> None:
    code, session = await login_as(gw)
    data = await userdata(wechat, APPID2, code)  # same user code, the other app's session_key
    resp = await gw.post("/auth/decrypt", headers=bearer(session["token"]),
                         json={"encrypted_data": data["encrypted_data"], "iv": data["iv"]})
    await expect_error(resp, 400, "decrypt_failed")
    assert calls(wechat, "checksession") == 1  # asked WeChat whether the key went stale


@pytest.mark.parametrize("field, value", [
    ("encrypted_data", "not base64!"), ("encrypted_data", "QUJD"[:3]),
    ("encrypted_data", "QUJDRA=="[:6]), ("encrypted_data", "QUJD\nRA=="),
    ("iv", "not base64!"), ("iv", "AAAA%AAA"), ("iv", IV[:-1]),
])
async def test_decrypt_bad_base64_names_the_field(
        gw: TestClient, wechat: TestServer, field: str, value: str) -> None:
    code, session = await login_as(gw)
    data = await userdata(wechat, APPID, code)
    body = {"encrypted_data": data["encrypted_data"], "iv": data["iv"], field: value}
    resp = await gw.post("/auth/decrypt", headers=bearer(session["token"]), json=body)
    error = await expect_error(resp, 400, "invalid_request")
    assert field in error["message"], error


@pytest.mark.parametrize("iv_bytes", [0, 8, 15, 17, 32])
async def test_decrypt_iv_of_wrong_length(gw: TestClient, wechat: TestServer,
                                          iv_bytes: int) -> None:
    code, session = await login_as(gw)
    data = await userdata(wechat, APPID, code)
    iv = base64.b64encode(os.urandom(iv_bytes)).decode()
    resp = await gw.post("/auth/decrypt", headers=bearer(session["token"]),
                         json={"encrypted_data": data["encrypted_data"], "iv": iv})
    error = await expect_error(resp, 400, "invalid_request")
    assert "iv" in error["message"], error


@pytest.mark.parametrize("body, field", [
    ({}, "encrypted_data"), ({"iv": IV}, "encrypted_data"),
    ({"encrypted_data": "A" * 24}, "iv"), ({"encrypted_data": 5, "iv": IV}, "encrypted_data"),
    ({"encrypted_data": "A" * 24, "iv": None}, "iv"),
    ({"encrypted_data": "", "iv": IV}, "encrypted_data"),
    ({"encrypted_data": base64.b64encode(bytes(20)).decode(), "iv": IV}, "encrypted_data"),
    ({"encrypted_data": "ＡＡＡＡ", "iv": IV}, "encrypted_data"),
    ({"encrypted_data": "A" * 24, "iv": "Ａ" * 24}, "iv"),
])
async def test_decrypt_malformed_fields(gw: TestClient, body: dict[str, Any], field: str) -> None:
    _, session = await login_as(gw)
    resp = await gw.post("/auth/decrypt", headers=bearer(session["token"]), json=body)
    error = await expect_error(resp, 400, "invalid_request")
    assert field in error["message"], error


async def test_decrypt_oversized_body_is_413(gw: TestClient) -> None:
    _, session = await login_as(gw)
    resp = await gw.post("/auth/decrypt", headers=bearer(session["token"]),
                         json={"encrypted_data": "A" * 70000, "iv": IV})
    await expect_error(resp, 413, "payload_too_large")


async def test_decrypt_garbage_is_decrypt_failed_while_the_key_is_current(
        gw: TestClient, wechat: TestServer) -> None:
    _, session = await login_as(gw)
    garbage = base64.b64encode(os.urandom(64)).decode()
    resp = await gw.post("/auth/decrypt", headers=bearer(session["token"]),
                         json={"encrypted_data": garbage, "iv": IV})
    await expect_error(resp, 400, "decrypt_failed")
    assert calls(wechat, "checksession") == 1


@pytest.mark.parametrize("plain", [
    b"not json at all", b"[1, 2, 3]", b'"a string"', b"\xff\xfe\xfd invalid utf-8", b"",
    b'{"unterminated": ', b"null",
])
async def test_decrypt_to_something_other_than_an_object_is_decrypt_failed(
        gw: TestClient, plain: bytes) -> None:
    code, session = await login_as(gw)
    encrypted, iv = encrypt_raw(simulator.session_key_for(APPID, code), plain)
    resp = await gw.post("/auth/decrypt", headers=bearer(session["token"]),
                         json={"encrypted_data": encrypted, "iv": iv})
    await expect_error(resp, 400, "decrypt_failed")


async def test_decrypt_deeply_nested_json_is_decrypt_failed_not_500(gw: TestClient) -> None:
    """Well-padded plaintext under the right key that json cannot parse without recursing past
    Python's limit: still a 400, never a 500."""
    code, session = await login_as(gw)
    plain = b"[" * 5000 + b"]" * 5000
    encrypted, iv = encrypt_raw(simulator.session_key_for(APPID, code), plain)
    body = {"encrypted_data": encrypted, "iv": iv}
    assert len(json.dumps(body)) < 16 * 1024  # within the endpoint's body limit
    resp = await gw.post("/auth/decrypt", headers=bearer(session["token"]), json=body)
    await expect_error(resp, 400, "decrypt_failed")


async def test_decrypt_with_a_stale_session_key_is_session_key_expired(
        gw: TestClient, wechat: TestServer) -> None:
    code, session = await login_as(gw)
    data = await userdata(wechat, APPID, code)
    sim_state(wechat).revoke_session_key(session["openid"])  # the user logged in elsewhere
    # What the mini-program now holds is encrypted under the new key, which the gateway lacks.
    encrypted, iv = simulator.encrypt_user_data(
        sim_state(wechat).session_keys[session["openid"]],
        {"openId": session["openid"], "watermark": {"appid": APPID}})
    resp = await gw.post("/auth/decrypt", headers=bearer(session["token"]),
                         json={"encrypted_data": encrypted, "iv": iv})
    await expect_error(resp, 401, "session_key_expired")
    garbage = base64.b64encode(os.urandom(32)).decode()
    resp = await gw.post("/auth/decrypt", headers=bearer(session["token"]),
                         json={"encrypted_data": garbage, "iv": IV})
    await expect_error(resp, 401, "session_key_expired")
    assert calls(wechat, "checksession") == 2
    # Data that still decrypts under the old key is simply decrypted.
    resp = await gw.post("/auth/decrypt", headers=bearer(session["token"]),
                         json={"encrypted_data": data["encrypted_data"], "iv": data["iv"]})
    assert resp.status == 200


async def test_decrypt_failure_with_wechat_down_is_decrypt_failed(
        make_gateway: GatewayFactory, wechat: TestServer) -> None:
    gw = await make_gateway()
    code, session = await login_as(gw)
    down = await make_gateway(wechat={"api_base": f"http://127.0.0.1:{free_port()}",
                                      "timeout": "1s"})
    auth = bearer(session["token"])
    resp = await down.post("/auth/decrypt", headers=auth,
                           json={"encrypted_data": base64.b64encode(bytes(32)).decode(), "iv": IV})
    await expect_error(resp, 400, "decrypt_failed")
    data = await userdata(wechat, APPID, code)
    resp = await down.post("/auth/decrypt", headers=auth,
                           json={"encrypted_data": data["encrypted_data"], "iv": data["iv"]})
    assert resp.status == 200  # decryption itself needs no WeChat


async def test_decrypt_never_500(gw: TestClient, wechat: TestServer) -> None:
    code, session = await login_as(gw)
    auth = bearer(session["token"])
    good = await userdata(wechat, APPID, code)
    odd: list[Any] = [None, True, 0, -1, 1.5, [], {}, "", " ", "=", "==", "====", "\x00",
                      "A" * 15, "A" * 16, "A" * 17, "A" * 64, "A" * 65, "/" * 24, "+" * 24,
                      "\u00e9" * 24, "😀", "AAAA====", good["iv"] + "=", good["iv"].lower(),
                      good["encrypted_data"][:-4], good["encrypted_data"][4:],
                      good["encrypted_data"] + "AAAA"]
    for value in odd:
        for body in ({"encrypted_data": value, "iv": good["iv"]},
                     {"encrypted_data": good["encrypted_data"], "iv": value}):
            resp = await gw.post("/auth/decrypt", headers=auth, json=body)
            text = await resp.text()
            assert 400 <= resp.status < 500, (body, resp.status, text)
            parsed = json.loads(text)
            assert set(parsed) == {"error", "message"}, text
            assert parsed["error"] in ("invalid_request", "decrypt_failed",
                                       "watermark_mismatch"), text


async def test_decrypt_without_token_is_401(gw: TestClient) -> None:
    resp = await gw.post("/auth/decrypt", json={"encrypted_data": "A" * 24, "iv": IV})
    await expect_error(resp, 401, "unauthorized")


# --- POST /auth/check-signature -----------------------------------------------------------------

async def test_check_signature(gw: TestClient, wechat: TestServer) -> None:
    code, session = await login_as(gw)
    data = await userdata(wechat, APPID, code)
    resp = await gw.post("/auth/check-signature", headers=bearer(session["token"]),
                         json={"raw_data": data["raw_data"], "signature": data["signature"]})
    assert resp.status == 200, await resp.text()
    assert await resp.json() == {"valid": True}


async def test_check_signature_tampered(gw: TestClient, wechat: TestServer) -> None:
    code, session = await login_as(gw)
    data = await userdata(wechat, APPID, code)
    auth = bearer(session["token"])
    flipped = ("0" if data["signature"][0] != "0" else "1") + data["signature"][1:]
    for raw, sig in [(data["raw_data"].replace("Demo", "Evil"), data["signature"]),
                     (data["raw_data"] + " ", data["signature"]),
                     (data["raw_data"], flipped), (data["raw_data"], data["signature"][:-1]),
                     (data["raw_data"], "0" * 40)]:
        resp = await gw.post("/auth/check-signature", headers=auth,
                             json={"raw_data": raw, "signature": sig})
        await expect_error(resp, 400, "invalid_signature")


async def test_check_signature_of_another_users_key_is_invalid(
        gw: TestClient, wechat: TestServer) -> None:
    code, _ = await login_as(gw)
    _, other = await login_as(gw)
    data = await userdata(wechat, APPID, code)
    resp = await gw.post("/auth/check-signature", headers=bearer(other["token"]),
                         json={"raw_data": data["raw_data"], "signature": data["signature"]})
    await expect_error(resp, 400, "invalid_signature")


async def test_check_signature_non_ascii_raw_data(gw: TestClient) -> None:
    code, session = await login_as(gw)
    raw = json.dumps({"nickName": "张三 🐼", "gender": 1}, ensure_ascii=False)
    key = simulator.session_key_for(APPID, code)
    signature = hashlib.sha1((raw + key).encode("utf-8")).hexdigest()
    resp = await gw.post("/auth/check-signature", headers=bearer(session["token"]),
                         json={"raw_data": raw, "signature": signature})
    assert resp.status == 200, await resp.text()
    assert await resp.json() == {"valid": True}


@pytest.mark.parametrize("signature", ["签名" * 5, "é" * 40, "\u0660" * 40, "ａ" * 40,
                                       "0" * 39 + "\u00e9"])
async def test_check_signature_non_ascii_signature_is_400(
        gw: TestClient, signature: str) -> None:
    _, session = await login_as(gw)
    resp = await gw.post("/auth/check-signature", headers=bearer(session["token"]),
                         json={"raw_data": "{}", "signature": signature})
    text = await resp.text()
    assert resp.status == 400, text
    assert json.loads(text)["error"] in ("invalid_request", "invalid_signature"), text


@pytest.mark.parametrize("body, field", [
    ({}, "raw_data"), ({"signature": "0" * 40}, "raw_data"), ({"raw_data": "{}"}, "signature"),
    ({"raw_data": 1, "signature": "0" * 40}, "raw_data"),
    ({"raw_data": "{}", "signature": ["0" * 40]}, "signature"),
    ({"raw_data": "{}", "signature": "0" * 65}, "signature"),
])
async def test_check_signature_malformed(gw: TestClient, body: dict[str, Any], field: str) -> None:
    _, session = await login_as(gw)
    resp = await gw.post("/auth/check-signature", headers=bearer(session["token"]), json=body)
    error = await expect_error(resp, 400, "invalid_request")
    assert field in error["message"], error


async def test_check_signature_without_token_is_401(gw: TestClient) -> None:
    resp = await gw.post("/auth/check-signature", json={"raw_data": "{}", "signature": "0" * 40})
    await expect_error(resp, 401, "unauthorized")


# --- GET /auth/session?check=true ---------------------------------------------------------------

async def test_session_check(gw: TestClient, wechat: TestServer) -> None:
    _, session = await login_as(gw)
    auth = bearer(session["token"])
    resp = await gw.get("/auth/session?check=true", headers=auth)
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["openid"] == session["openid"] and body["appid"] == APPID
    assert set(body) == {"openid", "unionid", "appid", "expires_at", "platform"}
    assert calls(wechat, "checksession") == 1
    for query in ("", "?check=false", "?check=0", "?check=FALSE"):
        assert (await gw.get(f"/auth/session{query}", headers=auth)).status == 200
    assert calls(wechat, "checksession") == 1  # no WeChat call without check=true
    assert (await gw.get("/auth/session?check=1", headers=auth)).status == 200
    assert calls(wechat, "checksession") == 2


async def test_session_check_after_revocation_is_session_key_expired(
        gw: TestClient, wechat: TestServer) -> None:
    _, session = await login_as(gw)
    _, bystander = await login_as(gw)
    auth = bearer(session["token"])
    sim_state(wechat).revoke_session_key(session["openid"])
    resp = await gw.get("/auth/session?check=true", headers=auth)
    await expect_error(resp, 401, "session_key_expired")
    # The unchecked session still answers; other users are unaffected.
    assert (await gw.get("/auth/session", headers=auth)).status == 200
    assert (await gw.get("/auth/session?check=true",
                         headers=bearer(bystander["token"]))).status == 200


@pytest.mark.parametrize("value", ["maybe", "yes", "2", "true;", "tru", "%E7%9C%9F"])
async def test_session_check_invalid_value(gw: TestClient, wechat: TestServer,
                                           value: str) -> None:
    _, session = await login_as(gw)
    resp = await gw.get(f"/auth/session?check={value}", headers=bearer(session["token"]))
    error = await expect_error(resp, 400, "invalid_request")
    assert "check" in error["message"]
    assert calls(wechat, "checksession") == 0


async def test_session_check_survives_an_expired_access_token(
        gw: TestClient, wechat: TestServer) -> None:
    _, session = await login_as(gw)
    auth = bearer(session["token"])
    assert (await gw.get("/auth/session?check=true", headers=auth)).status == 200
    sim_state(wechat).expire_access_tokens()
    assert (await gw.get("/auth/session?check=true", headers=auth)).status == 200
    assert calls(wechat, "stable_token") == 2
    assert calls(wechat, "checksession") == 3


async def test_session_check_without_token_is_401(gw: TestClient, wechat: TestServer) -> None:
    resp = await gw.get("/auth/session?check=true")
    await expect_error(resp, 401, "unauthorized")
    assert calls(wechat, "checksession") == 0


async def test_session_check_with_wechat_down_is_502(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway()
    _, session = await login_as(gw)
    down = await make_gateway(wechat={"api_base": f"http://127.0.0.1:{free_port()}",
                                      "timeout": "1s"})
    resp = await down.get("/auth/session?check=true", headers=bearer(session["token"]))
    await expect_error(resp, 502, "wechat_error")


# --- routes restricted to some apps ------------------------------------------------------------

def restricted_routes(upstream_url: str) -> list[dict[str, Any]]:
    return [
        {"path": "/only1/", "upstream": upstream_url, "auth": "required", "apps": [APPID]},
        {"path": "/opt1/", "upstream": upstream_url, "auth": "optional", "apps": [APPID]},
        {"path": "/both/", "upstream": upstream_url, "auth": "required",
         "apps": [APPID, APPID2]},
        {"path": "/any/", "upstream": upstream_url, "auth": "required"},
    ]


async def test_route_apps_restriction(make_gateway: GatewayFactory, upstream: Upstream) -> None:
    gw = await make_gateway(apps=TWO_APPS, routes=restricted_routes(upstream.url))
    _, one = await login_as(gw, APPID)
    _, two = await login_as(gw, APPID2)

    resp = await gw.get("/only1/x", headers=bearer(one["token"]))
    assert resp.status == 200
    assert upstream.last.header("X-WX-AppID") == [APPID]
    count = len(upstream.seen)
    for path in ("/only1/x", "/only1/deeper/y?q=1", "/opt1/x"):
        resp = await gw.post(path, headers=bearer(two["token"]), data=b"payload")
        await expect_error(resp, 403, "app_forbidden")
    assert len(upstream.seen) == count  # nothing forwarded

    assert (await gw.get("/opt1/x", headers=bearer(one["token"]))).status == 200
    assert upstream.last.header("X-WX-AppID") == [APPID]
    assert (await gw.get("/opt1/x")).status == 200  # anonymous on an optional route
    assert upstream.last.header("X-WX-AppID") == []
    for token in (one["token"], two["token"]):
        assert (await gw.get("/both/x", headers=bearer(token))).status == 200
        assert (await gw.get("/any/x", headers=bearer(token))).status == 200
    await expect_error(await gw.get("/only1/x"), 401, "unauthorized")


def minimal_config(**overrides: Any) -> dict[str, Any]:
    data = base_config("redis://127.0.0.1:6379/0", "t:", "http://127.0.0.1:1",
                       "http://127.0.0.1:2")
    data.update(copy.deepcopy(overrides))
    return data


def test_route_apps_config() -> None:
    config = loader.parse(minimal_config(apps=TWO_APPS, routes=[
        {"path": "/a/", "upstream": "http://127.0.0.1:9000", "apps": [APPID2]},
        {"path": "/b/", "upstream": "http://127.0.0.1:9000"}]), environ={})
    by_path = {r.path: r for r in config.routes}
    assert by_path["/a"].apps == (APPID2,)
    assert by_path["/b"].apps == ()


@pytest.mark.parametrize("apps, key", [
    (["wx0000000000000000"], "routes[0].apps[0]"),
    ([APPID, "wxunknown"], "routes[0].apps[1]"),
    ("wx1234567890abcdef", "routes[0].apps"),
    ([["nested"]], "routes[0].apps[0]"),
])
def test_route_apps_unknown_appid_is_a_config_error(apps: Any, key: str) -> None:
    data = minimal_config(routes=[
        {"path": "/x/", "upstream": "http://127.0.0.1:9000", "apps": apps},
        {"path": "/y/", "upstream": "http://127.0.0.1:9000"}])
    with pytest.raises(ConfigError) as caught:
        loader.parse(data, environ={})
    assert any(p.startswith(f"{key}:") for p in caught.value.problems), caught.value.problems
