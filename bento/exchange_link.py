"""The server's link to an exchange: requests, replies and announcements over its socket.

An exchange (started by bento/exchanges.py) talks to the server over a Unix socket in
length-prefixed CBOR (bento_driver.wire frames, bento.protocol's codec: the
same bytes the exchange writes). Its first message is ``hello`` with the
wire version; an exchange of another version is refused with a message that
says why. Nothing here knows the session rules: bento/sessions.py does.

Cancellation: every request to an exchange is one message on an ordered
socket; a request cancelled while waiting for its reply may still take effect
(like any request whose connection drops), which is why input carries seqs.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable

import trio
from bento_driver import wire

from bento import protocol
from bento.quick import QuickWriter

log = logging.getLogger("bento.sessions")

SPAWN_TIMEOUT_S = 10.0
CALL_TIMEOUT_S = 30.0


def kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class ExchangeGone(Exception):
    """The session's exchange is not reachable (it died or the session ended)."""


def last_log_line(path: str) -> str:
    """The last line of an exchange's log, to say why it did not start."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 1024))
            lines = f.read().decode(errors="replace").strip().splitlines()
    except OSError as exc:
        return f"its log {path} cannot be read: {exc.strerror}"
    return f"{lines[-1][:300]} (in {path})" if lines else f"its log {path} is empty"


class ExchangeLink:
    """Requests and replies over one exchange's control socket."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.framer = wire.Framer(1 << 31)
        self.send_lock = trio.Lock()
        self.quick = QuickWriter(stream.socket, self.send_lock) if isinstance(stream, trio.SocketStream) else None
        self.pending: dict[int, tuple[trio.Event, list[dict]]] = {}
        self.next_rid = 1
        self.ended = trio.Event()  # its reader took its last message (fail_pending)
        self.home: str | None = None  # a warm exchange's directory until a session takes it
        self.kill: Callable[[], None] | None = None  # a warm exchange's process, if it will not answer
        self.taken: trio.Event | None = None  # a warm one taken: set at its first message after the hello
        # A warm one's limits, on its environment already, and its driver's part of
        # them (None: not on): a session with these limits gets its start from the
        # server (bento/launch.py, send_start).
        self.limits: dict | None = None
        self.rlimits: dict | None = None

    async def send(self, msg: dict) -> None:
        wire.check(wire.TO_EXCHANGE, msg)
        data = wire.frame(protocol.encode(msg))
        try:
            sent = None if self.quick is None else self.quick.write_now((data,))
            if sent is None:  # (the lock is held from here on either way)
                await self.send_lock.acquire()
            try:
                if (sent or 0) < len(data):
                    await self.stream.send_all(memoryview(data)[sent or 0 :])
            finally:
                self.send_lock.release()
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ExchangeGone(str(exc)) from None

    async def call(self, msg: dict) -> dict:
        if self.ended.is_set():
            raise ExchangeGone("the exchange is gone")
        rid = self.next_rid
        self.next_rid += 1
        done = trio.Event()
        slot: list[dict] = []
        self.pending[rid] = (done, slot)
        try:
            await self.send({**msg, "rid": rid})
            with trio.fail_after(CALL_TIMEOUT_S):
                await done.wait()
        except trio.TooSlowError:
            raise ExchangeGone("the exchange did not answer") from None
        finally:
            self.pending.pop(rid, None)
        if not slot:
            raise ExchangeGone("the exchange is gone")
        return slot[0]

    async def receive(self, check: bool = True) -> dict | None:
        """The exchange's next message (checked against wire.MESSAGES unless
        ``check`` is false), or None when the link is gone or broke the wire."""
        while True:
            try:
                body = self.framer.next()
                if body is not None:
                    msg: dict = protocol.decode_internal(body)
                    if check:
                        wire.check(wire.FROM_EXCHANGE, msg)
                    return msg
            except (wire.WireError, wire.FrameTooLarge, protocol.ProtocolError) as exc:
                log.error("an exchange broke the internal wire, dropping its link: %s", exc)
                return None
            try:
                chunk = await self.stream.receive_some(1 << 16)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                chunk = b""
            if not chunk:
                return None
            self.framer.feed(chunk)

    def deliver(self, msg: dict) -> bool:
        """Hand a reply to its waiting call; False if ``msg`` is no reply."""
        if msg["t"] != "reply":
            return False
        waiter = self.pending.get(msg["rid"])
        if waiter is not None:
            waiter[1].append(msg)
            waiter[0].set()
        return True

    def fail_pending(self) -> None:
        self.ended.set()
        for done, _slot in self.pending.values():
            done.set()
        self.pending.clear()

    async def hello(self) -> dict:
        """The exchange's first message, checked: its version must be one we accept."""
        # The version first: an exchange of another version may not fit the table.
        hello = await self.receive(check=False)
        if not isinstance(hello, dict) or hello.get("t") != "hello":
            await self.stream.aclose()
            raise ExchangeGone(f"the exchange did not say hello ({hello!r:.80})")
        version = hello.get("wire")
        if type(version) is not int or version not in wire.ACCEPTED:
            await self.stream.aclose()
            raise ExchangeGone(
                f"the exchange (pid {hello.get('pid')}) speaks internal wire version "
                f"{hello.get('wire', 1)}, this server {wire.VERSION}: it was started by another Bento "
                "version; let it finish under that version, or stop it (its session is then adopted as lost)")
        try:
            wire.check(wire.FROM_EXCHANGE, hello)
        except wire.WireError as exc:
            await self.stream.aclose()
            raise ExchangeGone(f"the exchange's hello broke the internal wire: {exc}") from None
        return hello
