"""End-to-end: a real server process, real WebSocket connections, real exchanges."""

from __future__ import annotations

import signal

import trio
from helpers import (
    assert_contiguous,
    assert_plain_congestion,
    congestion_controls,
    connect,
    data_of,
    dropped,
)

ECHO = '''
def main(prefix):
    out = []
    while True:
        try:
            v = api.recv()
        except EOFError:
            return out
        out.append(v)
        api.send(prefix + str(v))
'''


async def test_execute_returns_result_and_frames(server):
    code = 'def main(a, b=0):\n    print("hi", a)\n    api.send({"a": a})\n    return a + b\n'
    async with connect(server.url) as c:
        r = await c.ok("execute", code=code, args=[2], kwargs={"b": 3})
        assert r["token"].startswith("bto_") and r["viewer_token"].startswith("btv_")
        frames = await c.frames(r["session"])
    assert_contiguous(frames)
    assert data_of(frames) == b"hi 2\n"
    assert [f[2] for f in frames if f[1] == "msg"] == [{"a": 2}]
    exit_data = frames[-1][2]
    assert exit_data == {"state": "exited", "code": 0, "signal": None, "result": 5, "error": None}


async def test_falsy_results_survive(server):
    async with connect(server.url) as c:
        for value in (0, False, "", [], None):
            r = await c.ok("execute", code=f"def main():\n    return {value!r}\n")
            frames = await c.frames(r["session"])
            assert frames[-1][2]["result"] == value and frames[-1][2]["state"] == "exited"


async def test_the_function_and_its_threads_run_as_a_batch_job(server):
    # SCHED_BATCH: woken, the function does not preempt its exchange (docs/api.md).
    code = ("import os, threading\n"
            "def main():\n"
            "    seen = []\n"
            "    t = threading.Thread(target=lambda: seen.append(os.sched_getscheduler(0)))\n"
            "    t.start(); t.join()\n"
            "    return [os.sched_getscheduler(0) == os.SCHED_BATCH, seen == [os.SCHED_BATCH]]\n")
    async with connect(server.url) as c:
        ex = await c.exit_of(code)
    assert ex["result"] == [True, True], ex


async def test_a_traceback_the_function_formats_shows_its_source(server):
    """The driver imports neither linecache nor traceback up front; the
    function's source still reaches linecache when the function imports them."""
    code = ("import traceback\n"
            "def main():\n"
            "    try:\n"
            "        1 / 0\n"
            "    except ZeroDivisionError:\n"
            "        return traceback.format_exc()\n")
    async with connect(server.url) as c:
        ex = await c.exit_of(code)
        assert ex["state"] == "exited", ex
        assert 'File "<function>", line 4, in main\n    1 / 0\n' in ex["result"], ex["result"]


async def test_exception_and_bad_code(server):
    async with connect(server.url) as c:
        r = await c.ok("execute", code="def main():\n    raise KeyError('nope')\n")
        ex = (await c.frames(r["session"]))[-1][2]
        assert ex["state"] == "exited" and ex["code"] == 1
        assert ex["error"]["type"] == "KeyError" and "nope" in ex["error"]["message"]
        assert "Traceback" in ex["error"]["traceback"]
        assert "    raise KeyError('nope')" in ex["error"]["traceback"], ex["error"]["traceback"]

        r = await c.ok("execute", code="def main(:\n")
        ex = (await c.frames(r["session"]))[-1][2]
        assert ex["state"] == "failed" and ex["error"]["type"] == "SyntaxError" and ex["code"] is None

        r = await c.ok("execute", code="x = 1\n", entry="main")
        ex = (await c.frames(r["session"]))[-1][2]
        assert ex["state"] == "failed" and "main" in ex["error"]["message"]

        r = await c.ok("execute", code="def main():\n    return object()\n")
        ex = (await c.frames(r["session"]))[-1][2]
        assert ex["state"] == "exited" and ex["code"] == 1
        assert ex["error"]["type"] == "ResultNotEncodable"
        assert ex["error"]["message"] == "the return value: cannot send a value of type object", ex


