"""The WeChat access-token manager (gateway/access_tokens.py), as several replicas see it.

Each "replica" is an independent ``AccessTokens`` with its own Redis client and its own HTTP
session, all sharing one Redis key prefix and one simulated WeChat. The simulator counts its
``stable_token`` calls: N replicas × M concurrent callers cause one WeChat call; refreshes
happen ahead of expiry; a rejected token is refreshed in normal mode and the call retried once;
``force_refresh`` (which revokes every other holder's token) only when normal mode hands back
the rejected token, at most once per 30 s for the deployment, never when disabled; the lock is
released only by its owner; access tokens never reach a client, an upstream or a log line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from checks import expect_error
from conftest import (APPID, APPID2, SECRET, SECRET2, SIGNING_KEY, GatewayFactory, Upstream,
                      bearer, login)
from gateway.testing import simulator
from gateway.config import App
from gateway.access_tokens import AccessTokens
from gateway.testing.embedded import EmbeddedRedis, free_port
from gateway.errors import GatewayError, InvalidPhoneCode, WeChatError, WeChatUnavailable
from gateway.keys import Keyring
from gateway.wechat import AccessTokenRejected, WeChatClient

APP = App(APPID, SECRET)
APP2 = App(APPID2, SECRET2)
LOCK_TTL = 2.0


# --- a simulated WeChat that also records what stable_token was asked -----------------------

@dataclass
class Sim:
    server: TestServer
    app: web.Application
    token_requests: list[dict[str, Any]] = field(default_factory=list)
    token_replies: list[dict[str, Any]] = field(default_factory=list)
    token_delay: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    @property
    def state(self) -> simulator.SimulatorState:
        return self.app[simulator.STATE]

    def calls(self, name: str) -> int:
        return self.app[simulator.CALLS][name]

    def issued(self) -> set[str]:
        """Every access_token the simulator ever handed out (expired ones too)."""
        return {r["access_token"] for r in self.token_replies if "access_token" in r}


async def start_sim(aiohttp_server: Any, token_ttl: int = 7200) -> Sim:
    app = simulator.create_app({APPID: SECRET, APPID2: SECRET2}, token_ttl=token_ttl)
    sim: Sim

    @web.middleware
    async def observe(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path == "/cgi-bin/stable_token":
            sim.token_requests.append(await request.json())  # the body is cached for the handler
            if sim.token_delay:
                await asyncio.sleep(sim.token_delay)
        response: web.StreamResponse = await handler(request)
        if request.path == "/cgi-bin/stable_token" and isinstance(response, web.Response):
            assert response.text is not None
            sim.token_replies.append(json.loads(response.text))
        return response

    app.middlewares.append(observe)
    # No access log: the simulator's own request lines carry ?access_token=, like WeChat's
    # logs would; what must stay clean is the gateway's side.
    server = await aiohttp_server(app, access_log=None)
    sim = Sim(server, app)
    return sim


@pytest.fixture
async def sim(aiohttp_server: Any) -> Sim:
    return await start_sim(aiohttp_server)


# --- replicas -------------------------------------------------------------------------------

Replicas = Callable[..., Awaitable[list[AccessTokens]]]


@pytest.fixture
async def replicas(redis_server: EmbeddedRedis, key_prefix: str) -> AsyncIterator[Replicas]:
    """``await replicas(n, api_base)`` → n independent managers sharing Redis and the prefix."""
    async with AsyncExitStack() as stack:
        async def make(n: int, api_base: str, lock_ttl: float = LOCK_TTL,
                       timeout: float = 5.0, force_refresh: bool = True) -> list[AccessTokens]:
            managers = []
            for _ in range(n):
                client = aioredis.from_url(redis_server.url)
                stack.push_async_callback(client.aclose)
                http = await stack.enter_async_context(aiohttp.ClientSession())
                wechat = WeChatClient(http, URL(api_base), timeout)
                managers.append(AccessTokens(client, key_prefix, Keyring((SIGNING_KEY.encode(),)),
                                             wechat, lock_ttl=lock_ttl,
                                             force_refresh=force_refresh))
            return managers
        yield make


def wechat_of(manager: AccessTokens) -> WeChatClient:
    wechat: WeChatClient = manager._wechat  # the client the manager was built with
    return wechat


async def get_all(managers: list[AccessTokens], per_manager: int, app: App = APP) -> list[str]:
    return list(await asyncio.gather(*(m.get(app) for m in managers for _ in range(per_manager))))


def token_key(prefix: str, appid: str = APPID) -> str:
    return f"{prefix}access_token:{appid}"


def lock_key(prefix: str, appid: str = APPID) -> str:
    return f"{prefix}access_token_lock:{appid}"


def force_key(prefix: str, appid: str = APPID) -> str:
    return f"{prefix}access_token_force:{appid}"


async def other_holder_forces(sim: Sim, appid: str = APPID, secret: str = SECRET) -> str:
    """What another backend of the same appid does: stable_token with force_refresh."""
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{sim.url}/cgi-bin/stable_token", json={
                "grant_type": "client_credential", "appid": appid, "secret": secret,
                "force_refresh": True}) as resp:
            token: str = json.loads(await resp.text())["access_token"]
    return token


# --- one WeChat call for N replicas × M callers ----------------------------------------------

async def test_concurrent_callers_on_many_replicas_cause_one_wechat_call(
        sim: Sim, replicas: Replicas) -> None:
    managers = await replicas(5, sim.url)
    tokens = await get_all(managers, 40)
    assert sim.calls("stable_token") == 1
    assert len(tokens) == 200 and len(set(tokens)) == 1
    assert tokens[0] in sim.issued()
    assert sim.token_requests == [{"grant_type": "client_credential", "appid": APPID,
                                   "secret": SECRET, "force_refresh": False}]
    # And later callers, on any replica, are served from Redis.
    assert set(await get_all(managers, 10)) == {tokens[0]}
    assert sim.calls("stable_token") == 1


async def test_a_new_replica_uses_the_cached_token(sim: Sim, replicas: Replicas) -> None:
    [first] = await replicas(1, sim.url)
    token = await first.get(APP)
    [late] = await replicas(1, sim.url)
    assert await late.get(APP) == token
    assert sim.calls("stable_token") == 1


async def test_each_app_has_its_own_token(sim: Sim, replicas: Replicas) -> None:
    managers = await replicas(3, sim.url)
    asked = [app for _ in managers for app in (APP, APP2) for _ in range(10)]
    results = await asyncio.gather(*(m.get(app) for m in managers for app in (APP, APP2)
                                     for _ in range(10)))
    by_app = {appid: {t for a, t in zip(asked, results) if a.appid == appid}
              for appid in (APPID, APPID2)}
    assert all(len(v) == 1 for v in by_app.values()), by_app
    assert by_app[APPID] != by_app[APPID2]
    assert sim.calls("stable_token") == 2
    assert sorted(r["appid"] for r in sim.token_requests) == sorted([APPID, APPID2])
    for appid, (token,) in by_app.items():
        assert sim.state.tokens[token][0] == appid


async def test_cached_token_is_sealed_and_expires_with_the_token(
        sim: Sim, replicas: Replicas, redis: aioredis.Redis, key_prefix: str) -> None:
    [manager] = await replicas(1, sim.url)
    token = await manager.get(APP)
    raw = await redis.get(token_key(key_prefix))
    assert raw is not None
    assert token.encode() not in raw
    assert token.rsplit(".", 1)[-1].encode() not in raw  # not even its random part
    assert SECRET.encode() not in raw
    # Expires with the token (the simulator's default 7200 s), not later and not much earlier.
    pttl = await redis.pttl(token_key(key_prefix))
    assert 7190_000 <= pttl <= 7200_000, pttl
    # Every key the manager wrote starts with the prefix; the lock is gone.
    assert await redis.exists(lock_key(key_prefix)) == 0
    assert {k.decode() async for k in redis.scan_iter(match=f"{key_prefix}*")} == {
        token_key(key_prefix)}


async def test_damaged_cache_entry_is_replaced(
        sim: Sim, replicas: Replicas, redis: aioredis.Redis, key_prefix: str) -> None:
    await redis.set(token_key(key_prefix), b"not-a-sealed-value")
    [manager] = await replicas(1, sim.url)
    token = await manager.get(APP)
    assert token in sim.issued()
    assert sim.calls("stable_token") == 1
    assert await redis.get(token_key(key_prefix)) != b"not-a-sealed-value"


async def test_cache_sealed_under_another_key_is_not_trusted(
        sim: Sim, replicas: Replicas, redis: aioredis.Redis, key_prefix: str) -> None:
    """A value another deployment (other signing key) wrote is refetched, not misread."""
    [manager] = await replicas(1, sim.url)
    foreign = Keyring((b"another-signing-key-0123456789-abcdef",)).seal(
        json.dumps({"token": "AT.forged", "refresh_at": time.time() + 3600,
                    "expires_at": time.time() + 7200}).encode(), f"access_token/{APPID}".encode())
    await redis.set(token_key(key_prefix), foreign)
    token = await manager.get(APP)
    assert token != "AT.forged" and token in sim.issued()
    assert sim.calls("stable_token") == 1


# --- refreshed ahead of expiry -----------------------------------------------------------------

async def sleep_until(deadline: float) -> None:
    await asyncio.sleep(max(0.0, deadline - time.monotonic()))


async def test_refresh_happens_once_at_80_percent_of_expires_in(
        aiohttp_server: Any, replicas: Replicas) -> None:
    sim = await start_sim(aiohttp_server, token_ttl=5)  # refresh due at 4 s
    managers = await replicas(4, sim.url)
    started = time.monotonic()
    first = set(await get_all(managers, 20))
    assert len(first) == 1 and sim.calls("stable_token") == 1
    (token,) = first

    await sleep_until(started + 3.3)  # before the refresh point: nobody calls WeChat
    assert set(await get_all(managers, 20)) == {token}
    assert sim.calls("stable_token") == 1

    await sleep_until(started + 4.3)  # past it, still before expiry: exactly one refresh
    results = await asyncio.gather(*(m.get(APP) for m in managers for _ in range(20)),
                                   return_exceptions=True)
    failures = [r for r in results if isinstance(r, BaseException)]
    assert failures == [], f"{len(failures)} callers failed, e.g. {failures[0]!r}"
    assert sim.calls("stable_token") == 2
    # Callers get the refreshed token or, while it is being fetched, the still-valid one:
    # either way a token WeChat accepts right now.
    for token in set(map(str, results)):
        info = await wechat_of(managers[0]).phone_number(APP, token, "refresh-check")
        assert info["purePhoneNumber"] == simulator.phone_for("refresh-check")


async def test_failed_early_refresh_keeps_serving_the_still_valid_token(
        aiohttp_server: Any, replicas: Replicas) -> None:
    """Refreshing at 80 % leaves a margin: WeChat failing then must not fail callers whose
    cached token is still valid for another fifth of its life."""
    sim = await start_sim(aiohttp_server, token_ttl=3)  # refresh due at 2.4 s, expiry at 3 s
    [live] = await replicas(1, sim.url)
    [cut_off] = await replicas(1, f"http://127.0.0.1:{free_port()}")  # this replica's WeChat is down
    started = time.monotonic()
    token = await live.get(APP)
    await sleep_until(started + 2.5)
    assert await cut_off.get(APP) == token


async def test_expired_cache_is_refetched_once(
        aiohttp_server: Any, replicas: Replicas, redis: aioredis.Redis, key_prefix: str) -> None:
    sim = await start_sim(aiohttp_server, token_ttl=2)
    managers = await replicas(3, sim.url)
    (old,) = set(await get_all(managers, 10))
    pttl = await redis.pttl(token_key(key_prefix))
    assert 0 < pttl <= 2000
    await asyncio.sleep(2.2)  # the token and its cache entry have expired
    assert await redis.exists(token_key(key_prefix)) == 0
    (new,) = set(await get_all(managers, 10))
    assert new != old
    assert sim.calls("stable_token") == 2
    assert sim.token_requests[-1]["force_refresh"] is False  # nothing was rejected


# --- rejected by WeChat: refresh in normal mode, force only when that gives the same token ----

def forced(sim: Sim) -> list[bool]:
    return [bool(r.get("force_refresh")) for r in sim.token_requests]


async def test_rejected_token_is_refreshed_in_normal_mode_and_the_call_retried(
        sim: Sim, replicas: Replicas) -> None:
    [manager] = await replicas(1, sim.url)
    old = await manager.get(APP)
    sim.state.expire_access_tokens()  # WeChat now answers 40001 to the cached token
    seen: list[str] = []

    async def phone(token: str) -> dict[str, Any]:
        seen.append(token)
        return await wechat_of(manager).phone_number(APP, token, "code-rejected")

    info = await manager.call(APP, phone)
    assert info["purePhoneNumber"] == simulator.phone_for("code-rejected")
    assert forced(sim) == [False, False]  # normal mode already gives a new token
    assert sim.state.force_calls[APPID] == 0
    assert sim.calls("getuserphonenumber") == 2
    assert seen[0] == old and seen[1] != old and len(seen) == 2
    assert await manager.get(APP) == seen[1]  # the new token is what is cached now
    assert sim.calls("stable_token") == 2


async def test_force_only_when_normal_mode_hands_back_the_rejected_token(
        sim: Sim, replicas: Replicas, redis: aioredis.Redis, key_prefix: str) -> None:
    [manager] = await replicas(1, sim.url)
    old = await manager.get(APP)
    assert sim.state.reject_access_token(APPID) == old  # refused, yet still handed out
    info = await manager.call(APP, lambda t: wechat_of(manager).phone_number(APP, t, "code-forced"))
    assert info["purePhoneNumber"] == simulator.phone_for("code-forced")
    assert forced(sim) == [False, False, True]
    assert sim.state.force_calls[APPID] == 1
    new = await manager.get(APP)
    assert new != old and old not in sim.state.tokens  # the forced refresh revoked it
    # The deployment-wide gate: a Redis key under the prefix, expiring after 30 s.
    assert 29_000 < await redis.pttl(force_key(key_prefix)) <= 30_000


async def test_rejection_seen_by_many_replicas_causes_one_refresh(
        sim: Sim, replicas: Replicas) -> None:
    managers = await replicas(5, sim.url)
    await get_all(managers, 1)
    sim.state.expire_access_tokens()
    before = sim.calls("stable_token")
    results = await asyncio.gather(*(
        m.call(APP, lambda t, m=m, i=i: wechat_of(m).phone_number(APP, t, f"code-{i}"))
        for m in managers for i in range(8)))
    assert [r["purePhoneNumber"] for r in results] == [
        simulator.phone_for(f"code-{i}") for _ in managers for i in range(8)]
    assert sim.calls("stable_token") - before == 1
    assert not any(forced(sim))
    assert sim.calls("getuserphonenumber") <= 80  # at most one retry per call


async def test_rejected_token_still_handed_out_is_forced_once_by_many_replicas(
        sim: Sim, replicas: Replicas) -> None:
    managers = await replicas(5, sim.url)
    (old,) = set(await get_all(managers, 1))
    sim.state.reject_access_token(APPID)
    results = await asyncio.gather(*(
        m.call(APP, lambda t, m=m, i=i: wechat_of(m).phone_number(APP, t, f"code-{i}"))
        for m in managers for i in range(8)))
    assert [r["purePhoneNumber"] for r in results] == [
        simulator.phone_for(f"code-{i}") for _ in managers for i in range(8)]
    assert sim.state.force_calls[APPID] == 1
    assert set(await get_all(managers, 1)) - {old}


async def test_force_is_gated_for_30_seconds_across_replicas(
        sim: Sim, replicas: Replicas, redis: aioredis.Redis, key_prefix: str) -> None:
    """Another replica forced a moment ago (its gate key is set): WeChat would ignore a second
    force within 30 s anyway, so the call fails with 503 instead of forcing or looping."""
    a, b = await replicas(2, sim.url)
    await a.get(APP)
    await redis.set(force_key(key_prefix), "1", px=30_000)
    sim.state.reject_access_token(APPID)
    started = time.monotonic()
    for manager in (a, b, a, b):
        with pytest.raises(WeChatUnavailable):
            await manager.call(APP, lambda t, m=manager: wechat_of(m).phone_number(APP, t, "gated"))
    assert time.monotonic() - started < 1
    assert sim.state.force_calls[APPID] == 0
    # One normal-mode call per replica: a replica that just saw WeChat hand the rejected token
    # back does not ask again on every call.
    assert forced(sim) == [False, False, False]
    assert sim.calls("getuserphonenumber") == 4
    # Once the gate is gone (30 s later), one replica forces and every call works again.
    await redis.delete(force_key(key_prefix))
    await asyncio.sleep(1.1)
    info = await b.call(APP, lambda t: wechat_of(b).phone_number(APP, t, "after-gate"))
    assert info["purePhoneNumber"] == simulator.phone_for("after-gate")
    assert sim.state.force_calls[APPID] == 1


async def test_force_that_wechat_ignores_fails_the_call_without_looping(
        sim: Sim, replicas: Replicas) -> None:
    """Our gate is free but another holder forced under 30 s ago: WeChat ignores our force and
    returns the rejected token again. 503 at once, no retry with a token known to be refused,
    never a second force."""
    [manager] = await replicas(1, sim.url)
    await manager.get(APP)
    sim.state.forced_at[APPID] = [time.time()]  # someone else's force, a moment ago
    sim.state.reject_access_token(APPID)
    with pytest.raises(WeChatUnavailable):
        await manager.call(APP, lambda t: wechat_of(manager).phone_number(APP, t, "ignored"))
    assert forced(sim) == [False, False, True]
    assert sim.calls("getuserphonenumber") == 1
    await asyncio.sleep(1.1)
    with pytest.raises(WeChatUnavailable):  # and our gate now holds for 30 s
        await manager.call(APP, lambda t: wechat_of(manager).phone_number(APP, t, "ignored-2"))
    assert forced(sim) == [False, False, True, False]
    assert sim.state.force_calls[APPID] == 1


async def test_force_refresh_off_never_forces(
        sim: Sim, replicas: Replicas, redis: aioredis.Redis, key_prefix: str) -> None:
    [manager] = await replicas(1, sim.url, force_refresh=False)
    old = await manager.get(APP)
    sim.state.reject_access_token(APPID)
    with pytest.raises(WeChatUnavailable) as caught:
        await manager.call(APP, lambda t: wechat_of(manager).phone_number(APP, t, "off"))
    assert caught.value.status == 503 and caught.value.code == "wechat_unavailable"
    assert sim.state.force_calls[APPID] == 0 and not any(forced(sim))
    assert await redis.exists(force_key(key_prefix)) == 0
    # It still recovers in normal mode once WeChat hands out another token.
    sim.state.expire_access_tokens()
    await asyncio.sleep(1.1)
    info = await manager.call(APP, lambda t: wechat_of(manager).phone_number(APP, t, "off-later"))
    assert info["purePhoneNumber"] == simulator.phone_for("off-later")
    assert await manager.get(APP) != old
    assert sim.state.force_calls[APPID] == 0 and not any(forced(sim))


async def test_another_holder_forcing_is_followed_in_normal_mode(
        sim: Sim, replicas: Replicas) -> None:
    """Another backend of the same appid force-refreshes: the gateway's token dies, and the
    gateway takes the new one in normal mode, leaving the other holder's token alive."""
    managers = await replicas(3, sim.url)
    (mine,) = set(await get_all(managers, 1))
    theirs = await other_holder_forces(sim)
    assert theirs != mine and mine not in sim.state.tokens
    results = await asyncio.gather(*(
        m.call(APP, lambda t, m=m, i=i: wechat_of(m).phone_number(APP, t, f"code-{i}"))
        for m in managers for i in range(5)))
    assert len(results) == 15
    assert set(await get_all(managers, 1)) == {theirs}
    assert sim.state.force_calls[APPID] == 1  # the other holder's, not ours
    # Ours, the other holder's force, then our one refresh: normal mode.
    assert forced(sim) == [False, True, False]
    assert sim.state.tokens[theirs][0] == APPID  # still valid for the other holder


