"""``workers: N``: the workers share one port through SO_REUSEPORT, and the kernel hands each
new connection to one of them, so many clients' connections end up spread over all workers."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aiohttp
import psutil
from aiohttp.test_utils import TestServer

from conftest import Upstream, base_config
from gateway.testing.embedded import EmbeddedRedis, free_port
from process import Launch, launch_with_client

CLIENTS = 64


def held_by_each_worker(supervisor: int, port: int) -> dict[int, int]:
    """Established client connections on ``port``, per worker process."""
    return {child.pid: sum(1 for c in child.net_connections(kind="tcp")
                           if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port)
            for child in psutil.Process(supervisor).children()}


async def test_many_clients_connections_are_spread_over_both_workers(
        launch: Launch, redis_server: EmbeddedRedis, wechat: TestServer,
        upstream: Upstream) -> None:
    port = free_port()
    data = {**base_config(redis_server.url, f"wxgw-workers-{uuid.uuid4().hex[:8]}:",
                          f"http://127.0.0.1:{wechat.port}", upstream.url),
            "listen": f"127.0.0.1:{port}", "workers": 2}
    opened = 0

    async def count(session: Any, context: Any, params: Any) -> None:
        nonlocal opened
        opened += 1

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(count)
    async with aiohttp.ClientSession() as http:
        gw, client = await launch_with_client(launch, data, http, fresh=True)
        await gw.wait_for_line(lambda line: "listening" in line, count=2)
        token = (await client.login(f"w-{uuid.uuid4().hex}")).json()["token"]
    # Each request in flight at once needs a connection of its own; all then stay open idle.
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
    async with aiohttp.ClientSession(connector=connector, trace_configs=[trace]) as clients:
        async def one() -> int:
            async with clients.get(f"{gw.url}/api/x",
                                   headers={"Authorization": f"Bearer {token}"}) as resp:
                await resp.read()
                return resp.status

        assert await asyncio.gather(*(one() for _ in range(CLIENTS))) == [200] * CLIENTS
        assert opened > CLIENTS // 2, opened
        held = held_by_each_worker(gw.proc.pid, port)
        assert len(held) == 2, held
        assert sum(held.values()) == opened, (held, opened)
        # All on one worker: odds of 2**-(opened - 1) with an even hash; never by chance.
        assert all(n > 0 for n in held.values()), held
    gw.assert_no_internal_failure()
