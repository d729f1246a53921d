"""This node in the cluster: its Redis client, its heartbeat, and the directory
entries of the sessions it runs.

A node writes only its own sessions' keys (and its heartbeat); another node
reads them, and asks for changes through the running node's control stream
(bento/cluster/control.py).
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import socket
import time
from typing import TYPE_CHECKING

import coredis
import trio
from coredis.exceptions import RedisError

from bento import protocol
from bento.cluster import connect, keys, lost
from bento.cluster.control import Control
from bento.cluster.mirror import Mirror
from bento.cluster.remote import Remote, unavailable
from bento.config import Config

if TYPE_CHECKING:
    from bento.cluster.placement import Placement
    from bento.sessions import Registry, Session

log = logging.getLogger("bento.cluster")

BEATS_PER_TIMEOUT = 5  # heartbeats within one --node-timeout (every 2 s at the default 10 s)
CLAIM_WAIT_S = 10.0
CLAIM_POLL_S = 0.05
REACH_TIMEOUT_S = 5.0


class Cluster:
    """The node's cluster side. Made by ``run``; lives as long as the server."""

    def __init__(self, config: Config, redis: connect.Client, exclusive: connect.Client,
                 registry: Registry, nursery: trio.Nursery) -> None:
        self.config = config
        self.node = config.node
        self.timeout_s = config.node_timeout_s  # a node silent this long is taken for dead
        self.instance = instance(config)
        self.redis = redis  # single commands, several in flight on one connection
        self.exclusive = exclusive  # XREAD, BLPOP and pipelines, each alone on its connection (connect.py)
        self.registry = registry
        self.nursery = nursery
        self.mirrors: dict[str, Mirror] = {}
        # ``share``'s writes, one at a time (so Redis gets them in the order they were
        # made), and per session the viewer token hashes it forgot that Redis has
        # not yet deleted: present while a write of that session is owed.
        self.viewers_lock = trio.Lock()
        self.unwritten_viewers: dict[str, set[str]] = {}
        self.secret = registry.store.secret  # the cluster's, once run() has read it
        self.remote = Remote(self)
        self.control = Control(self)
        # Set by the server once it exists: hands on and takes executes, reports capacity.
        self.placement: Placement | None = None
        # Why the last heartbeat could not be written (None: it was), and when one
        # last was: what /readyz says (a Redis that hangs raises nothing).
        self.beat_error: str | None = None
        self.beat_at = trio.current_time()
        # The other nodes' count of this node's sessions they ended (keys.node_ended)
        # as last seen; anything else at the first heartbeat, which then checks.
        self.ended_seen: bytes | None = b"?"
        self.checking = False

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

    async def enter(self, s: Session) -> bool:
        """Write the directory entries of ``s``: its token hashes and its metadata.
        A snapshot already there (this node restarted) stays: it says what the
        stream holds, and the mirror moves it on. True if the cluster ended the
        session while this node was away (``lost``: mirror.take_verdict)."""
        async with self.exclusive.pipeline(transaction=False) as pipe:
            pipe.set(keys.token(s.meta["owner_hash"]), f"rw {s.sid}")
            if s.meta["viewer_hash"]:  # (empty once revoked)
                pipe.set(keys.token(s.meta["viewer_hash"]), f"ro {s.sid}")
            for retired in s.meta.get("retired_viewers", ()):
                pipe.set(keys.token(retired), f"retired {s.sid}")
            pipe.hset(keys.meta(s.sid), {
                "node": self.node,
                "created": repr(s.created),
                "sandbox": s.meta["sandbox"],
                "tty": "1" if s.meta.get("tty") else "0",
                "enforced": protocol.encode(s.enforced),
                "buffer": protocol.encode(s.meta["buffer"]),
                "key": s.meta.get("key") or "",
            })
            pipe.hsetnx(keys.meta(s.sid), "snap", protocol.encode(s.snap._asdict()))
            pipe.sadd(keys.node_sessions(self.node), [s.sid])
            # What `list` reads on any node: the sessions of each API key.
            pipe.sadd(keys.key_sessions(s.meta.get("key") or ""), [s.sid])
            pipe.sadd(keys.LISTED_KEYS, [s.meta.get("key") or "-"])
            lost = pipe.hexists(keys.meta(s.sid), "lost")
        return bool(await lost)

    async def forget(self, s: Session) -> None:
        """Remove the directory entries and the stream of a session that was removed."""
        forgotten = self.unwritten_viewers.get(s.sid, set())
        async with self.exclusive.pipeline(transaction=False) as pipe:
            # One DEL per slot: on a Redis Cluster a command's keys must share one.
            for token_hash in (s.meta["owner_hash"], s.meta["viewer_hash"], *s.meta.get("retired_viewers", ()),
                               *forgotten):
                if token_hash:
                    pipe.delete([keys.token(token_hash)])
            pipe.delete([keys.meta(s.sid), keys.out(s.sid), keys.state(s.sid)])
            pipe.srem(keys.node_sessions(self.node), [s.sid])
            pipe.srem(keys.key_sessions(s.meta.get("key") or ""), [s.sid])
            if s.meta.get("idem"):
                pipe.delete([keys.idem(s.meta["idem"])])
        self.mirrors.pop(s.sid, None)
        self.unwritten_viewers.pop(s.sid, None)

    async def share(self, s: Session, forgotten: list[str], viewer: str | None) -> None:
        """Tell every node that ``share`` gave ``s`` a new viewer token (or none),
        retired the old one and forgot the ``forgotten`` ones. If Redis does not
        take it now, this node writes the session's viewer tokens as they are
        then every second until it does (``unavailable``, carrying the new
        ``viewer_token``): one such loop per session, so that no write of an
        earlier share brings back a token a later one forgot."""
        owed = s.sid in self.unwritten_viewers
        self.unwritten_viewers.setdefault(s.sid, set()).update(forgotten)
        try:
            await self._write_viewers(s)
        except RedisError as exc:
            if not owed:
                self.nursery.start_soon(self._write_viewers_later, s)
            raise protocol.RequestError(
                "unavailable", f"the viewer token was replaced on this node (the new one is this error's "
                f"viewer_token) but the cluster's Redis did not take it ({exc}): until this node reaches "
                "Redis again (it retries every second), other nodes still accept the old viewer token",
                viewer_token=viewer) from None

    async def _write_viewers(self, s: Session) -> None:
        """Write the viewer tokens of ``s`` as they are now (the current one,
        the retired ones) and delete the forgotten ones still owed."""
        async with self.viewers_lock:
            owed = self.unwritten_viewers.get(s.sid, set())
            deleted = set(owed)
            async with self.exclusive.pipeline(transaction=False) as pipe:
                for token_hash in s.meta.get("retired_viewers", ()):
                    pipe.set(keys.token(token_hash), f"retired {s.sid}")
                if s.meta["viewer_hash"]:
                    pipe.set(keys.token(s.meta["viewer_hash"]), f"ro {s.sid}")
                for token_hash in deleted:  # (one DEL each: they may be in different slots)
                    pipe.delete([keys.token(token_hash)])
            owed -= deleted
            if not owed:
                self.unwritten_viewers.pop(s.sid, None)
        if s.removed:
            # Destroyed while this was written: its keys went before these came.
            await self.forget(s)

    async def _write_viewers_later(self, s: Session) -> None:
        while True:
            await trio.sleep(1.0)
            if s.removed or s.sid not in self.unwritten_viewers:
                return  # (gone, or a later share wrote them)
            try:
                await self._write_viewers(s)
                return
            except RedisError:
                pass  # (the heartbeat logs that Redis is out of reach)

    # -- idempotency keys across nodes ------------------------------------------------

    async def claim(self, idem: str) -> tuple[str, str] | None:
        """Who starts the session of the idempotency key hash ``idem``: None for
        this node (it claimed the key, or the key's session runs here: the local
        registry then finds it); else (session id, node) of the session another
        node started. Waits (at most CLAIM_WAIT_S) while another node is
        starting it."""
        key = keys.idem(idem)
        with trio.move_on_after(CLAIM_WAIT_S):
            while True:
                try:
                    if await self.redis.set(key, f"pending {self.node}", condition=coredis.PureToken.NX,
                                            ex=int(CLAIM_WAIT_S * 3)):
                        return None
                    value = await self.redis.get(key)
                    kind, _, what = (value or b"").decode().partition(" ")
                    if kind == "pending" and what == self.node or what in self.registry.sessions:
                        return None  # this node's registry serialises and finds it
                    if kind == "session":
                        node = await self.redis.hget(keys.meta(what), "node")
                        if node is not None:
                            return what, node.decode()
                        # Its session was removed: the key is free again.
                        await self.redis.delete([key])
                        continue
                except RedisError as exc:
                    raise unavailable(exc) from None
                await trio.sleep(CLAIM_POLL_S)
        raise protocol.RequestError("internal", "another node is starting the session of this idempotency "
                                    f"key and did not finish within {CLAIM_WAIT_S:.0f} s; try again")

    async def settle(self, idem: str, sid: str) -> None:
        """The key's session is ``sid`` (on this node), for good."""
        try:
            await self.redis.set(keys.idem(idem), f"session {sid}")
        except RedisError as exc:
            raise unavailable(exc) from None

    # -- stored functions ------------------------------------------------------------

    async def share_function(self, fid: str, name: str, code: str) -> None:
        """A function stored on this node, for an execute by id on any node."""
        try:
            await self.redis.set(keys.function(fid), protocol.encode({"name": name, "code": code}),
                                 condition=coredis.PureToken.NX)
        except RedisError as exc:
            raise unavailable(exc) from None

    async def function(self, fid: str) -> str | None:
        """The code of a function stored on any node, or None."""
        try:
            raw = await self.redis.get(keys.function(fid))
        except RedisError as exc:
            raise unavailable(exc) from None
        if raw is None:
            return None
        code = protocol.decode(raw)["code"]
        if hashlib.sha256(code.encode("utf-8", "surrogatepass")).hexdigest() != fid:
            log.error("function %s in Redis does not match its id: ignored", fid)
            return None
        return code

    # -- the node's life -----------------------------------------------------------

    async def heartbeat(self) -> None:
        """Renew this node's heartbeat key every fifth of ``timeout_s``; it
        expires ``timeout_s`` after the last renewal. It carries the node's
        capacity figures, which placement reads (as old as one beat at most)."""
        while True:
            value = protocol.encode({"node": self.node, "at": time.time(), "sessions": len(self.mirrors),
                                     "instance": self.instance,
                                     "capacity": None if self.placement is None else self.placement.figures()})
            # Out of reach long enough for the heartbeat to lapse: the cluster may
            # have ended this node's sessions meanwhile (lost.py).
            lapsed = self.beat_error is not None or trio.current_time() - self.beat_at > self.timeout_s / 2
            try:
                async with self.exclusive.pipeline(transaction=False) as pipe:
                    pipe.set(keys.node(self.node), value, px=int(self.timeout_s * 1000))
                    pipe.sadd(keys.NODES, [self.node])
                    # Put back after a Redis that lost its data (restarted without
                    # persistence): a node started after that must not make its own.
                    pipe.set(keys.SECRET, self.secret, condition=coredis.PureToken.NX)
                    # Moves when another node has ended sessions of this one.
                    ended = pipe.get(keys.node_ended(self.node))
                ended_count = await ended
                self.beat_error, self.beat_at = None, trio.current_time()
                if (lapsed or ended_count != self.ended_seen) and not self.checking:
                    self.ended_seen = ended_count
                    self.checking = True
                    self.nursery.start_soon(self.check_verdicts)
            except RedisError as exc:
                log.warning("cannot renew this node's heartbeat: %s", exc)
                self.beat_error = f"the cluster's Redis does not answer: {exc}"
            await trio.sleep(self.timeout_s / BEATS_PER_TIMEOUT)

    async def check_verdicts(self) -> None:
        """Take the cluster's end of each session it ended while this node was
        out of reach (one round trip for all; beside the heartbeat, which must
        not wait for the functions it stops)."""
        try:
            mirrors = [m for m in self.mirrors.values() if m.session.verdict is None]
            async with self.exclusive.pipeline(transaction=False) as pipe:
                replies = [pipe.hexists(keys.meta(m.session.sid), "lost") for m in mirrors]
            for mirror, reply in zip(mirrors, replies, strict=True):
                if await reply:
                    await mirror.take_verdict()
        except RedisError as exc:
            self.ended_seen = b"?"  # (the next heartbeat checks again)
            log.warning("cannot check for sessions the cluster ended: %s", exc)
        finally:
            self.checking = False

    @property
    def unreachable(self) -> str | None:
        """Why the cluster's store is out of reach for this node (None: it is not)."""
        if self.beat_error is not None:
            return self.beat_error
        silent = trio.current_time() - self.beat_at
        if silent > self.timeout_s / 2:
            return (f"the cluster's Redis has not taken this node's heartbeat for {silent:.0f} s "
                    f"(it answers nothing; the heartbeat expires after {self.timeout_s:g} s)")
        return None


