"""Serving a session that another node runs: attachments read its output from
the session's Redis Stream, and its shared state from its state stream (one
XREAD of both from the attachment's positions, then XREAD BLOCK for what comes
next), and the owner's acks go to the running node's control stream.

This node keeps no copy of the session: each attachment holds only its
position and one batch in flight, like a local attachment's worker reading the
log. Frames arrive by seq, so delivery is exactly once and in order, with the
positions the running node has; frames trimmed from the stream (acked, or
dropped by the buffer policy) become a ``gap`` frame.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio
from coredis.exceptions import RedisError

from bento import auth, protocol
from bento.admin import check_key
from bento.cluster import directory, keys
from bento.gate import audit
from bento.session_core import Snapshot
from bento.sessions import REPLACED, REVOKED_VIEWER
from bento.transport import ConnectionClosed

if TYPE_CHECKING:
    from bento.cluster.node import Cluster
    from bento.server import Connection
    from bento.sessions import Session

log = logging.getLogger("bento.cluster.remote")

BATCH_FRAMES = 512
BLOCK_MS = 1_000  # an idle attachment checks this often that its session still exists
TOKEN_CHECK_S = 1.0  # a viewer's attachment checks this often that its token still works
# What a request carries to the running node (beyond its op), and which ops a viewer may use.
CARRIED = {"signal": ("signal",), "share": ("viewer",), "state_put": ("if_version",),
           "resize": ("rows", "cols"), "file_get": ("path", "offset", "length"),
           "file_put": ("path", "offset", "data")}
VIEWER_OPS = ("state_get", "file_get")
REPLIED = {"state_get": ("version", "value"), "state_put": ("version",), "share": ("viewer_token",),
           "file_get": ("data", "size"), "file_put": ("size",)}  # the fields of the answer relayed


def unavailable(exc: RedisError) -> protocol.RequestError:
    return protocol.RequestError(
        "unavailable", f"this node cannot reach the cluster's Redis ({exc}): try again, or ask another node")


@dataclass(eq=False)
class RemoteAttachment:
    """One connection's attachment to a session another node runs."""

    sid: str
    node: str  # the node that runs the session
    mode: str  # "rw" | "ro"
    next_seq: int
    cancel: trio.CancelScope = field(default_factory=trio.CancelScope)
    done: trio.Event = field(default_factory=trio.Event)
    ack_sent: int = 0
    state_sent: int = 0  # the shared state's version this attachment has sent
    token_hash: str = ""  # the token it was made with: a viewer's is checked every TOKEN_CHECK_S
    token_checked: float = 0.0
    ended: bool = False  # it has sent the exit frame: the last one it ever sends


