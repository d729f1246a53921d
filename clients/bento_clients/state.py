"""The CLI's local state file: every session this machine knows, where its
output stands and which input is not yet acknowledged.

One JSON file (default ``$XDG_STATE_HOME/bento-client/state.json``, else
``~/.local/state/bento-client/state.json``; ``$BENTO_CLIENT_STATE``
overrides), mode 0600 (it holds bearer tokens), in a 0700 directory of the
client's own: not the server's data dir (``.../state/bento``), where earlier
versions kept it as ``client.json`` beside the server's ``secret``; such a
file is moved once, on first use of the default path. Every change is a
read-modify-write under an exclusive ``flock`` on ``<file>.lock`` (so ``bento
send`` and a running ``bento attach`` never lose each other's updates), and
every write is atomic: a new temp file (0600) in the same directory, then
``rename`` over the old one. A writer killed at any point leaves either the
old or the new file, never a torn one; a torn temp file it leaves behind is
ignored (and removed later). A state file that does not parse (damaged by
something else) is moved aside to ``<file>.corrupt-<time>`` and an empty
state is used: the sessions keep running on the server.

Positions are written without ``fsync`` (a ``kill -9`` cannot lose a
completed write; only a power cut can); input records are fsynced.

One session's entry:
    session, server, token, viewer_token, created
    name        the ``--name`` given to ``bento run`` (unique in this file), or absent
    file        the base name of the file ``bento run`` sent
    key_id      which API key started it (``key_id()``: "" for none; absent: not started here)
    buffer      the ``{"max_bytes", "policy"}`` asked for at ``run``, if any
    cleaned     the server answered ``not_found``: it has forgotten the session
    delivered   last frame seq whose bytes were completely written out
    sinks       {"<dev>:<ino>": size} of the regular files stdout/stderr were
                right after ``delivered`` (see docs/cli.md: exactly once)
    input_seq   highest input seq this machine gave out
    pending     [[seq, value], ...] inputs not yet acknowledged
                (JSON form of values; ``{"$eof": true}`` closes the input)
    state, exit last known state and the exit frame's data (JSON form)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from typing import Any

from bento_clients.convert import from_json, to_json
from bento_clients.frames import EOF, Stdin

__all__ = ["NameTaken", "StateFile", "StateJournal", "check_name", "default_path", "input_from_json", "input_to_json",
           "key_id", "legacy_path"]

FORMAT = 2  # 1 kept the file's base name in "name"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_NOT_NAMES = ("bto_", "btv_", "s_")  # tokens and session ids
_STALE_TEMP_S = 60.0


def _state_home() -> str:
    return os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")


def default_path() -> str:
    """``$BENTO_CLIENT_STATE``, else ``$XDG_STATE_HOME/bento-client/state.json``,
    else ``~/.local/state/bento-client/state.json``."""
    explicit = os.environ.get("BENTO_CLIENT_STATE")
    if explicit:
        return explicit
    return os.path.join(_state_home(), "bento-client", "state.json")


def legacy_path() -> str:
    """Where earlier versions kept the state file: inside the server's default data dir."""
    return os.path.join(_state_home(), "bento", "client.json")


def input_to_json(item: Any) -> Any:
    """The JSON form of an input item (a value, ``EOF``, or ``Stdin``)."""
    if isinstance(item, Stdin):
        return {"$stdin": None if item.data is None else to_json(item.data)}
    return {"$eof": True} if item is EOF else to_json(item)


def input_from_json(value: Any) -> Any:
    """The input item of its JSON form."""
    if isinstance(value, dict) and value == {"$eof": True}:
        return EOF
    if isinstance(value, dict) and len(value) == 1 and "$stdin" in value:
        data = value["$stdin"]
        if data is None or (isinstance(data, dict) and list(data) == ["$base64"]):
            return Stdin(None if data is None else from_json(data))
    return from_json(value)


def check_name(name: str) -> str:
    """``name`` if it can name a session here; ValueError saying why not."""
    if not NAME.fullmatch(name) or name.startswith(_NOT_NAMES):
        raise ValueError(f"bad session name {name!r}: use letters, digits, '.', '_' and '-' (at most 64, "
                         f"starting with a letter or digit, not with bto_, btv_ or s_)")
    return name


