"""The exchange: one small process per session, the authority on its logs.

It owns the environment's pipes, appends every output frame to the session's
output log, records every accepted input in the input log and feeds it to the
function exactly once, enforces the wall-time, output and buffer limits, keeps
the shared state, and records the exit. The server talks to it over a Unix
socket in the session directory (``ctl.sock``), and reads the output log
directly from disk. The exchange does not die with the server: a server that
restarts reconnects and finds everything where it was.

Started by the server as ``python -I -S -c ... SESSION_DIR [--adopt]``. With
``--adopt`` there is no function to run: a previous exchange died, and this one
recovers the logs (cutting a torn tail), marks the session ``lost`` if it never
recorded an exit, and serves reads, acks and shared state until the session's
life ends.

It must never import trio (it exists once per session and must start fast),
never block on a peer (every fd is non-blocking, every outgoing buffer is
bounded or coalesced), and never trust what the function writes to its pipes.
"""

from __future__ import annotations

import array
import errno
import fcntl
import os
import select
import selectors
import signal
import socket
import struct
import sys
import time

import bento_sandbox

from bento import protocol, sessionlog

TYPE_CHECKING = False  # the exchange does not import typing (it starts per session)
if TYPE_CHECKING:
    from typing import Any


def _loads(data: bytes) -> Any:
    """Decode CBOR written by the server or by this exchange (messages, files).

    The strict decoder (no cbor2 here: the exchange stays small). A client's
    values (input, args) travel inside as CBOR byte strings, encoded once by
    the server and decoded by the driver, so the depth and item limits here
    only have to hold our own messages; they are generous, the size unbounded."""
    return protocol.decode(data, max_size=1 << 62, max_depth=protocol.MAX_DEPTH + 4,
                           max_items=4 * protocol.DEFAULT_MAX_ITEMS, require_map=False)

LEN = struct.Struct(">I")
READ_SIZE = 1 << 16
MAX_PENDING_INPUT = 16 * 1024 * 1024
MAX_STATE_BYTES = 64 * 1024
MAX_CTL_OUT = 64 * 1024 * 1024
DRAIN_SECONDS = 2.0
RETRY_SECONDS = 0.5
PIPE_BYTES = 1 << 20
DIR_CHECK_SECONDS = 5.0
VALUE_ROOM = 1024  # an out event carries one frame at least: room for its envelope
SEND_TAG = b"\x01"  # a driver message that is an api.send (the others are CBOR maps)
STATE_FLUSH_SECONDS = 0.1
# The version of the messages on ctl.sock, said in hello. A server reconnects only
# to exchanges that speak its version (exchanges outlive server upgrades); one
# without the field speaks version 1.
LINK_VERSION = 1


def signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name.removeprefix("SIG")
    except ValueError:
        return str(num)


class Framed:
    """Length-prefixed CBOR messages over one non-blocking fd pair."""

    def __init__(self, rfd: int, wfd: int, max_in: int) -> None:
        self.rfd, self.wfd = rfd, wfd
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.max_in = max_in
        self.eof = False

    def feed(self) -> bool:
        """Read what is there; False at EOF."""
        try:
            chunk = os.read(self.rfd, READ_SIZE * 4)
        except BlockingIOError:
            return True
        except OSError:
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        self.inbuf += chunk
        return True

    def messages(self) -> list[bytes]:
        out = []
        while len(self.inbuf) >= 4:
            n = LEN.unpack_from(self.inbuf, 0)[0]
            if n > self.max_in:
                raise ValueError(f"message of {n} bytes exceeds {self.max_in}")
            if len(self.inbuf) < 4 + n:
                break
            out.append(bytes(self.inbuf[4 : 4 + n]))
            del self.inbuf[: 4 + n]
        return out

    def queue(self, body: bytes) -> None:
        self.outbuf += LEN.pack(len(body)) + body

    def flush(self) -> None:
        while self.outbuf:
            try:
                n = os.write(self.wfd, self.outbuf)
            except BlockingIOError:
                return
            except OSError:
                self.outbuf.clear()
                return
            del self.outbuf[:n]


