"""The blocking facade of the SDK, for plain scripts and threads.

    import bento_clients
    with bento_clients.sync.connect(url) as c:
        s = c.execute(fn, 1, 2)
        for frame in s.output():
            ...
        print(s.result())

Same shape as the async SDK (``bento_clients.sdk``), same guarantees
(reconnects, exactly-once output and input). Each ``SyncClient`` runs
``trio.run`` in one dedicated thread that holds the async client; every call
is handed to it with a ``trio.from_thread`` portal and blocks the calling
thread until done. Any number of threads may share one client. ``close()``
(or leaving the ``with`` block, or interpreter exit) closes the connection and
joins the thread: no thread is left behind.

Never call this facade from inside a trio run (use the async SDK there).
"""

from __future__ import annotations

import atexit
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import trio

from bento_clients import sdk
from bento_clients.errors import ConnectionLost
from bento_clients.frames import Exit, Frame

__all__ = ["SyncClient", "SyncSession", "connect"]

T = TypeVar("T")
_CLOSE_TIMEOUT_S = 10.0


class SyncClient:
    """A blocking Bento client; see ``connect``."""

    def __init__(self, url: str | None = None, api_key: str | None = None, *,
                 call_timeout: float | None = None, **options: Any) -> None:
        #: Every blocking call gives up after this many seconds (``TimeoutError``);
        #: None waits as long as the connection lives. A ``timeout=`` argument wins.
        self.call_timeout = call_timeout
        self._closed_event: trio.Event | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._client: sdk.Client | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(url, api_key, options), name="bento-sync-client", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            error, self._error = self._error, None
            raise error
        atexit.register(_close_at_exit, weakref.ref(self))

    def _run(self, url: str | None, api_key: str | None, options: dict[str, Any]) -> None:
        async def main() -> None:
            try:
                async with sdk.connect(url, api_key, **options) as client:
                    self._client = client
                    self._closed_event = trio.Event()
                    self._token = trio.lowlevel.current_trio_token()
                    self._ready.set()
                    await self._closed_event.wait()
            except BaseException as exc:  # noqa: BLE001 - handed to the thread that asked
                if self._ready.is_set():
                    raise
                self._error = exc
            finally:
                self._ready.set()

        try:
            trio.run(main)
        except BaseException:  # noqa: BLE001 - the thread must end quietly; errors reach callers
            pass

    # -- plumbing -------------------------------------------------------------

    def _call(self, fn: Callable[..., Any], *args: Any, timeout: float | None = None) -> Any:
        """Run ``await fn(*args)`` in the client's trio thread and wait for it."""
        token = self._token
        if token is None or not self._thread.is_alive():
            raise ConnectionLost("the client is closed")

        if timeout is None:
            timeout = self.call_timeout

        async def run() -> Any:
            if timeout is None:
                return await fn(*args)
            with trio.fail_after(timeout):
                return await fn(*args)

        try:
            return trio.from_thread.run(run, trio_token=token)
        except trio.RunFinishedError:
            raise ConnectionLost("the client is closed") from None
        except trio.TooSlowError:
            raise TimeoutError(f"no answer within {timeout} s") from None

    def _call_sync(self, fn: Callable[..., T], *args: Any) -> T:
        token = self._token
        if token is None or not self._thread.is_alive():
            raise ConnectionLost("the client is closed")
        try:
            return trio.from_thread.run_sync(fn, *args, trio_token=token)
        except trio.RunFinishedError:
            raise ConnectionLost("the client is closed") from None

    @property
    def client(self) -> sdk.Client:
        """The async client underneath (only for use from its own thread)."""
        assert self._client is not None
        return self._client

    @property
    def reconnects(self) -> int:
        """How many times the connection was restored after a drop."""
        return self.client.reconnects

    # -- the API (same names as sdk.Client) ---------------------------------

    def execute(self, function: str | Callable[..., Any] | None = None, /, *args: Any,
                **options: Any) -> SyncSession:
        """``sdk.Client.execute``: run a function; returns its session."""
        c = self.client
        s = self._call(lambda: c.execute(function, *args, **options))
        return SyncSession(self, s)

    def attach(self, token: str, from_seq: int | None = 1, *, auto_ack: bool = True,
               pending_input: Iterable[tuple[int, Any]] = ()) -> SyncSession:
        """``sdk.Client.attach``: attach to a session by its token."""
        c = self.client
        pending = list(pending_input)
        s = self._call(lambda: c.attach(token, from_seq, auto_ack=auto_ack, pending_input=pending))
        return SyncSession(self, s)

    def status(self, token: str) -> dict[str, Any]:
        """``sdk.Client.status``."""
        return self._call(self.client.status, token)

    def signal(self, token: str, signal: str = "TERM") -> None:
        """``sdk.Client.signal``."""
        self._call(self.client.signal, token, signal)

    def destroy(self, token: str) -> None:
        """``sdk.Client.destroy``."""
        self._call(self.client.destroy, token)

    def state_get(self, token: str) -> tuple[int, Any]:
        """``sdk.Client.state_get``."""
        return self._call(self.client.state_get, token)

    def state_put(self, token: str, value: Any, if_version: int | None = None) -> int:
        """``sdk.Client.state_put``."""
        return self._call(self.client.state_put, token, value, if_version)

    def share(self, token: str, viewer: str) -> str | None:
        """``sdk.Client.share``."""
        return self._call(self.client.share, token, viewer)

    def download(self, token: str, path: str) -> bytes:
        """``sdk.Client.download``."""
        return self._call(self.client.download, token, path)

    def upload(self, token: str, path: str, data: bytes) -> None:
        """``sdk.Client.upload``."""
        self._call(self.client.upload, token, path, data)

    @property
    def connected(self) -> bool:
        """``sdk.Client.connected``."""
        return self.client.connected

    @property
    def server_info(self) -> dict[str, Any]:
        """``sdk.Client.server_info``."""
        return self.client.server_info

    @property
    def on_queued(self) -> Callable[[int], None] | None:
        """``sdk.Client.on_queued`` (called in the client's own thread)."""
        return self.client.on_queued

    @on_queued.setter
    def on_queued(self, hook: Callable[[int], None] | None) -> None:
        self.client.on_queued = hook

    def list(self) -> list[dict[str, Any]]:
        """``sdk.Client.list``."""
        return self._call(self.client.list)

    def store(self, code: str, name: str = "function") -> str:
        """``sdk.Client.store``."""
        return self._call(self.client.store, code, name)

    def ping(self) -> None:
        """``sdk.Client.ping``."""
        self._call(self.client.ping)

    def close(self) -> None:
        """Close the connection and end the client's thread (idempotent). Sessions
        keep running on the server."""
        if self._thread.is_alive() and self._token is not None and self._closed_event is not None:
            try:
                trio.from_thread.run_sync(self._closed_event.set, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        if self._thread is not threading.current_thread():
            self._thread.join(_CLOSE_TIMEOUT_S)

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _close_at_exit(ref: weakref.ref[SyncClient]) -> None:
    client = ref()
    if client is not None:
        client.close()


class SyncSession:
    """A session seen through a ``SyncClient`` (``sdk.Session``, blocking)."""

    def __init__(self, client: SyncClient, session: sdk.Session) -> None:
        self._client = client
        self._session = session

    def __repr__(self) -> str:
        return f"<bento SyncSession {self.id} {self.mode}>"

    @property
    def id(self) -> str:
        return self._session.id

    @property
    def token(self) -> str | None:
        return self._session.token

    @property
    def viewer_token(self) -> str | None:
        return self._session.viewer_token

    @property
    def mode(self) -> str:
        return self._session.mode

    @property
    def exit(self) -> Exit | None:
        return self._session.exit

    @property
    def shared_state(self) -> tuple[int, Any] | None:
        return self._session.shared_state

    @property
    def paused(self) -> bool:
        return self._session.paused

    def statistics(self) -> dict[str, int]:
        """``sdk.Session.statistics``, read in the client's thread."""
        return self._client._call_sync(self._session.statistics)

    def output(self, timeout: float | None = None) -> Iterator[Frame]:
        """The frames, in order, each once (see ``sdk.Session.output``). ``timeout``
        bounds the wait for each frame (``TimeoutError``)."""
        it = self._client._call_sync(self._session.output)
        while True:
            try:
                frame = self._client._call(it.__anext__, timeout=timeout)
            except StopAsyncIteration:
                return
            yield frame

    def result(self, timeout: float | None = None) -> Any:
        """The return value (see ``sdk.Session.result``); ``TimeoutError`` after ``timeout`` s."""
        return self._client._call(self._session.result, timeout=timeout)

    def send(self, value: Any) -> int:
        """Send one input value; returns its seq."""
        return self._client._call(self._session.send, value)

    def close_input(self) -> int:
        """Close the function's input."""
        return self._client._call(self._session.close_input)

    def write_stdin(self, data: bytes | str) -> int:
        """Write to the function's standard input; returns its seq."""
        return self._client._call(self._session.write_stdin, data)

    def close_stdin(self) -> int:
        """Close the function's standard input."""
        return self._client._call(self._session.close_stdin)

    def resize(self, rows: int, cols: int) -> None:
        """A terminal session's new window size."""
        self._client._call(self._session.resize, rows, cols)

    @property
    def auto_ack(self) -> bool:
        return self._session.auto_ack

    @property
    def queued(self) -> int:
        return self._session.queued

    def ack(self, seq: int) -> None:
        """``sdk.Session.ack``: frames up to ``seq`` are safely handled (with ``auto_ack`` False)."""
        self._client._call(self._session.ack, seq)

    def download(self, path: str) -> bytes:
        """A file of the session's work dir."""
        return self._client._call(self._session.download, path)

    def upload(self, path: str, data: bytes) -> None:
        """A file into the running session's work dir."""
        self._client._call(self._session.upload, path, data)

    def wait_input_acked(self, timeout: float | None = None) -> None:
        """Wait until the server accepted every input sent so far."""
        self._client._call(self._session.wait_input_acked, timeout=timeout)

    def detach(self) -> None:
        """Stop receiving this session's frames (the function keeps running)."""
        self._client._call(self._session.detach)

    def status(self) -> dict[str, Any]:
        return self._client._call(self._session.status)

    def signal(self, signal: str = "TERM") -> None:
        self._client._call(self._session.signal, signal)

    def destroy(self) -> None:
        self._client._call(self._session.destroy)

    def state_get(self) -> tuple[int, Any]:
        return self._client._call(self._session.state_get)

    def state_put(self, value: Any, if_version: int | None = None) -> int:
        return self._client._call(self._session.state_put, value, if_version)


def connect(url: str | None = None, api_key: str | None = None, *,
            call_timeout: float | None = None, ca_file: str | None = None, **options: Any) -> SyncClient:
    """A blocking client (same options as ``bento_clients.connect``, ``ca_file``
    included, plus ``call_timeout``: a bound in seconds on every blocking call).
    Use it as a context manager or call ``close()``; it is also closed at
    interpreter exit."""
    return SyncClient(url, api_key, call_timeout=call_timeout, ca_file=ca_file, **options)

