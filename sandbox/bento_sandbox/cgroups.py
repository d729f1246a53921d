"""Cgroups: which hierarchies this machine lets us use, one environment's cgroups, and the sweep.

An environment gets a cgroup in every hierarchy that works here (v1
``memory``, ``pids``, ``cpuacct``; v2 with ``cgroup.kill``), named after
its exchange, so that cgroups left by a killed exchange can be found and
removed (``sweep_cgroups``).
"""

from __future__ import annotations

import errno
import os
import signal
import time

TYPE_CHECKING = False  # the exchange imports this package and not typing (it starts per session)
if TYPE_CHECKING:
    from bento_sandbox.limits import Limits


def _own_cgroups() -> dict[str, str]:
    """controller -> this process's cgroup path ('' key for the v2 hierarchy)."""
    out: dict[str, str] = {}
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _num, controllers, path = line.rstrip("\n").split(":", 2)
                for c in controllers.split(",") if controllers else [""]:
                    out[c] = path
    except OSError:
        pass
    return out


def _probe(base: str, marker: str) -> bool:
    """Can we create a cgroup under ``base`` that has the control file ``marker``?
    (A plain directory, such as a tmpfs over /sys/fs/cgroup, takes a mkdir too.)"""
    probe = os.path.join(base, f"probe-{os.getpid()}")
    try:
        os.makedirs(base, exist_ok=True)
        os.mkdir(probe)
    except OSError:
        return False
    try:
        return os.path.exists(os.path.join(probe, marker))
    finally:
        try:
            os.rmdir(probe)
        except OSError:
            pass


_DETECTED: dict[str, str] | None = None


def detect_cgroups() -> dict[str, str]:
    """Which cgroup features this machine lets us use: name -> base directory.

    Names: ``memory``, ``pids``, ``cpuacct`` (v1 controllers) and ``kill`` (a
    v2 hierarchy with cgroup.kill); each only if we can create cgroups there."""
    global _DETECTED
    if _DETECTED is not None:
        return _DETECTED
    found: dict[str, str] = {}
    own = _own_cgroups()
    root = "/sys/fs/cgroup"
    for ctl, marker in (("memory", "memory.limit_in_bytes"), ("pids", "pids.max"),
                        ("cpuacct", "cpuacct.usage")):
        if ctl in own:
            mount = os.path.join(root, ctl)
            base = os.path.join(mount + own[ctl].rstrip("/"), "bento")
            if os.path.isdir(mount) and _probe(base, marker):
                found[ctl] = base
    if "" in own:
        for mount in (os.path.join(root, "unified"), root):
            if os.path.exists(os.path.join(mount, "cgroup.controllers")):
                base = os.path.join(mount + own[""].rstrip("/"), "bento")
                if _probe(base, "cgroup.kill"):
                    found["kill"] = base
                break
    _DETECTED = found
    return found


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def sweep_cgroups(min_age_s: float = 60.0) -> int:
    """Remove cgroups left by exchanges that died without cleaning up (SIGKILL,
    OOM killer); returns how many went.

    An environment's cgroup is named ``<what>-<exchange pid>``, and only its
    exchange reads it: one whose exchange is gone is removed, once it is empty
    (``rmdir`` refuses a cgroup with processes) and ``min_age_s`` old."""
    removed = 0
    now = time.time()
    for base in detect_cgroups().values():
        try:
            entries = list(os.scandir(base))
        except OSError:
            continue
        for entry in entries:
            owner = entry.name.rpartition("-")[2]
            if not entry.is_dir(follow_symlinks=False) or not owner.isdigit():
                continue
            try:
                if now - entry.stat().st_mtime < min_age_s or _alive(int(owner)):
                    continue
                os.rmdir(entry.path)
                removed += 1
            except OSError:
                pass  # not empty (its processes still run), or gone already
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Cgroups:
    """One environment's cgroups, in every hierarchy that works here."""

    def __init__(self, name: str, features: dict[str, str]) -> None:
        self.dirs: dict[str, str] = {}
        for feature, base in features.items():
            path = os.path.join(base, name)
            try:
                os.mkdir(path)
            except FileExistsError:
                pass
            except OSError:
                continue
            self.dirs[feature] = path

    def apply(self, limits: Limits) -> tuple[dict[str, str], dict[str, str]]:
        """Set the limits the cgroups can hold: (limit -> what enforces it, limit ->
        why its cgroup refused the value)."""
        enforced: dict[str, str] = {}
        refused: dict[str, str] = {}
        if "memory" in self.dirs and limits.memory_bytes is not None:
            try:
                _write(os.path.join(self.dirs["memory"], "memory.limit_in_bytes"), str(limits.memory_bytes))
                enforced["memory_bytes"] = "cgroup memory (OOM kill)"
            except OSError as exc:
                busy = " (the environment already uses more than that)" if exc.errno == errno.EBUSY else ""
                refused["memory_bytes"] = (f"its memory cgroup refused {limits.memory_bytes} bytes: "
                                                f"{exc.strerror}{busy}")
        if "pids" in self.dirs and limits.pids is not None:
            try:
                _write(os.path.join(self.dirs["pids"], "pids.max"), str(limits.pids))
                enforced["pids"] = "cgroup pids"
            except OSError as exc:
                refused["pids"] = f"its pids cgroup refused {limits.pids}: {exc.strerror}"
        if "cpuacct" in self.dirs and limits.cpu_s is not None:
            enforced["cpu_s"] = "cgroup cpuacct (whole environment) + RLIMIT_CPU backstop"
        return enforced, refused

    def enter(self) -> None:
        """Move the calling process in (runs in the child between fork and exec)."""
        for path in self.dirs.values():
            _write(os.path.join(path, "cgroup.procs"), "0")

    def add(self, pid: int) -> None:
        """Move the process ``pid`` in (a forked environment's pid 1, before it forks the driver)."""
        for path in self.dirs.values():
            _write(os.path.join(path, "cgroup.procs"), str(pid))

    def cpu_seconds(self) -> float | None:
        path = self.dirs.get("cpuacct")
        if path is None:
            return None
        try:
            with open(os.path.join(path, "cpuacct.usage")) as f:
                return int(f.read()) / 1e9
        except (OSError, ValueError):
            return None

    def oom_killed(self) -> bool:
        path = self.dirs.get("memory")
        if path is None:
            return False
        try:
            with open(os.path.join(path, "memory.oom_control")) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill" and int(value) > 0:
                        return True
        except (OSError, ValueError):
            pass
        return False

    def kill(self) -> bool:
        """Kill every process in the environment; False if no cgroup could."""
        if "kill" in self.dirs:
            try:
                _write(os.path.join(self.dirs["kill"], "cgroup.kill"), "1")
                return True
            except OSError:
                pass
        for path in self.dirs.values():
            pids = _procs(path)
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            return True
        return False

    def empty(self) -> bool:
        return all(not _procs(p) for p in self.dirs.values())

    def remove(self) -> None:
        for path in self.dirs.values():
            for _ in range(50):
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.01)


def _procs(path: str) -> list[int]:
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            return [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        return []
