"""The ``bwrap`` backend: bubblewrap with every namespace unshared, and the check that it works here."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

from bento_sandbox.environment import Environment, SandboxUnavailable, _Backend, which

HOME = "/home/bento"
DEFAULT_TMP_BYTES = 64 * 1024 * 1024
SHM_BYTES = 16 * 1024 * 1024
HOMES = "/opt/bento/homes"  # the sandbox template's: the data dir's warm/ and sessions/
TEMPLATE_UNSHARE = ["--unshare-ipc", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]


class BwrapBackend(_Backend):
    name = "bwrap"

    def __init__(self, tmp_bytes: int = DEFAULT_TMP_BYTES) -> None:
        self.bwrap = which("bwrap")
        if self.bwrap is None:
            raise SandboxUnavailable("bubblewrap (bwrap) is not installed")
        self.tmp_bytes = tmp_bytes

    def command(self, argv: list[str], *, env: Mapping[str, str], network: bool,
                bind: list[str | tuple[int, str]], tmp_bytes: int, home_fd: int,
                template: dict[str, int] | None = None) -> list[str]:
        """bwrap's command line; ``home_fd``: an fd of the host directory bound
        read-write at HOME; a ``(fd, where)`` item of ``bind`` is bound read-only
        there (fds, so no command line names the data dir).

        ``template``: the sandbox template's (driver/bento_driver/template.py),
        whose forks make their own namespaces: no home of its own (``home_fd``
        is not used), the directories that hold every session's home (their
        name -> an fd of each) bound read-write under HOMES; nested user
        namespaces are allowed (the forks forbid them for themselves); the
        host's /proc is bound (a fork can mount its own /proc only where a whole
        one is visible: bwrap's has read-only parts); no pid namespace of its
        own, so that the forks outlive it."""
        assert self.bwrap is not None
        if template is None:
            # A session's: every namespace, no nested user namespaces, gone with its exchange.
            own = ["--unshare-all", "--disable-userns", "--die-with-parent"]
            proc = ["--proc", "/proc"]
            homes = ["--bind-fd", str(home_fd), HOME]
        else:
            # (The template ends when the server's end of its stdin closes instead of
            # --die-with-parent: a parent-death signal follows the thread that started
            # it, and trio starts processes from worker threads that end when idle.)
            own = TEMPLATE_UNSHARE
            proc = ["--bind", "/proc", "/proc"]
            homes = ["--dir", HOME]
            for name, fd in template.items():
                homes += ["--bind-fd", str(fd), f"{HOMES}/{name}"]
        cmd = [
            self.bwrap, *own, "--unshare-user", "--uid", "65534", "--gid", "65534",
            # As root, bwrap without this is no sandbox: code could remount binds writable.
            "--cap-drop", "ALL", "--new-session",
            "--hostname", "bento",
            "--ro-bind", "/usr", "/usr",
            "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib",
            "--symlink", "usr/lib64", "/lib64", "--symlink", "usr/sbin", "/sbin",
            *proc, "--dev", "/dev",
            "--size", str(SHM_BYTES), "--tmpfs", "/dev/shm",
            "--size", str(tmp_bytes), "--tmpfs", "/tmp",
            *homes,
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


def default_backend() -> str:
    """bwrap when it is installed and works here, else none."""
    bwrap = which("bwrap")
    if bwrap is None:
        return "none"
    import subprocess  # (here: the exchange imports this module, and subprocess is ~1.4 MiB)

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
