"""SIGHUP reloads the configuration file, proved with the real process.

Routes, apps, signing keys, identity header names and logging change for new requests; a
request in flight finishes under the configuration it started with; an invalid file is refused
whole (the old configuration keeps serving, the log names the keys); what cannot change live
(listen address, workers, Redis) is reported as needing a restart while everything else
applies. With ``workers: 2`` the supervisor forwards SIGHUP to both workers.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import yaml
from aiohttp.test_utils import TestServer

from checks import is_json, metric_samples, parse_json_lines, value
from conftest import (APPID, APPID2, OLD_SIGNING_KEY, SECRET, SECRET2, SIGNING_KEY,
                      GatewayFactory, Upstream, base_config)
from gateway.testing.embedded import EmbeddedRedis, free_port
from gateway.keys import Keyring
from gateway.reload import RESTART_ONLY, reload as reload_config
from gateway.state import SERVICES
from process import Client, GatewayProcess, Launch, launch_with_client

RELOADED = "configuration reloaded"
REFUSED = "reload refused: the running configuration stays in force"


@pytest.fixture
def make_config(redis_server: EmbeddedRedis, wechat: TestServer, upstream: Upstream) -> Any:
    def make(**overrides: Any) -> dict[str, Any]:
        data = base_config(redis_server.url, f"wxgw-reload-{uuid.uuid4().hex[:8]}:",
                           f"http://127.0.0.1:{wechat.port}", upstream.url)
        data["listen"] = f"127.0.0.1:{free_port()}"
        data.update(overrides)
        return data
    return make


async def reload(gw: GatewayProcess, data: dict[str, Any], *, outcome: str = RELOADED,
                 processes: int = 1) -> list[str]:
    """Rewrite the file, SIGHUP, wait until the reload is done; the stderr lines it wrote."""
    mark = gw.mark()
    gw.rewrite(data)
    gw.hup()  # with workers: N, to the supervisor, which forwards it
    await gw.wait_for_line(lambda line: RELOADED in line or REFUSED in line, after=mark,
                           count=processes)
    lines = gw.stderr().splitlines()[mark:]
    outcomes = [line for line in lines if RELOADED in line or REFUSED in line]
    assert all(outcome in line for line in outcomes), (outcome, lines)
    return lines


async def token_for(client: Client, appid: str | None = None) -> str:
    reply = await client.login(f"reload-{uuid.uuid4().hex}", appid=appid)
    return str(reply.json()["token"])


def kid_of(token: str) -> str:
    return str(jwt.get_unverified_header(token)["kid"])


def kid_for(key: str) -> str:
    return Keyring((key.encode(),)).current_kid


# --- (a) routes ---------------------------------------------------------------------------------


async def test_routes_change_for_new_requests_while_in_flight_one_completes(
        launch: Launch, make_config: Any, upstream: Upstream) -> None:
    data = make_config()
    data["routes"].append({"path": "/old", "upstream": upstream.url, "auth": "public",
                           "timeout": "10s"})
    async with aiohttp.ClientSession() as http:
        gw, client = await launch_with_client(launch, data, http)
        await client.call("GET", "/old/x", expect=200)
        await client.call("GET", "/new/x", expect=404)

        async def slow() -> tuple[int, Any]:
            async with aiohttp.ClientSession() as own:
                async with own.get(f"{gw.url}/old/slow/1500",
                                   timeout=aiohttp.ClientTimeout(total=15)) as resp:
                    return resp.status, await resp.json()

        in_flight = asyncio.create_task(slow())
        deadline = time.monotonic() + 5
        while not any(s.raw_path == "/old/slow/1500" for s in upstream.seen):
            assert time.monotonic() < deadline, "the slow request never reached the upstream"
            await asyncio.sleep(0.01)

        new = copy.deepcopy(data)
        new["routes"] = [r for r in new["routes"] if r["path"] != "/old"]
        new["routes"].append({"path": "/new", "upstream": upstream.url, "auth": "public"})
        await reload(gw, new)
        assert not in_flight.done(), "the in-flight request did not outlive the reload"

        # new requests see the new routes at once
        await client.call("GET", "/new/x", expect=200)
        assert upstream.last.raw_path == "/new/x"
        reply = await client.call("GET", "/old/x", expect=404)
        assert reply.json()["error"] == "not_found"
        await client.call("GET", "/public/x", expect=200)

        # the request that started under the old routes completes normally
        status, body = await asyncio.wait_for(in_flight, 10)
        assert (status, body["ok"]) == (200, True)
    assert await gw.stop() == 0, gw.output()
    assert "Traceback" not in gw.output()


# --- (b) apps ---------------------------------------------------------------------------------


async def test_added_app_can_log_in_and_removed_one_is_unknown(
        launch: Launch, make_config: Any) -> None:
    data = make_config()
    async with aiohttp.ClientSession() as http:
        gw, client = await launch_with_client(launch, data, http)
        old_token = await token_for(client, APPID)
        reply = await client.login(f"reload-{uuid.uuid4().hex}", appid=APPID2, expect=400)
        assert reply.json()["error"] == "unknown_app"

        new = copy.deepcopy(data)
        new["apps"] = [{"appid": APPID2, "secret": SECRET2}]
        await reload(gw, new)

        new_token = await token_for(client, APPID2)
        await client.call("GET", "/api/x", token=new_token, expect=200)
        reply = await client.login(f"reload-{uuid.uuid4().hex}", appid=APPID, expect=400)
        assert reply.json()["error"] == "unknown_app"
        # a token of the removed app names an app the gateway no longer serves
        await client.call("GET", "/api/x", token=old_token, expect=401)

        # and back: both apps
        new["apps"] = [{"appid": APPID, "secret": SECRET}, {"appid": APPID2, "secret": SECRET2}]
        await reload(gw, new)
        await token_for(client, APPID)
        await token_for(client, APPID2)
    assert await gw.stop() == 0, gw.output()


# --- (c) signing keys ---------------------------------------------------------------------------


async def cache_hits(client: Client) -> float:
    reply = await client.call("GET", "/metrics", expect=200)
    samples = metric_samples(reply.body.decode())
    return value(samples, "wxgw_session_cache_lookups_total", result="hit") or 0.0


async def test_signing_key_rotation_then_retirement(launch: Launch, make_config: Any) -> None:
    data = make_config()
    data["session"]["signing_keys"] = [OLD_SIGNING_KEY]
    async with aiohttp.ClientSession() as http:
        gw, client = await launch_with_client(launch, data, http)
        await gw.wait_for_line(lambda line: "session cache on" in line)
        old_token = await token_for(client)
        assert kid_of(old_token) == kid_for(OLD_SIGNING_KEY)
        await client.call("GET", "/api/x", token=old_token, expect=200)

        # 1. the new key first, the old one kept: old tokens work, new ones are signed by NEW
        rotated = copy.deepcopy(data)
        rotated["session"]["signing_keys"] = [SIGNING_KEY, OLD_SIGNING_KEY]
        await reload(gw, rotated)
        await gw.wait_for_line(lambda line: "session cache on" in line)
        before = await cache_hits(client)
        for _ in range(3):  # the old token is verified again, then served from the cache
            await client.call("GET", "/api/x", token=old_token, expect=200)
        assert await cache_hits(client) >= before + 2, "the old token was not cached"
        new_token = await token_for(client)
        assert kid_of(new_token) == kid_for(SIGNING_KEY) != kid_for(OLD_SIGNING_KEY)
        await client.call("GET", "/api/x", token=new_token, expect=200)
        refreshed = (await client.call("POST", "/auth/refresh", token=old_token,
                                       expect=200)).json()["token"]
        assert kid_of(refreshed) == kid_for(SIGNING_KEY)

        # 2. the old key dropped: old tokens are refused, even the one just cached
        retired = copy.deepcopy(data)
        retired["session"]["signing_keys"] = [SIGNING_KEY]
        await reload(gw, retired)
        await client.call("GET", "/api/x", token=old_token, expect=401)
        await client.call("GET", "/auth/session", token=old_token, expect=401)
        await client.call("GET", "/auth/verify", token=old_token, expect=401)
        await client.call("GET", "/api/x", token=new_token, expect=200)
        await client.call("GET", "/api/x", token=refreshed, expect=200)
    assert await gw.stop() == 0, gw.output()


# --- (d) identity header names ------------------------------------------------------------------


async def test_identity_header_names_change(launch: Launch, make_config: Any,
                                            upstream: Upstream) -> None:
    data = make_config()
    async with aiohttp.ClientSession() as http:
        gw, client = await launch_with_client(launch, data, http)
        token = await token_for(client)
        openid = (await client.call("GET", "/auth/session", token=token,
                                    expect=200)).json()["openid"]
        forged = f"forged-{uuid.uuid4().hex[:8]}"
        await client.call("GET", "/api/who", token=token, headers={"X-Member-Id": forged},
                          expect=200)
        assert upstream.last.header("X-WX-OpenID") == [openid]
        assert upstream.last.header("X-Member-Id") == [forged]  # not an identity header yet
        # /auth/verify's answer, built once per identity, is not served after the reload
        verify = await client.call("GET", "/auth/verify", token=token, expect=200)
        assert verify.headers.get("X-WX-OpenID") == openid

        new = copy.deepcopy(data)
        new["identity_headers"] = {"openid": "X-Member-Id", "appid": "X-Member-App"}
        await reload(gw, new)

        await client.call("GET", "/api/who", token=token, expect=200)
        assert upstream.last.header("X-Member-Id") == [openid]
        assert upstream.last.header("X-Member-App") == [APPID]
        assert upstream.last.header("X-WX-OpenID") == []
        for spelling in ("X-Member-Id", "x_member_id", "X-MEMBER-ID", "X-Member-App"):
            await client.call("GET", "/api/who", token=token, headers={spelling: forged},
                              expect=200)
            assert upstream.last.header("X-Member-Id") == [openid], spelling
            assert upstream.last.header("X-Member-App") == [APPID], spelling
            assert forged not in str(upstream.last.headers), spelling
            await client.call("GET", "/public/who", headers={spelling: forged}, expect=200)
            assert forged not in str(upstream.last.headers), spelling
        verify = await client.call("GET", "/auth/verify", token=token, expect=200)
        assert verify.headers.get("X-Member-Id") == openid
        assert "X-WX-OpenID" not in verify.headers
    assert await gw.stop() == 0, gw.output()


# --- (e) an invalid file ------------------------------------------------------------------------


def broken(data: dict[str, Any], upstream_url: str) -> dict[str, Any]:
    """Two mistakes (an unknown key, a short signing key) and a change that must not apply."""
    bad = copy.deepcopy(data)
    bad["routes"][0]["upstrem"] = upstream_url
    bad["session"]["signing_keys"] = ["too-short"]
    bad["routes"].append({"path": "/new", "upstream": upstream_url, "auth": "public"})
    return bad


async def test_invalid_file_is_refused_and_the_old_configuration_keeps_serving(
        launch: Launch, make_config: Any, upstream: Upstream) -> None:
    data = make_config()
    async with aiohttp.ClientSession() as http:
        gw, client = await launch_with_client(launch, data, http)
        token = await token_for(client)

        lines = await reload(gw, broken(data, upstream.url), outcome=REFUSED)
        refused = [line for line in lines if "reload refused" in line]
        assert any("reload refused: routes[0].upstrem: unknown key" in line
                   for line in refused), lines
        assert any("reload refused: session.signing_keys[0]: must be at least 32 bytes" in line
                   for line in refused), lines
        assert not any(RELOADED in line for line in lines)
        assert "too-short" not in gw.output()

        # nothing of it applied
        await client.call("GET", "/new/x", expect=404)
        await client.call("GET", "/api/x", token=token, expect=200)
        await token_for(client)

        # a valid file afterwards applies
        fixed = copy.deepcopy(data)
        fixed["routes"].append({"path": "/new", "upstream": upstream.url, "auth": "public"})
        await reload(gw, fixed)
        await client.call("GET", "/new/x", expect=200)
        await client.call("GET", "/api/x", token=token, expect=200)

        # a file that is not even YAML, or is gone, is refused too
        mark = gw.mark()
        gw.config.write_text("routes: [\n  {path: /api\n", encoding="utf-8")
        gw.hup()
        await gw.wait_for_line(lambda line: REFUSED in line, after=mark)
        await client.call("GET", "/new/x", expect=200)
    assert await gw.stop() == 0, gw.output()
    assert "Traceback" not in gw.output()


async def test_every_refused_reload_is_logged(launch: Launch, make_config: Any,
                                              upstream: Upstream) -> None:
    """Each SIGHUP is an event of its own: an operator who fixed one mistake but not the other
    must see the remaining one named again (not held back as a repeat)."""
    data = make_config()
    async with aiohttp.ClientSession() as http:
        gw, client = await launch_with_client(launch, data, http)
        await reload(gw, broken(data, upstream.url), outcome=REFUSED)

        half_fixed = broken(data, upstream.url)
        half_fixed["session"]["signing_keys"] = data["session"]["signing_keys"]
        mark = gw.mark()
        gw.rewrite(half_fixed)
        gw.hup()
        deadline = time.monotonic() + 3
        while REFUSED not in "\n".join(gw.stderr().splitlines()[mark:]):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        second = gw.stderr().splitlines()[mark:]
        await client.call("GET", "/new/x", expect=404)
    assert await gw.stop() == 0, gw.output()
    assert any("reload refused: routes[0].upstrem: unknown key" in line for line in second), (
        "the second refused reload did not name routes[0].upstrem again; its lines: "
        f"{second}")
    assert any(REFUSED in line for line in second), second


# --- (f) what needs a restart -------------------------------------------------------------------


async def test_listen_workers_and_redis_need_a_restart_everything_else_applies(
        launch: Launch, make_config: Any, upstream: Upstream) -> None:
    data = make_config()
    async with aiohttp.ClientSession() as http:
        gw, client = await launch_with_client(launch, data, http)
        token = await token_for(client)

        new = copy.deepcopy(data)
        other_port = free_port()
        new["listen"] = f"127.0.0.1:{other_port}"
        new["workers"] = 2
        new["redis"]["key_prefix"] = f"wxgw-elsewhere-{uuid.uuid4().hex[:6]}:"
        new["routes"].append({"path": "/new", "upstream": upstream.url, "auth": "public"})
        new["identity_headers"] = {"openid": "X-User-Id"}
        lines = await reload(gw, new)

        restart = [line for line in lines if "restart" in line]
        assert len(restart) == 1, lines
        for name in ("listen", "workers", "redis"):
            assert name in restart[0], (name, restart[0])
        assert "routes" not in restart[0] and "identity" not in restart[0], restart[0]

        # everything else applied...
        await client.call("GET", "/new/x", expect=200)
        await client.call("GET", "/api/x", token=token, expect=200)
        assert upstream.last.header("X-User-Id")
        # ...but the process still listens where it did, with the same Redis keys
        with pytest.raises(aiohttp.ClientError):
            async with http.get(f"http://127.0.0.1:{other_port}/healthz",
                                timeout=aiohttp.ClientTimeout(total=2)):
                pass
        await client.call("GET", "/auth/session", token=token, expect=200)
    assert await gw.stop() == 0, gw.output()


# --- (g) logging --------------------------------------------------------------------------------


async def test_logging_format_and_level_switch(launch: Launch, make_config: Any,
                                               upstream: Upstream) -> None:
    data = make_config(logging={"format": "text"})
    async with aiohttp.ClientSession() as http:
        gw, client = await launch_with_client(launch, data, http)
        await client.call("GET", "/public/before", expect=200)
        await gw.wait_for_line(lambda line: "/public/before" in line)
        before = gw.mark()

        as_json = copy.deepcopy(data)
        as_json["logging"] = {"format": "json"}
        await reload(gw, as_json)
        await client.call("GET", "/public/after", expect=200)
        await gw.wait_for_line(lambda line: "/public/after" in line, after=before)

        # level: warning (the reload's own info line is then not logged either: a new route
        # tells when it is in force)
        quiet = copy.deepcopy(data)
        quiet["logging"] = {"format": "json", "level": "warning"}
        quiet["routes"].append({"path": "/quiet", "upstream": upstream.url, "auth": "public"})
        gw.rewrite(quiet)
        gw.hup()
        deadline = time.monotonic() + 10
        while (await client.call("GET", "/quiet/probe")).status != 200:
            assert time.monotonic() < deadline, "the level: warning reload never applied"
            await asyncio.sleep(0.05)
        await client.call("GET", "/public/quiet", expect=200)
    assert await gw.stop() == 0, gw.output()

    lines = [line for line in gw.stderr().splitlines() if line.strip()]
    assert not any(is_json(line) for line in lines[:before]), lines[:before]
    after = lines[before:]
    records = parse_json_lines(after)  # every line after the reload is JSON
    assert any(r["message"].startswith(RELOADED) for r in records)
    assert any(r["logger"] == "gateway.access" and r["path"] == "/public/after"
               for r in records)
    assert not any("/public/quiet" in line for line in after), "level: warning still logs access"


# --- workers: 2 ---------------------------------------------------------------------------------


async def test_sighup_to_the_supervisor_reloads_every_worker(
        launch: Launch, make_config: Any, upstream: Upstream) -> None:
    data = make_config(workers=2)
    data["routes"].append({"path": "/old", "upstream": upstream.url, "auth": "public"})
    async with aiohttp.ClientSession() as http:
        gw, client = await launch_with_client(launch, data, http, fresh=True)
        await gw.wait_for_line(lambda line: "listening" in line, count=2)
        for _ in range(6):
            await client.call("GET", "/new/x", expect=404)

        new = copy.deepcopy(data)
        new["routes"] = [r for r in new["routes"] if r["path"] != "/old"]
        new["routes"].append({"path": "/new", "upstream": upstream.url, "auth": "public"})
        await reload(gw, new, processes=2)

        # SO_REUSEPORT spreads connections over both workers: every fresh one must agree
        for _ in range(24):
            await client.call("GET", "/new/x", expect=200)
            await client.call("GET", "/old/x", expect=404)
    assert await gw.stop() == 0, gw.output()
    assert "Traceback" not in gw.output()


async def test_supervisor_switches_its_own_log_format_too(
        launch: Launch, make_config: Any) -> None:
    """After a text → json reload the output is JSON only, the supervisor's own lines
    ("stopping 2 workers") included: a log shipper parses one format."""
    data = make_config(workers=2, logging={"format": "text"})
    async with aiohttp.ClientSession() as http:
        gw, client = await launch_with_client(launch, data, http, fresh=True)
        await gw.wait_for_line(lambda line: "listening" in line, count=2)
        # The start-up health check's access line is written after its response was sent:
        # wait for it, or it can land after the mark and be counted as post-reload output.
        await gw.wait_for_line(lambda line: "GET /healthz" in line)
        before = gw.mark()
        as_json = copy.deepcopy(data)
        as_json["logging"] = {"format": "json"}
        await reload(gw, as_json, processes=2)
        for _ in range(4):
            await client.call("GET", "/public/x", expect=200)
    assert await gw.stop() == 0, gw.output()
    after = [line for line in gw.stderr().splitlines()[before:] if line.strip()]
    not_json = [line for line in after if not is_json(line)]
    assert not not_json, f"lines in the old format after the reload: {not_json}"


def test_restart_only_keys_are_those_the_declaration_marks() -> None:
    assert set(RESTART_ONLY) == {
        "listen_host", "listen_port", "workers", "redis", "auth_prefix", "shutdown_grace",
        "session.cache_size", "client_header_timeout", "client_body_timeout",
        "keepalive_timeout", "max_connections", "admin.listen", "listen_tls"}


async def test_a_restart_only_key_inside_a_section_keeps_its_running_value(
        make_gateway: GatewayFactory, config_dict: dict[str, Any], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    client = await make_gateway()
    app = client.server.app
    running = app[SERVICES].current.config
    data = copy.deepcopy(config_dict)
    data["session"] = {**data["session"], "cache_size": running.session.cache_size + 7,
                       "ttl": "1h"}
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        with caplog.at_level(logging.WARNING, logger="gateway.reload"):
            assert reload_config(app, str(path))
    finally:  # a reload sets up the process's logging; this process is pytest's
        root.handlers[:], root.level = handlers, level
    applied = app[SERVICES].current.config.session
    assert applied.cache_size == running.session.cache_size  # held until a restart
    assert applied.ttl == 3600.0  # the rest of the section applies
    (warning,) = [r.getMessage() for r in caplog.records if "restart" in r.getMessage()]
    assert "session.cache_size" in warning and "session.ttl" not in warning
