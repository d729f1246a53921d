"""Bento's Python SDK: a trio-native async client that survives dropped connections.

    async with bento.connect("ws://127.0.0.1:8765/v1", api_key=...) as c:
        s = await c.execute(code_or_function_id_or_callable, *args, **kwargs)
        async for frame in s.output():
            ...
        value = await s.result()

This module speaks the wire protocol (docs: /work/shared/PROTOCOL.md) through
``bento.protocol`` only; it never parses CBOR itself and never imports the
server's internals. The bookkeeping that makes delivery exactly-once is the
pure code in ``bento_clients.positions``; this module is the trio and
WebSocket layer around it:

- one *supervisor* task owns the connection: it connects, says hello,
  re-attaches every session from the last seq it holds + 1, re-sends every
  input not covered by an ``in_ack``, re-acks what the user already has, and
  on a drop does it all again with exponential backoff and full jitter,
  giving up (``ConnectionLost``) after ``reconnect_timeout`` seconds;
- one *reader* task per connection decodes messages and routes replies to
  their requests and events to their sessions (synchronously: a session
  created by an ``execute`` reply exists before its first ``out`` event is
  read);
- a request that is safe to repeat is re-sent after a reconnect; one that is
  not (``signal``, ``state_put``) raises ``RequestInterrupted``.

Cancellation: cancelling a call that already sent its request does not undo
it (as with any dropped connection). Cancelling ``output()``'s ``__anext__``
loses no frame: a frame is handed over only when ``__anext__`` returns it.
"""

from __future__ import annotations

import ast
import inspect
import logging
import os
import random
import re
import ssl
import textwrap
import uuid
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Any, NoReturn, Protocol
from urllib.parse import urlsplit

import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, HandshakeError, wrap_client_stream

import bento
from bento import protocol, tcptune
from bento_clients.convert import parse_buffer, parse_limits
from bento_clients.errors import (
    BentoError,
    ConnectionLost,
    InputClosed,
    NotFound,
    RequestFailed,
    RequestInterrupted,
    SessionGone,
    remote_error,
)
from bento_clients.frames import EOF, Exit, Frame
from bento_clients.positions import InputLog, OutputTracker

__all__ = [
    "DEFAULT_URL",
    "RESERVED_OPTIONS",
    "Client",
    "InputJournal",
    "Session",
    "connect",
    "default_url",
]

log = logging.getLogger("bento.client")

DEFAULT_URL = "ws://127.0.0.1:8765/v1"
CLIENT_NAME = f"bento-python/{bento.__version__}"
# Keyword names of execute() that are options, not the function's kwargs
# (pass a colliding function kwarg through kwargs={...}).
RESERVED_OPTIONS = ("entry", "kwargs", "env", "limits", "buffer", "network", "idempotency_key", "attach")
_FUNCTION_ID = re.compile(r"[0-9a-f]{64}")
_MAX_ITEMS = 4_000_000  # per received message; every item costs at least one byte
_INPUT_OVERHEAD = 1024  # bytes an input message adds around its value


def default_url() -> str:
    """``$BENTO_SERVER`` or ``ws://127.0.0.1:8765/v1``."""
    return os.environ.get("BENTO_SERVER") or DEFAULT_URL


class InputJournal(Protocol):
    """Where a client that must survive its own death records its input (the CLI's
    state file). Called synchronously, before the input is sent / after an ack."""

    def record(self, item: Any, proposed_seq: int) -> tuple[int, list[tuple[int, Any]]]:
        """Persist a new input item (a value or ``EOF``); return its seq (at least
        ``proposed_seq``: another writer may have taken seqs) and the inputs other
        writers recorded for this session that are still pending."""
        ...

    def acked(self, seq: int) -> None:
        """Every input up to ``seq`` is accepted by the server: forget it."""
        ...


class _LinkDied(Exception):
    def __init__(self, sent: bool) -> None:
        super().__init__("the connection dropped")
        self.sent = sent  # False: the message certainly did not leave


class _Permanent(Exception):
    """A connection attempt failed in a way retrying cannot fix."""


class _Slot:
    __slots__ = ("done", "on_reply", "reply")

    def __init__(self, on_reply: Callable[[_Link, dict[str, Any]], None] | None) -> None:
        self.done = trio.Event()
        self.reply: dict[str, Any] | None = None
        self.on_reply = on_reply


class _Link:
    """One WebSocket connection: its pending requests and whether it is dead."""

    def __init__(self, ws: Any, send_timeout: float) -> None:
        self.ws = ws
        self.send_timeout = send_timeout
        self.pending: dict[int, _Slot] = {}
        self.dead = trio.Event()
        self.why = ""
        self.max_message = protocol.DEFAULT_MAX_MESSAGE

    def kill(self, why: str) -> None:
        if self.dead.is_set():
            return
        self.why = why
        self.dead.set()
        for slot in self.pending.values():
            slot.done.set()
        self.pending.clear()

    async def send(self, msg: dict[str, Any]) -> None:
        """Send one message whole. Shielded from cancellation: a send cut in the
        middle would leave half a WebSocket frame on the stream; a send that
        cannot finish within ``send_timeout`` kills the link instead."""
        if self.dead.is_set():
            raise _LinkDied(sent=False)
        data = protocol.encode(msg)
        with trio.CancelScope(shield=True):
            try:
                with trio.fail_after(self.send_timeout):
                    await self.ws.send_message(data)
            except trio.TooSlowError:
                self.kill(f"a send did not finish within {self.send_timeout:g} s")
                raise _LinkDied(sent=True) from None
            except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self.kill(_describe(exc))
                raise _LinkDied(sent=True) from None


