"""The exchange: one small process per session, the shell around its session core.

It owns the environment's pipes and the session's logs, and runs a selector
loop: the function's output becomes frames in the output log
(bento/exchange_output.py), the driver's messages are handled and input goes
to the function (bento/exchange_driver.py), and the server talks to it over a
Unix socket in the session directory, ``ctl.sock`` (bento/exchange_control.py,
where accepted input is logged before it is acknowledged), and the limits
and the end of the function are watched and recorded
(bento/exchange_environment.py). Every rule about positions, the buffer,
input seqs, shared state and the exit lives in the sans-IO session core
(bento/session_core.py); this module feeds it events and carries out its
actions. The exchange does not die with the server: a server that restarts
reconnects and finds everything where it was. Once the function has ended and
its exit frame is on disk, the exchange exits: the server serves the ended
session from disk (bento/sessiondisk.py).

Started by the server as ``python -I -S -c ... SESSION_DIR [--adopt]``, or
warm (bento/warm.py). With ``--adopt`` there is no function to run: a
previous exchange died, and this one recovers the logs (cutting a torn tail),
marks the session ``lost`` if it never recorded an exit, and serves reads,
acks and shared state until the session's life ends.

It must never import trio (it exists once per session and must start fast),
never block on a peer (every fd is non-blocking, every outgoing buffer is
bounded or coalesced), and never trust what the function writes to its pipes.
"""

from __future__ import annotations

import os
import selectors
import signal
import socket
import sys
import time

import bento_sandbox
from bento_driver import wire

# envs: imported with the rest, before any session: imported when a warm
# exchange's session has packages, it would delay that function's start.
from bento import envs, protocol, session_core, sessiondisk, sessionlog
from bento.exchange_control import Control, hello, unlink
from bento.exchange_driver import DriverSide
from bento.exchange_environment import EnvironmentLife
from bento.exchange_output import RETRY_SECONDS, Output
from bento.exchange_stdin import Stdin
from bento.exchange_workdir import WorkDirWatch
from bento.launch import (
    READ_SIZE,
    START_FIFO,
    VALUE_ROOM,
    Launched,
    close_quietly,
    launch,
    loads,
    prestart,
    read_meta,
)
from bento.session_core import Announce, Kill, Save, StateChanged, Trim
from bento.warm import wait_for_session

TYPE_CHECKING = False  # the exchange does not import typing (it starts per session)
if TYPE_CHECKING:
    from typing import Any

    from bento import exchange_build

DIR_CHECK_SECONDS = 5.0
STATE_FLUSH_SECONDS = 0.1
# A warm exchange's first rounds after its hello, before it binds its socket:
# far shorter than any server's restart.
FIRST_OUTPUT_WAIT_S = 0.05


