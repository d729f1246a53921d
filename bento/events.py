"""Structured log lines: one per session event, per refused request, and at start and stop.

``emit("session.created", session=sid, key="alice")`` writes one line through
the ``bento.events`` logger: ``session.created session=s_… key=alice`` in the
text format, one JSON object per line with ``--log-format json``. Fields are
ids, names, states and counts. Never pass a token or an API key here: the log
is read by people who must not get them (the tests grep it for token prefixes).

Refused requests come from clients, who can send them as fast as they like, so
``refused`` writes at most one line per class and peer each REFUSED_EVERY_S
seconds and counts the rest into the next line.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

log = logging.getLogger("bento.events")

REFUSED_EVERY_S = 10.0
_MAX_REFUSERS = 10_000
_refused: dict[tuple[str, str], tuple[float, int]] = {}


class Held:
    """The lines a task holds back (``held``): (level, text, extra), in order.
    Tasks it starts meanwhile inherit this; once released it holds nothing more."""

    __slots__ = ("lines", "open", "handed_on")

    def __init__(self) -> None:
        self.lines: list[tuple[int, str, dict]] = []
        self.open = True
        self.handed_on = False

    def hand_on(self) -> Held:
        """The block's end leaves these lines to whoever calls ``release``."""
        self.handed_on = True
        return self

    def release(self) -> None:
        """Write the lines held so far, in order; from now on nothing is held."""
        self.open = False
        lines, self.lines = self.lines, []  # (tasks started inside keep the object)
        for level, text, extra in lines:
            log.log(level, "%s", text, extra=extra)


_held: ContextVar[Held | None] = ContextVar("bento_events_held", default=None)


def emit(event: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one event with its fields (text: ``event k=v ...``; JSON: keys of the object)."""
    if not log.isEnabledFor(level):
        return
    text = " ".join([event] + [f"{k}={_text(v)}" for k, v in fields.items()])
    held = _held.get()
    if held is not None and held.open:
        held.lines.append((level, text, {"event": event, "fields": fields}))
        return
    log.log(level, "%s", text, extra={"event": event, "fields": fields})


@contextmanager
def held() -> Iterator[Held]:
    """Hold back the current task's lines until the block ends, then write
    them in order (also when it raises): for a request whose answer should
    not wait for its log lines, as an execute's reply does not. A block that
    hands them on (``Held.hand_on``) leaves their writing to the receiver:
    an execute's attachment writes them after its first out event (or
    once it has waited a moment for one)."""
    held = Held()
    token = _held.set(held)
    try:
        yield held
    finally:
        _held.reset(token)
        if not held.handed_on:
            held.release()


def refused(what: str, peer: str, **fields: Any) -> None:
    """A refused request of class ``what`` (bad_key, rate_limit, too_large, ...) from ``peer``."""
    now = time.monotonic()
    slot = (what, peer)
    last, skipped = _refused.get(slot, (-REFUSED_EVERY_S, 0))
    if now - last < REFUSED_EVERY_S:
        _refused[slot] = (last, skipped + 1)
        return
    if len(_refused) >= _MAX_REFUSERS:
        _refused.clear()
    _refused[slot] = (now, 0)
    emit("refused", logging.WARNING, what=what, peer=peer, **fields,
         **({"more_since_last": skipped} if skipped else {}))


def _text(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if (not text or any(c in text for c in ' "=\n')) else text


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and an event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        event = getattr(record, "event", None)
        if event is not None:
            out["event"] = event
            fields: dict[str, Any] = getattr(record, "fields", {})
            out.update({k: v for k, v in fields.items() if k not in out})
        else:
            out["message"] = record.getMessage()
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure(level: str, fmt: str) -> None:
    """Set up the root logger for the server (``fmt``: ``text`` or ``json``), in UTC."""
    handler = logging.StreamHandler()
    if fmt == "json":
        formatter: logging.Formatter = JsonFormatter()
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def exit_fields(exit: dict | None) -> dict[str, Any]:
    """What an event line says about a session's exit: code, signal, error type."""
    if not exit:
        return {}
    error: dict[str, Any] = exit["error"] if isinstance(exit.get("error"), dict) else {}
    out = {k: exit.get(k) for k in ("code", "signal") if exit.get(k) is not None}
    if error.get("type"):
        out["error"] = error["type"]
    if error.get("by"):
        out["by"] = error["by"]
    return out