async def test_stored_function_is_content_addressed(server):
    code = "def main(x):\n    return x * 2\n"
    async with connect(server.url) as c:
        f1 = (await c.ok("store", name="double", code=code))["function"]
        f2 = (await c.ok("store", name="again", code=code))["function"]
        assert f1 == f2 and len(f1) == 64
        r = await c.ok("execute", function=f1, args=[21])
        assert (await c.frames(r["session"]))[-1][2]["result"] == 42
        r = await c.request("execute", function="0" * 64)
        assert r["error"]["code"] == "not_found"


async def test_input_echo_exactly_once_with_duplicates(server):
    async with connect(server.url) as c:
        r = await c.ok("execute", code=ECHO, args=["e"])
        sid = r["session"]
        for seq in (1, 2, 2, 1, 3):
            await c.send({"op": "input", "session": sid, "seq": seq, "data": seq * 10})
        acks = [(await c.event(ev="in_ack", session=sid))["seq"] for _ in range(5)]
        assert acks == [1, 2, 2, 2, 3]
        await c.send({"op": "input", "session": sid, "seq": 5, "data": 0})
        err = await c.event(ev="error", session=sid)
        assert err["error"]["code"] == "input_gap"
        await c.send({"op": "input", "session": sid, "seq": 4, "eof": True})
        frames = await c.frames(sid)
    assert [f[2] for f in frames if f[1] == "msg"] == ["e10", "e20", "e30"]
    assert frames[-1][2]["result"] == [10, 20, 30]


async def test_status_has_the_input_seq_as_soon_as_the_input_is_acked(server):
    """An accepted input moves the session's input_seq at once, though the
    function prints nothing (the exchange's reply carries it)."""
    code = "def main():\n    while True:\n        api.recv()\n"
    async with connect(server.url) as c:
        r = await c.ok("execute", code=code)
        sid = r["session"]
        for seq in (1, 2, 3):
            await c.send({"op": "input", "session": sid, "seq": seq, "data": seq})
            await c.event(ev="in_ack", session=sid, seq=seq)
            st = await c.ok("status", token=r["token"])
            assert st["input_seq"] == seq, st
        await c.ok("destroy", token=r["token"])


async def test_input_before_function_reads_and_after_end(server):
    async with connect(server.url) as c:
        r = await c.ok("execute", code="import time\ndef main():\n    time.sleep(0.3)\n    return api.recv()\n")
        sid = r["session"]
        await c.send({"op": "input", "session": sid, "seq": 1, "data": "early"})
        assert (await c.event(ev="in_ack", session=sid))["seq"] == 1
        frames = await c.frames(sid)
        assert frames[-1][2]["result"] == "early"
        await c.send({"op": "input", "session": sid, "seq": 2, "data": "late"})
        err = await c.event(ev="error", session=sid)
        assert err["error"]["code"] == "gone"
        # A duplicate after the end is still only re-acked.
        await c.send({"op": "input", "session": sid, "seq": 1, "data": "early"})
        assert (await c.event(ev="in_ack", session=sid))["seq"] == 1


async def test_abrupt_drop_and_reattach_from_seq(server):
    code = "import time\ndef main(n):\n    for i in range(n):\n        print(i)\n        time.sleep(0.002)\n"
    async with dropped(server.url) as c:  # ends in an abrupt TCP drop
        r = await c.ok("execute", code=code, args=[300])
        sid, token = r["session"], r["token"]
        first = await c.frames(sid, until_exit=False, count=20)
        await trio.sleep(0.1)  # more output arrives, unread
    have = first[:20]
    async with connect(server.url) as c2:
        a = await c2.ok("attach", token=token, **{"from": len(have) + 1})
        assert a["session"] == sid and a["mode"] == "rw"
        rest = await c2.frames(sid)
    frames = have + rest
    assert_contiguous(frames)
    assert data_of(frames) == b"".join(f"{i}\n".encode() for i in range(300))


async def test_two_attachments_independent_positions(server):
    code = "def main():\n    for i in range(50):\n        api.send(i)\n"
    async with connect(server.url) as c:
        r = await c.ok("execute", code=code)
        all_frames = await c.frames(r["session"])
        async with connect(server.url) as v1, connect(server.url) as v2:
            a1 = await v1.ok("attach", token=r["viewer_token"])
            a2 = await v2.ok("attach", token=r["viewer_token"], **{"from": 10})
            assert a1["mode"] == a2["mode"] == "ro"
            f1 = await v1.frames(r["session"])
            f2 = await v2.frames(r["session"])
    assert f1 == all_frames
    assert f2 == all_frames[9:]


