"""The async SDK against a real server: execute, typed frames, input, results and
errors, attach by token, the token ops, and giving up on a dead server."""

from __future__ import annotations

import subprocess
import sys

import bento_clients
import pytest
import trio
from bento_clients.frames import Exit, Gap, Msg, Stderr, Stdout
from client_helpers import line_numbers
from helpers import assert_plain_congestion, congestion_controls


def greet(name, times=1, punctuation="!"):
    import sys

    for _ in range(times):
        print(f"hello {name}{punctuation}")
    print("to stderr", file=sys.stderr, flush=True)
    api.send({"name": name, "raw": b"\x00\xff"})  # noqa: F821 - api exists remotely
    api.send(3, channel="count")  # noqa: F821
    return {"greeted": name, "times": times}


ECHO = """
def main(prefix=""):
    got = []
    while True:
        try:
            v = api.recv()
        except EOFError:
            return got
        got.append(v)
        api.send(prefix + str(v))
"""

TEST_TIMEOUT_S = 60

SLEEPER = "import time\ndef main():\n    api.send('ready')\n    time.sleep(30)\n"


async def test_callable_args_kwargs_and_typed_frames(server):
    with trio.fail_after(TEST_TIMEOUT_S):
        async with bento_clients.connect(server.url) as c:
            s = await c.execute(greet, "bento", times=2)
            assert s.token.startswith("bto_") and s.viewer_token.startswith("btv_") and s.mode == "rw"
            frames = [f async for f in s.output()]
            assert await s.result() == {"greeted": "bento", "times": 2}
        assert [f.seq for f in frames] == list(range(1, len(frames) + 1))
        assert b"".join(f.data for f in frames if isinstance(f, Stdout)) == b"hello bento!\nhello bento!\n"
        assert b"".join(f.data for f in frames if isinstance(f, Stderr)) == b"to stderr\n"
        msgs = [f for f in frames if isinstance(f, Msg)]
        assert [(m.value, m.channel) for m in msgs] == [({"name": "bento", "raw": b"\x00\xff"}, None), (3, "count")]
        assert isinstance(frames[-1], Exit) and frames[-1].ok and frames[-1].result["times"] == 2


async def test_reserved_option_names_go_through_kwargs(server):
    with trio.fail_after(TEST_TIMEOUT_S):
        code = "def main(env, limits=0, **rest):\n    return [env, limits, rest]\n"
        async with bento_clients.connect(server.url) as c:
            s = await c.execute(code, kwargs={"env": "E", "limits": 2}, extra=True)
            assert await s.result() == ["E", 2, {"extra": True}]
            with pytest.raises(TypeError, match="twice"):
                await c.execute(code, kwargs={"x": 1}, x=2)
            with pytest.raises(TypeError, match="lambda"):
                await c.execute(lambda: 1)
            with pytest.raises(TypeError):
                await c.execute(code, object())


async def test_stored_function_id_and_entry(server):
    with trio.fail_after(TEST_TIMEOUT_S):
        async with bento_clients.connect(server.url) as c:
            fid = await c.store("def double(x):\n    return 2 * x\n", name="double")
            s = await c.execute(fid, 21, entry="double")
            assert await s.result() == 42


async def test_result_errors_carry_remote_details(server):
    with trio.fail_after(TEST_TIMEOUT_S):
        async with bento_clients.connect(server.url) as c:
            s = await c.execute("def main():\n    raise KeyError('nope')\n")
            with pytest.raises(bento_clients.RemoteError) as info:
                await s.result()
            assert type(info.value) is bento_clients.RemoteError
            assert info.value.type == "KeyError" and "nope" in info.value.message
            assert "Traceback" in info.value.traceback and info.value.code == 1

            s = await c.execute("import sys\ndef main():\n    sys.exit(3)\n")
            with pytest.raises(bento_clients.RemoteError) as info:
                await s.result()
            assert info.value.type == "SystemExit" and info.value.code == 3

            s = await c.execute("def main(:\n")
            with pytest.raises(bento_clients.SessionFailed) as failed:
                await s.result()
            assert failed.value.state == "failed" and failed.value.type == "SyntaxError"

            s = await c.execute(SLEEPER)
            assert isinstance(await s.output().__anext__(), Msg)
            await s.signal("TERM")
            with pytest.raises(bento_clients.SessionKilled) as killed:
                await s.result()
            assert killed.value.state == "killed" and killed.value.signal == "TERM"
            assert killed.value.signal_number == 15
            with pytest.raises(bento_clients.Gone):
                await s.signal("KILL")


