"""Fault-tolerance drills: each one runs the real gateway process
(``python -m gateway``) against a real redis-server and breaks something on purpose.

1. Redis stopped under load: fail closed (503, nothing forwarded), public keeps serving,
   /readyz 503, recovery within 1 s of Redis answering again, sessions persisted.
2. Redis slow (DEBUG SLEEP / CLIENT PAUSE): bounded by ``redis.timeout`` + one retry.
3. WeChat faults: busy, slow, HTML error page, garbage, reset, down; mapped, never 500.
4. Upstream faults: refused, dropped, reset mid-response, slow; others keep serving.
5. SIGTERM during load: in-flight requests finish, new connections refused, exit 0,
   and a request outliving ``shutdown_grace`` does not keep the process alive.
6. Restart: sessions survive a gateway restart (and a gateway + Redis restart).

Drills that stop or block Redis use their own ``EmbeddedRedis``; the session-wide
``redis_server`` fixture is shared with other tests and is never stopped or blocked.
Measured figures are printed with a ``DRILL`` prefix (see them with ``pytest -s``).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from checks import assert_json_error
from conftest import APPID, SECRET, Upstream, base_config, bearer
from gateway.testing import simulator
from gateway.testing.embedded import EmbeddedRedis, free_port
from process import GatewayProcess, Launch, connection_refused


def report(text: str) -> None:
    print(f"DRILL {text}", flush=True)


# --- the real gateway process (``launch`` in conftest.py) -----------------------------------


def drill_config(redis_url: str, wechat_url: str, upstream_url: str,
                 **overrides: Any) -> dict[str, Any]:
    data = base_config(redis_url, f"wxgw-drill-{uuid.uuid4().hex[:8]}:", wechat_url,
                       upstream_url)
    data["listen"] = f"127.0.0.1:{free_port()}"
    data.update(overrides)
    return data


# --- HTTP helpers ---------------------------------------------------------------------------


@dataclass
class Reply:
    status: int  # -1: no HTTP response at all (connection error)
    body: bytes
    content_type: str
    elapsed: float
    sent: float = 0.0
    done: float = 0.0
    error: str | None = None
    headers: dict[str, str] | None = None

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    def __repr__(self) -> str:
        return (f"Reply(status={self.status}, error={self.error}, elapsed={self.elapsed:.3f}s, "
                f"type={self.content_type!r}, body={self.body[:200]!r})")


async def fetch(http: aiohttp.ClientSession, method: str, url: str, *, timeout: float = 5.0,
                **kwargs: Any) -> Reply:
    started = time.monotonic()
    try:
        async with http.request(method, url, timeout=aiohttp.ClientTimeout(total=timeout),
                                **kwargs) as resp:
            body = await resp.read()
            done = time.monotonic()
            return Reply(resp.status, body, resp.content_type, done - started, started, done,
                         headers=dict(resp.headers))
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        done = time.monotonic()
        return Reply(-1, b"", "", done - started, started, done, error=type(exc).__name__)


def assert_error(reply: Reply, status: int, code: str) -> None:
    """The gateway's error shape (checks.py): that status, JSON ``{"error": code, ...}``."""
    assert reply.status == status, reply
    assert reply.headers is not None, reply
    assert_json_error(reply.status, reply.headers.get("Content-Type", ""), reply.body, status,
                      code)


async def login(http: aiohttp.ClientSession, gw: GatewayProcess,
                code: str | None = None) -> dict[str, Any]:
    code = code or f"drill-{uuid.uuid4().hex[:12]}"
    reply = await fetch(http, "POST", f"{gw.url}/auth/login", json={"code": code})
    assert reply.status == 200, reply
    body: dict[str, Any] = reply.json()
    return body


