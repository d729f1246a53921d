"""The page's notices go when their cause does: an error about the input line
once the line is edited or an input goes out, a signal's confirmation once the
function has ended, a storage refusal said in plain words."""

from __future__ import annotations

from page_helpers import (
    WireTap,
    assert_no_page_errors,
    open_page,
    send_input,
    start,
    wait_exit,
    wait_js,
    wait_terminal,
)

ECHO = """
def main():
    while True:
        try:
            value = api.recv()
        except EOFError:
            return
        print(f"got {value!r}")
"""

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

NOTICE = "() => window.bentoPage.notice()"


def test_a_json_error_goes_once_the_line_is_edited_or_an_input_goes_out(context, server):
    token, _ = start(server, ECHO)
    page = open_page(context, server, token)
    page.wait_for_selector("#input-line:enabled")
    page.check("#input-json")
    send_input(page, "{not json")
    wait_js(page, "() => window.bentoPage.notice().startsWith('Not JSON')")
    # Editing the line takes away what the error was about.
    page.fill("#input-line", "[1, 2]")
    wait_js(page, "() => window.bentoPage.notice() === ''")
    assert page.is_hidden("#notice")
    send_input(page, "{still not")
    wait_js(page, "() => window.bentoPage.notice().startsWith('Not JSON')")
    # Sent unticked as text: the next input of the line went out, so the error goes.
    page.uncheck("#input-json")
    page.click("#input-form button[type=submit]")
    wait_terminal(page, "got '{still not'")
    assert page.evaluate(NOTICE) == ""
    page.click("#eof")
    wait_exit(page)
    assert_no_page_errors(page)


def test_a_signals_confirmation_goes_once_the_function_has_ended(context, server):
    token, _ = start(server, INTERRUPTIBLE)
    page = open_page(context, server, token)
    wait_terminal(page, "ready")
    page.click("button[data-signal=INT]")
    assert wait_exit(page)["result"] == "interrupted"
    # The exit says what the signal did; "Sent INT." has nothing more to say.
    wait_js(page, "() => window.bentoPage.status() && window.bentoPage.status().exit")
    assert page.evaluate(NOTICE) == ""
    assert page.is_hidden("#notice")
    assert_no_page_errors(page)


def test_a_signals_confirmation_that_comes_after_the_exit_is_not_shown(context, server):
    """The function can end at the signal before the server answers the signal
    request: the exit then comes first, and the confirmation after it must not
    be shown. Here the server's reply to the signal is held (WireTap) until the
    page shows the exit."""
    tap = WireTap(context, hold_replies=("signal",))
    token, _ = start(server, INTERRUPTIBLE)
    page = open_page(context, server, token)
    wait_terminal(page, "ready")
    page.click("button[data-signal=INT]")
    assert wait_exit(page)["result"] == "interrupted"
    wait_js(page, "() => window.bentoPage.status() && window.bentoPage.status().exit")
    assert tap.release_replies() == 1  # the reply comes after the exit
    page.wait_for_timeout(300)  # (the page takes the reply)
    assert page.evaluate(NOTICE) == ""
    assert_no_page_errors(page)


def test_without_storage_the_notice_says_in_plain_words_what_does_not_work(context, server):
    context.add_init_script("Object.defineProperty(window, 'indexedDB', {get() {"
                            " throw new DOMException('refused by the test', 'SecurityError'); }})")
    token, _ = start(server, ECHO)
    page = open_page(context, server, token)
    wait_js(page, "() => window.bentoPage && window.bentoPage.connection() === 'attached'")
    text = page.inner_text("#notice")
    # No exception's own words: what does not work, and what to do.
    for raw in ("refused by the test", "SecurityError", "DOMException", "Error"):
        assert raw not in text, text
    assert "does not let this page store" in text
    assert "reload" in text and "allow" in text.lower(), text
    # The exception itself goes to the console, for whoever debugs it.
    assert any("refused by the test" in line for line in page.bento_errors.console), page.bento_errors.console
    assert_no_page_errors(page)
