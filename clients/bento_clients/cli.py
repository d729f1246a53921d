"""The ``bento`` command for people: run, attach, logs, send, status, kill, rm, ls, share.

``bento.app`` hands every subcommand except ``server`` to ``main(argv)``.
Documentation: docs/cli.md. This module talks to the server only through the
async SDK and keeps what must survive its own death (positions, unacknowledged
input) in the local state file (``bento_clients.state``).

Exit codes: ``run``/``attach``/``logs -f`` return the function's (0 ok, 1 an
exception, n for ``sys.exit(n)``, 128+n when killed by signal n); 2 is a
usage error (bad arguments, bad JSON, unreadable file); other failures of
bento itself are 125 for the streaming commands and 1 for the others.
User mistakes get one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal as signals
import sys
import time
import tomllib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

import bento
from bento_clients import sdk
from bento_clients.convert import from_json, parse_buffer, parse_limits, to_json
from bento_clients.errors import (
    BentoError,
    ConnectionLost,
    Forbidden,
    Gone,
    InputClosed,
    NotFound,
    RequestFailed,
    SessionGone,
    Unauthorized,
)
from bento_clients.frames import Exit, Frame, Gap, Msg, Stderr, Stdout
from bento_clients.state import StateFile
from bento_clients.terminal import (
    DEFAULT_DETACH_KEYS,
    KeyReader,
    ResumeFilter,
    Sinks,
    parse_detach_keys,
    raw_mode,
)

__all__ = ["main", "exit_code", "render", "normalize_url", "load_config", "build_parser"]

EXIT_USAGE = 2
CLIENT_NAME = f"bento-cli/{bento.__version__}"
EXIT_BENTO = 125  # bento itself failed (streaming commands, whose other codes are the function's)
STREAMING = ("run", "attach", "logs")
# Record the position in the state file at least this often while frames are
# backed up (otherwise after every frame): bounds what a kill -9 can repeat on
# a terminal or pipe (docs/cli.md).
RECORD_EVERY_FRAMES = 64
RECORD_EVERY_BYTES = 256 * 1024


class UsageError(Exception):
    """A mistake in what the user typed: one line, exit code 2."""


# --------------------------------------------------------------------------
# Settings: flags > environment > config file > defaults.


def config_path() -> str:
    """``$BENTO_CONFIG``, else ``$XDG_CONFIG_HOME/bento/config.toml``, else
    ``~/.config/bento/config.toml``."""
    explicit = os.environ.get("BENTO_CONFIG")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "bento", "config.toml")


CONFIG_KEYS = ("server", "api_key", "detach_keys", "connect_timeout", "reconnect_timeout")


def load_config(path: str | None = None) -> dict[str, Any]:
    """The config file's settings (TOML; keys: CONFIG_KEYS); {} when it does not exist."""
    path = path or config_path()
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"cannot read the config file {path}: {exc}") from None
    unknown = sorted(set(data) - set(CONFIG_KEYS))
    if unknown:
        raise UsageError(f"unknown setting(s) {', '.join(unknown)} in {path} (known: {', '.join(CONFIG_KEYS)})")
    return data


def normalize_url(text: str) -> str:
    """``host:port`` -> ``ws://host:port/v1``; a ws(s) URL without a path gets ``/v1``."""
    text = text.strip()
    if "://" not in text:
        text = "ws://" + text
    scheme, _, rest = text.partition("://")
    if scheme not in ("ws", "wss"):
        raise UsageError(f"bad server address {text!r}: use ws://HOST:PORT/v1 or wss://...")
    if "/" not in rest:
        rest += "/v1"
    return f"{scheme}://{rest}"


@dataclass
class Settings:
    server: str | None  # from --server or $BENTO_SERVER (wins over a session's recorded server)
    default_server: str  # config file or the default
    api_key: str | None
    json: bool
    verbose: bool
    connect_timeout: float
    reconnect_timeout: float
    detach_keys: str
    state: StateFile

    def server_for(self, entry: dict[str, Any] | None = None) -> str:
        """Where a session lives: explicit choice, else where it was started, else the default."""
        if self.server:
            return self.server
        if entry and entry.get("server"):
            return str(entry["server"])
        return self.default_server