def key_id(api_key: str | None) -> str:
    """A short fingerprint of an API key (never the key): which key started a
    session, so ``ls`` knows which sessions a ``list`` with that key covers."""
    return "" if api_key is None else hashlib.sha256(api_key.encode()).hexdigest()[:16]


class NameTaken(Exception):
    """Another session here already has that name."""

    def __init__(self, name: str, entry: dict[str, Any]) -> None:
        super().__init__(f"the name {name!r} is taken by session {entry.get('session')} "
                         f"({entry.get('state') or 'state unknown'})")
        self.entry = entry


def _upgrade(data: dict[str, Any]) -> dict[str, Any]:
    """The state in the current format (format 1 kept the file name as "name")."""
    if data.get("format", 1) < 2:
        for entry in data["sessions"].values():
            if isinstance(entry, dict) and "name" in entry:
                entry["file"] = entry.pop("name")
        data["format"] = FORMAT
    return data


def _empty() -> dict[str, Any]:
    return {"format": FORMAT, "sessions": {}}


class StateFile:
    """The local state file at ``path`` (see the module docstring)."""

    def __init__(self, path: str | None = None) -> None:
        self.path = os.path.abspath(path or default_path())
        self.dir = os.path.dirname(self.path)
        self.warnings: list[str] = []
        self._cache: tuple[tuple[int, int, int], dict[str, Any]] | None = None
        if path is None and "BENTO_CLIENT_STATE" not in os.environ:
            self._move_legacy(legacy_path())

    def _move_legacy(self, old: str) -> None:
        """Move a state file an earlier version kept at ``old`` to this path, once."""
        if os.path.exists(self.path) or not os.path.exists(old):
            return
        with self.locked_file():
            if os.path.exists(self.path) or not os.path.exists(old):
                return  # another bento process moved it meanwhile
            try:
                os.rename(old, self.path)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                shutil.copy2(old, self.path)
                os.unlink(old)
            os.chmod(self.path, 0o600)  # it holds tokens, whatever mode the old file had
        with contextlib.suppress(FileNotFoundError):
            os.unlink(old + ".lock")
        self.warnings.append(f"moved the state file from {old} (the server's data dir) to {self.path}")

    # -- reading ------------------------------------------------------------

    def read(self) -> dict[str, Any]:
        """The whole state (a snapshot; complete, since writes are atomic)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return _empty()
        try:
            st = os.fstat(fd)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            if self._cache is not None and self._cache[0] == stamp:
                return json.loads(json.dumps(self._cache[1]))
            with os.fdopen(os.dup(fd), "rb") as f:
                raw = f.read()
        finally:
            os.close(fd)
        try:
            data = json.loads(raw)
            if not isinstance(data, dict) or not isinstance(data.get("sessions"), dict):
                raise ValueError("not a Bento client state")
        except ValueError as exc:
            aside = f"{self.path}.corrupt-{int(time.time())}"
            with contextlib.suppress(OSError):
                os.replace(self.path, aside)
            self.warnings.append(f"the state file {self.path} was damaged ({exc}); moved to {aside}")
            return _empty()
        data = _upgrade(data)
        self._cache = (stamp, data)
        return json.loads(json.dumps(data))

    def sessions(self) -> dict[str, dict[str, Any]]:
        """Every known session, by session id."""
        return self.read()["sessions"]

    def find(self, word: str) -> dict[str, Any] | None:
        """The entry whose owner or viewer token, id or name is ``word``."""
        sessions = self.sessions().values()
        for entry in sessions:
            if word in (entry.get("token"), entry.get("viewer_token"), entry.get("session")):
                return entry
        return next((entry for entry in sessions if entry.get("name") == word), None)

    def named(self, name: str) -> dict[str, Any] | None:
        """The entry named ``name``, if any."""
        return next((e for e in self.sessions().values() if e.get("name") == name), None)

    # -- writing ------------------------------------------------------------

    @contextlib.contextmanager
    def locked_file(self) -> Iterator[None]:
        """The exclusive lock every writer of this file holds (``<file>.lock``)."""
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    @contextlib.contextmanager
    def locked(self, durable: bool = False) -> Iterator[dict[str, Any]]:
        """Read-modify-write: yields the state under an exclusive lock and writes it
        back atomically when the block ends without an exception."""
        with self.locked_file():
            data = self.read()
            yield data
            self._write(data, durable)

    def _write(self, data: dict[str, Any], durable: bool) -> None:
        body = json.dumps(data, separators=(",", ":"), sort_keys=True).encode()
        tmp = f"{self.path}.{os.getpid()}.{time.monotonic_ns()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(body)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        os.close(fd)
        os.replace(tmp, self.path)
        st = os.stat(self.path)
        self._cache = ((st.st_ino, st.st_mtime_ns, st.st_size), json.loads(body))
        if durable:
            dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        self._remove_stale_temps()

    def _remove_stale_temps(self) -> None:
        now = time.time()
        for path in glob.glob(glob.escape(self.path) + ".*.tmp"):
            with contextlib.suppress(OSError):
                if now - os.stat(path).st_mtime > _STALE_TEMP_S:
                    os.unlink(path)

    # -- one session ----------------------------------------------------------

    def add_session(self, entry: dict[str, Any]) -> dict[str, Any]:
        """Record a session (merged into what is known of it); returns the entry.
        Raises NameTaken (recording nothing) if another session has its name."""
        with self.locked(durable=True) as data:
            name = entry.get("name")
            for other in data["sessions"].values():
                if name is not None and other.get("name") == name and other.get("session") != entry["session"]:
                    raise NameTaken(name, other)
            old = data["sessions"].get(entry["session"], {})
            merged = {
                "delivered": 0, "sinks": {}, "input_seq": 0, "pending": [], "state": None,
                "exit": None, "created": time.time(), **old,
                **{k: v for k, v in entry.items() if v is not None},
            }
            data["sessions"][entry["session"]] = merged
        return merged

    def update_session(self, sid: str, durable: bool = False, **fields: Any) -> None:
        """Set fields of a known session (no-op for an unknown one)."""
        with self.locked(durable) as data:
            entry = data["sessions"].get(sid)
            if entry is not None:
                entry.update(fields)

    def record_delivery(self, sid: str, seq: int, sinks: dict[str, int],
                        exit: dict[str, Any] | None = None) -> None:
        """Frame ``seq`` is completely written; ``sinks`` are the sizes of the regular
        files written to, right after it."""
        fields: dict[str, Any] = {"delivered": seq, "sinks": sinks}
        if exit is not None:
            # The function has ended: input it did not take never will be.
            fields.update(exit=to_json(exit), state=exit.get("state"), pending=[])
        self.update_session(sid, **fields)

    def remove_session(self, sid: str) -> bool:
        """Forget a session; True if it was known."""
        return self.remove_sessions([sid]) == 1

    def remove_sessions(self, sids: list[str]) -> int:
        """Forget these sessions; returns how many were known."""
        with self.locked(durable=True) as data:
            return sum(data["sessions"].pop(sid, None) is not None for sid in sids)

    def journal(self, sid: str) -> StateJournal:
        """The ``sdk.InputJournal`` that records this session's input here."""
        return StateJournal(self, sid)

    def pending_input(self, sid: str) -> list[tuple[int, Any]]:
        """(seq, item) inputs of this session not yet acknowledged."""
        entry = self.sessions().get(sid) or {}
        return [(int(seq), input_from_json(v)) for seq, v in entry.get("pending", [])]


class StateJournal:
    """Input records of one session in the state file (``sdk.InputJournal``)."""

    def __init__(self, state: StateFile, sid: str) -> None:
        self.state = state
        self.sid = sid

    def record(self, item: Any, proposed_seq: int) -> tuple[int, list[tuple[int, Any]]]:
        with self.state.locked(durable=True) as data:
            entry = data["sessions"].setdefault(self.sid, {"session": self.sid, "pending": []})
            seq = max(proposed_seq, int(entry.get("input_seq", 0)) + 1)
            others = [(int(s), input_from_json(v)) for s, v in entry.get("pending", [])]
            entry["input_seq"] = seq
            entry.setdefault("pending", []).append([seq, input_to_json(item)])
        return seq, others

    def acked(self, seq: int) -> None:
        with self.state.locked() as data:
            entry = data["sessions"].get(self.sid)
            if entry is None:
                return
            entry["pending"] = [p for p in entry.get("pending", []) if p[0] > seq]
            entry["input_seq"] = max(int(entry.get("input_seq", 0)), seq)
