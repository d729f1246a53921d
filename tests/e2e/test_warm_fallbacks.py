"""End-to-end: an execute that takes a warm exchange still gets its session when
the warm path fails on the way, started cold, with nothing of the warm one in it.

Two ways it fails: the warm exchange's directory cannot be renamed into
``sessions/`` (another file system), and the warm exchange is alive but does
not answer its ``assign`` (stopped here with SIGSTOP: it must be killed, for
it holds the directory's lock).
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time

import pytest
from helpers import ServerProcess, conn, proc_entry, warm_pids
from test_forked import FORKED
from test_warm_home import warm_ready

CODE = "import os\ndef main():\n    print('ran')\n    return sorted(os.listdir('.'))\n"


async def until_warm(srv: ServerProcess) -> list[int]:
    """Until the pool counts a warm environment as ready: its exchange's pid."""
    await warm_ready(srv.port)
    pids = warm_pids(srv.data_dir, "exchange.pid")
    assert len(pids) == 1, pids
    return pids


async def run_one(url: str) -> tuple[dict, bytes]:
    async with conn(url) as c:
        r = await c.ok("execute", code=CODE)
        frames = await c.frames(r["session"], timeout=60)
    out = b"".join(f[2] for f in frames if f[1] == "stdout")
    return frames[-1][2], out


async def test_a_warm_directory_that_cannot_be_renamed_gives_a_cold_session(tmp_path):
    # sessions/ on tmpfs, warm/ on the data dir's disk: the rename fails with EXDEV.
    if os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("/dev/shm is on the same file system as the test's directory")
    data = tmp_path / "data"
    data.mkdir()
    elsewhere = tempfile.mkdtemp(dir="/dev/shm", prefix="bento-test-sessions-")
    os.symlink(elsewhere, data / "sessions")
    srv = ServerProcess(str(data), "--sandbox", "none", "--pool", "1", "--log-level", "INFO").start()
    try:
        await until_warm(srv)
        ex, out = await run_one(srv.url)
        log = srv.read_log()
    finally:
        srv.stop()
        shutil.rmtree(elsewhere, ignore_errors=True)
    assert ex["state"] == "exited" and out == b"ran\n", (ex, out)
    assert ex["result"] == [], ex  # a fresh work dir: nothing of the warm one's
    assert "cannot take a warm exchange's directory, starting cold" in log, log[-2000:]
    assert "Traceback" not in log, log[-2000:]


@pytest.mark.deadline(120)
async def test_a_warm_exchange_that_does_not_answer_its_assign_is_killed_and_the_session_starts_cold(tmp_path):
    data = str(tmp_path / "data")
    srv = ServerProcess(data, "--sandbox", "none", "--pool", "1", "--log-level", "INFO").start()
    try:
        stopped = (await until_warm(srv))[0]
        os.kill(stopped, signal.SIGSTOP)  # alive, holding its lock, answering nothing
        began = time.monotonic()
        ex, out = await run_one(srv.url)
        took = time.monotonic() - began
        entry = proc_entry(stopped)
        log = srv.read_log()
    finally:
        srv.stop()
    assert ex["state"] == "exited" and out == b"ran\n", (ex, out)
    assert ex["result"] == [], ex
    assert took >= 5, took  # it waited for the warm one's answer first (bounded)
    assert entry is None or entry.state == "Z", entry  # killed, not left stopped with the session's lock
    assert "Traceback" not in log, log[-2000:]


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap (bwrap) is not installed")
async def test_the_cold_start_after_a_warm_exchange_failed_is_forked_too(tmp_path):
    srv = ServerProcess(str(tmp_path / "data"), "--sandbox", "bwrap", "--pool", "1", "--log-level", "INFO").start()
    try:
        os.kill((await until_warm(srv))[0], signal.SIGSTOP)
        async with conn(srv.url) as c:
            ex = await c.exit_of(FORKED)
    finally:
        srv.stop()
    assert ex["state"] == "exited" and ex["result"] is True, ex
