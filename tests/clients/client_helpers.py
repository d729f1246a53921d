"""Helpers for the client tests: a TCP proxy that can cut connections on demand,
and a runner for the ``bento`` CLI as a subprocess (every wait bounded, every
process waited for)."""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import subprocess
import sys
from typing import Any

import trio

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLI = [sys.executable, "-m", "bento.app"]
CLI_TIMEOUT_S = 60.0


class Proxy:
    """A TCP proxy between a client and the server. ``cut()`` closes every
    proxied connection abruptly (RST, both sides); ``hold`` stops forwarding
    server-to-client bytes (so a request reaches the server but its reply does
    not reach the client) until the next cut."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.pairs: set[tuple[trio.SocketStream, trio.SocketStream]] = set()
        # When set to n: the next connection is cut right after the server's
        # n-th chunk reached the client (n >= 2: after the WebSocket handshake,
        # during hello and re-attach).
        self.cut_next_after: int | None = None
        self.cuts = 0  # cuts that closed at least one live connection
        self.early_cuts = 0  # connections cut by cut_next_after
        self.connections = 0
        self.hold = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, downstream: trio.SocketStream) -> None:
        try:
            upstream = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        except OSError:
            await downstream.aclose()
            return
        pair = (downstream, upstream)
        self.pairs.add(pair)
        self.connections += 1
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pipe, downstream, upstream, nursery, None)
                nursery.start_soon(self._pipe, upstream, downstream, nursery, pair)
        finally:
            self.pairs.discard(pair)
            for stream in pair:
                with trio.CancelScope(shield=True):
                    await stream.aclose()

    async def _pipe(self, src: trio.SocketStream, dst: trio.SocketStream, nursery: trio.Nursery,
                    from_server: tuple[trio.SocketStream, trio.SocketStream] | None) -> None:
        chunks = 0
        cut_after = None
        if from_server is not None and self.cut_next_after is not None:
            cut_after, self.cut_next_after = self.cut_next_after, None
        try:
            while True:
                data = await src.receive_some(65536)
                if not data:
                    break
                if from_server is not None and self.hold:
                    continue  # swallowed: the client never sees it
                await dst.send_all(data)
                chunks += 1
                if cut_after is not None and chunks >= cut_after and from_server is not None:
                    self._reset(from_server)
                    self.early_cuts += 1
                    break
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        nursery.cancel_scope.cancel()

    def cut(self) -> int:
        """Close every proxied connection now, with a TCP reset. Returns how many."""
        pairs = list(self.pairs)
        for pair in pairs:
            self._reset(pair)
        self.hold = False
        if pairs:
            self.cuts += 1
        return len(pairs)


    @staticmethod
    def _reset(pair: tuple[trio.SocketStream, trio.SocketStream]) -> None:
        for stream in pair:
            sock = stream.socket
            if sock.fileno() != -1:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()


def line_numbers(frames: list[Any]) -> list[int]:
    """The number each stdout line of ``frames`` starts with, in order (the
    output must end with its newline)."""
    from bento_clients.frames import Stdout

    lines = b"".join(f.data for f in frames if isinstance(f, Stdout)).split(b"\n")
    assert lines[-1] == b"", lines[-1][:80]
    numbers = []
    for line in lines[:-1]:
        m = re.match(rb"\s*(\d+)", line)
        assert m is not None, line[:80]
        numbers.append(int(m.group(1)))
    return numbers


def cli_env(state_file: str, server_url: str | None = None, **extra: str) -> dict[str, str]:
    """The environment for a CLI subprocess: its own state file and server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BENTO_")}
    env["BENTO_CLIENT_STATE"] = state_file
    env["BENTO_CONFIG"] = os.path.join(os.path.dirname(state_file), "no-config.toml")
    if server_url:
        env["BENTO_SERVER"] = server_url
    env.update(extra)
    return env


def run_cli(args: list[str], env: dict[str, str], input: bytes | None = b"",
            timeout: float = CLI_TIMEOUT_S, cwd: str | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run ``bento ARGS`` to completion (killed and waited for on timeout)."""
    return subprocess.run(CLI + args, input=input, capture_output=True, env=env, timeout=timeout,
                          cwd=cwd or ROOT)


def spawn_cli(env: dict[str, str], args: list[str], rows: int = 24, cols: int = 200) -> Any:
    """``bento ARGS`` under a pexpect PTY of that size (the caller closes it)."""
    import pexpect

    return pexpect.spawn(CLI[0], CLI[1:] + args, env=env, cwd=ROOT, timeout=30, dimensions=(rows, cols))


def state_sessions(state_file: str) -> dict[str, Any]:
    with open(state_file) as f:
        return json.load(f)["sessions"]


def write_file(directory: str, name: str, text: str) -> str:
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write(text)
    return path
