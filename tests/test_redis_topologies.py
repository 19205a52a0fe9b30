"""The gateway against Redis beyond one instance, with real redis-server processes
started here (tests/topologies.py): a 3-master Redis Cluster and a Sentinel setup (one master,
one replica, three sentinels), plus the Redis memory a session costs.

- Cluster (``redis.cluster: true``): login, required route, refresh, logout, the login
  limiter's Lua scripts (ban included), the access-token manager and the invalidation cache
  across two gateways (PUBLISH is broadcast to every node). ``CLUSTER KEYSLOT`` shows each
  session operation is single-key and each limiter script's keys share one slot; sessions land
  on every master, so the cluster is really used.
- Sentinel (``redis.sentinels``): login, invalidation across two gateways, then a failover
  drill: SIGKILL the master once the sessions have replicated; after Sentinel promotes the
  replica, the gateways (not restarted) serve the old tokens again, never answered 401 for
  them meanwhile, and new logins work.
- ``MEMORY USAGE`` of a session hash, with and without unionid: at most 300 bytes.

The cluster is module-scoped (one for the file); the sentinel setup belongs to the failover
drill alone (it ends with its master dead). Every process is killed in ``finally``. Figures are printed with a ``TOPOLOGY`` prefix (``pytest -s``).
"""

from __future__ import annotations

import asyncio
import math
import statistics
import time
import uuid
from typing import Any, Iterator

import pytest
import redis
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient
from redis.crc import key_slot
from redis.exceptions import MovedError

from conftest import APPID, SIGNING_KEY, GatewayFactory, Upstream, bearer, login
from gateway.testing.embedded import EmbeddedRedis
from test_cache import cache_of, services, wait_live
from topologies import Cluster, SentinelSetup, wait_for


def report(text: str) -> None:
    print(f"TOPOLOGY {text}", flush=True)


def sid_of(client: TestClient, token: str) -> str:
    return str(services(client).tokens.verify(token).sid)


async def status(client: TestClient, path: str, token: str) -> int:
    resp = await client.get(path, headers=bearer(token))
    await resp.read()
    return resp.status


async def revocation_latency(a: TestClient, b: TestClient, token: str) -> float:
    """B caches ``token``; A logs it out; seconds until B refuses it."""
    assert await status(b, "/api/warm", token) == 200
    hits = cache_of(b).hits
    assert await status(b, "/api/warm", token) == 200
    assert cache_of(b).hits == hits + 1, "B must be serving the token from its cache"
    assert (await a.post("/auth/logout", headers=bearer(token))).status == 204
    started = time.perf_counter()
    while (got := await status(b, "/api/after", token)) != 401:
        assert got == 200, got
        assert time.perf_counter() - started < 1.0, "B kept serving a logged-out token"
    return time.perf_counter() - started


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


# --- Redis Cluster ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    topology = Cluster(masters=3)
    try:
        started = time.monotonic()
        topology.start()
        report(f"cluster of 3 masters ready in {time.monotonic() - started:.1f}s "
               f"(ports {[n.port for n in topology.nodes]})")
        yield topology
    finally:
        topology.close()


def cluster_redis(cluster: Cluster, key_prefix: str, **extra: Any) -> dict[str, Any]:
    return {"cluster": True, "url": cluster.url, "key_prefix": key_prefix, **extra}


def keyslot(cluster: Cluster, key: str) -> int:
    with cluster.nodes[0].client() as c:
        slot = int(c.execute_command("CLUSTER", "KEYSLOT", key))
    assert slot == key_slot(key.encode())
    return slot


def holder(cluster: Cluster, key: str) -> int:
    """Index of the master holding ``key`` (asked of every node, without redirection)."""
    found = []
    for i, node in enumerate(cluster.nodes):
        with node.client() as c:
            try:
                if c.exists(key):
                    found.append(i)
            except MovedError:  # not this node's slot
                pass
    assert len(found) == 1, (key, found)
    return found[0]


