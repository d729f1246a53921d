"""The internal wire: one length-prefix framer for driver↔exchange and exchange↔server.

Sans-IO: :class:`Framer` turns bytes into message bodies and bodies into
frames (a 4-byte big-endian length, then the body); the caller does the
reading and writing. The driver, the exchange and the server all frame with it
(the driver imports nothing of bento, so it lives here). It must never do I/O
and never import anything but the stdlib's ``struct``.
"""

from __future__ import annotations

import struct

LEN = struct.Struct(">I")

#: The version of the server↔exchange messages: the exchange's ``hello`` carries
#: it, and a server connects only to an exchange of its own version (an
#: exchange outlives the server that started it, so a new server may meet an
#: old one).
VERSION = 2


class FrameTooLarge(ValueError):
    """A peer announced a message above the bound this framer was given."""


class Framer:
    """Bodies out of a byte stream, bounded: a message over ``max_body`` bytes is
    an error (raised when its length arrives), never a buffer that grows."""

    def __init__(self, max_body: int) -> None:
        self.max_body = max_body
        self.buf = bytearray()

    def feed(self, data: bytes) -> None:
        self.buf += data

    def next(self) -> bytes | None:
        """The next whole body, or None until more bytes arrive."""
        buf = self.buf
        if len(buf) < 4:
            return None
        n = LEN.unpack_from(buf, 0)[0]
        if n > self.max_body:
            raise FrameTooLarge(f"message of {n} bytes exceeds {self.max_body}")
        if len(buf) < 4 + n:
            return None
        body = bytes(buf[4 : 4 + n])
        del buf[: 4 + n]
        return body

    @property
    def pending(self) -> int:
        """Bytes received and not yet returned as a body."""
        return len(self.buf)


def frame(body: bytes) -> bytes:
    """``body`` with its length prefix."""
    return LEN.pack(len(body)) + body
