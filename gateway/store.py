"""Redis as the gateway's store: a client for one server, a Sentinel-managed primary or a
Cluster, and the guard that turns any Redis failure into ``StoreUnavailable`` (fail closed)."""

from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.connection import parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from .config import RedisConfig
from .errors import StoreUnavailable

_T = TypeVar("_T")
log = logging.getLogger("gateway.redis")


class _RedisHealth:
    """Logs Redis going away and coming back once each, not once per failing request."""

    down = False

    def failed(self, exc: BaseException) -> None:
        if not self.down:
            self.down = True
            log.warning("Redis unavailable (%s): failing closed", type(exc).__name__)

    def answered(self) -> None:
        if self.down:
            self.down = False
            log.info("Redis reachable again")


_health = _RedisHealth()


async def guarded(operation: Callable[[], Awaitable[_T]]) -> _T:
    """Run a Redis operation; any Redis failure becomes ``StoreUnavailable`` (fail closed)."""
    try:
        result = await operation()
    except (RedisError, OSError) as exc:
        _health.failed(exc)
        raise StoreUnavailable(f"Redis is unavailable ({type(exc).__name__})") from exc
    _health.answered()
    return result


def connect(config: RedisConfig, retries: int = 1) -> aioredis.Redis:
    """A pooled client that fails fast: a down Redis must not stall requests (fail closed).

    One Redis (``redis.url``), a Sentinel-managed primary (``redis.sentinels``) or a Cluster
    (``redis.cluster``): every key the gateway touches in one operation shares a slot.
    """
    client: Any
    options = _options(config, retries)
    if config.sentinels:
        sentinel = Sentinel(list(config.sentinels), sentinel_kwargs={  # type: ignore[no-untyped-call]
            "socket_timeout": config.timeout, "socket_connect_timeout": config.timeout})
        url = parse_url(config.url)  # type: ignore[no-untyped-call]
        extra = {k: url[k] for k in ("db", "username", "password") if k in url}
        client = sentinel.master_for(config.service_name, **options, **extra)
    elif config.cluster:
        client = RedisCluster.from_url(config.url, socket_timeout=config.timeout,
                                       socket_connect_timeout=config.timeout)
    else:
        client = aioredis.from_url(config.url, **options)
    return client  # type: ignore[no-any-return]


async def subscriber(config: RedisConfig, client: aioredis.Redis) -> aioredis.Redis:
    """A client of its own for the invalidation subscription, without retries: its follower
    handles every failure itself (and redis-py's retry can swallow a cancellation). In a
    cluster, PUBLISH reaches every node, so one node's connection hears it all."""
    if not config.cluster:
        return connect(config, retries=0)
    cluster: Any = client
    await cluster.initialize()
    node = cluster.get_random_node()
    return aioredis.Redis(host=node.host, port=node.port, **_options(config, retries=0))


def _options(config: RedisConfig, retries: int) -> dict[str, Any]:
    # One immediate retry covers a pooled connection that died with a Redis restart. Timeouts
    # are not retried: a slow Redis must cost a request redis.timeout, not a multiple of it.
    return {"socket_timeout": config.timeout, "socket_connect_timeout": config.timeout,
            "retry": Retry(NoBackoff(), retries, supported_errors=(RedisConnectionError,)),
            "health_check_interval": 30}
