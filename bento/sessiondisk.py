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
import struct
import sys
import time

from bento import protocol, session_core, sessionlog

STATE_FILE = "state.cbor"
# An ended session's frame sizes (little-endian int64: the first seq, then one
# size per frame up to the exit frame): written once at the end, so that
# reading the session back does not scan its whole output log.
SIZES_FILE = "sizes.bin"
# Saved with an ended session whose exit frame is on disk: where each log ends
# (its last segment's first seq and byte size; 0, 0 for no segment) and the
# last input's seq, so that reading it back needs no scan of its logs' last
# segments while the files are as the exchange left them.
LOG_END = "log_end"


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


def save(sdir: str, core: session_core.SessionCore, extra: dict, prepared: set[str] | None = None) -> None:
    """Write the core's saved state (and ``extra``: what the exchange adds)
    atomically; at the session's end, its frame sizes once (:data:`SIZES_FILE`).
    ``prepared``: the files still waiting in ``prepare_dir``'s empty copies."""
    if core.exit is not None and not os.path.exists(os.path.join(sdir, SIZES_FILE)):
        sizes = array.array("q", core.sizes)
        if sys.byteorder == "big":
            sizes.byteswap()
        write_file(sdir, SIZES_FILE, struct.pack("<q", core.size_base) + sizes.tobytes(), prepared)
    if core.exit_seq is not None and core.durable_next > core.exit_seq and LOG_END not in extra:
        extra = {**extra, LOG_END: [*_log_end(sdir, "out"), *_log_end(sdir, "in"), core.input_seq]}
    write_file(sdir, STATE_FILE, protocol.encode({**core.saved(), **extra}), prepared)


def write_file(sdir: str, name: str, data: bytes, prepared: set[str] | None = None) -> None:
    """Write ``name`` atomically: into its empty copy made ahead of time
    (``name`` + :data:`PREPARED`, by ``prepare_dir``) while ``prepared`` lists it
    (once), else through a new temporary file."""
    path = os.path.join(sdir, name)
    ready = None
    if prepared is not None and name in prepared:
        prepared.discard(name)
        ready = path + PREPARED
    sessionlog.write_atomic(path, data, prepared=ready)


def _log_end(sdir: str, prefix: str) -> tuple[int, int]:
    """A log's last segment: its first seq and byte size (0, 0 if it has none)."""
    segments = sessionlog.list_segments(sdir, prefix)
    if not segments:
        return 0, 0
    start, path = segments[-1]
    return start, os.path.getsize(path)


def ended_as_left(sdir: str, saved: dict) -> tuple[int, int] | None:
    """(next seq of the output log, last input seq) of an ended session whose
    logs end where its saved :data:`LOG_END` says (nothing was cut or added
    since its exchange saved it); None otherwise (its logs must be scanned)."""
    end = saved.get(LOG_END)
    exit_seq = saved.get("exit_seq")
    if (saved.get("exit") is None or not isinstance(exit_seq, int) or not isinstance(end, list) or len(end) != 5
            or not all(isinstance(x, int) for x in end)):
        return None
    if (_log_end(sdir, "out"), _log_end(sdir, "in")) != ((end[0], end[1]), (end[2], end[3])):
        return None
    return exit_seq + 1, end[4]


