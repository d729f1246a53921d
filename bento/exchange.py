"""The exchange: one small process per session, the shell around its session core.

It owns the environment's pipes and the session's logs, and runs a selector
loop: the function's output becomes frames in the output log
(bento/exchange_output.py), accepted input goes to the input log and then to
the function exactly once, and the server talks to it over a Unix socket in
the session directory (``ctl.sock``). Every rule about positions, the buffer,
input seqs, shared state and the exit lives in the sans-IO session core
(bento/session_core.py); this module feeds it events and carries out its
actions. The exchange does not die with the server: a server that restarts
reconnects and finds everything where it was.

Started by the server as ``python -I -S -c ... SESSION_DIR [--adopt]``, or
warm (bento/warm.py). With ``--adopt`` there is no function to run: a
previous exchange died, and this one recovers the logs (cutting a torn tail),
marks the session ``lost`` if it never recorded an exit, and serves reads,
acks and shared state until the session's life ends.

It must never import trio (it exists once per session and must start fast),
never block on a peer (every fd is non-blocking, every outgoing buffer is
bounded or coalesced), and never trust what the function writes to its pipes.
"""

from __future__ import annotations

import array
import errno
import fcntl
import os
import selectors
import signal
import socket
import sys
import time

import bento_sandbox
from bento_driver import wire

from bento import protocol, session_core, sessionlog
from bento.exchange_build import EnvBuild
from bento.exchange_output import RETRY_SECONDS, Output
from bento.exchange_stdin import Stdin
from bento.exchange_workdir import WorkDirWatch
from bento.launch import (
    READ_SIZE,
    VALUE_ROOM,
    Launched,
    Link,
    close_quietly,
    launch,
    loads,
    prestart,
    read_meta,
    set_window,
)
from bento.session_core import ACCEPT, DUPLICATE, Announce, Kill, Save, StateChanged, Trim
from bento.warm import wait_for_session

TYPE_CHECKING = False  # the exchange does not import typing (it starts per session)
if TYPE_CHECKING:
    from typing import Any

MAX_PENDING_INPUT = 16 * 1024 * 1024
MAX_CTL_OUT = 64 * 1024 * 1024
DRAIN_SECONDS = 2.0
DIR_CHECK_SECONDS = 5.0
STATE_FLUSH_SECONDS = 0.1


def signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name.removeprefix("SIG")
    except ValueError:
        return str(num)


