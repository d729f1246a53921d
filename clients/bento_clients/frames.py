"""Typed output frames: what ``Session.output()`` yields.

One small frozen dataclass per channel of the protocol's ``out`` frames, each
with its ``seq``. Pure (no trio, no I/O): the SDK, the CLI and the tests
build frames from wire triples with ``frame_from_wire``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeAlias

__all__ = ["EOF", "Exit", "Frame", "Gap", "Msg", "Stderr", "Stdin", "Stdout", "frame_from_wire"]


@dataclass(frozen=True, slots=True)
class Stdout:
    """Raw bytes the function wrote to its stdout (a chunk, not a line)."""

    seq: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Stderr:
    """Raw bytes the function wrote to its stderr."""

    seq: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Msg:
    """A value the function passed to ``api.send(value, channel=...)``.

    ``channel`` is None for the default channel (wire ``"msg"``), ``"x"`` for
    ``"msg:x"``; a channel this client does not know arrives here too, with
    ``channel`` set to the whole wire name."""

    seq: int
    value: Any
    channel: str | None = None


@dataclass(frozen=True, slots=True)
class Gap:
    """Frames ``from_seq``..``to_seq`` are gone (dropped by ``drop_oldest`` or
    trimmed after an owner's ack) before this attachment read them. Loss is
    never silent: this frame stands in for them; its ``seq`` is ``to_seq``."""

    seq: int
    from_seq: int
    to_seq: int
    reason: str


@dataclass(frozen=True, slots=True)
class Exit:
    """Always the last frame: how the function ended.

    ``state``: exited | failed | killed | lost; ``code``: the exit code (None
    unless exited); ``signal``: e.g. "KILL" when killed; ``result``: the
    entry's return value; ``error``: ``{"type", "message", "traceback"}`` or
    None."""

    seq: int
    state: str
    code: int | None
    signal: str | None
    result: Any
    error: dict[str, Any] | None

    @property
    def ok(self) -> bool:
        """True when the function returned normally (exited with code 0)."""
        return self.state == "exited" and self.code == 0

    def data(self) -> dict[str, Any]:
        """The wire form of this frame's data."""
        return {"state": self.state, "code": self.code, "signal": self.signal,
                "result": self.result, "error": self.error}


Frame: TypeAlias = Stdout | Stderr | Msg | Gap | Exit


class _Eof:
    """The input item that closes the function's input (``close_input()``)."""

    _instance: _Eof | None = None

    def __new__(cls) -> _Eof:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "EOF"


EOF = _Eof()


@dataclass(frozen=True, slots=True)
class Stdin:
    """The input item for the function's standard input (``write_stdin()``): bytes,
    or None for its eof (``close_stdin()``). Other items go to ``api.recv()``."""

    data: bytes | None


def _int_or_none(v: Any) -> int | None:
    return v if type(v) is int else None


def _str_or_none(v: Any) -> str | None:
    return v if type(v) is str else None


def frame_from_wire(seq: int, ch: str, data: Any) -> Frame:
    """The typed frame for the wire triple ``[seq, ch, data]``.

    Raises ValueError when ``data`` does not have the shape its channel needs."""
    if ch == "stdout" or ch == "stderr":
        if type(data) is not bytes:
            raise ValueError(f"{ch} frame {seq}: data is not bytes")
        return Stdout(seq, data) if ch == "stdout" else Stderr(seq, data)
    if ch == "gap":
        if not isinstance(data, dict) or type(data.get("from")) is not int or type(data.get("to")) is not int:
            raise ValueError(f"gap frame {seq}: data needs integer 'from' and 'to'")
        return Gap(seq, data["from"], data["to"], str(data.get("reason", "")))
    if ch == "exit":
        if not isinstance(data, dict) or type(data.get("state")) is not str:
            raise ValueError(f"exit frame {seq}: data needs a text 'state'")
        err = data.get("error")
        return Exit(seq, data["state"], _int_or_none(data.get("code")), _str_or_none(data.get("signal")),
                    data.get("result"), err if isinstance(err, dict) else None)
    if ch == "msg":
        return Msg(seq, data, None)
    if ch.startswith("msg:"):
        return Msg(seq, data, ch[4:])
    return Msg(seq, data, ch)
