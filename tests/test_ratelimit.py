"""Login abuse control (gateway/ratelimit.py): per-IP and per-appid sliding windows, bans after
consecutive invalid codes, shared by replicas through Redis, client IPs behind trusted proxies,
fail-closed on Redis, and the ``auth.rate_limit`` configuration."""

from __future__ import annotations

import asyncio
import copy
import json
import time
import uuid
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from checks import assert_json_error
from conftest import APPID, APPID2, TWO_APPS, GatewayFactory, base_config, closed_port_url, fresh
from gateway import loader
from gateway.testing import simulator
from gateway.config import Config, RateLimit
from gateway.testing.embedded import EmbeddedRedis
from gateway.errors import ConfigError

OFF = {"ip_limit": 0, "app_limit": 0, "max_retries": 0}


def limits(**values: Any) -> dict[str, Any]:
    return {"rate_limit": {**OFF, **values}}


def jscode2session_calls(wechat: TestServer) -> int:
    return wechat.app[simulator.CALLS]["jscode2session"]


async def attempt(gw: TestClient, code: str | None = None, xff: str | None = None,
                  **extra: Any) -> tuple[int, dict[str, Any], Any]:
    headers = {"X-Forwarded-For": xff} if xff is not None else {}
    resp = await gw.post("/auth/login", json={"code": code or fresh(), **extra}, headers=headers)
    return resp.status, json.loads(await resp.text()), resp.headers


async def ok(gw: TestClient, **kwargs: Any) -> None:
    status, body, _ = await attempt(gw, **kwargs)
    assert status == 200, body


async def limited(gw: TestClient, **kwargs: Any) -> int:
    """Assert a 429 rate_limited in the gateway's error shape; return Retry-After (seconds)."""
    status, body, headers = await attempt(gw, **kwargs)
    assert_json_error(status, headers.get("Content-Type", ""), body, 429, "rate_limited")
    retry_after = headers.get("Retry-After", "")
    assert retry_after.isdigit(), headers
    return int(retry_after)


async def invalid(gw: TestClient, **kwargs: Any) -> None:
    status, body, _ = await attempt(gw, code=fresh("errcode-40029-"), **kwargs)
    assert status == 401 and body["error"] == "invalid_code", body


# --- per client IP ---------------------------------------------------------------------------

async def test_ip_limit_then_window_passes(make_gateway: GatewayFactory,
                                           wechat: TestServer) -> None:
    gw = await make_gateway(auth=limits(ip_limit=3, ip_window="2s"))
    for _ in range(3):
        await ok(gw)
    calls = jscode2session_calls(wechat)
    retry_after = await limited(gw)
    assert 1 <= retry_after <= 2
    assert jscode2session_calls(wechat) == calls  # the refused attempt never reached WeChat
    assert await limited(gw) <= 2  # refused attempts do not extend the window
    await asyncio.sleep(retry_after + 0.05)
    await ok(gw)
    assert jscode2session_calls(wechat) == calls + 1


