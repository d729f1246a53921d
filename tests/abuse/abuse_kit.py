"""The machinery of the sandbox abuse suite (tests/abuse/).

Every test runs one attack: Python source whose ``main()`` tries something a
sandboxed function must not be able to do, and returns a small report (or is
killed by a limit). Around each attack:

- a *health* session on its own connection runs an echo loop; its round trip
  is measured before the attack (baseline) and continuously while the attack
  runs and just after; the median must stay within 3x the baseline (with a
  floor, so a sub-millisecond baseline does not make the check flaky), and
  every echo must come back exactly once;
- the attack's processes carry a tag (their ``comm``, set with
  ``prctl(PR_SET_NAME)`` before ``main`` runs and inherited by every fork), so
  the test can see from the host side how many there are and whether any
  outlived the session; survivors are killed by pid and fail the test.

Nothing here knows what the attacks are; test_abuse.py does.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
from helpers import (
    Client,
    ProcEntry,
    ServerProcess,
    assert_contiguous,
    connect,
    data_of,
    proc_entry,
    proc_table,
    read_pid,
    read_proc,
    warm_pids,
)

from bento import protocol

MiB = 1024 * 1024
BASELINE_FLOOR_S = 0.005  # a 0.3 ms baseline must not make "3x" mean 1 ms on 2 busy cores
HEALTH_FACTOR = 3.0
ECHO_TIMEOUT_S = 5.0  # one round trip that takes longer is a broken server, not a slow one
LEFTOVER_WAIT_S = 3.0
AFTER_ECHOES = 10  # echoes after the attack ended, to see the server recovered

HAVE_BWRAP = shutil.which("bwrap") is not None

# The health session: proves the server and another session stay usable. It
# also plants a canary in its own output log and in its own home directory,
# which attacks then try to read.
HEALTH_CODE = '''
def main(canary):
    with open("canary.txt", "w") as f:
        f.write(canary)
    print(canary, flush=True)
    api.send("ready")
    n = 0
    while True:
        try:
            value = api.recv()
        except EOFError:
            return n
        api.send(value)
        n += 1
'''


def prelude(tag: str) -> str:
    """Source put before each attack: names the process ``tag`` (children inherit it)."""
    return (
        "import ctypes as _abuse_ctypes\n"
        f"_abuse_ctypes.CDLL(None).prctl(15, {tag.encode()!r}, 0, 0, 0)  # PR_SET_NAME\n"
        "del _abuse_ctypes\n"
    )


def tagged_processes(tag: str) -> list[ProcEntry]:
    """Live (non-zombie) processes whose name is ``tag`` (from /proc/<pid>/stat alone:
    see helpers.proc_table)."""
    return [p for p in proc_table() if p.comm == tag and p.state != "Z"]


def kill_processes(procs: list[ProcEntry]) -> None:
    for p in procs:
        try:
            os.kill(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def describe(procs: list[ProcEntry]) -> list[str]:
    return [f"pid {p.pid} ppid {p.ppid} state {p.state}" for p in procs]


def pid_alive(pid: int) -> bool:
    entry = proc_entry(pid)
    return entry is not None and entry.state != "Z"


def rss_of(pid: int) -> int:
    """Resident bytes of ``pid`` (0 when gone), from /proc/<pid>/statm."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


@asynccontextmanager
async def open_client(url: str) -> AsyncIterator[Client]:
    """helpers.connect, plus: the raw socket is closed even when the server went away
    first (trio-websocket leaves it open then, and warnings are errors here)."""
    cm = connect(url)
    client = await cm.__aenter__()
    try:
        yield client
    finally:
        try:
            await cm.__aexit__(None, None, None)
        finally:
            client.ws._stream.socket.close()


# -- the health session ------------------------------------------------------------


