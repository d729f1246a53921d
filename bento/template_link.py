"""The server's side of the exchange template (bento/exchange_template.py).

``fork_warm`` gives a new warm exchange: the template forks it and hands over
one end of a fresh socket pair; the server keeps the other, as it does for a
warm exchange it starts itself. ``fork_exchange`` gives a session's exchange
(as ``Exchanges.spawn`` would start one), its stdout and stderr the fds given.
The template is started on first use and again after it died; when it cannot
be started or does not answer, the caller starts the exchange as its own
process instead (``TemplateUnavailable``).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import struct
import subprocess

import trio

from bento.exchange_template import MAX_REQUEST

log = logging.getLogger("bento.sessions")

START_TIMEOUT_S = 10.0  # the template's imports, on a busy machine
FORK_TIMEOUT_S = 5.0


class TemplateUnavailable(Exception):
    """No template to fork from now (the reason is the message)."""


class Template:
    """One exchange template process, forked from one request at a time."""

    def __init__(self, argv: list[str], nursery: trio.Nursery) -> None:
        self.argv = argv  # the exchange's boot; "--template FD" is appended
        self.nursery = nursery
        self.sock: trio.socket.SocketType | None = None
        self.proc: trio.Process | None = None
        self.lock = trio.Lock()
        self.buf = b""

    async def start(self) -> None:
        """Start the template now if it is not running (else its first fork does)."""
        async with self.lock:
            await self._start()

    async def fork_warm(self) -> tuple[socket.socket, int]:
        """(the server's end of the new warm exchange's link, its pid)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            pid = await self._fork(b"w", [theirs.fileno()])
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return ours, pid

    async def fork_exchange(self, args: list[str], stdout: int, stderr: int) -> int:
        """The pid of a new exchange run with ``args`` (the fds stay the caller's
        to close); ValueError if they are too long to ask for."""
        request = b"x" + "\0".join(args).encode("utf-8", "surrogateescape")
        if len(request) > MAX_REQUEST:  # (a path is at most 4096 bytes: not met in practice)
            raise ValueError(f"a request of {len(request)} bytes is longer than the template reads")
        return await self._fork(request, [stdout, stderr])

    async def _fork(self, request: bytes, fds: list[int]) -> int:
        async with self.lock:
            await self._start()
            assert self.sock is not None
            try:
                # A request is answered within milliseconds, and an answer left
                # unread would be taken for the next request's: not cancelled
                # halfway (bounded by its own timeout).
                with trio.CancelScope(shield=True), trio.fail_after(FORK_TIMEOUT_S):
                    await self.sock.sendmsg([request], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                         struct.pack(f"{len(fds)}i", *fds))])
                    line = await self._line()
                pid = int(line)
            except (OSError, ValueError, trio.TooSlowError, TemplateUnavailable) as exc:
                self._drop()
                raise TemplateUnavailable(f"the exchange template did not fork: {exc or 'timed out'}") from None
            if pid <= 0:
                raise TemplateUnavailable(f"the exchange template refused the request {request[:1]!r}")
            return pid

    async def _line(self) -> bytes:
        assert self.sock is not None
        while b"\n" not in self.buf:
            chunk = await self.sock.recv(64)
            if not chunk:
                raise TemplateUnavailable("it ended")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    async def _start(self) -> None:
        """Start the template unless it runs (the caller holds ``lock``)."""
        if self.sock is not None:
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            proc = await trio.lowlevel.open_process(
                [*self.argv, "--template", str(theirs.fileno())],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),), start_new_session=True)
        except OSError as exc:
            ours.close()
            raise TemplateUnavailable(f"cannot start the exchange template: {exc}") from None
        finally:
            theirs.close()
        self.nursery.start_soon(proc.wait)
        self.proc, self.sock, self.buf = proc, trio.socket.from_stdlib_socket(ours), b""
        try:
            with trio.fail_after(START_TIMEOUT_S):
                line = await self._line()
            if line != b"ready":
                raise TemplateUnavailable(f"it said {line[:80]!r}")
        except BaseException as exc:  # (cancelled too: a half-started template is not kept)
            self._drop()
            if not isinstance(exc, (OSError, trio.TooSlowError, TemplateUnavailable)):
                raise
            raise TemplateUnavailable(f"the exchange template did not start: {exc or 'timed out'}") from None
        log.info("warm pool: exchange template started (pid %d)", proc.pid)

    def _drop(self) -> None:
        """Forget the template (it is killed if it still runs; its children stay)."""
        if self.sock is not None:
            self.sock.close()
        if self.proc is not None and self.proc.returncode is None:
            try:
                os.kill(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.sock = self.proc = None

    def close(self) -> None:
        """At the server's end: the template sees its socket close and exits."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
