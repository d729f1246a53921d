"""The requests that name a session by its token, and the ones that act on a
session as a whole (signal, status, list, destroy, share) for its owner and for an
admin key, which names any session by its id.

Who may act: a token gives its session (the owner token everything, a viewer
token reads); a token whose session was started by a key revoked since
(a reload on SIGHUP, ``revoke_sessions``) gives nothing. An admin key names
sessions by id, across owners; its kill is recorded in the function's exit
(``Killed``, ``by: "admin:<name>"``) through the exchange's control socket. An
ended session has no exchange: status and destroy are answered from what the
server holds and from disk. A mixin of ``bento.server.Connection``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bento import auth, events, protocol
from bento.gate import audit
from bento.sessions import REPLACED, Session

if TYPE_CHECKING:
    from bento.cluster.node import Cluster
    from bento.config import Config
    from bento.server import Server
    from bento.sessions import Registry


def check_key(server: Server, config: Config, key_hash: str | None) -> None:
    """Refuse a session's token when the API key that started it (``key_hash``)
    was revoked since, unless ``revoke_sessions`` is off."""
    if key_hash and config.revoke_sessions and not server.keys.known(key_hash):
        raise protocol.RequestError("unauthorized", "the API key that started this session was revoked: its "
                                    "tokens no longer work (an admin key can still reach it by id)", revoked=True)


class SessionOps:
    """signal, status, list, destroy and share, and how a request finds its session."""

    server: Server
    config: Config
    registry: Registry
    key: str | None
    peer: str

    if TYPE_CHECKING:
        async def send(self, data: bytes) -> None: ...  # Connection.send

    def need_key(self) -> str:
        if self.key is None or not self.server.keys.known(self.key):
            raise protocol.RequestError("unauthorized", "this server requires a valid API key (hello auth)")
        return self.key

    def by_token(self, token: str, owner: bool) -> tuple[Session, str]:
        if not self.server.guesses.allowed(self.peer):
            self.server.metrics.guesses_refused.inc()
            events.refused("rate_limit", self.peer)
            raise protocol.RequestError("limit", "too many failed token guesses; slow down")
        found = self.registry.by_token(token)
        if found is None and self.registry.retired(token):
            raise protocol.RequestError("not_found", REPLACED, replaced=True)
        if found is None:
            self.server.guesses.failed(self.peer)
            self.server.metrics.guesses_failed.inc()
            raise protocol.RequestError("not_found", "no session has this token")
        s, mode = found
        check_key(self.server, self.config, s.meta.get("key"))
        if owner and mode != "rw":
            raise protocol.RequestError("forbidden", "this needs the owner token, not a viewer token")
        return s, mode

    def target(self, req: dict, owner: bool) -> tuple[Session, str | None]:
        """The session a request names by token, or by id for an admin key; and
        who acts on it ("admin:<name>" when an admin named it by id, else None)."""
        if req["token"] is not None:
            return self.by_token(req["token"], owner)[0], None
        if not self.server.keys.is_admin(self.key):
            raise protocol.RequestError(
                "forbidden", "only an admin key may name a session by its id; use the session's token")
        s = self.registry.sessions.get(req["session"])
        if s is None or s.removed:
            raise protocol.RequestError("not_found", f"no session {req['session']!r} on this server")
        return s, f"admin:{self.server.keys.name(self.key or '')}"

    async def op_signal(self, req: dict) -> None:
        s, by = self.target(req, owner=True)
        audit("signal", self.key, s.sid)
        await self._signal(s, req["signal"], by)
        await self.send(protocol.reply_ok(req["id"]))

    async def _signal(self, s: Session, name: str, by: str | None) -> None:
        """Send a signal to the function; a KILL sent ``by`` an admin is recorded in its exit."""
        if s.snap.has_ended:
            raise protocol.RequestError("gone", "the function has ended")
        msg = {"t": "signal", "signal": name}
        if by is not None and name == "KILL":
            msg["by"] = by
            events.emit("admin.kill", session=s.sid, by=by)
        r = await self.registry.call(s, msg)
        if not r["ok"]:
            raise protocol.RequestError(r["code"], r["message"])

    async def op_status(self, req: dict) -> None:
        s, by = self.target(req, owner=False)
        await self.send(protocol.reply_ok(req["id"], **self._status(s, by is not None)))

    def _status(self, s: Session, with_key: bool) -> dict:
        if not with_key:
            return s.status()
        return {**s.status(), "key": self.server.keys.name(s.meta.get("key") or "")}

    async def op_list(self, req: dict) -> None:
        key = self.need_key()
        every = not self.server.keys.required or self.server.keys.is_admin(key)
        out = [self._status(s, True) for s in self.registry.sessions.values()
               if every or s.meta.get("key") == key]
        if self.server.cluster is not None:
            # And the sessions of the same key that other nodes run, from Redis.
            out = await self.server.cluster.remote.list(None if every else key, out, self.server.keys.name)
        await self.send(protocol.reply_ok(req["id"], sessions=out))

    async def op_destroy(self, req: dict) -> None:
        s, by = self.target(req, owner=True)
        audit("destroy", self.key, s.sid)
        if by is not None and not s.snap.has_ended:
            # An admin ends the function; the session stays readable for its owner.
            await self._signal(s, "KILL", by)
        else:
            await self.registry.end(s, reason="destroyed by " + (by or "owner"))
        await self.send(protocol.reply_ok(req["id"]))

    async def op_share(self, req: dict) -> None:
        """Rotate (a new viewer token) or revoke (none) the session's viewer token."""
        s, _ = self.by_token(req["token"], owner=True)
        audit(f"share.{req['viewer']}", self.key, s.sid)
        viewer = await share(self.registry, self.server.cluster, s, req["viewer"])
        await self.send(protocol.reply_ok(req["id"], viewer_token=viewer))


async def share(registry: Registry, cluster: Cluster | None, s: Session, action: str) -> str | None:
    """``share``: a new viewer token for ``s`` ("rotate"; returned) or none
    ("revoke"). The old one stops working here at once, and on every node of
    a cluster once its Redis has the change (``unavailable`` if it could not
    take it now: the node writes it when Redis answers again)."""
    viewer = auth.new_tokens()[1] if action == "rotate" else None
    try:
        forgotten = await registry.replace_viewer(s, auth.token_hash(viewer) if viewer else "")
    except OSError as exc:
        raise protocol.RequestError("internal", f"cannot save the session's tokens: {exc.strerror}") from None
    if s.removed:
        raise protocol.RequestError("not_found", "the session was destroyed meanwhile")
    if cluster is not None:
        await cluster.share(s, forgotten, viewer)
    return viewer
