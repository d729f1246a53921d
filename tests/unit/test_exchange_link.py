"""The server's link to an exchange, over a socket pair: the hello and its wire version."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from bento_driver import wire

from bento import protocol
from bento.exchange_link import ExchangeGone, ExchangeLink
from bento.session_core import NEW

HELLO = {"t": "hello", "wire": wire.VERSION, "pid": 4242, "enforced": {}, "shared_version": 0,
         "shared_value": protocol.encode(None), **NEW._asdict()}


async def hello_from(msg: dict | bytes) -> dict:
    ours, theirs = trio.testing.memory_stream_pair()
    link = ExchangeLink(ours)  # type: ignore[arg-type]
    body = msg if isinstance(msg, bytes) else protocol.encode(msg)
    await theirs.send_all(wire.frame(body))
    return await link.hello()


async def test_hello_of_this_version_is_taken():
    got = await hello_from(HELLO)
    assert got["pid"] == 4242 and got["next_seq"] == 1


async def test_an_exchange_of_another_version_is_refused_saying_why():
    with pytest.raises(ExchangeGone) as err:
        await hello_from({**HELLO, "wire": wire.VERSION + 1})
    message = str(err.value)
    assert f"version {wire.VERSION + 1}" in message and f"this server {wire.VERSION}" in message
    assert "pid 4242" in message and "another Bento version" in message


async def test_an_exchange_from_before_versions_is_refused_as_version_1():
    old = {k: v for k, v in HELLO.items() if k != "wire"}
    with pytest.raises(ExchangeGone, match=f"wire version 1, this server {wire.VERSION}"):
        await hello_from(old)


async def test_a_hello_that_breaks_the_table_is_refused():
    with pytest.raises(ExchangeGone, match="broke the internal wire"):
        await hello_from({**HELLO, "surprise": 1})


async def test_garbage_instead_of_a_hello_is_refused():
    with pytest.raises(ExchangeGone):
        await hello_from(b"\xff\x00")
