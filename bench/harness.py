"""What bench/run.py and bench/revocation.py share: the processes under test, on loopback.

* ``Stack``: every process a benchmark starts (a real ``redis-server`` through
  ``gateway.testing.embedded.EmbeddedRedis``, helpers, nginx, gateways), each logging to its own file
  in one temporary directory, all stopped (SIGTERM, then SIGKILL after 10 s) when the stack
  closes, whatever happened.
* ``python bench/harness.py serve --simulator-port N [--upstream-port M]``: the WeChat
  simulator (``gateway.testing.simulator.create_app``) and, optionally, an aiohttp upstream answering
  ``200 ok`` to everything, in one process (uvloop when installed).
* nginx configurations (a fixed-body upstream, a plain keepalive reverse proxy), the
  gateway's benchmark configuration, ``apt-get install`` of missing tools, logins.

The small process helpers (``wait_port``, ``run_loop``, ``children_of``) are bench/stream.py's;
``free_port`` is ``gateway.testing.embedded``'s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any, Callable

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
for _p in (str(ROOT), str(BENCH)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from gateway.testing.embedded import free_port  # noqa: E402
from stream import children_of, run_loop, serve, stop_all, wait_port  # noqa: E402

__all__ = ["APPID", "SECRET", "SIGNING_KEY", "Stack", "children_of", "free_port",
           "gateway_config", "install_tools", "login", "run_loop", "run_main", "stop_on_sigterm",
           "tool_version", "tree_cpu_seconds", "wait_port", "workers_arg"]

APPID = "wx1234567890abcdef"
SECRET = "bench-secret"
SIGNING_KEY = "bench-signing-key-0123456789-abcdefghijkl"


# --- the helper process: WeChat simulator (+ an "ok" upstream) ---------------------------------


def serve_helpers(simulator_port: int, upstream_port: int | None) -> None:
    from aiohttp import web

    from gateway.testing import simulator

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    def apps() -> list[tuple[web.Application, int]]:
        made = [(simulator.create_app({APPID: SECRET}), simulator_port)]
        if upstream_port is not None:
            upstream = web.Application()
            upstream.router.add_route("*", "/{tail:.*}", ok)
            made.append((upstream, upstream_port))
        return made

    serve(apps)


# --- tools ---------------------------------------------------------------------------------------


def which(name: str) -> str | None:
    return shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/local/sbin/{name}", f"/usr/bin/{name}")
         if os.access(p, os.X_OK)), None)


def install_tools(names: list[str], install: bool) -> dict[str, str]:
    """Paths of ``names``; ``apt-get install -y`` the missing ones first unless ``install`` is
    false. Raises SystemExit with a message when one is still missing."""
    missing = [n for n in names if which(n) is None]
    if missing and not install:
        raise SystemExit(f"missing: {' '.join(missing)} (--no-install given; install them with "
                         f"`apt-get install -y {' '.join(missing)}`)")
    if missing:
        if os.geteuid() != 0:
            raise SystemExit(f"missing: {' '.join(missing)}; run as root to let this script "
                             f"apt-get them, or install them yourself")
        print(f"installing {' '.join(missing)} (apt-get update && apt-get install -y "
              f"{' '.join(missing)}) ...", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", *missing]):
            try:
                subprocess.run(cmd, check=True, env=env, stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, timeout=900)
            except (OSError, subprocess.SubprocessError) as exc:
                raise SystemExit(f"could not install {' '.join(missing)}: {exc}")
        if "nginx" in missing:
            print("  note: the nginx package may have started the system nginx service (port "
                  "80); the benchmarks neither use nor stop it", file=sys.stderr)
    found = {n: which(n) for n in names}
    still = [n for n, p in found.items() if p is None]
    if still:
        raise SystemExit(f"still missing after apt-get: {' '.join(still)}")
    return {n: p for n, p in found.items() if p is not None}


def tool_version(argv: list[str]) -> str:
    """The first line a ``--version``-style command prints (nginx and wrk print to stderr)."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "?"
    lines = ((done.stdout or "") + (done.stderr or "")).strip().splitlines()
    return lines[0].strip() if lines else "?"


# --- configurations ------------------------------------------------------------------------------


_NGINX_COMMON = """\
worker_processes {workers};
worker_rlimit_nofile 65536;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_timeout 65s;
    keepalive_requests 1000000;
{body}
}}
"""

_NGINX_UPSTREAM = """\
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        default_type text/plain;
        location / {{ return 200 "ok\\n"; }}
    }}"""

_NGINX_PROXY = """\
    upstream backend {{
        server 127.0.0.1:{upstream};
        keepalive 64;
        keepalive_requests 1000000;
        keepalive_timeout 65s;
    }}
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}"""


def nginx_upstream_conf(prefix: str, port: int, workers: int | str) -> str:
    """nginx answering ``200 ok\\n`` (3 bytes, text/plain) to any request, keepalive on."""
    return _NGINX_COMMON.format(prefix=prefix, workers=workers,
                                body=_NGINX_UPSTREAM.format(port=port))


def nginx_proxy_conf(prefix: str, port: int, upstream_port: int, workers: int | str) -> str:
    """nginx as a plain reverse proxy: HTTP/1.1 keepalive pool to the upstream."""
    return _NGINX_COMMON.format(prefix=prefix, workers=workers,
                                body=_NGINX_PROXY.format(port=port, upstream=upstream_port))


