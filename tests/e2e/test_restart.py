"""End-to-end: server crashes (kill -9) and restarts on the same data dir,
exchange crashes, and a torn output log.

DESIGN.md 7: a restart keeps running functions and buffered output; a session
whose exchange died is ``lost``, never silently gone. Output (1) and input (2)
stay exactly-once across all of it.
"""

from __future__ import annotations

import os
import signal
import struct
from dataclasses import dataclass, field

import psutil
import pytest
import trio
from helpers import assert_contiguous, connect, data_of, wait_exit, wait_status
from trio_websocket import ConnectionClosed

from bento import sessionlog

# Prints 0..n-1, one line every ``step`` s, and echoes every input with
# api.send until its input is closed (so it outlives the printing when needed).
STREAMER = """
import time
def main(n, step):
    i = 0
    eof = False
    while i < n or not eof:
        if i < n:
            print(i)
            i += 1
        while not eof and api.poll():
            try:
                api.send(api.recv())
            except EOFError:
                eof = True
        time.sleep(step)
    return i
"""

# Prints 0, 1, 2, ... one line every ``step`` s and echoes every input with
# api.send, until its input is closed; returns how many lines it printed.
UNTIL_EOF = """
import time
def main(step):
    i = 0
    while True:
        print(i)
        i += 1
        try:
            while api.poll():
                api.send(api.recv())
        except EOFError:
            return i
        time.sleep(step)
"""

ECHO = """
def main():
    got = []
    while True:
        try:
            v = api.recv()
        except EOFError:
            return got
        got.append(v)
        api.send(v)
"""


async def read_until_closed(c, timeout: float = 10) -> None:
    """Take in every message the (killed) server sent before it died, until the
    connection reports closed. Those are kept in ``c.events``."""
    with trio.fail_after(timeout):
        try:
            while True:
                await c._read_one()
        except ConnectionClosed:
            pass


class connect_crashy(connect):
    """``connect`` for a server that gets killed under the connection.

    On the way out it first reads what is left (trio-websocket's reader sits on
    a full one-message queue otherwise, never sees the EOF, and the close waits
    60 s), and afterwards closes the TCP stream itself (when the server vanishes
    first, trio-websocket leaves the client socket open, STACK.md)."""

    async def __aexit__(self, *exc) -> None:
        try:
            await read_until_closed(self.client)
            await super().__aexit__(*exc)
        finally:
            await self.client.ws._stream.aclose()


def lines(n: int) -> bytes:
    return b"".join(b"%d\n" % i for i in range(n))


def session_dir(data_dir: str, sid: str) -> str:
    return os.path.join(data_dir, "sessions", sid)


def read_pid(data_dir: str, sid: str, name: str) -> int:
    with open(os.path.join(session_dir(data_dir, sid), name)) as f:
        return int(f.read().strip())


