"""Plain HTTP on the WebSocket port: the request head of every connection, and the routes.

Every connection starts with an HTTP/1.1 request; ``read_request`` reads its
head with h11 (at most MAX_HEAD_BYTES; the caller bounds the time). The server
upgrades a request for ``/v1`` to a WebSocket (bento/transport.py); any other
request gets one answer from ``Routes`` and the connection is closed (no
keep-alive):

- ``GET /healthz``: 200 "ok" (the process answers);
- ``GET /readyz``: 200 when the server can take sessions, else 503 and why;
- ``GET /metrics``: Prometheus text (bento/metrics.py); with API keys set,
  only with ``Authorization: Bearer <key>``;
- ``GET /`` and ``GET /static/<name>``: the web page's files, only those found
  directly in ``bento/web/static/`` when the server started;
- anything else: 404, a method other than GET/HEAD 405, a malformed request 400.

It never serves a file by a path the client built: a name is looked up in the
list of files made at start, so no ``..``, encoding or link leads elsewhere.
"""

from __future__ import annotations

import os
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus

import h11
import trio

from bento import auth, events

MAX_HEAD_BYTES = 16 * 1024
RECEIVE_SIZE = 16 * 1024
STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web", "static")
TEXT = "text/plain; charset=utf-8"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".map": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".woff2": "font/woff2",
    ".wasm": "application/wasm",
    ".txt": TEXT,
}
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# Scripts only from this origin; WebSocket connections only back to it
# ('self' covers ws:/wss: to the same host in CSP 3; older browsers need the host).
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
       "connect-src 'self'")
HOST = re.compile(rb"[A-Za-z0-9.:\[\]-]{1,255}")


class BadRequest(Exception):
    """The request head is malformed or too large: answer ``status`` and close."""

    def __init__(self, conn: h11.Connection, status: int, message: str) -> None:
        super().__init__(message)
        self.conn = conn
        self.status = status
        self.message = message


@dataclass
class Answer:
    status: int
    body: bytes
    content_type: str = TEXT
    headers: list[tuple[str, str]] = field(default_factory=list)


def text(status: int, message: str, *headers: tuple[str, str]) -> Answer:
    return Answer(status, message.encode() + b"\n", TEXT, [("cache-control", "no-store"), *headers])


async def read_request(stream: trio.abc.Stream) -> tuple[h11.Connection, h11.Request, bytes] | None:
    """The first request's head, its connection state and the bytes after it;
    None when the stream ends (or breaks, as a failed TLS handshake does)
    before a request. Raises BadRequest for a malformed or oversized head."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
    received = 0
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise BadRequest(conn, exc.error_status_hint, str(exc)) from None
        if isinstance(event, h11.Request):
            trailing = conn.trailing_data[0]
            # h11 bounds a head still incomplete; one that came whole in the last read is checked here.
            if received - len(trailing) > MAX_HEAD_BYTES:
                raise BadRequest(conn, 431, f"the request head is larger than {MAX_HEAD_BYTES} bytes")
            return conn, event, trailing
        if event is not h11.NEED_DATA:
            return None  # ConnectionClosed: the peer went away before asking anything
        try:
            data = await stream.receive_some(RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return None
        received += len(data)
        conn.receive_data(bytes(data))  # b"": the end of the stream


async def write_answer(stream: trio.abc.Stream, conn: h11.Connection, answer: Answer,
                       head_only: bool = False) -> None:
    """Write ``answer`` (without its body for HEAD) and say the connection closes."""
    headers = [
        ("content-type", answer.content_type),
        ("content-length", str(len(answer.body))),
        ("connection", "close"),
        ("x-content-type-options", "nosniff"),
        *answer.headers,
    ]
    data = conn.send(h11.Response(status_code=answer.status, headers=headers,
                                  reason=HTTPStatus(answer.status).phrase.encode()))
    assert data is not None
    if not head_only and answer.body:
        data += conn.send(h11.Data(data=answer.body)) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(data)


def static_files(directory: str) -> dict[str, str]:
    """Name -> path of each regular file directly in ``directory`` with a safe
    name (no link, no sub-directory, no hidden file)."""
    found: dict[str, str] = {}
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return found
    for entry in entries:
        if SAFE_NAME.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            found[entry.name] = entry.path
    return found


class Routes:
    """The answers to plain HTTP requests. ``metrics`` renders the Prometheus
    text; ``ready`` says why the server cannot take sessions (None: it can)."""

    def __init__(self, *, keys: auth.ApiKeys, guesses: auth.GuessLimiter, metrics: Callable[[], bytes],
                 ready: Callable[[], Awaitable[str | None]], static_dir: str = STATIC_DIR) -> None:
        self.keys = keys
        self.guesses = guesses
        self.metrics = metrics
        self.ready = ready
        self.static = static_files(static_dir)

    async def answer(self, request: h11.Request, peer: str) -> Answer:
        path = request.target.split(b"?", 1)[0]
        if request.method not in (b"GET", b"HEAD"):
            return text(405, "only GET and HEAD are answered here", ("allow", "GET, HEAD"))
        if path == b"/healthz":
            return text(200, "ok")
        if path == b"/readyz":
            why = await self.ready()
            return text(200, "ready") if why is None else text(503, f"not ready: {why}")
        if path == b"/metrics":
            return self._metrics(request, peer)
        if path == b"/":
            return await self._file("index.html", request)
        if path.startswith(b"/static/"):
            return await self._file(path[len(b"/static/"):].decode("latin-1"), request)
        return text(404, "not found: Bento answers /v1 (WebSocket), /, /static/, "
                         "/healthz, /readyz and /metrics")

    def _metrics(self, request: h11.Request, peer: str) -> Answer:
        if self.keys.required:
            if not self.guesses.allowed(peer):
                events.refused("rate_limit", peer, path="/metrics")
                return text(429, "too many wrong keys from this host; slow down", ("retry-after", "5"))
            presented = bearer(request)
            if presented is None or self.keys.check(presented) is None:
                if presented is not None:
                    self.guesses.failed(peer)
                    events.refused("bad_key", peer, path="/metrics")
                return text(401, "this server needs an API key: Authorization: Bearer <key>",
                            ("www-authenticate", 'Bearer realm="bento"'))
        return Answer(200, self.metrics(), "text/plain; version=0.0.4; charset=utf-8",
                      [("cache-control", "no-store")])

    async def _file(self, name: str, request: h11.Request) -> Answer:
        path = self.static.get(name)
        if path is None:
            return text(404, f"no such file: {name[:64]!r}")
        try:
            body = await trio.Path(path).read_bytes()
        except OSError as exc:
            return text(500, f"cannot read {name}: {exc.strerror}")
        content_type = CONTENT_TYPES.get(os.path.splitext(name)[1].lower(), "application/octet-stream")
        return Answer(200, body, content_type, [
            ("cache-control", "no-cache"),
            ("content-security-policy", csp(request)),
            ("referrer-policy", "no-referrer"),
        ])


def bearer(request: h11.Request) -> str | None:
    for name, value in request.headers:
        if name == b"authorization":
            scheme, _, key = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and key.strip():
                return key.strip()
    return None


def csp(request: h11.Request) -> str:
    """The page's Content-Security-Policy, naming this host for WebSocket
    connections when the request's Host header is a plain host name."""
    for name, value in request.headers:
        if name == b"host" and HOST.fullmatch(value):
            host = value.decode()
            return f"{CSP} ws://{host} wss://{host}"
    return CSP
