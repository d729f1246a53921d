"""Unit tests for bento.protocol: pure bytes in, values or errors out."""

import datetime
import decimal
import enum
import math
import re
import subprocess
import sys
import time
import tracemalloc

import cbor2
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from bento import protocol as p
from bento.protocol import ProtocolError, RequestError, decode, encode


def in_map(item: bytes) -> bytes:
    """A top-level map {"x": <item>} around already-encoded ``item``."""
    return b"\xa1\x61x" + item


def rejects(data: bytes, match: str, **kw) -> ProtocolError:
    with pytest.raises(ProtocolError, match=match) as info:
        decode(data, **kw)
    assert info.value.close_code == 1002
    assert info.value.code == "proto"
    return info.value


# --------------------------------------------------------------------------
# decode: size, framing


def test_oversize_is_1009_before_decoding():
    # Garbage past the limit: the size check must come first, not a decode error.
    with pytest.raises(ProtocolError) as info:
        decode(b"\xff" * 101, max_size=100)
    assert info.value.close_code == 1009
    assert decode(b"\xa1\x61a" + b"\x00", max_size=4) == {"a": 0}


def test_default_max_message_boundary():
    body = b"\x00" * (p.DEFAULT_MAX_MESSAGE - 8)
    msg = b"\xa1\x61a\x5a" + len(body).to_bytes(4, "big") + body
    assert len(msg) == p.DEFAULT_MAX_MESSAGE
    assert decode(msg)["a"] == body
    with pytest.raises(ProtocolError) as info:
        decode(msg + b"\x00")
    assert info.value.close_code == 1009


def test_empty():
    rejects(b"", "empty")
    rejects(b"", "empty", require_map=False)


@pytest.mark.parametrize(
    "data",
    [
        b"\xa1",  # map with no entries
        b"\xa1\x61",  # key text missing its byte
        b"\xa1\x61a",  # value missing
        b"\xa2\x61a\x00",  # second entry missing
        b"\xa1\x61a\x18",  # 1-byte argument missing
        b"\xa1\x61a\x19\x01",  # 2-byte argument short
        b"\xa1\x61a\x1a\x00\x00\x01",  # 4-byte argument short
        b"\xa1\x61a\x1b\x00\x00\x00\x00\x00\x00\x01",  # 8-byte argument short
        b"\xa1\x61a\x45abcd",  # bytes run past the end
        b"\xa1\x61a\x65abcd",  # text runs past the end
        b"\xa1\x61a\xf9\x3c",  # half float short
        b"\xa1\x61a\xfa\x00\x00\x00",  # single float short
        b"\xa1\x61a\xfb\x00\x00\x00\x00\x00\x00\x00",  # double float short
        b"\xa1\x61a\x83\x01\x02",  # array short of one item
    ],
)
def test_truncated(data):
    rejects(data, "truncated|cannot fit")


def test_truncated_scalar_top_level():
    rejects(b"\x19\x01", "truncated", require_map=False)


def test_trailing_bytes():
    rejects(cbor2.dumps({"a": 1}) + b"\x00", "trailing")
    rejects(cbor2.dumps({}) + cbor2.dumps({}), "trailing")
    rejects(b"\x01\x02", "trailing", require_map=False)


# --------------------------------------------------------------------------
# decode: tags, indefinite lengths, reserved encodings, simple values


@pytest.mark.parametrize(
    "tagged",
    [
        cbor2.dumps(re.compile("a+")),  # tag 35: regex compiled from input
        bytes.fromhex("d81c81d81d00"),  # tags 28/29: shared (cyclic) value
        cbor2.dumps(  # tag 1: epoch datetime
            datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC),
            datetime_as_timestamp=True,
        ),
        cbor2.dumps(2**70),  # tag 2: bignum
        cbor2.dumps(-(2**70)),  # tag 3: negative bignum
        cbor2.dumps(decimal.Decimal("1.5")),  # tag 4
        b"\xc0\x60",  # tag 0 on a text
        b"\xd9\xd9\xf7\x00",  # tag 55799 (self-describe)
        b"\xdb" + b"\xff" * 8 + b"\x00",  # largest tag number
    ],
)
def test_tags_rejected(tagged):
    assert tagged[0] >> 5 == 6
    rejects(in_map(tagged), "tag")
    rejects(tagged, "tag", require_map=False)


@pytest.mark.parametrize(
    "item",
    [
        b"\x9f\x01\xff",  # indefinite array
        b"\xbf\x61a\x01\xff",  # indefinite map
        b"\x5f\x41a\xff",  # indefinite bytes
        b"\x7f\x61a\xff",  # indefinite text
        b"\x1f",  # major 0 with additional info 31 (not well-formed)
        b"\x3f",  # major 1 with additional info 31
        b"\xdf",  # major 6 with additional info 31
        b"\xff",  # stray break
    ],
)
def test_indefinite_rejected(item):
    rejects(in_map(item), "indefinite")


def test_indefinite_top_level_map_rejected():
    rejects(b"\xbf\x61a\x01\xff", "indefinite")


@pytest.mark.parametrize("major", range(8))
@pytest.mark.parametrize("ai", [28, 29, 30])
def test_reserved_additional_info(major, ai):
    rejects(in_map(bytes((major << 5 | ai,)) + b"\x00" * 9), "reserved")


