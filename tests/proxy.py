"""A TCP proxy for tests: between a client and a server (or a node and its
Redis), it cuts connections on demand, holds replies back, or delays them."""

from __future__ import annotations

import math
import socket
import struct
from typing import Any

import trio


class Proxy:
    """A TCP proxy between a client and a server. ``cut()`` closes every
    proxied connection abruptly (RST, both sides); ``hold`` stops forwarding
    server-to-client bytes (so a request reaches the server but its reply does
    not reach the client) until the next cut; ``lag`` hands every
    server-to-client chunk on that many seconds after it came, in order (a
    server far away: requests stay in flight that long)."""

    def __init__(self, target_port: int, lag: float = 0.0) -> None:
        self.target_port = target_port
        self.lag = lag
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
                dst: Any = downstream
                if self.lag:
                    dst = Late(downstream, self.lag)
                    nursery.start_soon(dst.run)
                nursery.start_soon(self._pipe, downstream, upstream, nursery, None)
                nursery.start_soon(self._pipe, upstream, dst, nursery, pair)
        finally:
            self.pairs.discard(pair)
            for stream in pair:
                with trio.CancelScope(shield=True):
                    await stream.aclose()

    async def _pipe(self, src: trio.SocketStream, dst: Any, nursery: trio.Nursery,
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


class Late:
    """A stream's sending side that hands each chunk on ``lag`` seconds after it
    was given, in order, without holding up the one who gives it (what is still
    held when the connection ends is dropped with it)."""

    def __init__(self, stream: trio.SocketStream, lag: float) -> None:
        self.stream, self.lag = stream, lag
        self.send, self.receive = trio.open_memory_channel[tuple[float, bytes]](math.inf)

    async def send_all(self, data: bytes) -> None:
        self.send.send_nowait((trio.current_time() + self.lag, data))

    async def run(self) -> None:
        async for due, data in self.receive:
            await trio.sleep_until(due)
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
