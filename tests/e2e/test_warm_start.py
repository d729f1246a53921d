"""A warm environment's function starts while its exchange wakes: when the
session's limits are those the environment put on while it waited (a session
that asks for none), the server sends the driver its start itself
(bento/launch.py, send_start). Seen from outside: with the warm exchange
stopped (SIGSTOP), such a function still starts; a session that asks for
other limits does not start before its exchange has put them on, and each
function runs under its own session's limits."""

from __future__ import annotations

import glob
import os
import shutil
import signal

import pytest
import trio
from helpers import ServerProcess, conn, wait_exit

MARK = '''
import resource
def main():
    open("started", "w").close()
    return list(resource.getrlimit(resource.RLIMIT_FSIZE))
'''
WARM_FSIZE = 1_000_000  # the server's default file_bytes: what a warm environment puts on


def warm_exchanges(data: str) -> list[int]:
    """The pids of the warm exchanges whose environment is up (env.pid written)."""
    pids = []
    for d in glob.glob(os.path.join(data, "warm", "warm-*")):
        try:
            with open(os.path.join(d, "exchange.pid")) as f:
                pid = int(f.read())
            if os.path.exists(os.path.join(d, "env.pid")):
                pids.append(pid)
        except (OSError, ValueError):
            continue
    return pids


def started(data: str) -> bool:
    return bool(glob.glob(os.path.join(data, "sessions", "s_*", "work", "started")))


async def one_stopped_warm(data: str) -> int:
    """Wait for the pool's one warm exchange, and stop it (SIGSTOP)."""
    with trio.fail_after(20):
        while len(warm_exchanges(data)) != 1:
            await trio.sleep(0.05)
    [pid] = warm_exchanges(data)
    os.kill(pid, signal.SIGSTOP)
    return pid


async def execute_killing_the_warm_exchange(c, data: str, begun, **fields) -> dict:
    """Execute with the pool's warm exchange stopped; once ``begun()`` returns,
    kill that exchange (SIGKILL); the session's status at its exit."""
    pid = await one_stopped_warm(data)
    replies: list[dict] = []

    async def execute() -> None:
        replies.append(await c.ok("execute", attach=False, **fields))

    async with trio.open_nursery() as n:
        n.start_soon(execute)
        await begun()
        os.kill(pid, signal.SIGKILL)
    return await wait_exit(c, replies[0]["token"])


@pytest.mark.parametrize("sandbox", ["none", pytest.param("bwrap", marks=pytest.mark.skipif(
    shutil.which("bwrap") is None, reason="bubblewrap (bwrap) is not installed"))])
async def test_the_function_starts_before_its_warm_exchange_wakes_only_under_its_own_limits(tmp_path, sandbox):
    # Unsandboxed, never: should the exchange then fail, the cold start would run it twice on the host.
    data = str(tmp_path / "data")
    srv = ServerProcess(data, "--sandbox", sandbox, "--pool", "1", "--pool-max", "1",
                        "--default-limit", f"file_bytes={WARM_FSIZE}").start()
    try:
        async with conn(srv.url) as c:
            for limits, fsize, early in (({}, WARM_FSIZE, sandbox == "bwrap"), ({"file_bytes": 5000}, 5000, False)):
                pid = await one_stopped_warm(data)
                replies: list[dict] = []

                async def execute(limits: dict = limits, replies: list = replies) -> None:
                    replies.append(await c.ok("execute", code=MARK, limits=limits, attach=False))

                async with trio.open_nursery() as n:
                    n.start_soon(execute)
                    with trio.move_on_after(10 if early else 1.5):
                        while not started(data):
                            await trio.sleep(0.02)
                    assert started(data) is early, (limits, "did the function start while its exchange was stopped?")
                    assert not replies  # (the reply waits for the exchange's hello)
                    os.kill(pid, signal.SIGCONT)
                st = await wait_exit(c, replies[0]["token"])
                assert st["exit"]["result"] == [fsize, fsize], st
                await c.ok("destroy", token=replies[0]["token"])
    finally:
        srv.stop()


