"""The embedded on-disk store: functions, session directories, the server secret.

Layout under the data dir:

    secret                      32 random bytes (0600): derives idempotent tokens
    server.lock                 flock'd by the one server that uses this data dir; holds its pid
    functions/<sha256>.cbor     {"name", "code"}: content-addressed
    sessions/<session id>/      one directory per session (0700)
        meta.cbor               written once by the server before the exchange starts
        state.cbor              the exchange's saved state
        out.<seq>, in.<seq>     output and input log segments (see sessionlog)
        ctl.sock, lock, exchange.pid, env.pid, exchange.log, work/
        <name>.new              empty copies a warm exchange made of files written later (sessiondisk.prepare_dir)
    warm/<name>/                a warm exchange's directory, prepared as a session's (bento/warm.py)

Every file is written atomically (write, then rename); files read back after a
crash are treated as untrusted and a bad one costs only its own session.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import secrets
import shutil

from bento import protocol
from bento.sessiondisk import PREPARED, take_lock
from bento.sessionlog import write_atomic


class DataDirBusy(Exception):
    """Another server holds the data dir."""


def lock_data_dir(data_dir: str) -> int:
    """Take the data dir for this server process: one data dir, one server (two
    would both serve, and both adopt, the same sessions). Returns the lock's fd,
    held (and the lock with it) until the process ends; the fd is not inherited,
    so exchanges, which outlive the server, never hold it."""
    root = os.path.abspath(data_dir)
    os.makedirs(root, mode=0o700, exist_ok=True)
    path = os.path.join(root, "server.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
            raise DataDirBusy(f"the data dir {root} is in use by another server (pid {holder}); "
                              "stop it first, or give this one its own --data-dir") from None
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class Store:
    def __init__(self, data_dir: str) -> None:
        self.root = os.path.abspath(data_dir)
        self.functions = os.path.join(self.root, "functions")
        self.sessions = os.path.join(self.root, "sessions")
        for d in (self.root, self.functions, self.sessions):
            os.makedirs(d, mode=0o700, exist_ok=True)
        self.secret = self._secret()

    def _secret(self) -> bytes:
        path = os.path.join(self.root, "secret")
        try:
            with open(path, "rb") as f:
                data = f.read()
            if len(data) == 32:
                return data
        except FileNotFoundError:
            pass
        data = secrets.token_bytes(32)
        write_atomic(path, data)
        return data

    # -- functions ----------------------------------------------------------

    def put_function(self, name: str, code: str) -> str:
        fid = hashlib.sha256(code.encode("utf-8", "surrogatepass")).hexdigest()
        path = os.path.join(self.functions, f"{fid}.cbor")
        if not os.path.exists(path):
            write_atomic(path, protocol.encode({"name": name, "code": code}))
        return fid

    def get_function(self, fid: str) -> str | None:
        if len(fid) != 64 or any(c not in "0123456789abcdef" for c in fid):
            return None
        try:
            with open(os.path.join(self.functions, f"{fid}.cbor"), "rb") as f:
                return protocol.decode_internal(f.read())["code"]
        except FileNotFoundError:
            return None

    # -- sessions -----------------------------------------------------------

    def session_dir(self, sid: str) -> str:
        return os.path.join(self.sessions, sid)

    def create_session(self, sid: str, meta_cbor: bytes, prepared: str | None = None) -> str:
        """The new session's directory with its meta.cbor (``meta_cbor``).
        ``prepared``: a warm exchange's directory (``sessiondisk.prepare_dir``),
        renamed into place."""
        sdir = self.session_dir(sid)
        if prepared is None:
            os.mkdir(sdir, 0o700)
        else:
            os.rename(prepared, sdir)
        try:
            meta_path = os.path.join(sdir, "meta.cbor")
            write_atomic(meta_path, meta_cbor, prepared=None if prepared is None else meta_path + PREPARED)
        except OSError:
            shutil.rmtree(sdir, ignore_errors=True)
            raise
        return sdir

    def drop_unanswered(self, sid: str) -> bool:
        """Remove ``sid``'s directory if it is a warm exchange's that an execute
        took but whose meta.cbor was never written (its empty copy is still
        there: the server stopped in between, so no execute was answered for
        it), and no exchange holds it; True if it was removed."""
        sdir = self.session_dir(sid)
        if (os.path.exists(os.path.join(sdir, "meta.cbor"))
                or not os.path.exists(os.path.join(sdir, "meta.cbor" + PREPARED))):
            return False
        lock_fd = take_lock(sdir)
        if lock_fd < 0:
            return False
        try:
            shutil.rmtree(sdir)
        finally:
            os.close(lock_fd)
        return True

    def session_ids(self) -> list[str]:
        return sorted(n for n in os.listdir(self.sessions) if n.startswith("s_"))

    def read_cbor(self, sid: str, name: str) -> dict | None:
        try:
            with open(os.path.join(self.session_dir(sid), name), "rb") as f:
                value = protocol.decode_internal(f.read())
        except FileNotFoundError:
            return None
        return value if isinstance(value, dict) else None
