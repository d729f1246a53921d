"""Client chaos: many raw-protocol clients (owners and viewers of several
sessions) are cut abruptly again and again - the TCP socket closed under the
WebSocket, an RST, or the connection task cancelled, never a close frame; in
the WebSocket handshake, with hello or attach in flight, or while frames
stream - and reattach from where they were or from a random earlier seq,
while the functions print and echo input and the owners keep sending it.

DESIGN.md 1 and 2, checked at the end against the session's whole log (one
clean read from 1 when nothing was acked; the owner's own frames when the
owner acked what it had seen, and then the viewers get ``gap`` frames for
exactly what was trimmed):
- every attachment (every life of every client) saw exactly the log's frames,
  byte for byte, contiguous from the seq it asked for; frames received again
  after a rewind are byte-identical to the first copy;
- every input reached the function exactly once, in order, although each
  owner re-sends everything not yet ``in_ack``'ed after every reconnect.

Also: re-attach and detach on one connection while its worker streams, and
connection resets in the middle of the handshake (the server stays up).
"""

from __future__ import annotations

import random
import socket
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import cbor2
import pytest
import trio
from trio_websocket import HandshakeError, open_websocket_url

from bento import protocol

MAX_MESSAGE = 64 * 1024 * 1024
SESSIONS = 10
VIEWERS = 3  # per session, besides its owner
TARGET_DISCONNECTS = 1100
MAX_INPUTS = 400  # per session
MIN_INPUTS = 300  # in all, before the chaos phase ends
MAX_LINES = 20_000  # per session, a bound; the chaos ends long before
CUT_MODES = ("socket_close", "rst", "cancel")
# Where a connection is cut: during the WebSocket handshake, with hello in
# flight, with attach in flight, or while frames stream (weights below).
STAGES = (("connect", 0.1), ("hello", 0.1), ("attach", 0.15), ("stream", 0.65))

# Prints "line i" at random intervals (0-20 ms) and echoes every input with
# api.send; at input EOF it returns what it received and how many lines.
CHAOS_FN = """
import random, time
def main(seed, max_lines):
    rnd = random.Random(seed)
    got = []
    i = 0
    due = time.monotonic()
    while True:
        now = time.monotonic()
        if i < max_lines and now >= due:
            print(f"line {i}")
            i += 1
            due = now + rnd.uniform(0.0, 0.02)
        try:
            v = api.recv(timeout=max(0.0, min(0.02, due - time.monotonic())))
        except TimeoutError:
            continue
        except EOFError:
            return {"lines": i, "got": got}
        got.append(v)
        api.send(v)
"""


# --------------------------------------------------------------------------
# Where each frame's bytes sit in an ``out`` event (to compare frames byte for byte).


def _head(data: bytes, i: int) -> tuple[int, int, int]:
    ib = data[i]
    major, ai = ib >> 5, ib & 31
    i += 1
    if ai < 24:
        return major, ai, i
    width = {24: 1, 25: 2, 26: 4, 27: 8}[ai]
    return major, int.from_bytes(data[i : i + width], "big"), i + width


def _skip(data: bytes, i: int) -> int:
    """The end of the (definite-length) CBOR item that starts at ``i``."""
    ib = data[i]
    major, n, j = _head(data, i)
    if major in (2, 3):
        return j + n
    if major == 4:
        for _ in range(n):
            j = _skip(data, j)
    elif major == 5:
        for _ in range(2 * n):
            j = _skip(data, j)
    elif major == 7 and (ib & 31) >= 24:
        return j  # a float: _head already stepped over its bytes
    return j


def frame_bytes(raw: bytes) -> list[bytes]:
    """The encoded frames of an ``out`` event, each exactly as the server sent it."""
    major, n, i = _head(raw, 0)
    assert major == 5
    for _ in range(n):
        k_end = _skip(raw, i)
        key = protocol.decode(raw[i:k_end], require_map=False)
        if key == "frames":
            major, count, j = _head(raw, k_end)
            assert major == 4
            out = []
            for _ in range(count):
                end = _skip(raw, j)
                out.append(raw[j:end])
                j = end
            return out
        i = _skip(raw, k_end)
    raise AssertionError("an out event without frames")


