"""Driver entry point: ``python -I -S -u -c 'from bento_driver.main import main; main()'``.

Runs inside the environment with fd 3 (messages from the exchange) and fd 4
(messages to the exchange). Never writes anything but framed messages to fd 4:
the exchange treats a malformed message as the function's fault.
"""

from __future__ import annotations

import _queue
import _thread
import builtins
import fcntl
import math
import os
import resource
import sys
import termios

from bento_driver import cbor, wire
from bento_driver.waits import GRACE_S, Waits, watch_stdin

# The driver starts in every environment and waits there for as long as its
# function runs: it imports the C modules (_thread, _queue, _signal) rather
# than threading, queue and signal, which bring enum, functools and
# collections into every environment (docs/performance.md).
TYPE_CHECKING = False  # typing costs every environment ~0.6 MiB and 2 ms at its start
if TYPE_CHECKING:
    import signal as _signal  # (the C module has no stubs; signal is a wrapper of it)
    import traceback
    from collections.abc import Callable
    from types import ModuleType
    from typing import Any
else:
    import _signal

    ModuleType = type(sys)  # (types is one more module to import)

IN_FD = 3
OUT_FD = 4


class StateConflict(Exception):
    """``api.state.put(..., if_version=v)`` found another version."""

    def __init__(self, version: int) -> None:
        super().__init__(f"shared state is at version {version}")
        self.version = version


class _Link:
    """Framed messages over the two pipes to the exchange.

    A reader thread takes every message from the exchange as it comes: inputs
    and replies go to queues, and a ``signal`` message is raised in the main
    thread at once (so a function blocked in a call still gets its
    KeyboardInterrupt, whatever sandbox sits between the exchange and us).
    """

    def __init__(self) -> None:
        # The exchange's messages are bounded by the session's max_message, which
        # arrives with the start message: until then, the exchange is trusted.
        self.framer = wire.Framer(1 << 31)
        self.inputs: _queue.SimpleQueue[dict | None] = _queue.SimpleQueue()
        self.replies: _queue.SimpleQueue[dict | None] = _queue.SimpleQueue()
        self.send_lock = _thread.allocate_lock()
        # The main thread reads the start message itself (no thread hand-off on
        # the way to the function's first line) and releases this when its
        # set-up is done: only then does the reader thread read, so a signal that
        # comes right after the start message interrupts the function, not the
        # set-up.
        self.go = _thread.allocate_lock()
        self.go.acquire()
        self.main_ident = _thread.get_ident()

    def send(self, msg: dict) -> None:
        wire.check(wire.FROM_DRIVER, msg)
        self.send_raw(cbor.encode(msg))

    def send_raw(self, body: bytes) -> None:
        data = wire.frame(body)
        with self.send_lock:
            n = os.write(OUT_FD, data)
            if n < len(data):  # cut short (a signal, a large message): the rest, in order
                view = memoryview(data)[n:]
                while view:
                    n = os.write(OUT_FD, view)
                    view = view[n:]

    def _parse(self) -> dict | None:
        body = self.framer.next()
        if body is None:
            return None
        msg: dict = cbor.decode_internal(body)
        return msg

    def first(self) -> dict | None:
        """The start message (the reader thread waits for ``go``)."""
        while True:
            msg = self._parse()
            if msg is not None:
                return msg
            chunk = os.read(IN_FD, 1 << 16)
            if not chunk:
                return None
            self.framer.feed(chunk)

    def start_reader(self) -> None:
        _thread.start_new_thread(self._reader, ())  # (a daemon: the process ends without it)

    def _reader(self) -> None:
        self.go.acquire()
        while True:
            msg = self._parse()
            if msg is None:
                try:
                    chunk = os.read(IN_FD, 1 << 16)
                except OSError:
                    chunk = b""
                if not chunk:
                    self.inputs.put(None)
                    self.replies.put(None)
                    return
                self.framer.feed(chunk)
                continue
            t = msg.get("t")
            if t in ("in", "eof"):
                self.inputs.put(msg)
            elif t == "signal":
                _signal.pthread_kill(self.main_ident, SIGNALS[msg["sig"]])
            else:
                self.replies.put(msg)

    def reply(self) -> dict:
        msg = self.replies.get()
        if msg is None:
            self.replies.put(None)
            raise ConnectionError("the exchange is gone")
        return msg


