"""The function's standard input, for the exchange: bytes queued, then written as the pipe takes them.

An input with ``stdin: true`` (docs/protocol.md, "Standard input") is recorded
in the session's input log like every input, then queued here; the exchange
writes the queue to the pipe that is the environment's fd 0 whenever the pipe
has room, and closes the pipe once the queue is written after a stdin
``eof``. The input log is the one source: a restarted exchange replays it, so
each byte is written once. This module never blocks (the fd is non-blocking)
and never imports trio (it runs in the exchange).
"""

from __future__ import annotations

import os
import selectors

from bento.launch import close_quietly

TYPE_CHECKING = False  # the exchange does not import typing (it starts per session)
if TYPE_CHECKING:
    from bento.exchange import Exchange


class Stdin:
    """The exchange's end of the function's stdin pipe, and what waits to go into it."""

    def __init__(self, ex: Exchange, fd: int) -> None:
        self.ex = ex
        self.fd = fd  # -1 once closed
        self.buf = bytearray()
        self.eof = False  # a stdin eof was accepted: close after the queue
        self.broken = False  # every reader of the pipe is gone

    @property
    def pending(self) -> int:
        """Bytes accepted and not yet in the pipe."""
        return len(self.buf)

    def add(self, data: bytes | None) -> None:
        """Queue ``data`` (None: the eof). Bytes after the eof, or once nobody reads
        the pipe, go nowhere, as a write to a closed pipe would."""
        if data is None:
            self.eof = True
        elif not self.eof and not self.broken:
            self.buf += data

    def flush(self) -> bool:
        """Write what the pipe takes now; True while bytes wait for room."""
        while self.buf and self.fd >= 0:
            try:
                n = os.write(self.fd, self.buf)
            except BlockingIOError:
                return True
            except OSError:
                # EPIPE: the function (every process of it) closed its stdin.
                self.broken = True
                self.buf.clear()
                break
            del self.buf[:n]
        return False

    @property
    def finished(self) -> bool:
        """Nothing more will be written: the fd may be closed."""
        return self.fd >= 0 and not self.buf and (self.eof or self.broken)

    def pump(self, _fd: int = -1) -> None:
        """Write what the pipe takes; wait for room (the exchange's selector) for
        the rest; close the pipe once finished."""
        if self.fd < 0:
            return
        waiting = self.flush()
        self.ex.watch_fd(self.fd, selectors.EVENT_WRITE if waiting else 0, self.pump)
        if self.finished:
            close_quietly(self.fd)
            self.fd = -1

    def close(self) -> None:
        """The function has ended: the pipe goes after this round of events."""
        if self.fd >= 0:
            self.ex.watch_fd(self.fd, 0, None)
            self.ex.to_close.append(self.fd)
            self.fd = -1
