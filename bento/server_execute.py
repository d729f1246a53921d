"""What a connection does to start a session: ``store`` and ``execute``.

A mixin of ``bento.server.Connection``: an execute's limits (the server's
defaults and maxima, refused when nothing here can enforce them), its buffer,
the session's metadata (a stored function's code found here or on another
node), admission (bento/gate.py) and the registry's new session, attached
to this connection when asked. In a cluster, an execute this node has no room
for is handed to another node (bento/cluster/placement.py), which builds the
session's metadata and starts it with the same functions (``session_meta``,
``start_session``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from bento import auth, events, protocol
from bento.admission import Refused, Ticket
from bento.config import session_limits
from bento.gate import audit
from bento.server_jobs import file_fields, package_fields

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

        def attach(self, s: Session, mode: str, start: int, lines: events.Held | None = None) -> None: ...

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
        limits = session_limits(self.config, req["limits"])
        idem = req.get("idempotency_key")
        idem_hash = auth.idem_hash(key, idem) if idem else None
        cluster = self.server.cluster
        if cluster is not None and idem_hash is not None:
            elsewhere = await cluster.claim(idem_hash)
            if elsewhere is not None:
                await cluster.remote.execute_again(self, req, idem_hash, *elsewhere)
                return
        code = await self._code(req)
        meta = session_meta(self.server, req, key, limits, code)
        # Admission comes first (a refusal is cheap); a retry of an execute that started skips it.
        ticket = None
        if idem_hash not in self.registry.idem:
            ticket = await self._admit(req, key, limits, meta.get("env_name"), code, idem_hash)
            if ticket is None:
                return  # another node took it, and this connection has answered
        # The log lines after the reply and, when attached, after the attachment's
        # first out event (or after LINES_WAIT_S without output: bento/server_attach.py).
        with events.held() as lines:
            s, owner, viewer = await start_session(self.server, meta, idem_hash, ticket)
            await self.send(protocol.reply_ok(req["id"], session=s.sid, token=owner, viewer_token=viewer))
            if req["attach"]:
                self.attach(s, "rw", 1, lines)

    async def _code(self, req: dict) -> str | None:
        """The execute's code: inline, or a stored function's (found here or on another node)."""
        code = req.get("code")
        if code is None and req["function"] is not None:
            code = self.server.store.get_function(req["function"])
            if code is None and self.server.cluster is not None:
                code = await self.server.cluster.function(req["function"])  # stored on another node
            if code is None:
                raise protocol.RequestError("not_found", f"no stored function {req['function']!r}")
        return code

    async def _admit(self, req: dict, key: str, limits: dict, env: str | None, code: str | None,
                     idem_hash: str | None) -> Ticket | None:
        """Admission (bento/gate.py): a ticket, or the error ``busy`` or ``quota``.

        In a cluster, an execute this node has no room for goes to another
        node first (bento/cluster/placement.py): None when one took it and the
        reply is sent. Only when none has room does it wait in this node's
        queue (``queue``) or get ``busy``."""
        gate = self.server.gate
        cluster = self.server.cluster

        async def queued(position: int) -> None:
            await self.send(protocol.event("queued", id=req["id"], position=position))

        history = gate.history_bytes(key, list(self.registry.sessions.values()))
        try:
            return await gate.enter(key, limits, history, None if cluster else req["queue"], queued, env)
        except Refused as exc:
            if cluster is None or exc.code != "busy":
                raise refusal(exc) from None
            full = exc
        handoff = {"req": {k: req[k] for k in EXECUTE_FIELDS if k in req}, "key": key, "limits": limits,
                   "code": code, "idem": idem_hash}
        why_not = await cluster.placement.hand_on(self, req, handoff, gate.admission.memory_of(limits))
        if why_not is None:
            return None
        if not req["queue"]:
            raise protocol.RequestError("busy", f"{full.message}; {why_not}", **full.fields())
        try:
            return await gate.enter(key, limits, history, req["queue"], queued, env)
        except Refused as exc:
            raise refusal(exc) from None


# The fields of an execute that a node needs to start its session (besides the
# code, the key and the limits): what one node hands another in a cluster.
EXECUTE_FIELDS = ("function", "entry", "args", "kwargs", "env", "buffer", "network", "packages", "module",
                  "files", "tty")


def refusal(exc: Refused) -> protocol.RequestError:
    return protocol.RequestError(exc.code, exc.message, **exc.fields())


def session_meta(server: Server, req: dict, key: str, limits: dict, code: str | None) -> dict:
    """The new session's metadata on ``server``: the execute's fields (``req``,
    checked), and this server's own settings and paths."""
    config = server.config
    return {
        "code": code,
        "function": req.get("function"),
        "entry": req["entry"],
        "args": protocol.encode(req["args"]),
        "kwargs": protocol.encode(req["kwargs"]),
        "env": req["env"],
        "limits": limits,
        "buffer": buffer_of(config, req["buffer"]),
        "history_bytes": config.history_bytes,
        "network": req["network"],
        **package_fields(server, req["packages"]),
        **file_fields(config, req),
        **({"tty": req["tty"]} if req["tty"] else {}),
        "work_bytes": config.max_work_bytes,
        "sandbox": config.sandbox,
        "sandbox_cmd": config.sandbox_cmd,
        "max_message": config.max_message,
        "allow_unenforced": config.allow_unenforced_limits,
        "key": key,
    }


def buffer_of(config: Config, asked: dict | None) -> dict:
    asked = asked or {}
    max_bytes = asked.get("max_bytes", config.buffer_bytes)
    if max_bytes > config.max_buffer_bytes:
        raise protocol.RequestError(
            "bad_request", f"buffer.max_bytes is at most {config.max_buffer_bytes} on this server")
    return {"max_bytes": max_bytes, "policy": asked.get("policy", config.buffer_policy)}


async def start_session(server: Server, meta: dict, idem_hash: str | None, ticket: Ticket | None,
                        settle: bool = True) -> tuple[Session, str, str]:
    """The admitted execute's session (a new one, or the one of ``idem_hash``),
    entered into the cluster's directory before its tokens are returned;
    (session, owner token, viewer token). ``settle``: in a cluster, the
    idempotency key (claimed by this node, or by the node that handed the
    execute on) now names this session. Cancelled or failed before the
    session exists, the ticket is given back."""
    registry = server.registry
    try:
        s, owner, viewer = await registry.create(meta, idem_hash)
    except BaseException:
        if ticket is not None:
            server.gate.release(ticket)
        raise
    if ticket is not None:
        server.gate.bind(ticket, s)
    audit("execute", meta["key"], s.sid)
    server.metrics.executed(s, registry.nursery)
    if server.cluster is not None:
        await server.cluster.publish(s)
        if idem_hash is not None and settle:
            await server.cluster.settle(idem_hash, s.sid)
    return s, owner, viewer
