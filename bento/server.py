"""The Bento server: one port for the WebSocket endpoint (/v1) and plain HTTP,
one task per connection, one worker per attachment.

A connection task reads messages, validates them with the protocol module and
answers each request. An attachment's worker reads the session's output log
from its own position and pushes ``out`` events; it never holds frames in
memory beyond one batch, so the server's memory does not grow with unread
output. Sends to a client have a timeout: a client that stops reading loses
its connection (its sessions and their buffers stay), never stalls anyone else.

Each connection's first request is read as HTTP (bento/http.py): an upgrade
at /v1 becomes a WebSocket (bento/transport.py), anything else gets one HTTP
answer. Nothing a client sends may take the server down: every handler
catches what it must (an exception escaping a trio.serve_tcp handler kills
the listener).
"""

from __future__ import annotations

import logging
import math
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import bento_sandbox
import trio

import bento
from bento import auth, events, http, protocol, session_core, sessionlog, tcptune, transport
from bento.admin import SessionOps
from bento.admission import Admission, Refused, Ticket
from bento.config import Config
from bento.gate import Gate, audit, machine_capacity
from bento.metrics import Metrics
from bento.readiness import Readiness
from bento.server_jobs import JobOps, installer
from bento.sessions import Attachment, ExchangeGone, Registry, Session
from bento.store import Store
from bento.transport import ConnectionClosed, WebSocket

log = logging.getLogger("bento.server")

MAX_STATE_BYTES = 64 * 1024
MIN_SEND_RATE = 64 * 1024  # bytes/s a client must at least take to keep its connection
MIN_OUT_BUDGET = 64 * 1024
TOKEN_OPS = ("attach", "signal", "status", "destroy", "state_get", "state_put")


