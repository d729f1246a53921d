"""Environment backends: how a session's driver process is started and held.

A backend turns the driver's command line into the command that runs it in an
environment, and says which limits it enforces and how. Backends know nothing
of sessions, tokens or the network protocol; they import only the stdlib (the
exchange, one small process per session, imports this module).

Backends:
- ``none``: a plain child process in its own process group, with rlimits for
  CPU time, address space and file size. No isolation at all: for development
  only, and reported as such in ``status``.
- ``bwrap`` and ``--sandbox-cmd`` are not implemented yet (see the sandbox
  issue); asking for them is refused with a clear error.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field


class SandboxUnavailable(Exception):
    """The requested backend cannot run on this machine."""


@dataclass
class Limits:
    wall_s: float | None = None
    cpu_s: float | None = None
    memory_bytes: int | None = None
    pids: int | None = None
    output_bytes: int | None = None
    file_bytes: int | None = None

    @classmethod
    def from_map(cls, m: Mapping[str, float | int]) -> Limits:
        return cls(**{k: m[k] for k in m if k in cls.__dataclass_fields__})


@dataclass
class Spawned:
    process: subprocess.Popen
    pgid: int
    enforced: dict[str, str] = field(default_factory=dict)


def _rlimits(limits: Limits) -> Callable[[], None]:
    def apply() -> None:
        if limits.cpu_s is not None:
            secs = max(1, int(limits.cpu_s + 0.999))
            resource.setrlimit(resource.RLIMIT_CPU, (secs, secs + 1))
        if limits.memory_bytes is not None:
            resource.setrlimit(resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes))
        if limits.file_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_bytes, limits.file_bytes))
        # The driver dies with its exchange: a session whose exchange is gone is lost.
        _set_pdeathsig()

    return apply


def _set_pdeathsig() -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)


class NoneBackend:
    """A plain process: rlimits only, no isolation."""

    name = "none"
    sandboxed = False

    def enforced(self, limits: Limits, network: bool) -> dict[str, str]:
        out = {"wall_s": "exchange timer", "output_bytes": "exchange"}
        if limits.cpu_s is not None:
            out["cpu_s"] = "rlimit"
        if limits.memory_bytes is not None:
            out["memory_bytes"] = "rlimit (address space)"
        if limits.file_bytes is not None:
            out["file_bytes"] = "rlimit"
        return out

    def spawn(
        self,
        argv: list[str],
        *,
        cwd: str,
        env: Mapping[str, str],
        limits: Limits,
        network: bool,
        pass_fds: tuple[int, ...],
        stdout: int,
        stderr: int,
    ) -> Spawned:
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            pass_fds=pass_fds,
            start_new_session=True,
            preexec_fn=_rlimits(limits),
        )
        return Spawned(proc, proc.pid, self.enforced(limits, network))


BACKENDS = {"none": NoneBackend}


def get_backend(name: str) -> NoneBackend:
    if name not in BACKENDS:
        raise SandboxUnavailable(f"sandbox backend {name!r} is not available (have: {', '.join(BACKENDS)})")
    return BACKENDS[name]()


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
