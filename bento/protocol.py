"""Bento wire protocol, version 1: encoding, safe decoding and request validation.

Sans-IO, like h11: this module turns bytes into checked Python values and
values into bytes, nothing else. It must never do I/O (no sockets, files,
clocks or processes) and never import trio or any other part of bento. Its
CBOR codec (the strict ``decode``, ``encode``) is ``bento_driver.cbor``, the
project's one codec, re-exported here. It is imported by the server, by the
per-session exchange process (which must start fast and stay small) and by
clients, so it imports only the stdlib and that codec.

The contract this implements is the Bento wire protocol v1 (docs/protocol.md).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from math import isfinite

from bento_driver.cbor import (
    DEFAULT_MAX_ITEMS,
    DEFAULT_MAX_MESSAGE,
    MAX_DEPTH,
    ProtocolError,
    decode,
    decode_internal,
    encode,
    encode_head,
)

TYPE_CHECKING = False  # typing is not imported at run time: the exchange loads this module
if TYPE_CHECKING:
    from typing import Any


__all__ = [
    "BUFFER_POLICIES",
    "DEFAULT_MAX_ITEMS",
    "DEFAULT_MAX_MESSAGE",
    "ENDED_STATES",
    "ERROR_CODES",
    "LIMIT_KEYS",
    "MAX_DEPTH",
    "PROTO_VERSION",
    "SIGNALS",
    "STATES",
    "ProtocolError",
    "RequestError",
    "decode",
    "decode_internal",
    "encode",
    "encode_frame",
    "encode_head",
    "error_event",
    "event",
    "gap_frame",
    "out_event",
    "out_event_parts",
    "parse_request",
    "reply_error",
    "reply_ok",
]

PROTO_VERSION = 1

ERROR_CODES: frozenset[str] = frozenset(
    {
        "proto",
        "unauthorized",
        "forbidden",
        "not_found",
        "bad_request",
        "too_large",
        "limit",
        "conflict",
        "input_gap",
        "gone",
        "internal",
        "busy",
        "quota",
        "unavailable",
    }
)
STATES: tuple[str, ...] = ("starting", "running", "exited", "failed", "killed", "lost")
ENDED_STATES: frozenset[str] = frozenset({"exited", "failed", "killed", "lost"})
SIGNALS: frozenset[str] = frozenset({"INT", "TERM", "KILL"})
BUFFER_POLICIES: frozenset[str] = frozenset({"block", "drop_oldest", "fail"})
LIMIT_KEYS: frozenset[str] = frozenset(
    {"wall_s", "cpu_s", "memory_bytes", "pids", "output_bytes", "file_bytes"}
)


class RequestError(Exception):
    """A valid message carrying a bad request: answer with an error reply/event;
    the connection stays open."""

    def __init__(
        self, code: str, message: str, request_id: int | None = None, **extra: Any
    ) -> None:
        if code not in ERROR_CODES:
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(code, message)
        self.code = code
        self.message = message
        self.request_id = request_id
        self.extra = extra

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"




def _text(s: str) -> bytes:
    b = s.encode("utf-8")
    return encode_head(3, len(b)) + b


_CHANNELS = {ch: _text(ch) for ch in ("stdout", "stderr", "msg", "gap", "exit")}
_OUT_HEAD = b"\xa3" + _text("ev") + _text("out") + _text("session")
_FRAMES_KEY = _text("frames")


def reply_ok(request_id: int, **fields: Any) -> bytes:
    """``{"id": request_id, "ok": true, **fields}``."""
    return encode({"id": request_id, "ok": True, **fields})


def reply_error(request_id: int, code: str, message: str, **extra: Any) -> bytes:
    """``{"id": request_id, "ok": false, "error": {"code", "message", **extra}}``."""
    return encode(
        {"id": request_id, "ok": False, "error": {"code": code, "message": message, **extra}}
    )


def event(ev: str, **fields: Any) -> bytes:
    """``{"ev": ev, **fields}``."""
    return encode({"ev": ev, **fields})


def error_event(session: str | None, code: str, message: str) -> bytes:
    """``{"ev": "error", "session": session, "error": {"code", "message"}}``."""
    return event("error", session=session, error={"code": code, "message": message})


def encode_frame(seq: int, ch: str, data_cbor: bytes) -> bytes:
    """The CBOR array ``[seq, ch, data]``; ``data_cbor`` is already-encoded CBOR, spliced."""
    return frame_head(seq, ch) + data_cbor


_SEQ16, _SEQ32, _SEQ64 = struct.Struct(">BBH"), struct.Struct(">BBI"), struct.Struct(">BBQ")


def frame_head(seq: int, ch: str) -> bytes:
    """A frame's bytes before its data: the array's head, ``seq`` (its shortest
    form, as ``encode_head``'s, held to cbor2's bytes by the unit tests) and the
    channel. On every frame's path: one struct, not ``encode_head`` and a join."""
    chb = _CHANNELS.get(ch)
    if chb is None:
        chb = _text(ch)
    if seq < 0x100:
        if seq < 0:
            raise ValueError(f"negative seq {seq}")
        return (bytes((0x83, seq)) if seq < 24 else bytes((0x83, 0x18, seq))) + chb
    if seq < 0x10000:
        return _SEQ16.pack(0x83, 0x19, seq) + chb
    if seq < 0x100000000:
        return _SEQ32.pack(0x83, 0x1A, seq) + chb
    return _SEQ64.pack(0x83, 0x1B, seq) + chb


