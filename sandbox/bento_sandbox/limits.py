"""A session's limits, and which of them this machine can hold for a whole environment.

A limit is held for the whole environment (every process in it) or not at
all: ``enforcement()`` says which limits this machine can hold, and
``Environment.apply`` refuses (``Unenforceable``) a limit it cannot hold
unless told that per-process rlimits are accepted. ``driver_rlimits`` are
what the driver sets on itself (a backstop, or all there is).
"""

from __future__ import annotations

from collections.abc import Mapping

from bento_sandbox.cgroups import detect_cgroups


class Unenforceable(Exception):
    """A limit was asked for that nothing here holds for the whole environment."""

    def __init__(self, names: list[str], why: Mapping[str, str] | None = None) -> None:
        self.names = names
        why = why or {}
        super().__init__(
            f"cannot enforce {', '.join(names)} for the whole environment here "
            f"({', '.join(why.get(n) or _WHY_NOT.get(n, n) for n in names)})"
        )


# Limits only a cgroup holds for every process of an environment. An rlimit is
# per process (four processes under RLIMIT_AS of 512 MiB take 2 GiB; RLIMIT_NPROC
# does nothing for root), so without the cgroup such a limit is not in force.
CGROUP_LIMITS = {
    "memory_bytes": ("memory", "cgroup memory (OOM kill)"),
    "pids": ("pids", "cgroup pids"),
    "cpu_s": ("cpuacct", "cgroup cpuacct (whole environment) + RLIMIT_CPU backstop"),
}
# Limits that hold wherever the exchange runs.
ALWAYS_ENFORCED = {
    "wall_s": "exchange timer",
    "output_bytes": "exchange",
    "file_bytes": "RLIMIT_FSIZE (largest file)",
}
_WHY_NOT = {k: f"no writable {ctl} cgroup" for k, (ctl, _how) in CGROUP_LIMITS.items()}


def enforcement() -> dict[str, str]:
    """limit -> what holds it for a whole environment on this machine (every
    backend uses the same cgroups); a limit missing here cannot be held."""
    found = detect_cgroups()
    out = dict(ALWAYS_ENFORCED)
    for key, (ctl, how) in CGROUP_LIMITS.items():
        if ctl in found:
            out[key] = how
    return out


def unenforceable_reason(key: str) -> str:
    """Why ``key`` is missing from ``enforcement()``."""
    return _WHY_NOT.get(key, "not a limit this sandbox knows")


class Limits:
    """A session's limits; None means not limited."""

    KEYS = ("wall_s", "cpu_s", "memory_bytes", "pids", "output_bytes", "file_bytes")

    def __init__(self, **given: float | int | None) -> None:
        self.wall_s: float | None = given.get("wall_s")
        self.cpu_s: float | None = given.get("cpu_s")
        self.memory_bytes: int | None = given.get("memory_bytes")  # type: ignore[assignment]
        self.pids: int | None = given.get("pids")  # type: ignore[assignment]
        self.output_bytes: int | None = given.get("output_bytes")  # type: ignore[assignment]
        self.file_bytes: int | None = given.get("file_bytes")  # type: ignore[assignment]

    @classmethod
    def from_map(cls, m: Mapping[str, float | int]) -> Limits:
        return cls(**{k: m[k] for k in m if k in cls.KEYS})


def driver_rlimits(limits: Limits, memory: bool) -> dict[str, tuple[int, int]]:
    """The rlimits the driver sets on itself before it runs the function:
    RLIMIT name -> (soft, hard). The function cannot raise a hard limit."""
    out: dict[str, tuple[int, int]] = {}
    if limits.cpu_s is not None:
        # The exchange watches CPU time and kills at the limit (naming it); the
        # rlimit, a second later, is only a backstop (soft == hard: SIGKILL).
        secs = max(1, int(limits.cpu_s + 0.999)) + 1
        out["RLIMIT_CPU"] = (secs, secs)
    if memory and limits.memory_bytes is not None:
        out["RLIMIT_AS"] = (int(limits.memory_bytes), int(limits.memory_bytes))
    if limits.file_bytes is not None:
        out["RLIMIT_FSIZE"] = (int(limits.file_bytes), int(limits.file_bytes))
    return out
