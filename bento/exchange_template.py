"""The exchange template: one process that has imported the exchange and forks a
fresh warm exchange for each environment the pool wants.

A warm exchange started as its own ``python -I -S`` spends most of a warm
environment's CPU on the interpreter's start and the exchange's imports
(~30 ms of ~50; the sandbox's driver is the rest). Forked from this process,
which paid that once, it starts in about a millisecond and shares the imported
code's pages with it. Only the exchange comes from here: each forked exchange
still launches its own sandbox (bwrap and a fresh driver, bento/launch.py), so
no environment is ever shared or reused.

The server holds the other end of a socket pair: each request is one byte with
one fd (the warm exchange's end of its link, SCM_RIGHTS); the answer is the
child's pid and a newline. The child leaves the template's session (it must
outlive the server, like any exchange) and runs ``bento.exchange.main`` as a
``--warm`` exchange would. The template ignores SIGCHLD so its children are
reaped by the kernel; it ends when the server closes the socket. It must never
import trio.
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
            msg, fds, _flags, _addr = socket.recv_fds(sock, 16, 1)
        except OSError:
            os._exit(0)
        if not msg:
            os._exit(0)  # the server is gone: the exchanges it had stay
        if not fds:
            continue
        pid = os.fork()
        if pid == 0:
            sock.close()
            _child(main, fds[0])
        os.close(fds[0])
        try:
            sock.sendall(f"{pid}\n".encode())
        except OSError:
            os._exit(0)


def _child(main, fd: int) -> None:  # type: ignore[no-untyped-def]
    """Become a warm exchange of our own session; never return into the template's loop."""
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # it waits for its environment
        os.setsid()  # (the template's frozen objects stay frozen: a collection would write to their pages)
        main(["--warm", str(fd)])
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
