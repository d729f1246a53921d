"""Cluster tests: a real ``redis-server`` per test module on a free loopback port
(no persistence, its own directory), stopped by pid; and two Bento nodes on it."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

import pytest

REDIS_START_S = 10.0


class RedisProcess:
    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProcess:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.workdir, "--logfile", f"{self.workdir}/redis.log"],
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

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (Debian package redis-server; `make install` "
                    "installs it when run as root)")
    r = RedisProcess(str(tmp_path_factory.mktemp("redis"))).start()
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
