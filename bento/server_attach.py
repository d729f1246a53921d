"""A connection's attachments: attach, detach, ack, and each attachment's worker.

A mixin of ``bento.server.Connection``. An attachment's worker reads the
session's output log from its own position and pushes ``out`` events (and
``state`` events, and a ``gap`` where history was trimmed); it never holds
frames in memory beyond one batch. A dropped attachment's last batch is out
before a new one for its session starts, and no frame of a session follows
the reply to its ``detach``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from bento import events, protocol, sessionlog
from bento.gate import audit
from bento.sessions import Attachment, Session
from bento.transport import ConnectionClosed

if TYPE_CHECKING:
    from collections.abc import Sequence

    from bento.config import Config
    from bento.server import Server
    from bento.sessions import Registry

log = logging.getLogger("bento.server")

# An execute's log lines (a few, ~0.3 ms to write) wait this long for its
# first output to go out before them, no longer.
LINES_WAIT_S = 0.05


class AttachOps:
    if TYPE_CHECKING:  # what bento.server.Connection provides
        server: Server
        config: Config
        registry: Registry
        key: str | None
        attachments: dict[str, Attachment]
        nursery: trio.Nursery | None
        dead: bool
        out_budget: int

        def by_token(self, token: str, owner: bool) -> tuple[Session, str]: ...

        async def send(self, data: bytes | Sequence[bytes | memoryview]) -> None: ...

    def attachment(self, sid: str, write: bool) -> Attachment:
        att = self.attachments.get(sid)
        if att is None:
            raise protocol.RequestError("not_found", f"this connection is not attached to {sid}")
        if write and att.mode != "rw":
            raise protocol.RequestError("forbidden", "this attachment is read-only")
        return att

    async def op_attach(self, req: dict) -> None:
        s, mode = self.by_token(req["token"], owner=False)
        audit("attach", self.key, s.sid)
        # The reply carries the session's positions as they are now, not as last announced.
        await self.registry.sync(s)
        snap = s.snap
        start = req["from"]
        if start > snap.next_seq:
            raise protocol.RequestError("bad_request", f"from {start} is beyond next_seq {snap.next_seq}")
        old = self.attachments.pop(s.sid, None)
        if old is not None:
            # The old position's last batch must be out before the new one starts.
            await self._drop_and_wait(old)
        await self.send(protocol.reply_ok(
            req["id"], session=s.sid, mode=mode, state=snap.state, first_seq=snap.first_seq,
            next_seq=snap.next_seq, input_seq=snap.input_seq, tty=bool(s.meta.get("tty")),
        ))
        self.attach(s, mode, start)

    def attach(self, s: Session, mode: str, start: int, lines: events.Held | None = None) -> None:
        """Attach this connection to ``s`` from ``start``; ``lines``: an
        execute's log lines, which its worker writes after the first output."""
        old = self.attachments.pop(s.sid, None)
        if old is not None:
            self._drop(old)
        if s.verdict is not None:
            # The cluster's end stands for it (bento/cluster/mirror.py): read from there.
            self.server.cluster.remote.follow(self, s, mode, start)
            if lines is not None:
                lines.release()
            return
        assert self.nursery is not None
        att = Attachment(session=s, mode=mode, next_seq=start, cancel=trio.CancelScope())
        self.attachments[s.sid] = att
        s.attachments.add(att)
        self.nursery.start_soon(self.worker, att)
        if lines is not None:
            att.lines = lines.hand_on()

    async def _drop_and_wait(self, att: Attachment) -> None:
        self._drop(att)
        await att.done.wait()

    def _drop(self, att: Attachment) -> None:
        att.cancel.cancel()
        s = att.session
        s.attachments.discard(att)

    def detach_all(self) -> None:
        for att in self.attachments.values():
            self._drop(att)
        sessions = [a.session for a in self.attachments.values()]
        self.attachments.clear()
        for s in sessions:
            self.registry.nursery.start_soon(self._maybe_end, s)

    async def _maybe_end(self, s: Session) -> None:
        if not s.removed and s.life_over(self.config.keep_s):
            await self.registry.end_by_keep(s)

    async def op_detach(self, req: dict) -> None:
        if self.server.cluster is not None and await self.server.cluster.remote.detach(self, req["session"]):
            await self.send(protocol.reply_ok(req["id"]))
            return
        att = self.attachment(req["session"], write=False)
        self.attachments.pop(att.session.sid, None)
        # No frame of this session may follow the reply.
        await self._drop_and_wait(att)
        await self.send(protocol.reply_ok(req["id"]))
        await self._maybe_end(att.session)

    async def op_ack(self, req: dict) -> None:
        if self.server.cluster is not None and await self.server.cluster.remote.ack(self, req["session"], req["seq"]):
            return
        att = self.attachment(req["session"], write=False)
        if att.mode != "rw":
            return  # acks over a viewer attachment are ignored
        await self.registry.ack(att.session, req["seq"])

    # -- the attachment worker ---------------------------------------------------

    async def worker(self, att: Attachment) -> None:
        s = att.session
        # Checksums: of everything for a session found on disk at start; else of
        # what is on disk already (the steady stream after it is read unchecked).
        verify_below = 1 << 62 if s.check_log else s.snap.next_seq
        cursor = sessionlog.Cursor(s.dir, "out", att.next_seq, verify_below=verify_below)
        try:
            with att.cancel:
                await self._pump(att, s, cursor)
        except ConnectionClosed:
            pass
        finally:
            cursor.close()
            att.write_lines()
            try:
                if att.ended and not self.dead and self.attachments.get(s.sid) is att:
                    self.attachments.pop(s.sid, None)
                    await self._ended(att, s)
            finally:
                att.done.set()

    async def _ended(self, att: Attachment, s: Session) -> None:
        """An attachment its session ended: its last word, or (the cluster ended
        the session while this node was out of reach) on from the cluster's copy."""
        verdict = s.verdict
        if verdict is not None and not s.removed and att.next_seq <= (verdict.exit_seq or 0):
            self.server.cluster.remote.follow(self, s, att.mode, att.next_seq)
            return
        if verdict is not None and not s.removed:
            code, why = "internal", (
                f"the cluster ended this session lost at seq {verdict.exit_seq} while this node was out "
                "of reach of the others; this attachment had read past it, and what it read after that "
                f"is not part of the session: attach again (from {verdict.exit_seq} at most) to read its end")
        elif att.why:
            code, why = "forbidden", att.why
        else:
            code, why = "gone", "the session was destroyed"
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            try:
                await self.send(protocol.error_event(s.sid, code, why))
            except ConnectionClosed:
                pass

    async def _pump(self, att: Attachment, s: Session, cursor: sessionlog.Cursor) -> None:
        lines_due = None
        while True:
            changed = s.changed
            if s.removed or s.verdict is not None:
                att.ended = True
                return
            if s.shared_version > att.state_version_sent:
                att.state_version_sent = s.shared_version
                value = protocol.decode(s.shared_value, require_map=False)
                await self.send(protocol.event("state", session=s.sid, version=s.shared_version, value=value))
                continue
            snap = s.snap
            if att.next_seq < snap.first_seq:
                a, b = att.next_seq, snap.first_seq - 1
                reason = snap.gap_reason(a)
                await self.send(protocol.out_event(s.sid, [protocol.gap_frame(a, b, reason)]))
                self.server.metrics.gap_frames.labels(reason).inc(b - a + 1)
                att.next_seq = b + 1
                cursor.seek(att.next_seq)
                continue
            if att.next_seq < snap.next_seq:
                try:
                    frames = cursor.read(snap.next_seq, self.out_budget)
                except FileNotFoundError:
                    # Trimmed under our feet: the exchange's next progress says how far.
                    cursor.seek(att.next_seq)
                    with trio.move_on_after(0.05):
                        await changed.wait()
                    continue
                except sessionlog.LogCorrupt as exc:
                    log.error("session %s: output log is corrupt: %s", s.sid, exc)
                    await self.send(protocol.error_event(s.sid, "internal", f"output log is corrupt: {exc}"))
                    return
                if frames:
                    await self.send(protocol.out_event_parts(s.sid, frames))
                    self.server.metrics.frames_out.inc(len(frames))
                    att.next_seq = cursor.next_seq
                    att.write_lines()
                continue
            if att.lines is not None:
                if lines_due is None:
                    lines_due = trio.current_time() + LINES_WAIT_S
                with trio.move_on_at(lines_due) as waited:
                    await changed.wait()
                if waited.cancelled_caught:
                    att.write_lines()
                continue
            await changed.wait()