async def test_input_exactly_once_and_closed_input(server):
    with trio.fail_after(TEST_TIMEOUT_S):
        async with bento_clients.connect(server.url) as c:
            s = await c.execute(ECHO, "e")
            seqs = [await s.send(v) for v in (1, "two", [3])]
            assert seqs == [1, 2, 3]
            await s.wait_input_acked()
            await s.close_input()
            with pytest.raises(bento_clients.InputClosed):
                await s.send(4)
            assert await s.result() == [1, "two", [3]]
            with pytest.raises(TypeError):
                await (await c.execute(ECHO)).send(object())


async def test_attach_by_token_from_seq_and_viewer(server):
    with trio.fail_after(TEST_TIMEOUT_S):
        code = "def main():\n    for i in range(10):\n        api.send(i)\n    return api.recv()\n"
        async with bento_clients.connect(server.url) as c:
            s = await c.execute(code, attach=False)
            token, viewer = s.token, s.viewer_token
            with pytest.raises(bento_clients.BentoError, match="not attached"):
                s.output()
            with pytest.raises(bento_clients.BentoError, match="not attached"):
                await s.result()  # (it waited forever)
        async with bento_clients.connect(server.url) as c2:
            with trio.fail_after(10):
                while (await c2.status(viewer))["next_seq"] < 11:
                    await trio.sleep(0.02)
            v = await c2.attach(viewer, from_seq=4)
            assert v.mode == "ro" and v.token is None and v.viewer_token == viewer
            got = []
            async for f in v.output():
                got.append(f.value)
                if f.value == 9:
                    break
            assert got == list(range(3, 10))
            with pytest.raises(bento_clients.InputClosed):
                await v.send(1)
            with pytest.raises(bento_clients.Forbidden, match="owner"):
                await v.signal("TERM")
            o = await c2.attach(token)
            assert o.mode == "rw" and o.attach_info["next_seq"] == 11
            with pytest.raises(bento_clients.BentoError, match="attached again on this client"):
                await v.result()
            await o.send("done")
            assert await o.result() == "done"
            with pytest.raises(bento_clients.NotFound):
                await c2.attach("bto_" + "x" * 43)


async def test_status_says_when_the_function_waits_in_recv(server):
    async def waiting(s, what):
        while (await s.status())["waiting"] != what:
            await trio.sleep(0.05)

    with trio.fail_after(TEST_TIMEOUT_S):
        async with bento_clients.connect(server.url) as c:
            s = await c.execute(ECHO)
            await waiting(s, "recv")
            await s.send(1)
            frames = s.output()
            assert (await frames.__anext__()).value == "1"
            # Back in api.recv(), for the next value: waiting again.
            await waiting(s, "recv")
            await s.close_input()
            assert await s.result() == [1]
            assert (await s.status())["waiting"] is None


async def test_status_state_and_destroy(server):
    with trio.fail_after(TEST_TIMEOUT_S):
        async with bento_clients.connect(server.url) as c:
            s = await c.execute(SLEEPER)
            st = await s.status()
            assert st["session"] == s.id and st["state"] in ("starting", "running")
            assert await s.state_get() == (0, None)
            assert await s.state_put({"n": 1}) == 1
            with pytest.raises(bento_clients.Conflict) as conflict:
                await s.state_put({"n": 2}, if_version=0)
            assert conflict.value.version == 1
            with pytest.raises(bento_clients.Forbidden):
                await c.state_put(s.viewer_token, 1)
            async with bento_clients.connect(server.url) as w:
                watch = await w.attach(s.viewer_token)
                frames = watch.output()
                with trio.fail_after(10):
                    first = await frames.__anext__()
                    while watch.shared_state is None:
                        await trio.sleep(0.01)
                assert isinstance(first, Msg) and first.value == "ready"
                assert watch.shared_state == (1, {"n": 1})
                await s.destroy()
                with pytest.raises(bento_clients.SessionGone), trio.fail_after(10):
                    async for f in frames:
                        raise AssertionError(f"a frame after the session was destroyed: {f}")
            with pytest.raises(bento_clients.NotFound):
                await c.status(s.token)


