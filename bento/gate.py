"""The server's side of admission control (the rules are bento/admission.py).

It reads what the rules must not (the data dir's free space, trio's clock),
holds an execute in the queue while it waits for capacity, and frees a running
function's share when its session's function ends. The audit line of each
execute, attach, signal and destroy is written here too (``audit``): by key id
and session, never a token or a key.

Cancellation: an execute cancelled while it waits leaves the queue; one
cancelled after it was admitted gives its share back (``enter`` and the
server's ``release`` on a failed start), so nothing stays counted that does
not run.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable

import trio

from bento import envs, events
from bento.admission import (
    BUSY_RETRY_S,
    Admission,
    Capacity,
    Refused,
    Ticket,
    default_capacity,
    key_id,
    with_settings,
)
from bento.sessions import Session

log = logging.getLogger("bento.gate")

# A waiter looks again this often even when nothing ended (the disk may have
# been freed by someone else).
RECHECK_S = 1.0


def audit(op: str, key: str | None, session: str) -> None:
    """One line per execute, attach, signal and destroy: who (key id) did what to which session."""
    events.emit("audit", op=op, key=key_id(key or ""), session=session)


def machine_capacity(data_dir: str, default_memory: float | None, **given: int | None) -> Capacity:
    """The capacity from the machine's RAM and the data dir's file system, with
    the settings that were given in place of the defaults."""
    mem_total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    st = os.statvfs(data_dir)
    return with_settings(default_capacity(mem_total, st.f_blocks * st.f_frsize,
                                             None if default_memory is None else int(default_memory)), **given)


class Gate:
    """Admission for one server: ``enter`` before a session is created, ``bind``
    after, ``release`` if the creation failed."""

    def __init__(self, admission: Admission, data_dir: str) -> None:
        self.admission = admission
        self.data_dir = data_dir
        self.freed = trio.Event()
        self.tickets: dict[str, Ticket] = {}  # running sessions by id

    def disk_free(self) -> int:
        """Free bytes for this user in the data dir's file system (one statvfs)."""
        st = os.statvfs(self.data_dir)
        return st.f_bavail * st.f_frsize

    def env_ready(self, name: str) -> bool:
        """Whether package environment ``name`` is built in the data dir (bento/envs.py)."""
        return os.path.exists(os.path.join(self.data_dir, "envs", name, envs.READY))

    async def enter(self, key: str, limits: dict, history_bytes: int, queue_s: float | None,
                    queued: Callable[[int], Awaitable[None]], env: str | None = None) -> Ticket:
        """An admitted ticket for one execute, or Refused. ``env``: the name of
        the environment of its packages (None: no packages).

        Over capacity, with ``queue_s``, it waits up to that long in the queue and
        calls ``queued(position)`` each time its position changes. Nobody cuts
        the queue: while executes wait, a new one waits too (or is refused)."""
        adm = self.admission
        build = env if adm.builds(env, self.env_ready) else None
        held = adm.environments(key, self.env_ready) if build else None
        adm.check_quota(key, trio.current_time(), history_bytes, held)
        t = adm.ticket(key, adm.memory_of(limits), build)
        busy: Refused | None = None
        try:
            adm.check_capacity(t.memory, self.disk_free())
            if adm.waiting:
                raise Refused("busy", "queue", f"{len(adm.waiting)} executes wait for capacity ahead "
                              "of this one", BUSY_RETRY_S)
        except Refused as exc:
            busy = exc
        if busy is None:
            adm.admit(t)
            return t
        if not queue_s or busy.retry_after is None:
            adm.refund(key)
            raise busy
        try:
            position = adm.enqueue(t)
        except Refused:
            adm.refund(key)
            raise
        try:
            await self._wait(t, position, queue_s, queued)
        except BaseException:
            adm.leave(t)
            self.release(t)
            raise
        if not t.admitted:
            adm.leave(t)
            adm.refund(key)
            self._pump()
            raise Refused("busy", busy.limit, f"waited {queue_s:.1f} s in the queue and the server is "
                          f"still full ({busy.message})", busy.retry_after)
        return t

    async def _wait(self, t: Ticket, position: int, queue_s: float,
                    queued: Callable[[int], Awaitable[None]]) -> None:
        await queued(position)
        with trio.move_on_after(queue_s):
            self._pump()
            while not t.admitted:
                with trio.move_on_after(RECHECK_S):
                    await self.freed.wait()
                self._pump()
                if not t.admitted and self.admission.position(t) != position:
                    position = self.admission.position(t)
                    await queued(position)

    def _pump(self) -> None:
        """Admit waiters from the head of the queue while they fit; wake them all."""
        admitted = False
        if self.admission.waiting:
            while self.admission.next_admitted(self.disk_free()) is not None:
                admitted = True
        if admitted or not self.admission.waiting:
            self.freed.set()
            self.freed = trio.Event()

    def bind(self, t: Ticket, s: Session) -> None:
        """``t`` runs as session ``s`` until its function ends. A session that
        already holds a ticket (an idempotent retry) gives ``t`` back."""
        if s.sid in self.tickets or s.removed or s.snap.has_ended:
            self.release(t)
            return
        self.tickets[s.sid] = t
        # A callback, not a task per session: a task would cost every running session ~3 KiB.
        s.on_end = lambda: self._ended(t, s)

    def recover(self, sessions: list[Session]) -> None:
        """At start: count every running session found on disk (admitted as it is)."""
        for s in sessions:
            if s.removed or s.snap.has_ended:
                continue
            t = self.admission.ticket(s.meta.get("key") or "", self.admission.memory_of(s.meta.get("limits") or {}))
            self.admission.admit(t)
            self.bind(t, s)

    def _ended(self, t: Ticket, s: Session) -> None:
        self.tickets.pop(s.sid, None)
        self.release(t)

    def release(self, t: Ticket) -> None:
        """``t``'s function ended or never started: its share goes to the queue's head."""
        self.admission.release(t)
        self._pump()

    def history_bytes(self, key: str, sessions: list[Session]) -> int:
        """Output the key's sessions retain on disk: the unacknowledged buffer and
        the acknowledged history kept readable (``--history-bytes``)."""
        return sum(s.snap.buffer_bytes + s.snap.history_bytes
                   for s in sessions if (s.meta.get("key") or "") == key)
