"""End-to-end: ``status`` says when the function waits for input (``waiting``).

A function blocked in ``api.recv()`` shows ``"recv"``, one blocked reading its
standard input (``input()``, ``sys.stdin.read()``, on a pipe or a terminal)
shows ``"stdin"``; once the input arrives (or the wait ends otherwise) it is
null again, while the function still runs.
"""

from __future__ import annotations

import pytest
from helpers import conn, wait_exit, wait_status

# After the wait, the function sends what it got and sleeps: the status of a
# running function that waits for nothing.
RECV = '''
import time
def main():
    api.send(api.recv())
    time.sleep(60)
'''

INPUT = '''
import time
def main():
    api.send(input("name? "))
    time.sleep(60)
'''

READ = '''
import sys, time
def main():
    api.send(sys.stdin.read())
    time.sleep(60)
'''

RECV_TIMEOUT = '''
import time
def main():
    try:
        api.recv(timeout=1.5)
    except TimeoutError:
        api.send("timed out")
    time.sleep(60)
'''


async def next_msg(c, sid: str) -> object:
    while True:
        for f in (await c.event(ev="out", session=sid))["frames"]:
            if f[1] == "msg":
                return f[2]


def waiting(what):
    return lambda st: st["waiting"] == what


async def test_a_function_in_api_recv_waits_for_recv_until_its_input_comes(server):
    async with conn(server.url) as c:
        r = await c.ok("execute", code=RECV)
        sid, token = r["session"], r["token"]
        st = await wait_status(c, token, waiting("recv"))
        assert st["state"] == "running"
        await c.send({"op": "input", "session": sid, "seq": 1, "data": {"v": 1}})
        assert await next_msg(c, sid) == {"v": 1}
        st = await wait_status(c, token, waiting(None))
        assert st["state"] == "running"
        await c.ok("signal", token=token, signal="KILL")
        st = await wait_exit(c, token)
        assert st["waiting"] is None


async def test_a_recv_that_times_out_stops_waiting(server):
    async with conn(server.url) as c:
        r = await c.ok("execute", code=RECV_TIMEOUT)
        sid, token = r["session"], r["token"]
        await wait_status(c, token, waiting("recv"))
        assert await next_msg(c, sid) == "timed out"
        st = await wait_status(c, token, waiting(None))
        assert st["state"] == "running"
        await c.ok("destroy", token=token)


@pytest.mark.parametrize("code, data, got", [(INPUT, b"bob\n", "bob"), (READ, None, "all\nof it\n")],
                         ids=["input", "sys.stdin.read"])
async def test_a_function_reading_stdin_waits_for_stdin_until_its_input_comes(server, code, data, got):
    async with conn(server.url) as c:
        r = await c.ok("execute", code=code)
        sid, token = r["session"], r["token"]
        st = await wait_status(c, token, waiting("stdin"))
        assert st["state"] == "running"
        if data is not None:
            await c.send({"op": "input", "session": sid, "seq": 1, "stdin": True, "data": data})
        else:
            # read() waits for the end of file: between the chunks it waits again.
            await c.send({"op": "input", "session": sid, "seq": 1, "stdin": True, "data": b"all\n"})
            await c.event(ev="in_ack", session=sid, seq=1)
            await wait_status(c, token, waiting("stdin"))
            await c.send({"op": "input", "session": sid, "seq": 2, "stdin": True, "data": b"of it\n"})
            await c.send({"op": "input", "session": sid, "seq": 3, "stdin": True, "eof": True})
        assert await next_msg(c, sid) == got
        st = await wait_status(c, token, waiting(None))
        assert st["state"] == "running"
        await c.ok("destroy", token=token)


async def test_input_on_a_terminal_waits_for_stdin(server):
    async with conn(server.url) as c:
        r = await c.ok("execute", code=INPUT, tty={"rows": 24, "cols": 80})
        sid, token = r["session"], r["token"]
        await wait_status(c, token, waiting("stdin"))
        await c.send({"op": "input", "session": sid, "seq": 1, "stdin": True, "data": b"ann\r"})
        assert await next_msg(c, sid) == "ann"
        st = await wait_status(c, token, waiting(None))
        assert st["state"] == "running"
        await c.ok("destroy", token=token)
