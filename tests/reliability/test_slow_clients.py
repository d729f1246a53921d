"""Slow and stuck clients (STACK.md: trio-websocket's ``send_message`` has no
timeout; architecture.md: "Every send has a timeout; a client that stops
reading loses its connection, never stalls a session").

A *stuck* client here stops reading from its TCP socket altogether (a raw
socket with a small receive buffer, the WebSocket handshake done with
wsproto), so TCP backpressure reaches the server - trio-websocket's client
would keep reading into its own queue. While stuck clients sit on a session
that floods output, with the server at ``--send-timeout 1``:

- another attachment to the same session keeps receiving at full speed, and
  the function keeps producing (the session is not stalled);
- an echo session on another connection keeps its latency;
- each stuck client is dropped after the send timeout, and then reads what its
  socket still holds and reattaches from there: in the end it has every frame
  exactly once, byte for byte.
"""

from __future__ import annotations

import socket
import statistics
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import cbor2
import trio
from helpers import Client, assert_contiguous, close_ws, data_of
from trio_websocket import open_websocket_url
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)

from bento import protocol

SEND_TIMEOUT = 1.0
FLOOD_RATE = 3_000_000  # bytes/s of stdout
FLOOD_SECONDS = 6.0
LINE = 1010  # bytes per printed line, newline included

# Prints numbered ~1 KB lines at ``rate`` bytes/s for ``seconds``, in 10 ms ticks.
FLOOD = """
import time
def main(rate, seconds):
    pad = "x" * 1000
    per_tick = max(1, rate // 100 // 1010)
    i = 0
    t0 = time.monotonic()
    tick = 0
    while time.monotonic() - t0 < seconds:
        for _ in range(per_tick):
            print(f"{i:08d} {pad}")
            i += 1
        tick += 1
        time.sleep(max(0.0, t0 + tick * 0.01 - time.monotonic()))
    return i
"""

ECHO = """
def main():
    while True:
        try:
            v = api.recv()
        except EOFError:
            return None
        api.send(v)
"""


@asynccontextmanager
async def connect(url: str) -> AsyncIterator[Client]:
    """A raw protocol client (helpers.Client) that has said hello."""
    async with open_websocket_url(url, max_message_size=64 * 1024 * 1024) as ws:
        try:
            c = Client(ws)
            await c.ok("hello", proto=1, client="slow-clients/1")
            yield c
        finally:
            await close_ws(ws)


def flood_text(n: int) -> bytes:
    pad = "x" * 1000
    return "".join(f"{i:08d} {pad}\n" for i in range(n)).encode()


