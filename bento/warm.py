"""A warm exchange: its environment is started before any session exists.

The server keeps a pool of these (``--pool``). Over the socket pair it was
started with, a warm exchange gets ``warm`` (how to launch, and its
directory), prepares the directory as a session's, launches, waits until the
environment is up (its driver's ``up``), holds the directory by an fd and
opens its logs (so the rename does not matter to it, and the session's
exchange need not open them), answers ``warm_ready``, then waits
for ``assign`` (the session's directory: its own, renamed by the server);
from there on it is an ordinary exchange. It must never import trio.

With ``limits`` in ``warm`` (those of a session that asks for none), it puts
them on the environment once it is up, and its driver reads its start from a
FIFO in the directory: for a session with those limits the server writes the
start there itself before the ``assign`` (``started``), and the function
starts while this exchange wakes.

Up, not just launched: the sandbox's home is the directory's ``work``, which a
session renames along with it when it takes the environment, and bwrap turns
the home's fd into a path early and mounts that path late. A rename in
between leaves the sandbox without its home and it dies before the function
runs. Once the driver runs, every mount is done and the name no longer matters.
"""

from __future__ import annotations

import os
import select
import socket
import time

import bento_sandbox
from bento_driver import wire

from bento import protocol, sessiondisk, sessionlog
from bento.launch import READ_SIZE, START_FIFO, Launched, Link, launch, loads

UP_TIMEOUT_S = 10.0  # an environment not up by then is discarded (the pool tries again later)
UP_MAX_BYTES = 4096  # the driver's ``up`` is a few bytes: more is a broken driver
INLINE_META_MAX = 64 * 1024  # a session's meta.cbor up to this size comes with its ``assign``
STDERR_TAIL = 1000  # of an environment that died before it came up, for the server's log


class Assigned:
    """What a warm exchange has when the server assigns it a session."""

    def __init__(self, launched: Launched, sdir: str, lock_fd: int, pinned: str,
                 logs: tuple[sessionlog.Writer, sessionlog.Writer, dict] | None, meta: dict | None) -> None:
        self.launched = launched  # the environment
        self.dir = sdir  # the session's directory: the warm one, renamed by the server
        self.lock_fd = lock_fd
        self.pinned = pinned  # that directory as this process holds it (``sessiondisk.pin_dir``)
        self.logs = logs  # ``sessiondisk.open_logs`` of it
        self.meta = meta  # its meta.cbor, when the ``assign`` brought it


