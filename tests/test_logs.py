"""Logs: text or JSON lines, one access line per request, nothing secret.

What is proved here, mostly against the real ``python -m gateway`` process with its output
captured:

- a full session (logins that succeed and fail, proxied requests on every auth mode with
  token-looking query strings, every ``/auth/*`` endpoint, a forged identity header, logout and
  what follows it, 404s, upstream failures, a malformed request) produces output in which every
  line is one well-formed log line (JSON object with time/level/logger/message, or the text
  format), with exactly one ``gateway.access`` line per request and the fields each must carry;
- no token, login or phone code, app secret, signing key, session_key, WeChat access token,
  phone number or (unless ``log_openid``) openid appears in that output, in full or as any
  7-character piece of it;
- storms: 50 logins with WeChat down give at most a few WeChat warnings, and the filter says
  later how many it held back; Redis going down and coming back is logged once each way;
- start-up and stop are logged once each.

The process (``launch``, with stdout and stderr in files of their own) and ``Client`` come from
process.py; the line parsers from checks.py.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import signal
import time
import uuid
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Iterable

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from checks import is_json, parse_json_lines, parse_lines
from conftest import APPID, Upstream
from gateway.testing import simulator
from gateway import logs
from gateway.config import LoggingConfig
from gateway.testing.embedded import EmbeddedRedis, free_port
from gateway.keys import Keyring
from process import Client, GatewayProcess, Launch, Sent, launch_with_client

WINDOW = 7  # a piece of a secret longer than 6 characters is a leak
ACCESS_KEYS = {"request_id", "client_ip", "method", "path", "route", "status", "duration_ms",
               "upstream_ms", "auth", "appid"}


@dataclass(frozen=True)
class Secret:
    label: str
    value: str
    public: int = 0  # length of a known, public prefix (e.g. "errcode-40029-")


def leaks(text: str, secrets_: Iterable[Secret]) -> list[str]:
    """Every secret found in ``text`` in full or as a piece of more than 6 characters (pieces
    lying wholly inside a secret's public prefix do not count)."""
    found = []
    for s in secrets_:
        if s.value in text:
            found.append(f"{s.label}: in full ({s.value!r})")
            continue
        for i in range(len(s.value) - WINDOW + 1):
            if i + WINDOW <= s.public:
                continue
            piece = s.value[i:i + WINDOW]
            if piece in text:
                where = text.index(piece)
                found.append(f"{s.label}: {piece!r} of {s.value!r} in "
                             f"{text[max(0, where - 60):where + 60]!r}")
                break
    return found


def test_leak_scan_finds_full_secrets_and_pieces_but_not_public_prefixes() -> None:
    code = f"errcode-40029-{uuid.uuid4().hex}"
    text = "WeChat /sns/jscode2session errcode 40029: simulated error"
    assert leaks(text, [Secret("code", code, public=len("errcode-40029-"))]) == []
    assert leaks(text + code[14:21], [Secret("code", code, public=14)])  # 7 random chars
    assert leaks(text + code[13:20], [Secret("code", code, public=14)])  # "-" + 6 of them
    assert not leaks(text + code[14:20], [Secret("code", code, public=14)])  # only 6
    token = fake_jwt()
    assert leaks(f"x {token} y", [Secret("token", token)])[0].startswith("token: in full")
    assert leaks(f"x={token[40:47]}", [Secret("token", token)])


def openid_hash(signing_key: str, openid: str) -> str:
    return logs.openid_hash(Keyring((signing_key.encode(),)).log_key, openid)


# --- the session under test -----------------------------------------------------------------


def random_secret(prefix: str) -> str:
    return f"{prefix}{secrets.token_urlsafe(30)}"


@pytest.fixture
def app_secret() -> str:
    return random_secret("as-")


@pytest.fixture
async def sim(aiohttp_server: Any, app_secret: str) -> TestServer:
    """A WeChat simulator whose app secret is long and random (a leak cannot be a fluke)."""
    server: TestServer = await aiohttp_server(
        simulator.create_app({APPID: app_secret}, single_use=True))
    return server


def gateway_config(redis_url: str, sim_url: str, upstream_url: str, app_secret: str,
                   signing_key: str, **logging_: Any) -> dict[str, Any]:
    return {
        "redis": {"url": redis_url, "key_prefix": f"wxgw-logs-{uuid.uuid4().hex[:8]}:"},
        "wechat": {"api_base": sim_url, "timeout": "1s"},
        "apps": [{"appid": APPID, "secret": app_secret}],
        # store_phone: the verified number travels with the session (and upstream), never
        # into the log
        "session": {"signing_keys": [signing_key], "ttl": "1h", "store_phone": True},
        "auth": {"rate_limit": {"ip_limit": 0, "app_limit": 0, "max_retries": 0}},
        "routes": [
            {"path": "/api", "upstream": upstream_url, "auth": "required", "timeout": "5s"},
            {"path": "/public", "upstream": upstream_url, "auth": "public", "timeout": "5s"},
            {"path": "/maybe", "upstream": upstream_url, "auth": "optional", "timeout": "5s"},
            {"path": "/down", "upstream": f"http://127.0.0.1:{free_port()}", "auth": "public",
             "connect_timeout": "1s"},
            {"path": "/sluggish", "upstream": upstream_url, "auth": "public",
             "timeout": "300ms"},
        ],
        "logging": {"format": "json", "level": "info", **logging_},
    }


def fake_jwt() -> str:
    """Looks like a token, is not one: what a careless client puts in a query string."""
    return ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9." + secrets.token_urlsafe(40) + "."
            + secrets.token_urlsafe(32))


