"""What the CLI shows: frames as bytes for the terminal, the exit frame as an
exit code and a message, status as lines, and its own one-line notes on stderr.

Pure functions of frames and dicts, apart from the small writers at the end
(``say``, ``show``, ``show_json``) and the logging handler for the SDK's
connection notices.
"""

from __future__ import annotations

import json
import logging
import re
import signal as signals
import sys
import termios
import time
from typing import Any

from bento_clients.cli_settings import EXIT_BENTO
from bento_clients.convert import to_json
from bento_clients.frames import Frame, Gap, Msg, Stderr, Stdout

__all__ = ["FUNCTION_FILE", "exit_code", "exit_message", "localized_error", "one_line", "render", "say", "setup_logging", "show", "show_json",
           "status_lines", "traceback_hint",
           "unauthorized_message"]


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


# The driver compiles the function's code under this name (bento_driver.main's
# FUNCTION_FILE: execute carries no file name); the CLI, which knows the file
# it sent, shows that file in its place.
FUNCTION_FILE = "<function>"
_FRAME_LINE = re.compile(r'^  File "(?P<file>[^"]*)", line (?P<line>\d+)(?:, in (?P<name>.+))?$', re.M)


def localized_error(data: dict[str, Any], file: str | None) -> dict[str, Any] | None:
    """The exit data's ``error`` with ``file`` in place of the driver's name for
    the function's code (in the message and the traceback); None if no error."""
    err = data.get("error")
    if not isinstance(err, dict):
        return None
    if not file:
        return err

    def local(text: Any) -> str:
        return (str(text).replace(f'File "{FUNCTION_FILE}"', f'File "{file}"')
                .replace(f"({FUNCTION_FILE}, line", f"({file}, line"))
    return {**err, "message": local(err.get("message", "")), "traceback": local(err.get("traceback") or "")}


def traceback_hint(data: dict[str, Any], file: str | None = None) -> str:
    """The line after an exception's summary: where it was raised (the innermost
    frame of the remote traceback that is not the interpreter's own, such as
    ``<frozen importlib._bootstrap>``), or where a killed function was, and how
    to see the whole traceback."""
    err = localized_error(data, file)
    if not err or not err.get("traceback"):
        return ""
    frames = [f for f in _FRAME_LINE.finditer(str(err["traceback"])) if not f["file"].startswith("<frozen ")]
    where = ""
    if frames:
        last = frames[-1]
        verb = "stopped at" if data.get("state") == "killed" else "raised at"
        where = f"{verb} {last['file']}, line {last['line']}" + (f", in {last['name']}" if last["name"] else "")
        where += "; "
    return f"bento: {where}--traceback shows the whole traceback\n"


def exit_message(data: dict[str, Any], traceback: bool = False, file: str | None = None) -> str:
    """What the exit frame says on stderr ('' when it ended normally): one line,
    or with ``traceback`` the whole remote traceback (``file``: the function's
    file, shown in place of the driver's name for it)."""
    state = data.get("state")
    err = localized_error(data, file)
    what = f"{err.get('type')}: {one_line(str(err.get('message', '')))}" if err else ""
    full = str(err["traceback"]).rstrip() + "\n" if traceback and err and err.get("traceback") else ""
    if state == "exited":
        if not err:
            return ""
        return full or what + "\n"
    if state == "killed":
        if err and err.get("type") == "LimitExceeded":
            return f"bento: killed: limit {err.get('message')} exceeded (signal {data.get('signal')})\n"
        return full + f"bento: killed by signal {data.get('signal')}\n"
    if state == "failed":
        return full + f"bento: the function could not start: {what or 'unknown reason'}\n"
    if state == "lost":
        return "bento: the session was lost (its node or exchange died); its output so far is above\n"
    return f"bento: the session ended in state {state}\n"


def render(frame: Frame, as_json: bool = False, traceback: bool = False,
           file: str | None = None) -> list[tuple[str, bytes]]:
    """The (sink, bytes) writes that show ``frame``: raw stdout/stderr bytes, msg
    values as JSON lines ``{"msg": v}`` (``"channel"`` added for named ones),
    a gap as a note on stderr, the result as a JSON line, an exception as its
    summary and a hint (``traceback``: the whole remote traceback; ``file``:
    the function's file). With ``as_json`` every frame is one JSON line on
    stdout: ``{"seq", "ch", "data"}``, the exit data as the server sent it."""
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
    message = exit_message(frame.data(), traceback, file)
    if message and not traceback:
        message += traceback_hint(frame.data(), file)
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
            say(msg if msg.startswith("bento:") else f"bento: {msg}")


def setup_logging(verbose: bool) -> None:
    logger = logging.getLogger("bento.client")
    logger.handlers[:] = [_Notices(verbose or sys.stderr.isatty())]
    logger.propagate = False


