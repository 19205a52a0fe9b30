#!/usr/bin/env python3
"""Revocation across replicas: how long a token logged out on gateway A still works on B.

    .venv/bin/python bench/revocation.py [--trials 200] [--timeout 2] [--workers N]

Starts, all on loopback ports (everything is stopped at the end, whatever happens): a real
``redis-server`` (``gateway.testing.embedded.EmbeddedRedis``), the WeChat simulator and an aiohttp
upstream answering ``200 ok`` (one helper process), and TWO gateways (``python -m gateway``,
the same configuration but for ``listen``) sharing that Redis, with an ``/api/`` route
(auth: required) to the upstream.

Each trial: log in through A with a fresh code; warm B with a few authenticated requests (so a
session cache, if B has one, holds the token); ``POST /auth/logout`` on A; then request
``/api/...`` on B with the token, back to back, until B answers 401. The delay is from A's 204
to B's first 401 (each poll is a full request, so the floor is one round trip; ``polls`` counts
how many B still answered 200). A trial whose token B still accepts ``--timeout`` seconds
after the logout is a failure. Prints p50/p99/max over the trials.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import secrets
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (Stack, free_port, gateway_config, run_loop, run_main,  # noqa: E402
                     stop_on_sigterm, workers_arg)


@dataclass
class Trial:
    delay_ms: float | None  # A's 204 → B's first 401; None: failed
    since_sent_ms: float | None  # logout sent on A → B's first 401
    logout_ms: float  # the logout round trip on A
    polls_accepted: int  # B's 200s after the logout was acknowledged
    error: str | None = None


def percentile(values: list[float], p: float) -> float:
    """Nearest rank: the smallest value with at least p % of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


async def one_trial(http: Any, a: str, b: str, n: int, warm: int, timeout: float,
                    rtts: list[float]) -> Trial:
    async with http.post(f"{a}/auth/login",
                         json={"code": f"revoke-{secrets.token_hex(4)}-{n}"}) as resp:
        if resp.status != 200:
            return Trial(None, None, 0, 0, f"login on A: HTTP {resp.status}")
        token = (await resp.json())["token"]
    headers = {"Authorization": f"Bearer {token}"}
    url = f"{b}/api/revocation/{n}"
    for _ in range(warm):
        started = time.perf_counter()
        async with http.get(url, headers=headers) as resp:
            await resp.read()
            if resp.status != 200:
                return Trial(None, None, 0, 0, f"warming B: HTTP {resp.status}")
        rtts.append((time.perf_counter() - started) * 1000)
    sent = time.perf_counter()
    async with http.post(f"{a}/auth/logout", headers=headers) as resp:
        await resp.read()
        if resp.status != 204:
            return Trial(None, None, 0, 0, f"logout on A: HTTP {resp.status}")
    acked = time.perf_counter()
    accepted = 0
    while True:
        async with http.get(url, headers=headers) as resp:
            await resp.read()
            now = time.perf_counter()
            if resp.status == 401:
                return Trial((now - acked) * 1000, (now - sent) * 1000, (acked - sent) * 1000,
                             accepted)
            if resp.status != 200:
                return Trial(None, None, (acked - sent) * 1000, accepted,
                             f"polling B: HTTP {resp.status}")
        accepted += 1
        if now - acked > timeout:
            return Trial(None, None, (acked - sent) * 1000, accepted,
                         f"B still accepts the token {timeout:g}s after the logout")


async def run_trials(a: str, b: str, trials: int, warm: int, timeout: float) -> tuple[
        list[Trial], list[float]]:
    import aiohttp
    results: list[Trial] = []
    rtts: list[float] = []
    client_timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=client_timeout) as http:
        for n in range(trials):
            try:
                trial = await one_trial(http, a, b, n, warm, timeout, rtts)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                trial = Trial(None, None, 0, 0, f"{type(exc).__name__}: {exc}"[:120])
            results.append(trial)
            if trial.error and sum(1 for t in results if t.error) == 1:
                print(f"  trial {n}: {trial.error}", flush=True)
            if (n + 1) % 50 == 0:
                print(f"  {n + 1}/{trials} trials", flush=True)
    return results, rtts


def report(results: list[Trial], rtts: list[float], args: argparse.Namespace) -> list[str]:
    ok = [t for t in results if t.delay_ms is not None]
    failed = [t for t in results if t.delay_ms is None]
    lines = [f"revocation across replicas: {len(results)} trials, {len(ok)} rejected by B, "
             f"{len(failed)} failed (B polled back to back for up to {args.timeout:g}s after "
             f"A's logout; gateway workers: {args.workers or 'not set'})"]
    if ok:
        def row(name: str, values: list[float]) -> str:
            return (f"  {name:34} p50 {percentile(values, 50):7.2f} ms   "
                    f"p99 {percentile(values, 99):7.2f} ms   max {max(values):7.2f} ms")
        lines += [row("A's 204 → B's first 401", [t.delay_ms for t in ok if t.delay_ms]),
                  row("logout sent on A → B's first 401",
                      [t.since_sent_ms for t in ok if t.since_sent_ms]),
                  row("logout round trip on A", [t.logout_ms for t in ok])]
        first = sum(1 for t in ok if t.polls_accepted == 0)
        lines.append(f"  B's first request after the logout was already refused in "
                     f"{first}/{len(ok)} trials; most 200s B still gave: "
                     f"{max(t.polls_accepted for t in ok)}")
    if rtts:
        lines.append(f"  (one authenticated request to B, warm: p50 {statistics.median(rtts):.2f} "
                     f"ms, p99 {percentile(rtts, 99):.2f} ms: the resolution of this "
                     f"measurement)")
    for error in sorted({t.error for t in failed if t.error}):
        lines.append(f"  failure: {error} ({sum(1 for t in failed if t.error == error)}x)")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=200, help="logouts measured [200]")
    parser.add_argument("--timeout", type=float, default=2,
                        help="seconds B may keep accepting a logged-out token before the trial "
                             "counts as failed [2]")
    parser.add_argument("--warm", type=int, default=3,
                        help="authenticated requests to B before each logout [3]")
    parser.add_argument("--workers", type=workers_arg,
                        help="write `workers: N` (or auto) into both gateways' configs; only "
                             "for a gateway that knows the key")
    args = parser.parse_args()
    if args.trials < 1 or args.timeout <= 0 or args.warm < 0:
        parser.error("need --trials >= 1, --timeout > 0, --warm >= 0")

    stop_on_sigterm()
    with Stack(prefix="wxgw-revocation-") as stack:
        redis = stack.start_redis()
        simulator_port, upstream_port, port_a, port_b = (free_port() for _ in range(4))
        stack.helpers(simulator_port, upstream_port)
        for name, port in (("gateway-a", port_a), ("gateway-b", port_b)):
            try:
                stack.gateway(name, gateway_config(
                    port, redis.url, f"http://127.0.0.1:{simulator_port}",
                    f"http://127.0.0.1:{upstream_port}", args.workers))
            except RuntimeError as exc:
                raise SystemExit(f"{name} did not start: {exc}")
        print(f"gateway A on :{port_a}, B on :{port_b}, one Redis; {args.trials} trials",
              flush=True)
        results, rtts = run_loop(run_trials(f"http://127.0.0.1:{port_a}",
                                            f"http://127.0.0.1:{port_b}", args.trials,
                                            args.warm, args.timeout))
    print()
    print("\n".join(report(results, rtts, args)))
    return 1 if any(t.delay_ms is None for t in results) else 0


if __name__ == "__main__":
    run_main(main)
