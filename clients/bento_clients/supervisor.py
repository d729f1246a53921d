"""The SDK's supervisor: it keeps one link to the server up, and carries
requests over whichever link is up.

- It connects (TCP or TLS, the WebSocket handshake, ``hello``), then lets the
  client restore its sessions on the new link (``on_connected``) before anyone
  else may use it; on a drop it does it all again with exponential backoff and
  full jitter, and gives up (``ConnectionLost``) after ``reconnect_timeout``
  seconds (``connect_timeout`` for the first connection).
- ``call`` sends a request and waits for its reply; a request that is safe to
  repeat is sent again on the next link after a drop, one that is not raises
  ``RequestInterrupted``.

Cancellation: cancelling ``call`` after its request was sent does not undo it
(as with any dropped connection).
"""

from __future__ import annotations

import logging
import random
import ssl
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, HandshakeError

from bento import protocol
from bento_clients.errors import (
    ConnectionLost,
    NotFound,
    RequestFailed,
    RequestInterrupted,
    Unauthorized,
)
from bento_clients.link import (
    Changed,
    Link,
    LinkDied,
    OnMessage,
    OnReply,
    Permanent,
    WatchedStream,
    describe,
    handshake,
    open_stream,
    permanent,
    speaks_tls,
)

__all__ = ["Supervisor", "leaf_exceptions"]

log = logging.getLogger("bento.client")

_TLS_SERVER = "this is a TLS server: use wss://"
_TLS_WATCH_S = 1.0  # no answer to a ws:// handshake this long: is the server speaking TLS?


