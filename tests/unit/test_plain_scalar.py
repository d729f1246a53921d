"""The exchange's quick check of an ``api.send`` value (bento/exchange_driver.py):
whatever it passes, the full decoder takes as one whole value."""

from __future__ import annotations

import random

import cbor2
import pytest

from bento import protocol
from bento.exchange_driver import plain_scalar

PLAIN = [0, 1, 23, 24, 255, 256, 65535, 65536, 2**32, 2**64 - 1, -1, -24, -25, -(2**64),
         b"", b"x", b"x" * 23, b"x" * 24, b"x" * 255, b"x" * 256, b"x" * 70_000,
         "", "a", "é" * 11, "x" * 24, "x" * 300, "\U0001f600" * 100,
         1.5, -0.0, 1e300, float("inf"), True, False, None]
NOT_PLAIN = [[1], {"a": 1}, cbor2.CBORTag(1, 5)]


@pytest.mark.parametrize("value", PLAIN)
def test_plain_values_pass_in_every_size_of_head(value):
    assert plain_scalar(cbor2.dumps(value))
    assert plain_scalar(cbor2.dumps(value, canonical=True))


@pytest.mark.parametrize("value", NOT_PLAIN)
def test_containers_and_tags_are_left_to_the_decoder(value):
    assert not plain_scalar(cbor2.dumps(value))


@pytest.mark.parametrize("data", [b"", b"\x58", b"\x59\x00", b"\x58\x05abc", b"\x58\x02abc",
                                  b"\x62\xff\xfe", b"\x1c", b"\x3f", b"\x5f", b"\x7f", b"\xf7",
                                  b"\xf9\x00", b"\x01\x02", b"\x18", b"\x19\x01", b"\xf6\x00"])
def test_cut_overlong_or_invalid_values_fail(data):
    assert not plain_scalar(data)


def test_what_passes_decodes_whole():
    """Random heads (every initial byte, arguments in every size) and bodies
    (mostly of the announced length, some ASCII): every value the check passes
    is one whole value to the full decoder (bounded: 20,000 inputs)."""
    rng = random.Random(15)
    passed = 0
    for _ in range(20_000):
        ib = rng.randrange(256)
        size = {24: 1, 25: 2, 26: 4, 27: 8}.get(ib & 0x1F, 0)
        arg = rng.randrange(0, 40) if size else ib & 0x1F
        length = arg if rng.random() < 0.7 else rng.randrange(0, 40)
        pick = (lambda: rng.randrange(32, 127)) if rng.random() < 0.5 else (lambda: rng.randrange(256))
        data = bytes([ib]) + (arg.to_bytes(size, "big") if size else b"") + bytes(pick() for _ in range(length))
        if plain_scalar(data):
            passed += 1
            protocol.decode(data, require_map=False)  # raises if it is not one whole value
    assert passed > 2_000