class Exchange:
    def __init__(self, sdir: str, adopt: bool, meta: dict | None = None) -> None:
        self.dir = sdir
        self.adopt = adopt
        self.meta: dict[str, Any] = meta if meta is not None else read_meta(sdir)
        buffer = self.meta["buffer"]
        self.max_bytes: int = buffer["max_bytes"]
        self.policy: str = buffer["policy"]
        self.limits = bento_sandbox.Limits.from_map(self.meta["limits"])
        self.max_message: int = self.meta["max_message"]
        self.max_value = self.max_message - VALUE_ROOM
        self.read_size = min(READ_SIZE, self.max_value - 16)  # a stdout chunk's frame fits too
        self.sel = selectors.DefaultSelector()
        self.out = sessionlog.Writer(sdir, "out", buffered=True)
        self.inlog = sessionlog.Writer(sdir, "in")
        for log in (self.out, self.inlog):
            if log.torn_bytes:
                self.disk_trouble(f"cut a torn record of {log.torn_bytes} bytes off the {log.prefix} log")

        saved = self._load_saved()
        self.state: str = saved.get("state", "starting")
        self.exit: dict | None = saved.get("exit")
        self.ended: float | None = saved.get("ended")
        self.acked_seq: int = saved.get("acked_seq", 0)
        self.dropped_to: int = saved.get("dropped_to", 0)
        self.shared_version: int = saved.get("shared_version", 0)
        self.shared_value: bytes = saved.get("shared_value", protocol.encode(None))
        self.enforced: dict[str, str] = saved.get("enforced", {})
        self.exit_seq: int | None = saved.get("exit_seq")

        # Per-frame data sizes from seq ``size_base`` on, for buffer accounting
        # (the exit frame counts 0: it is never blocked or dropped).
        self.size_base = self.out.next_seq
        self.sizes = array.array("q")
        last: tuple[int, bytes] | None = None
        for seq, payload in self.out.records():
            if not self.sizes:
                self.size_base = seq
            self.sizes.append(_data_len(payload))
            last = (seq, payload)
        if last is not None:
            _seq, ch, data = protocol.decode(last[1], require_map=False)
            if ch == "exit":
                # The exit frame is on disk even if the state file missed it.
                self.exit, self.exit_seq, self.state = data, last[0], data["state"]
                self.ended = self.ended or time.time()
                self.sizes[-1] = 0
        self.first_seq = max(self.size_base, self.acked_seq + 1, self.dropped_to + 1)
        self.first_seq = min(self.first_seq, self.out.next_seq)
        self.buffer_bytes = sum(self.sizes[self.first_seq - self.size_base :])
        self.input_seq = self.inlog.next_seq - 1
        self.output_total = 0

        self.child: bento_sandbox.Environment | None = None
        self.driver_up = False
        self.user_signal: str | None = None
        self.stderr_tail = b""
        self.next_cpu_check = 0.0
        self.next_dir_check = 0.0
        self.oom_killed = False
        self.cpu_used = 0.0
        self.pidfd = -1
        self.child_status: int | None = None
        self.kill_reason: str | None = None
        self.report: dict | None = None
        self.drain_deadline: float | None = None
        self.wall_deadline: float | None = None
        self.pipes: dict[int, str] = {}  # fd -> "stdout" | "stderr"
        self.to_close: list[int] = []
        self.pipe_poll = select.poll()
        self.stalled: list[tuple[str, tuple[bytes | memoryview, ...], int]] = []  # frames the disk refused, oldest first
        self.flush_blocked = False  # appended frames wait for the disk
        self.retry_at = 0.0
        self.driver: Framed | None = None
        self.reading = False
        self.server: Framed | None = None
        self.server_sock: socket.socket | None = None
        self.progress_dirty = True
        self.state_dirty_at: float | None = None
        self.finished = False
        self.remove = False  # delete the session directory on the way out
        self.kill_error: dict | None = None

    # -- persistence ------------------------------------------------------

    def _load_saved(self) -> dict:
        try:
            with open(os.path.join(self.dir, "state.cbor"), "rb") as f:
                return _loads(f.read())
        except FileNotFoundError:
            return {}

    def save(self) -> None:
        try:
            self._save()
        except OSError as exc:
            self.disk_trouble(f"cannot save the session state: {exc}")
            self.state_dirty_at = time.monotonic() + RETRY_SECONDS

    def _save(self) -> None:
        sessionlog.write_atomic(
            os.path.join(self.dir, "state.cbor"),
            protocol.encode(
                {
                    "state": self.state,
                    "exit": self.exit,
                    "ended": self.ended,
                    "exit_seq": self.exit_seq,
                    "acked_seq": self.acked_seq,
                    "dropped_to": self.dropped_to,
                    "shared_version": self.shared_version,
                    "shared_value": self.shared_value,
                    "enforced": self.enforced,
                    "sandbox": self.meta["sandbox"],
                }
            ),
        )
        self.state_dirty_at = None

    def save_soon(self) -> None:
        if self.state_dirty_at is None:
            self.state_dirty_at = time.monotonic() + STATE_FLUSH_SECONDS

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
        self.server = Framed(conn.fileno(), conn.fileno(), 2 * self.max_message + 4096)
        self.sel.register(conn, selectors.EVENT_READ, self.on_server)
        self.send_server(self.snapshot(kind="hello"))
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

    def snapshot(self, kind: str = "progress") -> dict:
        msg = {
            "t": kind,
            "state": self.state,
            "next_seq": self.out.flushed_next,
            "first_seq": min(self.first_seq, self.out.flushed_next),
            "acked_seq": self.acked_seq,
            "input_seq": self.input_seq,
            "buffer_bytes": self.buffer_bytes,
            "dropped_to": self.dropped_to,
            "ended": self.ended,
            "exit": self.exit,
            "exit_seq": self.exit_seq,
        }
        if kind == "hello":
            msg.update(
                link=LINK_VERSION,
                pid=os.getpid(),
                enforced=self.enforced,
                shared_version=self.shared_version,
                shared_value=self.shared_value,
            )
        return msg

    def on_server(self, _sock: socket.socket) -> None:
        server = self.server
        assert server is not None
        alive = server.feed()
        try:
            bodies = server.messages()
        except ValueError:
            bodies, alive = [], False
        for body in bodies:
            self.handle_server(_loads(body))
            if self.finished:
                return
        if not alive:
            self.drop_server()

    def reply(self, rid: int, **fields: Any) -> None:
        self.send_server({"rid": rid, **fields})

    def handle_server(self, msg: dict) -> None:
        t = msg.get("t")
        rid = msg.get("rid", 0)
        if t == "input":
            self.on_input(rid, msg)
        elif t == "ack":
            self.on_ack(msg["seq"])
        elif t == "signal":
            if self.state in protocol.ENDED_STATES or self.child is None or self.drain_deadline is not None:
                self.reply(rid, ok=False, code="gone", message="the function has ended")
            else:
                name = msg["signal"]
                self.user_signal = name
                if msg.get("by"):
                    self.kill("by", {"type": "Killed", "by": msg["by"], "traceback": "",
                                     "message": f"ended by {msg['by']}"})
                elif name == "KILL":
                    self.child.kill()
                else:
                    # Raised in the function's main thread by the driver's reader.
                    self.to_driver({"t": "signal", "sig": name})
                self.reply(rid, ok=True)
        elif t == "state_get":
            self.reply(rid, ok=True, version=self.shared_version, value=self.shared_value)
        elif t == "state_put":
            ok, version = self.put_state(msg["value"], msg.get("if_version"))
            if ok:
                self.reply(rid, ok=True, version=version)
            else:
                self.reply(rid, ok=False, code="conflict", message="shared state changed", version=version)
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
            self.reply(rid, ok=False, code="bad_request", message=f"unknown control message {t!r}")

    # -- input ------------------------------------------------------------

    def on_input(self, rid: int, msg: dict) -> None:
        seq = msg["seq"]
        if seq <= self.input_seq:
            self.reply(rid, ok=True, input_seq=self.input_seq)
            return
        if seq > self.input_seq + 1:
            self.reply(rid, ok=False, code="input_gap",
                       message=f"input seq {seq} skips {self.input_seq + 1}", input_seq=self.input_seq)
            return
        if self.state in protocol.ENDED_STATES or self.drain_deadline is not None:
            self.reply(rid, ok=False, code="gone", message="the function has ended")
            return
        if self.driver is not None and len(self.driver.outbuf) > MAX_PENDING_INPUT:
            self.reply(rid, ok=False, code="limit",
                       message="too much input is waiting for the function to read it")
            return
        eof = bool(msg.get("eof"))
        data = msg.get("data")
        try:
            self.inlog.append(seq, protocol.encode([seq, None if eof else data]))
        except OSError as exc:
            self.reply(rid, ok=False, code="internal", message=f"cannot record the input: {exc.strerror}")
            return
        self.input_seq = seq
        if self.driver is not None:
            self.driver.queue(protocol.encode({"t": "eof"} if eof else {"t": "in", "data": data}))
            self.flush_driver()
        self.reply(rid, ok=True, input_seq=seq)

    def flush_driver(self) -> None:
        drv = self.driver
        if drv is None:
            return
        drv.flush()
        want = selectors.EVENT_WRITE if drv.outbuf else 0
        self._modify(drv.wfd, want, self.on_driver_writable)

    def on_driver_writable(self, _fd: int) -> None:
        self.flush_driver()

    def _modify(self, fd: int, events: int, cb: Any) -> None:
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

    # -- output -----------------------------------------------------------

    def on_ack(self, seq: int) -> None:
        seq = min(seq, self.out.flushed_next - 1)
        if seq <= self.acked_seq:
            return
        self.acked_seq = seq
        self.trim_to(seq + 1)
        self.save_soon()
        self.progress_dirty = True

    def trim_to(self, first: int) -> None:
        """Free frames below ``first``."""
        if first <= self.first_seq:
            return
        lo = self.first_seq - self.size_base
        hi = first - self.size_base
        self.buffer_bytes -= sum(self.sizes[lo:hi])
        self.first_seq = first
        if hi > 4096 and hi > len(self.sizes) // 2:
            del self.sizes[:hi]
            self.size_base = first
        try:
            self.out.drop_before(first)
        except OSError as exc:
            # The frames are freed all the same; the file stays, tried again at the next trim.
            self.disk_trouble(f"cannot delete an acked output segment: {exc}")
        self.update_reading()

    def append(self, ch: str, data_cbor: tuple[bytes | memoryview, ...], size: int) -> None:
        """Add a frame to the output log. If the disk refuses it, the frame
        waits in memory and the function's output is no longer read (it
        blocks, nothing is lost) until a retry succeeds."""
        if not self.stalled:
            try:
                self._write_frame(ch, data_cbor, size)
                return
            except OSError as exc:
                self.disk_trouble(f"cannot append to the output log: {exc}")
                self.retry_at = time.monotonic() + RETRY_SECONDS
        self.stalled.append((ch, data_cbor, size))
        self.update_reading()

    def flush_out(self) -> None:
        """Write the frames appended in this round; a disk that refuses them
        stops the reading of the function's output until a retry succeeds."""
        was_blocked = self.flush_blocked
        try:
            self.out.flush()
        except OSError as exc:
            if not was_blocked:
                self.disk_trouble(f"cannot append to the output log: {exc}")
            self.flush_blocked = True
            self.retry_at = time.monotonic() + RETRY_SECONDS
            self.update_reading()
            return
        if was_blocked:
            self.flush_blocked = False
            self.disk_trouble("the output log is writable again")
            self.update_reading()

    def retry_stalled(self, now: float) -> None:
        if not self.stalled or now < self.retry_at:
            return
        self.retry_at = now + RETRY_SECONDS
        while self.stalled:
            ch, data_cbor, size = self.stalled[0]
            try:
                self._write_frame(ch, data_cbor, size)
            except OSError:
                return
            self.stalled.pop(0)
        self.disk_trouble("the output log is writable again")
        self.update_reading()

    def disk_trouble(self, message: str) -> None:
        try:
            sys.stderr.write(f"exchange {self.meta['session']}: {message}\n")
            sys.stderr.flush()
        except OSError:
            pass  # the log is on the same full disk; the state says it anyway

    def _write_frame(self, ch: str, data_cbor: tuple[bytes | memoryview, ...], size: int) -> None:
        """Append the frame ``[seq, ch, data]``; ``data_cbor`` is its encoded data
        in pieces, which the log keeps as they are until its batch is written
        (64 KiB chunks stay uncut and uncopied)."""
        seq = self.out.next_seq
        self.out.append_parts(seq, (protocol.encode_frame(seq, ch, b""), *data_cbor))
        self.sizes.append(size)
        self.progress_dirty = True
        if self.out.pending_bytes >= sessionlog.READ_CHUNK:
            self.flush_out()  # a full batch goes now (a refusal stops the reading)
        if ch == "exit":
            self.exit_seq = seq
            self.flush_out()
            self.save()
            return
        self.buffer_bytes += size
        if self.buffer_bytes > self.max_bytes:
            if self.policy == "drop_oldest":
                drop = self.first_seq
                excess = self.buffer_bytes - self.max_bytes
                freed = 0
                while freed < excess and drop < seq:
                    freed += self.sizes[drop - self.size_base]
                    drop += 1
                if drop > self.first_seq:
                    self.dropped_to = drop - 1
                    self.trim_to(drop)
                    self.save_soon()
            elif self.policy == "fail" and self.drain_deadline is None:
                self.kill("buffer")
        self.update_reading()

    def emit_stream(self, ch: str, chunk: bytes | memoryview) -> None:
        limit = self.limits.output_bytes
        if limit is not None:
            room = limit - self.output_total
            if len(chunk) > room:
                chunk = chunk[: max(0, room)]
                self.kill("output_bytes")
                if not chunk:
                    return
        self.output_total += len(chunk)
        if ch == "stderr":
            self.stderr_tail = (self.stderr_tail + chunk)[-2048:]
        self.append(ch, (protocol.encode_head(2, len(chunk)), chunk), len(chunk))

    def update_reading(self) -> None:
        """Read the function's output unless policy ``block`` says the buffer is full."""
        want = self.child is not None and not self.stalled and not self.flush_blocked and (
            self.drain_deadline is not None
            or not (self.policy == "block" and self.buffer_bytes >= self.max_bytes)
        )
        if want == self.reading:
            return
        self.reading = want
        for fd in list(self.pipes):
            self._modify(fd, selectors.EVENT_READ if want else 0, self.on_pipe)
        if self.driver is not None and not self.driver.eof:
            self._modify(self.driver.rfd, selectors.EVENT_READ if want else 0, self.on_driver)

    def on_pipe(self, fd: int) -> None:
        if fd in self.pipes:
            self.read_pipe(fd)

    def read_pipe(self, fd: int) -> bool:
        """One read of a stdout/stderr pipe; False when nothing more is there now.

        Up to the pipe's size at once (a fast writer costs one read per MiB,
        not per 64 KiB: 8% more throughput), cut into frames of ``read_size``;
        never more than the buffer has room for, but one frame at least."""
        want = min(PIPE_BYTES, max(self.read_size, self.max_bytes - self.buffer_bytes))
        try:
            chunk = os.read(fd, want)
        except BlockingIOError:
            return False
        except OSError:
            chunk = b""
        if not chunk:
            # Closed after this round of events, so a stale event cannot hit a reused fd.
            self._modify(fd, 0, None)
            del self.pipes[fd]
            self.pipe_poll.unregister(fd)
            self.to_close.append(fd)
            return False
        ch, step = self.pipes[fd], self.read_size
        if len(chunk) <= step:
            self.emit_stream(ch, chunk)
            return True
        view = memoryview(chunk)
        for at in range(0, len(chunk), step):
            self.emit_stream(ch, view[at : at + step])
        return True

    def drain_pipes(self) -> None:
        """Take what the function already wrote to stdout/stderr, so a message
        it sends after printing lands after the printed text."""
        if not self.pipes:
            return
        for fd, _ev in self.pipe_poll.poll(0):
            for _ in range(16):
                if fd not in self.pipes or not self.read_pipe(fd):
                    break

    # -- the driver's messages ---------------------------------------------

    def on_driver(self, _fd: int) -> None:
        drv = self.driver
        assert drv is not None
        alive = drv.feed()
        try:
            for body in drv.messages():
                if body[:1] == SEND_TAG:
                    self.on_send(body)
                else:
                    self.handle_driver(protocol.decode(body, max_size=self.max_message + 4096))
        except (ValueError, KeyError, TypeError, IndexError, protocol.ProtocolError) as exc:
            self.violation(f"the function broke the driver protocol: {exc}")
            return
        if not alive:
            self._modify(drv.rfd, 0, None)

    def violation(self, message: str) -> None:
        self.kill("protocol", error={"type": "ProtocolViolation", "message": message})

    def on_send(self, body: bytes) -> None:
        """``api.send``: SEND_TAG, channel length (1 byte), channel (UTF-8), value (CBOR)."""
        n = body[1]
        ch = "msg" if n == 0 else "msg:" + body[2 : 2 + n].decode("utf-8")
        data = body[2 + n :]
        if len(data) > self.max_value:
            raise ValueError("value too large")
        if not _plain_scalar(data):
            protocol.decode(data, max_size=self.max_value, max_depth=protocol.MAX_DEPTH - 3,
                            require_map=False)
        self.drain_pipes()
        limit = self.limits.output_bytes
        if limit is not None and self.output_total + len(data) > limit:
            self.kill("output_bytes")
            return
        self.output_total += len(data)
        self.append(ch, (data,), len(data))

    def handle_driver(self, msg: dict) -> None:
        t = msg.get("t")
        if t == "get":
            self.to_driver({"t": "state", "version": self.shared_version, "value": self.shared_value})
        elif t == "put":
            value, if_version = msg["v"], msg.get("if")
            if not isinstance(value, bytes) or (if_version is not None and not isinstance(if_version, int)):
                raise ValueError("bad put")
            if len(value) > MAX_STATE_BYTES:
                self.to_driver({"t": "put", "ok": False, "version": self.shared_version,
                                "error": f"shared state is limited to {MAX_STATE_BYTES} bytes"})
                return
            protocol.decode(value, max_size=MAX_STATE_BYTES, max_depth=protocol.MAX_DEPTH - 2,
                            require_map=False)
            ok, version = self.put_state(value, if_version)
            self.to_driver({"t": "put", "ok": ok, "version": version})
        elif t == "up":
            self.driver_up = True
        elif t == "exit":
            if msg.get("result") is not None:
                protocol.decode(msg["result"], max_size=self.max_value,
                                max_depth=protocol.MAX_DEPTH - 4, require_map=False)
            self.report = msg
        else:
            raise ValueError(f"unknown message {t!r}")

    def to_driver(self, msg: dict) -> None:
        if self.driver is not None:
            self.driver.queue(protocol.encode(msg))
            self.flush_driver()

    def put_state(self, value: bytes, if_version: int | None) -> tuple[bool, int]:
        if if_version is not None and if_version != self.shared_version:
            return False, self.shared_version
        self.shared_version += 1
        self.shared_value = value
        self.save()
        self.send_server({"t": "state", "version": self.shared_version, "value": value})
        return True, self.shared_version

    # -- the environment ----------------------------------------------------

    def start(self, launched: Launched | None, pre: Prestarted | None = None) -> None:
        """Give the session its environment (None if it could not start) and
        send the function its code, limits and early input. ``pre``: a
        pre-started environment's limits were applied and its start message
        sent already (``prestart``, before this exchange set itself up)."""
        if launched is None or launched.error is not None:
            message = launched.error if launched is not None else "no environment"
            self.finish_exit(
                {"state": "failed", "code": None, "signal": None, "result": None,
                 "error": {"type": "SandboxError", "message": message, "traceback": ""}}
            )
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
        self.pipes = {launched.out_r: "stdout", launched.err_r: "stderr"}
        for fd in self.pipes:
            self.pipe_poll.register(fd, select.POLLIN)
        self.pidfd = os.pidfd_open(child.pid)
        self.sel.register(self.pidfd, selectors.EVENT_READ, self.on_child_exit)
        if self.limits.wall_s is not None:
            self.wall_deadline = started_at + self.limits.wall_s
        # Input accepted before the function started goes to it now, in order.
        for _seq, payload in self.inlog.records():
            _s, data = _loads(payload)
            self.driver.queue(protocol.encode({"t": "eof"} if data is None else {"t": "in", "data": data}))
        self.flush_driver()
        # The function runs from here on; the bookkeeping below is off its path.
        with open(os.path.join(self.dir, "env.pid"), "w") as f:
            f.write(f"{child.pgid}\n")
        self.state = "running"
        self.update_reading()
        self.progress_dirty = True

    def kill(self, reason: str, error: dict | None = None) -> None:
        """End the function because of a limit or a violation."""
        if self.kill_reason is None:
            self.kill_reason = reason
            self.kill_error = error
        self.kill_child()

    def kill_child(self) -> None:
        if self.child is not None:
            self.child.kill()

    def on_child_exit(self, _fd: int) -> None:
        assert self.child is not None
        self.sel.unregister(self.pidfd)
        os.close(self.pidfd)
        self.pidfd = -1
        # Read the environment's accounts while they exist: before the reap
        # (for /proc/<pid>) and before its cgroups go.
        self.oom_killed = self.child.oom_killed()
        self.cpu_used = self.child.cpu_seconds() or 0.0
        _pid, status = os.waitpid(self.child.pid, 0)
        self.child.process.returncode = os.waitstatus_to_exitcode(status)
        self.child_status = status
        self.wall_deadline = None  # the function is over: no timer may wake this loop
        # Whatever the function left behind dies with it.
        self.child.release()
        self.drain_deadline = time.monotonic() + DRAIN_SECONDS
        self.reading = False
        self.update_reading()

    def maybe_finish_drain(self, now: float) -> None:
        if self.drain_deadline is None or self.exit is not None:
            return
        if self.stalled or self.flush_blocked:
            # The disk refused output: keep what is still in the pipes for when it takes it.
            self.drain_deadline = max(self.drain_deadline, now + DRAIN_SECONDS)
            return
        driver_open = self.driver is not None and not self.driver.eof
        if (self.pipes or driver_open) and now < self.drain_deadline:
            return
        for fd in list(self.pipes):
            self._modify(fd, 0, None)
            self.pipe_poll.unregister(fd)
            self.to_close.append(fd)
        self.pipes.clear()
        if self.driver is not None:
            for fd in (self.driver.rfd, self.driver.wfd):
                self._modify(fd, 0, None)
                self.to_close.append(fd)
        self.finish_exit(self.exit_data())

    def exit_data(self) -> dict:
        status = self.child_status
        assert status is not None and self.child is not None
        rep = self.report
        data: dict[str, Any] = {"state": "exited", "code": None, "signal": None, "result": None, "error": None}
        sig: int | None = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        if sig is None and code is not None and code > 128 and self.child.signal_exit_codes and rep is None:
            sig, code = code - 128, None
        cpu_s = self.limits.cpu_s
        if self.kill_reason is None and sig == signal.SIGKILL and self.oom_killed:
            self.kill_reason = "memory_bytes"
        if self.kill_reason is None and cpu_s is not None and sig == signal.SIGKILL and self.cpu_used >= cpu_s:
            self.kill_reason = "cpu_s"  # the RLIMIT_CPU backstop beat the exchange's watch
        if self.kill_reason is not None and self.kill_reason != "destroyed":
            err = self.kill_error or {"type": "LimitExceeded", "message": self.kill_reason}
            data.update(state="killed", signal="KILL", error=err)
        elif rep is None and not self.driver_up:
            tail = self.stderr_tail.decode("utf-8", "replace").strip()
            data.update(state="failed", error={
                "type": "SandboxError",
                "message": f"the environment did not start (status {status}): {tail[-500:]}",
                "traceback": "",
            })
        elif rep is None and self.user_signal is not None:
            data.update(state="killed", signal=self.user_signal)
        elif sig is not None:
            data.update(state="killed", signal=signal_name(sig))
        elif rep is not None:
            kind = rep.get("kind")
            if kind == "failed":
                data.update(state="failed", error=rep.get("error"))
            elif kind == "interrupted":
                data.update(state="killed", signal="INT", error=rep.get("error"))
            else:
                data.update(code=rep.get("code", 0), error=rep.get("error"))
                if rep.get("result") is not None:
                    data["result"] = _loads(rep["result"])
        else:
            data.update(code=code)
        return data

    def check_cpu(self, now: float) -> None:
        if (self.limits.cpu_s is None or self.child is None or self.drain_deadline is not None
                or self.exit is not None or now < self.next_cpu_check):
            return
        self.next_cpu_check = now + 0.1
        used = self.child.cpu_seconds()
        if used is not None and used >= self.limits.cpu_s:
            self.kill("cpu_s")

    def finish_exit(self, data: dict) -> None:
        self.exit = data
        self.state = data["state"]
        self.ended = time.time()
        self.drain_deadline = None
        self.append("exit", (protocol.encode(data),), 0)
        self.save()
        self.progress_dirty = True

    # -- adoption -----------------------------------------------------------

    def adopt_lost(self) -> None:
        if self.exit is None:
            self.finish_exit(
                {"state": "lost", "code": None, "signal": None, "result": None,
                 "error": {"type": "ExchangeLost",
                           "message": "the session's exchange died; output up to here is kept",
                           "traceback": ""}}
            )

    # -- main loop ----------------------------------------------------------

    def run(self) -> None:
        while not self.finished:
            now = time.monotonic()
            # No timer, no wake-up: an idle exchange sleeps until something
            # happens (a thousand idle sessions must not cost the server's echo).
            timeout: float | None = None
            if self.server is None:
                timeout = max(0.0, self.next_dir_check - now)
            running = self.child is not None and self.exit is None and self.drain_deadline is None
            cpu_check = self.next_cpu_check if self.limits.cpu_s is not None and running else None
            retry = self.retry_at if self.stalled or self.flush_blocked else None
            for deadline in (self.wall_deadline, self.drain_deadline, self.state_dirty_at, cpu_check, retry):
                if deadline is not None:
                    left = max(0.0, deadline - now)
                    timeout = left if timeout is None else min(timeout, left)
            for key, _mask in self.sel.select(timeout):
                key.data(key.fileobj)
                if self.finished:
                    break
            for fd in self.to_close:
                _close(fd)
            self.to_close.clear()
            now = time.monotonic()
            if self.wall_deadline is not None and now >= self.wall_deadline:
                self.wall_deadline = None
                if self.exit is None and self.drain_deadline is None:
                    self.kill("wall_s")
            self.check_cpu(now)
            self.retry_stalled(now)
            self.maybe_finish_drain(now)
            if self.out.pending and (not self.flush_blocked or now >= self.retry_at):
                self.flush_out()
            if self.state_dirty_at is not None and now >= self.state_dirty_at:
                self.save()
            if self.server is None and now >= self.next_dir_check:
                self.next_dir_check = now + DIR_CHECK_SECONDS
                if _dir_deleted(self.dir):
                    # Deleted under us: no server can ever reach this session again.
                    self.disk_trouble("the session directory is gone; ending")
                    self.kill_child()
                    self.finished = True
                    continue
            if self.progress_dirty and self.server is not None:
                self.progress_dirty = False
                self.send_server(self.snapshot())
            if self.server is not None and self.server.outbuf:
                self._modify(self.server.rfd, selectors.EVENT_READ | selectors.EVENT_WRITE, self.on_server_io)
            elif self.server is not None:
                self._modify(self.server.rfd, selectors.EVENT_READ, self.on_server_io)

    def on_server_io(self, sock: socket.socket) -> None:
        if self.server is not None and self.server.outbuf:
            self.server.flush()
        self.on_server(sock)


