"""CBOR for Bento's wire: a strict decoder for untrusted bytes and a small encoder.

The one CBOR codec of the project: the server, the clients (through
``bento.protocol``), the exchange and the driver all use it, so every process
boundary reads and writes the same bytes with the same code. Sans-IO: it
must never do I/O, and imports only the stdlib's ``struct`` and ``math`` (the
exchange and the driver start per session and stay small; neither loads
cbor2, whose import costs the exchange MiBs of RSS: see docs/architecture.md).

Untrusted bytes never go to ``cbor2.loads`` (which accepts tags, duplicate
keys, trailing bytes and unbounded item counts): ``decode`` refuses all of
them. ``encode`` writes what ``cbor2.dumps`` writes for the same values
(tests/unit/test_protocol.py checks both against cbor2 with hypothesis).
"""

from __future__ import annotations

import struct
from math import isfinite

TYPE_CHECKING = False  # typing is not imported at run time: the exchange and the driver load this
if TYPE_CHECKING:
    from collections.abc import Callable  # (collections too: ~0.3 MiB per process)
    from typing import Any

DEFAULT_MAX_MESSAGE = 16 * 1024 * 1024
MAX_DEPTH = 32
DEFAULT_MAX_ITEMS = 262_144

_UINT64_MAX = 2**64 - 1
_NINT64_MIN = -(2**64)


class ProtocolError(Exception):
    """The peer sent an invalid message: the connection must be closed (after an
    `error` event with code `proto` when possible)."""

    code = "proto"

    def __init__(self, message: str, close_code: int = 1002) -> None:
        super().__init__(message)
        self.message = message
        self.close_code = close_code

# --------------------------------------------------------------------------
# Decoding untrusted CBOR (RFC 8949), strictly.

_U16 = struct.Struct(">H").unpack_from
_U32 = struct.Struct(">I").unpack_from
_U64 = struct.Struct(">Q").unpack_from
_F16 = struct.Struct(">e").unpack_from
_F32 = struct.Struct(">f").unpack_from
_F64 = struct.Struct(">d").unpack_from
_SIMPLE = {20: False, 21: True, 22: None}
_NESTED_KEY_TYPES = frozenset({str, int, bytes})


