"""A server's upkeep of its sessions: the end of their life, history and cgroups.

A mixin of ``bento.sessions.Registry``. Its reaper, once a second, ends
every session whose life is over (exit acked and nobody attached, or the
keep period after its end; bento/session_core.py decides), lets go of the
cores of ended sessions nobody reads, keeps all sessions' history within
``--max-history-bytes``, and now and then removes the cgroups of exchanges
that were killed before they could. Ending a session tells its exchange to
remove it, or removes its directory when no exchange runs.
"""

from __future__ import annotations

import functools
import logging
import shutil
import time
from typing import TYPE_CHECKING, Any

import bento_sandbox
import trio

from bento import events, sessiondisk
from bento.exchange_link import ExchangeGone

if TYPE_CHECKING:
    from bento.config import Config
    from bento.sessions import Session

log = logging.getLogger("bento.sessions")

CGROUP_SWEEP_S = 600.0  # and at start


class Upkeep:
    if TYPE_CHECKING:  # what bento.sessions.Registry provides
        config: Config
        nursery: trio.Nursery
        sessions: dict[str, Session]

        def _unindex(self, s: Session) -> None: ...

        async def _on_disk(self, s: Session, call: Any, *args: Any) -> Any: ...

        async def call(self, s: Session, msg: dict) -> dict: ...

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

    # -- the end of a session ------------------------------------------------------

    async def end_by_keep(self, s: Session) -> None:
        """The keep period after the function's end is over (and nobody is attached)."""
        if not s.removed:
            await self.end(s, reason="keep")

    async def end(self, s: Session, reason: str = "") -> None:
        """Remove the session: kill its function, delete its buffers, forget its tokens."""
        if s.removed:
            return
        snap = s.verdict or s.snap  # (the cluster's end, when it gave one: status says that too)
        acked = snap.exit_seq is not None and snap.acked_seq >= snap.exit_seq
        events.emit("session.ended", session=s.sid, state=snap.state, why=reason or ("exit_acked" if acked else "keep"))
        self._unindex(s)
        for att in list(s.attachments):
            att.ended = True
            att.cancel.cancel()
        s.notify()
        try:
            await self.call(s, {"t": "end"})
        except ExchangeGone:
            # No exchange to do it: nothing else writes there any more. (In a
            # worker thread: the deletes must not hold up every connection.)
            await trio.to_thread.run_sync(functools.partial(shutil.rmtree, s.dir, ignore_errors=True))

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