async def test_gateway_with_force_refresh_off_answers_503_and_never_forces(
        make_gateway: GatewayFactory, aiohttp_server: Any) -> None:
    sim = await start_sim(aiohttp_server)
    gw = await make_gateway(wechat={"api_base": sim.url, "timeout": "2s",
                                    "force_refresh": False})
    session = await login(gw)
    resp = await gw.post("/auth/phone", json={"code": "p1"}, headers=bearer(session["token"]))
    assert resp.status == 200, await resp.text()
    sim.state.reject_access_token(APPID)
    for code in ("p2", "p3"):
        resp = await gw.post("/auth/phone", json={"code": code},
                             headers=bearer(session["token"]))
        await expect_error(resp, 503, "wechat_unavailable")
    assert sim.state.force_calls[APPID] == 0 and not any(forced(sim))


async def test_simulator_stable_token_follows_the_doc(sim: Sim) -> None:
    async def ask(force: bool) -> dict[str, Any]:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{sim.url}/cgi-bin/stable_token", json={
                    "grant_type": "client_credential", "appid": APPID, "secret": SECRET,
                    "force_refresh": force}) as resp:
                reply: dict[str, Any] = json.loads(await resp.text())
        return reply

    first = await ask(False)
    await asyncio.sleep(1.1)
    again = await ask(False)  # normal mode: the same token, its remaining lifetime
    assert again["access_token"] == first["access_token"]
    assert again["expires_in"] < first["expires_in"] == 7200
    forced_once = await ask(True)  # revokes the previous one
    assert forced_once["access_token"] != first["access_token"]
    assert first["access_token"] not in sim.state.tokens
    within_30s = await ask(True)  # ignored: the current token, nothing revoked
    assert within_30s["access_token"] == forced_once["access_token"]
    assert forced_once["access_token"] in sim.state.tokens
    assert sim.state.force_calls[APPID] == 2
    sim.state.force_interval = 0
    for _ in range(19):  # 20 effective forces a day (the one ignored does not count)
        assert "access_token" in await ask(True)
    assert (await ask(True))["errcode"] == 45009
    assert sim.state.force_calls[APPID] == 22


