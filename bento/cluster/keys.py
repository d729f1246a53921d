"""The Redis key names of cluster mode, in one place.

A session's keys carry its id as a hash tag (``{sid}``), so on a Redis Cluster
they share one slot and a pipeline over them goes to one node. Token keys hold
the SHA-256 of a token, never the token.
"""

from __future__ import annotations

PREFIX = "bento"


def node(name: str) -> str:
    """A node's heartbeat; it expires when the node stops renewing it."""
    return f"{PREFIX}:node:{name}"


def node_ended(name: str) -> str:
    """A counter another node increments each time it ends sessions of node
    ``name`` (taken for dead): the node reads it with its heartbeat."""
    return f"{PREFIX}:node:{name}:ended"


SECRET = f"{PREFIX}:secret"  # 32 random bytes: derives the tokens of idempotent executes


def idem(idem_hash: str) -> str:
    """An idempotency key's hash → ``pending <node>`` while a node starts its
    session, then ``session <sid>``."""
    return f"{PREFIX}:idem:{idem_hash}"


def function(fid: str) -> str:
    """A stored function (CBOR ``{"name", "code"}``) by its id, the SHA-256 of its code."""
    return f"{PREFIX}:function:{fid}"


def token(token_hash: str) -> str:
    """A token hash → ``<mode> <sid>`` (mode ``rw`` for the owner, ``ro`` for a
    viewer, ``retired`` for a viewer token that ``share`` took away)."""
    return f"{PREFIX}:token:{token_hash}"


def meta(sid: str) -> str:
    """The session's hash: ``node``, ``created``, ``sandbox``, ``enforced``,
    ``buffer``, ``key`` (the API key's hash that started it), ``tty``, ``snap``
    (the CBOR of its last mirrored snapshot) and ``lost`` (the end the cluster
    gave it when its node was taken for dead: it stands over ``snap``)."""
    return f"{PREFIX}:{{{sid}}}:meta"


def out(sid: str) -> str:
    """The session's output frames; the entry of frame ``seq`` has the id ``<seq>-0``."""
    return f"{PREFIX}:{{{sid}}}:out"


def state(sid: str) -> str:
    """The session's shared state: a stream of one entry, ``<version>-0`` with
    field ``v`` = the value's CBOR; each new version replaces the one before."""
    return f"{PREFIX}:{{{sid}}}:state"


def entry_id(seq: int) -> str:
    return f"{seq}-0"


def seq_of(entry_id: str | bytes) -> int:
    """The frame seq of a stream entry id (``<seq>-0``)."""
    raw = entry_id.encode() if isinstance(entry_id, str) else entry_id
    ms, _, n = raw.partition(b"-")
    if n != b"0":
        raise ValueError(f"stream entry id {entry_id!r} is not <seq>-0")
    return int(ms)


def control(node_name: str) -> str:
    """A node's control stream: requests other nodes make of its sessions."""
    return f"{PREFIX}:node:{node_name}:ctl"


NODES = f"{PREFIX}:nodes"  # the set of nodes that have run sessions and are not yet found dead


def node_sessions(node_name: str) -> str:
    """The ids of the sessions a node runs (ended ones too, until they are removed)."""
    return f"{PREFIX}:node:{node_name}:sessions"


def reply(rid: str) -> str:
    """The answer to one request between nodes (a list of one item, short-lived)."""
    return f"{PREFIX}:reply:{rid}"


def key_sessions(key_hash: str) -> str:
    """The ids of the sessions started with one API key (by the key's hash; ``-``
    for sessions started without a key): what ``list`` reads for that key."""
    return f"{PREFIX}:key:{key_hash or '-'}:sessions"


# The API key hashes that have a key_sessions set: what ``list`` reads for an
# admin key, or on a server without keys (every session).
LISTED_KEYS = f"{PREFIX}:keys"
