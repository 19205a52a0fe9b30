"""The command line and the real process: ``--check``, where the
configuration comes from, refusing to start on a bad file, serving, and graceful shutdown."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Awaitable, Callable

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from conftest import APPID, SIGNING_KEY, Upstream, base_config, bearer
from gateway.testing import simulator
from gateway.testing.embedded import EmbeddedRedis, free_port
from process import (GATEWAY, GatewayProcess, Launch, child_env, connection_refused,
                     write_config)

CONSOLE_SCRIPT = Path(sys.executable).parent / "wx-gateway"
RUN_TIMEOUT = 30  # seconds; a hung --check must fail the test, not the suite
_KEY_LINE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\[\d+\])?(\.[A-Za-z_][A-Za-z0-9_]*(\[\d+\])?)*: \S")


def valid_config(**overrides: Any) -> dict[str, Any]:
    """A valid configuration; --check never connects anywhere, so the addresses are dummies."""
    data = base_config("redis://127.0.0.1:6379/0", "wxgw-cli:", "http://127.0.0.1:1",
                       "http://127.0.0.1:9000")
    data.update(overrides)
    return data


def invalid_config() -> tuple[dict[str, Any], list[str]]:
    """A configuration with three problems, and the key path each must be reported under."""
    data = valid_config()
    data["routes"][1]["upstream"] = "ftp://127.0.0.1:21"
    data["session"]["signing_keys"] = ["too-short"]
    data["routse"] = []
    return data, ["routes[1].upstream", "session.signing_keys[0]", "routse"]


def run(args: list[str], cwd: Path, env: dict[str, str] | None = None,
        command: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*(command or GATEWAY), *args], cwd=cwd,
                          env=child_env() if env is None else env, capture_output=True,
                          text=True, timeout=RUN_TIMEOUT)


def stderr_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def assert_problems(result: subprocess.CompletedProcess[str], keys: list[str]) -> None:
    """Non-zero exit, and exactly one stderr line per problem, each starting with its key."""
    assert result.returncode != 0, result
    lines = stderr_lines(result)
    assert len(lines) == len(keys), lines
    for line in lines:
        assert _KEY_LINE.match(line), f"not a `key: message` line: {line!r}"
    for key in keys:
        assert sum(line.startswith(f"{key}: ") for line in lines) == 1, (key, lines)


def port_is_closed(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        try:
            s.connect(("127.0.0.1", port))
        except ConnectionRefusedError:
            return True
        return False


# --- --check -------------------------------------------------------------------------------


def test_check_valid_file_exits_0_with_nothing_on_stderr(tmp_path: Path) -> None:
    path = write_config(tmp_path / "gw.yaml", valid_config())
    result = run(["--config", str(path), "--check"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "valid" in result.stdout


def test_check_invalid_file_lists_one_line_per_problem(tmp_path: Path) -> None:
    data, keys = invalid_config()
    path = write_config(tmp_path / "gw.yaml", data)
    result = run(["--config", str(path), "--check"], tmp_path)
    assert_problems(result, keys)
    line = next(x for x in stderr_lines(result) if x.startswith("routes[1].upstream: "))
    assert "ftp://127.0.0.1:21" in line
    assert "valid" not in result.stdout


def test_check_reports_unset_environment_variable(tmp_path: Path) -> None:
    data = valid_config()
    data["apps"][0]["secret"] = "${WXGW_CLI_TEST_UNSET_SECRET}"
    path = write_config(tmp_path / "gw.yaml", data)
    env = child_env()
    env.pop("WXGW_CLI_TEST_UNSET_SECRET", None)
    result = run(["--config", str(path), "--check"], tmp_path, env)
    assert_problems(result, ["apps[0].secret"])
    assert "WXGW_CLI_TEST_UNSET_SECRET" in result.stderr
    # ...and the same file is valid once the variable is exported.
    env["WXGW_CLI_TEST_UNSET_SECRET"] = "now-set"
    assert run(["--config", str(path), "--check"], tmp_path, env).returncode == 0


def test_check_yaml_syntax_error_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("routes: [\n  {path: /api\n", encoding="utf-8")
    result = run(["--config", str(path), "--check"], tmp_path)
    assert result.returncode != 0
    (line,) = stderr_lines(result)
    assert line.startswith(str(path)) and "YAML" in line
    assert "Traceback" not in result.stderr


def test_check_missing_file_is_one_line(tmp_path: Path) -> None:
    result = run(["--config", str(tmp_path / "nope.yaml"), "--check"], tmp_path)
    assert result.returncode != 0
    (line,) = stderr_lines(result)
    assert line.startswith(str(tmp_path / "nope.yaml") + ": ")
    assert "Traceback" not in result.stderr


def test_check_repo_config_yaml(tmp_path: Path) -> None:
    repo_config = Path(__file__).resolve().parent.parent / "config.yaml"
    env = child_env(GATEWAY_SIGNING_KEY="k" * 48, WX_APP_SECRET="s")
    assert run(["--config", str(repo_config), "--check"], tmp_path, env).returncode == 0
    env = child_env()
    for name in ("GATEWAY_SIGNING_KEY", "WX_APP_SECRET"):
        env.pop(name, None)
    result = run(["--config", str(repo_config), "--check"], tmp_path, env)
    assert_problems(result, ["apps[0].secret", "session.signing_keys[0]"])


# --- where the configuration comes from ----------------------------------------------------


def test_without_config_flag_gateway_config_env_is_used(tmp_path: Path) -> None:
    data, keys = invalid_config()
    write_config(tmp_path / "config.yaml", data)  # must be ignored: GATEWAY_CONFIG wins
    good = write_config(tmp_path / "from-env.yaml", valid_config())
    result = run(["--check"], tmp_path, child_env(GATEWAY_CONFIG=str(good)))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""

    # The other way round: a bad file named by GATEWAY_CONFIG fails even with a good ./config.yaml.
    write_config(tmp_path / "config.yaml", valid_config())
    bad = write_config(tmp_path / "bad-from-env.yaml", data)
    assert_problems(run(["--check"], tmp_path, child_env(GATEWAY_CONFIG=str(bad))), keys)


def test_without_config_flag_or_env_config_yaml_in_working_dir_is_used(tmp_path: Path) -> None:
    result = run(["--check"], tmp_path)
    assert result.returncode != 0  # nothing there yet
    (line,) = stderr_lines(result)
    assert line.startswith("config.yaml: ")

    write_config(tmp_path / "config.yaml", valid_config())
    result = run(["--check"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""

    data, keys = invalid_config()
    write_config(tmp_path / "config.yaml", data)
    assert_problems(run(["--check"], tmp_path), keys)


def test_config_flag_wins_over_gateway_config_env(tmp_path: Path) -> None:
    data, keys = invalid_config()
    bad = write_config(tmp_path / "bad.yaml", data)
    good = write_config(tmp_path / "good.yaml", valid_config())
    result = run(["--config", str(good), "--check"], tmp_path, child_env(GATEWAY_CONFIG=str(bad)))
    assert result.returncode == 0, result.stderr
    result = run(["--config", str(bad), "--check"], tmp_path, child_env(GATEWAY_CONFIG=str(good)))
    assert_problems(result, keys)


def test_relative_config_path_is_relative_to_working_dir(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    write_config(tmp_path / "conf" / "gw.yaml", valid_config())
    result = run(["--config", "conf/gw.yaml", "--check"], tmp_path)
    assert result.returncode == 0, result.stderr


# --- the console script --------------------------------------------------------------------


def test_console_script_check(tmp_path: Path) -> None:
    assert CONSOLE_SCRIPT.exists(), f"{CONSOLE_SCRIPT} is not installed"
    good = write_config(tmp_path / "good.yaml", valid_config())
    result = run(["--config", str(good), "--check"], tmp_path, command=[str(CONSOLE_SCRIPT)])
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    data, keys = invalid_config()
    bad = write_config(tmp_path / "bad.yaml", data)
    assert_problems(run(["--config", str(bad), "--check"], tmp_path,
                        command=[str(CONSOLE_SCRIPT)]), keys)
    # ...and it honours GATEWAY_CONFIG too.
    result = run(["--check"], tmp_path, child_env(GATEWAY_CONFIG=str(good)),
                 command=[str(CONSOLE_SCRIPT)])
    assert result.returncode == 0, result.stderr


# --- starting on an invalid configuration --------------------------------------------------


@pytest.mark.parametrize("command", [GATEWAY, [str(CONSOLE_SCRIPT)]], ids=["module", "script"])
def test_start_with_invalid_config_exits_before_listening(tmp_path: Path,
                                                          command: list[str]) -> None:
    port = free_port()
    data, keys = invalid_config()
    data["listen"] = f"127.0.0.1:{port}"
    path = write_config(tmp_path / "gw.yaml", data)
    proc = subprocess.Popen([*command, "--config", str(path)], cwd=tmp_path, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # While it runs (if it wrongly does), the port must never open.
        deadline = time.monotonic() + RUN_TIMEOUT
        while proc.poll() is None and time.monotonic() < deadline:
            assert port_is_closed(port), "the gateway listened despite an invalid configuration"
            time.sleep(0.02)
        out, err = proc.communicate(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert proc.returncode not in (None, 0)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert_problems(result, keys)
    assert "listening" not in err.lower()
    assert port_is_closed(port)


# --- a real gateway process ----------------------------------------------------------------


Spawn = Callable[..., Awaitable[GatewayProcess]]


@pytest.fixture
def spawn(redis_server: EmbeddedRedis, wechat: TestServer, upstream: Upstream,
          launch: Launch) -> Spawn:
    """``await spawn(**top_level_overrides)`` → a running gateway process (not yet healthy)."""
    async def start(**overrides: Any) -> GatewayProcess:
        data = base_config(redis_server.url, f"wxgw-cli-{uuid.uuid4().hex[:8]}:",
                           f"http://127.0.0.1:{wechat.port}", upstream.url)
        data["listen"] = f"127.0.0.1:{free_port()}"
        data.update(overrides)
        return await launch(data, healthy_within=10.0)
    return start


async def login(http: aiohttp.ClientSession, gw: GatewayProcess, code: str) -> dict[str, Any]:
    async with http.post(f"{gw.url}/auth/login", json={"code": code}) as resp:
        assert resp.status == 200, await resp.text()
        body: dict[str, Any] = await resp.json()
        return body


async def test_process_serves_health_login_and_proxied_requests(
        spawn: Spawn, upstream: Upstream) -> None:
    gw = await spawn()
    async with aiohttp.ClientSession() as http:
        await gw.wait_healthy(http)
        async with http.get(f"{gw.url}/readyz") as resp:
            assert resp.status == 200, await resp.text()

        code = f"cli-{uuid.uuid4().hex[:12]}"
        session = await login(http, gw, code)
        assert session["token_type"] == "Bearer"
        assert session["token"]
        assert session["openid"] == simulator.openid_for(APPID, code)
        assert session["expires_in"] > 0

        async with http.get(f"{gw.url}/api/orders?page=2", headers=bearer(session["token"])) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["ok"] is True
        seen = upstream.last
        assert seen.raw_path == "/api/orders?page=2"
        assert seen.header("X-WX-OpenID") == [session["openid"]]
        assert seen.header("X-WX-AppID") == [APPID]
        assert seen.header("Authorization") == []

        # Without a token the real process refuses, and nothing new reaches the upstream.
        before = len(upstream.seen)
        async with http.get(f"{gw.url}/api/orders") as resp:
            assert resp.status == 401
            assert (await resp.json())["error"] == "unauthorized"
        assert len(upstream.seen) == before

    # Nothing secret is printed by the process.
    output = gw.output()
    assert session["token"] not in output
    assert SIGNING_KEY not in output


async def test_sigterm_finishes_in_flight_request_then_exits_0(
        spawn: Spawn, upstream: Upstream) -> None:
    grace = 5.0
    gw = await spawn(shutdown_grace=f"{grace:g}s")
    async with aiohttp.ClientSession() as http:
        await gw.wait_healthy(http)
        token = (await login(http, gw, f"term-{uuid.uuid4().hex[:12]}"))["token"]

    async def slow_request() -> tuple[int, Any]:
        async with aiohttp.ClientSession() as client:
            async with client.get(f"{gw.url}/api/slow/1500", headers=bearer(token),
                                  timeout=aiohttp.ClientTimeout(total=15)) as resp:
                return resp.status, await resp.json()

    in_flight = asyncio.create_task(slow_request())
    try:
        # Wait until the request is really in flight: it has reached the upstream.
        deadline = time.monotonic() + 5
        while not any(s.raw_path == "/api/slow/1500" for s in upstream.seen):
            assert time.monotonic() < deadline, "the slow request never reached the upstream"
            assert not in_flight.done(), in_flight.result()
            await asyncio.sleep(0.01)

        signalled = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)

        # It stops accepting at once, while the in-flight request is still being served.
        deadline = time.monotonic() + 1.0
        while not await connection_refused(gw.port):
            assert time.monotonic() < deadline, "still accepting connections after SIGTERM"
            await asyncio.sleep(0.02)
        assert not in_flight.done(), "the in-flight request was cut short"

        status, body = await asyncio.wait_for(asyncio.shield(in_flight), 10)
        assert status == 200
        assert body["ok"] is True
        assert time.monotonic() - signalled >= 1.0  # it really waited for the upstream

        # Once the in-flight request is done, a new connection is refused.
        assert await connection_refused(gw.port)

        code = await gw.exit_code(within=grace + 2)
        assert code == 0, gw.output()
        assert time.monotonic() - signalled < grace, "exit took longer than the grace period"
    finally:
        if not in_flight.done():
            in_flight.cancel()
        await asyncio.gather(in_flight, return_exceptions=True)


async def test_sigterm_with_idle_keepalive_connection_exits_promptly(spawn: Spawn) -> None:
    grace = 8.0
    gw = await spawn(shutdown_grace=f"{grace:g}s")
    async with aiohttp.ClientSession() as http:  # keeps its connection to the gateway alive
        await gw.wait_healthy(http)
        async with http.get(f"{gw.url}/healthz") as resp:
            assert resp.status == 200
        signalled = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        code = await gw.exit_code(within=grace + 2)
        elapsed = time.monotonic() - signalled
    assert code == 0, gw.output()
    # Nothing is in flight: an idle keep-alive connection must not hold the process for the
    # whole grace period.
    assert elapsed < grace / 2, f"took {elapsed:.1f}s to stop with nothing in flight"
    assert await connection_refused(gw.port)


async def test_sigint_exits_0(spawn: Spawn) -> None:
    gw = await spawn(shutdown_grace="5s")
    async with aiohttp.ClientSession() as http:
        await gw.wait_healthy(http)
    signalled = time.monotonic()
    gw.proc.send_signal(signal.SIGINT)
    code = await gw.exit_code(within=7)
    assert code == 0, gw.output()
    assert time.monotonic() - signalled < 5
    assert "Traceback" not in gw.output()
    assert await connection_refused(gw.port)


async def test_sigterm_idle_process_exits_0_without_traceback(spawn: Spawn) -> None:
    gw = await spawn(shutdown_grace="5s")
    async with aiohttp.ClientSession() as http:
        await gw.wait_healthy(http)
    gw.proc.send_signal(signal.SIGTERM)
    assert await gw.exit_code(within=7) == 0, gw.output()
    assert "Traceback" not in gw.output()
