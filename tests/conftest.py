"""Shared fixtures: a real redis-server, the WeChat simulator, a recording upstream, gateways
(in-process, and real ``python -m gateway`` processes: see process.py)."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator

import jwt
import pytest
import redis.asyncio as aioredis
import uvicorn
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway import loader, sessions
from gateway.testing import simulator
from gateway.app import create_app
from gateway.testing.embedded import EmbeddedRedis, free_port
from process import Launch, Launcher

APPID = "wx1234567890abcdef"
SECRET = "app-secret-1"
APPID2 = "wxfedcba0987654321"
SECRET2 = "app-secret-2"
SIGNING_KEY = "test-signing-key-0123456789-abcdefghij"
OLD_SIGNING_KEY = "old-signing-key-0123456789-abcdefghijk"
TWO_APPS = [{"appid": APPID, "secret": SECRET}, {"appid": APPID2, "secret": SECRET2}]


@pytest.fixture(scope="session")
def redis_server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


@pytest.fixture
def own_redis() -> Iterator[EmbeddedRedis]:
    """A redis-server of this test alone (append-only persistence), free to stop, block or
    count; the session-wide ``redis_server`` is shared and must never be."""
    server = EmbeddedRedis(persist=True)
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def key_prefix() -> str:
    return f"wxgw-test-{uuid.uuid4().hex[:10]}:"


@pytest.fixture
async def redis(redis_server: EmbeddedRedis) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(redis_server.url)
    yield client
    await client.aclose()


@pytest.fixture
async def wechat(aiohttp_server: Any) -> TestServer:
    app = simulator.create_app({APPID: SECRET, APPID2: SECRET2}, single_use=True)
    server: TestServer = await aiohttp_server(app)
    return server


@dataclass
class Seen:
    method: str
    raw_path: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


@dataclass
class Served:
    """Something an aiohttp TestServer (``server``) serves, at ``url``."""

    server: TestServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.port}"


@dataclass
class Upstream(Served):
    """A fake backend that records what reached it. Paths it treats specially:
    ``/slow/<ms>`` waits, ``/status/<code>`` answers that status, ``/cookies`` sets two
    cookies, ``/bytes/<n>`` streams n bytes. Anything else: 200 ``{"ok": true}``."""

    seen: list[Seen] = field(default_factory=list)

    @property
    def last(self) -> Seen:
        assert self.seen, "the upstream received no request"
        return self.seen[-1]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers]
        self.seen.append(Seen(request.method, request.raw_path, headers, body))
        parts = request.raw_path.partition("?")[0].strip("/").split("/")
        if "slow" in parts:
            await asyncio.sleep(int(parts[parts.index("slow") + 1]) / 1000)
        if "status" in parts:
            return web.Response(status=int(parts[parts.index("status") + 1]), text="upstream says")
        if "cookies" in parts:
            response = web.Response(text="cookies")
            response.headers.add("Set-Cookie", "a=1; Path=/")
            response.headers.add("Set-Cookie", "b=2; Path=/")
            return response
        if "bytes" in parts:
            n = int(parts[parts.index("bytes") + 1])
            response = web.StreamResponse()
            await response.prepare(request)
            chunk = b"x" * 65536
            for _ in range(n // len(chunk)):
                await response.write(chunk)
            await response.write(b"x" * (n % len(chunk)))
            await response.write_eof()
            return response
        return web.json_response({"ok": True, "body_bytes": len(body)})


@pytest.fixture
async def upstream(aiohttp_server: Any) -> Upstream:
    up = Upstream()
    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/{tail:.*}", up.handle)
    up.server = await aiohttp_server(app)
    return up


def base_config(redis_url: str, key_prefix: str, wechat_url: str, upstream_url: str) -> dict[str, Any]:
    return {
        "listen": "127.0.0.1:8080",
        "redis": {"url": redis_url, "key_prefix": key_prefix},
        "wechat": {"api_base": wechat_url, "timeout": "1s"},
        "apps": [{"appid": APPID, "secret": SECRET}],
        "session": {"signing_keys": [SIGNING_KEY], "ttl": "1h"},
        # Login limits are off here: tests log in many times from 127.0.0.1. The limits have
        # tests of their own (test_ratelimit.py), with the defaults and with small values.
        "auth": {"rate_limit": {"ip_limit": 0, "app_limit": 0, "max_retries": 0}},
        "routes": [
            {"path": "/api/", "upstream": upstream_url, "auth": "required", "timeout": "2s"},
            {"path": "/public/", "upstream": upstream_url, "auth": "public", "timeout": "2s"},
            {"path": "/maybe/", "upstream": upstream_url, "auth": "optional", "timeout": "2s"},
        ],
    }


@pytest.fixture
def config_dict(redis_server: EmbeddedRedis, key_prefix: str, wechat: TestServer,
                upstream: Upstream) -> dict[str, Any]:
    return base_config(redis_server.url, key_prefix, f"http://127.0.0.1:{wechat.port}",
                       upstream.url)


GatewayFactory = Callable[..., Awaitable[TestClient]]


@pytest.fixture
def make_gateway(aiohttp_client: Any, config_dict: dict[str, Any]) -> GatewayFactory:
    """``await make_gateway(**top_level_overrides)`` → a test client of a fresh gateway."""
    async def make(**overrides: Any) -> TestClient:
        data = copy.deepcopy(config_dict)
        data.update(overrides)
        client: TestClient = await aiohttp_client(create_app(loader.parse(data, environ={})))
        return client
    return make


@pytest.fixture
async def gw(make_gateway: GatewayFactory) -> TestClient:
    return await make_gateway()


@pytest.fixture
async def launcher(tmp_path: Path) -> AsyncIterator[Launcher]:
    """Starts real gateway processes (files in tmp_path); kills what still runs at the end."""
    processes = Launcher(tmp_path)
    try:
        yield processes
    finally:
        await processes.close()


@pytest.fixture
def launch(launcher: Launcher) -> Launch:
    """``await launch(config_dict, **options)`` → a running ``python -m gateway`` (not yet
    healthy); see ``Launcher.start``."""
    return launcher.start


@contextlib.asynccontextmanager
async def uvicorn_serving(app: Any, port: int, **options: Any) -> AsyncIterator[None]:
    """The ASGI ``app`` on uvicorn at 127.0.0.1:``port``, quiet, until the block ends; the
    test fails if it has not started within 10 s."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None,
                                           log_level="warning", access_log=False, **options))
    task = asyncio.create_task(server.serve())
    deadline = time.monotonic() + 10
    while not server.started:
        if task.done() or time.monotonic() > deadline:
            pytest.fail(f"uvicorn did not start: {task}")
        await asyncio.sleep(0.01)
    try:
        yield
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