def instance(config: Config) -> str:
    """What tells this node apart from another that took the same name by mistake."""
    return f"{socket.gethostname()}:{os.path.abspath(config.data_dir)}"


def cannot_start(config: Config) -> str | None:
    """Why this node cannot join the cluster now (Redis unreachable, or its
    name taken by a live node elsewhere), or None. Runs its own trio loop: for
    the check at start, before the server's loop."""
    url = config.cluster
    assert url is not None
    try:
        shown = connect.parse(url).shown()  # never the password
    except ValueError as exc:
        return f"cannot use {url.partition('://')[0]}:// URL: {exc}"
    holder: list[str] = []

    async def check() -> None:
        redis = connect.client(url)
        with trio.fail_after(REACH_TIMEOUT_S):
            async with redis:
                raw = await redis.get(keys.node(config.node))
        if raw is not None:
            other = protocol.decode(raw).get("instance")
            if other != instance(config):
                holder.append(str(other))

    try:
        trio.run(check)
    except trio.TooSlowError:
        return f"Redis at {shown} did not answer in {REACH_TIMEOUT_S:.0f} s"
    except ValueError as exc:
        return f"cannot use Redis at {shown}: {exc}"
    except (RedisError, OSError, BaseExceptionGroup) as exc:
        first = exc.exceptions[0] if isinstance(exc, BaseExceptionGroup) else exc
        return f"cannot reach Redis at {shown}: {connect.reason(first)}"
    if holder:
        return (f"the node name {config.node!r} is in use by {holder[0]} (its heartbeat is live): "
                "give this node its own --node")
    return None