async def test_cluster_sessions_login_refresh_logout(
        make_gateway: GatewayFactory, cluster: Cluster, key_prefix: str,
        upstream: Upstream) -> None:
    gw = await make_gateway(redis=cluster_redis(cluster, key_prefix))
    await wait_live(gw)
    users = [await login(gw) for _ in range(12)]
    owners = set()
    for user in users:
        key = f"{key_prefix}session:{sid_of(gw, user['token'])}"
        owner = holder(cluster, key)
        assert cluster.node_for_slot(keyslot(cluster, key)) is cluster.nodes[owner]
        owners.add(owner)
        assert await status(gw, "/api/x", user["token"]) == 200
        assert upstream.last.header("X-WX-OpenID") == [user["openid"]]
    report(f"cluster: 12 sessions on masters {sorted(owners)}")
    assert len(owners) >= 2, "the sessions should spread over the cluster's masters"

    token = users[0]["token"]
    resp = await gw.post("/auth/refresh", headers=bearer(token))
    assert resp.status == 200, await resp.text()
    refreshed = (await resp.json())["token"]
    assert await status(gw, "/api/refreshed", refreshed) == 200
    assert await status(gw, "/auth/session", token) == 200  # still valid until its exp
    assert (await gw.post("/auth/logout", headers=bearer(refreshed))).status == 204
    for t in (token, refreshed):
        assert await status(gw, "/api/after", t) == 401
        assert await status(gw, "/auth/session", t) == 401
    key = f"{key_prefix}session:{sid_of(gw, token)}"
    for node in cluster.nodes:
        with node.client() as c:
            try:
                assert c.exists(key) == 0
            except MovedError:
                pass
    # /readyz asks the cluster too
    assert (await gw.get("/readyz")).status == 200


async def test_cluster_rate_limiter_scripts_and_ban(
        make_gateway: GatewayFactory, cluster: Cluster, key_prefix: str) -> None:
    gw = await make_gateway(
        redis=cluster_redis(cluster, key_prefix),
        auth={"rate_limit": {"ip_limit": 50, "ip_window": "60s", "app_limit": 100,
                             "app_window": "60s", "max_retries": 2, "find_time": "10m",
                             "ban_time": "15m"}})
    ip = "127.0.0.1"
    fail_key, ban_key = f"{key_prefix}fail:{{{ip}}}", f"{key_prefix}ban:{{{ip}}}"
    window_key = f"{key_prefix}rl:ip:{{{ip}}}"
    # the failure script's two keys share the {ip} hash tag, hence one slot
    assert keyslot(cluster, fail_key) == keyslot(cluster, ban_key) == keyslot(cluster, window_key)

    await login(gw)  # the sliding-window script runs (rl:ip and rl:app)
    assert holder(cluster, window_key) >= 0
    for i in range(2):
        resp = await gw.post("/auth/login", json={"code": f"errcode-40029-{i}-{uuid.uuid4()}"})
        assert resp.status == 401 and (await resp.json())["error"] == "invalid_code"
    assert holder(cluster, ban_key) >= 0  # the ban set by the second failure
    resp = await gw.post("/auth/login", json={"code": f"good-{uuid.uuid4()}"})
    assert resp.status == 429, await resp.text()
    assert (await resp.json())["error"] == "rate_limited"
    assert 800 <= int(resp.headers["Retry-After"]) <= 900


