"""The SDK's client: the public request API (execute, attach, status, ...) and
the registry of attached sessions.

The connection itself is the supervisor's (``supervisor.py``): this module
tells it how to restore the sessions on each new link (re-attach from the
last seq held + 1, re-ack, re-send unacknowledged input) and routes the
events it reads to their sessions.
"""

from __future__ import annotations

import ast
import inspect
import logging
import os
import re
import ssl
import textwrap
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import trio

import bento
from bento import protocol
from bento_clients.client_requests import TokenRequests
from bento_clients.convert import parse_buffer, parse_limits
from bento_clients.errors import Busy
from bento_clients.inputs import InputJournal
from bento_clients.link import Link
from bento_clients.session import Session
from bento_clients.supervisor import Supervisor

__all__ = ["DEFAULT_URL", "RESERVED_OPTIONS", "Client", "default_url"]

log = logging.getLogger("bento.client")

DEFAULT_URL = "ws://127.0.0.1:8765/v1"
CLIENT_NAME = f"bento-python/{bento.__version__}"
# Keyword names of execute() that are options, not the function's kwargs
# (pass a colliding function kwarg through kwargs={...}).
RESERVED_OPTIONS = ("entry", "kwargs", "env", "limits", "buffer", "network", "packages", "files", "module",
                    "tty", "idempotency_key", "attach", "wait")
# What execute(wait=True) waits for capacity at most, seconds.
DEFAULT_WAIT_S = 600.0
_FUNCTION_ID = re.compile(r"[0-9a-f]{64}")


def default_url() -> str:
    """``$BENTO_SERVER`` or ``ws://127.0.0.1:8765/v1``."""
    return os.environ.get("BENTO_SERVER") or DEFAULT_URL


def _source_of(fn: Callable[..., Any]) -> str:
    """The module source that defines ``fn`` (decorators dropped, dedented)."""
    name = getattr(fn, "__name__", "")
    if name == "<lambda>" or not name:
        raise TypeError("execute() needs a named function (def ...), not a lambda")
    try:
        src = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError) as exc:
        raise TypeError(f"cannot read the source of {fn!r}: {exc}") from None
    tree = ast.parse(src)
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name:
            lines = src.splitlines(keepends=True)
            return "".join(lines[node.lineno - 1:])
    return src