def is_exit_frame(frame: bytes | memoryview) -> bool:
    """Whether an encoded frame (``encode_frame``) is an exit frame: its channel,
    read after the seq's head, without decoding the rest."""
    info = frame[1] & 0x1F
    at = 2 + (0 if info < 24 else (1 << (info - 24)))
    return frame[at : at + 5] == _CHANNELS["exit"]


def gap_frame(from_seq: int, to_seq: int, reason: str) -> bytes:
    """A ``gap`` frame with seq ``to_seq`` standing in for frames from_seq..to_seq."""
    return encode_frame(to_seq, "gap", encode({"from": from_seq, "to": to_seq, "reason": reason}))


def out_event(session: str, frames: Sequence[bytes | memoryview]) -> bytes:
    """``{"ev": "out", "session": session, "frames": [...]}`` from already-encoded frames."""
    return b"".join(out_event_parts(session, frames))


def out_event_parts(session: str, frames: Sequence[bytes | memoryview]) -> list[bytes | memoryview]:
    """``out_event`` as pieces to send one after the other: its head, then the frames
    (no copy of them)."""
    return [b"".join((_OUT_HEAD, _text(session), _FRAMES_KEY, encode_head(4, len(frames)))), *frames]


# --------------------------------------------------------------------------
# Request validation. Each checker returns the normalised value or raises
# _BadField with the end of a sentence ("must be ...").


class _BadField(Exception):
    pass


def _any(v: Any) -> Any:
    return v


def _text_field(v: Any) -> str:
    if type(v) is not str:
        raise _BadField("must be text")
    return v


def _int_field(v: Any) -> int:
    if type(v) is not int:
        raise _BadField("must be an integer")
    return v


def _uint(v: Any) -> int:
    if type(v) is not int or v < 0:
        raise _BadField("must be an unsigned integer")
    return v


def _positive(v: Any) -> int:
    if type(v) is not int or v < 1:
        raise _BadField("must be an integer >= 1")
    return v


def _bool(v: Any) -> bool:
    if type(v) is not bool:
        raise _BadField("must be a boolean")
    return v


def _array(v: Any) -> list[Any]:
    if type(v) is not list:
        raise _BadField("must be an array")
    return v


def _kwargs(v: Any) -> dict[str, Any]:
    if type(v) is not dict or any(type(k) is not str for k in v):
        raise _BadField("must be a map with text keys")
    return v


def _env(v: Any) -> dict[str, str]:
    if type(v) is not dict or any(type(k) is not str or type(x) is not str for k, x in v.items()):
        raise _BadField("must be a map of text to text")
    return v


def _seconds(v: Any) -> int | float:
    if (type(v) is not int and type(v) is not float) or not isfinite(v) or v < 0:
        raise _BadField("must be a non-negative finite number")
    return v


_LIMIT_CHECKS: dict[str, Callable[[Any], Any]] = {
    k: _seconds if k in ("wall_s", "cpu_s") else _uint for k in LIMIT_KEYS
}