async def test_result_without_reading_output_drains_it(server):
    with trio.fail_after(TEST_TIMEOUT_S):
        code = "def main():\n    for i in range(2000):\n        print(i)\n    return 'end'\n"
        async with bento_clients.connect(server.url) as c:
            s = await c.execute(code, buffer=4096)  # tiny buffer: only acks let it finish
            with trio.fail_after(30):
                assert await s.result() == "end"
            # The exit frame was acknowledged (the session stays readable for its keep period).
            assert s.statistics()["read_seq"] == s.exit.seq


TWENTY = "def main():\n    for i in range(20):\n        api.send(i)\n    api.recv()\n"

# A second process attaches with the owner's token from 1 and prints what it reads.
SECOND_PROCESS = """
import sys, bento_clients
with bento_clients.sync.connect(sys.argv[1]) as c:
    s = c.attach(sys.argv[2])
    for f in s.output(timeout=20):
        print(type(f).__name__, getattr(f, "from_seq", None), getattr(f, "reason", None), getattr(f, "value", None))
        if getattr(f, "value", None) == 19:
            break
"""


async def read_ten_and_ack(s) -> None:
    it = s.output()
    for _ in range(10):
        await it.__anext__()
    await it.__anext__()  # acknowledges the first ten
    with trio.fail_after(10):
        while (await s.status())["acked_seq"] < 10:
            await trio.sleep(0.02)


async def test_a_second_process_reattaching_after_acks_reads_everything_without_a_gap(server):
    with trio.fail_after(TEST_TIMEOUT_S):
        async with bento_clients.connect(server.url) as c:
            s = await c.execute(TWENTY)
            await read_ten_and_ack(s)
            st = await s.status()
            assert st["first_seq"] == 1 and st["history_bytes"] > 0, st
            out = await trio.to_thread.run_sync(lambda: subprocess.run(
                [sys.executable, "-c", SECOND_PROCESS, server.url, s.token],
                capture_output=True, timeout=40))
            assert out.returncode == 0, out.stderr
            lines = out.stdout.decode().splitlines()
            assert lines == [f"Msg None None {i}" for i in range(20)], out
            await s.destroy()


async def test_gap_frame_for_trimmed_history(make_server):
    with trio.fail_after(TEST_TIMEOUT_S):
        srv = make_server("--history-bytes", "0")
        async with bento_clients.connect(srv.url) as c:
            s = await c.execute(TWENTY)
            await read_ten_and_ack(s)
            async with bento_clients.connect(srv.url) as v:
                late = await v.attach(s.viewer_token)
                it = late.output()
                first = await it.__anext__()
                second = await it.__anext__()
            assert isinstance(first, Gap) and (first.from_seq, first.to_seq, first.reason) == (1, 10, "trimmed")
            assert isinstance(second, Msg) and second.value == 10
            await s.destroy()


async def test_connect_to_nothing_fails_fast_and_clearly():
    with trio.fail_after(10):
        with pytest.raises(bento_clients.ConnectionLost, match="cannot connect"):
            async with bento_clients.connect("ws://127.0.0.1:9/v1", connect_timeout=0.5):
                pass
    with pytest.raises(ValueError):
        async with bento_clients.connect("http://127.0.0.1:9/v1"):
            pass