async def test_print_of_framing_like_bytes_is_only_stdout(server):
    code = (
        "import sys, struct\n"
        "from bento_driver import cbor\n"
        "def main():\n"
        "    junk = struct.pack('>I', 5) + cbor.encode({'t': 'send', 'ch': None, 'v': b'x'})\n"
        "    sys.stdout.buffer.write(junk + b'\\xff\\x00\\x9f')\n"
        "    sys.stdout.flush()\n"
        "    print('{\"ev\": \"out\"}')\n"
        "    api.send('real')\n"
        "    return 1\n"
    )
    async with connect(server.url) as c:
        r = await c.ok("execute", code=code)
        frames = await c.frames(r["session"])
    assert b"\xff\x00\x9f" in data_of(frames)
    assert [f[2] for f in frames if f[1].startswith("msg")] == ["real"]
    assert frames[-1][2]["result"] == 1


async def test_idempotent_execute_starts_one_function(server):
    code = "import os\ndef main():\n    api.send(os.getpid())\n    return api.recv()\n"
    async with connect(server.url) as c:
        rs = [await c.ok("execute", code=code, idempotency_key="job-1", attach=False) for _ in range(3)]
        assert len({r["session"] for r in rs}) == 1
        assert len({r["token"] for r in rs}) == 1 and len({r["viewer_token"] for r in rs}) == 1
        other = await c.ok("execute", code=code, idempotency_key="job-2", attach=False)
        assert other["session"] != rs[0]["session"]
        listed = (await c.ok("list"))["sessions"]
        assert sum(1 for s in listed if s["session"] == rs[0]["session"]) == 1
        for r in (rs[0], other):
            await c.ok("destroy", token=r["token"])


async def test_concurrent_idempotent_executes(server):
    code = "def main():\n    return api.recv()\n"
    results = []
    async with connect(server.url) as c:

        async def one():
            async with connect(server.url) as ci:
                results.append(await ci.ok("execute", code=code, idempotency_key="race", attach=False))

        async with trio.open_nursery() as n:
            for _ in range(5):
                n.start_soon(one)
        assert len({r["session"] for r in results}) == 1
        await c.ok("destroy", token=results[0]["token"])


async def test_status_list_signal_destroy(server):
    code = "import time\ndef main():\n    while True:\n        time.sleep(0.05)\n"
    async with connect(server.url) as c:
        r = await c.ok("execute", code=code)
        st = await c.ok("status", token=r["viewer_token"])
        assert st["session"] == r["session"] and st["state"] in ("starting", "running")
        assert st["sandbox"] in ("bwrap", "none") and "enforced" in st and st["attachments"] == 1
        # The buffer's limit and policy, so a client can say when it is full (the server's defaults).
        assert st["buffer"] == {"max_bytes": 64 * 1024 * 1024, "policy": "block"}, st
        assert (await c.request("signal", token=r["viewer_token"], signal="TERM"))["error"]["code"] == "forbidden"
        await c.ok("signal", token=r["token"], signal="TERM")
        ex = (await c.frames(r["session"]))[-1][2]
        assert ex["state"] == "killed" and ex["signal"] == "TERM" and ex["code"] is None
        assert (await c.request("signal", token=r["token"], signal="KILL"))["error"]["code"] == "gone"

        r2 = await c.ok("execute", code=code)
        async with connect(server.url) as watcher:
            await watcher.ok("attach", token=r2["viewer_token"])
            await c.ok("destroy", token=r2["token"])
            gone = await watcher.event(ev="error", session=r2["session"])
            assert gone["error"]["code"] == "gone"
        assert (await c.request("status", token=r2["token"]))["error"]["code"] == "not_found"
        assert (await c.request("attach", token=r2["viewer_token"]))["error"]["code"] == "not_found"


