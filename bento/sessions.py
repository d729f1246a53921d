"""The server's view of sessions: the registry, each session's snapshot and attachments.

The exchange is the authority on a session (its logs, input seqs, acks,
shared state, exit); this module keeps a cached copy of what the exchange last
announced, and wakes the attachment workers when something changed. The
registry finds sessions by id, token and idempotency key, and creates them.
Its mixins: the link to each exchange and the requests over it
(bento/sessions_link.py), and the upkeep that decides when a session's life
is over (exit acked and nobody attached, TTL, destroy) and tells the exchange
to remove it (bento/sessions_upkeep.py).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from bento import auth, events, files, protocol, session_core, sessiondisk
from bento.config import Config
from bento.exchange_link import ExchangeGone, ExchangeLink
from bento.exchanges import Exchanges
from bento.launch import send_start
from bento.session_core import Snapshot, State
from bento.sessionlog import write_atomic
from bento.sessions_link import SessionLinks
from bento.sessions_upkeep import Upkeep
from bento.store import Store

log = logging.getLogger("bento.sessions")

__all__ = ["Attachment", "ExchangeGone", "Registry", "Session"]

RETIRED_MAX = 16  # viewer tokens that ``share`` replaced, remembered per session

# What a viewer is told whose token ``share`` replaced or revoked: asking with
# it, and (REVOKED_VIEWER) on an attachment made with it.
REPLACED = ("this viewer token was replaced or revoked by the session's owner (share): "
            "ask them for the current link")
REVOKED_VIEWER = "the viewer token was revoked by the session's owner"

# A shared state put to a session the cluster ended (Session.verdict): every
# other node keeps the state the cluster has, so this node takes none either.
FROZEN_STATE = ("the cluster ended this session lost while its node was out of reach: its shared "
                "state stays as the cluster has it")


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
    lines: events.Held | None = None  # an execute's log lines: after its first out event, or a moment without one

    def write_lines(self) -> None:
        """Write the execute's log lines this attachment carries (once)."""
        if self.lines is not None:
            lines, self.lines = self.lines, None
            lines.release()


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
        # Cluster mode: the end the cluster gave it while this node was out of
        # reach (bento/cluster/lost.py). It stands: status says it, and attach
        # reads the cluster's copy (bento/cluster/mirror.py).
        self.verdict: Snapshot | None = None
        self.enforced: dict[str, str] = {}
        self.shared_version = 0
        self.shared_value = protocol.encode(None)
        self.attachments: set[Attachment] = set()
        self.changed = trio.Event()
        # Called once, when it has ended or is removed: gives back its admission (bento/gate.py).
        self.on_end: Callable[[], None] | None = None
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
            self.enforced = _one_copy(msg["enforced"])
        if "shared_version" in msg:
            self.set_shared(msg["shared_version"], msg["shared_value"])
        self.notify()

    def input_accepted(self, seq: int) -> None:
        """The exchange accepted input up to ``seq`` (its reply says so; it
        announces no progress for input)."""
        if seq > self.snap.input_seq:
            self.snap = self.snap._replace(input_seq=seq)
            self.notify()

    def set_shared(self, version: int, value: bytes) -> None:
        if version >= self.shared_version:
            self.shared_version, self.shared_value = version, value
        self.notify()

    def notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()
        if self.on_end is not None and (self.removed or self.snap.has_ended):
            on_end, self.on_end = self.on_end, None
            on_end()

    def status(self) -> dict:
        snap = self.verdict or self.snap
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
            "tty": bool(self.meta.get("tty")),
            "enforced": self.enforced,
        }

    def life_over(self, keep: float) -> bool:
        """The end is in epoch seconds (it survives restarts)."""
        snap = self.verdict or self.snap
        since_end = 0.0 if snap.ended is None else time.time() - snap.ended
        return session_core.life_over(snap, bool(self.attachments), since_end, keep)