@pytest.mark.parametrize(
    "item",
    [
        b"\xf7",  # undefined
        *(bytes((0xE0 | n,)) for n in range(20)),  # simple(0..19)
        b"\xf8\x20",  # simple(32)
        b"\xf8\xff",  # simple(255)
        b"\xf8\x14",  # false in the two-byte form (not well-formed)
        b"\xf8\x00",
    ],
)
def test_simple_values_rejected(item):
    rejects(in_map(item), "simple")
    rejects(item, "simple", require_map=False)


@pytest.mark.parametrize(
    ("item", "value"),
    [
        (b"\xf4", False),
        (b"\xf5", True),
        (b"\xf6", None),
        (b"\xf9\x3c\x00", 1.0),  # half
        (b"\xf9\x7b\xff", 65504.0),  # largest half
        (b"\xf9\x00\x01", 2.0**-24),  # smallest half subnormal
        (b"\xf9\xfc\x00", -math.inf),
        (b"\xfa\x3f\xc0\x00\x00", 1.5),  # single
        (b"\xfb\x40\x09\x21\xfb\x54\x44\x2d\x18", math.pi),  # double
    ],
)
def test_simple_and_float_accepted(item, value):
    got = decode(in_map(item))["x"]
    assert got == value and type(got) is type(value)
    assert decode(item, require_map=False) == value


def test_nan_floats():
    for item in (b"\xf9\x7e\x00", b"\xfa\x7f\xc0\x00\x00", b"\xfb\x7f\xf8" + b"\x00" * 6):
        assert math.isnan(decode(item, require_map=False))


# --------------------------------------------------------------------------
# decode: strings, integers


@pytest.mark.parametrize(
    "raw",
    [
        b"\xc3\x28",  # bad continuation
        b"\xed\xa0\x80",  # UTF-8 encoded surrogate
        b"\xc0\xaf",  # overlong
        b"\xff",
        b"\xf4\x90\x80\x80",  # beyond U+10FFFF
        b"\xe2\x82",  # truncated sequence
    ],
)
def test_invalid_utf8(raw):
    rejects(in_map(bytes((0x60 | len(raw),)) + raw), "UTF-8")
    # ...also as a map key
    rejects(b"\xa1" + bytes((0x60 | len(raw),)) + raw + b"\x00", "UTF-8")


def test_strings():
    assert decode(in_map(b"\x40")) == {"x": b""}
    assert decode(in_map(b"\x60")) == {"x": ""}
    text = "héllo ✓ 𝄞"
    assert decode(cbor2.dumps({"x": text, "y": text.encode()})) == {"x": text, "y": text.encode()}
    assert type(decode(in_map(b"\x41a"))["x"]) is bytes


@pytest.mark.parametrize(
    ("item", "value"),
    [
        (b"\x00", 0),
        (b"\x17", 23),
        (b"\x18\x18", 24),
        (b"\x18\x05", 5),  # non-minimal, accepted
        (b"\x19\x00\x05", 5),
        (b"\x1a\x00\x00\x00\x05", 5),
        (b"\x1b\x00\x00\x00\x00\x00\x00\x00\x05", 5),
        (b"\x19\xff\xff", 65535),
        (b"\x1a\xff\xff\xff\xff", 2**32 - 1),
        (b"\x1b" + b"\xff" * 8, 2**64 - 1),
        (b"\x20", -1),
        (b"\x38\xff", -256),
        (b"\x39\x01\x00", -257),
        (b"\x3a\x00\x01\x00\x00", -65537),
        (b"\x3b" + b"\xff" * 8, -(2**64)),
    ],
)
def test_integers(item, value):
    assert decode(in_map(item)) == {"x": value}


def test_text_message_rejected():
    rejects("{}", "text message")  # a WebSocket text frame handed over as str


def test_buffer_types_accepted():
    raw = cbor2.dumps({"a": [1, b"xy"]})
    assert decode(bytearray(raw)) == decode(memoryview(raw)) == {"a": [1, b"xy"]}
    assert type(decode(bytearray(raw))["a"][1]) is bytes


# --------------------------------------------------------------------------
# decode: maps and keys


def test_duplicate_key_top_level():
    rejects(b"\xa2\x61a\x01\x61a\x02", "duplicate")


def test_duplicate_key_nested():
    rejects(in_map(b"\xa2\x01\x01\x01\x02"), "duplicate")  # int keys 1 and 1
    rejects(in_map(b"\xa2\x01\x01\x18\x01\x02"), "duplicate")  # 1 and non-minimal 1
    rejects(in_map(b"\xa2\x41k\x01\x41k\x02"), "duplicate")  # bytes keys
    rejects(in_map(b"\xa2\x61k\x01\x61k\x02"), "duplicate")  # text keys
    rejects(in_map(b"\x81\xa2\x20\x00\x20\x00"), "duplicate")  # -1, -1 in a map in an array
    rejects(b"\xa2\x01\x01\x01\x02", "duplicate", require_map=False)


def test_distinct_keys_of_different_types_are_not_duplicates():
    # 1, "1", b"1" are three keys; so are "a" and b"a".
    got = decode(in_map(b"\xa5\x01\x00\x611\x00\x411\x00\x61a\x00\x41a\x00"))
    assert got == {"x": {1: 0, "1": 0, b"1": 0, "a": 0, b"a": 0}}


@pytest.mark.parametrize("key", [b"\x01", b"\x20", b"\x41a", b"\xf5", b"\xf6", b"\x80", b"\xa0"])
def test_non_text_top_level_key(key):
    rejects(b"\xa1" + key + b"\x00", "not text")


