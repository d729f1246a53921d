"""The exchange template: one process that has imported the exchange and forks a
fresh warm exchange for each environment the pool wants.

A warm exchange started as its own ``python -I -S`` spends most of a warm
environment's CPU on the interpreter's start and the exchange's imports
(~30 ms of ~50; the sandbox's driver is the rest). Forked from this process,
which paid that once, it starts in about a millisecond and shares the imported
code's pages with it. Only the exchange comes from here: each forked exchange
still launches its own sandbox (bwrap and a fresh driver, bento/launch.py), so
no environment is ever shared or reused.

It forks the exchanges of sessions too (an execute that found no warm one,
an adoption): for those the cost of a process of its own is ~30 ms of CPU
before the sandbox even starts, paid again by every execute of a burst.

The server holds the other end of a socket pair. Each request is one message
with its fds (SCM_RIGHTS): ``w`` and one fd, the warm exchange's end of its
link; or ``x``, the exchange's arguments separated by NUL bytes (a session's
directory, maybe ``--adopt``), and two fds that become its stdout (where it
says ``ready``) and its stderr (the session's exchange.log). The answer is the
child's pid and a newline. The child leaves the template's session (it must
outlive the server, like any exchange) and runs ``bento.exchange.main`` with
those arguments. The template ignores SIGCHLD so its children are reaped by
the kernel; it ends when the server closes the socket. It must never import
trio.
"""

from __future__ import annotations

import gc
import os
import signal
import socket
import sys


def serve(fd: int) -> None:
    """Fork warm exchanges on request until the server closes ``fd``."""
    from bento.exchange import main  # imported before the first fork: that is the point

    sock = socket.socket(fileno=fd)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the children
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    gc.collect()
    gc.freeze()  # what the imports made stays shared with the children (no refcount-free COW by gc)
    sock.sendall(b"ready\n")
    while True:
        try:
            msg, fds, _flags, _addr = socket.recv_fds(sock, MAX_REQUEST, 2)
        except OSError:
            os._exit(0)
        if not msg:
            os._exit(0)  # the server is gone: the exchanges it had stay
        argv = _request(msg, fds)
        pid = -1 if argv is None else os.fork()  # (-1: not a request; the server says so)
        if pid == 0:
            assert argv is not None
            sock.close()
            _child(main, argv, fds)
        for fd in fds:
            os.close(fd)
        try:
            sock.sendall(f"{pid}\n".encode())
        except OSError:
            os._exit(0)


MAX_REQUEST = 8192  # a kind byte and a session directory's path (PATH_MAX is 4096)


def _request(msg: bytes, fds: list[int]) -> list[str] | None:
    """The forked exchange's arguments for one request, or None if it is not one."""
    if msg == b"w" and len(fds) == 1:
        return ["--warm", str(fds[0])]
    if msg[:1] == b"x" and len(fds) == 2 and len(msg) > 1:
        return msg[1:].decode("utf-8", "surrogateescape").split("\0")
    return None


def _child(main, argv: list[str], fds: list[int]) -> None:  # type: ignore[no-untyped-def]
    """Become an exchange of our own session; never return into the template's loop."""
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # it waits for its environment
        os.setsid()  # (the template's frozen objects stay frozen: a collection would write to their pages)
        if argv[0] != "--warm":
            os.dup2(fds[0], 1)  # "ready" goes to the server
            os.dup2(fds[1], 2)  # the session's exchange.log
            os.close(fds[0])
            os.close(fds[1])
        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - said on stderr, then out
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
