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
import os
import socket
import subprocess

import bento_driver
import trio
from bento_sandbox import DEFAULT_TMP_BYTES, forked
from bento_sandbox.unix import short_path

log = logging.getLogger("bento.sessions")

START_TIMEOUT_S = 10.0  # bwrap, the interpreter, the driver's imports and one probe fork
RESTART_FIRST_S, RESTART_MAX_S = 1.0, 60.0  # after it ended: doubled while it keeps ending within a minute
SOCKET_NAME = "sandbox.sock"
PROBE = ".probe"  # the probe fork's warm directory (mkdtemp names never start with a dot)
HOMES = ("warm", "sessions")  # the data dir's directories that hold sessions' homes


class SandboxTemplate:
    """One sandbox template process; ``path`` is where it listens while it
    forks environments (None: not ready, not usable here, or not ``on``)."""

    def __init__(self, data_dir: str, envs_dir: str, python: str, *, on: bool) -> None:
        self.on = on  # (bwrap, and not --no-sandbox-template)
        self.data_dir = os.path.abspath(data_dir)
        self.sock_path = os.path.join(self.data_dir, SOCKET_NAME)
        self.envs_dir, self.python = envs_dir, python
        self.path: str | None = None
        self.proc: trio.Process | None = None
        self.settled = trio.Event()  # it said ready, or it will not be used

    async def run(self) -> None:
        """Start it, watch it, and start it again after a pause if it ends (the
        server's nursery runs this). One that cannot start is not tried again:
        this machine does not allow what it needs, or it is broken."""
        pause = RESTART_FIRST_S
        while True:
            try:
                await self._start()
            except (OSError, RuntimeError, trio.TooSlowError) as exc:
                log.warning("sandbox template: not used (%s); each environment starts its own bwrap",
                            str(exc) or "it did not start in time")
                await self._stop()
                return
            finally:
                self.settled.set()
            assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
            log.info("sandbox template started (pid %d): environments are forked from it", self.proc.pid)
            began = trio.current_time()
            async with trio.open_nursery() as watch:
                watch.start_soon(self._relay, self.proc.stdout)
                code = await self.proc.wait()  # (bwrap's: it ends with the template)
                watch.cancel_scope.cancel()
            await self._stop()  # (a template whose bwrap was killed sees its stdin close, and ends)
            # Environments it forked go on; new ones are a bwrap each until it is back.
            if trio.current_time() - began > RESTART_MAX_S:
                pause = RESTART_FIRST_S
            log.warning("sandbox template ended (exit code %s); environments start their own bwrap until "
                        "it is started again in %g s", code, pause)
            await trio.sleep(pause)
            pause = min(2 * pause, RESTART_MAX_S)

    @staticmethod
    async def _relay(stdout: trio.abc.ReceiveStream) -> None:
        async for chunk in stdout:  # (it says nothing once ready: what it says is a fault)
            log.warning("sandbox template: %s", chunk.decode("utf-8", "replace").strip()[:1000])

    async def _stop(self) -> None:
        """No more forks from it: its bwrap killed, and its stdin closed (the
        template itself has no pid namespace to die with: that ends it)."""
        self.path = None
        if self.proc is None:
            return
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()  # (reaped; SIGKILL cannot be ignored)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                await pipe.aclose()

    async def _start(self) -> None:
        os.makedirs(os.path.join(self.data_dir, "warm", PROBE, "work"), exist_ok=True)
        listen = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        fds: list[int] = []
        try:
            _bind(listen, self.sock_path)
            listen.listen(128)
            fds = [os.open(os.path.join(self.data_dir, d), os.O_PATH | os.O_DIRECTORY) for d in HOMES]
            fds += [os.open(os.path.dirname(os.path.abspath(bento_driver.__file__ or "")), os.O_PATH),
                    os.open(self.envs_dir, os.O_PATH | os.O_DIRECTORY)]
            argv = forked.template_argv(
                self.python, listen_fd=listen.fileno(), homes=dict(zip(HOMES, fds, strict=False)),
                probe=f"warm/{PROBE}", tmp_bytes=DEFAULT_TMP_BYTES,
                bind=[(fds[-2], f"{forked.SANDBOX_LIB}/bento_driver"), (fds[-1], "/opt/bento/envs")])
            self.proc = await trio.lowlevel.open_process(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                pass_fds=(listen.fileno(), *fds), start_new_session=True)
        finally:
            listen.close()  # (the template's copy listens)
            for fd in fds:
                os.close(fd)
        assert self.proc.stdout is not None
        line = b""
        with trio.fail_after(START_TIMEOUT_S):
            while not line.endswith(b"\n"):
                chunk = await self.proc.stdout.receive_some(4096)
                if not chunk:
                    break
                line += chunk
        text = line.decode("utf-8", "replace").strip()
        if text != "ready":
            raise RuntimeError(text or f"it ended before it was ready (exit code {await self.proc.wait()})")
        self.path = self.sock_path


def _bind(sock: socket.socket, path: str) -> None:
    """Bind at ``path`` (a stale one of a previous run removed)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    with short_path(path) as short:
        sock.bind(short)
    os.chmod(path, 0o600)