async def run(config: Config, registry: Registry, *,
              task_status: trio.TaskStatus[Cluster] = trio.TASK_STATUS_IGNORED) -> None:
    """Connect to the cluster's Redis and run this node's cluster side until cancelled.

    The client's ``async with`` is here, once, around everything that uses it
    (coredis wraps whatever leaves it in an ExceptionGroup)."""
    assert config.cluster is not None
    redis, exclusive = connect.client(config.cluster), connect.client(config.cluster)
    async with redis, exclusive:
        # One secret for the whole cluster: a retried execute gets the same
        # derived tokens from any node. It replaces this node's own.
        await redis.set(keys.SECRET, secrets.token_bytes(32), condition=coredis.PureToken.NX)
        secret = await redis.get(keys.SECRET)
        if secret is None or len(secret) != 32:
            raise RuntimeError(f"{keys.SECRET} in Redis is not 32 bytes: delete it, and a node makes it anew")
        registry.store.secret = secret
        async with trio.open_nursery() as nursery:
            cluster = Cluster(config, redis, exclusive, registry, nursery)
            for s in list(registry.sessions.values()):
                await cluster.publish(s)
            nursery.start_soon(cluster.heartbeat)
            nursery.start_soon(cluster.control.serve)
            nursery.start_soon(lost.watch, cluster, config.node_timeout_s)
            task_status.started(cluster)