class Closing(Exception):
    """Close this connection with ``code`` (after an error event when useful)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class Server:
    def __init__(self, config: Config, registry: Registry, store: Store) -> None:
        self.config = config
        self.registry = registry
        self.store = store
        self.keys = config.keys  # replaced in place on a reload
        self.guesses = auth.GuessLimiter()
        self.said_tuned = False
        self.peers: dict[str, int] = {}  # open WebSocket connections per peer host
        self.name = f"bento/{bento.__version__}"
        self.uv = installer()
        self.traffic = transport.Traffic()
        self.cluster: Any = None  # bento.cluster.node.Cluster with config.cluster
        capacity = config.capacity or machine_capacity(config.data_dir, config.default_limits.get("memory_bytes"))
        self.gate = Gate(Admission(capacity, config.quotas), config.data_dir, registry.nursery)
        self.metrics = Metrics(self)
        self.routes = http.Routes(keys=self.keys, guesses=self.guesses, metrics=self.metrics.render,
                                  ready=Readiness(config, self.cluster_unreachable).why_not)

    def cluster_unreachable(self) -> str | None:
        """Why this node cannot reach the cluster's store (None without a cluster)."""
        return self.cluster.unreachable if self.cluster is not None else None

    async def handle(self, stream: trio.SocketStream | trio.SSLStream) -> None:
        """Entry point for each TCP connection. Never raises: an exception
        escaping it would take down the listener (trio.serve_tcp)."""
        try:
            await self._handle(stream)
        except Exception:  # noqa: BLE001 - the server must outlive any one connection
            log.exception("connection failed")
        finally:
            await trio.aclose_forcefully(stream)

    def _tune(self, sock: Any) -> None:
        """A connection from this host gets a congestion control that does not
        pace it (bento/tcptune.py); said once in the log."""
        try:
            chosen = tcptune.plain_for_same_host(sock)
        except OSError as exc:
            log.debug("could not tune a connection's congestion control: %s", exc)
            return
        if chosen is not None and not self.said_tuned:
            self.said_tuned = True
            log.info("connections from this host use %s congestion control (not the system's %s)",
                     chosen.decode(), tcptune.system_default())

    async def _handle(self, stream: trio.SocketStream | trio.SSLStream) -> None:
        sock = tcptune.stream_socket(stream)
        try:
            peer = str(sock.getpeername()[0])
        except OSError:
            return  # reset right after the accept: nobody is there any more
        self._tune(sock)
        ws = None
        # The request head (and a TLS handshake before it) within the handshake timeout.
        with trio.move_on_after(self.config.handshake_timeout_s):
            ws = await self._open(stream, peer)
        if ws is not None:
            await self._run(ws, peer)

    async def _open(self, stream: trio.SocketStream | trio.SSLStream, peer: str) -> WebSocket | None:
        """Read the first request: a WebSocket for an upgrade at /v1; any other
        request gets its HTTP answer (None)."""
        try:
            got = await http.read_request(stream)
        except http.BadRequest as exc:
            await self._answer(stream, exc.conn, http.text(exc.status, f"bad request: {exc.message}"))
            return None
        if got is None:
            return None
        conn, request, trailing = got
        at_v1 = request.target.split(b"?", 1)[0] == b"/v1"
        if not transport.is_upgrade(request):
            if at_v1:
                answer = http.text(426, "Bento speaks WebSocket at /v1: connect with a WebSocket client",
                                   ("upgrade", "websocket"))
            else:
                answer = await self.routes.answer(request, peer)
            await self._answer(stream, conn, answer, head_only=request.method == b"HEAD")
            return None
        if not at_v1:
            await self._answer(stream, conn, http.text(404, "Bento speaks WebSocket at /v1 only"))
            return None
        try:
            return await transport.accept(stream, request, trailing, max_message=self.config.max_message,
                                          traffic=self.traffic)
        except transport.HandshakeRefused as exc:
            await self._answer(stream, conn, http.text(exc.status, f"bad WebSocket handshake: {exc.message}"))
        except ConnectionClosed:
            pass
        return None

    async def _answer(self, stream: trio.abc.Stream, conn: Any, answer: http.Answer,
                      head_only: bool = False) -> None:
        with trio.move_on_after(self.config.send_timeout_s):
            try:
                await http.write_answer(stream, conn, answer, head_only)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the client left without its answer

    async def _run(self, ws: WebSocket, peer: str) -> None:
        count = self.peers.get(peer, 0)
        self.peers[peer] = count + 1
        conn = Connection(self, ws, peer)
        try:
            if count >= self.config.max_connections_per_peer:
                await conn.close(1008, "too many connections from this peer")
                return
            await conn.run()
        except Exception:  # noqa: BLE001 - the server must outlive any one connection
            log.exception("connection from %s failed", peer)
        finally:
            conn.detach_all()
            left = self.peers.get(peer, 1) - 1
            if left:
                self.peers[peer] = left
            else:
                self.peers.pop(peer, None)
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await ws.aclose()