@pytest.mark.parametrize("errcode", [40001, 42001, 40014])
async def test_wechat_that_keeps_rejecting_is_retried_once_only(
        sim: Sim, replicas: Replicas, errcode: int) -> None:
    [manager] = await replicas(1, sim.url)
    await manager.get(APP)
    with pytest.raises(AccessTokenRejected):
        # The simulator answers this errcode to every attempt, whatever the token.
        await manager.call(APP, lambda t: wechat_of(manager).phone_number(APP, t, f"errcode-{errcode}-x"))
    assert sim.calls("getuserphonenumber") == 2
    # Normal mode gave the rejected token back: one force (the gate allows it), one retry.
    assert forced(sim) == [False, False, True]


@pytest.mark.parametrize("code,raised", [
    ("errstr-40001-x", AccessTokenRejected),
    ("errstr-42001-x", AccessTokenRejected),
    ("errstr-40029-x", InvalidPhoneCode),
    ("errstr--1-x", WeChatUnavailable),
    ("errstr-oops-x", WeChatError),
])
async def test_string_errcodes_are_read_as_numbers(
        sim: Sim, replicas: Replicas, code: str, raised: type[Exception]) -> None:
    [manager] = await replicas(1, sim.url)
    with pytest.raises(raised) as caught:
        await manager.call(APP, lambda t: wechat_of(manager).phone_number(APP, t, code))
    assert type(caught.value) is raised
    rejected = raised is AccessTokenRejected
    assert sim.calls("getuserphonenumber") == (2 if rejected else 1)  # retried only if rejected


