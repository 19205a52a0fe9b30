"""What every platform's simulated API shares: the simulator's state, its replies and faults,
and the fake users, keys and phone numbers it derives from a login code."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping

from aiohttp import web
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

CALLS = web.AppKey("calls", Counter[str])
_PREFIXED = re.compile(r"^(errcode|slow|http)-(-?\d+)-")
_ERRSTR = re.compile(r"^errstr-(-?[^-]*)-")


@dataclass
class SimulatorState:
    apps: dict[str, str]
    single_use: bool = False
    token_ttl: int = 7200
    used: set[str] = field(default_factory=set)
    tokens: dict[str, tuple[str, float]] = field(default_factory=dict)  # token → (appid, exp)
    session_keys: dict[str, str] = field(default_factory=dict)  # openid → current session_key
    force_interval: float = 30.0
    force_daily_limit: int = 20
    force_calls: Counter[str] = field(default_factory=Counter)  # appid → force_refresh requests
    forced_at: dict[str, list[float]] = field(default_factory=dict)  # appid → effective forces
    rejected: set[str] = field(default_factory=set)  # refused by the APIs, still handed out
    platforms: dict[str, str] = field(default_factory=dict)  # appid → platform; absent: wechat
    corpids: dict[str, str] = field(default_factory=dict)  # WeCom appid → corpid; absent: derived

    def platform(self, appid: str) -> str:
        return self.platforms.get(appid, "wechat")

    def corpid(self, appid: str) -> str:
        """The corp a WeCom app belongs to: as given, else ``corpid_for(appid)``."""
        return self.corpids.get(appid) or corpid_for(appid)

    def expire_access_tokens(self) -> None:
        """Make every issued access_token invalid (WeChat then answers 40001)."""
        self.tokens.clear()

    def reject_access_token(self, appid: str) -> str:
        """WeChat refuses ``appid``'s current token (40001) yet normal mode keeps handing it out:
        the state ``force_refresh`` exists for (a leaked token). Returns that token."""
        token, _ = current_token(self, appid, time.time())
        self.rejected.add(token)
        return token

    def revoke_session_key(self, openid: str) -> None:
        """The user logged in elsewhere: the session_key the gateway holds is now stale."""
        self.session_keys[openid] = base64.b64encode(os.urandom(16)).decode()


STATE = web.AppKey("state", SimulatorState)


def openid_for(appid: str, code: str) -> str:
    return "o" + digest(f"openid/{appid}/{code}")[:27]


def corpid_for(appid: str) -> str:
    """A WeCom app's corpid when none is given: "ww" and 16 hex digits, like real ones."""
    return "ww" + hashlib.sha256(f"corpid/{appid}".encode()).hexdigest()[:16]


def unionid_for(code: str) -> str:
    return "u" + digest(f"unionid/{code}")[:27]


def session_key_for(appid: str, code: str) -> str:
    return base64.b64encode(hashlib.sha256(f"sk/{appid}/{code}".encode()).digest()[:16]).decode()


def phone_for(code: str) -> str:
    return "138" + str(int(hashlib.sha256(f"phone/{code}".encode()).hexdigest(), 16))[:8]


def encrypt_user_data(session_key: str, data: Mapping[str, Any]) -> tuple[str, str]:
    """What WeChat gives a mini-program: AES-128-CBC/PKCS#7 under the session_key."""
    iv = os.urandom(16)
    padder = padding.PKCS7(128).padder()
    plain = padder.update(json.dumps(data).encode()) + padder.finalize()
    encryptor = Cipher(algorithms.AES(base64.b64decode(session_key)), modes.CBC(iv)).encryptor()
    sealed = encryptor.update(plain) + encryptor.finalize()
    return base64.b64encode(sealed).decode(), base64.b64encode(iv).decode()


def digest(text: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).decode()


def reply(body: Mapping[str, object]) -> web.Response:
    # WeChat labels its JSON replies text/plain; clients must parse them anyway.
    return web.Response(text=json.dumps(body), content_type="text/plain")


async def fault(request: web.Request, code: str) -> web.StreamResponse | None:
    """The failure a prefixed code asks for, or None to answer normally."""
    text = _ERRSTR.match(code)
    if text:  # some WeChat front ends send errcode as a string
        return reply({"errcode": text.group(1), "errmsg": "simulated error"})
    match = _PREFIXED.match(code)
    if match and match.group(1) == "errcode":
        return reply({"errcode": int(match.group(2)), "errmsg": "simulated error"})
    if match and match.group(1) == "http":
        return web.Response(status=int(match.group(2)), text="<html>502 Bad Gateway</html>",
                            content_type="text/html")
    if match and match.group(1) == "slow":
        await asyncio.sleep(int(match.group(2)) / 1000)
    if code.startswith("garbage-"):
        return web.Response(text="<html>not json</html>", content_type="text/plain")
    if code.startswith("reset-"):
        assert request.transport is not None
        request.transport.abort()
        return web.Response()
    return None


def token_app(request: web.Request) -> str | None:
    state = request.app[STATE]
    token = request.query.get("access_token", "")
    entry = state.tokens.get(token)
    if entry is None or entry[1] < time.time() or token in state.rejected:
        return None
    return entry[0]


def current_token(state: SimulatorState, appid: str, now: float) -> tuple[str, float]:
    """``appid``'s current token and its expiry, issuing one when due.

    The doc: "平台会提前5分钟更新access_token ... 新旧access_token都可用" — a new token is issued
    in the last 5 minutes of the current one's life (the last fifth, for short test lifetimes),
    and the old one stays valid until it expires, so ``expires_in`` is never under that window.
    """
    window = min(300.0, state.token_ttl / 5)
    current = [(t, e) for t, (a, e) in state.tokens.items() if a == appid and e > now + window]
    if current:
        return max(current, key=lambda item: item[1])
    token = f"AT.{appid}.{base64.urlsafe_b64encode(os.urandom(12)).decode()}"
    state.tokens[token] = (appid, now + state.token_ttl)
    return token, now + state.token_ttl


def asked_error(code: str) -> int | str | None:
    """The error number an ``errcode-<N>-`` (int) or ``errstr-<S>-`` (string) code asks for,
    for platforms whose replies name it otherwise than WeChat's ``errcode``."""
    text = _ERRSTR.match(code)
    if text:
        return text.group(1)
    match = _PREFIXED.match(code)
    return int(match.group(2)) if match and match.group(1) == "errcode" else None


_FOR_APP = re.compile(r"^app-([^-]+)-")


def for_other_app(code: str, appid: str) -> bool:
    """An ``app-<appid>-...`` code is one another app's ``login()`` gave: every platform refuses
    it for any other appid, as an invalid code."""
    match = _FOR_APP.match(code)
    return match is not None and match.group(1) != appid
