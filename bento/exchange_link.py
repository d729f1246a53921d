"""The server's side of the exchanges: starting them, the warm pool, and the link to each.

An exchange is started with ``python -I -S`` (cold, for one session directory,
or warm, ahead of any session) and talks to the server over a Unix socket in
length-prefixed CBOR (bento_driver.wire frames, bento.protocol's codec: the
same bytes the exchange writes). Its first message is ``hello`` with the
wire version; an exchange of another version is refused with a message that
says why. Nothing here knows the session rules: bento/sessions.py does.

Cancellation: every request to an exchange is one message on an ordered
socket; a request cancelled while waiting for its reply may still take effect
(like any request whose connection drops), which is why input carries seqs.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Callable
from typing import Any

import bento_driver
import trio
from bento_driver import wire
from bento_sandbox.unix import short_path

from bento import pool_sizing, protocol, warm
from bento.exchange_paths import compile_driver, driver_sys_path, exchange_sys_path, real_python
from bento.quick import QuickWriter
from bento.sandbox_template import SandboxTemplate
from bento.template_link import Template, TemplateUnavailable

log = logging.getLogger("bento.sessions")

SPAWN_TIMEOUT_S = 10.0
CALL_TIMEOUT_S = 30.0
# A warm exchange answers within its own bound for the environment to come up, plus its start.
WARM_TIMEOUT_S = warm.UP_TIMEOUT_S + 10.0
RETRY_FIRST_S = 1.0  # the warm pool's pause after a failure, doubled while failures go on
RETRY_MAX_S = 30.0
SIZING_TICK_S = 1.0  # the pool's target is looked at again at least this often (to shrink it)
# After a take, warm starts wait until the session's first output has reached the
# server (its exchange's first message after the hello) and OUT_ROOM_S more for
# the out event to reach the client: at most TAKE_GRACE_S in all.
TAKE_GRACE_S = 0.05
OUT_ROOM_S = 0.003
# Executes a second from which warm exchanges are forked from the template: a fork
# costs far less CPU than a process of its own, but its session's first output
# comes later (docs/performance.md); below this rate the CPU is there to spare.
TEMPLATE_RATE = 8.0


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class ExchangeGone(Exception):
    """The session's exchange is not reachable (it died or the session ended)."""


def _last_line(path: str) -> str:
    """The last line of an exchange's log, to say why it did not start."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 1024))
            lines = f.read().decode(errors="replace").strip().splitlines()
    except OSError as exc:
        return f"its log {path} cannot be read: {exc.strerror}"
    return f"{lines[-1][:300]} (in {path})" if lines else f"its log {path} is empty"


class ExchangeLink:
    """Requests and replies over one exchange's control socket."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.framer = wire.Framer(1 << 31)
        self.send_lock = trio.Lock()
        self.quick = QuickWriter(stream.socket, self.send_lock) if isinstance(stream, trio.SocketStream) else None
        self.pending: dict[int, tuple[trio.Event, list[dict]]] = {}
        self.next_rid = 1
        self.ended = trio.Event()  # its reader took its last message (fail_pending)
        self.home: str | None = None  # a warm exchange's directory until a session takes it
        self.kill: Callable[[], None] | None = None  # a warm exchange's process, if it will not answer
        self.taken: trio.Event | None = None  # a warm one taken: set at its first message after the hello

    async def send(self, msg: dict) -> None:
        wire.check(wire.TO_EXCHANGE, msg)
        data = wire.frame(protocol.encode(msg))
        try:
            sent = None if self.quick is None else self.quick.write_now((data,))
            if sent is None:  # (the lock is held from here on either way)
                await self.send_lock.acquire()
            try:
                if (sent or 0) < len(data):
                    await self.stream.send_all(memoryview(data)[sent or 0 :])
            finally:
                self.send_lock.release()
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ExchangeGone(str(exc)) from None

    async def call(self, msg: dict) -> dict:
        if self.ended.is_set():
            raise ExchangeGone("the exchange is gone")
        rid = self.next_rid
        self.next_rid += 1
        done = trio.Event()
        slot: list[dict] = []
        self.pending[rid] = (done, slot)
        try:
            await self.send({**msg, "rid": rid})
            with trio.fail_after(CALL_TIMEOUT_S):
                await done.wait()
        except trio.TooSlowError:
            raise ExchangeGone("the exchange did not answer") from None
        finally:
            self.pending.pop(rid, None)
        if not slot:
            raise ExchangeGone("the exchange is gone")
        return slot[0]

    async def receive(self, check: bool = True) -> dict | None:
        """The exchange's next message (checked against wire.MESSAGES unless
        ``check`` is false), or None when the link is gone or broke the wire."""
        while True:
            try:
                body = self.framer.next()
                if body is not None:
                    msg: dict = protocol.decode_internal(body)
                    if check:
                        wire.check(wire.FROM_EXCHANGE, msg)
                    return msg
            except (wire.WireError, wire.FrameTooLarge, protocol.ProtocolError) as exc:
                log.error("an exchange broke the internal wire, dropping its link: %s", exc)
                return None
            try:
                chunk = await self.stream.receive_some(1 << 16)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                chunk = b""
            if not chunk:
                return None
            self.framer.feed(chunk)

    def deliver(self, msg: dict) -> bool:
        """Hand a reply to its waiting call; False if ``msg`` is no reply."""
        if msg["t"] != "reply":
            return False
        waiter = self.pending.get(msg["rid"])
        if waiter is not None:
            waiter[1].append(msg)
            waiter[0].set()
        return True

    def fail_pending(self) -> None:
        self.ended.set()
        for done, _slot in self.pending.values():
            done.set()
        self.pending.clear()

    async def hello(self) -> dict:
        """The exchange's first message, checked: its version must be one we accept."""
        # The version first: an exchange of another version may not fit the table.
        hello = await self.receive(check=False)
        if not isinstance(hello, dict) or hello.get("t") != "hello":
            await self.stream.aclose()
            raise ExchangeGone(f"the exchange did not say hello ({hello!r:.80})")
        version = hello.get("wire")
        if type(version) is not int or version not in wire.ACCEPTED:
            await self.stream.aclose()
            raise ExchangeGone(
                f"the exchange (pid {hello.get('pid')}) speaks internal wire version "
                f"{hello.get('wire', 1)}, this server {wire.VERSION}: it was started by another Bento "
                "version; let it finish under that version, or stop it (its session is then adopted as lost)")
        try:
            wire.check(wire.FROM_EXCHANGE, hello)
        except wire.WireError as exc:
            await self.stream.aclose()
            raise ExchangeGone(f"the exchange's hello broke the internal wire: {exc}") from None
        return hello