@pytest.mark.parametrize("errcode,code", [("45009", "rate_limited"), ("-1", "wechat_unavailable"),
                                          ("n/a", "wechat_error")])
async def test_string_errcode_from_stable_token(
        aiohttp_server: Any, replicas: Replicas, errcode: str, code: str) -> None:
    async def refuse(request: web.Request) -> web.Response:
        return web.Response(text=json.dumps({"errcode": errcode, "errmsg": "x"}),
                            content_type="text/plain")
    app = web.Application()
    app.router.add_post("/cgi-bin/stable_token", refuse)
    server = await aiohttp_server(app)
    [manager] = await replicas(1, f"http://127.0.0.1:{server.port}")
    with pytest.raises(GatewayError) as caught:
        await manager.get(APP)
    assert caught.value.code == code


async def test_other_wechat_errors_are_not_retried(sim: Sim, replicas: Replicas) -> None:
    [manager] = await replicas(1, sim.url)
    with pytest.raises(InvalidPhoneCode):
        await manager.call(APP, lambda t: wechat_of(manager).phone_number(APP, t, "errcode-40029-x"))
    assert sim.calls("getuserphonenumber") == 1
    assert sim.calls("stable_token") == 1


@pytest.mark.parametrize("errcode", [40001, 42001, 40014])
async def test_gateway_maps_persistent_rejection_to_wechat_error(
        make_gateway: GatewayFactory, aiohttp_server: Any, errcode: int) -> None:
    sim = await start_sim(aiohttp_server)
    gw = await make_gateway(wechat={"api_base": sim.url, "timeout": "2s"})
    session = await login(gw)
    started = time.monotonic()
    resp = await gw.post("/auth/phone", json={"code": f"errcode-{errcode}-x"},
                         headers=bearer(session["token"]))
    await expect_error(resp, 502, "wechat_error")  # the forced token was refused too
    assert sim.calls("getuserphonenumber") == 2
    assert forced(sim) == [False, False, True]
    assert time.monotonic() - started < 2
    # Within 30 s: no second force; the call fails at once with 503, no loop.
    resp = await gw.post("/auth/phone", json={"code": f"errcode-{errcode}-y"},
                         headers=bearer(session["token"]))
    await expect_error(resp, 503, "wechat_unavailable")
    assert sim.calls("getuserphonenumber") == 3
    assert forced(sim) == [False, False, True, False]
    assert sim.state.force_calls[APPID] == 1