def wait_for_session(sock: socket.socket) -> Assigned | None:
    """Prepare the directory the server gave (``sessiondisk.prepare_dir``; the
    environment's home is its ``work``), start an environment now, open the
    directory's logs, then wait for the server to assign a session; None if
    the server gave up or the environment never came up."""
    link = Link(sock.fileno(), sock.fileno(), 1 << 20)
    os.set_blocking(sock.fileno(), True)

    def receive() -> dict | None:
        while True:
            body = link.next()
            if body is not None:
                msg: dict = loads(body)
                wire.check(wire.TO_EXCHANGE, msg)
                return msg
            if not link.feed():
                return None

    cfg = receive()
    if cfg is None or cfg.get("t") != "warm":
        return None
    try:
        # Its own errors go to the session's exchange.log from here on, as a
        # cold exchange's do (the directory becomes the session's).
        log_fd = os.open(os.path.join(cfg["dir"], "exchange.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        lock_fd = sessiondisk.prepare_dir(cfg["dir"])
        if cfg.get("limits") is not None:
            cfg["start_fifo"] = os.path.join(cfg["dir"], START_FIFO)
            os.mkfifo(cfg["start_fifo"], 0o600)
    except OSError as exc:
        lock_fd, launched = -1, Launched(None, error=f"cannot prepare {cfg['dir']}: {exc}")
    else:
        launched = launch(cfg, f"warm-{os.getpid()}", os.path.join(cfg["dir"], "work"))
    error = launched.error
    if error is None:
        error = wait_up(launched, sock.fileno(), UP_TIMEOUT_S)
        if error is not None:
            launched.discard()
    rlimits = None
    if error is None and cfg.get("limits") is not None:
        assert launched.env is not None
        try:
            # The limits of a session that asks for none: then such a session's start
            # can go to the driver as soon as the server has it (bento/launch.py).
            enforced, rlimits = launched.env.apply(bento_sandbox.Limits.from_map(cfg["limits"]),
                                                   strict=not cfg.get("allow_unenforced", False))
            launched.preapplied = (cfg["limits"], enforced, rlimits)
        except bento_sandbox.Unenforceable:
            pass  # (the session's own start says why, if it asks for these limits)
    pinned, logs = "", None
    if error is None:
        assert launched.env is not None
        try:
            with open(os.path.join(cfg["dir"], "env.pid"), "w") as f:
                f.write(f"{launched.env.pgid}\n")
            launched.pid_file = os.path.join(cfg["dir"], "env.pid")  # (until the server renames the dir)
            # Held by an fd, the directory keeps its path here across the rename, and
            # its logs are open before the session needs them.
            pinned = sessiondisk.pin_dir(cfg["dir"])
            logs = sessiondisk.open_logs(pinned)
        except OSError as exc:
            launched.discard()
            error = f"cannot open the directory's files: {exc}"
    link.queue(protocol.encode(wire.message(wire.FROM_EXCHANGE, "warm_ready", pid=os.getpid(),
                                            error=error, **({"rlimits": rlimits} if rlimits is not None else {}))))
    link.flush()
    if error is not None:
        return None  # nothing was handed out: the server logs why and starts another
    assign = receive()
    if assign is None or assign.get("t") != "assign":
        launched.discard()
        return None
    if link.framer.pending:
        raise RuntimeError("the server sent more than one message before the session was set up")
    launched.start_sent = bool(assign.get("started"))
    os.set_blocking(sock.fileno(), False)
    meta = loads(assign["meta"]) if "meta" in assign else None
    return Assigned(launched, assign["dir"], lock_fd, pinned, logs, meta)


def wait_up(launched: Launched, server_fd: int, timeout: float) -> str | None:
    """Wait until the environment's driver says ``up``: None, or why it never will.

    Sets ``launched.up``; bytes the driver sent after its ``up`` stay in
    ``launched.early`` for the session's link. Gives up when ``timeout``
    passes, when the environment ends first, or when the server closes
    ``server_fd`` (it sends nothing before ``warm_ready``)."""
    framer = wire.Framer(UP_MAX_BYTES)
    poller = select.poll()
    poller.register(launched.from_r, select.POLLIN)
    poller.register(server_fd, select.POLLIN)
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return f"the environment did not come up within {timeout:g} s"
        for fd, _events in poller.poll(left * 1000):
            if fd == server_fd:
                return "the server closed the link before the environment came up"
            try:
                chunk = os.read(launched.from_r, UP_MAX_BYTES)
            except BlockingIOError:
                continue
            except OSError as exc:
                return f"cannot read the environment's driver: {exc}"
            if not chunk:
                return f"the environment ended before it came up: {_stderr_tail(launched)}"
            framer.feed(chunk)
            try:
                body = framer.next()
                if body is None:
                    continue
                msg = loads(body)
                if wire.check(wire.FROM_DRIVER, msg) != "up":
                    raise wire.WireError(f"{msg['t']!r} before up")
            except (ValueError, protocol.ProtocolError) as exc:
                return f"the environment's driver broke the internal wire: {exc}"
            launched.up = True
            launched.early = framer.rest()
            return None


def _stderr_tail(launched: Launched) -> str:
    """What the dead environment wrote to stderr (bwrap says there why it failed)."""
    got = b""
    while len(got) < READ_SIZE:
        try:
            chunk = os.read(launched.err_r, READ_SIZE)
        except OSError:  # BlockingIOError: nothing more for now
            break
        if not chunk:
            break
        got += chunk
    text = got[-STDERR_TAIL:].decode(errors="replace").strip()
    return text or "(no message)"
