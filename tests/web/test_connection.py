"""The page without its connection: it says it is offline or cannot reach the
server, when it tries next, and that it is back; a signal clicked meanwhile
waits for the connection and goes only if the function still runs."""

from __future__ import annotations

import os
import re
import time

from helpers import ServerProcess
from page_helpers import assert_no_page_errors, open_page, start, wait_exit, wait_js, wait_terminal

INTERRUPTIBLE = """
import time

def main():
    print("ready")
    try:
        while True:
            time.sleep(0.05)
    except KeyboardInterrupt:
        return "interrupted"
"""

# Ends when the test creates ``go`` in its home: the test decides when, not a sleep
# that a loaded machine can outrun before the page has seen the server go.
ON_CUE = """
import os, time

def main():
    print("ready")
    while not os.path.exists("go"):
        time.sleep(0.02)
    return "ended on cue"
"""

ATTACHED = "() => window.bentoPage && window.bentoPage.connection() === 'attached'"
WAITING = "() => window.bentoPage.connection() === 'waiting'"
# Counts the page's connection attempts: each is a new WebSocket.
COUNT_SOCKETS = """
window.bentoSockets = 0;
const Native = window.WebSocket;
window.WebSocket = class extends Native {
  constructor(...args) { super(...args); window.bentoSockets += 1; }
};
"""


def test_offline_says_so_with_the_next_try_and_then_that_it_is_back(context, tmp_path):
    context.add_init_script(COUNT_SOCKETS)
    srv = ServerProcess(str(tmp_path / "data")).start()
    try:
        token, _ = start(srv, INTERRUPTIBLE)
        page = open_page(context, srv, token)
        wait_terminal(page, "ready")
        context.set_offline(True)
        srv.kill()  # the exchange lives on; the page's WebSocket drops
        wait_js(page, "() => window.bentoPage.notice().includes('Offline')")
        text = page.inner_text("#notice")
        assert "reconnecting" in text and re.search(r"next try in \d+ s \(at \d\d:\d\d:\d\d\)", text), text
        assert page.inner_text("#conn").startswith("offline")
        before = page.evaluate("() => window.bentoSockets")
        page.wait_for_timeout(5000)
        # The tries back off (0.25, 0.5, 1, 2, 4 s...): a handful, not a loop.
        assert page.evaluate("() => window.bentoSockets") - before <= 6
        srv.start(port=srv.port)
        context.set_offline(False)  # the browser's online event: it tries at once
        wait_js(page, ATTACHED, timeout_ms=5000)
        wait_js(page, "() => window.bentoPage.notice().startsWith('Back online')")
        assert "Offline" not in page.inner_text("#notice")
        # The connection works: a signal goes through.
        page.click("button[data-signal=INT]")
        assert wait_exit(page)["result"] == "interrupted"
        assert_no_page_errors(page, console_errors=True)
    finally:
        srv.stop()


def test_a_server_out_of_reach_says_it_is_reconnecting_and_when(context, tmp_path):
    srv = ServerProcess(str(tmp_path / "data")).start()
    try:
        token, _ = start(srv, INTERRUPTIBLE)
        page = open_page(context, srv, token)
        wait_terminal(page, "ready")
        srv.kill()
        wait_js(page, "() => window.bentoPage.notice().includes('Cannot reach the server')")
        text = page.inner_text("#notice")
        assert "reconnecting" in text and re.search(r"next try in \d+ s", text), text
        srv.start(port=srv.port)
        wait_js(page, ATTACHED, timeout_ms=15000)
        wait_js(page, "() => window.bentoPage.notice().startsWith('Back online')")
        assert "Cannot reach" not in page.inner_text("#notice")
        assert_no_page_errors(page, console_errors=True)
    finally:
        srv.stop()


def test_a_signal_clicked_while_disconnected_goes_once_reconnected(context, tmp_path):
    srv = ServerProcess(str(tmp_path / "data")).start()
    try:
        token, _ = start(srv, INTERRUPTIBLE)
        page = open_page(context, srv, token)
        wait_terminal(page, "ready")
        srv.kill()
        wait_js(page, WAITING)
        # KILL queued then cancelled: it never goes.
        page.click("button[data-signal=KILL]")
        assert "KILL waits for the connection" in page.inner_text("#signals-queued")
        page.click("#signals-cancel")
        assert page.is_hidden("#signals-queued")
        page.click("button[data-signal=INT]")
        assert "INT waits for the connection" in page.inner_text("#signals-queued")
        srv.start(port=srv.port)
        exit_data = wait_exit(page)
        assert (exit_data["state"], exit_data["result"]) == ("exited", "interrupted")
        assert page.is_hidden("#signals-queued")
        assert_no_page_errors(page, console_errors=True)
    finally:
        srv.stop()


def test_a_signal_queued_is_not_sent_once_the_function_has_ended(context, tmp_path):
    srv = ServerProcess(str(tmp_path / "data")).start()
    try:
        token, _ = start(srv, ON_CUE)
        page = open_page(context, srv, token)
        wait_terminal(page, "ready")
        (sid,) = os.listdir(os.path.join(srv.data_dir, "sessions"))
        sdir = os.path.join(srv.data_dir, "sessions", sid)
        srv.kill()
        wait_js(page, WAITING)
        page.click("button[data-signal=TERM]")
        assert "TERM waits for the connection" in page.inner_text("#signals-queued")
        # The function returns while no server runs (its exchange removes env.pid
        # when the environment has ended).
        open(os.path.join(sdir, "work", "go"), "w").close()
        deadline = time.monotonic() + 20
        while os.path.exists(os.path.join(sdir, "env.pid")):
            assert time.monotonic() < deadline, "the function did not end on its cue"
            time.sleep(0.05)
        srv.start(port=srv.port)
        exit_data = wait_exit(page)
        assert (exit_data["state"], exit_data["result"]) == ("exited", "ended on cue")
        wait_js(page, "() => window.bentoPage.notice().includes('TERM not sent')")
        assert page.is_hidden("#signals-queued")
        assert_no_page_errors(page, console_errors=True)
    finally:
        srv.stop()