def decode(
    data: bytes,
    *,
    max_size: int = DEFAULT_MAX_MESSAGE,
    max_depth: int = MAX_DEPTH,
    max_items: int = DEFAULT_MAX_ITEMS,
    require_map: bool = True,
) -> Any:
    """Decode one CBOR item from untrusted ``data``, or raise ProtocolError.

    Rejects (close code 1002): empty, truncated or trailing input, tags,
    indefinite lengths, reserved encodings, simple values other than
    false/true/null, invalid UTF-8, duplicate map keys, map keys that are not
    text/int/bytes (text only at the top level when ``require_map``), nesting
    deeper than ``max_depth`` (top level is depth 1) and more than ``max_items``
    items in all. ``len(data) > max_size`` is rejected with close code 1009
    before any decoding. With ``require_map`` the top-level item must be a map
    with text keys; without it any value is returned.
    """
    size = len(data)
    if size > max_size:
        raise ProtocolError(f"message of {size} bytes exceeds the limit of {max_size}", 1009)
    if size == 0:
        raise ProtocolError("empty message")
    if type(data) is not bytes:
        if isinstance(data, str):
            raise ProtocolError("a text message is not CBOR: send binary")
        data = bytes(data)
    if require_map and data[0] >> 5 != 5:
        raise ProtocolError("the top-level item is not a map")
    budget = max_items - 1  # the top-level item itself
    if budget < 0:
        raise ProtocolError(f"more than {max_items} items in the message")

    def item(i: int, depth: int) -> tuple[Any, int]:
        nonlocal budget
        ib = data[i]
        major = ib >> 5
        ai = ib & 31
        i += 1
        if ai < 24:
            n = ai
        elif ai == 24:
            if major == 7:
                raise ProtocolError(
                    f"simple value (initial byte {ib:#04x}) not allowed at byte {i - 1}"
                )
            n = data[i]
            i += 1
        elif ai == 25:
            if major == 7:
                return _F16(data, i)[0], i + 2
            n = _U16(data, i)[0]
            i += 2
        elif ai == 26:
            if major == 7:
                return _F32(data, i)[0], i + 4
            n = _U32(data, i)[0]
            i += 4
        elif ai == 27:
            if major == 7:
                return _F64(data, i)[0], i + 8
            n = _U64(data, i)[0]
            i += 8
        elif ai == 31:
            raise ProtocolError(f"indefinite length or break (major type {major}) at byte {i - 1}")
        else:
            raise ProtocolError(f"reserved additional information {ai} at byte {i - 1}")
        if major == 3:
            j = i + n
            if j > size:
                raise ProtocolError(f"truncated message: string of {n} bytes at byte {i}")
            try:
                return data[i:j].decode("utf-8"), j
            except UnicodeDecodeError:
                raise ProtocolError(f"invalid UTF-8 in text string at byte {i}") from None
        if major == 2:
            j = i + n
            if j > size:
                raise ProtocolError(f"truncated message: string of {n} bytes at byte {i}")
            return data[i:j], j
        if major == 0:
            return n, i
        if major == 4:
            if depth > max_depth:
                raise ProtocolError(f"nesting deeper than {max_depth} at byte {i}")
            if n > size - i:
                raise ProtocolError(f"array of {n} items cannot fit in the message at byte {i}")
            budget -= n
            if budget < 0:
                raise ProtocolError(f"more than {max_items} items in the message")
            depth += 1
            out: list[Any] = []
            append = out.append
            for _ in range(n):
                v, i = item(i, depth)
                append(v)
            return out, i
        if major == 5:
            if depth > max_depth:
                raise ProtocolError(f"nesting deeper than {max_depth} at byte {i}")
            if 2 * n > size - i:
                raise ProtocolError(f"map of {n} entries cannot fit in the message at byte {i}")
            budget -= 2 * n
            if budget < 0:
                raise ProtocolError(f"more than {max_items} items in the message")
            top = depth == 1 and require_map
            depth += 1
            m: dict[Any, Any] = {}
            for entry in range(1, n + 1):
                at = i
                k, i = item(i, depth)
                if top:
                    if type(k) is not str:
                        raise ProtocolError(f"top-level map key at byte {at} is not text")
                elif type(k) not in _NESTED_KEY_TYPES:
                    raise ProtocolError(f"map key at byte {at} is not text, an integer or bytes")
                m[k], i = item(i, depth)
                if len(m) != entry:
                    raise ProtocolError(f"duplicate map key {k!r} at byte {at}")
            return m, i
        if major == 1:
            return -1 - n, i
        if major == 6:
            raise ProtocolError(f"CBOR tag {n} not allowed at byte {i}")
        # major 7 with a value below 24
        if n in _SIMPLE:
            return _SIMPLE[n], i
        raise ProtocolError(f"simple value (initial byte {ib:#04x}) not allowed at byte {i - 1}")

    try:
        value, end = item(0, 1)
    except (IndexError, struct.error):
        raise ProtocolError("truncated message") from None
    if end != size:
        raise ProtocolError(f"{size - end} trailing bytes after the top-level item")
    return value


def decode_internal(data: bytes | bytearray) -> Any:
    """Decode CBOR that one of Bento's own processes wrote: the server↔exchange
    messages and the session's files (the same strict decoder). A client's
    values (input, args) travel inside as CBOR byte strings, encoded once by the
    server and decoded by the driver, so the depth and item limits here only
    have to hold Bento's own messages: they are generous, the size unbounded."""
    return decode(bytes(data), max_size=1 << 62, max_depth=MAX_DEPTH + 4,
                  max_items=4 * DEFAULT_MAX_ITEMS, require_map=False)