class Health:
    """An echo session on its own connection; ``echo()`` is one timed round trip."""

    def __init__(self, client: Client, sid: str, session_dir: str) -> None:
        self.c = client
        self.sid = sid
        self.session_dir = session_dir
        self.sent = 0
        self.received: list[Any] = []
        self.frames: list[list] = []
        self.errors: list[dict] = []
        self.exit: dict | None = None

    async def _pump(self) -> None:
        msg = protocol.decode(await self.c.ws.get_message(), max_items=10_000_000)
        if msg.get("ev") == "out" and msg.get("session") == self.sid:
            for frame in msg["frames"]:
                self.frames.append(frame)
                if frame[1] == "msg":
                    self.received.append(frame[2])
                elif frame[1] == "exit":
                    self.exit = frame[2]
        elif msg.get("ev") == "error":
            self.errors.append(msg)

    async def wait_ready(self, timeout: float = 20) -> None:
        with trio.fail_after(timeout):
            while not self.received:
                await self._pump()
        assert self.received == ["ready"], self.received

    async def echo(self) -> float:
        self.sent += 1
        n = self.sent
        t0 = time.perf_counter()
        await self.c.send({"op": "input", "session": self.sid, "seq": n, "data": n})
        with trio.fail_after(ECHO_TIMEOUT_S):
            while self.received[-1] != n:
                assert self.exit is None, f"the health session ended: {self.exit}"
                await self._pump()
        return time.perf_counter() - t0

    async def baseline(self, warmup: int = 5, count: int = 20) -> float:
        for _ in range(warmup):
            await self.echo()
        return statistics.median([await self.echo() for _ in range(count)])

    async def keep_echoing(self, done: trio.Event, samples: list[float], cap: int = 20_000) -> None:
        """Echo back to back while the attack runs, then AFTER_ECHOES more."""
        while not done.is_set() and len(samples) < cap:
            samples.append(await self.echo())
        for _ in range(AFTER_ECHOES):
            samples.append(await self.echo())

    async def finish(self, timeout: float = 15) -> None:
        """Close its input; it must end normally, having echoed every value exactly once."""
        await self.c.send({"op": "input", "session": self.sid, "seq": self.sent + 1, "eof": True})
        with trio.fail_after(timeout):
            while self.exit is None:
                await self._pump()
        assert not self.errors, self.errors
        assert self.received == ["ready", *range(1, self.sent + 1)], "an echo was lost or repeated"
        assert_contiguous(self.frames)
        assert self.exit == {"state": "exited", "code": 0, "signal": None, "result": self.sent,
                             "error": None}, self.exit


# -- one attack ----------------------------------------------------------------------


@dataclass
class Outcome:
    """What an attack produced, and what the host saw meanwhile."""

    session: str
    token: str
    frames: list[list]
    exit: dict
    status: dict
    took: float
    baseline: float
    samples: list[float]
    watched: dict[str, Any] = field(default_factory=dict)

    @property
    def result(self) -> Any:
        return self.exit["result"]

    @property
    def stdout(self) -> bytes:
        return data_of(self.frames)

    @property
    def stderr(self) -> bytes:
        return data_of(self.frames, "stderr")

    @property
    def enforced(self) -> dict:
        return self.status.get("enforced") or {}

    def everything(self) -> str:
        """All the attack produced (every frame, the exit), as text to search for secrets."""
        return repr(self.frames) + repr(self.status)

    def killed_by(self, limit: str) -> None:
        ex = self.exit
        assert ex["state"] == "killed", ex
        assert ex["signal"] == "KILL" and ex["code"] is None, ex
        err = ex["error"] or {}
        assert (err.get("type"), err.get("message")) == ("LimitExceeded", limit), ex

    def returned(self) -> Any:
        """The attack ran to its end and returned its report."""
        assert self.exit["state"] == "exited" and self.exit["code"] == 0, (self.exit, self.stderr[-2000:])
        return self.exit["result"]


Watcher = Callable[[trio.Event, dict], Awaitable[None]]


