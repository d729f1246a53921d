"""Helpers of the browser tests: open the Bento page of a real server in Debian's
chromium (Playwright's sync API), start sessions with the SDK, and read what the
page shows through its test hook ``window.bentoPage`` (the terminal's buffer,
the seqs shown, the connection), never through pixels.

Every page records its uncaught errors and its console; ``assert_no_page_errors``
fails a test on an uncaught error or a console error (a refused script, a style
the server's Content-Security-Policy blocks, a WebSocket that failed).
"""

from __future__ import annotations

import os
import time
from typing import Any

import cbor2
from bento_clients import sync
from bento_clients.errors import NotFound
from helpers import ServerProcess

CHROMIUM = os.environ.get("BENTO_CHROMIUM", "/usr/bin/chromium")
WAIT_MS = 20_000


def origin(server: ServerProcess) -> str:
    return f"http://127.0.0.1:{server.port}"


class PageErrors:
    """Uncaught errors of one page (``pageerror``), to assert there were none, and
    its console, to say what happened when a wait times out."""

    def __init__(self, page: Any) -> None:
        self.errors: list[str] = []
        self.console: list[str] = []
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        page.on("console", lambda msg: self.console.append(f"{msg.type}: {msg.text}"))


def describe(page: Any) -> str:
    """What the page says about itself, for a failed wait's message."""
    try:
        said = page.evaluate("""() => ({notice: document.getElementById('notice').textContent,
            connection: document.getElementById('conn').textContent,
            terminal: window.bentoPage ? window.bentoPage.terminalText().slice(-2000) : null,
            seqs: window.bentoPage ? window.bentoPage.seqs().slice(-50) : null,
            held: window.bentoPage ? window.bentoPage.held() : null,
            persistent: window.bentoPage ? window.bentoPage.persistent() : null})""")
    except Exception as exc:  # the page itself may be what broke
        said = f"(cannot read the page: {exc})"
    return f"page: {said}; errors: {page.bento_errors.errors}; console: {page.bento_errors.console[-20:]}"


def open_page(context: Any, server: ServerProcess, token: str = "", extra: str = "") -> Any:
    """A new page of ``context`` at ``/#t=<token>`` (just ``/`` without a token)."""
    page = context.new_page()
    page.bento_errors = PageErrors(page)
    fragment = f"#t={token}{extra}" if token else ""
    page.goto(origin(server) + "/" + fragment)
    return page


def wait_js(page: Any, expression: str, arg: Any = None, timeout_ms: int = WAIT_MS) -> Any:
    """Wait until ``expression`` (a JS function of ``arg``) is truthy; returns its value."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        handle = page.wait_for_function(expression, arg=arg, timeout=timeout_ms)
    except PlaywrightTimeout:
        raise AssertionError(f"waited {timeout_ms} ms for {expression} ({arg!r}); "
                             f"{describe(page)}") from None
    value = handle.json_value()
    handle.dispose()
    return value


def terminal_lines(page: Any) -> list[str]:
    page.evaluate("() => window.bentoPage.flushed()")
    return page.evaluate("() => window.bentoPage.terminalText()").split("\n")


def wait_terminal(page: Any, text: str, timeout_ms: int = WAIT_MS) -> None:
    """Wait until the terminal shows ``text`` somewhere."""
    wait_js(page, "(t) => window.bentoPage && window.bentoPage.terminalText().includes(t)", text,
            timeout_ms)


def wait_exit(page: Any, timeout_ms: int = WAIT_MS) -> dict:
    return wait_js(page, "() => window.bentoPage && window.bentoPage.exit()", None, timeout_ms)


def send_input(page: Any, text: str) -> None:
    """Type ``text`` into the owner's input line and send it."""
    page.wait_for_selector("#input-line:enabled", timeout=WAIT_MS)
    page.fill("#input-line", text)
    page.click("#input-form button[type=submit]")


