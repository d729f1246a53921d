"""The sandbox template: one process, inside a bwrap sandbox of its own, that
has imported the driver and forks each environment from there (warm ones,
and cold starts').

An environment started as bwrap + ``python -I -S`` pays the interpreter's
start and the driver's imports every time, and each driver keeps its own
copy of what they wrote (libpython's relocated data, the imported modules).
Forked from here, a driver starts in a few milliseconds and shares those
pages with this process until it writes them.

Each fork still gets a sandbox of its own, made by the fork before the driver
runs, as bwrap makes one: new user, mount, pid, network, IPC, UTS and cgroup
namespaces; its session's ``work`` directory bound at the home; fresh
``/tmp``, ``/dev/shm``, ``/dev/pts`` and ``/proc``; the directories of every
session's home (``HOMES``) covered by an empty read-only tmpfs; no
nested user namespaces; no capabilities, no new privileges. No environment
is ever reused, and none sees another's files, processes or network.

The processes of one environment::

    template --fork--> C1: unshare(user, mount, pid, net, ipc, uts), then
                           fork and exit (this process reaps it)
                       C2: pid 1 of the new pid namespace, whose parent is
                           gone: says its pid to the exchange, waits for its
                           "go" (the exchange has put it in the session's
                           cgroups), forks C3, then reaps until the driver
                           ends and reports its status (not dumpable, no
                           signal handlers: the function cannot reach it)
                       C3: makes the mounts, then runs the driver (pid 2, as
                           under bwrap's init)

C2 outlives this process (the server may stop; the function goes on): what
it reports goes to the exchange over the exchange's own connection, never
through here. When the exchange goes away (its end of the connection
closes) C2 kills the driver, and with pid 1 gone the kernel kills every
process left in the namespace.

The wire, one connection per environment (a stream unix socket; the exchange
has SO_PASSCRED set, so the kernel names C2's pid in the exchange's pid
namespace)::

    exchange -> template  "<warm|sessions>/<name>\\0<tmp bytes>\\0<shm bytes>" + 5 fds (SCM_RIGHTS):
                          stdin, stdout, stderr, the driver's fds 3 and 4
    C2 -> exchange        "p"                 (its credentials: its pid)
    exchange -> C2        "g"                 (go: it is in the session's cgroups)
    C2 -> exchange        "x <code> <cpu s>"  (the driver ended; code 128+n: signal n)
    C2 -> exchange        "e <why>"           (it could not make the sandbox)

Every fork carries what this process imported: the driver's modules,
ctypes (for the system calls Python 3.11's os module lacks) and socket. The
template itself ends when the server's end of its stdin closes.
"""

from __future__ import annotations

import ctypes
import fcntl
import gc
import os
import resource
import select
import socket
import struct
import sys
import time

from bento_driver import main as driver_module

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as _signal  # (the C module has no stubs; signal is a wrapper of it)
else:
    import _signal  # (signal's enums would touch much more of each fork's memory)

HOME = "/home/bento"
HOMES = "/opt/bento/homes"  # the data dir's warm/ and sessions/: read-write here, covered in each fork
MAX_REQUEST = 512
REQUEST_TIMEOUT_S = 2.0  # a connection that has not sent its request by then is closed
MAX_ASKING = 64  # connections waiting to send their request at once
GO_TIMEOUT_S = 10.0
FAILED = 71  # pid 1's exit code when it could not make the sandbox (bento_sandbox.forked.FAILED)
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": HOME, "PWD": HOME}  # (bwrap's)

_NEWNS, _NEWCGROUP, _NEWUTS, _NEWIPC = 0x20000, 0x02000000, 0x04000000, 0x08000000
_NEWUSER, _NEWPID, _NEWNET = 0x10000000, 0x20000000, 0x40000000
_RDONLY, _NOSUID, _NODEV, _NOEXEC, _REMOUNT, _BIND, _REC, _PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
_PR_CAPBSET_DROP, _PR_SET_NO_NEW_PRIVS, _PR_SET_PDEATHSIG, _PR_SET_DUMPABLE = 24, 38, 1, 4
_CAP_VERSION_3 = 0x20080522
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP, _IFF_RUNNING = 0x8913, 0x8914, 0x1, 0x40
_PTRACE_SEIZE = 0x4206

