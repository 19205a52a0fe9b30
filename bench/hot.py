"""bench/run.py's rows for the one-process hot path: the peer (bench/peer.py, the proxy a
Python developer would write) and ``/auth/verify`` straight at the gateway, with their ratios.

Kept apart from run.py so the rows other benchmarks add merge without touching these."""

from __future__ import annotations

import json
import sys
import urllib.request
from typing import Any

from harness import BENCH, ROOT, Stack, free_port

PEER = "peer (aiohttp proxy)"
VERIFY = "gateway /auth/verify"


def start_peer(stack: Stack, upstream_port: int) -> tuple[str, int]:
    """bench/peer.py in front of the upstream: its URL for ``GET /api/bench`` and its pid."""
    port = free_port()
    proc = stack.spawn("peer", [sys.executable, str(BENCH / "peer.py"), "--port", str(port),
                                "--upstream", f"http://127.0.0.1:{upstream_port}"], port,
                       cwd=ROOT)
    return f"http://127.0.0.1:{port}/api/bench", proc.pid


def check_verify(url: str, headers: list[str]) -> None:
    """One ``/auth/verify`` before the runs: 200, a JSON body and the openid header."""
    request = urllib.request.Request(url, headers=dict(h.split(": ", 1) for h in headers))
    with urllib.request.urlopen(request, timeout=10) as resp:
        body = json.load(resp)
        if resp.status != 200 or "openid" not in body or "X-WX-OpenID" not in resp.headers:
            raise RuntimeError(f"{url}: HTTP {resp.status} {body!r}, expected the identity")


def _rps(row: Any) -> float:
    return float(row.result.rps) if row is not None else 0.0


def _ratio(a: Any, b: Any) -> str:
    return f"{_rps(a) / _rps(b):.2f}" if a is not None and _rps(b) else "-"


def _per_request(row: Any) -> str:
    if row is None or row.redis_calls is None:
        return "-"
    return f"{sum(row.redis_calls.values()) / max(row.result.requests, 1):.3f}"


def _cpu_us(row: Any) -> float | None:
    """The server's CPU per request, in µs: unlike rps, barely moved by what else runs on
    the machine's cores at the time."""
    if row is None or not row.result.requests:
        return None
    return float(1e6 * row.server_cpu / row.result.requests)


def ratios(by: dict[str, Any]) -> list[str]:
    """The hot path's figures against the peer and nginx, from one run's rows by name."""
    nginx, peer = by.get("nginx proxy"), by.get(PEER)
    required, verify = by.get("gateway required"), by.get(VERIFY)
    added = (f"{required.result.p99_ms - nginx.result.p99_ms:.2f} ms"
             if required is not None and nginx is not None else "-")
    return [f"- **gateway_required / peer: {_ratio(required, peer)}** (rps; the peer: "
            f"bench/peer.py, one aiohttp ClientSession, no auth)",
            f"- **gateway /auth/verify / gateway_required: {_ratio(verify, required)}** (rps)",
            f"- **p99 added over nginx (gateway required): {added}**",
            f"- **Redis commands per request: required {_per_request(required)}, "
            f"/auth/verify {_per_request(verify)}**"] + cpu_lines(by)


def cpu_lines(by: dict[str, Any]) -> list[str]:
    names = ("nginx proxy", PEER, "gateway public", "gateway required", VERIFY)
    cpu = {name: _cpu_us(by.get(name)) for name in names}
    known = [f"{name} {us:.0f}" for name, us in cpu.items() if us is not None]
    if not known:
        return []
    peer, required = cpu[PEER], cpu["gateway required"]
    versus = (f"; **peer / gateway_required: {peer / required:.2f}** (the rps ratio when "
              f"neither waits for a core)" if peer and required else "")
    return [f"- server CPU per request, µs: {', '.join(known)}{versus}"]