def _settings(args: argparse.Namespace) -> Settings:
    cfg = load_config(getattr(args, "config", None))
    explicit = getattr(args, "server", None) or os.environ.get("BENTO_SERVER")
    try:
        connect_timeout = float(getattr(args, "connect_timeout", None)
                                or os.environ.get("BENTO_CONNECT_TIMEOUT") or cfg.get("connect_timeout", 10))
        reconnect_timeout = float(getattr(args, "reconnect_timeout", None) or cfg.get("reconnect_timeout", 60))
    except ValueError as exc:
        raise UsageError(f"bad timeout: {exc}") from None
    return Settings(
        server=normalize_url(explicit) if explicit else None,
        default_server=normalize_url(str(cfg.get("server") or sdk.DEFAULT_URL)),
        api_key=getattr(args, "api_key", None) or os.environ.get("BENTO_API_KEY") or cfg.get("api_key"),
        json=bool(getattr(args, "json", False)),
        verbose=bool(getattr(args, "verbose", False)),
        connect_timeout=connect_timeout,
        reconnect_timeout=reconnect_timeout,
        detach_keys=getattr(args, "detach_keys", None) or cfg.get("detach_keys") or DEFAULT_DETACH_KEYS,
        state=StateFile(getattr(args, "state_file", None)),
    )


# --------------------------------------------------------------------------
# Argument parsing.


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, no usage dump
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("common options")
    g.add_argument("--server", default=argparse.SUPPRESS,
                   help="server address (default: $BENTO_SERVER, the config file, ws://127.0.0.1:8765/v1)")
    g.add_argument("--api-key", default=argparse.SUPPRESS, help="API key (default: $BENTO_API_KEY)")
    g.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    g.add_argument("--state-file", default=argparse.SUPPRESS,
                   help="local state file (default: $BENTO_CLIENT_STATE or ~/.local/state/bento/client.json)")
    g.add_argument("--config", default=argparse.SUPPRESS, help="config file (default: ~/.config/bento/config.toml)")
    g.add_argument("--connect-timeout", type=float, default=argparse.SUPPRESS,
                   help="seconds to keep trying the first connection (default 10)")
    g.add_argument("--reconnect-timeout", type=float, default=argparse.SUPPRESS,
                   help="seconds to keep trying after a dropped connection (default 60)")
    g.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="say on stderr when the connection drops and comes back")


