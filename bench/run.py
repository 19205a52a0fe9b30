#!/usr/bin/env python3
"""Throughput benchmark: wx-gateway against nginx on the same upstream, with wrk.

    .venv/bin/python bench/run.py [--quick] [-t 1 -c 32 -d 10] [--workers N] [--no-install]

Starts, all on loopback ports (everything is stopped at the end, whatever happens):

* nginx as the upstream, answering ``200 ok\\n`` to any request (keepalive on),
* nginx as a plain reverse proxy to it (the anchor: HTTP/1.1 keepalive pool to the upstream,
  ``proxy_set_header Connection ""``, one worker per core unless ``--nginx-workers``),
* a real ``redis-server`` (``gateway.testing.embedded.EmbeddedRedis``),
* the WeChat simulator (``gateway.testing.simulator.create_app``) in its own process,
* the peer (``bench/peer.py``): a plain aiohttp proxy with one ClientSession, no auth,
* the gateway (``python -m gateway --config <tmp yaml>``) with ``/public/`` (auth: public) and
  ``/api/`` (auth: required) routes to the nginx upstream, login limits off;

* a second gateway, the same with ``workers: auto``;

logs in once through the gateway, then runs wrk with the same settings against each target,
each after a warm-up: nginx proxy, gateway public, gateway required (``Authorization: Bearer``),
the peer and ``/auth/verify`` with the same token (bench/hot.py), the same on the
``workers: auto`` gateway, the simulator's ``jscode2session`` alone and ``POST
/auth/login`` through the gateway (a distinct code per request, from a wrk Lua script). Redis
commands per request come from ``INFO commandstats`` deltas around each gateway run, CPU from
``/proc`` for each process of each server. Then measures memory at 10,000 idle keep-alive
connections (bench/connections.py). Prints the release's rows in one table (rps, p50, p99,
errors, Redis commands per request, CPU, requests per CPU-second; ``-`` for a row not measured),
each figure against its target, and the memory per process, and records them in
bench/RESULTS.md (newest run first; not for ``--quick`` unless ``--results`` is given). nginx and wrk are installed with apt-get when
missing (``--no-install`` to refuse). Linux only (``/proc``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import resource
import secrets
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (APPID, ROOT, SECRET, Stack, free_port, gateway_config,  # noqa: E402
                     install_tools, login, run_main, stop_on_sigterm, tool_version,
                     workers_arg)
from harness import nginx_proxy_conf, nginx_upstream_conf  # noqa: E402
import hot  # noqa: E402
from connections import (CONNECTIONS, MemoryRow, max_connections_for,  # noqa: E402
                         memory_step, raise_nofile, render_memory, tree_cpu)
from edge import CACHE_1S, NO_CACHE, edge_proxies  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"

# wrk Lua: one login per request, each with a code never used before (prefix, thread, counter).
LOGIN_LUA = """\
local threads = {}
function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end
function init(args)
  prefix, mode, appid, secret = args[1], args[2], args[3], args[4]
  n = 0
end
function request()
  n = n + 1
  local code = prefix .. "-" .. (tid or 0) .. "-" .. n
  if mode == "gateway" then
    return wrk.format("POST", "/auth/login", {["Content-Type"] = "application/json"},
                      '{"code":"' .. code .. '"}')
  end
  return wrk.format("GET", "/sns/jscode2session?appid=" .. appid .. "&secret=" .. secret ..
                    "&js_code=" .. code .. "&grant_type=authorization_code")
end
"""


# --- wrk -----------------------------------------------------------------------------------------


@dataclass
class WrkResult:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    non2xx: int
    socket_errors: int
    wall: float
    client_cpu: float  # wrk's user + system CPU seconds


_TIME_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(value: str, unit: str) -> float:
    return float(value) * _TIME_UNITS[unit]


def parse_wrk(text: str) -> dict[str, Any]:
    """The figures of wrk's ``--latency`` report."""
    done = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h)", text)
    rps = re.search(r"Requests/sec:\s*([\d.]+)", text)
    if not done or not rps:
        raise RuntimeError(f"cannot parse wrk's output:\n{text}")
    pct = {p: _ms(v, u) for p, v, u in
           re.findall(r"^\s*(50|75|90|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", text, re.M)}
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                       text)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return {"requests": int(done.group(1)), "seconds": _ms(done.group(2), done.group(3)) / 1e3,
            "rps": float(rps.group(1)), "p50_ms": pct.get("50", float("nan")),
            "p99_ms": pct.get("99", float("nan")),
            "non2xx": int(non2xx.group(1)) if non2xx else 0,
            "socket_errors": sum(int(g) for g in errors.groups()) if errors else 0}