async def test_signal_int_is_keyboard_interrupt(server):
    caught = "import time\ndef main():\n    try:\n        api.send('ready')\n        time.sleep(30)\n" \
             "    except KeyboardInterrupt:\n        return 'caught'\n"
    escapes = "import time\ndef main():\n    api.send('ready')\n    time.sleep(30)\n"
    async with connect(server.url) as c:
        r = await c.ok("execute", code=caught)
        await c.frames(r["session"], until_exit=False, count=1)
        await c.ok("signal", token=r["token"], signal="INT")
        ex = (await c.frames(r["session"]))[-1][2]
        assert ex["state"] == "exited" and ex["result"] == "caught"
        r = await c.ok("execute", code=escapes)
        await c.frames(r["session"], until_exit=False, count=1)
        await c.ok("signal", token=r["token"], signal="INT")
        ex = (await c.frames(r["session"]))[-1][2]
        assert ex["state"] == "killed" and ex["signal"] == "INT"


async def test_signals_work_when_the_server_started_with_them_ignored(make_server):
    """A server started as a background job of a script inherits SIGINT
    ignored, and so would every function it runs: INT must still raise
    KeyboardInterrupt there, and TERM still end the function."""
    ignored = (signal.SIGINT, signal.SIGTERM)
    old = {s: signal.signal(s, signal.SIG_IGN) for s in ignored}
    try:
        srv = make_server()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    # 'ready' is sent inside the try: a signal that arrives as the send returns
    # must already be caught (a busy machine can hold the function back there).
    caught = "import time\ndef main():\n    try:\n        api.send('ready')\n        time.sleep(30)\n" \
             "    except KeyboardInterrupt:\n        return 'caught'\n"
    sleeper = "import time\ndef main():\n    api.send('ready')\n    time.sleep(30)\n"
    async with connect(srv.url) as c:
        for code, sig in ((caught, "INT"), (sleeper, "TERM")):
            r = await c.ok("execute", code=code)
            await c.frames(r["session"], until_exit=False, count=1)
            await c.ok("signal", token=r["token"], signal=sig)
            ex = (await c.frames(r["session"]))[-1][2]
            if sig == "INT":
                assert ex["state"] == "exited" and ex["result"] == "caught", ex
            else:
                assert ex["state"] == "killed" and ex["signal"] == "TERM", ex
    srv.kill()  # it ignores SIGTERM itself (as asked): the fixture's stop would wait 10 s


async def test_shared_state_compare_and_set(server):
    code = (
        "def main():\n"
        "    api.recv()\n"
        "    v, val = api.state.get()\n"
        "    api.send([v, val])\n"
        "    return api.state.put({'by': 'fn'}, if_version=v)\n"
    )
    async with connect(server.url) as c:
        r = await c.ok("execute", code=code, attach=False)
        tok, sid = r["token"], r["session"]
        g = await c.ok("state_get", token=r["viewer_token"])
        assert (g["version"], g["value"]) == (0, None)
        p = await c.ok("state_put", token=tok, value={"n": 1}, if_version=0)
        assert p["version"] == 1
        bad = await c.request("state_put", token=tok, value={"n": 2}, if_version=0)
        assert bad["error"]["code"] == "conflict" and bad["error"]["version"] == 1
        assert (await c.request("state_put", token=r["viewer_token"], value=1))["error"]["code"] == "forbidden"
        big = await c.request("state_put", token=tok, value="x" * 70_000)
        assert big["error"]["code"] == "too_large"
        a = await c.ok("attach", token=tok)
        assert a["next_seq"] >= 1
        st = await c.event(ev="state", session=sid)
        assert (st["version"], st["value"]) == (1, {"n": 1})
        await c.send({"op": "input", "session": sid, "seq": 1, "data": None})
        frames = await c.frames(sid)
        assert [f[2] for f in frames if f[1] == "msg"] == [[1, {"n": 1}]]
        assert frames[-1][2]["result"] == 2
        st2 = await c.event(ev="state", session=sid)
        assert st2["version"] == 2 and st2["value"] == {"by": "fn"}


