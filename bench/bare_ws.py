"""The transport ceiling: a bare trio-websocket + CBOR server, nothing else.

Run as its own process (``python bench/bare_ws.py``) so that, like the real
server, it does not share a process (or the GIL) with the benchmark client. It
prints ``port N`` once it listens, and answers one CBOR map per message:

- ``{"op": "echo", "data": x}`` -> ``{"ev": "out", "session": "s", "frames": [[1, "msg", x]]}``
- ``{"op": "stream", "size": n, "count": k}`` -> k messages, each an ``out``
  event holding one stdout frame of n bytes (encoded fresh each time), then
  ``{"ev": "done"}``
- ``{"op": "records", "size": n, "batch": b, "count": k}`` -> out events of b
  frames of n bytes each until k frames are sent, then ``{"ev": "done"}``
- ``{"op": "ack", ...}`` -> nothing (a client that acks each event, as it
  would with the real server, costs the bare server no replies)
- anything else with an ``id`` -> ``{"id": id, "ok": true}``

The server uses the same trio-websocket settings as ``bento server``
(16 MiB messages, 64 KiB receive buffer).
"""

from __future__ import annotations

import sys

import cbor2
import trio
from trio_websocket import ConnectionClosed, serve_websocket

SID = "s" * 22


async def handler(request) -> None:  # type: ignore[no-untyped-def]
    try:
        ws = await request.accept()
        while True:
            msg = cbor2.loads(await ws.get_message())
            op = msg.get("op")
            if op == "echo":
                await ws.send_message(cbor2.dumps({"ev": "out", "session": SID,
                                                   "frames": [[1, "msg", msg.get("data")]]}))
            elif op == "stream":
                payload = b"x" * int(msg["size"])
                for seq in range(1, int(msg["count"]) + 1):
                    await ws.send_message(cbor2.dumps({"ev": "out", "session": SID,
                                                       "frames": [[seq, "stdout", payload]]}))
                await ws.send_message(cbor2.dumps({"ev": "done"}))
            elif op == "records":
                payload = b"x" * int(msg["size"])
                batch, count = int(msg["batch"]), int(msg["count"])
                seq = 1
                while seq <= count:
                    n = min(batch, count - seq + 1)
                    frames = [[s, "msg", payload] for s in range(seq, seq + n)]
                    await ws.send_message(cbor2.dumps({"ev": "out", "session": SID, "frames": frames}))
                    seq += n
                await ws.send_message(cbor2.dumps({"ev": "done"}))
            elif op != "ack":
                await ws.send_message(cbor2.dumps({"id": msg.get("id", 0), "ok": True}))
    except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    except Exception as exc:  # noqa: BLE001 - one bad connection must not stop the server
        print(f"bare_ws: {exc!r}", file=sys.stderr, flush=True)


async def main() -> None:
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            lambda task_status: serve_websocket(
                handler, "127.0.0.1", 0, None, max_message_size=16 * 1024 * 1024,
                receive_buffer_size=64 * 1024, task_status=task_status,
            )
        )
        print(f"port {server.port}", flush=True)


if __name__ == "__main__":
    try:
        trio.run(main)
    except KeyboardInterrupt:
        pass