class Exchange:
    def __init__(self, sdir: str, adopt: bool, meta: dict | None = None) -> None:
        self.dir = sdir
        self.adopt = adopt
        self.meta: dict[str, Any] = meta if meta is not None else read_meta(sdir)
        self.limits = bento_sandbox.Limits.from_map(self.meta["limits"])
        self.max_message: int = self.meta["max_message"]
        self.max_value = self.max_message - VALUE_ROOM
        self.sel = selectors.DefaultSelector()
        out = sessionlog.Writer(sdir, "out", buffered=True)
        self.inlog = sessionlog.Writer(sdir, "in")
        for log in (out, self.inlog):
            if log.torn_bytes:
                self.disk_trouble(f"cut a torn record of {log.torn_bytes} bytes off the {log.prefix} log")
        saved = self._load_saved()
        self.core = self._recover(out, saved)
        self.enforced: dict[str, str] = saved.get("enforced", {})
        # A stdout/stderr frame's data fits an out event with room to spare.
        self.output = Output(self, out, min(READ_SIZE, self.max_value - 16), self.limits.output_bytes)

        self.child: bento_sandbox.Environment | None = None
        self.driver_up = False
        self.user_signal: str | None = None
        self.next_cpu_check = 0.0
        self.next_dir_check = 0.0
        self.pidfd = -1
        self.child_status: int | None = None
        self.facts: tuple[bool, float] = (False, 0.0)  # (oom killed, cpu used) at the end
        self.kill_reason: str | None = None
        self.kill_error: dict | None = None
        self.report: dict | None = None
        self.exiting: dict | None = None  # the exit frame's data, once decided
        self.drain_deadline: float | None = None
        self.wall_deadline: float | None = None
        self.to_close: list[int] = []
        self.driver: Link | None = None
        self.stdin: Stdin | None = None
        self.build: EnvBuild | None = None  # the session's packages, before its function starts
        self.work_watch: WorkDirWatch | None = None  # the bound on what it leaves on disk
        self.reading = False
        self.server: Link | None = None
        self.server_sock: socket.socket | None = None
        self.progress_dirty = True
        self.state_dirty_at: float | None = None
        self.finished = False
        self.remove = False  # delete the session directory on the way out

    # -- persistence ------------------------------------------------------

    def _recover(self, out: sessionlog.Writer, saved: dict) -> session_core.SessionCore:
        """The core as it was: the saved state, then what the logs say."""
        buffer = self.meta["buffer"]
        sizes = array.array("q")
        base = out.next_seq
        last: tuple[int, bytes] | None = None
        for seq, payload in out.records():
            if not sizes:
                base = seq
            sizes.append(_data_len(payload))
            last = (seq, payload)
        if last is not None:
            _seq, ch, data = protocol.decode(last[1], require_map=False)
            if ch == "exit":
                # The exit frame is on disk even if the state file missed it.
                saved = {**saved, "exit": data, "exit_seq": last[0], "state": data["state"],
                         "ended": saved.get("ended") or time.time()}
                sizes[-1] = 0
        return session_core.SessionCore(buffer["max_bytes"], buffer["policy"], saved=saved,
                                        size_base=base, sizes=sizes, input_seq=self.inlog.next_seq - 1)

    def _load_saved(self) -> dict:
        try:
            with open(os.path.join(self.dir, "state.cbor"), "rb") as f:
                return loads(f.read())
        except FileNotFoundError:
            return {}

    def save(self) -> None:
        try:
            sessionlog.write_atomic(
                os.path.join(self.dir, "state.cbor"),
                protocol.encode({**self.core.saved(), "enforced": self.enforced,
                                 "sandbox": self.meta["sandbox"]}),
            )
            self.state_dirty_at = None
        except OSError as exc:
            self.disk_trouble(f"cannot save the session state: {exc}")
            self.state_dirty_at = time.monotonic() + RETRY_SECONDS

    def apply(self, actions: tuple) -> None:
        """Carry out what the session core asked for."""
        for action in actions:
            kind = type(action)
            if kind is Announce:
                self.progress_dirty = True
            elif kind is Trim:
                self.output.trim(action.first_seq)
                self.update_reading()
            elif kind is Save:
                if action.now:
                    self.save()
                elif self.state_dirty_at is None:
                    self.state_dirty_at = time.monotonic() + STATE_FLUSH_SECONDS
            elif kind is Kill:
                if self.drain_deadline is None:
                    self.kill(action.reason)
            elif kind is StateChanged:
                self.send_server(wire.message(wire.FROM_EXCHANGE, "state", version=action.version,
                                              value=action.value))
        if actions:
            self.update_reading()

    def disk_trouble(self, message: str) -> None:
        try:
            sys.stderr.write(f"exchange {self.meta['session']}: {message}\n")
            sys.stderr.flush()
        except OSError:
            pass  # the log is on the same full disk; the state says it anyway

    # -- control socket ---------------------------------------------------

    def listen(self) -> socket.socket:
        path = os.path.join(self.dir, "ctl.sock")
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            # /proc/self/fd/N keeps the path short whatever the data dir is.
            sock.bind(f"/proc/self/fd/{dfd}/ctl.sock")
        finally:
            os.close(dfd)
        sock.listen(4)
        sock.setblocking(False)
        self.sel.register(sock, selectors.EVENT_READ, self.on_accept)
        return sock

    def on_accept(self, sock: socket.socket) -> None:
        try:
            conn, _ = sock.accept()
        except BlockingIOError:
            return
        self.use_server(conn)

    def use_server(self, conn: socket.socket) -> None:
        # One server at a time: a new connection replaces the old one.
        self.drop_server()
        conn.setblocking(False)
        self.server_sock = conn
        self.server = Link(conn.fileno(), conn.fileno(), 2 * self.max_message + 4096)
        self.sel.register(conn, selectors.EVENT_READ, self.on_server_io)
        core = self.core
        self.send_server(wire.message(
            wire.FROM_EXCHANGE, "hello", wire=wire.VERSION, pid=os.getpid(), enforced=self.enforced,
            shared_version=core.shared_version, shared_value=core.shared_value, **core.snapshot()))
        self.progress_dirty = False

    def drop_server(self) -> None:
        if self.server_sock is not None:
            self.sel.unregister(self.server_sock)
            self.server_sock.close()
            self.server_sock = None
            self.server = None

    def send_server(self, msg: dict) -> None:
        if self.server is None:
            return
        self.server.queue(protocol.encode(msg))
        self.server.flush()
        if len(self.server.outbuf) > MAX_CTL_OUT:
            # The server stopped reading: drop it; it reconnects and gets a snapshot.
            self.drop_server()

    def on_server_io(self, sock: socket.socket) -> None:
        server = self.server
        if server is None:
            return
        if server.outbuf:
            server.flush()
        alive = server.feed()
        try:
            while not self.finished and (body := server.next()) is not None:
                self.handle_server(loads(body))
        except (wire.WireError, wire.FrameTooLarge, protocol.ProtocolError) as exc:
            # A server of another version, or not a server: it gets no more of this session.
            self.disk_trouble(f"dropping a control connection that broke the wire: {exc}")
            alive = False
        if not alive and not self.finished:
            self.drop_server()

    def reply(self, rid: int, **fields: Any) -> None:
        self.send_server(wire.message(wire.FROM_EXCHANGE, "reply", rid=rid, **fields))

    def handle_server(self, msg: dict) -> None:
        t = wire.check(wire.TO_EXCHANGE, msg)
        rid = msg.get("rid", 0)
        core = self.core
        if t == "input":
            self.on_input(rid, msg)
        elif t == "ack":
            self.apply(core.ack(msg["seq"]))
        elif t == "sync":
            self.reply(rid, ok=True, **core.snapshot())
        elif t == "signal":
            if self.build is not None and self.build.building and core.accepts_work:
                self.user_signal = msg["signal"]
                self.build.kill()  # the function never starts: the session ends failed
                self.reply(rid, ok=True)
            elif not core.accepts_work or self.child is None:
                self.reply(rid, ok=False, code="gone", message="the function has ended")
            else:
                name = msg["signal"]
                self.user_signal = name
                if name == "KILL":
                    self.child.kill()
                else:
                    # Raised in the function's main thread by the driver's reader.
                    self.to_driver("signal", sig=name)
                self.reply(rid, ok=True)
        elif t == "state_get":
            self.reply(rid, ok=True, version=core.shared_version, value=core.shared_value)
        elif t == "state_put":
            ok, version, actions = core.put_state(msg["value"], msg.get("if_version"))
            self.apply(actions)
            if ok:
                self.reply(rid, ok=True, version=version)
            else:
                self.reply(rid, ok=False, code="conflict", message="shared state changed", version=version)
        elif t == "resize":
            if self.child is None or not self.meta.get("tty") or not core.accepts_work:
                self.reply(rid, ok=False, code="gone", message="no terminal: the function is not running in one")
            else:
                set_window(self.output.tty_fd, msg["rows"], msg["cols"])
                self.reply(rid, ok=True)
        elif t == "end":
            # destroy, or the session's life is over: nothing of it remains.
            self.kill_reason = self.kill_reason or "destroyed"
            self.kill_child()
            self.reply(rid, ok=True)
            if self.server:
                self.server.flush()
            self.finished = True
            self.remove = True
        else:
            self.reply(rid, ok=False, code="bad_request", message=f"{t!r} is not for a running exchange")

    # -- input ------------------------------------------------------------

    def on_input(self, rid: int, msg: dict) -> None:
        seq = msg["seq"]
        core = self.core
        verdict = core.input(seq)
        if verdict == DUPLICATE:
            self.reply(rid, ok=True, input_seq=core.input_seq)
            return
        if verdict != ACCEPT:
            self.reply(rid, ok=False, code=verdict.code, message=verdict.message, input_seq=core.input_seq)
            return
        waiting = (len(self.driver.outbuf) if self.driver is not None else 0) + (
            self.stdin.pending if self.stdin is not None else 0)
        if waiting > MAX_PENDING_INPUT:
            self.reply(rid, ok=False, code="limit",
                       message="too much input is waiting for the function to read it")
            return
        eof = bool(msg.get("eof"))
        data = None if eof else msg.get("data")
        # A record is [seq, data] (data None: the eof) for api.recv(), [seq, data, true] for stdin.
        record = [seq, data, True] if msg.get("stdin") else [seq, data]
        try:
            self.inlog.append(seq, protocol.encode(record))
        except OSError as exc:
            self.reply(rid, ok=False, code="internal", message=f"cannot record the input: {exc.strerror}")
            return
        self.apply(core.input_recorded(seq))
        self.deliver(record)
        self.flush_driver()
        if self.stdin is not None:
            self.stdin.pump()
        self.reply(rid, ok=True, input_seq=seq)

    def deliver(self, record: list) -> None:
        """Queue one input-log record for the function: stdin bytes, or a value for api.recv()."""
        if len(record) == 3:
            if self.stdin is not None:
                self.stdin.add(record[1])
        elif self.driver is not None:
            self.driver.queue(protocol.encode(
                wire.message(wire.TO_DRIVER, "eof") if record[1] is None else
                wire.message(wire.TO_DRIVER, "in", data=record[1])))

    def flush_driver(self) -> None:
        drv = self.driver
        if drv is None:
            return
        drv.flush()
        self.watch_fd(drv.wfd, selectors.EVENT_WRITE if drv.outbuf else 0, self.on_driver_writable)

    def on_driver_writable(self, _fd: int) -> None:
        self.flush_driver()

    def watch_fd(self, fd: int, events: int, cb: Any) -> None:
        try:
            key = self.sel.get_key(fd)
        except KeyError:
            key = None
        if events == 0:
            if key is not None:
                self.sel.unregister(fd)
        elif key is None:
            self.sel.register(fd, events, cb)
        elif key.events != events:
            self.sel.modify(fd, events, cb)

    # -- reading the function's output ---------------------------------------

    def update_reading(self) -> None:
        """Read the function's output unless policy ``block`` says the buffer is
        full (or the disk holds it back); messages already read wait too."""
        want = self.child is not None and not self.output.held_back and (
            self.drain_deadline is not None or not self.core.full)
        if want == self.reading:
            return
        self.reading = want
        for fd in list(self.output.pipes):
            self.watch_fd(fd, selectors.EVENT_READ if want else 0, self.output.on_pipe)
        if self.driver is not None and not self.driver.eof:
            self.watch_fd(self.driver.rfd, selectors.EVENT_READ if want else 0, self.on_driver)
        if want and self.driver is not None and self.driver.framer.pending:
            self.driver_messages()

    def on_driver(self, _fd: int) -> None:
        drv = self.driver
        assert drv is not None
        if not drv.feed():
            self.watch_fd(drv.rfd, 0, None)
        self.driver_messages()

    def driver_messages(self) -> None:
        """Handle the driver's messages while the buffer has room: with policy
        ``block`` a full buffer leaves the rest unread, so the limit holds to
        within one frame however many messages one read brought."""
        drv = self.driver
        assert drv is not None
        try:
            while self.reading or self.drain_deadline is not None:
                body = drv.next()
                if body is None:
                    return
                if body[:1] == wire.SEND_TAG:
                    self.on_send(body)
                else:
                    self.handle_driver(protocol.decode(body, max_size=self.max_message + 4096))
        except (ValueError, KeyError, TypeError, IndexError, protocol.ProtocolError) as exc:
            self.kill("protocol", error={"type": "ProtocolViolation",
                                         "message": f"the function broke the driver protocol: {exc}"})

    def on_send(self, body: bytes) -> None:
        """``api.send``: wire.SEND_TAG, channel length (1 byte), channel (UTF-8), value (CBOR)."""
        n = body[1]
        ch = "msg" if n == 0 else "msg:" + body[2 : 2 + n].decode("utf-8")
        data = body[2 + n :]
        if len(data) > self.max_value:
            raise ValueError("value too large")
        if not _plain_scalar(data):
            protocol.decode(data, max_size=self.max_value, max_depth=protocol.MAX_DEPTH - 3,
                            require_map=False)
        self.output.value(ch, data)

    def handle_driver(self, msg: dict) -> None:
        t = wire.check(wire.FROM_DRIVER, msg)
        core = self.core
        if t == "get":
            self.to_driver("state", version=core.shared_version, value=core.shared_value)
        elif t == "put":
            value, if_version = msg["v"], msg.get("if")
            if not isinstance(value, bytes) or (if_version is not None and not isinstance(if_version, int)):
                raise ValueError("bad put")
            if len(value) > session_core.MAX_STATE_BYTES:
                self.to_driver("put", ok=False, version=core.shared_version,
                               error=f"shared state is limited to {session_core.MAX_STATE_BYTES} bytes")
                return
            protocol.decode(value, max_size=session_core.MAX_STATE_BYTES,
                            max_depth=protocol.MAX_DEPTH - 2, require_map=False)
            ok, version, actions = core.put_state(value, if_version)
            self.apply(actions)
            self.to_driver("put", ok=ok, version=version)
        elif t == "up":
            self.driver_up = True
        elif t == "exit":
            if msg.get("result") is not None:
                protocol.decode(msg["result"], max_size=self.max_value,
                                max_depth=protocol.MAX_DEPTH - 4, require_map=False)
            self.report = msg

    def to_driver(self, t: str, **fields: Any) -> None:
        if self.driver is not None:
            self.driver.queue(protocol.encode(wire.message(wire.TO_DRIVER, t, **fields)))
            self.flush_driver()

    # -- the environment ----------------------------------------------------

    def start(self, launched: Launched | None, pre: tuple | None = None) -> None:
        """Give the session its environment (None if it could not start) and
        send the function its code, limits and early input. ``pre``: a
        pre-started environment's limits were applied and its start message
        sent already (``prestart``, before this exchange set itself up)."""
        if launched is None or launched.error is not None:
            message = launched.error if launched is not None else "no environment"
            self.finish_exit(session_core.failed_exit("SandboxError", message))
            return
        assert launched.env is not None
        self.child = child = launched.env
        if pre is None:
            try:
                pre = prestart(launched, self.meta, None)
            except bento_sandbox.Unenforceable as exc:
                launched.discard()
                self.start(Launched(None, error=str(exc)))
                return
        self.driver, self.enforced, started_at = pre
        self.stdin = Stdin(self, launched.in_w)
        if self.meta.get("work_bytes") is not None:
            self.work_watch = WorkDirWatch(os.path.join(self.dir, "work"), self.meta["work_bytes"])
        self.output.watch(launched.out_r, launched.err_r)
        self.output.tty_fd = launched.out_r
        self.pidfd = os.pidfd_open(child.pid)
        self.sel.register(self.pidfd, selectors.EVENT_READ, self.on_child_exit)
        if self.limits.wall_s is not None:
            self.wall_deadline = started_at + self.limits.wall_s
        # Input accepted before the function started goes to it now, in order.
        for _seq, payload in self.inlog.records():
            self.deliver(loads(payload))
        self.flush_driver()
        self.stdin.pump()
        # The function runs from here on; the bookkeeping below is off its path.
        with open(os.path.join(self.dir, "env.pid"), "w") as f:
            f.write(f"{child.pgid}\n")
        self.apply(self.core.started())

    def kill(self, reason: str, error: dict | None = None) -> None:
        """End the function because of a limit or a violation."""
        if self.kill_reason is None:
            self.kill_reason = reason
            self.kill_error = error
        self.kill_child()

    def kill_child(self) -> None:
        if self.build is not None:
            self.build.kill()
        if self.child is not None:
            self.child.kill()

    def on_child_exit(self, _fd: int) -> None:
        assert self.child is not None
        self.sel.unregister(self.pidfd)
        os.close(self.pidfd)
        self.pidfd = -1
        # Read the environment's accounts while they exist: before the reap
        # (for /proc/<pid>) and before its cgroups go.
        self.facts = (self.child.oom_killed(), self.child.cpu_seconds() or 0.0)
        _pid, status = os.waitpid(self.child.pid, 0)
        self.child.process.returncode = os.waitstatus_to_exitcode(status)
        self.child_status = status
        self.wall_deadline = None  # the function is over: no timer may wake this loop
        # Whatever the function left behind dies with it.
        self.child.release()
        if self.build is not None:
            self.build.release()  # its environment may be evicted from now on
        self.core.function_ended()
        self.drain_deadline = time.monotonic() + DRAIN_SECONDS
        self.reading = False
        self.update_reading()

    def maybe_finish_drain(self, now: float) -> None:
        if self.drain_deadline is None or self.exiting is not None:
            return
        if self.output.held_back:
            # The disk refused output: keep what is still in the pipes for when it takes it.
            self.drain_deadline = max(self.drain_deadline, now + DRAIN_SECONDS)
            return
        driver_open = self.driver is not None and not self.driver.eof
        if (self.output.pipes or driver_open) and now < self.drain_deadline:
            return
        for fd in list(self.output.pipes):
            self.output.close_pipe(fd)
        if self.driver is not None:
            for fd in (self.driver.rfd, self.driver.wfd):
                self.watch_fd(fd, 0, None)
                self.to_close.append(fd)
        if self.stdin is not None:
            self.stdin.close()
        self.finish_exit(session_core.classify_exit(self.exit_facts()))

    def exit_facts(self) -> session_core.ExitFacts:
        status = self.child_status
        assert status is not None and self.child is not None
        rep = self.report
        sig: int | None = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        if sig is None and code is not None and code > 128 and self.child.signal_exit_codes and rep is None:
            sig, code = code - 128, None
        if rep is not None and rep.get("result") is not None:
            rep = {**rep, "result": loads(rep["result"])}
        oom, cpu_used = self.facts
        cpu_s = self.limits.cpu_s
        tail = self.output.stderr_tail.decode("utf-8", "replace").strip()
        return session_core.ExitFacts(
            signal=None if sig is None else signal_name(sig), code=code,
            kill_reason=self.kill_reason, kill_error=self.kill_error, report=rep,
            driver_up=self.driver_up, user_signal=self.user_signal, oom_killed=oom,
            cpu_over=cpu_s is not None and cpu_used >= cpu_s, stderr_tail=tail, status=status)

    def check_cpu(self, now: float) -> None:
        if (self.limits.cpu_s is None or self.child is None or self.drain_deadline is not None
                or self.exiting is not None or now < self.next_cpu_check):
            return
        self.next_cpu_check = now + 0.1
        used = self.child.cpu_seconds()
        if used is not None and used >= self.limits.cpu_s:
            self.kill("cpu_s")

    def check_work(self, now: float) -> None:
        watch = self.work_watch
        if (watch is not None and self.child is not None and self.drain_deadline is None
                and self.exiting is None and watch.over(now)):
            self.kill("work_bytes")

    def finish_exit(self, data: dict) -> None:
        """Record the end: the exit frame (state, code, result, error) goes last."""
        self.exiting = data
        self.drain_deadline = None
        self.output.append("exit", (protocol.encode(data),), 0)

    def exit_written(self, seq: int) -> None:
        self.apply(self.core.recorded_exit(self.exiting, seq, time.time()))

    def adopt_lost(self) -> None:
        if self.core.exit is None:
            self.finish_exit(session_core.lost_exit())

    # -- main loop ----------------------------------------------------------

    def run(self) -> None:
        output = self.output
        while not self.finished:
            now = time.monotonic()
            # No timer, no wake-up: an idle exchange sleeps until something
            # happens (a thousand idle sessions must not cost the server's echo).
            timeout: float | None = None
            if self.server is None:
                timeout = max(0.0, self.next_dir_check - now)
            running = self.child is not None and self.exiting is None and self.drain_deadline is None
            cpu_check = self.next_cpu_check if self.limits.cpu_s is not None and running else None
            work_check = self.work_watch.next_check if self.work_watch is not None and running else None
            retry = output.retry_at if output.held_back else None
            for deadline in (self.wall_deadline, self.drain_deadline, self.state_dirty_at, cpu_check, retry,
                             work_check):
                if deadline is not None:
                    left = max(0.0, deadline - now)
                    timeout = left if timeout is None else min(timeout, left)
            for key, _mask in self.sel.select(timeout):
                key.data(key.fileobj)
                if self.finished:
                    break
            for fd in self.to_close:
                close_quietly(fd)
            self.to_close.clear()
            now = time.monotonic()
            if self.wall_deadline is not None and now >= self.wall_deadline:
                self.wall_deadline = None
                if self.exiting is None and self.drain_deadline is None:
                    self.kill("wall_s")
            self.check_cpu(now)
            self.check_work(now)
            output.retry_stalled(now)
            self.maybe_finish_drain(now)
            if output.log.pending and (not output.flush_blocked or now >= output.retry_at):
                output.flush()
            if self.state_dirty_at is not None and now >= self.state_dirty_at:
                self.save()
            if self.server is None and now >= self.next_dir_check:
                self.next_dir_check = now + DIR_CHECK_SECONDS
                if not os.path.isdir(self.dir):
                    # Deleted under us: no server can ever reach this session again.
                    self.disk_trouble("the session directory is gone; ending")
                    self.kill_child()
                    self.finished = True
                    continue
            if self.progress_dirty and self.server is not None:
                self.progress_dirty = False
                self.send_server(wire.message(wire.FROM_EXCHANGE, "progress", **self.core.snapshot()))
            if self.server is not None:
                events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.server.outbuf else 0)
                self.watch_fd(self.server.rfd, events, self.on_server_io)