def build_parser() -> dict[str, argparse.ArgumentParser]:
    """One parser per command (parsed with intermixed options)."""
    parsers: dict[str, argparse.ArgumentParser] = {}

    def make(name: str, help: str) -> argparse.ArgumentParser:
        p = _Parser(prog=f"bento {name}", description=help)
        _common(p)
        parsers[name] = p
        return p

    p = make("run", "Run FILE.py's entry on the server and attach to it.")
    p.add_argument("file", help="the Python file (a module defining the entry)")
    p.add_argument("args", nargs="*", help="arguments for the entry, each as JSON ('3', '\"text\"', '[1,2]')")
    p.add_argument("--entry", default="main", help="the function to call (default main)")
    p.add_argument("--kwarg", action="append", default=[], metavar="NAME=JSON", help="a keyword argument (repeatable)")
    p.add_argument("-d", "--detach", action="store_true", help="start it, print the tokens and return at once")
    p.add_argument("--limit", action="append", default=[], metavar="SPEC",
                   help="limits, e.g. wall=30s,mem=256M,cpu=10s,out=1M,pids=64")
    p.add_argument("--network", action="store_true", help="allow network access")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="environment variable (repeatable)")
    p.add_argument("--idempotency-key", help="run at most once per key (default: a fresh key)")
    p.add_argument("--buffer", help="output buffer size, e.g. 64M")
    p.add_argument("--policy", choices=["block", "drop_oldest", "fail"], help="what a full buffer does")
    _stream_options(p)

    p = make("attach", "Attach to a session, from where this machine left off.")
    p.add_argument("token", help="owner or viewer token (or a session id this machine knows)")
    p.add_argument("--from", dest="from_seq", type=int, help="start at this frame seq instead")
    _stream_options(p)

    p = make("logs", "Print a session's retained output (read-only; a viewer token works).")
    p.add_argument("token")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new output until the end")
    p.add_argument("--from", dest="from_seq", type=int, default=1, help="start at this frame seq (default 1)")
    p.add_argument("--traceback", action="store_true", help="print the remote traceback of an exception")

    p = make("send", "Send one input value to a session (owner token).")
    p.add_argument("token")
    p.add_argument("value", nargs="?", help="the value as JSON (a bare word is an error: quote strings)")
    p.add_argument("--str", dest="text", action="store_true", help="send VALUE as a plain string, not JSON")
    p.add_argument("--eof", action="store_true", help="close the function's input instead")

    p = make("status", "Show a session's state.")
    p.add_argument("token")

    p = make("kill", "Send a signal to the function (owner token).")
    p.add_argument("token")
    p.add_argument("--signal", "-s", default="TERM", type=str.upper, choices=["INT", "TERM", "KILL"])

    p = make("rm", "Destroy a session: kill it, delete its output, forget it here (owner token).")
    p.add_argument("token")

    make("ls", "List the sessions this machine knows (and the server's, with an API key).")

    p = make("share", "Print a session's viewer token (read-only access to share).")
    p.add_argument("token")
    return parsers


def _stream_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--detach-keys", default=None,
                   help=f"key sequence that detaches (default {DEFAULT_DETACH_KEYS})")
    p.add_argument("--no-stdin", action="store_true", help="do not send the terminal's input to the function")
    p.add_argument("--traceback", action="store_true", help="print the remote traceback of an exception")


HELP = """usage: bento COMMAND [options]

commands:
  run FILE.py [ARGS...]   run a function and attach (-d: detach at once)
  attach TOKEN            attach, from where this machine left off
  logs TOKEN [-f]         print retained output (read-only)
  send TOKEN VALUE        send one input value (JSON)
  status TOKEN            show a session's state
  kill TOKEN [-s SIG]     signal the function (INT, TERM, KILL)
  rm TOKEN                destroy a session
  ls                      sessions this machine knows
  share TOKEN             print the viewer token
  server                  run a server (bento server --help)

Run 'bento COMMAND --help' for a command's options. Docs: docs/cli.md.
"""


def parse_json_arg(text: str, what: str) -> Any:
    """A JSON command-line value ({"$base64": ...} becomes bytes); UsageError if bad."""
    try:
        return from_json(json.loads(text))
    except ValueError as exc:
        raise UsageError(f"bad JSON for {what}: {text!r} ({exc}); quote strings: '\"text\"'") from None


# --------------------------------------------------------------------------
# Rendering frames.


def _json_line(value: Any) -> bytes:
    return (json.dumps(to_json(value), ensure_ascii=False) + "\n").encode()


def _one_line(text: str) -> str:
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
    what = f"{err.get('type')}: {_one_line(str(err.get('message', '')))}" if err else ""
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


def _setup_logging(settings: Settings) -> None:
    logger = logging.getLogger("bento.client")
    logger.handlers[:] = [_Notices(settings.verbose or sys.stderr.isatty())]
    logger.propagate = False


def _say(text: str) -> None:
    sys.stderr.write(text.rstrip("\n") + "\n")
    sys.stderr.flush()


def _print(text: str) -> None:
    sys.stdout.write(text.rstrip("\n") + "\n")
    sys.stdout.flush()


def _print_json(value: Any) -> None:
    _print(json.dumps(to_json(value), ensure_ascii=False))


async def _spinner(url: str) -> None:
    frames = "|/-\\"
    await trio.sleep(0.3)
    i = 0
    try:
        while True:
            sys.stderr.write(f"\r{frames[i % 4]} connecting to {url} ...")
            sys.stderr.flush()
            i += 1
            await trio.sleep(0.1)
    finally:
        if i:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