async def full_session(gw: GatewayProcess, client: Client, sim: TestServer, upstream: Upstream,
                       log_openid: bool) -> list[Secret]:
    """Everything a user and a few attackers do; returns the secrets the log must not hold."""
    found: list[Secret] = []
    code_a, code_b = f"login-{uuid.uuid4().hex}", f"login-{uuid.uuid4().hex}"
    bad_code, busy_code = f"errcode-40029-{uuid.uuid4().hex}", f"errcode--1-{uuid.uuid4().hex}"
    blocked_code = f"errcode-40226-{uuid.uuid4().hex}"
    phone_code = f"phone-{uuid.uuid4().hex}"
    openid_a, openid_b = simulator.openid_for(APPID, code_a), simulator.openid_for(APPID, code_b)
    query_token, query_code = fake_jwt(), f"qc-{secrets.token_urlsafe(24)}"
    found += [Secret("login code", code_a), Secret("login code", code_b),
              Secret("failing code", bad_code, public=len("errcode-40029-")),
              Secret("failing code", busy_code, public=len("errcode--1-")),
              Secret("failing code", blocked_code, public=len("errcode-40226-")),
              Secret("phone code", phone_code),
              Secret("token-looking query value", query_token),
              Secret("code-looking query value", query_code)]

    await client.wait_healthy(gw)
    await client.call("GET", "/readyz", route="/readyz", expect=200)

    # logins: two good, three that WeChat refuses, one for an app nobody configured
    token_a = (await client.login(code_a)).json()["token"]
    token_b = (await client.login(code_b)).json()["token"]
    found += [Secret("token", token_a), Secret("token", token_b)]
    assert (await client.login(bad_code, expect=401)).json()["error"] == "invalid_code"
    assert (await client.login(busy_code, expect=503)).json()["error"] == "wechat_unavailable"
    assert (await client.login(blocked_code, expect=403)).json()["error"] == "user_blocked"
    assert (await client.login(f"login-{uuid.uuid4().hex}", appid="wx0000000000000000",
                               expect=400)).json()["error"] == "unknown_app"
    await client.call("POST", "/auth/login", json_body=["not", "an", "object"],
                      route="/auth/login", expect=400)

    ok_a = {"auth": "ok", "appid": APPID, "openid": openid_a}
    ok_b = {"auth": "ok", "appid": APPID, "openid": openid_b}
    # proxied, with secrets in the query string (forwarded, never logged)
    await client.call("GET", f"/api/orders?token={query_token}&page=2", token=token_a,
                      route="/api", upstream=True, expect=200, **ok_a)
    assert upstream.last.raw_path == f"/api/orders?token={query_token}&page=2"
    await client.call("GET", f"/api/orders?access_token={query_token}", route="/api",
                      expect=401)
    await client.call("GET", f"/maybe/profile?token={query_token}", token=token_b,
                      route="/maybe", upstream=True, expect=200, **ok_b)
    await client.call("GET", f"/maybe/profile?code={query_code}", route="/maybe",
                      upstream=True, expect=200)
    await client.call("GET", f"/public/info?code={query_code}&t={query_token}", token=token_a,
                      route="/public", upstream=True, expect=200)
    await client.call("GET", "/api/status/500", token=token_b, route="/api", upstream=True,
                      expect=500, **ok_b)

    # the gateway's own endpoints
    session = (await client.call("GET", "/auth/session", token=token_a, route="/auth/session",
                                 expect=200, **ok_a)).json()
    assert session["openid"] == openid_a
    # check=true: stable_token and checksession at WeChat, with an access token
    await client.call("GET", "/auth/session?check=true", token=token_a, route="/auth/session",
                      expect=200, **ok_a)
    verify = await client.call("GET", "/auth/verify", token=token_a, route="/auth/verify",
                               expect=200, **ok_a)
    assert verify.headers["X-WX-OpenID"] == openid_a
    token_a2 = (await client.call("POST", "/auth/refresh", token=token_a,
                                  route="/auth/refresh", expect=200, **ok_a)).json()["token"]
    found.append(Secret("refreshed token", token_a2))
    phone = (await client.call("POST", "/auth/phone", token=token_a2, route="/auth/phone",
                               json_body={"code": phone_code}, expect=200, **ok_a)).json()
    assert phone["pure_phone_number"] == simulator.phone_for(phone_code)
    found += [Secret("phone number", phone["phone_number"]),
              Secret("phone number", phone["pure_phone_number"])]
    async with client.http.get(f"http://127.0.0.1:{sim.port}/_simulator/userdata",
                               params={"appid": APPID, "code": code_a}) as resp:
        userdata = await resp.json()  # the simulator: not a request to the gateway
    decrypted = (await client.call(
        "POST", "/auth/decrypt", token=token_a2, route="/auth/decrypt", expect=200,
        json_body={"encrypted_data": userdata["encrypted_data"], "iv": userdata["iv"]},
        **ok_a)).json()
    assert decrypted["openId"] == openid_a
    checked = (await client.call(
        "POST", "/auth/check-signature", token=token_a2, route="/auth/check-signature",
        expect=200, json_body={"raw_data": userdata["raw_data"],
                               "signature": userdata["signature"]}, **ok_a)).json()
    assert checked == {"valid": True}

    # forged identity headers: stripped, never trusted
    forged = f"forged-{uuid.uuid4().hex[:12]}"
    await client.call("GET", "/api/whoami", token=token_a2,
                      headers={"X-WX-OpenID": forged, "X-WX-Phone": forged},
                      route="/api", upstream=True, expect=200, **ok_a)
    assert upstream.last.header("X-WX-OpenID") == [openid_a]
    assert upstream.last.header("X-WX-Phone") == [phone["phone_number"]]
    await client.call("GET", "/public/whoami", headers={"X-WX-OpenID": forged},
                      route="/public", upstream=True, expect=200)
    assert upstream.last.header("X-WX-OpenID") == []

    # logout, and what the old tokens get afterwards
    await client.call("POST", "/auth/logout", token=token_a2, route="/auth/logout", expect=204,
                      **ok_a)
    await client.call("GET", "/api/after-logout", token=token_a, route="/api", expect=401)
    await client.call("GET", "/auth/session", token=token_a2, route="/auth/session",
                      expect=401)
    await client.call("POST", "/auth/logout", token=token_a, route="/auth/logout", expect=401)
    await client.call("GET", "/auth/verify", token=query_token, route="/auth/verify",
                      expect=401)

    # 404s, 405, upstream failures
    await client.call("GET", f"/nowhere/{uuid.uuid4().hex[:8]}?token={query_token}",
                      route="none", expect=404)
    await client.call("GET", "/auth/nope", route="none", expect=404)
    await client.call("GET", "/auth/login", route="/auth/login", expect=405)
    await client.call("GET", "/down/x", route="/down", expect=502)
    await client.call("GET", "/sluggish/slow/1500", route="/sluggish", expect=504)
    await client.call("GET", "/metrics", route="/metrics", expect=200)

    # secrets known only now: session keys and the access tokens WeChat issued
    found += [Secret("session_key", simulator.session_key_for(APPID, c)) for c in (code_a, code_b)]
    issued = list(sim.app[simulator.STATE].tokens)
    assert issued, "no access token was issued: /auth/phone and check=true did not run"
    found += [Secret("access token", t, public=len(f"AT.{APPID}.")) for t in issued]
    if not log_openid:
        found += [Secret("openid", openid_a), Secret("openid", openid_b)]
    found += [Secret("unionid", simulator.unionid_for(c)) for c in (code_a, code_b)]
    return found