SIGNALS = {"INT": _signal.SIGINT, "TERM": _signal.SIGTERM}
MAX_TIMEOUT_S = 10 * 365 * 86400.0  # api.recv's timeout: longer is the same as none

def _check(value: Any, depth: int, budget: list[int]) -> None:
    """Raise TypeError/ValueError unless ``value`` is a plain protocol value."""
    budget[0] -= 1
    if budget[0] < 0:
        raise ValueError("value has too many items")
    if value is None or isinstance(value, (bool, str, bytes)):
        return
    if isinstance(value, int):
        if not -(2**64) <= value < 2**64:
            raise ValueError("integer out of the 64-bit range")
        return
    if isinstance(value, float):
        return
    if depth <= 0:
        raise ValueError("value is nested too deeply")
    if isinstance(value, (list, tuple)):
        for item in value:
            _check(item, depth - 1, budget)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(k, bool) or not isinstance(k, (str, int, bytes)):
                raise TypeError(f"map keys must be str, int or bytes, not {type(k).__name__}")
            _check(k, depth - 1, budget)
            _check(v, depth - 1, budget)
        return
    raise TypeError(f"cannot send a value of type {type(value).__name__}")


class _Encoder:
    def __init__(self, max_bytes: int, max_depth: int, max_items: int) -> None:
        self.max_bytes = max_bytes
        self.max_depth = max_depth
        self.max_items = max_items

    def __call__(self, value: Any) -> bytes:
        _check(value, self.max_depth, [self.max_items])
        data = cbor.encode(value)
        if len(data) > self.max_bytes:
            raise ValueError(f"encoded value is {len(data)} bytes, more than {self.max_bytes}")
        return data


class _State:
    def __init__(self, link: _Link, encode: _Encoder) -> None:
        self._link = link
        self._encode = encode

    def get(self) -> tuple[int, Any]:
        self._link.send({"t": "get"})
        r = self._link.reply()
        return r["version"], cbor.decode_internal(r["value"])

    def put(self, value: Any, if_version: int | None = None) -> int:
        if if_version is not None and (type(if_version) is not int or if_version < 0):
            raise TypeError(f"if_version must be a version (an int >= 0) or None, not {if_version!r}")
        data = self._encode(value)
        self._link.send({"t": "put", "v": data, "if": if_version})
        r = self._link.reply()
        if not r["ok"]:
            if r.get("error"):
                raise ValueError(r["error"])
            raise StateConflict(r["version"])
        return r["version"]


class Api:
    """The ``api`` global the function sees."""

    StateConflict = StateConflict

    def __init__(self, link: _Link, encode: _Encoder, waits: Waits) -> None:
        self._link = link
        self._encode = encode
        self._eof = False
        self._waits = waits
        self.state = _State(link, encode)

    def send(self, value: Any, channel: str | None = None) -> None:
        if channel is not None and (not isinstance(channel, str) or not channel):
            raise ValueError("channel must be a non-empty str")
        data = self._encode(value)
        # Whatever the function printed before this send goes into the stdout
        # pipe first; the exchange drains that pipe before taking the message.
        _flush()
        ch = b"" if channel is None else channel.encode("utf-8")
        if len(ch) > 255:
            raise ValueError("channel names are at most 255 bytes")
        self._link.send_raw(wire.SEND_TAG + bytes((len(ch),)) + ch + data)

    def recv(self, timeout: float | None = None) -> Any:
        if self._eof:
            raise EOFError("input is closed")
        if timeout is not None and (not isinstance(timeout, (int, float)) or math.isnan(timeout)):
            raise TypeError("timeout must be a number or None")
        if timeout is not None and timeout > MAX_TIMEOUT_S:
            timeout = None  # (longer than any session's life: the queue's wait would overflow)
        _flush()
        inputs = self._link.inputs
        left = None if timeout is None else max(0.0, timeout)
        try:
            msg = inputs.get(timeout=GRACE_S if left is None else min(left, GRACE_S))
        except _queue.Empty:
            if left is not None and left <= GRACE_S:
                raise TimeoutError("no input within the timeout") from None
            msg = self._wait(None if left is None else left - GRACE_S)
        if msg is None or msg["t"] == "eof":
            self._eof = True
            raise EOFError("input is closed")
        return cbor.decode_internal(msg["data"])

    def _wait(self, left: float | None) -> dict | None:
        """The next input once the grace period has passed without one: a wait
        for "recv", told to the exchange."""
        self._waits.enter("recv")
        try:
            return self._link.inputs.get(timeout=left)
        except _queue.Empty:
            raise TimeoutError("no input within the timeout") from None
        finally:
            self._waits.leave("recv")

    def poll(self) -> bool:
        return not self._eof and not self._link.inputs.empty()


