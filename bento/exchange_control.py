"""The exchange's control socket: the server's requests, applied to the session.

One server at a time talks to an exchange, over ``ctl.sock`` in the session
directory (a new connection replaces the old one). Every request is a message
of ``bento_driver.wire.MESSAGES``; the replies carry its ``rid``. Runs inside
the exchange: no trio, never a blocking write (a server that stops reading is
dropped, and gets a fresh snapshot when it reconnects).
"""

from __future__ import annotations

import os
import selectors
import socket

from bento_driver import wire
from bento_sandbox.unix import short_path

from bento import protocol, session_core
from bento.launch import Link, loads, set_window
from bento.session_core import DUPLICATE, Refused

TYPE_CHECKING = False  # the exchange does not import typing (it starts per session)
if TYPE_CHECKING:
    from typing import Any

    from bento.exchange import Exchange

MAX_PENDING_INPUT = 16 * 1024 * 1024
MAX_CTL_OUT = 64 * 1024 * 1024


def unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class Control:
    """The listening socket and the one server connection of an exchange."""

    def __init__(self, ex: Exchange) -> None:
        self.ex = ex
        self.sock: socket.socket | None = None
        self.conn: socket.socket | None = None
        self.link: Link | None = None

    def listen(self) -> socket.socket:
        ex = self.ex
        unlink(os.path.join(ex.dir, "ctl.sock"))
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with short_path(os.path.join(ex.dir, "ctl.sock")) as path:
            sock.bind(path)
        sock.listen(4)
        sock.setblocking(False)
        ex.sel.register(sock, selectors.EVENT_READ, self.on_accept)
        self.sock = sock
        return sock

    def on_accept(self, sock: socket.socket) -> None:
        try:
            conn, _ = sock.accept()
        except BlockingIOError:
            return
        self.use(conn)

    def use(self, conn: socket.socket, said: dict | None = None) -> None:
        """Serve this connection; one server at a time: a new one replaces the old one.
        ``said``: the hello this exchange sent on it already (``hello``, before it
        set itself up); a progress follows if the session is not as it said."""
        ex = self.ex
        self.drop()
        conn.setblocking(False)
        self.conn = conn
        self.link = Link(conn.fileno(), conn.fileno(), 2 * ex.max_message + 4096)
        ex.sel.register(conn, selectors.EVENT_READ, self.on_io)
        msg = hello(ex.enforced, ex.core)
        if said is None:
            self.send(msg)
        ex.progress_dirty = said is not None and said != msg

    def drop(self) -> None:
        if self.conn is not None:
            self.ex.sel.unregister(self.conn)
            self.conn.close()
            self.conn = None
            self.link = None

    def send(self, msg: dict) -> None:
        link = self.link
        if link is None:
            return
        link.queue(protocol.encode(msg))
        link.flush()
        if len(link.outbuf) > MAX_CTL_OUT:
            # The server stopped reading: drop it; it reconnects and gets a snapshot.
            self.drop()

    def on_io(self, sock: socket.socket) -> None:
        ex = self.ex
        server = self.link
        if server is None:
            return
        if server.outbuf:
            server.flush()
        alive = server.feed()
        try:
            while not ex.finished and (body := server.next()) is not None:
                self.handle(loads(body))
        except (wire.WireError, wire.FrameTooLarge, protocol.ProtocolError) as exc:
            # A server of another version, or not a server: it gets no more of this session.
            ex.disk_trouble(f"dropping a control connection that broke the wire: {exc}")
            alive = False
        if not alive and not ex.finished:
            self.drop()

    def reply(self, rid: int, **fields: Any) -> None:
        self.send(wire.message(wire.FROM_EXCHANGE, "reply", rid=rid, **fields))

    def handle(self, msg: dict) -> None:
        """One request of the server (see wire.MESSAGES)."""
        t = wire.check(wire.TO_EXCHANGE, msg)
        rid = msg.get("rid", 0)
        ex = self.ex
        core = ex.core
        if t == "input":
            self.on_input(rid, msg)
        elif t == "ack":
            ex.apply(core.ack(msg["seq"]))
        elif t == "sync":
            self.reply(rid, ok=True, **core.snapshot())
        elif t == "trim":
            ex.apply(core.trim_history(msg["keep"]))
            self.reply(rid, ok=True, **core.snapshot())
        elif t == "signal":
            if ex.build is not None and ex.build.building and core.accepts_work:
                ex.user_signal = msg["signal"]
                ex.build.kill()  # the function never starts: the session ends failed
                self.reply(rid, ok=True)
            elif not core.accepts_work or ex.child is None:
                self.reply(rid, ok=False, code="gone", message="the function has ended")
            else:
                name = msg["signal"]
                ex.user_signal = name
                if msg.get("by"):
                    # An admin's kill: the exit's error names who ended it.
                    ex.kill("admin", {"type": "Killed", "by": msg["by"], "traceback": "",
                                      "message": f"ended by {msg['by']}"})
                elif name == "KILL":
                    ex.child.kill()
                elif ex.driver is not None:
                    # Raised in the function's main thread by the driver's reader.
                    ex.driver.send("signal", sig=name)
                self.reply(rid, ok=True)
        elif t == "state_get":
            self.reply(rid, ok=True, version=core.shared_version, value=core.shared_value)
        elif t == "state_put":
            ok, version, actions = core.put_state(msg["value"], msg.get("if_version"))
            ex.apply(actions)
            if ok:
                self.reply(rid, ok=True, version=version)
            else:
                self.reply(rid, ok=False, code="conflict", message="shared state changed", version=version)
        elif t == "resize":
            if ex.child is None or not ex.meta.get("tty") or not core.accepts_work:
                self.reply(rid, ok=False, code="gone", message="no terminal: the function is not running in one")
            else:
                set_window(ex.output.tty_fd, msg["rows"], msg["cols"])
                self.reply(rid, ok=True)
        elif t == "end":
            # destroy, or the session's life is over: nothing of it remains.
            ex.kill_reason = ex.kill_reason or "destroyed"
            ex.kill_child()
            self.reply(rid, ok=True)
            if self.link:
                self.link.flush()
            ex.finished = True
            ex.remove = True
        else:
            self.reply(rid, ok=False, code="bad_request", message=f"{t!r} is not for a running exchange")

    def on_input(self, rid: int, msg: dict) -> None:
        """An input: recorded in the input log before it is acknowledged, then to the function."""
        seq = msg["seq"]
        ex = self.ex
        core = ex.core
        verdict = core.input(seq)
        if verdict == DUPLICATE:
            self.reply(rid, ok=True, input_seq=core.input_seq)
            return
        if isinstance(verdict, Refused):
            self.reply(rid, ok=False, code=verdict.code, message=verdict.message, input_seq=core.input_seq)
            return
        waiting = (len(ex.driver.link.outbuf) if ex.driver is not None else 0) + (
            ex.stdin.pending if ex.stdin is not None else 0)
        if waiting > MAX_PENDING_INPUT:
            self.reply(rid, ok=False, code="limit",
                       message="too much input is waiting for the function to read it")
            return
        eof = bool(msg.get("eof"))
        data = None if eof else msg.get("data")
        # A record is [seq, data] (data None: the eof) for api.recv(), [seq, data, true] for stdin.
        record = [seq, data, True] if msg.get("stdin") else [seq, data]
        try:
            ex.inlog.append(seq, protocol.encode(record))
        except OSError as exc:
            self.reply(rid, ok=False, code="internal", message=f"cannot record the input: {exc.strerror}")
            return
        ex.apply(core.input_recorded(seq))
        ex.deliver(record)
        if ex.stdin is not None:
            ex.stdin.pump()
        self.reply(rid, ok=True, input_seq=seq)


def hello(enforced: dict, core: session_core.SessionCore) -> dict:
    """The first message to a server: the session's positions and state as they are."""
    return wire.message(wire.FROM_EXCHANGE, "hello", wire=wire.VERSION, pid=os.getpid(), enforced=enforced,
                        shared_version=core.shared_version, shared_value=core.shared_value, **core.snapshot())
