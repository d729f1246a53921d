"""The server's side of one WebSocket connection: wsproto driven over a trio stream.

wsproto (sans-IO) does the protocol: the opening handshake, parsing and
unmasking the client's frames, control frames and the close handshake. This
module does the IO around it (a ``trio.SocketStream``, or a ``trio.SSLStream``
for TLS) and one thing more: it writes the server's own binary data frames.
A server-to-client frame needs no mask (RFC 6455 5.1) and, with no extension
(this server accepts none), its header is 2 to 10 bytes (``frame_header``).
On a plain socket ``send_binary`` hands that header and the message's pieces
to one ``sendmsg`` (scatter-gather), so the frame bytes a worker read from a
session's log leave without being copied; wsproto's ``send(Message)`` would
build each message into fresh buffers first (docs/performance.md).

It never lets a peer cost more than its own connection: a message larger than
``max_message`` is refused with close 1009 before it is assembled, a protocol
violation closes with wsproto's code, and every failure of the stream becomes
``ConnectionClosed``. Timeouts (handshake, idle, send) are the caller's.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import h11
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Request,
    TextMessage,
)
from wsproto.utilities import RemoteProtocolError

from bento.quick import QuickWriter

# One read from the stream: large, so a 16 MiB message takes 256 reads, not thousands.
RECEIVE_SIZE = 64 * 1024
# Pieces per sendmsg (the kernel's IOV_MAX is 1024); more are joined first.
MAX_PIECES = 64
# How long a control frame (pong, close) may wait to be written.
CONTROL_TIMEOUT_S = 5.0
# How long aclose waits for the peer's close frame before closing the stream.
CLOSE_WAIT_S = 2.0

BINARY_FIN = 0x82  # FIN + opcode 2 (binary)


def _after(parts: list[bytes | memoryview], n: int) -> list[bytes | memoryview]:
    """What is left of ``parts`` once their first ``n`` bytes are written."""
    for i, part in enumerate(parts):
        if n < len(part):
            return [memoryview(part)[n:], *parts[i + 1 :]]
        n -= len(part)
    return []


class ConnectionClosed(Exception):
    """The connection is closed or closing: by the peer, by this side, or
    because the stream broke (code 1006). ``code`` and ``reason`` are those of
    the close frame that ended it (the first one, whichever side sent it)."""

    def __init__(self, code: int | None = 1006, reason: str = "") -> None:
        super().__init__(f"WebSocket closed ({code}{': ' + reason if reason else ''})")
        self.code = code
        self.reason = reason


class HandshakeRefused(Exception):
    """An upgrade request wsproto refuses; answer it with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Traffic:
    """Bytes of WebSocket data (frames, headers included) in and out, counted
    over every connection that shares this object."""

    received: int = 0
    sent: int = 0


def frame_header(n: int) -> bytes:
    """The header of an unmasked, final, binary frame of ``n`` payload bytes (RFC 6455 5.2)."""
    if n < 126:
        return bytes((BINARY_FIN, n))
    if n < 65536:
        return bytes((BINARY_FIN, 126)) + n.to_bytes(2, "big")
    return bytes((BINARY_FIN, 127)) + n.to_bytes(8, "big")


def is_upgrade(request: h11.Request) -> bool:
    """Whether ``request`` asks for a WebSocket upgrade (its Upgrade header names websocket)."""
    return any(name == b"upgrade" and b"websocket" in value.lower() for name, value in request.headers)


async def accept(stream: trio.abc.Stream, request: h11.Request, trailing: bytes, *,
                 max_message: int, traffic: Traffic) -> WebSocket:
    """Complete the opening handshake of an upgrade request that h11 has read
    (``trailing``: bytes that came after its head). Raises HandshakeRefused for
    a request wsproto will not accept (nothing was written then), and
    ConnectionClosed when the stream breaks while the answer is written."""
    if request.method != b"GET":
        raise HandshakeRefused(400, "a WebSocket upgrade is a GET request")
    conn = WSConnection(ConnectionType.SERVER)
    try:
        conn.initiate_upgrade_connection(list(request.headers), request.target)
        events = list(conn.events())
    except RemoteProtocolError as exc:
        hint = exc.event_hint
        raise HandshakeRefused(getattr(hint, "status_code", 400), str(exc)) from None
    if not any(isinstance(e, Request) for e in events):
        raise HandshakeRefused(400, "not a WebSocket upgrade request")
    ws = WebSocket(stream, conn, max_message=max_message, traffic=traffic)
    await ws._write([conn.send(AcceptConnection())])
    if trailing:
        ws._feed(trailing)
    return ws


