"""Test helpers: a real server process on a free loopback port, and a raw
protocol client that speaks PROTOCOL.md byte for byte (no SDK in between).

Everything started here is stopped by pid: the server, every exchange it
started (each in its own process group) and every environment.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, NamedTuple

import cbor2
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from bento import protocol

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_TIMEOUT_S = 20.0


# Every server started and not yet stopped: the test watchdog (conftest) stops them
# by pid before it ends a run that hung.
LIVE: set[ServerProcess] = set()


# -- the host's process table, read without ever blocking the test run -----------------
#
# psutil reads /proc/<pid>/cmdline for every process whose name is 15 characters long,
# and a cmdline (or environ) read waits for that process's memory map lock: one stuck
# process anywhere on the host would hang the test reading it. So: scan with
# /proc/<pid>/stat only, and read cmdline/environ of chosen pids in a thread with a limit.


class ProcEntry(NamedTuple):
    pid: int
    comm: str
    state: str  # one letter, as in ps: R S D Z T ...
    ppid: int


def proc_entry(pid: int | str) -> ProcEntry | None:
    """One process from ``/proc/<pid>/stat`` alone; None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
    head, _, rest = raw.rpartition(b")")
    fields = rest.split()
    if len(fields) < 2:
        return None
    comm = head.partition(b"(")[2].decode("utf-8", "replace")
    return ProcEntry(int(pid), comm, fields[0].decode(), int(fields[1]))


def proc_table() -> list[ProcEntry]:
    """Every process on the host (see ``proc_entry``)."""
    entries = (proc_entry(name) for name in os.listdir("/proc") if name.isdigit())
    return [e for e in entries if e is not None]


def read_proc(pid: int, name: str, timeout: float = 2.0) -> bytes | None:
    """``/proc/<pid>/<name>`` (cmdline, environ), or None when it is gone, unreadable,
    or does not answer within ``timeout`` (the reader thread is then left behind)."""
    box: list[bytes | None] = [None]

    def read() -> None:
        try:
            with open(f"/proc/{pid}/{name}", "rb") as f:
                box[0] = f.read()
        except OSError:
            pass

    t = threading.Thread(target=read, name=f"read-proc-{pid}-{name}", daemon=True)
    t.start()
    t.join(timeout)
    return box[0] if not t.is_alive() else None


def read_pid(path: str) -> int | None:
    """The pid a pid file names, or None (missing, empty, not a number)."""
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def warm_pids(data_dir: str, name: str) -> list[int]:
    """The pids the warm directories' ``name`` files name (exchange.pid: written
    when a warm exchange prepared its directory; env.pid: once its environment is up)."""
    warm = os.path.join(data_dir, "warm")
    return [pid for d in os.listdir(warm) if (pid := read_pid(os.path.join(warm, d, name))) is not None]