# --------------------------------------------------------------------------
# The clients.


class Conn:
    """Raw protocol over one trio-websocket connection, keeping the raw bytes."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.next_id = 1

    async def send(self, msg: dict) -> None:
        await self.ws.send_message(cbor2.dumps(msg))

    async def recv(self) -> tuple[dict, bytes]:
        raw = await self.ws.get_message()
        assert isinstance(raw, bytes), raw
        return protocol.decode(raw, max_items=10_000_000), raw


@dataclass
class View:
    """What one attachment (one life of a client) received: (seq, frame bytes),
    gap frames included."""

    start: int
    frames: list[tuple[int, bytes]] = field(default_factory=list)
    next: int = 0  # the seq the next frame must have

    def __post_init__(self) -> None:
        self.next = self.start


@dataclass
class Actor:
    """An owner or a viewer of one session, across all its connections."""

    name: str
    token: str
    owner: bool
    seen: dict[int, bytes] = field(default_factory=dict)
    last: int = 0  # highest seq seen
    views: list[View] = field(default_factory=list)
    exit_seen: bool = False


@dataclass
class Sess:
    sid: str
    token: str
    viewer_token: str
    inputs: list[str] = field(default_factory=list)  # input seq k carries inputs[k - 1]
    acked: int = 0  # highest in_ack the owner saw
    eof_sent: bool = False
    ack_sent: int = 0  # highest output ack the owner sent
    actors: list[Actor] = field(default_factory=list)


class Life:
    """One connection's cut: ``delay`` seconds after it reaches ``stage``."""

    def __init__(self, stage: str | None, delay: float) -> None:
        self.stage, self.delay = stage, delay
        self.scope = trio.CancelScope()

    def arm(self, stage: str) -> None:
        if stage == self.stage:
            self.scope.deadline = trio.current_time() + self.delay


@dataclass
class Stats:
    disconnects: int = 0
    modes: Counter = field(default_factory=Counter)
    stages: Counter = field(default_factory=Counter)
    lives: int = 0
    attached_lives: int = 0
    rewinds: int = 0
    rereceived: int = 0
    resent_inputs: int = 0
    inputs: int = 0
    frames_received: int = 0


