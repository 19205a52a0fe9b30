"""Sessions in Redis: one hash per session, expiring with it, session_key sealed at rest."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import math
import secrets
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from .keys import Keyring
from .errors import StoreUnavailable
from .store import guarded

# Renew only a session that still exists: a logout racing a refresh must not resurrect it.
# ('e' is the expires_at field, see the field names below.) KEYS[2], when given, is the user's
# index of sessions (see _user_tag), kept in step in the same script.
_RENEW = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'e', ARGV[1])
redis.call('EXPIREAT', KEYS[1], ARGV[1])
if KEYS[2] then
  redis.call('ZADD', KEYS[2], ARGV[1], ARGV[2])
  local last = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
  redis.call('EXPIREAT', KEYS[2], last[2])
end
return 1
"""
_SET_FIELD = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"""
# Deleting and announcing in one script: no replica can miss a logout that happened.
_DELETE = """
local n = redis.call('DEL', KEYS[1])
if KEYS[2] then redis.call('ZREM', KEYS[2], ARGV[2]) end
redis.call('PUBLISH', ARGV[1], ARGV[2])
return n
"""
# The login hook's answer replaced as a whole: fields it no longer gives must go (the claim
# fields are every "m<name>"; the session's own fields are one letter).
_SET_USER = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HDEL', KEYS[1], 'i', 'r')
for _, name in ipairs(redis.call('HKEYS', KEYS[1])) do
  if #name > 1 and string.sub(name, 1, 1) == 'm' then redis.call('HDEL', KEYS[1], name) end
end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('PUBLISH', ARGV[1], ARGV[2])
return 1
"""
# KEYS: the session, the user's index, the user's ban. A ban set at any moment either comes
# before (no session) or after (its revocation finds this session in the index).
_CREATE = """
if redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('EXPIREAT', KEYS[1], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[3])
local last = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
redis.call('EXPIREAT', KEYS[2], last[2])
return 1
"""
# Every session of a user ends in one step, each announced like a logout. Redis wants every
# key a script touches declared, so the caller reads the index first and passes the session
# keys (KEYS[3..], their sids in ARGV[4..]); when the index has changed since (a login in
# between) no session is ended and the caller reads again. ARGV[3]: set the ban too ('0':
# until lifted, else its lifetime in ms), or ''. The ban is set first, whatever the index
# says: from then on no login adds to it, so a user logging in all the while cannot keep the
# ban from being applied.
_REVOKE = """
if ARGV[3] == '0' then
  redis.call('SET', KEYS[2], ARGV[1])
elseif ARGV[3] ~= '' then
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[3])
end
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
if #members ~= #KEYS - 2 then return false end
local passed = {}
for i = 3, #KEYS do passed[ARGV[i + 1]] = true end
for _, sid in ipairs(members) do
  if not passed[sid] then return false end
end
local ended = {}
for i = 3, #KEYS do
  if redis.call('DEL', KEYS[i]) == 1 then table.insert(ended, ARGV[i + 1]) end
  redis.call('PUBLISH', ARGV[2], ARGV[i + 1])
end
redis.call('DEL', KEYS[1])
return ended
"""
_REVOKE_ATTEMPTS = 5


@dataclass(frozen=True, slots=True)
class UserData:
    """What the login hook said about the user, and when (unix seconds)."""

    fetched_at: int
    user_id: str | None = None
    roles: tuple[str, ...] = ()
    claims: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Session:
    sid: str
    openid: str
    unionid: str | None
    appid: str
    created_at: int
    expires_at: int
    phone: str | None = None
    user: UserData | None = None  # None: no login hook asked (yet)
    corpid: str | None = None  # WeCom: the user's corp
    # The app's platform when the user logged in: a reload that moves the app to another
    # platform must not pass this platform's user id off as the new one's.
    platform: str = "wechat"


# Hash field names: one letter each, which with the binary sealed session_key keeps a session
# in Redis's compact listpack encoding (MEMORY USAGE about 270 bytes instead of 800+).
OPENID, UNIONID, APPID, CREATED_AT, EXPIRES_AT, SESSION_KEY, PHONE, CORPID = "ouacekpq"
PLATFORM = "t"  # absent: wechat (sessions made before platforms were recorded were WeChat's)
# The login hook's answer: fetched at, user_id, roles (comma-joined), and each claim in a field
# "m<name>" of its own: Redis keeps a hash compact only while every field and value is at most
# hash-max-listpack-value (64) bytes, which one field of all claims would soon pass.
HOOKED, USER_ID, ROLES, CLAIMS = "hirm"
_B = {name: name.encode() for name in (OPENID, UNIONID, APPID, CREATED_AT, EXPIRES_AT,
                                        SESSION_KEY, PHONE, CORPID, HOOKED, USER_ID, ROLES,
                                        CLAIMS, PLATFORM)}