# The file name the function's code is compiled under. The execute request
# carries no file name, so clients that know the file (the CLI) show theirs in
# its place; the source is in linecache under this name, so traceback lines
# show the function's own source as local Python would.
FUNCTION_FILE = "<function>"


def _load_source(code: str) -> None:
    """Put the function's source in linecache's cache, where tracebacks find it:
    once linecache is imported (by traceback, here or in the function).
    Imported up front, it would cost every environment ~7 ms (tokenize, re)."""
    entry = (len(code), None, code.splitlines(keepends=True), FUNCTION_FILE)

    def put(linecache: ModuleType) -> None:
        linecache.cache[FUNCTION_FILE] = entry

    if "linecache" in sys.modules:
        put(sys.modules["linecache"])
    else:
        sys.meta_path.insert(0, _WhenImported("linecache", put))


class _WhenImported:
    """A meta path finder: right after the first import of ``name`` (by
    whichever finder holds it), ``then(module)``; then it leaves."""

    def __init__(self, name: str, then: Callable[[ModuleType], None]) -> None:
        self.name, self.then = name, then

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != self.name:
            return None
        sys.meta_path.remove(self)
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(name, path, target) if find is not None else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _ThenLoader(spec.loader, self.then)
                return spec
        return None


class _ThenLoader:
    """``loader``, and ``then(module)`` once it has run the module."""

    def __init__(self, loader: Any, then: Callable[[ModuleType], None]) -> None:
        self.loader, self.then = loader, then

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        self.then(module)

    def __getattr__(self, attr: str) -> Any:  # get_source, is_package, ...: the real loader's
        return getattr(self.loader, attr)


def _without_driver(te: traceback.TracebackException) -> None:
    """Drop this module's frames from ``te`` and every exception chained to it:
    the user's traceback starts at the user's code, as it would locally."""
    import traceback

    seen: set[int] = set()
    todo = [te]
    while todo:
        t = todo.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        t.stack = traceback.StackSummary.from_list([f for f in t.stack if f.filename != __file__])
        todo += [c for c in (t.__cause__, t.__context__) if c is not None]
        todo += getattr(t, "exceptions", None) or []


def _error(exc: BaseException) -> dict:
    import traceback  # (here: most functions never fail)

    te = traceback.TracebackException.from_exception(exc)
    _without_driver(te)
    return {
        "type": type(exc).__name__,
        "message": str(exc),
        "traceback": "".join(te.format()),
    }


def _flush() -> None:
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        pass  # the function closed or broke its own streams


def warm_up() -> None:
    """Pay first-use costs before the session's code arrives: a process's first
    compile() costs ~1 ms (parser and compiler set-up), a later one ~20 us."""
    exec(compile("def _f(a, *b, **c):\n    return [x for x in b if x] or {'k': a}\n",
                 "<warm-up>", "exec"), {})