async def redis_answers(port: int, timeout: float = 0.2) -> bool:
    """A raw PING, so that no client library's retries blur what is measured."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port), timeout)
    except (OSError, asyncio.TimeoutError):
        return False
    try:
        writer.write(b"PING\r\n")
        await writer.drain()
        return (await asyncio.wait_for(reader.readline(), timeout)).startswith(b"+PONG")
    except (OSError, asyncio.TimeoutError):
        return False
    finally:
        writer.close()


# --- 1. Redis stopped under load ------------------------------------------------------------


@dataclass
class Sample:
    kind: str  # "required" | "public" | "ready"
    n: int
    reply: Reply


async def test_drill_redis_stopped_under_load_fails_closed_and_recovers(
        launch: Launch, own_redis: EmbeddedRedis, wechat: TestServer, upstream: Upstream) -> None:
    gw = await launch(drill_config(own_redis.url, f"http://127.0.0.1:{wechat.port}",
                                   upstream.url))
    pid = gw.proc.pid
    samples: list[Sample] = []
    seq = itertools.count()
    stop_load = asyncio.Event()
    max_samples = 800

    def api_seen() -> list[str]:
        return [s.raw_path for s in upstream.seen if s.raw_path.startswith("/api/")]

    async with aiohttp.ClientSession() as http:
        await gw.wait_healthy(http)
        user = await login(http, gw)
        token = user["token"]
        assert (await fetch(http, "GET", f"{gw.url}/readyz")).status == 200

        async def worker(kind: str) -> None:
            while not stop_load.is_set() and len(samples) < max_samples:
                n = next(seq)
                if kind == "required":
                    reply = await fetch(http, "GET", f"{gw.url}/api/drill?n={n}",
                                        headers=bearer(token))
                elif kind == "public":
                    reply = await fetch(http, "GET", f"{gw.url}/public/drill?n={n}")
                else:
                    reply = await fetch(http, "GET", f"{gw.url}/readyz")
                samples.append(Sample(kind, n, reply))
                await asyncio.sleep(0.02)

        workers = [asyncio.create_task(worker(kind))
                   for kind in ("required", "required", "public", "ready")]
        try:
            await asyncio.sleep(0.5)  # load with Redis up

            t_stop = time.monotonic()
            await asyncio.to_thread(own_redis.stop)  # returns once redis-server has exited
            t_down = time.monotonic()
            assert not await redis_answers(own_redis.port)
            await asyncio.sleep(0.3)  # anything in flight before the stop has landed by now
            forwarded_mark = len(api_seen())
            await asyncio.sleep(1.0)  # the outage, under load
            forwarded_after = len(api_seen())

            t_restart = time.monotonic()
            await asyncio.to_thread(own_redis.start)  # returns once PING answers +PONG
            t_up = time.monotonic()

            # Recovery: the first 200 on the required route with the token from before.
            recovered: float | None = None
            polls = 0
            while time.monotonic() - t_up < 5.0:
                polls += 1
                reply = await fetch(http, "GET", f"{gw.url}/api/drill?recovery={polls}",
                                    headers=bearer(token))
                if reply.status == 200:
                    recovered = time.monotonic()
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.5)  # load after recovery
        finally:
            stop_load.set()
            await asyncio.wait_for(asyncio.gather(*workers), 15)

        after_ready = await fetch(http, "GET", f"{gw.url}/readyz")
        old_session = await fetch(http, "GET", f"{gw.url}/auth/session", headers=bearer(token))
        new_user = await login(http, gw)
        new_api = await fetch(http, "GET", f"{gw.url}/api/drill?new", headers=bearer(
            new_user["token"]))

    def window(kind: str, start: float, end: float) -> list[Reply]:
        return [s.reply for s in samples
                if s.kind == kind and s.reply.sent >= start and s.reply.done <= end]

    # Before the outage: everything served.
    for kind in ("required", "public", "ready"):
        before = window(kind, 0, t_stop)
        assert before and all(r.status == 200 for r in before), (kind, before)

    # During the outage: required fails closed, nothing of it forwarded; /readyz 503.
    outage_required = [s for s in samples if s.kind == "required"
                       and s.reply.sent >= t_down and s.reply.done <= t_restart]
    assert len(outage_required) >= 10, "too little load reached the gateway during the outage"
    for s in outage_required:
        assert_error(s.reply, 503, "store_unavailable")
    forwarded = set(api_seen())
    leaked = [s.n for s in outage_required if f"/api/drill?n={s.n}" in forwarded]
    assert not leaked, f"required-route requests forwarded while Redis was down: {leaked}"
    assert forwarded_after == forwarded_mark, "the upstream got required-route traffic " \
                                              "while Redis was down"
    outage_ready = window("ready", t_down, t_restart)
    assert outage_ready
    for r in outage_ready:
        assert_error(r, 503, "store_unavailable")
    worst_503 = max(s.reply.elapsed for s in outage_required)

    # Public routes served throughout, outage included.
    public = [s.reply for s in samples if s.kind == "public"]
    assert window("public", t_down, t_restart), "no public request during the outage"
    assert all(r.status == 200 for r in public), [r for r in public if r.status != 200]

    # Recovery within 1 s of Redis answering PING, same process (no restart).
    assert recovered is not None, f"no 200 on the required route 5 s after Redis returned:\n" \
                                  f"{gw.output()}"
    recovery = recovered - t_up
    assert recovery < 1.0, f"recovery took {recovery:.3f}s"
    assert gw.proc.returncode is None and gw.proc.pid == pid
    for kind in ("required", "ready"):
        late = window(kind, recovered, float("inf"))
        assert late and all(r.status == 200 for r in late), (kind, late)
    assert after_ready.status == 200, after_ready

    # The session created before the outage survived Redis' restart (append-only file).
    assert old_session.status == 200, old_session
    assert old_session.json()["openid"] == user["openid"]
    assert new_api.status == 200, new_api
    gw.assert_no_internal_failure()
    report(f"redis-stop: {len(samples)} requests, {len(outage_required)} required-route "
           f"requests during the outage all 503 (slowest {worst_503 * 1000:.0f} ms), "
           f"0 forwarded; recovery {recovery * 1000:.0f} ms after PING ({polls} poll(s))")


# --- 2. Redis slow --------------------------------------------------------------------------


class RedisBlock:
    """Blocks a redis-server for ``seconds``: ``DEBUG SLEEP``, else ``CLIENT PAUSE ... ALL``."""

    def __init__(self, port: int, seconds: float) -> None:
        self.port = port
        self.seconds = seconds
        self.method = ""
        self.started = 0.0
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> "RedisBlock":
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        self._writer = writer
        self.started = time.monotonic()
        writer.write(f"DEBUG SLEEP {self.seconds:g}\r\n".encode())
        await writer.drain()
        try:
            reply = await asyncio.wait_for(reader.readline(), 0.2)
        except asyncio.TimeoutError:
            self.method = "DEBUG SLEEP"  # no answer: it is sleeping
            return self
        assert reply.startswith(b"-"), f"DEBUG SLEEP answered {reply!r} at once"
        self.started = time.monotonic()
        writer.write(f"CLIENT PAUSE {int(self.seconds * 1000)} ALL\r\n".encode())
        await writer.drain()
        reply = await asyncio.wait_for(reader.readline(), 2)
        assert reply.startswith(b"+OK"), f"CLIENT PAUSE refused: {reply!r}"
        self.method = "CLIENT PAUSE"
        return self

    async def wait_over(self) -> float:
        """Wait until Redis answers again; when (monotonic) it did."""
        deadline = self.started + self.seconds + 5
        while time.monotonic() < deadline:
            if await redis_answers(self.port, timeout=0.5):
                return time.monotonic()
            await asyncio.sleep(0.02)
        pytest.fail("redis-server did not answer again after the block")

    async def __aexit__(self, *exc: Any) -> None:
        if self._writer is not None:
            self._writer.close()


async def test_drill_redis_slow_is_bounded_by_redis_timeout(
        launch: Launch, own_redis: EmbeddedRedis, wechat: TestServer, upstream: Upstream) -> None:
    redis_timeout = 0.3
    data = drill_config(own_redis.url, f"http://127.0.0.1:{wechat.port}", upstream.url)
    data["redis"]["timeout"] = "300ms"
    gw = await launch(data)
    async with aiohttp.ClientSession() as http:
        await gw.wait_healthy(http)
        users = [await login(http, gw) for _ in range(2)]
        token = users[0]["token"]
        warm = await asyncio.gather(*(fetch(http, "GET", f"{gw.url}/api/warm?{i}",
                                            headers=bearer(token)) for i in range(6)))
        assert all(r.status == 200 for r in warm), warm
        forwarded_before = len(upstream.seen)

        async with RedisBlock(own_redis.port, 2) as block:
            await asyncio.sleep(0.1)
            assert time.monotonic() - block.started < 0.5
            # users[1]'s token was never used, so no replica has it cached: it needs Redis.
            fresh = bearer(users[1]["token"])
            during = await asyncio.gather(
                *(fetch(http, "GET", f"{gw.url}/api/blocked?{i}", headers=fresh)
                  for i in range(3)),
                fetch(http, "GET", f"{gw.url}/auth/session", headers=fresh),
                fetch(http, "GET", f"{gw.url}/readyz"),
                fetch(http, "GET", f"{gw.url}/public/meanwhile"),
                fetch(http, "GET", f"{gw.url}/healthz"))
            answered_by = time.monotonic() - block.started
            # The warm token may be served from the session cache until the stalled
            # invalidation channel is noticed (no pong within 2 x redis.timeout); after
            # that the cache is off and it fails closed too.
            await asyncio.sleep(max(0.0, block.started + 1.3 - time.monotonic()))
            late = await asyncio.gather(
                *(fetch(http, "GET", f"{gw.url}/api/late?{i}", headers=bearer(token))
                  for i in range(3)))
            upstream_during = [s.raw_path for s in upstream.seen[forwarded_before:]]
            over = await block.wait_over()
        block_length = over - block.started

        # Recovery: once Redis answers, the required route serves again, promptly.
        recovered: float | None = None
        while time.monotonic() - over < 3:
            reply = await fetch(http, "GET", f"{gw.url}/api/after", headers=bearer(token))
            if reply.status == 200:
                recovered = time.monotonic()
                break
            await asyncio.sleep(0.02)
        # No reply of a timed-out command may be read by a later one: each token must get its
        # own identity back, even with several connections in use at once.
        checks = await asyncio.gather(*(
            fetch(http, "GET", f"{gw.url}/auth/session", headers=bearer(u["token"]))
            for _ in range(5) for u in users))

    *required, session, ready, public, health = during
    for r in [*required, session, *late]:
        assert_error(r, 503, "store_unavailable")
        # redis.timeout (timeouts are not retried), not the 2 s block.
        assert r.elapsed < 1.0, r
    assert_error(ready, 503, "store_unavailable")
    assert ready.elapsed < 1.0, ready
    assert public.status == 200 and public.elapsed < 0.5, public
    assert health.status == 200 and health.elapsed < 0.5, health
    assert block_length > 1.5, f"the block lasted {block_length:.2f}s only: drill not valid"
    assert answered_by < block_length - 0.5, "answers came only when the block was over"
    assert not [p for p in upstream_during if p.startswith(("/api/blocked", "/api/late"))], \
        upstream_during

    assert recovered is not None, f"required route not serving after the block:\n{gw.output()}"
    assert recovered - over < 1.0
    for i, reply in enumerate(checks):
        assert reply.status == 200, reply
        assert reply.json()["openid"] == users[i % 2]["openid"], (i, reply)
    gw.assert_no_internal_failure()
    slowest = max(r.elapsed for r in [*required, session, ready])
    report(f"redis-slow ({block.method} {block_length:.2f}s, redis.timeout "
           f"{redis_timeout * 1000:.0f} ms): 503 store_unavailable in "
           f"{min(r.elapsed for r in required) * 1000:.0f}-{slowest * 1000:.0f} ms, public "
           f"{public.elapsed * 1000:.0f} ms; 200 again {(recovered - over) * 1000:.0f} ms after "
           f"the block")


# --- 3. WeChat faults -----------------------------------------------------------------------


# (name, code template, status, error); the sequential drill runs the first six, the burst all.
WECHAT_FAULTS = [
    ("busy", "errcode--1-{}", 503, "wechat_unavailable"),
    ("slow", "slow-2500-{}", 504, "wechat_timeout"),
    ("html-502", "http-502-{}", 502, "wechat_error"),
    ("garbage", "garbage-{}", 502, "wechat_error"),
    ("reset", "reset-{}", 502, "wechat_error"),
    ("no-openid", "noopenid-{}", 502, "wechat_error"),
    ("html-500", "http-500-{}", 502, "wechat_error"),
    ("other-errcode", "errcode-40001-{}", 502, "wechat_error"),
]
# The login rate limit (per client IP, default 30 a minute) also applies to the drill, which
# runs from one address: it stays under 30 logins.


async def test_drill_wechat_faults_are_mapped_never_500(
        launch: Launch, aiohttp_server: Any, redis_server: EmbeddedRedis,
        upstream: Upstream) -> None:
    wechat_port = free_port()
    sim: TestServer = await aiohttp_server(simulator.create_app({APPID: SECRET}),
                                           port=wechat_port)
    data = drill_config(redis_server.url, f"http://127.0.0.1:{wechat_port}", upstream.url)
    data["wechat"]["timeout"] = "1s"
    gw = await launch(data)
    figures: list[str] = []
    async with aiohttp.ClientSession() as http:
        await gw.wait_healthy(http)
        user = await login(http, gw)

        async def still_serving() -> None:
            assert (await fetch(http, "GET", f"{gw.url}/healthz")).status == 200
            other = await login(http, gw)
            reply = await fetch(http, "GET", f"{gw.url}/api/x", headers=bearer(other["token"]))
            assert reply.status == 200, reply

        for name, code, status, error in WECHAT_FAULTS[:6]:
            reply = await fetch(http, "POST", f"{gw.url}/auth/login",
                                json={"code": code.format(uuid.uuid4().hex[:8])})
            assert_error(reply, status, error)
            if name == "slow":  # wechat.timeout (1 s), not the simulator's 2.5 s
                assert 0.9 <= reply.elapsed < 1.8, reply
            else:
                assert reply.elapsed < 1.0, reply
            figures.append(f"{name} {status} {reply.elapsed * 1000:.0f}ms")
            await still_serving()

        # All of them at once, mixed with good logins.
        mixed = [*WECHAT_FAULTS, ("ok", "ok-{}", 200, ""), ("ok", "ok-{}", 200, "")]
        burst = await asyncio.gather(*(
            fetch(http, "POST", f"{gw.url}/auth/login",
                  json={"code": code.format(uuid.uuid4().hex[:8])}, timeout=10)
            for _, code, _, _ in mixed))
        for reply, (_, _, status, error) in zip(burst, mixed):
            if status == 200:
                assert reply.status == 200, reply
            else:
                assert_error(reply, status, error)

        # WeChat entirely down: nothing listens on api_base any more.
        await sim.close()
        down = await fetch(http, "POST", f"{gw.url}/auth/login",
                           json={"code": f"down-{uuid.uuid4().hex[:8]}"})
        assert_error(down, 502, "wechat_error")
        assert down.elapsed < 1.5, down
        figures.append(f"down 502 {down.elapsed * 1000:.0f}ms")
        assert (await fetch(http, "GET", f"{gw.url}/healthz")).status == 200
        assert (await fetch(http, "GET", f"{gw.url}/readyz")).status == 200
        # Sessions do not need WeChat: the token from before still works.
        reply = await fetch(http, "GET", f"{gw.url}/api/x", headers=bearer(user["token"]))
        assert reply.status == 200, reply

        # WeChat back on the same address: logins work again without a gateway restart.
        await aiohttp_server(simulator.create_app({APPID: SECRET}), port=wechat_port)
        code = f"back-{uuid.uuid4().hex[:8]}"
        back = await login(http, gw, code)
        assert back["openid"] == simulator.openid_for(APPID, code)
        reply = await fetch(http, "GET", f"{gw.url}/api/x", headers=bearer(back["token"]))
        assert reply.status == 200, reply

    assert gw.proc.returncode is None
    gw.assert_no_internal_failure()
    report("wechat faults (wechat.timeout 1s): " + ", ".join(figures))


# --- 4. Upstream faults ---------------------------------------------------------------------


class FaultyUpstream:
    """``/ok``; ``/slow/<ms>``; ``/drop`` (closes before any answer); ``/truncate-length``
    and ``/truncate-chunked`` (headers and part of the body, then the connection is aborted)."""

    def __init__(self) -> None:
        self.hits: list[str] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits.append(request.raw_path)
        last = request.path.rstrip("/").split("/")
        name = last[-1]
        if len(last) >= 2 and last[-2] == "slow":
            await asyncio.sleep(int(name) / 1000)
            return web.json_response({"ok": True})
        if name == "drop":
            assert request.transport is not None
            request.transport.abort()
            return web.Response()
        if name in ("truncate-length", "truncate-chunked"):
            response = web.StreamResponse()
            response.content_type = "application/octet-stream"
            if name == "truncate-length":
                response.content_length = 1_000_000
            else:
                response.enable_chunked_encoding()
            await response.prepare(request)
            await response.write(b"y" * 65536)
            await asyncio.sleep(0.1)
            assert request.transport is not None
            request.transport.abort()
            return response
        return web.json_response({"ok": True})


async def read_through(http: aiohttp.ClientSession, url: str, **kwargs: Any) -> dict[str, Any]:
    """Status, headers and how the body ended, for a response that may be cut off."""
    outcome: dict[str, Any] = {"status": None, "received": 0, "error": None, "declared": None}
    started = time.monotonic()
    try:
        async with http.get(url, timeout=aiohttp.ClientTimeout(total=5), **kwargs) as resp:
            outcome["status"] = resp.status
            outcome["content_type"] = resp.content_type
            outcome["declared"] = resp.content_length
            async for chunk in resp.content.iter_any():
                outcome["received"] += len(chunk)
    except asyncio.TimeoutError:
        outcome["error"] = "timeout"
    except aiohttp.ClientError as exc:
        outcome["error"] = type(exc).__name__
    outcome["elapsed"] = time.monotonic() - started
    return outcome


async def test_drill_upstream_faults_are_mapped_and_others_keep_serving(
        launch: Launch, aiohttp_server: Any, redis_server: EmbeddedRedis, wechat: TestServer,
        upstream: Upstream) -> None:
    faulty = FaultyUpstream()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", faulty.handle)
    faulty_server: TestServer = await aiohttp_server(app)
    faulty_url = f"http://127.0.0.1:{faulty_server.port}"
    route_timeout = 1.0
    data = drill_config(redis_server.url, f"http://127.0.0.1:{wechat.port}", upstream.url)
    data["routes"] = [
        {"path": "/api/", "upstream": faulty_url, "auth": "required", "timeout": "1s"},
        {"path": "/public/", "upstream": faulty_url, "auth": "public", "timeout": "1s"},
        {"path": "/refused/", "upstream": f"http://127.0.0.1:{free_port()}", "auth": "public",
         "timeout": "1s"},
        {"path": "/other/", "upstream": upstream.url, "auth": "required", "timeout": "2s"},
    ]
    gw = await launch(data)
    figures: list[str] = []
    async with aiohttp.ClientSession() as http:
        await gw.wait_healthy(http)
        token = (await login(http, gw))["token"]
        auth = bearer(token)

        # Others keep serving *while* the faults happen, not only afterwards.
        background: list[Reply] = []
        stop = asyncio.Event()

        async def other_traffic() -> None:
            while not stop.is_set() and len(background) < 300:
                background.append(await fetch(http, "GET",
                                              f"{gw.url}/other/bg?{len(background)}",
                                              headers=auth))
                await asyncio.sleep(0.03)

        async def others_serve() -> None:
            for path in ("/other/after", "/public/ok", "/api/ok"):
                reply = await fetch(http, "GET", f"{gw.url}{path}", headers=auth)
                assert reply.status == 200, (path, reply)
            assert (await fetch(http, "GET", f"{gw.url}/healthz")).status == 200

        bg = asyncio.create_task(other_traffic())
        try:
            # Connection refused.
            refused = await fetch(http, "GET", f"{gw.url}/refused/x")
            assert_error(refused, 502, "upstream_unavailable")
            assert refused.elapsed < 1.0, refused
            figures.append(f"refused 502 {refused.elapsed * 1000:.0f}ms")
            await others_serve()

            # The upstream closes the connection without answering.
            for path in ("/public/drop", "/api/drop"):
                dropped = await fetch(http, "GET", f"{gw.url}{path}", headers=auth)
                assert_error(dropped, 502, "upstream_unavailable")
                assert dropped.elapsed < 1.0, dropped
            figures.append(f"drop 502 {dropped.elapsed * 1000:.0f}ms")
            await others_serve()

            # Reset mid-response: headers and 64 KiB went out, then the connection died.
            for path in ("/public/truncate-length", "/api/truncate-chunked"):
                out = await read_through(http, f"{gw.url}{path}", headers=auth)
                assert out["error"] != "timeout", f"{path}: the gateway hung: {out}"
                assert out["elapsed"] < 3.0, (path, out)
                assert not (out["status"] == 500 and out.get("content_type")
                            == "application/json"), (path, out)
                # The client must be able to tell the body is incomplete.
                if out["error"] is None:
                    assert out["declared"] is not None and out["received"] < out["declared"], \
                        f"{path}: a truncated body was passed off as complete: {out}"
                figures.append(f"{path.rsplit('/', 1)[1]} -> status {out['status']}, "
                               f"{out['received']} B then {out['error']} "
                               f"in {out['elapsed'] * 1000:.0f}ms")
                await others_serve()

            # Slower than the route's timeout.
            for path in ("/public/slow/3000", "/api/slow/3000"):
                slow = await fetch(http, "GET", f"{gw.url}{path}", headers=auth)
                assert_error(slow, 504, "upstream_timeout")
                assert route_timeout - 0.05 <= slow.elapsed < route_timeout + 0.8, slow
            figures.append(f"slow 504 {slow.elapsed * 1000:.0f}ms")
            await others_serve()
        finally:
            stop.set()
            await asyncio.wait_for(bg, 10)

    assert background and all(r.status == 200 for r in background), \
        [r for r in background if r.status != 200]
    worst = max(r.elapsed for r in background)
    assert worst < 0.5, f"other routes stalled during the faults: {worst:.3f}s"
    assert gw.proc.returncode is None
    gw.assert_no_internal_failure()
    report(f"upstream faults (route timeout 1s): {'; '.join(figures)}; {len(background)} "
           f"requests to another route meanwhile, all 200, slowest {worst * 1000:.0f}ms")


# --- 5. SIGTERM during load -----------------------------------------------------------------


async def test_drill_sigterm_under_load_drains_then_exits_0(
        launch: Launch, redis_server: EmbeddedRedis, wechat: TestServer,
        upstream: Upstream) -> None:
    grace = 5.0
    n = 20
    gw = await launch(drill_config(redis_server.url, f"http://127.0.0.1:{wechat.port}",
                                   upstream.url, shutdown_grace="5s"))
    async with aiohttp.ClientSession() as http:
        await gw.wait_healthy(http)
        token = (await login(http, gw))["token"]

    load = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    try:
        started = time.monotonic()
        in_flight = [asyncio.create_task(
            fetch(load, "GET", f"{gw.url}/api/slow/1000?i={i}", headers=bearer(token),
                  timeout=15)) for i in range(n)]
        deadline = started + 3
        while sum(s.raw_path.startswith("/api/slow/1000?") for s in upstream.seen) < n:
            assert time.monotonic() < deadline, "the load never reached the upstream"
            await asyncio.sleep(0.01)
        await asyncio.sleep(max(0.0, started + 0.2 - time.monotonic()))

        signalled = time.monotonic()
        gw.terminate()

        # Once the drain has started, new connections are refused...
        deadline = signalled + 1.0
        while not await connection_refused(gw.port, timeout_is_refusal=True):
            assert time.monotonic() < deadline, "still accepting connections after SIGTERM"
            await asyncio.sleep(0.02)
        refused_after = time.monotonic() - signalled
        pending = sum(not t.done() for t in in_flight)
        async with aiohttp.ClientSession() as fresh:
            late = await fetch(fresh, "GET", f"{gw.url}/public/late", timeout=2)
        assert late.status == -1 and late.error == "ClientConnectorError", late

        # ...while every in-flight request completes.
        results = await asyncio.wait_for(asyncio.gather(*in_flight), 10)
        drained = time.monotonic() - signalled
        code = await gw.exit_code(within=grace + 2)
        exited = time.monotonic() - signalled
    finally:
        await load.close()

    assert pending == n, f"only {pending}/{n} requests were still in flight when refusing began"
    for reply in results:
        assert reply.status == 200, reply
        assert reply.json() == {"ok": True, "body_bytes": 0}, reply
    assert code == 0, gw.output()
    assert exited < grace, f"exit took {exited:.2f}s, longer than shutdown_grace"
    gw.assert_no_internal_failure()
    report(f"sigterm: {n}/{n} in-flight requests 200 (last done {drained:.2f}s after SIGTERM), "
           f"new connections refused {refused_after * 1000:.0f} ms after SIGTERM, exit 0 "
           f"after {exited:.2f}s (grace {grace:g}s)")


@pytest.mark.parametrize("grace", [1.0, 3.0], ids=["grace-1s", "grace-3s"])
async def test_drill_sigterm_request_outliving_grace_does_not_hold_the_process(
        launch: Launch, redis_server: EmbeddedRedis, wechat: TestServer, upstream: Upstream,
        grace: float) -> None:
    slow_ms = int((2 * grace + 3) * 1000)  # outlives even twice the grace period
    data = drill_config(redis_server.url, f"http://127.0.0.1:{wechat.port}", upstream.url,
                        shutdown_grace=f"{grace:g}s")
    for route in data["routes"]:
        route["timeout"] = "30s"  # only the grace period may end the request
    gw = await launch(data)
    async with aiohttp.ClientSession() as http:
        await gw.wait_healthy(http)
        request = asyncio.create_task(
            fetch(http, "GET", f"{gw.url}/public/slow/{slow_ms}", timeout=15))
        deadline = time.monotonic() + 3
        while not any(s.raw_path == f"/public/slow/{slow_ms}" for s in upstream.seen):
            assert time.monotonic() < deadline, "the slow request never reached the upstream"
            await asyncio.sleep(0.01)
        signalled = time.monotonic()
        gw.terminate()
        code = await gw.exit_code(within=slow_ms / 1000 + 5)
        exited = time.monotonic() - signalled
        cut = await asyncio.wait_for(request, 5)

    report(f"sigterm past grace: exit {code} after {exited:.2f}s (grace {grace:g}s); the "
           f"{slow_ms / 1000:g} s request ended {cut.elapsed:.2f}s after it started, with "
           f"{cut.error or f'HTTP {cut.status}'}")
    # shutdown_grace bounds the drain: the process is gone soon after it, whatever is running.
    assert exited < grace + 2, f"the process lived {exited:.2f}s after SIGTERM " \
                               f"(shutdown_grace {grace:g}s)"
    assert code == 0, gw.output()
    assert cut.status != 200, cut


# --- 6. Restart -----------------------------------------------------------------------------


async def test_drill_restart_sessions_survive(
        launch: Launch, own_redis: EmbeddedRedis, wechat: TestServer, upstream: Upstream) -> None:
    data = drill_config(own_redis.url, f"http://127.0.0.1:{wechat.port}", upstream.url,
                        shutdown_grace="5s")

    async def token_works(http: aiohttp.ClientSession, gw: GatewayProcess,
                          user: dict[str, Any], tag: str) -> dict[str, Any]:
        session = await fetch(http, "GET", f"{gw.url}/auth/session",
                              headers=bearer(user["token"]))
        assert session.status == 200, (tag, session)
        body: dict[str, Any] = session.json()
        assert body["openid"] == user["openid"] and body["appid"] == APPID, (tag, body)
        api = await fetch(http, "GET", f"{gw.url}/api/whoami?{tag}", headers=bearer(user["token"]))
        assert api.status == 200, (tag, api)
        assert upstream.last.raw_path == f"/api/whoami?{tag}"
        assert upstream.last.header("X-WX-OpenID") == [user["openid"]]
        return body

    async def stop(gw: GatewayProcess) -> None:
        gw.terminate()
        assert await gw.exit_code(within=7) == 0, gw.output()
        assert await connection_refused(gw.port, timeout_is_refusal=True)
        gw.assert_no_internal_failure()

    async with aiohttp.ClientSession() as http:
        first = await launch(data)
        await first.wait_healthy(http)
        user = await login(http, first)
        before = await token_works(http, first, user, "first")
        await stop(first)

        # Same configuration, new process: the token issued by the old one still works.
        second = await launch(data)
        await second.wait_healthy(http)
        after = await token_works(http, second, user, "second")
        assert after == before
        await stop(second)

        # The whole stack restarts (gateway and Redis): still the same session.
        await asyncio.to_thread(own_redis.stop)
        await asyncio.to_thread(own_redis.start)
        third = await launch(data)
        await third.wait_healthy(http)
        again = await token_works(http, third, user, "third")
        assert again == before
        # ...and it is a live session, not a cached answer: refresh and logout work on it.
        refreshed = await fetch(http, "POST", f"{third.url}/auth/refresh",
                                headers=bearer(user["token"]))
        assert refreshed.status == 200, refreshed
        out = await fetch(http, "POST", f"{third.url}/auth/logout",
                          headers=bearer(user["token"]))
        assert out.status == 204, out
        gone = await fetch(http, "GET", f"{third.url}/auth/session",
                           headers=bearer(user["token"]))
        assert_error(gone, 401, "unauthorized")
    report("restart: a token issued before works after a gateway restart and after a "
           "gateway + Redis restart")