def _user_fields(user: UserData) -> dict[str, str | int | bytes]:
    """Only what the hook gave: an absent field costs nothing in the hash."""
    fields: dict[str, str | int | bytes] = {HOOKED: user.fetched_at}
    if user.user_id is not None:
        fields[USER_ID] = user.user_id
    if user.roles:
        fields[ROLES] = ",".join(user.roles)
    for name, value in user.claims:
        fields[CLAIMS + name] = value
    return fields


def _user(data: dict[Any, Any]) -> UserData | None:
    hooked = data.get(_B[HOOKED])
    if hooked is None:
        return None
    roles = data.get(_B[ROLES], b"").decode()
    claims = tuple((k[1:].decode(), v.decode()) for k, v in data.items()
                   if len(k) > 1 and k[:1] == _B[CLAIMS])
    user_id = data.get(_B[USER_ID])
    return UserData(int(hooked), None if user_id is None else user_id.decode(),
                    tuple(roles.split(",")) if roles else (), claims)


class SessionStore:
    def __init__(self, client: aioredis.Redis, key_prefix: str, keyring: Keyring) -> None:
        self._redis = client
        self._prefix = key_prefix
        self._keyring = keyring
        self._renew = client.register_script(_RENEW)
        self._set_field = client.register_script(_SET_FIELD)
        self._delete = client.register_script(_DELETE)
        self._create = client.register_script(_CREATE)
        self._set_user = client.register_script(_SET_USER)
        self._revoke = client.register_script(_REVOKE)
        self.channel = invalidation_channel(key_prefix)

    def key(self, sid: str) -> str:
        return f"{self._prefix}session:{sid}"

    def user_key(self, appid: str, openid: str) -> str:
        """The user's index of sessions: a sorted set of sids scored by expiry."""
        return f"{self._prefix}user:{_user_tag(appid, openid)}"

    def ban_key(self, appid: str, openid: str) -> str:
        return f"{self._prefix}ban:{_user_tag(appid, openid)}"

    def _index_of(self, sid: str) -> list[str]:
        """The index key of a session, [] for a session created before sids carried their
        user's tag (such a session lives in another hash slot and is in no index)."""
        if not sid.startswith("{"):
            return []
        return [f"{self._prefix}user:{sid[:sid.index('}') + 1]}"]

    async def create(self, appid: str, openid: str, unionid: str | None, session_key: str,
                     ttl: float, user: UserData | None = None,
                     corpid: str | None = None, platform: str = "wechat") -> Session | None:
        """A new session; None when the user is banned. An empty ``session_key``: the
        platform gives none (Alipay), and none is stored."""
        now = int(time.time())
        tag = _user_tag(appid, openid)
        session = Session(tag + secrets.token_urlsafe(16), openid, unionid, appid, now,
                          now + math.ceil(ttl), user=user, corpid=corpid, platform=platform)
        fields: dict[str, str | int | bytes] = {
            OPENID: openid, UNIONID: unionid or "", APPID: appid, CREATED_AT: now,
            EXPIRES_AT: session.expires_at}
        if session_key:
            fields[SESSION_KEY] = self._keyring.seal_bytes(session_key.encode(),
                                                           self._context(session.sid, appid))
        if corpid:
            fields[CORPID] = corpid
        if platform != "wechat":
            fields[PLATFORM] = platform
        if user is not None:
            fields.update(_user_fields(user))
        args: list[str | int | bytes] = [session.expires_at, now, session.sid]
        args += [item for pair in fields.items() for item in pair]
        # One script, keys of one hash slot (the user's tag): atomic in a cluster too.
        keys = [self.key(session.sid), self.user_key(appid, openid),
                self.ban_key(appid, openid)]
        if not await guarded(lambda: self._create(keys=keys, args=args)):
            return None
        return session

    async def get(self, sid: str) -> Session | None:
        data: dict[Any, Any] = await guarded(lambda: self._redis.hgetall(self.key(sid)))
        if not data or _B[OPENID] not in data:
            return None
        expires_at = int(data[_B[EXPIRES_AT]])
        if expires_at <= time.time():  # Redis expiry has a little lag; the contract has none.
            return None
        return Session(sid, data[_B[OPENID]].decode(),
                       data.get(_B[UNIONID], b"").decode() or None, data[_B[APPID]].decode(),
                       int(data[_B[CREATED_AT]]), expires_at,
                       data.get(_B[PHONE], b"").decode() or None, _user(data),
                       data.get(_B[CORPID], b"").decode() or None,
                       data.get(_B[PLATFORM], b"wechat").decode())

    async def renew(self, session: Session, ttl: float) -> Session | None:
        """Give the session a fresh lifetime; None if it no longer exists."""
        expires_at = int(time.time()) + math.ceil(ttl)
        keys = [self.key(session.sid), *self._index_of(session.sid)]
        done = await guarded(lambda: self._renew(keys=keys, args=[expires_at, session.sid]))
        if not done:
            return None
        return dataclasses.replace(session, expires_at=expires_at)

    async def set_phone(self, session: Session, phone: str) -> bool:
        """Store the verified phone number with a session that still exists."""
        done = await guarded(lambda: self._set_field(
            keys=[self.key(session.sid)], args=[PHONE, phone, self.channel, session.sid]))
        return bool(done)

    async def set_user(self, session: Session, user: UserData) -> Session | None:
        """Replace the login hook's answer in a session that still exists."""
        args: list[str | int | bytes] = [self.channel, session.sid]
        args += [item for pair in _user_fields(user).items() for item in pair]
        done = await guarded(lambda: self._set_user(keys=[self.key(session.sid)], args=args))
        return dataclasses.replace(session, user=user) if done else None

    async def delete(self, sid: str) -> bool:
        keys = [self.key(sid), *self._index_of(sid)]
        deleted: int = await guarded(lambda: self._delete(keys=keys, args=[self.channel, sid]))
        return deleted > 0

    async def sessions_of(self, appid: str, openid: str) -> list[tuple[str, int, int]]:
        """The user's live sessions: (sid, created_at, expires_at), soonest to expire first."""
        index = self.user_key(appid, openid)

        async def read() -> list[tuple[str, int, int]]:
            await self._redis.zremrangebyscore(index, "-inf", int(time.time()))
            raw: list[Any] = await self._redis.zrange(index, 0, -1)
            sids = [sid.decode() for sid in raw]
            if not sids:
                return []
            pipe = self._redis.pipeline(transaction=False)  # one slot: one node
            for sid in sids:
                pipe.hmget(self.key(sid), [CREATED_AT, EXPIRES_AT])
            found = zip(sids, await pipe.execute())
            return [(sid, int(c), int(e)) for sid, (c, e) in found if c is not None]
        return await guarded(read)

    async def revoke(self, appid: str, openid: str) -> list[str]:
        """End every session of the user at once, on every replica: the sids ended."""
        return await self._end(appid, openid, "")

    async def ban(self, appid: str, openid: str, ttl: float | None) -> list[str]:
        """Refuse the user new sessions (for ``ttl`` seconds, or until lifted) and end those
        they have, in one step: the sids ended."""
        return await self._end(appid, openid, str(math.ceil(ttl * 1000)) if ttl else "0")

    async def _end(self, appid: str, openid: str, ban: str) -> list[str]:
        index, ban_key = self.user_key(appid, openid), self.ban_key(appid, openid)
        for _ in range(_REVOKE_ATTEMPTS):
            members: list[Any] = await guarded(lambda: self._redis.zrange(index, 0, -1))
            sids = [sid.decode() for sid in members]
            keys = [index, ban_key, *map(self.key, sids)]
            args = [int(time.time()), self.channel, ban, *sids]
            ended: list[bytes] | None = await guarded(
                lambda: self._revoke(keys=keys, args=args))
            if ended is not None:
                return [sid.decode() for sid in ended]
        raise StoreUnavailable("the user's sessions kept changing while being ended")

    async def unban(self, appid: str, openid: str) -> bool:
        """Lift the user's ban; False if none was in force."""
        lifted: int = await guarded(lambda: self._redis.delete(self.ban_key(appid, openid)))
        return lifted > 0

    async def banned(self, appid: str, openid: str) -> bool:
        found: int = await guarded(lambda: self._redis.exists(self.ban_key(appid, openid)))
        return found > 0

    async def session_key(self, session: Session) -> bytes | None:
        """The decrypted session_key, for features that call WeChat on the user's behalf."""
        sealed: Any = await guarded(
            lambda: self._redis.hget(self.key(session.sid), SESSION_KEY))
        if sealed is None:
            return None
        return self._keyring.open_bytes(sealed, self._context(session.sid, session.appid))

    async def ping(self) -> None:
        await guarded(self._redis.ping)

    @staticmethod
    def _context(sid: str, appid: str) -> bytes:
        return f"{appid}/{sid}".encode()



def _user_tag(appid: str, openid: str) -> str:
    """A Redis Cluster hash tag for the user: their sessions, index and ban share its slot.
    96 bits of a hash: no two users share an index or a ban in practice."""
    digest = hashlib.blake2b(f"{appid}/{openid}".encode(), digest_size=12).digest()
    return "{" + base64.urlsafe_b64encode(digest).decode() + "}"


def invalidation_channel(key_prefix: str) -> str:
    """Where session changes are announced to every replica's cache."""
    return f"{key_prefix}invalidate"