def access_line_problems(fmt: str, record: dict[str, Any], sent: Sent, signing_key: str,
                         log_openid: bool) -> list[str]:
    """What is wrong with one access line, given the request it is for."""
    problems: list[str] = []

    def text(value: Any) -> Any:  # the text format writes every value as a string
        return None if value is None else (str(value) if fmt == "text" else value)

    def expect(ok: bool, what: str) -> None:
        if not ok:
            problems.append(f"{sent.method} {sent.path} ({sent.rid}): {what}: {record}")

    if fmt == "json":
        expect(ACCESS_KEYS <= set(record), f"missing {ACCESS_KEYS - set(record)}")
    else:  # None values are left out of text lines
        needed = {"client_ip", "method", "path", "status", "duration_ms", "auth"}
        expect(needed <= set(record), f"missing {needed - set(record)}")
    expect(record.get("request_id") == sent.rid, "request_id")
    expect(record.get("client_ip") == "127.0.0.1", "client_ip")
    if sent.method:
        expect(record.get("method") == sent.method, "method")
        expect(record.get("path") == sent.path, "path")
    expect("?" not in str(record.get("path")), "path holds a query string")
    expect(record.get("route") == text(sent.route), f"route should be {sent.route!r}")
    expect(record.get("status") == text(sent.status), "status")
    expect(float(record.get("duration_ms", -1)) >= 0, "duration_ms")
    if sent.upstream:
        expect(record.get("upstream_ms") is not None, "upstream_ms missing")
        expect(record.get("upstream_ms") is None
               or 0 <= float(record["upstream_ms"]) <= float(record.get("duration_ms", -1)),
               f"duration_ms {record.get('duration_ms')} < upstream_ms "
               f"{record.get('upstream_ms')}: the whole request took less than its upstream part")
    else:
        expect(record.get("upstream_ms") is None, "upstream_ms for a request no upstream answered")
    expect(record.get("auth") == sent.auth, f"auth should be {sent.auth!r}")
    expect(record.get("appid") == text(sent.appid), "appid")
    if sent.openid is None:
        expect("openid" not in record and "openid_hash" not in record, "openid without identity")
    elif log_openid:
        expect(record.get("openid") == sent.openid and "openid_hash" not in record,
               "log_openid: the openid itself")
    else:
        expect(record.get("openid_hash") == openid_hash(signing_key, sent.openid),
               "openid_hash")
        expect("openid" not in record, "the openid itself is logged")
    return problems


