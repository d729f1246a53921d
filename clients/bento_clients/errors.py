"""Exceptions of the Bento clients (SDK, blocking facade, CLI).

Pure definitions: importing this module must stay cheap (no trio, no
sockets), so ``bento.RemoteError`` can be caught without loading the SDK.

Three families, kept apart on purpose:
- the *function* failed: ``RemoteError`` and its subclasses, raised by
  ``Session.result()``;
- the *server* refused a request: ``RequestFailed`` (with the protocol's
  machine-readable ``code``);
- the *link* failed: ``ConnectionLost`` (the client gave up reconnecting) and
  ``RequestInterrupted`` (a request that is unsafe to repeat was in flight
  when the connection dropped: it may or may not have taken effect).
"""

from __future__ import annotations

import signal as _signal
from typing import Any

__all__ = [
    "BentoError",
    "Busy",
    "Conflict",
    "ConnectionLost",
    "Forbidden",
    "Gone",
    "InputClosed",
    "NotFound",
    "QuotaExceeded",
    "RemoteError",
    "RequestFailed",
    "RequestInterrupted",
    "SessionFailed",
    "SessionGone",
    "SessionKilled",
    "SessionLost",
    "TooLarge",
    "Unauthorized",
    "Unavailable",
    "remote_error",
]


class BentoError(Exception):
    """Base class of every error the Bento clients raise on purpose."""


class ConnectionLost(BentoError):
    """The server could not be reached (at connect), or the connection dropped
    and could not be restored within ``reconnect_timeout``. The client is
    unusable afterwards; sessions keep running on the server and can be
    attached again with their tokens."""


class RequestInterrupted(BentoError):
    """The connection dropped while a request that is not safe to repeat
    (``signal``, ``state_put``) was in flight: it may or may not have taken
    effect. The client itself has reconnected (or is reconnecting)."""

    def __init__(self, op: str) -> None:
        super().__init__(
            f"the connection dropped while '{op}' was in flight; it may or may not have "
            "taken effect (not retried: repeating it is not safe)"
        )
        self.op = op


class RequestFailed(BentoError):
    """The server answered a request with an error (``ok: false``).

    ``code`` is the protocol's stable error code (``not_found``, ``forbidden``,
    ``bad_request``, ...); ``details`` holds any extra fields of the error."""

    code = ""

    def __init__(self, code: str, message: str, op: str = "", **details: Any) -> None:
        super().__init__(f"{op + ': ' if op else ''}{code}: {message}")
        self.code = code
        self.message = message
        self.op = op
        self.details = details

    @staticmethod
    def from_reply(error: Any, op: str = "") -> RequestFailed:
        """The right subclass for an ``error`` map of a reply or event."""
        if not isinstance(error, dict):
            error = {}
        code = str(error.get("code", "internal"))
        message = str(error.get("message", ""))
        details = {k: v for k, v in error.items() if k not in ("code", "message") and isinstance(k, str)}
        cls = _BY_CODE.get(code, RequestFailed)
        return cls(code, message, op, **details)


class Unauthorized(RequestFailed):
    """The server needs an API key for this op: ``key_sent`` says whether one was
    sent and refused (True) or none was sent (False); None when not known."""

    key_sent: bool | None = None

    @classmethod
    def for_key(cls, op: str, key_sent: bool, refused: RequestFailed | None = None) -> Unauthorized:
        """The error for a refused request, saying what the client sent; or, for
        a token whose session's key was revoked (``refused`` says so), the
        server's own words: this client's key has nothing to do with it."""
        if refused is not None and refused.details.get("revoked") is True:
            err = cls("unauthorized", refused.message, op, revoked=True)
            err.key_sent = key_sent
            return err
        if key_sent:
            text = "the API key was refused by the server (check api_key= or BENTO_API_KEY)"
        else:
            text = "the server needs an API key and none was sent (give api_key= or set BENTO_API_KEY)"
        err = cls("unauthorized", text, op)
        err.key_sent = key_sent
        return err


class Forbidden(RequestFailed):
    """The token (or attachment) is read-only where the op needs the owner."""


class NotFound(RequestFailed):
    """No session has this token (wrong token, or the session's life is over)."""


class Conflict(RequestFailed):
    """``state_put`` with an ``if_version`` that is not current: ``version`` is."""

    @property
    def version(self) -> int | None:
        v = self.details.get("version")
        return v if isinstance(v, int) else None


class Gone(RequestFailed):
    """The function has ended (signal or input after its end)."""


class TooLarge(RequestFailed, ValueError):
    """A message over the server's bound: a request or input over its
    ``max_message`` (which the server announces in ``hello``; refused here
    before it is sent, or closed by the server with WebSocket code 1009), or a
    value over a limit of the op (``state_put``: 64 KiB). ``details`` has
    ``size`` and ``limit`` in bytes where known."""

    @classmethod
    def message_over(cls, op: str, size: int, limit: int) -> TooLarge:
        """The error for a message of ``size`` bytes over the server's ``limit``,
        refused before it was sent."""
        return cls("too_large", f"the {op or 'request'} message is {size:,} bytes, over the server's limit "
                   f"of {limit:,} bytes per message (max_message); it was not sent", op, size=size, limit=limit)

    @classmethod
    def closed_for(cls, op: str, size: int, why: str) -> TooLarge:
        """The error for a message of ``size`` bytes for which the server closed
        the connection with 1009 (``why``: the close as the link saw it)."""
        return cls("too_large", f"the {op or 'request'} message of {size:,} bytes is too large for the "
                   f"server (the connection was {why}); not sent again", op, size=size)