async def test_ip_limit_counts_attempts_whatever_their_outcome(
        make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(auth=limits(ip_limit=3, ip_window="10s"))
    await invalid(gw)
    status, body, _ = await attempt(gw, code=fresh("errcode--1-"))
    assert status == 503, body
    await ok(gw)
    await limited(gw)


async def test_ip_window_slides(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(auth=limits(ip_limit=2, ip_window="1500ms"))
    await ok(gw)
    await asyncio.sleep(0.8)
    await ok(gw)
    await limited(gw)
    await asyncio.sleep(0.8)  # the first attempt left the window, the second did not
    await ok(gw)
    await limited(gw)


async def test_default_limits_apply_without_configuration(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(auth={})  # no auth.rate_limit: ip_limit 30 per 60 s
    for _ in range(30):
        await ok(gw)
    assert 1 <= await limited(gw) <= 60


# --- per appid -------------------------------------------------------------------------------

async def test_app_limit_is_per_app(make_gateway: GatewayFactory, wechat: TestServer) -> None:
    gw = await make_gateway(apps=TWO_APPS, auth=limits(app_limit=2, app_window="5s"))
    await ok(gw, appid=APPID)
    await ok(gw, appid=APPID)
    calls = jscode2session_calls(wechat)
    assert 1 <= await limited(gw, appid=APPID) <= 5
    assert jscode2session_calls(wechat) == calls
    await ok(gw, appid=APPID2)
    await ok(gw, appid=APPID2)
    await limited(gw, appid=APPID2)
    await limited(gw, appid=APPID)


async def test_app_limit_is_not_per_ip(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(trusted_proxies=["127.0.0.1/32"],
                            auth=limits(app_limit=2, app_window="5s"))
    await ok(gw, xff="203.0.113.1")
    await ok(gw, xff="203.0.113.2")
    await limited(gw, xff="203.0.113.3")


async def test_unknown_app_and_bad_requests_do_not_count(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(auth=limits(ip_limit=2, ip_window="10s", app_limit=2,
                                        app_window="10s"))
    for _ in range(5):
        status, body, _ = await attempt(gw, appid="wx-not-configured")
        assert status == 400 and body["error"] == "unknown_app", body
    await ok(gw)
    await ok(gw)
    await limited(gw)


# --- bans after consecutive invalid codes ------------------------------------------------------

BAN = {"max_retries": 3, "find_time": "10s", "ban_time": "2s"}


async def test_ban_after_max_retries_invalid_codes(make_gateway: GatewayFactory,
                                                   wechat: TestServer) -> None:
    gw = await make_gateway(auth=limits(**BAN))
    for _ in range(3):
        await invalid(gw)
    calls = jscode2session_calls(wechat)
    retry_after = await limited(gw)  # a valid code, refused while banned
    assert 1 <= retry_after <= 2
    assert jscode2session_calls(wechat) == calls
    await asyncio.sleep(retry_after + 0.05)
    await ok(gw)


async def test_success_resets_the_consecutive_count(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(auth=limits(**BAN))
    await invalid(gw)
    await invalid(gw)
    await ok(gw)
    await invalid(gw)
    await invalid(gw)
    await ok(gw)  # four invalid codes, never three in a row: not banned
    for _ in range(3):
        await invalid(gw)
    await limited(gw)  # three in a row: banned


async def test_failures_older_than_find_time_are_forgotten(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(auth=limits(max_retries=3, find_time="1s", ban_time="10s"))
    await invalid(gw)
    await invalid(gw)
    await asyncio.sleep(1.1)
    await invalid(gw)
    await invalid(gw)
    await ok(gw)


async def test_other_wechat_failures_do_not_count_toward_a_ban(
        make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(auth=limits(**BAN))
    for prefix in ("errcode--1-", "errcode-45011-", "http-500-", "errcode-40226-"):
        status, _, _ = await attempt(gw, code=fresh(prefix))
        assert status in (403, 429, 502, 503)
    await ok(gw)


async def test_used_codes_count_as_invalid(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(auth=limits(**BAN))  # the wechat fixture is single_use
    code = fresh()
    await ok(gw, code=code)
    for _ in range(3):
        status, body, _ = await attempt(gw, code=code)
        assert status == 401 and body["error"] == "invalid_code", body
    await limited(gw)


# --- across replicas -----------------------------------------------------------------------------

async def test_limits_are_shared_across_replicas(make_gateway: GatewayFactory) -> None:
    cfg = limits(ip_limit=3, ip_window="10s")
    a, b = await make_gateway(auth=cfg), await make_gateway(auth=cfg)
    await ok(a)
    await ok(b)
    await ok(a)
    await limited(b)
    await limited(a)


async def test_bans_are_shared_across_replicas(make_gateway: GatewayFactory) -> None:
    a, b = await make_gateway(auth=limits(**BAN)), await make_gateway(auth=limits(**BAN))
    await invalid(a)
    await invalid(b)
    await invalid(a)
    await limited(b)


async def test_other_key_prefix_is_another_deployment(
        make_gateway: GatewayFactory, redis_server: EmbeddedRedis) -> None:
    cfg = limits(ip_limit=1, ip_window="10s")
    a = await make_gateway(auth=cfg)
    await ok(a)
    await limited(a)
    other = await make_gateway(auth=cfg, redis={"url": redis_server.url,
                                                "key_prefix": f"other-{uuid.uuid4().hex[:8]}:"})
    await ok(other)


async def test_limiter_keys_use_the_prefix(make_gateway: GatewayFactory, redis: Any,
                                           key_prefix: str) -> None:
    gw = await make_gateway(auth=limits(ip_limit=5, ip_window="10s", app_limit=5,
                                        app_window="10s", **BAN))
    await invalid(gw)
    await invalid(gw)
    await ok(gw, code=fresh())
    await invalid(gw)
    ours = [k.decode() async for k in redis.scan_iter(match=f"{key_prefix}*")]
    assert any("127.0.0.1" in k for k in ours) and any(APPID in k for k in ours), ours


# --- client addresses behind trusted proxies ------------------------------------------------------

async def test_trusted_proxy_clients_are_counted_separately(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(trusted_proxies=["127.0.0.1/32"],
                            auth=limits(ip_limit=2, ip_window="10s"))
    for client in ("203.0.113.1", "203.0.113.2"):
        await ok(gw, xff=client)
        await ok(gw, xff=client)
        await limited(gw, xff=client)
    # The proxy itself is never the counted client: a third client has its own full quota.
    await ok(gw, xff="198.51.100.7")
    await ok(gw, xff="198.51.100.7")


async def test_trusted_proxy_hops_are_skipped(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(trusted_proxies=["127.0.0.1/32", "10.0.0.0/8"],
                            auth=limits(ip_limit=2, ip_window="10s"))
    await ok(gw, xff="203.0.113.9")
    await ok(gw, xff="203.0.113.9, 127.0.0.1")  # the same client, via a second proxy
    await limited(gw, xff="203.0.113.9, 10.1.2.3, 127.0.0.1")
    await ok(gw, xff="203.0.113.10, 127.0.0.1")


async def test_spoofed_left_entries_do_not_evade_the_limit(make_gateway: GatewayFactory) -> None:
    """Only the address the trusted proxy saw counts; what the client prepended does not."""
    gw = await make_gateway(trusted_proxies=["127.0.0.1/32"],
                            auth=limits(ip_limit=2, ip_window="10s"))
    await ok(gw, xff="192.0.2.1, 203.0.113.5")
    await ok(gw, xff="192.0.2.2, 203.0.113.5")
    await limited(gw, xff="192.0.2.3, 203.0.113.5")
    await limited(gw, xff="garbage, 203.0.113.5")


async def test_bans_are_per_forwarded_client(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(trusted_proxies=["127.0.0.1/32"], auth=limits(**BAN))
    for _ in range(3):
        await invalid(gw, xff="203.0.113.1")
    await limited(gw, xff="203.0.113.1")
    await ok(gw, xff="203.0.113.2")
    await ok(gw)  # the proxy's own address is not banned either


async def test_untrusted_forwarded_for_is_ignored(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(auth=limits(ip_limit=2, ip_window="10s"))
    await ok(gw, xff="203.0.113.1")
    await ok(gw, xff="203.0.113.2")
    await limited(gw, xff="203.0.113.3")
    await limited(gw)


async def test_proxy_trusted_but_not_the_peer_is_ignored(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(trusted_proxies=["10.0.0.0/8"],
                            auth=limits(ip_limit=2, ip_window="10s"))
    await ok(gw, xff="203.0.113.1")
    await ok(gw, xff="203.0.113.2")
    await limited(gw, xff="203.0.113.3")  # all of them are 127.0.0.1, which is not trusted


# --- Redis down --------------------------------------------------------------------------------

@pytest.mark.parametrize("rate_limit", [
    {"ip_limit": 3, "ip_window": "2s", "app_limit": 0, "max_retries": 0},
    {"ip_limit": 0, "app_limit": 5, "max_retries": 0},
    {"ip_limit": 0, "app_limit": 0, "max_retries": 3},
    {},
])
async def test_redis_down_is_store_unavailable(make_gateway: GatewayFactory, wechat: TestServer,
                                               rate_limit: dict[str, Any]) -> None:
    gw = await make_gateway(redis={"url": closed_port_url(), "key_prefix": "x:"},
                            auth={"rate_limit": rate_limit})
    started = time.monotonic()
    status, body, headers = await attempt(gw)
    assert_json_error(status, headers.get("Content-Type", ""), body, 503, "store_unavailable")
    assert jscode2session_calls(wechat) == 0  # the code was not spent at WeChat
    assert time.monotonic() - started < 3


# --- configuration ---------------------------------------------------------------------------------

def parse(**auth: Any) -> Config:
    data = base_config("redis://127.0.0.1:6379/0", "t:", "http://127.0.0.1:1",
                       "http://127.0.0.1:2")
    data["auth"] = copy.deepcopy(auth)
    return loader.parse(data, environ={"LIMIT": "7"})


@pytest.mark.parametrize("auth", [{}, {"prefix": "/auth"}, {"rate_limit": None},
                                  {"rate_limit": {}}])
def test_default_rate_limits(auth: dict[str, Any]) -> None:
    rl = parse(**auth).rate_limit
    assert (rl.ip_limit, rl.ip_window, rl.app_limit, rl.app_window) == (30, 60.0, 1200, 60.0)
    assert (rl.max_retries, rl.find_time, rl.ban_time) == (5, 600.0, 900.0)
    assert rl == RateLimit()


def test_rate_limit_values() -> None:
    rl = parse(rate_limit={"ip_limit": 3, "ip_window": "2s", "app_limit": "${LIMIT}",
                           "app_window": "5m", "max_retries": 0, "find_time": "250ms",
                           "ban_time": "1h"}).rate_limit
    assert rl == RateLimit(ip_limit=3, ip_window=2.0, app_limit=7, app_window=300.0,
                           max_retries=0, find_time=0.25, ban_time=3600.0)


@pytest.mark.parametrize("name, value", [
    ("ip_limit", -1), ("ip_limit", "abc"), ("ip_limit", 2.5), ("ip_limit", True),
    ("ip_limit", [3]), ("app_limit", -5), ("app_limit", "1e3"), ("max_retries", "-1"),
    ("max_retries", {"n": 1}), ("ip_window", "abc"), ("ip_window", 0), ("ip_window", -1),
    ("ip_window", "10 parsecs"), ("app_window", "0s"), ("find_time", "abc"),
    ("find_time", False), ("ban_time", -900), ("ban_time", "forever"),
])
def test_invalid_rate_limit_values_name_the_key(name: str, value: Any) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(rate_limit={name: value})
    assert any(p.startswith(f"auth.rate_limit.{name}:") for p in caught.value.problems), \
        caught.value.problems


def test_unknown_rate_limit_key_is_an_error() -> None:
    with pytest.raises(ConfigError) as caught:
        parse(rate_limit={"ip_limt": 3})
    assert any(p.startswith("auth.rate_limit.ip_limt:") for p in caught.value.problems)


def test_rate_limit_must_be_a_mapping() -> None:
    with pytest.raises(ConfigError) as caught:
        parse(rate_limit=[1, 2])
    assert any(p.startswith("auth.rate_limit:") for p in caught.value.problems)


def test_every_bad_rate_limit_value_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        parse(rate_limit={"ip_limit": -1, "ban_time": "abc"})
    keys = {p.split(":")[0] for p in caught.value.problems}
    assert {"auth.rate_limit.ip_limit", "auth.rate_limit.ban_time"} <= keys
