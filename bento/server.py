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

The ops are mixins of ``Connection``, one module per concern: ``store`` and
``execute`` (bento/server_execute.py), attachments and their workers
(bento/server_attach.py), input and shared state (bento/server_input.py),
the ops on a session as a whole (bento/admin.py) and on real jobs' files
and terminal (bento/server_jobs.py).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import trio

import bento
from bento import auth, events, http, protocol, tcptune, transport
from bento.admin import SessionOps
from bento.admission import Admission
from bento.config import Config
from bento.gate import Gate, machine_capacity
from bento.metrics import Metrics
from bento.readiness import Readiness
from bento.server_attach import AttachOps
from bento.server_execute import ExecuteOps
from bento.server_input import InputOps
from bento.server_jobs import JobOps, installer
from bento.sessions import Attachment, ExchangeGone, Registry
from bento.store import Store
from bento.transport import ConnectionClosed, WebSocket

log = logging.getLogger("bento.server")

MIN_SEND_RATE = 64 * 1024  # bytes/s a client must at least take to keep its connection
MIN_OUT_BUDGET = 64 * 1024
TOKEN_OPS = ("attach", "signal", "status", "destroy", "state_get", "state_put", "share", "resize", "file_get",
             "file_put")


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
        self.gate = Gate(Admission(capacity, config.quotas), config.data_dir)
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
            if at_v1 and request.method in (b"GET", b"HEAD"):
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


class Connection(SessionOps, JobOps, ExecuteOps, AttachOps, InputOps):
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
        if self.server.cluster is not None and op in TOKEN_OPS and "token" in req:
            found = self.registry.by_token(req["token"])
            # (A viewer token share took from a session here is answered here, whatever Redis holds.)
            if (found is None and not self.registry.retired(req["token"])) or (
                    op == "attach" and found is not None and found[0].verdict is not None):
                # Another node runs it, or the cluster ended it while this node was away.
                await self.server.cluster.remote.serve(self, req)
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
            from bento.cluster.placement import Placement

            server.cluster = await nursery.start(run_cluster, config, registry)
            server.cluster.placement = Placement(server.cluster, server)
        server.gate.recover(list(registry.sessions.values()))
        if ssl_context is None:
            listeners = await nursery.start(partial(trio.serve_tcp, server.handle, config.port, host=config.host))
        else:
            # https_compatible: a peer may close without TLS's close_notify, as browsers do.
            listeners = await nursery.start(partial(trio.serve_ssl_over_tcp, server.handle, config.port,
                                                    ssl_context, host=config.host, https_compatible=True))
        first = getattr(listeners[0], "transport_listener", listeners[0])  # under TLS: its TCP listener
        task_status.started(Listening(first.socket.getsockname()[1], listeners))
