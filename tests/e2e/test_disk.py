"""Disk trouble: a full data dir pauses output (nothing lost) and refuses new
work with a clear error; everything resumes when space returns."""

from __future__ import annotations

import os
import subprocess

import pytest
import trio
from helpers import assert_contiguous, connect, data_of

MiB = 1024 * 1024


@pytest.fixture
def small_disk(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)],
                       capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield str(mnt / "data")
    subprocess.run(["umount", "-l", str(mnt)], check=False, timeout=30)


async def test_full_disk_pauses_output_and_recovers(small_disk, make_server):
    # small_disk first: fixtures are torn down last-in first-out, so the server
    # and its exchanges are stopped (found by their pid files) before the unmount.
    srv = make_server("--pool", "0", data_dir=small_disk)
    total = 40 * MiB
    code = (
        "import sys\n"
        f"def main():\n    chunk = b'y' * 65536\n    for _ in range({total // 65536}):\n"
        "        sys.stdout.buffer.write(chunk)\n        sys.stdout.flush()\n    return 'done'\n"
    )
    async with connect(srv.url) as c:
        r = await c.ok("execute", code=code, attach=False,
                       buffer={"max_bytes": 256 * MiB, "policy": "block"})
        tok, sid = r["token"], r["session"]
        # The disk fills: output stops growing, the function is held, nothing fails.
        last = -1
        with trio.fail_after(30):
            while True:
                st = await c.ok("status", token=tok)
                if st["next_seq"] == last:
                    break
                last = st["next_seq"]
                await trio.sleep(0.5)
        assert st["state"] == "running" and st["exit"] is None
        held = st["buffer_bytes"]
        assert held < total
        # New work is refused with a clear error while the disk is full.
        refused = await c.request("execute", code="def main():\n    return 1\n" + "#" * 200_000)
        assert not refused["ok"]
        assert refused["error"]["code"] == "busy" and refused["error"]["busy"] == "disk"
        assert refused["error"]["retry_after"] > 0
        assert "space" in refused["error"]["message"].lower()
        # Reading and acking frees whole segments: the function goes on to the end.
        await c.ok("attach", token=tok)
        frames = []
        with trio.fail_after(120):
            while not frames or frames[-1][1] != "exit":
                ev = await c.event(ev="out", session=sid, timeout=60)
                frames.extend(ev["frames"])
                await c.send({"op": "ack", "session": sid, "seq": frames[-1][0]})
    assert_contiguous(frames)
    assert data_of(frames) == b"y" * total
    assert frames[-1][2]["result"] == "done"
    # Space is back once the acked history is trimmed (checked every second):
    # new work is accepted again, after a wait in the queue at most.
    async with connect(srv.url) as c:
        r = await c.ok("execute", code="def main():\n    return 1\n", queue=15)
        assert (await c.frames(r["session"]))[-1][2]["result"] == 1


async def test_disk_floor_refuses_new_executes_and_running_ones_keep_every_byte(small_disk, make_server):
    # A 24 MiB disk with a 16 MiB floor: the function's 12 MiB of output takes
    # the free space below the floor while it runs.
    srv = make_server("--pool", "0", "--disk-floor", "16M", data_dir=small_disk)
    total = 12 * MiB
    code = (
        "import sys\n"
        f"def main():\n    chunk = b'z' * 65536\n    for _ in range({total // 65536}):\n"
        "        sys.stdout.buffer.write(chunk)\n        sys.stdout.flush()\n"
        "    api.recv()\n    return 'done'\n"
    )
    async with connect(srv.url) as c:
        r = await c.ok("execute", code=code, attach=False)
        tok, sid = r["token"], r["session"]
        with trio.fail_after(60):
            while (await c.ok("status", token=tok))["buffer_bytes"] < total:
                await trio.sleep(0.2)
        refused = await c.request("execute", code="def main():\n    return 1\n")
        assert not refused["ok"]
        err = refused["error"]
        assert err["code"] == "busy" and err["busy"] == "disk" and "floor" in err["message"], err
        await c.ok("attach", token=tok)
        await c.send({"op": "input", "session": sid, "seq": 1, "data": "go"})
        frames = await c.frames(sid, timeout=60)
        assert_contiguous(frames)
        assert data_of(frames) == b"z" * total and frames[-1][2]["result"] == "done"
        await c.send({"op": "ack", "session": sid, "seq": frames[-1][0]})
        # Acked output stays readable as history until the keep period; destroying
        # the session frees its space, and the floor lets executes in again.
        await c.ok("destroy", token=tok)
        with trio.fail_after(30):
            while not (r := await c.request("execute", code="def main():\n    return 1\n"))["ok"]:
                await trio.sleep(0.2)
        assert (await c.frames(r["session"]))[-1][2]["result"] == 1
