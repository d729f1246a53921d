"""Requests between nodes: what a node that does not run a session asks of the
node that does (the owner's acks, input, signal, destroy, shared state, share,
files and the terminal's size), and
executes a full node hands on (bento/cluster/placement.py).

Each node consumes its own control stream (``bento:node:<name>:ctl``) in
order, one request at a time, and applies each as if one of its own
connections had sent it; a request that wants an answer names a reply key
(``bento:reply:<rid>``), which the asker waits on with BLPOP for at most
ASK_TIMEOUT_S. Order is kept per running node, so one client's inputs arrive
in the order it sent them; the exchange's de-duplication by seq stays the
last word on input. A request is deleted from the stream once carried out, so
a restarted node starts with what it had not done (a crash between the two
repeats one request). A request older than ASK_TIMEOUT_S when it is read (its
asker has given up and said so) is not carried out; acks always are (an ack
is applied at most once, an older one changes nothing). A request whose reply
key was already seen is not carried out again: the client's retry of an XADD
whose connection was lost after Redis took it adds it twice.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import TYPE_CHECKING, Any

import coredis
import trio
from coredis.exceptions import RedisError

from bento import protocol, server_jobs, session_core
from bento.admin import share
from bento.cluster import keys
from bento.exchange_link import ExchangeGone
from bento.sessions import FROZEN_STATE

if TYPE_CHECKING:
    from bento.cluster.node import Cluster
    from bento.sessions import Session

log = logging.getLogger("bento.cluster.control")

ASK_TIMEOUT_S = 10.0
REPLY_TTL_S = 60
BLOCK_MS = 1_000
MAXLEN = 10_000  # requests kept in a node's control stream (approximately)
MAX_STATE_BYTES = 64 * 1024  # as the server's own state_put


class Control:
    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.redis = cluster.redis
        self.registry = cluster.registry
        self.seen: dict[str, float] = {}  # rid -> when its request was read, for ASK_TIMEOUT_S

    # -- the asking side -----------------------------------------------------------

    async def tell(self, node: str, sid: str, request: dict, rid: str = "") -> None:
        """Put ``request`` for session ``sid`` on ``node``'s control stream."""
        fields: dict[str, str | bytes] = {"sid": sid, "req": protocol.encode(request)}
        if rid:
            fields["rid"] = rid
        await self.redis.xadd(keys.control(node), fields, trim_strategy=coredis.PureToken.MAXLEN,
                              threshold=MAXLEN, trim_operator=coredis.PureToken.APPROXIMATELY)

    async def ask(self, node: str, sid: str, request: dict) -> dict:
        """``request`` to ``node`` and its answer (``ok``, and ``code``/``message``
        when not ok). Cancellation: a request cancelled while waiting may still be
        carried out (as one whose connection drops)."""
        rid = secrets.token_hex(12)
        await self.tell(node, sid, request, rid)
        got = await self.cluster.exclusive.blpop([keys.reply(rid)], timeout=ASK_TIMEOUT_S)
        if got is None:
            raise protocol.RequestError(
                "internal", f"node {node}, which runs the session, did not answer within "
                f"{ASK_TIMEOUT_S:.0f} s (it may be down: then the session ends lost); try again")
        return protocol.decode(got[1])

    # -- the running side ----------------------------------------------------------

    async def serve(self) -> None:
        """Carry out the requests on this node's control stream, in order."""
        key = keys.control(self.cluster.node)
        last: str | bytes = "0-0"
        backoff = 0.1
        while True:
            try:
                got = await self.cluster.exclusive.xread({key: last}, count=256, block=BLOCK_MS)
                backoff = 0.1
            except RedisError as exc:
                log.warning("cannot read this node's control stream: %s (again in %.1f s)", exc, backoff)
                await trio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            for entry in (got or {}).get(key.encode(), ()):
                last = entry.identifier
                try:
                    await self._one(entry.identifier, entry.field_values)
                    # Done: a restart of this node starts after it.
                    await self.redis.xdel(key, [entry.identifier])
                except RedisError as exc:
                    log.warning("control stream: could not answer a request: %s", exc)
                except Exception:  # noqa: BLE001 - the node outlives any one request, as the server any one connection
                    # e.g. an ack that meets a session whose directory a destroy is removing
                    log.exception("control stream: request %s failed", entry.identifier)

    async def _one(self, entry_id: str | bytes, fields: dict) -> None:
        try:
            sid = fields[b"sid"].decode()
            rid = fields.get(b"rid", b"").decode()
            request = protocol.decode(fields[b"req"])
            op = request["op"]
        except (KeyError, TypeError, UnicodeDecodeError, protocol.ProtocolError):
            log.warning("control stream: ignoring a malformed request %r", fields)
            return
        raw_id = entry_id.encode() if isinstance(entry_id, str) else entry_id
        asked_ms = int(raw_id.split(b"-", 1)[0])  # an automatic id starts with the time it was added
        if rid and time.time() * 1000 - asked_ms > ASK_TIMEOUT_S * 1000:
            log.info("control stream: %s for session %s came too late, not carried out", op, sid)
            return
        if rid and self._seen_before(rid):
            log.info("control stream: %s for session %s came twice, carried out once", op, sid)
            return
        s = self.registry.sessions.get(sid)
        answer: dict[str, Any] = {"ok": False, "code": "internal",
                                  "message": f"the session's node took over {ASK_TIMEOUT_S:.0f} s"}
        if op == "execute":  # handed on by a full node: no session yet (bento/cluster/placement.py)
            answer = {"ok": False, "code": "busy", "message": "this node is still starting"}
            if self.cluster.placement is not None:
                with trio.move_on_after(ASK_TIMEOUT_S):
                    answer = await self.cluster.placement.take(request)
        elif s is None or s.removed:
            answer = {"ok": False, "code": "not_found", "message": "the session is no longer on its node"}
        else:
            with trio.move_on_after(ASK_TIMEOUT_S):
                answer = await self._carry_out(s, request)
        if rid:
            async with self.cluster.exclusive.pipeline(transaction=False) as pipe:
                pipe.lpush(keys.reply(rid), [protocol.encode(answer)])
                pipe.expire(keys.reply(rid), REPLY_TTL_S)

    def _seen_before(self, rid: str) -> bool:
        """Whether a request with this reply key was read within ASK_TIMEOUT_S
        (an older one is refused as too late anyway); remembers this one."""
        now = time.monotonic()
        while self.seen:  # oldest first
            old, at = next(iter(self.seen.items()))
            if now - at <= ASK_TIMEOUT_S:
                break
            del self.seen[old]
        if rid in self.seen:
            return True
        self.seen[rid] = now
        return False

    async def _carry_out(self, s: Session, request: dict) -> dict:
        op = request["op"]
        try:
            if op == "ack":
                await self.registry.ack(s, request["seq"])
                return {"ok": True}
            if op == "input":
                return await self._input(s, request)
            if op == "signal":
                if s.snap.has_ended:
                    return {"ok": False, "code": "gone", "message": "the function has ended"}
                return await self.registry.call(s, {"t": "signal", "signal": request["signal"]})
            if op == "destroy":
                await self.registry.end(s)
                return {"ok": True}
            if op == "share":
                return {"ok": True, "viewer_token": await share(self.registry, self.cluster, s, request["viewer"])}
            if op == "state_get":
                return {"ok": True, "version": s.shared_version, "value": s.shared_value}
            if op == "resize":
                return {"ok": True, **await server_jobs.resize(self.registry, s, request)}
            if op == "file_get":
                return {"ok": True, **await server_jobs.file_get(s, request)}
            if op == "file_put":
                return {"ok": True, **await server_jobs.file_put(self.cluster.config, s, request)}
            if op == "state_put":
                if s.verdict is not None:
                    return {"ok": False, "code": "gone", "message": FROZEN_STATE}
                if len(request["value"]) > MAX_STATE_BYTES:
                    return {"ok": False, "code": "too_large",
                            "message": f"shared state is at most {MAX_STATE_BYTES} bytes encoded"}
                ok, version = await self.registry.put_state(s, request["value"], request["if_version"])
                if not ok:
                    return {"ok": False, "code": "conflict", "message": "shared state changed",
                            "version": version}
                return {"ok": True, "version": version}
        except ExchangeGone as exc:
            return {"ok": False, "code": "internal", "message": str(exc)}
        except protocol.RequestError as exc:
            return {"ok": False, "code": exc.code, "message": exc.message}
        return {"ok": False, "code": "bad_request", "message": f"unknown request {op!r} between nodes"}

    async def _input(self, s: Session, request: dict) -> dict:
        msg = {"t": "input", **{k: request[k] for k in ("seq", "eof", "data") if k in request}}
        if not s.on_disk:
            try:
                return await self.registry.input(s, msg)
            except ExchangeGone:
                if not s.snap.has_ended:
                    raise
        # Ended, and no exchange answers: a re-sent input is still a duplicate.
        verdict = session_core.judge_input(s.snap.input_seq, request["seq"], running=False)
        if isinstance(verdict, session_core.Refused):
            return {"ok": False, "code": verdict.code, "message": verdict.message}
        return {"ok": True, "input_seq": s.snap.input_seq}  # a duplicate
