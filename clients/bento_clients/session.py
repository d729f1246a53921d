"""One session as the SDK sees it: its frames, acks, input and result.

The exactly-once bookkeeping is pure code (``positions``: seqs and input log;
``flow``: the bounded read queue and when to pause); this module is the trio
layer around it. The client's reader calls the ``_attached`` / ``_on_event``
hooks synchronously, so a frame right behind an attach reply is never taken
for one sent before it.

Cancellation: cancelling ``output()``'s ``__anext__`` loses no frame: a frame
is handed over only when ``__anext__`` returns it. Cancelling a call that
already sent its request does not undo it.
"""

from __future__ import annotations

import logging
import weakref
from typing import TYPE_CHECKING, Any

from bento_clients.attachment import Attachment
from bento_clients.errors import BentoError, Unavailable, remote_error
from bento_clients.flow import ReadQueue
from bento_clients.frames import Exit, Frame
from bento_clients.inputs import InputJournal, SessionInput
from bento_clients.link import Changed, Link, LinkDied
from bento_clients.positions import OutputTracker
from bento_clients.session_requests import SessionRequests

if TYPE_CHECKING:
    from bento_clients.client import Client

__all__ = ["Session"]

log = logging.getLogger("bento.client")



class _Output:
    """The async iterator ``Session.output()`` returns."""

    def __init__(self, session: Session) -> None:
        self._session = session

    def __aiter__(self) -> _Output:
        return self

    async def __anext__(self) -> Frame:
        s = self._session
        await s._send_ack()  # the user is done with the frames handed so far
        frame = await s._next_frame()
        if frame is None:
            raise StopAsyncIteration
        return frame