async def _with_client(settings: Settings, url: str, fn: Callable[[Any], Awaitable[int]]) -> int:
    """``fn(client)`` on a connection to ``url``, with a spinner while connecting."""
    async with trio.open_nursery() as nursery:
        spin = trio.CancelScope()
        if sys.stderr.isatty() and not settings.json:
            async def spinner() -> None:
                with spin:
                    await _spinner(url)
            nursery.start_soon(spinner)
        try:
            async with sdk.connect(url, settings.api_key, connect_timeout=settings.connect_timeout,
                                   reconnect_timeout=settings.reconnect_timeout,
                                   client_name=CLIENT_NAME) as client:
                spin.cancel()
                return await fn(client)
        finally:
            spin.cancel()


# --------------------------------------------------------------------------
# Streaming a session to the terminal.


@dataclass
class _Stream:
    settings: Settings
    session: Any  # sdk.Session
    record: bool  # write positions to the state file (and acknowledge only then)
    send_input: bool  # stdin lines become the function's input
    keys: bool  # stdin is a terminal we read in raw mode (detach keys, ctrl-c)
    control: bool  # ctrl-c / SIGINT signals the function (else it detaches)
    traceback: bool
    stop_at: int | None = None  # logs without -f: the last seq to print
    resume: ResumeFilter | None = None
    detached: bool = False
    code: int | None = None


async def _stream(st: _Stream) -> int | None:
    """Print frames until the exit frame (returns its exit code), ``stop_at``, or a
    detach (returns None). Reads stdin meanwhile (input, keys) as ``st`` says."""
    sinks = Sinks()
    s = st.session
    if st.record:
        s.auto_ack = False  # acknowledged only once recorded in the state file
    state = st.settings.state
    async with trio.open_nursery() as nursery:

        async def output() -> None:
            # Exactly once (docs/cli.md): write a frame's bytes, then record its
            # seq in the state file, then acknowledge it. Frames already received
            # are written as one batch and recorded once (the record is a file
            # rename, the costly step); a batch that is written but not recorded
            # yet when the loop stops is recorded on the way out.
            unrecorded: Frame | None = None
            batch = batch_bytes = 0
            try:
                async for frame in s.output():
                    for sink, data in render(frame, st.settings.json, st.traceback):
                        if st.resume is not None:
                            data = st.resume.filter(sink, data)
                        if data:
                            sinks.write(sink, data)
                            batch_bytes += len(data)
                    unrecorded, batch = frame, batch + 1
                    if isinstance(frame, Exit):
                        st.code = exit_code(frame.data())
                    last = st.stop_at is not None and frame.seq >= st.stop_at
                    if st.record and (isinstance(frame, Exit) or last or not s.queued
                                      or batch >= RECORD_EVERY_FRAMES or batch_bytes >= RECORD_EVERY_BYTES):
                        record(frame)
                        unrecorded, batch, batch_bytes = None, 0, 0
                        await s.ack(frame.seq)
                    if last:
                        break
            finally:
                if st.record and unrecorded is not None:
                    record(unrecorded)
            nursery.cancel_scope.cancel()

        def record(frame: Frame) -> None:
            state.record_delivery(s.id, frame.seq, sinks.sizes(),
                                  frame.data() if isinstance(frame, Exit) else None)

        def detach() -> None:
            st.detached = True
            nursery.cancel_scope.cancel()

        interrupts: list[float] = []

        async def interrupt() -> None:
            now = time.monotonic()
            interrupts[:] = [t for t in interrupts if now - t < 3] + [now]
            if not st.control or s.mode != "rw" or s.exit is not None or len(interrupts) >= 3:
                detach()
                return
            try:
                await s.signal("INT")
                if sys.stderr.isatty():
                    _say(f"bento: sent INT to the function ({st.settings.detach_keys} detaches)")
            except BentoError as exc:
                _say(f"bento: could not send INT: {exc}")

        async def signals_in() -> None:
            with trio.open_signal_receiver(signals.SIGINT, signals.SIGTERM, signals.SIGHUP) as received:
                async for signum in received:
                    if signum == signals.SIGINT:
                        await interrupt()
                    else:
                        detach()

        async def send(item: Any) -> bool:
            try:
                if item is None:
                    await s.close_input()
                else:
                    await s.send(item)
                return True
            except (InputClosed, SessionGone):
                return False

        async def lines_in() -> None:
            # os.read, not sys.stdin: a thread abandoned in a buffered read would
            # hold the buffer's lock at interpreter exit.
            buf = b""
            while True:
                data = await trio.to_thread.run_sync(os.read, 0, 65536, abandon_on_cancel=True)
                buf += data
                *lines, buf = buf.split(b"\n")
                if not data and buf:
                    lines.append(buf)
                for line in lines:
                    if not await send(line.decode("utf-8", errors="replace")):
                        return
                if not data:
                    await send(None)
                    return

        async def keys_in() -> None:
            reader = KeyReader(parse_detach_keys(st.settings.detach_keys))
            while True:
                data = await trio.to_thread.run_sync(os.read, 0, 1024, abandon_on_cancel=True)
                if not data:
                    if st.send_input:
                        await send(None)
                    return
                events = reader.feed(data)
                echo = reader.take_echo()
                if echo and st.send_input:
                    os.write(0, echo)
                for ev in events:
                    if ev.kind == "detach":
                        detach()
                        return
                    if ev.kind == "interrupt":
                        await interrupt()
                    elif ev.kind == "eof" and st.send_input:
                        await send(None)
                    elif ev.kind == "line" and st.send_input:
                        await send(ev.text)

        nursery.start_soon(output)
        nursery.start_soon(signals_in)
        if st.keys:
            nursery.start_soon(keys_in)
        elif st.send_input:
            nursery.start_soon(lines_in)
    return None if st.detached else st.code


