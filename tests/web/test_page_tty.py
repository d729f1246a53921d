"""A terminal (tty) session in the page: an owner types into the page's
terminal and the function's stdin gets the keys, its terminal echoes them,
and its window size follows the page's; a viewer's terminal is read-only.
The page knows a terminal session from the attach reply's ``tty``: it takes
keys from the attach on, and sends ``resize`` for nothing else."""

from __future__ import annotations

from page_helpers import (
    WAIT_MS,
    WireTap,
    assert_no_page_errors,
    open_page,
    start,
    status,
    terminal_lines,
    wait_exit,
    wait_js,
    wait_terminal,
)

READ_A_LINE = """
import os, sys

def main():
    print("tty" if sys.stdin.isatty() else "pipe")
    name = input("name? ")
    size = os.get_terminal_size(0)
    print(f"hello {name} at {size.lines}x{size.columns}")
    again = input("again? ")
    size = os.get_terminal_size(0)
    print(f"then {again} at {size.lines}x{size.columns}")
    return [name, again]
"""

KNOWN_TTY = "() => window.bentoPage && window.bentoPage.tty().known === true"


def test_keys_typed_into_the_terminal_reach_the_functions_stdin(browser, context, server):
    token, viewer = start(server, READ_A_LINE, tty=(24, 80))
    page = open_page(context, server, token)
    wait_terminal(page, "name? ")
    assert terminal_lines(page)[0] == "tty"
    size = wait_js(page, "() => { const t = window.bentoPage.tty(); return t.known === true && t.sent; }")
    assert "go to the function's terminal" in page.inner_text("#terminal-why")

    viewer_ctx = browser.new_context()
    try:
        watcher = open_page(viewer_ctx, server, viewer)
        wait_terminal(watcher, "name? ")
        assert "Read-only terminal" in watcher.inner_text("#terminal-why")
        watcher.click("#terminal")
        watcher.keyboard.type("ignored")
        watcher.keyboard.press("Enter")

        page.click("#terminal")
        page.keyboard.type("bob")
        page.keyboard.press("Enter")
        # The function's terminal echoed the keys; the function read the line.
        wait_terminal(page, "hello bob")
        lines = terminal_lines(page)
        assert "name? bob" in lines, lines
        assert f"hello bob at {size['rows']}x{size['cols']}" in lines, lines
        wait_terminal(watcher, "hello bob")
        assert "ignored" not in terminal_lines(watcher)

        # A smaller window: the function's terminal follows.
        page.set_viewport_size({"width": 900, "height": 700})
        resized = wait_js(page, "(old) => { const t = window.bentoPage.tty(); "
                                "return t.sent && t.sent.cols !== old && t.sent; }", size["cols"])
        page.keyboard.type("ann")
        page.keyboard.press("Enter")
        assert wait_exit(page)["result"] == ["bob", "ann"]
        assert f"then ann at {resized['rows']}x{resized['cols']}" in terminal_lines(page)
        assert status(server, token)["input_seq"] >= 2
        assert_no_page_errors(page, watcher)
    finally:
        viewer_ctx.close()


def wait_ops(page, tap: WireTap, op: str, count: int) -> None:
    """Wait until the pages sent ``count`` requests ``op``."""
    for _ in range(WAIT_MS // 100):
        if tap.ops().count(op) >= count:
            return
        page.wait_for_timeout(100)
    raise AssertionError(f"the pages sent {tap.ops()}, not {count} {op}")


def test_keys_typed_before_the_page_saw_the_function_run_go_once_in_order(context, server):
    """The attach reply says it is a terminal: keys typed before any status said
    the function runs and before its window size was set (the page's status and
    resize requests are held here) reach its stdin, each once and in order."""
    tap = WireTap(context, hold=("status", "resize"))
    token, _ = start(server, READ_A_LINE, tty=(24, 80))
    page = open_page(context, server, token)
    wait_js(page, "() => window.bentoPage && window.bentoPage.connection() === 'attached'")
    page.click("#terminal")
    page.keyboard.type("bo")
    page.keyboard.type("b")
    page.keyboard.press("Enter")
    wait_terminal(page, "hello bob at 24x80")

    tap.release()
    size = wait_js(page, "() => window.bentoPage.tty().sent")
    page.keyboard.type("ann")
    page.keyboard.press("Enter")
    assert wait_exit(page)["result"] == ["bob", "ann"]
    assert f"then ann at {size['rows']}x{size['cols']}" in terminal_lines(page)
    inputs = [m for m in tap.sent if m.get("op") == "input"]
    assert [m["seq"] for m in inputs] == list(range(1, len(inputs) + 1)), inputs
    assert all(m.get("stdin") is True for m in inputs), inputs
    assert b"".join(m["data"] for m in inputs) == b"bob\rann\r"
    assert status(server, token)["input_seq"] == len(inputs)
    assert_no_page_errors(page)


def test_a_session_without_a_terminal_says_its_terminal_is_output_only(browser, context, server):
    tap = WireTap(context)
    token, viewer = start(server, "def main():\n    print('ready')\n    api.recv()\n")
    page = open_page(context, server, token)
    wait_terminal(page, "ready")
    wait_js(page, "() => window.bentoPage.tty().known === false")
    assert "does not run in a terminal" in page.inner_text("#terminal-why")
    page.click("#terminal")
    page.keyboard.type("x")
    # Two statuses that said it runs, and no resize: the page asks only a terminal session's size.
    wait_ops(page, tap, "status", 2)
    assert "resize" not in tap.ops()
    assert page.evaluate("() => window.bentoPage.input()") == {"accepted": 0, "pending": 0}

    viewer_ctx = browser.new_context()
    try:
        watcher = open_page(viewer_ctx, server, viewer)
        wait_terminal(watcher, "ready")
        wait_js(watcher, "() => window.bentoPage.tty().known === false")
        said = watcher.inner_text("#terminal-why")
        assert "does not run in a terminal" in said and "Read-only terminal" not in said, said
        assert_no_page_errors(page, watcher)
    finally:
        viewer_ctx.close()
