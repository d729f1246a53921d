"""The server's view of sessions: the registry, and the link to each exchange.

The exchange is the authority on a session (its logs, input seqs, acks,
shared state, exit); this module keeps a cached copy of what the exchange last
announced, forwards requests to it, and wakes the attachment workers when
something changed. It also decides when a session's life is over (exit acked
and nobody attached, TTL, destroy) and tells the exchange to remove it.

Cancellation: every request to an exchange is one message on an ordered
socket; a request cancelled while waiting for its reply may still take effect
(like any request whose connection drops), which is why input carries seqs.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import bento_sandbox
import cbor2
import trio

import bento
from bento import auth, events, protocol
from bento.config import Config
from bento.exchange import LINK_VERSION
from bento.store import Store

log = logging.getLogger("bento.sessions")

LEN = struct.Struct(">I")
SPAWN_TIMEOUT_S = 10.0
CALL_TIMEOUT_S = 30.0
CGROUP_SWEEP_S = 600.0  # and at start


class ExchangeGone(Exception):
    """The session's exchange is not reachable (it died or the session ended)."""


def _parents(*modules: Any) -> list[str]:
    dirs: list[str] = []
    for mod in modules:
        d = os.path.dirname(os.path.dirname(os.path.abspath(mod.__file__ or "")))
        if d not in dirs:
            dirs.append(d)
    return dirs


def exchange_sys_path() -> list[str]:
    """Where the exchange finds bento, the sandbox backends and cbor2 (it runs with -I -S)."""
    import bento_driver

    return _parents(bento, bento_sandbox, bento_driver, cbor2)


def driver_sys_path() -> list[str]:
    """Where the driver finds itself and cbor2; the sandbox shows it these, read-only, and
    nothing else of the host (never the data dir)."""
    import bento_driver

    return _parents(bento_driver, cbor2)


def real_python() -> str:
    return os.path.realpath(sys.executable)


class ExchangeLink:
    """Length-prefixed CBOR over the exchange's control socket."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = bytearray()
        self.send_lock = trio.Lock()
        self.pending: dict[int, tuple[trio.Event, list[dict]]] = {}
        self.next_rid = 1
        self.closed = False

    async def send(self, msg: dict) -> None:
        body = cbor2.dumps(msg)
        async with self.send_lock:
            try:
                await self.stream.send_all(LEN.pack(len(body)) + body)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise ExchangeGone(str(exc)) from None

    async def call(self, msg: dict) -> dict:
        if self.closed:
            raise ExchangeGone("the exchange is gone")
        rid = self.next_rid
        self.next_rid += 1
        done = trio.Event()
        slot: list[dict] = []
        self.pending[rid] = (done, slot)
        try:
            await self.send({**msg, "rid": rid})
            with trio.fail_after(CALL_TIMEOUT_S):
                await done.wait()
        except trio.TooSlowError:
            raise ExchangeGone("the exchange did not answer") from None
        finally:
            self.pending.pop(rid, None)
        if not slot:
            raise ExchangeGone("the exchange is gone")
        return slot[0]

    async def receive(self) -> dict | None:
        while True:
            if len(self.buf) >= 4:
                n = LEN.unpack_from(self.buf, 0)[0]
                if len(self.buf) >= 4 + n:
                    body = bytes(self.buf[4 : 4 + n])
                    del self.buf[: 4 + n]
                    return cbor2.loads(body)
            try:
                chunk = await self.stream.receive_some(1 << 16)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                chunk = b""
            if not chunk:
                return None
            self.buf += chunk

    def fail_pending(self) -> None:
        self.closed = True
        for done, _slot in self.pending.values():
            done.set()
        self.pending.clear()


@dataclass(eq=False)
class Attachment:
    """One connection's attachment to one session, with its own position."""

    session: Session
    mode: str  # "rw" | "ro"
    next_seq: int
    cancel: trio.CancelScope
    state_version_sent: int = 0
    ended: bool = False
    done: trio.Event = field(default_factory=trio.Event)  # its worker has finished


