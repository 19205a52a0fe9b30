#!/usr/bin/env python3
"""Memory at 10,000 idle keep-alive connections: the gateway's processes against nginx's.

    .venv/bin/python bench/connections.py [-n 10000] [--workers N|auto] [--no-install]

Starts (on loopback, all stopped at the end) nginx as the upstream, nginx as a plain proxy to
it, a ``redis-server``, the WeChat simulator and the gateway (``max_connections`` set above
``-n``: its default, 10,000, would refuse the last few), logs in once, then for the gateway and
for nginx: reads each server process's memory, opens ``-n`` connections that each make one
request (``GET /api/bench``, with the token for the gateway) and stay open idle, reads the
memory again, and closes them. Prints RSS (``VmRSS``) and PSS (``smaps_rollup``) per process
before and at ``-n`` connections, and the growth per connection. ``bench/run.py`` runs the same
step (``measure_memory``) at the end of its run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
import h11

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (Stack, children_of, free_port, gateway_config,  # noqa: E402
                     install_tools, login, nginx_proxy_conf, nginx_upstream_conf, run_loop,
                     run_main, stop_on_sigterm, workers_arg)

CONNECTIONS = 10_000
_PARALLEL = 256  # connections being opened at once: a burst of 10,000 SYNs overflows backlogs
_FD_MARGIN = 64


# --- memory of a process tree -------------------------------------------------------------------


@dataclass(frozen=True)
class Memory:
    pid: int
    role: str  # "master"/"worker" (nginx), "supervisor"/"worker" (workers: N), "process"
    rss: int  # bytes, VmRSS
    pss: int | None  # bytes, smaps_rollup's Pss (shared pages split between sharers); None if absent


def _kb_field(text: str, key: str) -> int | None:
    for line in text.splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return None


def memory_of(pid: int, role: str) -> Memory | None:
    proc = Path(f"/proc/{pid}")
    try:
        rss = _kb_field((proc / "status").read_text(), "VmRSS")
    except OSError:
        return None
    try:
        pss = _kb_field((proc / "smaps_rollup").read_text(), "Pss")
    except OSError:  # kernels before 4.14, or no permission
        pss = None
    return None if rss is None else Memory(pid, role, rss, pss)


def tree_roles(pid: int) -> list[tuple[int, str]]:
    """``pid`` and its descendants, parent first, each with its role: ``master``/``worker``
    (nginx retitles its processes), ``supervisor``/``worker`` (``workers: N``), ``process``."""
    found: list[tuple[int, str]] = []
    todo = [(pid, 0)]
    while todo:
        p, depth = todo.pop(0)
        children = sorted(children_of(p))
        try:
            title = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if title.startswith("nginx: "):
            role = title.split()[1]
        else:
            role = "worker" if depth else ("supervisor" if children else "process")
        found.append((p, role))
        todo.extend((c, depth + 1) for c in children)
    return found


def tree_memory(pid: int) -> list[Memory]:
    return [m for p, role in tree_roles(pid) if (m := memory_of(p, role)) is not None]


def tree_cpu(pid: int) -> dict[tuple[int, str], float]:
    """user + system CPU seconds of each process of ``pid``'s tree, by (pid, role)."""
    tick = os.sysconf("SC_CLK_TCK")
    found = {}
    for p, role in tree_roles(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        found[(p, role)] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return found


# --- the idle connections -----------------------------------------------------------------------


async def _one(host: str, port: int, target: str, headers: list[tuple[str, str]],
               sem: asyncio.Semaphore) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """One connection that has made one request (200 ``ok``) and is left open."""
    async with sem:
        reader, writer = await asyncio.open_connection(host, port)
        conn = h11.Connection(h11.CLIENT)
        writer.write(conn.send(h11.Request(method="GET", target=target,
                                           headers=[("Host", f"{host}:{port}"), *headers]))
                     + conn.send(h11.EndOfMessage()))
        status, body = 0, b""
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await asyncio.wait_for(reader.read(65536), 30))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                break
        if status != 200 or body != b"ok\n" or conn.their_state is not h11.DONE:
            writer.close()
            raise RuntimeError(f"HTTP {status} {body[:100]!r} (server {conn.their_state}), "
                               f"expected 200 'ok' on a kept-alive connection")
        return reader, writer


async def _hold(port: int, target: str, headers: list[str], n: int,
                pids: list[int]) -> tuple[list[Memory], int, float]:
    """Open ``n`` connections (one request each), then read the memory of ``pids``' trees and
    count the connections the server still holds open; close them all."""
    sem = asyncio.Semaphore(_PARALLEL)
    pairs = [(k, v) for k, _, v in (h.partition(": ") for h in headers)]
    started = time.monotonic()
    tasks = [asyncio.ensure_future(_one("127.0.0.1", port, target, pairs, sem))
             for _ in range(n)]
    try:
        held = await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        for d in done:
            if isinstance(d, tuple):
                d[1].close()
        raise
    opened = time.monotonic() - started
    try:
        await asyncio.sleep(1.0)  # let the server settle (per-connection timers, buffers)
        memory = [m for pid in pids for m in tree_memory(pid)]
        await asyncio.sleep(0.2)
        # A connection the server closed has read EOF by now: only open ones count.
        still_open = sum(1 for reader, _ in held if not reader.at_eof())
    finally:
        for _, writer in held:
            writer.close()
    return memory, still_open, opened


