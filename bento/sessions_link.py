"""Each session's link to its exchange, or to its disk once its function has ended.

A mixin of ``bento.sessions.Registry``: connecting to a session's exchange
(or taking a warm one's link), reading what it announces, reviving a session
whose exchange went away (reconnect; serve it from disk if its function
ended; else adopt it, which marks it lost), and the requests to it: call,
sync, ack, the shared state's compare-and-set. An ended session's writes
(acks, shared state) are applied on disk under its lock (bento/sessiondisk.py).

Cancellation: every request to an exchange is one message on an ordered
socket; a request cancelled while waiting for its reply may still take effect
(like any request whose connection drops), which is why input carries seqs.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import trio

from bento import sessiondisk
from bento.exchange_link import ExchangeGone, ExchangeLink

# An exchange whose function ended holds its session's directory until its last
# writes are done, then exits: a request for the session meanwhile waits this
# long (in BUSY_STEP_S steps) for the directory, not failing at the first try.
BUSY_WAIT_S = 3.0
BUSY_STEP_S = 0.05

if TYPE_CHECKING:
    from bento.exchanges import Exchanges
    from bento.sessions import Session

log = logging.getLogger("bento.sessions")


class SessionLinks:
    if TYPE_CHECKING:  # what bento.sessions.Registry provides
        nursery: trio.Nursery
        exchanges: Exchanges

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
                if link.taken is not None:  # its first output: the warm pool may refill now
                    link.taken.set()
                    link.taken = None
                if not link.deliver(msg):  # (a reply goes to its caller)
                    if msg.get("t") == "state":
                        s.set_shared(msg["version"], msg["value"])
                    else:
                        s.update(msg)
                del msg  # not held while the next one is awaited (per idle session)
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
        for _ in range(int(BUSY_WAIT_S / BUSY_STEP_S)):
            try:
                ended = await trio.to_thread.run_sync(sessiondisk.open_ended, s.dir, s.meta)
            except sessiondisk.Busy:
                await trio.sleep(BUSY_STEP_S)
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
            for _ in range(int(BUSY_WAIT_S / BUSY_STEP_S)):
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
                    # Its exchange is exiting. A core read before may hold a change
                    # that was not saved: read it again from disk next time.
                    s.disk = None
                    await trio.sleep(BUSY_STEP_S)
            raise ExchangeGone(f"the session's exchange has not let go of it within {BUSY_WAIT_S:g} s; "
                               "try again")

    # -- requests to the exchange ---------------------------------------------

    async def call(self, s: Session, msg: dict) -> dict:
        link = s.link
        if link is None:
            raise ExchangeGone("the session's exchange is not reachable right now")
        return await link.call(msg)

    async def input(self, s: Session, msg: dict) -> dict:
        """An ``input`` to the exchange; its reply moves the session's ``input_seq``."""
        r = await self.call(s, msg)
        if r["ok"]:
            s.input_accepted(r["input_seq"])
        return r

    async def settle(self, s: Session, timeout: float = 1.0) -> None:
        """After a request found the exchange gone: until what it said last (the
        function's end, say) is read, which happens when its link's reader ends."""
        if s.link is not None:
            with trio.move_on_after(timeout):
                await s.link.ended.wait()

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