def endpoint_route(sent: Sent) -> bool:
    return sent.route is not None and sent.route != "none" and not sent.upstream and (
        sent.route.startswith("/auth/") or sent.route in ("/healthz", "/readyz", "/metrics"))


@pytest.mark.parametrize("fmt,log_openid", [("json", False), ("text", False), ("json", True)],
                         ids=["json", "text", "json-log_openid"])
async def test_full_session_log_is_well_formed_complete_and_leaks_nothing(
        launch: Launch, redis_server: EmbeddedRedis, sim: TestServer, upstream: Upstream,
        app_secret: str, fmt: str, log_openid: bool) -> None:
    signing_key = random_secret("sk-")
    data = gateway_config(redis_server.url, f"http://127.0.0.1:{sim.port}", upstream.url,
                          app_secret, signing_key, format=fmt, log_openid=log_openid)
    gw = await launch(data, separate_stderr=True)
    async with aiohttp.ClientSession() as http:
        client = Client(gw.url, http)
        found = await full_session(gw, client, sim, upstream, log_openid)
    assert await gw.stop() == 0, gw.output()
    found += [Secret("app secret", app_secret), Secret("signing key", signing_key)]

    lines = gw.lines()
    records = parse_lines(fmt, lines)  # every line is a well-formed log line
    problems: list[str] = []

    # one access line per request, each saying what happened
    access = [r for r in records if r["logger"] == logs.ACCESS]
    if len(access) != len(client.sent):
        problems.append(f"{len(access)} access lines for {len(client.sent)} requests")
    by_id: dict[Any, list[dict[str, Any]]] = {}
    for record in access:
        by_id.setdefault(record.get("request_id"), []).append(record)
    route_less = []
    for sent in client.sent:
        matching = by_id.get(sent.rid, [])
        if len(matching) != 1:
            problems.append(f"{len(matching)} access lines for {sent}")
            continue
        found_problems = access_line_problems(fmt, matching[0], sent, signing_key, log_openid)
        if endpoint_route(sent) and matching[0].get("route") is None:
            route_less.append(sent.path)  # reported once below, not per line
            found_problems = [p for p in found_problems if "route should be" not in p]
        problems += found_problems
    if route_less:
        problems.append(f"route is null on the access lines of the gateway's own endpoints "
                        f"(the metrics label them by endpoint path): {sorted(set(route_less))}")

    # nothing secret, anywhere in the output
    problems += leaks(gw.output(), found)

    # start-up and stop once each; no traceback
    messages = [r["message"] for r in records]
    if sum("listening" in m for m in messages) != 1:
        problems.append(f"'listening' not logged exactly once: {messages}")
    if sum(m.startswith("stopping") for m in messages) != 1:
        problems.append(f"'stopping' not logged exactly once: {messages}")
    if sum(m == "wx-gateway stopped" for m in messages) != 1:
        problems.append(f"'wx-gateway stopped' not logged exactly once: {messages}")
    if "Traceback" in gw.output():
        problems.append("a traceback in the output")
    assert not problems, "\n".join(problems)