async def test_gateway_recovers_from_an_expired_access_token(
        make_gateway: GatewayFactory, aiohttp_server: Any) -> None:
    sim = await start_sim(aiohttp_server)
    gw = await make_gateway(wechat={"api_base": sim.url, "timeout": "2s"})
    session = await login(gw)
    resp = await gw.post("/auth/phone", json={"code": "p1"}, headers=bearer(session["token"]))
    assert resp.status == 200, await resp.text()
    sim.state.expire_access_tokens()
    resp = await gw.post("/auth/phone", json={"code": "p2"}, headers=bearer(session["token"]))
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["pure_phone_number"] == simulator.phone_for("p2")
    assert forced(sim) == [False, False]
    assert sim.calls("getuserphonenumber") == 3


async def test_wechat_down_while_refreshing_is_wechat_error(replicas: Replicas) -> None:
    [manager] = await replicas(1, f"http://127.0.0.1:{free_port()}")
    started = time.monotonic()
    with pytest.raises(WeChatError) as caught:
        await manager.get(APP)
    assert caught.value.code == "wechat_error"
    assert time.monotonic() - started < LOCK_TTL


async def test_a_failed_refresh_releases_the_lock(
        replicas: Replicas, sim: Sim, redis: aioredis.Redis, key_prefix: str) -> None:
    [down] = await replicas(1, f"http://127.0.0.1:{free_port()}")
    with pytest.raises(WeChatError):
        await down.get(APP)
    assert await redis.exists(lock_key(key_prefix)) == 0
    # So a healthy replica refreshes at once instead of waiting for the lock to expire.
    [up] = await replicas(1, sim.url)
    started = time.monotonic()
    assert await up.get(APP) in sim.issued()
    assert time.monotonic() - started < 0.5


