"""A session's packages, for the exchange: the environment is made ready, then the function starts.

An execute with ``packages`` (bento/envs.py) may take a warm environment:
every sandbox sees the environments directory (read-only), and the start
message names the session's. A warm environment whose packages are ready
never comes here: bento/exchange.py sends its start at once, as for an
execute without packages. Otherwise, if the environment is ready the
function starts at once; if not, the exchange runs the installer
(``bento.envs.main``, outside the sandbox) as a child, turns what it prints
into the session's stderr frames, and starts the function when it
succeeded, or ends the session ``failed`` (``BuildError``, with the
installer's last lines) when it did not. The exchange holds a shared lock on
the environment (``env_lock``) until the function ends, so eviction never
removes it under a running function. Runs in the exchange: no trio, no
blocking read.
"""
from __future__ import annotations

import os
import selectors
import signal
import sys

import bento_sandbox

from bento import envs, session_core, sessiondisk
from bento.launch import READ_SIZE, Launched, close_quietly, launch, prestart

TYPE_CHECKING = False  # the exchange does not import typing (it starts per session)
if TYPE_CHECKING:
    import subprocess

    from bento.exchange import Exchange


class EnvBuild:
    """Gets one session's environment ready, then starts its function."""

    def __init__(self, ex: Exchange, launched: Launched | None = None) -> None:
        self.ex = ex
        self.launched = launched  # a warm environment, waiting for its start message
        meta = ex.meta
        self.envs_dir: str = meta["envs_dir"]
        self.name: str = meta["env_name"]
        self.proc: subprocess.Popen | None = None
        self.fd = -1

    def begin(self) -> None:
        ex = self.ex
        ex.env_lock = envs.use(self.envs_dir, self.name)
        if ex.env_lock is not None:
            self.start_function()
            return
        import subprocess  # only to build: a cached environment's session goes without it (~3 ms)

        meta = self.ex.meta
        r, w = os.pipe()
        boot = f"import sys;sys.path[:0]={sys.path!r};from bento.envs import main;main(sys.argv[1:])"
        argv = [meta["python"], "-I", "-S", "-c", boot, self.envs_dir, self.name, meta["python"],
                meta.get("uv") or "", str(meta["max_env_bytes"]), *meta["packages"]]
        try:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=w, stderr=w,
                                         start_new_session=True)
        except OSError as exc:
            close_quietly(r)
            self.fail(f"cannot start the installer: {exc}")
            return
        finally:
            os.close(w)
        os.set_blocking(r, False)
        self.fd = r
        self.ex.sel.register(r, selectors.EVENT_READ, self.on_output)

    def on_output(self, fd: int) -> None:
        try:
            chunk = os.read(fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if chunk:
            self.ex.output.stream("stderr", chunk)
            return
        self.ex.sel.unregister(fd)
        self.ex.to_close.append(fd)
        self.fd = -1
        assert self.proc is not None
        rc = self.proc.wait()  # it closed its output: it is exiting
        self.proc = None
        if rc == 0:
            self.ex.env_lock = envs.use(self.envs_dir, self.name)
        if self.ex.env_lock is None:
            tail = self.ex.output.stderr_tail.decode("utf-8", "replace").strip()
            self.fail(tail or f"the installer ended with code {rc}")
            return
        self.start_function()

    def start_function(self) -> None:
        ex = self.ex
        # The build may take minutes: the work dir's path is read now, so a data
        # dir moved meanwhile (see sessiondisk.pin_dir) is found where it is.
        work = os.path.join(sessiondisk.real_path(ex.dir), "work")
        cwd = None if ex.meta["sandbox"] == "bwrap" else work
        launched = self.launched or launch(ex.meta, f"{ex.meta['session']}-{os.getpid()}", work)
        try:
            pre = prestart(launched, ex.meta, cwd) if self.launched is not None else None
        except bento_sandbox.Unenforceable as exc:
            launched.discard()
            launched = Launched(None, error=str(exc))
        ex.start(launched, pre)

    def fail(self, message: str) -> None:
        if self.launched is not None:
            self.launched.discard()  # the warm environment never gets its start message
            self.launched = None
        self.ex.finish_exit(session_core.failed_exit("BuildError", message))

    def kill(self) -> None:
        """Stop the installer (destroy, a signal, the exchange's end): the build fails."""
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    @property
    def building(self) -> bool:
        return self.proc is not None