@pytest.mark.parametrize(
    "key",
    [
        b"\xf9\x3c\x00",  # float 1.0
        b"\xfb\x3f\xf0\x00\x00\x00\x00\x00\x00",  # double 1.0
        b"\xf5",  # true (== 1 in Python)
        b"\xf4",
        b"\xf6",  # null
        b"\x80",  # array
        b"\x81\x01",
        b"\xa0",  # map
    ],
)
def test_bad_nested_key(key):
    rejects(in_map(b"\xa1" + key + b"\x00"), "map key")
    rejects(b"\xa1" + key + b"\x00", "map key", require_map=False)


def test_true_and_one_as_keys():
    # Without the key-type rule {1: .., true: ..} would collide (True == 1).
    rejects(in_map(b"\xa2\x01\x00\xf5\x00"), "map key")


def test_nested_keys_allowed():
    assert decode(in_map(b"\xa3\x61t\x00\x20\x01\x42ab\x02")) == {"x": {"t": 0, -1: 1, b"ab": 2}}
    assert decode(b"\xa1\x01\x00", require_map=False) == {1: 0}


@pytest.mark.parametrize("value", [[], [1], 0, "text", b"bytes", None, True, 1.5])
def test_top_level_non_map_rejected(value):
    rejects(cbor2.dumps(value), "not a map")
    assert decode(cbor2.dumps(value), require_map=False) == value


# --------------------------------------------------------------------------
# decode: depth and size bombs


def test_depth_32_ok_33_rejected():
    # The top-level map is depth 1; 31 nested arrays reach depth 32.
    ok = in_map(b"\x81" * 31 + b"\x00")
    value = decode(ok)["x"]
    for _ in range(31):
        value = value[0]
    assert value == 0
    rejects(in_map(b"\x81" * 32 + b"\x00"), "nesting")
    # An empty container at depth 33 counts too.
    rejects(in_map(b"\x81" * 31 + b"\x80"), "nesting")
    rejects(in_map(b"\x81" * 31 + b"\xa0"), "nesting")
    # Maps count as levels like arrays.
    decode(in_map(b"\xa1\x00" * 31 + b"\x00"))
    rejects(in_map(b"\xa1\x00" * 32 + b"\x00"), "nesting")


def test_depth_without_require_map():
    decode(b"\x81" * 32 + b"\x00", require_map=False)
    rejects(b"\x81" * 33 + b"\x00", "nesting", require_map=False)
    decode(b"\x81" * 3 + b"\x00", require_map=False, max_depth=3)
    rejects(b"\x81" * 4 + b"\x00", "nesting", require_map=False, max_depth=3)


def test_deep_bomb_is_cheap():
    rejects(in_map(b"\x81" * 1_000_000 + b"\x00"), "nesting")


def test_max_items_boundary():
    # {"a": [0]*k} holds 3 + k items: the map, the key, the array, k zeros.
    assert decode(cbor2.dumps({"a": [0] * 7}), max_items=10) == {"a": [0] * 7}
    rejects(cbor2.dumps({"a": [0] * 8}), "items", max_items=10)
    # Map entries count two each, keys included.
    assert decode(cbor2.dumps({"a": {1: 0, 2: 0, 3: 0}}), max_items=9)
    rejects(cbor2.dumps({"a": {1: 0, 2: 0, 3: 0, 4: 0}}), "items", max_items=9)
    rejects(b"\x00", "items", require_map=False, max_items=0)


def test_item_count_bomb_rejected_without_memory():
    # 2 MB of empty arrays: cbor2 would build 2 million lists.
    n = 2 * 1024 * 1024
    bomb = b"\xa1\x61a\x9a" + n.to_bytes(4, "big") + b"\x80" * n
    tracemalloc.start()
    try:
        rejects(bomb, "items")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024


def test_item_count_bomb_spread_over_containers():
    # No single header is too big: 100,000 arrays of 3 items (400,000 items).
    rejects(cbor2.dumps({"a": [[0, 0, 0]] * 100_000}), "items")


@pytest.mark.parametrize(
    "head",
    [
        b"\x9b" + b"\xff" * 8,  # array of 2**64-1 items
        b"\x9a\x00\x10\x00\x00",  # array of 1 Mi items in a tiny message
        b"\xbb" + b"\xff" * 8,  # map
        b"\xba\x00\x00\x00\x03",  # map of 3 entries needs at least 6 bytes
        b"\x5b" + b"\xff" * 8,  # bytes
        b"\x7b" + b"\xff" * 8,  # text
    ],
)
def test_huge_declared_length_rejected_fast(head):
    start = time.perf_counter()
    rejects(in_map(head + b"\x00\x00\x00\x00\x00"), "cannot fit|truncated")
    assert time.perf_counter() - start < 0.05


def test_declared_length_that_fits_exactly():
    assert decode(in_map(b"\x83\x00\x00\x00")) == {"x": [0, 0, 0]}
    assert decode(in_map(b"\xa2\x00\x00\x01\x00")) == {"x": {0: 0, 1: 0}}


# --------------------------------------------------------------------------
# decode: round trips (hypothesis)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary()
)
nested_keys = st.text() | st.integers(min_value=-(2**64), max_value=2**64 - 1) | st.binary()
values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(nested_keys, children, max_size=5)
    ),
    max_leaves=20,
)
messages = st.dictionaries(st.text(), values, max_size=6)


