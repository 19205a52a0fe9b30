"""Bodies stream through the real gateway process with bounded memory.

A real ``python -m gateway`` process proxies a public route to an in-process upstream that
never holds a body: downloads are generated 64 KiB at a time, uploads are counted and hashed as
they arrive. Bodies far larger than the memory bound (256 MiB against 100 MB) go through in
both directions, with Content-Length and chunked framing; the byte counts and SHA-256 digests
must match end to end, and the gateway's peak RSS (``VmHWM`` in ``/proc/<pid>/status``, the
kernel's high-water mark for the process's whole life) must stay under 100 MB.

The 1 GiB figures, side by side with nginx, come from ``bench/stream.py``.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from bodies import CHUNK, body_stream, expected_sha256, stream_app
from conftest import APPID, SECRET, SIGNING_KEY
from gateway.testing.embedded import EmbeddedRedis, free_port
from process import GatewayProcess, Launch

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(),
                                reason="peak RSS is read from /proc/<pid>/status (Linux)")

MiB = 1 << 20
BODY = 256 * MiB  # much larger than the bound, so buffering a body would break it
RSS_LIMIT_MB = 100
TRANSFER_TIMEOUT = 120  # seconds, per transfer; a stall must fail the test, not hang it


@pytest.fixture
async def stream_upstream(aiohttp_server: Any) -> TestServer:
    server: TestServer = await aiohttp_server(stream_app())
    return server


# --- the real gateway process ---------------------------------------------------------------


@pytest.fixture
async def gateway(redis_server: EmbeddedRedis, stream_upstream: TestServer,
                  launch: Launch) -> GatewayProcess:
    config = {
        "listen": f"127.0.0.1:{free_port()}",
        "redis": {"url": redis_server.url, "key_prefix": f"wxgw-stream-{uuid.uuid4().hex[:8]}:"},
        "wechat": {"api_base": "http://127.0.0.1:1", "timeout": "1s"},
        "apps": [{"appid": APPID, "secret": SECRET}],
        "session": {"signing_keys": [SIGNING_KEY], "ttl": "1h"},
        # The route timeout bounds the whole exchange, body included.
        "routes": [{"path": "/public/", "upstream": f"http://127.0.0.1:{stream_upstream.port}",
                    "auth": "public", "timeout": f"{TRANSFER_TIMEOUT}s"}],
    }
    return await launch(config, graceful_stop=True)


# --- transfers ------------------------------------------------------------------------------


async def do_upload(http: aiohttp.ClientSession, url: str, n: int,
                    with_length: bool) -> dict[str, Any]:
    # aiohttp sends an async generator chunked, unless a Content-Length is given.
    headers = {"Content-Type": "application/octet-stream"}
    if with_length:
        headers["Content-Length"] = str(n)
    async with http.post(f"{url}/public/upload?verify=1", data=body_stream(n),
                         headers=headers) as resp:
        assert resp.status == 200, (resp.status, await resp.text())
        result: dict[str, Any] = await resp.json()
        return result


async def do_download(http: aiohttp.ClientSession, url: str, n: int,
                      chunked: bool) -> tuple[int, str, aiohttp.ClientResponse]:
    digest = hashlib.sha256()
    count = 0
    async with http.get(f"{url}/public/download/{n}{'/chunked' if chunked else ''}") as resp:
        assert resp.status == 200, (resp.status, await resp.text())
        async for chunk in resp.content.iter_chunked(CHUNK):
            digest.update(chunk)
            count += len(chunk)
    return count, digest.hexdigest(), resp



async def test_large_bodies_stream_both_ways_with_bounded_gateway_memory(
        gateway: GatewayProcess) -> None:
    want = expected_sha256(BODY)
    timings: dict[str, float] = {}
    timeout = aiohttp.ClientTimeout(total=TRANSFER_TIMEOUT, sock_read=30)
    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as http:
        await gateway.wait_healthy(http)
        at_start = gateway.memory_mb()

        for with_length in (True, False):
            name = f"upload, {'Content-Length' if with_length else 'chunked'}"
            started = time.monotonic()
            got = await do_upload(http, gateway.url, BODY, with_length)
            timings[name] = time.monotonic() - started
            assert got["bytes"] == BODY, (name, got)
            assert got["sha256"] == want, (name, got)
            if with_length:  # the framing the client chose reaches the upstream
                assert got["content_length"] == str(BODY), (name, got)

        for chunked in (False, True):
            name = f"download, {'chunked' if chunked else 'Content-Length'}"
            started = time.monotonic()
            count, digest, resp = await do_download(http, gateway.url, BODY, chunked)
            timings[name] = time.monotonic() - started
            assert count == BODY, (name, count)
            assert digest == want, name
            if chunked:
                assert resp.headers.get("Transfer-Encoding") == "chunked", resp.headers
            else:
                assert resp.headers.get("Content-Length") == str(BODY), resp.headers

        # Still alive and serving after all that.
        async with http.get(f"{gateway.url}/healthz") as resp:
            assert resp.status == 200

    memory = gateway.memory_mb()
    report = ", ".join(f"{k}: {BODY / MiB / v:.0f} MiB/s" for k, v in timings.items())
    print(f"\n{BODY // MiB} MiB each way; gateway RSS at start {at_start['VmRSS']:.1f} MB, "
          f"peak {memory['VmHWM']:.1f} MB; {report}")
    assert memory["VmHWM"] < RSS_LIMIT_MB, (
        f"gateway peak RSS {memory['VmHWM']:.1f} MB >= {RSS_LIMIT_MB} MB "
        f"(at start {at_start['VmRSS']:.1f} MB) for {BODY // MiB} MiB bodies")
