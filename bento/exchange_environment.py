"""The exchange's side of the environment while the function runs: its limits and its end.

A mixin of ``bento.exchange.Exchange`` (whose ``start`` gives the environment
its function). The exchange holds the limits only it can see (CPU time for
the whole environment, the work dir's bytes, the wall clock in its loop) and
kills the environment at one, naming it; when the environment's top process
exits, its accounts are read, what is left of it is killed, the pipes drain
for a moment, and the exit frame records how the function ended
(session_core.classify_exit). An adopted session that never recorded an exit
ends ``lost``.

Like the whole exchange, it never imports trio or typing.
"""

from __future__ import annotations

import os
import signal
import time

from bento import protocol, session_core
from bento.exchange_control import unlink
from bento.launch import loads

TYPE_CHECKING = False  # the exchange does not import typing (it starts per session)
if TYPE_CHECKING:
    import selectors
    from typing import Any

    import bento_sandbox

    from bento import exchange_build, sessionlog
    from bento.exchange_driver import DriverSide
    from bento.exchange_output import Output
    from bento.exchange_stdin import Stdin
    from bento.exchange_workdir import WorkDirWatch

DRAIN_SECONDS = 2.0
CPU_CHECK_MIN_S = 0.1
CPU_CHECK_MAX_S = 5.0
CPUS = os.cpu_count() or 1


def signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name.removeprefix("SIG")
    except ValueError:
        return str(num)



class EnvironmentLife:
    if TYPE_CHECKING:  # what bento.exchange.Exchange provides
        dir: str
        meta: dict[str, Any]
        limits: bento_sandbox.Limits
        sel: selectors.BaseSelector
        inlog: sessionlog.Writer
        core: session_core.SessionCore
        output: Output
        enforced: dict[str, str]
        child: bento_sandbox.Environment | None
        user_signal: str | None
        next_cpu_check: float
        pidfd: int
        child_status: int | None
        facts: tuple[bool, float]
        kill_reason: str | None
        kill_error: dict | None
        exiting: dict | None
        drain_deadline: float | None
        wall_deadline: float | None
        to_close: list[int]
        driver: DriverSide | None
        stdin: Stdin | None
        build: exchange_build.EnvBuild | None
        env_lock: int | None
        work_watch: WorkDirWatch | None
        reading: bool

        def apply(self, actions: tuple) -> None: ...

        def deliver(self, record: list) -> None: ...

        def watch_fd(self, fd: int, events: int, cb: Any) -> None: ...

        def update_reading(self) -> None: ...

        def publish(self, now: float) -> None: ...

    def kill(self, reason: str, error: dict | None = None) -> None:
        """End the function because of a limit or a violation."""
        if self.kill_reason is None:
            self.kill_reason = reason
            self.kill_error = error
        self.kill_child()

    def kill_child(self) -> None:
        if self.build is not None:
            self.build.kill()
        if self.child is not None:
            self.child.kill()

    def on_child_exit(self, _fd: int) -> None:
        assert self.child is not None
        # What the function wrote before it ended goes to the server first.
        self.publish(time.monotonic())
        self.sel.unregister(self.pidfd)
        os.close(self.pidfd)
        self.pidfd = -1
        # Read the environment's accounts while they exist: before the reap
        # (for /proc/<pid>) and before its cgroups go.
        self.facts = (self.child.oom_killed(), self.child.cpu_seconds() or 0.0)
        self.child_status = self.child.process.reap()
        self.wall_deadline = None  # the function is over: no timer may wake this loop
        # Whatever the function left behind dies with it, and its pid may be reused.
        self.child.release()
        if self.env_lock is not None:
            os.close(self.env_lock)  # its environment may be evicted from now on
            self.env_lock = None
        unlink(os.path.join(self.dir, "env.pid"))
        self.core.function_ended()
        self.drain_deadline = time.monotonic() + DRAIN_SECONDS
        self.reading = False
        self.update_reading()

    def maybe_finish_drain(self, now: float) -> None:
        if self.drain_deadline is None or self.exiting is not None:
            return
        if self.output.held_back:
            # The disk refused output: keep what is still in the pipes for when it takes it.
            self.drain_deadline = max(self.drain_deadline, now + DRAIN_SECONDS)
            return
        driver_open = self.driver is not None and not self.driver.link.eof
        if (self.output.pipes or driver_open) and now < self.drain_deadline:
            return
        for fd in list(self.output.pipes):
            self.output.close_pipe(fd)
        if self.driver is not None:
            for fd in (self.driver.link.rfd, self.driver.link.wfd):
                self.watch_fd(fd, 0, None)
                self.to_close.append(fd)
        if self.stdin is not None:
            self.stdin.close()
        self.finish_exit(session_core.classify_exit(self.exit_facts()))

    def exit_facts(self) -> session_core.ExitFacts:
        status = self.child_status
        assert status is not None and self.child is not None
        drv = self.driver
        assert drv is not None
        rep = drv.report
        sig: int | None = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
        if sig is None and code is not None and code > 128 and self.child.signal_exit_codes and rep is None:
            sig, code = code - 128, None
        if rep is not None and rep.get("result") is not None:
            rep = {**rep, "result": loads(rep["result"])}
        oom, cpu_used = self.facts
        cpu_s = self.limits.cpu_s
        tail = self.output.stderr_tail.decode("utf-8", "replace").strip()
        return session_core.ExitFacts(
            signal=None if sig is None else signal_name(sig), code=code,
            kill_reason=self.kill_reason, kill_error=self.kill_error, report=rep,
            driver_up=drv.up, user_signal=self.user_signal, oom_killed=oom,
            cpu_over=cpu_s is not None and cpu_used >= cpu_s, stderr_tail=tail, status=status)

    def check_cpu(self, now: float) -> None:
        if (self.limits.cpu_s is None or self.child is None or self.drain_deadline is not None
                or self.exiting is not None or now < self.next_cpu_check):
            return
        used = self.child.cpu_seconds()
        if used is not None and used >= self.limits.cpu_s:
            self.kill("cpu_s")
            return
        self.next_cpu_check = now + self.cpu_check_interval(used or 0.0)

    def cpu_check_interval(self, used: float) -> float:
        """Seconds to the next CPU check, ``used`` seconds of the limit gone. The
        function cannot use more CPU than CPUS per second of wall time: the next
        check is when it could first reach the limit (a large limit, like the
        server's default, costs a wake-up every few seconds, not ten a second)."""
        left = (self.limits.cpu_s or 0.0) - used
        return min(max(left / CPUS, CPU_CHECK_MIN_S), CPU_CHECK_MAX_S)

    def check_work(self, now: float) -> None:
        watch = self.work_watch
        if (watch is not None and self.child is not None and self.drain_deadline is None
                and self.exiting is None and watch.over(now)):
            self.kill("work_bytes")

    def finish_exit(self, data: dict) -> None:
        """Record the end: the exit frame (state, code, result, error) goes last."""
        self.exiting = data
        self.drain_deadline = None
        self.output.append("exit", (protocol.encode(data),), 0)

    def exit_written(self, seq: int) -> None:
        assert self.exiting is not None  # the exit frame written was finish_exit's
        self.apply(self.core.recorded_exit(self.exiting, seq, time.time()))

    def adopt_lost(self) -> None:
        if self.core.exit is None:
            self.finish_exit(session_core.lost_exit())
