#!/usr/bin/env python3
"""Streaming benchmark: a large upload and download through wx-gateway (and nginx, if present).

    .venv/bin/python bench/stream.py [--size 1GiB] [--install-nginx | --no-nginx] [--verify]

Starts, all on loopback ports:

* a real ``redis-server`` (``gateway.testing.embedded.EmbeddedRedis``),
* an aiohttp upstream in its own process, which generates downloads 64 KiB at a time and
  counts uploads as they arrive (it never holds a body),
* the gateway (``python -m gateway``) with a ``public`` route to that upstream,
* nginx as a plain streaming reverse proxy to the same upstream, when ``nginx`` is on PATH
  (``--install-nginx`` runs ``apt-get install -y nginx`` first if it is not),

then uploads and downloads ``--size`` bytes, with Content-Length and chunked framing, directly
and through each proxy, and prints one table: MB/s and the proxy's peak RSS during that
transfer (``VmHWM`` from ``/proc/<pid>/status``, reset before each transfer through
``/proc/<pid>/clear_refs`` where the kernel allows it), plus the gateway's lifetime peak.
MB is 10^6 bytes. Every transfer is bounded by ``--timeout``; all processes are stopped at the
end, whatever happens. Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable

ROOT = Path(__file__).resolve().parent.parent
for _p in (str(ROOT), str(ROOT / "tests")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

# The bodies and the upstream are the streaming test's (tests/bodies.py).
from bodies import BLOCK, CHUNK, chunk_at, chunks, expected_sha256, stream_app  # noqa: E402
from gateway.testing.embedded import free_port  # noqa: E402

SIGNING_KEY = "bench-signing-key-0123456789-abcdefghijkl"
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 1GiB, 256MiB, 500MB)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def wait_port(port: int, proc: subprocess.Popen[Any], what: str, within: float = 15) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {within}s")


def stop_all(procs: list[subprocess.Popen[Any]]) -> None:
    """SIGTERM, last started first; SIGKILL what has not exited 10 s later."""
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in reversed(procs):
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_loop(main: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


# --- the upstream (runs in its own process: `stream.py upstream --port N`) -------------------


def serve(apps: Callable[[], list[tuple[Any, int]]]) -> None:
    """Serve the aiohttp applications ``apps()`` makes, each on its loopback port, until
    SIGTERM or SIGINT."""
    from aiohttp import web

    async def main() -> None:
        runners = []
        for app, port in apps():
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            runners.append(runner)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        for runner in runners:
            await runner.cleanup()

    run_loop(main())


def serve_upstream(port: int) -> None:
    serve(lambda: [(stream_app(), port)])


# --- processes under test ---------------------------------------------------------------------


@dataclass
class Proxy:
    name: str
    url: str
    pids: Callable[[], list[int]]  # the processes whose memory counts


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def reset_peak(pids: list[int]) -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not permitted."""
    ok = True
    for pid in pids:
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
        except OSError:
            ok = False
    return ok


def peak_mb(pids: list[int]) -> float:
    return sum(status_kib(pid, "VmHWM") for pid in pids) * 1024 / 1e6


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def gateway_config(port: int, redis_url: str, upstream_port: int, timeout: float) -> str:
    import yaml
    return yaml.safe_dump({
        "listen": f"127.0.0.1:{port}",
        "redis": {"url": redis_url, "key_prefix": "wxgw-bench:"},
        "wechat": {"api_base": "http://127.0.0.1:1", "timeout": "1s"},
        "apps": [{"appid": "wx1234567890abcdef", "secret": "bench-secret"}],
        "session": {"signing_keys": [SIGNING_KEY], "ttl": "1h"},
        # A route's timeout bounds the whole exchange, body included.
        "routes": [{"path": "/public/", "upstream": f"http://127.0.0.1:{upstream_port}",
                    "auth": "public", "timeout": f"{max(1, math.ceil(timeout))}s"}],
    }, sort_keys=False)


NGINX_CONF = """\
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream backend {{ server 127.0.0.1:{upstream}; keepalive 16; }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 0;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_request_buffering off;
            proxy_buffering off;
            # Unbuffered, nginx moves at most one buffer per read; its defaults (4-8 KiB)
            # would handicap it against the gateway's 64 KiB chunks.
            client_body_buffer_size 64k;
            proxy_buffer_size 64k;
            proxy_buffers 4 64k;
            proxy_busy_buffers_size 128k;
            proxy_read_timeout {timeout}s;
            proxy_send_timeout {timeout}s;
        }}
    }}
}}
"""


def find_nginx(install: bool) -> str | None:
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)
    if found or not install:
        return found
    print("installing nginx (apt-get update && apt-get install -y nginx) ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends",
                                        "nginx"]):
        try:
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, timeout=600)
        except (OSError, subprocess.SubprocessError) as exc:
            print(f"  could not install nginx: {exc}", file=sys.stderr)
            return None
    if not os.path.exists("/usr/sbin/policy-rc.d"):
        print("  note: the package may have started the system nginx service (port 80); this "
              "script neither uses nor stops it", file=sys.stderr)
    return shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK)
                                     else None)


