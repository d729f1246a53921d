"""The internal wire: the framer and the message vocabulary of driver↔exchange↔server.

Sans-IO: :class:`Framer` turns bytes into message bodies and bodies into
frames (a 4-byte big-endian length, then the body); the caller does the
reading and writing. Each body is one CBOR map (``bento_driver.cbor``) whose
``t`` names its type in :data:`MESSAGES`, the one table of every message
between the three processes; ``api.send`` is the exception, a body that
starts with :data:`SEND_TAG` (the hot path: no map to build or parse). The
driver, the exchange and the server all use this module (the driver imports
nothing of bento, so it lives here). It must never do I/O and never import
anything but the stdlib's ``struct``.
"""

from __future__ import annotations

import struct

LEN = struct.Struct(">I")

#: The version of the server↔exchange messages: the exchange's ``hello`` carries
#: it, and a server connects only to an exchange of a version in :data:`ACCEPTED`
#: (an exchange outlives the server that started it, so a new server may meet an
#: old one).
VERSION = 7
#: The exchange versions this server talks to: its own, and 6, whose messages are
#: 7's without the optional ``waiting`` (the server's messages are the same), so
#: a server upgraded from 6 keeps the running sessions of the one before.
ACCEPTED = frozenset({6, 7})


#: ``api.send``: this byte, the channel's length (1 byte), the channel (UTF-8), the value (CBOR).
SEND_TAG = b"\x01"

TO_DRIVER = "exchange>driver"
FROM_DRIVER = "driver>exchange"
TO_EXCHANGE = "server>exchange"
FROM_EXCHANGE = "exchange>server"

_SNAPSHOT = "state next_seq first_seq acked_seq input_seq buffer_bytes dropped_to ended exit exit_seq history_bytes"
#: Snapshot fields that an exchange of an older accepted version does not send.
_SNAPSHOT_NEW = "waiting"

#: Every message type, by direction: ``t`` -> (required fields, optional fields).
#: ``rid`` pairs a server's request with the exchange's ``reply``.
MESSAGES: dict[str, dict[str, tuple[frozenset[str], frozenset[str]]]] = {
    direction: {t: (frozenset(req.split()), frozenset(opt.split())) for t, (req, opt) in table.items()}
    for direction, table in {
        TO_DRIVER: {
            # module: import this module from the work dir instead of running code
            # tty: stdin/stdout/stderr are a terminal that the driver makes its controlling one
            # site: the session's packages (added with their .pth files)
            "start": ("code entry args kwargs env cwd rlimits max_value max_depth max_items",
                      "module tty site"),
            "in": ("data", ""),  # an input's value (CBOR bytes)
            "eof": ("", ""),  # the input is closed
            "signal": ("sig", ""),  # raise INT or TERM in the function's main thread
            "state": ("version value", ""),  # the reply to get
            "put": ("ok version", "error"),  # the reply to put
        },
        FROM_DRIVER: {
            "up": ("", ""),  # the driver runs (before its start message)
            "get": ("", ""),  # api.state.get()
            "put": ("v if", ""),  # api.state.put(value, if_version)
            "exit": ("kind result error code", ""),  # the function's end, as the driver saw it
            # on: what the function is now blocked waiting for, "recv" (api.recv) or
            # "stdin" (a read of sys.stdin), or None; sent when that changes, and only
            # for a wait longer than the driver's grace period
            "wait": ("on", ""),
        },
        TO_EXCHANGE: {
            # limits: put them on the environment once it is up (and allow_unenforced:
            # may a limit be per process only); then the server may send the driver
            # its start itself, through the directory's start.fifo (bento/launch.py)
            "warm": ("sandbox sandbox_cmd python driver_path network dir", "envs_dir fork limits allow_unenforced"),
            # started: the server sent the driver its start; meta: the session's meta.cbor
            # (when it is at most bento.warm.INLINE_META_MAX bytes, else read from the dir)
            "assign": ("dir", "started meta"),
            "input": ("rid seq", "data eof stdin"),  # stdin: data is bytes for fd 0, not a value
            "ack": ("seq", ""),
            "sync": ("rid", ""),  # positions now: replied with the snapshot's fields
            # trim the history to at most ``keep`` bytes (the server-wide limit): replied
            # with the snapshot; sent only to an exchange that announced history_bytes above 0
            "trim": ("rid keep", ""),
            "signal": ("rid signal", "by"),  # by: the admin who kills (KILL only)
            "state_get": ("rid", ""),
            "state_put": ("rid value if_version", ""),
            "end": ("rid", ""),  # destroy: kill, delete, exit
            "resize": ("rid rows cols", ""),  # the terminal's window size (tty sessions)
        },
        FROM_EXCHANGE: {
            "warm_ready": ("pid error", "rlimits"),  # rlimits: the warm limits are on (the driver's part)
            "hello": (f"wire pid enforced shared_version shared_value {_SNAPSHOT}", _SNAPSHOT_NEW),
            "progress": (_SNAPSHOT, _SNAPSHOT_NEW),
            "state": ("version value", ""),  # the shared state changed
            "reply": ("rid ok", f"code message input_seq version value {_SNAPSHOT} {_SNAPSHOT_NEW}"),
        },
    }.items()
}