class Launched:
    """A started environment and the exchange's ends of its pipes."""

    def __init__(self, env: bento_sandbox.Environment | None, out_r: int = -1, err_r: int = -1,
                 to_w: int = -1, from_r: int = -1, error: str | None = None) -> None:
        self.env, self.error = env, error
        self.out_r, self.err_r, self.to_w, self.from_r = out_r, err_r, to_w, from_r

    def discard(self) -> None:
        if self.env is not None:
            self.env.release()
            try:
                os.waitpid(self.env.pid, 0)
            except ChildProcessError:
                pass
        for fd in (self.out_r, self.err_r, self.to_w, self.from_r):
            if fd >= 0:
                _close(fd)


# (the driver's Framed, the limits in force, when the start message went)
Prestarted = tuple[Framed, dict, float]


def _pin_dir(sdir: str) -> str:
    """The session directory as this process's own path to it (``/proc/self/fd/N``):
    the exchange reaches it through an fd, so a data dir moved while the
    function runs (stop the server, mv, start it on the new path) keeps working.
    Only this process may use the path; its children get real paths."""
    return f"/proc/self/fd/{os.open(sdir, os.O_RDONLY | os.O_DIRECTORY)}"


def _dir_deleted(pinned: str) -> bool:
    try:
        return os.stat(pinned).st_nlink == 0
    except OSError:
        return True


