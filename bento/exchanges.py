"""The server's side of the exchanges: starting them (cold, or warm through
bento/warm_pool.py) and connecting to them.

An exchange is started with ``python -I -S`` (cold, for one session directory,
or warm, ahead of any session), or forked from the exchange template
(bento/exchange_template.py) while executes come fast; it talks to the server
over a Unix socket (bento/exchange_link.py).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
from collections.abc import Callable
from typing import Any

import bento_driver
import trio
from bento_sandbox.unix import short_path

from bento import pool_sizing
from bento.exchange_link import SPAWN_TIMEOUT_S, ExchangeLink, kill_pid, last_log_line
from bento.exchange_paths import compile_driver, driver_sys_path, exchange_sys_path, real_python
from bento.sandbox_template import SandboxTemplate
from bento.template_link import Template, TemplateUnavailable
from bento.warm_pool import RETRY_FIRST_S, WarmPool

log = logging.getLogger("bento.sessions")

# Executes a second from which warm exchanges are forked from the template: a fork
# costs far less CPU than a process of its own, but its session's first output
# comes later (docs/performance.md); below this rate the CPU is there to spare.
TEMPLATE_RATE = 8.0


class Exchanges(WarmPool):
    """Starts exchanges (cold or warm) and connects to them."""

    def __init__(self, config: Any, nursery: trio.Nursery) -> None:
        self.config = config
        self.nursery = nursery
        self.sys_path = exchange_sys_path()
        self.driver_path = driver_sys_path()
        package = os.path.dirname(os.path.abspath(bento_driver.__file__ or ""))
        if not compile_driver(package):
            log.warning("cannot write the driver's bytecode in %s: each environment compiles it at its "
                        "start (slower, and ~1 MiB more each); make the directory writable once, or "
                        "run python -m compileall on it", package)
        self.python = real_python()
        self.boot = (f"import sys;sys.path[:0]={self.sys_path!r};"
                     "from bento.exchange import main;main(sys.argv[1:])")
        self.warm: list[ExchangeLink] = []
        self.warm_dir = os.path.join(config.data_dir, "warm")
        # Every sandbox binds it (read-only): a warm one may get a session with packages.
        self.envs_dir = os.path.join(os.path.abspath(config.data_dir), "envs")
        os.makedirs(self.envs_dir, exist_ok=True)
        shutil.rmtree(self.warm_dir, ignore_errors=True)  # homes of warm exchanges of a previous run
        os.makedirs(self.warm_dir, exist_ok=True)
        self.warm_wanted = trio.Event()
        # Not for --sandbox-cmd: its command prefix may tie a process to its cwd.
        self.pool_size = config.pool_size if config.sandbox in ("bwrap", "none") else 0
        maximum = getattr(config, "pool_max", None)
        self.sizing = pool_sizing.PoolSizing(
            self.pool_size, pool_sizing.default_maximum(self.pool_size) if maximum is None else maximum)
        # Warm starts at once. Not one per core: much of a start is waiting (bwrap's namespaces
        # and mounts, the driver's imports from disk: docs/performance.md).
        self.parallel = pool_sizing.MAX_PER_CORE * (os.cpu_count() or 1)
        self.starting = 0  # warm starts under way
        self.pause = RETRY_FIRST_S  # before the next start, after a failure
        self.retry_at = 0.0
        self.failing = False
        self.taken_at = -1.0
        self.first_hops = trio.Event()  # set when the latest taken one's first output is in
        self.first_hops.set()
        # Exchanges are forked from it (bento/exchange_template.py), warm or not (with no
        # pool too: a cold start's exchange); None: each its own process.
        self.template: Template | None = (
            Template([self.python, "-I", "-S", "-c", self.boot], nursery) if config.pool_template else None)
        # Environments are forked from it (driver/bento_driver/template.py); else a bwrap each.
        self.sandbox_template = SandboxTemplate(config.data_dir, self.envs_dir, self.python,
                                                on=config.sandbox == "bwrap" and config.sandbox_template,
                                                renew_s=config.sandbox_template_renew_s)

    async def _start_template(self) -> None:
        try:
            if self.template is not None:
                await self.template.start()
        except TemplateUnavailable as exc:
            self._no_template(exc)

    def _no_template(self, exc: TemplateUnavailable) -> None:
        log.warning("warm pool: %s; exchanges start as their own processes from now on", exc)
        self.template = None

    async def _start_warm_process(self) -> tuple[socket.socket, int, Callable[[], None]]:
        """A new warm exchange, forked from the template (bento/exchange_template.py)
        or, without one, started as its own process: (the server's end of its
        link, its pid, what kills it). From the template only while executes
        come fast (TEMPLATE_RATE)."""
        if self.template is not None and self.sizing.rate(trio.current_time()) >= TEMPLATE_RATE:
            try:
                ours, pid = await self.template.fork_warm()
            except TemplateUnavailable as exc:
                self._no_template(exc)
            else:
                # By pid (the template's child, reaped by the kernel): used only for one
                # that did not answer within WARM_TIMEOUT_S and so most likely still runs.
                return ours, pid, lambda: kill_pid(pid)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            proc = await self._own_process(["--warm", str(theirs.fileno())], subprocess.DEVNULL,
                                           subprocess.DEVNULL, (theirs.fileno(),))
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return ours, proc.pid, proc.kill

    async def _own_process(self, args: list[str], stdout: int, stderr: int,
                           pass_fds: tuple[int, ...] = ()) -> trio.Process:
        """An exchange as a process of its own (a Python start and its imports),
        reaped whenever it ends (it runs until its session ends)."""
        proc = await trio.lowlevel.open_process(
            [self.python, "-I", "-S", "-c", self.boot, *args], stdin=subprocess.DEVNULL,
            stdout=stdout, stderr=stderr, pass_fds=pass_fds, start_new_session=True)
        self.nursery.start_soon(proc.wait)
        return proc

    async def spawn(self, sdir: str, adopt: bool) -> None:
        """Start an exchange for ``sdir`` and wait until it listens (or another one holds it)."""
        args = [sdir] + (["--adopt"] if adopt else [])
        errlog_path = os.path.join(sdir, "exchange.log")
        errlog = os.open(errlog_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            stdout, kill = await self._start_exchange(args, errlog)
        finally:
            os.close(errlog)
        line = b""
        try:
            with trio.fail_after(SPAWN_TIMEOUT_S):
                while not line.endswith(b"\n"):
                    chunk = await stdout.receive_some(256)
                    if not chunk:
                        break
                    line += chunk
        except trio.TooSlowError:
            kill()
            raise RuntimeError("the exchange did not start in time") from None
        finally:
            await stdout.aclose()
        if not line.startswith(b"ready"):
            if line.startswith(b"busy"):
                return  # another exchange holds the session: connect to that one
            said = line.decode(errors="replace").strip() or "it ended without a word"
            raise RuntimeError(f"the session's exchange did not start ({said}): {last_log_line(errlog_path)}")

    async def _start_exchange(self, args: list[str], errlog: int) -> tuple[trio.abc.ReceiveStream, Callable[[], None]]:
        """A session's exchange, forked from the template when there is one (a
        burst of executes that drained the pool, the adoptions after a restart:
        each would pay a Python start and the exchange's imports) or started as
        its own process: (its stdout, what kills it)."""
        if self.template is not None:
            r, w = os.pipe()
            try:
                pid = await self.template.fork_exchange(args, w, errlog)
            except BaseException as exc:  # (cancelled too: the read end is ours to close)
                os.close(r)
                if isinstance(exc, TemplateUnavailable):
                    self._no_template(exc)
                elif isinstance(exc, ValueError):
                    log.warning("session %s: %s; its exchange starts as its own process", args[0], exc)
                else:
                    raise
            else:
                return trio.lowlevel.FdStream(r), lambda: kill_pid(pid)  # (reaped by the kernel)
            finally:
                os.close(w)
        proc = await self._own_process(args, subprocess.PIPE, errlog)
        assert proc.stdout is not None
        return proc.stdout, proc.kill

    async def connect(self, sdir: str) -> tuple[ExchangeLink, dict]:
        """Connect to the exchange of ``sdir``: (link, its hello)."""
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        try:
            with short_path(os.path.join(sdir, "ctl.sock")) as path:
                await sock.connect(path)
        except OSError:
            sock.close()
            raise
        link = ExchangeLink(trio.SocketStream(sock))
        return link, await link.hello()