def _plain_scalar(data: bytes) -> bool:
    """True if ``data`` is exactly one valid CBOR integer, byte string, text string,
    float or false/true/null: the common values, checked without the full decoder."""
    if not data:
        return False
    ib = data[0]
    major, ai = ib >> 5, ib & 0x1F
    if major > 3:
        return ib in (0xF4, 0xF5, 0xF6) and len(data) == 1 or (
            (ib, len(data)) in ((0xF9, 3), (0xFA, 5), (0xFB, 9)))
    if ai < 24:
        n, head = ai, 1
    elif ai <= 27:
        size = 1 << (ai - 24)
        if len(data) < 1 + size:
            return False
        n, head = int.from_bytes(data[1 : 1 + size], "big"), 1 + size
    else:
        return False
    if major <= 1:
        return len(data) == head
    if len(data) != head + n:
        return False
    if major == 3:
        try:
            data[head:].decode("utf-8")
        except UnicodeDecodeError:
            return False
    return True


def _data_len(payload: bytes) -> int:
    """Length of a frame's encoded ``data`` inside its encoded ``[seq, ch, data]``."""
    pos = 1
    for _ in range(2):  # skip seq (uint) and ch (text)
        ai = payload[pos] & 0x1F
        major = payload[pos] >> 5
        size = {24: 1, 25: 2, 26: 4, 27: 8}.get(ai, 0)
        n = ai if size == 0 else int.from_bytes(payload[pos + 1 : pos + 1 + size], "big")
        pos += 1 + size + (n if major == 3 else 0)
    return len(payload) - pos


