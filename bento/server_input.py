"""A connection's input to a session and its shared state: input, state_get, state_put.

A mixin of ``bento.server.Connection``. Input goes to the session's exchange,
which logs it before it is acknowledged (``in_ack``); once the function has
ended, a re-sent input is still acknowledged as a duplicate and a new one is
refused. The shared state is read and compare-and-set through the registry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bento import protocol, session_core
from bento.sessions import FROZEN_STATE, Attachment, ExchangeGone, Session

if TYPE_CHECKING:
    from bento.server import Server
    from bento.sessions import Registry

MAX_STATE_BYTES = 64 * 1024


class InputOps:
    if TYPE_CHECKING:  # what bento.server.Connection provides
        server: Server
        registry: Registry

        def by_token(self, token: str, owner: bool) -> tuple[Session, str]: ...

        def attachment(self, sid: str, write: bool) -> Attachment: ...

        async def send(self, data: bytes) -> None: ...

    async def op_input(self, req: dict) -> None:
        if self.server.cluster is not None and await self.server.cluster.remote.input(self, req):
            return
        att = self.attachment(req["session"], write=True)
        s = att.session
        msg: dict[str, Any] = {"t": "input", "seq": req["seq"]}
        if req["stdin"]:
            msg["stdin"] = True
        if req["eof"]:
            msg["eof"] = True
        else:
            # stdin: the bytes themselves; else the value's CBOR, for api.recv().
            msg["data"] = req["data"] if req["stdin"] else protocol.encode(req["data"])
        if s.on_disk:
            r = self._input_after_end(s, req["seq"])
        else:
            try:
                r = await self.registry.input(s, msg)
            except ExchangeGone:
                # An exchange that has just ended the function exits: its last
                # announcement may still be on its way in.
                await self.registry.settle(s)
                if not s.snap.has_ended:
                    raise
                r = self._input_after_end(s, req["seq"])
        if r["ok"]:
            self.server.metrics.inputs.inc()
            await self.send(protocol.event("in_ack", session=s.sid, seq=r["input_seq"]))
        else:
            raise protocol.RequestError(r["code"], r["message"])

    def _input_after_end(self, s: Session, seq: int) -> dict:
        """Its function ended and no exchange answers: a re-sent input is still a duplicate."""
        verdict = session_core.judge_input(s.snap.input_seq, seq, running=False)
        if verdict == session_core.DUPLICATE:
            return {"ok": True, "input_seq": s.snap.input_seq}
        assert isinstance(verdict, session_core.Refused)  # not ACCEPT: the function ended
        return {"ok": False, "code": verdict.code, "message": verdict.message}

    async def op_state_get(self, req: dict) -> None:
        s, _ = self.by_token(req["token"], owner=False)
        value = protocol.decode(s.shared_value, require_map=False)
        await self.send(protocol.reply_ok(req["id"], version=s.shared_version, value=value))

    async def op_state_put(self, req: dict) -> None:
        s, _ = self.by_token(req["token"], owner=True)
        if s.verdict is not None:
            raise protocol.RequestError("gone", FROZEN_STATE)
        value = protocol.encode(req["value"])
        if len(value) > MAX_STATE_BYTES:
            raise protocol.RequestError("too_large", f"shared state is at most {MAX_STATE_BYTES} bytes encoded")
        ok, version = await self.registry.put_state(s, value, req["if_version"])
        if not ok:
            raise protocol.RequestError("conflict", "shared state changed", version=version)
        await self.send(protocol.reply_ok(req["id"], version=version))
