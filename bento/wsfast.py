"""Server-side binary WebSocket messages without wsproto's copies.

wsproto builds every outgoing frame as ``bytearray(header + bytearray(payload))``:
three fresh copies of each message (a 1 MiB ``out`` event costs three 1 MiB
allocations, each page faulted in). Profiled in the 64 KiB stream, that was a
third of the server's time. A server-to-client binary frame needs no masking
(RFC 6455 5.1) and, with no extension negotiated, its header is 2 to 10 bytes:
this module writes the header itself and hands header and payload pieces to one
``sendmsg`` (scatter-gather, no copy of the payload at all).

It reaches into trio-websocket and wsproto internals (``_wsproto``, ``_stream``,
``_stream_lock``, ``_close_reason``, ``_abort_web_socket``, the frame protocol's
``extensions``), so ``reason_unusable`` checks each of them per connection and
the server falls back to ``send_message`` when anything is missing or different
(TLS streams, an extension, another library version); the server logs which
path it takes, and a test holds the installed versions to the fast one.
"""

from __future__ import annotations

from collections.abc import Sequence

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection
from wsproto.connection import ConnectionState

# Pieces per sendmsg (the kernel's IOV_MAX is 1024); more are joined first.
MAX_PIECES = 64


def frame_header(n: int) -> bytes:
    """The header of an unmasked, final, binary frame of ``n`` payload bytes."""
    if n < 126:
        return bytes((0x82, n))
    if n < 65536:
        return b"\x82\x7e" + n.to_bytes(2, "big")
    return b"\x82\x7f" + n.to_bytes(8, "big")


def reason_unusable(ws: WebSocketConnection) -> str | None:
    """Why the fast path cannot serve this connection (None: it can)."""
    try:
        wsp = ws._wsproto
        conn = wsp.connection
        stream = ws._stream
        ws._stream_lock  # noqa: B018 - present, or the fast path is off
        ws._close_reason  # noqa: B018
        ws._abort_web_socket  # noqa: B018
    except AttributeError as exc:
        return f"trio-websocket/wsproto internals differ ({exc})"
    if conn is None or wsp.client or conn.client:
        return "not an open server-side connection"
    if getattr(conn._proto, "extensions", None) != []:
        return "an extension was negotiated"
    if type(stream) is not trio.SocketStream:
        return f"the stream is a {type(stream).__name__} (TLS), not a plain socket"
    return None


async def send_binary(ws: WebSocketConnection, pieces: Sequence[bytes | memoryview], size: int) -> None:
    """Send the concatenation of ``pieces`` (``size`` bytes) as one binary message.

    Same contract as ``ws.send_message``: ConnectionClosed once the connection is
    closed or closing, or when the socket breaks (the connection is then aborted)."""
    if ws._close_reason:
        raise ConnectionClosed(ws._close_reason)
    if ws._wsproto.state is not ConnectionState.OPEN:
        # Closing: let trio-websocket and wsproto say so their way.
        await ws.send_message(b"".join(pieces))
        return
    parts: list[bytes | memoryview] = [frame_header(size), *pieces]
    if len(parts) > MAX_PIECES:
        # Many small frames: one copy of them is cheaper than many iovecs.
        parts = [parts[0], b"".join(parts[1:])]
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    stream = ws._stream
    assert isinstance(stream, trio.SocketStream)  # reason_unusable saw to it
    sock = stream.socket
    async with ws._stream_lock:
        try:
            i = 0
            while i < len(views):
                sent = await sock.sendmsg(views[i:])
                while sent:
                    v = views[i]
                    if sent >= len(v):
                        sent -= len(v)
                        i += 1
                    else:
                        views[i] = v[sent:]
                        sent = 0
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            await ws._abort_web_socket()
            assert ws._close_reason is not None
            raise ConnectionClosed(ws._close_reason) from None
