"""Node death: every node watches the others' heartbeats; the sessions of a
node whose heartbeat expired end ``lost`` with the error ``NodeLost``.

The end is written into Redis as the node itself would have mirrored it: an
exit frame at the session's next seq in its stream, and the snapshot that says
so. A script writes both only if the snapshot is still the one read (compare
and set), so two nodes that notice the same death write one end, and a session
whose node wrote again in the meantime is left alone. Output the dead node had
not mirrored yet is lost to the cluster (see docs/cluster.md).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import trio
from coredis.exceptions import RedisError

from bento import protocol
from bento.cluster import keys
from bento.session_core import Snapshot

if TYPE_CHECKING:
    from bento.cluster.node import Cluster

log = logging.getLogger("bento.cluster.lost")

SWEEP_S = 2.0

# KEYS: meta, out. ARGV: the snapshot read, the snapshot after, the exit frame's id, the frame.
# The end goes into ``lost`` too: it stands for every reader (directory.snapshot_of)
# even if the node comes back and writes one more batch before it learns of it.
END_IF_UNCHANGED = """
if redis.call('HEXISTS', KEYS[1], 'lost') == 1 then return 1 end
if redis.call('HGET', KEYS[1], 'snap') ~= ARGV[1] then return 0 end
redis.call('XADD', KEYS[2], ARGV[3], 'f', ARGV[4])
redis.call('HSET', KEYS[1], 'snap', ARGV[2], 'lost', ARGV[2])
return 1
"""


def node_lost_exit(node: str) -> dict:
    """The exit data of a session whose node died."""
    return {"state": "lost", "code": None, "signal": None, "result": None,
            "error": {"type": "NodeLost",
                      "message": f"node {node} that ran the session stopped answering; "
                                 "its output up to its last mirrored frame is kept",
                      "traceback": ""}}


async def watch(cluster: Cluster, ttl_s: float) -> None:
    """Every SWEEP_S (a fifth of ``ttl_s`` if less): end the sessions of the
    nodes whose heartbeat expired.

    A missing heartbeat proves a node dead only where it could have been
    renewed: not while this node itself cannot reach Redis, nor within
    ``ttl_s`` after that, nor within ``ttl_s`` of Redis's own start (after a
    restart every heartbeat has expired, as the nodes could not renew them)."""
    trouble_at = time.monotonic()  # this node's start counts as trouble too
    while True:
        await trio.sleep(min(SWEEP_S, ttl_s / 5))
        try:
            uptime = int(str((await cluster.redis.info("server"))["uptime_in_seconds"]))
            if time.monotonic() - trouble_at >= ttl_s and uptime >= ttl_s:
                await sweep(cluster)
        except RedisError as exc:
            trouble_at = time.monotonic()
            log.warning("cannot check the other nodes' heartbeats: %s", exc)


async def sweep(cluster: Cluster) -> None:
    redis = cluster.redis
    for raw in await redis.smembers(keys.NODES):
        node = raw.decode()
        if node == cluster.node or await redis.exists([keys.node(node)]):
            continue
        sids = await redis.smembers(keys.node_sessions(node))
        ended = [sid for sid in sids if await end_lost(cluster, node, sid.decode())]
        # What has ended needs no more watching; a session whose snapshot moved
        # meanwhile (its node wrote again) stays watched.
        if ended:
            await redis.srem(keys.node_sessions(node), ended)
        if len(ended) == len(sids):
            await redis.srem(keys.NODES, [raw])
        log.warning("node %s: heartbeat expired; %d of its %d sessions ended lost",
                    node, len(ended), len(sids))


async def end_lost(cluster: Cluster, node: str, sid: str) -> bool:
    """End ``sid`` lost unless it has ended (or is gone, or the cluster ended it
    before: its end stands, whatever its node wrote since); False if its
    snapshot changed under the script (its node is writing after all)."""
    redis = cluster.redis
    raw = await redis.hget(keys.meta(sid), "snap")
    if raw is None:
        return True
    snap = Snapshot.from_map(protocol.decode(raw))
    if snap.has_ended:
        return True
    seq = snap.next_seq
    data = node_lost_exit(node)
    frame = protocol.encode_frame(seq, "exit", protocol.encode(data))
    after = snap._replace(state="lost", next_seq=seq + 1, ended=time.time(), exit=data, exit_seq=seq)
    done = await redis.eval(END_IF_UNCHANGED, keys=[keys.meta(sid), keys.out(sid)],
                            args=[raw, protocol.encode(after._asdict()), keys.entry_id(seq), frame])
    if done == 1:
        # Told to the node, should it be back: its heartbeat reads this.
        await redis.incr(keys.node_ended(node))
    return done == 1