async def _follow(settings: Settings, s: Any, *, attached: bool, stdin: bool, traceback: bool,
                  resume: ResumeFilter | None = None, stop_at: int | None = None) -> int:
    """Stream a session; returns the exit code. ``attached``: run/attach (record
    positions, detach keys, ctrl-c signals the function); else a read-only look
    (logs). ``stdin``: the terminal's input goes to the function."""
    rw = s.mode == "rw"
    keys = attached and os.isatty(0)
    st = _Stream(settings, s, record=attached, send_input=stdin and rw, keys=keys,
                 control=attached and rw, traceback=traceback, stop_at=stop_at, resume=resume)
    if keys:
        with raw_mode(0):
            code = await _stream(st)
    else:
        code = await _stream(st)
    if st.detached:
        await s.detach()
        if attached:
            token = s.token or s.viewer_token
            _say(f"bento: detached; the function keeps running. Attach again with:\n  bento attach {token}")
        return 0
    return code if code is not None else 0


# --------------------------------------------------------------------------
# Commands.


async def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    try:
        with open(args.file, encoding="utf-8") as f:
            code = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {args.file}: {getattr(exc, 'strerror', None) or exc}") from None
    fn_args = [parse_json_arg(a, f"argument {i + 1}") for i, a in enumerate(args.args)]
    kwargs: dict[str, Any] = {}
    for kv in args.kwarg:
        name, sep, value = kv.partition("=")
        if not sep or not name:
            raise UsageError(f"bad --kwarg {kv!r}: expected NAME=JSON")
        kwargs[name] = parse_json_arg(value, f"--kwarg {name}")
    env: dict[str, str] = {}
    for kv in args.env:
        name, sep, value = kv.partition("=")
        if not sep or not name:
            raise UsageError(f"bad --env {kv!r}: expected NAME=VALUE")
        env[name] = value
    try:
        limits = parse_limits(",".join(args.limit)) if args.limit else None
        buffer = parse_buffer(args.buffer, args.policy)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    url = settings.server_for()
    state = settings.state

    async def go(client: Any) -> int:
        s = await client.execute(
            code, *fn_args, entry=args.entry, kwargs=kwargs, env=env or None, limits=limits,
            buffer=buffer, network=args.network, idempotency_key=args.idempotency_key,
            attach=not args.detach)
        state.add_session({"session": s.id, "server": url, "token": s.token,
                           "viewer_token": s.viewer_token, "name": os.path.basename(args.file)})
        if args.detach:
            if settings.json:
                _print_json({"session": s.id, "token": s.token, "viewer_token": s.viewer_token})
            else:
                _print(f"session       {s.id}\ntoken         {s.token}\nviewer token  {s.viewer_token}\n"
                       f"attach with:  bento attach {s.token}\nshare with:   bento logs -f {s.viewer_token}")
            return 0
        s.input_journal = state.journal(s.id)
        return await _follow(settings, s, attached=True, stdin=not args.no_stdin, traceback=args.traceback)

    return await _with_client(settings, url, go)


