"""Environment backends: how a session's driver process is started, held and killed.

A backend turns the driver's command line into a running ``Environment``: a
process tree with its limits, that the exchange can signal, kill as a whole,
and ask about (CPU used, out of memory?). Backends know nothing of sessions,
tokens or the network protocol, and import only the stdlib (the exchange, one
small process per session, imports this module).

Backends:
- ``bwrap``: bubblewrap with every namespace unshared (user, pid, net, ipc,
  uts, mount, cgroup), all capabilities dropped, an unprivileged uid inside,
  a read-only system and Python, a private size-bounded /tmp, the
  environment's work dir (given by the caller) as its home, and no network
  unless asked. Limits through cgroups where this machine lets us
  create them (memory, pids, CPU accounting, cgroup.kill), rlimits otherwise.
- ``none``: a plain child process in its own process group with rlimits. No
  isolation at all: for development only, and reported as such.
- ``cmd``: the driver's command behind a user-given prefix (``--sandbox-cmd``,
  the hook the original Bento used for Graphene-SGX), with rlimits.

``status`` reports, per limit, what enforces it (``enforced``); a limit that
nothing enforces is absent from that map. A limit is held for the whole
environment (every process in it) or not at all: ``enforcement()`` says which
limits this machine can hold, and ``Environment.apply`` refuses (``Unenforceable``)
a limit it cannot hold unless told that per-process rlimits are accepted.

The package's modules: ``limits`` (the limits and what holds them),
``cgroups``, ``environment`` (a started environment; the ``none`` and
``cmd`` backends), ``bwrap``, and ``spawn`` (fork and exec without
``subprocess``, which would add ~1.4 MiB to every exchange).
"""

from __future__ import annotations

from bento_sandbox.bwrap import DEFAULT_TMP_BYTES, HOME, SHM_BYTES, BwrapBackend, default_backend
from bento_sandbox.cgroups import Cgroups, detect_cgroups, sweep_cgroups
from bento_sandbox.environment import (
    CmdBackend,
    Environment,
    NoneBackend,
    SandboxUnavailable,
    which,
)
from bento_sandbox.limits import (
    ALWAYS_ENFORCED,
    CGROUP_LIMITS,
    Limits,
    Unenforceable,
    driver_rlimits,
    enforcement,
    unenforceable_reason,
)

__all__ = [
    "ALWAYS_ENFORCED", "CGROUP_LIMITS", "DEFAULT_TMP_BYTES", "HOME", "SHM_BYTES", "BwrapBackend",
    "Cgroups", "CmdBackend", "Environment", "Limits", "NoneBackend", "SandboxUnavailable",
    "Unenforceable", "default_backend", "detect_cgroups", "driver_rlimits", "enforcement",
    "get_backend", "sweep_cgroups", "unenforceable_reason", "which",
]


def get_backend(name: str, sandbox_cmd: str | None = None) -> NoneBackend | BwrapBackend:
    if name == "none":
        return NoneBackend()
    if name == "bwrap":
        return BwrapBackend()
    if name == "cmd":
        return CmdBackend(sandbox_cmd or "")
    raise SandboxUnavailable(f"unknown sandbox backend {name!r} (have: bwrap, none, cmd)")