class Session:
    def __init__(self, sid: str, sdir: str, meta: dict) -> None:
        self.sid = sid
        self.dir = sdir
        self.meta = meta
        self.created: float = meta["created"]
        self.state = "starting"
        self.next_seq = 1
        self.first_seq = 1
        self.acked_seq = 0
        self.input_seq = 0
        self.buffer_bytes = 0
        self.dropped_to = 0
        self.ended: float | None = None
        self.exit: dict | None = None
        self.exit_seq: int | None = None
        self.enforced: dict[str, str] = {}
        self.shared_version = 0
        self.shared_value = protocol.encode(None)
        self.attachments: set[Attachment] = set()
        self.changed = trio.Event()
        self.link: ExchangeLink | None = None
        self.idle_since = time.monotonic()
        self.removed = False
        self.ack_sent = 0
        # Check every output record's checksum when reading: True for a session
        # found on disk at start (a crash may have damaged what it wrote
        # before); False for one this process created, whose every record was
        # announced by its exchange after the write returned, while this
        # process ran (a crash that could damage them would end it too). Its
        # readers still check what was on disk before they attached.
        self.check_log = True

    def update(self, msg: dict) -> None:
        before = self.state
        for key in ("state", "next_seq", "first_seq", "acked_seq", "input_seq", "buffer_bytes",
                    "dropped_to", "ended", "exit", "exit_seq"):
            setattr(self, key, msg[key])
        if self.state != before and (before != "starting" or not self.check_log):
            events.emit("session.state", session=self.sid, state=self.state, was=before, **events.exit_fields(self.exit))
        if "enforced" in msg:
            self.enforced = msg["enforced"]
        if "shared_version" in msg:
            self.set_shared(msg["shared_version"], msg["shared_value"])
        self.notify()

    def set_shared(self, version: int, value: bytes) -> None:
        if version >= self.shared_version:
            self.shared_version, self.shared_value = version, value
        self.notify()

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def status(self) -> dict:
        return {
            "session": self.sid,
            "state": self.state,
            "created": self.created,
            "ended": self.ended,
            "first_seq": self.first_seq,
            "next_seq": self.next_seq,
            "acked_seq": self.acked_seq,
            "input_seq": self.input_seq,
            "buffer_bytes": self.buffer_bytes,
            "attachments": len(self.attachments),
            "exit": self.exit,
            "sandbox": self.meta["sandbox"],
            "enforced": self.enforced,
        }

    def life_over(self, now: float, ttl: float) -> bool:
        if self.attachments:
            return False
        if self.exit_seq is not None and self.acked_seq >= self.exit_seq:
            return True
        return now - self.idle_since >= ttl


