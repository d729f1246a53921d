"""A session's input as the SDK sends it: seqs, the journal, (re)sending.

Each input gets the next seq (``positions.InputLog``) and stays pending until
an ``in_ack`` covers it; it is sent once per link, in seq order, and again on
the next link after a drop (the server ignores duplicates). A client that must
survive its own death records each input in an ``InputJournal`` before it is
sent.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Protocol

import trio

from bento_clients.errors import InputClosed, TooLarge
from bento_clients.frames import EOF, Stdin
from bento_clients.link import LinkDied
from bento_clients.positions import InputLog

if TYPE_CHECKING:
    from bento_clients.session import Session

__all__ = ["InputJournal", "SessionInput"]

log = logging.getLogger("bento.client")


class InputJournal(Protocol):
    """Where a client that must survive its own death records its input (the CLI's
    state file). Called synchronously, before the input is sent / after an ack."""

    def record(self, item: Any, proposed_seq: int) -> tuple[int, list[tuple[int, Any]]]:
        """Persist a new input item (a value, ``EOF`` or ``Stdin``); return its seq (at least
        ``proposed_seq``: another writer may have taken seqs) and the inputs other
        writers recorded for this session that are still pending."""
        ...

    def acked(self, seq: int) -> None:
        """Every input up to ``seq`` is accepted by the server: forget it."""
        ...


class SessionInput:
    """The input side of one ``Session``."""

    def __init__(self, session: Session, journal: InputJournal | None, max_pending: int) -> None:
        self._session = session
        self.journal = journal
        self.max_pending = max_pending
        self.log = InputLog()
        self.closed = False  # by close_input()
        self.stdin_closed = False  # by close_stdin()
        self.gone = False  # the function ended: no input is taken any more
        self.failed: TooLarge | None = None  # an input the server cannot take: none after it goes
        self._sent_upto = 0
        self._lock = trio.Lock()

    def __len__(self) -> int:
        return len(self.log)

    def check(self, new: bool, stdin: bool = False) -> None:
        """Raise why input cannot be sent now (``new``: a new item, not a resend;
        ``stdin``: for the function's standard input)."""
        s = self._session
        if s.mode != "rw":
            raise InputClosed("a viewer (read-only) attachment cannot send input")
        if s._end is not None:
            raise s._end
        if self.failed is not None:
            raise self.failed
        if self.gone:
            raise InputClosed(f"session {s.id} has ended: it takes no more input")
        if new and stdin and self.stdin_closed:
            raise InputClosed(f"the standard input of session {s.id} is closed")
        if new and not stdin and self.closed:
            raise InputClosed(f"the input of session {s.id} is closed")
        if s._detached:
            raise InputClosed(f"session {s.id} is detached")
        s._client._sup.check_lost()

    async def add(self, item: Any) -> int:
        """Record a new input (a value, ``EOF`` or ``Stdin``) and send it; returns
        its seq. Waits while ``max_pending`` inputs are unacknowledged."""
        stdin = isinstance(item, Stdin)
        self.check(new=True, stdin=stdin)
        while len(self.log) >= self.max_pending:
            await self._session._changed.wait()
            self.check(new=True, stdin=stdin)
        proposed = self.log.last + 1
        if self.journal is not None:
            seq, others = self.journal.record(item, proposed)
            self.log.reset(self.log.accepted, others)
        else:
            seq = proposed
        self.log.add(item, seq)
        if item is EOF:
            self.closed = True
        elif item == Stdin(None):
            self.stdin_closed = True
        await self.flush()
        return seq

    async def wait_acked(self) -> None:
        """Wait until the server has accepted every input in the log. If the
        function ends first, ask the server which it accepted (its ``in_ack``
        may come after the exit: the server sends the two on different paths,
        and the input may be what ended it, an eof): InputClosed only for
        inputs it did not."""
        while len(self.log):
            s = self._session
            if self.gone and s._end is None and self.failed is None and s.mode == "rw":
                self.acked((await s.status()).get("input_seq"))
                if len(self.log):
                    raise InputClosed(f"session {s.id} has ended: it took {self.log.accepted} input(s); "
                                      f"the {len(self.log)} after it were not delivered")
                return
            self.check(new=False)
            await s._changed.wait()

    async def flush(self) -> int:
        """Send, in seq order, every pending input not yet sent on this link;
        returns how many were sent."""
        s = self._session
        sent = 0
        async with self._lock:
            link = s._link
            if link is None or s.mode != "rw" or s._flow.paused:
                return 0
            for seq, item in self.log.unsent(self._sent_upto):
                msg: dict[str, Any] = {"op": "input", "session": s.id, "seq": seq}
                if isinstance(item, Stdin):
                    msg["stdin"] = True
                    item = EOF if item.data is None else item.data
                if item is EOF:
                    msg["eof"] = True
                else:
                    msg["data"] = item
                try:
                    await link.send(msg)
                except LinkDied:
                    break
                except TooLarge as exc:  # the server's bound shrank since it was taken
                    log.error("bento: session %s: input %d cannot be sent: %s", s.id, seq, exc)
                    self.failed = exc
                    s._changed.notify()
                    break
                if s._link is not link:
                    break
                self._sent_upto = seq
                sent += 1
        return sent

    def attached(self, accepted: Any) -> None:
        """Attached (again): the server has accepted every input up to ``accepted``;
        everything after it goes out again on this link."""
        self.log.reset(accepted if type(accepted) is int else 0)
        self._sent_upto = self.log.accepted

    def acked(self, seq: Any) -> None:
        """An ``in_ack``."""
        if type(seq) is int and self.log.ack(seq) and self.journal is not None:
            self.journal.acked(seq)

    def refused(self, message: Any, nursery: trio.Nursery | None) -> None:
        """``input_gap``: another writer took seqs we have not seen accepted yet;
        send everything unacknowledged again in a moment."""
        log.warning("bento: session %s: input refused (%s); re-sending", self._session.id, message)
        self._sent_upto = self.log.accepted
        if nursery is not None:
            nursery.start_soon(self._resend_later, 0.5)

    async def _resend_later(self, delay: float) -> None:
        await trio.sleep(delay)
        await self.flush()