def run_wrk(wrk: str, url: str, args: argparse.Namespace, seconds: float,
            headers: list[str] = [], script: Path | None = None,
            script_args: list[str] = []) -> WrkResult:
    argv = [wrk, f"-t{args.threads}", f"-c{args.connections}", f"-d{seconds:g}s", "--latency",
            "--timeout", "2s"]
    for header in headers:
        argv += ["-H", header]
    if script is not None:
        argv += ["-s", str(script)]
    argv.append(url)
    if script_args:
        argv += ["--", *script_args]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip()}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return WrkResult(**parse_wrk(done.stdout), wall=wall, client_cpu=cpu)


# --- Redis ---------------------------------------------------------------------------------------


def commandstats(redis_url: str) -> dict[str, int]:
    """Calls per command so far (``INFO commandstats``), without INFO itself (our probe)."""
    import redis
    client = redis.Redis.from_url(redis_url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()
            if name != "cmdstat_info"}


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: n - before.get(k, 0) for k, n in after.items() if n - before.get(k, 0)}


# --- the run -------------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    url: str
    server_pid: int  # whose CPU is counted (with its children)
    headers: list[str] = field(default_factory=list)
    login_mode: str | None = None  # "gateway" or "simulator": the Lua login script
    redis: bool = False  # count Redis commands around the run
    more_pids: list[int] = field(default_factory=list)  # other servers it needs (their trees)


@dataclass
class Row:
    target: Target
    result: WrkResult
    server_cpu: float  # CPU seconds of the server process tree during the run
    redis_calls: dict[str, int] | None
    # CPU seconds of each process of those trees, by (pid, role): how the load was spread
    per_process: dict[tuple[int, str], float] = field(default_factory=dict)
    rps_seen: list[float] = field(default_factory=list)  # every round's, with --rounds

    @property
    def per_cpu_second(self) -> float | None:
        """Requests per CPU-second of the server's own processes: wrk and the upstream share
        the cores, so this, not rps, says what one more core would buy."""
        return self.result.requests / self.server_cpu if self.server_cpu > 0 else None


def measure(target: Target, wrk: str, args: argparse.Namespace, script: Path,
            redis_url: str) -> Row:
    pids = [target.server_pid, *target.more_pids]

    def cpu_now() -> dict[tuple[int, str], float]:
        return {k: v for pid in pids for k, v in tree_cpu(pid).items()}

    def once(seconds: float, phase: str) -> tuple[WrkResult, dict[tuple[int, str], float],
                                                  dict[str, int] | None]:
        script_args = []
        if target.login_mode:
            script_args = [f"{target.login_mode}-{phase}-{secrets.token_hex(4)}",
                           target.login_mode, APPID, SECRET]
        stats = commandstats(redis_url) if target.redis else None
        cpu = cpu_now()
        result = run_wrk(wrk, target.url, args, seconds, target.headers,
                         script if target.login_mode else None, script_args)
        cpu = {k: v - cpu.get(k, 0.0) for k, v in cpu_now().items()}
        calls = delta(stats, commandstats(redis_url)) if stats is not None else None
        return result, cpu, calls

    if args.warmup > 0:
        once(args.warmup, "warmup")
    result, cpu, calls = once(args.duration, "run")
    return Row(target, result, sum(cpu.values()), calls, cpu)


def check(url: str, headers: list[str] = []) -> None:
    """One request before the runs: 200 with the upstream's body, else stop here."""
    request = urllib.request.Request(url, headers=dict(h.split(": ", 1) for h in headers))
    with urllib.request.urlopen(request, timeout=10) as resp:
        body = resp.read()
    if resp.status != 200 or body != b"ok\n":
        raise RuntimeError(f"{url}: HTTP {resp.status} {body[:100]!r}, expected 200 'ok'")


def git(*argv: str) -> str:
    try:
        done = subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


# --- the table ----------------------------------------------------------------------------------

