"""What an owner does from the page: input exactly once across a server killed
with kill -9 and a reload, run a function from the editor, signal, destroy;
and the picture of the page that the README shows."""

from __future__ import annotations

import os
from typing import Any

import pytest
from bento_clients.errors import NotFound
from helpers import ServerProcess
from page_helpers import (
    assert_no_page_errors,
    assert_seqs_once,
    open_page,
    send_input,
    seqs,
    start,
    status,
    terminal_lines,
    wait_exit,
    wait_js,
    wait_terminal,
)

ECHO = """
def main():
    count = 0
    while True:
        try:
            value = api.recv()
        except EOFError:
            return count
        count += 1
        print(f"got {value!r}")
"""

def run_from_editor(page: Any, code: str | None = None, args: str | None = None,
                    key: str | None = None) -> None:
    """Fill what is given into *Run a function*, and run it."""
    if not page.is_visible("#run-code"):
        page.click("#run summary")
    for selector, value in (("#run-code", code), ("#run-args", args), ("#run-key", key)):
        if value is not None:
            page.fill(selector, value)
    page.evaluate("() => { document.getElementById('run-result').textContent = ''; }")
    page.click("#run-form button[type=submit]")


def refusal(page: Any) -> str:
    """The editor's message after it refused to run ("Not run: ...")."""
    page.wait_for_selector("#run-result:has-text('Not run')")
    return page.inner_text("#run-result")


CONNECTED = "() => window.bentoPage && window.bentoPage.connection() === 'attached'"


def test_owner_input_arrives_exactly_once_across_a_forced_reconnect(context, tmp_path):
    srv = ServerProcess(str(tmp_path / "data")).start()
    try:
        token, _ = start(srv, ECHO)
        page = open_page(context, srv, token)
        send_input(page, "a")
        wait_terminal(page, "got 'a'")
        srv.kill()  # SIGKILL: the exchange lives on, the page's WebSocket drops
        wait_js(page, "() => window.bentoPage.connection() === 'waiting'")
        send_input(page, "b")  # recorded in the store, sent after the reconnect
        wait_js(page, "() => window.bentoPage.input().pending === 1")
        page.close()  # the tab closes with "b" unacknowledged
        srv.start(port=srv.port)
        page = open_page(context, srv, token)
        wait_terminal(page, "got 'b'")
        wait_js(page, "() => window.bentoPage.input().pending === 0")
        send_input(page, "c")
        wait_terminal(page, "got 'c'")
        page.reload()
        wait_js(page, CONNECTED)
        page.click("#eof")
        assert wait_exit(page)["result"] == 3
        assert terminal_lines(page) == ["got 'a'", "got 'b'", "got 'c'"]
        assert_seqs_once(seqs(page))
        assert status(srv, token)["input_seq"] == 4  # a, b, c and the EOF
        assert_no_page_errors(page, console_errors=True)
    finally:
        srv.stop()


INTERRUPTIBLE = """
import time

def main(n):
    print(f"hello {n}")
    try:
        while True:
            time.sleep(0.05)
    except KeyboardInterrupt:
        print("interrupted")
        return n
"""


def test_run_from_the_editor_then_signal_and_destroy(browser, context, server):
    page = open_page(context, server)
    run_from_editor(page, code=INTERRUPTIBLE, args="[7]")
    wait_js(page, CONNECTED)
    token = page.evaluate("() => new URLSearchParams(location.hash.slice(1)).get('t')")
    assert token.startswith("bto_")
    assert page.evaluate("() => window.bentoPage.mode()") == "rw"
    viewer_link = page.input_value("#viewer-link")
    assert "#t=btv_" in viewer_link
    wait_terminal(page, "hello 7")
    page.click("button[data-signal=INT]")
    exit_data = wait_exit(page)
    assert (exit_data["state"], exit_data["code"], exit_data["result"]) == ("exited", 0, 7)
    assert terminal_lines(page) == ["hello 7", "interrupted"]

    viewer_ctx = browser.new_context()
    try:
        viewer = open_page(viewer_ctx, server, viewer_link.split("#t=", 1)[1])
        wait_exit(viewer)
        page.on("dialog", lambda dialog: dialog.accept())
        page.click("#destroy")
        wait_js(page, "() => window.bentoPage.notice().startsWith('Session destroyed')")
        with pytest.raises(NotFound):
            status(server, token)
        # The viewer's next status poll finds the session gone.
        wait_js(viewer, "() => window.bentoPage.connection() === 'stopped'")
        assert "no longer has this session" in viewer.inner_text("#notice")
    finally:
        viewer_ctx.close()
    assert_no_page_errors(page)


def test_run_with_an_api_key(context, make_server):
    srv = make_server("--api-key", "k-web-test")
    page = open_page(context, srv)
    run_from_editor(page, code="def main():\n    print('keyed')\n")
    assert "needs an API key" in refusal(page)
    run_from_editor(page, key="k-web-test")
    wait_terminal(page, "keyed")
    wait_exit(page)
    assert_no_page_errors(page)


def test_run_refuses_bad_arguments_with_a_clear_message(context, server):
    page = open_page(context, server)
    run_from_editor(page, args="{not json")
    assert "JSON" in refusal(page)
    assert page.evaluate("() => location.hash") == ""
    assert_no_page_errors(page)


SHOWCASE = r"""
import sys, time

def main(steps):
    api.state.put({"phase": "training", "best": 0.42})
    print("\x1b[1;36mbento\x1b[0m: fitting a model on \x1b[33m3 shards\x1b[0m")
    for step in range(1, steps + 1):
        width = step * 20 // steps
        sys.stdout.write(f"\r[{'#' * width}{'.' * (20 - width)}] {step * 100 // steps:3d}%")
        sys.stdout.flush()
        api.send({"step": step, "loss": round(1 / step, 3)})
        time.sleep(0.02)
    print()
    print("\x1b[32mdone\x1b[0m, \x1b[31m1 warning\x1b[0m")
    sys.stderr.write("warning: shard 2 was small\n")
    return {"loss": 0.1, "steps": steps}
"""


def test_screenshot_of_the_page(context, server, tmp_path):
    """The picture in the README: set BENTO_SCREENSHOT=docs/page.png to write it there."""
    token, viewer = start(server, SHOWCASE, 10)
    page = open_page(context, server, token, extra=f"&v={viewer}")
    wait_exit(page)
    wait_js(page, "() => { const s = window.bentoPage.status(); return s && s.state === 'exited'"
                  " && s.acked_seq === s.next_seq - 1 && window.bentoPage.messages().length === 10; }")
    assert terminal_lines(page) == ["bento: fitting a model on 3 shards", "[####################] 100%",
                                    "done, 1 warning", "warning: shard 2 was small"]
    path = os.environ.get("BENTO_SCREENSHOT") or str(tmp_path / "page.png")
    page.screenshot(path=path, full_page=True)
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert_no_page_errors(page)