class Exchanges:
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

    async def pool_keeper(self) -> None:
        """Keep warm exchanges ready, as many as bento/pool_sizing.py says for the
        recent executes (bwrap: the sandbox's home is a directory of its own until
        a session takes it; none: the driver moves to the session's work dir when
        it starts; so nothing ties them to a session yet). Up to one start per
        core runs at once: one at a time could not keep up with a few executes a
        second. A warm exchange that fails or is slow is logged with why and the
        next start waits a pause that doubles while they keep failing (one at a
        time meanwhile): executes start cold then, and the keeper never ends.
        Beyond the target (the executes slowed down), the oldest are closed."""
        if self.template is not None:
            # Ready before executes come fast (its start is the exchange's imports, ~50 ms).
            self.nursery.start_soon(self._start_template)
        if self.sandbox_template.on:
            self.nursery.start_soon(self.sandbox_template.run)
            await self.sandbox_template.settled.wait()  # (tens of ms: else the first ones start bwraps)
        async with trio.open_nursery() as starts:
            while self.pool_size:
                now = trio.current_time()
                wanted = self.sizing.target(now)
                while len(self.warm) > wanted:
                    self.close_warm(self.warm.pop(0))
                if now < self.retry_at:
                    await self._wake_within(self.retry_at - now)
                    continue
                at_once = 1 if self.failing else self.parallel
                while len(self.warm) + self.starting < wanted and self.starting < at_once:
                    self.starting += 1
                    starts.start_soon(self._start_one)
                # A take, a start that ended, or the window's slide (for shrinking).
                await self._wake_within(SIZING_TICK_S)
                # Let the session that just took a warm exchange have the CPU first
                # (the sizing counts TAKE_GRACE_S as part of a replacement's start).
                with trio.move_on_at(self.taken_at + TAKE_GRACE_S):
                    await self.first_hops.wait()
                    await trio.sleep(OUT_ROOM_S)

    async def _start_template(self) -> None:
        try:
            if self.template is not None:
                await self.template.start()
        except TemplateUnavailable as exc:
            self._no_template(exc)

    def _no_template(self, exc: TemplateUnavailable) -> None:
        log.warning("warm pool: %s; exchanges start as their own processes from now on", exc)
        self.template = None

    async def _wake_within(self, seconds: float) -> None:
        self.warm_wanted = trio.Event()
        with trio.move_on_after(seconds):
            await self.warm_wanted.wait()

    async def _start_one(self) -> None:
        began = trio.current_time()
        try:
            link = await self._spawn_warm()
        except Exception as exc:  # a bug here must not end the pool nor the server
            if isinstance(exc, (OSError, RuntimeError, ExchangeGone)):
                log.error("warm pool: could not start a warm environment: %s (next try in %g s)",
                          exc, self.pause)
            else:
                log.exception("warm pool: could not start a warm environment (next try in %g s)", self.pause)
            self.retry_at = trio.current_time() + self.pause
            self.pause = min(2 * self.pause, RETRY_MAX_S)
            self.failing = True
        else:
            self.warm.append(link)
            # From a take to its replacement: this start and the pause before it.
            self.sizing.started(trio.current_time() - began + TAKE_GRACE_S)
            self.pause, self.retry_at, self.failing = RETRY_FIRST_S, 0.0, False
        finally:
            self.starting -= 1
            self.warm_wanted.set()

    def close_warm(self, link: ExchangeLink) -> None:
        """A warm exchange not wanted (or taken for a session that could not be made): it sees
        its link end, discards its environment and exits; its directory goes too, if still its."""
        self.nursery.start_soon(link.stream.aclose)
        if link.home:
            self.discard_dir(link.home)

    def discard_dir(self, path: str) -> None:
        """Remove a directory a warm exchange had (gone by the next start, if a
        process still writes in it: moved into warm/ first)."""
        aside = os.path.join(self.warm_dir, f"discarded-{os.urandom(6).hex()}")
        try:
            os.rename(path, aside)
        except OSError:
            aside = path
        shutil.rmtree(aside, ignore_errors=True)

    async def _spawn_warm(self) -> ExchangeLink:
        """A warm exchange whose environment is up (bento/warm.py says why up)."""
        # Prepared by the exchange as a session's (its ``work`` is the home); a session renames it.
        home = tempfile.mkdtemp(prefix="warm-", dir=self.warm_dir)
        try:
            os.mkdir(os.path.join(home, "work"), 0o755)
            ours, pid, kill = await self._start_warm_process()
        except BaseException:
            shutil.rmtree(home, ignore_errors=True)
            raise
        link = ExchangeLink(trio.SocketStream(trio.socket.from_stdlib_socket(ours)))
        ready: dict | None = None
        fork = self.sandbox_template.path
        try:
            await link.send({
                "t": "warm", "sandbox": self.config.sandbox, "sandbox_cmd": self.config.sandbox_cmd,
                "python": self.python, "driver_path": self.driver_path, "network": False,
                "envs_dir": self.envs_dir, "dir": home, **({"fork": fork} if fork else {}),
            })
            with trio.move_on_after(WARM_TIMEOUT_S) as waited:
                ready = await link.receive()
            if waited.cancelled_caught:
                # Stuck past its own bound for the environment: it will not answer.
                kill()
                raise RuntimeError(f"the warm exchange (pid {pid}) did not answer within "
                                   f"{WARM_TIMEOUT_S:g} s and was killed")
            if ready is None or ready.get("t") != "warm_ready":
                raise RuntimeError(f"the warm exchange (pid {pid}) ended without answering: {ready!r:.200}")
            if ready["error"]:
                raise RuntimeError(ready["error"])
        except BaseException:
            shutil.rmtree(home, ignore_errors=True)  # (first: a cancelled aclose raises)
            await link.stream.aclose()  # the exchange sees the end and exits, if it still runs
            raise
        link.home, link.kill = home, kill
        return link

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
                return ours, pid, lambda: _kill(pid)
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

    def take_warm(self, network: bool) -> ExchangeLink | None:
        """A warm exchange out of the pool for a new session (its directory, ``link.home``,
        becomes the session's: ``Store.create_session``), or None if none fits or is ready."""
        if network and self.config.sandbox == "bwrap":
            return None
        if self.pool_size:
            self.sizing.executed(trio.current_time())  # (also when none is ready: the pool grows)
            self.warm_wanted.set()
        if not self.warm:
            return None
        self.taken_at = trio.current_time()
        link = self.warm.pop(0)
        link.taken = self.first_hops = trio.Event()
        return link

    async def assign_warm(self, link: ExchangeLink, sdir: str) -> dict | None:
        """Hand the session in ``sdir`` to its warm exchange: its hello, or None (gone, too slow)."""
        try:
            await link.send({"t": "assign", "dir": sdir})
            with trio.fail_after(SPAWN_TIMEOUT_S):
                return await link.hello()
        except (ExchangeGone, trio.TooSlowError):
            if link.kill is not None:
                link.kill()  # (a slow one must not go on with the session: it holds its lock)
            await link.stream.aclose()
            return None

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
            raise RuntimeError(f"the session's exchange did not start ({said}): {_last_line(errlog_path)}")

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
                return trio.lowlevel.FdStream(r), lambda: _kill(pid)  # (reaped by the kernel)
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