class Connection(SessionOps, JobOps):
    def __init__(self, server: Server, ws: WebSocket, peer: str) -> None:
        self.server = server
        self.config = server.config
        self.registry = server.registry
        self.ws = ws
        self.peer = peer
        self.key: str | None = None  # hash of a valid API key ('' when none are required)
        self.hello = False
        self.attachments: dict[str, Attachment] = {}
        self.remote: dict[str, Any] = {}  # cluster mode: attachments to other nodes' sessions
        self.nursery: trio.Nursery | None = None
        self.dead = False
        # Frame bytes per out event: the event and its envelope stay within
        # max_message (every frame itself fits: the exchange makes them so).
        self.out_budget = min(self.config.out_event_bytes, self.config.max_message - 512,
                              max(MIN_OUT_BUDGET, int(self.config.send_timeout_s * MIN_SEND_RATE)))

    # -- sending ------------------------------------------------------------

    async def send(self, data: bytes | Sequence[bytes | memoryview]) -> None:
        """Send one message (bytes, or pieces that make it up); a client that
        does not take it in time is dropped.

        Cancellation: a send once begun is never cancelled (it is shielded, and
        bounded by the send timeout instead): a message cut in half would leave
        the WebSocket stream unusable for every later message."""
        if self.dead:
            raise ConnectionClosed(None)
        # A client that takes at least MIN_SEND_RATE is never dropped: batches
        # are sized to go out within the send timeout at that rate, and a single
        # bigger frame gets the time it needs at that rate.
        pieces = (data,) if isinstance(data, bytes) else data
        size = sum(len(p) for p in pieces)
        timeout = max(self.config.send_timeout_s, size / MIN_SEND_RATE)
        try:
            with trio.CancelScope(shield=True), trio.fail_after(timeout):
                await self.ws.send_binary(pieces, size)
        except trio.TooSlowError:
            self.dead = True
            log.warning("dropping %s: it stopped reading", self.peer)
            with trio.CancelScope(shield=True), trio.move_on_after(0.5):
                await self.ws.aclose(1008, "send timeout")
            raise ConnectionClosed(1008, "send timeout") from None

    async def close(self, code: int, reason: str) -> None:
        self.dead = True
        with trio.move_on_after(2):
            await self.ws.aclose(code, reason[:120])

    async def proto_error(self, message: str, code: int = 1002, request_id: int | None = None) -> None:
        self.server.metrics.errors.labels("proto").inc()
        try:
            if request_id is not None:
                await self.send(protocol.reply_error(request_id, "proto", message))
            else:
                await self.send(protocol.error_event(None, "proto", message))
        except ConnectionClosed:
            pass
        await self.close(code, message)

    # -- the read loop ---------------------------------------------------------

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            try:
                await self._read_loop()
            except ConnectionClosed as exc:
                if exc.code == 1009:
                    events.refused("too_large", self.peer, limit=self.config.max_message)
            except Closing as exc:
                await self.close(exc.code, exc.reason)
            nursery.cancel_scope.cancel()

    async def _read_loop(self) -> None:
        while not self.dead:
            timeout = self.config.idle_timeout_s if self.hello else self.config.handshake_timeout_s
            with trio.move_on_after(timeout) as idle:
                raw = await self.ws.receive_message()
            if idle.cancelled_caught:
                raise Closing(1008, "idle timeout" if self.hello else "handshake timeout")
            if isinstance(raw, str):
                await self.proto_error("text messages are not allowed: send binary CBOR")
                return
            try:
                msg = protocol.decode(raw, max_size=self.config.max_message)
            except protocol.ProtocolError as exc:
                await self.proto_error(exc.message, exc.close_code)
                return
            try:
                req = protocol.parse_request(msg)
            except protocol.RequestError as exc:
                if not self.hello:
                    await self.proto_error(f"the first message must be hello ({exc.message})",
                                           request_id=exc.request_id)
                    return
                await self._send_error(exc.request_id, msg.get("session"), exc)
                continue
            if not self.hello and req["op"] != "hello":
                await self.proto_error("the first message must be hello", request_id=req["id"])
                return
            try:
                await self.dispatch(req)
            except protocol.RequestError as exc:
                await self._send_error(req["id"], req.get("session"), exc)
            except ExchangeGone as exc:
                await self._send_error(req["id"], req.get("session"),
                                       protocol.RequestError("internal", str(exc)))

    async def _send_error(self, request_id: int | None, session: Any, exc: protocol.RequestError) -> None:
        self.server.metrics.errors.labels(exc.code).inc()
        if request_id is not None:
            await self.send(protocol.reply_error(request_id, exc.code, exc.message, **exc.extra))
        else:
            sid = session if isinstance(session, str) else None
            await self.send(protocol.error_event(sid, exc.code, exc.message))

    async def dispatch(self, req: dict) -> None:
        op = req["op"]
        if (self.server.cluster is not None and op in TOKEN_OPS and "token" in req
                and self.registry.by_token(req["token"]) is None):
            await self.server.cluster.remote.serve(self, req)  # another node runs it
            return
        handler = getattr(self, f"op_{op}")
        if op == "execute" and req["queue"]:
            # It may wait in the queue: the connection's other requests must not wait with it.
            assert self.nursery is not None
            self.nursery.start_soon(self._aside, handler, req)
            return
        await handler(req)

    async def _aside(self, handler: Any, req: dict) -> None:
        """A request answered beside the read loop, with the loop's error answers."""
        try:
            await handler(req)
        except protocol.RequestError as exc:
            await self._send_error(req["id"], None, exc)
        except ExchangeGone as exc:
            await self._send_error(req["id"], None, protocol.RequestError("internal", str(exc)))
        except ConnectionClosed:
            pass

    # -- helpers -------------------------------------------------------------

    def attachment(self, sid: str, write: bool) -> Attachment:
        att = self.attachments.get(sid)
        if att is None:
            raise protocol.RequestError("not_found", f"this connection is not attached to {sid}")
        if write and att.mode != "rw":
            raise protocol.RequestError("forbidden", "this attachment is read-only")
        return att

    # -- ops -------------------------------------------------------------------

    async def op_hello(self, req: dict) -> None:
        if self.hello:
            raise protocol.RequestError("bad_request", "hello was already sent")
        if req["proto"] != protocol.PROTO_VERSION:
            await self.proto_error(f"this server speaks protocol {protocol.PROTO_VERSION}",
                                   request_id=req["id"])
            raise ConnectionClosed(None)  # type: ignore[arg-type]
        self.hello = True
        presented = req.get("auth")
        self.key = self.server.keys.check(presented)
        if presented is not None and self.key is None:
            self.server.guesses.failed(self.peer)
            events.refused("bad_key", self.peer)
        await self.send(protocol.reply_ok(
            req["id"], proto=protocol.PROTO_VERSION, server=self.server.name,
            node=self.config.node, max_message=self.config.max_message,
        ))

    async def op_ping(self, req: dict) -> None:
        await self.send(protocol.reply_ok(req["id"]))

    async def op_store(self, req: dict) -> None:
        self.need_key()
        try:
            fid = await trio.to_thread.run_sync(self.server.store.put_function, req["name"], req["code"])
        except OSError as exc:
            raise protocol.RequestError("internal", f"cannot store the function: {exc.strerror}") from None
        if self.server.cluster is not None:
            await self.server.cluster.share_function(fid, req["name"], req["code"])
        await self.send(protocol.reply_ok(req["id"], function=fid))

    async def op_execute(self, req: dict) -> None:
        key = self.need_key()
        limits = self._limits(req["limits"])
        idem = req.get("idempotency_key")
        idem_hash = auth.idem_hash(key, idem) if idem else None
        cluster = self.server.cluster
        if cluster is not None and idem_hash is not None:
            elsewhere = await cluster.claim(idem_hash)
            if elsewhere is not None:
                await cluster.remote.execute_again(self, req, idem_hash, *elsewhere)
                return
        meta = await self._meta(req, key, limits)
        # Admission comes first (a refusal is cheap); a retry of an execute that started skips it.
        ticket = None if idem_hash in self.registry.idem else await self._admit(req, key, limits, meta.get("env_name"))
        try:
            s, owner, viewer = await self.registry.create(meta, idem_hash)
        except BaseException:
            if ticket is not None:
                self.server.gate.release(ticket)
            raise
        if ticket is not None:
            self.server.gate.bind(ticket, s)
        audit("execute", key, s.sid)
        self.server.metrics.executed(s, self.registry.nursery)
        if cluster is not None:
            await cluster.publish(s)
            if idem_hash is not None:
                await cluster.settle(idem_hash, s.sid)
        await self.send(protocol.reply_ok(req["id"], session=s.sid, token=owner, viewer_token=viewer))
        if req["attach"]:
            self.attach(s, "rw", 1)

    async def _meta(self, req: dict, key: str, limits: dict) -> dict:
        code = req.get("code")
        if code is None and req["function"] is not None:
            code = self.server.store.get_function(req["function"])
            if code is None and self.server.cluster is not None:
                code = await self.server.cluster.function(req["function"])  # stored on another node
            if code is None:
                raise protocol.RequestError("not_found", f"no stored function {req['function']!r}")
        return {
            "code": code,
            "function": req.get("function"),
            "entry": req["entry"],
            "args": protocol.encode(req["args"]),
            "kwargs": protocol.encode(req["kwargs"]),
            "env": req["env"],
            "limits": limits,
            "buffer": self._buffer(req["buffer"]),
            "history_bytes": self.config.history_bytes,
            "network": req["network"],
            **self._packages(req["packages"]),
            **self._files(req),
            **({"tty": req["tty"]} if req["tty"] else {}),
            "work_bytes": self.config.max_work_bytes,
            "sandbox": self.config.sandbox,
            "sandbox_cmd": self.config.sandbox_cmd,
            "max_message": self.config.max_message,
            "allow_unenforced": self.config.allow_unenforced_limits,
            "key": key,
        }

    async def _admit(self, req: dict, key: str, limits: dict, env: str | None) -> Ticket:
        """Admission (bento/gate.py): a ticket, or the error ``busy`` or ``quota``."""
        gate = self.server.gate

        async def queued(position: int) -> None:
            await self.send(protocol.event("queued", id=req["id"], position=position))

        history = gate.history_bytes(key, list(self.registry.sessions.values()))
        try:
            return await gate.enter(key, limits, history, req["queue"], queued, env)
        except Refused as exc:
            raise protocol.RequestError(exc.code, exc.message, **exc.fields()) from None

    def _limits(self, asked: dict) -> dict:
        """The session's limits: what it asked for, the server's defaults for
        the rest, and never above the server's maxima (a limit with a maximum
        is always set)."""
        limits = dict(self.config.default_limits)
        for k, v in asked.items():
            if isinstance(v, float) and not math.isfinite(v):
                raise protocol.RequestError("bad_request", f"limit {k} must be finite")
            top = self.config.max_limits.get(k)
            if top is not None and v > top:
                raise protocol.RequestError("bad_request", f"limit {k} is at most {top} on this server")
            limits[k] = v
        for k, top in self.config.max_limits.items():
            limits[k] = min(limits.get(k, top), top)
        if not self.config.allow_unenforced_limits:
            for k in limits:
                if k not in self.config.enforceable:
                    raise protocol.RequestError(
                        "bad_request",
                        f"limit {k} cannot be enforced on this server "
                        f"({bento_sandbox.unenforceable_reason(k)}): run without it, or ask the "
                        "operator (who may start the server with --allow-unenforced-limits)")
        return limits

    def _buffer(self, asked: dict | None) -> dict:
        asked = asked or {}
        max_bytes = asked.get("max_bytes", self.config.buffer_bytes)
        if max_bytes > self.config.max_buffer_bytes:
            raise protocol.RequestError(
                "bad_request", f"buffer.max_bytes is at most {self.config.max_buffer_bytes} on this server")
        return {"max_bytes": max_bytes, "policy": asked.get("policy", self.config.buffer_policy)}

    async def op_attach(self, req: dict) -> None:
        s, mode = self.by_token(req["token"], owner=False)
        audit("attach", self.key, s.sid)
        # The reply carries the session's positions as they are now, not as last announced.
        await self.registry.sync(s)
        snap = s.snap
        start = req["from"]
        if start > snap.next_seq:
            raise protocol.RequestError("bad_request", f"from {start} is beyond next_seq {snap.next_seq}")
        old = self.attachments.pop(s.sid, None)
        if old is not None:
            # The old position's last batch must be out before the new one starts.
            await self._drop_and_wait(old)
        await self.send(protocol.reply_ok(
            req["id"], session=s.sid, mode=mode, state=snap.state, first_seq=snap.first_seq,
            next_seq=snap.next_seq, input_seq=snap.input_seq,
        ))
        self.attach(s, mode, start)

    def attach(self, s: Session, mode: str, start: int) -> None:
        old = self.attachments.pop(s.sid, None)
        if old is not None:
            self._drop(old)
        assert self.nursery is not None
        att = Attachment(session=s, mode=mode, next_seq=start, cancel=trio.CancelScope())
        self.attachments[s.sid] = att
        s.attachments.add(att)
        self.nursery.start_soon(self.worker, att)

    async def _drop_and_wait(self, att: Attachment) -> None:
        self._drop(att)
        await att.done.wait()

    def _drop(self, att: Attachment) -> None:
        att.cancel.cancel()
        s = att.session
        s.attachments.discard(att)

    def detach_all(self) -> None:
        for att in self.attachments.values():
            self._drop(att)
        sessions = [a.session for a in self.attachments.values()]
        self.attachments.clear()
        for s in sessions:
            self.registry.nursery.start_soon(self._maybe_end, s)

    async def _maybe_end(self, s: Session) -> None:
        if not s.removed and s.life_over(self.config.keep_s):
            await self.registry.end_by_keep(s)

    async def op_detach(self, req: dict) -> None:
        if self.server.cluster is not None and await self.server.cluster.remote.detach(self, req["session"]):
            await self.send(protocol.reply_ok(req["id"]))
            return
        att = self.attachment(req["session"], write=False)
        self.attachments.pop(att.session.sid, None)
        # No frame of this session may follow the reply.
        await self._drop_and_wait(att)
        await self.send(protocol.reply_ok(req["id"]))
        await self._maybe_end(att.session)

    async def op_ack(self, req: dict) -> None:
        if self.server.cluster is not None and await self.server.cluster.remote.ack(self, req["session"], req["seq"]):
            return
        att = self.attachment(req["session"], write=False)
        if att.mode != "rw":
            return  # acks over a viewer attachment are ignored
        await self.registry.ack(att.session, req["seq"])

    async def op_input(self, req: dict) -> None:
        if self.server.cluster is not None and await self.server.cluster.remote.input(self, req):
            return
        att = self.attachment(req["session"], write=True)
        s = att.session
        msg: dict[str, Any] = {"t": "input", "seq": req["seq"]}
        if req["stdin"]:
            msg["stdin"] = True
        if req["eof"]:
            msg["eof"] = True
        else:
            # stdin: the bytes themselves; else the value's CBOR, for api.recv().
            msg["data"] = req["data"] if req["stdin"] else protocol.encode(req["data"])
        if s.on_disk:
            r = self._input_after_end(s, req["seq"])
        else:
            try:
                r = await self.registry.call(s, msg)
            except ExchangeGone:
                if not s.snap.has_ended:
                    raise
                r = self._input_after_end(s, req["seq"])
        if r["ok"]:
            self.server.metrics.inputs.inc()
            await self.send(protocol.event("in_ack", session=s.sid, seq=r["input_seq"]))
        else:
            raise protocol.RequestError(r["code"], r["message"])

    def _input_after_end(self, s: Session, seq: int) -> dict:
        """Its function ended and no exchange answers: a re-sent input is still a duplicate."""
        verdict = session_core.judge_input(s.snap.input_seq, seq, running=False)
        if verdict == session_core.DUPLICATE:
            return {"ok": True, "input_seq": s.snap.input_seq}
        return {"ok": False, "code": verdict.code, "message": verdict.message}

    async def op_state_get(self, req: dict) -> None:
        s, _ = self.by_token(req["token"], owner=False)
        value = protocol.decode(s.shared_value, require_map=False)
        await self.send(protocol.reply_ok(req["id"], version=s.shared_version, value=value))

    async def op_state_put(self, req: dict) -> None:
        s, _ = self.by_token(req["token"], owner=True)
        value = protocol.encode(req["value"])
        if len(value) > MAX_STATE_BYTES:
            raise protocol.RequestError("too_large", f"shared state is at most {MAX_STATE_BYTES} bytes encoded")
        ok, version = await self.registry.put_state(s, value, req["if_version"])
        if not ok:
            raise protocol.RequestError("conflict", "shared state changed", version=version)
        await self.send(protocol.reply_ok(req["id"], version=version))

    # -- the attachment worker ---------------------------------------------------

    async def worker(self, att: Attachment) -> None:
        s = att.session
        # Checksums: of everything for a session found on disk at start; else of
        # what is on disk already (the steady stream after it is read unchecked).
        verify_below = 1 << 62 if s.check_log else s.snap.next_seq
        cursor = sessionlog.Cursor(s.dir, "out", att.next_seq, verify_below=verify_below)
        try:
            with att.cancel:
                await self._pump(att, s, cursor)
        except ConnectionClosed:
            pass
        finally:
            cursor.close()
            try:
                if att.ended and not self.dead and self.attachments.get(s.sid) is att:
                    self.attachments.pop(s.sid, None)
                    code, why = ("forbidden", att.why) if att.why else ("gone", "the session was destroyed")
                    with trio.CancelScope(shield=True), trio.move_on_after(1):
                        try:
                            await self.send(protocol.error_event(s.sid, code, why))
                        except ConnectionClosed:
                            pass
            finally:
                att.done.set()

    async def _pump(self, att: Attachment, s: Session, cursor: sessionlog.Cursor) -> None:
        while True:
            changed = s.changed
            if s.removed:
                att.ended = True
                return
            if s.shared_version > att.state_version_sent:
                att.state_version_sent = s.shared_version
                value = protocol.decode(s.shared_value, require_map=False)
                await self.send(protocol.event("state", session=s.sid, version=s.shared_version, value=value))
                continue
            snap = s.snap
            if att.next_seq < snap.first_seq:
                a, b = att.next_seq, snap.first_seq - 1
                reason = snap.gap_reason(a)
                await self.send(protocol.out_event(s.sid, [protocol.gap_frame(a, b, reason)]))
                self.server.metrics.gap_frames.labels(reason).inc(b - a + 1)
                att.next_seq = b + 1
                cursor.seek(att.next_seq)
                continue
            if att.next_seq < snap.next_seq:
                try:
                    frames = cursor.read(snap.next_seq, self.out_budget)
                except FileNotFoundError:
                    # Trimmed under our feet: the exchange's next progress says how far.
                    cursor.seek(att.next_seq)
                    with trio.move_on_after(0.05):
                        await changed.wait()
                    continue
                except sessionlog.LogCorrupt as exc:
                    log.error("session %s: output log is corrupt: %s", s.sid, exc)
                    await self.send(protocol.error_event(s.sid, "internal", f"output log is corrupt: {exc}"))
                    return
                if frames:
                    await self.send(protocol.out_event_parts(s.sid, frames))
                    self.server.metrics.frames_out.inc(len(frames))
                    att.next_seq = cursor.next_seq
                continue
            await changed.wait()