class Abuse:
    """One test's server (of one backend), its tag, its canaries, and the attack runner."""

    def __init__(self, server: ServerProcess, backend: str) -> None:
        self.server = server
        self.backend = backend
        self.sandboxed = backend != "none"
        self.uid = uuid.uuid4().hex[:12]
        self.tag = "bx" + self.uid  # 14 chars: a comm name is at most 15
        self.canary = f"CANARY-{uuid.uuid4().hex}"
        self.data_canary_path = os.path.join(server.data_dir, f"canary-{self.uid}.txt")
        with open(self.data_canary_path, "w") as f:
            f.write(self.canary + "-data-dir")
        self.host_paths: list[str] = []  # paths an attack tried to create on the host
        self.host_pids: list[int] = []  # filled in by tests that hand host pids to an attack
        self.health: Health | None = None
        self.attack_session_dir: str | None = None

    @property
    def url(self) -> str:
        return self.server.url

    async def warm_ready(self) -> None:
        """Until a warm environment is up (its env.pid written): the attack's execute takes it."""
        with trio.fail_after(20):
            while not warm_pids(self.server.data_dir, "env.pid"):
                await trio.sleep(0.02)

    def check_forked(self, sdir: str) -> None:
        """The session's environment is one the sandbox template forked (its pid 1 is a fork
        of the template's interpreter, not bwrap), where it can still be seen."""
        pid = read_pid(os.path.join(sdir, "env.pid"))
        cmdline = None if pid is None else read_proc(pid, "cmdline")
        if not cmdline:
            return  # it ended already (gone, or a zombie): nothing to tell
        assert b"bento_driver.template" in cmdline, f"not a forked environment: {cmdline[:200]!r}"

    def host_path(self, path: str) -> str:
        """Register a host path an attack will try to create (removed if it appears)."""
        self.host_paths.append(path)
        return path

    def session_dir(self, sid: str) -> str:
        return os.path.join(self.server.data_dir, "sessions", sid)

    async def run(self, code: str, *, args: list | None = None, limits: dict | None = None,
                  timeout: float = 30, watchers: tuple[Watcher, ...] = (),
                  after_start: Callable[[Client, dict], Awaitable[None]] | None = None) -> Outcome:
        """Run one attack under a running health session; check the server stayed healthy
        and that none of the attack's processes outlived its session."""
        async with open_client(self.url) as hc:
            r = await hc.ok("execute", code=HEALTH_CODE, args=[self.canary + "-log"])
            health = self.health = Health(hc, r["session"], self.session_dir(r["session"]))
            await health.wait_ready()
            base = await health.baseline()

            samples: list[float] = []
            watched: dict[str, Any] = {}
            done = trio.Event()
            box: dict[str, Any] = {}

            async def attack() -> None:
                # Unattached while it runs (polling status), so that this test process
                # does not spend the attack decoding its output (the echo would measure
                # us, not the server); its frames stay buffered and are read after its
                # end. An attack that needs input must be attached to get it: those
                # print little, and stay attached (a detach while frames stream wedges
                # the connection: see test_detach_while_a_flood_streams).
                try:
                    async with open_client(self.url) as c:
                        if self.backend == "forked":
                            await self.warm_ready()
                        t0 = time.monotonic()
                        rep = await c.ok("execute", code=prelude(self.tag) + code, args=args or [],
                                         limits=limits or {}, attach=after_start is not None)
                        sid = rep["session"]
                        self.attack_session_dir = self.session_dir(sid)
                        if self.backend == "forked":
                            self.check_forked(self.attack_session_dir)
                        if after_start is not None:
                            await after_start(c, rep)
                            frames = await c.frames(sid, timeout=timeout)
                            box["took"] = time.monotonic() - t0
                        else:
                            with trio.fail_after(timeout):
                                while (await c.ok("status", token=rep["token"]))["exit"] is None:
                                    await trio.sleep(0.02)
                            box["took"] = time.monotonic() - t0
                            done.set()
                            await echoed.wait()  # (each echo is bounded) not while we decode
                            await c.ok("attach", token=rep["token"], **{"from": 1})
                            frames = await c.frames(sid, timeout=timeout)
                        box["frames"], box["rep"] = frames, rep
                        box["status"] = await c.ok("status", token=rep["token"])
                finally:
                    done.set()

            echoed = trio.Event()

            async def echo() -> None:
                await health.keep_echoing(done, samples)
                echoed.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(echo)
                for watch in watchers:
                    nursery.start_soon(watch, done, watched)
                await attack()

            frames = box["frames"]
            assert_contiguous(frames)
            out = Outcome(session=box["rep"]["session"], token=box["rep"]["token"], frames=frames,
                          exit=frames[-1][2], status=box["status"], took=box["took"], baseline=base,
                          samples=samples, watched=watched)

            # Nothing of the attack outlives its session.
            leftovers = await self.wait_no_tagged()
            assert not leftovers, f"processes of the ended attack are still alive: {leftovers}"

            # The server stayed healthy all along.
            assert self.server.proc is not None and self.server.proc.poll() is None, "the server died"
            median = statistics.median(samples)
            allowed = HEALTH_FACTOR * max(base, BASELINE_FLOOR_S)
            assert median <= allowed, (
                f"echo median {median * 1000:.1f} ms during the attack, baseline {base * 1000:.1f} ms "
                f"(allowed {allowed * 1000:.1f} ms); {len(samples)} echoes, max {max(samples) * 1000:.1f} ms")
            await health.finish()
            return out

    async def wait_no_tagged(self, timeout: float = LEFTOVER_WAIT_S) -> list[str]:
        """Wait until no tagged process is left; kill and describe the ones that stay."""
        deadline = time.monotonic() + timeout
        while True:
            left = await trio.to_thread.run_sync(tagged_processes, self.tag, abandon_on_cancel=True)
            if not left:
                return []
            if time.monotonic() >= deadline:
                found = describe(left)
                kill_processes(left)
                return found
            await trio.sleep(0.05)

    def cleanup(self) -> list[str]:
        """Remove what attacks created on the host; return the leftover processes found."""
        proc = self.server.proc
        if proc is not None and proc.poll() is not None and proc.stdout is not None:
            # Killed by an attack (unsandboxed): ServerProcess.kill() skips a dead
            # server, and would leave its stdout pipe open.
            self.server._drain.join(timeout=5)
            proc.stdout.close()
        for path in self.host_paths:
            if os.path.lexists(path):
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.unlink(path)
        left = []
        deadline = time.monotonic() + 2
        while True:
            procs = tagged_processes(self.tag)
            if not procs or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        if procs:
            left = describe(procs)
            kill_processes(procs)
        return left