_libc = ctypes.CDLL(None, use_errno=True)
for _name in ("mount", "unshare", "prctl", "capset", "sethostname"):
    getattr(_libc, _name)  # resolved here once: the forks find them made
_CAP_HEADER = (ctypes.c_uint32 * 2)(_CAP_VERSION_3, 0)
_NO_CAPS = (ctypes.c_uint32 * 6)()


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(_libc.mount(source.encode() if source else None, target.encode(),
                       fstype.encode() if fstype else None, flags, data.encode() if data else None),
           f"mount {fstype or source} on {target}")


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def serve(listen_fd: int, probe: str) -> None:
    """Check that a fork gets its sandbox here (one with the warm directory
    ``probe``), say ``ready`` (or why not, and end), then fork an environment
    for each connection until the server goes (its end of our stdin closes)."""
    listen = socket.socket(fileno=listen_fd)
    problem = _probe(probe)
    print("ready" if problem is None else f"unavailable: {problem}", flush=True)
    if problem is not None:
        os._exit(1)
    _signal.signal(_signal.SIGCHLD, _signal.SIG_IGN)  # C1 exits at once: the kernel reaps it
    sys.stderr.flush()
    driver_module.warm_up()  # the compiler's first-use set-up, shared by every fork
    gc.collect()
    gc.freeze()  # what the imports made stays shared with the forks
    listen.setblocking(False)
    conns = _Connections(listen)
    while True:
        ready = conns.ready()
        if 0 in ready:
            os._exit(0)  # the server is gone: the environments forked so far stay
        for fd in ready:
            if fd != listen.fileno():
                conns.answer(fd)
        if listen.fileno() in ready:  # (after the answers: one that came is never dropped for room)
            conns.accept()
        conns.expire()


class _Connections:
    """The template's sockets: the listening one, and each connection it
    accepted until its request has come (then its environment is forked) or
    its time is up. The server holds the other end of our stdin (fd 0)."""

    def __init__(self, listen: socket.socket) -> None:
        self.listen = listen
        self.poller = select.poll()
        self.poller.register(listen.fileno(), select.POLLIN)
        self.poller.register(0, select.POLLIN)
        self.asking: dict[int, tuple[socket.socket, float]] = {}  # fd: (connection, deadline)

    def ready(self) -> list[int]:
        wait = None
        if self.asking:
            wait = max(0.0, min(d for _c, d in self.asking.values()) - time.monotonic()) * 1000 + 1
        return [fd for fd, _events in self.poller.poll(wait)]

    def accept(self) -> None:
        try:
            conn, _addr = self.listen.accept()
        except BlockingIOError:
            return
        except OSError:
            os._exit(0)  # the listening socket broke: the server starts another template
        conn.setblocking(False)
        if len(self.asking) >= MAX_ASKING:  # (only the server's exchanges connect: a bug, not an attack)
            self._drop(min(self.asking, key=lambda fd: self.asking[fd][1]))
        self.asking[conn.fileno()] = (conn, time.monotonic() + REQUEST_TIMEOUT_S)
        self.poller.register(conn.fileno(), select.POLLIN)

    def answer(self, fd: int) -> None:
        """Read the request on ``fd`` and fork its environment (a bad request is told so)."""
        entry = self.asking.get(fd)
        if entry is None:
            return  # dropped earlier in this round
        conn = entry[0]
        try:
            msg, fds, _flags, _addr = socket.recv_fds(conn, MAX_REQUEST, 5)
        except BlockingIOError:
            return  # not there after all (its fd number was another's a moment ago): it waits on
        except OSError:
            self._drop(fd)  # that exchange is gone: it says so in its own log
            return
        self.poller.unregister(fd)
        del self.asking[fd]
        try:
            request = _request(msg, fds)
            conn.settimeout(REQUEST_TIMEOUT_S)
            if request is None:
                conn.sendall(b"e not a request\n")
            elif os.fork() == 0:
                try:
                    self.listen.close()
                    for other, _deadline in self.asking.values():
                        other.close()
                    _c1(conn, request, fds)
                finally:
                    os._exit(70)  # (never back into this loop as a second template)
        except OSError:
            pass  # that exchange is gone or broke the wire: it says so in its own log
        finally:
            conn.close()
            for one in fds:
                os.close(one)

    def expire(self) -> None:
        now = time.monotonic()
        for fd in [fd for fd, (_c, deadline) in self.asking.items() if deadline <= now]:
            self._drop(fd)

    def _drop(self, fd: int) -> None:
        self.poller.unregister(fd)
        self.asking.pop(fd)[0].close()


