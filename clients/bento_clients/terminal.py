"""The CLI's side of the terminal: writing frames out exactly once, and reading
keys (line input, the detach sequence) from a TTY.

- ``Sinks`` writes bytes to stdout/stderr with plain ``os.write`` (no Python
  buffering: when ``write`` returns, the bytes are in the kernel) and knows
  which of them are regular files, and their sizes.
- ``ResumeFilter`` is the crash-recovery half of exactly-once: after a crash
  between writing frame N+1 and recording it, the bytes already in a regular
  file are skipped instead of written twice (docs/cli.md).
- ``KeyReader`` is a small line discipline for a TTY in raw mode: it turns key
  bytes into lines, EOF, interrupt and detach events, with local echo.

Pure logic apart from ``Sinks`` and ``raw_mode``; no trio.
"""

from __future__ import annotations

import contextlib
import os
import select
import stat
import termios
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["DEFAULT_DETACH_KEYS", "KeyEvent", "KeyReader", "ResumeFilter", "Sinks",
           "parse_detach_keys", "raw_mode"]

DEFAULT_DETACH_KEYS = "ctrl-p,ctrl-q"


def parse_detach_keys(spec: str) -> bytes:
    """Bytes of a detach sequence written as docker does: ``ctrl-p,ctrl-q``,
    ``ctrl-a,d``, ``ctrl-@``... (``ctrl-<x>`` for x in a-z, @, [, \\, ], ^, _;
    or a single character). Raises ValueError."""
    out = bytearray()
    for part in spec.split(","):
        key = part.strip()
        if key.lower().startswith("ctrl-") and len(key) == 6:
            c = key[5].lower()
            if "a" <= c <= "z":
                out.append(ord(c) - ord("a") + 1)
            elif c in "@[\\]^_":
                out.append(ord(c) - ord("@"))
            else:
                raise ValueError(f"bad detach key {key!r}")
        elif len(key) == 1 and key.isprintable():
            out += key.encode()
        else:
            raise ValueError(f"bad detach key {key!r} (examples: ctrl-p,ctrl-q or ctrl-a,d)")
    if not out:
        raise ValueError("empty detach key sequence")
    return bytes(out)


class Sinks:
    """The CLI's stdout and stderr as raw file descriptors."""

    def __init__(self, out_fd: int = 1, err_fd: int = 2) -> None:
        self.fds = {"stdout": out_fd, "stderr": err_fd}

    @staticmethod
    def identity(fd: int) -> str | None:
        """``"<dev>:<ino>"`` of a regular file, None for a TTY, pipe or socket."""
        try:
            st = os.fstat(fd)
        except OSError:
            return None
        return f"{st.st_dev}:{st.st_ino}" if stat.S_ISREG(st.st_mode) else None

    def sizes(self) -> dict[str, int]:
        """Sizes of the regular files among the sinks, by identity."""
        out = {}
        for fd in self.fds.values():
            ident = self.identity(fd)
            if ident is not None:
                out[ident] = os.fstat(fd).st_size
        return out

    def write(self, name: str, data: bytes) -> None:
        """All of ``data`` to sink ``name`` ("stdout" or "stderr")."""
        fd = self.fds[name]
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(fd, view):]
            except BlockingIOError:  # a non-blocking descriptor we share with someone
                select.select([], [fd], [])
            except BrokenPipeError:
                raise
            except InterruptedError:
                continue


class ResumeFilter:
    """Skips bytes a crashed predecessor already wrote to a regular file.

    ``recorded`` maps file identities to their sizes right after the last frame
    recorded as delivered. A sink that is the same regular file and has grown
    since holds (part of) the next frame(s): that many bytes are skipped, in
    order, per file."""

    def __init__(self, sinks: Sinks, recorded: dict[str, int]) -> None:
        self.sinks = sinks
        self.budget: dict[str, int] = {}
        for name in sinks.fds:
            ident = sinks.identity(sinks.fds[name])
            if ident is not None and ident in recorded and ident not in self.budget:
                grown = os.fstat(sinks.fds[name]).st_size - int(recorded[ident])
                if grown > 0:
                    self.budget[ident] = grown

    @property
    def active(self) -> bool:
        return any(self.budget.values())

    def filter(self, name: str, data: bytes) -> bytes:
        """The part of ``data`` (for sink ``name``) not written yet."""
        if not self.active:
            return data
        ident = self.sinks.identity(self.sinks.fds[name])
        left = self.budget.get(ident or "", 0)
        if not left:
            return data
        skip = min(left, len(data))
        self.budget[ident or ""] = left - skip
        return data[skip:]