async def login(client: TestClient, code: str | None = None, **extra: Any) -> dict[str, Any]:
    """Log in with a fresh (single-use) code; returns the 200 body."""
    body = {"code": code or f"user-{uuid.uuid4().hex[:12]}", **extra}
    resp = await client.post("/auth/login", json=body)
    assert resp.status == 200, await resp.text()
    data: dict[str, Any] = await resp.json()
    return data


def fresh(prefix: str = "user-") -> str:
    """A login code nobody has used yet."""
    return f"{prefix}{uuid.uuid4().hex[:12]}"


def claims_of(token: str) -> dict[str, Any]:
    """A token's claims, unverified."""
    return jwt.decode(token, options={"verify_signature": False})  # type: ignore[no-any-return]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# A WeCom user's session: the app configured as WeCom, the user's corp kept in the session.
WECOM_CORPID = "wwuser0corp00001"
WECOM_APPS = [{"appid": APPID, "secret": SECRET, "platform": "wecom",
               "corpid": WECOM_CORPID}]


async def make_wecom_session(redis: aioredis.Redis, key_prefix: str, token: str) -> None:
    """The session of ``token`` (a login through a gateway whose app is WeChat's) as a WeCom
    login leaves it: with the user's corpid. A gateway made with ``apps=WECOM_APPS`` on the
    same Redis then serves it as a WeCom user's."""
    await redis.hset(f"{key_prefix}session:{claims_of(token)['sid']}",
                     mapping={sessions.CORPID: WECOM_CORPID, sessions.PLATFORM: "wecom"})


def closed_port_url() -> str:
    """A Redis URL nobody listens on, for fail-closed tests."""
    return f"redis://127.0.0.1:{free_port()}/0"