class RawWS:
    """A WebSocket client on a bare TCP socket (wsproto), so that *not reading*
    really means not reading: nothing drains the socket behind the test's back."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.pending: list[Any] = []
        self.partial = bytearray()
        self.closed: int | None = None  # close code, or -1 for EOF/reset without one
        self.rate: float | None = None  # read at most this many bytes/s (None: at once)

    @classmethod
    async def open(cls, port: int, rcvbuf: int | None = None) -> RawWS:
        sock = trio.socket.socket()
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        try:
            await sock.connect(("127.0.0.1", port))
        except BaseException:
            sock.close()
            raise
        self = cls(trio.SocketStream(sock))
        try:
            await self.stream.send_all(self.ws.send(Request(host="127.0.0.1", target="/v1")))
            while True:
                ev = await self._event()
                if isinstance(ev, AcceptConnection):
                    return self
                assert not isinstance(ev, RejectConnection), ev
        except BaseException:
            sock.close()
            raise

    async def _event(self) -> Any:
        while not self.pending:
            try:
                data = await self.stream.receive_some(8192 if self.rate else 1 << 16)
            except trio.BrokenResourceError:  # reset by the server
                data = b""
            if self.rate and data:
                await trio.sleep(len(data) / self.rate)
            self.ws.receive_data(data or None)
            self.pending += list(self.ws.events())
            if not data and not self.pending:
                self.closed = -1
                return None
        return self.pending.pop(0)

    async def send(self, msg: dict) -> None:
        await self.stream.send_all(self.ws.send(BytesMessage(data=cbor2.dumps(msg))))

    async def recv(self) -> bytes | None:
        """The next complete binary message; None once the connection is over."""
        while True:
            ev = await self._event()
            if ev is None:
                return None
            if isinstance(ev, CloseConnection):
                self.closed = ev.code
                return None
            if isinstance(ev, Ping):
                await self.stream.send_all(self.ws.send(ev.response()))
            elif isinstance(ev, BytesMessage):
                self.partial += ev.data
                if ev.message_finished:
                    raw = bytes(self.partial)
                    self.partial.clear()
                    return raw
            else:
                assert not isinstance(ev, TextMessage), ev

    async def request(self, op: str, rid: int, **fields: Any) -> dict:
        await self.send({"op": op, "id": rid, **fields})
        raw = await self.recv()
        assert raw is not None
        reply = protocol.decode(raw)
        assert reply.get("id") == rid and reply["ok"], reply
        return reply

    async def aclose(self) -> None:
        await self.stream.aclose()


class Stuck:
    """A client that attaches, then stops reading its socket entirely."""

    def __init__(self, port: int, token: str) -> None:
        self.port, self.token = port, token
        self.frames: list[list] = []
        self.dropped_code: int | None = None
        self.ws: RawWS | None = None

    def close(self) -> None:
        if self.ws is not None:
            self.ws.stream.socket.close()

    async def attach(self, rcvbuf: int, read_frames: int) -> float:
        """Attach from 1, read ``read_frames`` frames or more, then stop reading.
        Returns when it stopped. (A small SO_RCVBUF, so that the server's send
        buffer fills, and its send blocks, soon.)"""
        self.ws = await RawWS.open(self.port, rcvbuf=rcvbuf)
        await self.ws.request("hello", 0, proto=1, client="stuck/1")
        r = await self.ws.request("attach", 1, token=self.token, **{"from": 1})
        self.sid = r["session"]
        while len(self.frames) < read_frames:
            assert await self._read_one(), "dropped while it was still reading"
        return time.monotonic()

    async def _read_one(self) -> bool:
        raw = await self.ws.recv()
        if raw is None:
            return False
        msg = protocol.decode(raw, max_items=10_000_000)
        assert msg.get("ev") == "out" and msg["session"] == self.sid, msg
        self.frames += msg["frames"]
        return True

    async def wake_up(self) -> None:
        """Read what the socket still holds, to the end of the dropped connection."""
        with trio.fail_after(20):
            while await self._read_one():
                pass
        self.dropped_code = self.ws.closed
        await self.ws.aclose()

    async def reattach(self, url: str) -> int:
        """Reattach from the frame after the last one it has; read to the exit."""
        start = self.frames[-1][0] + 1 if self.frames else 1
        async with connect(url) as c:
            await c.ok("attach", token=self.token, **{"from": start})
            self.frames += await c.frames(self.sid, timeout=30)
        return start


async def test_stuck_clients_do_not_stall_anyone_and_resume_exactly(make_server):
    srv = make_server("--send-timeout", str(SEND_TIMEOUT))
    polls: list[tuple[float, int, int]] = []  # (time, attachments, next_seq)
    fast: list[tuple[float, int]] = []  # (time, bytes) of each out event the fast reader got
    fast_frames: list[list] = []
    echoes: list[tuple[float, float]] = []  # (time sent, round trip)

    release = trio.Event()

    async def fast_reader(token: str, sid: str, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with connect(srv.url) as c:
            await c.ok("attach", token=token)
            task_status.started()
            while not (fast_frames and fast_frames[-1][1] == "exit"):
                raw = await c.ws.get_message()
                msg = protocol.decode(raw, max_items=10_000_000)
                assert msg.get("ev") == "out" and msg["session"] == sid, msg
                fast.append((time.monotonic(), len(raw)))
                fast_frames.extend(msg["frames"])
            # Stay attached: the attachment count tells when the stuck ones go.
            await release.wait()

    async def echo_loop(c: Any, sid: str, first_seq: int, stop: trio.Event) -> None:
        seq = first_seq
        while not stop.is_set():
            t = time.monotonic()
            await c.send({"op": "input", "session": sid, "seq": seq, "data": seq})
            ev = await c.event(ev="out", session=sid, timeout=10)
            assert [f[2] for f in ev["frames"]] == [seq], ev
            echoes.append((t, time.monotonic() - t))
            seq += 1
            await trio.sleep(0.02)

    stuck: list[Stuck] = []
    with trio.fail_after(90):
        try:
            async with connect(srv.url) as ctl, connect(srv.url) as e:
                # The echo session and its baseline latency.
                er = await e.ok("execute", code=ECHO)
                esid = er["session"]
                stop = trio.Event()
                async with trio.open_nursery() as n:
                    n.start_soon(echo_loop, e, esid, 1, stop)
                    await trio.sleep(1.0)
                    stop.set()
                baseline = [rt for _, rt in echoes]
                echoes.clear()
                e.events.clear()  # the in_acks

                r = await ctl.ok("execute", code=FLOOD, args=[FLOOD_RATE, FLOOD_SECONDS], attach=False)
                sid = r["session"]
                stuck += [Stuck(srv.port, r["token"]), Stuck(srv.port, r["viewer_token"])]
                async with trio.open_nursery() as n:
                    await n.start(fast_reader, r["viewer_token"], sid)
                    stop = trio.Event()
                    n.start_soon(echo_loop, e, esid, len(baseline) + 1, stop)
                    stops: list[float] = []
                    both_dropped = trio.Event()

                    async def watch(task_status=trio.TASK_STATUS_IGNORED) -> None:
                        # The server's view: attachments (2 stuck + the fast reader) and progress.
                        with trio.CancelScope() as scope:
                            task_status.started(scope)
                            await watching()

                    async def watching() -> None:
                        while True:
                            st = await ctl.ok("status", token=r["viewer_token"])
                            polls.append((time.monotonic(), st["attachments"], st["next_seq"]))
                            if len(stops) == 2 and st["attachments"] == 1:
                                both_dropped.set()
                            await trio.sleep(0.05)

                    async def stick(s: Stuck, rcvbuf: int, read_frames: int) -> None:
                        stops.append(await s.attach(rcvbuf, read_frames))

                    watcher = await n.start(watch)
                    async with trio.open_nursery() as n2:
                        # One stops right after the attach reply, one after reading a while.
                        n2.start_soon(stick, stuck[0], 8192, 0)
                        n2.start_soon(stick, stuck[1], 65536, 700)
                    t_first_stop, t_attach = min(stops), max(stops)
                    with trio.move_on_after(20):
                        await both_dropped.wait()
                    await trio.sleep(0.5)
                    stop.set()
                    watcher.cancel()
                    release.set()
                # Counted from the first poll that saw all three attached: on a loaded
                # machine the second stuck client may attach after the first stopped
                # reading, and the count is 2 until it has.
                after = [(t, a) for t, a, _ in polls if t >= t_first_stop]
                all_in = next((i for i, (_, a) in enumerate(after) if a >= 3), None)
                assert all_in is not None, f"the three attachments were never seen together: {polls[:10]}"
                after = after[all_in:]
                t_first_drop = next((t for t, a in after if a <= 2), None)
                t_drop = next((t for t, a in after if a <= 1), None)
                assert t_drop is not None and t_first_drop is not None, (
                    f"the stuck clients were not dropped: {polls[-5:]}")

                # The flood is over; the fast reader has it all.
                assert_contiguous(fast_frames)
                ex = fast_frames[-1][2]
                assert ex["state"] == "exited" and ex["code"] == 0, ex
                n_lines = ex["result"]
                assert data_of(fast_frames) == flood_text(n_lines)

                # The stuck clients wake up, read what they still had, and reattach from there.
                starts = []
                for s in stuck:
                    await s.wake_up()
                    starts.append(await s.reattach(srv.url))
                    assert s.frames == fast_frames, "a stuck client did not get exactly the log"
                # The server is fine and serves new work.
                await e.send({"op": "input", "session": esid, "seq": 10**6, "eof": True})
                r2 = await ctl.ok("execute", code="def main():\n    return 7\n")
                assert (await ctl.frames(r2["session"]))[-1][2]["result"] == 7
        finally:
            for s in stuck:  # sockets of a failed run
                s.close()

    # -- the figures -------------------------------------------------------------
    lost_after = t_drop - t_attach
    first_lost_after = t_first_drop - t_first_stop
    total = sum(b for _, b in fast)
    window = [(t, b) for t, b in fast if t_attach <= t <= t_drop]
    in_window = sum(b for _, b in window)
    times = [t_attach] + [t for t, _ in window] + [t_drop]
    max_gap = max(b - a for a, b in zip(times, times[1:], strict=False))
    produced = [(t, nseq) for t, _, nseq in polls if t_attach <= t <= t_drop]
    during = [rt for t, rt in echoes if t_attach <= t <= t_drop + 0.2]
    base_med = statistics.median(baseline)
    print(f"\nslow clients: stuck clients dropped {first_lost_after:.2f} s and {lost_after:.2f} s "
          f"after they stopped reading (send timeout "
          f"{SEND_TIMEOUT} s; close {[s.dropped_code for s in stuck]}, reattached from {starts}); "
          f"fast reader: {total / 1e6:.1f} MB in all, {in_window / 1e6:.2f} MB while they were "
          f"stuck, longest pause {max_gap * 1000:.0f} ms; echo median {base_med * 1000:.1f} ms "
          f"before, {statistics.median(during) * 1000:.1f} ms during (max "
          f"{max(during) * 1000:.0f} ms, {len(during)} echoes); {n_lines} lines")
    assert first_lost_after >= SEND_TIMEOUT, "dropped before the send timeout"
    assert lost_after >= SEND_TIMEOUT, "dropped before the send timeout"
    assert lost_after < SEND_TIMEOUT + 8, "dropped far too late"
    # The session kept producing, and the other attachment kept receiving, while they were stuck.
    assert produced[-1][1] > produced[0][1], produced
    assert in_window >= 0.5 * FLOOD_RATE * min(lost_after, FLOOD_SECONDS - 1), (in_window, lost_after)
    assert max_gap < 0.6 * SEND_TIMEOUT + 0.3, max_gap
    # The other session's echo stayed fast.
    assert during and statistics.median(during) <= max(4 * base_med, 0.03), (base_med, during)
    assert max(during) < 0.8, during


# A backlog: n numbered ~1 KB lines and, after every third of them, one big
# api.send (a single frame larger than an out event); then wait for input.
BACKLOG = """
def main(n, big):
    pad = "x" * 1000
    for i in range(n):
        print(f"{i:08d} {pad}")
        if i % (n // 3) == 0:
            api.send(bytes([i % 256]) * big)
    api.recv()
    return n
"""
MIN_SEND_RATE = 64 * 1024  # docs/protocol.md: a client reading this fast is never dropped


async def test_slow_reader_is_not_dropped(make_server):
    """docs/protocol.md: "A client that reads at 64 KiB/s or more is never
    dropped" - out events are sized to the send timeout at that rate, and one
    larger frame gets the time it needs. A client reading steadily at 2.5 x that
    rate takes a ~0.8 MB backlog (with 200 KB frames in it) over one connection,
    every frame exactly once."""
    srv = make_server("--send-timeout", str(SEND_TIMEOUT))
    n_lines, big = 500, 200_000
    rate = 2.5 * MIN_SEND_RATE
    frames: list[list] = []
    backlog: list[list] = []
    attaches: list[tuple] = []  # (from, frames got, bytes/s achieved) per connection
    where = {"phase": "execute", "got": 0}  # said if it does not end in time
    ws: RawWS | None = None
    try:
        with trio.fail_after(60):
            async with connect(srv.url) as c:
                r = await c.ok("execute", code=BACKLOG, args=[n_lines, big])
                sid, token = r["session"], r["token"]
                where["phase"] = "reading the backlog as the owner"
                # It is all there: every line and every big message. (The last
                # big message may land after the last line: a print() that
                # follows an api.send() is not ordered after it.)
                n_big = len(range(0, n_lines, n_lines // 3))
                while (len(data_of(backlog)) < len(flood_text(n_lines))
                       or sum(f[1] == "msg" for f in backlog) < n_big):
                    backlog += await c.frames(sid, until_exit=False, count=1)
                while len(frames) < len(backlog) and len(attaches) < 5:
                    where.update(phase=f"slow attach #{len(attaches) + 1}", got=0)
                    ws = await RawWS.open(srv.port, rcvbuf=16384)
                    try:
                        await ws.request("hello", 0, proto=1, client="slow/1")
                        start = frames[-1][0] + 1 if frames else 1
                        await ws.request("attach", 1, token=token, **{"from": start})
                        ws.rate = rate
                        got = nbytes = 0
                        t0 = time.monotonic()
                        while len(frames) < len(backlog) and (raw := await ws.recv()) is not None:
                            msg = protocol.decode(raw, max_items=10_000_000)
                            assert msg.get("ev") == "out" and msg["session"] == sid, msg
                            frames += msg["frames"]
                            got += len(msg["frames"])
                            nbytes += len(raw)
                            where["got"] = got
                    finally:
                        await ws.aclose()
                    attaches.append((start, got, nbytes / (time.monotonic() - t0)))
                where["phase"] = "ending the function"
                await c.send({"op": "input", "session": sid, "seq": 1, "data": None})
    except trio.TooSlowError:
        raise AssertionError(
            f"slow reader: not done in 60 s, at {where}; backlog {len(backlog)} frames, read "
            f"{len(frames)}; attaches (from, frames, B/s) {attaches}; "
            f"closed {ws.closed if ws is not None else None}") from None
    print(f"\nslow reader: {len(attaches)} attach(es) (from, frames, bytes/s): "
          f"{[(a, b, round(x)) for a, b, x in attaches]}; {sum(len(f[2]) for f in backlog)} "
          f"bytes of frame data")
    assert frames == backlog
    assert len(attaches) == 1, f"dropped although it read at {rate:.0f} B/s: {attaches}"
