"""In-process cache of verified sessions, kept honest by Redis pub/sub invalidation.

An authenticated request normally costs no Redis command and no JWT decode: the identity a
token proved is kept (bounded LRU) until the token's ``exp`` or the session's expiry, whichever
comes first. Whatever ends or changes a session (logout, a stored phone number, ...) publishes
its id on ``{key_prefix}invalidate`` in the same Redis call that changes it, and every replica
drops the entries on receipt. The cache is only used while that subscription is known to be
live: when it drops or stops answering pings, the cache is cleared and every request goes to
Redis until the replica has subscribed again (fail closed, never serve stale).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from redis.exceptions import RedisError

from .metrics import Metrics
from .session_tokens import Claims
from .sessions import Session

log = logging.getLogger("gateway.cache")


@dataclass(frozen=True, slots=True)
class Identity:
    """What a token proved: its claims and its live session (what the cache keeps)."""

    token: Claims
    session: Session
    # What is built from this identity alone (the /auth/verify answer, the identity headers):
    # made once, and gone with the identity when its cache entry is dropped or invalidated.
    memo: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


class SessionCache:
    def __init__(self, size: int, metrics: Metrics | None = None) -> None:
        self._size = size
        self._entries: OrderedDict[str, tuple[Identity, float]] = OrderedDict()
        self._tokens_by_sid: dict[str, set[str]] = {}
        self._watchers: dict[str, set[Callable[[], None]]] = {}
        self.epoch = 0  # bumped by every invalidation: a lookup that raced one is not stored
        self.live = False
        self.hits = 0
        self.misses = 0
        self._hit = metrics.cache_lookups.labels("hit") if metrics is not None else None
        self._miss = metrics.cache_lookups.labels("miss") if metrics is not None else None

    def get(self, token: str) -> Identity | None:
        if not self.live:
            return None
        entry = self._entries.get(token)
        if entry is None or entry[1] <= time.time():
            if entry is not None:
                self._drop(token)
            self.misses += 1
            if self._miss is not None:
                self._miss.inc()
            return None
        self._entries.move_to_end(token)
        self.hits += 1
        if self._hit is not None:
            self._hit.inc()
        return entry[0]

    def put(self, token: str, identity: Identity, epoch: int) -> None:
        if not self.live or epoch != self.epoch or self._size <= 0:
            return
        until = min(identity.token.expires_at, identity.session.expires_at)
        self._entries[token] = (identity, float(until))
        self._entries.move_to_end(token)
        self._tokens_by_sid.setdefault(identity.session.sid, set()).add(token)
        while len(self._entries) > self._size:
            self._drop(next(iter(self._entries)))

    def watch(self, sid: str, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` when ``sid`` is invalidated; returns the way to stop watching."""
        self._watchers.setdefault(sid, set()).add(callback)

        def unwatch() -> None:
            watchers = self._watchers.get(sid)
            if watchers is not None:
                watchers.discard(callback)
                if not watchers:
                    del self._watchers[sid]
        return unwatch

    def invalidate(self, sid: str) -> None:
        for callback in list(self._watchers.get(sid, ())):
            callback()
        self.epoch += 1
        for token in self._tokens_by_sid.pop(sid, set()):
            self._entries.pop(token, None)

    def clear(self) -> None:
        self.epoch += 1
        self._entries.clear()
        self._tokens_by_sid.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def _drop(self, token: str) -> None:
        entry = self._entries.pop(token, None)
        if entry is not None:
            tokens = self._tokens_by_sid.get(entry[0].session.sid)
            if tokens is not None:
                tokens.discard(token)
                if not tokens:
                    del self._tokens_by_sid[entry[0].session.sid]


async def follow_invalidations(subscriber: Callable[[], Awaitable[Any]], channel: str,
                               cache: SessionCache, timeout: float) -> None:
    """Keep ``cache.live`` true exactly while invalidations on ``channel`` are being received.

    ``subscriber()`` gives the redis.asyncio client to subscribe with. A ping every
    ``timeout`` seconds must come back within ``timeout``; otherwise (or on any error) the
    cache is cleared and the subscription is made again.
    """
    pause = 0.1
    while True:
        pubsub: Any = None
        try:
            pubsub = (await subscriber()).pubsub()
            await pubsub.subscribe(channel)
            await _confirmed(pubsub, timeout)
            cache.clear()  # anything cached before this subscription may have missed messages
            cache.live = True
            log.info("session cache on: following invalidations on %s", channel)
            pause = 0.1
            await _listen(pubsub, cache, timeout)
        except asyncio.CancelledError:
            raise
        except (RedisError, OSError, asyncio.TimeoutError) as exc:
            if cache.live:
                log.warning("session cache off: invalidation channel lost (%s)",
                            type(exc).__name__)
        finally:
            cache.live = False
            cache.clear()
            if pubsub is not None:
                try:
                    async with asyncio.timeout(timeout):
                        await pubsub.aclose()
                except (RedisError, OSError, asyncio.TimeoutError):
                    pass
        _raise_if_cancelled(asyncio.current_task())
        await asyncio.sleep(pause)
        pause = min(pause * 2, 2.0)


def _raise_if_cancelled(task: asyncio.Task[Any] | None) -> None:
    # On Python 3.11 a cancellation that lands as redis-py's read timeout expires is
    # swallowed by asyncio.timeout (fixed in 3.12); the task still says it is cancelling.
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def _confirmed(pubsub: Any, timeout: float) -> None:
    async with asyncio.timeout(timeout * 2):
        while True:
            message = await pubsub.get_message(timeout=timeout)
            if message is not None and message["type"] == "subscribe":
                return


async def _listen(pubsub: Any, cache: SessionCache, timeout: float) -> None:
    last_pong = time.monotonic()
    next_ping = last_pong + timeout
    task = asyncio.current_task()
    while True:
        _raise_if_cancelled(task)
        now = time.monotonic()
        if now >= next_ping:
            await pubsub.ping()
            next_ping = now + timeout
        message = await pubsub.get_message(timeout=min(timeout, 0.25))
        if message is not None:
            if message["type"] == "message":
                data = message["data"]
                cache.invalidate(data.decode() if isinstance(data, bytes) else str(data))
            elif message["type"] == "pong":
                last_pong = time.monotonic()
        if time.monotonic() - last_pong > 2 * timeout + 0.25:
            raise asyncio.TimeoutError("no pong on the invalidation channel")
