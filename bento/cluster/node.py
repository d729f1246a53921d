"""This node in the cluster: its Redis client, its heartbeat, the directory
entries of the sessions it runs, and the control stream other nodes write to.

A node writes only its own sessions' keys (and its heartbeat); another node
reads them, and asks for changes (the owner's acks) through the owner node's
control stream, which this node consumes and applies as if the request had
come from one of its own connections.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import coredis
import trio
from coredis.exceptions import RedisError

from bento import protocol
from bento.cluster import keys, lost
from bento.cluster.mirror import Mirror
from bento.cluster.remote import Remote
from bento.config import Config

if TYPE_CHECKING:
    from bento.sessions import Registry, Session

log = logging.getLogger("bento.cluster")

HEARTBEAT_S = 2.0
HEARTBEAT_TTL_MS = 10_000  # a node silent this long is taken as gone
CONTROL_BLOCK_MS = 1_000
CONTROL_MAXLEN = 10_000  # requests kept in a node's control stream (approximately)


class Cluster:
    """The node's cluster side. Made by ``run``; lives as long as the server."""

    def __init__(self, config: Config, redis: coredis.Redis, registry: Registry,
                 nursery: trio.Nursery) -> None:
        self.node = config.node
        self.redis = redis
        self.registry = registry
        self.nursery = nursery
        self.mirrors: dict[str, Mirror] = {}
        self.remote = Remote(self)

    # -- this node's sessions ----------------------------------------------------

    async def publish(self, s: Session) -> None:
        """Enter a session this node runs into the directory and start its mirror.

        Called before the execute's reply, so that the tokens work on every node
        once the client has them. When Redis cannot be reached the session still
        runs here; its mirror enters it once Redis is back."""
        if s.sid in self.mirrors:
            return
        mirror = Mirror(self, s)
        self.mirrors[s.sid] = mirror
        try:
            await mirror.publish()
        except RedisError as exc:
            log.warning("session %s: not yet in the cluster's directory (%s); its mirror retries", s.sid, exc)
        self.nursery.start_soon(mirror.run)

    async def enter(self, s: Session) -> None:
        """Write the directory entries of ``s``: its token hashes and its metadata."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(keys.token(s.meta["owner_hash"]), f"rw {s.sid}")
            pipe.set(keys.token(s.meta["viewer_hash"]), f"ro {s.sid}")
            pipe.hset(keys.meta(s.sid), {
                "node": self.node,
                "created": repr(s.created),
                "sandbox": s.meta["sandbox"],
                "enforced": protocol.encode(s.enforced),
                "snap": protocol.encode(s.snap._asdict()),
            })
            pipe.sadd(keys.node_sessions(self.node), [s.sid])

    async def forget(self, s: Session) -> None:
        """Remove the directory entries and the stream of a session that was removed."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.delete([keys.token(s.meta["owner_hash"]), keys.token(s.meta["viewer_hash"])])
            pipe.delete([keys.meta(s.sid), keys.out(s.sid)])
            pipe.srem(keys.node_sessions(self.node), [s.sid])
        self.mirrors.pop(s.sid, None)

    # -- the node's life -----------------------------------------------------------

    async def heartbeat(self) -> None:
        """Renew this node's heartbeat key; it expires HEARTBEAT_TTL_MS after the last renewal."""
        while True:
            value = protocol.encode({"node": self.node, "at": time.time(), "sessions": len(self.mirrors)})
            try:
                await self.redis.set(keys.node(self.node), value, px=HEARTBEAT_TTL_MS)
                await self.redis.sadd(keys.NODES, [self.node])
            except RedisError as exc:
                log.warning("cannot renew this node's heartbeat: %s", exc)
            await trio.sleep(HEARTBEAT_S)

    async def control(self) -> None:
        """Apply what other nodes ask of this node's sessions (the owner's acks),
        read from this node's control stream in order."""
        key = keys.control(self.node)
        # From the start of the stream: what was asked while this node was down
        # applies now (an ack is applied at most once; an older one changes nothing).
        last: str | bytes = "0-0"
        backoff = 0.1
        while True:
            try:
                got = await self.redis.xread({key: last}, count=256, block=CONTROL_BLOCK_MS)
                backoff = 0.1
            except RedisError as exc:
                log.warning("cannot read this node's control stream: %s (again in %.1f s)", exc, backoff)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            for entry in (got or {}).get(key.encode(), ()):
                last = entry.identifier
                await self._apply(entry.field_values)

    async def _apply(self, fields: dict) -> None:
        try:
            sid = fields[b"sid"].decode()
            seq = int(fields[b"ack"])
        except (KeyError, ValueError, UnicodeDecodeError):
            log.warning("control stream: ignoring a malformed request %r", fields)
            return
        s = self.registry.sessions.get(sid)
        if s is not None and not s.removed:
            await self.registry.ack(s, seq)

    async def ask_ack(self, node: str, sid: str, seq: int) -> None:
        """The owner's ack of ``sid``, to the node that runs it."""
        await self.redis.xadd(keys.control(node), {"sid": sid, "ack": seq},
                              trim_strategy=coredis.PureToken.MAXLEN, threshold=CONTROL_MAXLEN,
                              trim_operator=coredis.PureToken.APPROXIMATELY)


async def run(config: Config, registry: Registry, *,
              task_status: trio.TaskStatus[Cluster] = trio.TASK_STATUS_IGNORED) -> None:
    """Connect to the cluster's Redis and run this node's cluster side until cancelled.

    The client's ``async with`` is here, once, around everything that uses it
    (coredis wraps whatever leaves it in an ExceptionGroup)."""
    assert config.cluster is not None
    redis = coredis.Redis.from_url(config.cluster, decode_responses=False)
    async with redis:
        await redis.ping()
        async with trio.open_nursery() as nursery:
            cluster = Cluster(config, redis, registry, nursery)
            for s in list(registry.sessions.values()):
                await cluster.publish(s)
            nursery.start_soon(cluster.heartbeat)
            nursery.start_soon(cluster.control)
            nursery.start_soon(lost.watch, cluster)
            task_status.started(cluster)