async def test_gives_up_after_reconnect_timeout(make_server):
    with trio.fail_after(TEST_TIMEOUT_S):
        srv = make_server()
        async with bento_clients.connect(srv.url, reconnect_timeout=1.0, backoff_max=0.2) as c:
            s = await c.execute(SLEEPER)
            it = s.output()
            assert isinstance(await it.__anext__(), Msg)
            srv.kill()
            with trio.fail_after(15), pytest.raises(bento_clients.ConnectionLost, match="could not be restored"):
                await it.__anext__()
            with pytest.raises(bento_clients.ConnectionLost):
                await c.status(s.token)


async def test_survives_server_restart(make_server, tmp_path):
    """kill -9 the server mid-stream, start it again on the same port and data
    dir: the SDK reconnects by itself and the output continues exactly once."""
    with trio.fail_after(TEST_TIMEOUT_S):
        srv = make_server()
        port = srv.port
        code = "import time\ndef main(n):\n    for i in range(n):\n        print(i, flush=True)\n        time.sleep(0.01)\n    return api.recv()\n"
        async with bento_clients.connect(srv.url, reconnect_timeout=30, backoff_max=0.2) as c:
            s = await c.execute(code, 150)
            frames = []
            it = s.output()
            with trio.fail_after(30):
                while sum(f.data.count(b"\n") for f in frames if isinstance(f, Stdout)) < 20:
                    frames.append(await it.__anext__())
                srv.kill()
                await trio.to_thread.run_sync(srv.start, port)
                await s.send("after restart")
                async for f in it:
                    frames.append(f)
            assert await s.result() == "after restart"
            assert c.reconnects >= 1
        assert [f.seq for f in frames] == list(range(1, len(frames) + 1))
        text = b"".join(f.data for f in frames if isinstance(f, Stdout))
        assert text == b"".join(b"%d\n" % i for i in range(150))


def test_imports_stay_cheap_and_point_one_way():
    """``import bento_clients`` loads no trio until a name is used; the server
    package (and its protocol) never loads the clients."""
    out = subprocess.run(
        [sys.executable, "-c",
         "import sys, bento, bento.protocol; assert 'bento_clients' not in sys.modules; "
         "import bento_clients; e = bento_clients.RemoteError; assert 'trio' not in sys.modules; "
         "assert [n for n in bento_clients.EXPORTS if getattr(bento_clients, n) is None] == []; "
         "assert bento_clients.connect and bento_clients.sync.connect; "
         "assert not hasattr(bento, 'connect'); print('ok')"],
        capture_output=True, timeout=60)
    assert out.stdout.strip() == b"ok", out.stderr


# -- a reader that falls behind: the client's queue stays bounded ---------------------

CHATTY = """
def main(mib):
    block = b"y" * 65535 + b"\\n"
    for _ in range(mib * 16):
        print(block.decode(), end="", flush=True)
    got = []
    for _ in range(3):
        got.append(api.recv())
    return got
"""

BOUND = 1 << 20
# The out event that crosses the bound is held whole (the server's are ~1 MiB).
LAST_EVENT = 2 << 20


async def _idle_while_it_writes(s, seconds: float) -> int:
    """Read nothing for ``seconds``; return the most bytes the client held
    unread meanwhile."""
    most = 0
    with trio.move_on_after(seconds):
        while True:
            most = max(most, s.statistics()["queued_bytes"])
            await trio.sleep(0.005)
    return most


async def test_slow_reader_pauses_instead_of_buffering_everything(server):
    """block policy: past max_queued_bytes the client detaches and the function waits
    on the server; input sent meanwhile is held; once read down, the client attaches
    again from the next seq: every byte exactly once, every input exactly once."""
    with trio.fail_after(TEST_TIMEOUT_S):
        async with bento_clients.connect(server.url, max_queued_bytes=BOUND) as c:
            s = await c.execute(CHATTY, 48, buffer={"policy": "block", "max_bytes": 32 << 20})
            most = await _idle_while_it_writes(s, 2.0)
            for i in range(3):
                await s.send(f"in{i}")
            frames = [f async for f in s.output()]
            assert await s.result() == ["in0", "in1", "in2"]
            stats = s.statistics()
        assert most <= BOUND + LAST_EVENT, most
        assert stats["pauses"] >= 1, stats
        assert [f.seq for f in frames] == list(range(1, len(frames) + 1))
        assert not [f for f in frames if isinstance(f, Gap)]
        out = b"".join(f.data for f in frames if isinstance(f, Stdout))
        assert len(out) == 48 << 20 and out.count(b"\n") == 48 * 16


