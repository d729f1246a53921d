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
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping

HOME = "/home/bento"
DEFAULT_TMP_BYTES = 64 * 1024 * 1024
SHM_BYTES = 16 * 1024 * 1024


class SandboxUnavailable(Exception):
    """The requested backend cannot run on this machine."""


class Unenforceable(Exception):
    """A limit was asked for that nothing here holds for the whole environment."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        super().__init__(
            f"cannot enforce {', '.join(names)} for the whole environment here "
            f"({', '.join(_WHY_NOT.get(n, n) for n in names)})"
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


# -- cgroups ------------------------------------------------------------------


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

    def apply(self, limits: Limits) -> dict[str, str]:
        """Set the limits the cgroups can hold; returns limit -> what enforces it."""
        enforced: dict[str, str] = {}
        if "memory" in self.dirs and limits.memory_bytes is not None:
            try:
                _write(os.path.join(self.dirs["memory"], "memory.limit_in_bytes"), str(limits.memory_bytes))
                enforced["memory_bytes"] = "cgroup memory (OOM kill)"
            except OSError:
                pass
        if "pids" in self.dirs and limits.pids is not None:
            try:
                _write(os.path.join(self.dirs["pids"], "pids.max"), str(limits.pids))
                enforced["pids"] = "cgroup pids"
            except OSError:
                pass
        if "cpuacct" in self.dirs and limits.cpu_s is not None:
            enforced["cpu_s"] = "cgroup cpuacct (whole environment) + RLIMIT_CPU backstop"
        return enforced

    def enter(self) -> None:
        """Move the calling process in (runs in the child between fork and exec)."""
        for path in self.dirs.values():
            _write(os.path.join(path, "cgroup.procs"), "0")

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


# -- environments ---------------------------------------------------------------


class Environment:
    """A started environment: its top process, its process group, its cgroups."""

    def __init__(self, process: subprocess.Popen, cgroups: Cgroups | None,
                 enforced: dict[str, str], signal_exit_codes: bool) -> None:
        self.process = process
        self.pid = process.pid
        self.pgid = process.pid
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
        by_cgroup = self.cgroups.apply(limits) if self.cgroups is not None else {}
        missing = [k for k in CGROUP_LIMITS if getattr(limits, k) is not None and k not in by_cgroup]
        if strict and missing:
            raise Unenforceable(missing)
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
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def cpu_seconds(self) -> float | None:
        """CPU time used: the whole cgroup where there is one, else the top
        process and the children it has waited for (readable until it is reaped)."""
        if self.cgroups is not None:
            used = self.cgroups.cpu_seconds()
            if used is not None:
                return used
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            return None
        # fields[11:15] are utime, stime, cutime, cstime in clock ticks.
        return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")

    def oom_killed(self) -> bool:
        return self.cgroups.oom_killed() if self.cgroups is not None else False

    def release(self) -> None:
        """After the environment ended: kill stragglers, remove its cgroups."""
        self.kill()
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
               stderr: int) -> tuple[subprocess.Popen, Cgroups]:
        """Start ``argv`` in its own session and in fresh cgroups named ``name``."""
        cgroups = Cgroups(name, detect_cgroups())

        def preexec() -> None:
            cgroups.enter()
            _set_pdeathsig()

        try:
            proc = subprocess.Popen(
                argv, cwd=cwd, env=dict(env), stdin=stdin, stdout=stdout, stderr=stderr,
                pass_fds=pass_fds, start_new_session=True, preexec_fn=preexec,
            )
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


class BwrapBackend(_Backend):
    name = "bwrap"

    def __init__(self, tmp_bytes: int = DEFAULT_TMP_BYTES) -> None:
        self.bwrap = which("bwrap")
        if self.bwrap is None:
            raise SandboxUnavailable("bubblewrap (bwrap) is not installed")
        self.tmp_bytes = tmp_bytes

    def command(self, argv: list[str], *, env: Mapping[str, str], network: bool,
                bind: list[str | tuple[int, str]], tmp_bytes: int, home_fd: int) -> list[str]:
        """bwrap's command line; ``home_fd``: an fd of the host directory bound
        read-write at HOME; a ``(fd, where)`` item of ``bind`` is bound read-only
        there (fds, so no command line names the data dir)."""
        assert self.bwrap is not None
        cmd = [
            self.bwrap,
            "--unshare-all", "--unshare-user", "--uid", "65534", "--gid", "65534",
            "--disable-userns",
            # As root, bwrap without this is no sandbox: code could remount binds writable.
            "--cap-drop", "ALL",
            "--die-with-parent", "--new-session",
            "--hostname", "bento",
            "--ro-bind", "/usr", "/usr",
            "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib",
            "--symlink", "usr/lib64", "/lib64", "--symlink", "usr/sbin", "/sbin",
            "--proc", "/proc", "--dev", "/dev",
            "--size", str(SHM_BYTES), "--tmpfs", "/dev/shm",
            "--size", str(tmp_bytes), "--tmpfs", "/tmp",
            "--bind-fd", str(home_fd), HOME,
            "--chdir", HOME,
        ]
        if network:
            cmd.append("--share-net")
            for path in ("/etc/resolv.conf", "/etc/hosts", "/etc/nsswitch.conf", "/etc/ssl",
                         "/etc/ca-certificates"):
                if os.path.exists(path):
                    cmd += ["--ro-bind", path, path]
        seen = {"/usr"}
        for item in [sys.base_prefix, *bind]:
            if isinstance(item, tuple):  # (an fd of the host path, where the sandbox sees it)
                cmd += ["--ro-bind-fd", str(item[0]), item[1]]
                continue
            path = os.path.realpath(item)
            if any(path == s or path.startswith(s + "/") for s in seen):
                continue
            seen.add(path)
            cmd += ["--ro-bind", path, path]
        # bwrap's root and /dev are tmpfs sized at half the host's RAM: read-only,
        # once every mount point above exists.
        cmd += ["--remount-ro", "/dev", "--remount-ro", "/", "--clearenv"]
        for k, v in env.items():
            cmd += ["--setenv", k, v]
        return [*cmd, "--", *argv]

    def spawn(self, argv: list[str], *, name: str, workdir: str, env: Mapping[str, str],
              network: bool, pass_fds: tuple[int, ...], stdin: int, stdout: int, stderr: int,
              bind: list[str | tuple[str, str]]) -> Environment:
        enforced = {"tmp_bytes": f"tmpfs of {self.tmp_bytes} bytes for /tmp"}
        if not network:
            enforced["network"] = "none (own network namespace)"
        fds: list[int] = []
        try:
            home_fd = os.open(workdir, os.O_PATH | os.O_DIRECTORY)
            fds.append(home_fd)
            by_fd: list[str | tuple[int, str]] = []
            for item in bind:
                if isinstance(item, tuple):  # (host path, where the sandbox sees it)
                    fds.append(os.open(os.path.realpath(item[0]), os.O_PATH))
                    by_fd.append((fds[-1], item[1]))
                else:
                    by_fd.append(item)
            cmd = self.command(argv, env={**env, "HOME": HOME}, network=network, bind=by_fd,
                               tmp_bytes=self.tmp_bytes, home_fd=home_fd)
            proc, cgroups = self._start(cmd, name=name, cwd="/", env={}, pass_fds=(*pass_fds, *fds),
                                        stdin=stdin, stdout=stdout, stderr=stderr)
        finally:
            for fd in fds:
                os.close(fd)
        return Environment(proc, cgroups, enforced, signal_exit_codes=True)


def get_backend(name: str, sandbox_cmd: str | None = None) -> NoneBackend | BwrapBackend:
    if name == "none":
        return NoneBackend()
    if name == "bwrap":
        return BwrapBackend()
    if name == "cmd":
        return CmdBackend(sandbox_cmd or "")
    raise SandboxUnavailable(f"unknown sandbox backend {name!r} (have: bwrap, none, cmd)")


def default_backend() -> str:
    """bwrap when it is installed and works here, else none."""
    bwrap = which("bwrap")
    if bwrap is None:
        return "none"
    try:
        r = subprocess.run(
            [bwrap, "--unshare-all", "--unshare-user", "--cap-drop", "ALL",
             "--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib",
             "--symlink", "usr/lib64", "/lib64", "--", "/usr/bin/true"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "none"
    return "bwrap" if r.returncode == 0 else "none"
