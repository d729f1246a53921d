"""Cluster tests: a real ``redis-server`` per test module on a free loopback port
(no persistence, its own directory), stopped by pid; and two Bento nodes on it."""

from __future__ import annotations

import os
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

    def __init__(self, workdir: str, appendonly: bool = False, *extra: str) -> None:
        self.workdir = workdir
        self.appendonly = appendonly
        self.extra = list(extra)  # more redis-server options
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProcess:
        if not self.port:
            self.port = free_port()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes" if self.appendonly else "no", "--dir", self.workdir,
             "--logfile", f"{self.workdir}/redis.log", *self.extra],
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
def volatile_redis(tmp_path):
    """A redis-server of its own for one test that keeps nothing across a restart."""
    need_redis_server()
    (tmp_path / "volatile").mkdir()
    r = RedisProcess(str(tmp_path / "volatile")).start()
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


class RedisCluster:
    """A Redis Cluster of ``masters`` redis-servers (no replicas) on free loopback
    ports, made with ``redis-cli --cluster create``; stopped by pid."""

    def __init__(self, workdir: str, masters: int = 3) -> None:
        self.servers = []
        for i in range(masters):
            d = os.path.join(workdir, f"m{i}")
            os.makedirs(d)
            self.servers.append(RedisProcess(d, False, "--cluster-enabled", "yes", "--cluster-config-file",
                                             f"{d}/nodes.conf", "--cluster-node-timeout", "5000",
                                             "--cluster-port", str(free_port())))

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{r.port}" for r in self.servers[:2])

    def start(self) -> RedisCluster:
        try:
            for r in self.servers:
                r.start()
            subprocess.run(["redis-cli", "--cluster", "create",
                            *(f"127.0.0.1:{r.port}" for r in self.servers),
                            "--cluster-replicas", "0", "--cluster-yes"],
                           check=True, capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
            deadline = time.monotonic() + REDIS_START_S
            while not all(self._ok(r.port) for r in self.servers):
                if time.monotonic() > deadline:
                    raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise
        return self

    @staticmethod
    def _ok(port: int) -> bool:
        got = subprocess.run(["redis-cli", "-p", str(port), "cluster", "info"], capture_output=True,
                             timeout=5, stdin=subprocess.DEVNULL)
        return b"cluster_state:ok" in got.stdout

    def stop(self) -> None:
        for r in self.servers:
            r.stop()


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory):
    """Three masters, one Redis Cluster."""
    need_redis_server()
    c = RedisCluster(str(tmp_path_factory.mktemp("redis-cluster"))).start()
    yield c
    c.stop()


def make_ca(workdir: str, name: str = "ca") -> tuple[str, str]:
    """A self-signed CA (EC key): its certificate and key files."""
    cert, key = f"{workdir}/{name}.crt", f"{workdir}/{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN=bento test {name}",
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign"],
        check=True, capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    return cert, key


def issue_cert(workdir: str, ca: tuple[str, str]) -> tuple[str, str]:
    """A server certificate for 127.0.0.1 signed by ``ca``: certificate and key files."""
    cert, key, csr = f"{workdir}/server.crt", f"{workdir}/server.key", f"{workdir}/server.csr"
    ext = f"{workdir}/server.ext"
    with open(ext, "w") as f:
        f.write("subjectAltName=IP:127.0.0.1\n")
    run = dict(check=True, capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    subprocess.run(["openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"], **run)
    subprocess.run(["openssl", "x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
                    "-out", cert, "-days", "2", "-extfile", ext], **run)
    return cert, key


class TLSRedis(RedisProcess):
    """A redis-server that speaks only TLS (``--port 0``), with a certificate
    for 127.0.0.1 signed by a CA made here."""

    def __init__(self, workdir: str) -> None:
        self.ca = make_ca(workdir)
        cert, key = issue_cert(workdir, self.ca)
        super().__init__(workdir, False)
        self.tls_port = free_port()
        self.extra = ["--port", "0", "--tls-port", str(self.tls_port), "--tls-cert-file", cert, "--tls-key-file", key,
                      "--tls-ca-cert-file", self.ca[0], "--tls-auth-clients", "no"]

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.tls_port}/0?ca={self.ca[0]}"

    def _answers(self) -> bool:
        import ssl

        ctx = ssl.create_default_context(cafile=self.ca[0])
        try:
            with socket.create_connection(("127.0.0.1", self.tls_port), timeout=1) as raw, \
                    ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory):
    need_redis_server()
    r = TLSRedis(str(tmp_path_factory.mktemp("redis-tls"))).start()
    yield r
    r.stop()
