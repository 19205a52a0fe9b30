"""What issue 6's hot-path work changed, checked on the real process: the dispatcher that lets
proxied paths skip aiohttp's router, bodies read whole before forwarding, and the buffered
access log."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from typing import Any

import aiohttp
import pytest

from gateway.testing.embedded import EmbeddedRedis
from gateway.logs import FLUSH_INTERVAL
from aiohttp.test_utils import TestServer

from checks import is_json, parse_json_lines
from conftest import GatewayFactory, Upstream, base_config
from process import GatewayProcess, Launch

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def config(redis_server: EmbeddedRedis, wechat: TestServer, upstream: Upstream) -> dict[str, Any]:
    data = base_config(redis_server.url, f"wxgw-hot-{uuid.uuid4().hex[:8]}:",
                       f"http://127.0.0.1:{wechat.port}", upstream.url)
    data["logging"] = {"format": "json"}
    return data


async def started(launch: Launch, data: dict[str, Any]) -> GatewayProcess:
    gw = await launch(data)
    async with aiohttp.ClientSession() as http:
        await gw.wait_healthy(http)
    return gw


def access_lines(gw: GatewayProcess) -> list[dict[str, Any]]:
    records = parse_json_lines(line for line in gw.stderr().splitlines() if is_json(line))
    return [r for r in records if r["logger"] == "gateway.access"]


async def test_endpoints_and_proxy_paths_are_told_apart_as_the_router_would(
        launch: Launch, config: dict[str, Any], upstream: Upstream) -> None:
    gw = await started(launch, config)
    async with aiohttp.ClientSession() as http:
        # A percent-encoded endpoint path is still the endpoint (the router decodes it too).
        async with http.get(f"{gw.url}/heal%74hz") as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["status"] == "ok"
        # A wrong method on an endpoint: the router's 405, in the contract's JSON.
        async with http.delete(f"{gw.url}/auth/login") as resp:
            assert resp.status == 405
            assert (await resp.json())["error"] == "method_not_allowed"
        # Not an endpoint: the proxy, which has no route for it.
        async with http.get(f"{gw.url}/healthz/x") as resp:
            assert resp.status == 404
            assert (await resp.json())["error"] == "not_found"
        async with http.get(f"{gw.url}/public/hello?x=1") as resp:
            assert resp.status == 200
            assert resp.headers["X-Request-ID"]
        async with http.get(f"{gw.url}/metrics") as resp:
            text = await resp.text()
    assert [s.raw_path for s in upstream.seen] == ["/public/hello?x=1"]
    # Proxied requests still reach the metrics, labelled by route, not by raw path.
    assert 'wxgw_requests_total{route="/public",status="200"} 1.0' in text
    assert 'wxgw_requests_total{route="none",status="404"} 1.0' in text


async def test_expect_100_continue_on_a_proxied_route(
        launch: Launch, config: dict[str, Any], upstream: Upstream) -> None:
    gw = await started(launch, config)
    body = b"z" * 3000
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    try:
        writer.write(b"POST /public/upload HTTP/1.1\r\nHost: gw.test\r\n"
                     b"Content-Length: 3000\r\nExpect: 100-continue\r\n\r\n")
        await writer.drain()
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim.startswith(b"HTTP/1.1 100"), interim  # asked before the body is sent
        writer.write(body)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200"), head
    finally:
        writer.close()
    assert upstream.last.body == body
    assert upstream.last.header("Expect") == []  # the gateway answered it; not forwarded


@pytest.mark.parametrize("size", [16 * 1024 + 1, 40_000, 64 * 1024, 64 * 1024 + 1])
async def test_bodies_around_the_read_whole_limit_arrive_intact(
        make_gateway: GatewayFactory, upstream: Upstream, size: int) -> None:
    # Up to 64 KiB a request body is read whole and sent with the headers; beyond, it streams.
    # Neither is bound by the 16 KiB limit of the gateway's own endpoints.
    gw = await make_gateway()
    body = os.urandom(size)
    resp = await gw.post("/public/upload", data=body,
                         headers={"Content-Type": "application/octet-stream"})
    assert resp.status == 200, await resp.text()
    assert upstream.last.body == body
    assert upstream.last.header("Content-Length") == [str(size)]


async def test_access_lines_are_flushed_without_further_traffic(
        launch: Launch, config: dict[str, Any]) -> None:
    gw = await started(launch, config)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gw.url}/public/one") as resp:
            assert resp.status == 200
    # Buffered, but written within the flush interval even though nothing else happens.
    await gw.wait_for_line(lambda line: '"path": "/public/one"' in line,
                           within=FLUSH_INTERVAL + 5)


async def test_a_warning_flushes_buffered_lines_first_and_in_order(
        launch: Launch, config: dict[str, Any]) -> None:
    config["routes"].append({"path": "/down/", "upstream": "http://127.0.0.1:9",
                             "auth": "public", "timeout": "2s"})
    gw = await started(launch, config)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gw.url}/public/before") as resp:
            assert resp.status == 200
        mark = gw.mark()
        async with http.get(f"{gw.url}/down/x") as resp:
            assert resp.status == 502
        # The warning is written at once, and what was buffered before it comes first.
        found = await gw.wait_for_line(lambda line: "unavailable" in line, after=mark,
                                       within=FLUSH_INTERVAL / 2)
    lines = gw.stderr().splitlines()
    before = next(i for i, line in enumerate(lines) if '"path": "/public/before"' in line)
    assert lines.index(found[0]) > before


async def test_sigterm_writes_every_buffered_access_line(
        launch: Launch, config: dict[str, Any]) -> None:
    gw = await started(launch, config)
    async with aiohttp.ClientSession() as http:
        for i in range(50):
            async with http.get(f"{gw.url}/public/n{i}") as resp:
                assert resp.status == 200
    gw.proc.send_signal(signal.SIGTERM)
    assert await gw.exit_code(within=15) == 0
    paths = {line["path"] for line in access_lines(gw)}
    assert {f"/public/n{i}" for i in range(50)} <= paths