# --------------------------------------------------------------------------
# Encoding.


_F64_HEAD = struct.Struct(">Bd").pack
# Non-finite floats as half precision, as cbor2 writes them.
_NONFINITE = {"nan": b"\xf9\x7e\x00", "inf": b"\xf9\x7c\x00", "-inf": b"\xf9\xfc\x00"}


def encode(value: Any, *, max_depth: int = MAX_DEPTH) -> bytes:
    """CBOR bytes of a protocol value (None, bool, int, float, str, bytes,
    list/tuple, dict with str/int/bytes keys), never with a tag.

    Raises TypeError for any other type (subclasses included) and ValueError
    for integers outside the 64-bit range, text that is not valid Unicode
    (lone surrogates) or containers nested deeper than ``max_depth`` (the
    value itself is depth 1), which also stops cycles. Integers take their
    shortest form, floats are float64 (NaN and infinities half precision).
    """
    t = type(value)
    if t is bytes:  # one string, the usual api.send value: no parts to gather
        return encode_head(2, len(value)) + value
    if t is str:
        b = value.encode("utf-8")
        return encode_head(3, len(b)) + b
    parts: list[bytes] = []
    _encode(value, 1, max_depth, parts.append)
    return b"".join(parts)


def _encode(value: Any, depth: int, max_depth: int, put: Callable[[bytes], None]) -> None:
    t = type(value)
    if t is str:
        b = value.encode("utf-8")
        put(encode_head(3, len(b)))
        put(b)
    elif t is int:
        if value >= 0:
            if value > _UINT64_MAX:
                raise ValueError(f"integer {value} is outside the 64-bit CBOR range")
            put(encode_head(0, value))
        else:
            if value < _NINT64_MIN:
                raise ValueError(f"integer {value} is outside the 64-bit CBOR range")
            put(encode_head(1, -1 - value))
    elif t is bytes:
        put(encode_head(2, len(value)))
        put(value)
    elif value is None:
        put(b"\xf6")
    elif t is bool:
        put(b"\xf5" if value else b"\xf4")
    elif t is float:
        put(_F64_HEAD(0xFB, value) if isfinite(value) else _NONFINITE[repr(value)])
    elif t is list or t is tuple:
        if depth > max_depth:
            raise ValueError(f"value nested deeper than {max_depth}")
        put(encode_head(4, len(value)))
        for x in value:
            _encode(x, depth + 1, max_depth, put)
    elif t is dict:
        if depth > max_depth:
            raise ValueError(f"value nested deeper than {max_depth}")
        put(encode_head(5, len(value)))
        for k, x in value.items():
            tk = type(k)
            if tk is not str and tk is not int and tk is not bytes:
                raise TypeError(f"map key of type {tk.__name__} cannot be encoded")
            _encode(k, depth + 1, max_depth, put)
            _encode(x, depth + 1, max_depth, put)
    else:
        raise TypeError(f"value of type {t.__name__} cannot be encoded")


_HEAD8 = struct.Struct(">BB").pack
_HEAD16 = struct.Struct(">BH").pack
_HEAD32 = struct.Struct(">BI").pack
_HEAD64 = struct.Struct(">BQ").pack


def encode_head(major: int, n: int) -> bytes:
    """The shortest CBOR initial byte(s) for major type ``major`` with argument
    ``n``. (On every frame's and every string's path: one struct per size.)"""
    mt = major << 5
    if n < 24:
        if n < 0:
            raise ValueError(f"negative CBOR argument {n}")
        return bytes((mt | n,))
    if n < 0x100:
        return _HEAD8(mt | 24, n)
    if n < 0x10000:
        return _HEAD16(mt | 25, n)
    if n < 0x100000000:
        return _HEAD32(mt | 26, n)
    if n <= _UINT64_MAX:
        return _HEAD64(mt | 27, n)
    raise ValueError(f"CBOR argument {n} exceeds 64 bits")
