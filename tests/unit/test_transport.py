"""The server's WebSocket (bento/transport.py) against real peers on loopback:
trio-websocket's client (what the SDK uses) for whole conversations, and a
bare wsproto client for byte-level cases (a message cut in two, a protocol
violation). Frames the server builds itself are checked by wsproto's decoder."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import h11
import pytest
import trio
import trio.testing
from helpers import close_ws
from trio_websocket import ConnectionClosed as ClientClosed
from trio_websocket import open_websocket_url
from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection as FrameConnection
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Request

from bento import http, quick, transport

SIZES = [0, 1, 125, 126, 127, 65535, 65536, 65537, 1 << 20, 3 * (1 << 20) + 7]


@pytest.mark.parametrize("n", SIZES)
def test_frame_header_is_what_a_client_decodes(n):
    payload = os.urandom(n)
    client = FrameConnection(ConnectionType.CLIENT)
    client.receive_data(transport.frame_header(n) + payload)
    got = b""
    for event in client.events():
        assert isinstance(event, BytesMessage), event
        got += event.data
        finished = event.message_finished
    assert got == payload and finished


def pieces_of(data: bytes, k: int) -> list:
    step = max(1, len(data) // k)
    out = [memoryview(data)[i:i + step] for i in range(0, len(data), step)]
    return out or [b""]


@asynccontextmanager
async def accepted(max_message: int = 16 << 20) -> AsyncIterator[tuple[int, trio.MemoryReceiveChannel]]:
    """A listener on a free loopback port whose connections come out, upgraded,
    on the channel; every stream is closed on the way out."""
    send, receive = trio.open_memory_channel[transport.WebSocket](8)
    traffic = transport.Traffic()
    streams: list[trio.SocketStream] = []

    async def serve(stream: trio.SocketStream) -> None:
        streams.append(stream)
        got = await http.read_request(stream)
        assert got is not None
        _, request, trailing = got
        await send.send(await transport.accept(stream, request, trailing, max_message=max_message,
                                               traffic=traffic))
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, serve, 0)
        yield listeners[0].socket.getsockname()[1], receive
        nursery.cancel_scope.cancel()
    for stream in streams:
        await trio.aclose_forcefully(stream)


@asynccontextmanager
async def pair(max_message: int = 16 << 20) -> AsyncIterator[tuple[transport.WebSocket, Any]]:
    """The server's side and a trio-websocket client of one connection (30 s at most)."""
    async with accepted(max_message) as (port, incoming):
        async with open_websocket_url(f"ws://127.0.0.1:{port}/v1", max_message_size=16 << 20) as client:
            try:
                with trio.fail_after(30):
                    yield await incoming.receive(), client
            finally:
                await close_ws(client)


async def test_every_size_in_pieces_arrives_whole():
    payloads = [os.urandom(n) for n in SIZES]
    async with pair() as (ws, client):
        for data in payloads:
            await ws.send_binary(pieces_of(data, 3), len(data))
            assert await client.get_message() == data
            await ws.send_binary(pieces_of(data, 200))  # joined past MAX_PIECES; size counted
            assert await client.get_message() == data
        assert ws.traffic.sent > 2 * sum(SIZES)
        await ws.aclose()


async def test_receives_messages_pings_and_the_close_handshake():
    async with pair() as (ws, client):
        got: list = []

        async def read() -> None:
            try:
                while True:
                    got.append(await ws.receive_message())
            except transport.ConnectionClosed as exc:
                got.append(exc.code)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await client.send_message(b"x" * 70000)
            await client.send_message("text")
            await client.ping(b"p1")  # returns when the server's pong arrives
            await client.aclose(1000, "bye")
        assert got == [b"x" * 70000, "text", 1000]
        with pytest.raises(transport.ConnectionClosed):
            await ws.send_binary([b"late"])


async def test_server_close_reaches_the_client_with_its_code():
    async with pair() as (ws, client):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ws.aclose, 1008, "idle timeout")
            with pytest.raises(ClientClosed) as info:
                await client.get_message()
        assert info.value.reason.code == 1008 and info.value.reason.reason == "idle timeout"
        assert ws.closed is not None and ws.closed.code == 1008


