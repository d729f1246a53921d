"""What a connection does to start a session: ``store`` and ``execute``.

A mixin of ``bento.server.Connection``: an execute's limits (the server's
defaults and maxima, refused when nothing here can enforce them), its buffer,
the session's metadata (a stored function's code found here or on another
node), admission (bento/gate.py) and the registry's new session, attached
to this connection when asked.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import bento_sandbox
import trio

from bento import auth, protocol
from bento.admission import Refused, Ticket
from bento.gate import audit

if TYPE_CHECKING:
    from bento.config import Config
    from bento.server import Server
    from bento.sessions import Registry, Session


class ExecuteOps:
    if TYPE_CHECKING:  # what bento.server.Connection provides
        server: Server
        config: Config
        registry: Registry

        def need_key(self) -> str: ...

        def attach(self, s: Session, mode: str, start: int) -> None: ...

        def _packages(self, asked: list[str]) -> dict: ...

        def _files(self, req: dict) -> dict: ...

        async def send(self, data: bytes) -> None: ...

    async def op_store(self, req: dict) -> None:
        self.need_key()
        try:
            fid = await trio.to_thread.run_sync(self.server.store.put_function, req["name"], req["code"])
        except OSError as exc:
            raise protocol.RequestError("internal", f"cannot store the function: {exc.strerror}") from None
        if self.server.cluster is not None:
            await self.server.cluster.share_function(fid, req["name"], req["code"])
        await self.send(protocol.reply_ok(req["id"], function=fid))

    async def op_execute(self, req: dict) -> None:
        key = self.need_key()
        limits = self._limits(req["limits"])
        idem = req.get("idempotency_key")
        idem_hash = auth.idem_hash(key, idem) if idem else None
        cluster = self.server.cluster
        if cluster is not None and idem_hash is not None:
            elsewhere = await cluster.claim(idem_hash)
            if elsewhere is not None:
                await cluster.remote.execute_again(self, req, idem_hash, *elsewhere)
                return
        meta = await self._meta(req, key, limits)
        # Admission comes first (a refusal is cheap); a retry of an execute that started skips it.
        ticket = None if idem_hash in self.registry.idem else await self._admit(req, key, limits, meta.get("env_name"))
        try:
            s, owner, viewer = await self.registry.create(meta, idem_hash)
        except BaseException:
            if ticket is not None:
                self.server.gate.release(ticket)
            raise
        if ticket is not None:
            self.server.gate.bind(ticket, s)
        audit("execute", key, s.sid)
        self.server.metrics.executed(s, self.registry.nursery)
        if cluster is not None:
            await cluster.publish(s)
            if idem_hash is not None:
                await cluster.settle(idem_hash, s.sid)
        await self.send(protocol.reply_ok(req["id"], session=s.sid, token=owner, viewer_token=viewer))
        if req["attach"]:
            self.attach(s, "rw", 1)

    async def _meta(self, req: dict, key: str, limits: dict) -> dict:
        code = req.get("code")
        if code is None and req["function"] is not None:
            code = self.server.store.get_function(req["function"])
            if code is None and self.server.cluster is not None:
                code = await self.server.cluster.function(req["function"])  # stored on another node
            if code is None:
                raise protocol.RequestError("not_found", f"no stored function {req['function']!r}")
        return {
            "code": code,
            "function": req.get("function"),
            "entry": req["entry"],
            "args": protocol.encode(req["args"]),
            "kwargs": protocol.encode(req["kwargs"]),
            "env": req["env"],
            "limits": limits,
            "buffer": self._buffer(req["buffer"]),
            "history_bytes": self.config.history_bytes,
            "network": req["network"],
            **self._packages(req["packages"]),
            **self._files(req),
            **({"tty": req["tty"]} if req["tty"] else {}),
            "work_bytes": self.config.max_work_bytes,
            "sandbox": self.config.sandbox,
            "sandbox_cmd": self.config.sandbox_cmd,
            "max_message": self.config.max_message,
            "allow_unenforced": self.config.allow_unenforced_limits,
            "key": key,
        }

    async def _admit(self, req: dict, key: str, limits: dict, env: str | None) -> Ticket:
        """Admission (bento/gate.py): a ticket, or the error ``busy`` or ``quota``."""
        gate = self.server.gate

        async def queued(position: int) -> None:
            await self.send(protocol.event("queued", id=req["id"], position=position))

        history = gate.history_bytes(key, list(self.registry.sessions.values()))
        try:
            return await gate.enter(key, limits, history, req["queue"], queued, env)
        except Refused as exc:
            raise protocol.RequestError(exc.code, exc.message, **exc.fields()) from None

    def _limits(self, asked: dict) -> dict:
        """The session's limits: what it asked for, the server's defaults for
        the rest, and never above the server's maxima (a limit with a maximum
        is always set)."""
        limits = dict(self.config.default_limits)
        for k, v in asked.items():
            if isinstance(v, float) and not math.isfinite(v):
                raise protocol.RequestError("bad_request", f"limit {k} must be finite")
            top = self.config.max_limits.get(k)
            if top is not None and v > top:
                raise protocol.RequestError("bad_request", f"limit {k} is at most {top} on this server")
            limits[k] = v
        for k, top in self.config.max_limits.items():
            limits[k] = min(limits.get(k, top), top)
        if not self.config.allow_unenforced_limits:
            for k in limits:
                if k not in self.config.enforceable:
                    raise protocol.RequestError(
                        "bad_request",
                        f"limit {k} cannot be enforced on this server "
                        f"({bento_sandbox.unenforceable_reason(k)}): run without it, or ask the "
                        "operator (who may start the server with --allow-unenforced-limits)")
        return limits

    def _buffer(self, asked: dict | None) -> dict:
        asked = asked or {}
        max_bytes = asked.get("max_bytes", self.config.buffer_bytes)
        if max_bytes > self.config.max_buffer_bytes:
            raise protocol.RequestError(
                "bad_request", f"buffer.max_bytes is at most {self.config.max_buffer_bytes} on this server")
        return {"max_bytes": max_bytes, "policy": asked.get("policy", self.config.buffer_policy)}