async def test_access_durations_are_precise_and_cover_the_upstream_time(
        launch: Launch, redis_server: EmbeddedRedis, sim: TestServer, upstream: Upstream,
        app_secret: str) -> None:
    """duration_ms is the whole request, so never less than upstream_ms, and measured with a
    clock finer than a millisecond (upstream_ms has two decimals; so must duration_ms)."""
    data = gateway_config(redis_server.url, f"http://127.0.0.1:{sim.port}", upstream.url,
                          app_secret, random_secret("sk-"))
    async with aiohttp.ClientSession() as http:
        gw, client = await launch_with_client(launch, data, http)
        for i in range(30):
            await client.call("GET", f"/public/slow/{i % 4}", expect=200)
    assert await gw.stop() == 0, gw.output()
    access = [r for r in parse_json_lines(gw.lines())
              if r["logger"] == logs.ACCESS and r["path"].startswith("/public/slow/")]
    assert len(access) == 30
    shorter = [(r["duration_ms"], r["upstream_ms"]) for r in access
               if r["duration_ms"] < r["upstream_ms"]]
    assert not shorter, f"duration_ms < upstream_ms on {len(shorter)}/30 lines: {shorter}"
    durations = [r["duration_ms"] for r in access]
    assert any(d != int(d) for d in durations), (
        f"every duration_ms is a whole number of milliseconds: {durations}")
    for r in access:  # at least the time the upstream was asked to wait
        assert r["upstream_ms"] >= int(r["path"].rsplit("/", 1)[1]), r


async def test_malformed_request_gets_one_access_line_and_no_traceback(
        launch: Launch, redis_server: EmbeddedRedis, sim: TestServer, upstream: Upstream,
        app_secret: str) -> None:
    """aiohttp answers a request it cannot parse itself (the gateway's JSON 400); that answer
    is a request like any other: one access line, and no error in the log."""
    data = gateway_config(redis_server.url, f"http://127.0.0.1:{sim.port}", upstream.url,
                          app_secret, random_secret("sk-"))
    async with aiohttp.ClientSession() as http:
        gw, client = await launch_with_client(launch, data, http)
        for payload in (b"GET /public/x HTTP/1.1\r\nHost: gw\r\nBroken header line\r\n\r\n",
                        b"GET /public/y?token=abc HTTP/1.1\r\nHost: gw\r\n"
                        + b"X-Long: " + b"a" * 70000 + b"\r\n\r\n"):
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(payload)
            await writer.drain()
            raw = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            assert raw.split(b" ", 2)[1] in (b"400", b"431"), raw[:200]
        await client.call("GET", "/public/after", expect=200)
    assert await gw.stop() == 0, gw.output()
    records = parse_json_lines(gw.lines())
    access = [r for r in records if r["logger"] == logs.ACCESS]
    errors = [r for r in records if r["level"] in ("error", "critical")]
    assert not errors, "\n".join(f"{r['message']}: {r.get('exception', '')}" for r in errors)
    assert len(access) == len(client.sent) + 2, [r["message"] for r in access]
    for record in access:
        assert "?" not in record["path"], record


