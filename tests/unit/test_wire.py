"""The internal wire (bento_driver.wire): the framer and the message table, on bytes."""

from __future__ import annotations

import pytest
from bento_driver import cbor, wire


def test_framer_returns_whole_bodies_in_order_whatever_the_chunks():
    stream = b"".join(wire.frame(b) for b in (b"a", b"", b"x" * 70_000, b"end"))
    for step in (1, 3, 4096, len(stream)):
        f = wire.Framer(1 << 20)
        got = []
        for at in range(0, len(stream), step):
            f.feed(stream[at : at + step])
            while (body := f.next()) is not None:
                got.append(body)
        assert got == [b"a", b"", b"x" * 70_000, b"end"] and f.pending == 0


def test_framer_gathers_a_long_message_and_keeps_what_follows_it():
    stream = b"".join(wire.frame(b) for b in (b"a" * 10, b"b" * 300_000, b"c" * 7, b"d"))
    for step in (7, 4096, 65536, 100_000, len(stream)):
        f = wire.Framer(1 << 20)
        got = []
        for at in range(0, len(stream), step):
            f.feed(stream[at : at + step])
            while (body := f.next()) is not None:
                assert type(body) is bytes
                got.append(body)
            # What arrived and was not returned yet, counted the whole way.
            assert f.pending == len(stream[: at + step]) - sum(len(b) + 4 for b in got)
        assert got == [b"a" * 10, b"b" * 300_000, b"c" * 7, b"d"]
        assert f.pending == 0 and f.rest() == b""


def test_framer_gathering_a_message_a_byte_at_a_time_costs_a_byte_per_byte():
    """A peer (the function may write anything to the driver's link) that sends a
    long message one byte per read: the framer holds about the bytes it got."""
    import tracemalloc

    body = b"z" * 200_000
    stream = wire.frame(body)
    f = wire.Framer(1 << 20)
    tracemalloc.start()
    try:
        for at in range(len(stream) - 1):
            f.feed(stream[at : at + 1])
            assert f.next() is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert f.pending == len(stream) - 1
    assert peak < 3 * len(stream), peak
    f.feed(stream[-1:])
    assert f.next() == body and f.pending == 0


def test_framer_rest_is_what_follows_the_last_body():
    f = wire.Framer(1 << 20)
    f.feed(wire.frame(b"up") + wire.frame(b"early") + wire.frame(b"x" * 100)[:9])
    assert f.next() == b"up"
    assert f.rest() == wire.frame(b"early") + wire.frame(b"x" * 100)[:9] and f.pending == len(f.rest())
    assert f.next() == b"early" and f.next() is None  # the third is not whole: gathered
    assert f.rest() == wire.frame(b"x" * 100)[:9] and f.pending == 9
    f.feed(wire.frame(b"x" * 100)[9:])
    assert f.next() == b"x" * 100 and f.pending == 0


def test_framer_refuses_a_length_over_its_bound_before_the_body_arrives():
    f = wire.Framer(100)
    f.feed(wire.LEN.pack(101))
    with pytest.raises(wire.FrameTooLarge, match="101 bytes exceeds 100"):
        f.next()


def test_message_builds_what_the_table_allows():
    msg = wire.message(wire.TO_DRIVER, "in", data=b"\x01")
    assert msg == {"t": "in", "data": b"\x01"}
    assert wire.check(wire.TO_DRIVER, cbor.decode_internal(cbor.encode(msg))) == "in"


@pytest.mark.parametrize(("direction", "msg", "why"), [
    (wire.FROM_DRIVER, {"t": "launch"}, "unknown message 'launch'"),
    (wire.FROM_DRIVER, {"t": "put", "v": b""}, "wants"),  # "if" is missing
    (wire.FROM_DRIVER, {"t": "get", "extra": 1}, "wants"),
    (wire.FROM_DRIVER, [1, 2], "is a map"),
    (wire.TO_DRIVER, {"t": "up"}, "unknown message 'up'"),  # right type, wrong direction
    (wire.TO_EXCHANGE, {"t": "input", "seq": 1}, "wants"),  # a request without its rid
])
def test_check_refuses_what_the_table_does_not_allow(direction, msg, why):
    with pytest.raises(wire.WireError, match=why):
        wire.check(direction, msg)


def test_every_direction_has_its_messages_and_replies_carry_the_snapshot():
    assert set(wire.MESSAGES) == {wire.TO_DRIVER, wire.FROM_DRIVER, wire.TO_EXCHANGE, wire.FROM_EXCHANGE}
    from bento.session_core import Snapshot

    required, optional = wire.MESSAGES[wire.FROM_EXCHANGE]["progress"]
    # waiting is optional: an exchange of version 6 (which a server still accepts) has none
    assert required | optional == set(Snapshot._fields) and optional == {"waiting"}
    assert set(Snapshot._fields) <= wire.MESSAGES[wire.FROM_EXCHANGE]["reply"][1]
    assert wire.MESSAGES[wire.FROM_EXCHANGE]["hello"][1] == {"waiting"}
    assert wire.VERSION in wire.ACCEPTED