def seqs(page: Any) -> list[int]:
    return page.evaluate("() => window.bentoPage.seqs()")


def assert_no_page_errors(*pages: Any, console_errors: bool = False) -> None:
    """No uncaught error on any page, and no console error unless ``console_errors``
    (a test that cuts connections expects the browser to log failed WebSockets)."""
    for page in pages:
        assert page.bento_errors.errors == [], page.bento_errors.errors
        if not console_errors:
            logged = [line for line in page.bento_errors.console if line.startswith("error")]
            assert logged == [], logged


def assert_seqs_once(shown: list[int]) -> None:
    """Every seq from 1 up, each once: nothing shown twice, nothing skipped."""
    assert shown == list(range(1, len(shown) + 1)), shown


def start(server: ServerProcess, code: str, *args: Any, **options: Any) -> tuple[str, str]:
    """Run ``code`` (entry ``main``) without attaching; returns (owner token, viewer token)."""
    with sync.connect(server.url, call_timeout=20) as client:
        session = client.execute(code, *args, attach=False, **options)
        assert session.token is not None and session.viewer_token is not None
        return session.token, session.viewer_token


def wait_gone(server: ServerProcess, token: str, timeout_s: float = 15) -> None:
    """Wait until the server no longer knows ``token`` (the session ended)."""
    deadline = time.monotonic() + timeout_s
    with sync.connect(server.url, call_timeout=20) as client:
        while True:
            try:
                client.status(token)
            except NotFound:
                return
            assert time.monotonic() < deadline, f"the session of {token[:8]}… still exists"
            time.sleep(0.2)


def status(server: ServerProcess, token: str) -> dict[str, Any]:
    with sync.connect(server.url, call_timeout=20) as client:
        return client.status(token)


class WireTap:
    """Every WebSocket the pages of ``context`` open goes through here (Playwright's
    ``route_web_socket``): each request a page sends is recorded (its CBOR map),
    and requests whose op is in ``hold`` wait until ``release`` sends them on.
    The server's replies to requests whose op is in ``hold_replies`` wait until
    ``release_replies`` passes them to the page; its other messages reach the
    page untouched."""

    def __init__(self, context: Any, hold: tuple[str, ...] = (), hold_replies: tuple[str, ...] = ()) -> None:
        self.sent: list[dict] = []
        self.hold = set(hold)
        self.held: list[tuple[Any, bytes]] = []
        self.hold_replies = set(hold_replies)
        self.held_replies: list[tuple[Any, bytes]] = []
        context.route_web_socket("**/v1", self._route)

    def _route(self, ws: Any) -> None:
        server = ws.connect_to_server()
        reply_ids: set[int] = set()  # of the requests whose replies are held

        def from_page(message: str | bytes) -> None:
            msg = cbor2.loads(message) if isinstance(message, bytes) else {}
            self.sent.append(msg)
            if msg.get("op") in self.hold_replies:
                reply_ids.add(msg.get("id"))
            if msg.get("op") in self.hold:
                self.held.append((server, message))
            else:
                server.send(message)

        def from_server(message: str | bytes) -> None:
            msg = cbor2.loads(message) if isinstance(message, bytes) else {}
            if isinstance(msg, dict) and "ev" not in msg and msg.get("id") in reply_ids:
                self.held_replies.append((ws, message))
            else:
                ws.send(message)

        ws.on_message(from_page)
        if self.hold_replies:
            server.on_message(from_server)

    def ops(self) -> list[str]:
        return [m["op"] for m in self.sent if "op" in m]

    def release(self) -> None:
        """Sends what was held, in order, and holds nothing more."""
        self.hold.clear()
        for server, message in self.held:
            server.send(message)
        self.held.clear()

    def release_replies(self) -> int:
        """Passes the held replies to the page, in order, and holds no more; how many."""
        self.hold_replies.clear()
        held, self.held_replies = self.held_replies, []
        for ws, message in held:
            ws.send(message)
        return len(held)