class WebSocket:
    """An open WebSocket connection, server side. One task receives
    (``receive_message``); any number may send (``send_binary``, serialised)."""

    def __init__(self, stream: trio.abc.Stream, conn: WSConnection, *, max_message: int,
                 traffic: Traffic) -> None:
        self.stream = stream
        self.max_message = max_message
        self.traffic = traffic
        self._conn = conn
        self._events: deque[Event] = deque()
        self._parts: list[bytes | bytearray | str] = []  # the message being received
        self._size = 0
        self._send_lock = trio.Lock()
        # A plain socket takes the pieces of a message in one sendmsg; a TLS
        # stream needs them joined (it encrypts into its own buffer anyway).
        self._socket = stream.socket if isinstance(stream, trio.SocketStream) else None
        self._quick = None if self._socket is None else QuickWriter(self._socket, self._send_lock)
        self._reading = False
        self._closed: ConnectionClosed | None = None
        self._peer_closed = trio.Event()  # the peer's close frame arrived, or the stream ended
        self._stream_closed = False

    @property
    def closed(self) -> ConnectionClosed | None:
        """Why the connection is closed or closing, or None while it is open."""
        return self._closed

    # -- receiving ---------------------------------------------------------------

    async def receive_message(self) -> bytes | str:
        """The next whole message (bytes, or str for a text message).

        Answers pings, and the peer's close (then raises ConnectionClosed).
        Cancellation: safe at any point; a message partly received is kept
        for the next call."""
        while True:
            while self._events:
                message = await self._handle(self._events.popleft())
                if message is not None:
                    return message
            if self._closed is not None and self._peer_closed.is_set():
                raise self._closed
            self._reading = True
            try:
                data = await self.stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            finally:
                self._reading = False
            self._feed(data)

    def _feed(self, data: bytes | bytearray) -> None:
        self.traffic.received += len(data)
        if self._conn.state is ConnectionState.CLOSED:
            self._events.append(CloseConnection(code=1006))
            return
        # None: the stream ended (close 1006).
        self._conn.receive_data((data if isinstance(data, bytes) else bytes(data)) or None)
        self._events.extend(self._conn.events())

    async def _handle(self, event: Event) -> bytes | str | None:
        if isinstance(event, (BytesMessage, TextMessage)):
            if self._closed is not None:
                return None  # closing: what still arrives is discarded
            self._size += len(event.data)
            if self._size > self.max_message:
                await self._refuse(1009, f"message larger than {self.max_message} bytes")
            self._parts.append(event.data)
            if not event.message_finished:
                return None
            parts, self._parts, self._size = self._parts, [], 0
            if len(parts) == 1 and not isinstance(parts[0], bytearray):
                return parts[0]  # the common case: a message in one frame, taken as it is
            if isinstance(event, TextMessage):
                return "".join(p for p in parts if isinstance(p, str))
            return b"".join(p for p in parts if not isinstance(p, str))
        if isinstance(event, Ping):
            if self._conn.state is ConnectionState.OPEN:
                await self._control(self._conn.send(event.response()))
            return None
        if isinstance(event, CloseConnection):
            await self._peer_close(event)
        return None  # a Pong: nothing to do

    async def _refuse(self, code: int, reason: str) -> None:
        """Close because of what the peer sent: never returns."""
        await self.aclose(code, reason)
        assert self._closed is not None
        raise self._closed

    async def _peer_close(self, event: CloseConnection) -> None:
        """The peer closed (or the stream ended, 1006, or the peer broke the
        protocol: then the state is still OPEN and the code is wsproto's)."""
        if self._closed is None:
            self._closed = ConnectionClosed(event.code, event.reason or "")
        if self._conn.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
            await self._control(self._conn.send(CloseConnection(event.code, event.reason)))
        self._peer_closed.set()
        await self._close_stream()
        raise self._closed

    # -- sending -----------------------------------------------------------------

    async def send_binary(self, pieces: Sequence[bytes | memoryview], size: int | None = None) -> None:
        """Send the concatenation of ``pieces`` (``size`` bytes, counted when
        not given) as one binary message.

        ConnectionClosed once the connection is closed or closing, or when the
        stream breaks. Cancellation: a cancelled send that had written part of
        the frame aborts the connection (the stream would be unusable)."""
        if self._closed is not None or self._conn.state is not ConnectionState.OPEN:
            raise self._closed or ConnectionClosed(1006, "closing")
        if size is None:
            size = sum(len(p) for p in pieces)
        parts = [frame_header(size), *pieces]
        sent = None
        if self._quick is not None and not self._stream_closed and len(parts) <= MAX_PIECES:
            try:
                sent = self._quick.write_now(parts)
            except OSError:
                await self._broken()
                raise self._closed or ConnectionClosed(1006) from None
        if sent is None:
            async with self._send_lock:
                await self._write(parts)
            return
        try:
            self.traffic.sent += sent
            if sent < size + len(parts[0]):
                await self._write(_after(parts, sent), started=sent > 0)
        finally:
            self._send_lock.release()

    async def _control(self, data: bytes) -> None:
        """Write a control frame (wsproto's bytes), within CONTROL_TIMEOUT_S or
        the stream is closed."""
        try:
            with trio.move_on_after(CONTROL_TIMEOUT_S) as scope:
                async with self._send_lock:
                    await self._write([data])
        except ConnectionClosed:
            return  # the stream is gone: nobody to tell
        if scope.cancelled_caught:
            await self._close_stream()

    async def _write(self, parts: list[bytes | memoryview], started: bool = False) -> None:
        """Write ``parts`` in order, as one write where the stream allows it
        (``started``: part of the frame is written already)."""
        if self._stream_closed:
            raise self._closed or ConnectionClosed(1006)
        try:
            if self._socket is None:
                started = True
                data = b"".join(parts)
                await self.stream.send_all(data)
                self.traffic.sent += len(data)
            else:
                if len(parts) > MAX_PIECES:
                    # Many small pieces: one copy of them is cheaper than many iovecs.
                    parts = [parts[0], b"".join(parts[1:])]
                views = [memoryview(p).cast("B") for p in parts if len(p)]
                i = 0
                while i < len(views):
                    sent = await self._socket.sendmsg(views[i:])
                    started = True
                    self.traffic.sent += sent
                    while sent:
                        if sent >= len(views[i]):
                            sent -= len(views[i])
                            i += 1
                        else:
                            views[i] = views[i][sent:]
                            sent = 0
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            await self._broken()
            raise self._closed or ConnectionClosed(1006) from None
        except BaseException:
            if started:
                await self._broken()
            raise

    async def _broken(self) -> None:
        if self._closed is None:
            self._closed = ConnectionClosed(1006, "the connection broke")
        await self._close_stream()

    # -- closing -----------------------------------------------------------------

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """Close with the close handshake: send a close frame, wait for the
        peer's (at most CLOSE_WAIT_S), then close the stream. Idempotent;
        raises nothing but Cancelled, and the stream is closed even then."""
        if self._stream_closed:
            return
        try:
            if self._conn.state is ConnectionState.OPEN:
                if self._closed is None:
                    self._closed = ConnectionClosed(code, reason)
                await self._control(self._conn.send(CloseConnection(code, reason[:120])))
            with trio.move_on_after(CLOSE_WAIT_S):
                if self._reading:
                    await self._peer_closed.wait()  # the receiving task sees it
                else:
                    try:
                        while True:
                            await self.receive_message()
                    except ConnectionClosed:
                        pass
        finally:
            await self._close_stream()

    async def _close_stream(self) -> None:
        """Close the stream at once (a task blocked receiving gets ConnectionClosed)."""
        if self._stream_closed:
            return
        self._stream_closed = True
        self._peer_closed.set()
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(self.stream)
