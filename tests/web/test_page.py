"""The Bento page in a real browser against a real server: output with its
backlog, terminal rendering, reloads, tokens, two pages on one session."""

from __future__ import annotations

import json

from bento_clients import sync
from page_helpers import (
    assert_no_page_errors,
    assert_seqs_once,
    open_page,
    origin,
    send_input,
    seqs,
    start,
    status,
    terminal_lines,
    wait_exit,
    wait_gone,
    wait_js,
    wait_terminal,
)

BACKLOG_THEN_LIVE = """
import time

def main(backlog, live):
    for i in range(backlog):
        print(f"backlog {i}")
    api.send({"kind": "backlog done", "count": backlog})
    api.recv()  # the test says when the page is open
    for i in range(live):
        print(f"live {i}")
        time.sleep(0.05)
    api.send(["a", "list", 3])
    return {"lines": backlog + live}
"""


def test_viewer_sees_backlog_then_live_frames(context, server):
    token, viewer = start(server, BACKLOG_THEN_LIVE, 40, 20)
    page = open_page(context, server, viewer)
    wait_terminal(page, "backlog 39")
    assert page.evaluate("() => window.bentoPage.mode()") == "ro"
    assert page.is_disabled("#input-line")
    assert "viewer token" in page.inner_text("#controls-why")
    # The page was open before any live line was printed.
    assert not any(line.startswith("live") for line in terminal_lines(page))
    with sync.connect(server.url, call_timeout=20) as client:
        # No acks from this owner: what it frees, a viewer that lags would get as a gap.
        owner = client.attach(token, None, auto_ack=False)
        owner.send("go")
        owner.wait_input_acked()
        owner.detach()
    exit_data = wait_exit(page)
    assert exit_data["state"] == "exited" and exit_data["result"] == {"lines": 60}
    wait_js(page, "() => window.bentoPage.messages().length === 2")
    lines = terminal_lines(page)
    assert lines == [f"backlog {i}" for i in range(40)] + [f"live {i}" for i in range(20)]
    assert_seqs_once(seqs(page))
    messages = page.evaluate("() => window.bentoPage.messages()")
    assert [m["value"] for m in messages] == [{"kind": "backlog done", "count": 40}, ["a", "list", 3]]
    assert page.inner_text("#exit").startswith("Exit: exited, code 0")
    # A message is one line; clicking it shows the whole value, indented.
    page.click("#messages li:first-child summary")
    assert json.loads(page.inner_text("#messages li:first-child pre")) == {"kind": "backlog done", "count": 40}
    wait_js(page, "() => window.bentoPage.status() && window.bentoPage.status().state === 'exited'")
    assert_no_page_errors(page)


COLOURS_AND_PROGRESS = r"""
import sys, time

def main():
    print("\x1b[31mred text\x1b[0m plain")
    print("\x1b[1;32mgreen bold\x1b[0m")
    for pct in range(0, 101, 10):
        sys.stdout.write(f"\rprogress {pct:3d}%")
        sys.stdout.flush()
        time.sleep(0.02)
    print()
    print("after")
"""


def test_ansi_colours_and_carriage_return_progress_bar(context, server):
    token, _ = start(server, COLOURS_AND_PROGRESS)
    page = open_page(context, server, token)
    wait_exit(page)
    # An ended function takes no input or signals; destroy stays.
    assert page.is_disabled("#input-line") and page.is_disabled("button[data-signal=INT]")
    assert page.is_enabled("#destroy")
    assert "has ended" in page.inner_text("#controls-why")
    wait_terminal(page, "after")
    lines = terminal_lines(page)
    # The progress bar redrew one line: only its last state is on screen.
    assert lines == ["red text plain", "green bold", "progress 100%", "after"]
    red = page.evaluate("() => window.bentoPage.colorOf('red text')")
    assert red["palette"] and red["fg"] == 1 and not red["bold"]
    plain = page.evaluate("() => window.bentoPage.colorOf('plain')")
    assert plain["default"]
    green = page.evaluate("() => window.bentoPage.colorOf('green bold')")
    assert green["palette"] and green["fg"] == 2 and green["bold"]
    # Destroyed: the state badge says so (it said "running" or the last state).
    page.on("dialog", lambda dialog: dialog.accept())
    page.click("#destroy")
    page.wait_for_selector("#notice:has-text('Session destroyed')")
    assert page.inner_text("#state-badge") == "destroyed"
    assert_no_page_errors(page)


