"""What the function is blocked waiting for: api.recv() or its standard input.

The driver tells the exchange (a ``wait`` message, bento_driver.wire) when the
function starts and stops waiting, so that ``status`` can say a function makes
no progress because it waits for input. Only a wait that outlasts
:data:`GRACE_S` is told: a function fed a stream of inputs costs no message.
"stdin" is seen for reads through ``sys.stdin`` (``input()``,
``sys.stdin.read``/``readline``, iterating it): reads of fd 0 by other means
(``os.read(0, n)``, a child process) are not.
"""

from __future__ import annotations

import _thread
import io
import os
import select
import sys

TYPE_CHECKING = False  # typing costs every environment ~0.6 MiB and 2 ms at its start
if TYPE_CHECKING:
    from typing import Any

#: A wait for input shorter than this is not told to the exchange: a function
#: that takes a stream of inputs costs no extra message per api.recv() or read.
GRACE_S = 0.05


class Waits:
    """What the function is blocked waiting for, told to the exchange (a ``wait``
    message) each time that changes. Only a wait that lasts beyond GRACE_S is
    entered here, so a status says "waiting" only for a function that really is."""

    def __init__(self, link: Any) -> None:
        self.link = link
        self.lock = _thread.allocate_lock()
        self.counts = {"recv": 0, "stdin": 0}  # threads blocked in each, at once
        self.told: str | None = None

    def enter(self, what: str) -> None:
        with self.lock:
            self.counts[what] += 1
            self._tell()

    def leave(self, what: str) -> None:
        with self.lock:
            self.counts[what] = max(0, self.counts[what] - 1)
            self._tell()

    def _tell(self) -> None:
        on = "recv" if self.counts["recv"] else "stdin" if self.counts["stdin"] else None
        if on != self.told:
            self.told = on
            self.link.send({"t": "wait", "on": on})


def _readable(fd: int, timeout: float | None) -> bool:
    """Whether a read of ``fd`` returns at once (data, end of file or an error),
    waiting up to ``timeout`` seconds (None: until it does)."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(None if timeout is None else int(timeout * 1000)))


class _Stdin(io.FileIO):
    """The function's standard input (fd 0 or a copy of it) as a file whose reads
    tell the exchange when they block: a read that finds no data within GRACE_S
    is a wait for "stdin" until data (or the end of file) arrives."""

    waits: Waits

    def _block(self) -> None:
        fd = self.fileno()
        if _readable(fd, 0) or not os.get_blocking(fd) or _readable(fd, GRACE_S):
            return
        self.waits.enter("stdin")
        try:
            _readable(fd, None)
        finally:
            self.waits.leave("stdin")

    def readinto(self, b: Any) -> int | None:  # type: ignore[override]
        self._block()
        return super().readinto(b)

    def read(self, size: int | None = -1) -> bytes | None:  # type: ignore[override]
        if size is None or size < 0:
            return self.readall()
        self._block()
        return super().read(size)

    def readall(self) -> bytes:
        chunks: list[bytes] = []
        while True:
            chunk = self.read(1 << 16)
            if not chunk:  # the end of file (or no data on a non-blocking fd)
                return b"".join(chunks)
            chunks.append(chunk)


def watch_stdin(waits: Waits, tty: bool) -> None:
    """Make ``sys.stdin`` a :class:`_Stdin`, with the encoding, errors and buffering
    Python gave it. On a terminal it reads a copy of fd 0: input() reads fd 0
    itself, past sys.stdin, when sys.stdin is fd 0 and a terminal."""
    old = sys.stdin
    if old is None:
        return
    try:
        fd = os.dup(0) if tty else 0
    except OSError:
        return  # no fd 0: the function has no standard input to wait on
    raw = _Stdin(fd, "rb", closefd=tty)
    raw.waits = waits
    raw.name = "<stdin>"  # type: ignore[misc]
    sys.stdin = io.TextIOWrapper(io.BufferedReader(raw), encoding=old.encoding, errors=old.errors,
                                 newline="\n", line_buffering=bool(old.line_buffering))
