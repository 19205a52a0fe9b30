"""The in-process session cache (gateway/cache.py) and its pub/sub invalidation.

What is proved here, with in-process gateways against real redis-servers:

- steady state: an authenticated request costs no Redis command and no JWT decode;
- revocation across replicas: a logout on replica A is refused by replica B within 50 ms
  (p99 over 200 trials), refreshed tokens of the session included; a stored phone number shows
  on B although B had the identity cached;
- the cache never outlives the token's ``exp`` or the session's expiry, is bounded
  (``session.cache_size``) and is off with ``cache_size: 0``;
- fail closed: when the subscription is lost (killed, stalled, Redis stopped) the cache is
  cleared and not used until the replica has subscribed again; meanwhile every request is
  verified against Redis, so a session deleted behind the gateway's back is refused at once;
- an invalidation that lands while a lookup is in flight keeps the stale identity out.

Tests that count Redis commands, kill connections or stop Redis use a redis-server of their
own (``own_redis``); the session-wide one is shared with the rest of the suite.
Figures are printed with a ``CACHE`` prefix (``pytest -s`` shows them).
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from typing import Any, AsyncIterator

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from conftest import SIGNING_KEY, GatewayFactory, Upstream, bearer, login
from gateway import store
from gateway.auth import Identity
from gateway.cache import SessionCache
from gateway.testing.embedded import EmbeddedRedis
from gateway.state import SERVICES
from gateway.sessions import Session
from gateway.session_tokens import Claims, TokenCodec


def report(text: str) -> None:
    print(f"CACHE {text}", flush=True)


# --- helpers ----------------------------------------------------------------------------------


def services(client: TestClient) -> Any:
    """The gateway's Services (``app[SERVICES].current`` since reloads exist)."""
    live = client.app[SERVICES]
    return getattr(live, "current", live)


def cache_of(client: TestClient) -> SessionCache:
    cache = services(client).authenticator.cache
    assert cache is not None, "this gateway has no session cache"
    return cache


async def wait_live(client: TestClient, live: bool = True, within: float = 5.0) -> float:
    """Wait until the gateway's cache is (or is no longer) live; returns the seconds it took.

    The follower subscribes asynchronously after the app has started."""
    started = time.monotonic()
    cache = cache_of(client)
    while cache.live != live:
        if time.monotonic() - started > within:
            pytest.fail(f"cache.live did not become {live} within {within}s")
        await asyncio.sleep(0.005)
    return time.monotonic() - started


def redis_section(url: str, prefix: str) -> dict[str, Any]:
    return {"url": url, "key_prefix": prefix}


def sid_of(client: TestClient, token: str) -> str:
    return str(services(client).tokens.verify(token).sid)


async def commandstats(client: aioredis.Redis) -> dict[str, int]:
    """Calls per command since the server started (``INFO commandstats``)."""
    info = await client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(stats["calls"]) for name, stats in info.items()}


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


async def status(client: TestClient, path: str, token: str) -> int:
    resp = await client.get(path, headers=bearer(token))
    await resp.read()
    return resp.status


async def warm(client: TestClient) -> tuple[SessionCache, str]:
    """Once the cache is live: a new session, used twice on /api/warm; the cache and the
    session's token."""
    cache = cache_of(client)
    await wait_live(client)
    token = (await login(client))["token"]
    for _ in range(2):
        assert await status(client, "/api/warm", token) == 200
    return cache, token


async def wait_status(client: TestClient, path: str, token: str, expected: int,
                      within: float) -> tuple[float, list[int]]:
    """Request until ``expected`` comes back; (seconds taken, statuses seen before it)."""
    started = time.perf_counter()
    seen: list[int] = []
    while True:
        got = await status(client, path, token)
        if got == expected:
            return time.perf_counter() - started, seen
        seen.append(got)
        if time.perf_counter() - started > within:
            pytest.fail(f"{path} did not answer {expected} within {within}s; saw {seen[-5:]}")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