STREAM = """
import time

def main(n):
    api.recv()  # the page's own input starts the stream
    for i in range(1, n + 1):
        print(f"n={i}")
        time.sleep(0.04)
    return n
"""


def test_reload_mid_stream_shows_every_line_exactly_once(context, make_server):
    server = make_server("--keep", "2")  # the session goes 2 s after its end, once the page leaves
    token, _ = start(server, STREAM, 80)
    page = open_page(context, server, token)
    send_input(page, "go")
    for mark in ("n=15", "n=40"):
        wait_terminal(page, mark)
        page.reload()
    wait_exit(page)
    wait_terminal(page, "n=80")
    assert terminal_lines(page) == [f"n={i}" for i in range(1, 81)]
    assert_seqs_once(seqs(page))
    assert page.evaluate("() => window.bentoPage.persistent()")
    # The owner page acknowledged what it stored: the server keeps nothing unread.
    wait_js(page, "() => { const s = window.bentoPage.status(); "
                  "return s && s.acked_seq === s.next_seq - 1; }")
    st = status(server, token)
    assert st["acked_seq"] == st["next_seq"] - 1 and st["input_seq"] == 1
    assert_no_page_errors(page)
    # The owner has read everything and leaves: the session ends at its keep
    # period. The page rebuilds it from what this browser stored, exactly.
    page.close()
    wait_gone(server, token)
    page = open_page(context, server, token)
    wait_js(page, "() => window.bentoPage.connection() === 'stopped'")
    assert "copy this browser kept" in page.inner_text("#notice")
    assert terminal_lines(page) == [f"n={i}" for i in range(1, 81)]
    assert_seqs_once(seqs(page))
    assert page.evaluate("() => window.bentoPage.exit().result") == 80
    assert_no_page_errors(page)


SHARED = """
import time

def main():
    api.recv()  # both pages are open
    for i in range(1, 11):
        print(f"tick {i}")
        api.send({"tick": i})
        api.state.put({"score": i})
        time.sleep(0.03)
    return "ok"
"""


def test_two_pages_on_one_session_agree(browser, server):
    token, viewer = start(server, SHARED)
    owner_ctx = browser.new_context()
    viewer_ctx = browser.new_context()
    try:
        # The viewer first: the owner page acknowledges what it stores, and a
        # viewer that attaches after that gets a gap instead (PROTOCOL.md).
        pages = [open_page(viewer_ctx, server, viewer), open_page(owner_ctx, server, token)]
        wait_js(pages[0], "() => window.bentoPage.connection() === 'attached'")
        send_input(pages[1], "go")
        wait_js(pages[1], "() => { const s = window.bentoPage.status(); return s && s.attachments === 2; }")
        for page in pages:
            wait_exit(page)
            wait_js(page, "() => { const s = window.bentoPage.sharedState(); return s && s.version === 10; }")
        views = [(terminal_lines(p), seqs(p), p.evaluate("() => window.bentoPage.messages()"),
                  p.evaluate("() => window.bentoPage.sharedState()"), p.evaluate("() => window.bentoPage.exit()"))
                 for p in pages]
        assert views[0] == views[1]
        assert views[0][0] == [f"tick {i}" for i in range(1, 11)]
        assert views[0][3] == {"version": 10, "value": {"score": 10}}
        assert [m["value"] for m in views[0][2]] == [{"tick": i} for i in range(1, 11)]
        assert json.loads(pages[0].inner_text("#shared-value")) == {"score": 10}
        assert_no_page_errors(*pages)
    finally:
        owner_ctx.close()
        viewer_ctx.close()