def depth(v) -> int:
    if isinstance(v, list):
        return 1 + max(map(depth, v), default=0)
    if isinstance(v, dict):
        return 1 + max(map(depth, v.values()), default=0)
    return 0


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(messages)
def test_round_trip_cbor2_dumps(msg):
    assume(depth(msg) <= p.MAX_DEPTH)
    assert decode(cbor2.dumps(msg)) == msg
    assert decode(encode(msg)) == msg


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.recursive(scalars | st.floats(), lambda c: st.lists(c, max_size=5)
                    | st.dictionaries(nested_keys, c, max_size=5), max_leaves=20))
def test_encode_writes_what_cbor2_writes(value):
    # Our own encoder (the exchange does not load cbor2) agrees byte for byte.
    assume(depth(value) < p.MAX_DEPTH)
    assert encode(value) == cbor2.dumps(value)


@settings(max_examples=200)
@given(scalars)
def test_round_trip_scalars(value):
    got = decode(encode(value), require_map=False)
    assert got == value and type(got) is type(value)


@settings(max_examples=200)
@given(values)
def test_round_trip_values(value):
    assume(depth(value) <= p.MAX_DEPTH)
    assert decode(encode(value), require_map=False) == value


# --------------------------------------------------------------------------
# decode: fuzz — only ProtocolError, and agreement with cbor2 on what it accepts


def check_decode_total(data: bytes) -> None:
    for require_map in (True, False):
        for kw in ({}, {"max_depth": 3, "max_items": 20, "max_size": 200}):
            try:
                ours = decode(data, require_map=require_map, **kw)
            except ProtocolError as e:
                assert e.close_code in (1002, 1009)
                continue
            # Accepted input is plain well-formed CBOR: cbor2 must read the same value
            # (compared through encoding, so NaN compares equal to NaN).
            assert cbor2.dumps(ours) == cbor2.dumps(cbor2.loads(data))


@settings(max_examples=300)
@given(st.binary(max_size=64))
def test_fuzz_random_bytes(data):
    check_decode_total(data)


mutations = st.lists(
    st.tuples(
        st.sampled_from(["flip", "set", "insert", "delete", "truncate"]),
        st.integers(min_value=0, max_value=10**6),
        st.integers(min_value=0, max_value=255),
    ),
    min_size=1,
    max_size=4,
)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(messages, mutations)
def test_fuzz_mutated_messages(msg, edits):
    data = bytearray(cbor2.dumps(msg))
    for kind, pos, byte in edits:
        if not data:
            break
        pos %= len(data)
        if kind == "flip":
            data[pos] ^= 1 << (byte % 8)
        elif kind == "set":
            data[pos] = byte
        elif kind == "insert":
            data.insert(pos, byte)
        elif kind == "delete":
            del data[pos]
        else:
            del data[pos:]
    check_decode_total(bytes(data))


# --------------------------------------------------------------------------
# encode


def test_encode_values():
    assert encode({"a": (1, 2)}) == cbor2.dumps({"a": [1, 2]})
    assert encode(2**64 - 1) == b"\x1b" + b"\xff" * 8
    assert encode(-(2**64)) == b"\x3b" + b"\xff" * 8
    assert encode({1: {b"k": [None, True, 1.5, "s"]}}) == cbor2.dumps(
        {1: {b"k": [None, True, 1.5, "s"]}}
    )


class Color(enum.IntEnum):
    RED = 1


class Text(str):
    pass


@pytest.mark.parametrize(
    "value",
    [
        {1, 2},
        frozenset(),
        datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC),
        datetime.date(2020, 1, 1),
        decimal.Decimal("1.5"),
        re.compile("a"),
        object(),
        bytearray(b"x"),
        Color.RED,
        Text("x"),
        {"a": [1, {"b": {2}}]},
        {(1, 2): 0},
        {1.5: 0},
        {True: 0},
        {None: 0},
    ],
)
def test_encode_rejects_types(value):
    with pytest.raises(TypeError):
        encode(value)


@pytest.mark.parametrize(
    "value", [2**64, -(2**64) - 1, [2**70], {"a": {2**64: 0}}, {-(2**64) - 1: 0}]
)
def test_encode_rejects_bigints(value):
    with pytest.raises(ValueError):
        encode(value)


def test_encode_depth_and_cycles():
    deep = 0
    for _ in range(32):
        deep = [deep]
    assert decode(encode(deep), require_map=False) == deep
    with pytest.raises(ValueError):
        encode([deep])
    with pytest.raises(ValueError):
        encode(deep, max_depth=31)
    cyclic: list = []
    cyclic.append(cyclic)
    with pytest.raises(ValueError):
        encode(cyclic)
    cyclic_map: dict = {}
    cyclic_map["a"] = cyclic_map
    with pytest.raises(ValueError):
        encode(cyclic_map)


@pytest.mark.parametrize("n", [0, 1, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1])
def test_encode_head(n):
    assert p.encode_head(0, n) == cbor2.dumps(n)
    assert p.encode_head(1, n) == cbor2.dumps(-1 - n)
    head = p.encode_head(4, n)
    assert head[0] >> 5 == 4
    assert head[1:] == cbor2.dumps(n)[1:]


def test_encode_head_range():
    with pytest.raises(ValueError):
        p.encode_head(0, -1)
    with pytest.raises(ValueError):
        p.encode_head(0, 2**64)