class Monitors:
    """MONITOR on every master while the gateway works: each script call and each command it
    sent, as (node index, argv)."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.commands: list[tuple[int, list[str]]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._ready = 0

    async def _follow(self, i: int, port: int) -> None:
        client = aioredis.Redis(host="127.0.0.1", port=port)
        try:
            async with client.monitor() as monitor:
                self._ready += 1
                while True:
                    info = await monitor.next_command()
                    if info["client_type"] != "lua":  # commands a script ran are its own
                        self.commands.append((i, info["command"].split(" ")))
        finally:
            await client.aclose()

    async def __aenter__(self) -> "Monitors":
        self._tasks = [asyncio.ensure_future(self._follow(i, n.port))
                       for i, n in enumerate(self.cluster.nodes)]
        deadline = time.monotonic() + 5
        while self._ready < len(self._tasks):
            assert time.monotonic() < deadline, "MONITOR did not start"
            await asyncio.sleep(0.01)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.sleep(0.2)  # let the last commands arrive
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def test_cluster_every_gateway_command_stays_in_one_slot(
        make_gateway: GatewayFactory, cluster: Cluster, key_prefix: str) -> None:
    """Every script the gateway runs declares its keys, and they share one slot (session
    scripts: exactly one key); no other command spans slots."""
    gw = await make_gateway(
        redis=cluster_redis(cluster, key_prefix),
        session={"signing_keys": [SIGNING_KEY], "ttl": "1h", "store_phone": True},
        auth={"rate_limit": {"ip_limit": 50, "app_limit": 100, "max_retries": 5}})
    await wait_live(gw)
    async with Monitors(cluster) as monitors:
        bad = await gw.post("/auth/login", json={"code": f"errcode-40029-{uuid.uuid4()}"})
        assert bad.status == 401
        token = (await login(gw))["token"]
        assert await status(gw, "/api/x", token) == 200
        resp = await gw.post("/auth/phone", json={"code": "slot-phone"}, headers=bearer(token))
        assert resp.status == 200, await resp.text()
        resp = await gw.post("/auth/refresh", headers=bearer(token))
        assert resp.status == 200
        assert (await gw.post("/auth/logout", headers=bearer(token))).status == 204

    ours = [(i, argv) for i, argv in monitors.commands
            if any(key_prefix in arg for arg in argv[1:])]
    scripts = [(i, argv) for i, argv in ours if argv[0].upper() in ("EVAL", "EVALSHA")]
    by_keys: dict[int, int] = {}
    for i, argv in scripts:
        n = int(argv[2])
        keys = argv[3:3 + n]
        assert n >= 1 and all(k.startswith(key_prefix) for k in keys), argv
        slots = {keyslot(cluster, k) for k in keys}
        assert len(slots) == 1, f"a script spans slots: {argv[:3 + n]}"
        assert cluster.node_for_slot(slots.pop()) is cluster.nodes[i]
        if ":session:" in keys[0]:  # with the user's index (and ban), in its slot (above)
            assert n <= 3, argv
        by_keys[n] = by_keys.get(n, 0) + 1
    # set_phone (1 key); renew, delete (session + index); create (session, index, ban); the
    # failure script (fail + ban: 2 keys); the sliding windows and the lock release (1 key)
    assert by_keys.get(3, 0) >= 1 and by_keys.get(2, 0) >= 3 and by_keys.get(1, 0) >= 4, by_keys
    for i, argv in ours:
        keys = [a for a in argv[1:] if a.startswith(key_prefix)]
        if argv[0].upper() not in ("EVAL", "EVALSHA", "PUBLISH"):
            assert len({keyslot(cluster, k) for k in keys}) == 1, argv
    kinds = sorted({argv[0].upper() for _, argv in ours})
    report(f"cluster: gateway commands seen {kinds}; script calls by number of keys {by_keys}")


async def test_cluster_access_tokens_and_phone(
        make_gateway: GatewayFactory, cluster: Cluster, key_prefix: str,
        upstream: Upstream) -> None:
    gw = await make_gateway(redis=cluster_redis(cluster, key_prefix),
                            session={"signing_keys": [SIGNING_KEY], "ttl": "1h",
                                     "store_phone": True})
    await wait_live(gw)
    token = (await login(gw))["token"]
    resp = await gw.post("/auth/phone", json={"code": "cluster-phone"}, headers=bearer(token))
    assert resp.status == 200, await resp.text()
    number = (await resp.json())["phone_number"]
    assert await status(gw, "/api/with-phone", token) == 200
    assert upstream.last.header("X-WX-Phone") == [number]

    s = services(gw)
    app = s.config.app(APPID)
    first = await s.access_tokens.get(app)  # the manager on the cluster client
    assert first and await s.access_tokens.get(app) == first
    key, lock = f"{key_prefix}access_token:{APPID}", f"{key_prefix}access_token_lock:{APPID}"
    holder(cluster, key)
    # a rejected token is refreshed under the lock (SET NX + the owner-only release script)
    second = await s.access_tokens.get(app, rejected=first)
    assert second != first
    for node in cluster.nodes:
        with node.client() as c:
            try:
                assert c.exists(lock) == 0, "the refresh lock was not released"
            except MovedError:
                pass


async def test_cluster_invalidation_reaches_a_replica_subscribed_to_another_node(
        make_gateway: GatewayFactory, cluster: Cluster, key_prefix: str) -> None:
    a = await make_gateway(redis=cluster_redis(cluster, key_prefix))
    b = await make_gateway(redis=cluster_redis(cluster, key_prefix))
    await wait_live(a)
    await wait_live(b)
    channel = f"{key_prefix}invalidate"
    subscribed = []
    for i, node in enumerate(cluster.nodes):
        with node.client() as c:
            subscribed += [i] * int(c.pubsub_numsub(channel)[0][1])
    assert len(subscribed) == 2, subscribed  # one connection per gateway, on one node each

    latencies: list[float] = []
    publishers = set()
    for _ in range(200):  # p99 over 200 trials
        token = (await login(a))["token"]
        publishers.add(holder(cluster, f"{key_prefix}session:{sid_of(a, token)}"))
        latencies.append(await revocation_latency(a, b, token))
    # The logout's PUBLISH runs on the session's master; with sessions on every master, some
    # were published on a node other than the one B listens to.
    assert len(publishers) == 3, publishers
    report(f"cluster revocation A->B over {len(latencies)} trials: "
           f"p50 {1000 * statistics.median(latencies):.2f} ms, p99 {1000 * p99(latencies):.2f} ms, "
           f"max {1000 * max(latencies):.2f} ms, over 10 ms: {sum(t > 0.01 for t in latencies)}"
           f" (subscribers on nodes {subscribed}, publishers on nodes {sorted(publishers)})")
    assert p99(latencies) < 0.05


# --- Redis Sentinel ---------------------------------------------------------------------------


@pytest.fixture
def sentinel_setup() -> Iterator[SentinelSetup]:
    topology = SentinelSetup(sentinels=3)
    try:
        started = time.monotonic()
        topology.start()
        report(f"sentinel setup ready in {time.monotonic() - started:.1f}s")
        yield topology
    finally:
        topology.close()


async def test_sentinel_failover_drill(
        make_gateway: GatewayFactory, sentinel_setup: SentinelSetup, key_prefix: str,
        upstream: Upstream) -> None:
    setup = sentinel_setup
    assert setup.master is not None and setup.replica is not None
    section = {"sentinels": setup.sentinel_addresses, "service_name": "mymaster",
               "key_prefix": key_prefix}
    a, b = await make_gateway(redis=section), await make_gateway(redis=section)
    await wait_live(a)
    await wait_live(b)

    # Before the failover: logins, the cache and invalidation across the two gateways.
    users = [(await login(a))["token"] for _ in range(3)]
    for token in users:
        assert await status(b, "/api/warm", token) == 200
    gone = (await login(a))["token"]
    latency = await revocation_latency(a, b, gone)
    assert latency < 0.05

    # Every session has reached the replica (WAIT after a marker write of our own, then the
    # keys themselves on the replica).
    with setup.master.client() as m, setup.replica.client() as r:
        m.set(f"{key_prefix}marker", "1")
        assert int(m.execute_command("WAIT", 1, 1000)) == 1
        for token in users:
            assert r.exists(f"{key_prefix}session:{sid_of(a, token)}") == 1
        assert r.exists(f"{key_prefix}session:{sid_of(a, gone)}") == 0

    old_master, replica_port = setup.master.port, setup.replica.port
    killed = time.monotonic()
    setup.master.kill()
    # Meanwhile, the gateways must fail closed (503) or serve: never call the session gone.
    seen: dict[int, int] = {}

    async def probe() -> None:
        while True:
            for gw in (a, b):
                got = await status(gw, "/api/during", users[0])
                seen[got] = seen.get(got, 0) + 1
            await asyncio.sleep(0.05)

    prober = asyncio.ensure_future(probe())
    try:
        promoted_after = await asyncio.to_thread(
            wait_for, lambda: setup.master_address()[1] == replica_port, 20.0,
            "Sentinel promoting the replica", 0.05)
        promoted = time.monotonic()
        assert setup.master_address() == ("127.0.0.1", replica_port)
        assert setup.master_address()[1] != old_master
        # Within a few seconds of the promotion both gateways serve the old tokens again.
        served: dict[str, float] = {}
        while len(served) < 2:
            for name, gw in (("A", a), ("B", b)):
                if name not in served and await status(gw, "/api/back", users[0]) == 200:
                    served[name] = time.monotonic()
            assert time.monotonic() - promoted < 5, f"not served again after promotion: {seen}"
            await asyncio.sleep(0.02)
    finally:
        prober.cancel()
        await asyncio.gather(prober, return_exceptions=True)
    report(f"sentinel failover: replica promoted {promoted_after:.2f}s after SIGKILL of the "
           f"master; old token served again by A {served['A'] - killed:.2f}s and B "
           f"{served['B'] - killed:.2f}s after the kill; statuses meanwhile {seen}")
    assert set(seen) <= {200, 503}, f"a live session was refused during the failover: {seen}"

    # No gateway restart: every replicated session works on both, the logged-out one stays out.
    for token in users:
        for gw in (a, b):
            assert await status(gw, "/api/after", token) == 200
            assert await status(gw, "/auth/session", token) == 200
    for gw in (a, b):
        assert await status(gw, "/api/after", gone) == 401
    fresh = (await login(b))["token"]
    assert await status(a, "/api/new", fresh) == 200
    resp = await a.post("/auth/refresh", headers=bearer(fresh))
    assert resp.status == 200, await resp.text()
    # The caches follow the new master's channel: a logout is still seen across gateways.
    await wait_live(a, within=5)
    await wait_live(b, within=5)
    assert await revocation_latency(b, a, users[1]) < 0.05
    with setup.replica.client() as r:  # the promoted replica holds the new session
        assert r.exists(f"{key_prefix}session:{sid_of(a, fresh)}") == 1
        assert r.info("replication")["role"] == "master"


# --- memory per session -----------------------------------------------------------------------


async def test_memory_per_session(make_gateway: GatewayFactory, cluster: Cluster) -> None:
    """MEMORY USAGE of a session hash with the default key prefix, with and without unionid,
    on a single Redis and in the cluster: at most 300 bytes each."""
    usage: dict[str, int] = {}
    with EmbeddedRedis(persist=False) as server:
        gw = await make_gateway(redis={"url": server.url, "key_prefix": "wxgw:"})
        sessions = {"with unionid": await login(gw),
                    "without unionid": await login(gw, code=f"nounionid-{uuid.uuid4().hex[:8]}")}
        assert sessions["with unionid"]["unionid"] and sessions["without unionid"]["unionid"] is None
        with redis.Redis(host="127.0.0.1", port=server.port) as r:
            allocator = r.info("memory")["mem_allocator"]
            for name, data in sessions.items():
                key = f"wxgw:session:{sid_of(gw, data['token'])}"
                usage[name] = int(r.memory_usage(key, samples=0))
                lengths = {f.decode(): r.hstrlen(key, f) for f in r.hkeys(key)}
                report(f"memory per session ({name}): {usage[name]} bytes; "
                       f"{r.object('encoding', key).decode()} encoding, key {len(key)} chars, "
                       f"value lengths {lengths}, allocator {allocator}")
        await gw.close()
    c = await make_gateway(redis=cluster_redis(cluster, "wxgw:"))
    key = f"wxgw:session:{sid_of(c, (await login(c))['token'])}"
    with cluster.nodes[holder(cluster, key)].client() as r:
        usage["in the cluster"] = int(r.memory_usage(key, samples=0))
    report(f"memory per session (in the cluster, with unionid): {usage['in the cluster']} bytes")
    assert all(n <= 300 for n in usage.values()), usage
