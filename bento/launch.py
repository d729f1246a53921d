"""Starting a session's environment, for the exchange: pipes, the sandbox, the start message.

Run inside the exchange process (no trio: it starts per session). ``launch``
starts an environment whose driver waits for its ``start`` message;
``prestart`` applies the session's limits and sends that message. A warm
exchange (bento/warm.py) launches before it has a session, and prestarts once
it is given one. It must never block on the driver: its pipes are non-blocking.
"""

from __future__ import annotations

import array
import fcntl
import os
import select
import stat
import struct
import sys
import termios
import time

import bento_sandbox
from bento_driver import wire
from bento_sandbox import forked

from bento import protocol

START_FIFO = "start.fifo"  # a warm environment's driver reads its start from it: the server may write it
PIPE_BYTES = 1 << 20
READ_SIZE = 1 << 16
VALUE_ROOM = 1024  # an out event carries one frame at least: room for its envelope
SANDBOX_LIB = "/opt/bento/lib"  # the driver's package, inside bwrap
SANDBOX_ENVS = "/opt/bento/envs"  # the environments of executes' packages, inside bwrap (read-only)


loads = protocol.decode_internal


_AVAILABLE = array.array("i", [0])


def read_available(fd: int, most: int) -> bytes:
    """What the pipe or socket ``fd`` holds now, up to ``most`` bytes (b"" at its
    end; BlockingIOError when it holds nothing). The kernel says how much is
    there first (FIONREAD): ``os.read(fd, most)`` allocates ``most`` bytes, and
    from 128 KiB up that is an mmap, an mremap and an munmap per read
    (docs/performance.md, 2026-12-06)."""
    fcntl.ioctl(fd, termios.FIONREAD, _AVAILABLE)
    return os.read(fd, min(most, _AVAILABLE[0] or 4096))


def close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


class Link:
    """Framed messages over one non-blocking fd pair (the driver's pipes, or a socket)."""

    def __init__(self, rfd: int, wfd: int, max_in: int) -> None:
        self.rfd, self.wfd = rfd, wfd
        self.framer = wire.Framer(max_in)
        self.outbuf = bytearray()
        self.eof = False

    def feed(self) -> bool:
        """Read what is there; False at EOF."""
        try:
            chunk = read_available(self.rfd, READ_SIZE * 4)
        except BlockingIOError:
            return True
        except OSError:
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        self.framer.feed(chunk)
        return True

    def next(self) -> bytes | None:
        """The next whole message body (raises wire.FrameTooLarge)."""
        return self.framer.next()

    def queue(self, body: bytes) -> None:
        self.outbuf += wire.frame(body)

    def flush(self) -> None:
        while self.outbuf:
            try:
                n = os.write(self.wfd, self.outbuf)
            except BlockingIOError:
                return
            except OSError:
                self.outbuf.clear()
                return
            del self.outbuf[:n]


class Launched:
    """A started environment and the exchange's ends of its pipes (``in_w``: the
    function's standard input)."""

    def __init__(self, env: bento_sandbox.Environment | None, out_r: int = -1, err_r: int = -1,
                 to_w: int = -1, from_r: int = -1, error: str | None = None, in_w: int = -1) -> None:
        self.env, self.error = env, error
        self.out_r, self.err_r, self.to_w, self.from_r = out_r, err_r, to_w, from_r
        self.in_w = in_w
        self.pid_file: str | None = None  # its env.pid, written while a warm exchange waited (bento/warm.py)
        self.up = False  # its driver said ``up`` (a warm environment waits for that: bento/warm.py)
        self.early = b""  # what the driver sent after its ``up``, read before the session's link
        # A warm environment's limits, put on while it waited: (limits, enforced, rlimits).
        self.preapplied: tuple[dict, dict, dict] | None = None
        self.start_sent = False  # the server sent the driver its start (bento/warm.py)

    def discard(self) -> None:
        if self.env is not None:
            self.env.release()
            try:
                self.env.process.reap()
            except ChildProcessError:
                pass
        if self.pid_file is not None:  # it names a process group that is gone
            try:
                os.unlink(self.pid_file)
            except FileNotFoundError:
                pass
            self.pid_file = None
        for fd in (self.out_r, self.err_r, self.to_w, self.from_r, self.in_w):
            if fd >= 0:
                close_quietly(fd)


# (the driver's Link, the limits in force, when the start message went)
Prestarted = tuple[Link, dict, float]


def read_meta(sdir: str) -> dict:
    with open(os.path.join(sdir, "meta.cbor"), "rb") as f:
        meta: dict = loads(f.read())
    return meta