def dead(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def kill9_and_wait(pid: int, group: bool = False, timeout: float = 10) -> None:
    try:
        (os.killpg if group else os.kill)(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    with trio.fail_after(timeout):
        while not dead(pid):
            await trio.sleep(0.02)


async def kill9_exchange(data_dir: str, sid: str) -> None:
    """Kill the session's exchange if it still runs (one whose session has ended
    exits by itself, and removes its pid file as it goes)."""
    try:
        pid = read_pid(data_dir, sid, "exchange.pid")
    except FileNotFoundError:
        return
    await kill9_and_wait(pid)


def absorb(c, sid: str, frames: list[list]) -> int:
    """Take the out frames and in_acks this client already received (no more reads);
    returns the highest in_ack seen."""
    acked = 0
    for ev in c.events:
        if ev.get("session") != sid:
            continue
        if ev.get("ev") == "out":
            frames.extend(ev["frames"])
        elif ev.get("ev") == "in_ack":
            acked = max(acked, ev["seq"])
    c.events.clear()
    return acked


# -- kill -9 the server while 100 sessions stream -------------------------------------


@dataclass
class Track:
    n: int
    sid: str = ""
    token: str = ""
    frames: list[list] = field(default_factory=list)
    sent: int = 0  # highest input seq sent
    in_acked: int = 0  # highest in_ack received

    def data(self, seq: int) -> str:
        return f"s{self.n}-in{seq}"


@pytest.mark.alone  # 100 sessions started at once: each execute has 15 s, not shared with another test
async def test_server_kill9_while_streaming_loses_and_repeats_nothing(make_server):
    # 100 sessions (the figure), each streaming until the new server
    # has delivered lines of it again and its input is closed.
    n_sessions, step, lines_after = 100, 0.05, 5
    first_inputs, total_inputs = 6, 10
    # 100 default memory limits (1 GiB each with bwrap) are more than the
    # default memory budget; these functions use a few MiB each.
    budget = ("--memory-budget", "200G")
    old = make_server(*budget)
    tracks = [Track(i) for i in range(n_sessions)]
    ready = []
    all_ready, killed = trio.Event(), trio.Event()

    async def before(t: Track) -> None:
        async with connect_crashy(old.url) as c:
            r = await c.ok("execute", code=UNTIL_EOF, args=[step])
            t.sid, t.token = r["session"], r["token"]
            t.frames += await c.frames(t.sid, until_exit=False, count=10)
            for seq in range(1, 4):
                await c.send({"op": "input", "session": t.sid, "seq": seq, "data": t.data(seq)})
            t.sent = 3
            await c.event(ev="in_ack", session=t.sid, seq=3)
            t.in_acked = 3
            # More input that may or may not be accepted before the crash.
            for seq in range(4, first_inputs + 1):
                await c.send({"op": "input", "session": t.sid, "seq": seq, "data": t.data(seq)})
            t.sent = first_inputs
            ready.append(t)
            if len(ready) == n_sessions:
                all_ready.set()
            await killed.wait()
            await read_until_closed(c)
            frames: list[list] = []
            t.in_acked = max(t.in_acked, absorb(c, t.sid, frames))
            t.frames += [f for f in frames if f[0] > t.frames[-1][0]]

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            for t in tracks:
                nursery.start_soon(before, t)
            await all_ready.wait()
            old.kill()  # SIGKILL, the server only
            killed.set()

    for t in tracks:
        assert_contiguous(t.frames)
        assert t.frames[-1][1] != "exit"
    new = make_server(*budget, data_dir=old.data_dir)

    async def after(t: Track) -> None:
        async with connect(new.url) as c:
            last = t.frames[-1][0]
            a = await c.ok("attach", token=t.token, **{"from": last + 1})
            assert a["session"] == t.sid and a["mode"] == "rw"
            assert a["state"] == "running", a
            assert t.in_acked <= a["input_seq"] <= t.sent, (a, t)
            # Re-send what was not acknowledged (same seqs, same data), then new input.
            for seq in range(t.in_acked + 1, total_inputs + 1):
                await c.send({"op": "input", "session": t.sid, "seq": seq, "data": t.data(seq)})
            seen = len(t.frames)
            while sum(f[1] == "stdout" for f in t.frames[seen:]) < lines_after:
                t.frames += (await c.event(ev="out", session=t.sid, timeout=30))["frames"]
            await c.send({"op": "input", "session": t.sid, "seq": total_inputs + 1, "eof": True})
            t.frames += await c.frames(t.sid, timeout=100)
            await c.event(ev="in_ack", session=t.sid, seq=total_inputs + 1)

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            for t in tracks:
                nursery.start_soon(after, t)

    for t in tracks:
        assert_contiguous(t.frames)
        assert not [f for f in t.frames if f[1] == "gap"], t.sid
        ex = t.frames[-1][2]
        assert ex["state"] == "exited" and ex["result"] >= lines_after, ex
        assert data_of(t.frames) == lines(ex["result"]), t.sid
        echoed = [f[2] for f in t.frames if f[1] == "msg"]
        assert echoed == [t.data(s) for s in range(1, total_inputs + 1)], (t.sid, echoed)


# -- a torn record at the end of the output log ---------------------------------------


def newest_segment(data_dir: str, sid: str) -> str:
    segs = sessionlog.list_segments(session_dir(data_dir, sid), "out")
    assert segs, os.listdir(session_dir(data_dir, sid))
    return segs[-1][1]


async def test_torn_tail_after_crash_is_never_served(make_server):
    srv = make_server()
    async with connect_crashy(srv.url) as c:
        fin = await c.ok("execute", code=STREAMER, args=[50, 0])
        await c.send({"op": "input", "session": fin["session"], "seq": 1, "eof": True})
        fin_frames = await c.frames(fin["session"])
        run = await c.ok("execute", code=STREAMER, args=[10**6, 0.005])
        run_frames = await c.frames(run["session"], until_exit=False, count=20)
        srv.kill()
    assert fin_frames[-1][2]["state"] == "exited"
    assert_contiguous(fin_frames)
    # No exchange may be running for them while we write: kill -9 those too.
    for r in (fin, run):
        await kill9_exchange(srv.data_dir, r["session"])
    await kill9_and_wait(read_pid(srv.data_dir, run["session"], "env.pid"), group=True)

    fin_exit_seq = fin_frames[-1][0]
    head = struct.Struct("<IQI")
    # A header that names the next seq with a wrong checksum, and a short payload.
    torn_fin = head.pack(40, fin_exit_seq + 1, 0xDEADBEEF) + b"\xff" * 25
    # Part of a header, then junk.
    torn_run = head.pack(7, 123456, 0)[:10] + b"\xfe\xed" * 40
    sizes = {}
    for r, junk in ((fin, torn_fin), (run, torn_run)):
        path = newest_segment(srv.data_dir, r["session"])
        sizes[r["session"]] = os.path.getsize(path)
        with open(path, "ab") as f:
            f.write(junk)

    again = make_server(data_dir=srv.data_dir)
    async with connect(again.url) as c:
        st = await c.ok("status", token=fin["token"])
        assert st["state"] == "exited" and st["exit"] == fin_frames[-1][2], st
        assert st["next_seq"] == fin_exit_seq + 1, st
        await c.ok("attach", token=fin["viewer_token"])
        got = await c.frames(fin["session"])
        assert got == fin_frames

        await c.ok("attach", token=run["viewer_token"])
        got = await c.frames(run["session"])
        st = await c.ok("status", token=run["token"])
    # On disk the torn tails are gone: cut off, not served, not kept.
    fin_seg = newest_segment(srv.data_dir, fin["session"])
    assert os.path.getsize(fin_seg) == sizes[fin["session"]]
    with open(newest_segment(srv.data_dir, run["session"]), "rb") as f:
        assert torn_run not in f.read()
    assert got[: len(run_frames)] == run_frames
    assert_contiguous(got)
    ex = got[-1][2]
    assert got[-1][1] == "exit" and ex["state"] == "lost", ex
    assert st["state"] == "lost" and st["exit"] == ex
    out = data_of(got)
    assert b"\xfe" not in out and b"\xff" not in out
    n = out.count(b"\n")
    assert n >= 20 and out == lines(n)
    assert all(f[1] in ("stdout", "exit") for f in got)
    # ... and the cut is reported in each session's exchange log, for the operator.
    for r in (fin, run):
        with open(os.path.join(srv.data_dir, "sessions", r["session"], "exchange.log")) as f:
            assert "cut a torn record" in f.read()


# 150 writes of 64 KiB: more than one 8 MiB log segment.
BIG = """
import sys
def main(n):
    for i in range(n):
        sys.stdout.buffer.write(bytes([48 + i % 10]) * 65536)
        sys.stdout.flush()
"""


def damage_record(path: str, seq: int) -> None:
    """Change one byte near the end of record ``seq``'s payload in a log segment."""
    head = sessionlog.HEAD
    with open(path, "r+b") as f:
        data = f.read()
        pos = 0
        while True:
            length, found, _crc = head.unpack_from(data, pos)
            if found == seq:
                break
            pos += head.size + length
        f.seek(pos + head.size + length - 100)
        f.write(b"!")


async def test_damaged_record_found_after_restart_is_refused(make_server):
    """A session found on disk at start has its log checked on read: a record
    damaged while the server was down is reported, never served. (Damage in
    the last segment is cut at recovery like a torn tail; this is in an older one.)"""
    srv = make_server()
    async with connect_crashy(srv.url) as c:
        r = await c.ok("execute", code=BIG, args=[150], attach=False)
        await wait_exit(c, r["token"], timeout=30)
        srv.kill()
    sid = r["session"]
    await kill9_exchange(srv.data_dir, sid)
    segs = sessionlog.list_segments(session_dir(srv.data_dir, sid), "out")
    assert len(segs) >= 2, segs
    damaged = 20
    damage_record(segs[0][1], damaged)

    again = make_server(data_dir=srv.data_dir)
    async with connect(again.url) as c:
        await c.ok("attach", token=r["viewer_token"])
        err = await c.event(ev="error", session=sid)
        assert err["error"]["code"] == "internal" and "checksum" in err["error"]["message"], err
        frames = [f for ev in c.events if ev.get("ev") == "out" for f in ev["frames"]]
    assert all(f[0] < damaged for f in frames), [f[0] for f in frames]
    assert_contiguous(frames)
    assert all(f[2] == bytes([48 + (f[0] - 1) % 10]) * 65536 for f in frames)


async def test_damaged_record_read_back_later_is_refused(server):
    """A session this server created is read without checksums only as it is
    written, by a reader attached at the time; a reader that attaches later
    checks what is already on disk (a page lost since, on a storage that
    failed to write it back, must not be served as output)."""
    async with connect(server.url) as c:
        r = await c.ok("execute", code=BIG, args=[20], attach=False)
        await wait_exit(c, r["token"], timeout=30)
        sid = r["session"]
        damage_record(sessionlog.list_segments(session_dir(server.data_dir, sid), "out")[0][1], 7)
        await c.ok("attach", token=r["viewer_token"])
        err = await c.event(ev="error", session=sid)
        assert err["error"]["code"] == "internal" and "checksum" in err["error"]["message"], err
        frames = [f for ev in c.events if ev.get("ev") == "out" for f in ev["frames"]]
    assert all(f[0] < 7 for f in frames), [f[0] for f in frames]


# -- an exchange dies ---------------------------------------------------------------------


async def test_exchange_kill9_makes_session_lost_and_spares_others(server):
    async with connect(server.url) as c, connect(server.url) as c2:
        victim = await c.ok("execute", code=STREAMER, args=[10**6, 0.004])
        other = await c2.ok("execute", code=STREAMER, args=[300, 0.004])
        vsid, osid = victim["session"], other["session"]
        await c2.send({"op": "input", "session": osid, "seq": 1, "data": "x"})
        got = await c.frames(vsid, until_exit=False, count=30)
        await kill9_and_wait(read_pid(server.data_dir, vsid, "exchange.pid"))
        got += await c.frames(vsid, timeout=20)
        st = await c.ok("status", token=victim["token"])
        await c2.send({"op": "input", "session": osid, "seq": 2, "eof": True})
        other_frames = await c2.frames(osid, timeout=30)
        await kill9_and_wait(read_pid(server.data_dir, vsid, "env.pid"), group=True)
    assert_contiguous(got)
    ex = got[-1][2]
    assert got[-1][1] == "exit" and ex["state"] == "lost", ex
    assert st["state"] == "lost" and st["exit"] == ex
    out = data_of(got)
    n = out.count(b"\n")
    assert n >= 30 and out == lines(n)
    # The other session is untouched.
    assert_contiguous(other_frames)
    assert data_of(other_frames) == lines(300)
    assert [f[2] for f in other_frames if f[1] == "msg"] == ["x"]
    assert other_frames[-1][2]["state"] == "exited" and other_frames[-1][2]["result"] == 300


# -- input exactly once across a server restart -------------------------------------------


async def test_input_exactly_once_across_server_kill9(make_server):
    old = make_server()
    async with connect_crashy(old.url) as c:
        r = await c.ok("execute", code=ECHO, attach=True)
        sid, tok = r["session"], r["token"]
        for seq in (1, 2, 3):
            await c.send({"op": "input", "session": sid, "seq": seq, "data": seq * 10})
        await trio.sleep(0.3)  # these are surely accepted; their in_acks stay unread
        for seq in (4, 5):
            await c.send({"op": "input", "session": sid, "seq": seq, "data": seq * 10})
        old.kill()
    new = make_server(data_dir=old.data_dir)
    async with connect(new.url) as c:
        a = await c.ok("attach", token=tok)
        assert a["state"] == "running" and 3 <= a["input_seq"] <= 5, a
        for seq in range(1, 8):
            await c.send({"op": "input", "session": sid, "seq": seq, "data": seq * 10})
        await c.send({"op": "input", "session": sid, "seq": 8, "eof": True})
        frames = await c.frames(sid)
        acks = []
        with trio.fail_after(10):
            while not acks or acks[-1] < 8:
                acks.append((await c.event(ev="in_ack", session=sid))["seq"])
    assert_contiguous(frames)
    assert [f[2] for f in frames if f[1] == "msg"] == [s * 10 for s in range(1, 8)]
    ex = frames[-1][2]
    assert ex["state"] == "exited" and ex["result"] == [s * 10 for s in range(1, 8)], ex
    assert acks == sorted(acks)


# -- an ended session costs no process ----------------------------------------------------

ENDS = "def main(n):\n    for i in range(n):\n        print(i)\n    api.send('done')\n    return n\n"


async def test_ended_sessions_cost_no_process_and_stay_readable_across_a_restart(make_server):
    """Once a function has ended and its exit frame is on disk, its exchange
    exits, whether or not anyone read or acked anything; the server serves the
    session from disk, and after a kill -9 and a restart still does: output,
    exit, duplicate inputs, the owner's acks and shared state."""
    srv = make_server()
    async with connect(srv.url) as c:
        rs = [await c.ok("execute", code=ENDS, args=[n], attach=False) for n in (3, 50, 0)]
        exits = [(await wait_exit(c, r["token"]))["exit"] for r in rs]
        assert [e["result"] for e in exits] == [3, 50, 0]
        for r in rs:
            # The exchange removes its pid file as it exits; nothing runs for the session.
            sdir = session_dir(srv.data_dir, r["session"])
            with trio.fail_after(10):
                while os.path.exists(os.path.join(sdir, "exchange.pid")):
                    await trio.sleep(0.02)
            assert not os.path.exists(os.path.join(sdir, "env.pid"))
        # Served from disk while this server runs: read, input, state.
        await c.ok("attach", token=rs[1]["viewer_token"])
        before = await c.frames(rs[1]["session"])
        assert data_of(before) == b"".join(b"%d\n" % i for i in range(50))
        p = await c.ok("state_put", token=rs[1]["token"], value={"seen": True})
        assert p["version"] == 1
    srv.kill()
    assert srv.exchange_pids() == []

    again = make_server(data_dir=srv.data_dir)
    async with connect(again.url) as c:
        for r, ex in zip(rs, exits, strict=True):
            st = await c.ok("status", token=r["token"])
            assert st["state"] == "exited" and st["exit"] == ex, st
        sid = rs[1]["session"]
        a = await c.ok("attach", token=rs[1]["token"])
        assert a["state"] == "exited" and a["next_seq"] == before[-1][0] + 1
        got = await c.frames(sid)
        assert got == before
        g = await c.ok("state_get", token=rs[1]["viewer_token"])
        assert (g["version"], g["value"]) == (1, {"seen": True})
        await c.send({"op": "input", "session": sid, "seq": 1, "data": "late"})
        assert (await c.event(ev="error", session=sid))["error"]["code"] == "gone"
        await c.send({"op": "ack", "session": sid, "seq": got[-2][0]})
        st = await c.ok("status", token=rs[1]["token"])
        with trio.fail_after(5):
            while st["acked_seq"] != got[-2][0]:
                await trio.sleep(0.02)
                st = await c.ok("status", token=rs[1]["token"])
        # The acked frames left the buffer and stay readable as history.
        assert st["first_seq"] == 1 and st["buffer_bytes"] == 0 and st["history_bytes"] > 0, st
        # Acking the exit does not end it: it stays for its keep period, whole.
        await c.send({"op": "ack", "session": sid, "seq": got[-1][0]})
        await c.ok("detach", session=sid)
        await wait_status(c, rs[1]["token"], lambda st: st["acked_seq"] == got[-1][0], timeout=5)
        await c.ok("attach", token=rs[1]["viewer_token"])
        assert await c.frames(sid) == before
        await c.ok("destroy", token=rs[1]["token"])
        with trio.fail_after(5):
            while os.path.exists(session_dir(srv.data_dir, sid)):
                await trio.sleep(0.05)
    assert again.exchange_pids() == []
