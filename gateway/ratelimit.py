"""Login abuse control in Redis, shared by every replica: sliding-window limits and bans.

Per client IP and per appid, a sliding window log (a sorted set of attempt times, Redis's own
clock) caps login attempts. Consecutive invalid codes from one IP within ``find_time`` lead to
a ban of ``ban_time`` (Authelia's max_retries / find_time / ban_time); a good login clears the
count.
"""

from __future__ import annotations

import math
import secrets

import redis.asyncio as aioredis

from .config import RateLimit
from .errors import RateLimited
from .store import guarded

# Returns 0 when the attempt is admitted (and recorded), else milliseconds until it would be.
_WINDOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) >= limit then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return math.max(1, tonumber(oldest[2]) + window - now)
end
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('PEXPIRE', KEYS[1], window)
return 0
"""
# Counts a failure; returns the ban's length in ms when this failure starts one, else 0.
_FAILURE = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
if n >= tonumber(ARGV[2]) then
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
  redis.call('DEL', KEYS[1])
  return tonumber(ARGV[3])
end
return 0
"""


class LoginLimiter:
    def __init__(self, client: aioredis.Redis, key_prefix: str, limits: RateLimit) -> None:
        self._redis = client
        self._prefix = key_prefix
        self._limits = limits
        self._window = client.register_script(_WINDOW)
        self._failure = client.register_script(_FAILURE)

    async def admit(self, ip: str, appid: str) -> None:
        """Raise ``RateLimited`` (with Retry-After) when this login attempt must wait."""
        limits = self._limits
        if limits.max_retries:
            ban_ms = await guarded(lambda: self._redis.pttl(self._key("ban", ip)))
            if ban_ms > 0:
                raise _limited("too many invalid login codes from this address", ban_ms)
        for scope, subject, limit, window in (("ip", ip, limits.ip_limit, limits.ip_window),
                                              ("app", appid, limits.app_limit, limits.app_window)):
            if not limit:
                continue
            wait_ms = await guarded(lambda: self._window(
                keys=[self._key(f"rl:{scope}", subject)],
                args=[int(window * 1000), limit, secrets.token_hex(8)]))
            if wait_ms:
                raise _limited(f"too many login attempts for this {scope}; try again later",
                               wait_ms)

    async def failed(self, ip: str) -> None:
        """An invalid code came from ``ip``."""
        if self._limits.max_retries:
            await guarded(lambda: self._failure(
                keys=[self._key("fail", ip), self._key("ban", ip)],  # one slot: {ip}
                args=[int(self._limits.find_time * 1000), self._limits.max_retries,
                      int(self._limits.ban_time * 1000)]))

    async def succeeded(self, ip: str) -> None:
        if self._limits.max_retries:
            await guarded(lambda: self._redis.delete(self._key("fail", ip)))

    def _key(self, kind: str, subject: str) -> str:
        # The subject is a hash tag: a script's keys must share a Redis Cluster slot.
        return f"{self._prefix}{kind}:{{{subject}}}"


def _limited(message: str, wait_ms: int) -> RateLimited:
    return RateLimited(message, headers={"Retry-After": str(max(1, math.ceil(wait_ms / 1000)))})