def saved_sizes(sdir: str, saved: dict, next_seq: int) -> tuple[int, array.array] | None:
    """The frame sizes saved at the session's end, if they agree with the saved
    exit and the output log (which ends at ``next_seq``); None otherwise."""
    exit_seq = saved.get("exit_seq")
    if saved.get("exit") is None or not isinstance(exit_seq, int) or exit_seq + 1 != next_seq:
        return None
    try:
        with open(os.path.join(sdir, SIZES_FILE), "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    if len(raw) < 8 or len(raw) % 8:
        return None
    base = struct.unpack_from("<q", raw)[0]
    sizes = array.array("q")
    sizes.frombytes(raw[8:])
    if sys.byteorder == "big":
        sizes.byteswap()
    if base < 1 or base + len(sizes) != next_seq or (sizes and sizes[-1] != 0) or min(sizes, default=0) < 0:
        return None
    return base, sizes


def recover(out: sessionlog.Writer, saved: dict, meta: dict, input_seq: int) -> session_core.SessionCore:
    """The core as it was: the saved state, then what the output log says (an
    exit frame on disk counts even if the saved state missed it). An ended
    session's sizes come from :data:`SIZES_FILE` when it agrees with the log."""
    known = saved_sizes(out.dirpath, saved, out.next_seq)
    if known is not None:
        return _core(meta, saved, *known, input_seq)
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
    return _core(meta, saved, base, sizes, input_seq)


def _core(meta: dict, saved: dict, base: int, sizes: array.array, input_seq: int) -> session_core.SessionCore:
    buffer = meta["buffer"]
    return session_core.SessionCore(buffer["max_bytes"], buffer["policy"], saved=saved, size_base=base, sizes=sizes,
                                    input_seq=input_seq,
                                    history_max=meta.get("history_bytes", session_core.DEFAULT_HISTORY_BYTES))


def open_logs(sdir: str) -> tuple[sessionlog.Writer, sessionlog.Writer, dict]:
    """What an exchange opens of its session's directory: the output log
    (buffered), the input log and the saved state (:func:`load_saved`)."""
    return sessionlog.Writer(sdir, "out", buffered=True), sessionlog.Writer(sdir, "in"), load_saved(sdir)


def fresh_core(meta: dict) -> session_core.SessionCore:
    """The core of a session whose directory is new: what :func:`recover` makes of
    an empty output log and no saved state (a warm exchange's hello is this,
    once started, before it has opened the logs: bento/exchange.py)."""
    return _core(meta, {}, 1, array.array("q"), 0)


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


def note(sdir: str, message: str) -> None:
    """Tell the operator, in the session's log (``exchange.log``), what was done to its files."""
    try:
        with open(os.path.join(sdir, "exchange.log"), "a") as f:
            f.write(f"server: {message}\n")
    except OSError:
        pass  # the log is on the same failing disk; the files say it anyway


def pin_dir(sdir: str) -> str:
    """The session directory as this process's own path to it (``/proc/self/fd/N``):
    an exchange reaches its directory through an fd, so a data dir moved while the
    function runs (stop the server, mv, start it on the new path) keeps working.
    Only this process may use the path; its children get real paths."""
    return f"/proc/self/fd/{os.open(sdir, os.O_RDONLY | os.O_DIRECTORY)}"


def real_path(pinned: str) -> str:
    """Where the directory behind a :func:`pin_dir` path is now, as other
    processes (a function's sandbox, an installer) must be told: it follows a move."""
    return os.readlink(pinned)


def dir_deleted(pinned: str) -> bool:
    """Whether the directory behind a :func:`pin_dir` path was deleted."""
    try:
        return os.stat(pinned).st_nlink == 0
    except OSError:
        return True


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


# The suffix of the empty files a prepared directory holds for the files its
# session writes first: the server's meta.cbor, the exchange's first save.
PREPARED = ".new"
PREPARED_FILES = ("meta.cbor", STATE_FILE, SIZES_FILE)


def prepare_dir(home: str) -> int:
    """Make, before any session wants it, what a warm exchange's directory
    needs to become a session's (bento/warm.py): its lock (taken: the fd is
    returned), ``exchange.pid``, the first output segment, and empty copies of
    the files written first (:data:`PREPARED_FILES`). The server renames the
    directory into ``sessions/`` when it assigns it; making files is the
    slow part of that on a disk file system, renaming is not."""
    lock_fd = take_lock(home)
    if lock_fd < 0:
        raise OSError(errno.EBUSY, f"another process holds {home}")
    try:
        for name, text in (("exchange.pid", f"{os.getpid()}\n"), (sessionlog.segment_name("out", 1), ""),
                           *((f + PREPARED, "") for f in PREPARED_FILES)):
            fd = os.open(os.path.join(home, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, text.encode())
            finally:
                os.close(fd)
    except BaseException:
        os.close(lock_fd)
        raise
    return lock_fd


class Ended:
    """An ended session as the server holds it while someone reads it: its core
    (recovered from the files once: that reads the whole output log) and what
    the exchange saved with it. Every write takes the session's lock (Busy if
    an exchange holds it). Synchronous: call it from a worker thread."""

    def __init__(self, sdir: str, meta: dict) -> None:
        self.dir = sdir
        with _locked(sdir):
            self.saved = load_saved(sdir)
            as_left = ended_as_left(sdir, self.saved)
            known = None if as_left is None else saved_sizes(sdir, self.saved, as_left[0])
            if as_left is not None and known is not None:
                buffer = meta["buffer"]
                self.core = session_core.SessionCore(
                    buffer["max_bytes"], buffer["policy"], saved=self.saved, size_base=known[0], sizes=known[1],
                    input_seq=as_left[1], history_max=meta.get("history_bytes", session_core.DEFAULT_HISTORY_BYTES))
                return
            out = sessionlog.Writer(sdir, "out")
            inputs = sessionlog.Writer(sdir, "in")
            for log in (out, inputs):
                log.close()
                if log.torn_bytes:
                    note(sdir, f"cut a torn record of {log.torn_bytes} bytes off the {log.prefix} log")
            self.core = recover(out, self.saved, meta, inputs.next_seq - 1)

    def hello(self) -> dict:
        """What an exchange's hello would say of this session."""
        core = self.core
        return {**core.snapshot(), "enforced": self.saved.get("enforced", {}),
                "shared_version": core.shared_version, "shared_value": core.shared_value}

    def ack(self, seq: int) -> dict:
        """The owner's ack: the new positions."""
        self._apply(self.core.ack(seq))
        return self.core.snapshot()

    def trim_history(self, keep: int) -> dict:
        """Trim the history to at most ``keep`` bytes: the new positions."""
        self._apply(self.core.trim_history(keep))
        return self.core.snapshot()

    def put_state(self, value: bytes, if_version: int | None) -> tuple[bool, int]:
        """Compare-and-set of the shared state: (ok, version now)."""
        ok, version, actions = self.core.put_state(value, if_version)
        self._apply(actions)
        return ok, version

    def _apply(self, actions: tuple) -> None:
        """Carry out the core's actions: trims and saves (nothing else happens to an ended session)."""
        if not actions:
            return
        with _locked(self.dir):
            for action in actions:
                if type(action) is session_core.Trim:
                    sessionlog.drop_segments(sessionlog.list_segments(self.dir, "out"), action.first_seq)
            save(self.dir, self.core, {k: v for k, v in self.saved.items() if k in ("enforced", "sandbox", LOG_END)})


class _locked:
    """The session's lock for a ``with`` block; Busy if an exchange holds it."""

    def __init__(self, sdir: str) -> None:
        self.sdir = sdir
        self.fd = -1

    def __enter__(self) -> None:
        self.fd = take_lock(self.sdir)
        if self.fd < 0:
            raise Busy(f"an exchange holds {self.sdir}")

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


def open_ended(sdir: str, meta: dict) -> Ended | None:
    """An ended session found on disk (its exit frame written), or None if its
    function has not ended (it needs an exchange). Busy if an exchange holds it."""
    ended = Ended(sdir, meta)
    return ended if ended.core.exit is not None else None