@dataclass
class Listening:
    """What ``serve`` reports once it listens."""

    port: int
    listeners: list[trio.SocketListener] | list[trio.SSLListener[trio.SocketStream]]


async def serve(config: Config, *, task_status: trio.TaskStatus[Listening] = trio.TASK_STATUS_IGNORED) -> None:
    """Run the server until cancelled: WebSocket at /v1 and plain HTTP on one port."""
    config.check()
    store = Store(config.data_dir)
    ssl_context = None
    if config.tls_cert:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.load_cert_chain(config.tls_cert, config.tls_key)
    async with trio.open_nursery() as nursery:
        registry = Registry(config, store, nursery)
        await registry.recover()
        nursery.start_soon(registry.reaper)
        nursery.start_soon(registry.pool_keeper)
        server = Server(config, registry, store)
        if config.cluster:
            from bento.cluster.node import run as run_cluster

            server.cluster = await nursery.start(run_cluster, config, registry)
        server.gate.recover(list(registry.sessions.values()))
        if ssl_context is None:
            listeners = await nursery.start(partial(trio.serve_tcp, server.handle, config.port, host=config.host))
        else:
            # https_compatible: a peer may close without TLS's close_notify, as browsers do.
            listeners = await nursery.start(partial(trio.serve_ssl_over_tcp, server.handle, config.port,
                                                    ssl_context, host=config.host, https_compatible=True))
        first = getattr(listeners[0], "transport_listener", listeners[0])  # under TLS: its TCP listener
        task_status.started(Listening(first.socket.getsockname()[1], listeners))