def end_process(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to a child still running and reap it; SIGKILL after 10 s."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


# A function that sends 0, 1, 2, ... every 50 ms until it is stopped.
TICKS = '''
import time
def main():
    i = 0
    while True:
        api.send(i)
        i += 1
        time.sleep(0.05)
'''


class ServerProcess:
    """``bento server`` as a child process, on a free port, stopped by pid."""

    def __init__(self, data_dir: str, *extra: str, prefix: tuple[str, ...] = ()) -> None:
        self.data_dir = data_dir
        self.extra = list(extra)
        self.prefix = list(prefix)  # a command the server runs behind (it must exec the server)
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self._out = bytearray()  # what it printed on stdout
        self.log_path = os.path.join(os.path.dirname(data_dir), f"server-{os.path.basename(data_dir)}.log")

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1"

    def start(self, port: int = 0) -> ServerProcess:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "bento.app", "server", "--port", str(port),
             "--data-dir", self.data_dir, *self.extra],
            stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, cwd=ROOT,
        )
        log.close()
        LIVE.add(self)
        assert self.proc.stdout is not None
        try:
            self.port = self._wait_listening(self.proc.stdout.fileno())
        except BaseException:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc.stdout.close()
            raise
        # Keep draining stdout so the server never blocks on a full pipe; what it
        # printed stays readable (printed()).
        self._drain = threading.Thread(target=self._keep_output, args=(self.proc.stdout.fileno(),), daemon=True)
        self._drain.start()
        return self

    def _keep_output(self, fd: int) -> None:
        while chunk := os.read(fd, 65536):
            self._out += chunk

    def printed(self, until: str, timeout: float = 10) -> str:
        """What the server printed on stdout, once ``until`` is in it (bounded)."""
        deadline = time.monotonic() + timeout
        while until.encode() not in self._out:
            if time.monotonic() > deadline:
                raise AssertionError(f"{until!r} not printed within {timeout} s: {bytes(self._out)!r}")
            time.sleep(0.02)
        return self._out.decode(errors="replace")

    def _wait_listening(self, fd: int) -> int:
        """The port from the server's "listening on" line; bounded by START_TIMEOUT_S
        (a select, not a bare readline, which would wait forever on a silent server)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        buf = self._out = bytearray()
        while True:
            for line in buf.split(b"\n")[:-1]:  # complete lines only
                if b"listening on" in line:
                    return int(line.decode().rsplit(":", 1)[1].split("/")[0])
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"server did not start in {START_TIMEOUT_S} s: {buf!r} {self.read_log()}")
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"server exited: {buf!r} {self.read_log()}")
            buf += chunk

    def read_log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is None:
            return
        end_process(self.proc, sig)
        drain = getattr(self, "_drain", None)
        if drain is not None:
            drain.join(timeout=5)
        if self.proc.stdout is not None and not self.proc.stdout.closed:
            self.proc.stdout.close()

    def exchange_pids(self) -> list[int]:
        out = []
        sessions = os.path.join(self.data_dir, "sessions")
        if not os.path.isdir(sessions):
            return out
        for sid in os.listdir(sessions):
            for name in ("exchange.pid", "env.pid"):
                try:
                    with open(os.path.join(sessions, sid, name)) as f:
                        out.append(int(f.read().strip()))
                except (OSError, ValueError):
                    pass
        return out

    def stop(self) -> None:
        """Stop the server and everything it started."""
        LIVE.discard(self)
        pids = self.exchange_pids()
        self.kill(signal.SIGTERM)
        pids += self.exchange_pids()
        for pid in set(pids):
            for kill in (os.killpg, os.kill):
                try:
                    kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass


class Client:
    """A raw protocol client: requests by id, events kept in order."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.next_id = 1
        self.replies: dict[int, dict] = {}
        self.events: deque[dict] = deque()
        self.closed: ConnectionClosed | None = None

    async def send(self, msg: dict) -> None:
        await self.ws.send_message(cbor2.dumps(msg))

    async def send_raw(self, data: bytes | str) -> None:
        await self.ws.send_message(data)

    async def _read_one(self) -> None:
        raw = await self.ws.get_message()
        msg = protocol.decode(raw, max_items=10_000_000)
        if "id" in msg and "ev" not in msg:
            self.replies[msg["id"]] = msg
        else:
            self.events.append(msg)

    async def request(self, op: str, timeout: float = 15, **fields: Any) -> dict:
        rid = self.next_id
        self.next_id += 1
        await self.send({"op": op, "id": rid, **fields})
        with trio.fail_after(timeout):
            while rid not in self.replies:
                await self._read_one()
        return self.replies.pop(rid)

    async def ok(self, op: str, **fields: Any) -> dict:
        r = await self.request(op, **fields)
        assert r["ok"], r
        return r

    async def event(self, timeout: float = 15, **match: Any) -> dict:
        """The next event matching all of ``match`` (others are kept)."""
        with trio.fail_after(timeout):
            while True:
                for i, ev in enumerate(self.events):
                    if all(ev.get(k) == v for k, v in match.items()):
                        del self.events[i]
                        return ev
                await self._read_one()

    async def frames(self, session: str, until_exit: bool = True, count: int | None = None,
                     timeout: float = 20) -> list[list]:
        """Frames of ``out`` events for ``session``, up to the exit frame (or ``count``)."""
        got: list[list] = []
        with trio.fail_after(timeout):
            while True:
                ev = await self.event(ev="out", session=session, timeout=timeout)
                got.extend(ev["frames"])
                if until_exit and got and got[-1][1] == "exit":
                    return got
                if count is not None and len(got) >= count:
                    return got

    async def exit_of(self, code: str) -> dict:
        """Execute ``code`` (attached) and return its exit frame's data."""
        r = await self.ok("execute", code=code)
        return (await self.frames(r["session"]))[-1][2]

    async def close(self) -> None:
        await self.ws.aclose()


class connect:
    """``async with connect(url) as c`` — a Client that has said hello."""

    def __init__(self, url: str, auth: str | None = None, hello: bool = True) -> None:
        self.url, self.auth, self.hello = url, auth, hello

    async def __aenter__(self) -> Client:
        # Bounded close (trio-websocket's default is 60 s, and shielded): a client
        # whose message queue is full cannot finish the close handshake.
        self._cm = open_websocket_url(self.url, max_message_size=64 * 1024 * 1024,
                                      connect_timeout=10, disconnect_timeout=5)
        ws = await self._cm.__aenter__()
        self.client = Client(ws)
        if self.hello:
            fields: dict[str, Any] = {"proto": 1, "client": "tests/1"}
            if self.auth is not None:
                fields["auth"] = self.auth
            r = await self.client.request("hello", **fields)
            assert r["ok"], r
        return self.client

    async def __aexit__(self, *exc: Any) -> None:
        try:
            await self._cm.__aexit__(*exc)
        finally:
            # A server that closed first leaves trio-websocket's socket open.
            self.client.ws._stream.socket.close()


