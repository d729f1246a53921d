"""What the page's figures say follows the server: a viewer's input figure
comes from the session's status, not from inputs it never sends."""

from __future__ import annotations

from bento_clients import sync
from page_helpers import assert_no_page_errors, open_page, start, wait_js

TWO_INPUTS = """
def main():
    api.recv()
    api.recv()
    return "both"
"""


def test_a_viewers_input_figure_follows_the_servers_input_seq(context, server):
    token, viewer = start(server, TWO_INPUTS)
    page = open_page(context, server, viewer)
    wait_js(page, "() => window.bentoPage && window.bentoPage.connection() === 'attached'")
    assert page.inner_text("#input-figures") == "server has input up to seq 0"
    with sync.connect(server.url, call_timeout=20) as client:
        owner = client.attach(token, None)
        owner.send("one")
        owner.wait_input_acked()
        # A viewer gets no in_ack: the figure comes from the status it polls.
        wait_js(page, "() => window.bentoPage.input().accepted === 1")
        assert page.inner_text("#input-figures") == "server has input up to seq 1"
        owner.send("two")
        owner.wait_input_acked()
        owner.detach()
    wait_js(page, "() => window.bentoPage.input().accepted === 2 && window.bentoPage.exit()")
    assert page.inner_text("#input-figures") == "server has input up to seq 2"
    assert_no_page_errors(page)