# --- the client -------------------------------------------------------------------------------


@dataclass
class Result:
    direction: str
    framing: str
    proxy: str
    seconds: float
    peak_mb: float | None
    error: str | None = None


async def body(n: int, verify: bool) -> AsyncIterator[bytes]:
    block = BLOCK
    for i, size in enumerate(chunks(n)):
        yield chunk_at(i, size) if verify else (block if size == CHUNK else block[:size])


async def upload(http: Any, url: str, n: int, with_length: bool, verify: bool,
                 expected: str | None) -> None:
    headers = {"Content-Type": "application/octet-stream"}
    if with_length:
        headers["Content-Length"] = str(n)
    async with http.post(f"{url}/public/upload{'?verify=1' if verify else ''}",
                         data=body(n, verify), headers=headers) as resp:
        text = await resp.text()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {text[:200]}")
        got = json.loads(text)
    if got["bytes"] != n:
        raise RuntimeError(f"upstream received {got['bytes']} of {n} bytes")
    if verify and got["sha256"] != expected:
        raise RuntimeError("upload digest mismatch")


async def download(http: Any, url: str, n: int, chunked: bool, verify: bool,
                   expected: str | None) -> None:
    digest = hashlib.sha256() if verify else None
    count = 0
    async with http.get(f"{url}/public/download/{n}{'/chunked' if chunked else ''}") as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:200]}")
        async for chunk in resp.content.iter_any():
            count += len(chunk)
            if digest is not None:
                digest.update(chunk)
    if count != n:
        raise RuntimeError(f"received {count} of {n} bytes")
    if digest is not None and digest.hexdigest() != expected:
        raise RuntimeError("download digest mismatch")


async def measure(proxies: list[Proxy], n: int, verify: bool, timeout: float,
                  repeat: int) -> list[Result]:
    import aiohttp

    expected = expected_sha256(n) if verify else None
    results = []
    client_timeout = aiohttp.ClientTimeout(total=timeout, sock_read=60)
    cases = [("upload", "Content-Length"), ("upload", "chunked"),
             ("download", "Content-Length"), ("download", "chunked")]
    runs = [(case, proxy) for case in cases for _ in range(repeat) for proxy in proxies]
    for (direction, framing), proxy in runs:
        pids = proxy.pids()
        if pids:
            reset_peak(pids)
        connector = aiohttp.TCPConnector(limit=1, force_close=True)
        async with aiohttp.ClientSession(connector=connector, timeout=client_timeout,
                                         auto_decompress=False) as http:
            started = time.perf_counter()
            error = None
            try:
                if direction == "upload":
                    await upload(http, proxy.url, n, framing == "Content-Length", verify,
                                 expected)
                else:
                    await download(http, proxy.url, n, framing == "chunked", verify,
                                   expected)
            except (Exception, asyncio.TimeoutError) as exc:  # reported in the table
                error = f"{type(exc).__name__}: {exc}"[:120]
            seconds = time.perf_counter() - started
        peak = peak_mb(pids) if pids else None
        results.append(Result(direction, framing, proxy.name, seconds, peak, error))
        print(f"  {direction:8} {framing:14} {proxy.name:8} "
              + (f"{n / seconds / 1e6:8.0f} MB/s" if not error else f"FAILED {error}"),
              flush=True)
    return results


def summarise(results: list[Result]) -> list[Result]:
    """One row per (direction, framing, proxy): the median time, the highest peak RSS."""
    rows: dict[tuple[str, str, str], list[Result]] = {}
    for r in results:
        rows.setdefault((r.direction, r.framing, r.proxy), []).append(r)
    summary = []
    for (direction, framing, proxy), group in rows.items():
        failed = next((r.error for r in group if r.error), None)
        peaks = [r.peak_mb for r in group if r.peak_mb is not None]
        summary.append(Result(direction, framing, proxy,
                              statistics.median(r.seconds for r in group),
                              max(peaks) if peaks else None, failed))
    return summary


