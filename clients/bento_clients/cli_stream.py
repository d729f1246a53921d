"""Streaming a session to the terminal: the connection (with a spinner while it
comes up), frames written out exactly once (write, record, then acknowledge),
and stdin read as input lines or as keys (detach sequence, ctrl-c).

docs/cli.md ("The state file and exactly-once output") explains the order of
steps this module keeps for every frame.
"""

from __future__ import annotations

import contextlib
import os
import signal as signals
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from bento_clients import sdk
from bento_clients.cli_output import exit_code, render, say
from bento_clients.cli_settings import CLIENT_NAME, Settings
from bento_clients.errors import BentoError, InputClosed, SessionGone
from bento_clients.frames import Exit, Frame, Stderr, Stdout
from bento_clients.terminal import KeyReader, ResumeFilter, Sinks, parse_detach_keys, raw_mode

__all__ = ["connect", "follow", "with_client"]

# Record the position in the state file at least this often while frames are
# backed up (otherwise after every frame): bounds what a kill -9 can repeat on
# a terminal or pipe (docs/cli.md).
RECORD_EVERY_FRAMES = 64
RECORD_EVERY_BYTES = 256 * 1024

async def _spinner(url: str) -> None:
    frames = "|/-\\"
    await trio.sleep(0.3)
    i = 0
    try:
        while True:
            sys.stderr.write(f"\r{frames[i % 4]} connecting to {url} ...")
            sys.stderr.flush()
            i += 1
            await trio.sleep(0.1)
    finally:
        if i:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def connect(settings: Settings, url: str, **timeouts: float) -> Any:
    """``sdk.connect`` to ``url`` with the settings' key, CA file and timeouts
    (``connect_timeout`` / ``reconnect_timeout`` given here win)."""
    options: dict[str, Any] = {"connect_timeout": settings.connect_timeout,
                               "reconnect_timeout": settings.reconnect_timeout, **timeouts}
    if settings.ca_file is not None:
        options["ca_file"] = settings.ca_file
    return sdk.connect(url, settings.api_key, client_name=CLIENT_NAME, **options)


async def with_client(settings: Settings, url: str, fn: Callable[[Any], Awaitable[int]]) -> int:
    """``fn(client)`` on a connection to ``url``, with a spinner while connecting."""
    async with trio.open_nursery() as nursery:
        spin = trio.CancelScope()
        if sys.stderr.isatty() and not settings.json:
            async def spinner() -> None:
                with spin:
                    await _spinner(url)
            nursery.start_soon(spinner)
        try:
            async with connect(settings, url) as client:
                spin.cancel()
                return await fn(client)
        finally:
            spin.cancel()


# --------------------------------------------------------------------------
# Streaming a session to the terminal.


@dataclass
class _Stream:
    settings: Settings
    session: Any  # sdk.Session
    record: bool  # write positions to the state file (and acknowledge only then)
    send_input: bool  # stdin lines become the function's input
    to_recv: bool  # ... as text values for api.recv(), not bytes for the function's stdin
    tty: bool  # the session runs in a terminal: keys go as typed, the window size follows ours
    keys: bool  # stdin is a terminal we read in raw mode (detach keys, ctrl-c)
    control: bool  # ctrl-c / SIGINT signals the function (else it detaches)
    traceback: bool
    stop_at: int | None = None  # logs without -f: the last seq to print
    resume: ResumeFilter | None = None
    file: str | None = None  # the function's file, shown in its tracebacks
    detached: bool = False
    code: int | None = None


