"""The cluster's Redis client, made from a ``--cluster`` URL.

Forms (``user:password@`` may precede the hosts; percent-escaped):

    redis://HOST:PORT/DB                 one Redis (or Valkey), database DB (default 0)
    rediss://HOST:PORT/DB?ca=/path.pem   the same over TLS; ``ca`` is the CA file (or
                                         directory) the server's certificate must chain
                                         to (without it: the system's CAs); the host
                                         name is checked against the certificate
    redis+cluster://H1:P1,H2:P2          a Redis Cluster, from one or more seed nodes
    rediss+cluster://H1:P1,H2:P2?ca=...  the same over TLS

A Redis Cluster has only database 0. Any other query parameter is refused, so
a misspelt option never passes silently.

The clients use pools that give a slot back when a request on a connection is
cancelled: coredis's own pools lose the slot of a connection that a cancelled
blocking command (XREAD BLOCK, BLPOP) leaves unusable, or that is cancelled
while it connects, and once every slot is lost every command waits forever.

A node makes two clients on its URL (bento/cluster/node.py). coredis sends a
single command on a connection and puts that connection back in its pool
before the reply comes, so several commands can be in flight on one
connection. A command it flags blocking (every XREAD, with BLOCK or not;
BLPOP) or a pipeline holds a connection alone, and when it is cancelled
coredis closes that connection, failing with "Connection lost!" every other
command still in flight on it (coredis tries each twice more): one client's
attachment cut while another's ``status`` waited on the same connection, and
the other got ``unavailable``; a write failed that way may have been made. So
single commands go through one client (``redis``), and XREAD, BLPOP and
pipelines through the other (``exclusive``), whose connections never carry
anyone else's command.
"""

from __future__ import annotations

import os
import ssl
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote

import coredis
from coredis.connection import TCPLocation
from coredis.exceptions import RedisError
from coredis.pool import ClusterConnectionPool, ConnectionPool

SCHEMES = {  # scheme → (TLS, Redis Cluster)
    "redis": (False, False),
    "rediss": (True, False),
    "redis+cluster": (False, True),
    "rediss+cluster": (True, True),
}
CONNECT_TIMEOUT_S = 5.0
Client = coredis.Redis[bytes] | coredis.RedisCluster[bytes]  # what ``client`` makes
MAX_CONNECTIONS = 256  # per Redis node and client: each remote attachment's blocking read holds one


@dataclass(frozen=True)
class Target:
    """What a ``--cluster`` URL names."""

    tls: bool
    cluster: bool
    hosts: tuple[tuple[str, int], ...]
    db: int = 0
    username: str | None = None
    password: str | None = None
    ca: str | None = None

    def shown(self) -> str:
        """The URL without its password, for messages and logs."""
        scheme = ("rediss" if self.tls else "redis") + ("+cluster" if self.cluster else "")
        who = f"{self.username or ''}:***@" if self.password else (f"{self.username}@" if self.username else "")
        hosts = ",".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.hosts)
        return f"{scheme}://{who}{hosts}" + ("" if self.cluster else f"/{self.db}")