class Registry:
    """Every session this server knows, by id, token hash and idempotency key."""

    def __init__(self, config: Config, store: Store, nursery: trio.Nursery) -> None:
        self.config = config
        self.store = store
        self.nursery = nursery
        self.sessions: dict[str, Session] = {}
        self.tokens: dict[str, tuple[Session, str]] = {}
        self.idem: dict[str, Session] = {}
        self.idem_locks: dict[str, trio.Lock] = {}
        self.sys_path = exchange_sys_path()
        self.driver_path = driver_sys_path()
        self.warm: list[ExchangeLink] = []
        self.warm_wanted = trio.Event()
        # Not for --sandbox-cmd: its command prefix may tie a process to its cwd.
        self.pool_size = config.pool_size if config.sandbox in ("bwrap", "none") else 0
        self.python = real_python()

    # -- lookup -------------------------------------------------------------

    def by_token(self, token: str) -> tuple[Session, str] | None:
        found = self.tokens.get(auth.token_hash(token))
        if found is None or found[0].removed:
            return None
        return found

    def _index(self, s: Session) -> None:
        self.sessions[s.sid] = s
        self.tokens[s.meta["owner_hash"]] = (s, "rw")
        self.tokens[s.meta["viewer_hash"]] = (s, "ro")
        if s.meta.get("idem"):
            self.idem[s.meta["idem"]] = s

    def _unindex(self, s: Session) -> None:
        s.removed = True
        self.sessions.pop(s.sid, None)
        self.tokens.pop(s.meta["owner_hash"], None)
        self.tokens.pop(s.meta["viewer_hash"], None)
        if s.meta.get("idem"):
            self.idem.pop(s.meta["idem"], None)

    # -- creation -----------------------------------------------------------

    async def create(self, meta: dict, idem: str | None) -> tuple[Session, str, str]:
        """Start a session, or return the one already made under this idempotency key.

        Returns (session, owner token, viewer token)."""
        if idem is None:
            owner, viewer = auth.new_tokens()
            return await self._create(meta, owner, viewer), owner, viewer
        lock = self.idem_locks.setdefault(idem, trio.Lock())
        try:
            async with lock:
                owner, viewer = auth.derived_tokens(self.store.secret, idem)
                existing = self.idem.get(idem)
                if existing is not None and not existing.removed:
                    return existing, owner, viewer
                return await self._create({**meta, "idem": idem}, owner, viewer), owner, viewer
        finally:
            if not lock.statistics().tasks_waiting:
                self.idem_locks.pop(idem, None)

    async def _create(self, meta: dict, owner: str, viewer: str) -> Session:
        if len(self.sessions) >= self.config.max_sessions:
            raise protocol.RequestError("limit", f"the server holds {len(self.sessions)} sessions, its maximum")
        sid = auth.new_session_id()
        meta = {
            **meta,
            "session": sid,
            "created": time.time(),
            "owner_hash": auth.token_hash(owner),
            "viewer_hash": auth.token_hash(viewer),
            "python": self.python,
            "driver_path": self.driver_path,
        }
        try:
            sdir = self.store.create_session(sid, meta)
        except OSError as exc:
            log.error("session %s: cannot be created: %s", sid, exc)
            raise protocol.RequestError("internal", f"cannot create the session: {exc.strerror}") from None
        s = Session(sid, sdir, meta)
        s.check_log = False
        try:
            if not await self._assign_warm(s):
                await self._spawn(sdir, adopt=False)
                await self._connect(s)
        except (OSError, ExchangeGone, RuntimeError) as exc:
            log.error("session %s: could not start its exchange: %s", sid, exc)
            shutil.rmtree(sdir, ignore_errors=True)
            raise protocol.RequestError("internal", f"could not start the session: {exc}") from None
        self._index(s)
        events.emit("session.created", session=sid, key=self.config.keys.name(meta.get("key") or ""))
        return s

    # -- the warm pool: exchanges with a fresh sandbox started ahead of time ----

    async def pool_keeper(self) -> None:
        """Keep ``pool_size`` warm exchanges ready (bwrap: the sandbox's working
        dir is its own tmpfs; none: the driver moves to the session's work dir
        when it starts; so nothing ties them to a session yet)."""
        while self.pool_size:
            while len(self.warm) < self.pool_size:
                try:
                    link = await self._spawn_warm()
                except (OSError, RuntimeError, ExchangeGone) as exc:
                    log.error("warm pool: could not start an exchange: %s", exc)
                    await trio.sleep(1.0)
                    continue
                self.warm.append(link)
            self.warm_wanted = trio.Event()
            await self.warm_wanted.wait()
            # Let the session that just took a warm exchange have the CPU first.
            await trio.sleep(0.05)

    async def _spawn_warm(self) -> ExchangeLink:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        boot = (
            f"import sys;sys.path[:0]={self.sys_path!r};"
            "from bento.exchange import main;main(sys.argv[1:])"
        )
        try:
            proc = await trio.lowlevel.open_process(
                [self.python, "-I", "-S", "-c", boot, "--warm", str(theirs.fileno())],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),), start_new_session=True,
            )
        finally:
            theirs.close()
        self.nursery.start_soon(proc.wait)
        link = ExchangeLink(trio.SocketStream(trio.socket.from_stdlib_socket(ours)))
        await link.send({
            "t": "warm", "sandbox": self.config.sandbox, "sandbox_cmd": self.config.sandbox_cmd,
            "python": self.python, "driver_path": self.driver_path, "network": False,
            "workdir": "/",
        })
        with trio.fail_after(SPAWN_TIMEOUT_S):
            ready = await link.receive()
        if ready is None or ready.get("t") != "warm_ready" or ready.get("error"):
            await link.stream.aclose()
            raise RuntimeError(f"warm exchange failed: {ready}")
        return link

    async def _assign_warm(self, s: Session) -> bool:
        """Hand the session to a warm exchange; False if none fits or is ready."""
        if (s.meta["network"] and self.config.sandbox == "bwrap") or not self.warm:
            return False
        link = self.warm.pop(0)
        self.warm_wanted.set()
        try:
            await link.send({"t": "assign", "dir": s.dir})
            with trio.fail_after(SPAWN_TIMEOUT_S):
                hello = await link.receive()
        except (ExchangeGone, trio.TooSlowError):
            hello = None
        if hello is None or hello.get("t") != "hello":
            await link.stream.aclose()
            return False
        s.link = link
        s.update(hello)
        self.nursery.start_soon(self._read_exchange, s, link)
        return True

    async def _spawn(self, sdir: str, adopt: bool) -> None:
        boot = (
            f"import sys;sys.path[:0]={self.sys_path!r};"
            "from bento.exchange import main;main(sys.argv[1:])"
        )
        argv = [self.python, "-I", "-S", "-c", boot, sdir] + (["--adopt"] if adopt else [])
        errlog = os.open(os.path.join(sdir, "exchange.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            proc = await trio.lowlevel.open_process(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errlog,
                start_new_session=True,
            )
        finally:
            os.close(errlog)
        assert proc.stdout is not None
        line = b""
        try:
            with trio.fail_after(SPAWN_TIMEOUT_S):
                while not line.endswith(b"\n"):
                    chunk = await proc.stdout.receive_some(256)
                    if not chunk:
                        break
                    line += chunk
        except trio.TooSlowError:
            proc.kill()
            raise RuntimeError("the exchange did not start in time") from None
        finally:
            await proc.stdout.aclose()
        # The exchange runs until its session ends; reap it whenever that is.
        self.nursery.start_soon(proc.wait)
        if not line.startswith(b"ready"):
            if line.startswith(b"busy"):
                return  # another exchange holds the session: connect to that one
            raise RuntimeError(f"the exchange failed to start: {line.decode(errors='replace').strip()!r}")

    async def _connect(self, s: Session) -> None:
        dfd = os.open(s.dir, os.O_RDONLY | os.O_DIRECTORY)
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        try:
            await sock.connect(f"/proc/self/fd/{dfd}/ctl.sock")
        except OSError:
            sock.close()
            raise
        finally:
            os.close(dfd)
        link = ExchangeLink(trio.SocketStream(sock))
        hello = await link.receive()
        if hello is None or hello.get("t") != "hello":
            await link.stream.aclose()
            raise ExchangeGone("the exchange closed at once")
        if hello.get("link", 1) != LINK_VERSION:
            await link.stream.aclose()
            raise ExchangeGone(
                f"its exchange (pid {hello.get('pid')}) speaks link version {hello.get('link')!r}, this "
                f"server {LINK_VERSION}: serve it with the Bento version that started it until it ends")
        s.link = link
        s.update(hello)
        self.nursery.start_soon(self._read_exchange, s, link)

    async def _read_exchange(self, s: Session, link: ExchangeLink) -> None:
        try:
            while True:
                msg = await link.receive()
                if msg is None:
                    break
                rid = msg.get("rid")
                if rid is not None:
                    waiter = link.pending.get(rid)
                    if waiter is not None:
                        waiter[1].append(msg)
                        waiter[0].set()
                elif msg.get("t") == "state":
                    s.set_shared(msg["version"], msg["value"])
                else:
                    s.update(msg)
        finally:
            link.fail_pending()
            with trio.CancelScope(shield=True):
                await link.stream.aclose()
        if s.link is link:
            s.link = None
        if not s.removed:
            self.nursery.start_soon(self._reattach_exchange, s)

    async def _reattach_exchange(self, s: Session) -> None:
        """The exchange went away on its own: reconnect, or adopt its session."""
        for attempt in range(5):
            if s.removed:
                return
            try:
                await self._connect(s)
                return
            except (OSError, ExchangeGone):
                pass
            try:
                await self._spawn(s.dir, adopt=True)
                await self._connect(s)
                log.warning("session %s: its exchange died; adopted as lost", s.sid)
                return
            except (OSError, ExchangeGone, RuntimeError) as exc:
                log.error("session %s: adopting failed (attempt %d): %s", s.sid, attempt + 1, exc)
                await trio.sleep(0.2 * (attempt + 1))
        log.error("session %s: unreachable; it stays registered as %s", s.sid, s.state)

    async def sweep_cgroups(self) -> None:
        """Remove the cgroups of exchanges that were killed before they could."""
        try:
            n = await trio.to_thread.run_sync(bento_sandbox.sweep_cgroups)
        except OSError as exc:
            log.warning("could not sweep leftover cgroups: %s", exc)
            return
        if n:
            log.info("removed %d cgroups left by exchanges that were killed", n)

    async def recover(self) -> None:
        """At start: find every session on disk and reconnect to (or adopt) it."""
        for sid in self.store.session_ids():
            sdir = self.store.session_dir(sid)
            try:
                meta = self.store.read_cbor(sid, "meta.cbor")
                if meta is None or meta.get("session") != sid:
                    raise ValueError("missing or foreign meta.cbor")
                s = Session(sid, sdir, meta)
            except Exception as exc:  # noqa: BLE001 - one bad directory costs only itself
                log.error("session %s: cannot be read, skipped: %s", sid, exc)
                continue
            try:
                await self._connect(s)
            except (OSError, ExchangeGone):
                try:
                    await self._spawn(sdir, adopt=True)
                    await self._connect(s)
                except (OSError, ExchangeGone, RuntimeError) as exc:
                    log.error("session %s: cannot be adopted, skipped: %s", sid, exc)
                    continue
            self._index(s)
            events.emit("session.recovered", session=sid, state=s.state, **events.exit_fields(s.exit))

    # -- requests to the exchange ---------------------------------------------

    async def call(self, s: Session, msg: dict) -> dict:
        link = s.link
        if link is None:
            raise ExchangeGone("the session's exchange is not reachable right now")
        return await link.call(msg)

    async def ack(self, s: Session, seq: int) -> None:
        if seq > s.ack_sent and s.link is not None:
            s.ack_sent = seq
            try:
                await s.link.send({"t": "ack", "seq": seq})
            except ExchangeGone:
                s.ack_sent = 0

    # -- the end of a session ------------------------------------------------------

    async def end(self, s: Session, reason: str = "") -> None:
        """Remove the session: kill its function, delete its buffers, forget its tokens."""
        if s.removed:
            return
        acked = s.exit_seq is not None and s.acked_seq >= s.exit_seq
        events.emit("session.ended", session=s.sid, state=s.state, why=reason or ("exit_acked" if acked else "ttl"))
        self._unindex(s)
        for att in list(s.attachments):
            att.ended = True
            att.cancel.cancel()
        s.notify()
        try:
            await self.call(s, {"t": "end"})
        except ExchangeGone:
            # No exchange to do it: nothing else writes there any more.
            shutil.rmtree(s.dir, ignore_errors=True)

    async def reaper(self) -> None:
        next_sweep = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= next_sweep:
                next_sweep = now + CGROUP_SWEEP_S
                await self.sweep_cgroups()
            await trio.sleep(1.0)
            now = time.monotonic()
            for s in list(self.sessions.values()):
                if s.life_over(now, self.config.ttl_s):
                    self.nursery.start_soon(self.end, s)
