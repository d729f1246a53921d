"""The benchmark's client side, shared by the ceiling and the chain measurements
so that both pay exactly the same client costs: one trio-websocket connection
(64 KiB receive buffer, like the server), ``cbor2.loads`` on every message.

Built on the raw protocol client of ``tests/helpers.py``."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import cbor2
import trio
from trio_websocket import open_websocket_url

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.join(ROOT, "tests") not in sys.path:
    sys.path.insert(0, os.path.join(ROOT, "tests"))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from helpers import Client  # noqa: E402

now = time.perf_counter


@asynccontextmanager
async def open_client(url: str, hello: bool = True) -> AsyncIterator[Client]:
    async with open_websocket_url(url, max_message_size=64 * 1024 * 1024,
                                  receive_buffer_size=64 * 1024, connect_timeout=10,
                                  disconnect_timeout=5) as ws:
        c = Client(ws)
        if hello:
            r = await c.request("hello", proto=1, client="bento-bench/1")
            if not r.get("ok"):
                raise RuntimeError(f"hello refused: {r}")
        yield c


async def next_message(c: Client) -> dict[str, Any]:
    """The next message: a queued event first, else one from the socket."""
    if c.events:
        return c.events.popleft()
    return cbor2.loads(await c.ws.get_message())


async def request(c: Client, op: str, timeout: float = 30, **fields: Any) -> dict[str, Any]:
    """A request whose reply must be ok; events read meanwhile are kept."""
    r = await c.request(op, timeout=timeout, **fields)
    if not r.get("ok"):
        raise RuntimeError(f"{op} failed: {r.get('error')}")
    return r


class StreamCount:
    """Counts what an attachment receives for one session, for a rate.

    The rate is measured from the first data-carrying message to the last one,
    so start-up (execute, attach) is not in it; the first message's payload is
    not counted (it arrived at time zero)."""

    def __init__(self, unit: str) -> None:
        self.unit = unit  # "bytes" (stdout data) or "frames" (msg frames)
        self.total = 0
        self.first_amount = 0
        self.t_first: float | None = None
        self.t_last: float | None = None
        self.last_seq = 0
        self.exit: dict | None = None
        self.gaps = 0

    def feed(self, frames: list[list]) -> None:
        amount = 0
        for seq, ch, data in frames:
            self.last_seq = seq
            if ch == "exit":
                self.exit = data
            elif ch == "gap":
                self.gaps += 1
            elif self.unit == "bytes":
                if ch == "stdout":
                    amount += len(data)
            elif ch.startswith("msg"):
                amount += 1
        if amount:
            t = now()
            if self.t_first is None:
                self.t_first, self.first_amount = t, amount
            self.t_last = t
            self.total += amount

    def rate(self) -> float:
        if self.t_first is None or self.t_last is None or self.t_last <= self.t_first:
            raise RuntimeError("too little data for a rate")
        return (self.total - self.first_amount) / (self.t_last - self.t_first)


async def read_stream(c: Client, sid: str, counter: StreamCount, *, ack: bool,
                      until_exit: bool = True, until_total: int | None = None,
                      on_message: Callable[[StreamCount], None] | None = None) -> StreamCount:
    """Read out events of ``sid`` until its exit frame (or ``until_total``)."""
    while True:
        msg = await next_message(c)
        if msg.get("ev") == "error" and msg.get("session") == sid:
            raise RuntimeError(f"error event: {msg.get('error')}")
        if msg.get("ev") != "out" or msg.get("session") != sid:
            continue
        counter.feed(msg["frames"])
        if on_message is not None:
            on_message(counter)
        if ack:
            await c.send({"op": "ack", "session": sid, "seq": counter.last_seq})
        if until_exit and counter.exit is not None:
            return counter
        if until_total is not None and counter.total >= until_total:
            return counter


async def sleep_until(pred, timeout: float, step: float = 0.05) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(timeout):
        while not await pred():
            await trio.sleep(step)