class Busy(RequestFailed):
    """The server is full (``limit``: sessions, memory, disk or queue). Not
    retried unless asked (``execute(wait=...)``, ``bento run --wait``);
    ``retry_after`` is the server's advice in seconds (None: retrying cannot help)."""

    def __init__(self, code: str, message: str, op: str = "", **details: Any) -> None:
        super().__init__(code, message, op, **details)
        self.limit = str(details.get("busy", ""))
        after = details.get("retry_after")
        self.retry_after = float(after) if isinstance(after, int | float) else None
        hint = "retrying cannot help" if self.retry_after is None else (
            f"retry after {self.retry_after:g} s, or wait for capacity with wait= / --wait")
        self.args = (f"{self.args[0]} ({hint})",)


class QuotaExceeded(RequestFailed):
    """This API key used its share (``quota``: sessions, executes_per_minute,
    history_bytes or environments). Waiting in the server's queue does not help; ``retry_after``
    says when, for executes_per_minute."""

    def __init__(self, code: str, message: str, op: str = "", **details: Any) -> None:
        super().__init__(code, message, op, **details)
        self.quota = str(details.get("quota", ""))
        after = details.get("retry_after")
        self.retry_after = float(after) if isinstance(after, int | float) else None
        if self.retry_after is not None:
            self.args = (f"{self.args[0]} (allowed again in {self.retry_after:.1f} s)",)


class Unavailable(RequestFailed):
    """A cluster node cannot reach the cluster's Redis, which this request
    needs (a session that another node runs, an idempotency key). The node's
    own sessions keep running. Not retried: try again later (the node
    reconnects by itself), or ask another node; as an event, the attachment
    through that node has ended and ``attach`` again resumes it."""


_BY_CODE: dict[str, type[RequestFailed]] = {
    "unauthorized": Unauthorized,
    "forbidden": Forbidden,
    "not_found": NotFound,
    "conflict": Conflict,
    "gone": Gone,
    "too_large": TooLarge,
    "busy": Busy,
    "quota": QuotaExceeded,
    "unavailable": Unavailable,
}


class SessionGone(BentoError):
    """The session no longer exists on the server (destroyed, or its life ended)
    before this client received its ``exit`` frame."""


class InputClosed(BentoError):
    """Input cannot be sent: ``close_input()`` (or, for stdin, ``close_stdin()``)
    was called, the function has ended, or the attachment is read-only."""


class RemoteError(BentoError):
    """The function did not return normally: an uncaught exception or a non-zero
    exit code (``sys.exit(3)``).

    ``type``, ``message`` and ``traceback`` describe the remote exception (for
    ``sys.exit(n)`` without one: type ``"SystemExit"``); ``state``, ``code`` and
    ``signal`` are those of the ``exit`` frame, ``exit`` the whole frame data.
    """

    def __init__(
        self,
        type: str,
        message: str,
        traceback: str | None = None,
        *,
        state: str = "exited",
        code: int | None = None,
        signal: str | None = None,
        exit: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{type}: {message}" if message else type)
        self.type = type
        self.message = message
        self.traceback = traceback
        self.state = state
        self.code = code
        self.signal = signal
        self.exit = exit or {}

    def __str__(self) -> str:
        text = f"{self.type}: {self.message}" if self.message else self.type
        if self.traceback:
            text += "\n\nRemote traceback:\n" + self.traceback.rstrip()
        return text


class SessionKilled(RemoteError):
    """The function was killed: by a signal (``signal``) or a limit (then
    ``type`` is ``"LimitExceeded"`` and ``message`` names the limit)."""

    @property
    def signal_number(self) -> int | None:
        """The POSIX number of ``signal`` (``"KILL"`` -> 9), or None."""
        try:
            return int(_signal.Signals["SIG" + (self.signal or "")])
        except KeyError:
            return None


class SessionFailed(RemoteError):
    """The function could not start: code that does not compile, an exception at
    import, a missing entry, or a sandbox failure."""


class SessionLost(RemoteError):
    """The session's node or exchange died: what the function did is unknown."""


def remote_error(exit: dict[str, Any]) -> RemoteError | None:
    """The exception ``result()`` raises for an ``exit`` frame's data, or None
    when the function returned normally (state ``exited``, code 0)."""
    state = exit.get("state")
    code = exit.get("code")
    err = exit.get("error") if isinstance(exit.get("error"), dict) else None
    if state == "exited" and code == 0:
        return None
    etype = str(err.get("type", "")) if err else ""
    emsg = str(err.get("message", "")) if err else ""
    tb = err.get("traceback") if err and isinstance(err.get("traceback"), str) else None
    sig = exit.get("signal") if isinstance(exit.get("signal"), str) else None
    num = code if type(code) is int else None

    def make(cls: type[RemoteError], etype: str, emsg: str, tb: str | None) -> RemoteError:
        return cls(etype, emsg, tb, state=str(state), code=num, signal=sig, exit=exit)

    if state == "killed":
        return make(SessionKilled, etype or "Killed", emsg or f"killed by signal {sig}", tb)
    if state == "failed":
        return make(SessionFailed, etype or "Failed", emsg or "the function could not start", tb)
    if state == "lost":
        return make(SessionLost, etype or "Lost", emsg or "the session's node or exchange died", tb)
    if err:
        return make(RemoteError, etype or "Error", emsg, tb)
    return make(RemoteError, "SystemExit", f"exit code {code}", None)