# --------------------------------------------------------------------------
# replies, events, frames


def both(data: bytes, **kw):
    """Decode with our decoder and with cbor2; they must agree."""
    ours = decode(data, **kw)
    assert ours == cbor2.loads(data)
    return ours


def test_replies_and_events():
    assert both(p.reply_ok(7, function="abc")) == {"id": 7, "ok": True, "function": "abc"}
    assert both(p.reply_error(8, "conflict", "stale", version=3)) == {
        "id": 8,
        "ok": False,
        "error": {"code": "conflict", "message": "stale", "version": 3},
    }
    assert both(p.event("in_ack", session="s", seq=4)) == {"ev": "in_ack", "session": "s", "seq": 4}
    assert both(p.error_event(None, "proto", "bad")) == {
        "ev": "error",
        "session": None,
        "error": {"code": "proto", "message": "bad"},
    }
    assert both(p.error_event("s1", "gone", "ended"))["session"] == "s1"


@pytest.mark.parametrize("size", [0, 1, 23, 24, 255, 256, 65535, 65536])
@pytest.mark.parametrize("seq", [0, 1, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1])
def test_encode_frame_sizes(size, seq):
    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    frame = p.encode_frame(seq, "stdout", encode(data))
    assert frame == cbor2.dumps([seq, "stdout", data])
    assert both(frame, require_map=False) == [seq, "stdout", data]


@pytest.mark.parametrize("ch", ["stdout", "stderr", "msg", "exit", "gap", "msg:x", "msg:ünï", ""])
def test_encode_frame_channels(ch):
    value = {"k": [1, None, "v"]}
    frame = p.encode_frame(5, ch, encode(value))
    assert both(frame, require_map=False) == [5, ch, value]


def test_gap_frame():
    frame = p.gap_frame(3, 9, "drop_oldest")
    assert both(frame, require_map=False) == [
        9,
        "gap",
        {"from": 3, "to": 9, "reason": "drop_oldest"},
    ]


@pytest.mark.parametrize("count", [0, 1, 23, 24, 255, 256, 65535, 65536, 70_000])
def test_out_event_frame_counts(count):
    frames = [p.encode_frame(i + 1, "stdout", b"\x40") for i in range(count)]
    msg = p.out_event("sess-1", frames)
    expected = {
        "ev": "out",
        "session": "sess-1",
        "frames": [[i + 1, "stdout", b""] for i in range(count)],
    }
    assert both(msg, max_items=4 * count + 10) == expected


def test_out_event_mixed_frames():
    frames = [
        p.encode_frame(1, "stdout", encode(b"")),
        p.encode_frame(2, "stderr", encode(b"e" * 24)),
        p.encode_frame(3, "msg", encode({"a": [1, 2.5, None]})),
        p.gap_frame(4, 6, "trimmed"),
        p.encode_frame(7, "stdout", encode(b"x" * 65536)),
        p.encode_frame(
            8,
            "exit",
            encode({"state": "exited", "code": 0, "signal": None, "result": 42, "error": None}),
        ),
    ]
    got = both(p.out_event("sëss", frames))
    assert got["session"] == "sëss"
    assert [f[0] for f in got["frames"]] == [1, 2, 3, 6, 7, 8]
    assert got["frames"][3] == [6, "gap", {"from": 4, "to": 6, "reason": "trimmed"}]
    assert got["frames"][4][2] == b"x" * 65536
    assert got["frames"][5][2]["result"] == 42


def test_out_event_accepts_tuple_of_frames():
    frames = (p.encode_frame(1, "stdout", b"\x41a"),)
    assert both(p.out_event("s", frames))["frames"] == [[1, "stdout", b"a"]]


# --------------------------------------------------------------------------
# exceptions and constants


def test_exceptions():
    e = ProtocolError("bad")
    assert (e.message, e.close_code, e.code) == ("bad", 1002, "proto")
    assert ProtocolError("big", 1009).close_code == 1009
    r = RequestError("conflict", "stale", request_id=3, version=7)
    assert (r.code, r.message, r.request_id, r.extra) == ("conflict", "stale", 3, {"version": 7})
    assert str(r) == "conflict: stale"
    assert RequestError("gone", "x").request_id is None
    with pytest.raises(ValueError):
        RequestError("nope", "unknown code")


def test_constants():
    assert p.PROTO_VERSION == 1
    assert p.DEFAULT_MAX_MESSAGE == 16 * 1024 * 1024
    assert p.MAX_DEPTH == 32
    assert p.DEFAULT_MAX_ITEMS == 262_144
    assert len(p.ERROR_CODES) == 14 and {"input_gap", "busy", "quota", "unavailable"} <= p.ERROR_CODES
    assert p.STATES == ("starting", "running", "exited", "failed", "killed", "lost")
    assert p.ENDED_STATES == set(p.STATES) - {"starting", "running"}
    assert p.SIGNALS == {"INT", "TERM", "KILL"}
    assert p.BUFFER_POLICIES == {"block", "drop_oldest", "fail"}
    assert p.LIMIT_KEYS == {"wall_s", "cpu_s", "memory_bytes", "pids", "output_bytes", "file_bytes"}


