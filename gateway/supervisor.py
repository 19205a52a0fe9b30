"""``workers: N``: N gateway processes sharing the listening port (SO_REUSEPORT).

The supervisor listens on nothing itself. It starts the workers (each the ordinary
``python -m gateway`` with its own event loop), restarts one that dies, forwards SIGTERM and
SIGINT so every worker drains its own in-flight requests, and exits 0 once all have. Metrics
are aggregated across workers through prometheus-client's multiprocess mode.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from types import FrameType

from . import loader
from . import logs
from .errors import ConfigError

log = logging.getLogger("gateway.supervisor")
WORKER_ENV = "WXGW_WORKER"
ADMIN_ENV = "WXGW_ADMIN"  # set for the one worker (slot 0) that serves admin.listen
METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"
_STARTUP = 3.0  # a worker that dies this soon after starting is a configuration problem


def is_worker() -> bool:
    return os.environ.get(WORKER_ENV) == "1"


def serves_admin() -> bool:
    """Whether this process binds ``admin.listen``: the only process, or worker 0 (a port
    has one owner: SO_REUSEPORT would split admin calls between workers, and each worker
    binding it alone would fail)."""
    return not is_worker() or os.environ.get(ADMIN_ENV) == "1"


def supervise(config_path: str, workers: int, grace: float) -> int:
    metrics_dir = tempfile.mkdtemp(prefix="wxgw-metrics-")
    env = {**os.environ, WORKER_ENV: "1", METRICS_ENV: metrics_dir}
    command = [sys.executable, "-m", "gateway", "--config", config_path]
    stopping = False
    procs: dict[int, tuple[subprocess.Popen[bytes], float]] = {}

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    def reload(signum: int, frame: FrameType | None) -> None:
        try:  # the supervisor's own log format follows the file too
            logs.setup(loader.load(config_path).logging)
        except ConfigError:
            pass  # each worker logs the problems when it refuses the file
        _forward(procs, signal.SIGHUP)

    signal.signal(signal.SIGHUP, reload)
    try:
        for slot in range(workers):
            procs[slot] = (_spawn(command, _slot_env(env, slot)), time.monotonic())
        log.info("started %d workers", workers)
        while not stopping:
            time.sleep(0.2)
            for slot, (proc, started) in list(procs.items()):
                code = proc.poll()
                if code is None or stopping:
                    continue
                if time.monotonic() - started < _STARTUP:
                    log.error("worker %d exited with %d at start-up; stopping", slot, code)
                    _terminate(procs, grace)
                    return code or 1
                log.warning("worker %d (pid %d) exited with %d; restarting", slot, proc.pid,
                            code)
                procs[slot] = (_spawn(command, _slot_env(env, slot)), time.monotonic())
        log.info("stopping %d workers", len(procs))
        return _terminate(procs, grace)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _slot_env(env: dict[str, str], slot: int) -> dict[str, str]:
    others = {k: v for k, v in env.items() if k != ADMIN_ENV}
    return {**others, ADMIN_ENV: "1"} if slot == 0 else others


def _forward(procs: dict[int, tuple[subprocess.Popen[bytes], float]], sig: int) -> None:
    for proc, _ in procs.values():
        if proc.poll() is None:
            proc.send_signal(sig)


def _spawn(command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    # Own session: a terminal's Ctrl+C or a group-wide signal reaches the supervisor only,
    # which forwards exactly one SIGTERM. PDEATHSIG: no orphan outlives a killed supervisor.
    return subprocess.Popen(command, env=env, start_new_session=True,
                            preexec_fn=die_with_parent)


def _terminate(procs: dict[int, tuple[subprocess.Popen[bytes], float]], grace: float) -> int:
    for proc, _ in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace + 5
    worst = 0
    for proc, _ in procs.values():
        try:
            code = proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        worst = worst or code
    return worst


def die_with_parent() -> None:
    """``preexec_fn`` for subprocess: the child gets SIGTERM when its parent dies (Linux's
    PR_SET_PDEATHSIG), so a killed supervisor or demo leaves no orphan behind."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