def gateway_config(port: int, redis_url: str, wechat_url: str, upstream_url: str,
                   workers: str | None = None) -> dict[str, Any]:
    """The gateway under test: ``/api/`` (auth: required) and ``/public/`` (auth: public) to
    the same upstream; login limits off (every login comes from 127.0.0.1)."""
    data: dict[str, Any] = {
        "listen": f"127.0.0.1:{port}",
        "redis": {"url": redis_url, "key_prefix": "wxgw-bench:"},
        "wechat": {"api_base": wechat_url, "timeout": "5s"},
        "apps": [{"appid": APPID, "secret": SECRET}],
        "session": {"signing_keys": [SIGNING_KEY], "ttl": "1h"},
        "auth": {"rate_limit": {"ip_limit": 0, "app_limit": 0, "max_retries": 0}},
        "shutdown_grace": "2s",
        "routes": [
            {"path": "/api/", "upstream": upstream_url, "auth": "required", "timeout": "10s"},
            {"path": "/public/", "upstream": upstream_url, "auth": "public", "timeout": "10s"},
        ],
    }
    if workers is not None:
        # Only for gateways that know the key: to others an unknown key is an error.
        data["workers"] = int(workers) if str(workers).isdigit() else workers
    return data


def workers_arg(text: str) -> str:
    if text != "auto" and not (text.isdigit() and int(text) >= 1):
        raise argparse.ArgumentTypeError("a positive integer or 'auto'")
    return text


# --- processes -----------------------------------------------------------------------------------


class Stack:
    """Processes started for one benchmark; ``close()`` stops them all, newest first."""

    def __init__(self, prefix: str = "wxgw-bench-") -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix=prefix)
        self.dir = Path(self._tmp.name)
        self.dir.chmod(0o755)  # nginx workers run as nobody when the master runs as root
        self.procs: list[subprocess.Popen[Any]] = []
        self.redis: Any = None

    def __enter__(self) -> "Stack":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def start_redis(self) -> Any:
        from gateway.testing.embedded import EmbeddedRedis
        self.redis = EmbeddedRedis(persist=False).start()
        return self.redis

    def spawn(self, name: str, argv: list[str], port: int, *,
              within: float = 20, **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` (output to ``<name>.log``) and wait until it listens on ``port``."""
        log_path = self.dir / f"{name}.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, **kwargs)
        self.procs.append(proc)
        try:
            wait_port(port, proc, name, within)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n--- {log_path.name} ---\n{self.log_tail(name)}") from None
        return proc

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.dir / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def helpers(self, simulator_port: int, upstream_port: int | None = None) -> None:
        argv = [sys.executable, str(BENCH / "harness.py"), "serve",
                "--simulator-port", str(simulator_port)]
        if upstream_port is not None:
            argv += ["--upstream-port", str(upstream_port)]
        self.spawn("helpers", argv, simulator_port, cwd=ROOT)
        if upstream_port is not None:
            wait_port(upstream_port, self.procs[-1], "upstream")

    def nginx(self, name: str, nginx: str, conf_text: Callable[[str], str],
              port: int) -> subprocess.Popen[Any]:
        prefix = self.dir / name
        for sub in ("", "client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (prefix / sub).mkdir(exist_ok=True)
            (prefix / sub).chmod(0o755)
        conf = prefix / "nginx.conf"
        conf.write_text(conf_text(str(prefix)))
        return self.spawn(name, [nginx, "-p", str(prefix), "-c", str(conf),
                                 "-g", "daemon off;"], port)

    def gateway(self, name: str, config: dict[str, Any]) -> subprocess.Popen[Any]:
        import yaml
        path = self.dir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        env = {k: v for k, v in os.environ.items() if k != "GATEWAY_CONFIG"}
        port = int(config["listen"].rpartition(":")[2])
        return self.spawn(name, [sys.executable, "-m", "gateway", "--config", str(path)],
                          port, cwd=ROOT, env=env)

    def close(self) -> None:
        stop_all(self.procs)
        self.procs.clear()
        if self.redis is not None:
            self.redis.close()
            self.redis = None
        self._tmp.cleanup()


def tree_cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of ``pid`` and its descendants (Linux ``/proc``)."""
    tick = os.sysconf("SC_CLK_TCK")
    total, todo, seen = 0.0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        todo.extend(children_of(p))
    return total


def stop_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl+C, so the ``finally`` that stops the stack runs."""
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, handler)


def run_main(main: Callable[[], int]) -> None:
    """Exit with ``main()``'s status; on Ctrl+C (the stack's ``finally`` has run) say so, 130."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; every process started has been stopped", file=sys.stderr)
        sys.exit(130)


# --- clients -------------------------------------------------------------------------------------


def login(base: str, code: str, timeout: float = 10) -> str:
    """POST /auth/login with ``code``; the token."""
    request = urllib.request.Request(f"{base}/auth/login", method="POST",
                                     data=json.dumps({"code": code}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        token: str = json.load(resp)["token"]
    return token


def main() -> int:
    parser = argparse.ArgumentParser(description="benchmark helper processes")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="WeChat simulator (+ an 'ok' upstream)")
    serve.add_argument("--simulator-port", type=int, required=True)
    serve.add_argument("--upstream-port", type=int)
    args = parser.parse_args()
    serve_helpers(args.simulator_port, args.upstream_port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
