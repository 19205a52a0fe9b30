"""bench/run.py's table: the release's rows in one order whatever a run measured, and each
figure against its target. (The figures themselves come from running the benchmark, never
from a test.)"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import run as bench  # noqa: E402
from connections import Memory, MemoryRow  # noqa: E402

ARGS = argparse.Namespace(threads=1, connections=32, duration=10.0, warmup=3.0,
                          nginx_workers="2", workers=None, rounds=1)
META = {"date": "2026-01-01 00:00 UTC", "commit": "abc1234", "wrk": "wrk 4.1.0",
        "nginx": "nginx/1.22.1"}


def row(name: str, rps: float, p99: float, cpu: dict[tuple[int, str], float],
        redis: dict[str, int] | None = None) -> bench.Row:
    requests = int(rps * 10)
    result = bench.WrkResult(requests=requests, seconds=10.0, rps=rps, p50_ms=1.0, p99_ms=p99,
                             non2xx=0, socket_errors=0, wall=10.0, client_cpu=2.0)
    return bench.Row(bench.Target(name, "http://127.0.0.1:1/", 1), result,
                     sum(cpu.values()), redis, cpu)


def table_rows(lines: list[str]) -> list[list[str]]:
    start = next(i for i, line in enumerate(lines) if line.startswith("| target |"))
    end = lines.index("", start)
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[start + 2:end]]


def goals(lines: list[str]) -> dict[str, list[str]]:
    start = lines.index("| figure | value | target | |")
    end = lines.index("", start)
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[start + 2:end]]
    return {c[0]: c[1:] for c in cells}


def test_rows_come_in_the_release_order_with_a_dash_for_each_one_not_measured() -> None:
    rows = [row("gateway required", 6_000, 5.0, {(10, "process"): 8.0}, {"ping": 6}),
            row("a row of someone's own", 10, 1.0, {(12, "process"): 1.0}),
            row("nginx proxy", 40_000, 1.5, {(20, "master"): 0.0, (21, "worker"): 2.5,
                                             (22, "worker"): 2.5}),
            row("gateway public", 6_500, 4.0, {(10, "process"): 8.0})]
    table = table_rows(bench.render(rows, ARGS, META))
    names = [r[0] for r in table]
    assert names == [*bench.ROWS, "a row of someone's own"]
    by = {r[0]: r for r in table}
    assert by[bench.hot.PEER][1:] == ["-"] * 8
    assert by[bench.CACHE_1S][1:] == ["-"] * 8
    assert by["nginx proxy"][1] == "40,000"
    # 400,000 requests for 5 CPU-seconds of master + workers
    assert by["nginx proxy"][7] == "80,000"
    assert by["gateway required"][7] == "7,500"


def test_each_figure_is_set_against_its_target_and_missing_inputs_print_a_dash() -> None:
    rows = [row("nginx proxy", 40_000, 1.5, {(20, "worker"): 5.0}),
            row("gateway public", 6_500, 4.0, {(10, "process"): 8.0}),
            row("gateway required", 6_000, 5.0, {(10, "process"): 8.0}, {"ping": 6}),
            row(bench.WORKERS_AUTO, 9_000, 9.0, {(30, "supervisor"): 0.0,
                                                (31, "worker"): 6.0, (32, "worker"): 7.0})]
    lines = bench.render(rows, ARGS, META)
    got = goals(lines)
    assert got["gateway required / peer (rps)"] == ["-", ">= 1", ""]
    assert got["auth tax: gateway required / gateway public (rps)"] == \
        ["0.92", ">= 0.95", "**missed**"]
    assert got["p99 added over nginx proxy, gateway required (ms)"] == ["3.50", "<= 3",
                                                                        "**missed**"]
    assert got["Redis commands per authenticated request"] == ["0.000", "<= 0.01", "met"]
    assert got["workers auto / one process (rps)"] == ["1.50", "", ""]
    # 90,000 / 13 CPU-s against 60,000 / 8 CPU-s
    assert got["workers auto / one process (requests per CPU-second)"] == ["0.92", "", ""]
    assert got["gateway required / nginx proxy (requests per CPU-second)"] == ["0.09", "", ""]
    # how the workers shared the load is printed, supervisor included
    spread = next(line for line in lines if line.startswith("- CPU per process"))
    assert f"{bench.WORKERS_AUTO}: supervisor 0%, worker 60%, worker 70%" in spread


def test_memory_is_rendered_per_process_and_per_idle_connection() -> None:
    mib = 2**20
    gateway = MemoryRow("gateway", 10_000, 10_000, 3.0,
                        before=[Memory(1, "process", 60 * mib, 50 * mib)],
                        at=[Memory(1, "process", 160 * mib, 140 * mib)])
    nginx = MemoryRow("nginx proxy", 10_000, 9_990, 2.0,
                      before=[Memory(2, "master", 6 * mib, None)],
                      at=[Memory(2, "master", 6 * mib, None), Memory(3, "worker", 16 * mib, None)])
    lines = bench.render([], ARGS, META, [gateway, nginx])
    assert any("`max_connections: 11000`" in line for line in lines)
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
             for line in lines if line.startswith("| gateway |") or
             line.startswith("| nginx proxy |")}
    assert cells["gateway"][1:] == ["1", "10,000 of 10,000", "60.0", "160.0", "140.0",
                                    "process 160.0", "10.2 KiB"]
    # a process without smaps_rollup: no PSS total rather than a wrong one
    assert cells["nginx proxy"][2] == "9,990 of 10,000"
    assert cells["nginx proxy"][5] == "-"


def test_rounds_report_the_median_round_and_the_range_seen() -> None:
    rounds = [row("gateway required", rps, 5.0, {(10, "process"): 8.0})
              for rps in (7_000, 3_000, 6_000)]
    chosen = bench.median(rounds)
    assert chosen is rounds[2] and chosen.rps_seen == [7_000, 3_000, 6_000]
    lines = bench.render([chosen], ARGS, META)
    assert "- rps over the rounds, lowest–highest: gateway required 3,000–7,000" in lines
