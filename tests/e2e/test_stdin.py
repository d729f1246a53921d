"""End-to-end: input with ``stdin: true`` is the function's standard input.

``input()`` and ``for line in sys.stdin`` read it; ``api.recv()`` keeps its own
channel; each channel has its own eof; every byte arrives exactly once across
reconnects and re-sent seqs (the input log is the one source).
"""

from __future__ import annotations

import trio
from helpers import conn, data_of

# Reads lines with input() until stdin's eof, then values with api.recv() until
# its eof: each channel in its own order, whatever the interleaving on the wire.
LINES_THEN_VALUES = '''
def main():
    lines = []
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        lines.append(line)
        print("got", line)
    values = []
    while True:
        try:
            values.append(api.recv())
        except EOFError:
            return {"lines": lines, "values": values}
'''


def stdin(sid: str, seq: int, data: bytes | str | None) -> dict:
    msg = {"op": "input", "session": sid, "seq": seq, "stdin": True}
    if data is None:
        msg["eof"] = True
    else:
        msg["data"] = data
    return msg


async def test_input_gets_lines_exactly_once_across_a_reconnect(server):
    async with conn(server.url) as c:
        r = await c.ok("execute", code=LINES_THEN_VALUES)
        sid, token = r["session"], r["token"]
        # A value for api.recv() between stdin lines: it waits on its own channel.
        await c.send(stdin(sid, 1, "one\n"))
        await c.send({"op": "input", "session": sid, "seq": 2, "data": {"v": 1}})
        await c.send(stdin(sid, 3, b"tw"))
        await c.send(stdin(sid, 4, b"o\nthree\n"))
        await c.event(ev="in_ack", session=sid, seq=4)
        # The connection drops here, before the client saw anything else.
    async with conn(server.url) as c:
        r = await c.ok("attach", token=token, **{"from": 1})
        assert r["input_seq"] == 4
        # A client that did not see its acks sends everything again: duplicates.
        await c.send(stdin(sid, 3, b"tw"))
        await c.send(stdin(sid, 4, b"o\nthree\n"))
        await c.send(stdin(sid, 5, "four\n"))
        await c.send(stdin(sid, 6, None))
        await c.send({"op": "input", "session": sid, "seq": 7, "data": "last"})
        await c.send({"op": "input", "session": sid, "seq": 8, "eof": True})
        frames = await c.frames(sid)
    ex = frames[-1][2]
    assert ex["state"] == "exited", ex
    assert ex["result"] == {"lines": ["one", "two", "three", "four"], "values": [{"v": 1}, "last"]}
    assert data_of(frames) == b"> got one\n> got two\n> got three\n> got four\n> "


async def test_sys_stdin_iterates_to_eof_and_subprocesses_share_it(server):
    code = '''
import subprocess, sys
def main():
    # A child process reads the same fd 0 (a real pipe, not a Python object);
    # then the function sees its end.
    got = subprocess.run(["cat"], capture_output=True).stdout
    return [got, [line for line in sys.stdin]]
'''
    async with conn(server.url) as c:
        r = await c.ok("execute", code=code)
        sid = r["session"]
        await c.send(stdin(sid, 1, "head\n"))
        await c.send(stdin(sid, 2, b"\x00\xffbinary\n" * 3))
        await c.send(stdin(sid, 3, None))
        frames = await c.frames(sid)
    assert frames[-1][2]["result"] == [b"head\n" + b"\x00\xffbinary\n" * 3, []], frames[-1]


async def test_stdin_after_its_eof_is_accepted_and_written_nowhere(server):
    # Ends only after a value on the other channel: stdin's eof does not end it.
    code = "import sys\ndef main():\n    data = sys.stdin.read()\n    api.recv()\n    return data\n"
    async with conn(server.url) as c:
        r = await c.ok("execute", code=code, attach=False)
        sid, token = r["session"], r["token"]
        await c.ok("attach", token=token, **{"from": 1})
        await c.send(stdin(sid, 1, "early"))
        await c.send(stdin(sid, 2, None))
        # After the eof: accepted (the seq is used) but written nowhere.
        await c.send(stdin(sid, 3, "late"))
        await c.event(ev="in_ack", session=sid, seq=3)
        await c.send({"op": "input", "session": sid, "seq": 4, "data": "go"})
        frames = await c.frames(sid)
    assert frames[-1][2]["result"] == "early"


async def test_stdin_takes_only_bytes_or_text(server):
    async with conn(server.url) as c:
        r = await c.ok("execute", code="import sys\ndef main():\n    return sys.stdin.read()\n")
        sid = r["session"]
        await c.send({"op": "input", "session": sid, "seq": 1, "stdin": True, "data": [1]})
        ev = await c.event(ev="error", session=sid)
        assert ev["error"]["code"] == "bad_request" and "stdin" in ev["error"]["message"]
        await c.send(stdin(sid, 1, None))
        with trio.fail_after(20):
            frames = await c.frames(sid)
    assert frames[-1][2]["result"] == ""
