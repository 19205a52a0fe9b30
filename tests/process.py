"""The real ``python -m gateway`` process for tests: start it from a configuration dict, watch
its output, wait for it, stop it. The ``launcher``/``launch`` fixtures in conftest.py start
processes with a ``Launcher`` and kill whatever is still running when the test ends.

``Client`` talks to such a process and remembers every request that got an answer (the logs
tests match each one to its access line)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping, Sequence

import aiohttp
import pytest
import yaml

from gateway.testing.embedded import free_port
from rawhttp import RawResponse, raw_exchange

GATEWAY = [sys.executable, "-m", "gateway"]
# What the process must never print, whatever the tests do to it.
FAILURE_MARKERS = ("Traceback", "unhandled error")
HEALTHY_WITHIN = 15.0  # seconds: the default bound on start-up


def child_env(**extra: str) -> dict[str, str]:
    """The test's environment, minus anything that would choose a configuration by itself."""
    env = dict(os.environ)
    env.pop("GATEWAY_CONFIG", None)
    env.update(extra)
    return env


def write_config(path: Path, data: Mapping[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(dict(data), sort_keys=False), encoding="utf-8")
    return path


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""


class ChildProcess:
    """A child process whose stdout goes to ``log``, and its stderr too unless ``err`` is a
    file of its own."""

    def __init__(self, proc: asyncio.subprocess.Process, log: Path, err: Path | None = None,
                 *, graceful_stop: bool = False) -> None:
        self.proc = proc
        self.log = log
        self.err = err
        self.graceful_stop = graceful_stop  # at clean-up: SIGTERM first, SIGKILL after 10 s

    def stdout(self) -> str:
        """What it wrote to stdout (and to stderr, unless that has a file of its own)."""
        return _read(self.log)

    def stderr(self) -> str:
        """What it wrote to stderr (with stdout mixed in, unless stderr has a file of its own)."""
        return _read(self.err) if self.err is not None else _read(self.log)

    def output(self) -> str:
        """Everything it wrote; stderr first when the two have files of their own."""
        return self.stderr() + self.stdout() if self.err is not None else _read(self.log)

    def lines(self) -> list[str]:
        """Every non-empty line the process wrote."""
        return [line for line in self.output().splitlines() if line.strip()]

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def hup(self) -> None:
        self.proc.send_signal(signal.SIGHUP)

    async def exit_code(self, within: float) -> int:
        try:
            return await asyncio.wait_for(self.proc.wait(), within)
        except asyncio.TimeoutError:
            pytest.fail(f"still running {within}s later:\n{self.output()}")

    async def stop(self, within: float = 15.0) -> int:
        """SIGTERM (unless it has exited already), then its exit code."""
        if self.proc.returncode is None:
            self.terminate()
        try:
            return await asyncio.wait_for(self.proc.wait(), within)
        except asyncio.TimeoutError:
            pytest.fail(f"still running {within}s after SIGTERM:\n{self.output()}")

    async def close(self) -> None:
        """Gone for sure: killed (after a SIGTERM and 10 s, when ``graceful_stop``)."""
        if self.proc.returncode is not None:
            return
        if self.graceful_stop:
            self.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except asyncio.TimeoutError:
                self.proc.kill()
                await self.proc.wait()
            return
        self.proc.kill()
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except asyncio.TimeoutError:
            pass


class GatewayProcess(ChildProcess):
    """A running gateway listening on 127.0.0.1:``port``, started from the file ``config``
    (None when the command line found its configuration some other way)."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int, log: Path,
                 err: Path | None = None, *, config: Path | None = None,
                 healthy_within: float = HEALTHY_WITHIN, graceful_stop: bool = False) -> None:
        super().__init__(proc, log, err, graceful_stop=graceful_stop)
        self.port = port
        self.config = config
        self.healthy_within = healthy_within

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rewrite(self, data: Mapping[str, Any]) -> None:
        """Replace its configuration file (takes effect on ``hup()``)."""
        assert self.config is not None, "this gateway was not started from a file of ours"
        write_config(self.config, data)

    def assert_no_internal_failure(self) -> None:
        out = self.output()
        for marker in FAILURE_MARKERS:
            assert marker not in out, f"{marker!r} in the gateway's output:\n{out}"

    def memory_mb(self) -> dict[str, float]:
        """VmRSS (now) and VmHWM (peak over the process's life), in MB (10^6 bytes)."""
        fields: dict[str, float] = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                kib = int(value.split()[0])
                fields[name] = kib * 1024 / 1e6
        return fields

    async def raw(self, payload: bytes) -> RawResponse:
        """Send exactly ``payload`` on a connection of its own (see rawhttp.py)."""
        return await raw_exchange("127.0.0.1", self.port, payload)

    async def wait_healthy(self, http: aiohttp.ClientSession,
                           within: float | None = None) -> None:
        """Until /healthz answers 200; fails if the process exits first, or after ``within``
        seconds (``healthy_within`` unless given)."""
        within = self.healthy_within if within is None else within
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if self.proc.returncode is not None:
                pytest.fail(f"gateway exited with {self.proc.returncode}:\n{self.output()}")
            try:
                async with http.get(f"{self.url}/healthz",
                                    timeout=aiohttp.ClientTimeout(total=1)) as resp:
                    if resp.status == 200:
                        return
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
            await asyncio.sleep(0.05)
        pytest.fail(f"gateway not healthy within {within}s:\n{self.output()}")

    async def login(self) -> dict[str, Any]:
        """Log in with a fresh (single-use) code; the 200 body."""
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{self.url}/auth/login",
                                 json={"code": f"user-{uuid.uuid4().hex[:12]}"}) as resp:
                assert resp.status == 200, await resp.text()
                body: dict[str, Any] = await resp.json()
                return body

    def mark(self) -> int:
        """How many stderr lines there are so far (for ``wait_for_line(after=...)``)."""
        return len(self.stderr().splitlines())

    async def wait_for_line(self, predicate: Callable[[str], bool], *, after: int = 0,
                            count: int = 1, within: float = 10.0) -> list[str]:
        """Wait until ``count`` stderr lines past the first ``after`` satisfy ``predicate``."""
        deadline = time.monotonic() + within
        while True:
            lines = self.stderr().splitlines()[after:]
            found = [line for line in lines if predicate(line)]
            if len(found) >= count:
                return found
            if self.proc.returncode is not None:
                pytest.fail(f"gateway exited with {self.proc.returncode}:\n{self.output()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {count} matching log line(s) within {within}s:\n{self.output()}")
            await asyncio.sleep(0.02)


Launch = Callable[..., Awaitable[GatewayProcess]]


class Launcher:
    """Starts processes with their files in ``directory`` (also their working directory);
    ``close()`` kills whatever still runs."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[ChildProcess] = []

    def _files(self, separate_stderr: bool) -> tuple[Path, Path | None]:
        n = len(self.started)
        return (self.directory / f"gw-{n}.log",
                self.directory / f"gw-{n}.err" if separate_stderr else None)

    async def _exec(self, argv: Sequence[str], env: Mapping[str, str], cwd: Path, log: Path,
                    err: Path | None) -> asyncio.subprocess.Process:
        with contextlib.ExitStack() as files:  # the child keeps its own copies open
            out_file = files.enter_context(open(log, "wb"))
            err_file: Any = (asyncio.subprocess.STDOUT if err is None
                             else files.enter_context(open(err, "wb")))
            return await asyncio.create_subprocess_exec(
                *argv, cwd=cwd, env=dict(env), stdin=asyncio.subprocess.DEVNULL,
                stdout=out_file, stderr=err_file)

    async def start(self, data: Mapping[str, Any], *, env: Mapping[str, str] | None = None,
                    separate_stderr: bool = False, healthy_within: float = HEALTHY_WITHIN,
                    graceful_stop: bool = False) -> GatewayProcess:
        """``python -m gateway --config <file with data>``, not yet healthy. It listens on
        ``data['listen']``, or on a free port when that is absent or base_config's
        placeholder ``:8080``."""
        n = len(self.started)
        if "listen" not in data or str(data["listen"]).endswith(":8080"):
            data = {**data, "listen": f"127.0.0.1:{free_port()}"}
        port = int(str(data["listen"]).rpartition(":")[2])
        config = write_config(self.directory / f"gw-{n}.yaml", data)
        return await self.start_command(
            [*GATEWAY, "--config", str(config)], port=port, config=config,
            env=child_env() if env is None else env, separate_stderr=separate_stderr,
            healthy_within=healthy_within, graceful_stop=graceful_stop)

    async def start_command(self, argv: Sequence[str], *, port: int,
                            env: Mapping[str, str], config: Path | None = None,
                            separate_stderr: bool = False,
                            healthy_within: float = HEALTHY_WITHIN,
                            graceful_stop: bool = False) -> GatewayProcess:
        """A gateway started by some other command line (e.g. the image's), listening on
        ``port``."""
        log, err = self._files(separate_stderr)
        proc = await self._exec(argv, env, self.directory, log, err)
        gw = GatewayProcess(proc, port, log, err, config=config, healthy_within=healthy_within,
                            graceful_stop=graceful_stop)
        self.started.append(gw)
        return gw

    async def run(self, argv: Sequence[str], *, env: Mapping[str, str], cwd: Path,
                  log: Path) -> ChildProcess:
        """Any other program, its output to ``log``."""
        proc = await self._exec(argv, env, cwd, log, None)
        child = ChildProcess(proc, log)
        self.started.append(child)
        return child

    async def close(self) -> None:
        for child in self.started:
            await child.close()


async def connection_refused(port: int, *, timeout_is_refusal: bool = False) -> bool:
    """Whether a connection to 127.0.0.1:``port`` is refused. A connection attempt still
    pending after 1 s raises asyncio.TimeoutError, or counts as refused if
    ``timeout_is_refusal``."""
    refusals: tuple[type[BaseException], ...] = (ConnectionRefusedError, OSError)
    if timeout_is_refusal:
        refusals += (asyncio.TimeoutError,)
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1.0)
    except refusals:
        return True
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass
    return False


# --- a client that remembers what it asked -----------------------------------------------------


@dataclass
class Sent:
    """One request made to the gateway and what its access line must say."""

    rid: str | None
    method: str
    path: str
    status: int
    route: str | None = None
    auth: str = "none"
    appid: str | None = None
    openid: str | None = None
    upstream: bool = False  # answered by the upstream: upstream_ms is expected


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Client:
    """Talks to one gateway and remembers every request that got an answer."""

    base: str
    http: aiohttp.ClientSession
    sent: list[Sent] = field(default_factory=list)
    fresh: bool = False  # a new connection per request (to spread over SO_REUSEPORT workers)

    async def call(self, method: str, target: str, *, token: str | None = None,
                   headers: dict[str, str] | None = None, json_body: Any = None,
                   route: str | None = None, auth: str | None = None, appid: str | None = None,
                   openid: str | None = None, upstream: bool = False,
                   expect: int | None = None, timeout: float = 10.0) -> Reply:
        rid = f"rq-{len(self.sent)}-{uuid.uuid4().hex[:8]}"
        sent_headers = {"X-Request-ID": rid, **(headers or {})}
        if token is not None:
            sent_headers["Authorization"] = f"Bearer {token}"
        if self.fresh:
            sent_headers["Connection"] = "close"
        async with self.http.request(method, self.base + target, headers=sent_headers,
                                     json=json_body,
                                     timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            reply = Reply(resp.status, dict(resp.headers), await resp.read())
        if expect is not None:
            assert reply.status == expect, (method, target, reply.status, reply.body)
        if auth is None:
            auth = "denied" if reply.status in (401, 403) else "none"
        self.sent.append(Sent(rid, method, target.partition("?")[0], reply.status, route, auth,
                              appid, openid, upstream))
        return reply

    async def wait_healthy(self, gw: GatewayProcess, within: float = 15.0) -> None:
        """Like ``gw.wait_healthy``, but each /healthz asked is remembered."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if gw.proc.returncode is not None:
                pytest.fail(f"gateway exited with {gw.proc.returncode}:\n{gw.output()}")
            try:
                reply = await self.call("GET", "/healthz", route="/healthz", timeout=1)
            except (aiohttp.ClientError, asyncio.TimeoutError):
                await asyncio.sleep(0.05)
                continue
            if reply.status == 200:
                return
        pytest.fail(f"gateway not healthy within {within}s:\n{gw.output()}")

    async def login(self, code: str, appid: str | None = None, expect: int = 200) -> Reply:
        body: dict[str, Any] = {"code": code}
        if appid is not None:
            body["appid"] = appid
        return await self.call("POST", "/auth/login", json_body=body, route="/auth/login",
                               expect=expect)


async def launch_with_client(launch: Launch, data: Mapping[str, Any],
                             http: aiohttp.ClientSession,
                             fresh: bool = False) -> tuple[GatewayProcess, Client]:
    """A gateway whose stdout and stderr have files of their own, and a Client of it, once
    healthy."""
    gw = await launch(data, separate_stderr=True)
    client = Client(gw.url, http, fresh=fresh)
    await client.wait_healthy(gw)
    return gw, client