def leaf_exceptions(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, or ``[exc]``."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in leaf_exceptions(e)]
    return [exc]


def tls_context(ssl_context: ssl.SSLContext | None, ca_file: str | None) -> ssl.SSLContext:
    """The TLS settings for ``wss://``: ``ssl_context`` as given, else the
    system's trusted certificates plus those in ``ca_file`` (PEM)."""
    if ssl_context is not None:
        if ca_file:
            raise ValueError("give ssl_context or ca_file, not both (load the CA file into the context)")
        return ssl_context
    try:
        return ssl.create_default_context(cafile=ca_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot use the CA file {ca_file!r}: {describe(exc)}") from None


class Supervisor:
    """Keeps a link to ``url`` up; see the module's docstring. ``on_connected``
    restores the client's state on a new link and returns (sessions
    re-attached, inputs re-sent); ``on_message`` takes every event; ``on_lost``
    is called once the supervisor gives up."""

    def __init__(
        self,
        url: str,
        api_key: str | None,
        *,
        on_connected: Callable[[Link], Awaitable[tuple[int, int]]],
        on_message: OnMessage,
        on_lost: Callable[[], None],
        reconnect_timeout: float,
        connect_timeout: float,
        ping_interval: float,
        ping_timeout: float,
        backoff_base: float,
        backoff_max: float,
        max_message: int,
        ssl_context: ssl.SSLContext | None,
        ca_file: str | None,
        client_name: str,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError(f"bad server address {url!r}: expected ws://HOST:PORT/v1 or wss://...")
        self.url = url
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "wss" else 80)
        self._host_header = parts.netloc.rpartition("@")[2]
        self._resource = (parts.path or "/v1") + (f"?{parts.query}" if parts.query else "")
        self._ssl = tls_context(ssl_context, ca_file) if parts.scheme == "wss" else None
        self.api_key = api_key
        self.reconnect_timeout = reconnect_timeout
        self.connect_timeout = connect_timeout
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.max_message = max_message
        self.client_name = client_name
        self._on_connected = on_connected
        self._on_message = on_message
        self._on_lost = on_lost
        #: How many times the connection was restored after a drop.
        self.reconnects = 0
        #: The server's hello reply (``server``, ``node``, ``max_message``).
        self.server_info: dict[str, Any] = {}
        #: The link in use (None while reconnecting).
        self.link: Link | None = None
        self.changed = Changed()
        self.lost: str | None = None
        self._closing = False
        self._was_connected = False
        self._done = trio.Event()

    @property
    def connected(self) -> bool:
        return self.link is not None and not self.link.dead.is_set()

    async def start(self, nursery: trio.Nursery) -> None:
        """Start supervising in ``nursery``; returns once connected (or raises
        ``ConnectionLost``)."""
        nursery.start_soon(self._supervise)
        while self.link is None:
            self.check_lost()
            await self.changed.wait()

    async def close(self) -> None:
        """Close the link politely and stop; callers bound the wait."""
        self._closing = True
        link = self.link
        if link is not None:
            link.kill("the client is closing")
        await self._done.wait()

    def stop(self, why: str) -> None:
        """Stop for good (after ``close``, or when ``close`` took too long)."""
        self._closing = True
        self.give_up(why)

    def give_up(self, why: str) -> None:
        self.lost = why
        self.changed.notify()
        self._on_lost()

    def check_lost(self) -> None:
        if self.lost is not None:
            raise ConnectionLost(self.lost)

    async def live_link(self) -> Link:
        """The link in use, once there is one (``ConnectionLost`` if given up)."""
        while True:
            self.check_lost()
            link = self.link
            if link is not None and not link.dead.is_set():
                return link
            await self.changed.wait()

    async def call(
        self, op: str, fields: dict[str, Any], *, retry: bool,
        on_reply: OnReply | None = None, done_if_gone: bool = False,
    ) -> dict[str, Any]:
        """A request that waits for a link and survives drops where safe: its ok
        reply, or the server's error as ``RequestFailed``. With ``done_if_gone``
        a repeated request answered ``not_found`` counts as done."""
        repeated = False
        while True:
            link = await self.live_link()
            try:
                reply = await link.request(op, fields, on_reply)
            except LinkDied as died:
                if died.sent and not retry:
                    raise RequestInterrupted(op) from None
                repeated = repeated or died.sent
                continue
            if reply.get("ok"):
                return reply
            err = RequestFailed.from_reply(reply.get("error"), op)
            if isinstance(err, Unauthorized):
                raise Unauthorized.for_key(op, key_sent=bool(self.api_key), refused=err)
            if done_if_gone and repeated and isinstance(err, NotFound):
                return {"ok": True}
            raise err

    # -- the connection -------------------------------------------------------

    async def _supervise(self) -> None:
        try:
            await self._keep_connected()
        finally:
            self._done.set()

    async def _keep_connected(self) -> None:
        ever = False
        attempt = 0
        deadline = trio.current_time() + self.connect_timeout
        while not self._closing:
            connected, why, hopeless = await self._run_link(deadline)
            if self._closing:
                return
            if connected:
                ever = True
                attempt = 0
                deadline = trio.current_time() + self.reconnect_timeout
                log.warning("bento: connection to %s lost (%s); reconnecting", self.url, why)
            attempt += 1
            now = trio.current_time()
            if hopeless or now >= deadline:
                if ever:
                    self.give_up(f"the connection to {self.url} was lost and could not be restored "
                                 f"within {self.reconnect_timeout:g} s (last error: {why})")
                elif self.url in why:
                    self.give_up(f"cannot connect: {why}")
                else:
                    self.give_up(f"cannot connect to {self.url}: {why}")
                return
            delay = random.uniform(0, min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1)))
            await trio.sleep(min(delay, deadline - now))

    async def _hello(self, link: Link) -> None:
        hello: dict[str, Any] = {"proto": protocol.PROTO_VERSION, "client": self.client_name}
        if self.api_key:
            hello["auth"] = self.api_key
        reply = await link.request("hello", hello)
        if not reply.get("ok"):
            err = reply.get("error") or {}
            raise Permanent(f"the server refused hello: {err.get('message', err)}")
        self.server_info = {k: v for k, v in reply.items() if k not in ("id", "ok")}
        link.max_message = int(reply.get("max_message") or protocol.DEFAULT_MAX_MESSAGE)

    async def _tls_watch(self, stream: WatchedStream, scope: trio.CancelScope) -> None:
        """A ws:// handshake with a TLS server gets no answer: the server waits for
        the rest of what it takes for a TLS record. So when nothing came back
        within a second, ask whether the server speaks TLS, and if so stop."""
        with scope:
            await trio.sleep(_TLS_WATCH_S)
            if not stream.first and await speaks_tls(self._host, self._port):
                raise Permanent(_TLS_SERVER)

    async def _run_link(self, deadline: float) -> tuple[bool, str, bool]:
        """One link from connect to drop: (connected, why it ended, whether retrying is hopeless)."""
        stream: WatchedStream | None = None
        link: Link | None = None
        connected = False
        why = "closed"
        hopeless = False
        try:
            async with trio.open_nursery() as ln:
                budget = max(0.5, min(self.connect_timeout, deadline - trio.current_time()))
                with trio.fail_after(budget):
                    stream = WatchedStream(await open_stream(self._host, self._port, self._ssl))
                    watch = trio.CancelScope()
                    if self._ssl is None:
                        ln.start_soon(self._tls_watch, stream, watch)
                    ws = await handshake(ln, stream, self._host_header, self._resource, self.max_message)
                    watch.cancel()
                    link = Link(ws, self.ping_timeout)
                    ln.start_soon(link.read, self.max_message, self._on_message)
                    await self._hello(link)
                    restored = await self._on_connected(link)
                connected = True
                self.link = link
                if self._was_connected:
                    self.reconnects += 1
                    log.warning("bento: reconnected to %s; re-attached %d session(s), re-sent %d input(s)",
                                self.url, *restored)
                self._was_connected = True
                self.changed.notify()
                ln.start_soon(link.keep_alive, self.ping_interval, self.ping_timeout)
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
            if isinstance(first, LinkDied) and link is not None:
                why = link.why or "the connection dropped"
            elif isinstance(first, trio.TooSlowError):
                why = "timed out"
            elif (self._ssl is None and link is None and stream is not None and not stream.first
                  and stream.broken.is_set() and await speaks_tls(self._host, self._port)):
                why, hopeless = _TLS_SERVER, True
            else:
                why = describe(first, self.url)
            hopeless = hopeless or isinstance(first, Permanent | ConnectionRejected) or permanent(first)
            if not isinstance(first, OSError | HandshakeError | ConnectionClosed | LinkDied | Permanent
                              | trio.TooSlowError | trio.BrokenResourceError | trio.ClosedResourceError):
                log.error("bento: unexpected error on the connection to %s", self.url, exc_info=first)
        finally:
            if link is not None:
                link.kill(why)
                if self.link is link:
                    self.link = None
            if stream is not None:
                with trio.CancelScope(shield=True):
                    await stream.aclose()
        return connected, why, hopeless
