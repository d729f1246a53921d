"""Environments forked by the sandbox template (driver/bento_driver/template.py):
the exchange's side of one, and the template's own sandbox.

The template forks; the environment's pid 1 (``C2`` there) tells its pid over
the exchange's connection (SO_PASSCRED: the kernel gives it in the exchange's
pid namespace), the exchange puts it in the session's cgroups and says go,
and at the end pid 1 reports the driver's exit code and CPU time. Its
process is not the exchange's child: no ``waitpid``; the connection says
how it ended, and its end of file without a report means it was killed.
"""

from __future__ import annotations

import os
import signal
import socket
import struct

from bento_sandbox.cgroups import Cgroups, detect_cgroups
from bento_sandbox.environment import Environment, SandboxUnavailable
from bento_sandbox.spawn import Process
from bento_sandbox.unix import short_path

CONNECT_TIMEOUT_S = 5.0  # the template forks one at a time, each in about a millisecond
REPORT_TIMEOUT_S = 2.0  # pid 1 reports before it exits: this is only for a broken one
_UCRED = struct.Struct("3i")
FAILED = 71  # pid 1's exit code when it could not make the sandbox (bento_driver.template.FAILED)
SANDBOX_LIB = "/opt/bento/lib"  # the driver's package inside (bento/launch.py binds it there)


class ForkedProcess(Process):
    """Pid 1 of a forked environment, watched over its connection and named by
    a pidfd taken while it waited for its go: it is nobody's child here, so
    once it ends its pid may be another process's at once."""

    def __init__(self, pid: int, conn: socket.socket, pidfd: int) -> None:
        super().__init__(pid)
        self.conn = conn
        self.pidfd = pidfd
        self.buf = b""
        self.cpu: float | None = None

    def open_pidfd(self) -> int:
        return os.dup(self.pidfd)

    def kill_group(self) -> None:
        """SIGKILL to pid 1: the kernel kills the rest of its pid namespace."""
        if self.pidfd >= 0:
            _kill(self.pidfd)

    def poll(self) -> int | None:
        if self.returncode is None:
            self._read(block=False)
        return self.returncode

    def reap(self) -> int:
        """Its wait status (as ``os.waitpid`` gives), once it ended."""
        if self.returncode is None:
            self._read(block=True)
        code = -9 if self.returncode is None else self.returncode
        return (-code) & 0x7F if code < 0 else (code & 0xFF) << 8

    def close(self) -> None:
        self.conn.close()  # (pid 1 kills the driver if it still runs)
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1

    def cpu_seconds(self) -> float | None:
        if self.poll() is not None:
            return self.cpu  # (None: it was killed before it could say)
        return super().cpu_seconds()  # (its own and its reaped children's, while it runs)

    def _read(self, *, block: bool) -> None:
        if self.conn.fileno() < 0:  # (closed: released, or read to its end)
            if self.returncode is None:
                self.returncode = -9
            return
        self.conn.settimeout(REPORT_TIMEOUT_S if block else 0.0)
        while True:
            try:
                chunk = self.conn.recv(256)
            except (BlockingIOError, TimeoutError):
                return
            except OSError:
                chunk = b""
            if not chunk:
                self.returncode = -9  # no report: it was killed (SIGKILL is all that does that)
                self.conn.close()
                return
            self.buf += chunk
            if b"\n" in self.buf:
                line = self.buf.partition(b"\n")[0].split()
                try:
                    if line[:1] != [b"x"] or len(line) != 3:
                        raise ValueError(line[:1])
                    self.returncode, self.cpu = int(line[1]), float(line[2])
                except ValueError:  # "e ...": it could not make the sandbox (said on its stderr too)
                    self.returncode = FAILED
                self.conn.close()
                return


def home_of(workdir: str) -> str | None:
    """How the template names the session directory whose ``work`` is
    ``workdir`` (``warm/<name>`` or ``sessions/<id>``), or None: not one it sees."""
    workdir = os.path.normpath(workdir)
    sdir = os.path.dirname(workdir)
    kind, name = os.path.basename(os.path.dirname(sdir)), os.path.basename(sdir)
    if os.path.basename(workdir) != "work" or kind not in ("warm", "sessions"):
        return None
    return f"{kind}/{name}"


def spawn(sock_path: str, *, name: str, home: str, tmp_bytes: int, shm_bytes: int,
          std: tuple[int, int, int], driver_fds: tuple[int, int]) -> Environment:
    """A new environment forked by the template listening at ``sock_path``, its
    home the ``work`` of ``home`` (``home_of``); ``name`` names its cgroups.
    Raises SandboxUnavailable when the template cannot give one (the caller
    starts its own bwrap instead)."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    cgroups: Cgroups | None = None
    pidfd = -1
    try:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        conn.settimeout(CONNECT_TIMEOUT_S)
        with short_path(sock_path) as path:
            conn.connect(path)
        request = f"{home}\0{tmp_bytes}\0{shm_bytes}".encode()
        socket.send_fds(conn, [request], [*std, *driver_fds])
        said, ancillary, _flags, _addr = conn.recvmsg(256, socket.CMSG_SPACE(_UCRED.size))
        pid = _sender_pid(ancillary)
        if said != b"p" or pid is None:
            why = said.decode("utf-8", "replace").strip().removeprefix("e ") or "it closed the connection"
            raise SandboxUnavailable(f"the sandbox template did not fork: {why}")
        pidfd = os.pidfd_open(pid)  # (it waits for our go: this is that process)
        cgroups = Cgroups(name, detect_cgroups())
        cgroups.add(pid)
        conn.sendall(b"g")
    except BaseException as exc:
        conn.close()  # (pid 1, waiting for its go, exits)
        if pidfd >= 0:
            _kill(pidfd)  # (now: its cgroups can go)
            os.close(pidfd)
        if cgroups is not None:
            cgroups.remove()
        if isinstance(exc, OSError):
            raise SandboxUnavailable(f"the sandbox template did not fork: {exc}") from None
        raise
    enforced = {"tmp_bytes": f"tmpfs of {tmp_bytes} bytes for /tmp", "network": "none (own network namespace)"}
    return Environment(ForkedProcess(pid, conn, pidfd), cgroups, enforced, signal_exit_codes=True)


def _kill(pidfd: int) -> None:
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        pass  # (it ended already)


def _sender_pid(ancillary: list[tuple[int, int, bytes]]) -> int | None:
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(data) >= _UCRED.size:
            pid, _uid, _gid = _UCRED.unpack_from(data)
            return pid
    return None


def template_argv(python: str, *, listen_fd: int, homes: dict[str, int], probe: str,
                  bind: list[str | tuple[int, str]], tmp_bytes: int) -> list[str]:
    """The sandbox template's command: bwrap (``BwrapBackend.command``'s
    ``template``) around the interpreter that runs ``template.serve``; its
    sys.path is the driver's package as the sandbox sees it (in ``bind``)."""
    from bento_sandbox.bwrap import HOME, BwrapBackend

    boot = (f"import sys;sys.path[:0]=[{SANDBOX_LIB!r}];"
            f"from bento_driver.template import serve;serve({listen_fd},{probe!r})")
    return BwrapBackend().command([python, "-I", "-S", "-c", boot],
                                  env={"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": HOME},
                                  network=False, bind=bind, tmp_bytes=tmp_bytes, home_fd=-1, template=homes)