def read_meta(sdir: str) -> dict:
    with open(os.path.join(sdir, "meta.cbor"), "rb") as f:
        meta: dict = _loads(f.read())
    return meta


def prestart(launched: Launched, meta: dict, cwd: str | None) -> Prestarted:
    """Apply the session's limits to its environment, then send the driver its
    start message: from here on the function runs. (For a pre-started
    environment this comes before the exchange sets itself up, which then
    happens while the function starts.)"""
    assert launched.env is not None
    # Raises bento_sandbox.Unenforceable: the server checked the limits against
    # what this machine holds, but a session's own cgroup can still fail here.
    enforced, rlimits = launched.env.apply(bento_sandbox.Limits.from_map(meta["limits"]),
                                           strict=not meta.get("allow_unenforced", False))
    driver = Framed(launched.from_r, launched.to_w, meta["max_message"] + 4096)
    driver.queue(protocol.encode({
        "t": "start",
        "code": meta["code"],
        "entry": meta["entry"],
        "args": meta["args"],
        "kwargs": meta["kwargs"],
        "env": meta["env"],
        "cwd": cwd,
        "rlimits": rlimits,
        "max_value": meta["max_message"] - VALUE_ROOM,
        "max_depth": protocol.MAX_DEPTH - 4,
        "max_items": protocol.DEFAULT_MAX_ITEMS,
    }))
    driver.flush()  # what the pipe does not take now goes when the loop runs
    return driver, enforced, time.monotonic()


