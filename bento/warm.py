"""A warm exchange: its environment is started before any session exists.

The server keeps a pool of these (``--pool``). Over the socket pair it was
started with, a warm exchange gets ``warm`` (how to launch), launches and
answers ``warm_ready``, then waits for ``assign`` (the session's directory);
from there on it is an ordinary exchange. It must never import trio.
"""

from __future__ import annotations

import os
import socket

from bento_driver import wire

from bento import protocol
from bento.launch import Launched, Link, launch, loads


def wait_for_session(sock: socket.socket) -> tuple[Launched, str] | None:
    """Start an environment now, then wait for the server to assign a session:
    (the environment, the session's directory), or None if the server gave up."""
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
    launched = launch(cfg, f"warm-{os.getpid()}", cfg["workdir"])
    link.queue(protocol.encode(wire.message(wire.FROM_EXCHANGE, "warm_ready", pid=os.getpid(),
                                            error=launched.error)))
    link.flush()
    assign = receive()
    if assign is None or assign.get("t") != "assign":
        launched.discard()
        return None
    if link.framer.pending:
        raise RuntimeError("the server sent more than one message before the session was set up")
    os.set_blocking(sock.fileno(), False)
    return launched, assign["dir"]