def _probe(name: str) -> str | None:
    """Fork one environment as for an exchange, whose C3 checks its sandbox
    instead of running the driver: None, or what is wrong."""
    ours, theirs = socket.socketpair()
    err_r, err_w = os.pipe()
    null = os.open("/dev/null", os.O_RDWR)
    try:
        pid = os.fork()
        if pid == 0:
            ours.close()
            os.close(err_r)
            _c1(theirs, (name, 1 << 20, 1 << 20), [null, null, err_w, null, null], probe=True)
        os.waitpid(pid, 0)
        theirs.close()
        os.close(err_w)
        ours.settimeout(GO_TIMEOUT_S)
        said = ours.recv(1)
        if said == b"p":
            ours.sendall(b"g")
        report = b""
        while chunk := ours.recv(4096):
            report += chunk
        why = b""
        while chunk := os.read(err_r, 4096):
            why += chunk
    except OSError as exc:
        return f"the probe failed: {exc}"
    finally:
        for fd in (err_r, null):
            os.close(fd)
        ours.close()
    text = (said + report).decode("utf-8", "replace").strip()
    if text.startswith("px 0 "):
        return None
    return (why.decode("utf-8", "replace").strip() or text.removeprefix("p").removeprefix("e ")
            or "the probe ended without a word")


def _verify() -> None:
    """In the probe's C3: what a function must not be able to do. Exits."""
    wrong = []
    if os.listdir(HOMES):
        wrong.append(f"{HOMES} is visible")
    if _libc.unshare(_NEWUSER) == 0:
        wrong.append("a nested user namespace can be made")
    with open("/proc/self/status") as f:
        caps = [line.split()[1] for line in f if line.startswith(("CapEff", "CapBnd", "CapPrm"))]
    if any(int(c, 16) for c in caps):
        wrong.append(f"capabilities left: {caps}")
    if os.getpid() != 2 or sorted(int(p) for p in os.listdir("/proc") if p.isdigit()) != [1, 2]:
        wrong.append("other processes are visible")
    if _libc.ptrace(_PTRACE_SEIZE, 1, 0, 0) == 0:
        wrong.append("pid 1 can be traced")
    if wrong:
        os.write(2, ("; ".join(wrong) + "\n").encode())
    os._exit(1 if wrong else 0)


def _request(msg: bytes, fds: list[int]) -> tuple[str, int, int] | None:
    parts = msg.split(b"\0")
    if len(fds) != 5 or len(parts) != 3 or not all(p.isdigit() for p in parts[1:]):
        return None
    kind, _, name = parts[0].decode("ascii", "replace").partition("/")
    if (kind not in ("warm", "sessions") or not name or name in (".", "..")
            or not all(c.isalnum() or c in "-_." for c in name)):
        return None
    return f"{kind}/{name}", int(parts[1]), int(parts[2])


def _c1(conn: socket.socket, request: tuple[str, int, int], fds: list[int], probe: bool = False) -> None:
    """The fork: new namespaces, then C2 in them. Never returns."""
    try:
        _signal.signal(_signal.SIGCHLD, _signal.SIG_DFL)
        null = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):  # (the template's: the server reads its stdout until it closes)
            os.dup2(null, fd)
        os.close(null)
        uid, gid = os.geteuid(), os.getegid()
        _check(_libc.unshare(_NEWUSER | _NEWNS | _NEWPID | _NEWNET | _NEWIPC | _NEWUTS), "unshare")
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1")
        _write("/proc/self/gid_map", f"{gid} {gid} 1")
        if os.fork() == 0:
            _c2(conn, request, fds, probe)
    except BaseException as exc:  # noqa: BLE001 - told to the exchange, then out
        _fail(conn, exc, fds[2])
    os._exit(0)


