"""A data dir as an operator handles it: moved (stop, mv, start on the new path)
while functions run, and copied while the server runs, then restored on another
path with every retained frame readable."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import trio
from bento_driver import wire
from helpers import ServerProcess, assert_contiguous, conn, data_of, wait_status

WAITS = "def main():\n    print('before')\n    return api.recv()\n"
LINES = ("import time\ndef main(n):\n    for i in range(n):\n        print(f'line {i}', flush=True)\n"
         "        time.sleep(0.01)\n    return api.recv()\n")
DIR_CHECK_S = 5.0  # bento/exchange.py DIR_CHECK_SECONDS: how often an exchange looks for its dir


async def test_moved_data_dir_keeps_running_sessions(tmp_path):
    """It used to end every session: the exchanges kept the old path, found it gone
    and quit, and the next server adopted each session as lost, with nothing logged."""
    old, new = str(tmp_path / "old"), str(tmp_path / "new")
    srv = ServerProcess(old, "--sandbox", "none").start()
    moved = None
    try:
        async with conn(srv.url) as c:
            run = await c.ok("execute", code=WAITS, attach=False)
            await wait_status(c, run["token"], lambda st: st["state"] == "running")
        srv.kill(signal.SIGTERM)
        os.rename(old, new)
        # Past an exchange's check for its directory while no server is connected.
        await trio.sleep(DIR_CHECK_S + 1.5)
        for _restart in range(2):
            moved = ServerProcess(new, "--sandbox", "none").start()
            async with conn(moved.url) as c:
                st = await c.ok("status", token=run["token"])
                assert st["state"] == "running", st
            moved.kill(signal.SIGTERM)
        moved = ServerProcess(new, "--sandbox", "none").start()
        async with conn(moved.url) as c:
            await c.ok("attach", token=run["token"], **{"from": 1})
            await c.send({"op": "input", "session": run["session"], "seq": 1, "data": "still here"})
            frames = await c.frames(run["session"])
        assert data_of(frames) == b"before\n" and frames[-1][2]["result"] == "still here", frames
    finally:
        srv.stop()
        if moved is not None:
            moved.stop()


async def test_backup_of_a_live_data_dir_restores_every_frame(tmp_path):
    live, restored = str(tmp_path / "live"), str(tmp_path / "restored")
    srv = ServerProcess(live, "--sandbox", "none").start()
    copy = None
    try:
        async with conn(srv.url) as c:
            run = await c.ok("execute", code=LINES, args=[500], attach=False)
            await wait_status(c, run["token"], lambda st: st["state"] == "running" and st["next_seq"] > 20)
            # The documented backup: a plain copy while the server and the function run.
            subprocess.run(["cp", "-a", live, restored], check=True, timeout=60)
        copy = ServerProcess(restored, "--sandbox", "none").start()
        async with conn(copy.url) as c:
            st = await c.ok("status", token=run["token"])
            # The copy has no function: it is kept as lost, with what it holds readable.
            assert st["state"] == "lost" and st["next_seq"] > 20, st
            await c.ok("attach", token=run["token"], **{"from": 1})
            frames = await c.frames(run["session"])
        assert_contiguous(frames)
        lines = data_of(frames).decode().splitlines()
        assert lines == [f"line {i}" for i in range(len(lines))] and len(lines) >= 1, lines[-3:]
        assert frames[-1][1] == "exit" and frames[-1][2]["state"] == "lost"
    finally:
        srv.stop()
        if copy is not None:
            copy.stop()
    shutil.rmtree(restored, ignore_errors=True)


FAKE_EXCHANGE = """
import fcntl, os, socket, struct, sys, cbor2
os.chdir(sys.argv[1])
fcntl.flock(os.open("lock", os.O_RDWR), fcntl.LOCK_EX)
if os.path.exists("ctl.sock"):
    os.unlink("ctl.sock")
sock = socket.socket(socket.AF_UNIX)
sock.bind("ctl.sock")
sock.listen()
print("ready", flush=True)
while True:
    conn, _ = sock.accept()
    body = cbor2.dumps({"t": "hello", "wire": 99, "pid": os.getpid()})
    conn.sendall(struct.pack(">I", len(body)) + body)
"""


async def test_exchange_of_another_wire_version_is_named_not_adopted(tmp_path):
    """After an upgrade that changes the server-exchange messages, a session whose
    exchange speaks another version is left alone, and the log says why."""
    data = str(tmp_path / "d")
    srv = ServerProcess(data, "--sandbox", "none").start()
    fake = None
    try:
        async with conn(srv.url) as c:
            run = await c.ok("execute", code="def main():\n    return 1\n", attach=False)
            await wait_status(c, run["token"], lambda st: st["exit"] is not None)
        srv.stop()
        sdir = os.path.join(data, "sessions", run["session"])
        fake = subprocess.Popen([sys.executable, "-c", FAKE_EXCHANGE, sdir], stdout=subprocess.PIPE)
        assert fake.stdout is not None and fake.stdout.readline() == b"ready\n"
        nxt = ServerProcess(data, "--sandbox", "none").start()
        try:
            async with conn(nxt.url) as c:
                assert (await c.request("status", token=run["token"]))["error"]["code"] == "not_found"
            log = nxt.read_log()
            assert run["session"] in log and f"wire version 99, this server {wire.VERSION}" in log, log
        finally:
            nxt.stop()
    finally:
        srv.stop()
        if fake is not None:
            fake.kill()
            fake.wait(timeout=10)
            fake.stdout.close()
