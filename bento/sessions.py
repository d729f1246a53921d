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
import time
from dataclasses import dataclass, field
from typing import Any

import bento_sandbox
import trio

from bento import auth, events, files, protocol, session_core, sessiondisk
from bento.config import Config
from bento.exchange_link import ExchangeGone, ExchangeLink, Exchanges
from bento.session_core import Snapshot, State
from bento.sessionlog import write_atomic
from bento.store import Store

log = logging.getLogger("bento.sessions")

CGROUP_SWEEP_S = 600.0  # and at start

__all__ = ["Attachment", "ExchangeGone", "Registry", "Session"]


@dataclass(eq=False)
class Attachment:
    """One connection's attachment to one session, with its own position."""

    session: Session
    mode: str  # "rw" | "ro"
    next_seq: int
    cancel: trio.CancelScope
    state_version_sent: int = 0
    ended: bool = False
    why: str = ""  # why it was cut off while its session goes on (a revoked viewer token)
    done: trio.Event = field(default_factory=trio.Event)  # its worker has finished


class Session:
    """A session as the server sees it: its metadata, the exchange's last
    snapshot of its positions (``snap``, see bento/session_core.py), its shared
    state, its attachments, and the link to its exchange."""

    def __init__(self, sid: str, sdir: str, meta: dict) -> None:
        self.sid = sid
        self.dir = sdir
        self.meta = meta
        self.created: float = meta["created"]
        self.snap: Snapshot = session_core.NEW
        self.enforced: dict[str, str] = {}
        self.shared_version = 0
        self.shared_value = protocol.encode(None)
        self.attachments: set[Attachment] = set()
        self.changed = trio.Event()
        self.link: ExchangeLink | None = None
        self.removed = False
        self.ack_sent = 0
        # Its function ended and its exchange exited: it is served from disk.
        self.on_disk = False
        self.disk: sessiondisk.Ended | None = None  # its core, while someone reads it
        self.disk_lock = trio.Lock()
        # Check every output record's checksum when reading: True for a session
        # found on disk at start (a crash may have damaged what it wrote
        # before); False for one this process created, whose every record was
        # announced by its exchange after the write returned, while this
        # process ran (a crash that could damage them would end it too). Its
        # readers still check what was on disk before they attached.
        self.check_log = True

    def update(self, msg: dict) -> None:
        """Take the exchange's snapshot (a hello, a progress or a sync reply)."""
        before = self.snap.state
        self.snap = Snapshot.from_map(msg)
        if self.snap.state != before and (before != State.STARTING.value or not self.check_log):
            # (A session found at start says its state in session.recovered.)
            events.emit("session.state", session=self.sid, state=self.snap.state, was=before,
                        **events.exit_fields(self.snap.exit))
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
        snap = self.snap
        return {
            "session": self.sid,
            "state": snap.state,
            "created": self.created,
            "ended": snap.ended,
            "first_seq": snap.first_seq,
            "next_seq": snap.next_seq,
            "acked_seq": snap.acked_seq,
            "input_seq": snap.input_seq,
            "buffer_bytes": snap.buffer_bytes,
            "buffer": self.meta["buffer"],
            "history_bytes": snap.history_bytes,
            "attachments": len(self.attachments),
            "exit": snap.exit,
            "waiting": snap.waiting,
            "sandbox": self.meta["sandbox"],
            "enforced": self.enforced,
        }

    def life_over(self, keep: float) -> bool:
        """The end is in epoch seconds (it survives restarts)."""
        ended = self.snap.ended
        since_end = 0.0 if ended is None else time.time() - ended
        return session_core.life_over(self.snap, bool(self.attachments), since_end, keep)


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
        self.exchanges = Exchanges(config, nursery)

    # -- lookup -------------------------------------------------------------

    def by_token(self, token: str) -> tuple[Session, str] | None:
        found = self.tokens.get(auth.token_hash(token))
        if found is None or found[0].removed:
            return None
        return found

    def _index(self, s: Session) -> None:
        self.sessions[s.sid] = s
        self.tokens[s.meta["owner_hash"]] = (s, "rw")
        if s.meta["viewer_hash"]:  # empty once revoked
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
            "python": self.exchanges.python,
            "driver_path": self.exchanges.driver_path,
        }
        tree = meta.pop("files", None)  # written into the work dir, not the meta file
        try:
            sdir = self.store.create_session(sid, meta)
            if tree:
                os.mkdir(os.path.join(sdir, "work"), 0o755)
                await trio.to_thread.run_sync(files.write_tree, os.path.join(sdir, "work"), tree)
        except (OSError, files.FileError) as exc:
            log.error("session %s: cannot be created: %s", sid, exc)
            shutil.rmtree(self.store.session_dir(sid), ignore_errors=True)
            why = getattr(exc, "strerror", None) or exc
            raise protocol.RequestError("internal", f"cannot create the session: {why}") from None
        s = Session(sid, sdir, meta)
        s.check_log = False
        try:
            # A session with files or a terminal starts cold: those are set at the spawn.
            cold = s.meta.get("tty") or tree
            warm = None if cold else await self.exchanges.assign_warm(
                sdir, s.meta["network"])
            if warm is not None:
                self._linked(s, *warm)
            else:
                await self.exchanges.spawn(sdir, adopt=False)
                await self._connect(s)
        except (OSError, ExchangeGone, RuntimeError) as exc:
            log.error("session %s: could not start its exchange: %s", sid, exc)
            shutil.rmtree(sdir, ignore_errors=True)
            raise protocol.RequestError("internal", f"could not start the session: {exc}") from None
        self._index(s)
        events.emit("session.created", session=sid, key=self.config.keys.name(meta.get("key") or ""),
                    **({"env": meta["env_name"]} if meta.get("env_name") else {}))
        return s

    async def pool_keeper(self) -> None:
        """Keep the warm pool filled (see Exchanges.pool_keeper)."""
        await self.exchanges.pool_keeper()

    async def _connect(self, s: Session) -> None:
        self._linked(s, *await self.exchanges.connect(s.dir))

    def _linked(self, s: Session, link: ExchangeLink, hello: dict) -> None:
        s.link = link
        s.update(hello)
        self.nursery.start_soon(self._read_exchange, s, link)
        if s.ack_sent > s.snap.acked_seq:
            self.nursery.start_soon(self._send_ack, s)

    async def _read_exchange(self, s: Session, link: ExchangeLink) -> None:
        try:
            while True:
                msg = await link.receive()
                if msg is None:
                    break
                if link.deliver(msg):
                    continue
                if msg.get("t") == "state":
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
        """The exchange went away: its session ended (it is served from disk
        now), or it died (reconnect, or adopt the session)."""
        for attempt in range(5):
            if s.removed:
                return
            try:
                await self._revive(s)
                return
            except (OSError, ExchangeGone, RuntimeError, ValueError) as exc:
                log.error("session %s: adopting failed (attempt %d): %s", s.sid, attempt + 1, exc)
                await trio.sleep(0.2 * (attempt + 1))
        log.error("session %s: unreachable; it stays registered as %s", s.sid, s.snap.state)

    async def _revive(self, s: Session) -> None:
        """Give ``s`` its exchange back, or its disk: connect to its exchange; else,
        if its function has ended, serve it from disk (no process); else adopt it
        (a new exchange marks it lost, then ends in turn)."""
        snap = s.snap
        ended = snap.exit_seq is not None and snap.next_seq > snap.exit_seq
        if not ended:
            try:
                await self._connect(s)
                return
            except (OSError, ExchangeGone):
                pass
        if await self._from_disk(s):
            return
        await self.exchanges.spawn(s.dir, adopt=True)
        try:
            await self._connect(s)
            log.warning("session %s: its exchange died; adopted as lost", s.sid)
        except (OSError, ExchangeGone):
            # The adopting exchange recorded the end and exited already.
            if not await self._from_disk(s):
                raise

    async def _from_disk(self, s: Session) -> bool:
        """Serve an ended session from disk; False if its function has not ended
        (or an exchange holds it). Waits a moment for an exchange that is exiting."""
        for _ in range(10):
            try:
                ended = await trio.to_thread.run_sync(sessiondisk.open_ended, s.dir, s.meta)
            except sessiondisk.Busy:
                await trio.sleep(0.05)
                continue
            if ended is None:
                return False
            s.on_disk = True
            s.disk = ended if s.attachments else None
            s.update(ended.hello())
            if s.ack_sent > s.snap.acked_seq:
                # An ack that reached the exchange as it exited: apply it here.
                await self.ack(s, s.ack_sent)
            return True
        return False

    async def _on_disk(self, s: Session, call: Any, *args: Any) -> Any:
        """``call(ended, *args)`` on the ended session ``s``, in a worker thread,
        one at a time. Its core stays in memory while someone is attached (an
        owner reading and acking): recovering it reads the whole output log."""
        async with s.disk_lock:
            try:
                ended = s.disk
                if ended is None:
                    ended = await trio.to_thread.run_sync(sessiondisk.open_ended, s.dir, s.meta)
                    if ended is None:
                        raise ExchangeGone("the session's exchange is not reachable right now")
                    if s.attachments:
                        s.disk = ended
                return await trio.to_thread.run_sync(call, ended, *args)
            except sessiondisk.Busy:
                raise ExchangeGone("the session's exchange is ending; try again") from None

    async def limit_history(self, limit: int) -> None:
        """Keep all sessions' history within ``limit`` bytes: the oldest sessions'
        history is trimmed first (``--max-history-bytes``)."""
        excess = sum(s.snap.history_bytes for s in self.sessions.values()) - limit
        trimmed = 0
        for s in sorted(self.sessions.values(), key=lambda s: s.created):
            if excess <= 0:
                break
            had = s.snap.history_bytes
            if had == 0 or s.removed:
                continue
            keep = max(0, had - excess)
            try:
                if s.on_disk:
                    s.update(await self._on_disk(s, sessiondisk.Ended.trim_history, keep))
                else:
                    s.update(await self.call(s, {"t": "trim", "keep": keep}))
            except ExchangeGone as exc:
                log.warning("session %s: its history could not be trimmed now: %s", s.sid, exc)
                continue
            excess -= had - s.snap.history_bytes
            trimmed += 1
        if trimmed:
            log.info("trimmed the history of %d sessions to stay within --max-history-bytes %d", trimmed, limit)

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
                await self._revive(s)
            except (OSError, ExchangeGone, RuntimeError, ValueError, protocol.ProtocolError) as exc:
                log.error("session %s: cannot be adopted, skipped: %s", sid, exc)
                continue
            self._index(s)
            events.emit("session.recovered", session=sid, state=s.snap.state, **events.exit_fields(s.snap.exit))

    async def replace_viewer(self, s: Session, viewer_hash: str) -> None:
        """Give ``s`` a new viewer token (by its hash; '' for none). The old one
        stops working at once, viewers attached with it are cut off, and
        meta.cbor keeps the change across restarts (written first: OSError
        leaves everything as it was)."""
        meta = {**s.meta, "viewer_hash": viewer_hash}
        path = os.path.join(s.dir, "meta.cbor")
        await trio.to_thread.run_sync(write_atomic, path, protocol.encode(meta))
        self.tokens.pop(s.meta["viewer_hash"], None)
        s.meta = meta
        if viewer_hash and not s.removed:
            self.tokens[viewer_hash] = (s, "ro")
        for att in list(s.attachments):
            if att.mode == "ro":
                att.ended = True
                att.why = "the viewer token was revoked by the session's owner"
                att.cancel.cancel()
                s.attachments.discard(att)

    # -- requests to the exchange ---------------------------------------------

    async def call(self, s: Session, msg: dict) -> dict:
        link = s.link
        if link is None:
            raise ExchangeGone("the session's exchange is not reachable right now")
        return await link.call(msg)

    async def sync(self, s: Session) -> None:
        """Bring ``s.snap`` up to the exchange's positions now (the exchange
        announces them in rounds; a reply must not trail what was acknowledged).
        Without a reachable exchange the last snapshot stands."""
        if s.link is None:
            return
        try:
            s.update(await s.link.call({"t": "sync"}))
        except ExchangeGone:
            pass  # it ended or died: its last announcement is what is known

    async def ack(self, s: Session, seq: int) -> None:
        """The owner's ack, to the exchange or (for an ended session) to the disk.
        One that finds neither is kept in ``ack_sent`` and applied when the
        link or the disk is back."""
        if seq <= s.ack_sent and not s.on_disk:
            return
        s.ack_sent = max(s.ack_sent, seq)
        if s.on_disk:
            if seq > s.snap.acked_seq:
                try:
                    s.update(await self._on_disk(s, sessiondisk.Ended.ack, seq))
                except ExchangeGone as exc:
                    log.warning("session %s: an ack could not be applied yet: %s", s.sid, exc)
            return
        await self._send_ack(s)

    async def _send_ack(self, s: Session) -> None:
        if s.link is not None and s.ack_sent > s.snap.acked_seq:
            try:
                await s.link.send({"t": "ack", "seq": s.ack_sent})
            except ExchangeGone:
                pass  # sent again when the link is back

    async def put_state(self, s: Session, value: bytes, if_version: int | None) -> tuple[bool, int]:
        """Compare-and-set of the shared state: (ok, version now)."""
        ok, version = await self._put_state(s, value, if_version)
        if ok:
            s.set_shared(version, value)
        return ok, version

    async def _put_state(self, s: Session, value: bytes, if_version: int | None) -> tuple[bool, int]:
        if not s.on_disk:
            try:
                r = await self.call(s, {"t": "state_put", "value": value, "if_version": if_version})
                return r["ok"], r["version"]
            except ExchangeGone:
                if not s.snap.has_ended:
                    raise
        result: tuple[bool, int] = await self._on_disk(s, sessiondisk.Ended.put_state, value, if_version)
        return result

    # -- the end of a session ------------------------------------------------------

    async def end_by_keep(self, s: Session) -> None:
        """The keep period after the function's end is over (and nobody is attached)."""
        if not s.removed:
            await self.end(s, reason="keep")

    async def end(self, s: Session, reason: str = "") -> None:
        """Remove the session: kill its function, delete its buffers, forget its tokens."""
        if s.removed:
            return
        acked = s.snap.exit_seq is not None and s.snap.acked_seq >= s.snap.exit_seq
        events.emit("session.ended", session=s.sid, state=s.snap.state, why=reason or ("exit_acked" if acked else "keep"))
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
            if self.config.max_history_bytes is not None:
                await self.limit_history(self.config.max_history_bytes)
            for s in list(self.sessions.values()):
                if s.disk is not None and not s.attachments:
                    s.disk = None  # nobody reads it: its memory goes
                if s.life_over(self.config.keep_s):
                    self.nursery.start_soon(self.end_by_keep, s)