# -- watchers: host-side samplers that run while the attack does ------------------------


def sample_every(interval: float, name: str, fn: Callable[[], Any], in_thread: bool = False) -> Watcher:
    """A watcher that calls ``fn`` every ``interval`` s until the attack is done; the
    values land in ``watched[name]`` (a list)."""

    async def watch(done: trio.Event, watched: dict) -> None:
        values = watched.setdefault(name, [])
        while not done.is_set():
            values.append(await trio.to_thread.run_sync(fn, abandon_on_cancel=True) if in_thread else fn())
            with trio.move_on_after(interval):
                await done.wait()
        values.append(await trio.to_thread.run_sync(fn, abandon_on_cancel=True) if in_thread else fn())

    return watch


def backends(none: str = "pass", reason: str = "", bwrap_bug: str | None = None,
             server_bug: str | None = None) -> pytest.MarkDecorator:
    """Parametrize a test over the backends: bwrap (a bwrap per environment),
    forked (bwrap's sandbox template forks the environment) and none.

    ``none`` says what the unsandboxed backend does with the attack: ``pass`` (the
    exchange or rlimits contain it there too), ``xfail`` (it needs a real sandbox: a
    strict xfail, so an unexpected pass is reported), ``skip`` (it would harm this
    machine if nothing contained it) or ``racy-bug`` (a bug that shows in some runs
    only: a non-strict xfail, reported as XPASS when it does not show). ``server_bug``
    marks a bug that is not the sandbox's as a strict xfail on both. ``bwrap_bug`` marks a known sandbox bug as a
    strict xfail on bwrap."""
    bwrap_marks = [pytest.mark.skipif(not HAVE_BWRAP, reason="bubblewrap (bwrap) is not installed")]
    if server_bug:
        # Not about the sandbox: the same bug shows with either backend.
        bwrap_bug = None
        bwrap_marks.append(pytest.mark.xfail(strict=True, reason=f"server bug: {server_bug}"))
        none, reason = "bug", server_bug
    if bwrap_bug:
        bwrap_marks.append(pytest.mark.xfail(strict=True, reason=f"sandbox bug: {bwrap_bug}"))
    if none == "pass":
        none_marks: list[pytest.MarkDecorator] = []
    elif none == "xfail":
        none_marks = [pytest.mark.xfail(strict=True, reason=f"needs a sandbox: {reason}")]
    elif none == "bug":
        none_marks = [pytest.mark.xfail(strict=True, reason=f"server bug: {reason}")]
    elif none == "racy-bug":
        # Not strict: the bug shows in some runs only; a pass is reported as XPASS.
        none_marks = [pytest.mark.xfail(strict=False, reason=f"bug (racy): {reason}")]
    elif none == "skip":
        none_marks = [pytest.mark.skip(reason=f"not run unsandboxed: {reason}")]
    else:
        raise ValueError(none)
    return pytest.mark.parametrize("backend", [
        pytest.param("bwrap", marks=bwrap_marks, id="bwrap"),
        pytest.param("forked", marks=bwrap_marks, id="forked"),
        pytest.param("none", marks=none_marks, id="none"),
    ], indirect=True)
