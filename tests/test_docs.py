"""The documentation as a user meets it: README as the front page (small, every link
resolving, its commands and configuration working), the docs site built strictly, and the
example config.yaml working from a fresh clone with only the variables it names."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from conftest import Upstream, bearer
from gateway import loader
from gateway.errors import ConfigError
from gateway.testing import simulator
from gateway.testing.embedded import EmbeddedRedis, free_port
from process import GATEWAY, Launcher
from test_deploy import nginx_binary, nginx_conf  # noqa: F401  (a fixture, and its config)
from test_tls import self_signed

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RUN_TIMEOUT = 120  # seconds: a hung build must fail the test, not the suite
# What config.yaml's header says to set, and nothing else.
SIGNING_KEY = "k" * 43
DOCUMENTED = {"WX_APP_SECRET": "test-secret", "GATEWAY_SIGNING_KEY": SIGNING_KEY}


def readme() -> str:
    return README.read_text(encoding="utf-8")


def fenced(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", text, re.M | re.S)


def bare_env(**extra: str) -> dict[str, str]:
    """A fresh shell: PATH and what the test names, none of the test run's own settings."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **extra}


def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
        capture_output=True, text=True, timeout=RUN_TIMEOUT, cwd=config.parent,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})


# --- README, the front page -----------------------------------------------------------------


def test_readme_is_a_front_page_under_12_kb() -> None:
    size = len(README.read_bytes())
    assert size < 12 * 1024, f"README.md is {size} bytes: move reference material to docs/"


def test_readme_opens_with_the_demo_and_the_test_commands() -> None:
    (first, *_) = fenced(readme(), "sh")
    commands = [line for line in first.splitlines() if line and not line.startswith("#")]
    assert commands == [
        "python3 -m venv .venv && .venv/bin/pip install -e '.[demo]' && "
        ".venv/bin/python -m gateway.testing.demo",
        "bash scripts/system-packages.sh && python3 -m venv .venv && "
        ".venv/bin/pip install -e '.[test]' && .venv/bin/python -m pytest",
    ]


def test_every_relative_link_in_the_readme_resolves_to_a_file() -> None:
    links = re.findall(r"\]\(([^)\s]+)\)", readme())
    relative = [link for link in links if not re.match(r"[a-z]+:", link)]
    assert len(relative) >= 10, relative  # the docs pages at least
    missing = []
    for link in relative:
        target = link.partition("#")[0]
        if target and not (ROOT / target).exists():
            missing.append(link)
    assert not missing, f"README links to files that do not exist: {missing}"


def test_readme_links_every_docs_page() -> None:
    linked = set(re.findall(r"\]\((docs/[^)#]+)", readme()))
    pages = {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")}
    assert pages - linked == set(), "docs pages the README does not link"


def test_the_readme_configuration_passes_check_with_the_two_variables() -> None:
    (config,) = [block for block in fenced(readme(), "yaml") if "apps:" in block]
    cfg = loader.parse(yaml.safe_load(config), environ=DOCUMENTED)
    assert [r.label for r in cfg.routes] == ["/api/"]
    assert cfg.apps[0].secret == "test-secret"
    with pytest.raises(ConfigError) as info:
        loader.parse(yaml.safe_load(config), environ={})
    assert sorted(p.partition(":")[0] for p in info.value.problems) == [
        "apps[0].secret", "session.signing_keys[0]"]


# --- the docs site --------------------------------------------------------------------------


def test_docs_site_builds_strictly(tmp_path: Path) -> None:
    site = tmp_path / "site"
    result = mkdocs_build(ROOT / "mkdocs.yml", site)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "WARNING" not in output, output
    pages = {p.parent.name for p in site.glob("*/index.html")}
    assert {"configuration", "endpoints", "security", "operations", "development"} <= pages
    # ARCHITECTURE.md stays at the root and is shown on the development page
    assert "Module map" in (site / "development" / "index.html").read_text(encoding="utf-8")


@pytest.mark.parametrize("broken", ["[gone](missing.md)", "[gone](endpoints.md#no-such-anchor)"])
def test_docs_build_fails_on_a_broken_link(tmp_path: Path, broken: str) -> None:
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    shutil.copy(ROOT / "ARCHITECTURE.md", tmp_path / "ARCHITECTURE.md")
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copytree(ROOT / "deploy", tmp_path / "deploy")  # docs/edge.md shows its recipes
    page = tmp_path / "docs" / "simulator.md"
    page.write_text(page.read_text(encoding="utf-8") + f"\n{broken}\n", encoding="utf-8")
    result = mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert result.returncode != 0
    assert broken.partition("(")[2].rstrip(")").partition("#")[0] in result.stderr + result.stdout


# --- config.yaml from a fresh clone ---------------------------------------------------------


def check(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GATEWAY, "--config", "config.yaml", "--check"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT)


def test_config_yaml_names_the_two_variables_it_needs() -> None:
    header = (ROOT / "config.yaml").read_text(encoding="utf-8").split("\n\n")[0]
    named = set(re.findall(r"^#\s+([A-Z_]+)\s", header, re.M))
    assert named == DOCUMENTED.keys()


def test_config_yaml_check_passes_with_only_the_documented_variables() -> None:
    result = check(bare_env(**DOCUMENTED))
    assert result.returncode == 0, result.stderr
    assert "configuration is valid" in result.stdout + result.stderr


def test_config_yaml_check_without_them_names_each_one() -> None:
    result = check(bare_env())
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "apps[0].secret: environment variable WX_APP_SECRET is not set",
        "session.signing_keys[0]: environment variable GATEWAY_SIGNING_KEY is not set"]