async def _stream(st: _Stream) -> int | None:
    """Print frames until the exit frame (returns its exit code), ``stop_at``, or a
    detach (returns None). Reads stdin meanwhile (input, keys) as ``st`` says."""
    sinks = Sinks()
    # A terminal session's screen has no output processing (-t): the function's
    # bytes are what it needs; this CLI's own lines (values, notes, the end)
    # need their carriage returns on the sinks that are that terminal.
    crlf = {name for name, fd in sinks.fds.items() if st.tty and st.keys and os.isatty(fd)}
    # The terminal stdout is (and stderr, when it is the same one): this CLI's
    # own lines start on a line of their own there, though the function's text
    # may end mid-line (a prompt answered from a pipe: `name? "done"`). Not
    # while local keys are echoed (that moves the cursor unseen here).
    screen = set() if st.keys and not st.tty else _screen(sinks)
    s = st.session
    if st.record:
        s.auto_ack = False  # acknowledged only once recorded in the state file
    state = st.settings.state
    async with trio.open_nursery() as nursery:

        async def output() -> None:
            # Exactly once (docs/cli.md): write a frame's bytes, then record its
            # seq in the state file, then acknowledge it. Frames already received
            # are written as one batch and recorded once (the record is a file
            # rename, the costly step); a batch that is written but not recorded
            # yet when the loop stops is recorded on the way out.
            unrecorded: Frame | None = None
            batch = batch_bytes = 0
            mid_line = False  # the last byte on the screen was not a newline
            try:
                async for frame in s.output():
                    own = st.settings.json or not isinstance(frame, Stdout | Stderr)
                    for sink, data in render(frame, st.settings.json, st.traceback, st.file):
                        if own and mid_line and sink in screen and data:
                            data = b"\n" + data
                        if own and sink in crlf:
                            data = data.replace(b"\n", b"\r\n")
                        if sink in screen and data:
                            mid_line = not data.endswith(b"\n")
                        if st.resume is not None:
                            data = st.resume.filter(sink, data)
                        if data:
                            sinks.write(sink, data)
                            batch_bytes += len(data)
                    unrecorded, batch = frame, batch + 1
                    if isinstance(frame, Exit):
                        st.code = exit_code(frame.data())
                    last = st.stop_at is not None and frame.seq >= st.stop_at
                    if st.record and (isinstance(frame, Exit) or last or not s.queued
                                      or batch >= RECORD_EVERY_FRAMES or batch_bytes >= RECORD_EVERY_BYTES):
                        record(frame)
                        unrecorded, batch, batch_bytes = None, 0, 0
                        await s.ack(frame.seq)
                    if last:
                        break
            finally:
                if st.record and unrecorded is not None:
                    record(unrecorded)
            nursery.cancel_scope.cancel()

        def record(frame: Frame) -> None:
            state.record_delivery(s.id, frame.seq, sinks.sizes(),
                                  frame.data() if isinstance(frame, Exit) else None)

        def detach() -> None:
            st.detached = True
            nursery.cancel_scope.cancel()

        interrupts: list[float] = []

        async def interrupt() -> None:
            now = time.monotonic()
            interrupts[:] = [t for t in interrupts if now - t < 3] + [now]
            if not st.control or s.mode != "rw" or s.exit is not None or len(interrupts) >= 3:
                detach()
                return
            try:
                await s.signal("INT")
                if sys.stderr.isatty():
                    say(f"bento: sent INT to the function ({st.settings.detach_keys} detaches)")
            except BentoError as exc:
                say(f"bento: could not send INT: {exc}")

        async def signals_in() -> None:
            with trio.open_signal_receiver(signals.SIGINT, signals.SIGTERM, signals.SIGHUP,
                                           signals.SIGWINCH) as received:
                async for signum in received:
                    if signum == signals.SIGINT:
                        await interrupt()
                    elif signum == signals.SIGWINCH:
                        if st.tty and s.mode == "rw" and s.exit is None:
                            with contextlib.suppress(BentoError):
                                await s.resize(*window())
                    else:
                        detach()

        async def send(item: Any) -> bool:
            """Send a line (text, for api.recv()), bytes (for stdin), or None: the
            end of input closes both the function's stdin and its api.recv()."""
            try:
                if item is None:
                    await s.close_stdin()
                    await s.close_input()
                elif isinstance(item, bytes):
                    await s.write_stdin(item)
                elif st.to_recv:
                    await s.send(item)
                else:
                    await s.write_stdin(item + "\n")
                return True
            except (InputClosed, SessionGone):
                return False

        async def lines_in() -> None:
            # os.read, not sys.stdin: a thread abandoned in a buffered read would
            # hold the buffer's lock at interpreter exit.
            buf = b""
            while True:
                data = await trio.to_thread.run_sync(os.read, 0, 65536, abandon_on_cancel=True)
                if not st.to_recv:
                    # The function's stdin gets the bytes as they are.
                    if not await send(data or None) or not data:
                        return
                    continue
                buf += data
                *lines, buf = buf.split(b"\n")
                if not data and buf:
                    lines.append(buf)
                for line in lines:
                    if not await send(line.decode("utf-8", errors="replace")):
                        return
                if not data:
                    await send(None)
                    return

        async def keys_in() -> None:
            reader = KeyReader(parse_detach_keys(st.settings.detach_keys), raw=st.tty)
            # A terminal's viewer is told at once: a raw terminal echoes nothing.
            told_read_only = st.tty and not st.send_input
            if told_read_only:
                say(f"bento: read-only (viewer): your keys go nowhere; {st.settings.detach_keys} detaches")
            while True:
                data = await trio.to_thread.run_sync(os.read, 0, 1024, abandon_on_cancel=True)
                if not data:
                    if st.send_input:
                        await send(None)
                    return
                events = reader.feed(data)
                echo = reader.take_echo()
                if echo and st.send_input:
                    os.write(0, echo)
                typed = echo or any(ev.kind in ("line", "eof") for ev in events)
                if typed and s.mode != "rw" and not told_read_only:
                    told_read_only = True
                    say(f"bento: attached read-only (viewer token): what you type is not sent to the function "
                        f"({st.settings.detach_keys} detaches)")
                for ev in events:
                    if ev.kind == "detach":
                        detach()
                        return
                    if ev.kind == "interrupt":
                        await interrupt()
                    elif ev.kind == "eof" and st.send_input:
                        await send(None)
                    elif ev.kind == "line" and st.send_input:
                        await send(ev.text)
                    elif ev.kind == "keys" and st.send_input:
                        await send(ev.data)

        nursery.start_soon(output)
        nursery.start_soon(signals_in)
        if st.keys:
            nursery.start_soon(keys_in)
        elif st.send_input:
            nursery.start_soon(lines_in)
    return None if st.detached else st.code


