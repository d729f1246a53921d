"""What any node can say about every session from the directory in Redis:
the status of a session another node runs (as that node last mirrored it) and
``list`` across the nodes.

``list`` reads the per-API-key index sets (``bento:key:<hash>:sessions``, kept
by each node as it enters and forgets its sessions), then each listed
session's metadata, in one pipeline: its cost grows with the sessions listed,
not with all the sessions in the cluster (an admin key, or a server without
keys, lists them all and pays for them all).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bento import protocol
from bento.cluster import keys
from bento.session_core import Snapshot

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from bento.cluster.connect import Client

# The metadata a status is made of, in this order (HMGET).
FIELDS = ("node", "created", "sandbox", "tty", "enforced", "buffer", "key", "snap", "lost")


def snapshot_of(meta: Mapping[bytes, bytes | None]) -> Snapshot:
    """The session's snapshot from its metadata hash: the cluster's end when it
    gave one (``lost``, bento/cluster/lost.py), which stands whatever its node
    wrote after it; else what its node last mirrored."""
    raw = meta.get(b"lost") or meta[b"snap"]
    assert raw is not None
    return Snapshot.from_map(protocol.decode(raw))


def status_of(sid: str, meta: dict[bytes, bytes]) -> dict:
    """The ``status`` of a session from its metadata hash in Redis: the same
    fields as the running node's own status (docs/protocol.md §status), plus
    ``node``; ``attachments`` is null, as each node counts only its own."""
    snap = snapshot_of(meta)
    return {
        "session": sid,
        "state": snap.state,
        "created": float(meta[b"created"]),
        "ended": snap.ended,
        "first_seq": snap.first_seq,
        "next_seq": snap.next_seq,
        "acked_seq": snap.acked_seq,
        "input_seq": snap.input_seq,
        "buffer_bytes": snap.buffer_bytes,
        "buffer": _optional(meta, b"buffer"),
        "history_bytes": snap.history_bytes,
        "attachments": None,
        "exit": snap.exit,
        "waiting": snap.waiting,
        "sandbox": meta[b"sandbox"].decode(),
        "tty": meta.get(b"tty") == b"1",
        "enforced": protocol.decode(meta[b"enforced"]),
        "node": meta[b"node"].decode(),
    }


def _optional(meta: dict[bytes, bytes], name: bytes) -> Any:
    """A field that a node of an earlier version did not write: None then."""
    raw = meta.get(name)
    return None if raw is None else protocol.decode(raw)


async def listing(redis: Client, exclusive: Client, node: str, key_hash: str | None, local: list[dict],
                  key_name: Callable[[str], str]) -> list[dict]:
    """``list`` on node ``node`` in cluster mode: ``local`` (this node's own
    statuses, already filtered by key), then the sessions other nodes run,
    oldest first, each with ``key`` (its name by ``key_name``). ``key_hash``
    None lists every key's sessions (an admin key, or a server without keys).
    Redis's errors are the caller's to answer."""
    if key_hash is None:
        listed = [raw.decode() for raw in await redis.smembers(keys.LISTED_KEYS)]
    else:
        listed = [key_hash or "-"]
    sids: set[str] = set()
    for k in listed:
        sids.update(raw.decode() for raw in await redis.smembers(keys.key_sessions(k)))
    here = {st["session"] for st in local}
    wanted = sorted(sids - here)
    async with exclusive.pipeline(transaction=False) as pipe:
        replies = [pipe.hmget(keys.meta(sid), list(FIELDS)) for sid in wanted]
    found: list[tuple[str, Any]] = [(sid, await reply) for sid, reply in zip(wanted, replies, strict=True)]
    others = []
    for sid, values in found:
        meta = {f.encode(): v for f, v in zip(FIELDS, values, strict=True)}
        if meta[b"snap"] is None:
            continue  # removed after the index set was read (its node removes it from the set too)
        if meta[b"node"].decode() == node:
            continue  # this node's own, removed from its registry since `local` was made
        others.append({**status_of(sid, meta), "key": key_name((meta[b"key"] or b"").decode())})
    others.sort(key=lambda st: (st["created"], st["session"]))
    return local + others
