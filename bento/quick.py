"""Writes that a socket takes at once, done at once.

A trio socket send passes through the scheduler once even when the kernel
took every byte (its checkpoint after the write): one more turn of the run
loop, with its ``epoll_wait``, per message. On the paths where one message
answers another (an input, the exchange's reply, the ``in_ack``; an output
and its ``out`` event) those turns are a good part of the server's time. A
sender whose lock is free therefore writes to the socket's fd directly; only
what the kernel did not take goes the scheduled way, under the same lock.
After ``RUN_MAX`` such writes in a row a send takes the scheduled way all
the same, so a task that sends without pause still lets the others run.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import trio

RUN_MAX = 16


class QuickWriter:
    """The quick way for one socket's sends, serialised by ``lock``."""

    def __init__(self, sock: trio.socket.SocketType, lock: trio.Lock) -> None:
        self.sock = sock
        self.lock = lock
        self.run = 0  # quick writes since the last scheduled send

    def write_now(self, views: Sequence[memoryview | bytes]) -> int | None:
        """Take the lock and write what the socket takes now: the number of
        bytes written, the lock held (the caller writes the rest, if any, and
        releases it). None: not tried (the lock is busy, the run is over, the
        socket is closed), the lock not taken. OSError: the socket broke (the
        lock is not held)."""
        fd = self.sock.fileno()
        if fd < 0 or self.run >= RUN_MAX or self.lock.locked():
            self.run = 0
            return None
        self.lock.acquire_nowait()
        try:
            sent = os.writev(fd, views)
        except BlockingIOError:
            sent = 0
        except BaseException:
            self.lock.release()
            raise
        self.run += 1
        return sent