def _c2(conn: socket.socket, request: tuple[str, int, int], fds: list[int], probe: bool) -> None:
    """pid 1 of the environment: its sandbox, the driver, its status. Never returns."""
    try:
        os.setsid()
        conn.settimeout(GO_TIMEOUT_S)
        conn.sendall(b"p")
        if conn.recv(1) != b"g":
            os._exit(1)  # the exchange gave up on this environment
        # Not dumpable: the function (same uid, same user namespace) can neither
        # ptrace this process nor take its connection to the exchange (pidfd_getfd).
        # Before the fork, so that there is no moment when it could; the driver
        # makes itself dumpable again (debuggers, /proc/self).
        _check(_libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0), "dumpable")
        # A signal from inside the namespace reaches pid 1 only if it has a handler:
        # none left but SIGIO's (Python's for SIGINT would end the environment).
        # (Before the fork: the driver sets its own.)
        _signal.signal(_signal.SIGINT, _signal.SIG_DFL)
        driver = os.fork()
        if driver == 0:
            _c3(conn, request, fds, probe)
        for fd in set(fds):
            os.close(fd)
        _no_privileges()  # (it never execs: its bounding set does not matter)
        _reap(conn, driver)
    except BaseException as exc:  # noqa: BLE001 - told to the exchange, then out
        _fail(conn, exc, fds[2])


def _mounts(name: str, tmp_bytes: int, shm_bytes: int) -> None:
    """The environment's own mounts (but /proc: see ``_proc``) and hostname."""
    _mount(None, "/", None, _REC | _PRIVATE)
    _mount(f"{HOMES}/{name}/work", HOME, None, _BIND | _REC)
    _mount(HOME, HOME, None, _REMOUNT | _BIND | _NOSUID | _NODEV)
    _mount("tmpfs", HOMES, "tmpfs", _RDONLY | _NOSUID | _NODEV | _NOEXEC, "size=4k,mode=0555")
    _mount("tmpfs", "/tmp", "tmpfs", _NOSUID | _NODEV, f"size={tmp_bytes},mode=0755")
    _mount("tmpfs", "/dev/shm", "tmpfs", _NOSUID | _NODEV, f"size={shm_bytes},mode=0755")
    _mount("devpts", "/dev/pts", "devpts", _NOSUID | _NOEXEC, "newinstance,ptmxmode=0666,mode=620")
    _check(_libc.sethostname(b"bento", 5), "sethostname")


def _loopback_up() -> None:
    """``lo`` up in the new network namespace (as bwrap does): a function may
    serve and connect on 127.0.0.1, and reach nothing else."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = bytearray(struct.pack("16sH14x", b"lo", 0))
        fcntl.ioctl(s, _SIOCGIFFLAGS, req)
        flags = struct.unpack_from("16sH", req)[1] | _IFF_UP | _IFF_RUNNING
        fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags))


def _proc() -> None:
    """The environment's /proc, its cgroup namespace (rooted at the session's
    cgroups, which pid 1 was put in) and no nested user namespaces: by the
    driver's process, the first that runs in the new pid namespace and has
    nothing of the exchange's to wait for."""
    _check(_libc.unshare(_NEWCGROUP), "unshare cgroup")
    _mount("proc", "/proc", "proc", _NOSUID | _NODEV | _NOEXEC)
    _write("/proc/sys/user/max_user_namespaces", "0")  # as bwrap's --disable-userns
    for sub in ("sys", "sysrq-trigger", "irq", "bus"):  # as bwrap: read-only, in case
        path = f"/proc/{sub}"
        if os.path.exists(path):
            _mount(path, path, None, _BIND | _REC)
            _mount(path, path, None, _REMOUNT | _BIND | _RDONLY | _NOSUID | _NODEV | _NOEXEC)