@dataclass(frozen=True)
class KeyEvent:
    """What a key press means: ``kind`` is "line" (``text`` set), "eof",
    "interrupt" (ctrl-c), "detach", or with ``raw`` "keys" (``data``: the bytes
    as typed, for a remote terminal that does its own editing)."""

    kind: str
    text: str = ""
    data: bytes = b""


_ENTER = (0x0D, 0x0A)
_ERASE = (0x7F, 0x08)
_KILL_LINE = 0x15  # ctrl-u
_EOF = 0x04  # ctrl-d
_INTERRUPT = 0x03  # ctrl-c


class KeyReader:
    """A line discipline for a raw TTY, with a detach sequence.

    ``feed(bytes)`` returns the events the bytes complete; ``take_echo()`` the
    bytes to show on the terminal meanwhile. Bytes that start the detach
    sequence are held until it completes (detach) or breaks (then they are
    ordinary input: a lone ctrl-p followed by 'x' puts "\\x10x" in the line)."""

    def __init__(self, detach_keys: bytes | None, raw: bool = False) -> None:
        self.detach_keys = detach_keys or b""
        self.raw = raw
        self.held = b""
        self.line = bytearray()
        self.echo = bytearray()

    def take_echo(self) -> bytes:
        out = bytes(self.echo)
        self.echo.clear()
        return out

    def feed(self, data: bytes) -> list[KeyEvent]:
        events: list[KeyEvent] = []
        for b in data:
            if self.detach_keys:
                candidate = self.held + bytes((b,))
                if self.detach_keys.startswith(candidate):
                    if candidate == self.detach_keys:
                        self.held = b""
                        events.append(KeyEvent("detach"))
                    else:
                        self.held = candidate
                    continue
                if self.held:
                    # The sequence broke: what was held is ordinary input, and
                    # this byte may start a new sequence.
                    held, self.held = self.held, b""
                    for h in held:
                        self._key(h, events)
                    events.extend(self.feed(bytes((b,))))
                    continue
            self._key(b, events)
        return events

    def _key(self, b: int, events: list[KeyEvent]) -> None:
        if self.raw:
            if events and events[-1].kind == "keys":
                events[-1] = KeyEvent("keys", data=events[-1].data + bytes((b,)))
            else:
                events.append(KeyEvent("keys", data=bytes((b,))))
        elif b in _ENTER:
            events.append(KeyEvent("line", self.line.decode("utf-8", errors="replace")))
            self.line.clear()
            self.echo += b"\r\n"
        elif b in _ERASE:
            if self.line:
                while self.line[-1] & 0xC0 == 0x80 and len(self.line) > 1:  # UTF-8 continuation bytes
                    del self.line[-1]
                del self.line[-1]  # and the character's first byte
                self.echo += b"\b \b"
        elif b == _KILL_LINE:
            self.echo += b"\b \b" * len(self.line.decode("utf-8", errors="replace"))
            self.line.clear()
        elif b == _EOF:
            if not self.line:
                events.append(KeyEvent("eof"))
        elif b == _INTERRUPT:
            events.append(KeyEvent("interrupt"))
        else:
            self.line.append(b)
            self.echo += (b"^" + bytes((b + 64,))) if b < 0x20 else bytes((b,))


@contextlib.contextmanager
def raw_mode(fd: int, output: bool = False) -> Iterator[None]:
    """The TTY on ``fd`` without line editing, echo, signals or flow control
    (ctrl-q must reach us), restored on exit; output processing is kept unless
    ``output`` (a remote terminal's output is already what the screen needs)."""
    old = termios.tcgetattr(fd)
    new = termios.tcgetattr(fd)
    if output:
        new[1] &= ~termios.OPOST
    new[0] &= ~(termios.IXON | termios.IXOFF | termios.ICRNL | termios.INLCR | termios.IGNCR)
    new[3] &= ~(termios.ICANON | termios.ECHO | termios.ISIG | termios.IEXTEN)
    new[6][termios.VMIN] = 1
    new[6][termios.VTIME] = 0
    termios.tcsetattr(fd, termios.TCSANOW, new)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, old)
