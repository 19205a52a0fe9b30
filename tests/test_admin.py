"""The admin API and ``wx-gateway admin``: a user's sessions listed and ended on every replica
(open WebSockets closed), bans that refuse login and refresh until lifted or expired, the
per-user index of sessions under logout, refresh and expiry, in a Redis Cluster too, and what
a caller without a valid admin token or with malformed input gets."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestClient, TestServer

from checks import expect_error
from conftest import (APPID, APPID2, SECRET, SECRET2, SIGNING_KEY, GatewayFactory, bearer,
                      claims_of, login)
from gateway import loader
from gateway.admin import create_admin_app
from gateway.errors import ConfigError
from gateway.reload import reload as reload_config
from gateway.state import SERVICES
from gateway.testing import simulator
from gateway.testing.embedded import free_port
from process import GATEWAY, GatewayProcess, Launch, child_env, write_config
from test_cache import services, wait_live
from test_redis_topologies import cluster, cluster_redis  # noqa: F401 (the fixture)
from topologies import Cluster

TOKEN = "admin-token-0123456789-abcdefghijklmnop"
SECOND_TOKEN = "second-admin-token-0123456789-abcdefgh"
WAIT = 5.0


def admin_section(port: int | None = None) -> dict[str, Any]:
    return {"listen": f"127.0.0.1:{port or free_port()}", "tokens": [TOKEN, SECOND_TOKEN]}


def user(code: str) -> dict[str, str]:
    return {"appid": APPID, "openid": simulator.openid_for(APPID, code)}


def ban_path(code: str) -> str:
    return f"/admin/bans/{APPID}/{simulator.openid_for(APPID, code)}"


def admin_auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def wechat(aiohttp_server: Any) -> TestServer:
    """WeChat whose login codes may be reused: a code names its user here (the simulator's
    openid is a hash of it), so one user logs in several times with one code."""
    app = simulator.create_app({APPID: SECRET, APPID2: SECRET2})
    server: TestServer = await aiohttp_server(app)
    return server


@pytest.fixture
async def pair(make_gateway: GatewayFactory, aiohttp_client: Any
               ) -> tuple[TestClient, TestClient]:
    """A gateway and its admin API, served in this process on real sockets."""
    gw = await make_gateway(admin=admin_section())
    admin: TestClient = await aiohttp_client(create_admin_app(gw.app))
    await wait_live(gw)
    return gw, admin


# --- the index of a user's sessions -----------------------------------------------------------

async def test_sessions_lists_each_live_session_without_a_usable_id(
        pair: tuple[TestClient, TestClient], redis: Any, key_prefix: str) -> None:
    gw, admin = pair
    code = f"user-{uuid.uuid4().hex[:10]}"
    first, second = await login(gw, code), await login(gw, code)
    other = await login(gw)  # another user: not listed
    resp = await admin.get("/admin/sessions", params=user(code), headers=admin_auth())
    assert resp.status == 200
    listed = (await resp.json())["sessions"]
    assert len(listed) == 2 and listed[0]["id"] != listed[1]["id"]
    assert sorted(s["expires_at"] for s in listed) == sorted(
        claims_of(t["token"])["exp"] for t in (first, second))
    for entry in listed:
        assert set(entry) == {"id", "created_at", "expires_at"}
        assert entry["created_at"] <= entry["expires_at"]
        for data in (first, second, other):  # neither the sid nor any part of a token
            sid = claims_of(data["token"])["sid"]
            assert entry["id"] not in data["token"] and entry["id"] not in sid
            assert sid not in entry["id"]
        # the id is not a token either
        assert (await gw.get("/api/x", headers=bearer(entry["id"]))).status == 401

    # logout takes the session out of the index
    assert (await gw.post("/auth/logout", headers=bearer(first["token"]))).status == 204
    resp = await admin.get("/admin/sessions", params=user(code), headers=admin_auth())
    assert [s["expires_at"] for s in (await resp.json())["sessions"]] == [
        claims_of(second["token"])["exp"]]
    sid = claims_of(second["token"])["sid"]
    index = f"{key_prefix}user:{sid[:sid.index('}') + 1]}"
    assert await redis.zrange(index, 0, -1) == [sid.encode()]
    # and the index expires with the user's last session
    assert abs(await redis.ttl(index) - await redis.ttl(f"{key_prefix}session:{sid}")) <= 1


async def test_refresh_moves_the_sessions_expiry_in_the_index(
        make_gateway: GatewayFactory, aiohttp_client: Any) -> None:
    gw = await make_gateway(admin=admin_section(),
                            session={"signing_keys": [SIGNING_KEY], "ttl": "1h"})
    admin = await aiohttp_client(create_admin_app(gw.app))
    code = f"user-{uuid.uuid4().hex[:10]}"
    data = await login(gw, code)
    before = (await (await admin.get("/admin/sessions", params=user(code),
                                      headers=admin_auth())).json())["sessions"]
    await asyncio.sleep(1.1)  # expiry has whole-second resolution
    resp = await gw.post("/auth/refresh", headers=bearer(data["token"]))
    assert resp.status == 200
    renewed = claims_of((await resp.json())["token"])["exp"]
    after = (await (await admin.get("/admin/sessions", params=user(code),
                                     headers=admin_auth())).json())["sessions"]
    assert [s["id"] for s in after] == [s["id"] for s in before]
    assert after[0]["expires_at"] == renewed > before[0]["expires_at"]


async def test_expired_sessions_leave_the_index(
        make_gateway: GatewayFactory, aiohttp_client: Any, redis: Any, key_prefix: str) -> None:
    gw = await make_gateway(admin=admin_section(),
                            session={"signing_keys": [SIGNING_KEY], "ttl": "1s"})
    admin = await aiohttp_client(create_admin_app(gw.app))
    code = f"user-{uuid.uuid4().hex[:10]}"
    data = await login(gw, code)
    sid = claims_of(data["token"])["sid"]
    index = f"{key_prefix}user:{sid[:sid.index('}') + 1]}"
    resp = await admin.get("/admin/sessions", params=user(code), headers=admin_auth())
    assert len((await resp.json())["sessions"]) == 1
    await asyncio.sleep(2.1)
    resp = await admin.get("/admin/sessions", params=user(code), headers=admin_auth())
    assert (await resp.json())["sessions"] == []
    assert await redis.exists(index) == 0  # expired with its last session, or pruned
    resp = await admin.delete("/admin/sessions", params=user(code), headers=admin_auth())
    assert await resp.json() == {"revoked": 0}


async def test_a_revocation_that_read_a_stale_index_ends_no_session_but_sets_its_ban(
        pair: tuple[TestClient, TestClient], redis: Any) -> None:
    gw, _ = pair
    code = f"user-{uuid.uuid4().hex[:10]}"
    first = claims_of((await login(gw, code))["token"])["sid"]
    second = claims_of((await login(gw, code))["token"])["sid"]  # logged in after the read
    store = services(gw).sessions
    who = (APPID, simulator.openid_for(APPID, code))
    # what a revocation that read the index before the second login would pass
    stale = await store._revoke(keys=[store.user_key(*who), store.ban_key(*who), store.key(first)],
                                args=[int(time.time()), store.channel, "0", first])
    assert stale is None
    assert await redis.exists(store.key(first), store.key(second)) == 2
    # the ban holds at once: no login can move the index on while it is read again
    assert await store.banned(*who)
    assert sorted(await store.revoke(*who)) == sorted([first, second])


async def test_a_ban_holds_against_a_user_logging_in_all_the_while(
        pair: tuple[TestClient, TestClient], monkeypatch: pytest.MonkeyPatch) -> None:
    gw, admin = pair
    code = f"user-{uuid.uuid4().hex[:10]}"
    await login(gw, code)
    store = services(gw).sessions
    who = (APPID, simulator.openid_for(APPID, code))
    revoke_script = store._revoke
    logins: list[bool] = []

    async def login_in_between(**kwargs: Any) -> Any:  # each time after the index was read
        logins.append(await store.create(*who, None, "k", 60) is not None)
        return await revoke_script(**kwargs)

    monkeypatch.setattr(store, "_revoke", login_in_between)
    resp = await admin.put(f"/admin/bans/{who[0]}/{who[1]}", headers=admin_auth())
    assert resp.status == 204, await resp.text()
    assert logins == [True, False]
    assert await store.sessions_of(*who) == []


async def test_sessions_from_before_the_index_keep_working_and_a_ban_stops_their_refresh(
        pair: tuple[TestClient, TestClient], redis: Any, key_prefix: str) -> None:
    gw, admin = pair
    code = f"user-{uuid.uuid4().hex[:10]}"
    openid = simulator.openid_for(APPID, code)
    s = services(gw)
    sid = "legacysid0123456789abcd"  # no hash tag: as sids were made before the index
    now = int(time.time())
    await redis.hset(f"{key_prefix}session:{sid}", mapping={
        "o": openid, "u": "", "a": APPID, "c": now, "e": now + 3600,
        "k": s.keyring.seal_bytes(b"k" * 16, f"{APPID}/{sid}".encode())})
    await redis.expireat(f"{key_prefix}session:{sid}", now + 3600)
    token = s.tokens.mint(sid, openid, APPID, now, now + 3600)
    assert (await gw.get("/api/x", headers=bearer(token))).status == 200
    resp = await gw.post("/auth/refresh", headers=bearer(token))
    assert resp.status == 200
    resp = await admin.put(ban_path(code), headers=admin_auth())
    assert resp.status == 204
    await expect_error(await gw.post("/auth/refresh", headers=bearer(token)), 403,
                       "user_blocked")
    assert (await gw.post("/auth/logout", headers=bearer(token))).status == 204
    assert await redis.exists(f"{key_prefix}session:{sid}") == 0


# --- revoke and ban, across replicas -----------------------------------------------------------

@pytest.fixture
async def ws_upstream(aiohttp_server: Any) -> TestServer:
    async def handler(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return web.json_response({"openid": request.headers.get("X-WX-OpenID")})
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            await ws.send_str("echo:" + msg.data)
        return ws

    app = web.Application()
    app.router.add_route("*", "/{t:.*}", handler)
    server: TestServer = await aiohttp_server(app)
    return server


@pytest.fixture
async def replicas(launch: Launch, config_dict: dict[str, Any], ws_upstream: TestServer
                   ) -> AsyncIterator[tuple[GatewayProcess, GatewayProcess, str, str]]:
    """Two real gateway processes sharing one Redis: A serves the admin API, B serves users
    (its session cache live). Yields A, B, A's admin url, a fresh user's login code."""
    data = copy.deepcopy(config_dict)
    data["routes"] = [{"path": "/ws/", "upstream": f"http://127.0.0.1:{ws_upstream.port}"}]
    port = free_port()
    a = await launch({**data, "admin": admin_section(port)})
    b = await launch(data)
    async with aiohttp.ClientSession() as http:
        await a.wait_healthy(http)
        await b.wait_healthy(http)
    await b.wait_for_line(lambda line: "session cache on" in line)
    yield a, b, f"http://127.0.0.1:{port}", f"user-{uuid.uuid4().hex[:10]}"
    a.assert_no_internal_failure()
    b.assert_no_internal_failure()


async def call(http: aiohttp.ClientSession, method: str, url: str, *,
               token: str = TOKEN, **kwargs: Any) -> tuple[int, Any]:
    async with http.request(method, url, headers=admin_auth(token), **kwargs) as resp:
        body = await resp.read()
        return resp.status, json.loads(body) if body else None


async def user_login(http: aiohttp.ClientSession, gw: GatewayProcess, code: str
                     ) -> tuple[int, Any]:
    async with http.post(f"{gw.url}/auth/login", json={"code": code}) as resp:
        return resp.status, await resp.json()


async def test_revoke_on_one_replica_ends_sessions_on_another_and_closes_its_websocket(
        replicas: tuple[GatewayProcess, GatewayProcess, str, str]) -> None:
    a, b, admin_url, code = replicas
    async with aiohttp.ClientSession() as http:
        tokens = [(await user_login(http, b, code))[1]["token"] for _ in range(3)]
        bystander = (await user_login(http, b, f"user-{uuid.uuid4().hex[:10]}"))[1]["token"]
        for token in tokens:  # B has each identity cached
            async with http.get(f"{b.url}/ws/x", headers=bearer(token)) as resp:
                assert resp.status == 200
        async with http.ws_connect(f"{b.url}/ws/chat", headers=bearer(tokens[0])) as ws:
            await ws.send_str("hi")
            assert (await asyncio.wait_for(ws.receive(), WAIT)).data == "echo:hi"
            status, body = await call(http, "GET", f"{admin_url}/admin/sessions",
                                      params=user(code))
            assert status == 200 and len(body["sessions"]) == 3
            status, body = await call(http, "DELETE", f"{admin_url}/admin/sessions",
                                      params=user(code))
            assert (status, body) == (200, {"revoked": 3})
            started = time.monotonic()
            msg = await asyncio.wait_for(ws.receive(), WAIT)
            closed_after = time.monotonic() - started
            assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSED)
            assert ws.close_code == aiohttp.WSCloseCode.POLICY_VIOLATION
            assert closed_after < 1.0, closed_after  # the invalidation, not the 15 s recheck
        for token in tokens:  # B's very next request: refused
            async with http.get(f"{b.url}/ws/x", headers=bearer(token)) as resp:
                assert resp.status == 401
        async with http.get(f"{b.url}/ws/x", headers=bearer(bystander)) as resp:
            assert resp.status == 200  # another user's session is untouched
        status, body = await call(http, "GET", f"{admin_url}/admin/sessions", params=user(code))
        assert (status, body) == (200, {"sessions": []})
        # revoking is not banning: the user logs in again
        assert (await user_login(http, b, code))[0] == 200


async def test_ban_refuses_login_and_refresh_until_lifted(
        replicas: tuple[GatewayProcess, GatewayProcess, str, str]) -> None:
    a, b, admin_url, code = replicas
    async with aiohttp.ClientSession() as http:
        token = (await user_login(http, b, code))[1]["token"]
        async with http.ws_connect(f"{b.url}/ws/chat", headers=bearer(token)) as ws:
            status, _ = await call(http, "PUT", f"{admin_url}{ban_path(code)}", json={})
            assert status == 204
            await asyncio.wait_for(ws.receive(), WAIT)
            assert ws.close_code == aiohttp.WSCloseCode.POLICY_VIOLATION
        async with http.get(f"{b.url}/ws/x", headers=bearer(token)) as resp:
            assert resp.status == 401
        async with http.post(f"{b.url}/auth/refresh", headers=bearer(token)) as resp:
            assert resp.status == 401
        for gw in (a, b):
            async with http.post(f"{gw.url}/auth/login", json={"code": code}) as resp:
                await expect_error(resp, 403, "user_blocked")
        # other users still log in
        assert (await user_login(http, b, f"user-{uuid.uuid4().hex[:10]}"))[0] == 200
        status, _ = await call(http, "DELETE", f"{admin_url}{ban_path(code)}")
        assert status == 204
        status, body = await call(http, "DELETE", f"{admin_url}{ban_path(code)}")
        assert status == 404 and body["error"] == "not_found"
        status, body = await user_login(http, b, code)
        assert status == 200
        async with http.post(f"{b.url}/auth/refresh", headers=bearer(body["token"])) as resp:
            assert resp.status == 200
        async with http.get(f"{a.url}/metrics") as resp:
            text = await resp.text()
        assert "wxgw_logins_banned_total 1.0" in text  # A's own: the login refused on A
        assert 'wxgw_bans_total{action="ban"} 1.0' in text
        assert 'wxgw_bans_total{action="unban"} 1.0' in text
        assert ('wxgw_admin_requests_total{endpoint="unban",outcome="not_found",token="0"} 1.0'
                in text)
        assert "wxgw_sessions_revoked_total 1.0" in text


async def test_ban_with_a_ttl_ends_by_itself(pair: tuple[TestClient, TestClient],
                                            redis: Any, key_prefix: str) -> None:
    gw, admin = pair
    code = f"user-{uuid.uuid4().hex[:10]}"
    resp = await admin.put(ban_path(code), json={"ttl": "1500ms"}, headers=admin_auth())
    assert resp.status == 204
    await expect_error(await gw.post("/auth/login", json={"code": code}), 403, "user_blocked")
    bans = [k async for k in redis.scan_iter(match=f"{key_prefix}ban:*")]
    assert len(bans) == 1 and 0 < await redis.pttl(bans[0]) <= 1500
    await asyncio.sleep(1.6)
    assert (await gw.post("/auth/login", json={"code": code})).status == 200
    # seconds as a number, and a ban without ttl has no expiry
    code2 = f"user-{uuid.uuid4().hex[:10]}"
    assert (await admin.put(ban_path(code2), json={"ttl": 60}, headers=admin_auth())).status == 204
    code3 = f"user-{uuid.uuid4().hex[:10]}"
    assert (await admin.put(ban_path(code3), headers=admin_auth())).status == 204
    ttls = sorted([await redis.ttl(k) async for k in redis.scan_iter(match=f"{key_prefix}ban:*")])
    assert ttls[0] == -1 and 55 <= ttls[1] <= 60


# --- who may call it, and what it refuses ------------------------------------------------------

async def test_a_wrong_or_missing_admin_token_gets_401(
        pair: tuple[TestClient, TestClient]) -> None:
    gw, admin = pair
    code = f"user-{uuid.uuid4().hex[:10]}"
    await login(gw, code)
    for headers in ({}, {"Authorization": "Bearer"}, admin_auth(TOKEN[:-1]),
                    admin_auth(TOKEN + "x"), admin_auth(TOKEN.upper()),
                    {"Authorization": f"Basic {TOKEN}"},
                    # a user's own session token is no admin token
                    bearer((await login(gw, code))["token"])):
        for method, path in (("GET", "/admin/sessions"), ("DELETE", "/admin/sessions"),
                             ("PUT", ban_path(code)), ("DELETE", ban_path(code))):
            resp = await admin.request(method, path, params=user(code), headers=headers)
            await expect_error(resp, 401, "unauthorized")
            assert resp.headers["WWW-Authenticate"] == "Bearer"
    # nothing happened to the user
    assert (await login(gw, code))["token"]
    resp = await admin.get("/admin/sessions", params=user(code),
                           headers=admin_auth(SECOND_TOKEN))
    assert resp.status == 200 and len((await resp.json())["sessions"]) == 3
    text = await (await gw.get("/metrics")).text()
    assert 'wxgw_admin_requests_total{endpoint="sessions",outcome="ok",token="1"} 1.0' in text
    assert ('wxgw_admin_requests_total{endpoint="ban",outcome="unauthorized",token="none"} 7.0'
            in text)
    assert TOKEN not in text and SECOND_TOKEN not in text


async def test_two_authorization_headers_are_refused(pair: tuple[TestClient, TestClient]) -> None:
    _, admin = pair
    headers = [("Authorization", f"Bearer {TOKEN}"), ("Authorization", "Bearer x")]
    resp = await admin.get("/admin/sessions", params=user("x"), headers=headers)
    await expect_error(resp, 400, "invalid_request")


# "o1\n": another user than o1 (a regex "$" would have let the newline through)
BAD_OPENIDS = ["a" * 65, "o/../x", "o x", "o%2Fx", "ｏpenid", "o\u200bx", "o.x", "o\x00", "o1\n"]


async def test_malformed_users_and_unknown_apps(pair: tuple[TestClient, TestClient]) -> None:
    _, admin = pair
    for openid in BAD_OPENIDS:
        resp = await admin.get("/admin/sessions", params={"appid": APPID, "openid": openid},
                               headers=admin_auth())
        await expect_error(resp, 400, "invalid_request")
        resp = await admin.delete("/admin/sessions",
                                  params={"appid": APPID, "openid": openid},
                                  headers=admin_auth())
        await expect_error(resp, 400, "invalid_request")
    for openid in ("a" * 65, "o x", "o.x", "o%00", "o1%0A"):
        resp = await admin.put(f"/admin/bans/{APPID}/{openid}", headers=admin_auth())
        await expect_error(resp, 400, "invalid_request")
    for params in ({}, {"appid": APPID}, {"openid": "o123"}, {"appid": "", "openid": "o1"}):
        resp = await admin.get("/admin/sessions", params=params, headers=admin_auth())
        await expect_error(resp, 400, "invalid_request")
    resp = await admin.get("/admin/sessions", params={"appid": "wxunknown", "openid": "o1"},
                           headers=admin_auth())
    await expect_error(resp, 404, "not_found")
    resp = await admin.put("/admin/bans/wxunknown/o1", headers=admin_auth())
    await expect_error(resp, 404, "not_found")
    # the longest and shortest openids allowed are accepted
    for openid in ("a" * 64, "o", "o_-9Z"):
        resp = await admin.get("/admin/sessions", params={"appid": APPID, "openid": openid},
                               headers=admin_auth())
        assert resp.status == 200, openid


async def test_ban_bodies_that_are_refused(pair: tuple[TestClient, TestClient]) -> None:
    gw, admin = pair
    code = f"user-{uuid.uuid4().hex[:10]}"
    for body in (b"[]", b"{", b'"30d"', b'{"ttl": "soon"}', b'{"ttl": -5}', b'{"ttl": 0}',
                 b'{"ttl": true}', b'{"ttl": {}}', b'{"ttl": "400d"}', b'{"tll": "1d"}',
                 b'{"ttl": 1e999}'):
        resp = await admin.put(ban_path(code), data=body, headers=admin_auth())
        await expect_error(resp, 400, "invalid_request")
    resp = await admin.put(ban_path(code), data=b"{" + b" " * 20000 + b"}", headers=admin_auth())
    await expect_error(resp, 413, "payload_too_large")
    # none of those banned anyone
    assert (await login(gw, code))["token"]
    # wrong method, unknown path: JSON errors too
    await expect_error(await admin.post("/admin/sessions", headers=admin_auth()), 405,
                       "method_not_allowed")
    await expect_error(await admin.get("/admin/other", headers=admin_auth()), 404, "not_found")


# --- Redis Cluster ------------------------------------------------------------------------------

async def test_index_revoke_and_ban_in_a_redis_cluster(
        make_gateway: GatewayFactory, aiohttp_client: Any, cluster: Cluster,  # noqa: F811
        key_prefix: str) -> None:
    gw = await make_gateway(redis=cluster_redis(cluster, key_prefix), admin=admin_section())
    admin = await aiohttp_client(create_admin_app(gw.app))
    codes = [f"user-{uuid.uuid4().hex[:10]}" for _ in range(6)]  # users on several masters
    tokens = {code: [(await login(gw, code))["token"] for _ in range(2)] for code in codes}
    slots = set()
    for code in codes:
        sid = claims_of(tokens[code][0])["sid"]
        slots.add(sid[:sid.index("}") + 1])
        resp = await admin.get("/admin/sessions", params=user(code), headers=admin_auth())
        assert resp.status == 200 and len((await resp.json())["sessions"]) == 2
    assert len(slots) == len(codes)
    assert (await gw.post("/auth/logout", headers=bearer(tokens[codes[0]][0]))).status == 204
    assert (await gw.post("/auth/refresh", headers=bearer(tokens[codes[0]][1]))).status == 200
    resp = await admin.delete("/admin/sessions", params=user(codes[0]), headers=admin_auth())
    assert await resp.json() == {"revoked": 1}
    resp = await admin.put(ban_path(codes[1]), json={"ttl": "1h"}, headers=admin_auth())
    assert resp.status == 204
    for token in tokens[codes[0]] + tokens[codes[1]]:
        assert (await gw.get("/api/x", headers=bearer(token))).status == 401, (
            tokens[codes[0]] + tokens[codes[1]]).index(token)
    await expect_error(await gw.post("/auth/login", json={"code": codes[1]}), 403,
                       "user_blocked")
    for code in codes[2:]:
        assert (await gw.get("/api/x", headers=bearer(tokens[code][0]))).status == 200
    assert (await admin.delete(ban_path(codes[1]), headers=admin_auth())).status == 204
    assert (await login(gw, codes[1]))["token"]


# --- configuration -----------------------------------------------------------------------------

def test_admin_configuration(config_dict: dict[str, Any]) -> None:
    assert loader.parse(config_dict, environ={}).admin.listen is None
    config = loader.parse({**config_dict, "admin": admin_section(9999)}, environ={})
    assert config.admin.listen == ("127.0.0.1", 9999)
    assert config.admin.tokens == (TOKEN.encode(), SECOND_TOKEN.encode())
    assert TOKEN not in repr(config)
    for admin, key in (({"listen": "127.0.0.1:9999"}, "admin.tokens"),
                       ({"listen": "127.0.0.1:9999", "tokens": []}, "admin.tokens"),
                       ({"listen": "127.0.0.1:9999", "tokens": ["short"]}, "admin.tokens[0]"),
                       ({"listen": "nope", "tokens": [TOKEN]}, "admin.listen"),
                       ({"tokens": TOKEN}, "admin.tokens"),
                       ({"listen": "127.0.0.1:8080", "tokens": [TOKEN]}, "admin.listen"),
                       ({"listne": "x"}, "admin.listne")):
        with pytest.raises(ConfigError) as caught:
            loader.parse({**config_dict, "admin": admin}, environ={})
        assert [p.partition(":")[0] for p in caught.value.problems] == [key], caught.value


async def test_admin_tokens_change_on_reload(
        pair: tuple[TestClient, TestClient], config_dict: dict[str, Any], tmp_path: Path) -> None:
    gw, admin = pair
    listen = gw.app[SERVICES].current.config.admin.listen
    assert listen is not None
    data = {**config_dict, "admin": {"listen": f"{listen[0]}:{listen[1]}",
                                     "tokens": [SECOND_TOKEN]}}
    path = write_config(tmp_path / "gw.yaml", data)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        assert reload_config(gw.app, str(path))
    finally:  # a reload sets up the process's logging; this process is pytest's
        root.handlers[:], root.level = handlers, level
    await expect_error(await admin.get("/admin/sessions", params=user("x"), headers=admin_auth()),
                       401, "unauthorized")
    resp = await admin.get("/admin/sessions", params=user("x"), headers=admin_auth(SECOND_TOKEN))
    assert resp.status == 200


# --- the command line --------------------------------------------------------------------------

def admin_command(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GATEWAY, "admin", *args], env=env, capture_output=True, text=True,
                          timeout=30)


async def test_admin_command_line_against_a_real_gateway(
        replicas: tuple[GatewayProcess, GatewayProcess, str, str]) -> None:
    a, b, admin_url, code = replicas
    who = ["--appid", APPID, "--openid", simulator.openid_for(APPID, code), "--url", admin_url]
    env = child_env(WXGW_ADMIN_TOKEN=TOKEN)
    run = lambda *args, env=env: asyncio.to_thread(admin_command, *args, env=env)  # noqa: E731
    async with aiohttp.ClientSession() as http:
        token = (await user_login(http, b, code))[1]["token"]
        done = await run("sessions", *who)
        assert done.returncode == 0, done.stderr
        assert len(json.loads(done.stdout)["sessions"]) == 1
        done = await run("revoke", *who)
        assert (done.returncode, json.loads(done.stdout)) == (0, {"revoked": 1})
        async with http.get(f"{b.url}/ws/x", headers=bearer(token)) as resp:
            assert resp.status == 401
        done = await run("ban", *who, "--ttl", "30d")
        assert done.returncode == 0 and json.loads(done.stdout)["banned"] is True
        assert (await user_login(http, b, code))[0] == 403
        done = await run("unban", *who)
        assert done.returncode == 0 and json.loads(done.stdout)["banned"] is False
        done = await run("unban", *who)  # not banned any more: the API's 404, exit 1
        assert done.returncode == 1 and json.loads(done.stdout)["error"] == "not_found"
        assert (await user_login(http, b, code))[0] == 200
    # a wrong token: the API's 401, exit 1; no token: exit 2 before any call
    done = await run("sessions", *who, env=child_env(WXGW_ADMIN_TOKEN="x" * 40))
    assert done.returncode == 1 and json.loads(done.stdout)["error"] == "unauthorized"
    done = await run("sessions", *who, "--token-env", "NOT_SET_ANYWHERE_42")
    assert done.returncode == 2 and "NOT_SET_ANYWHERE_42" in done.stderr
    done = await run("sessions", "--appid", APPID, "--openid", "o x", "--url", admin_url)
    assert done.returncode == 1 and json.loads(done.stdout)["error"] == "invalid_request"
    closed = f"http://127.0.0.1:{free_port()}"
    done = await run("sessions", *who[:4], "--url", closed)
    assert done.returncode == 1 and "cannot reach" in done.stderr
    done = await run("bogus", *who)
    assert done.returncode == 2
    # the access line names the admin token by its position, never its value, and shows
    # the openid in a ban's path only as its keyed hash
    lines = [line for line in a.lines() if "/admin/" in line]
    assert len([line for line in lines if "admin_token=0" in line]) == 6, lines
    assert TOKEN not in a.output()
    assert simulator.openid_for(APPID, code) not in a.output()
    assert any(f"/admin/bans/{APPID}/" in line and " 204 " in line for line in lines), lines


async def test_a_taken_admin_port_is_named_at_start(
        launch: Launch, config_dict: dict[str, Any]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        gw = await launch({**config_dict, "admin": admin_section(port)})
        assert await gw.exit_code(within=15) == 1
    assert f"admin.listen: cannot listen on 127.0.0.1:{port}" in gw.output()
    assert "Traceback" not in gw.output()


async def test_only_one_worker_serves_the_admin_api(
        launch: Launch, config_dict: dict[str, Any]) -> None:
    port = free_port()
    gw = await launch({**config_dict, "workers": 2, "admin": admin_section(port),
                       "logging": {"format": "json"}})
    async with aiohttp.ClientSession() as http:
        await gw.wait_healthy(http)
        await gw.wait_for_line(lambda line: "admin API listening" in line)
        await asyncio.sleep(0.5)  # time for a second worker to bind (or fail) too
        status, body = await call(http, "GET", f"http://127.0.0.1:{port}/admin/sessions",
                                  params=user("x"))
        assert status == 200
    assert len([line for line in gw.lines() if "admin API listening" in line]) == 1
    gw.assert_no_internal_failure()


@pytest.mark.parametrize("url", ["127.0.0.1:8081", "http://[::1", "file:///etc/hostname",
                                 "http://", "ftp://127.0.0.1/"])
def test_an_admin_url_that_is_not_http_is_a_wrong_command(
        url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.__main__ import main
    monkeypatch.setenv("WXGW_ADMIN_TOKEN", TOKEN)
    code = main(["admin", "sessions", "--appid", APPID, "--openid", "o1", "--url", url])
    out, err = capsys.readouterr()
    assert (code, out) == (2, ""), err
    assert "--url" in err


async def test_the_main_listener_never_answers_the_admin_api(
        pair: tuple[TestClient, TestClient], wechat: TestServer) -> None:
    gw, _ = pair
    for method, path in (("GET", f"/admin/sessions?appid={APPID}&openid=o1"),
                         ("DELETE", f"/admin/sessions?appid={APPID}&openid=o1"),
                         ("PUT", f"/admin/bans/{APPID}/o1"),
                         ("DELETE", f"/admin/bans/{APPID}/o1")):
        resp = await gw.request(method, path, headers=admin_auth())
        assert (await expect_error(resp, 404, "not_found"))["message"].startswith("no route")


async def test_the_admin_command_takes_a_token_read_from_a_file_with_its_newline(
        pair: tuple[TestClient, TestClient], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.__main__ import main
    _, admin = pair
    url = str(admin.make_url("")).rstrip("/")
    argv = ["admin", "sessions", "--appid", APPID, "--openid", "o1", "--url", url]
    monkeypatch.setenv("WXGW_ADMIN_TOKEN", TOKEN + "\n")
    assert await asyncio.to_thread(main, argv) == 0, capsys.readouterr()
    assert json.loads(capsys.readouterr().out) == {"sessions": []}
    monkeypatch.setenv("WXGW_ADMIN_TOKEN", TOKEN[:10] + "\r\nX: y")
    assert await asyncio.to_thread(main, argv) == 2
    assert "WXGW_ADMIN_TOKEN" in capsys.readouterr().err


async def test_the_admin_command_never_follows_a_redirect_with_its_token(
        aiohttp_server: Any, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.__main__ import main
    seen: list[str | None] = []

    async def elsewhere(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        return web.json_response({"sessions": []})

    other_app = web.Application()
    other_app.router.add_get("/{tail:.*}", elsewhere)
    other = await aiohttp_server(other_app)

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPFound(f"http://127.0.0.1:{other.port}{request.path_qs}")

    app = web.Application()
    app.router.add_get("/{tail:.*}", moved)
    server = await aiohttp_server(app)
    monkeypatch.setenv("WXGW_ADMIN_TOKEN", TOKEN)
    argv = ["admin", "sessions", "--appid", APPID, "--openid", "o1",
            "--url", f"http://127.0.0.1:{server.port}"]
    assert await asyncio.to_thread(main, argv) == 1
    assert seen == [] and TOKEN not in capsys.readouterr().out