class Exchange(EnvironmentLife):
    def __init__(self, sdir: str, adopt: bool, meta: dict | None = None,
                 logs: tuple[sessionlog.Writer, sessionlog.Writer, dict] | None = None) -> None:
        self.dir = sdir
        self.adopt = adopt
        self.meta: dict[str, Any] = meta if meta is not None else read_meta(sdir)
        self.limits = bento_sandbox.Limits.from_map(self.meta["limits"])
        self.max_message: int = self.meta["max_message"]
        self.max_value = self.max_message - VALUE_ROOM
        self.sel = selectors.DefaultSelector()
        # (``logs``: a warm exchange opened them while it waited: bento/warm.py)
        out, self.inlog, saved = logs if logs is not None else sessiondisk.open_logs(sdir)
        for log in (out, self.inlog):
            if log.torn_bytes:
                self.disk_trouble(f"cut a torn record of {log.torn_bytes} bytes off the {log.prefix} log")
        self.core = sessiondisk.recover(out, saved, self.meta, self.inlog.next_seq - 1)
        self.enforced: dict[str, str] = saved.get("enforced", {})
        # A stdout/stderr frame's data fits an out event with room to spare.
        self.output = Output(self, out, min(READ_SIZE, self.max_value - 16), self.limits.output_bytes)

        self.child: bento_sandbox.Environment | None = None
        self.user_signal: str | None = None
        self.next_cpu_check = 0.0
        self.next_dir_check = 0.0
        self.pidfd = -1
        self.child_status: int | None = None
        self.facts: tuple[bool, float] = (False, 0.0)  # (oom killed, cpu used) at the end
        self.kill_reason: str | None = None
        self.kill_error: dict | None = None
        self.exiting: dict | None = None  # the exit frame's data, once decided
        self.drain_deadline: float | None = None
        self.wall_deadline: float | None = None
        self.to_close: list[int] = []
        self.driver: DriverSide | None = None
        self.stdin: Stdin | None = None
        self.build: exchange_build.EnvBuild | None = None  # the session's packages, before its function starts
        self.env_lock: int | None = None  # the shared lock on its packages' environment while the function runs
        self.work_watch: WorkDirWatch | None = None  # the bound on what it leaves on disk
        self.reading = False
        self.control = Control(self)
        self.progress_dirty = True
        self.state_dirty_at: float | None = None
        self.finished = False
        self.remove = False  # delete the session directory on the way out
        self.prepared: set[str] = set()  # files whose empty copies its warm directory holds

    # -- persistence ------------------------------------------------------

    def save(self) -> None:
        try:
            sessiondisk.save(self.dir, self.core, {"enforced": self.enforced, "sandbox": self.meta["sandbox"]},
                             self.prepared)
            self.state_dirty_at = None
        except OSError as exc:
            self.disk_trouble(f"cannot save the session state: {exc}")
            self.state_dirty_at = time.monotonic() + RETRY_SECONDS

    def apply(self, actions: tuple) -> None:
        """Carry out what the session core asked for."""
        for action in actions:
            kind = type(action)
            if kind is Announce:
                self.progress_dirty = True
            elif kind is Trim:
                self.output.trim(action.first_seq)
                self.update_reading()
            elif kind is Save:
                if action.now:
                    self.save()
                elif self.state_dirty_at is None:
                    self.state_dirty_at = time.monotonic() + STATE_FLUSH_SECONDS
            elif kind is Kill:
                if self.drain_deadline is None:
                    self.kill(action.reason)
            elif kind is StateChanged:
                self.control.send(wire.message(wire.FROM_EXCHANGE, "state", version=action.version,
                                              value=action.value))
        if actions:
            self.update_reading()

    def disk_trouble(self, message: str) -> None:
        try:
            sys.stderr.write(f"exchange {self.meta['session']}: {message}\n")
            sys.stderr.flush()
        except OSError:
            pass  # the log is on the same full disk; the state says it anyway

    def deliver(self, record: list) -> None:
        """Queue one input-log record for the function: stdin bytes, or a value for
        api.recv(). A record is [seq, data] (data None: the eof) for api.recv(),
        [seq, data, true] for stdin."""
        if len(record) == 3:
            if self.stdin is not None:
                self.stdin.add(record[1])
        elif self.driver is not None:
            if record[1] is None:
                self.driver.send("eof")
            else:
                self.driver.send("in", data=record[1])

    def watch_fd(self, fd: int, events: int, cb: Any) -> None:
        try:
            key = self.sel.get_key(fd)
        except KeyError:
            key = None
        if events == 0:
            if key is not None:
                self.sel.unregister(fd)
        elif key is None:
            self.sel.register(fd, events, cb)
        elif key.events != events:
            self.sel.modify(fd, events, cb)

    # -- reading the function's output ---------------------------------------

    def update_reading(self) -> None:
        """Read the function's output unless policy ``block`` says the buffer is
        full (or the disk holds it back); messages already read wait too."""
        want = self.child is not None and not self.output.held_back and (
            self.drain_deadline is not None or not self.core.full)
        if want == self.reading:
            return
        self.reading = want
        for fd in list(self.output.pipes):
            self.watch_fd(fd, selectors.EVENT_READ if want else 0, self.output.on_pipe)
        drv = self.driver
        if drv is not None and not drv.link.eof:
            self.watch_fd(drv.link.rfd, selectors.EVENT_READ if want else 0, drv.on_readable)
        if want and drv is not None and drv.link.framer.pending:
            drv.messages()

    # -- the environment (its limits and its end: bento/exchange_environment.py) --

    def start(self, launched: Launched | None, pre: tuple | None = None) -> None:
        """Give the session its environment (None if it could not start) and
        send the function its code, limits and early input. ``pre``: a
        pre-started environment's limits were applied and its start message
        sent already (``prestart``, before this exchange set itself up)."""
        if launched is None or launched.error is not None:
            message = (launched.error if launched is not None else None) or "no environment"
            self.finish_exit(session_core.failed_exit("SandboxError", message))
            return
        assert launched.env is not None
        if pre is None:
            try:
                pre = prestart(launched, self.meta, None)
            except bento_sandbox.Unenforceable as exc:
                launched.discard()
                self.finish_exit(session_core.failed_exit("SandboxError", str(exc)))
                return
        self.child = child = launched.env
        link, self.enforced, started_at = pre
        self.driver = driver = DriverSide(self, link, launched.up)
        self.stdin = Stdin(self, launched.in_w)
        if self.meta.get("work_bytes") is not None:
            self.work_watch = WorkDirWatch(os.path.join(self.dir, "work"), self.meta["work_bytes"], started_at)
        # The first CPU check when the function could first reach its limit, not
        # at its start (a file read that would delay its first output).
        self.next_cpu_check = started_at + self.cpu_check_interval(0.0)
        self.output.watch(launched.out_r, launched.err_r)
        self.output.tty_fd = launched.out_r
        self.pidfd = child.process.open_pidfd()
        self.sel.register(self.pidfd, selectors.EVENT_READ, self.on_child_exit)
        if self.limits.wall_s is not None:
            self.wall_deadline = started_at + self.limits.wall_s
        # Input accepted before the function started goes to it now, in order.
        for _seq, payload in self.inlog.records():
            self.deliver(loads(payload))
        driver.flush()
        self.stdin.pump()
        # The function runs from here on; the bookkeeping below is off its path.
        if launched.pid_file is None:
            with open(os.path.join(self.dir, "env.pid"), "w") as f:
                f.write(f"{child.pgid}\n")
        launched.pid_file = None  # (removed at the environment's end: on_child_exit)
        self.apply(self.core.started())

    # -- main loop ----------------------------------------------------------

    def publish(self, now: float) -> None:
        """Write the frames read so far to the output log and tell the server
        (``progress``): at the end of each round of events, and before the
        function's end is handled, so its last output does not wait for that."""
        output = self.output
        if output.log.pending and (not output.flush_blocked or now >= output.retry_at):
            output.flush()
        if self.progress_dirty and self.control.link is not None:
            self.progress_dirty = False
            self.control.send(wire.message(wire.FROM_EXCHANGE, "progress", **self.core.snapshot()))

    def work_done(self) -> bool:
        """An ended session needs no process: once its exit frame and state are
        on disk and the server has been told, the server serves it from disk."""
        core, output = self.core, self.output
        return (core.exit_seq is not None and core.durable_next > core.exit_seq
                and not output.held_back and not output.log.pending and self.state_dirty_at is None
                and not self.progress_dirty and (self.control.link is None or not self.control.link.outbuf)
                and self.pidfd < 0)

    def run(self) -> None:
        done = False
        while not (done or self.finished):
            done = self.step()

    def step(self, wait: bool = True, until: float | None = None) -> bool:
        """One round of events (waiting for one unless ``wait`` is False, and
        not past ``until``), then the bookkeeping; True once the work is done
        (``work_done``)."""
        output = self.output
        now = time.monotonic()
        # No timer, no wake-up: an idle exchange sleeps until something
        # happens (a thousand idle sessions must not cost the server's echo).
        timeout: float | None = None
        if self.control.link is None:
            timeout = max(0.0, self.next_dir_check - now)
        running = self.child is not None and self.exiting is None and self.drain_deadline is None
        cpu_check = self.next_cpu_check if self.limits.cpu_s is not None and running else None
        work_check = self.work_watch.next_check if self.work_watch is not None and running else None
        retry = output.retry_at if output.held_back else None
        for deadline in (self.wall_deadline, self.drain_deadline, self.state_dirty_at, cpu_check, retry,
                         work_check, until):
            if deadline is not None:
                left = max(0.0, deadline - now)
                timeout = left if timeout is None else min(timeout, left)
        for key, _mask in self.sel.select(timeout if wait else 0.0):
            key.data(key.fileobj)
            if self.finished:
                break
        for fd in self.to_close:
            close_quietly(fd)
        self.to_close.clear()
        now = time.monotonic()
        if self.wall_deadline is not None and now >= self.wall_deadline:
            self.wall_deadline = None
            if self.exiting is None and self.drain_deadline is None:
                self.kill("wall_s")
        self.check_cpu(now)
        self.check_work(now)
        output.retry_stalled(now)
        self.maybe_finish_drain(now)
        self.publish(now)
        if self.state_dirty_at is not None and now >= self.state_dirty_at:
            self.save()
        if self.control.link is None and now >= self.next_dir_check:
            self.next_dir_check = now + DIR_CHECK_SECONDS
            if sessiondisk.dir_deleted(self.dir):
                # Deleted under us: no server can ever reach this session again.
                self.disk_trouble("the session directory is gone; ending")
                self.kill_child()
                self.finished = True
                return False
        if self.work_done():
            return True
        link = self.control.link
        if link is not None:
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if link.outbuf else 0)
            self.watch_fd(link.rfd, events, self.control.on_io)
        return False