def _screen(sinks: Sinks) -> set[str]:
    """The sinks that are the terminal stdout is (none when stdout is not one)."""
    try:
        out = os.fstat(sinks.fds["stdout"])
        if not os.isatty(sinks.fds["stdout"]):
            return set()
        err = os.fstat(sinks.fds["stderr"])
    except OSError:
        return set()
    same = os.isatty(sinks.fds["stderr"]) and err.st_rdev == out.st_rdev
    return {"stdout", "stderr"} if same else {"stdout"}


def window() -> tuple[int, int]:
    """(rows, cols) of this terminal (24x80 when stdin is not one)."""
    try:
        size = os.get_terminal_size(0)
    except OSError:
        return 24, 80
    return size.lines, size.columns


async def follow(settings: Settings, s: Any, *, attached: bool, stdin: bool, traceback: bool,
                  resume: ResumeFilter | None = None, stop_at: int | None = None,
                  to_recv: bool = False, tty: bool = False, file: str | None = None) -> int:
    """Stream a session; returns the exit code. ``attached``: run/attach (record
    positions, detach keys, ctrl-c signals the function); else a read-only look
    (logs). ``stdin``: the terminal's input goes to the function (its stdin, or
    with ``to_recv`` text values for api.recv())."""
    rw = s.mode == "rw"
    keys = attached and os.isatty(0)
    st = _Stream(settings, s, record=attached, send_input=stdin and rw, to_recv=to_recv, tty=tty, keys=keys,
                 control=attached and rw, traceback=traceback, stop_at=stop_at, resume=resume,
                 file=file)
    if keys:
        if tty and rw:
            with contextlib.suppress(BentoError):
                await s.resize(*window())  # this terminal, not the one that started it
        with raw_mode(0, output=tty):
            code = await _stream(st)
    else:
        code = await _stream(st)
    if st.detached:
        await s.detach()
        if attached:
            token = s.token or s.viewer_token
            say(f"bento: detached; the function keeps running. Attach again with:\n  bento attach {token}")
        return 0
    return code if code is not None else 0