def _known(settings: Settings, token: str) -> dict[str, Any] | None:
    entry = settings.state.find(token)
    if entry is None and not token.startswith(("bto_", "btv_")):
        raise UsageError(f"{token!r} is not a token (bto_... or btv_...) nor a session this machine knows")
    return entry


def _token_of(entry: dict[str, Any] | None, token: str, owner: bool = False) -> str:
    """The token to use: a session id this machine knows stands for its token."""
    if entry is not None and token == entry.get("session"):
        chosen = entry.get("token") or (None if owner else entry.get("viewer_token"))
        if chosen is None:
            raise UsageError(f"this machine does not know the owner token of {token}")
        return str(chosen)
    return token


async def cmd_attach(settings: Settings, args: argparse.Namespace) -> int:
    entry = _known(settings, args.token)
    token = _token_of(entry, args.token)
    state = settings.state
    if args.from_seq is None and entry is not None and entry.get("exit"):
        # Everything, exit frame included, was already printed here.
        data = from_json(entry["exit"])
        if sys.stderr.isatty():
            _say(f"bento: session {entry['session']} has ended ({data.get('state')}); its output was printed")
        return exit_code(data)
    if args.from_seq is not None:
        from_seq, resume_sizes = args.from_seq, None
    elif entry is not None:
        from_seq, resume_sizes = int(entry.get("delivered", 0)) + 1, entry.get("sinks") or {}
    else:
        from_seq, resume_sizes = 1, None
    pending = state.pending_input(entry["session"]) if entry else []

    async def go(client: Any) -> int:
        s = await client.attach(token, from_seq, pending_input=pending,
                                input_journal=state.journal(entry["session"]) if entry else None)
        state.add_session({"session": s.id, "server": settings.server_for(entry), "token": s.token,
                           "viewer_token": s.viewer_token})
        if entry is None and s.mode == "rw":
            s.input_journal = state.journal(s.id)
        resume = ResumeFilter(Sinks(), resume_sizes) if resume_sizes else None
        return await _follow(settings, s, attached=True, stdin=not args.no_stdin, traceback=args.traceback,
                             resume=resume)

    return await _with_client(settings, settings.server_for(entry), go)


async def cmd_logs(settings: Settings, args: argparse.Namespace) -> int:
    entry = _known(settings, args.token)
    token = _token_of(entry, args.token)

    async def go(client: Any) -> int:
        s = await client.attach(token, args.from_seq, auto_ack=False)
        stop_at = None if args.follow else int(s.attach_info.get("next_seq", 1)) - 1
        if stop_at is not None and stop_at < args.from_seq:
            return 0  # nothing retained from there
        code = await _follow(settings, s, attached=False, stdin=False, traceback=args.traceback,
                             stop_at=stop_at)
        return code if args.follow else 0

    return await _with_client(settings, settings.server_for(entry), go)


