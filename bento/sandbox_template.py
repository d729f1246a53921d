"""The server's side of the sandbox template (driver/bento_driver/template.py).

The pool starts it with the server when the sandbox is bwrap. Once it said
``ready`` (a fork of its own got its sandbox, checked from inside), each warm
exchange is told where it listens (the ``warm`` message's ``fork``), and so is
the exchange of a session that starts cold (its metadata's ``fork``); each
gets its environment forked from it (bento_sandbox.forked). Sessions with
network or a terminal start their own bwrap as before. When it cannot start
here, the server says why once and every environment starts its own bwrap
from then on: slower and bigger, as safe. When it ends later, the same holds
until it is started again, after a pause that doubles while it keeps ending.
Environments it forked do not depend on it after their fork.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import subprocess

import bento_driver
import trio
from bento_sandbox import DEFAULT_TMP_BYTES, forked
from bento_sandbox.unix import short_path

log = logging.getLogger("bento.sessions")

START_TIMEOUT_S = 10.0  # bwrap, the interpreter, the driver's imports and one probe fork
RESTART_FIRST_S, RESTART_MAX_S = 1.0, 60.0  # after it ended: doubled while it keeps ending within a minute
RETIRE_GRACE_S = 3.0  # a renewed one's connections made before the switch: their requests come within 2 s
SOCKET_NAME = "sandbox.sock"
PROBE = ".probe"  # the probe fork's warm directory (mkdtemp names never start with a dot)
HOMES = ("warm", "sessions")  # the data dir's directories that hold sessions' homes


class _Life:
    """One template process, watched until it ends."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self.ended = trio.Event()
        self.code: int | None = None


class SandboxTemplate:
    """The sandbox template; ``path`` is where it listens while it forks
    environments (None: not ready, not usable here, or not ``on``).

    Every ``renew_s`` seconds (0: never) a new one takes its place: a fresh
    interpreter, so the hash secret and the address layout that its forks
    share (docs/security.md) are shared for that long at most, not for the
    server's whole life. The new one listens first (the socket's
    name moves to it at once), then the old one ends once it served what
    had already come to it."""

    def __init__(self, data_dir: str, envs_dir: str, python: str, *, on: bool, renew_s: float) -> None:
        self.on = on  # (bwrap, and not --no-sandbox-template)
        self.data_dir = os.path.abspath(data_dir)
        self.sock_path = os.path.join(self.data_dir, SOCKET_NAME)
        self.envs_dir, self.python = envs_dir, python
        self.renew_s = renew_s
        self.path: str | None = None
        self.settled = trio.Event()  # it said ready, or it will not be used

    async def run(self) -> None:
        """Start it, watch it, renew it, and start it again after a pause if it
        ends (the server's nursery runs this). One that cannot start is not
        tried again: this machine does not allow what it needs, or it is broken."""
        pause = RESTART_FIRST_S
        async with trio.open_nursery() as lives:
            while True:
                try:
                    life = await self._launch(lives)
                except (OSError, RuntimeError, trio.TooSlowError) as exc:
                    log.warning("sandbox template: not used (%s); each environment starts its own bwrap",
                                str(exc) or "it did not start in time")
                    return
                finally:
                    self.settled.set()
                log.info("sandbox template started (pid %d): environments are forked from it", life.proc.pid)
                began = trio.current_time()
                life = await self._renewing(life, lives)
                self.path = None  # Environments it forked go on; new ones are a bwrap each until it is back.
                if trio.current_time() - began > RESTART_MAX_S:
                    pause = RESTART_FIRST_S
                log.warning("sandbox template ended (exit code %s); environments start their own bwrap until "
                            "it is started again in %g s", life.code, pause)
                await trio.sleep(pause)
                pause = min(2 * pause, RESTART_MAX_S)

    async def _renewing(self, life: _Life, lives: trio.Nursery) -> _Life:
        """Wait until the template ends (the last one: returned), replacing it
        with a new one every ``renew_s``; a renewal that fails leaves it in place."""
        while True:
            with trio.move_on_after(self.renew_s if self.renew_s > 0 else math.inf):
                await life.ended.wait()
                return life
            try:
                new = await self._launch(lives)
            except (OSError, RuntimeError, trio.TooSlowError) as exc:
                log.warning("sandbox template: its renewal did not start (%s); pid %d goes on",
                            str(exc) or "not in time", life.proc.pid)
                continue
            log.info("sandbox template renewed (pid %d, was %d)", new.proc.pid, life.proc.pid)
            lives.start_soon(self._retire, life)
            life = new

    @staticmethod
    async def _retire(life: _Life) -> None:
        with trio.move_on_after(RETIRE_GRACE_S):
            await life.ended.wait()  # (it serves the connections that came to it before the switch)
        if life.proc.returncode is None:
            life.proc.kill()  # (its bwrap: _watch then closes its pipes, and the template ends)

    async def _launch(self, lives: trio.Nursery) -> _Life:
        """A new template, ready and listening at ``sock_path``, watched in ``lives``."""
        proc = await self._start()
        life = _Life(proc)
        lives.start_soon(self._watch, life)
        self.path = self.sock_path
        return life

    @staticmethod
    async def _watch(life: _Life) -> None:
        proc = life.proc
        assert proc.stdout is not None
        async with trio.open_nursery() as watch:
            watch.start_soon(_relay, proc.stdout)
            life.code = await proc.wait()  # (bwrap's: it ends with the template)
            watch.cancel_scope.cancel()
        await _stop(proc)  # (a template whose bwrap was killed sees its stdin close, and ends)
        life.ended.set()

    async def _start(self) -> trio.Process:
        """Start a template; once it said ready, its socket takes ``sock_path``
        (the previous one's, if any, keeps what had come to it)."""
        os.makedirs(os.path.join(self.data_dir, "warm", PROBE, "work"), exist_ok=True)
        listen = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        fds: list[int] = []
        starting = self.sock_path + ".new"
        proc = None
        try:
            _bind(listen, starting)
            listen.listen(128)
            fds = [os.open(os.path.join(self.data_dir, d), os.O_PATH | os.O_DIRECTORY) for d in HOMES]
            fds += [os.open(os.path.dirname(os.path.abspath(bento_driver.__file__ or "")), os.O_PATH),
                    os.open(self.envs_dir, os.O_PATH | os.O_DIRECTORY)]
            argv = forked.template_argv(
                self.python, listen_fd=listen.fileno(), homes=dict(zip(HOMES, fds, strict=False)),
                probe=f"warm/{PROBE}", tmp_bytes=DEFAULT_TMP_BYTES,
                bind=[(fds[-2], f"{forked.SANDBOX_LIB}/bento_driver"), (fds[-1], "/opt/bento/envs")])
            proc = await trio.lowlevel.open_process(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                pass_fds=(listen.fileno(), *fds), start_new_session=True)
            await _ready(proc)
            os.rename(starting, self.sock_path)
        except BaseException:
            if proc is not None:
                with trio.CancelScope(shield=True):
                    await _stop(proc)
            _unlink(starting)
            raise
        finally:
            listen.close()  # (the template's copy listens)
            for fd in fds:
                os.close(fd)
        return proc