def launch(cfg: dict, name: str, workdir: str) -> Launched:
    """Start an environment whose driver waits for its ``start`` message.

    ``cfg`` holds sandbox, sandbox_cmd, python, driver_path, network. No
    session-specific setting is needed yet: limits, env and code come later."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    to_r, to_w = os.pipe()  # exchange -> driver (driver's fd 3)
    from_r, from_w = os.pipe()  # driver -> exchange (driver's fd 4)
    for fd in (out_r, err_r, from_r):
        # A bigger pipe: a function writing fast blocks (and wakes us) less often.
        try:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        except OSError:
            pass  # over /proc/sys/fs/pipe-max-size for this user: keep the default
    # The driver expects its pipes at fds 3 and 4: pass them high, dup them down inside.
    child_in, child_out = _fd_at_least(to_r, 10), _fd_at_least(from_w, 10)
    paths = cfg["driver_path"]
    boot = (
        "import os,sys;"
        f"os.dup2({child_in},3);os.dup2({child_out},4);os.close({child_in});os.close({child_out});"
        f"sys.path[:0]={paths!r};"
        "from bento_driver.main import main;main()"
    )
    try:
        backend = bento_sandbox.get_backend(cfg["sandbox"], cfg.get("sandbox_cmd"))
        env = backend.spawn(
            [cfg["python"], "-I", "-S", "-c", boot],
            name=name, workdir=workdir,
            env={"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"},
            network=cfg["network"], pass_fds=(child_in, child_out),
            stdout=out_w, stderr=err_w, bind=paths,
        )
    except (OSError, bento_sandbox.SandboxUnavailable) as exc:
        for fd in (out_r, out_w, err_r, err_w, to_w, from_r, child_in, child_out):
            _close(fd)
        return Launched(None, error=str(exc))
    for fd in (out_w, err_w, child_in, child_out):
        _close(fd)
    for fd in (out_r, err_r, to_w, from_r):
        os.set_blocking(fd, False)
    return Launched(env, out_r, err_r, to_w, from_r)


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


def _fd_at_least(fd: int, low: int) -> int:
    new = fcntl.fcntl(fd, fcntl.F_DUPFD, low)
    os.close(fd)
    return new


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


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


def _warm(sock: socket.socket) -> tuple[Launched, str] | None:
    """Warm mode: start an environment now, wait for the server to assign a session."""
    link = Framed(sock.fileno(), sock.fileno(), 1 << 20)
    os.set_blocking(sock.fileno(), True)

    def receive() -> dict | None:
        while True:
            bodies = link.messages()
            if bodies:
                return _loads(bodies[0])
            if not link.feed():
                return None

    cfg = receive()
    if cfg is None or cfg.get("t") != "warm":
        return None
    name = f"warm-{os.getpid()}"
    launched = launch(cfg, name, cfg["workdir"])
    link.queue(protocol.encode({"t": "warm_ready", "pid": os.getpid(), "error": launched.error}))
    link.flush()
    assign = receive()
    if assign is None or assign.get("t") != "assign":
        launched.discard()
        return None
    if link.inbuf:
        raise RuntimeError("the server sent more than one message before the session was set up")
    os.set_blocking(sock.fileno(), False)
    return launched, assign["dir"]


def main(argv: list[str]) -> None:
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    warm_sock: socket.socket | None = None
    launched: Launched | None = None
    if argv[0] == "--warm":
        warm_sock = socket.socket(fileno=int(argv[1]))
        _detach_stdio()
        got = _warm(warm_sock)
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
    work = os.path.join(sdir, "work")  # the environment's: a path other processes can use
    sdir = _pin_dir(sdir)
    pre = meta = None
    if launched is not None and launched.error is None:
        # A pre-started environment and a brand-new session: the function
        # starts first, and runs while this exchange sets itself up.
        meta = read_meta(sdir)
        cwd = None
        if meta["sandbox"] != "bwrap":
            # Unsandboxed: the driver moves to the session's work dir (cwd and
            # HOME, as if started there). A sandbox has its own tmpfs home.
            os.makedirs(work, exist_ok=True)
            cwd = work
        try:
            pre = prestart(launched, meta, cwd)
        except bento_sandbox.Unenforceable as exc:
            launched.discard()
            launched = Launched(None, error=str(exc))
    ex = Exchange(sdir, adopt, meta)
    if adopt:
        ex.adopt_lost()
    if not adopt and ex.exit is None:
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
        if ex.child is not None and ex.exit is None:
            ex.kill_child()
            try:
                ex.child.process.wait(timeout=5)
            except Exception as exc:  # noqa: BLE001 - report, then leave anyway
                sys.stderr.write(f"exchange: could not reap the environment: {exc}\n")
            ex.child.release()
        sock.close()
    if ex.remove:
        import shutil  # only here: the exchange starts per session and stays small

        shutil.rmtree(os.readlink(sdir), ignore_errors=True)
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