def parse(url: str) -> Target:
    """The target of a ``--cluster`` URL; ValueError says what is wrong with it."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in SCHEMES:
        raise ValueError(f"expected redis://HOST:PORT/DB, rediss://HOST:PORT/DB?ca=FILE or "
                         f"redis+cluster://HOST:PORT,HOST:PORT (got scheme {scheme!r})")
    tls, cluster = SCHEMES[scheme.lower()]
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, at, hostlist = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, pw = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if colon else None
    hosts = tuple(_host_port(h) for h in hostlist.split(","))
    if not cluster and len(hosts) != 1:
        raise ValueError("several hosts need redis+cluster:// (a Redis Cluster's seed nodes)")
    path = path.strip("/")
    if path and not path.isdigit():
        raise ValueError(f"the database must be a number, got {path!r}")
    db = int(path or 0)
    if cluster and db != 0:
        raise ValueError("a Redis Cluster has only database 0")
    params = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query))
    unknown = set(params) - {"ca"}
    if unknown:
        raise ValueError(f"unknown parameter(s) {', '.join(sorted(unknown))} (only ca= is understood)")
    ca = params.get("ca", [None])[-1]
    if ca is not None and not tls:
        raise ValueError("ca= needs TLS: rediss:// or rediss+cluster://")
    if ca == "":
        raise ValueError("ca= needs a file or directory")
    return Target(tls, cluster, hosts, db, username, password, ca)


def _host_port(text: str) -> tuple[str, int]:
    if text.startswith("["):  # [IPv6]:port
        host, _, port = text[1:].partition("]:")
    else:
        host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def tls_context(target: Target) -> ssl.SSLContext | None:
    """The TLS context of the target (certificate and host name checked), or None."""
    if not target.tls:
        return None
    if target.ca is None:
        return ssl.create_default_context()
    try:
        if os.path.isdir(target.ca):
            return ssl.create_default_context(capath=target.ca)
        return ssl.create_default_context(cafile=target.ca)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"ca={target.ca}: cannot load it as CA certificates ({exc})") from None


def reason(exc: BaseException) -> str:
    """``exc`` with the causes coredis wraps away (a refused certificate, a
    refused password), for a message a person acts on."""
    parts = [str(exc) or type(exc).__name__]
    cause = exc.__cause__ or exc.__context__
    for _ in range(5):  # a chain, bounded
        if cause is None:
            break
        text = str(cause) or type(cause).__name__
        if text not in parts[-1]:
            parts.append(text)
        cause = cause.__cause__ or cause.__context__
    return ": ".join(parts)


def client(url: str, max_connections: int = MAX_CONNECTIONS) -> Client:
    """A client (bytes in and out) for the URL, to be entered with ``async with``;
    at most ``max_connections`` connections to each Redis node."""
    t = parse(url)
    common: dict[str, Any] = dict(username=t.username, password=t.password, decode_responses=False,
                                  connect_timeout=CONNECT_TIMEOUT_S, ssl_context=tls_context(t),
                                  max_connections=max_connections)
    if t.cluster:
        return coredis.RedisCluster(
            startup_nodes=[TCPLocation(h, p) for h, p in t.hosts], max_connections_per_node=True,
            connection_pool_cls=ClusterPool, **common)
    host, port = t.hosts[0]
    return coredis.Redis(host=host, port=port, db=t.db, connection_pool_cls=Pool, **common)


# -- pools that keep their slots through cancellation ------------------------------------

# Set in a task while its get_connection makes a new connection: the slot is taken then.
_making: ContextVar[bool] = ContextVar("bento_cluster_making", default=False)


class Pool(ConnectionPool):
    """coredis's pool for one Redis, with every slot given back.

    A slot is a connection or room for a new one (a ``None`` in the queue). The
    base pool keeps a slot only for a connection that is still usable when it
    is released, and only for a connection that failed to connect with a
    RedisError."""

    def release(self, connection: Any) -> None:
        if connection.usable:
            super().release(connection)
            return
        self.statistics.connection_released(connection)
        connection.invalidate()
        if not self._available_connections.full():
            self._available_connections.put_nowait(None)  # room for a new connection

    async def get_connection(self, **options: Any) -> Any:
        _making.set(False)
        try:
            return await super().get_connection(**options)
        except BaseException as exc:
            if _making.get() and not isinstance(exc, RedisError):
                self._available_connections.append_nowait(None)
            raise

    async def _construct_connection(self) -> Any:
        _making.set(True)
        return await super()._construct_connection()


class ClusterPool(ClusterConnectionPool):
    """coredis's Redis Cluster pool with the same fix as ``Pool``, per node (its
    base gives the slot back for an Exception while connecting, not for a
    cancellation)."""

    def release(self, connection: Any) -> None:
        if connection.usable:
            super().release(connection)
            return
        self.statistics.connection_released(connection)
        connection.invalidate()
        queue = self._node_pool(connection.location)
        if not queue.full():
            queue.put_nowait(None)

    async def _get_connection_by_node(self, node: Any) -> Any:
        _making.set(False)
        try:
            return await super()._get_connection_by_node(node)
        except BaseException as exc:
            if _making.get() and not isinstance(exc, Exception):
                self._node_pool(TCPLocation(node.host, node.port)).append_nowait(None)
            raise

    async def _make_node_connection(self, node: Any) -> Any:
        _making.set(True)
        return await super()._make_node_connection(node)
