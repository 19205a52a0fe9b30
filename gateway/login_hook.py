"""The app's own user directory: asked on login for the user's id, roles and claims, or a ban.

The hook answers ``POST {url}`` with ``{"appid", "openid", "unionid", "phone", "platform"}``
(and ``"corpid"`` for WeCom). 200 with
``{"user_id", "roles", "claims"}`` (each optional) is kept in the session; 403 refuses the
user; anything else — unreachable, slow, another status, an answer that is not what is
described here — is refused as a whole (no session is made on a half-understood answer).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import aiohttp

from .config import LoginHookConfig
from .errors import LoginHookUnavailable, UserBlocked
from .headers import NAME as HEADER_NAME, spelling, valid_role
from .metrics import Metrics
from .sessions import UserData

log = logging.getLogger("gateway.login_hook")

MAX_ANSWER_BYTES = 16 * 1024
MAX_USER_ID = 128
MAX_ROLES = 32
MAX_CLAIMS = 16
MAX_CLAIM_NAME = 64
MAX_CLAIM_VALUE = 256


class Malformed(Exception):
    """The answer is not what the hook must send; ``reason`` is its metric label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one call came to, for the access log: ``ok``, ``blocked`` or why unavailable."""

    result: str
    seconds: float


class LoginHook:
    def __init__(self, http: aiohttp.ClientSession, config: LoginHookConfig,
                 metrics: Metrics) -> None:
        self._http = http
        self.config = config
        self._metrics = metrics

    def stale(self, user: UserData | None) -> bool:
        return user is None or time.time() - user.fetched_at >= self.config.refresh_after

    async def ask(self, appid: str, openid: str, unionid: str | None, phone: str | None,
                  report: Callable[[Outcome], None], *, platform: str,
                  corpid: str | None = None) -> UserData:
        """The user's data; ``UserBlocked`` on 403, ``LoginHookUnavailable`` otherwise.
        ``report`` hears the outcome either way (for the access log)."""
        started = time.perf_counter()
        # platform: openids of two platforms may collide; the directory must tell them apart
        payload: dict[str, Any] = {"appid": appid, "openid": openid, "unionid": unionid,
                                   "phone": phone, "platform": platform}
        if corpid is not None:
            payload["corpid"] = corpid
        result = "error"
        try:
            async with asyncio.timeout(self.config.timeout):
                user = await self._call(payload)
            result = "ok"
            return user
        except UserBlocked:
            result = "blocked"
            raise
        except Malformed as exc:
            result = exc.reason
            # One line naming the problem, never the answer itself (it may carry tokens).
            log.warning("login hook answer refused (%s): %s", exc.reason, exc)
            raise LoginHookUnavailable("the login hook gave an unusable answer") from None
        except TimeoutError:
            result = "timeout"
            log.warning("login hook did not answer within %gs", self.config.timeout)
            raise LoginHookUnavailable("the login hook did not answer in time") from None
        except (aiohttp.ClientError, OSError) as exc:
            result = "unreachable"
            log.warning("login hook unreachable: %s", type(exc).__name__)
            raise LoginHookUnavailable("the login hook cannot be reached") from None
        finally:
            if result != "error":  # else cancelled (the client left): nothing to report
                seconds = time.perf_counter() - started
                self._metrics.login_hook_seconds.observe(seconds)
                self._metrics.login_hook_calls.labels(result).inc()
                report(Outcome(result, seconds))

    async def _call(self, payload: dict[str, Any]) -> UserData:
        async with self._http.post(self.config.url, json=payload,
                                   allow_redirects=False) as resp:
            if resp.status == 403:
                raise UserBlocked("the app refuses this user")
            if resp.status != 200:
                raise Malformed("status", f"HTTP status {resp.status}")
            if (resp.content_length or 0) > MAX_ANSWER_BYTES:
                raise Malformed("too_large", f"answer over {MAX_ANSWER_BYTES} bytes")
            raw = await resp.content.read(MAX_ANSWER_BYTES + 1)
            while len(raw) <= MAX_ANSWER_BYTES and not resp.content.at_eof():
                more = await resp.content.read(MAX_ANSWER_BYTES + 1 - len(raw))
                if not more:
                    break
                raw += more
            if len(raw) > MAX_ANSWER_BYTES:
                raise Malformed("too_large", f"answer over {MAX_ANSWER_BYTES} bytes")
        try:
            answer = json.loads(raw)
        except (ValueError, RecursionError):
            raise Malformed("not_json", "the answer is not JSON") from None
        return user_data(answer, int(time.time()))


def user_data(answer: Any, now: int) -> UserData:
    """The hook's 200 answer checked field by field; ``Malformed`` names the first problem."""
    if not isinstance(answer, dict):
        raise Malformed("malformed", "the answer is not a JSON object")
    user_id = answer.get("user_id")
    if user_id is not None and not (isinstance(user_id, str) and _printable(user_id, MAX_USER_ID)):
        raise Malformed("malformed", f"user_id is not 1 to {MAX_USER_ID} printable ASCII "
                                     "characters without a space at either end")
    roles = answer.get("roles")
    if roles is None:
        roles = []
    if (not isinstance(roles, list) or len(roles) > MAX_ROLES
            or not all(isinstance(r, str) and valid_role(r) for r in roles)):
        raise Malformed("malformed", f"roles is not a list of at most {MAX_ROLES} role names "
                                     "(printable ASCII, no comma, no space at either end)")
    claims = answer.get("claims")
    if claims is None:
        claims = {}
    if not isinstance(claims, dict) or len(claims) > MAX_CLAIMS:
        raise Malformed("malformed", f"claims is not an object of at most {MAX_CLAIMS} entries")
    seen: set[str] = set()
    for name, value in claims.items():
        if not (len(name) <= MAX_CLAIM_NAME and HEADER_NAME.match(name)):
            raise Malformed("malformed", f"a claim name is not a header token of at most "
                                         f"{MAX_CLAIM_NAME} characters")
        # X-User-Claim-Tier, X-User-Claim-tier and X_User_Claim_TIER are one header upstream
        if spelling(name) in seen:
            raise Malformed("malformed", "two claim names differ only in case or punctuation")
        seen.add(spelling(name))
        if not (isinstance(value, str) and _printable(value, MAX_CLAIM_VALUE, empty=True)):
            raise Malformed("malformed", f"a claim value is not a string of at most "
                                         f"{MAX_CLAIM_VALUE} printable ASCII characters")
    return UserData(now, user_id, tuple(dict.fromkeys(roles)), tuple(claims.items()))


def _printable(text: str, limit: int, *, empty: bool = False) -> bool:
    """Printable ASCII, and no space at either end: header parsers trim it, so " u-1" would
    reach upstreams as another value than the one kept."""
    return ((empty or bool(text)) and len(text) <= limit and text.isascii()
            and text.isprintable() and text == text.strip())