class Chaos:
    def __init__(self, url: str, port: int, rng: random.Random, target: int,
                 acks: bool) -> None:
        self.url = url
        self.port = port
        self.target = target
        self.acks = acks  # the owner acks what it has seen (never the exit frame)
        self.rng = rng
        self.stats = Stats()
        self.stop = trio.Event()

    # -- one client, life after life ---------------------------------------------

    async def run_actor(self, s: Sess, a: Actor) -> None:
        while not self.stop.is_set():
            await self.life(s, a, final=False)
        await self.life(s, a, final=True)

    def choose_from(self, a: Actor) -> int:
        if not a.seen:
            return 1
        r = self.rng.random()
        if r < 0.65:
            return a.last + 1
        self.stats.rewinds += 1
        if r < 0.7:
            return 1
        return self.rng.randint(max(1, a.last + 1 - 300), a.last + 1)

    async def life(self, s: Sess, a: Actor, final: bool) -> None:
        """One connection. Unless ``final``, it is cut at a random point: in the
        WebSocket handshake, with hello or attach in flight, or a random time
        into the stream."""
        rng = self.rng
        self.stats.lives += 1
        mode = rng.choice(CUT_MODES)
        stage = rng.choices([st for st, _ in STAGES], [w for _, w in STAGES])[0]
        if final:
            await self.connection(s, a, Life(None, 0.0), mode)
            return
        if stage == "connect":
            # On a bare socket: trio-websocket leaves its socket open when it is
            # cancelled in the middle of its own handshake.
            await reset_during_handshake(self.port, rng.random() < 0.5, rst=mode == "rst")
        else:
            delay = rng.uniform(0.0, 0.004) if stage != "stream" else rng.uniform(0.0, 0.08)
            life = Life(stage, delay)
            await self.connection(s, a, life, mode)
            assert life.scope.cancel_called, f"{a.name}: a chaos life ended without being cut"
        self.stats.disconnects += 1
        self.stats.modes[mode] += 1
        self.stats.stages[stage] += 1
        # Enough cuts, and enough inputs in flight across them (how many go out
        # per connection depends on the machine's speed: keep cutting until both).
        if self.stats.disconnects >= self.target and self.stats.inputs >= MIN_INPUTS:
            self.stop.set()

    async def connection(self, s: Sess, a: Actor, life: Life, mode: str) -> None:
        with trio.fail_after(10 if life.stage else 30), life.scope:
            async with open_websocket_url(self.url, max_message_size=MAX_MESSAGE) as ws:
                try:
                    await self.attached(Conn(ws), s, a, life)
                finally:
                    if life.scope.cancel_called:
                        cut(ws, mode)
        assert not (life.stage is None and life.scope.cancelled_caught)

    async def request(self, c: Conn, s: Sess, a: Actor, view: View | None, op: str,
                      **fields: Any) -> dict:
        rid = c.next_id
        c.next_id += 1
        await c.send({"op": op, "id": rid, **fields})
        while True:
            msg, raw = await c.recv()
            if msg.get("id") == rid and "ev" not in msg:
                assert msg["ok"] is True, (a.name, op, msg)
                return msg
            self.on_message(s, a, view, msg, raw)

    async def attached(self, c: Conn, s: Sess, a: Actor, life: Life) -> None:
        final = life.stage is None
        life.arm("hello")
        await self.request(c, s, a, None, "hello", proto=1, client="chaos/1")
        if not a.seen and not a.owner:
            # A viewer's first attach: from a random seq up to the live end.
            st = await self.request(c, s, a, None, "status", token=a.token)
            start = self.rng.randint(1, st["next_seq"])
        elif final:
            # A viewer may have read the exit frame in a life cut after the
            # owner's final EOF: its final life reads that frame again.
            start = a.last if a.exit_seen else a.last + 1
            a.exit_seen = False
        else:
            start = self.choose_from(a)
        view = View(start)
        life.arm("attach")
        r = await self.request(c, s, a, view, "attach", token=a.token, **{"from": start})
        assert r["session"] == s.sid and r["mode"] == ("rw" if a.owner else "ro"), r
        # The owner's acks free the buffer; the frames stay readable as history.
        assert r["first_seq"] == 1 and r["next_seq"] >= start, (start, r, s.ack_sent)
        assert r["input_seq"] <= len(s.inputs) + s.eof_sent, (r, len(s.inputs))
        a.views.append(view)
        self.stats.attached_lives += 1
        life.arm("stream")
        async with trio.open_nursery() as n:
            if a.owner:
                n.start_soon(self.send_inputs, c, s, final)
            await self.read(c, s, a, view, final)
            n.cancel_scope.cancel()

    async def send_inputs(self, c: Conn, s: Sess, final: bool) -> None:
        # After each reconnect: every input not yet acknowledged, with its seq.
        for seq in range(s.acked + 1, len(s.inputs) + 1):
            await c.send({"op": "input", "session": s.sid, "seq": seq, "data": s.inputs[seq - 1]})
            self.stats.resent_inputs += 1
        if final:
            await c.send({"op": "input", "session": s.sid, "seq": len(s.inputs) + 1, "eof": True})
            s.eof_sent = True
            return
        while len(s.inputs) < MAX_INPUTS:
            for _ in range(self.rng.randint(1, 6)):
                s.inputs.append(f"{s.sid[:6]}-{len(s.inputs) + 1}")
                self.stats.inputs += 1
                await c.send({"op": "input", "session": s.sid, "seq": len(s.inputs),
                              "data": s.inputs[-1]})
            await trio.sleep(self.rng.uniform(0.0, 0.01))

    async def read(self, c: Conn, s: Sess, a: Actor, view: View, final: bool) -> None:
        while True:
            if final and a.exit_seen and (not a.owner or s.acked == len(s.inputs) + 1):
                return
            msg, raw = await c.recv()
            self.on_message(s, a, view, msg, raw)
            if a.owner and self.acks and msg.get("ev") == "out" and self.rng.random() < 0.5:
                # Only what it has seen, and never the exit frame (the audit reads it).
                seq = a.last - 1 if a.exit_seen else a.last
                if seq > s.ack_sent:
                    s.ack_sent = seq
                    await c.send({"op": "ack", "session": s.sid, "seq": seq})

    def on_message(self, s: Sess, a: Actor, view: View | None, msg: dict, raw: bytes) -> None:
        ev = msg.get("ev")
        assert ev in ("out", "in_ack"), (a.name, msg)  # no error, no stray reply
        assert view is not None and msg["session"] == s.sid, (a.name, msg)
        if ev == "in_ack":
            assert a.owner, msg
            assert msg["seq"] <= len(s.inputs) + s.eof_sent, (msg, len(s.inputs))
            s.acked = max(s.acked, msg["seq"])
            return
        for (seq, ch, data), b in zip(msg["frames"], frame_bytes(raw), strict=True):
            view.frames.append((seq, b))
            # Nothing is trimmed here (the history limit is far above the output): no gap.
            assert ch != "gap", (a.name, seq, data, s.ack_sent)
            assert seq == view.next, (a.name, view.start, seq, view.next, ch)
            view.next = seq + 1
            old = a.seen.get(seq)
            if old is None:
                a.seen[seq] = b
            else:
                assert old == b, (a.name, seq, old, b)
                self.stats.rereceived += 1
            a.last = max(a.last, seq)
            self.stats.frames_received += 1
            if ch == "exit":
                a.exit_seen = True