def drop(c: Client, scope: trio.CancelScope) -> None:
    """An abrupt TCP drop of ``c`` (the socket closed under the WebSocket, no
    close frame), and ``scope``, around the client's block, cancelled: the client
    must end at once, as its reader may be waiting on its full message queue,
    which nothing frees once the socket is gone (STACK.md), and a normal exit
    of its block would wait for it."""
    c.ws._stream.socket.close()
    scope.cancel()


@asynccontextmanager
async def dropped(url: str) -> AsyncIterator[Client]:
    """``async with dropped(url) as c``: a ``connect`` whose block ends in ``drop``."""
    with trio.CancelScope() as scope:
        async with connect(url) as c:
            yield c
            drop(c, scope)


@asynccontextmanager
async def conn(url: str, hello: bool = True, auth: str | None = None,
               ssl_context: Any = None) -> AsyncIterator[Client]:
    """A raw Client (that has said hello, with ``auth`` when given) that also
    ends cleanly when the server closed first: trio-websocket then neither
    closes the client's TCP socket nor stops its reader task until the server's
    TCP close arrives, so the socket is closed here (only in that case: while the
    connection is open, the normal close must run first, or a reader blocked on
    unread messages never ends)."""
    ws = None
    try:
        async with open_websocket_url(url, ssl_context=ssl_context, connect_timeout=10,
                                      disconnect_timeout=5,
                                      max_message_size=64 * 1024 * 1024) as ws:
            c = Client(ws)
            try:
                if hello:
                    fields: dict[str, Any] = {"proto": 1, "client": "tests/1"}
                    if auth is not None:
                        fields["auth"] = auth
                    r = await c.request("hello", **fields)
                    assert r["ok"], r
                yield c
            finally:
                if ws.closed is not None:
                    await ws._stream.aclose()
    finally:
        if ws is not None:
            await ws._stream.aclose()


async def close_ws(ws: Any) -> None:
    """Close a trio-websocket connection for sure: the close handshake first
    (bounded; it also frees trio-websocket's reader when that waits on its full
    message queue - closing only the socket would leave it waiting forever), then
    the socket itself, which trio-websocket leaves open when the server closed
    first (STACK.md)."""
    with trio.move_on_after(5):
        await ws.aclose()
    ws._stream.socket.close()


def data_of(frames: list[list], ch: str = "stdout") -> bytes:
    return b"".join(f[2] for f in frames if f[1] == ch)


def congestion_controls(ss_filter: str) -> list[str]:
    """The TCP congestion control of each established connection that ``ss``
    shows for ``ss_filter`` (skips the test without iproute2's ``ss``)."""
    import shutil

    import pytest

    ss = shutil.which("ss")
    if ss is None:
        pytest.skip("needs ss (iproute2) to see the connection")
    out = subprocess.run([ss, "-tinH", "state", "established", ss_filter],
                         capture_output=True, text=True, timeout=10).stdout
    found = [w for w in out.split() if w in ("cubic", "reno", "bbr", "bic", "htcp", "vegas", "dctcp")]
    assert found, out
    return found


def assert_plain_congestion(found: list[str]) -> None:
    """Each is the system's default when that is plain, else cubic or reno (bento/tcptune.py)."""
    from bento import tcptune

    plain = [name.decode() for name in tcptune.PLAIN]
    default = tcptune.system_default()
    assert set(found) <= ({default} if default in plain else set(plain)), found


async def wait_status(c, token: str, pred, timeout: float = 20, every: float = 0.05) -> dict:
    """Poll ``status`` until ``pred(status)`` holds; return that status."""
    with trio.fail_after(timeout):
        while True:
            st = await c.ok("status", token=token)
            if pred(st):
                return st
            await trio.sleep(every)


async def wait_exit(c, token: str, timeout: float = 20) -> dict:
    return await wait_status(c, token, lambda st: st["exit"] is not None, timeout)


def assert_contiguous(frames: list[list], start: int = 1) -> None:
    """Seqs go up by one (a gap frame covers from..to), with no repeats."""
    expect = start
    for seq, ch, data in frames:
        if ch == "gap":
            assert data["from"] == expect, (data, expect)
            assert seq == data["to"]
        else:
            assert seq == expect, (seq, expect, ch)
        expect = seq + 1


def self_signed(tmp_path: Any) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 and its key (PEM files in ``tmp_path``)."""
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30, stdin=subprocess.DEVNULL,
    )
    return cert, key