# --- the Redis lock -------------------------------------------------------------------------

async def test_lock_held_by_another_replica_is_waited_for(
        sim: Sim, replicas: Replicas, redis: aioredis.Redis, key_prefix: str) -> None:
    await redis.set(lock_key(key_prefix), "another-replica", px=600)
    managers = await replicas(3, sim.url)
    pending = asyncio.ensure_future(get_all(managers, 5))
    await asyncio.sleep(0.3)
    assert not pending.done()
    assert sim.calls("stable_token") == 0  # waiting, not calling WeChat behind the lock
    tokens = await asyncio.wait_for(pending, 3 * LOCK_TTL)
    assert len(set(tokens)) == 1 and sim.calls("stable_token") == 1
    assert await redis.exists(lock_key(key_prefix)) == 0  # our own lock was released


async def test_waiters_take_the_token_the_lock_holder_stores(
        sim: Sim, replicas: Replicas) -> None:
    sim.token_delay = 0.4  # a slow WeChat: the others wait behind the lock meanwhile
    managers = await replicas(4, sim.url)
    tokens = await get_all(managers, 10)
    assert len(set(tokens)) == 1 and sim.calls("stable_token") == 1


async def test_lock_is_released_only_by_its_owner(
        sim: Sim, replicas: Replicas, redis: aioredis.Redis, key_prefix: str) -> None:
    sim.token_delay = 0.7  # the refresh outlives its lock (lock_ttl 0.25 s)
    [manager] = await replicas(1, sim.url, lock_ttl=0.25)
    pending = asyncio.ensure_future(manager.get(APP))
    await asyncio.sleep(0.1)
    owner = await redis.get(lock_key(key_prefix))
    assert owner is not None, "no lock while refreshing"
    assert 0 < await redis.pttl(lock_key(key_prefix)) <= 250  # SET ... PX: a crash cannot wedge it
    await asyncio.sleep(0.3)
    assert await redis.exists(lock_key(key_prefix)) == 0  # it expired
    await redis.set(lock_key(key_prefix), "another-replica", px=5000)  # someone else's now
    token = await asyncio.wait_for(pending, 3)
    assert token in sim.issued()
    assert await redis.get(lock_key(key_prefix)) == b"another-replica"