async def test_ack_frees_the_buffer_and_a_late_viewer_reads_every_frame(server):
    code = "def main():\n    for i in range(20):\n        api.send(i)\n    api.recv()\n"
    async with connect(server.url) as c:
        r = await c.ok("execute", code=code)
        sid = r["session"]
        frames = await c.frames(sid, until_exit=False, count=20)
        before = (await c.ok("status", token=r["token"]))["buffer_bytes"]
        await c.send({"op": "ack", "session": sid, "seq": 10})
        with trio.fail_after(5):
            while (await c.ok("status", token=r["token"]))["acked_seq"] != 10:
                await trio.sleep(0.02)
        st = await c.ok("status", token=r["token"])
        # The acked frames left the buffer but stay readable as history.
        assert st["first_seq"] == 1 and st["buffer_bytes"] < before, (before, st)
        assert st["history_bytes"] == before - st["buffer_bytes"], (before, st)
        async with connect(server.url) as v:
            await v.ok("attach", token=r["viewer_token"])
            got = await v.frames(sid, until_exit=False, count=20)
        assert got == frames[:20]
        # ack beyond next_seq - 1 counts as next_seq - 1
        await c.send({"op": "ack", "session": sid, "seq": 10_000})
        with trio.fail_after(5):
            while (await c.ok("status", token=r["token"]))["acked_seq"] != 20:
                await trio.sleep(0.02)
        await c.ok("destroy", token=r["token"])


async def test_an_ended_session_stays_readable_after_its_exit_is_acked_and_detached(server):
    async with connect(server.url) as c:
        r = await c.ok("execute", code="def main():\n    print('hello')\n    return 7\n")
        frames = await c.frames(r["session"])
        await c.send({"op": "ack", "session": r["session"], "seq": frames[-1][0]})
        await c.ok("detach", session=r["session"])
        await trio.sleep(2.2)  # a reaper round or two: the keep period (24 h) has not passed
        st = await c.ok("status", token=r["token"])
        assert st["acked_seq"] == frames[-1][0] and st["exit"]["result"] == 7, st
        async with connect(server.url) as v:
            await v.ok("attach", token=r["viewer_token"])
            assert await v.frames(r["session"]) == frames


async def test_same_host_connections_are_not_paced(server):
    """The server switches a connection from this host to a plain congestion
    control when the system's default is another one (bento/tcptune.py)."""
    async with connect(server.url) as c:
        port = c.ws._stream.socket.getsockname()[1]
        found = congestion_controls(f"( sport = :{server.port} and dport = :{port} )")
    assert len(found) == 1, found
    assert_plain_congestion(found)


async def test_attach_right_after_a_drop_reports_the_true_positions(server):
    """The attach reply carries the session's positions as they are, not as the
    exchange last announced them: after 30 frames read and 30 inputs acked, a
    reconnect's attach says next_seq 31 and input_seq 30 (it once said 1 and 0)."""
    code = ("def main():\n    for i in range(30):\n        api.send(i)\n"
            "    n = 0\n    while True:\n        try:\n            api.recv()\n"
            "        except EOFError:\n            return n\n        n += 1\n")
    for _ in range(3):
        async with connect(server.url) as c:
            r = await c.ok("execute", code=code)
            sid = r["session"]
            got = await c.frames(sid, until_exit=False, count=30)
            assert [f[2] for f in got] == list(range(30))
            for seq in range(1, 31):
                await c.send({"op": "input", "session": sid, "seq": seq, "data": seq})
            await c.event(ev="in_ack", session=sid, seq=30)
        async with connect(server.url) as c:
            rep = await c.ok("attach", token=r["token"], **{"from": 1})
            assert (rep["next_seq"], rep["input_seq"], rep["state"]) == (31, 30, "running"), rep
            await c.ok("destroy", token=r["token"])


async def test_state_put_as_the_function_ends_waits_for_its_exchange_to_let_go(server):
    """The moment the exit frame is out, the exchange still holds the session's
    directory for its last writes, then exits: a put or a get then waits for it
    instead of failing with "try again"."""
    async with connect(server.url) as c:
        for i in range(30):
            r = await c.ok("execute", code="def main():\n    return 1\n")
            await c.frames(r["session"], timeout=20)  # up to the exit frame
            put = await c.ok("state_put", token=r["token"], value=i)
            assert put["version"] == 1, put
            got = await c.ok("state_get", token=r["viewer_token"])
            assert (got["version"], got["value"]) == (1, i), got