def _limits(v: Any) -> dict[str, int | float]:
    if type(v) is not dict:
        raise _BadField("must be a map")
    out = {}
    for k, x in v.items():
        check = _LIMIT_CHECKS.get(k) if type(k) is str else None
        if check is None:
            raise _BadField(f"has unknown key {k!r} (known: {', '.join(sorted(LIMIT_KEYS))})")
        try:
            out[k] = check(x)
        except _BadField as e:
            raise _BadField(f"key {k!r} {e}") from None
    return out


def _policy(v: Any) -> str:
    if type(v) is not str or v not in BUFFER_POLICIES:
        raise _BadField(f"must be one of {', '.join(sorted(BUFFER_POLICIES))}")
    return v


_BUFFER_CHECKS: dict[str, Callable[[Any], Any]] = {"max_bytes": _uint, "policy": _policy}


def _buffer(v: Any) -> dict[str, Any] | None:
    if v is None:
        return None
    if type(v) is not dict:
        raise _BadField("must be a map or null")
    out = {}
    for k, x in v.items():
        check = _BUFFER_CHECKS.get(k) if type(k) is str else None
        if check is None:
            raise _BadField(f"has unknown key {k!r} (known: max_bytes, policy)")
        try:
            out[k] = check(x)
        except _BadField as e:
            raise _BadField(f"key {k!r} {e}") from None
    return out


def _packages(v: Any) -> list[str]:
    if type(v) is not list or any(type(x) is not str for x in v):
        raise _BadField("must be an array of text (package requirements like 'pandas<3')")
    return v


def _files(v: Any) -> dict[str, bytes]:
    if type(v) is not dict or any(type(k) is not str or type(x) is not bytes for k, x in v.items()):
        raise _BadField("must be a map of relative path (text) to content (bytes)")
    return v


def _window(v: Any) -> dict[str, int] | None:
    if v is None:
        return None
    if (type(v) is not dict or set(v) != {"rows", "cols"}
            or any(type(x) is not int or not 1 <= x <= 10_000 for x in v.values())):
        raise _BadField("must be null or {'rows': 1..10000, 'cols': 1..10000}")
    return v


def _size(v: Any) -> int:
    if type(v) is not int or not 1 <= v <= 10_000:
        raise _BadField("must be an integer from 1 to 10000")
    return v


def _bytes(v: Any) -> bytes:
    if type(v) is not bytes:
        raise _BadField("must be bytes")
    return v


def _idempotency_key(v: Any) -> str:
    if type(v) is not str or not 1 <= len(v) <= 256:
        raise _BadField("must be text of 1 to 256 characters")
    return v


def _signal(v: Any) -> str:
    if type(v) is not str or v not in SIGNALS:
        raise _BadField(f"must be one of {', '.join(sorted(SIGNALS))}")
    return v


def _viewer_action(v: Any) -> str:
    if v not in ("rotate", "revoke"):
        raise _BadField("must be 'rotate' or 'revoke'")
    return v


def _one_of_function_code(msg: dict[str, Any], out: dict[str, Any]) -> None:
    if sum(out[k] is not None for k in ("function", "code", "module")) != 1:
        raise _BadField("execute needs exactly one of 'function', 'code' and 'module'")


def _one_of_data_eof(msg: dict[str, Any], out: dict[str, Any]) -> None:
    has_data = "data" in msg
    if has_data == out["eof"]:
        raise _BadField("input needs exactly one of 'data' and 'eof'")
    data = msg["data"] if has_data else None
    if out["stdin"] and has_data:
        # Bytes for the function's standard input: text goes as UTF-8.
        if type(data) is str:
            data = data.encode("utf-8")
        elif type(data) is not bytes:
            raise _BadField("input: 'data' for stdin must be bytes or text")
    out["data"] = data


def _one_of_token_session(msg: dict[str, Any], out: dict[str, Any]) -> None:
    if (out["token"] is None) == (out["session"] is None):
        raise _BadField(f"{out['op']} needs exactly one of 'token' and 'session' (a session id: admin keys only)")


_REQUIRED = object()
_TOKEN: dict[str, tuple[Callable[[Any], Any], Any]] = {"token": (_text_field, _REQUIRED)}
# A session's token, or (for an admin key) its id.
_TOKEN_OR_ID: dict[str, tuple[Callable[[Any], Any], Any]] = {
    "token": (_text_field, None), "session": (_text_field, None)}