async def cmd_send(settings: Settings, args: argparse.Namespace) -> int:
    if args.eof == (args.value is not None):
        raise UsageError("bento send: give either VALUE or --eof")
    value = None
    if not args.eof:
        value = args.value if args.text else parse_json_arg(args.value, "VALUE")
    entry = _known(settings, args.token)
    token = _token_of(entry, args.token, owner=True)
    state = settings.state

    async def go(client: Any) -> int:
        pending = state.pending_input(entry["session"]) if entry else []
        s = await client.attach(token, None, auto_ack=False, pending_input=pending)
        if s.mode != "rw":
            raise Forbidden("forbidden", "sending input needs the owner token (bto_...), not a viewer token")
        state.add_session({"session": s.id, "server": settings.server_for(entry), "token": s.token})
        s.input_journal = state.journal(s.id)
        seq = await (s.close_input() if args.eof else s.send(value))
        with trio.fail_after(max(settings.reconnect_timeout, 10)):
            await s.wait_input_acked()
        await s.detach()
        if settings.json:
            _print_json({"session": s.id, "seq": seq, "accepted": True})
        return 0

    return await _with_client(settings, settings.server_for(entry), go)


def _status_lines(st: dict[str, Any]) -> str:
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


async def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    entry = _known(settings, args.token)
    token = _token_of(entry, args.token)

    async def go(client: Any) -> int:
        try:
            st = await client.status(token)
        except NotFound:
            if entry is None or not entry.get("exit"):
                raise
            ex = from_json(entry["exit"])
            st = {"session": entry["session"], "state": ex.get("state"), "created": entry.get("created"),
                  "exit": ex, "known": "locally only (the server has forgotten it)"}
            if settings.json:
                _print_json(st)
            else:
                _print(f"session   {st['session']}\nstate     {st['state']} (known here only; the server "
                       f"has cleaned it up)\nexit      code {exit_code(ex)}")
            return 0
        settings.state.update_session(st["session"], state=st.get("state"))
        if settings.json:
            _print_json(st)
        else:
            _print(_status_lines(st))
        return 0

    return await _with_client(settings, settings.server_for(entry), go)


async def cmd_kill(settings: Settings, args: argparse.Namespace) -> int:
    entry = _known(settings, args.token)
    token = _token_of(entry, args.token, owner=True)

    async def go(client: Any) -> int:
        try:
            await client.signal(token, args.signal)
        except Gone:
            _say("bento: the function has already ended")
            return 1
        if settings.json:
            _print_json({"signal": args.signal, "sent": True})
        return 0

    return await _with_client(settings, settings.server_for(entry), go)


async def cmd_rm(settings: Settings, args: argparse.Namespace) -> int:
    entry = _known(settings, args.token)
    token = _token_of(entry, args.token, owner=True)

    async def go(client: Any) -> int:
        try:
            await client.destroy(token)
        except NotFound:
            if entry is None:
                raise
            _say("bento: the server no longer knows this session; forgotten here")
        if entry is not None:
            settings.state.remove_session(entry["session"])
        if settings.json:
            _print_json({"destroyed": True})
        return 0

    return await _with_client(settings, settings.server_for(entry), go)