def cut(ws: Any, mode: str) -> None:
    """End a connection whose task was cancelled the way ``mode`` says."""
    if mode == "socket_close":
        ws._stream.socket.close()
    elif mode == "rst":
        ws._stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        ws._stream.socket.close()
    # "cancel": trio-websocket's close is cancelled before it sends a close
    # frame; it only closes the TCP stream.


async def read_whole_log(url: str, token: str, sid: str) -> list[bytes]:
    """One clean attach from 1 to the exit frame: the session's log, frame by frame."""
    log: list[bytes] = []
    async with open_websocket_url(url, max_message_size=MAX_MESSAGE) as ws:
        c = Conn(ws)
        await c.send({"op": "hello", "id": 0, "proto": 1, "client": "chaos-audit/1"})
        assert (await c.recv())[0]["ok"]
        await c.send({"op": "attach", "id": 1, "token": token, "from": 1})
        r = (await c.recv())[0]
        assert r["ok"] and r["state"] == "exited", r
        while not log or protocol.decode(log[-1], require_map=False)[1] != "exit":
            msg, raw = await c.recv()
            assert msg.get("ev") == "out" and msg["session"] == sid, msg
            log += frame_bytes(raw)
        # The owner acknowledges the exit and leaves.
        seq = len(log)
        await c.send({"op": "ack", "session": sid, "seq": seq})
        await c.send({"op": "detach", "id": 2, "session": sid})
        assert (await c.recv())[0] == {"id": 2, "ok": True}
    return log


def audit(s: Sess, log: list[bytes]) -> int:
    """Check one session's clients against its whole log; its number of inputs."""
    frames = [protocol.decode(b, require_map=False) for b in log]
    # The log itself: seqs 1..n, no gap, one exit frame, last.
    assert [f[0] for f in frames] == list(range(1, len(frames) + 1))
    assert all(f[1] in ("stdout", "msg") for f in frames[:-1])
    ex = frames[-1][2]
    assert frames[-1][1] == "exit" and ex["state"] == "exited" and ex["code"] == 0, ex
    res = ex["result"]
    # Output: every line once, in order.
    text = b"".join(f[2] for f in frames if f[1] == "stdout").decode()
    assert text == "".join(f"line {i}\n" for i in range(res["lines"]))
    # Input: every input reached the function exactly once, in order.
    assert res["got"] == s.inputs, (s.sid, len(res["got"]), len(s.inputs))
    assert [f[2] for f in frames if f[1] == "msg"] == s.inputs
    assert s.acked == len(s.inputs) + 1
    # Every attachment saw exactly the log, byte for byte, from its start,
    # and each client has all of it from where it began.
    for a in s.actors:
        assert a.exit_seen, a.name
        for v in a.views:
            assert all(log[q - 1] == b for q, b in v.frames), (a.name, v.start)
        lo = min(a.seen)
        assert set(a.seen) >= set(range(lo, len(log) + 1)), a.name
        assert a.owner is False or lo == 1
        assert a.views[-1].frames[-1][1] == log[-1]
    return len(s.inputs)


