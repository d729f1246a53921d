"""What a session sends: its input, and the requests it makes by its token.

A mixin of ``bento_clients.session.Session``. Input (values for
``api.recv()``, bytes for the function's stdin, and their ends) goes through
the session's input journal and is delivered exactly once across reconnects;
the other requests are the client's (``Client.status``, ``Client.signal``,
...) with this session's token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bento import protocol
from bento_clients.errors import Forbidden, TooLarge
from bento_clients.frames import EOF, Stdin

if TYPE_CHECKING:
    from bento_clients.client import Client
    from bento_clients.inputs import SessionInput
    from bento_clients.link import Link

_INPUT_OVERHEAD = 1024  # bytes an input message adds around its value


class SessionRequests:
    if TYPE_CHECKING:  # what bento_clients.session.Session provides
        _client: Client
        _link: Link | None
        _input: SessionInput
        token: str | None

        @property
        def _attach_token(self) -> str: ...

    # -- input ------------------------------------------------------------------

    async def send(self, value: Any) -> int:
        """Send one input value to the function (``api.recv()`` returns it); returns
        its seq. It is delivered exactly once even across reconnects. Waits only
        when ``max_pending_inputs`` are unacknowledged. Raises ``InputClosed``
        after ``close_input()``, after the end, or on a read-only attachment;
        ``TooLarge`` (a ValueError) for a value over the server's bound."""
        encoded = protocol.encode(value)
        limit = (self._link.max_message if self._link else protocol.DEFAULT_MAX_MESSAGE) - _INPUT_OVERHEAD
        if len(encoded) > limit:
            raise TooLarge.message_over("input", len(encoded), limit)
        return await self._input.add(value)

    async def close_input(self) -> int:
        """Close the function's input (``api.recv()`` then raises EOFError)."""
        return await self._input.add(EOF)

    async def write_stdin(self, data: bytes | str) -> int:
        """Write ``data`` (text as UTF-8) to the function's standard input, where
        ``input()`` and ``sys.stdin`` read it; returns its seq. Exactly once, in
        order with other stdin writes, across reconnects (as ``send``)."""
        raw = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        limit = (self._link.max_message if self._link else protocol.DEFAULT_MAX_MESSAGE) - _INPUT_OVERHEAD
        if len(raw) > limit:
            raise TooLarge.message_over("input", len(raw), limit)
        return await self._input.add(Stdin(raw))

    async def close_stdin(self) -> int:
        """Close the function's standard input (``input()`` then raises EOFError)."""
        return await self._input.add(Stdin(None))

    async def wait_input_acked(self) -> None:
        """Wait until the server has accepted every input sent so far. Raises
        ``InputClosed`` if the function ended before it accepted them all."""
        await self._input.wait_acked()

    # -- requests by the session's token ---------------------------------------------

    async def status(self) -> dict[str, Any]:
        """``Client.status`` for this session."""
        return await self._client.status(self._attach_token)

    async def signal(self, signal: str = "TERM") -> None:
        """``Client.signal`` for this session (owner)."""
        await self._client.signal(self._owner_token(), signal)

    async def destroy(self) -> None:
        """``Client.destroy`` for this session (owner)."""
        await self._client.destroy(self._owner_token())

    async def resize(self, rows: int, cols: int) -> None:
        """``Client.resize``: this terminal session's new window size (owner)."""
        await self._client.resize(self._owner_token(), rows, cols)

    async def download(self, path: str) -> bytes:
        """``Client.download``: a file of this session's work dir."""
        return await self._client.download(self._attach_token, path)

    async def upload(self, path: str, data: bytes) -> None:
        """``Client.upload``: a file into this running session's work dir (owner)."""
        await self._client.upload(self._owner_token(), path, data)

    async def state_get(self) -> tuple[int, Any]:
        """``Client.state_get`` for this session."""
        return await self._client.state_get(self._attach_token)

    async def state_put(self, value: Any, if_version: int | None = None) -> int:
        """``Client.state_put`` for this session (owner)."""
        return await self._client.state_put(self._owner_token(), value, if_version)

    def _owner_token(self) -> str:
        if self.token is None:
            raise Forbidden("forbidden", "this needs the owner token; the session was attached with a viewer token")
        return self.token
