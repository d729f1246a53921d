"""A session's state on disk, read back into a session core, and the writes an ended one still takes.

The exchange uses it when it starts (a new session, a restart, an adoption);
the server uses it for a session whose function has ended and whose
exchange has therefore exited (an ended session costs no process): its
positions come from ``state.cbor`` and the output log, and the owner's acks
and shared-state puts are applied here, under the session's ``lock`` (the one
an exchange holds for its life, so the two never write at once). Synchronous
file I/O, no trio: the server calls it from a worker thread.
"""

from __future__ import annotations

import array
import errno
import fcntl
import os
import time

from bento import protocol, session_core, sessionlog

STATE_FILE = "state.cbor"


def load_saved(sdir: str) -> dict:
    """The saved state (``{}`` for a session that has none yet)."""
    try:
        with open(os.path.join(sdir, STATE_FILE), "rb") as f:
            saved = protocol.decode_internal(f.read())
    except FileNotFoundError:
        return {}
    if not isinstance(saved, dict):
        raise ValueError(f"{STATE_FILE} holds no map")
    return saved


def save(sdir: str, core: session_core.SessionCore, extra: dict) -> None:
    """Write the core's saved state (and ``extra``: what the exchange adds) atomically."""
    sessionlog.write_atomic(os.path.join(sdir, STATE_FILE), protocol.encode({**core.saved(), **extra}))


def recover(out: sessionlog.Writer, saved: dict, meta: dict, input_seq: int) -> session_core.SessionCore:
    """The core as it was: the saved state, then what the output log says (an
    exit frame on disk counts even if the saved state missed it)."""
    buffer = meta["buffer"]
    sizes = array.array("q")
    base = out.next_seq
    last: tuple[int, bytes] | None = None
    for seq, payload in out.records():
        if not sizes:
            base = seq
        sizes.append(data_len(payload))
        last = (seq, payload)
    if last is not None:
        _seq, ch, data = protocol.decode_internal(last[1])
        if ch == "exit":
            saved = {**saved, "exit": data, "exit_seq": last[0], "state": data["state"],
                     "ended": saved.get("ended") or time.time()}
            sizes[-1] = 0
    return session_core.SessionCore(buffer["max_bytes"], buffer["policy"], saved=saved,
                                    size_base=base, sizes=sizes, input_seq=input_seq)


def data_len(payload: bytes) -> int:
    """Length of a frame's encoded ``data`` inside its encoded ``[seq, ch, data]``."""
    pos = 1
    for _ in range(2):  # skip seq (uint) and ch (text)
        ai = payload[pos] & 0x1F
        major = payload[pos] >> 5
        size = {24: 1, 25: 2, 26: 4, 27: 8}.get(ai, 0)
        n = ai if size == 0 else int.from_bytes(payload[pos + 1 : pos + 1 + size], "big")
        pos += 1 + size + (n if major == 3 else 0)
    return len(payload) - pos


class Ended:
    """An ended session opened by the server under the session's lock: its core
    (with the log's writer, for trimming) and what the exchange saved with it.
    Use as a context manager; raises Busy if an exchange holds the session."""

    def __init__(self, sdir: str, meta: dict) -> None:
        self.dir = sdir
        self.meta = meta
        self.lock_fd = -1
        self.out: sessionlog.Writer | None = None

    def __enter__(self) -> Ended:
        self.lock_fd = take_lock(self.dir)
        if self.lock_fd < 0:
            raise Busy(f"an exchange holds {self.dir}")
        try:
            self.saved = load_saved(self.dir)
            self.out = sessionlog.Writer(self.dir, "out")
            inputs = sessionlog.Writer(self.dir, "in")
            inputs.close()
            for log in (self.out, inputs):
                if log.torn_bytes:
                    note(self.dir, f"cut a torn record of {log.torn_bytes} bytes off the {log.prefix} log")
            self.core = recover(self.out, self.saved, self.meta, inputs.next_seq - 1)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.out is not None:
            self.out.close()
        if self.lock_fd >= 0:
            os.close(self.lock_fd)
            self.lock_fd = -1

    def apply(self, actions: tuple) -> None:
        """Carry out the core's actions: trims and saves (nothing else happens to an ended session)."""
        assert self.out is not None
        for action in actions:
            if type(action) is session_core.Trim:
                self.out.drop_before(action.first_seq)
        if actions:
            save(self.dir, self.core, {k: v for k, v in self.saved.items() if k in ("enforced", "sandbox")})

    def hello(self) -> dict:
        """What an exchange's hello would say of this session."""
        core = self.core
        return {**core.snapshot(), "enforced": self.saved.get("enforced", {}),
                "shared_version": core.shared_version, "shared_value": core.shared_value}


def note(sdir: str, message: str) -> None:
    """Tell the operator, in the session's log (``exchange.log``), what was done to its files."""
    try:
        with open(os.path.join(sdir, "exchange.log"), "a") as f:
            f.write(f"server: {message}\n")
    except OSError:
        pass  # the log is on the same failing disk; the files say it anyway


class Busy(Exception):
    """Another process (an exchange) holds the session's lock."""


def take_lock(sdir: str) -> int:
    """The session's lock fd, or -1 if another process holds it."""
    lock_fd = os.open(os.path.join(sdir, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(lock_fd)
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return -1
        raise
    return lock_fd


def open_ended(sdir: str, meta: dict) -> dict | None:
    """The hello of an ended session found on disk (exit frame written), or None
    if its function has not ended (it needs an exchange) or an exchange holds it."""
    try:
        with Ended(sdir, meta) as s:
            if s.core.exit is None:
                return None
            return s.hello()
    except Busy:
        return None


def ack(sdir: str, meta: dict, seq: int) -> dict:
    """The owner's ack on an ended session: its new positions."""
    with Ended(sdir, meta) as s:
        s.apply(s.core.ack(seq))
        return s.core.snapshot()


def put_state(sdir: str, meta: dict, value: bytes, if_version: int | None) -> tuple[bool, int]:
    """Compare-and-set of an ended session's shared state: (ok, version now)."""
    with Ended(sdir, meta) as s:
        ok, version, actions = s.core.put_state(value, if_version)
        s.apply(actions)
        return ok, version