def test_network_pause_like_a_sleep_loses_and_repeats_nothing(context, server):
    token, _ = start(server, STREAM, 60)
    page = open_page(context, server, token)
    send_input(page, "go")
    wait_terminal(page, "n=10")
    context.set_offline(True)
    page.wait_for_timeout(1500)
    context.set_offline(False)
    wait_exit(page)
    assert terminal_lines(page) == [f"n={i}" for i in range(1, 61)]
    assert_seqs_once(seqs(page))
    assert page.evaluate("() => window.bentoPage.duplicates()") == 0
    assert_no_page_errors(page)


def test_bad_token_shows_a_clear_message(context, server):
    unknown = "bto_" + "A" * 43
    page = open_page(context, server, unknown)
    wait_js(page, "() => window.bentoPage && window.bentoPage.connection() === 'stopped'")
    assert "does not know that token" in page.inner_text("#notice")
    assert page.is_hidden("#session") and page.is_visible("#intro")
    malformed = open_page(context, server, "hello-world")
    malformed.wait_for_selector("#notice:not([hidden])")
    assert "not a Bento token" in malformed.inner_text("#notice")
    cut = open_page(context, server, unknown[:-5])  # a link copied short: never sent to the server
    cut.wait_for_selector("#notice:not([hidden])")
    assert "not a Bento token" in cut.inner_text("#notice")
    assert_no_page_errors(page, malformed, cut)


def test_a_pages_own_link_pasted_in_the_token_box_opens_it(context, server):
    token, _ = start(server, "def main():\n    print('pasted')\n")
    page = open_page(context, server)
    page.fill("#token-input", f"{origin(server)}/#t={token}")
    page.press("#token-input", "Enter")
    wait_terminal(page, "pasted")
    assert_no_page_errors(page)


FLOOD = """
def main(n):
    for i in range(n):
        print(f"line {i:04d} " + "x" * 40)
    return n
"""


def test_frames_dropped_by_policy_show_as_a_gap(context, server):
    # 150 KB through a 16 KiB buffer (the exchange reads up to 64 KiB past it).
    token, viewer = start(server, FLOOD, 3000, buffer={"max_bytes": 16 * 1024, "policy": "drop_oldest"})
    page = open_page(context, server, viewer)
    wait_exit(page)
    wait_terminal(page, "line 2999")
    lines = terminal_lines(page)
    gap = lines[0]
    assert gap.startswith("── frames 1–") and gap.endswith("not received: dropped ──"), lines[:3]
    last_dropped = int(gap.split("–")[1].split(" ")[0])
    # What follows the gap is contiguous up to the end; the gap's seq stands for what it covers.
    shown = seqs(page)
    assert shown[0] == last_dropped and shown == list(range(last_dropped, last_dropped + len(shown)))
    kept = [line for line in lines[1:] if line.startswith("line ")]
    assert kept and kept[-1].startswith("line 2999")
    numbers = [int(line.split()[1]) for line in kept]
    assert numbers == list(range(numbers[0], 3000)) and numbers[0] > 0
    assert page.locator("#messages li.gap").count() == 1
    assert_no_page_errors(page)


def test_without_indexeddb_the_page_says_so_and_does_not_acknowledge(context, server):
    context.add_init_script("Object.defineProperty(window, 'indexedDB', {get() {"
                            " throw new DOMException('refused by the test', 'SecurityError'); }})")
    token, _ = start(server, STREAM, 5)
    page = open_page(context, server, token)
    send_input(page, "go")
    wait_exit(page)
    assert not page.evaluate("() => window.bentoPage.persistent()")
    assert "does not let this page store" in page.inner_text("#notice")
    wait_js(page, "() => { const s = window.bentoPage.status(); return s && s.state === 'exited'; }")
    # Nothing is acknowledged: a reload reads it all again from the server.
    assert status(server, token)["acked_seq"] == 0
    page.reload()
    wait_exit(page)
    assert terminal_lines(page) == [f"n={i}" for i in range(1, 6)]
    assert_seqs_once(seqs(page))
    assert_no_page_errors(page)