# --- never returned, forwarded or logged -----------------------------------------------------

async def test_access_tokens_never_leave_the_gateway(
        make_gateway: GatewayFactory, aiohttp_server: Any, upstream: Upstream,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    sim = await start_sim(aiohttp_server)
    gw = await make_gateway(wechat={"api_base": sim.url, "timeout": "2s"})
    code = f"user-{uuid.uuid4().hex[:8]}"
    exchanges: list[tuple[str, int, str, str]] = []

    async def record(method: str, path: str, **kwargs: Any) -> None:
        resp = await gw.request(method, path, **kwargs)
        exchanges.append((f"{method} {path}", resp.status, str(dict(resp.headers)),
                          await resp.text()))

    resp = await gw.post("/auth/login", json={"code": code})
    exchanges.append(("login", resp.status, str(dict(resp.headers)), await resp.text()))
    session = json.loads(exchanges[-1][3])
    auth = bearer(session["token"])
    await record("POST", "/auth/phone", json={"code": "p1"}, headers=auth)
    await record("GET", "/auth/session?check=true", headers=auth)
    sim.state.reject_access_token(APPID)  # a forced refresh, logged as it happens
    await record("POST", "/auth/phone", json={"code": "p2"}, headers=auth)
    await record("GET", "/auth/session?check=true", headers=auth)
    await record("POST", "/auth/phone", json={"code": "errcode-40001-x"}, headers=auth)
    await record("POST", "/auth/phone", json={"code": "errcode-40029-x"}, headers=auth)
    await record("POST", "/auth/phone", json={"code": "http-500-x"}, headers=auth)
    await record("GET", "/auth/verify", headers=auth)
    await record("POST", "/auth/refresh", headers=auth)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{sim.url}/_simulator/userdata",
                            params={"appid": APPID, "code": code}) as r:
            userdata = await r.json()
    await record("POST", "/auth/decrypt", headers=auth,
                 json={"encrypted_data": userdata["encrypted_data"], "iv": userdata["iv"]})
    await record("POST", "/auth/decrypt", headers=auth,
                 json={"encrypted_data": "A" * 44, "iv": userdata["iv"]})
    await record("GET", "/api/anything", headers=auth)
    await record("GET", "/metrics")

    tokens = sim.issued()
    assert len(tokens) == 2, tokens  # the first and the forced one
    assert {status for _, status, _, _ in exchanges} >= {200, 400, 502, 503}
    for name, status, headers, body in exchanges:
        for token in tokens:
            assert token not in body and token not in headers, (name, status)
            assert token.rsplit(".", 1)[-1] not in body + headers, (name, status)
    for seen in upstream.seen:
        for token in tokens:
            assert token not in str(seen.headers) and token.encode() not in seen.body
    logged = [(r.name, r.getMessage() + (r.exc_text or "")) for r in caplog.records]
    assert any("refresh" in text for _, text in logged), "expected the refresh to be logged"
    for name, text in logged:
        for token in tokens:
            assert token.rsplit(".", 1)[-1] not in text, (name, text)
    assert SECRET not in "".join(text for _, text in logged)
