"""The SDK's requests that name a session by its token, and the server-wide ones.

A mixin of ``bento_clients.client.Client``: status, signal, destroy, share,
files (download, upload), resize, the shared state, and list, store and
ping. Each is one request through the client's supervisor; whether it is
retried after a dropped connection is said per request (a request whose
repeat would do something twice is not).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bento_clients.supervisor import Supervisor

FILE_PIECE = 1 << 20  # bytes per file_get / file_put


class TokenRequests:
    if TYPE_CHECKING:  # what bento_clients.client.Client provides
        _sup: Supervisor

        @staticmethod
        def _fields(reply: dict[str, Any]) -> dict[str, Any]: ...

    async def status(self, token: str) -> dict[str, Any]:
        """The session's status (state, seqs, exit, ...); any token works."""
        return self._fields(await self._sup.call("status", {"token": token}, retry=True))

    async def signal(self, token: str, signal: str = "TERM") -> None:
        """Send INT, TERM or KILL to the function (owner token). Not retried:
        raises ``RequestInterrupted`` if the connection drops meanwhile."""
        await self._sup.call("signal", {"token": token, "signal": signal}, retry=False)

    async def destroy(self, token: str) -> None:
        """Kill the function and delete the session (owner token). Retried after a
        drop; a retry answered ``not_found`` counts as done."""
        await self._sup.call("destroy", {"token": token}, retry=True, done_if_gone=True)

    async def share(self, token: str, viewer: str) -> str | None:
        """Replace the session's viewer token (owner token): ``viewer="rotate"``
        returns a new one, ``"revoke"`` leaves none (returns None). Either way the
        old one stops working and viewers attached with it are cut off. Not
        retried after a drop (a repeat would rotate twice). In a cluster whose
        Redis is out of reach it raises ``RequestFailed`` with code
        ``unavailable`` although the token was replaced: the new one is in its
        ``details["viewer_token"]``."""
        r = await self._sup.call("share", {"token": token, "viewer": viewer}, retry=False)
        return r.get("viewer_token")

    async def download(self, token: str, path: str) -> bytes:
        """A file of the session's work dir (relative ``path``), during the run or
        after it; any token works. Read in pieces of 1 MiB (retried after a drop:
        each piece is read by its offset)."""
        got = bytearray()
        while True:
            r = await self._sup.call("file_get", {"token": token, "path": path, "offset": len(got),
                                                  "length": FILE_PIECE}, retry=True)
            got += r["data"]
            if len(got) >= r["size"] or not r["data"]:
                return bytes(got)

    async def upload(self, token: str, path: str, data: bytes) -> None:
        """Write ``data`` as the file ``path`` of a running session's work dir
        (owner token), in pieces (each retried after a drop: it goes by its offset)."""
        for at in range(0, max(len(data), 1), FILE_PIECE):
            await self._sup.call("file_put", {"token": token, "path": path, "offset": at,
                                              "data": bytes(data[at : at + FILE_PIECE])}, retry=True)

    async def resize(self, token: str, rows: int, cols: int) -> None:
        """A terminal session's new window size (owner token)."""
        await self._sup.call("resize", {"token": token, "rows": rows, "cols": cols}, retry=True)

    async def state_get(self, token: str) -> tuple[int, Any]:
        """The session's shared state: ``(version, value)``."""
        r = await self._sup.call("state_get", {"token": token}, retry=True)
        return r["version"], r["value"]

    async def state_put(self, token: str, value: Any, if_version: int | None = None) -> int:
        """Replace the shared state (owner token); returns the new version. With
        ``if_version`` a stale version raises ``Conflict``. Not retried."""
        fields: dict[str, Any] = {"token": token, "value": value}
        if if_version is not None:
            fields["if_version"] = if_version
        return (await self._sup.call("state_put", fields, retry=False))["version"]

    async def list(self) -> list[dict[str, Any]]:
        """The sessions started with this client's API key (all on a keyless server)."""
        return list((await self._sup.call("list", {}, retry=True))["sessions"])

    async def store(self, code: str, name: str = "function") -> str:
        """Store code on the server; returns its function id (content-addressed)."""
        return (await self._sup.call("store", {"name": name, "code": code}, retry=True))["function"]

    async def ping(self) -> None:
        """One round trip to the server."""
        await self._sup.call("ping", {}, retry=True)