def test_import_is_lean():
    code = (
        "import sys, bento.protocol\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('trio', 'cbor2', 'bento.'))"
        " and m != 'bento.protocol')\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


# --------------------------------------------------------------------------
# parse_request: happy paths with defaults

HAPPY = [
    (
        {"op": "hello", "id": 0, "proto": 1},
        {"op": "hello", "id": 0, "proto": 1, "client": None, "auth": None},
    ),
    (
        {"op": "hello", "id": 0, "proto": 2, "client": "cli/1", "auth": "k", "extra": 1},
        {"op": "hello", "id": 0, "proto": 2, "client": "cli/1", "auth": "k"},
    ),
    (
        {"op": "store", "id": 1, "name": "f", "code": "def main(): pass"},
        {"op": "store", "id": 1, "name": "f", "code": "def main(): pass"},
    ),
    (
        {"op": "execute", "id": 2, "function": "ab12"},
        {
            "op": "execute",
            "id": 2,
            "function": "ab12",
            "code": None,
            "entry": "main",
            "args": [],
            "kwargs": {},
            "env": {},
            "limits": {},
            "buffer": None,
            "network": False,
            "packages": [],
            "module": None,
            "files": {},
            "tty": None,
            "idempotency_key": None,
            "attach": True,
            "queue": None,
        },
    ),
    (
        {
            "op": "execute",
            "id": 3,
            "code": "def run(a, b=0): return a",
            "entry": "run",
            "args": [1, [2]],
            "kwargs": {"b": {"c": None}},
            "env": {"K": "V"},
            "limits": {
                "wall_s": 1.5,
                "cpu_s": 2,
                "memory_bytes": 2**30,
                "pids": 16,
                "output_bytes": 0,
                "file_bytes": 10,
            },
            "buffer": {"max_bytes": 1024, "policy": "drop_oldest"},
            "network": True,
            "packages": ["six", "pandas<3"],
            "files": {"a/b.txt": b"x"},
            "tty": {"rows": 24, "cols": 80},
            "idempotency_key": "k" * 256,
            "queue": 2.5,
            "attach": False,
        },
        {
            "op": "execute",
            "id": 3,
            "function": None,
            "code": "def run(a, b=0): return a",
            "entry": "run",
            "args": [1, [2]],
            "kwargs": {"b": {"c": None}},
            "env": {"K": "V"},
            "limits": {
                "wall_s": 1.5,
                "cpu_s": 2,
                "memory_bytes": 2**30,
                "pids": 16,
                "output_bytes": 0,
                "file_bytes": 10,
            },
            "buffer": {"max_bytes": 1024, "policy": "drop_oldest"},
            "network": True,
            "packages": ["six", "pandas<3"],
            "module": None,
            "files": {"a/b.txt": b"x"},
            "tty": {"rows": 24, "cols": 80},
            "idempotency_key": "k" * 256,
            "attach": False,
            "queue": 2.5,
        },
    ),
    (
        {"op": "execute", "id": 4, "code": "x", "buffer": {}, "limits": {"wall_s": 0}},
        {
            "op": "execute",
            "id": 4,
            "function": None,
            "code": "x",
            "entry": "main",
            "args": [],
            "kwargs": {},
            "env": {},
            "limits": {"wall_s": 0},
            "buffer": {},
            "network": False,
            "packages": [],
            "module": None,
            "files": {},
            "tty": None,
            "idempotency_key": None,
            "attach": True,
            "queue": None,
        },
    ),
    (
        {"op": "attach", "id": 5, "token": "bto_x"},
        {"op": "attach", "id": 5, "token": "bto_x", "from": 1},
    ),
    (
        {"op": "attach", "id": 5, "token": "btv_x", "from": 9},
        {"op": "attach", "id": 5, "token": "btv_x", "from": 9},
    ),
    ({"op": "detach", "id": 6, "session": "s"}, {"op": "detach", "id": 6, "session": "s"}),
    (
        {"op": "ack", "session": "s", "seq": 0},
        {"op": "ack", "id": None, "session": "s", "seq": 0},
    ),
    (
        {"op": "ack", "id": "ignored", "session": "s", "seq": 10},
        {"op": "ack", "id": None, "session": "s", "seq": 10},
    ),
    (
        {"op": "input", "session": "s", "seq": 1, "data": {"k": [1]}},
        {"op": "input", "id": None, "session": "s", "seq": 1, "data": {"k": [1]}, "eof": False,
         "stdin": False},
    ),
    (
        {"op": "input", "id": 3, "session": "s", "seq": 2, "data": None},
        {"op": "input", "id": None, "session": "s", "seq": 2, "data": None, "eof": False,
         "stdin": False},
    ),
    (
        {"op": "input", "session": "s", "seq": 2, "data": 7, "eof": False},  # false: as if absent
        {"op": "input", "id": None, "session": "s", "seq": 2, "data": 7, "eof": False, "stdin": False},
    ),
    (
        {"op": "input", "session": "s", "seq": 3, "eof": True},
        {"op": "input", "id": None, "session": "s", "seq": 3, "data": None, "eof": True,
         "stdin": False},
    ),
    (
        {"op": "input", "session": "s", "seq": 4, "data": "héllo\n", "stdin": True},
        {"op": "input", "id": None, "session": "s", "seq": 4, "data": "héllo\n".encode(), "eof": False,
         "stdin": True},
    ),
    (
        {"op": "input", "session": "s", "seq": 5, "data": b"\xff\x00", "stdin": True},
        {"op": "input", "id": None, "session": "s", "seq": 5, "data": b"\xff\x00", "eof": False,
         "stdin": True},
    ),
    (
        {"op": "input", "session": "s", "seq": 6, "eof": True, "stdin": True},
        {"op": "input", "id": None, "session": "s", "seq": 6, "data": None, "eof": True, "stdin": True},
    ),
    (
        {"op": "signal", "id": 7, "token": "t", "signal": "TERM"},
        {"op": "signal", "id": 7, "token": "t", "session": None, "signal": "TERM"},
    ),
    ({"op": "status", "id": 8, "token": "t"}, {"op": "status", "id": 8, "token": "t", "session": None}),
    ({"op": "status", "id": 8, "session": "s_1"}, {"op": "status", "id": 8, "token": None, "session": "s_1"}),
    ({"op": "destroy", "id": 9, "token": "t"}, {"op": "destroy", "id": 9, "token": "t", "session": None}),
    ({"op": "state_get", "id": 10, "token": "t"}, {"op": "state_get", "id": 10, "token": "t"}),
    ({"op": "list", "id": 11}, {"op": "list", "id": 11}),
    (
        {"op": "state_put", "id": 12, "token": "t", "value": None},
        {"op": "state_put", "id": 12, "token": "t", "value": None, "if_version": None},
    ),
    (
        {"op": "state_put", "id": 12, "token": "t", "value": [1], "if_version": 0},
        {"op": "state_put", "id": 12, "token": "t", "value": [1], "if_version": 0},
    ),
    ({"op": "ping", "id": 2**64 - 1}, {"op": "ping", "id": 2**64 - 1}),
    (
        {"op": "share", "id": 13, "token": "t", "viewer": "rotate"},
        {"op": "share", "id": 13, "token": "t", "viewer": "rotate"},
    ),
    (
        {"op": "resize", "id": 16, "token": "t", "rows": 40, "cols": 132},
        {"op": "resize", "id": 16, "token": "t", "rows": 40, "cols": 132},
    ),
    (
        {"op": "file_get", "id": 14, "token": "t", "path": "out/a.bin"},
        {"op": "file_get", "id": 14, "token": "t", "path": "out/a.bin", "offset": 0, "length": 1 << 20},
    ),
    (
        {"op": "file_put", "id": 15, "token": "t", "path": "in/b", "data": b"\x00", "offset": 7},
        {"op": "file_put", "id": 15, "token": "t", "path": "in/b", "data": b"\x00", "offset": 7},
    ),
]


@pytest.mark.parametrize(("msg", "expected"), HAPPY)
def test_parse_request_ok(msg, expected):
    got = p.parse_request(msg)
    assert got == expected
    assert got is not msg


def test_parse_request_round_trip_through_decode():
    raw = encode({"op": "execute", "id": 1, "code": "x", "args": [1.5, b"b"]})
    assert p.parse_request(decode(raw))["args"] == [1.5, b"b"]


def test_parse_request_defaults_are_fresh():
    a = p.parse_request({"op": "execute", "id": 1, "code": "x"})
    a["args"].append(1)
    a["kwargs"]["k"] = 1
    a["limits"]["pids"] = 1
    b = p.parse_request({"op": "execute", "id": 1, "code": "x"})
    assert (b["args"], b["kwargs"], b["limits"]) == ([], {}, {})


def test_parse_request_every_op_has_a_happy_case():
    assert {m["op"] for m, _ in HAPPY} == set(p._OPS)


# --------------------------------------------------------------------------
# parse_request: bad requests (request_id kept when the id was a valid uint)

EXEC = {"op": "execute", "id": 4, "code": "x"}

BAD = [
    ({"id": 1}, 1),  # no op
    ({"op": 5, "id": 1}, 1),
    ({"op": None, "id": 1}, 1),
    ({"op": "nope", "id": 2}, 2),
    ({"op": "nope", "id": -1}, None),
    ({"op": "ping"}, None),  # missing id
    ({"op": "share", "id": 1, "token": "t", "viewer": "drop"}, 1),
    ({**EXEC, "queue": -1}, 4),
    ({**EXEC, "queue": float("inf")}, 4),
    ({"op": "ping", "id": True}, None),  # bool is not a uint
    ({"op": "ping", "id": -1}, None),
    ({"op": "ping", "id": 1.0}, None),
    ({"op": "ping", "id": "1"}, None),
    ({"op": "hello", "id": 0}, 0),  # no proto
    ({"op": "hello", "id": 0, "proto": "1"}, 0),
    ({"op": "hello", "id": 0, "proto": True}, 0),
    ({"op": "hello", "id": 0, "proto": 1, "client": 3}, 0),
    ({"op": "hello", "id": 0, "proto": 1, "auth": None}, 0),
    ({"op": "store", "id": 1, "name": "f"}, 1),
    ({"op": "store", "id": 1, "name": b"f", "code": "x"}, 1),
    ({"op": "execute", "id": 4}, 4),  # neither function nor code
    ({**EXEC, "function": "ab"}, 4),  # both
    ({**EXEC, "code": None}, 4),
    ({**EXEC, "entry": 1}, 4),
    ({**EXEC, "args": {"a": 1}}, 4),
    ({**EXEC, "args": (1,)}, 4),
    ({**EXEC, "kwargs": [1]}, 4),
    ({**EXEC, "kwargs": {1: 2}}, 4),
    ({**EXEC, "env": {"A": 1}}, 4),
    ({**EXEC, "env": {b"A": "1"}}, 4),
    ({**EXEC, "env": None}, 4),
    ({**EXEC, "limits": {"bogus": 1}}, 4),
    ({**EXEC, "limits": {1: 1}}, 4),
    ({**EXEC, "limits": []}, 4),
    ({**EXEC, "limits": {"wall_s": -1}}, 4),
    ({**EXEC, "limits": {"wall_s": True}}, 4),
    ({**EXEC, "limits": {"cpu_s": math.inf}}, 4),
    ({**EXEC, "limits": {"cpu_s": math.nan}}, 4),
    ({**EXEC, "limits": {"cpu_s": "1"}}, 4),
    ({**EXEC, "limits": {"memory_bytes": 1.5}}, 4),
    ({**EXEC, "limits": {"pids": -1}}, 4),
    ({**EXEC, "limits": {"output_bytes": False}}, 4),
    ({**EXEC, "buffer": {"policy": "nope"}}, 4),
    ({**EXEC, "buffer": {"policy": ["block"]}}, 4),
    ({**EXEC, "buffer": {"max_bytes": -5}}, 4),
    ({**EXEC, "buffer": {"max_bytes": 5, "other": 1}}, 4),
    ({**EXEC, "buffer": "block"}, 4),
    ({**EXEC, "network": 0}, 4),
    ({**EXEC, "network": None}, 4),
    ({**EXEC, "attach": "yes"}, 4),
    ({**EXEC, "idempotency_key": ""}, 4),
    ({**EXEC, "idempotency_key": "k" * 257}, 4),
    ({**EXEC, "idempotency_key": 5}, 4),
    ({**EXEC, "packages": "six"}, 4),
    ({**EXEC, "module": "m"}, 4),  # one of code, function, module
    ({**EXEC, "tty": True}, 4),
    ({**EXEC, "tty": {"rows": 0, "cols": 80}}, 4),
    ({**EXEC, "tty": {"rows": 24}}, 4),
    ({"op": "resize", "id": 6, "token": "t", "rows": 10}, 6),
    ({"op": "resize", "id": 6, "token": "t", "rows": 10, "cols": 10_001}, 6),
    ({"op": "execute", "id": 4}, 4),
    ({**EXEC, "files": {"a": "text"}}, 4),
    ({**EXEC, "files": {1: b"x"}}, 4),
    ({"op": "file_get", "id": 5, "token": "t"}, 5),
    ({"op": "file_get", "id": 5, "token": "t", "path": "a", "length": 0}, 5),
    ({"op": "file_put", "id": 5, "token": "t", "path": "a"}, 5),
    ({"op": "file_put", "id": 5, "token": "t", "path": "a", "data": "text"}, 5),
    ({**EXEC, "packages": ["six", 1]}, 4),
    ({"op": "attach", "id": 5}, 5),
    ({"op": "attach", "id": 5, "token": "t", "from": 0}, 5),
    ({"op": "attach", "id": 5, "token": "t", "from": True}, 5),
    ({"op": "detach", "id": 6}, 6),
    ({"op": "ack", "id": 7, "session": "s"}, None),  # id ignored for ack
    ({"op": "ack", "session": "s", "seq": -1}, None),
    ({"op": "ack", "session": "s", "seq": False}, None),
    ({"op": "ack", "seq": 1}, None),
    ({"op": "input", "id": 8, "session": "s", "seq": 1}, None),  # neither data nor eof
    ({"op": "input", "session": "s", "seq": 1, "data": 1, "eof": True}, None),  # both
    ({"op": "input", "session": "s", "seq": 1, "data": None, "eof": True}, None),
    ({"op": "input", "session": "s", "seq": 1, "eof": False}, None),
    ({"op": "input", "session": "s", "seq": 1, "eof": 1}, None),
    ({"op": "input", "session": "s", "seq": 0, "data": 1}, None),
    ({"op": "input", "session": "s", "data": 1}, None),
    ({"op": "input", "session": "s", "seq": 1, "data": 1, "stdin": True}, None),  # stdin takes bytes/text
    ({"op": "input", "session": "s", "seq": 1, "data": None, "stdin": True}, None),
    ({"op": "input", "session": "s", "seq": 1, "data": b"x", "stdin": 1}, None),
    ({"op": "signal", "id": 9, "token": "t"}, 9),
    ({"op": "signal", "id": 9, "token": "t", "signal": "HUP"}, 9),
    ({"op": "signal", "id": 9, "token": "t", "signal": "SIGTERM"}, 9),
    ({"op": "signal", "id": 9, "token": "t", "signal": ["INT"]}, 9),
    ({"op": "status", "id": 10}, 10),
    ({"op": "status", "id": 10, "token": "t", "session": "s_1"}, 10),
    ({"op": "destroy", "id": 11, "token": 1}, 11),
    ({"op": "state_get", "id": 12, "token": None}, 12),
    ({"op": "state_put", "id": 13, "token": "t"}, 13),  # value is required, even null
    ({"op": "state_put", "id": 13, "token": "t", "value": 1, "if_version": -1}, 13),
    ({"op": "state_put", "id": 13, "token": "t", "value": 1, "if_version": None}, 13),
]


@pytest.mark.parametrize(("msg", "request_id"), BAD)
def test_parse_request_bad(msg, request_id):
    with pytest.raises(RequestError) as info:
        p.parse_request(msg)
    assert info.value.code == "bad_request"
    assert info.value.request_id == request_id
    assert info.value.message