async def test_slow_reader_with_drop_oldest_sees_gaps_not_unbounded_memory(server):
    with trio.fail_after(TEST_TIMEOUT_S):
        async with bento_clients.connect(server.url, max_queued_bytes=BOUND) as c:
            s = await c.execute(CHATTY, 48, buffer={"policy": "drop_oldest", "max_bytes": 8 << 20})
            most = await _idle_while_it_writes(s, 2.0)
            for i in range(3):
                await s.send(i)
            frames = [f async for f in s.output()]
            assert await s.result() == [0, 1, 2]
        assert most <= BOUND + LAST_EVENT, most
        # Every seq accounted for, once: a frame or inside exactly one gap.
        seen = []
        for f in frames:
            seen += list(range(f.from_seq, f.to_seq + 1)) if isinstance(f, Gap) else [f.seq]
        assert seen == list(range(1, frames[-1].seq + 1))
        assert [f for f in frames if isinstance(f, Gap)], "the server dropped nothing?"
        assert isinstance(frames[-1], Exit)


SMALL_PAGES = """
def main(n):
    pad = "p" * (16 * 1024 - 16)
    for i in range(n):
        print(f"{i:>10} {pad}", flush=True)
"""


async def test_many_pauses_in_a_row_lose_and_repeat_nothing(server):
    """A bound of two pages: the session pauses and resumes dozens of times; the
    frames right behind each re-attach reply are taken (the pause ends in the
    reader, with the reply), so no hole, gap or duplicate appears."""
    with trio.fail_after(TEST_TIMEOUT_S):
        async with bento_clients.connect(server.url, max_queued_bytes=32 * 1024) as c:
            s = await c.execute(SMALL_PAGES, 2048)
            frames = []
            async for frame in s.output():
                frames.append(frame)
                if len(frames) % 7 == 0:
                    await trio.sleep(0.001)
            stats = s.statistics()
        assert stats["pauses"] >= 10 and stats["duplicates"] == 0 and stats["holes"] == 0, stats
        assert not [f for f in frames if isinstance(f, Gap)]
        assert line_numbers(frames) == list(range(2048))


async def test_a_viewer_that_falls_behind_pauses_and_resumes_exactly(server):
    """A viewer acks nothing and sends nothing: its pause and resume rest on the
    re-attach alone. The owner does not read either, so the server keeps every frame."""
    with trio.fail_after(TEST_TIMEOUT_S):
        async with bento_clients.connect(server.url) as owner, \
                bento_clients.connect(server.url, max_queued_bytes=256 * 1024) as watcher:
            s = await owner.execute(SMALL_PAGES, 512)
            v = await watcher.attach(s.viewer_token)
            await trio.sleep(1.0)  # 8 MiB written; the viewer holds one bound's worth
            assert v.statistics()["queued_bytes"] <= 256 * 1024 + (2 << 20)
            frames = [f async for f in v.output()]
            stats = v.statistics()
            await s.destroy()
        assert v.mode == "ro" and stats["pauses"] >= 1 and stats["duplicates"] == 0, stats
        assert not [f for f in frames if isinstance(f, Gap)]
        assert line_numbers(frames) == list(range(512))


async def test_sdk_connection_to_this_host_is_not_paced(server):
    """Like the server's side (tests/e2e/test_core.py): the SDK's connection to
    a server on this host uses a plain congestion control (bento/tcptune.py)."""
    async with bento_clients.connect(server.url) as c:
        await c.execute("def main():\n    return 1\n")
        found = congestion_controls(f"( dport = :{server.port} )")
    assert_plain_congestion(found)