async def test_a_message_over_the_limit_closes_1009():
    async with pair(max_message=1000) as (ws, client):
        await client.send_message(b"y" * 1000)  # exactly the limit is fine
        assert await ws.receive_message() == b"y" * 1000
        await client.send_message(b"y" * 1001)
        with pytest.raises(transport.ConnectionClosed) as info:
            await ws.receive_message()
        assert info.value.code == 1009
        with pytest.raises(ClientClosed) as seen:
            await client.get_message()
        assert seen.value.reason.code == 1009


async def raw_client(port: int) -> tuple[trio.SocketStream, WSConnection]:
    """A bare wsproto client that has done the opening handshake."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    wsc = WSConnection(ConnectionType.CLIENT)
    await stream.send_all(wsc.send(Request(host="127.0.0.1", target="/v1")))
    while True:
        wsc.receive_data(await stream.receive_some(4096))
        if any(isinstance(e, AcceptConnection) for e in wsc.events()):
            return stream, wsc


async def test_a_receive_cancelled_mid_message_keeps_what_arrived():
    async with accepted() as (port, incoming):
        stream, wsc = await raw_client(port)
        try:
            with trio.fail_after(10):
                ws = await incoming.receive()
                data = wsc.send(BytesMessage(data=b"0123456789" * 1000))
                await stream.send_all(data[:5000])
                with trio.move_on_after(0.2) as waited:
                    await ws.receive_message()
                assert waited.cancelled_caught
                await stream.send_all(data[5000:])
                assert await ws.receive_message() == b"0123456789" * 1000
        finally:
            await stream.aclose()


async def test_a_protocol_violation_closes_1002():
    async with accepted() as (port, incoming):
        stream, wsc = await raw_client(port)
        try:
            with trio.fail_after(10):
                ws = await incoming.receive()
                # A client frame must be masked (RFC 6455 5.1): this one is not.
                await stream.send_all(transport.frame_header(3) + b"abc")
                with pytest.raises(transport.ConnectionClosed) as info:
                    await ws.receive_message()
                assert info.value.code == 1002
                reply = b""
                while chunk := await stream.receive_some(4096):
                    reply += chunk
                wsc.receive_data(reply)
                closes = [e for e in wsc.events() if isinstance(e, CloseConnection)]
                assert [c.code for c in closes] == [1002]
        finally:
            await stream.aclose()


async def test_an_upgrade_that_is_not_a_get_or_lacks_its_key_is_refused():
    stream = trio.testing.memory_stream_pair()[0]
    headers = [("host", "x"), ("upgrade", "websocket"), ("connection", "Upgrade"),
               ("sec-websocket-version", "13"), ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")]
    post = h11.Request(method="POST", target="/v1", headers=[*headers, ("content-length", "0")])
    keyless = h11.Request(method="GET", target="/v1", headers=headers[:-1])
    for request in (post, keyless):
        with pytest.raises(transport.HandshakeRefused) as info:
            await transport.accept(stream, request, b"", max_message=100, traffic=transport.Traffic())
        assert 400 <= info.value.status < 500


async def test_a_send_the_socket_takes_at_once_does_not_pass_the_scheduler():
    async with pair() as (ws, client):
        for i in range(quick.RUN_MAX):
            with trio.testing.assert_no_checkpoints():
                await ws.send_binary([b"m%d" % i])
        # A run of quick sends ends with one through the scheduler: others get their turn.
        with trio.testing.assert_checkpoints():
            await ws.send_binary([b"last"])
        for i in range(quick.RUN_MAX):
            assert await client.get_message() == b"m%d" % i
        assert await client.get_message() == b"last"
        await ws.aclose()


async def test_concurrent_senders_keep_every_message_whole():
    # Big messages are cut short by the socket: their rest goes under the lock
    # while small ones from other tasks wait for it.
    messages = [os.urandom(n) for n in (5 << 20, 7, 3 << 20, 1, 65537, 200, 2 << 20)]
    async with pair() as (ws, client):
        async with trio.open_nursery() as nursery:
            for data in messages:
                nursery.start_soon(ws.send_binary, pieces_of(data, 5), len(data))
            got = [await client.get_message() for _ in messages]
        assert sorted(got) == sorted(messages)
        await ws.aclose()
