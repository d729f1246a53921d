"""The server's own binary frames (bento/wsfast.py) against a real trio-websocket
client: the installed trio-websocket and wsproto let it serve plain connections,
and every size of message, in pieces or not, arrives byte for byte."""

from __future__ import annotations

import os

import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url, serve_websocket
from wsproto.connection import ConnectionType
from wsproto.frame_protocol import FrameProtocol, Opcode

from bento import wsfast

SIZES = [0, 1, 125, 126, 127, 65535, 65536, 65537, 1 << 20, 3 * (1 << 20) + 7]


@pytest.mark.parametrize("n", SIZES)
def test_header_is_what_wsproto_writes(n):
    wsproto_frame = FrameProtocol(client=False, extensions=[])._serialize_frame(Opcode.BINARY, b"x" * n)
    assert bytes(wsproto_frame) == wsfast.frame_header(n) + b"x" * n


def pieces_of(data: bytes, k: int) -> list:
    step = max(1, len(data) // k)
    out = [memoryview(data)[i:i + step] for i in range(0, len(data), step)]
    return out or [b""]


async def test_fast_path_on_a_real_connection():
    payloads = [os.urandom(n) for n in SIZES]
    got: list[bytes] = []
    reasons: list[str | None] = []

    async def handler(request):
        ws = await request.accept()
        reasons.append(wsfast.reason_unusable(ws))
        for data in payloads:
            await wsfast.send_binary(ws, pieces_of(data, 3), len(data))
            await wsfast.send_binary(ws, pieces_of(data, 200), len(data))  # joined past MAX_PIECES
        await ws.send_message(b"end")  # trio-websocket's own send still works after ours
        with trio.move_on_after(5):
            await ws.get_message()

    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
        port = server.port
        async with open_websocket_url(f"ws://127.0.0.1:{port}/", max_message_size=16 << 20) as client:
            with trio.fail_after(30):
                while True:
                    msg = await client.get_message()
                    if msg == b"end":
                        break
                    got.append(msg)
            await client.send_message(b"bye")
        nursery.cancel_scope.cancel()
    assert reasons == [None], reasons
    assert got == [p for p in payloads for _ in range(2)]


async def test_send_after_close_is_connection_closed():
    done = trio.Event()
    outcome: list[str] = []

    async def handler(request):
        ws = await request.accept()
        try:
            with trio.move_on_after(5):
                await ws.get_message()  # the client closes instead
        except ConnectionClosed:
            pass
        with trio.fail_after(5):
            while True:
                try:
                    await wsfast.send_binary(ws, [b"late"], 4)
                except ConnectionClosed:
                    outcome.append("closed")
                    break
                await trio.sleep(0.01)
        done.set()

    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
        async with open_websocket_url(f"ws://127.0.0.1:{server.port}/") as client:
            await client.aclose()
        with trio.fail_after(10):
            await done.wait()
        nursery.cancel_scope.cancel()
    assert outcome == ["closed"]


def test_client_side_connections_are_refused():
    from wsproto import WSConnection

    class Fake:
        _wsproto = WSConnection(ConnectionType.CLIENT)
        _stream = _stream_lock = _close_reason = _abort_web_socket = None

    assert wsfast.reason_unusable(Fake()) is not None  # type: ignore[arg-type]