class WireError(ValueError):
    """A message that :data:`MESSAGES` does not allow (a peer's bug, or a hostile driver)."""


def message(direction: str, t: str, **fields: object) -> dict:
    """A message of type ``t`` for ``direction``, checked against the table."""
    msg = {"t": t, **fields}
    check(direction, msg)
    return msg


def check(direction: str, msg: object) -> str:
    """The type of ``msg`` if the table allows it in ``direction``; else WireError."""
    if type(msg) is not dict:
        raise WireError(f"a message is a map, not {type(msg).__name__}")
    t = msg.get("t")
    spec = MESSAGES[direction].get(t)  # type: ignore[arg-type]
    if spec is None:
        raise WireError(f"unknown message {t!r} ({direction})")
    required, optional = spec
    keys = msg.keys() - {"t"}
    if not required <= keys or not keys <= required | optional:
        raise WireError(f"message {t!r} has fields {sorted(keys)}, wants {sorted(required)} "
                        f"(and maybe {sorted(optional)})")
    return t  # type: ignore[return-value]


class FrameTooLarge(ValueError):
    """A peer announced a message above the bound this framer was given."""


class Framer:
    """Bodies out of a byte stream, bounded: a message over ``max_body`` bytes is
    an error (raised when its length arrives), never a buffer that grows.

    What arrived is kept as one ``bytes`` and a read position, so a body is one
    slice of it (a small message costs no buffer shift); a message that is not
    whole yet is gathered in a bytearray until its last byte comes (a long one
    costs no copy of what came before per read, and a peer that sends a byte
    at a time costs a byte per byte)."""

    def __init__(self, max_body: int) -> None:
        self.max_body = max_body
        self.buf = b""
        self.pos = 0  # where the next message starts in buf
        self.gathered = bytearray()  # a message not whole yet: its bytes so far,
        self.missing = 0  # and how many it still needs

    def feed(self, data: bytes) -> None:
        if self.missing:
            self.gathered += data
            self.missing -= len(data)
            if self.missing > 0:
                return
            data, self.missing = bytes(self.gathered), 0
            self.gathered.clear()
        elif self.pos < len(self.buf):
            data = self.buf[self.pos :] + data  # (mostly a length's first bytes)
        self.buf, self.pos = bytes(data), 0  # (the same object when it is bytes)

    def next(self) -> bytes | None:
        """The next whole body, or None until more bytes arrive."""
        buf, pos = self.buf, self.pos
        if self.missing or len(buf) - pos < 4:
            return None
        n = LEN.unpack_from(buf, pos)[0]
        if n > self.max_body:
            raise FrameTooLarge(f"message of {n} bytes exceeds {self.max_body}")
        end = pos + 4 + n
        if end > len(buf):  # gathered until whole
            self.gathered += memoryview(buf)[pos:]
            self.missing = end - len(buf)
            self.buf, self.pos = b"", 0
            return None
        self.pos = end
        return buf[pos + 4 : end]

    @property
    def pending(self) -> int:
        """Bytes received and not yet returned as a body."""
        return len(self.gathered) if self.missing else len(self.buf) - self.pos

    def rest(self) -> bytes:
        """The bytes received and not yet returned as a body."""
        return bytes(self.gathered) if self.missing else self.buf[self.pos :]


def frame(body: bytes) -> bytes:
    """``body`` with its length prefix."""
    return LEN.pack(len(body)) + body