@pytest.mark.parametrize(("acks", "target"), [(False, TARGET_DISCONNECTS), (True, 600)],
                         ids=["no-acks", "owner-acks"])
async def test_chaos_many_clients_thousand_disconnects(server, acks, target):
    """Without acks every frame stays, and one clean read from 1 at the end is
    the reference log. With owner acks (of what the owner has seen), the acked
    frames leave the buffer but stay readable as history: the viewers never get
    a ``gap``, and the owner's own frames are the reference log."""
    rng = random.Random(6_2026 + acks)
    chaos = Chaos(server.url, server.port, rng, target, acks)
    t0 = time.monotonic()
    sessions: list[Sess] = []
    async with open_websocket_url(server.url, max_message_size=MAX_MESSAGE) as ws:
        c = Conn(ws)
        await c.send({"op": "hello", "id": 0, "proto": 1, "client": "chaos/1"})
        assert (await c.recv())[0]["ok"]
        for k in range(SESSIONS):
            await c.send({"op": "execute", "id": k + 1, "code": CHAOS_FN,
                          "args": [k, MAX_LINES], "attach": False})
            r = (await c.recv())[0]
            assert r["ok"], r
            s = Sess(r["session"], r["token"], r["viewer_token"])
            s.actors = [Actor(f"s{k}-owner", s.token, True)] + [
                Actor(f"s{k}-viewer{v}", s.viewer_token, False) for v in range(VIEWERS)]
            sessions.append(s)

    with trio.fail_after(120):
        async with trio.open_nursery() as n:
            for s in sessions:
                for a in s.actors:
                    n.start_soon(chaos.run_actor, s, a)
    t_chaos = time.monotonic() - t0

    st = chaos.stats
    total_inputs = total_frames = 0
    for s in sessions:
        owner = s.actors[0]
        if acks:
            # The owner acked only what it had seen, so it has every frame: the reference.
            log = [owner.seen[q] for q in range(1, owner.last + 1)]
        with trio.fail_after(20):
            full = await read_whole_log(server.url, s.token, s.sid)
        if not acks:
            log = full
        else:  # acked frames stay readable as history: the log reads the same, whole
            assert full == log
        total_frames += len(log)
        total_inputs += audit(s, log)

    print(f"\nchaos ({'owner acks' if acks else 'no acks'}): {SESSIONS} sessions x "
          f"{1 + VIEWERS} clients, {st.disconnects} abrupt disconnects {dict(st.modes)} "
          f"{dict(st.stages)}, {st.lives} connections, {st.attached_lives} attachments, "
          f"{st.rewinds} rewinds, {st.frames_received} frames received ({st.rereceived} again "
          f"after a rewind), log {total_frames} frames, {total_inputs} "
          f"inputs, {st.resent_inputs} re-sent; chaos phase {t_chaos:.1f} s")
    assert st.disconnects >= target
    assert st.rewinds >= 100 and st.rereceived > 0 and st.resent_inputs > 0
    assert total_inputs >= MIN_INPUTS


# --------------------------------------------------------------------------
# Re-attaching on the same connection, and resets during the handshake.

FAST_PRINTER = """
import time
def main(n):
    for i in range(n):
        print(f"line {i}")
        time.sleep(0.0005)
    api.recv()
"""