def early_hello(sock: socket.socket, meta: dict, enforced: dict) -> dict | None:
    """Send the server a started fresh session's hello before this exchange sets
    itself up (its ``Exchange``, its control link), so that the server answers
    the execute meanwhile; the hello sent, or None if the server could
    not take it (the later ``Control.use`` then says hello, and meets the same
    error as any send to a server that went)."""
    core = sessiondisk.fresh_core(meta)
    core.started()
    msg = hello(enforced, core)
    sock.setblocking(True)  # (a few hundred bytes on an idle socket: no wait)
    try:
        sock.sendall(wire.frame(protocol.encode(msg)))
    except OSError:
        return None
    finally:
        sock.setblocking(False)
    return msg


def _detach_stdio() -> None:
    """Let go of the server's pipes: a process that outlives the server must
    not hold anything the server's parent waits on."""
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)


def main(argv: list[str]) -> None:
    if argv[0] == "--template":
        from bento.exchange_template import serve

        serve(int(argv[1]))  # (never returns: forks warm exchanges until the server goes)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    warm_sock: socket.socket | None = None
    launched: Launched | None = None
    meta: dict | None = None
    if argv[0] == "--warm":
        warm_sock = socket.socket(fileno=int(argv[1]))
        _detach_stdio()
        got = wait_for_session(warm_sock)
        if got is None:
            os._exit(0)
        # Its directory, prepared while it waited, renamed into place: the lock,
        # exchange.pid and env.pid are there, and the work dir is the home. It
        # holds the directory by an fd (``pinned``) and its logs open since then.
        launched, sdir, lock_fd = got.launched, got.dir, got.lock_fd
        pinned, logs, meta = got.pinned, got.logs, got.meta
        adopt = False
    else:
        sdir = argv[0]
        pinned, logs = None, None
        adopt = "--adopt" in argv[1:]
        lock_fd = sessiondisk.take_lock(sdir)
        if lock_fd < 0:
            sys.stdout.write("busy\n")
            sys.stdout.flush()
            os._exit(3)
    work = os.path.join(sdir, "work")  # the environment's: a path other processes can use
    sdir = pinned if pinned is not None else sessiondisk.pin_dir(sdir)
    if launched is not None and launched.pid_file is not None:
        launched.pid_file = os.path.join(sdir, "env.pid")  # (its warm directory, renamed)
    pre = env_lock = None
    if launched is not None and launched.error is None:
        # A pre-started environment and a brand-new session: the function
        # starts first, and runs while this exchange sets itself up.
        if meta is None:
            meta = read_meta(sdir)
        # Unsandboxed, the driver moves to its home by its new name (cwd and
        # HOME); a sandbox's home is a bind, which followed the rename.
        cwd = None if meta["sandbox"] == "bwrap" else work
        if meta.get("packages"):
            # The start message waits until the packages are ready: here at
            # once when their environment is (its shared lock is taken now).
            env_lock = envs.use(meta["envs_dir"], meta["env_name"])
        try:
            pre = None if meta.get("packages") and env_lock is None else prestart(launched, meta, cwd)
        except bento_sandbox.Unenforceable as exc:
            launched.discard()
            launched = Launched(None, error=str(exc))
            if env_lock is not None:
                os.close(env_lock)
                env_lock = None
    said = None
    if warm_sock is not None and pre is not None and meta is not None:
        said = early_hello(warm_sock, meta, pre[1])
    ex = Exchange(sdir, adopt, meta, logs)
    if warm_sock is not None:
        ex.prepared = {sessiondisk.STATE_FILE, sessiondisk.SIZES_FILE}
    if adopt:
        ex.adopt_lost()
    ex.env_lock = env_lock
    if (not adopt and ex.core.exit is None and ex.meta.get("packages") and pre is None
            and (launched is None or launched.error is None)):
        os.makedirs(work, exist_ok=True)
        # Imported here: most sessions have no packages, or a ready environment.
        from bento.exchange_build import EnvBuild

        ex.build = EnvBuild(ex, launched)
        ex.build.begin()
    elif not adopt and ex.core.exit is None:
        if launched is None:
            os.makedirs(work, exist_ok=True)
            # (Named after this exchange too: see bento_sandbox.sweep_cgroups.)
            launched = launch(ex.meta, f"{ex.meta['session']}-{os.getpid()}", work)
        ex.start(launched, pre)
    elif launched is not None:
        launched.discard()
    if warm_sock is None:
        # Written before the session is answered for: once an execute has its
        # reply, the session's exchange.pid names its exchange (a warm one's is).
        with open(os.path.join(sdir, "exchange.pid"), "w") as f:
            f.write(f"{os.getpid()}\n")
    else:
        # The server waits for the hello to answer the execute: said by now, or
        # said here. Then the function's first output (the server waits for that
        # next): the socket for a later server and the first save wait for it,
        # or for FIRST_OUTPUT_WAIT_S if the function says nothing.
        ex.control.use(warm_sock, said)
        until = time.monotonic() + FIRST_OUTPUT_WAIT_S
        while ex.output.log.next_seq == 1 and not ex.finished and time.monotonic() < until:
            ex.step(until=until)
        unlink(os.path.join(sdir, START_FIFO))  # (the driver has it open: no one else needs it)
    sock = ex.control.listen()  # (a cold exchange's server connects as soon as it reads "ready")
    if warm_sock is None:
        sys.stdout.write(f"ready {os.getpid()}\n")
        sys.stdout.flush()
        _detach_stdio()
    # Saved in the loop's first round, after the function's first output (if
    # it is there by then) has gone to the server.
    ex.state_dirty_at = time.monotonic()
    try:
        ex.run()
    finally:
        if ex.child is not None and ex.core.exit is None:
            ex.kill_child()
            try:
                ex.child.process.wait(timeout=5)
            except Exception as exc:  # noqa: BLE001 - report, then leave anyway
                sys.stderr.write(f"exchange: could not reap the environment: {exc}\n")
            ex.child.release()
        sock.close()
        if not ex.remove:
            # Nobody is listening any more: a server finds the session on disk,
            # and may take the lock once its link sees this process go.
            unlink(os.path.join(sdir, "ctl.sock"))
            unlink(os.path.join(sdir, "exchange.pid"))  # this pid may be reused once it exits
            os.close(lock_fd)
            ex.control.drop()
    if ex.remove:
        import shutil  # only here: the exchange starts per session and stays small

        shutil.rmtree(sessiondisk.real_path(sdir), ignore_errors=True)
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