def main() -> None:
    # The function runs as a batch job (SCHED_BATCH, inherited by its threads and
    # children): woken, it does not preempt the process that woke it, its
    # exchange, which goes on to tell the server (docs/performance.md); the
    # CPU is shared as before.
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except OSError:
        pass  # (forbidden by a --sandbox-cmd wrapper: the default policy, which only schedules it sooner)
    # INT raises KeyboardInterrupt and TERM ends the function, however the
    # server was started: one started with them ignored (a background job of a
    # script ignores INT) passes that on to every process it starts, and Python
    # then installs no KeyboardInterrupt, so a "signal" request did nothing.
    _signal.signal(_signal.SIGINT, _signal.default_int_handler)
    _signal.signal(_signal.SIGTERM, _signal.SIG_DFL)
    _signal.pthread_sigmask(_signal.SIG_UNBLOCK, {_signal.SIGINT, _signal.SIGTERM})  # nor blocked
    # Line-buffered: a print() is one stdout frame, and every api call flushes
    # first, so a prompt without a newline shows before the function waits.
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    link = _Link()
    # Up first: a signal sent right after the start message must find us up.
    # Then the reader thread and the compiler's set-up, while this environment
    # waits for a session.
    link.send({"t": "up"})
    link.start_reader()
    warm_up()
    # sys.stdin wrapped while this environment waits for a session too (~0.3 ms:
    # three io objects). A terminal session has its terminal on fd 0 from its spawn.
    waits = Waits(link)
    watch_stdin(waits, os.isatty(0))
    start = link.first()
    if start is None or start.get("t") != "start":
        os._exit(70)
    # The session's own settings arrive with the code: this environment may
    # have been started ahead of time, before the session existed.
    cwd = start.get("cwd")
    if cwd:  # unsandboxed and started ahead of time: the session's own dir
        os.chdir(cwd)
        os.environ["HOME"] = cwd
    os.environ.update(start.get("env", {}))
    if start.get("tty"):
        # The terminal on fds 0-2 becomes ours: its keys' signals (ctrl-c) and
        # window changes (SIGWINCH) reach this process group.
        try:
            os.setsid()
        except OSError:
            pass  # already a session leader
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    for name, (soft, hard) in start.get("rlimits", {}).items():
        resource.setrlimit(getattr(resource, name), (soft, hard))
    encode = _Encoder(start["max_value"], start["max_depth"], start["max_items"])
    api = Api(link, encode, waits)
    report: dict[str, Any] = {"t": "exit", "kind": "return", "result": None, "error": None, "code": 0}

    # The work dir's files import each other (`from helper import x`).
    sys.path.insert(0, os.getcwd())
    packages = start.get("site")
    if packages:
        sys.path.insert(1, packages)
        if any(name.endswith(".pth") for name in os.listdir(packages)):
            import site  # only then (a few ms); with -S it adds nothing by itself

            site.addsitedir(packages)
    entry_name = start["entry"]
    link.go.release()
    try:
        if start.get("module"):
            # A project sent as files: a real import (``__file__``, relative
            # imports); ``api`` is a builtin, so every module of it sees it.
            builtins.api = api  # type: ignore[attr-defined]
            import importlib  # (only here: most sessions send code, not a project)

            module = importlib.import_module(start["module"])
        else:
            module = ModuleType("__bento__")
            module.__dict__["api"] = api
            sys.modules["__bento__"] = module
            _load_source(start["code"])
            exec(compile(start["code"], FUNCTION_FILE, "exec"), module.__dict__)
        entry = module.__dict__.get(entry_name)
        if not callable(entry):
            raise LookupError(f"the code defines no callable named {entry_name!r}")
    except BaseException as exc:  # noqa: BLE001 - every failure at load is reported
        report.update(kind="failed", error=_error(exc), code=1)
        _finish(link, report)
        return

    try:
        result = entry(*cbor.decode_internal(start["args"]), **cbor.decode_internal(start["kwargs"]))
        try:
            report["result"] = encode(result)
        except (TypeError, ValueError) as exc:
            report.update(
                code=1,
                error={"type": "ResultNotEncodable", "message": f"the return value: {exc}", "traceback": ""},
            )
    except KeyboardInterrupt as exc:
        report.update(kind="interrupted", error=_error(exc), code=1)
    except SystemExit as exc:
        status = exc.code
        if status is not None and not isinstance(status, int):
            # As Python does at exit: sys.exit("why") prints "why" to stderr, code 1.
            try:
                sys.stderr.write(f"{status}\n")
            except Exception:  # noqa: BLE001 - the function may have closed or replaced stderr
                pass
        report.update(kind="sysexit", code=status if isinstance(status, int) else (0 if status is None else 1))
    except BaseException as exc:  # noqa: BLE001 - the function's exception is its result
        report.update(code=1, error=_error(exc))
    _finish(link, report)


def _finish(link: _Link, report: dict) -> None:
    _flush()
    link.send(report)
    os._exit(0)


if __name__ == "__main__":
    main()