async def test_reattach_and_detach_on_the_same_connection(server):
    """PROTOCOL.md attach: "Re-attaching an already attached session on the same
    connection moves its position", and after the reply the server pushes every
    frame from ``from``; docs/protocol.md: after a ``detach`` reply no frame of
    that session arrives. Checked 150 times while the previous position's worker
    is busy streaming (a fast printer, rewinds of up to 200 frames)."""
    rng = random.Random(7)
    seen: dict[int, bytes] = {}
    moves = detaches = 0
    with trio.fail_after(40):
        async with open_websocket_url(server.url, max_message_size=MAX_MESSAGE) as ws:
            c = Conn(ws)
            expect = 1

            def take(msg: dict, raw: bytes) -> None:
                nonlocal expect
                assert msg.get("ev") == "out" and msg["session"] == sid, msg
                for (seq, _ch, _d), b in zip(msg["frames"], frame_bytes(raw), strict=True):
                    assert seq == expect, (seq, expect)
                    assert seen.setdefault(seq, b) == b
                    expect += 1

            async def request(rid: int, **fields: Any) -> dict:
                # Frames that come before the reply belong to the old position: in order.
                await c.send({"id": rid, **fields})
                while True:
                    msg, raw = await c.recv()
                    if msg.get("id") == rid:
                        assert msg["ok"], msg
                        return msg
                    take(msg, raw)

            await c.send({"op": "hello", "id": 0, "proto": 1, "client": "chaos/1"})
            assert (await c.recv())[0]["ok"]
            await c.send({"op": "execute", "id": 1, "code": FAST_PRINTER, "args": [4000]})
            r = (await c.recv())[0]
            sid, token = r["session"], r["token"]
            rid = 1
            for _ in range(150):
                for _ in range(rng.randint(0, 3)):  # a few events at the current position
                    take(*await c.recv())
                if rng.random() < 0.3:
                    rid += 1
                    await request(rid, op="detach", session=sid)
                    for _ in range(2):  # nothing of the session after the detach reply
                        await trio.sleep(0.01)
                        rid += 1
                        await c.send({"op": "ping", "id": rid})
                        msg, _ = await c.recv()
                        assert msg == {"id": rid, "ok": True}, ("after detach", msg)
                    detaches += 1
                # Move, backwards or forwards (never beyond what exists).
                start = rng.randint(max(1, expect - 200), expect)
                rid += 1
                await request(rid, op="attach", token=token, **{"from": start})
                expect = start
                moves += 1
            await c.send({"op": "input", "session": sid, "seq": 1, "data": None})
            while not (seen and expect - 1 in seen
                       and protocol.decode(seen[expect - 1], require_map=False)[1] == "exit"):
                msg, raw = await c.recv()
                if msg.get("ev") != "in_ack":
                    take(msg, raw)
    assert moves == 150 and detaches > 20


UPGRADE = (b"GET /v1 HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
           b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
           b"Sec-WebSocket-Version: 13\r\n\r\n")


async def reset_during_handshake(port: int, wait_for_response: bool, rst: bool = True) -> None:
    """Send the WebSocket upgrade request, then reset the TCP connection (RST, or
    a plain close): at once, or as soon as the server's 101 response starts to arrive."""
    sock = trio.socket.socket()
    try:
        await sock.connect(("127.0.0.1", port))
        await sock.send(UPGRADE)
        if wait_for_response:
            await sock.recv(1)
    except OSError:
        pass  # the server already went away: what the test checks next
    finally:
        if rst:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()


async def test_reset_during_handshake_keeps_the_listener(make_server):
    """DESIGN.md 5: the server survives anything a client sends; a connection
    reset in the middle of the WebSocket handshake costs only that connection."""
    srv = make_server()
    with trio.fail_after(30):
        for _ in range(20):
            async with trio.open_nursery() as n:
                for k in range(20):
                    n.start_soon(reset_during_handshake, srv.port, k % 2 == 0)
            try:
                async with open_websocket_url(srv.url, connect_timeout=5) as ws:
                    c = Conn(ws)
                    await c.send({"op": "hello", "id": 0, "proto": 1, "client": "chaos/1"})
                    assert (await c.recv())[0]["ok"]
            except HandshakeError as exc:
                await trio.sleep(1)
                pytest.fail(f"the server stopped accepting connections ({exc.__cause__!r}); "
                            f"exit status {srv.proc.poll()}; its log ends:\n{srv.read_log()[-1500:]}")
