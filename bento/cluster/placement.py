"""Placement: an execute this node has no room for runs on another live node.

Every node puts its capacity figures in its heartbeat (``figures``): running
functions and ``--max-sessions``, memory committed and the memory budget,
whether its disk is above the floor, executes waiting in its queue. A node
whose own admission answers ``busy`` (bento/gate.py; never ``quota``: a key's
quotas are counted per node) reads the live heartbeats, orders the other
nodes that have room by load (``candidates``) and hands the execute to the
first through its control stream (bento/cluster/control.py). That node admits
it itself, as one of its own executes; refused (it filled up since its last
heartbeat), the next is asked, at most MAX_TRIES in all.

The session's tokens are derived from the cluster's secret and an
idempotency key hash, as for an idempotent execute retried on another node
(``Remote.execute_again``): the client's own key when it gave one (this node
claimed it in Redis, the taking node settles it), else a random one made
here. So no token travels through Redis, and the reply and the attachment are
those of any session on another node.

What it must never do: start a function twice for one execute. A node that
does not answer within the control stream's wait is not replaced by another
(it may still start the session): the client gets the error, and a retry with
its idempotency key finds the session wherever it started.
"""

from __future__ import annotations

import logging
import secrets
from typing import TYPE_CHECKING, Any

from coredis.exceptions import RedisError

from bento import protocol
from bento.admission import Refused
from bento.cluster import keys
from bento.server_execute import session_meta, start_session

if TYPE_CHECKING:
    from bento.cluster.node import Cluster
    from bento.server import Connection, Server

log = logging.getLogger("bento.cluster.placement")

MAX_TRIES = 3  # nodes asked for one execute before it is busy
# A handed-on execute travels in one control stream entry: beyond this it is
# not handed on (its files make it large), and stays busy here.
MAX_HANDOFF_BYTES = 8 << 20


def figures(stats: dict, disk_ok: bool) -> dict:
    """A node's capacity figures for its heartbeat, from its admission's
    ``statistics()`` and whether its data dir is above the disk floor."""
    return {"running": stats["running"], "max_running": stats["max_running"], "memory": stats["memory"],
            "memory_budget": stats["memory_budget"], "disk_ok": disk_ok, "queued": stats["queued"]}


def has_room(fig: dict, memory: int) -> bool:
    """Whether a node with these figures can start one more function of ``memory`` bytes now."""
    return (bool(fig["disk_ok"]) and not fig["queued"] and fig["running"] < fig["max_running"]
            and fig["memory"] + memory <= fig["memory_budget"])


def load(fig: dict) -> float:
    """How full a node is, 0 to 1: the larger of its share of running functions and of memory."""
    return max(fig["running"] / max(1, fig["max_running"]), fig["memory"] / max(1, fig["memory_budget"]))


def candidates(beats: dict[str, dict], me: str, memory: int) -> list[str]:
    """The other nodes that have room for a function of ``memory`` bytes, least
    loaded first (then fewest running, then by name): ``beats`` are the live
    nodes' heartbeats by name."""
    room = [(load(fig), fig["running"], name) for name, beat in beats.items()
            if name != me and isinstance(fig := beat.get("capacity"), dict) and has_room(fig, memory)]
    return [name for _load, _running, name in sorted(room)]


async def _not_queued(_position: int) -> None:
    raise AssertionError("a handed-on execute never waits in the queue")


class Placement:
    """This node's side of placement: handing executes on, and taking them."""

    def __init__(self, cluster: Cluster, server: Server) -> None:
        self.cluster = cluster
        self.server = server
        self.redis = cluster.redis

    def figures(self) -> dict:
        """This node's capacity figures now (one statvfs of the data dir)."""
        gate = self.server.gate
        return figures(gate.admission.statistics(), gate.disk_free() >= gate.admission.capacity.disk_floor)

    async def live(self) -> dict[str, dict]:
        """The heartbeats of the live nodes (those not yet expired), by name."""
        names = sorted(n.decode() for n in await self.redis.smembers(keys.NODES))
        async with self.cluster.exclusive.pipeline(transaction=False) as pipe:
            pending = [pipe.get(keys.node(name)) for name in names]
        beats = {}
        for name, raw in zip(names, [await p for p in pending], strict=True):
            if raw is not None:
                beats[name] = protocol.decode(raw)
        return beats

    # -- the node the client reached --------------------------------------------------

    async def hand_on(self, conn: Connection, req: dict, handoff: dict, memory: int) -> str | None:
        """Hand ``req`` (an execute this node is too full for) to another node:
        None once one took it and ``conn`` has its reply (and attachment), else
        why none did. ``handoff``: what the other node starts it from (the
        execute's fields, the key's hash, the limits, the code, the idempotency
        key hash or None)."""
        try:
            order = candidates(await self.live(), self.cluster.node, memory)[:MAX_TRIES]
        except RedisError as exc:
            return f"the other nodes' capacity is unknown: the cluster's Redis does not answer ({exc})"
        if not order:
            return "no other live node has room either"
        request: dict[str, Any] = {"op": "execute", **handoff, "settle": handoff["idem"] is not None,
                                   "idem": handoff["idem"] or secrets.token_hex(32)}
        if len(protocol.encode(request)) > MAX_HANDOFF_BYTES:
            return f"the execute is over {MAX_HANDOFF_BYTES >> 20} MiB encoded, too large to hand to another node"
        refused = []
        for node in order:
            try:
                r = await self.cluster.control.ask(node, "", request)
            except RedisError as exc:
                return f"the cluster's Redis does not answer ({exc})"
            if r["ok"]:
                log.info("execute handed to node %s: session %s", node, r["session"])
                self.server.metrics.handed_on.labels(node).inc()
                await self.cluster.remote.execute_again(conn, req, request["idem"], r["session"], node)
                return None
            refused.append(f"node {node}: {r['message']}")
        return "the other nodes that had room refused it: " + "; ".join(refused)

    # -- the node that takes it ------------------------------------------------------

    async def take(self, request: dict) -> dict:
        """Start an execute another node handed on, admitted here as one of this
        node's own: the answer for the control stream (``session`` when ok; a
        refusal, ``busy`` or ``quota`` included, when nothing started)."""
        server = self.server
        try:
            meta = session_meta(server, request["req"], request["key"], request["limits"], request["code"])
            ticket = None
            idem = request["idem"]
            if idem not in server.registry.idem:
                history = server.gate.history_bytes(request["key"], list(server.registry.sessions.values()))
                ticket = await server.gate.enter(request["key"], request["limits"], history, None, _not_queued,
                                                 meta.get("env_name"))
            s, _owner, _viewer = await start_session(server, meta, idem, ticket, settle=request["settle"])
        except Refused as exc:
            return {"ok": False, "code": exc.code, "message": exc.message}
        except protocol.RequestError as exc:
            return {"ok": False, "code": exc.code, "message": exc.message}
        log.info("session %s: started for an execute another node handed on", s.sid)
        server.metrics.taken.inc()
        return {"ok": True, "session": s.sid}