class Decodes:
    """Counts JWT verifications (TokenCodec.verify) in this process."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        real = TokenCodec.verify

        def counting(codec: TokenCodec, token: str) -> Claims:
            self.count += 1
            return real(codec, token)

        monkeypatch.setattr(TokenCodec, "verify", counting)


@pytest.fixture
async def own_client(own_redis: EmbeddedRedis) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(own_redis.url)
    yield client
    await client.aclose()


# --- steady state -----------------------------------------------------------------------------


async def test_steady_state_costs_no_redis_command_and_no_jwt_decode(
        make_gateway: GatewayFactory, own_redis: EmbeddedRedis, own_client: aioredis.Redis,
        key_prefix: str, upstream: Upstream, monkeypatch: pytest.MonkeyPatch) -> None:
    gw = await make_gateway(redis=redis_section(own_redis.url, key_prefix))
    cache = cache_of(gw)
    await wait_live(gw)
    token = (await login(gw))["token"]
    assert await status(gw, "/api/warm", token) == 200  # the one lookup: Redis + JWT

    decodes = Decodes(monkeypatch)
    hits, misses = cache.hits, cache.misses
    forwarded = len(upstream.seen)
    n = 200
    before = await commandstats(own_client)
    started = time.monotonic()
    for i in range(n):
        assert await status(gw, f"/api/x/{i}", token) == 200
    elapsed = time.monotonic() - started
    after = await commandstats(own_client)

    assert len(upstream.seen) - forwarded == n
    assert all(s.header("X-WX-OpenID") for s in upstream.seen[forwarded:])
    commands = delta(before, after)
    commands.pop("info", None)  # our own INFO
    # The only traffic left is the invalidation channel's keep-alive ping (one per
    # redis.timeout, 1 s here) on the subscriber's connection: nothing per request.
    pings = commands.pop("ping", 0)
    assert commands == {}, f"Redis commands during {n} cached requests: {commands}"
    assert pings <= elapsed / 1.0 + 2, (pings, elapsed)
    per_request = pings / n
    report(f"steady state: {n} requests in {elapsed:.2f}s, Redis commands {pings} "
           f"(pings only) = {per_request:.4f}/request, JWT decodes {decodes.count}, "
           f"cache hits {cache.hits - hits}")
    assert per_request <= 0.01
    assert decodes.count == 0
    assert cache.hits - hits == n
    assert cache.misses == misses


async def test_cache_size_0_turns_the_cache_off(
        make_gateway: GatewayFactory, own_redis: EmbeddedRedis, own_client: aioredis.Redis,
        key_prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    gw = await make_gateway(redis=redis_section(own_redis.url, key_prefix),
                            session={"signing_keys": [SIGNING_KEY], "ttl": "1h",
                                     "cache_size": 0})
    assert services(gw).authenticator.cache is None
    token = (await login(gw))["token"]
    await asyncio.sleep(0.2)
    clients = await own_client.client_list()
    assert not [c for c in clients if int(c.get("sub", 0)) or int(c.get("psub", 0))], \
        "no cache, so no invalidation subscription"

    decodes = Decodes(monkeypatch)
    n = 50
    before = await commandstats(own_client)
    for i in range(n):
        assert await status(gw, f"/api/x/{i}", token) == 200
    commands = delta(before, await commandstats(own_client))
    commands.pop("info", None)
    assert commands.get("hgetall") == n, commands  # every request reads its session
    assert decodes.count == n


# --- revocation across replicas ---------------------------------------------------------------


async def test_logout_on_replica_a_is_refused_by_replica_b_within_50ms(
        make_gateway: GatewayFactory) -> None:
    a, b = await make_gateway(), await make_gateway()  # same Redis, same key_prefix
    await wait_live(a)
    await wait_live(b)
    cache_b = cache_of(b)
    latencies: list[float] = []
    stale_answers = 0
    for trial in range(200):  # p99 over 200 trials
        token = (await login(a))["token"]
        assert await status(b, "/api/warm", token) == 200  # B looks it up and caches it
        hits = cache_b.hits
        assert await status(b, "/api/warm", token) == 200
        assert cache_b.hits == hits + 1, "B must be serving this token from its cache"

        resp = await a.post("/auth/logout", headers=bearer(token))
        assert resp.status == 204
        took, seen = await wait_status(b, "/api/after", token, 401, within=1.0)
        assert set(seen) <= {200}, seen
        stale_answers += len(seen)
        latencies.append(took)
    p50, p99 = statistics.median(latencies) * 1000, percentile(latencies, 0.99) * 1000
    report(f"revocation A->B over {len(latencies)} trials: p50 {p50:.2f} ms, p99 {p99:.2f} ms, "
           f"max {max(latencies) * 1000:.2f} ms, stale 200s after the 204: {stale_answers}")
    assert p99 < 50


async def test_logout_ends_every_cached_token_of_the_session_on_other_replicas(
        make_gateway: GatewayFactory) -> None:
    """Refresh mints a second token for the same session: a logout must drop both."""
    a, b = await make_gateway(), await make_gateway()
    await wait_live(a)
    await wait_live(b)
    first = (await login(a))["token"]
    resp = await a.post("/auth/refresh", headers=bearer(first))
    assert resp.status == 200
    second = (await resp.json())["token"]
    assert second != first
    for token in (first, second, first, second):
        assert await status(b, "/api/warm", token) == 200
    assert len(cache_of(b)) == 2

    resp = await a.post("/auth/logout", headers=bearer(second))
    assert resp.status == 204
    for token in (first, second):
        took, _ = await wait_status(b, "/api/after", token, 401, within=0.05)
    assert len(cache_of(b)) == 0


async def test_same_replica_refuses_the_token_right_after_its_logout(
        make_gateway: GatewayFactory) -> None:
    gw = await make_gateway()
    await wait_live(gw)
    for _ in range(20):
        token = (await login(gw))["token"]
        assert await status(gw, "/api/warm", token) == 200
        assert await status(gw, "/api/warm", token) == 200
        assert (await gw.post("/auth/logout", headers=bearer(token))).status == 204
        assert await status(gw, "/api/after", token) == 401


async def test_stored_phone_shows_on_a_replica_that_had_the_identity_cached(
        make_gateway: GatewayFactory, upstream: Upstream) -> None:
    session = {"signing_keys": [SIGNING_KEY], "ttl": "1h", "store_phone": True}
    a, b = await make_gateway(session=session), await make_gateway(session=session)
    await wait_live(a)
    await wait_live(b)
    token = (await login(a))["token"]
    cache_b = cache_of(b)
    assert await status(b, "/api/before", token) == 200
    hits = cache_b.hits
    assert await status(b, "/api/before", token) == 200
    assert cache_b.hits == hits + 1
    assert upstream.last.header("X-WX-Phone") == []

    resp = await a.post("/auth/phone", json={"code": "phone-1"}, headers=bearer(token))
    assert resp.status == 200, await resp.text()
    number = (await resp.json())["phone_number"]

    # B's cached identity (without the phone) is dropped on the invalidation set_phone
    # publishes; the same 50 ms bound as a logout applies.
    started = time.perf_counter()
    while True:
        assert await status(b, "/api/after", token) == 200
        if upstream.last.header("X-WX-Phone") == [number]:
            break
        assert time.perf_counter() - started < 0.05, "B kept forwarding the identity without the phone"
    report(f"phone seen on B {1000 * (time.perf_counter() - started):.2f} ms after A's 200")
    # ...and from then on B caches the identity with the phone.
    hits = cache_b.hits
    assert await status(b, "/api/again", token) == 200
    assert upstream.last.header("X-WX-Phone") == [number]
    assert cache_b.hits == hits + 1
    # A too (it had the identity cached from /auth/phone itself).
    assert await status(a, "/api/on-a", token) == 200
    assert upstream.last.header("X-WX-Phone") == [number]


# --- lifetime and size ------------------------------------------------------------------------


async def test_cached_identity_ends_with_the_session_without_any_invalidation(
        make_gateway: GatewayFactory, redis: aioredis.Redis, key_prefix: str) -> None:
    gw = await make_gateway(session={"signing_keys": [SIGNING_KEY], "ttl": "1s"})
    cache = cache_of(gw)
    await wait_live(gw)
    channel = f"{key_prefix}invalidate"
    pubsub = redis.pubsub()
    await pubsub.subscribe(channel)
    try:
        # Just after a second boundary: the session then lives close to its whole second.
        await asyncio.sleep(1.02 - time.time() % 1)
        token = (await login(gw))["token"]
        resp = await gw.get("/auth/session", headers=bearer(token))  # looked up, then cached
        expires_at = (await resp.json())["expires_at"]
        assert resp.status == 200 and expires_at - time.time() <= 1
        assert await status(gw, "/api/warm", token) == 200
        hits = cache.hits
        assert await status(gw, "/api/warm", token) == 200
        assert cache.hits == hits + 1
        epoch = cache.epoch

        await asyncio.sleep(max(0.0, expires_at - time.time() + 0.02))
        assert await status(gw, "/api/late", token) == 401
        assert await status(gw, "/auth/session", token) == 401
        assert cache.epoch == epoch, "expiry must not need (nor get) an invalidation"
        assert len(cache) == 0
        messages = []
        while (message := await pubsub.get_message(timeout=0.05)) is not None:
            if message["type"] == "message":
                messages.append(message)
        assert messages == []
    finally:
        await pubsub.aclose()


def _identity(sid: str, token_exp: float, session_exp: float) -> Identity:
    now = int(time.time())
    return Identity(Claims(sid, "openid-" + sid, "wxapp", now, int(token_exp)),
                    Session(sid, "openid-" + sid, None, "wxapp", now, int(session_exp)))


async def test_entry_ends_at_the_earlier_of_token_exp_and_session_expiry() -> None:
    cache = SessionCache(10)
    cache.live = True
    now = time.time()
    # whole-second timestamps: start just after a boundary so "+1" is close to a second away
    await asyncio.sleep(1.01 - now % 1)
    now = int(time.time())
    cache.put("token-exp-first", _identity("s1", now + 1, now + 3600), cache.epoch)
    cache.put("session-first", _identity("s2", now + 3600, now + 1), cache.epoch)
    cache.put("long", _identity("s3", now + 3600, now + 3600), cache.epoch)
    assert cache.get("token-exp-first") is not None
    assert cache.get("session-first") is not None
    await asyncio.sleep(now + 1 - time.time() + 0.01)
    assert cache.get("token-exp-first") is None
    assert cache.get("session-first") is None
    assert cache.get("long") is not None
    assert len(cache) == 1


async def test_cache_is_bounded(make_gateway: GatewayFactory) -> None:
    gw = await make_gateway(session={"signing_keys": [SIGNING_KEY], "ttl": "1h",
                                     "cache_size": 3})
    cache = cache_of(gw)
    await wait_live(gw)
    tokens = [(await login(gw))["token"] for _ in range(8)]
    for _ in range(2):
        for token in tokens:
            assert await status(gw, "/api/x", token) == 200
            assert len(cache) <= 3
    assert len(cache) == 3
    assert len(cache._tokens_by_sid) == 3  # the by-session index is bounded too
    # least recently used goes first: the last three are cached, the first is not
    hits, misses = cache.hits, cache.misses
    assert await status(gw, "/api/x", tokens[-1]) == 200
    assert (cache.hits, cache.misses) == (hits + 1, misses)
    assert await status(gw, "/api/x", tokens[0]) == 200
    assert (cache.hits, cache.misses) == (hits + 1, misses + 1)
    assert len(cache) == 3


def test_session_cache_unit_bounds_and_index() -> None:
    cache = SessionCache(2)
    cache.live = True
    far = time.time() + 3600
    cache.put("t1", _identity("a", far, far), cache.epoch)
    cache.put("t2", _identity("a", far, far), cache.epoch)  # two tokens of one session
    cache.put("t3", _identity("b", far, far), cache.epoch)
    assert len(cache) == 2 and cache.get("t1") is None
    assert set(cache._tokens_by_sid) == {"a", "b"}
    cache.invalidate("a")
    assert cache.get("t2") is None and cache.get("t3") is not None
    assert set(cache._tokens_by_sid) == {"b"}
    # not live: nothing is served nor stored
    cache.live = False
    assert cache.get("t3") is None
    cache.put("t4", _identity("c", far, far), cache.epoch)
    cache.live = True
    assert cache.get("t4") is None


# --- the in-flight race -----------------------------------------------------------------------


def test_put_with_an_epoch_older_than_an_invalidation_is_not_stored() -> None:
    cache = SessionCache(10)
    cache.live = True
    far = time.time() + 3600
    epoch = cache.epoch  # a lookup starts...
    cache.invalidate("sid-1")  # ...an invalidation arrives while it waits for Redis...
    cache.put("token", _identity("sid-1", far, far), epoch)  # ...and its answer is stale
    assert cache.get("token") is None
    assert len(cache) == 0
    # also when the subscription was re-made in between (clear, as after a reconnect)
    epoch = cache.epoch
    cache.clear()
    cache.put("token", _identity("sid-1", far, far), epoch)
    assert cache.get("token") is None
    # a lookup that raced nothing is stored
    cache.put("token", _identity("sid-1", far, far), cache.epoch)
    assert cache.get("token") is not None


async def test_logout_during_an_in_flight_lookup_keeps_the_stale_identity_out(
        make_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = await make_gateway(), await make_gateway()
    await wait_live(a)
    await wait_live(b)
    token = (await login(b))["token"]
    store = services(a).sessions
    real_get = store.get
    read, release = asyncio.Event(), asyncio.Event()

    async def slow_get(sid: str) -> Session | None:
        session = await real_get(sid)  # read before the logout...
        read.set()
        await release.wait()  # ...answered after it
        return session

    monkeypatch.setattr(store, "get", slow_get)
    in_flight = asyncio.ensure_future(status(a, "/api/in-flight", token))
    await asyncio.wait_for(read.wait(), 5)
    cache = cache_of(a)
    epoch = cache.epoch
    assert (await b.post("/auth/logout", headers=bearer(token))).status == 204
    deadline = time.monotonic() + 1
    while cache.epoch == epoch:  # A has received the invalidation
        assert time.monotonic() < deadline, "A never received the invalidation"
        await asyncio.sleep(0.001)
    release.set()
    assert await in_flight == 200  # it read the session before the logout
    monkeypatch.setattr(store, "get", real_get)
    assert len(cache) == 0, "the stale identity was stored"
    assert await status(a, "/api/after", token) == 401


# --- fail closed: subscription lost, stalled, Redis stopped -----------------------------------


class LiveWatch:
    """Samples ``cache.live`` and ``len(cache)`` every millisecond, recording changes."""

    def __init__(self, cache: SessionCache) -> None:
        self.cache = cache
        self.changes: list[tuple[float, bool, int]] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        last: tuple[bool, int] | None = None
        while True:
            now = (self.cache.live, len(self.cache))
            if now != last:
                self.changes.append((time.monotonic(), *now))
                last = now
            await asyncio.sleep(0.001)

    async def __aenter__(self) -> "LiveWatch":
        self._task = asyncio.ensure_future(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def test_subscription_killed_clears_the_cache_and_resubscribes(
        make_gateway: GatewayFactory, own_redis: EmbeddedRedis, own_client: aioredis.Redis,
        key_prefix: str) -> None:
    gw = await make_gateway(redis=redis_section(own_redis.url, key_prefix))
    cache, token = await warm(gw)
    assert len(cache) == 1

    async with LiveWatch(cache) as watch:
        killed_at = time.monotonic()
        assert await own_client.execute_command("CLIENT", "KILL", "TYPE", "pubsub") == 1
        await wait_live(gw, False, within=1.0)
        assert len(cache) == 0
        back = await wait_live(gw, True, within=2.5)
    off = [(t, n) for t, live, n in watch.changes if not live]
    assert off, watch.changes
    assert all(n == 0 for _, n in off), "entries kept while the cache was off"
    resubscribed = time.monotonic() - killed_at
    report(f"pub/sub connection killed: cache off after {1000 * (off[0][0] - killed_at):.1f} ms,"
           f" live again after {1000 * resubscribed:.0f} ms")
    assert back <= 2.5
    # after resubscribing, the cache works as before (the entry was dropped: one miss)
    hits, misses = cache.hits, cache.misses
    for _ in range(3):
        assert await status(gw, "/api/again", token) == 200
    assert (cache.hits, cache.misses) == (hits + 2, misses + 1)
    assert (await gw.post("/auth/logout", headers=bearer(token))).status == 204
    await wait_status(gw, "/api/after", token, 401, within=0.05)


async def test_while_unsubscribed_every_request_is_verified_against_redis(
        make_gateway: GatewayFactory, own_redis: EmbeddedRedis, own_client: aioredis.Redis,
        key_prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hold the follower off after a lost subscription: nothing may be served from memory."""
    gw = await make_gateway(redis=redis_section(own_redis.url, key_prefix))
    cache = cache_of(gw)
    await wait_live(gw)
    kept, deleted = (await login(gw))["token"], (await login(gw))["token"]
    for token in (kept, deleted, kept, deleted):
        assert await status(gw, "/api/warm", token) == 200
    assert len(cache) == 2

    gate = asyncio.Event()
    attempts: list[float] = []
    real_subscriber = store.subscriber

    async def gated(config: Any, client: Any) -> Any:
        attempts.append(time.monotonic())
        await gate.wait()
        return await real_subscriber(config, client)

    monkeypatch.setattr(store, "subscriber", gated)
    assert await own_client.execute_command("CLIENT", "KILL", "TYPE", "pubsub") == 1
    await wait_live(gw, False, within=1.0)
    deadline = time.monotonic() + 2
    while not attempts:
        assert time.monotonic() < deadline, "the follower did not try to resubscribe"
        await asyncio.sleep(0.01)
    assert len(cache) == 0 and not cache.live

    # A session ended behind the gateway's back (no PUBLISH at all): refused at once.
    await own_client.delete(f"{key_prefix}session:{sid_of(gw, deleted)}")
    assert await status(gw, "/api/off", deleted) == 401
    # The other is verified against Redis on every request, and not cached meanwhile.
    hits = cache.hits
    before = await commandstats(own_client)
    for _ in range(5):
        assert await status(gw, "/api/off", kept) == 200
    commands = delta(before, await commandstats(own_client))
    assert commands.get("hgetall") == 5, commands
    assert cache.hits == hits and len(cache) == 0

    gate.set()
    took = await wait_live(gw, True, within=2.5)
    report(f"held-off follower resubscribed {1000 * took:.0f} ms after the gate opened")
    hits = cache.hits
    for _ in range(3):
        assert await status(gw, "/api/on", kept) == 200
    assert cache.hits == hits + 2
    assert await status(gw, "/api/on", deleted) == 401