async def test_tokens_in_odd_places_never_reach_the_log_from_any_logger(
        launch: Launch, redis_server: EmbeddedRedis, sim: TestServer, upstream: Upstream,
        aiohttp_server: Any, app_secret: str) -> None:
    """Tokens where no token belongs: offered as WebSocket subprotocols (what browser clients
    do; aiohttp logs the offer when no protocol is agreed), in query strings, paths, other
    headers, malformed Authorization headers and unparsable requests. At debug level, with
    every library's logger, no piece of any of them is written."""
    async def ws_handle(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()  # no subprotocols: none of the offered ones is chosen
        await ws.prepare(request)
        await ws.close()
        return ws

    ws_app = web.Application()
    ws_app.router.add_get("/{tail:.*}", ws_handle)
    ws_server = await aiohttp_server(ws_app)
    data = gateway_config(redis_server.url, f"http://127.0.0.1:{sim.port}", upstream.url,
                          app_secret, random_secret("sk-"), level="debug")
    data["routes"] += [
        {"path": "/ws", "upstream": f"http://127.0.0.1:{ws_server.port}", "auth": "required"},
        {"path": "/pubws", "upstream": f"http://127.0.0.1:{ws_server.port}", "auth": "public"}]
    async with aiohttp.ClientSession() as http:
        gw, client = await launch_with_client(launch, data, http)
        token = (await client.login(f"odd-{uuid.uuid4().hex}")).json()["token"]
        stranger = fake_jwt()  # token-shaped, not ours: no more loggable
        found = [Secret("token", token), Secret("token-looking value", stranger)]
        for path, auth in (("/ws/chat", {"Authorization": f"Bearer {token}"}),
                           ("/pubws/chat", {})):
            async with http.ws_connect(f"{gw.url}{path}", headers=auth,
                                       protocols=(token, stranger, "chat")) as ws:
                await ws.receive()
        await client.call("GET", f"/api/x?token={token}", token=token, expect=200)
        await client.call("GET", f"/public/{token}/{stranger}", expect=200)
        await client.call("GET", f"/nowhere/{token}?t={stranger}", expect=404)
        for name in ("X-Token", "Cookie", "Referer", "Sec-WebSocket-Protocol"):
            await client.call("GET", "/public/x", headers={name: f"t={token}"}, expect=200)
        for value in (f"Bearer  {token}", f"Bearer {token} extra", f"Token {token}", token,
                      f"bearer {stranger}", f"Basic {token}", f"Bearer {token}, Bearer x"):
            await client.call("GET", "/api/x", headers={"Authorization": value})
            await client.call("GET", "/auth/verify", headers={"Authorization": value})
        for line in (b"Authorization: Bearer " + token.encode() + b"\x01",
                     b"Bearer " + token.encode(), b"X-A: \xff" + token.encode(),
                     token.encode() + b": x"):
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(b"GET /public/x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n"
                         + line + b"\r\n\r\n")
            raw = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            assert raw.split(b" ", 2)[1] in (b"200", b"400"), raw[:200]
    assert await gw.stop() == 0, gw.output()
    output = gw.output()
    assert "overlap" in output  # aiohttp's warning about the offered subprotocols was written
    assert leaks(output, found) == []


# --- storms -----------------------------------------------------------------------------------


async def test_wechat_down_50_logins_give_at_most_a_few_warnings(
        launch: Launch, redis_server: EmbeddedRedis, upstream: Upstream,
        app_secret: str) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    data = gateway_config(redis_server.url, down, upstream.url, app_secret,
                          random_secret("sk-"))
    async with aiohttp.ClientSession() as http:
        gw, client = await launch_with_client(launch, data, http)
        for _ in range(50):
            reply = await client.login(f"login-{uuid.uuid4().hex}", expect=502)
            assert reply.json()["error"] == "wechat_error"
    assert await gw.stop() == 0, gw.output()
    records = parse_json_lines(gw.lines())
    wechat = [r for r in records if r["logger"] == "gateway.wechat"]
    assert 1 <= len(wechat) <= 3, [r["message"] for r in wechat]
    assert all(r["level"] == "warning" for r in wechat), wechat
    warnings = [r for r in records if r["level"] in ("warning", "error")]
    assert len(warnings) <= 3, [r["message"] for r in warnings]
    # ...while every one of those requests still has its access line
    access = [r for r in records if r["logger"] == logs.ACCESS]
    assert len(access) == len(client.sent)
    assert sum(r["path"] == "/auth/login" and r["status"] == 502 for r in access) == 50


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def warning(name: str, msg: str, *args: Any) -> logging.LogRecord:
    return logging.LogRecord(name, logging.WARNING, __file__, 1, msg, args, None)


def test_storm_filter_holds_back_repeats_then_says_how_many(
        monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    monkeypatch.setattr(logs, "time", SimpleNamespace(monotonic=clock.monotonic))
    storm = logs.StormFilter(window=60)
    passed = []
    for i in range(50):
        record = warning("gateway.wechat", "WeChat %s unreachable: %s", "/sns/jscode2session",
                         "ClientConnectorError")
        if storm.filter(record):
            passed.append(record.getMessage())
        clock.now += 0.5  # 25 s in all: within the window
    assert passed == ["WeChat /sns/jscode2session unreachable: ClientConnectorError"]

    # another message (or other first arguments) is another event, logged at once
    assert storm.filter(warning("gateway.wechat", "WeChat %s unreachable: %s",
                                "/cgi-bin/stable_token", "ClientConnectorError"))
    assert storm.filter(warning("gateway.proxy", "upstream for %s unavailable: %s", "/api",
                                "ClientConnectorError"))
    # info lines and access lines are never held back
    for _ in range(5):
        info = logging.LogRecord("gateway.wechat", logging.INFO, __file__, 1,
                                 "WeChat %s unreachable: %s",
                                 ("/sns/jscode2session", "ClientConnectorError"), None)
        assert storm.filter(info)
        access = logging.LogRecord(logs.ACCESS, logging.WARNING, __file__, 1, "%s %s %s",
                                   ("GET", "/x", 200), None)
        assert storm.filter(access)

    # once the window is over, the next one passes and says how many were held back
    clock.now += 60
    record = warning("gateway.wechat", "WeChat %s unreachable: %s", "/sns/jscode2session",
                     "ClientConnectorError")
    assert storm.filter(record)
    message = record.getMessage()
    assert "49 more" in message, message
    assert message.startswith("WeChat /sns/jscode2session unreachable: ClientConnectorError")
    # ...and the count starts again
    clock.now += 1
    assert not storm.filter(warning("gateway.wechat", "WeChat %s unreachable: %s",
                                    "/sns/jscode2session", "ClientConnectorError"))
    clock.now += 61
    record = warning("gateway.wechat", "WeChat %s unreachable: %s", "/sns/jscode2session",
                     "ClientConnectorError")
    assert storm.filter(record)
    assert "1 more" in record.getMessage()


def redis_lines(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Lines (not access lines) about Redis or the session cache that follows it."""
    return [r for r in records if r["logger"] != logs.ACCESS
            and re.search(r"redis|session cache|invalidation", r["message"], re.I)]


@pytest.mark.parametrize("cache_size", [None, 0], ids=["cache", "no-cache"])
async def test_redis_down_and_up_are_logged_once_each(
        launch: Launch, own_redis: EmbeddedRedis, sim: TestServer, upstream: Upstream,
        app_secret: str, cache_size: int | None) -> None:
    data = gateway_config(own_redis.url, f"http://127.0.0.1:{sim.port}", upstream.url,
                          app_secret, random_secret("sk-"))
    data["redis"]["timeout"] = "300ms"
    if cache_size is not None:
        data["session"]["cache_size"] = cache_size
    async with aiohttp.ClientSession() as http:
        gw, client = await launch_with_client(launch, data, http)
        token = (await client.login(f"login-{uuid.uuid4().hex}")).json()["token"]
        await client.call("GET", "/api/x", token=token, expect=200)
        await asyncio.sleep(0.5)
        up_lines = len(redis_lines(parse_json_lines(gw.lines())))

        own_redis.stop()
        for _ in range(30):
            await client.call("GET", "/readyz", expect=503)
            await client.call("POST", "/auth/login", json_body={"code": f"c-{uuid.uuid4().hex}"},
                              expect=503)
        await asyncio.sleep(1.5)
        records = parse_json_lines(gw.lines())
        down = redis_lines(records)[up_lines:]
        assert any(r["level"] in ("warning", "error") for r in down), (
            "Redis went down and 60 requests failed with 503, but no line says so:\n"
            + "\n".join(gw.lines()[-5:]))
        assert len(down) <= 2, [r["message"] for r in down]

        own_redis.start()
        deadline = time.monotonic() + 10
        while (await client.call("GET", "/readyz")).status != 200:
            assert time.monotonic() < deadline, "Redis came back but /readyz stays 503"
            await asyncio.sleep(0.1)
        await client.call("GET", "/api/x", token=token, expect=200)
        await asyncio.sleep(3)
    assert await gw.stop() == 0, gw.output()
    records = parse_json_lines(gw.lines())
    after = redis_lines(records)[up_lines + len(down):]
    assert len(after) >= 1, "Redis came back, but no line says so"
    assert len(after) <= 2, [r["message"] for r in after]
    assert all(r["level"] == "info" for r in after), after


async def test_start_and_stop_are_logged_once(launch: Launch, redis_server: EmbeddedRedis,
                                              sim: TestServer, upstream: Upstream,
                                              app_secret: str) -> None:
    data = gateway_config(redis_server.url, f"http://127.0.0.1:{sim.port}", upstream.url,
                          app_secret, random_secret("sk-"))
    async with aiohttp.ClientSession() as http:
        gw, client = await launch_with_client(launch, data, http)
        for _ in range(20):
            await client.call("GET", "/public/x", expect=200)
    assert await gw.stop() == 0
    records = parse_json_lines(gw.lines())
    others = [r["message"] for r in records if r["logger"] != logs.ACCESS]
    assert sum("listening" in m for m in others) == 1, others
    assert sum(m.startswith("stopping") for m in others) == 1, others
    assert sum(m == "wx-gateway stopped" for m in others) == 1, others
    listening = next(m for m in others if "listening" in m)
    assert f"127.0.0.1:{gw.port}" in listening
    assert gw.stdout() == ""  # everything goes to stderr


# --- the buffered access log ------------------------------------------------------------------


@pytest.fixture
def json_config(config_dict: dict[str, Any]) -> dict[str, Any]:
    config_dict["logging"] = {"format": "json"}
    return config_dict


async def started(launch: Launch, data: dict[str, Any]) -> GatewayProcess:
    gw = await launch(data)
    async with aiohttp.ClientSession() as http:
        await gw.wait_healthy(http)
    return gw


def access_lines(gw: GatewayProcess) -> list[dict[str, Any]]:
    records = parse_json_lines(line for line in gw.stderr().splitlines() if is_json(line))
    return [r for r in records if r["logger"] == logs.ACCESS]


@pytest.mark.timeout(120)
async def test_access_lines_are_flushed_without_further_traffic(
        launch: Launch, json_config: dict[str, Any]) -> None:
    gw = await started(launch, json_config)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gw.url}/public/one") as resp:
            assert resp.status == 200
    # Buffered, but written within the flush interval even though nothing else happens.
    await gw.wait_for_line(lambda line: '"path": "/public/one"' in line,
                           within=logs.FLUSH_INTERVAL + 5)


@pytest.mark.timeout(120)
async def test_a_warning_flushes_buffered_lines_first_and_in_order(
        launch: Launch, json_config: dict[str, Any]) -> None:
    json_config["routes"].append({"path": "/down/", "upstream": "http://127.0.0.1:9",
                                  "auth": "public", "timeout": "2s"})
    gw = await started(launch, json_config)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gw.url}/public/before") as resp:
            assert resp.status == 200
        mark = gw.mark()
        async with http.get(f"{gw.url}/down/x") as resp:
            assert resp.status == 502
        # The warning is written at once, and what was buffered before it comes first.
        found = await gw.wait_for_line(lambda line: "unavailable" in line, after=mark,
                                       within=logs.FLUSH_INTERVAL / 2)
    lines = gw.stderr().splitlines()
    before = next(i for i, line in enumerate(lines) if '"path": "/public/before"' in line)
    assert lines.index(found[0]) > before


@pytest.mark.timeout(120)
async def test_sigterm_writes_every_buffered_access_line(
        launch: Launch, json_config: dict[str, Any]) -> None:
    gw = await started(launch, json_config)
    async with aiohttp.ClientSession() as http:
        for i in range(50):
            async with http.get(f"{gw.url}/public/n{i}") as resp:
                assert resp.status == 200
    gw.proc.send_signal(signal.SIGTERM)
    assert await gw.exit_code(within=15) == 0
    paths = {line["path"] for line in access_lines(gw)}
    assert {f"/public/n{i}" for i in range(50)} <= paths


@pytest.mark.parametrize("formatter", [logs.TextFormatter(), logs.JsonFormatter()],
                         ids=["text", "json"])
def test_an_access_line_made_without_a_record_is_the_line_the_record_makes(
        formatter: logs.TextFormatter | logs.JsonFormatter) -> None:
    fields = {"request_id": "r1", "method": "GET", "path": "/api/caf%C3%A9", "route": "/api/",
              "status": 200, "duration_ms": 1.25, "upstream_ms": None, "auth": "ok",
              "appid": APPID, "client_ip": "127.0.0.1", "note": "é \"quoted\""}
    for created in (1_700_000_000.0, 1_700_000_000.999, time.time()):
        record = logging.LogRecord(logs.ACCESS, logging.INFO, __file__, 1, "%s %s %s",
                                   ("GET", "/api/caf%C3%A9", 200), None)
        record.created, record.msecs = created, logs._msecs(created)
        setattr(record, "fields", fields)
        direct = formatter.line(created, logs._msecs(created), "INFO", logs.ACCESS,
                                "GET /api/caf%C3%A9 200", fields)
        assert direct == formatter.format(record)
    # the ms logging itself gives a record of that time
    now = logging.LogRecord("x", logging.INFO, __file__, 1, "m", (), None)
    assert logs._msecs(now.created) == int(now.msecs)
    # None fields are left out of text lines, kept as null in JSON ones
    assert ("upstream_ms" in direct) == isinstance(formatter, logs.JsonFormatter)


def test_access_lines_go_through_logging_when_anything_else_listens() -> None:
    root, access = logging.getLogger(), logging.getLogger(logs.ACCESS)
    saved = root.handlers[:], root.level
    try:
        logs.setup(LoggingConfig())
        handler = root.handlers[0]
        assert logs._sole_handler(access) is handler
        listener = logging.NullHandler()
        for logger in (root, logging.getLogger("gateway"), access):
            logger.addHandler(listener)
            assert logs._sole_handler(access) is None, logger.name
            logger.removeHandler(listener)
        drop_all = logging.Filter("nothing")
        for filtered in (access, handler, root):
            filtered.addFilter(drop_all)
            assert logs._sole_handler(access) is None
            filtered.removeFilter(drop_all)
        logs.setup(LoggingConfig(level="warning"))
        assert logs._sole_handler(access) is None  # no access lines at all
        logs.setup(LoggingConfig(format="json"))
        assert logs._sole_handler(access) is root.handlers[0]
    finally:
        for old in root.handlers[:]:
            root.removeHandler(old)
        for old in saved[0]:
            root.addHandler(old)
        root.setLevel(saved[1])