class Registry(SessionLinks, Upkeep):
    """Every session this server knows, by id, token hash and idempotency key."""

    def __init__(self, config: Config, store: Store, nursery: trio.Nursery) -> None:
        self.config = config
        self.store = store
        self.nursery = nursery
        self.sessions: dict[str, Session] = {}
        self.tokens: dict[str, tuple[Session, str]] = {}
        self.replaced: dict[str, Session] = {}  # viewer token hashes that ``share`` retired
        self.idem: dict[str, Session] = {}
        self.idem_locks: dict[str, trio.Lock] = {}
        self.exchanges = Exchanges(config, nursery)

    # -- lookup -------------------------------------------------------------

    def by_token(self, token: str) -> tuple[Session, str] | None:
        found = self.tokens.get(auth.token_hash(token))
        if found is None or found[0].removed:
            return None
        return found

    def retired(self, token: str) -> bool:
        """Whether ``token`` is a viewer token that ``share`` took from a session here."""
        s = self.replaced.get(auth.token_hash(token))
        return s is not None and not s.removed

    def _index(self, s: Session) -> None:
        self.sessions[s.sid] = s
        self.tokens[s.meta["owner_hash"]] = (s, "rw")
        if s.meta["viewer_hash"]:  # empty once revoked
            self.tokens[s.meta["viewer_hash"]] = (s, "ro")
        for h in s.meta.get("retired_viewers", ()):
            self.replaced[h] = s
        if s.meta.get("idem"):
            self.idem[s.meta["idem"]] = s

    def _unindex(self, s: Session) -> None:
        s.removed = True
        self.sessions.pop(s.sid, None)
        self.tokens.pop(s.meta["owner_hash"], None)
        self.tokens.pop(s.meta["viewer_hash"], None)
        for h in s.meta.get("retired_viewers", ()):
            self.replaced.pop(h, None)
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
        # A session with files or a terminal starts cold: those are set at the spawn.
        if self.exchanges.sandbox_template.path:
            # A cold start's environment is forked too, where it can be (bento/launch.py
            # says): also one that follows a warm exchange that failed (below).
            meta["fork"] = self.exchanges.sandbox_template.path
        link = None if meta.get("tty") or tree else self.exchanges.take_warm(meta["network"])
        meta_cbor = protocol.encode(meta)
        try:
            try:
                sdir = self.store.create_session(sid, meta_cbor, link.home if link is not None else None)
            except OSError as exc:
                if link is None:
                    raise
                # (e.g. sessions/ on another file system than warm/: the rename fails)
                log.warning("session %s: cannot take a warm exchange's directory, starting cold: %s", sid, exc)
                self.exchanges.close_warm(link)
                link = None
                sdir = self.store.create_session(sid, meta_cbor)
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
            hello = None
            if link is not None:
                link.home = None  # the session's now
                # The function may start now, while its exchange wakes (bento/launch.py).
                started = send_start(sdir, meta, link.limits, link.rlimits)
                hello = await self.exchanges.assign_warm(link, sdir, started, meta_cbor)
                if hello is None:
                    # The warm exchange (killed now) may have begun the function, or the server
                    # did (``started``): that environment dies with its exchange, had no network
                    # and its home goes with the directory, so nothing it did is this session's
                    # (send_start is bwrap's only). A fresh directory for the cold start.
                    self.exchanges.discard_dir(sdir)
                    self.store.create_session(sid, meta_cbor)
            if link is not None and hello is not None:
                self._linked(s, link, hello)
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

    async def recover(self) -> None:
        """At start: find every session on disk and reconnect to (or adopt) it."""
        for sid in self.store.session_ids():
            sdir = self.store.session_dir(sid)
            try:
                meta = self.store.read_cbor(sid, "meta.cbor")
                if meta is None and self.store.drop_unanswered(sid):
                    log.info("session %s: removed: its execute was never answered (the server stopped "
                             "before its meta.cbor was written)", sid)
                    continue
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

    async def replace_viewer(self, s: Session, viewer_hash: str) -> list[str]:
        """Give ``s`` a new viewer token (by its hash; '' for none). The old one
        stops working at once, viewers attached with it are cut off, and
        meta.cbor keeps the change across restarts (written first: OSError
        leaves everything as it was). Returns the retired hashes it forgot
        (beyond the last RETIRED_MAX)."""
        old = s.meta["viewer_hash"]
        retired = list(s.meta.get("retired_viewers", ()))
        if old:
            # Remembered (the last few) so that a viewer who uses one is told why it
            # no longer works, rather than that no such session exists.
            retired = retired + [old]
        forgotten, retired = retired[:-RETIRED_MAX], retired[-RETIRED_MAX:]
        meta = {**s.meta, "viewer_hash": viewer_hash, "retired_viewers": retired}
        path = os.path.join(s.dir, "meta.cbor")
        await trio.to_thread.run_sync(write_atomic, path, protocol.encode(meta))
        self.tokens.pop(old, None)
        for h in s.meta.get("retired_viewers", ()):
            self.replaced.pop(h, None)
        s.meta = meta
        if not s.removed:
            if viewer_hash:
                self.tokens[viewer_hash] = (s, "ro")
            for h in retired:
                self.replaced[h] = s
        for att in list(s.attachments):
            if att.mode == "ro":
                att.ended = True
                att.why = REVOKED_VIEWER
                att.cancel.cancel()
                s.attachments.discard(att)
        return forgotten


# Sessions of one server report the same few enforcement maps: each distinct
# one is kept once (a decoded copy per session cost ~1 KiB of every session).
_ENFORCED: dict[tuple, dict[str, str]] = {}
_ENFORCED_MAX = 64


def _one_copy(enforced: dict[str, str]) -> dict[str, str]:
    try:
        key = tuple(sorted(enforced.items()))
        shared = _ENFORCED.get(key)
    except TypeError:  # not the map of texts the wire promises: kept as it is
        return enforced
    if shared is not None:
        return shared
    if len(_ENFORCED) < _ENFORCED_MAX:
        _ENFORCED[key] = enforced
    return enforced
