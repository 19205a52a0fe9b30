"""``python -m gateway.testing.simulator`` as a user runs it: a real process a real gateway
logs in through."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from conftest import APPID, APPID2, SECRET, SECRET2, TWO_APPS, base_config, fresh
from gateway.testing import simulator
from gateway.testing.embedded import EmbeddedRedis, free_port
from process import ChildProcess, Launch, Launcher, child_env, launch_with_client

SIMULATOR = [sys.executable, "-m", "gateway.testing.simulator"]


async def _start(launcher: Launcher, *args: str) -> tuple[ChildProcess, int]:
    port = free_port()
    sim = await launcher.run([*SIMULATOR, "--port", str(port), *args], env=child_env(),
                             cwd=launcher.directory,
                             log=launcher.directory / f"simulator-{port}.log")
    deadline = time.monotonic() + 15
    while f"listening on http://127.0.0.1:{port}" not in sim.output():
        if sim.proc.returncode is not None or time.monotonic() > deadline:
            pytest.fail(f"simulator did not start:\n{sim.output()}")
        await asyncio.sleep(0.05)
    return sim, port


async def test_a_gateway_pointed_at_the_command_logs_in_each_app_then_it_stops_on_sigterm(
        launcher: Launcher, launch: Launch, redis_server: EmbeddedRedis, key_prefix: str,
        ) -> None:
    sim, port = await _start(launcher, "--app", f"{APPID}:{SECRET}", "--app",
                             f"{APPID2}:{SECRET2}")
    data = base_config(redis_server.url, key_prefix, f"http://127.0.0.1:{port}",
                       "http://127.0.0.1:9")
    data["apps"] = TWO_APPS
    async with aiohttp.ClientSession() as http:
        _, client = await launch_with_client(launch, data, http)
        code = fresh("sim-")
        for appid in (APPID, APPID2):
            login = (await client.login(code, appid)).json()
            assert login["openid"] == simulator.openid_for(appid, code)
            assert login["unionid"] == simulator.unionid_for(code)
        # Its failure prefixes work through the command too.
        refused = await client.login("errcode-40029-x", APPID, expect=401)
        assert refused.json()["error"] == "invalid_code"
    assert await sim.stop() == 0


async def test_wecom_apps_log_in_through_the_command_with_given_or_printed_corpids(
        launcher: Launcher, launch: Launch, redis_server: EmbeddedRedis, key_prefix: str,
        ) -> None:
    corpid = "ww0123456789abcdef"
    sim, port = await _start(launcher, "--app", f"wecom:{APPID}:{SECRET}", "--app",
                             f"wecom:{APPID2}:{SECRET2}", "--corpid", f"{APPID}={corpid}")
    derived = simulator.corpid_for(APPID2)
    assert f"WeCom app {APPID2}: corpid {derived}" in sim.output()
    data = base_config(redis_server.url, key_prefix, "http://127.0.0.1:9", "http://127.0.0.1:9")
    data["apps"] = [{**app, "platform": "wecom", "corpid": c,
                     "api_base": f"http://127.0.0.1:{port}"}
                    for app, c in zip(TWO_APPS, (corpid, derived))]
    async with aiohttp.ClientSession() as http:
        _, client = await launch_with_client(launch, data, http)
        code = fresh("sim-")
        for appid in (APPID, APPID2):
            login = (await client.login(code, appid)).json()
            assert login["openid"] == simulator.openid_for(appid, code)
            assert login["unionid"] is None
        refused = await client.login("othercorp-x", APPID, expect=502)
        assert refused.json()["error"] == "wechat_error"


@pytest.mark.parametrize("corpid", ["wx1234567890abcdef", "=ww01", "wx1234567890abcdef="])
async def test_a_corpid_without_appid_or_value_is_a_usage_error(launcher: Launcher,
                                                                corpid: str) -> None:
    sim = await launcher.run([*SIMULATOR, "--port", str(free_port()), "--app",
                              f"wecom:{APPID}:{SECRET}", "--corpid", corpid],
                             env=child_env(), cwd=launcher.directory,
                             log=launcher.directory / "simulator-bad.log")
    assert await sim.exit_code(within=15) == 2
    assert "expected APPID=CORPID" in sim.output()


async def test_a_secret_it_was_not_given_is_refused_like_wechat(
        launcher: Launcher, launch: Launch, redis_server: EmbeddedRedis, key_prefix: str,
        ) -> None:
    _, port = await _start(launcher, "--app", f"{APPID}:another-secret")
    data = base_config(redis_server.url, key_prefix, f"http://127.0.0.1:{port}",
                       "http://127.0.0.1:9")
    async with aiohttp.ClientSession() as http:
        _, client = await launch_with_client(launch, data, http)
        assert (await client.login(fresh(), expect=502)).json()["error"] == "wechat_error"


@pytest.mark.parametrize("app", [
    "wx1234567890abcdef", "wx1234567890abcdef:", ":secret",
    # a mistyped platform, or one without a secret, was taken as an appid with a secret
    "wework:wx1234567890abcdef:secret", "qq:1109876543", "wecom:wx1234567890abcdef",
])
async def test_an_app_without_appid_or_secret_is_a_usage_error(launcher: Launcher,
                                                                 app: str) -> None:
    sim = await launcher.run([*SIMULATOR, "--port", str(free_port()), "--app", app],
                             env=child_env(), cwd=launcher.directory,
                             log=launcher.directory / "simulator-bad.log")
    assert await sim.exit_code(within=15) == 2
    assert "expected [PLATFORM:]APPID:SECRET" in sim.output()


async def test_a_port_in_use_is_a_clear_error_and_sigint_stops_it(launcher: Launcher) -> None:
    first, port = await _start(launcher, "--app", f"{APPID}:{SECRET}")
    second = await launcher.run([*SIMULATOR, "--port", str(port), "--app", f"{APPID}:{SECRET}"],
                                env=child_env(), cwd=launcher.directory,
                                log=launcher.directory / "simulator-second.log")
    assert await second.exit_code(within=15) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in second.output()
    first.proc.send_signal(signal.SIGINT)
    assert await first.exit_code(within=15) == 0


def _documented_failures() -> list[tuple[str, int, str | None]]:
    """docs/simulator.md's rows for concrete codes: (code, login status, error or None)."""
    page = (Path(__file__).resolve().parent.parent / "docs" / "simulator.md").read_text("utf-8")
    rows = []
    for match in re.finditer(r"^\| `([a-z0-9-]+-x)` \| [^|]+ \| (\d{3})(?: `(\w+)`)?", page, re.M):
        rows.append((match.group(1), int(match.group(2)), match.group(3)))
    return rows


async def test_the_documented_failure_codes_give_the_documented_login_answers(
        launcher: Launcher, launch: Launch, redis_server: EmbeddedRedis, key_prefix: str,
        ) -> None:
    rows = _documented_failures()
    assert len(rows) >= 8, rows
    _, port = await _start(launcher, "--app", f"{APPID}:{SECRET}")
    data = base_config(redis_server.url, key_prefix, f"http://127.0.0.1:{port}",
                       "http://127.0.0.1:9")
    async with aiohttp.ClientSession() as http:
        _, client = await launch_with_client(launch, data, http)
        for code, status, error in rows:
            reply = await client.login(code, expect=status)
            if error is not None:
                assert reply.json()["error"] == error, code
            else:
                assert reply.json()["unionid"] is None, code