# op -> (id required, {field: (checker, default or _REQUIRED)}, cross-field check or None).
# A default that is a list or dict is copied for each request.
_OPS: dict[
    str,
    tuple[
        bool,
        dict[str, tuple[Callable[[Any], Any], Any]],
        Callable[[dict[str, Any], dict[str, Any]], None] | None,
    ],
] = {
    "hello": (
        True,
        {
            "proto": (_int_field, _REQUIRED),
            "client": (_text_field, None),
            "auth": (_text_field, None),
        },
        None,
    ),
    "store": (True, {"name": (_text_field, _REQUIRED), "code": (_text_field, _REQUIRED)}, None),
    "execute": (
        True,
        {
            "function": (_text_field, None),
            "code": (_text_field, None),
            "entry": (_text_field, "main"),
            "args": (_array, []),
            "kwargs": (_kwargs, {}),
            "env": (_env, {}),
            "limits": (_limits, {}),
            "buffer": (_buffer, None),
            "network": (_bool, False),
            "packages": (_packages, []),
            "module": (_text_field, None),
            "files": (_files, {}),
            "tty": (_window, None),
            "idempotency_key": (_idempotency_key, None),
            "attach": (_bool, True),
            "queue": (_seconds, None),
        },
        _one_of_function_code,
    ),
    "attach": (True, {**_TOKEN, "from": (_positive, 1)}, None),
    "detach": (True, {"session": (_text_field, _REQUIRED)}, None),
    "ack": (False, {"session": (_text_field, _REQUIRED), "seq": (_uint, _REQUIRED)}, None),
    "input": (
        False,
        {"session": (_text_field, _REQUIRED), "seq": (_positive, _REQUIRED), "eof": (_bool, False),
         "stdin": (_bool, False)},
        _one_of_data_eof,
    ),
    "signal": (True, {**_TOKEN_OR_ID, "signal": (_signal, _REQUIRED)}, _one_of_token_session),
    "status": (True, _TOKEN_OR_ID, _one_of_token_session),
    "destroy": (True, _TOKEN_OR_ID, _one_of_token_session),
    "state_get": (True, _TOKEN, None),
    "list": (True, {}, None),
    "state_put": (
        True,
        {**_TOKEN, "value": (_any, _REQUIRED), "if_version": (_uint, None)},
        None,
    ),
    "ping": (True, {}, None),
    "share": (True, {**_TOKEN, "viewer": (_viewer_action, _REQUIRED)}, None),
    "resize": (True, {**_TOKEN, "rows": (_size, _REQUIRED), "cols": (_size, _REQUIRED)}, None),
    "file_get": (True, {**_TOKEN, "path": (_text_field, _REQUIRED), "offset": (_uint, 0),
                        "length": (_positive, 1 << 20)}, None),
    "file_put": (True, {**_TOKEN, "path": (_text_field, _REQUIRED), "offset": (_uint, 0),
                        "data": (_bytes, _REQUIRED)}, None),
}


def parse_request(msg: dict[str, Any]) -> dict[str, Any]:
    """Validate a decoded client message; return a new dict with "op", "id" and
    every field of that op, normalised, defaults filled in (unknown fields dropped).

    ``id`` is None for ``ack`` and ``input`` (whose ``id`` is ignored). Raises
    RequestError("bad_request", ..., request_id=<id when it is a valid uint>).
    """
    rid = msg.get("id")
    if type(rid) is not int or rid < 0:
        rid = None
    op = msg.get("op")
    if type(op) is not str:
        raise RequestError("bad_request", "missing or non-text 'op'", request_id=rid)
    spec = _OPS.get(op)
    if spec is None:
        raise RequestError("bad_request", f"unknown op {op!r}", request_id=rid)
    needs_id, fields, cross_check = spec
    if not needs_id:
        rid = None
    elif rid is None:
        raise RequestError("bad_request", f"{op}: 'id' must be an unsigned integer")
    out: dict[str, Any] = {"op": op, "id": rid}
    try:
        for name, (check, default) in fields.items():
            if name in msg:
                try:
                    out[name] = check(msg[name])
                except _BadField as e:
                    raise _BadField(f"{op}: {name!r} {e}") from None
            elif default is _REQUIRED:
                raise _BadField(f"{op}: missing field {name!r}")
            elif type(default) is list or type(default) is dict:
                out[name] = default.copy()
            else:
                out[name] = default
        if cross_check is not None:
            cross_check(msg, out)
    except _BadField as e:
        raise RequestError("bad_request", str(e), request_id=rid) from None
    return out