async def _ready(proc: trio.Process) -> None:
    """Wait for its ``ready`` line (RuntimeError: what it said instead)."""
    assert proc.stdout is not None
    line = b""
    with trio.fail_after(START_TIMEOUT_S):
        while not line.endswith(b"\n"):
            chunk = await proc.stdout.receive_some(4096)
            if not chunk:
                break
            line += chunk
    text = line.decode("utf-8", "replace").strip()
    if text != "ready":
        raise RuntimeError(text or f"it ended before it was ready (exit code {await proc.wait()})")


async def _relay(stdout: trio.abc.ReceiveStream) -> None:
    async for chunk in stdout:  # (it says nothing once ready: what it says is a fault)
        log.warning("sandbox template: %s", chunk.decode("utf-8", "replace").strip()[:1000])


async def _stop(proc: trio.Process) -> None:
    """No more forks from it: its bwrap killed, and its stdin closed (the
    template itself has no pid namespace to die with: that ends it).

    The whole process group: stopped while it starts, bwrap may have a child
    still setting up the sandbox (not yet in a session of its own), which waits
    for bwrap's word for ever once bwrap is gone (seen after a server was
    stopped at its start)."""
    if proc.returncode is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # (its own group: start_new_session)
        except ProcessLookupError:
            pass  # (gone meanwhile; wait() reaps it)
        await proc.wait()  # (reaped; SIGKILL cannot be ignored)
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            await pipe.aclose()


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _bind(sock: socket.socket, path: str) -> None:
    """Bind at ``path`` (a stale one of a previous run removed)."""
    _unlink(path)
    with short_path(path) as short:
        sock.bind(short)
    os.chmod(path, 0o600)