class Session(SessionRequests):
    """One execution of a function, as seen by this client.

    ``id`` is the public session id; ``token`` the owner token (None when
    attached with a viewer token); ``viewer_token`` the viewer token (None when
    not known: the server hands it out only from ``execute``); ``mode`` is
    "rw" or "ro"; ``shared_state`` the last ``(version, value)`` of the shared
    state this attachment saw (or None)."""

    def __init__(
        self, client: Client, sid: str, token: str | None, viewer_token: str | None, *,
        mode: str, from_seq: int = 1, auto_ack: bool = True, input_journal: InputJournal | None = None,
    ) -> None:
        self._client = client
        self.id = sid
        self.token = token
        self.viewer_token = viewer_token
        self.mode = mode
        self.attach_info: dict[str, Any] = {}
        self.shared_state: tuple[int, Any] | None = None
        #: Acknowledge each frame once the next is asked for (see ``output``); when
        #: False, nothing is acknowledged but what ``ack()`` is given.
        self.auto_ack = auto_ack
        self._ack_target = from_seq - 1 if auto_ack else 0
        self._out = OutputTracker(from_seq)
        self._flow: ReadQueue[Frame] = ReadQueue(client.max_queued_bytes)
        self._input = SessionInput(self, input_journal, client.max_pending_inputs)
        self._attachment = Attachment(self)
        self._handed = from_seq - 1
        self._ack_sent = 0
        self._exit: Exit | None = None
        self._end: BentoError | None = None
        self._detached = False
        self._replaced = False  # attached again on this client: the newer Session has it
        self._link: Link | None = None
        self._changed = Changed()
        self._consumer: weakref.ref[_Output] | None = None

    def __repr__(self) -> str:
        return f"<bento Session {self.id} {self.mode}>"

    @property
    def _attach_token(self) -> str:
        token = self.token or self.viewer_token
        assert token is not None
        return token

    @property
    def input_journal(self) -> InputJournal | None:
        """Where each new input is recorded before it is sent (None: nowhere)."""
        return self._input.journal

    @input_journal.setter
    def input_journal(self, journal: InputJournal | None) -> None:
        self._input.journal = journal

    @property
    def attached(self) -> bool:
        """True while this client holds an attachment (or is restoring one)."""
        return self._client._sessions.get(self.id) is self

    @property
    def exit(self) -> Exit | None:
        """The ``Exit`` frame once it has arrived (even if not read yet)."""
        return self._exit

    @property
    def paused(self) -> bool:
        """True while this session's attachment is paused because more than the
        client's ``max_queued_bytes`` of its output waited to be read; it attaches
        again by itself once that is read down to half (see ``flow``)."""
        return self._flow.paused

    @property
    def pauses(self) -> int:
        return self._flow.pauses

    @property
    def refetched(self) -> int:
        """Frames that arrived while paused, dropped and asked for again later."""
        return self._flow.refetched

    @property
    def queued(self) -> int:
        """Frames received and not read yet (``output()`` returns them without waiting)."""
        return len(self._flow)

    def statistics(self) -> dict[str, int]:
        """Counters: frames queued (not yet read), duplicates dropped, holes seen,
        inputs pending (sent, not yet acknowledged)."""
        return {"queued": len(self._flow), "queued_bytes": self._flow.queued_bytes,
                "pauses": self._flow.pauses, "refetched": self._flow.refetched,
                "duplicates": self._out.duplicates,
                "holes": self._out.holes, "inputs_pending": len(self._input),
                "held_seq": self._out.held, "read_seq": self._handed}

    # -- output -----------------------------------------------------------------

    def output(self) -> _Output:
        """An async iterator over the frames (``Stdout``, ``Stderr``, ``Msg``, ``Gap``,
        ``Exit``), in order, each exactly once across reconnects; it ends after
        ``Exit``. As owner, a frame is acknowledged (so the server may free it)
        when the next one is asked for: a crash while handling a frame never
        loses it. Raises ``SessionGone`` if the session is destroyed first,
        ``ConnectionLost`` if the client gives up."""
        self._check_attached()
        it = _Output(self)
        self._consumer = weakref.ref(it)
        return it

    def _check_attached(self) -> None:
        """Output or a result can come: attached, or holding what it needs."""
        if not self.attached and not len(self._flow) and self._exit is None and self._end is None:
            if self._replaced:
                raise self._detached_error()
            raise BentoError(f"session {self.id} is not attached (use client.attach(token))")

    def _detached_error(self) -> BentoError:
        if self._replaced:
            return BentoError(f"session {self.id} was attached again on this client, which holds one "
                              "attachment per session: use the Session that attach returned last")
        return BentoError(f"session {self.id} was detached before it ended")

    async def _next_frame(self) -> Frame | None:
        while True:
            frame = self._flow.take()
            if frame is not None:
                self._handed = frame.seq
                self._attachment.maybe_resume()
                return frame
            if self._exit is not None and self._handed >= self._exit.seq:
                return None
            if self._end is not None:
                raise self._end
            if self._detached:
                return None
            self._client._sup.check_lost()
            self._attachment.maybe_resume()  # (paused again while a resume was on its way)
            await self._changed.wait()

    async def result(self) -> Any:
        """The function's return value, once it has ended.

        Raises ``RemoteError`` (an exception or non-zero exit code), one of its
        subclasses ``SessionKilled`` / ``SessionFailed`` / ``SessionLost``,
        ``SessionGone`` or ``ConnectionLost``. If no ``output()`` iterator is in
        use, the frames not read yet are read and dropped on the way. A session
        started with ``attach=False`` is not attached: ``client.attach(token)``."""
        self._check_attached()
        while True:
            consumer = self._consumer() if self._consumer is not None else None
            if consumer is not None:
                if self._exit is not None:
                    break
                if self._end is not None:
                    raise self._end
                if self._detached:
                    raise self._detached_error()
                self._client._sup.check_lost()
                await self._changed.wait()
                continue
            last = self._flow.take_all()
            if last is not None:
                self._handed = last.seq
                self._attachment.maybe_resume()
                await self._send_ack()
                continue
            frame = await self._next_frame()
            if frame is None:
                if self._exit is None:
                    raise self._detached_error()
                await self._send_ack()
                break
            await self._send_ack()  # dropped, as the user asked for the result only
        assert self._exit is not None
        err = remote_error(self._exit.data())
        if err is not None:
            raise err
        return self._exit.result

    # -- acks ---------------------------------------------------------------------

    async def ack(self, seq: int) -> None:
        """Acknowledge every frame up to ``seq`` (at most the last one read), so the
        server may free them. Only needed with ``auto_ack`` False: a client that
        must first store what it read somewhere safe (the CLI) acks after that."""
        self._ack_target = max(self._ack_target, min(seq, self._handed))
        await self._send_ack()

    async def _send_ack(self) -> None:
        if self.auto_ack:
            self._ack_target = max(self._ack_target, self._handed)
        seq = self._ack_target
        link = self._link
        if self.mode != "rw" or link is None or seq <= self._ack_sent or self._flow.paused:
            return
        try:
            await link.send({"op": "ack", "session": self.id, "seq": seq})
        except LinkDied:
            return
        if self._link is link:
            self._ack_sent = max(self._ack_sent, seq)

    def _finished(self) -> bool:
        """Exit read and acknowledged (or read-only and read): nothing left to do."""
        ex = self._exit
        if ex is None or self._handed < ex.seq:
            return False
        return self.mode != "rw" or self._ack_sent >= ex.seq

    # -- events from the reader (synchronous) -------------------------------------

    def _attached(self, link: Link, reply: dict[str, Any]) -> None:
        # Set here, in the reader, so that the frames right behind this reply are
        # taken, not dropped as if paused.
        self._flow.attached()
        self._link = link
        self.mode = str(reply.get("mode", self.mode))
        self._input.attached(reply.get("input_seq", 0))
        self._ack_sent = 0
        self._changed.notify()

    def _on_event(self, ev: str, msg: dict[str, Any], size: int = 0) -> None:
        if ev == "out":
            if not self._flow.arrived(len(msg["frames"])):
                return
            each = max(1, size // max(1, len(msg["frames"])))
            for wire in msg["frames"]:
                try:
                    seq, ch, data = wire
                    frames = self._out.accept(seq, ch, data)
                except (ValueError, TypeError) as exc:
                    log.error("bento: session %s: malformed frame ignored: %s", self.id, exc)
                    continue
                for frame in frames:
                    self._flow.push(frame, each)
                    if isinstance(frame, Exit):
                        self._exit = frame
                        self._input.gone = True
            self._attachment.maybe_pause()
        elif ev == "in_ack":
            self._input.acked(msg["seq"])
        elif ev == "state":
            self.shared_state = (msg["version"], msg.get("value"))
        elif ev == "error":
            self._on_error(msg.get("error") or {})
        self._changed.notify()

    def _on_error(self, error: dict[str, Any]) -> None:
        code = error.get("code")
        if code in ("gone", "not_found"):
            # gone: input after the end, or the session was destroyed (the exit
            # frame tells the first). not_found: the server dropped this
            # attachment (destroyed, or its life ended). Find out which.
            if code == "gone":
                self._input.gone = True
            self._attachment.recheck(reattach=code == "not_found")
        elif code == "input_gap":
            # After the function's end the server takes no new input (`gone`, which
            # comes first), so a later seq "skips" the refused one: nothing to send again.
            if not (self._input.gone or self._exit is not None):
                self._input.refused(error.get("message"), self._client._nursery)
        elif code == "unavailable":
            # The cluster node lost its Redis and ended this attachment. Ended
            # here too, with the reason, rather than re-attached in a loop: the
            # session runs on, and attaching again (later, or on another node) resumes it.
            if self._client._sessions.get(self.id) is self:
                del self._client._sessions[self.id]
            self._end_with(Unavailable("unavailable", str(error.get("message", "")), "attach"))
        else:
            log.warning("bento: session %s: error from the server: %s", self.id, error)

    def _end_with(self, error: BentoError) -> None:
        if self._exit is None:
            self._end = error
        self._link = None
        self._changed.notify()

    # -- control --------------------------------------------------------------------

    async def detach(self) -> None:
        """Stop receiving this session's frames (the function keeps running).
        Frames already read are acknowledged first (owner)."""
        await self._send_ack()
        link = self._link
        self._detached = True
        if self._client._sessions.get(self.id) is self:
            del self._client._sessions[self.id]
        self._link = None
        self._changed.notify()
        if link is not None:
            try:
                await link.request("detach", {"session": self.id})
            except LinkDied:
                pass  # a closed connection detaches too
