"""The exchange's side of the driver: the function's messages, and what goes to it.

Over the driver's fds 3/4 (bento_driver.wire frames): ``api.send`` values
become ``msg`` frames, shared-state gets and puts are answered, the driver's
exit report is kept for the exit frame, and input and signals go to the
function. Everything the driver sends is untrusted (the function may write
anything to fd 4): a malformed message kills the function with a
``ProtocolViolation``, and never harms the exchange. Runs inside the exchange:
no trio, never a blocking write.
"""

from __future__ import annotations

import selectors

from bento_driver import wire

from bento import protocol, session_core
from bento.launch import Link

TYPE_CHECKING = False  # the exchange does not import typing (it starts per session)
if TYPE_CHECKING:
    from typing import Any

    from bento.exchange import Exchange


class DriverSide:
    """The link to one function's driver and what it reported."""

    def __init__(self, ex: Exchange, link: Link, up: bool = False) -> None:
        self.ex = ex
        self.link = link
        # The driver said it runs (a warm environment's ``up`` was read before
        # it had a session: bento/warm.py).
        self.up = up
        self.report: dict | None = None  # its exit message

    def flush(self) -> None:
        link = self.link
        link.flush()
        self.ex.watch_fd(link.wfd, selectors.EVENT_WRITE if link.outbuf else 0, self.on_writable)

    def on_writable(self, _fd: int) -> None:
        self.flush()

    def on_readable(self, _fd: int) -> None:
        # New messages: what was printed before them may be in the pipes still.
        self.ex.output.pipes_seen_empty = False
        if not self.link.feed():
            self.ex.watch_fd(self.link.rfd, 0, None)
        self.messages()

    def messages(self) -> None:
        """Handle the driver's messages while the buffer has room: with policy
        ``block`` a full buffer leaves the rest unread, so the limit holds to
        within one frame however many messages one read brought."""
        ex = self.ex
        try:
            while ex.reading or ex.drain_deadline is not None:
                body = self.link.next()
                if body is None:
                    return
                if body[:1] == wire.SEND_TAG:
                    self.on_send(body)
                else:
                    self.handle(protocol.decode(body, max_size=ex.max_message + 4096))
        except (ValueError, KeyError, TypeError, IndexError, protocol.ProtocolError) as exc:
            ex.kill("protocol", error={"type": "ProtocolViolation",
                                         "message": f"the function broke the driver protocol: {exc}"})

    def on_send(self, body: bytes) -> None:
        """``api.send``: wire.SEND_TAG, channel length (1 byte), channel (UTF-8), value (CBOR)."""
        n = body[1]
        ch = "msg" if n == 0 else "msg:" + body[2 : 2 + n].decode("utf-8")
        data = body[2 + n :]
        max_value = self.ex.max_value
        if len(data) > max_value:
            raise ValueError("value too large")
        if not plain_scalar(data):
            protocol.decode(data, max_size=max_value, max_depth=protocol.MAX_DEPTH - 3,
                            require_map=False)
        self.ex.output.value(ch, data)

    def handle(self, msg: dict) -> None:
        """One message of the driver (see wire.MESSAGES); a bad one raises."""
        t = wire.check(wire.FROM_DRIVER, msg)
        ex = self.ex
        core = ex.core
        if t == "get":
            self.send("state", version=core.shared_version, value=core.shared_value)
        elif t == "put":
            value, if_version = msg["v"], msg.get("if")
            if not isinstance(value, bytes) or (if_version is not None and not isinstance(if_version, int)):
                raise ValueError("bad put")
            if len(value) > session_core.MAX_STATE_BYTES:
                self.send("put", ok=False, version=core.shared_version,
                          error=f"shared state is limited to {session_core.MAX_STATE_BYTES} bytes")
                return
            protocol.decode(value, max_size=session_core.MAX_STATE_BYTES,
                            max_depth=protocol.MAX_DEPTH - 2, require_map=False)
            ok, version, actions = core.put_state(value, if_version)
            ex.apply(actions)
            self.send("put", ok=ok, version=version)
        elif t == "wait":
            on = msg["on"]
            if on not in session_core.WAITS:
                raise ValueError(f"cannot wait for {on!r}")
            ex.apply(core.wait(on))
        elif t == "up":
            self.up = True
        elif t == "exit":
            if msg.get("result") is not None:
                protocol.decode(msg["result"], max_size=ex.max_value,
                                max_depth=protocol.MAX_DEPTH - 4, require_map=False)
            self.report = msg

    def send(self, t: str, **fields: Any) -> None:
        self.link.queue(protocol.encode(wire.message(wire.TO_DRIVER, t, **fields)))
        self.flush()


_UINT_BYTES = {24: 1, 25: 2, 26: 4, 27: 8}  # a head's additional info -> its argument's bytes
_SIMPLE = {(0xF4, 1), (0xF5, 1), (0xF6, 1), (0xF9, 3), (0xFA, 5), (0xFB, 9)}  # (initial byte, size)


def plain_scalar(data: bytes) -> bool:
    """True if ``data`` is exactly one valid CBOR integer, byte string, text string,
    float or false/true/null: the common values, checked without the full decoder.
    (On every ``api.send``: a one-byte length, the usual one, is read in place.)"""
    if not data:
        return False
    ib = data[0]
    if ib >= 0x80:  # major type 4 and up: only false, true, null and floats are plain
        return (ib, len(data)) in _SIMPLE
    ai = ib & 0x1F
    if ai < 24:
        n, head = ai, 1
    elif ai == 24:
        if len(data) < 2:
            return False
        n, head = data[1], 2
    else:
        size = _UINT_BYTES.get(ai)
        if size is None or len(data) < 1 + size:
            return False
        n, head = int.from_bytes(data[1 : 1 + size], "big"), 1 + size
    if ib < 0x40:  # an integer: its head is all of it
        return len(data) == head
    if len(data) != head + n:
        return False
    if ib >= 0x60:  # a text string: valid UTF-8
        try:
            data[head:].decode("utf-8")
        except UnicodeDecodeError:
            return False
    return True
