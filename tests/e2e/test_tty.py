"""End-to-end: a session in a terminal (``tty``): a PTY inside the sandbox.

Keys are stdin input; the terminal's line discipline edits them (a backspace
erases), echoes them, and turns ctrl-c into SIGINT; the window size is set at
the start and changed by ``resize`` (the function gets SIGWINCH).
"""

from __future__ import annotations

from helpers import conn, data_of

SCREEN = r'''
import os, signal, sys, time
def main():
    got = {"isatty": [sys.stdin.isatty(), sys.stdout.isatty(), sys.stderr.isatty()],
           "size": list(os.get_terminal_size())}
    for i in (0, 50, 100):
        print(f"\r\x1b[32m{i:3d}%\x1b[0m", end="", flush=True)
    print()
    got["line"] = input("name? ")
    changed = []
    signal.signal(signal.SIGWINCH, lambda *a: changed.append(list(os.get_terminal_size())))
    api.send("waiting for a resize")
    deadline = time.monotonic() + 20
    while not changed and time.monotonic() < deadline:
        time.sleep(0.01)
    got["resized"] = changed[:1]
    try:
        api.send("interrupt me")
        time.sleep(20)
    except KeyboardInterrupt:
        got["interrupted"] = True
    return got
'''


def keys(sid: str, seq: int, data: bytes) -> dict:
    return {"op": "input", "session": sid, "seq": seq, "stdin": True, "data": data}


async def test_a_terminal_edits_echoes_resizes_and_interrupts(server):
    async with conn(server.url) as c:
        r = await c.ok("execute", code=SCREEN, tty={"rows": 24, "cols": 80})
        sid, token = r["session"], r["token"]
        frames: list[list] = []
        while b"name? " not in data_of(frames):  # typed ahead, keys would echo before the prompt
            frames += (await c.event(ev="out", session=sid))["frames"]
        await c.send(keys(sid, 1, b"bobx\x7f\r"))
        while not any(f[1] == "msg" for f in frames):
            frames += (await c.event(ev="out", session=sid))["frames"]
        await c.ok("resize", token=token, rows=40, cols=132)
        while sum(f[1] == "msg" for f in frames) < 2:
            frames += (await c.event(ev="out", session=sid))["frames"]
        await c.send(keys(sid, 2, b"\x03"))
        frames += await c.frames(sid)
        r = await c.request("resize", token=token, rows=1, cols=1)
        assert r["error"]["code"] == "gone"
    ex = frames[-1][2]
    assert ex["state"] == "exited", ex
    assert ex["result"] == {"isatty": [True, True, True], "size": [80, 24], "line": "bob",
                            "resized": [[132, 40]], "interrupted": True}, ex["result"]
    screen = data_of(frames)
    # The \r progress bar with its colours, the prompt, the echo with the erase.
    assert b"\r\x1b[32m  0%\x1b[0m\r\x1b[32m 50%\x1b[0m\r\x1b[32m100%\x1b[0m\r\n" in screen, screen
    assert b"name? bobx\x08 \x08\r\n" in screen, screen
    assert data_of(frames, "stderr") == b""


async def test_resize_without_a_terminal_is_refused(server):
    async with conn(server.url) as c:
        r = await c.ok("execute", code="def main():\n    return api.recv()\n")
        bad = await c.request("resize", token=r["token"], rows=10, cols=10)
        assert bad["error"]["code"] == "gone" and "terminal" in bad["error"]["message"]
        await c.send({"op": "input", "session": r["session"], "seq": 1, "eof": True})
        await c.frames(r["session"])
