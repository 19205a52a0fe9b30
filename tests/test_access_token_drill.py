"""Access-token drills: three real gateway processes (``python -m gateway``) sharing one Redis,
the simulator as WeChat, traffic on ``/auth/phone`` (which needs the access token) while
WeChat rejects it.

1. WeChat rejects the token it keeps handing out: the whole deployment forces one refresh, and
   within the 30 s gate no replica forces again (503 ``wechat_unavailable`` instead, no loop).
2. Another holder of the same appid force-refreshes mid-traffic: the gateways follow in normal
   mode and never force, so the other holder's new token stays valid.

Measured figures are printed with a ``DRILL`` prefix (see them with ``pytest -s``).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from conftest import APPID, Upstream, base_config, bearer
from gateway.testing.embedded import EmbeddedRedis
from process import GatewayProcess, Launch
from test_access_tokens import Sim, force_key, forced, other_holder_forces, start_sim
from test_drills import Reply, assert_error, fetch, login, report

REPLICAS = 3
CONCURRENCY = 8  # requests in flight per replica


async def start_replicas(launch: Launch, http: aiohttp.ClientSession, redis_url: str,
                         key_prefix: str, sim: Sim, upstream: Upstream) -> list[GatewayProcess]:
    data = base_config(redis_url, key_prefix, sim.url, upstream.url)
    gateways = [await launch(data) for _ in range(REPLICAS)]
    await asyncio.gather(*(gw.wait_healthy(http) for gw in gateways))
    return gateways


async def hammer(http: aiohttp.ClientSession, gateways: list[GatewayProcess], token: str,
                 rounds: int) -> list[Reply]:
    """``rounds`` × ``CONCURRENCY`` phone-number requests on every replica at once."""
    async def one(gw: GatewayProcess) -> Reply:
        return await fetch(http, "POST", f"{gw.url}/auth/phone", headers=bearer(token),
                           json={"code": f"p-{uuid.uuid4().hex[:8]}"})

    replies: list[Reply] = []
    for _ in range(rounds):
        replies += await asyncio.gather(*(one(gw) for gw in gateways for _ in range(CONCURRENCY)))
    return replies


def statuses(replies: list[Reply]) -> Counter[int]:
    return Counter(r.status for r in replies)


def assert_clean(gateways: list[GatewayProcess], sim: Sim) -> None:
    for gw in gateways:
        gw.assert_no_internal_failure()
        out = gw.output()
        for token in sim.issued():
            assert token.rsplit(".", 1)[-1] not in out  # never logged


async def test_drill_one_force_for_the_deployment_per_30_seconds(
        launch: Launch, aiohttp_server: Any, redis_server: EmbeddedRedis, redis: aioredis.Redis,
        key_prefix: str, upstream: Upstream) -> None:
    sim = await start_sim(aiohttp_server)
    async with aiohttp.ClientSession() as http:
        gateways = await start_replicas(launch, http, redis_server.url, key_prefix, sim, upstream)
        user = (await login(http, gateways[0]))["token"]
        warm = await hammer(http, gateways, user, 1)
        assert statuses(warm) == {200: REPLICAS * CONCURRENCY}, warm[:3]
        assert forced(sim) == [False]  # one token for the three replicas

        # WeChat refuses the token yet normal mode keeps handing it out: one replica forces.
        first = sim.state.reject_access_token(APPID)
        started = time.monotonic()
        replies = await hammer(http, gateways, user, 3)
        elapsed = time.monotonic() - started
        assert sim.state.force_calls[APPID] == 1
        assert first not in sim.state.tokens  # revoked by that one force
        for reply in replies:
            if reply.status != 200:  # a caller that met the rejection after the force
                assert_error(reply, 503, "wechat_unavailable")
        assert statuses(replies)[200] >= len(replies) - REPLICAS * CONCURRENCY, statuses(replies)
        assert statuses(await hammer(http, gateways, user, 1)) == {200: REPLICAS * CONCURRENCY}
        gate_ms = await redis.pttl(force_key(key_prefix))
        assert 25_000 < gate_ms <= 30_000, gate_ms

        # The new token is refused too, within the 30 s: nobody forces, every call fails fast.
        sim.state.reject_access_token(APPID)
        stuck_started = time.monotonic()
        stuck = await hammer(http, gateways, user, 3)
        stuck_elapsed = time.monotonic() - stuck_started
        for reply in stuck:
            assert_error(reply, 503, "wechat_unavailable")
            assert reply.elapsed < 1.0, reply
        assert sim.state.force_calls[APPID] == 1
        asked = forced(sim).count(False) - 1
        # Each replica asks WeChat in normal mode about once a second, not once per call.
        assert asked <= REPLICAS * 2, asked

        # 30 s later (the gate key gone, and WeChat's own 30 s over): one force again and
        # traffic recovers.
        await redis.delete(force_key(key_prefix))
        sim.state.forced_at[APPID] = [t - 30 for t in sim.state.forced_at[APPID]]
        await asyncio.sleep(1.1)  # past each replica's pause before asking WeChat again
        recovered = await hammer(http, gateways, user, 2)
        assert statuses(recovered)[200] >= len(recovered) - REPLICAS * CONCURRENCY, (
            statuses(recovered), sim.state.force_calls, forced(sim), recovered[:2])
        assert statuses(await hammer(http, gateways, user, 1)) == {200: REPLICAS * CONCURRENCY}
        assert sim.state.force_calls[APPID] == 2

    assert_clean(gateways, sim)
    report(f"access token: {REPLICAS} replicas x {CONCURRENCY} in flight, rejected token still "
           f"handed out: 1 force, {statuses(replies)[200]}/{len(replies)} ok in "
           f"{elapsed * 1000:.0f}ms; rejected again within 30 s: 0 forces, "
           f"{len(stuck)} x 503 in {stuck_elapsed * 1000:.0f}ms, {asked} normal-mode calls")


async def test_drill_another_holder_forcing_mid_traffic_is_followed_without_forcing(
        launch: Launch, aiohttp_server: Any, redis_server: EmbeddedRedis, key_prefix: str,
        upstream: Upstream) -> None:
    sim = await start_sim(aiohttp_server)
    async with aiohttp.ClientSession() as http:
        gateways = await start_replicas(launch, http, redis_server.url, key_prefix, sim, upstream)
        user = (await login(http, gateways[0]))["token"]
        assert statuses(await hammer(http, gateways, user, 1)) == {200: REPLICAS * CONCURRENCY}
        (ours,) = sim.issued()

        traffic = asyncio.ensure_future(hammer(http, gateways, user, 6))
        await asyncio.sleep(0.05)
        theirs = await other_holder_forces(sim)  # revokes ours
        replies = await traffic
        replies += await hammer(http, gateways, user, 1)

        assert theirs != ours and ours not in sim.state.tokens
        assert statuses(replies) == {200: len(replies)}, statuses(replies)
        assert sim.state.force_calls[APPID] == 1  # theirs only
        others = [r for r in sim.token_requests if r.get("force_refresh")]
        assert len(others) == 1
        # The gateways took the other holder's token in normal mode; it is still valid.
        assert theirs in sim.state.tokens and sim.issued() == {ours, theirs}
        normal_after = forced(sim)[forced(sim).index(True) + 1:]
        assert normal_after and not any(normal_after)

    assert_clean(gateways, sim)
    report(f"access token: another holder forced during {len(replies)} requests on {REPLICAS} "
           f"replicas: all 200, {len(normal_after)} normal-mode refresh(es), 0 forces")