# --- main -------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    up = sub.add_parser("upstream", help=argparse.SUPPRESS)
    up.add_argument("--port", type=int, required=True)
    parser.add_argument("--size", type=parse_size, default=parse_size("1GiB"),
                        help="body size each way, e.g. 1GiB, 256MiB, 500MB [1GiB]")
    parser.add_argument("--install-nginx", action="store_true",
                        help="apt-get install nginx when it is not on PATH")
    parser.add_argument("--no-nginx", action="store_true", help="skip nginx even if installed")
    parser.add_argument("--no-direct", action="store_true",
                        help="skip the client→upstream baseline")
    parser.add_argument("--verify", action="store_true",
                        help="check SHA-256 end to end (costs CPU on client and upstream)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="transfers per row; the table shows the median MB/s [1]")
    parser.add_argument("--timeout", type=float, default=300,
                        help="seconds allowed per transfer [300]")
    args = parser.parse_args()
    if args.command == "upstream":
        serve_upstream(args.port)
        return 0
    if not Path("/proc/self/status").exists():
        print("bench/stream.py needs Linux (/proc)", file=sys.stderr)
        return 2

    from gateway.testing.embedded import EmbeddedRedis

    nginx = None if args.no_nginx else find_nginx(args.install_nginx)
    procs: list[subprocess.Popen[Any]] = []
    tmp = tempfile.TemporaryDirectory(prefix="wxgw-bench-")
    redis = EmbeddedRedis(persist=False)
    try:
        redis.start()
        upstream_port, gateway_port, nginx_port = free_port(), free_port(), free_port()
        upstream = subprocess.Popen([sys.executable, __file__, "upstream", "--port",
                                     str(upstream_port)], stdin=subprocess.DEVNULL)
        procs.append(upstream)
        wait_port(upstream_port, upstream, "upstream")

        config = Path(tmp.name) / "gateway.yaml"
        config.write_text(gateway_config(gateway_port, redis.url, upstream_port, args.timeout))
        gateway_log = open(Path(tmp.name) / "gateway.log", "wb")
        env = {k: v for k, v in os.environ.items() if k != "GATEWAY_CONFIG"}
        gateway = subprocess.Popen([sys.executable, "-m", "gateway", "--config", str(config)],
                                   cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                   stdout=gateway_log, stderr=subprocess.STDOUT)
        procs.append(gateway)
        try:
            wait_port(gateway_port, gateway, "gateway")
        except RuntimeError:
            gateway_log.flush()
            print((Path(tmp.name) / "gateway.log").read_text(errors="replace")[-2000:],
                  file=sys.stderr)
            raise
        gateway_start_mb = status_kib(gateway.pid, "VmRSS") * 1024 / 1e6

        proxies = []
        if not args.no_direct:
            proxies.append(Proxy("direct", f"http://127.0.0.1:{upstream_port}", lambda: []))
        proxies.append(Proxy("gateway", f"http://127.0.0.1:{gateway_port}",
                             lambda: [gateway.pid]))
        nginx_version = None
        if nginx:
            for sub_dir in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
                (Path(tmp.name) / sub_dir).mkdir()
            conf = Path(tmp.name) / "nginx.conf"
            conf.write_text(NGINX_CONF.format(tmp=tmp.name, port=nginx_port,
                                              upstream=upstream_port,
                                              timeout=max(1, math.ceil(args.timeout))))
            nginx_version = subprocess.run([nginx, "-v"], capture_output=True,
                                           text=True).stderr.strip()
            master = subprocess.Popen([nginx, "-p", tmp.name, "-c", str(conf),
                                       "-g", "daemon off;"], stdin=subprocess.DEVNULL)
            procs.append(master)
            try:
                wait_port(nginx_port, master, "nginx")
            except RuntimeError as exc:
                print(f"nginx: {exc}, skipped", file=sys.stderr)
            else:
                # The worker moves the bytes; the master only supervises. Count both.
                proxies.append(Proxy("nginx", f"http://127.0.0.1:{nginx_port}",
                                     lambda: [master.pid, *children_of(master.pid)]))
        else:
            print("nginx: not installed, skipped (--install-nginx to apt-get it)")

        peak_resettable = reset_peak([gateway.pid])
        print(f"size {args.size} bytes ({args.size / (1 << 20):.0f} MiB) each way, "
              f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}"
              + (f", {nginx_version}" if nginx_version else ""), flush=True)
        started = time.monotonic()
        results = run_loop(measure(proxies, args.size, args.verify, args.timeout,
                                   max(1, args.repeat)))
        elapsed = time.monotonic() - started
        # The highest of the per-transfer peaks (VmHWM is reset before each one).
        run_peak_mb = max([status_kib(gateway.pid, "VmHWM") * 1024 / 1e6,
                           *(r.peak_mb or 0 for r in results if r.proxy == "gateway")])
    finally:
        stop_all(procs)
        redis.close()
        tmp.cleanup()

    all_runs, results = results, summarise(results)
    print()
    print(f"{'direction':9}  {'framing':14}  {'proxy':7}  {'MB/s':>7}  {'peak RSS MB':>11}")
    print(f"{'-' * 9}  {'-' * 14}  {'-' * 7}  {'-' * 7}  {'-' * 11}")
    for r in results:
        rate = f"{args.size / r.seconds / 1e6:7.0f}" if r.error is None else " FAILED"
        rss = f"{r.peak_mb:11.1f}" if r.peak_mb is not None else f"{'-':>11}"
        print(f"{r.direction:9}  {r.framing:14}  {r.proxy:7}  {rate}  {rss}"
              + (f"  {r.error}" if r.error else ""))
    print()
    print(f"gateway RSS: {gateway_start_mb:.1f} MB after start, peak {run_peak_mb:.1f} MB over "
          "all transfers" + ("" if peak_resettable else " (clear_refs not permitted: each "
                             "row's peak is the process's peak so far)"))
    print(f"total {elapsed:.1f}s for {len(all_runs)} transfers"
          + (f" (median of {args.repeat} per row)" if args.repeat > 1 else "")
          + f"; MB = 10^6 bytes; "
          f"client, upstream and proxies share {os.cpu_count()} CPUs")
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
