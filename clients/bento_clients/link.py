"""One WebSocket connection of the SDK (a *link*): opening it, sending whole
messages, matching replies to requests, reading and routing what arrives.

A link never reconnects: when it dies, every request waiting on it is woken
with no reply (``LinkDied``) and the supervisor (``supervisor.py``) opens the
next one. Messages are encoded and decoded by ``bento.protocol`` only.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Iterator
from typing import Any

import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, wrap_client_stream

from bento import protocol, tcptune
from bento_clients.errors import TooLarge

__all__ = [
    "MAX_ITEMS",
    "Changed",
    "Link",
    "LinkDied",
    "OnMessage",
    "OnReply",
    "Permanent",
    "WatchedStream",
    "describe",
    "handshake",
    "open_stream",
    "permanent",
    "speaks_tls",
]

log = logging.getLogger("bento.client")

MAX_ITEMS = 4_000_000  # per received message; every item costs at least one byte

OnReply = Callable[["Link", dict[str, Any]], None]
OnMessage = Callable[["Link", dict[str, Any], int], None]


class LinkDied(Exception):
    """The link died before the reply came. ``sent`` False: the message
    certainly did not leave."""

    def __init__(self, sent: bool) -> None:
        super().__init__("the connection dropped")
        self.sent = sent


class Permanent(Exception):
    """A connection attempt failed in a way retrying cannot fix."""


class Changed:
    """A level-triggered wake-up: ``wait()`` returns after the next ``notify()``."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait(self) -> None:
        await self._event.wait()


class _Slot:
    __slots__ = ("done", "on_reply", "reply")

    def __init__(self, on_reply: OnReply | None) -> None:
        self.done = trio.Event()
        self.reply: dict[str, Any] | None = None
        self.on_reply = on_reply


class Link:
    """One WebSocket connection: its pending requests and whether it is dead.

    ``max_message`` is the server's bound from its ``hello`` reply."""

    def __init__(self, ws: Any, send_timeout: float) -> None:
        self.ws = ws
        self.send_timeout = send_timeout
        self.pending: dict[int, _Slot] = {}
        self.dead = trio.Event()
        self.why = ""
        self.max_message = protocol.DEFAULT_MAX_MESSAGE
        #: The WebSocket close code, when the server closed the link with one.
        self.close_code: int | None = None
        self._rid = 0
        self._last_sent: tuple[Any, int] = (None, 0)  # (id, size) of the last message sent

    def closed_by(self, exc: ConnectionClosed) -> None:
        """The server closed the link (``exc`` says how)."""
        if exc.reason is not None and self.close_code is None:
            self.close_code = exc.reason.code
        self.kill(describe(exc))

    def kill(self, why: str) -> None:
        if self.dead.is_set():
            return
        self.why = why
        self.dead.set()
        for slot in self.pending.values():
            slot.done.set()
        self.pending.clear()

    async def send(self, msg: dict[str, Any]) -> None:
        """Send one message whole. Shielded from cancellation: a send cut in the
        middle would leave half a WebSocket frame on the stream; a send that
        cannot finish within ``send_timeout`` kills the link instead."""
        if self.dead.is_set():
            raise LinkDied(sent=False)
        data = protocol.encode(msg)
        if len(data) > self.max_message:
            raise TooLarge.message_over(str(msg.get("op", "")), len(data), self.max_message)
        self._last_sent = (msg.get("id"), len(data))
        with trio.CancelScope(shield=True):
            try:
                with trio.fail_after(self.send_timeout):
                    await self.ws.send_message(data)
            except trio.TooSlowError:
                self.kill(f"a send did not finish within {self.send_timeout:g} s")
                raise LinkDied(sent=True) from None
            except ConnectionClosed as exc:
                self.closed_by(exc)
                raise LinkDied(sent=True) from None
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self.kill(describe(exc))
                raise LinkDied(sent=True) from None

    async def request(self, op: str, fields: dict[str, Any], on_reply: OnReply | None = None) -> dict[str, Any]:
        """One request and its reply (ok or not). ``on_reply`` runs in the reader,
        synchronously with an ok reply, before any later message is routed.
        Raises ``LinkDied`` if the link dies first; ``TooLarge`` if the request
        is over the server's ``max_message``, or if the server closed the link
        with 1009 (message too big) right after it, so it is never repeated."""
        self._rid += 1
        rid = self._rid
        slot = _Slot(on_reply)
        self.pending[rid] = slot
        try:
            await self.send({"op": op, "id": rid, **fields})
            await slot.done.wait()
        except LinkDied:
            self._check_refused(op, rid)
            raise
        finally:
            self.pending.pop(rid, None)
        if slot.reply is None:
            self._check_refused(op, rid)
            raise LinkDied(sent=True)
        return slot.reply

    def _check_refused(self, op: str, rid: int) -> None:
        """Raise ``TooLarge`` if the server closed the link with 1009 (message too
        big) and request ``rid`` was the last message sent: it is the cause."""
        last_id, size = self._last_sent
        if self.close_code == 1009 and last_id == rid:
            raise TooLarge.closed_for(op, size, self.why)

    def route_reply(self, msg: dict[str, Any]) -> None:
        """Hand a reply to the request waiting for it (unknown ids are ignored)."""
        rid = msg.get("id")
        slot = self.pending.pop(rid, None) if type(rid) is int else None
        if slot is None:
            return
        slot.reply = msg
        if slot.on_reply is not None and msg.get("ok"):
            slot.on_reply(self, msg)
        slot.done.set()

    async def read(self, max_message: int, on_message: OnMessage) -> None:
        """Read messages until the link dies: replies go to their requests, events
        to ``on_message(link, msg, wire_size)``."""
        try:
            while True:
                raw = await self.ws.get_message()
                if not isinstance(raw, bytes):
                    raise protocol.ProtocolError("the server sent a text message")
                msg = protocol.decode(raw, max_size=max_message, max_items=MAX_ITEMS)
                if msg.get("ev") is not None:
                    on_message(self, msg, len(raw))
                else:
                    self.route_reply(msg)
        except ConnectionClosed as exc:
            self.closed_by(exc)
        except protocol.ProtocolError as exc:
            self.kill(f"invalid message from the server: {exc.message}")
        finally:
            self.kill("the connection closed")

    async def keep_alive(self, interval: float, timeout: float) -> None:
        """A ``ping`` every ``interval`` s; no answer within ``timeout`` kills the link."""
        while True:
            await trio.sleep(interval)
            with trio.move_on_after(timeout) as waited:
                try:
                    await self.request("ping", {})
                except LinkDied:
                    return
            if waited.cancelled_caught:
                self.kill(f"no answer to ping within {timeout:g} s")
                return