RUNS = '''
def main():
    with open("runs.txt", "a") as f:
        f.write("ran\\n")
    with open("runs.txt") as f:
        return f.read()
'''


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap (bwrap) is not installed")
async def test_a_start_whose_warm_exchange_dies_is_not_seen_twice(tmp_path):
    """The server sent the start, then the warm exchange died before its hello:
    the session starts cold, and it sees one run of its function (the first
    environment died with its exchange and took its home along)."""
    data = str(tmp_path / "data")
    srv = ServerProcess(data, "--sandbox", "bwrap", "--pool", "1", "--pool-max", "1").start()
    try:
        async with conn(srv.url) as c:

            async def begun() -> None:
                with trio.fail_after(10):
                    while not glob.glob(os.path.join(data, "sessions", "s_*", "work", "runs.txt")):
                        await trio.sleep(0.02)

            st = await execute_killing_the_warm_exchange(c, data, begun, code=RUNS)
            assert st["exit"]["result"] == "ran\n", st
    finally:
        srv.stop()


COUNTS = '''
def main(path):
    with open(path, "a") as f:
        f.write("ran\\n")
'''


async def test_unsandboxed_a_warm_exchange_that_dies_leaves_one_run_on_the_host(tmp_path):
    """Without a sandbox nothing hides a run: the warm exchange stops, then dies,
    and the session starts cold; the function has run once on the host."""
    data = str(tmp_path / "data")
    ran = tmp_path / "ran.txt"
    srv = ServerProcess(data, "--sandbox", "none", "--pool", "1", "--pool-max", "1").start()
    try:
        async with conn(srv.url) as c:
            # (By then the server has sent its assign.)
            await execute_killing_the_warm_exchange(c, data, lambda: trio.sleep(0.5), code=COUNTS, args=[str(ran)])
        assert ran.read_text() == "ran\n"
    finally:
        srv.stop()


WAITS_FOR_GO = """
import os, time
def main():
    for _ in range(2000):
        if os.path.exists("go"):
            return "ran"
        time.sleep(0.01)
"""


async def test_a_warm_exchange_takes_a_small_meta_from_its_assign_and_a_large_one_from_its_directory(tmp_path):
    """The ``assign`` brings the session's meta.cbor when it is small (the warm
    exchange need not read the file on the way to the first output); a larger
    one the exchange reads from the directory. Seen from outside: with the
    warm exchange stopped, its session's meta.cbor is spoiled on disk before
    it wakes; a session with a small meta still runs on that warm exchange,
    one with a large meta finds the spoiled file, and its session starts cold
    (in a fresh directory, with its meta written again) and runs all the same."""
    from bento.warm import INLINE_META_MAX

    data = str(tmp_path / "data")
    srv = ServerProcess(data, "--sandbox", "none", "--pool", "1", "--pool-max", "1").start()
    try:
        async with conn(srv.url) as c:
            for pad, on_warm in ((0, True), (INLINE_META_MAX, False)):
                pid = await one_stopped_warm(data)
                replies: list[dict] = []

                async def execute(pad: int = pad, replies: list = replies) -> None:
                    replies.append(await c.ok("execute", code=f"# {'x' * pad}\n{WAITS_FOR_GO}", attach=False))

                async with trio.open_nursery() as n:
                    n.start_soon(execute)
                    with trio.fail_after(10):
                        while not (metas := glob.glob(os.path.join(data, "sessions", "s_*", "meta.cbor"))):
                            await trio.sleep(0.02)
                    [meta] = metas
                    with open(meta + ".spoilt", "wb") as f:
                        f.write(b"\xff")
                    os.replace(meta + ".spoilt", meta)
                    os.kill(pid, signal.SIGCONT)
                sdir = os.path.join(data, "sessions", replies[0]["session"])
                with open(os.path.join(sdir, "exchange.pid")) as f:  # (its function waits for "go")
                    assert (int(f.read()) == pid) is on_warm, pad
                open(os.path.join(sdir, "work", "go"), "w").close()
                st = await wait_exit(c, replies[0]["token"])
                assert st["exit"]["result"] == "ran", (pad, st)
                await c.ok("destroy", token=replies[0]["token"])
    finally:
        srv.stop()