def _lock(sdir: str) -> int | None:
    """The session's lock, held for this process's life; None if another exchange has it."""
    lock_fd = os.open(os.path.join(sdir, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            os.close(lock_fd)
            return None
        raise
    return lock_fd


def _detach_stdio() -> None:
    """Let go of the server's pipes: a process that outlives the server must
    not hold anything the server's parent waits on."""
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)


def main(argv: list[str]) -> None:
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    warm_sock: socket.socket | None = None
    launched: Launched | None = None
    if argv[0] == "--warm":
        warm_sock = socket.socket(fileno=int(argv[1]))
        _detach_stdio()
        got = wait_for_session(warm_sock)
        if got is None:
            os._exit(0)
        launched, sdir = got
        adopt = False
    else:
        sdir = argv[0]
        adopt = "--adopt" in argv[1:]
    if _lock(sdir) is None:
        if launched is not None:
            launched.discard()
        sys.stdout.write("busy\n")
        sys.stdout.flush()
        os._exit(3)
    work = os.path.join(sdir, "work")
    pre = meta = None
    if launched is not None and launched.error is None:
        # A pre-started environment and a brand-new session: the function
        # starts first, and runs while this exchange sets itself up.
        meta = read_meta(sdir)
        # The environment was started in a directory of its own: it becomes the
        # session's work dir, where clients read and write its files (a
        # sandbox's home is a bind of it, which follows the rename).
        os.rename(launched.workdir, work)
        # Unsandboxed, the driver moves there by its new name (cwd and HOME).
        cwd = None if meta["sandbox"] == "bwrap" else work
        try:
            # (With packages, the start message waits until they are ready.)
            pre = None if meta.get("packages") else prestart(launched, meta, cwd)
        except bento_sandbox.Unenforceable as exc:
            launched.discard()
            launched = Launched(None, error=str(exc))
    ex = Exchange(sdir, adopt, meta)
    if adopt:
        ex.adopt_lost()
    if (not adopt and ex.core.exit is None and ex.meta.get("packages")
            and (launched is None or launched.error is None)):
        os.makedirs(work, exist_ok=True)
        ex.build = EnvBuild(ex, work, launched)
        ex.build.begin()
    elif not adopt and ex.core.exit is None:
        if launched is None:
            os.makedirs(work, exist_ok=True)
            # (Named after this exchange too: see bento_sandbox.sweep_cgroups.)
            launched = launch(ex.meta, f"{ex.meta['session']}-{os.getpid()}", work)
        ex.start(launched, pre)
    elif launched is not None:
        launched.discard()
    if warm_sock is not None:
        # The server waits for this hello to answer the execute: say it now, and
        # bind the socket (for a later server) afterwards.
        ex.use_server(warm_sock)
        sock = ex.listen()
    else:
        sock = ex.listen()  # the server connects as soon as it reads "ready"
    with open(os.path.join(sdir, "exchange.pid"), "w") as f:
        f.write(f"{os.getpid()}\n")
    if warm_sock is None:
        sys.stdout.write(f"ready {os.getpid()}\n")
        sys.stdout.flush()
        _detach_stdio()
    ex.save()
    try:
        ex.run()
    finally:
        if ex.child is not None and ex.core.exit is None:
            ex.kill_child()
            try:
                ex.child.process.wait(timeout=5)
            except Exception as exc:  # noqa: BLE001 - report, then leave anyway
                sys.stderr.write(f"exchange: could not reap the environment: {exc}\n")
            ex.child.release()
        sock.close()
    if ex.remove:
        import shutil  # only here: the exchange starts per session and stays small

        shutil.rmtree(sdir, ignore_errors=True)
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