async def test_config_yaml_logs_in_against_the_simulator_started_as_readme_shows(
        launcher: Launcher, redis_server: EmbeddedRedis, upstream: Upstream,
        tmp_path: Path) -> None:
    """README's simulator command line, then config.yaml as shipped with WECHAT_API_BASE
    pointing at it: a login, and the backend sees the verified openid."""
    (args,) = re.findall(r'^\.venv/bin/python -m gateway\.testing\.simulator (.*) &$', readme(),
                         re.M)
    sim_port, gw_port = free_port(), free_port()
    await launcher.run([sys.executable, "-m", "gateway.testing.simulator",
                        *args.replace("--port 9100", f"--port {sim_port}").split()],
                       env=bare_env(), cwd=ROOT, log=tmp_path / "simulator.log")
    env = bare_env(**DOCUMENTED, WX_APPID="wx1234567890abcdef",
                   WECHAT_API_BASE=f"http://127.0.0.1:{sim_port}", REDIS_URL=redis_server.url,
                   API_UPSTREAM=upstream.url, GATEWAY_LISTEN=f"127.0.0.1:{gw_port}")
    gw = await launcher.start_command([*GATEWAY, "--config", str(ROOT / "config.yaml")],
                                      port=gw_port, env=env)
    async with aiohttp.ClientSession() as http:
        await gw.wait_healthy(http)
        for _ in range(100):  # the simulator starts alongside: 502 wechat_error until it listens
            async with http.post(f"{gw.url}/auth/login", json={"code": "any-code"}) as resp:
                status, login = resp.status, await resp.json()
            if status != 502:
                break
            await asyncio.sleep(0.1)
        assert status == 200, login
        async with http.get(f"{gw.url}/api/orders",
                            headers={**bearer(login["token"]), "X-WX-OpenID": "forged"}) as resp:
            assert resp.status == 200
    openids = [v for k, v in upstream.last.headers if k.lower() == "x-wx-openid"]
    assert openids == [login["openid"]] and login["openid"] != "forged"
    gw.assert_no_internal_failure()


# --- the TLS proxy in front, as README shows it ---------------------------------------------


@pytest.mark.timeout(900)  # the first run on a fresh machine installs nginx
async def test_readme_nginx_and_configuration_serve_a_login_and_a_request_over_https(
        nginx_binary: str, launcher: Launcher, redis_server: EmbeddedRedis,
        upstream: Upstream, aiohttp_server: Any, tmp_path: Path) -> None:
    """README's nginx server block and configuration, with only addresses and file names
    changed: TLS ends at nginx, the gateway trusts it, the backend gets the identity and the
    client's scheme."""
    wechat = await aiohttp_server(simulator.create_app({"wx1234567890abcdef": "test-secret"}))
    (config,) = [block for block in fenced(readme(), "yaml") if "apps:" in block]
    data = yaml.safe_load(config)
    data["redis"]["url"] = redis_server.url
    data["routes"][0]["upstream"] = upstream.url
    gw = await launcher.start(data, env=bare_env(
        **DOCUMENTED, WECHAT_API_BASE=f"http://127.0.0.1:{wechat.port}"))

    (server_block,) = fenced(readme(), "nginx")
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    cert, key, _ = self_signed(prefix, "gw")
    nginx_port = free_port()
    site = (server_block.replace("listen 443 ssl;", f"listen 127.0.0.1:{nginx_port} ssl;")
            .replace("/etc/ssl/gw.example.com.pem", str(cert))
            .replace("/etc/ssl/gw.example.com.key", str(key))
            .replace("http://127.0.0.1:8080", gw.url))
    assert str(nginx_port) in site and str(cert) in site and gw.url in site
    (prefix / "site.conf").write_text(site, encoding="utf-8")
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_conf(prefix, prefix / "site.conf"), encoding="utf-8")
    base = [nginx_binary, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    syntax = subprocess.run([*base, "-t"], capture_output=True, text=True, timeout=30)
    assert syntax.returncode == 0, syntax.stderr
    await launcher.run(base, env=bare_env(), cwd=prefix, log=prefix / "stdout.log")

    front = f"https://127.0.0.1:{nginx_port}"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=False)) as http:
        await gw.wait_healthy(http)
        for _ in range(100):  # nginx starts alongside
            try:
                async with http.post(f"{front}/auth/login", json={"code": "tls"}) as resp:
                    status, login = resp.status, await resp.json()
                break
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.1)
        assert status == 200, login
        async with http.get(f"{front}/api/orders", headers=bearer(login["token"])) as resp:
            assert resp.status == 200, await resp.text()
    seen = dict((k.lower(), v) for k, v in upstream.last.headers)
    assert seen["x-wx-openid"] == login["openid"]
    assert seen["x-forwarded-proto"] == "https"  # believed: nginx is a trusted proxy
    assert seen["x-forwarded-for"] == "127.0.0.1, 127.0.0.1"  # the client, then nginx
    assert "authorization" not in seen