# The release's rows, in this order (the order they are measured in, and printed); a run's row
# is matched by its target's name, and a row this run did not measure prints "-". Rows by other
# names follow, in the order added. A target served by several servers (nginx in front of the
# gateway) lists the others in ``Target.more_pids``: their CPU counts too.
ROWS = [
    "nginx proxy",                     # nginx as a plain reverse proxy: the limit
    hot.PEER,                          # an aiohttp app + one ClientSession: what one would write
    "gateway public",
    "gateway required",                # one process unless --workers
    hot.VERIFY,
    NO_CACHE,                          # nginx auth_request to /auth/verify on every request
    CACHE_1S,                          # the same, nginx caching the decision per token
    "gateway required, workers auto",
    "simulator jscode2session",
    "gateway login",
]
WORKERS_AUTO = "gateway required, workers auto"


def _rps(by: dict[str, Row], name: str) -> float | None:
    row = by.get(name)
    return row.result.rps if row is not None and row.result.rps else None


def _over(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or not b else a / b


def _per_cpu(by: dict[str, Row], name: str) -> float | None:
    row = by.get(name)
    return row.per_cpu_second if row is not None else None


def _p99_added(by: dict[str, Row]) -> float | None:
    gateway, nginx = by.get("gateway required"), by.get("nginx proxy")
    return None if gateway is None or nginx is None else \
        gateway.result.p99_ms - nginx.result.p99_ms


def _redis_per_request(by: dict[str, Row]) -> float | None:
    row = by.get("gateway required")
    if row is None or row.redis_calls is None:
        return None
    return sum(row.redis_calls.values()) / max(row.result.requests, 1)


@dataclass(frozen=True)
class Goal:
    label: str
    value: Any  # Callable[[dict[str, Row]], float | None]
    at_least: float | None = None
    at_most: float | None = None
    digits: int = 2

    def cells(self, by: dict[str, Row]) -> list[str]:
        value = self.value(by)
        target = (f">= {self.at_least:g}" if self.at_least is not None else
                  f"<= {self.at_most:g}" if self.at_most is not None else "")
        if value is None:
            return [self.label, "-", target, ""]
        met = ((self.at_least is None or value >= self.at_least)
               and (self.at_most is None or value <= self.at_most))
        return [self.label, f"{value:,.{self.digits}f}", target,
                ("met" if met else "**missed**") if target else ""]


GOALS = [
    Goal("gateway required / peer (rps)",
         lambda by: _over(_rps(by, "gateway required"), _rps(by, hot.PEER)), at_least=1.0),
    Goal("p99 added over nginx proxy, gateway required (ms)", _p99_added, at_most=3.0),
    Goal("auth tax: gateway required / gateway public (rps)",
         lambda by: _over(_rps(by, "gateway required"), _rps(by, "gateway public")),
         at_least=0.95),
    Goal("Redis commands per authenticated request", _redis_per_request, at_most=0.01,
         digits=3),
    Goal("gateway /auth/verify / gateway required (rps)",
         lambda by: _over(_rps(by, hot.VERIFY), _rps(by, "gateway required")),
         at_least=2.0),
    Goal("edge, no cache / nginx proxy (rps)",
         lambda by: _over(_rps(by, NO_CACHE), _rps(by, "nginx proxy")), at_least=0.2),
    Goal("edge, 1 s cache / nginx proxy (rps)",
         lambda by: _over(_rps(by, CACHE_1S), _rps(by, "nginx proxy")), at_least=0.7),
    Goal("gateway required / nginx proxy (rps)",
         lambda by: _over(_rps(by, "gateway required"), _rps(by, "nginx proxy"))),
    Goal("workers auto / one process (rps)",
         lambda by: _over(_rps(by, WORKERS_AUTO), _rps(by, "gateway required"))),
    Goal("workers auto / one process (requests per CPU-second)",
         lambda by: _over(_per_cpu(by, WORKERS_AUTO), _per_cpu(by, "gateway required"))),
    Goal("gateway required / nginx proxy (requests per CPU-second)",
         lambda by: _over(_per_cpu(by, "gateway required"), _per_cpu(by, "nginx proxy"))),
    Goal("workers auto / nginx proxy (requests per CPU-second)",
         lambda by: _over(_per_cpu(by, WORKERS_AUTO), _per_cpu(by, "nginx proxy"))),
    Goal("logins/s through the gateway", lambda by: _rps(by, "gateway login"), digits=0),
]


def _spread(row: Row) -> str:
    """Each process's share of the row's wall time: whether SO_REUSEPORT spread the load."""
    wall = row.result.wall or 1
    return ", ".join(f"{role} {100 * cpu / wall:.0f}%" for (_, role), cpu in
                     sorted(row.per_process.items()))


def render(rows: list[Row], args: argparse.Namespace, meta: dict[str, str],
           memory: list[MemoryRow] = []) -> list[str]:
    by = {r.target.name: r for r in rows}
    lines = [f"- date: {meta['date']}; commit: {meta['commit']}; cores (os.cpu_count()): "
             f"{os.cpu_count()}",
             f"- wrk `-t{args.threads} -c{args.connections} -d{args.duration:g}s --latency` "
             f"after a {args.warmup:g}s warm-up per target; {meta['wrk']}; {meta['nginx']} "
             f"({args.nginx_workers} worker(s) per nginx); gateway workers: "
             f"{args.workers or 'not set (one process)'}; Python {sys.version.split()[0]}"
             + (f"; median of {args.rounds} rounds" if args.rounds > 1 else ""),
             "",
             "| target | rps | p50 ms | p99 ms | errors | Redis cmds/req | server CPU | "
             "req/CPU-s | wrk CPU |",
             "|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for name in [*ROWS, *(r.target.name for r in rows if r.target.name not in ROWS)]:
        r = by.get(name)
        if r is None:
            lines.append(f"| {name} | - | - | - | - | - | - | - | - |")
            continue
        res = r.result
        cmds = "-" if r.redis_calls is None else \
            f"{sum(r.redis_calls.values()) / max(res.requests, 1):.2f}"
        per_cpu = "-" if r.per_cpu_second is None else f"{r.per_cpu_second:,.0f}"
        lines.append(
            f"| {name} | {res.rps:,.0f} | {res.p50_ms:.2f} | {res.p99_ms:.2f} | "
            f"{res.non2xx + res.socket_errors} | {cmds} | "
            f"{100 * r.server_cpu / res.wall:.0f}% | {per_cpu} | "
            f"{100 * res.client_cpu / res.wall:.0f}% |")
    lines += ["", "| figure | value | target | |", "|---|--:|--:|---|"]
    lines += ["| " + " | ".join(g.cells(by)) + " |" for g in GOALS]
    lines.append("")
    required = by.get("gateway required")
    if required is not None and required.redis_calls is not None:
        n = max(required.result.requests, 1)
        detail = ", ".join(f"{k.upper()} {v / n:.3f} ({v:,})" for k, v in
                           sorted(required.redis_calls.items(), key=lambda kv: -kv[1]))
        lines.append(f"- Redis commands during the gateway required run: {detail or 'none'} "
                     f"(`INFO commandstats` delta over {required.result.requests:,} requests)")
    sim = by.get("simulator jscode2session")
    if sim is not None:
        lines.append(f"- the simulator alone answers {sim.result.rps:,.0f} jscode2session/s: "
                     f"the most logins/s could be")
    seen = [f"{r.target.name} {min(r.rps_seen):,.0f}–{max(r.rps_seen):,.0f}" for r in rows
            if len(r.rps_seen) > 1]
    if seen:
        lines.append(f"- rps over the rounds, lowest–highest: {'; '.join(seen)}")
    spread = [f"{r.target.name}: {_spread(r)}" for r in rows if len(r.per_process) > 1]
    if spread:
        lines.append(f"- CPU per process, % of one core: {'; '.join(spread)}")
    lines += hot.cpu_lines(by)
    bad = [r.target.name for r in rows if r.result.non2xx + r.result.socket_errors]
    if bad:
        lines.append(f"- WARNING: errors (non-2xx responses or socket errors) in: "
                     f"{', '.join(bad)}; their rps are not comparable")
    lines.append("- errors: non-2xx responses + socket errors; server CPU: the target's process "
                 "tree (gateway and its workers, nginx proxy master + workers, simulator), % of "
                 "one core; req/CPU-s: requests ÷ those CPU seconds; wrk CPU: the client's")
    if memory:
        n = max(m.connections for m in memory)
        lines += ["", f"Memory at {n:,} idle keep-alive connections (each made one "
                  f"`GET /api/bench`, the gateway's with the token; the gateway with "
                  f"`max_connections: {max_connections_for(n)}`):", "", *render_memory(memory)]
    return lines


def write_results(path: Path, lines: list[str], meta: dict[str, str], quick: bool) -> None:
    title = "# Benchmark results\n\nWritten by `bench/run.py` (see bench/README.md), newest " \
            "run first.\n"
    section = "\n".join([f"## {meta['date']} · {meta['commit']}" + (" · quick" if quick else ""),
                         "", *lines, ""])
    old = path.read_text() if path.exists() else ""
    runs = old[old.index("\n## ") + 1:] if "\n## " in old else ""
    path.write_text(f"{title}\n{section}\n{runs}".rstrip() + "\n")


def median(rounds: list[Row]) -> Row:
    """The round with the median rps (the higher of two middles), carrying every round's rps.
    Rounds go through all targets in turn, so outside load that comes and goes touches each
    target alike instead of skewing the one measured while it lasted."""
    ranked = sorted(rounds, key=lambda r: r.result.rps)
    chosen = ranked[len(ranked) // 2]
    chosen.rps_seen = [r.result.rps for r in rounds]
    return chosen


def workers_auto_target(stack: Stack, args: argparse.Namespace, redis_url: str,
                        simulator_port: int, upstream_port: int, bearer: list[str]) -> Target:
    """A second gateway, `workers: auto` (one worker per core, SO_REUSEPORT), for the
    auth: required route."""
    port = free_port()
    try:
        gateway = stack.gateway("gateway-auto", gateway_config(
            port, redis_url, f"http://127.0.0.1:{simulator_port}",
            f"http://127.0.0.1:{upstream_port}", "auto"))
    except RuntimeError as exc:
        raise SystemExit(f"the workers: auto gateway did not start: {exc}")
    return Target(WORKERS_AUTO, f"http://127.0.0.1:{port}/api/bench", gateway.pid, bearer,
                  redis=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-t", "--threads", type=int, default=1, help="wrk threads [1]")
    parser.add_argument("-c", "--connections", type=int, default=32,
                        help="wrk connections [32]")
    parser.add_argument("-d", "--duration", type=float,
                        help="seconds measured per target [10; 2 with --quick]")
    parser.add_argument("--warmup", type=float,
                        help="seconds of warm-up per target, not measured [3; 1 with --quick]")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: short durations; RESULTS.md untouched unless --results")
    parser.add_argument("--workers", type=workers_arg,
                        help="write `workers: N` (or auto) into the gateway's config; only for "
                             "a gateway that knows the key")
    parser.add_argument("--nginx-workers", type=workers_arg, default=str(os.cpu_count() or 1),
                        help="worker_processes of each nginx [one per core]")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every target this many times, in turn; report the "
                             "median-rps round of each [1]")
    parser.add_argument("--no-login", action="store_true", help="skip the login benchmark")
    parser.add_argument("--no-workers-auto", action="store_true",
                        help="skip the second gateway, `workers: auto`")
    parser.add_argument("--hold", type=int,
                        help=f"idle keep-alive connections for the memory figures "
                             f"[{CONNECTIONS:,}; 1,000 with --quick; 0: skip]")
    parser.add_argument("--no-install", action="store_true",
                        help="never apt-get nginx or wrk; fail if missing")
    parser.add_argument("--results", type=Path,
                        help=f"markdown file the table goes to [{RESULTS.relative_to(ROOT)}; "
                             "none with --quick]")
    parser.add_argument("--no-results", action="store_true", help="write no results file")
    args = parser.parse_args()
    if args.duration is None:
        args.duration = 2 if args.quick else 10
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    if args.hold is None:
        args.hold = 1000 if args.quick else CONNECTIONS
    if args.duration < 1 or args.warmup < 0 or args.threads < 1 \
            or args.connections < args.threads or args.hold < 0 \
            or args.rounds < 1:
        parser.error("need --duration >= 1, --warmup >= 0, 1 <= --threads <= --connections, "
                     "--hold >= 0, --rounds >= 1")
    results = None if args.no_results else (args.results or (None if args.quick else RESULTS))
    if not Path("/proc/self/stat").exists():
        print("bench/run.py needs Linux (/proc)", file=sys.stderr)
        return 2

    if args.hold:
        held = raise_nofile(args.hold)
        if held < args.hold:
            print(f"open-file limit: holding {held:,} connections, not {args.hold:,} (raise the "
                  f"hard limit: ulimit -Hn)", file=sys.stderr)
            args.hold = held
    tools = install_tools(["nginx", "wrk"], install=not args.no_install)
    nginx, wrk = tools["nginx"], tools["wrk"]
    stop_on_sigterm()
    meta = {"date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            "commit": (git("rev-parse", "--short", "HEAD") or "unknown")
            + (" + uncommitted changes in gateway/" if git("status", "--porcelain", "--",
                                                            "gateway") else ""),
            "nginx": tool_version([nginx, "-v"]).replace("nginx version: ", ""),
            "wrk": " ".join(tool_version([wrk, "--version"]).split()[:2])}
    started = time.monotonic()
    with Stack() as stack:
        redis = stack.start_redis()
        upstream_port, proxy_port, simulator_port, gateway_port = (free_port() for _ in range(4))
        workers = args.nginx_workers
        stack.nginx("upstream", nginx,
                    lambda p: nginx_upstream_conf(p, upstream_port, workers), upstream_port)
        proxy = stack.nginx("nginx-proxy", nginx,
                            lambda p: nginx_proxy_conf(p, proxy_port, upstream_port, workers),
                            proxy_port)
        stack.helpers(simulator_port)
        helpers = stack.procs[-1]
        try:
            gateway = stack.gateway("gateway", gateway_config(
                gateway_port, redis.url, f"http://127.0.0.1:{simulator_port}",
                f"http://127.0.0.1:{upstream_port}", args.workers))
        except RuntimeError as exc:
            raise SystemExit(f"gateway did not start: {exc}")
        base = f"http://127.0.0.1:{gateway_port}"
        token = login(base, f"bench-user-{secrets.token_hex(4)}")
        bearer = [f"Authorization: Bearer {token}"]

        nginx_url = f"http://127.0.0.1:{proxy_port}/api/bench"
        peer_url, peer_pid = hot.start_peer(stack, upstream_port)
        targets = [Target("nginx proxy", nginx_url, proxy.pid),
                   Target("gateway public", f"{base}/public/bench", gateway.pid, redis=True),
                   Target("gateway required", f"{base}/api/bench", gateway.pid, bearer,
                          redis=True),
                   Target(hot.PEER, peer_url, peer_pid),
                   Target(hot.VERIFY, f"{base}/auth/verify", gateway.pid, bearer, redis=True)]
        edges = edge_proxies(stack, nginx, workers, gateway_port, upstream_port)
        # an edge row's servers: its nginx and the gateway answering it
        targets += [Target(name, url, proc.pid, bearer, redis=True, more_pids=[gateway.pid])
                    for name, (url, proc) in edges.items()]
        if not args.no_workers_auto and args.workers != "auto":
            targets.append(workers_auto_target(stack, args, redis.url, simulator_port,
                                               upstream_port, bearer))
        if not args.no_login:
            targets += [Target("simulator jscode2session", f"http://127.0.0.1:{simulator_port}/",
                               helpers.pid, login_mode="simulator"),
                        Target("gateway login", f"{base}/", gateway.pid, login_mode="gateway",
                               redis=True)]
        # Measured in the table's order, whatever order they were added in: each row then
        # follows the same neighbours (warm caches, Redis state) in every run.
        targets.sort(key=lambda t: ROWS.index(t.name) if t.name in ROWS else len(ROWS))
        for t in targets:
            if t.login_mode is None and t.name != hot.VERIFY:  # JSON: check_verify's
                check(t.url, t.headers)
        hot.check_verify(f"{base}/auth/verify", bearer)
        script = stack.dir / "login.lua"
        script.write_text(LOGIN_LUA)
        print(f"wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s, "
              f"{args.warmup:g}s warm-up, {len(targets)} targets, {os.cpu_count()} cores",
              flush=True)
        runs: dict[str, list[Row]] = {t.name: [] for t in targets}
        for n in range(args.rounds):
            if args.rounds > 1:
                print(f"round {n + 1} of {args.rounds}", flush=True)
            for t in targets:
                row = measure(t, wrk, args, script, redis.url)
                runs[t.name].append(row)
                print(f"  {t.name:26} {row.result.rps:10,.0f} rps", flush=True)
        rows = [median(runs[t.name]) for t in targets]
        if gateway.poll() is not None:
            print(stack.log_tail("gateway"), file=sys.stderr)
            raise SystemExit("the gateway exited during the run")
        memory = []
        if args.hold:
            print(f"memory at {args.hold:,} idle connections ...", flush=True)
            memory = memory_step(stack, nginx, args.hold, args.workers, args.nginx_workers)

    lines = render(rows, args, meta, memory)
    print()
    print("\n".join(lines))
    print(f"\n(total {time.monotonic() - started:.0f}s)")
    if results is not None:
        write_results(results, lines, meta, args.quick)
        print(f"written to {results}")
    return 1 if any(r.result.non2xx + r.result.socket_errors for r in rows) else 0


if __name__ == "__main__":
    run_main(main)