async def test_stalled_channel_is_noticed_by_the_ping_watchdog(
        make_gateway: GatewayFactory, own_redis: EmbeddedRedis, key_prefix: str) -> None:
    """A subscription that stops answering (no FIN, no error) turns the cache off within
    2 x redis.timeout + 0.25 s; from then on the cached token fails closed."""
    timeout = 0.3
    gw = await make_gateway(redis={**redis_section(own_redis.url, key_prefix),
                                   "timeout": "300ms"})
    cache, token = await warm(gw)
    pauser = aioredis.from_url(own_redis.url)
    try:
        paused_at = time.monotonic()
        await pauser.execute_command("CLIENT", "PAUSE", 2500, "ALL")
        noticed = await wait_live(gw, False, within=2 * timeout + 0.25 + 0.6)
        # no pong for 2 x timeout + 0.25 s, checked at least every 250 ms
        report(f"stalled channel noticed after {1000 * noticed:.0f} ms "
               f"(watchdog: no pong for {1000 * (2 * timeout + 0.25):.0f} ms)")
        assert len(cache) == 0
        resp = await gw.get("/api/stalled", headers=bearer(token))
        assert resp.status == 503
        assert (await resp.json())["error"] == "store_unavailable"
        await wait_live(gw, True, within=paused_at + 2.5 + 3 - time.monotonic())
        assert await status(gw, "/api/after", token) == 200
    finally:
        await pauser.aclose()


async def test_redis_stopped_turns_the_cache_off_and_fails_closed(
        make_gateway: GatewayFactory, own_redis: EmbeddedRedis, key_prefix: str,
        upstream: Upstream) -> None:
    gw = await make_gateway(redis=redis_section(own_redis.url, key_prefix))
    cache, token = await warm(gw)
    assert cache.hits >= 1

    own_redis.stop()
    try:
        off = await wait_live(gw, False, within=1.0)
        report(f"Redis stopped: cache off after {1000 * off:.1f} ms")
        assert len(cache) == 0
        forwarded = len(upstream.seen)
        for path in ("/api/down", "/auth/session", "/auth/verify"):
            resp = await gw.get(path, headers=bearer(token))
            assert resp.status == 503, (path, resp.status)
            assert (await resp.json())["error"] == "store_unavailable"
        assert len(upstream.seen) == forwarded
        assert not cache.live
    finally:
        own_redis.start()
    back = await wait_live(gw, True, within=3.0)
    report(f"Redis back: cache live again after {1000 * back:.0f} ms")
    assert await status(gw, "/api/back", token) == 200  # append-only: the session survived
    hits = cache.hits
    assert await status(gw, "/api/back", token) == 200
    assert cache.hits == hits + 1

