"""Ceilings, measured in the same run on the same machine as the chain figures.

- transport: a bare trio-websocket + CBOR server (``bench/bare_ws.py``, its own
  process) and the same client code the chain figures use: small-message
  ping-pong, 64 KiB out events, 100-byte records batched 64 per message,
  connect + one round trip;
- process start: ``python -I -S -c "import os; os.write(1, b'x')"`` from the
  real interpreter, time to its first byte, bare and inside the bwrap command
  line the server's sandbox backend builds.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import time

import trio
from client import StreamCount, next_message, now, open_client

HERE = os.path.dirname(os.path.abspath(__file__))
SPAWN_CODE = "import os; os.write(1, b'x')"


def real_python() -> str:
    return os.path.realpath(sys.executable)


class BareServer:
    """``bench/bare_ws.py`` as a child process, stopped by pid."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    def start(self) -> BareServer:
        self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "bare_ws.py")],
                                     stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if not line.startswith("port "):
            self.stop()
            raise RuntimeError(f"bare ws server did not start: {line!r}")
        self.port = int(line.split()[1])
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.proc = None


# -- transport ceilings ---------------------------------------------------------


async def ws_rtt(url: str, n: int, warmup: int = 50, pause: float = 0.0) -> list[float]:
    """Round trips of a small input-like message, seconds each. With ``pause``, each
    one after that many seconds of idleness: what one hop costs when both ends
    start asleep (on a VM, a wake-up of an idle vCPU)."""
    out = []
    async with open_client(url, hello=False) as c:
        for i in range(warmup + n):
            if pause:
                await trio.sleep(pause)
            t0 = now()
            await c.send({"op": "echo", "data": b"x" * 16, "seq": i})
            msg = await next_message(c)
            dt = now() - t0
            assert msg.get("ev") == "out"
            if i >= warmup:
                out.append(dt)
    return out


async def ws_stream(url: str, size: int, count: int) -> float:
    """Bytes/s of ``count`` out events of one ``size``-byte stdout frame each."""
    counter = StreamCount("bytes")
    async with open_client(url, hello=False) as c:
        await c.send({"op": "stream", "size": size, "count": count})
        while True:
            msg = await next_message(c)
            if msg.get("ev") == "done":
                break
            counter.feed(msg["frames"])
    if counter.total != size * count:
        raise RuntimeError(f"bare stream: got {counter.total} of {size * count} bytes")
    return counter.rate()


async def ws_records(url: str, size: int, batch: int, count: int) -> float:
    """Frames/s of ``count`` ``size``-byte records, ``batch`` per message."""
    counter = StreamCount("frames")
    async with open_client(url, hello=False) as c:
        await c.send({"op": "records", "size": size, "batch": batch, "count": count})
        while True:
            msg = await next_message(c)
            if msg.get("ev") == "done":
                break
            counter.feed(msg["frames"])
    if counter.total != count:
        raise RuntimeError(f"bare records: got {counter.total} of {count}")
    return counter.rate()


async def ws_connect_rtt(url: str, n: int) -> list[float]:
    """Open a connection and do one round trip, seconds each."""
    out = []
    for _ in range(n + 2):
        t0 = now()
        async with open_client(url, hello=False) as c:
            await c.send({"op": "ping", "id": 1})
            await next_message(c)
            out.append(now() - t0)
    return out[2:]


# -- process start ceilings -------------------------------------------------------


def first_byte(argv: list[str], timeout: float = 10.0, fds: tuple[int, ...] = ()) -> float:
    """Seconds from starting ``argv`` (given ``fds``) to the first byte on its stdout."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, close_fds=True, pass_fds=fds)
    try:
        assert proc.stdout is not None
        b = proc.stdout.read(1)
        dt = time.perf_counter() - t0
        if b != b"x":
            raise RuntimeError(f"{argv[0]} wrote {b!r} instead of b'x'")
        proc.wait(timeout=timeout)
        return dt
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def bare_python_argv() -> list[str]:
    return [real_python(), "-I", "-S", "-c", SPAWN_CODE]


def bwrap_argv(home_fd: int) -> list[str]:
    """The server's bwrap command line around the bare python start, with the
    directory open at ``home_fd`` as its home (the caller passes the fd on).

    Taken from ``bento_sandbox.BwrapBackend().command(...)`` with no extra
    binds (it binds sys.base_prefix itself); only the keywords its current
    signature accepts are passed."""
    import bento_sandbox

    backend = bento_sandbox.BwrapBackend()
    params = inspect.signature(backend.command).parameters
    kw = {"env": {"HOME": getattr(bento_sandbox, "HOME", "/tmp")}, "network": False, "bind": [],
          "tmp_bytes": getattr(bento_sandbox, "DEFAULT_TMP_BYTES", 64 * 1024 * 1024), "home_fd": home_fd}
    kw = {k: v for k, v in kw.items() if k in params}
    return list(backend.command(bare_python_argv(), **kw))


def spawn_samples(argv: list[str], runs: int, warmup: int = 2, fds: tuple[int, ...] = ()) -> list[float]:
    for _ in range(warmup):
        first_byte(argv, fds=fds)
    return [first_byte(argv, fds=fds) for _ in range(runs)]


def run_async(fn, *args):  # type: ignore[no-untyped-def]
    return trio.run(fn, *args)
