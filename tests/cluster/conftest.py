"""Cluster tests: a real ``redis-server`` per test module on a free loopback port
(no persistence, its own directory), stopped by pid; and two Bento nodes on it."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time

import pytest

REDIS_START_S = 10.0


class RedisProcess:
    """A redis-server on a free loopback port; ``appendonly`` keeps its data
    across a restart (``stop`` then ``start`` again, on the same port)."""

    def __init__(self, workdir: str, appendonly: bool = False) -> None:
        self.workdir = workdir
        self.appendonly = appendonly
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProcess:
        if not self.port:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self.port = s.getsockname()[1]
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes" if self.appendonly else "no", "--dir", self.workdir,
             "--logfile", f"{self.workdir}/redis.log"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + REDIS_START_S
        while not self._answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}: see {self.workdir}/redis.log")
            time.sleep(0.05)
        return self

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGKILL) -> None:
        """Stop it (SIGTERM: after writing its append-only file out)."""
        from helpers import end_process

        if self.proc is not None:
            end_process(self.proc, sig)


def need_redis_server() -> None:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (Debian package redis-server; `make install` "
                    "installs it when run as root)")


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    need_redis_server()
    r = RedisProcess(str(tmp_path_factory.mktemp("redis"))).start()
    yield r
    r.stop()


@pytest.fixture
def durable_redis(tmp_path):
    """A redis-server of its own for one test, with appendonly on."""
    need_redis_server()
    r = RedisProcess(str(tmp_path), appendonly=True).start()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def nodes(redis_server, tmp_path_factory):
    """Two nodes, ``a`` and ``b``, on one Redis."""
    from helpers import ServerProcess

    started = []
    for name in ("a", "b"):
        data = str(tmp_path_factory.mktemp(f"node-{name}") / "data")
        started.append(ServerProcess(data, "--cluster", redis_server.url, "--node", name).start())
    yield started
    for srv in started:
        srv.stop()
