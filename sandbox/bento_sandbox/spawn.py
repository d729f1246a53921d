"""Starting a child process without ``subprocess``.

The exchange imports this package and runs once per session: ``subprocess``
brings ``locale``, ``re``, ``threading``, ``warnings`` and ``contextlib`` with
it, ~1.4 MiB of every exchange's memory. What the backends need is small: a
fork, the child's fds and session set up, an ``exec``, and an exec failure
reported to the parent as an ``OSError`` (over a close-on-exec pipe, as
``subprocess`` does). The caller must be single-threaded (the exchange is):
the child runs Python between the fork and the exec.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Mapping

# Dispositions Python sets to SIG_IGN, which an exec would pass on (as subprocess's
# restore_signals does, they go back to the default).
_RESTORE = tuple(getattr(signal, n) for n in ("SIGPIPE", "SIGXFSZ", "SIGXFZ") if hasattr(signal, n))


class Process:
    """A started child: ``pid``, and ``returncode`` once reaped (the names of Popen's)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def reap(self) -> int:
        """Wait for it to end: its wait status (``os.waitpid``'s)."""
        _pid, status = os.waitpid(self.pid, 0)
        self.returncode = os.waitstatus_to_exitcode(status)
        return status

    def cpu_seconds(self) -> float | None:
        """CPU time of it and of the children it has waited for (readable until it is reaped)."""
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            return None
        # fields[11:15] are utime, stime, cutime, cstime in clock ticks.
        return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        """Let go of what watches it (nothing here: a child is reaped by ``reap``)."""

    def open_pidfd(self) -> int:
        """A new pidfd of it (readable once it ended); the caller closes it."""
        return os.pidfd_open(self.pid)

    def kill_group(self) -> None:
        """SIGKILL to its process group (it leads one: ``spawn`` makes it a session),
        unless it was reaped: its pid may be another process's by then."""
        if self.returncode is not None:
            return
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float | None = None) -> int:
        """The exit code; TimeoutError if the child still runs after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.0005
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"process {self.pid} still runs after {timeout} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        return code


def spawn(argv: list[str], *, cwd: str, env: Mapping[str, str], stdin: int, stdout: int, stderr: int,
          pass_fds: tuple[int, ...] = (), setup: Callable[[], None] | None = None) -> Process:
    """Start ``argv`` (found on ``env``'s PATH) in a session of its own, in ``cwd``,
    with ``stdin``/``stdout``/``stderr`` as its fds 0-2 and ``pass_fds`` kept
    open; every other fd is closed. ``setup`` runs in the child just before the exec."""
    for fd in (stdin, stdout, stderr):
        if fd < 3:
            raise ValueError(f"fd {fd} for the child's standard streams: give an fd of 3 or more")
    env = dict(env)
    err_r, err_w = os.pipe()  # close-on-exec: it reads EOF when the exec succeeded
    try:
        pid = os.fork()
        if pid == 0:
            _child(argv, cwd, env, (stdin, stdout, stderr), pass_fds, setup, err_w)
        os.close(err_w)
        err_w = -1
        report = b""
        while chunk := os.read(err_r, 4096):
            report += chunk
    finally:
        os.close(err_r)
        if err_w >= 0:
            os.close(err_w)
    if report:
        os.waitpid(pid, 0)
        code, _, what = report.decode("utf-8", "replace").partition(":")
        raise OSError(int(code) if code.isdigit() else 0, f"{what} ({argv[0]})")
    return Process(pid)


def _child(argv: list[str], cwd: str, env: dict[str, str], std: tuple[int, int, int],
           pass_fds: tuple[int, ...], setup: Callable[[], None] | None, err_w: int) -> None:
    """In the forked child: never returns."""
    step = "fork"
    try:
        step = "chdir"
        os.chdir(cwd)
        for sig in _RESTORE:
            signal.signal(sig, signal.SIG_DFL)
        step = "setsid"
        os.setsid()
        if setup is not None:
            step = "setup"
            setup()
        step = "fds"
        for target, fd in enumerate(std):
            os.dup2(fd, target)  # (inheritable)
        keep = sorted({0, 1, 2, err_w, *pass_fds})
        for fd in pass_fds:
            os.set_inheritable(fd, True)
        for low, high in zip(keep, [*keep[1:], os.sysconf("SC_OPEN_MAX")], strict=True):
            os.closerange(low + 1, high)
        step = "exec"
        os.execvpe(argv[0], argv, env)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, then out
        code = exc.errno if isinstance(exc, OSError) and exc.errno else 0
        try:
            os.write(err_w, f"{code}:{step} failed: {exc}".encode("utf-8", "replace"))
        finally:
            os._exit(127)