class Client(TokenRequests):
    """A connection to one Bento server that reconnects by itself.

    Make one with ``connect()``; see that function for the options."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        reconnect_timeout: float = 60.0,
        connect_timeout: float = 10.0,
        ping_interval: float = 20.0,
        ping_timeout: float = 20.0,
        backoff_base: float = 0.05,
        backoff_max: float = 5.0,
        max_pending_inputs: int = 1024,
        max_message: int = 64 * 1024 * 1024,
        max_queued_bytes: int | None = 64 * 1024 * 1024,
        ssl_context: ssl.SSLContext | None = None,
        ca_file: str | None = None,
        client_name: str = CLIENT_NAME,
    ) -> None:
        self.url = url or default_url()
        self.api_key = api_key if api_key is not None else os.environ.get("BENTO_API_KEY") or None
        self.max_pending_inputs = max_pending_inputs
        if ca_file is None and ssl_context is None:
            ca_file = os.environ.get("BENTO_CA_FILE") or None
        #: Output received and not read yet, per session, past which its attachment
        #: is paused (see ``Session.paused`` and docs/sdk.md); None: no bound.
        self.max_queued_bytes = max_queued_bytes
        # Called with the position of an execute waiting in the server's queue.
        self.on_queued: Callable[[int], None] | None = None
        self._sup = Supervisor(
            self.url, self.api_key, on_connected=self._restore, on_message=self._dispatch,
            on_lost=self._wake_sessions, reconnect_timeout=reconnect_timeout,
            connect_timeout=connect_timeout, ping_interval=ping_interval, ping_timeout=ping_timeout,
            backoff_base=backoff_base, backoff_max=backoff_max, max_message=max_message,
            ssl_context=ssl_context, ca_file=ca_file, client_name=client_name)
        self._sessions: dict[str, Session] = {}
        self._nursery: trio.Nursery | None = None

    # -- public API ---------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while a connection is up (False while reconnecting)."""
        return self._sup.connected

    @property
    def reconnects(self) -> int:
        """How many times the connection was restored after a drop."""
        return self._sup.reconnects

    @property
    def server_info(self) -> dict[str, Any]:
        """The server's hello reply (``server``, ``node``, ``max_message``)."""
        return self._sup.server_info

    async def execute(
        self,
        function: str | Callable[..., Any] | None = None,
        /,
        *args: Any,
        entry: str | None = None,
        kwargs: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        limits: str | dict[str, Any] | None = None,
        buffer: int | str | dict[str, Any] | None = None,
        network: bool = False,
        packages: Iterable[str] = (),
        files: dict[str, bytes] | None = None,
        module: str | None = None,
        tty: tuple[int, int] | None = None,
        idempotency_key: str | None = None,
        attach: bool = True,
        wait: bool | float = False,
        **fn_kwargs: Any,
    ) -> Session:
        """Run a function on the server; returns its ``Session``.

        ``function``: Python source (a module defining ``entry``), a stored
        function id (64 hex digits, from ``store()``), or a Python function
        object (its source is sent, ``entry`` defaults to its name; it must be
        self-contained: imports inside it, no closures). ``args`` and
        ``fn_kwargs`` are passed to it (any CBOR-encodable values).

        Options (reserved keyword names, see ``RESERVED_OPTIONS``): ``entry``
        (default "main"), ``kwargs`` (the function's kwargs, for names that
        collide with these options), ``env``, ``limits`` (a map of protocol
        keys or text like ``"wall=30s,mem=256M"``), ``buffer`` (max bytes as
        int or ``"64M"``, or ``{"max_bytes", "policy"}``), ``network``,
        ``packages`` (requirements such as ``["numpy", "pandas<3"]``: the
        server installs them once per distinct list and the function imports
        them; the installer's progress arrives as stderr frames), ``files``
        (relative path -> bytes: written into the function's working directory
        before it starts; ``bento_clients.tree.pack`` reads a directory),
        ``module`` (instead of ``function``: import this dotted module from
        those files and call its ``entry``; ``__file__`` and relative imports
        work), ``tty`` ((rows, cols): run the function in a terminal of that
        size; ``Session.write_stdin`` sends its keys, ``Session.resize`` its
        new size),
        ``idempotency_key`` (one is generated when not given, so a retried
        execute after a dropped connection never starts a second function),
        ``attach`` (False: start it and only return the tokens), ``wait``
        (a full server answers ``Busy`` at once unless this is True, up to
        ``DEFAULT_WAIT_S``, or a number of seconds: the execute then waits in
        the server's queue, and retries after the server's ``retry_after``
        while time is left; ``on_queued`` hears its position).
        """
        fields: dict[str, Any] = {}
        if module is not None:
            if function is not None:
                raise TypeError("execute() takes a function or module=, not both")
            fields["module"] = module
        elif callable(function):
            fields["code"] = _source_of(function)
            entry = entry or function.__name__
        elif isinstance(function, str):
            fields["function" if _FUNCTION_ID.fullmatch(function) else "code"] = function
        else:
            raise TypeError("execute() takes source code, a function id or a function")
        all_kwargs = dict(kwargs or {})
        for k, v in fn_kwargs.items():
            if k in all_kwargs:
                raise TypeError(f"execute() got keyword {k!r} twice (directly and in kwargs=)")
            all_kwargs[k] = v
        fields.update(entry=entry or "main", args=list(args), kwargs=all_kwargs, network=bool(network),
                      idempotency_key=idempotency_key or f"sdk-{uuid.uuid4().hex}", attach=bool(attach))
        if env:
            fields["env"] = dict(env)
        if isinstance(packages, str):
            raise TypeError("packages= takes a list of requirements, not one string")
        if packages:
            fields["packages"] = list(packages)
        if files:
            fields["files"] = {str(k): bytes(v) for k, v in files.items()}
        if tty is not None:
            rows, cols = tty
            fields["tty"] = {"rows": int(rows), "cols": int(cols)}
        if limits:
            fields["limits"] = parse_limits(limits)
        if buffer is not None:
            fields["buffer"] = (parse_buffer(buffer.get("max_bytes"), buffer.get("policy"))
                                if isinstance(buffer, dict) else parse_buffer(buffer))
        protocol.encode(fields)  # a value that cannot travel fails here, with TypeError

        made: list[Session] = []

        def on_reply(link: Link, reply: dict[str, Any]) -> None:
            s = Session(self, reply["session"], reply["token"], reply.get("viewer_token"), mode="rw")
            if attach:
                self._register(s, link, {"mode": "rw", "input_seq": 0})
            made.append(s)

        wait_s = DEFAULT_WAIT_S if wait is True else float(wait or 0)
        deadline = trio.current_time() + wait_s
        while True:
            if wait_s:
                fields["queue"] = max(0.0, deadline - trio.current_time())
            try:
                await self._sup.call("execute", fields, retry=True, on_reply=on_reply)
                return made[-1]
            except Busy as exc:
                if exc.retry_after is None or trio.current_time() + exc.retry_after >= deadline:
                    raise
                await trio.sleep(exc.retry_after)

    async def attach(
        self,
        token: str,
        from_seq: int | None = 1,
        *,
        auto_ack: bool = True,
        pending_input: Iterable[tuple[int, Any]] = (),
        input_journal: InputJournal | None = None,
    ) -> Session:
        """Attach to a session by its token (owner: read-write; viewer: read-only).

        Frames are delivered from ``from_seq`` (default 1: everything retained;
        a ``Gap`` frame first if some are gone); ``None`` means live frames only.
        As owner, frames the user has read (and, when ``from_seq`` > 1, those
        before it) are acknowledged so the server can free them, unless
        ``auto_ack`` is False (a read-only look, as ``bento logs``).
        ``pending_input`` are (seq, value-or-EOF) inputs an earlier process
        sent but did not see acknowledged: they are re-sent with their seqs.
        """
        if from_seq is None:
            from_seq = (await self.status(token))["next_seq"]
        if type(from_seq) is not int or from_seq < 1:
            raise ValueError("from_seq must be an integer >= 1 (or None for live frames only)")
        pending = list(pending_input)
        made: list[Session] = []

        def on_reply(link: Link, reply: dict[str, Any]) -> None:
            rw = reply.get("mode") == "rw"
            s = Session(self, reply["session"], token if rw else None, None if rw else token,
                        mode=str(reply.get("mode")), from_seq=from_seq, auto_ack=auto_ack,
                        input_journal=input_journal)
            s.attach_info = {k: v for k, v in reply.items() if k not in ("id", "ok")}
            s._input.log.reset(reply.get("input_seq", 0), pending)
            self._register(s, link, reply)
            made.append(s)

        await self._sup.call("attach", {"token": token, "from": from_seq}, retry=True, on_reply=on_reply)
        s = made[-1]
        if input_journal is not None:
            input_journal.acked(s._input.log.accepted)
        await s._input.flush()
        return s

    # -- the sessions on the connection ---------------------------------------

    @staticmethod
    def _fields(reply: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in reply.items() if k not in ("id", "ok")}

    async def _start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        await self._sup.start(nursery)

    def _wake_sessions(self) -> None:
        for s in list(self._sessions.values()):
            s._changed.notify()

    def _dispatch(self, link: Link, msg: dict[str, Any], size: int) -> None:
        """An event from the reader, for its session (synchronously: a session
        created by an ``execute`` reply exists before its first ``out`` event)."""
        ev = msg["ev"]
        if ev == "queued":
            if self.on_queued is not None and isinstance(msg.get("position"), int):
                self.on_queued(msg["position"])
            return
        sid = msg.get("session")
        s = self._sessions.get(sid) if isinstance(sid, str) else None
        if s is None or s._link is not link:
            if ev == "error":
                log.warning("bento: error from the server%s: %s",
                            f" for session {sid}" if sid else "", msg.get("error"))
            return
        try:
            s._on_event(ev, msg, size)
        except (ValueError, KeyError, TypeError) as exc:
            log.error("bento: malformed %r event for %s ignored: %s", ev, sid, exc)

    def _register(self, s: Session, link: Link, reply: dict[str, Any]) -> None:
        old = self._sessions.get(s.id)
        if old is not None and old is not s:
            old._detached = old._replaced = True
            old._link = None
            old._changed.notify()
        self._sessions[s.id] = s
        s._attached(link, reply)

    async def _restore(self, link: Link) -> tuple[int, int]:
        """Re-attach every session on a new link; re-send input; re-ack.
        Returns (sessions re-attached, inputs re-sent)."""
        sessions = []
        for s in list(self._sessions.values()):
            if s._finished():
                self._sessions.pop(s.id, None)
                continue
            if s.paused:
                s._link = link  # attached again when its reader catches up (Attachment)
                continue
            reply = await s._attachment.reattach(link)
            if reply.get("ok"):
                sessions.append(s)
                continue
            s._attachment.refused(reply)
        resent = 0
        for s in sessions:
            await s._send_ack()
            resent += await s._input.flush()
        return len(sessions), resent

    async def _shutdown(self) -> None:
        """Ack what the user has, close the connection politely (bounded)."""
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            for s in list(self._sessions.values()):
                await s._send_ack()
            await self._sup.close()
        self._sup.stop("the client is closed")