def prestart(launched: Launched, meta: dict, cwd: str | None) -> Prestarted:
    """Apply the session's limits to its environment, then send the driver its
    start message: from here on the function runs. (For a pre-started
    environment this comes before the exchange sets itself up, which then
    happens while the function starts.) A warm environment may have the
    limits on already, and its start sent by the server (``send_start``)."""
    assert launched.env is not None
    strict = not meta.get("allow_unenforced", False)
    pre = launched.preapplied
    if pre is not None and pre[0] == meta["limits"]:
        enforced, rlimits = pre[1], pre[2]
    elif launched.start_sent:
        # The server started the function under the warm limits: never under others.
        raise bento_sandbox.Unenforceable(["limits"], {
            "limits": "the server started the function under the warm limits, not the session's (a bug)"})
    else:
        # Raises bento_sandbox.Unenforceable: the server checked the limits against
        # what this machine holds, but a session's own cgroup can still fail here.
        enforced, rlimits = launched.env.apply(bento_sandbox.Limits.from_map(meta["limits"]), strict=strict)
    driver = Link(launched.from_r, launched.to_w, meta["max_message"] + 4096)
    driver.framer.feed(launched.early)
    if not launched.start_sent:
        driver.queue(start_message(meta, cwd, rlimits))
        driver.flush()  # what the pipe does not take now goes when the loop runs
    return driver, enforced, time.monotonic()


def start_message(meta: dict, cwd: str | None, rlimits: dict) -> bytes:
    """The driver's start message for the session of ``meta`` (encoded, unframed)."""
    module = {"module": meta["module"]} if meta.get("module") else {}
    if meta.get("tty"):
        module["tty"] = True
    site = site_for(meta)
    if site:
        module["site"] = site
    return protocol.encode(wire.message(
        wire.TO_DRIVER, "start", code=meta["code"], entry=meta["entry"], args=meta["args"],
        kwargs=meta["kwargs"], env=meta["env"], cwd=cwd, rlimits=rlimits,
        max_value=meta["max_message"] - VALUE_ROOM, max_depth=protocol.MAX_DEPTH - 4,
        max_items=protocol.DEFAULT_MAX_ITEMS, **module))