class _WatchedStream(trio.abc.Stream):
    """A transport stream that says when it breaks (``broken``)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.broken = trio.Event()

    @property
    def socket(self) -> Any:  # trio-websocket reads it for its endpoint properties
        return tcptune.stream_socket(self.stream)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.broken.set()
            raise

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        try:
            data = await self.stream.receive_some(max_bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.broken.set()
            raise
        if not data:
            self.broken.set()
        return data

    async def aclose(self) -> None:
        self.broken.set()
        await self.stream.aclose()


class _Changed:
    """A level-triggered wake-up: ``wait()`` returns after the next ``notify()``."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = trio.Event()

    async def wait(self) -> None:
        await self._event.wait()


def _describe(exc: BaseException | str) -> str:
    if isinstance(exc, str):
        return exc
    if isinstance(exc, ConnectionRejected):
        return f"the server rejected the WebSocket handshake (HTTP {exc.status_code}); is the path /v1?"
    if isinstance(exc, ConnectionClosed) and exc.reason is not None:
        r = exc.reason
        return f"closed by the server ({r.code}{': ' + r.reason if r.reason else ''})"
    text = str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
    return text


def leaf_exceptions(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, or ``[exc]``."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in leaf_exceptions(e)]
    return [exc]


def _raise_unwrapped(exc: BaseException) -> NoReturn:
    """Raise the single exception inside nested groups (the body's own exception),
    keeping its context; a real group is raised as is."""
    leaves = leaf_exceptions(exc)
    one = leaves[0] if len(leaves) == 1 else exc
    context = one.__context__
    try:
        raise one
    finally:
        one.__context__ = context
        del one, context


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


class Client:
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
        client_name: str = CLIENT_NAME,
    ) -> None:
        self.url = url or default_url()
        parts = urlsplit(self.url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError(f"bad server address {self.url!r}: expected ws://HOST:PORT/v1 or wss://...")
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "wss" else 80)
        self._host_header = parts.netloc.rpartition("@")[2]
        self._resource = (parts.path or "/v1") + (f"?{parts.query}" if parts.query else "")
        self._ssl: ssl.SSLContext | None = None
        if parts.scheme == "wss":
            self._ssl = ssl_context or ssl.create_default_context()
        self.api_key = api_key if api_key is not None else os.environ.get("BENTO_API_KEY") or None
        self.reconnect_timeout = reconnect_timeout
        self.connect_timeout = connect_timeout
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.max_pending_inputs = max_pending_inputs
        self.max_message = max_message
        #: Output received and not read yet, per session, past which its attachment
        #: is paused (see ``Session.paused`` and docs/sdk.md); None: no bound.
        self.max_queued_bytes = max_queued_bytes
        self.client_name = client_name
        #: How many times the connection was restored after a drop.
        self.reconnects = 0
        #: The server's hello reply (``server``, ``node``, ``max_message``).
        self.server_info: dict[str, Any] = {}
        self._sessions: dict[str, Session] = {}
        self._link: _Link | None = None
        self._rid = 0
        self._changed = _Changed()
        self._lost: str | None = None
        self._closing = False
        self._was_connected = False
        self._done = trio.Event()
        self._nursery: trio.Nursery | None = None

    # -- public API ---------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while a connection is up (False while reconnecting)."""
        return self._link is not None and not self._link.dead.is_set()

    async def execute(
        self,
        function: str | Callable[..., Any],
        /,
        *args: Any,
        entry: str | None = None,
        kwargs: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        limits: str | dict[str, Any] | None = None,
        buffer: int | str | dict[str, Any] | None = None,
        network: bool = False,
        idempotency_key: str | None = None,
        attach: bool = True,
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
        ``idempotency_key`` (one is generated when not given, so a retried
        execute after a dropped connection never starts a second function),
        ``attach`` (False: start it and only return the tokens).
        """
        fields: dict[str, Any] = {}
        if callable(function):
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
        if limits:
            fields["limits"] = parse_limits(limits)
        if buffer is not None:
            fields["buffer"] = (parse_buffer(buffer.get("max_bytes"), buffer.get("policy"))
                                if isinstance(buffer, dict) else parse_buffer(buffer))
        protocol.encode(fields)  # a value that cannot travel fails here, with TypeError

        made: list[Session] = []

        def on_reply(link: _Link, reply: dict[str, Any]) -> None:
            s = Session(self, reply["session"], reply["token"], reply.get("viewer_token"), mode="rw")
            if attach:
                self._register(s, link, {"mode": "rw", "input_seq": 0})
            made.append(s)

        await self._call("execute", fields, retry=True, on_reply=on_reply)
        return made[-1]

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

        def on_reply(link: _Link, reply: dict[str, Any]) -> None:
            rw = reply.get("mode") == "rw"
            s = Session(self, reply["session"], token if rw else None, None if rw else token,
                        mode=str(reply.get("mode")), from_seq=from_seq, auto_ack=auto_ack,
                        input_journal=input_journal)
            s.attach_info = {k: v for k, v in reply.items() if k not in ("id", "ok")}
            s._inputs.reset(reply.get("input_seq", 0), pending)
            self._register(s, link, reply)
            made.append(s)

        await self._call("attach", {"token": token, "from": from_seq}, retry=True, on_reply=on_reply)
        s = made[-1]
        if input_journal is not None:
            input_journal.acked(s._inputs.accepted)
        await s._flush_input()
        return s

    async def status(self, token: str) -> dict[str, Any]:
        """The session's status (state, seqs, exit, ...); any token works."""
        return self._fields(await self._call("status", {"token": token}, retry=True))

    async def signal(self, token: str, signal: str = "TERM") -> None:
        """Send INT, TERM or KILL to the function (owner token). Not retried:
        raises ``RequestInterrupted`` if the connection drops meanwhile."""
        await self._call("signal", {"token": token, "signal": signal}, retry=False)

    async def destroy(self, token: str) -> None:
        """Kill the function and delete the session (owner token). Retried after a
        drop; a retry answered ``not_found`` counts as done."""
        await self._call("destroy", {"token": token}, retry=True, done_if_gone=True)

    async def state_get(self, token: str) -> tuple[int, Any]:
        """The session's shared state: ``(version, value)``."""
        r = await self._call("state_get", {"token": token}, retry=True)
        return r["version"], r["value"]

    async def state_put(self, token: str, value: Any, if_version: int | None = None) -> int:
        """Replace the shared state (owner token); returns the new version. With
        ``if_version`` a stale version raises ``Conflict``. Not retried."""
        fields: dict[str, Any] = {"token": token, "value": value}
        if if_version is not None:
            fields["if_version"] = if_version
        return (await self._call("state_put", fields, retry=False))["version"]

    async def list(self) -> list[dict[str, Any]]:
        """The sessions started with this client's API key (all on a keyless server)."""
        return list((await self._call("list", {}, retry=True))["sessions"])

    async def store(self, code: str, name: str = "function") -> str:
        """Store code on the server; returns its function id (content-addressed)."""
        return (await self._call("store", {"name": name, "code": code}, retry=True))["function"]

    async def ping(self) -> None:
        """One round trip to the server."""
        await self._call("ping", {}, retry=True)

    # -- requests -------------------------------------------------------------

    @staticmethod
    def _fields(reply: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in reply.items() if k not in ("id", "ok")}

    async def _live_link(self) -> _Link:
        while True:
            self._check_lost()
            link = self._link
            if link is not None and not link.dead.is_set():
                return link
            await self._changed.wait()

    def _check_lost(self) -> None:
        if self._lost is not None:
            raise ConnectionLost(self._lost)

    async def _request_on(
        self, link: _Link, op: str, fields: dict[str, Any],
        on_reply: Callable[[_Link, dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """One request on one link. Raises _LinkDied if the link dies first."""
        self._rid += 1
        rid = self._rid
        slot = _Slot(on_reply)
        link.pending[rid] = slot
        try:
            await link.send({"op": op, "id": rid, **fields})
            await slot.done.wait()
        finally:
            link.pending.pop(rid, None)
        if slot.reply is None:
            raise _LinkDied(sent=True)
        return slot.reply

    async def _call(
        self, op: str, fields: dict[str, Any], *, retry: bool,
        on_reply: Callable[[_Link, dict[str, Any]], None] | None = None,
        done_if_gone: bool = False,
    ) -> dict[str, Any]:
        """A request that waits for a connection and survives drops where safe."""
        repeated = False
        while True:
            link = await self._live_link()
            try:
                reply = await self._request_on(link, op, fields, on_reply)
            except _LinkDied as died:
                if died.sent and not retry:
                    raise RequestInterrupted(op) from None
                repeated = repeated or died.sent
                continue
            if reply.get("ok"):
                return reply
            err = RequestFailed.from_reply(reply.get("error"), op)
            if done_if_gone and repeated and isinstance(err, NotFound):
                return {"ok": True}
            raise err

    # -- the connection -------------------------------------------------------

    async def _start(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        nursery.start_soon(self._supervise)
        while self._link is None:
            self._check_lost()
            await self._changed.wait()

    async def _supervise(self) -> None:
        """Keep a connection up until the client closes or gives up."""
        try:
            await self._keep_connected()
        finally:
            self._done.set()

    async def _keep_connected(self) -> None:
        ever = False
        attempt = 0
        deadline = trio.current_time() + self.connect_timeout
        while not self._closing:
            connected, why, permanent = await self._run_link(deadline)
            if self._closing:
                return
            if connected:
                ever = True
                attempt = 0
                deadline = trio.current_time() + self.reconnect_timeout
                log.warning("bento: connection to %s lost (%s); reconnecting", self.url, why)
            attempt += 1
            now = trio.current_time()
            if permanent or now >= deadline:
                if ever:
                    self._give_up(f"the connection to {self.url} was lost and could not be restored "
                                  f"within {self.reconnect_timeout:g} s (last error: {why})")
                else:
                    self._give_up(f"cannot connect to {self.url}: {why}")
                return
            delay = random.uniform(0, min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1)))
            await trio.sleep(min(delay, deadline - now))

    def _give_up(self, why: str) -> None:
        self._lost = why
        self._changed.notify()
        for s in list(self._sessions.values()):
            s._changed.notify()

    async def _open_stream(self) -> trio.abc.Stream:
        stream: trio.abc.Stream
        if self._ssl is not None:
            stream = await trio.open_ssl_over_tcp_stream(
                self._host, self._port, ssl_context=self._ssl, https_compatible=True)
        else:
            stream = await trio.open_tcp_stream(self._host, self._port)
        try:
            # A server on this host: no pacing of what we send (bento/tcptune.py).
            tcptune.plain_for_same_host(tcptune.stream_socket(stream))
        except OSError as exc:
            log.debug("could not tune the connection's congestion control: %s", exc)
        return stream

    async def _run_link(self, deadline: float) -> tuple[bool, str, bool]:
        """One connection from connect to drop: (connected, why it ended, permanent)."""
        stream: _WatchedStream | None = None
        link: _Link | None = None
        connected = False
        why = "closed"
        permanent = False
        try:
            async with trio.open_nursery() as ln:
                budget = max(0.5, min(self.connect_timeout, deadline - trio.current_time()))
                with trio.fail_after(budget):
                    stream = _WatchedStream(await self._open_stream())
                    ws = await self._handshake(ln, stream)
                    link = _Link(ws, self.ping_timeout)
                    ln.start_soon(self._reader, link)
                    hello: dict[str, Any] = {"proto": protocol.PROTO_VERSION, "client": self.client_name}
                    if self.api_key:
                        hello["auth"] = self.api_key
                    reply = await self._request_on(link, "hello", hello)
                    if not reply.get("ok"):
                        err = reply.get("error") or {}
                        raise _Permanent(f"the server refused hello: {err.get('message', err)}")
                    self.server_info = self._fields(reply)
                    link.max_message = int(reply.get("max_message") or protocol.DEFAULT_MAX_MESSAGE)
                    restored = await self._restore(link)
                connected = True
                self._link = link
                if self._was_connected:
                    self.reconnects += 1
                    log.warning("bento: reconnected to %s; re-attached %d session(s), re-sent %d input(s)",
                                self.url, *restored)
                self._was_connected = True
                self._changed.notify()
                ln.start_soon(self._pinger, link)
                await link.dead.wait()
                why = link.why
                if self._closing:
                    # A polite close: the WebSocket's own reader (in this nursery)
                    # must still run to see the server's half of the handshake.
                    with trio.move_on_after(1):
                        await ws.aclose()
                ln.cancel_scope.cancel()
        except BaseException as exc:  # noqa: BLE001 - sorted below: only transport failures stay here
            leaves = leaf_exceptions(exc)
            if any(not isinstance(e, Exception | trio.Cancelled) for e in leaves):
                raise
            real = [e for e in leaves if not isinstance(e, trio.Cancelled)]
            if not real:
                raise
            first = real[0]
            if isinstance(first, _LinkDied) and link is not None:
                why = link.why or "the connection dropped"
            elif isinstance(first, trio.TooSlowError):
                why = "timed out"
            else:
                why = _describe(first)
            permanent = isinstance(first, _Permanent | ConnectionRejected)
            if not isinstance(first, OSError | HandshakeError | ConnectionClosed | _LinkDied | _Permanent
                              | trio.TooSlowError | trio.BrokenResourceError | trio.ClosedResourceError):
                log.error("bento: unexpected error on the connection to %s", self.url, exc_info=first)
        finally:
            if link is not None:
                link.kill(why)
                if self._link is link:
                    self._link = None
            if stream is not None:
                with trio.CancelScope(shield=True):
                    await stream.aclose()
        return connected, why, permanent

    async def _handshake(self, ln: trio.Nursery, stream: _WatchedStream) -> Any:
        """The WebSocket opening handshake; fails at once if the stream breaks
        (trio-websocket alone would wait for its handshake forever)."""
        made: list[Any] = []
        async with trio.open_nursery() as hs:
            async def watch() -> None:
                await stream.broken.wait()
                hs.cancel_scope.cancel()

            hs.start_soon(watch)
            made.append(await wrap_client_stream(
                ln, stream, self._host_header, self._resource,  # type: ignore[arg-type]
                max_message_size=self.max_message, receive_buffer_size=64 * 1024))
            hs.cancel_scope.cancel()
        if not made:
            raise trio.BrokenResourceError("the connection broke during the WebSocket handshake")
        return made[0]

    async def _reader(self, link: _Link) -> None:
        try:
            while True:
                raw = await link.ws.get_message()
                if not isinstance(raw, bytes):
                    raise protocol.ProtocolError("the server sent a text message")
                msg = protocol.decode(raw, max_size=self.max_message, max_items=_MAX_ITEMS)
                self._dispatch(link, msg, len(raw))
        except ConnectionClosed as exc:
            link.kill(_describe(exc))
        except protocol.ProtocolError as exc:
            log.error("bento: invalid message from %s: %s", self.url, exc.message)
            link.kill(f"invalid message from the server: {exc.message}")
        finally:
            link.kill("the connection closed")

    def _dispatch(self, link: _Link, msg: dict[str, Any], size: int) -> None:
        ev = msg.get("ev")
        if ev is not None:
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
            return
        rid = msg.get("id")
        slot = link.pending.pop(rid, None) if type(rid) is int else None
        if slot is None:
            return
        slot.reply = msg
        if slot.on_reply is not None and msg.get("ok"):
            slot.on_reply(link, msg)
        slot.done.set()

    async def _pinger(self, link: _Link) -> None:
        while True:
            await trio.sleep(self.ping_interval)
            with trio.move_on_after(self.ping_timeout) as waited:
                try:
                    await self._request_on(link, "ping", {})
                except _LinkDied:
                    return
            if waited.cancelled_caught:
                link.kill(f"no answer to ping within {self.ping_timeout:g} s")
                return

    def _register(self, s: Session, link: _Link, reply: dict[str, Any]) -> None:
        old = self._sessions.get(s.id)
        if old is not None and old is not s:
            old._detached = True
            old._link = None
            old._changed.notify()
        self._sessions[s.id] = s
        s._attached(link, reply)

    async def _restore(self, link: _Link) -> tuple[int, int]:
        """Re-attach every session on a new link; re-send input; re-ack.
        Returns (sessions re-attached, inputs re-sent)."""
        sessions = []
        for s in list(self._sessions.values()):
            if s._finished():
                self._sessions.pop(s.id, None)
                continue
            if s._paused:
                s._link = link  # attached again when its reader catches up (_resume)
                continue
            reply = await s._reattach(link)
            if reply.get("ok"):
                sessions.append(s)
                continue
            s._attach_refused(reply)
        resent = 0
        for s in sessions:
            await s._send_ack()
            resent += await s._flush_input()
        return len(sessions), resent

    async def _shutdown(self) -> None:
        """Ack what the user has, close the connection politely (bounded)."""
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            for s in list(self._sessions.values()):
                await s._send_ack()
            self._closing = True
            link = self._link
            if link is not None:
                link.kill("the client is closing")
            await self._done.wait()
        self._closing = True
        self._give_up("the client is closed")


class _Output:
    """The async iterator ``Session.output()`` returns."""

    def __init__(self, session: Session) -> None:
        self._session = session

    def __aiter__(self) -> _Output:
        return self

    async def __anext__(self) -> Frame:
        s = self._session
        await s._send_ack()  # the user is done with the frames handed so far
        frame = await s._next_frame()
        if frame is None:
            raise StopAsyncIteration
        return frame


class Session:
    """One execution of a function, as seen by this client.

    ``id`` is the public session id; ``token`` the owner token (None when
    attached with a viewer token); ``viewer_token`` the viewer token (None when
    not known: the server hands it out only from ``execute``); ``mode`` is
    "rw" or "ro"; ``shared_state`` the last ``(version, value)`` of the shared
    state this attachment saw (or None)."""

    def __init__(
        self, client: Client, sid: str, token: str | None, viewer_token: str | None, *,
        mode: str, from_seq: int = 1, auto_ack: bool = True, input_journal: InputJournal | None = None,
    ) -> None:
        self._client = client
        self.id = sid
        self.token = token
        self.viewer_token = viewer_token
        self.mode = mode
        self.attach_info: dict[str, Any] = {}
        self.shared_state: tuple[int, Any] | None = None
        self.input_journal = input_journal
        #: Acknowledge each frame once the next is asked for (see ``output``); when
        #: False, nothing is acknowledged but what ``ack()`` is given.
        self.auto_ack = auto_ack
        self._ack_target = from_seq - 1 if auto_ack else 0
        self._out = OutputTracker(from_seq)
        self._queue: deque[tuple[Frame, int]] = deque()  # each with its (estimated) wire bytes
        self._queued_bytes = 0
        #: Paused: more than ``max_queued_bytes`` were waiting to be read, so this
        #: client detached on the server, and drops what still arrives; it attaches
        #: again from the seq after the last one held once the queue is read down
        #: to half. Meanwhile the session's buffer policy applies on the server
        #: (block: the function waits; drop_oldest: a gap), acks and input wait here.
        self._paused = False
        self._pause_done: trio.Event | None = None
        self._resuming = False
        self.pauses = 0
        self.refetched = 0  # frames that arrived while paused: asked for again later
        self._handed = from_seq - 1
        self._ack_sent = 0
        self._exit: Exit | None = None
        self._end: BentoError | None = None
        self._detached = False
        self._link: _Link | None = None
        self._inputs = InputLog()
        self._rechecking = False
        self._input_closed = False  # by close_input()
        self._input_gone = False  # the function ended: no input is taken any more
        self._sent_upto = 0
        self._input_lock = trio.Lock()
        self._changed = _Changed()
        self._consumer: weakref.ref[_Output] | None = None

    def __repr__(self) -> str:
        return f"<bento Session {self.id} {self.mode}>"

    @property
    def _attach_token(self) -> str:
        token = self.token or self.viewer_token
        assert token is not None
        return token

    @property
    def attached(self) -> bool:
        """True while this client holds an attachment (or is restoring one)."""
        return self._client._sessions.get(self.id) is self

    @property
    def exit(self) -> Exit | None:
        """The ``Exit`` frame once it has arrived (even if not read yet)."""
        return self._exit

    @property
    def paused(self) -> bool:
        """True while this session's attachment is paused because more than the
        client's ``max_queued_bytes`` of its output waited to be read; it attaches
        again by itself once that is read down to half."""
        return self._paused

    @property
    def queued(self) -> int:
        """Frames received and not read yet (``output()`` returns them without waiting)."""
        return len(self._queue)

    def statistics(self) -> dict[str, int]:
        """Counters: frames queued (not yet read), duplicates dropped, holes seen,
        inputs pending (sent, not yet acknowledged)."""
        return {"queued": len(self._queue), "queued_bytes": self._queued_bytes, "pauses": self.pauses,
                "refetched": self.refetched,
                "duplicates": self._out.duplicates,
                "holes": self._out.holes, "inputs_pending": len(self._inputs),
                "held_seq": self._out.held, "read_seq": self._handed}

    # -- output -----------------------------------------------------------------

    def output(self) -> _Output:
        """An async iterator over the frames (``Stdout``, ``Stderr``, ``Msg``, ``Gap``,
        ``Exit``), in order, each exactly once across reconnects; it ends after
        ``Exit``. As owner, a frame is acknowledged (so the server may free it)
        when the next one is asked for: a crash while handling a frame never
        loses it. Raises ``SessionGone`` if the session is destroyed first,
        ``ConnectionLost`` if the client gives up."""
        if not self.attached and not self._queue and self._exit is None and self._end is None:
            raise BentoError(f"session {self.id} is not attached (use client.attach(token))")
        it = _Output(self)
        self._consumer = weakref.ref(it)
        return it

    async def _next_frame(self) -> Frame | None:
        while True:
            if self._queue:
                frame, size = self._queue.popleft()
                self._queued_bytes -= size
                self._handed = frame.seq
                self._maybe_resume()
                return frame
            if self._exit is not None and self._handed >= self._exit.seq:
                return None
            if self._end is not None:
                raise self._end
            if self._detached:
                return None
            self._client._check_lost()
            self._maybe_resume()  # (paused again while a resume was on its way)
            await self._changed.wait()

    async def result(self) -> Any:
        """The function's return value, once it has ended.

        Raises ``RemoteError`` (an exception or non-zero exit code), one of its
        subclasses ``SessionKilled`` / ``SessionFailed`` / ``SessionLost``,
        ``SessionGone`` or ``ConnectionLost``. If no ``output()`` iterator is in
        use, the frames not read yet are read and dropped on the way."""
        while True:
            consumer = self._consumer() if self._consumer is not None else None
            if consumer is not None:
                if self._exit is not None:
                    break
                if self._end is not None:
                    raise self._end
                if self._detached:
                    raise BentoError(f"session {self.id} was detached before it ended")
                self._client._check_lost()
                await self._changed.wait()
                continue
            if self._queue:
                self._handed = self._queue[-1][0].seq
                self._queue.clear()
                self._queued_bytes = 0
                self._maybe_resume()
                await self._send_ack()
                continue
            frame = await self._next_frame()
            if frame is None:
                if self._exit is None:
                    raise BentoError(f"session {self.id} was detached before it ended")
                await self._send_ack()
                break
            await self._send_ack()  # dropped, as the user asked for the result only
        assert self._exit is not None
        err = remote_error(self._exit.data())
        if err is not None:
            raise err
        return self._exit.result

    # -- input ------------------------------------------------------------------

    async def send(self, value: Any) -> int:
        """Send one input value to the function (``api.recv()`` returns it); returns
        its seq. It is delivered exactly once even across reconnects. Waits only
        when ``max_pending_inputs`` are unacknowledged. Raises ``InputClosed``
        after ``close_input()``, after the end, or on a read-only attachment."""
        encoded = protocol.encode(value)
        limit = (self._link.max_message if self._link else protocol.DEFAULT_MAX_MESSAGE) - _INPUT_OVERHEAD
        if len(encoded) > limit:
            raise ValueError(f"input of {len(encoded)} bytes is over the server's limit ({limit})")
        return await self._add_input(value)

    async def close_input(self) -> int:
        """Close the function's input (``api.recv()`` then raises EOFError)."""
        return await self._add_input(EOF)

    async def wait_input_acked(self) -> None:
        """Wait until the server has accepted every input sent so far. Raises
        ``InputClosed`` if the function ends first."""
        while len(self._inputs):
            self._check_input(new=False)
            await self._changed.wait()

    def _check_input(self, new: bool) -> None:
        if self.mode != "rw":
            raise InputClosed("a viewer (read-only) attachment cannot send input")
        if self._end is not None:
            raise self._end
        if self._input_gone:
            raise InputClosed(f"session {self.id} has ended: it takes no more input")
        if new and self._input_closed:
            raise InputClosed(f"the input of session {self.id} is closed")
        if self._detached:
            raise InputClosed(f"session {self.id} is detached")
        self._client._check_lost()

    async def _add_input(self, item: Any) -> int:
        self._check_input(new=True)
        while len(self._inputs) >= self._client.max_pending_inputs:
            await self._changed.wait()
            self._check_input(new=True)
        proposed = self._inputs.last + 1
        if self.input_journal is not None:
            seq, others = self.input_journal.record(item, proposed)
            self._inputs.reset(self._inputs.accepted, others)
        else:
            seq = proposed
        self._inputs.add(item, seq)
        if item is EOF:
            self._input_closed = True
        await self._flush_input()
        return seq

    async def _flush_input(self) -> int:
        """Send, in seq order, every pending input not yet sent on this link."""
        sent = 0
        async with self._input_lock:
            link = self._link
            if link is None or self.mode != "rw" or self._paused:
                return 0
            for seq, item in self._inputs.unsent(self._sent_upto):
                msg: dict[str, Any] = {"op": "input", "session": self.id, "seq": seq}
                if item is EOF:
                    msg["eof"] = True
                else:
                    msg["data"] = item
                try:
                    await link.send(msg)
                except _LinkDied:
                    break
                if self._link is not link:
                    break
                self._sent_upto = seq
                sent += 1
        return sent

    async def _resend_later(self, delay: float) -> None:
        await trio.sleep(delay)
        await self._flush_input()

    # -- acks ---------------------------------------------------------------------

    async def ack(self, seq: int) -> None:
        """Acknowledge every frame up to ``seq`` (at most the last one read), so the
        server may free them. Only needed with ``auto_ack`` False: a client that
        must first store what it read somewhere safe (the CLI) acks after that."""
        self._ack_target = max(self._ack_target, min(seq, self._handed))
        await self._send_ack()

    async def _send_ack(self) -> None:
        if self.auto_ack:
            self._ack_target = max(self._ack_target, self._handed)
        seq = self._ack_target
        link = self._link
        if self.mode != "rw" or link is None or seq <= self._ack_sent or self._paused:
            return
        try:
            await link.send({"op": "ack", "session": self.id, "seq": seq})
        except _LinkDied:
            return
        if self._link is link:
            self._ack_sent = max(self._ack_sent, seq)

    def _finished(self) -> bool:
        """Exit read and acknowledged (or read-only and read): nothing left to do."""
        ex = self._exit
        if ex is None or self._handed < ex.seq:
            return False
        return self.mode != "rw" or self._ack_sent >= ex.seq

    # -- events from the reader (synchronous) -------------------------------------

    def _attached(self, link: _Link, reply: dict[str, Any]) -> None:
        # Attached (again): not paused from here on. Set here, in the reader, so that
        # the frames right behind this reply are taken, not dropped as if paused.
        self._paused = False
        self._link = link
        self.mode = str(reply.get("mode", self.mode))
        accepted = reply.get("input_seq", 0)
        self._inputs.reset(accepted if type(accepted) is int else 0)
        self._sent_upto = self._inputs.accepted
        self._ack_sent = 0
        self._changed.notify()

    def _on_event(self, ev: str, msg: dict[str, Any], size: int = 0) -> None:
        if ev == "out":
            if self._paused:
                # Sent before the server had our detach: dropped here, not held, and
                # asked for again (from the seq after the last one held) on resume.
                self.refetched += len(msg["frames"])
                return
            each = max(1, size // max(1, len(msg["frames"])))
            for wire in msg["frames"]:
                try:
                    seq, ch, data = wire
                    frames = self._out.accept(seq, ch, data)
                except (ValueError, TypeError) as exc:
                    log.error("bento: session %s: malformed frame ignored: %s", self.id, exc)
                    continue
                for frame in frames:
                    self._queue.append((frame, each))
                    self._queued_bytes += each
                    if isinstance(frame, Exit):
                        self._exit = frame
                        self._input_gone = True
            self._maybe_pause()
        elif ev == "in_ack":
            seq = msg["seq"]
            if type(seq) is int and self._inputs.ack(seq) and self.input_journal is not None:
                self.input_journal.acked(seq)
        elif ev == "state":
            self.shared_state = (msg["version"], msg.get("value"))
        elif ev == "error":
            self._on_error(msg.get("error") or {})
        self._changed.notify()

    def _on_error(self, error: dict[str, Any]) -> None:
        code = error.get("code")
        if code in ("gone", "not_found"):
            # gone: input after the end, or the session was destroyed (the exit
            # frame tells the first). not_found: the server dropped this
            # attachment (destroyed, or its life ended). Find out which.
            if code == "gone":
                self._input_gone = True
            if self._exit is None and not self._rechecking and not self._paused and self._client._nursery is not None:
                self._rechecking = True
                self._client._nursery.start_soon(self._recheck, code == "not_found")
        elif code == "input_gap":
            # Another writer took seqs we have not seen accepted yet: try again.
            log.warning("bento: session %s: input refused (%s); re-sending", self.id, error.get("message"))
            self._sent_upto = self._inputs.accepted
            if self._client._nursery is not None:
                self._client._nursery.start_soon(self._resend_later, 0.5)
        else:
            log.warning("bento: session %s: error from the server: %s", self.id, error)

    # -- flow control: a reader that falls behind pauses its attachment ----------

    def _maybe_pause(self) -> None:
        limit = self._client.max_queued_bytes
        if (limit is None or self._paused or self._queued_bytes <= limit or self._exit is not None
                or self._link is None or self._client._nursery is None):
            return
        self._paused = True
        self.pauses += 1
        self._pause_done = trio.Event()
        log.info("bento: session %s: %d bytes not read yet; paused until read", self.id, self._queued_bytes)
        self._client._nursery.start_soon(self._detach_for_pause, self._link, self._pause_done)

    async def _detach_for_pause(self, link: _Link, done: trio.Event) -> None:
        try:
            await self._client._request_on(link, "detach", {"session": self.id})
        except _LinkDied:
            pass  # a closed connection detaches too
        finally:
            done.set()

    def _maybe_resume(self) -> None:
        limit = self._client.max_queued_bytes
        if (not self._paused or self._resuming or self._client._nursery is None or self._end is not None
                or self._client._lost is not None or self._client._sessions.get(self.id) is not self
                or (limit is not None and self._queued_bytes > limit // 2)):
            return
        self._resuming = True
        self._client._nursery.start_soon(self._resume)

    async def _resume(self) -> None:
        """Attach again from the seq after the last one held (once the pause's
        detach is answered); then the acks and input held meanwhile go out."""
        try:
            if self._pause_done is not None:
                await self._pause_done.wait()
            while self._client._sessions.get(self.id) is self and self._end is None:
                link = self._link
                if link is None or link.dead.is_set():
                    link = await self._client._live_link()
                    self._link = link
                try:
                    reply = await self._reattach(link)
                except _LinkDied:
                    continue  # the next link, once the client has reconnected
                if not reply.get("ok"):
                    self._attach_refused(reply)
                    return
                await self._send_ack()  # (_attached ended the pause)
                await self._flush_input()
                return
        except BentoError as exc:  # the client gave up: every reader sees it anyway
            log.info("bento: session %s: not resumed: %s", self.id, exc)
        finally:
            self._resuming = False
            self._maybe_resume()  # paused again meanwhile, and already read down
            self._changed.notify()

    async def _recheck(self, reattach: bool) -> None:
        """The session is gone (SessionGone), or our attachment is: attach again."""
        try:
            link = self._link
            await self._client.status(self._attach_token)
            if reattach and link is not None and link is self._link and not link.dead.is_set():
                await self._reattach(link)
                await self._flush_input()
        except NotFound:
            if self._exit is None:
                self._client._sessions.pop(self.id, None)
                self._end_with(SessionGone(f"session {self.id} was destroyed"))
        except (BentoError, _LinkDied):
            pass  # a reconnect re-attaches anyway
        finally:
            self._rechecking = False

    async def _reattach(self, link: _Link) -> dict[str, Any]:
        """Attach again on ``link`` from the seq after the last one held; the reply."""
        def on_reply(link: _Link, reply: dict[str, Any]) -> None:
            if self._client._sessions.get(self.id) is self:
                self._attached(link, reply)

        return await self._client._request_on(
            link, "attach", {"token": self._attach_token, "from": self._out.held + 1}, on_reply)

    def _attach_refused(self, reply: dict[str, Any]) -> None:
        """Attaching again was refused: the session ends with the reason."""
        err = RequestFailed.from_reply(reply.get("error"), "attach")
        if self._client._sessions.get(self.id) is self:
            del self._client._sessions[self.id]
        self._end_with(SessionGone(f"session {self.id} is gone: {err.message}") if isinstance(err, NotFound)
                       else err)

    def _end_with(self, error: BentoError) -> None:
        if self._exit is None:
            self._end = error
        self._link = None
        self._changed.notify()

    # -- control --------------------------------------------------------------------

    async def detach(self) -> None:
        """Stop receiving this session's frames (the function keeps running).
        Frames already read are acknowledged first (owner)."""
        await self._send_ack()
        link = self._link
        self._detached = True
        if self._client._sessions.get(self.id) is self:
            del self._client._sessions[self.id]
        self._link = None
        self._changed.notify()
        if link is not None:
            try:
                await self._client._request_on(link, "detach", {"session": self.id})
            except _LinkDied:
                pass  # a closed connection detaches too

    async def status(self) -> dict[str, Any]:
        """``Client.status`` for this session."""
        return await self._client.status(self._attach_token)

    async def signal(self, signal: str = "TERM") -> None:
        """``Client.signal`` for this session (owner)."""
        await self._client.signal(self._owner_token(), signal)

    async def destroy(self) -> None:
        """``Client.destroy`` for this session (owner)."""
        await self._client.destroy(self._owner_token())

    async def state_get(self) -> tuple[int, Any]:
        """``Client.state_get`` for this session."""
        return await self._client.state_get(self._attach_token)

    async def state_put(self, value: Any, if_version: int | None = None) -> int:
        """``Client.state_put`` for this session (owner)."""
        return await self._client.state_put(self._owner_token(), value, if_version)

    def _owner_token(self) -> str:
        if self.token is None:
            raise BentoError("this needs the owner token; the session was attached with a viewer token")
        return self.token


@asynccontextmanager
async def connect(
    url: str | None = None,
    api_key: str | None = None,
    *,
    reconnect_timeout: float = 60.0,
    connect_timeout: float = 10.0,
    **options: Any,
) -> AsyncIterator[Client]:
    """Connect to a Bento server: ``async with connect(url, api_key=...) as client``.

    ``url`` defaults to ``$BENTO_SERVER`` or ``ws://127.0.0.1:8765/v1``;
    ``api_key`` to ``$BENTO_API_KEY``. The first connection is tried (with
    backoff) for ``connect_timeout`` seconds, then ``ConnectionLost``. A
    dropped connection is restored by itself (backoff with jitter) for up to
    ``reconnect_timeout`` seconds; each drop and each reconnect is logged at
    WARNING on the ``bento.client`` logger. Other options: ``ping_interval``,
    ``ping_timeout``, ``backoff_base``, ``backoff_max``,
    ``max_pending_inputs``, ``max_message``, ``max_queued_bytes`` (unread output
    per session past which its attachment pauses until read; see docs/sdk.md),
    ``ssl_context``, ``client_name``.

    Leaving the block acknowledges the frames read, closes the connection and
    detaches every session; the functions keep running.
    """
    client = Client(url, api_key, reconnect_timeout=reconnect_timeout,
                    connect_timeout=connect_timeout, **options)
    try:
        async with trio.open_nursery() as nursery:
            try:
                await client._start(nursery)
                yield client
            finally:
                await client._shutdown()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        _raise_unwrapped(group)