def _drop_privileges() -> None:
    for cap in range(64):
        _libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0)  # (EINVAL past the last one the kernel knows)
    _no_privileges()


def _no_privileges() -> None:
    """No capabilities, and none to gain."""
    _check(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    _check(_libc.capset(_CAP_HEADER, _NO_CAPS), "capset")


def _c3(conn: socket.socket, request: tuple[str, int, int], fds: list[int], probe: bool) -> None:
    """The sandbox's mounts, then the driver. Never returns. (The sandbox is
    made here rather than in C1 or C2: pages a process writes after its fork
    are its own, and pid 1 keeps everything C1 wrote before it exited.)"""
    try:
        conn.close()
        _check(_libc.prctl(_PR_SET_DUMPABLE, 1, 0, 0, 0), "dumpable")
        os.setsid()
        _mounts(*request)
        _loopback_up()
        _proc()
        _drop_privileges()
        _check(_libc.prctl(_PR_SET_PDEATHSIG, _signal.SIGKILL, 0, 0, 0), "pdeathsig")
        high = max(10, *fds) + 1
        for i, fd in enumerate(fds):
            os.dup2(fd, high + i)  # (above all of them first: one may be another's target)
        for i in range(5):
            os.dup2(high + i, i)
        os.closerange(5, os.sysconf("SC_OPEN_MAX"))
        os.chdir(HOME)
        os.environ.clear()
        os.environ.update(ENV)
        _signal.signal(_signal.SIGCHLD, _signal.SIG_DFL)
        if probe:
            _verify()
        driver_module.main()
    except BaseException as exc:  # noqa: BLE001 - on its stderr, then out
        os.write(2, f"the sandbox template could not start the driver: {exc!r}\n".encode("utf-8", "replace"))
    finally:
        os._exit(70)


def _reap(conn: socket.socket, driver: int) -> None:
    """Reap every process of the namespace until the driver ends; report its
    status; kill it if the exchange goes (SIGIO on the connection: its end of
    file). Never returns. Lean on purpose: every page this process writes is
    its own (the C ``_signal``, not ``signal``, whose enums touch much more)."""

    def on_io(_signum: int, _frame: object) -> None:
        try:
            said = conn.recv(64, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:  # (reset by a peer that died)
            said = b""
        if not said:
            os.kill(driver, _signal.SIGKILL)  # its exchange is gone: so is the function

    conn.setblocking(True)  # (with a timeout, recv would wait for it despite MSG_DONTWAIT)
    _signal.signal(_signal.SIGIO, on_io)
    fcntl.fcntl(conn.fileno(), fcntl.F_SETOWN, os.getpid())
    fcntl.fcntl(conn.fileno(), fcntl.F_SETFL, fcntl.fcntl(conn.fileno(), fcntl.F_GETFL) | os.O_ASYNC)
    on_io(0, None)  # (gone before O_ASYNC was set: no SIGIO for that)
    while True:
        try:
            pid, status = os.waitpid(-1, 0)  # (SIGIO runs on_io, then the wait goes on)
        except ChildProcessError:
            os._exit(70)
        if pid == driver:
            code = (128 + os.WTERMSIG(status)) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # (the driver's and every orphan's reaped here)
            try:
                conn.sendall(f"x {code} {usage.ru_utime + usage.ru_stime:.6f}\n".encode())
            except OSError:
                pass  # the exchange is gone: nobody to tell
            os._exit(code)


def _fail(conn: socket.socket, exc: BaseException, stderr: int = -1) -> None:
    """Say why on the connection and on the environment's stderr (where still
    open), then exit."""
    why = f"e the sandbox template could not make this environment: {type(exc).__name__}: {exc}\n"
    try:
        conn.sendall(why.encode("utf-8", "replace"))
    except OSError:
        pass  # the exchange is gone
    try:
        os.write(stderr, why[2:].encode("utf-8", "replace"))
    except OSError:
        pass  # (closed: the driver runs, or ran)
    os._exit(FAILED)
