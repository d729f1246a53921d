"""Started environments, and the backends that start a plain process: ``none`` and ``cmd``.

An ``Environment`` is a process tree with its limits, that the exchange can
signal, kill as a whole, and ask about (CPU used, out of memory?). Every
backend starts its process in its own session and in fresh cgroups.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Mapping

from bento_sandbox.cgroups import Cgroups, detect_cgroups
from bento_sandbox.limits import (
    ALWAYS_ENFORCED,
    CGROUP_LIMITS,
    Limits,
    Unenforceable,
    driver_rlimits,
)
from bento_sandbox.spawn import Process, spawn


class SandboxUnavailable(Exception):
    """The requested backend cannot run on this machine."""


def which(name: str) -> str | None:
    """shutil.which without importing shutil (the exchange starts per session)."""
    for d in os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin").split(os.pathsep):
        path = os.path.join(d, name)
        if os.access(path, os.X_OK) and not os.path.isdir(path):
            return path
    return None


def _set_pdeathsig() -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


class Environment:
    """A started environment: its top process, its process group, its cgroups."""

    def __init__(self, process: Process, cgroups: Cgroups | None,
                 enforced: dict[str, str], signal_exit_codes: bool) -> None:
        self.process = process
        self.pgid = process.pid  # (env.pid names it: a process group that ends with the environment)
        self.cgroups = cgroups
        self.enforced = enforced  # what the environment holds whatever the limits (network, /tmp)
        # bwrap reports a child killed by signal n as exit code 128 + n.
        self.signal_exit_codes = signal_exit_codes

    def apply(self, limits: Limits, *, strict: bool = True) -> tuple[dict[str, str], dict[str, tuple[int, int]]]:
        """Put the session's limits on the running environment (before the
        function runs). Returns (limit -> what enforces it, rlimits the driver
        must set on itself). ``strict``: a limit that no cgroup holds for the
        whole environment raises ``Unenforceable`` (the caller kills the
        environment); otherwise it gets only the per-process rlimit, and says so."""
        by_cgroup, refused = self.cgroups.apply(limits) if self.cgroups is not None else ({}, {})
        missing = [k for k in CGROUP_LIMITS if getattr(limits, k) is not None and k not in by_cgroup]
        if strict and missing:
            raise Unenforceable(missing, refused)
        rlimits = driver_rlimits(limits, memory="memory_bytes" not in by_cgroup)
        enforced = dict(self.enforced)
        if "cpu_s" in missing:
            enforced["cpu_s"] = ("per process only: the exchange watches the top process's CPU time "
                                 "+ RLIMIT_CPU")
        if "memory_bytes" in missing:
            enforced["memory_bytes"] = "per process only: RLIMIT_AS (address space)"
        if limits.file_bytes is not None:
            enforced["file_bytes"] = ALWAYS_ENFORCED["file_bytes"]
        enforced.update(by_cgroup)
        if limits.wall_s is not None:
            enforced["wall_s"] = ALWAYS_ENFORCED["wall_s"]
        if limits.output_bytes is not None:
            enforced["output_bytes"] = ALWAYS_ENFORCED["output_bytes"]
        return enforced, rlimits

    def kill(self) -> None:
        """SIGKILL to every process of the environment."""
        if self.cgroups is not None:
            self.cgroups.kill()
        self.process.kill_group()

    def cpu_seconds(self) -> float | None:
        """CPU time used: the whole cgroup where there is one, else the top
        process and the children it has waited for (readable until it is reaped)."""
        if self.cgroups is not None:
            used = self.cgroups.cpu_seconds()
            if used is not None:
                return used
        return self.process.cpu_seconds()

    def oom_killed(self) -> bool:
        return self.cgroups.oom_killed() if self.cgroups is not None else False

    def release(self) -> None:
        """After the environment ended: kill stragglers, remove its cgroups."""
        self.kill()
        self.process.close()
        if self.cgroups is not None:
            for _ in range(100):
                if self.cgroups.empty():
                    break
                time.sleep(0.01)
            self.cgroups.remove()


class _Backend:
    name = ""

    def _start(self, argv: list[str], *, name: str, cwd: str, env: Mapping[str, str],
               pass_fds: tuple[int, ...], stdin: int, stdout: int,
               stderr: int) -> tuple[Process, Cgroups]:
        """Start ``argv`` in its own session and in fresh cgroups named ``name``."""
        cgroups = Cgroups(name, detect_cgroups())

        def setup() -> None:
            cgroups.enter()
            _set_pdeathsig()

        try:
            proc = spawn(argv, cwd=cwd, env=env, stdin=stdin, stdout=stdout, stderr=stderr,
                         pass_fds=pass_fds, setup=setup)
        except BaseException:
            cgroups.remove()
            raise
        return proc, cgroups


class NoneBackend(_Backend):
    """A plain process: no isolation; its limits through the same cgroups as bwrap's."""

    name = "none"

    def argv(self, argv: list[str]) -> list[str]:
        return argv

    def spawn(self, argv: list[str], *, name: str, workdir: str, env: Mapping[str, str],
              network: bool, pass_fds: tuple[int, ...], stdin: int, stdout: int, stderr: int,
              bind: list[str | tuple[str, str]]) -> Environment:
        proc, cgroups = self._start(self.argv(argv), name=name, cwd=workdir, env={**env, "HOME": workdir},
                                    pass_fds=pass_fds, stdin=stdin, stdout=stdout, stderr=stderr)
        return Environment(proc, cgroups, {}, signal_exit_codes=False)


class CmdBackend(NoneBackend):
    """The driver behind a command prefix (e.g. an SGX loader); limits as ``none``."""

    name = "cmd"

    def __init__(self, prefix: str) -> None:
        import shlex  # only for --sandbox-cmd: the exchange imports this module

        self.prefix = shlex.split(prefix)
        if not self.prefix:
            raise SandboxUnavailable("--sandbox-cmd is empty")

    def argv(self, argv: list[str]) -> list[str]:
        return self.prefix + argv