async def cmd_ls(settings: Settings, args: argparse.Namespace) -> int:
    entries = list(settings.state.sessions().values())
    by_server: dict[str, list[dict[str, Any]]] = {}
    for e in entries:
        by_server.setdefault(settings.server_for(e), []).append(e)
    if settings.api_key:
        by_server.setdefault(settings.server_for(), [])
    rows: list[dict[str, Any]] = []
    problems: list[str] = []

    async def one_server(url: str, known: list[dict[str, Any]]) -> None:
        try:
            async with sdk.connect(url, settings.api_key, connect_timeout=min(settings.connect_timeout, 3),
                                   reconnect_timeout=3, client_name=CLIENT_NAME) as client:
                for e in known:
                    row = {"session": e["session"], "name": e.get("name"), "created": e.get("created"),
                           "server": url, "here": True}
                    try:
                        st = await client.status(str(e.get("token") or e.get("viewer_token")))
                        row["state"] = st.get("state")
                    except NotFound:
                        row["state"] = f"{e.get('state') or 'ended'} (cleaned up)"
                    rows.append(row)
                if settings.api_key and url == settings.server_for():
                    mine = {e["session"] for e in known}
                    for st in await client.list():
                        if st.get("session") not in mine:
                            rows.append({"session": st.get("session"), "name": None, "created": st.get("created"),
                                         "server": url, "here": False, "state": st.get("state")})
        except (ConnectionLost, RequestFailed) as exc:
            problems.append(f"{url}: {exc}")
            for e in known:
                rows.append({"session": e["session"], "name": e.get("name"), "created": e.get("created"),
                             "server": url, "here": True, "state": (e.get("state") or "?") + " (unreachable)"})

    async with trio.open_nursery() as nursery:
        for url, known in by_server.items():
            nursery.start_soon(one_server, url, known)
    rows.sort(key=lambda r: r.get("created") or 0)
    if settings.json:
        _print_json(rows)
    else:
        if rows:
            _print(f"{'SESSION':<28} {'STATE':<24} {'CREATED':<19} NAME")
        for r in rows:
            created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created"])) if r.get("created") else "-"
            name = r.get("name") or ("(not started here)" if not r["here"] else "-")
            _print(f"{r['session']:<28} {str(r.get('state')):<24} {created:<19} {name}")
    for p in problems:
        _say(f"bento: {p}")
    return 0


async def cmd_share(settings: Settings, args: argparse.Namespace) -> int:
    if args.token.startswith("btv_"):
        viewer: str | None = args.token
    else:
        entry = settings.state.find(args.token)
        viewer = entry.get("viewer_token") if entry else None
        if viewer is None:
            raise UsageError("this machine does not know that session's viewer token "
                             "(the server hands it out only when the session starts)")
    if settings.json:
        _print_json({"viewer_token": viewer})
    else:
        _print(str(viewer))
    return 0


COMMANDS: dict[str, Callable[[Settings, argparse.Namespace], Awaitable[int]]] = {
    "run": cmd_run, "attach": cmd_attach, "logs": cmd_logs, "send": cmd_send, "status": cmd_status,
    "kill": cmd_kill, "rm": cmd_rm, "ls": cmd_ls, "share": cmd_share,
}


# --------------------------------------------------------------------------
# Errors as one line.


def _leaf(group: BaseExceptionGroup) -> BaseException:
    """The exception that matters in a group from nurseries (the first that is
    not a cancellation)."""
    found = sdk.leaf_exceptions(group)
    return next((e for e in found if not isinstance(e, trio.Cancelled)), found[0])


def describe_error(exc: BaseException) -> str:
    """One line for an error the user can do something about."""
    if isinstance(exc, NotFound):
        return "no session has this token (a wrong token, or the session ended and was cleaned up)"
    if isinstance(exc, Forbidden):
        return "this needs the owner token (bto_...), not a viewer token"
    if isinstance(exc, Unauthorized):
        return "the server needs an API key: give --api-key or set BENTO_API_KEY"
    if isinstance(exc, RequestFailed):
        return f"the server refused: {exc.code}: {exc.message}"
    return _one_line(str(exc)) or type(exc).__name__


def main(argv: list[str]) -> int:
    """Run one ``bento`` command; returns the process exit code."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(HELP)
        return 0 if argv else EXIT_USAGE
    command, rest = argv[0], argv[1:]
    parsers = build_parser()
    if command not in parsers:
        _say(f"bento: unknown command {command!r}\n{HELP}")
        return EXIT_USAGE
    failure = EXIT_BENTO if command in STREAMING else 1
    try:
        try:
            args = parsers[command].parse_intermixed_args(rest)
        except SystemExit as exc:  # --help
            return int(exc.code or 0)
        settings = _settings(args)
        _setup_logging(settings)
        try:
            code = trio.run(COMMANDS[command], settings, args)
        except BaseExceptionGroup as group:
            raise _leaf(group) from None
        for warning in settings.state.warnings:
            _say(f"bento: warning: {warning}")
        return code
    except UsageError as exc:
        _say(f"bento: {exc}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return failure
    except (BentoError, OSError) as exc:
        _say(f"bento: {describe_error(exc)}")
        return failure