class Remote:
    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.redis = cluster.redis

    async def find(self, conn: Connection, token: str) -> tuple[str, str, dict[bytes, bytes], Snapshot]:
        """(session id, mode, metadata, snapshot) of the session with this token;
        ``not_found`` (counted as a failed guess) when there is none."""
        try:
            entry = await self.redis.get(keys.token(auth.token_hash(token)))
            meta: dict[bytes, bytes] = {}
            mode = ""
            if entry is not None:
                mode, _, sid = entry.decode().partition(" ")
                meta = await self.redis.hgetall(keys.meta(sid))
        except RedisError as exc:
            raise unavailable(exc) from None
        if mode == "retired" and b"snap" in meta:
            raise protocol.RequestError("not_found", REPLACED, replaced=True)
        s = self.cluster.registry.sessions.get(sid) if entry is not None else None
        if s is not None and not s.removed and self.cluster.registry.by_token(token) is None:
            # This node runs it and does not know the token, whatever Redis says
            # (a viewer token that share took away while Redis was out of reach).
            conn.by_token(token, owner=False)
        if b"snap" not in meta:  # no such token, or destroyed between the two reads
            conn.by_token(token, owner=False)
            raise protocol.RequestError("not_found", "no session has this token")
        check_key(conn.server, conn.config, meta.get(b"key", b"").decode())
        return sid, mode, meta, directory.snapshot_of(meta)

    async def serve(self, conn: Connection, req: dict) -> None:
        """A request with a token (TOKEN_OPS in bento/server.py) for a session
        this node does not run."""
        op = req["op"]
        if op == "attach":
            await self.attach(conn, req)
            return
        if op == "status":
            await self.status(conn, req)
            return
        sid, mode, meta, _snap = await self.find(conn, req["token"])
        if op not in VIEWER_OPS and mode != "rw":
            raise protocol.RequestError("forbidden", "this needs the owner token, not a viewer token")
        request: dict[str, Any] = {"op": op, **{k: req[k] for k in CARRIED.get(op, ())}}
        if op == "share":
            audit(f"share.{req['viewer']}", conn.key, sid)
        elif op == "state_put":
            request["value"] = protocol.encode(req["value"])
        r = await self._ask(meta[b"node"].decode(), sid, request)
        reply = {k: r[k] for k in REPLIED.get(op, ())}
        if op == "state_get":
            reply["value"] = protocol.decode(r["value"], require_map=False)
        await conn.send(protocol.reply_ok(req["id"], **reply))

    async def input(self, conn: Connection, req: dict) -> bool:
        """``input`` over a remote attachment (False if there is none): carried to
        the running node, which de-duplicates by seq."""
        att = conn.remote.get(req["session"])
        if att is None:
            return False
        if att.mode != "rw":
            raise protocol.RequestError("forbidden", "this attachment is read-only")
        request: dict[str, Any] = {"op": "input", "seq": req["seq"]}
        if req["eof"]:
            request["eof"] = True
        else:
            request["data"] = protocol.encode(req["data"])
        r = await self._ask(att.node, att.sid, request)
        await conn.send(protocol.event("in_ack", session=att.sid, seq=r["input_seq"]))
        return True

    async def _ask(self, node: str, sid: str, request: dict) -> dict:
        """``request`` carried out by ``node``; its refusal raised as the request's error."""
        try:
            r = await self.cluster.control.ask(node, sid, request)
        except RedisError as exc:
            raise unavailable(exc) from None
        if not r["ok"]:
            extra = {"version": r["version"]} if "version" in r else {}
            raise protocol.RequestError(r["code"], r["message"], **extra)
        return r

    async def status(self, conn: Connection, req: dict) -> None:
        """``status`` of a session another node runs, as that node last mirrored it."""
        sid, _mode, meta, _snap = await self.find(conn, req["token"])
        await conn.send(protocol.reply_ok(req["id"], **directory.status_of(sid, meta)))

    async def list(self, key_hash: str | None, local: list[dict], key_name: Any) -> list[dict]:
        """``list`` across the cluster: see bento/cluster/directory.py."""
        try:
            return await directory.listing(self.redis, self.cluster.exclusive, self.cluster.node, key_hash, local, key_name)
        except RedisError as exc:
            raise unavailable(exc) from None

    async def attach(self, conn: Connection, req: dict) -> None:
        """``attach`` with a token of a session another node runs (or no session at all)."""
        sid, mode, meta, snap = await self.find(conn, req["token"])
        node = meta[b"node"].decode()
        start = req["from"]
        if start > snap.next_seq:
            raise protocol.RequestError("bad_request", f"from {start} is beyond next_seq {snap.next_seq}")
        await self.detach(conn, sid)
        await conn.send(protocol.reply_ok(
            req["id"], session=sid, mode=mode, state=snap.state, first_seq=snap.first_seq,
            next_seq=snap.next_seq, input_seq=snap.input_seq, tty=meta.get(b"tty") == b"1",
        ))
        # From past the exit frame, nothing is to come (the stream may hold what a
        # node the cluster took for dead wrote after its end: never delivered).
        ended = snap.has_ended and snap.exit_seq is not None and start > snap.exit_seq
        self._start(conn, RemoteAttachment(sid, node, mode, start, ended=ended,
                                           token_hash=auth.token_hash(req["token"]),
                                           token_checked=trio.current_time()))

    def follow(self, conn: Connection, s: Session, mode: str, start: int) -> None:
        """Attach ``conn`` to a session of this node that the cluster ended while
        the node was out of reach (``Session.verdict``): from Redis, as any other
        node serves it, so that it reads the same end."""
        token_hash = s.meta["owner_hash"] if mode == "rw" else s.meta["viewer_hash"]
        self._start(conn, RemoteAttachment(s.sid, self.cluster.node, mode, start, token_hash=token_hash,
                                           token_checked=trio.current_time()))

    def _start(self, conn: Connection, att: RemoteAttachment) -> None:
        conn.remote[att.sid] = att
        assert conn.nursery is not None
        conn.nursery.start_soon(self.worker, conn, att)

    async def execute_again(self, conn: Connection, req: dict, idem: str, sid: str, node: str) -> None:
        """The reply to an execute whose idempotency key (hash ``idem``) another
        node's session ``sid`` already has: that session's id and tokens; nothing
        new starts."""
        owner, viewer = auth.derived_tokens(self.cluster.secret, idem)
        await conn.send(protocol.reply_ok(req["id"], session=sid, token=owner, viewer_token=viewer))
        if req["attach"]:
            await self.detach(conn, sid)
            self._start(conn, RemoteAttachment(sid, node, "rw", 1))

    async def detach(self, conn: Connection, sid: str) -> bool:
        """End the connection's attachment to ``sid`` (False if it has none);
        returns once its last batch is out."""
        att = conn.remote.pop(sid, None)
        if att is None:
            return False
        att.cancel.cancel()
        await att.done.wait()
        return True

    async def ack(self, conn: Connection, sid: str, seq: int) -> bool:
        """The owner's ack over a remote attachment (False if there is none)."""
        att = conn.remote.get(sid)
        if att is None:
            return False
        if att.mode == "rw" and seq > att.ack_sent:
            try:
                await self.cluster.control.tell(att.node, sid, {"op": "ack", "seq": seq})
            except RedisError as exc:
                raise unavailable(exc) from None
            att.ack_sent = seq
        return True

    async def worker(self, conn: Connection, att: RemoteAttachment) -> None:
        try:
            with att.cancel:
                await self._pump(conn, att)
        except ConnectionClosed:
            pass
        except RedisError as exc:
            log.warning("session %s: attachment ends, Redis is not reachable: %s", att.sid, exc)
            await self._last_word(conn, att, "unavailable", f"this node lost the cluster's Redis ({exc}): "
                                  "attach again from the next seq")
        finally:
            att.done.set()

    async def _last_word(self, conn: Connection, att: RemoteAttachment, code: str, message: str) -> None:
        if conn.remote.get(att.sid) is att:
            conn.remote.pop(att.sid, None)
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                try:
                    await conn.send(protocol.error_event(att.sid, code, message))
                except ConnectionClosed:
                    pass

    async def _pump(self, conn: Connection, att: RemoteAttachment) -> None:
        out, state = keys.out(att.sid), keys.state(att.sid)
        while True:
            if att.mode == "ro" and trio.current_time() - att.token_checked >= TOKEN_CHECK_S:
                # A viewer token that ``share`` took away on the session's node.
                att.token_checked = trio.current_time()
                token_entry = await self.redis.get(keys.token(att.token_hash))
                if token_entry is not None and token_entry.startswith(b"retired "):
                    await self._last_word(conn, att, "forbidden", REVOKED_VIEWER)
                    return
            # One read of both streams: the frames from the attachment's seq on,
            # and a shared state newer than the version it has sent.
            after = {out: keys.entry_id(att.next_seq - 1), state: keys.entry_id(att.state_sent)}
            got = await self.cluster.exclusive.xread(after, count=BATCH_FRAMES)
            if not got:
                snap = await self._snapshot(att)
                if snap is None:
                    await self._last_word(conn, att, "gone", "the session was destroyed")
                    return
                if att.next_seq < snap.first_seq:
                    await self._gap(conn, att, snap.first_seq, snap)
                    continue
                got = await self.cluster.exclusive.xread(after, count=BATCH_FRAMES, block=BLOCK_MS)
                if not got:
                    continue
            # A new state goes before the frames read with it, as on the running node.
            for entry in got.get(state.encode(), ())[-1:]:
                await self._state(conn, att, entry)
            entries = got.get(out.encode(), ())
            while entries:  # what one out event could not carry goes in the next, not read again
                entries = await self._deliver(conn, att, entries)

    async def _state(self, conn: Connection, att: RemoteAttachment, entry: Any) -> None:
        """A ``state`` event: the shared state's version (the entry's id) and value."""
        version = keys.seq_of(entry.identifier)
        value = protocol.decode(entry.field_values[b"v"], require_map=False)
        await conn.send(protocol.event("state", session=att.sid, version=version, value=value))
        att.state_sent = version

    async def _snapshot(self, att: RemoteAttachment) -> Snapshot | None:
        snap, lost = await self.redis.hmget(keys.meta(att.sid), ["snap", "lost"])
        return None if snap is None else directory.snapshot_of({b"snap": snap, b"lost": lost})

    async def _gap(self, conn: Connection, att: RemoteAttachment, upto: int, snap: Snapshot) -> None:
        """Frames from ``att.next_seq`` to ``upto - 1`` are no longer in the stream."""
        a, b = att.next_seq, upto - 1
        await conn.send(protocol.out_event(att.sid, [protocol.gap_frame(a, b, snap.gap_reason(a))]))
        att.next_seq = upto

    async def _deliver(self, conn: Connection, att: RemoteAttachment, entries: Any) -> Any:
        """One ``out`` event of the entries from ``att.next_seq`` on (within the
        connection's batch size); a hole in the stream becomes a gap frame.
        Returns the entries it left for the next event."""
        frames: list[bytes] = []
        size = 0
        expect = att.next_seq
        rest: Any = ()
        for i, entry in enumerate(entries):
            seq = keys.seq_of(entry.identifier)
            if seq < expect:
                continue
            if att.ended:
                # Past the exit frame: what a node the cluster took for dead wrote
                # after the cluster ended its session (bento/cluster/mirror.py).
                expect = seq + 1
                continue
            frame = entry.field_values[b"f"]
            if frames and size + len(frame) > conn.out_budget:
                rest = entries[i:]
                break
            if seq > expect:
                snap = await self._snapshot(att)
                reason = "acked" if snap is None else snap.gap_reason(expect)
                frames.append(protocol.gap_frame(expect, seq - 1, reason))
            frames.append(frame)
            size += len(frame)
            expect = seq + 1
            att.ended = protocol.is_exit_frame(frame)
        if frames:
            await conn.send(protocol.out_event_parts(att.sid, frames))
        att.next_seq = expect
        return rest