class WatchedStream(trio.abc.Stream):
    """A transport stream that says when it breaks (``broken``), why (``error``)
    and what the peer sent first (``first``: up to 16 bytes), for ``describe``."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.broken = trio.Event()
        self.error: BaseException | None = None
        self.first = b""

    def _broke(self, exc: BaseException | None) -> None:
        if self.error is None:
            self.error = exc
        self.broken.set()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._broke(exc)
            raise

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        try:
            data = await self.stream.receive_some(max_bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._broke(exc)
            raise
        if not data:
            self._broke(None)
        elif len(self.first) < 16:
            self.first += bytes(data[:16 - len(self.first)])
        return data

    async def aclose(self) -> None:
        self.broken.set()
        await self.stream.aclose()


async def open_stream(host: str, port: int, ssl_context: ssl.SSLContext | None) -> trio.abc.Stream:
    """A TCP (or TLS over TCP) stream to the server."""
    stream: trio.abc.Stream
    if ssl_context is not None:
        stream = await trio.open_ssl_over_tcp_stream(host, port, ssl_context=ssl_context, https_compatible=True)
    else:
        stream = await trio.open_tcp_stream(host, port)
    try:
        # A server on this host: no pacing of what we send (bento/tcptune.py).
        tcptune.plain_for_same_host(tcptune.stream_socket(stream))
    except OSError as exc:  # the system's choice stays: only the pace of a same-host link differs
        log.debug("could not tune the connection's congestion control: %s", exc)
    return stream


async def handshake(nursery: trio.Nursery, stream: WatchedStream, host: str, resource: str,
                    max_message: int) -> Any:
    """The WebSocket opening handshake; the connection's background task runs in
    ``nursery``. Fails at once if the stream breaks (trio-websocket alone would
    wait for its handshake forever)."""
    made: list[Any] = []
    async with trio.open_nursery() as hs:
        async def watch() -> None:
            await stream.broken.wait()
            hs.cancel_scope.cancel()

        hs.start_soon(watch)
        made.append(await wrap_client_stream(
            nursery, stream, host, resource,  # type: ignore[arg-type]
            max_message_size=max_message, receive_buffer_size=64 * 1024))
        hs.cancel_scope.cancel()
    if not made:
        raise trio.BrokenResourceError("the connection broke during the WebSocket handshake") from stream.error
    return made[0]


# SSL errors of a TLS handshake answered by a peer that does not speak TLS.
_NOT_TLS = {"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE",
            "UNKNOWN_PROTOCOL"}


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, the exceptions in its groups, and their causes and contexts."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        if isinstance(e, BaseExceptionGroup):
            todo.extend(e.exceptions)
        todo.extend(x for x in (e.__cause__, e.__context__) if x is not None)


def permanent(exc: BaseException) -> bool:
    """Whether a failed connection attempt would fail again the same way: the
    server's certificate is not trusted, or one side speaks TLS and the other not."""
    return any(isinstance(e, ssl.SSLCertVerificationError)
               or (isinstance(e, ssl.SSLError) and e.reason in _NOT_TLS) for e in _causes(exc))


def describe(exc: BaseException | str, url: str = "") -> str:
    """Why a connection failed, in words a user can act on."""
    if isinstance(exc, str):
        return exc
    for e in _causes(exc):
        if isinstance(e, ssl.SSLCertVerificationError):
            return f"TLS: certificate verify failed: {e.verify_message} (use --ca-file or BENTO_CA_FILE)"
        if isinstance(e, ssl.SSLError) and e.reason in _NOT_TLS:
            return "this is not a TLS server: use ws://"
        if isinstance(e, ConnectionRefusedError):
            return f"connection refused — is a server running at {url or 'that address'}? start one with `make run`"
    if isinstance(exc, ConnectionRejected):
        return f"the server rejected the WebSocket handshake (HTTP {exc.status_code}); is the path /v1?"
    if isinstance(exc, ConnectionClosed) and exc.reason is not None:
        r = exc.reason
        return f"closed by the server ({r.code}{': ' + r.reason if r.reason else ''})"
    text = str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
    return text


async def speaks_tls(host: str, port: int, timeout: float = 2.0) -> bool:
    """Whether the server at ``host:port`` completes a TLS handshake (its
    certificate unchecked: nothing is sent over it). Asked only after a plain
    WebSocket handshake found the connection closed with no answer."""
    probe = ssl.create_default_context()
    probe.check_hostname = False
    probe.verify_mode = ssl.CERT_NONE
    with trio.move_on_after(timeout):
        try:
            stream = await trio.open_ssl_over_tcp_stream(host, port, ssl_context=probe, https_compatible=True)
        except OSError:
            return False
        try:
            await stream.do_handshake()
            return True
        except trio.BrokenResourceError:
            return False
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await stream.aclose()
    return False
