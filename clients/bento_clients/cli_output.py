"""What the CLI shows: frames as bytes for the terminal, the exit frame as an
exit code and a message, status as lines, and its own one-line notes on stderr.

Pure functions of frames and dicts, apart from the small writers at the end
(``say``, ``show``, ``show_json``) and the logging handler for the SDK's
connection notices.
"""

from __future__ import annotations

import json
import logging
import signal as signals
import sys
import time
from typing import Any

from bento_clients.cli_settings import EXIT_BENTO
from bento_clients.convert import to_json
from bento_clients.frames import Frame, Gap, Msg, Stderr, Stdout

__all__ = ["exit_code", "exit_message", "one_line", "render", "say", "setup_logging", "show", "show_json",
           "status_lines"]


def _json_line(value: Any) -> bytes:
    return (json.dumps(to_json(value), ensure_ascii=False) + "\n").encode()


def one_line(text: str) -> str:
    lines = text.strip().splitlines() or [""]
    return lines[0] + (" ..." if len(lines) > 1 else "")


def exit_code(data: dict[str, Any]) -> int:
    """The CLI's exit code for an exit frame's data."""
    state = data.get("state")
    if state == "exited":
        code = data.get("code")
        return code & 0xFF if type(code) is int else 1
    if state == "killed":
        try:
            return 128 + int(signals.Signals["SIG" + str(data.get("signal"))])
        except KeyError:
            return 128 + int(signals.SIGKILL)
    if state == "lost":
        return EXIT_BENTO
    return 1


def exit_message(data: dict[str, Any], traceback: bool = False) -> str:
    """What the exit frame says on stderr ('' when it ended normally)."""
    state = data.get("state")
    err = data.get("error") if isinstance(data.get("error"), dict) else None
    what = f"{err.get('type')}: {one_line(str(err.get('message', '')))}" if err else ""
    if state == "exited":
        if not err:
            return ""
        text = what
        if traceback and err.get("traceback"):
            text = str(err["traceback"]).rstrip()
        return text + "\n"
    if state == "killed":
        if err and err.get("type") == "LimitExceeded":
            return f"bento: killed: limit {err.get('message')} exceeded (signal {data.get('signal')})\n"
        return f"bento: killed by signal {data.get('signal')}\n"
    if state == "failed":
        return f"bento: the function could not start: {what or 'unknown reason'}\n"
    if state == "lost":
        return "bento: the session was lost (its node or exchange died); its output so far is above\n"
    return f"bento: the session ended in state {state}\n"


def render(frame: Frame, as_json: bool = False, traceback: bool = False) -> list[tuple[str, bytes]]:
    """The (sink, bytes) writes that show ``frame``: raw stdout/stderr bytes, msg
    values as JSON lines ``{"msg": v}`` (``"channel"`` added for named ones),
    a gap as a note on stderr, the result as a JSON line. With ``as_json``
    every frame is one JSON line on stdout: ``{"seq", "ch", "data"}``."""
    if as_json:
        ch: str
        data: Any
        if isinstance(frame, Stdout | Stderr):
            ch, data = ("stdout" if isinstance(frame, Stdout) else "stderr"), frame.data
        elif isinstance(frame, Msg):
            ch, data = ("msg" if frame.channel is None else f"msg:{frame.channel}"), frame.value
        elif isinstance(frame, Gap):
            ch, data = "gap", {"from": frame.from_seq, "to": frame.to_seq, "reason": frame.reason}
        else:
            ch, data = "exit", frame.data()
        return [("stdout", _json_line({"seq": frame.seq, "ch": ch, "data": data}))]
    if isinstance(frame, Stdout):
        return [("stdout", frame.data)]
    if isinstance(frame, Stderr):
        return [("stderr", frame.data)]
    if isinstance(frame, Msg):
        body: dict[str, Any] = {"msg": frame.value}
        if frame.channel is not None:
            body["channel"] = frame.channel
        return [("stdout", _json_line(body))]
    if isinstance(frame, Gap):
        return [("stderr", f"bento: frames {frame.from_seq}..{frame.to_seq} are gone ({frame.reason})\n".encode())]
    writes: list[tuple[str, bytes]] = []
    if frame.result is not None:
        writes.append(("stdout", _json_line(frame.result)))
    message = exit_message(frame.data(), traceback)
    if message:
        writes.append(("stderr", message.encode()))
    return writes


# --------------------------------------------------------------------------
# Talking to people on stderr.


class _Notices(logging.Handler):
    """The SDK's connection notices (bento.client logger) as lines on stderr."""

    def __init__(self, show: bool) -> None:
        super().__init__(logging.WARNING)
        self.show = show

    def emit(self, record: logging.LogRecord) -> None:
        if self.show:
            msg = record.getMessage()
            sys.stderr.write(msg if msg.startswith("bento:") else f"bento: {msg}")
            sys.stderr.write("\n")
            sys.stderr.flush()


def setup_logging(verbose: bool) -> None:
    logger = logging.getLogger("bento.client")
    logger.handlers[:] = [_Notices(verbose or sys.stderr.isatty())]
    logger.propagate = False


def say(text: str) -> None:
    sys.stderr.write(text.rstrip("\n") + "\n")
    sys.stderr.flush()


def show(text: str) -> None:
    sys.stdout.write(text.rstrip("\n") + "\n")
    sys.stdout.flush()


def show_json(value: Any) -> None:
    show(json.dumps(to_json(value), ensure_ascii=False))



def status_lines(st: dict[str, Any]) -> str:
    def when(t: Any) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if isinstance(t, int | float) else "-"

    rows = [
        ("session", st.get("session")),
        ("state", st.get("state")),
        ("created", when(st.get("created"))),
        ("ended", when(st.get("ended"))),
        ("frames", f"retained {st.get('first_seq')}..{(st.get('next_seq') or 1) - 1}, "
                   f"acknowledged up to {st.get('acked_seq')}"),
        ("input", f"accepted up to {st.get('input_seq')}"),
        ("buffer", f"{st.get('buffer_bytes')} bytes"),
        ("attached", st.get("attachments")),
        ("sandbox", st.get("sandbox")),
    ]
    ex = st.get("exit")
    if isinstance(ex, dict):
        rows.append(("exit", f"code {exit_code(ex)}" + (f", result {json.dumps(to_json(ex.get('result')))}"
                                                         if ex.get("result") is not None else "")))
        if ex.get("error"):
            rows.append(("error", exit_message(ex).strip()))
    return "\n".join(f"{k:<9} {v}" for k, v in rows if v is not None)