@dataclass
class MemoryRow:
    name: str  # "gateway" or "nginx proxy"
    connections: int  # asked for
    still_open: int  # held open by the server when the memory was read
    open_seconds: float
    before: list[Memory]
    at: list[Memory]

    @property
    def rss_before(self) -> int:
        return sum(m.rss for m in self.before)

    @property
    def rss_at(self) -> int:
        return sum(m.rss for m in self.at)

    @property
    def pss_at(self) -> int | None:
        return None if any(m.pss is None for m in self.at) else sum(m.pss or 0 for m in self.at)

    @property
    def per_connection(self) -> float:
        return (self.rss_at - self.rss_before) / max(self.connections, 1)


def measure_memory(name: str, pid: int, port: int, target: str, headers: list[str],
                   n: int) -> MemoryRow:
    """Memory of ``pid``'s process tree before and with ``n`` idle keep-alive connections
    that each made one ``GET target``."""
    run_loop(_hold(port, target, headers, 32, []))  # warm: first requests, upstream pool
    before = tree_memory(pid)
    at, still_open, opened = run_loop(_hold(port, target, headers, n, [pid]))
    return MemoryRow(name, n, still_open, opened, before, at)


def raise_nofile(n: int) -> int:
    """Raise this process's soft open-file limit for ``n`` client sockets (children started
    afterwards inherit it); the number of connections that fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n + _FD_MARGIN
    if hard != resource.RLIM_INFINITY:
        want = min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        soft = want
    return n if soft == resource.RLIM_INFINITY else min(n, soft - _FD_MARGIN)


def max_connections_for(n: int) -> int:
    """The gateway's ``max_connections`` for ``n`` held connections and a few probes."""
    return n + 1000


def nginx_conf_for(n: int, conf: str) -> str:
    """nginx's ``worker_connections`` raised so that ``n`` clients fit in any one worker (the
    kernel's SO_REUSEPORT hash does not split them evenly) with its upstream connections."""
    return conf.replace("worker_connections 4096;", f"worker_connections {2 * n + 1024};")


def render_memory(rows: list[MemoryRow]) -> list[str]:
    def mb(b: int | None) -> str:
        return "-" if b is None else f"{b / 2**20:.1f}"

    lines = ["| server | processes | connections held | RSS before MB | RSS at n MB | "
             "PSS at n MB | RSS per process at n MB | RSS growth per connection |",
             "|---|--:|--:|--:|--:|--:|---|--:|"]
    for r in rows:
        per = ", ".join(f"{m.role} {mb(m.rss)}" for m in r.at)
        lines.append(f"| {r.name} | {len(r.at)} | {r.still_open:,} of {r.connections:,} | "
                     f"{mb(r.rss_before)} | {mb(r.rss_at)} | {mb(r.pss_at)} | {per} | "
                     f"{r.per_connection / 1024:.1f} KiB |")
    return lines


# --- standalone ---------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--connections", type=int, default=CONNECTIONS,
                        help=f"idle keep-alive connections [{CONNECTIONS:,}]")
    parser.add_argument("--workers", type=workers_arg, help="the gateway's `workers:`")
    parser.add_argument("--nginx-workers", type=workers_arg, default=str(os.cpu_count() or 1),
                        help="worker_processes of each nginx [one per core]")
    parser.add_argument("--no-install", action="store_true", help="never apt-get nginx")
    args = parser.parse_args()
    if args.connections < 1:
        parser.error("need -n >= 1")
    if not Path("/proc/self/status").exists():
        print("bench/connections.py needs Linux (/proc)", file=sys.stderr)
        return 2
    n = raise_nofile(args.connections)
    if n < args.connections:
        print(f"open-file limit: {n:,} connections, not {args.connections:,} (raise the hard "
              f"limit: ulimit -Hn)", file=sys.stderr)
    nginx = install_tools(["nginx"], install=not args.no_install)["nginx"]
    stop_on_sigterm()
    with Stack(prefix="wxgw-conns-") as stack:
        rows = memory_step(stack, nginx, n, args.workers, args.nginx_workers)
    print("\n".join(render_memory(rows)))
    return 0 if all(r.still_open == r.connections for r in rows) else 1


def memory_step(stack: Stack, nginx: str, n: int, workers: str | None,
                nginx_workers: str) -> list[MemoryRow]:
    """Start an upstream, an nginx proxy, Redis, the simulator and a gateway of their own in
    ``stack``, and measure both at ``n`` idle connections."""
    redis = stack.redis or stack.start_redis()
    upstream_port, proxy_port, simulator_port, gateway_port = (free_port() for _ in range(4))
    stack.nginx("conns-upstream", nginx,
                lambda p: nginx_upstream_conf(p, upstream_port, nginx_workers), upstream_port)
    proxy = stack.nginx("conns-proxy", nginx, lambda p: nginx_conf_for(
        n, nginx_proxy_conf(p, proxy_port, upstream_port, nginx_workers)), proxy_port)
    stack.helpers(simulator_port)
    config = gateway_config(gateway_port, redis.url, f"http://127.0.0.1:{simulator_port}",
                            f"http://127.0.0.1:{upstream_port}", workers)
    config["max_connections"] = max_connections_for(n)
    gateway = stack.gateway("conns-gateway", config)
    token = login(f"http://127.0.0.1:{gateway_port}", f"conns-{secrets.token_hex(4)}")
    return [measure_memory("gateway", gateway.pid, gateway_port, "/api/bench",
                           [f"Authorization: Bearer {token}"], n),
            measure_memory("nginx proxy", proxy.pid, proxy_port, "/api/bench", [], n)]


if __name__ == "__main__":
    run_main(main)