def unauthorized_message(key_sent: bool) -> str:
    """Why the server answered ``unauthorized``: a key refused, or none given."""
    if key_sent:
        return "the API key was refused (check --api-key, $BENTO_API_KEY or api_key in the config file)"
    return "the server needs an API key: give --api-key or set BENTO_API_KEY"


def say(text: str) -> None:
    """A line on stderr; ended with "\r\n" while stderr is a terminal without
    output processing (the raw mode of ``run -t``), where "\n" only moves down."""
    sys.stderr.write(text.rstrip("\n") + ("\r\n" if _raw(sys.stderr) else "\n"))
    sys.stderr.flush()


def _raw(stream: Any) -> bool:
    try:
        return stream.isatty() and not termios.tcgetattr(stream.fileno())[1] & termios.OPOST
    except (OSError, ValueError, termios.error):
        return False


class QueueLine:
    """The spinner line of an execute waiting in the server's queue: redrawn in
    place on a terminal, one line per change of position otherwise; cleared
    (``done``) once the execute is answered."""

    FRAMES = "|/-\\"

    def __init__(self) -> None:
        self.turns = 0
        self.tty = sys.stderr.isatty()

    def __call__(self, position: int) -> None:
        text = f"bento: the server is full; waiting in its queue, position {position}"
        if self.tty:
            self.turns += 1
            sys.stderr.write(f"\r{self.FRAMES[self.turns % 4]} {text}\x1b[K")
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def done(self) -> None:
        if self.tty and self.turns:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def show(text: str) -> None:
    sys.stdout.write(text.rstrip("\n") + "\n")
    sys.stdout.flush()


def show_json(value: Any) -> None:
    show(json.dumps(to_json(value), ensure_ascii=False))


def buffer_line(st: dict[str, Any], asked: dict[str, Any] | None = None) -> str:
    """The status's buffer use, saying when it is full and what that does.
    The limit and policy come from the status (``buffer``) where the server
    reports them, else from what ``run`` asked for here (``asked``)."""
    used = st.get("buffer_bytes")
    reported = st.get("buffer")
    known = {**(asked or {}), **(reported if isinstance(reported, dict) else {})}
    limit, policy = known.get("max_bytes"), known.get("policy")
    text = f"{used} bytes"
    if not isinstance(used, int) or not isinstance(limit, int):
        return text + (f" (policy {policy})" if policy else "")
    text += f" of {limit} ({100 * used // max(limit, 1)}%)"
    if used < limit or st.get("state") not in ("starting", "running"):
        return text + (f", policy {policy}" if policy else "")
    if policy == "block":
        return text + (": FULL, the function is blocked in its next write until the owner reads "
                       "(bento attach) and acknowledges output (policy block)")
    if policy == "drop_oldest":
        return text + ": FULL, the oldest unread output is being dropped (policy drop_oldest)"
    return text + (": FULL: with the server's default policy (block unless its operator changed it) the "
                   "function waits in its next write until the owner reads (bento attach)")


WAITING = {
    "recv": "for input: the function is blocked in api.recv() "
            "(send a value: bento send SESSION VALUE, or bento attach --recv)",
    "stdin": "for input: the function is blocked reading its standard input "
             "(type it in bento attach, or bento send SESSION --stdin TEXT)",
}


def waiting_line(st: dict[str, Any]) -> str | None:
    """What the function waits for, as the status's ``waiting`` line (None: no line)."""
    waiting = st.get("waiting")
    if not waiting:
        return None
    return WAITING.get(waiting, f"for input ({waiting})")


def status_lines(st: dict[str, Any], entry: dict[str, Any] | None = None) -> str:
    """``bento status`` as lines; ``entry``: the session's entry in the state file."""
    entry = entry or {}
    def when(t: Any) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if isinstance(t, int | float) else "-"

    rows = [
        ("session", st.get("session")),
        ("state", st.get("state")),
        ("waiting", waiting_line(st)),
        ("created", when(st.get("created"))),
        ("ended", when(st.get("ended"))),
        ("frames", f"retained {st.get('first_seq')}..{(st.get('next_seq') or 1) - 1}, "
                   f"acknowledged up to {st.get('acked_seq')}"),
        ("input", f"accepted up to {st.get('input_seq')}"),
        ("buffer", buffer_line(st, entry.get("buffer"))),
        ("attached", st.get("attachments")),
        ("sandbox", st.get("sandbox")),
    ]
    ex = st.get("exit")
    if isinstance(ex, dict):
        rows.append(("exit", f"code {exit_code(ex)}" + (f", result {json.dumps(to_json(ex.get('result')))}"
                                                         if ex.get("result") is not None else "")))
        if ex.get("error"):
            rows.append(("error", exit_message(ex, file=entry.get("file")).strip().removeprefix("bento: ")))
    return "\n".join(f"{k:<9} {v}" for k, v in rows if v is not None)