def send_start(sdir: str, meta: dict, limits: dict | None, rlimits: dict | None) -> bool:
    """For the server: send the driver of the warm environment now in ``sdir``
    its start message, when that environment has the session's limits on
    already (``limits``, ``rlimits``: as its warm_ready said) and the message
    fits one atomic pipe write. The driver wakes while the exchange does, not
    after it. False: nothing was written (the exchange sends it, as for any).

    bwrap only: should the exchange then fail before its hello, the session
    starts cold, and only a sandbox makes the first start invisible (it dies
    with its exchange, has no network, and its home is discarded); unsandboxed,
    the function would have run twice on the host."""
    if (meta["sandbox"] != "bwrap" or rlimits is None or meta["limits"] != limits or meta.get("packages")
            or meta.get("tty")):
        return False
    data = wire.frame(start_message(meta, None, rlimits))
    if len(data) > select.PIPE_BUF:
        return False  # (a longer write could be split: the exchange sends it)
    try:
        fd = os.open(os.path.join(sdir, START_FIFO), os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError:
        return False  # ENXIO: no driver reads it any more (the exchange finds out)
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return False
        return os.write(fd, data) == len(data)  # all or nothing, at most PIPE_BUF bytes
    except OSError:
        return False
    finally:
        os.close(fd)


def launch(cfg: dict, name: str, workdir: str) -> Launched:
    """Start an environment whose driver waits for its ``start`` message.

    ``cfg`` holds sandbox, sandbox_cmd, python, driver_path, network. No
    session-specific setting is needed yet: limits, env and code come later."""
    in_r, in_w = os.pipe()  # the function's standard input (input with stdin: true)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    if cfg.get("tty"):
        # A terminal: its slave is stdin, stdout and stderr; the exchange reads
        # the master as stdout (stderr's pipe just ends) and writes keys to it.
        for fd in (in_r, in_w, out_r, out_w):
            close_quietly(fd)
        out_r, slave = os.openpty()
        set_window(out_r, cfg["tty"]["rows"], cfg["tty"]["cols"])
        in_r, out_w, in_w = slave, os.dup(slave), os.dup(out_r)
        os.dup2(slave, err_w)
    if cfg.get("start_fifo"):
        # A warm one's (made by bento/warm.py): a FIFO, which the server can open by its name.
        to_r = os.open(cfg["start_fifo"], os.O_RDONLY | os.O_NONBLOCK)
        to_w = os.open(cfg["start_fifo"], os.O_WRONLY)
        os.set_blocking(to_r, True)
    else:
        to_r, to_w = os.pipe()  # exchange -> driver (driver's fd 3)
    from_r, from_w = os.pipe()  # driver -> exchange (driver's fd 4)
    for fd in (out_r, err_r, from_r):
        # A bigger pipe: a function writing fast blocks (and wakes us) less often.
        try:
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        except OSError:
            pass  # over /proc/sys/fs/pipe-max-size for this user: keep the default
    # The driver expects its pipes at fds 3 and 4: pass them high, dup them down inside.
    child_in, child_out = _fd_at_least(to_r, 10), _fd_at_least(from_w, 10)
    paths, binds = _mounts(cfg)
    boot = (
        "import os,sys;"
        f"os.dup2({child_in},3);os.dup2({child_out},4);os.close({child_in});os.close({child_out});"
        f"sys.path[:0]={paths!r};"
        "from bento_driver.main import main;main()"
    )
    try:
        env = None
        home = forked.home_of(workdir)
        # Forked by the sandbox template (a sandbox of its own all the same), where it
        # can be: the template has no network to share and starts no terminal.
        if cfg.get("fork") and home and cfg["sandbox"] == "bwrap" and not cfg["network"] and not cfg.get("tty"):
            try:
                env = forked.spawn(cfg["fork"], name=name, home=home, tmp_bytes=bento_sandbox.DEFAULT_TMP_BYTES,
                                   shm_bytes=bento_sandbox.SHM_BYTES, std=(in_r, out_w, err_w),
                                   driver_fds=(child_in, child_out))
            except bento_sandbox.SandboxUnavailable as exc:  # (it ended with its server, say)
                print(f"exchange: {exc}; this environment is a bwrap of its own", file=sys.stderr, flush=True)
        if env is None:
            env = _spawn(cfg, name, workdir, boot, (in_r, out_w, err_w), (child_in, child_out), binds)
    except (OSError, bento_sandbox.SandboxUnavailable) as exc:
        for fd in (in_r, in_w, out_r, out_w, err_r, err_w, to_w, from_r, child_in, child_out):
            close_quietly(fd)
        return Launched(None, error=str(exc))
    for fd in (in_r, out_w, err_w, child_in, child_out):
        close_quietly(fd)
    for fd in (in_w, out_r, err_r, to_w, from_r):
        os.set_blocking(fd, False)
    return Launched(env, out_r, err_r, to_w, from_r, in_w=in_w)


def _spawn(cfg: dict, name: str, workdir: str, boot: str, std: tuple[int, int, int],
           driver_fds: tuple[int, int], binds: list) -> bento_sandbox.Environment:
    backend = bento_sandbox.get_backend(cfg["sandbox"], cfg.get("sandbox_cmd"))
    return backend.spawn(
        [cfg["python"], "-I", "-S", "-c", boot],
        name=name, workdir=workdir,
        env={"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"},
        network=cfg["network"], pass_fds=driver_fds,
        stdin=std[0], stdout=std[1], stderr=std[2], bind=binds,
    )


def set_window(fd: int, rows: int, cols: int) -> None:
    """The terminal's window size (the kernel tells its foreground processes: SIGWINCH)."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _mounts(cfg: dict) -> tuple[list[str], list]:
    """(the driver's sys.path, what the sandbox binds). In bwrap only the
    driver's own package and the packages' environments (read-only, at fixed
    places) are bound: never the directory that holds the driver, which may be
    the server's whole site-packages. The environments are bound whether or not
    a session asks for packages (a warm environment does not know yet); the
    start message says which one is the session's (``site_for``)."""
    if cfg["sandbox"] != "bwrap":
        return cfg["driver_path"], []
    binds: list = [(os.path.join(p, "bento_driver"), f"{SANDBOX_LIB}/bento_driver")
                   for p in cfg["driver_path"][:1]]
    if cfg.get("envs_dir"):
        binds.append((cfg["envs_dir"], SANDBOX_ENVS))
    return [SANDBOX_LIB], binds


def site_for(meta: dict) -> str | None:
    """The session's packages' directory as its driver sees it (None: no packages)."""
    if not meta.get("packages"):
        return None
    if meta["sandbox"] == "bwrap":
        return f"{SANDBOX_ENVS}/{meta['env_name']}/site"
    return os.path.join(meta["envs_dir"], meta["env_name"], "site")


def _fd_at_least(fd: int, low: int) -> int:
    new = fcntl.fcntl(fd, fcntl.F_DUPFD, low)
    os.close(fd)
    return new
