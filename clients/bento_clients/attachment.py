"""A session's attachment on the server, kept up by the SDK: attaching again
from the last seq held + 1 (after a pause, after the server dropped it),
pausing it when the reader falls behind (``flow``), and ending the session
when the server says it is gone.

The session's frames, acks and input are the session's (``session.py``,
``inputs.py``); this module only decides when to detach and attach again.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import trio

from bento_clients.errors import BentoError, NotFound, RequestFailed, SessionGone
from bento_clients.link import Link, LinkDied

if TYPE_CHECKING:
    from bento_clients.session import Session

__all__ = ["Attachment"]

log = logging.getLogger("bento.client")


class Attachment:
    """The attachment of one ``Session``."""

    def __init__(self, session: Session) -> None:
        self._session = session
        self._pause_done: trio.Event | None = None
        self._rechecking = False

    def _registered(self) -> bool:
        s = self._session
        return s._client._sessions.get(s.id) is s

    # -- flow control: a reader that falls behind pauses its attachment ----------

    def maybe_pause(self) -> None:
        s = self._session
        link, nursery = s._link, s._client._nursery
        if not s._flow.should_pause(s._exit is None and link is not None and nursery is not None):
            return
        assert link is not None and nursery is not None
        self._pause_done = done = trio.Event()
        log.info("bento: session %s: %d bytes not read yet; paused until read", s.id, s._flow.queued_bytes)
        nursery.start_soon(self._detach_for_pause, link, done)

    async def _detach_for_pause(self, link: Link, done: trio.Event) -> None:
        try:
            await link.request("detach", {"session": self._session.id})
        except LinkDied:
            pass  # a closed connection detaches too
        finally:
            done.set()

    def maybe_resume(self) -> None:
        s = self._session
        c = s._client
        if c._nursery is not None and s._flow.should_resume(
                s._end is None and c._sup.lost is None and self._registered()):
            c._nursery.start_soon(self._resume)

    async def _resume(self) -> None:
        """Attach again from the seq after the last one held (once the pause's
        detach is answered); then the acks and input held meanwhile go out."""
        s = self._session
        try:
            if self._pause_done is not None:
                await self._pause_done.wait()
            while self._registered() and s._end is None:
                link = s._link
                if link is None or link.dead.is_set():
                    link = await s._client._sup.live_link()
                    s._link = link
                try:
                    reply = await self.reattach(link)
                except LinkDied:
                    continue  # the next link, once the client has reconnected
                if not reply.get("ok"):
                    self.refused(reply)
                    return
                await s._send_ack()  # (_attached ended the pause)
                await s._input.flush()
                return
        except BentoError as exc:  # the client gave up: every reader sees it anyway
            log.info("bento: session %s: not resumed: %s", s.id, exc)
        finally:
            s._flow.resume_ended()
            self.maybe_resume()  # paused again meanwhile, and already read down
            s._changed.notify()

    # -- the server dropped the attachment, or the session --------------------------

    def recheck(self, reattach: bool) -> None:
        """Find out whether the session is gone or only this attachment is (and
        then, with ``reattach``, attach again)."""
        s = self._session
        nursery = s._client._nursery
        if s._exit is None and not self._rechecking and not s._flow.paused and nursery is not None:
            self._rechecking = True
            nursery.start_soon(self._recheck, reattach)

    async def _recheck(self, reattach: bool) -> None:
        s = self._session
        try:
            link = s._link
            await s._client.status(s._attach_token)
            if reattach and link is not None and link is s._link and not link.dead.is_set():
                await self.reattach(link)
                await s._input.flush()
        except NotFound:
            if s._exit is None:
                s._client._sessions.pop(s.id, None)
                s._end_with(SessionGone(f"session {s.id} was destroyed"))
        except (BentoError, LinkDied):
            pass  # a reconnect re-attaches anyway
        finally:
            self._rechecking = False

    async def reattach(self, link: Link) -> dict[str, Any]:
        """Attach again on ``link`` from the seq after the last one held; the reply."""
        s = self._session

        def on_reply(link: Link, reply: dict[str, Any]) -> None:
            if self._registered():
                s._attached(link, reply)

        return await link.request("attach", {"token": s._attach_token, "from": s._out.held + 1}, on_reply)

    def refused(self, reply: dict[str, Any]) -> None:
        """Attaching again was refused: the session ends with the reason."""
        s = self._session
        err = RequestFailed.from_reply(reply.get("error"), "attach")
        if self._registered():
            del s._client._sessions[s.id]
        s._end_with(SessionGone(f"session {s.id} is gone: {err.message}") if isinstance(err, NotFound)
                    else err)
