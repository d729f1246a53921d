"""A node that comes back after the cluster took it for dead: the cluster's
verdict (its sessions ended ``lost``, ``NodeLost``) stands on every node, the
returning one included: the same frames, the same exit, no function left running."""

from __future__ import annotations

import os
import signal
import time

import coredis
import pytest
import trio
from helpers import TICKS, ServerProcess, connect, wait_status

FEW_THEN_WAIT = '''
import time
def main(n):
    for i in range(n):
        api.send(i)
    time.sleep(600)
'''

LOST_WITHIN_S = 20  # the heartbeat's expiry (10 s) plus a sweep, with room


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def start_elsewhere(runs_url: str, reader, n: int) -> dict:
    async with connect(runs_url) as c:
        r = await c.ok("execute", code=FEW_THEN_WAIT, args=[n], attach=False)
    await reader.ok("attach", token=r["token"], **{"from": 1})
    await reader.frames(r["session"], until_exit=False, count=n, timeout=30)
    return r


async def read_all(url: str, token: str) -> list[list]:
    async with connect(url) as c:
        await c.ok("attach", token=token, **{"from": 1})
        return await c.frames((await c.ok("status", token=token))["session"], timeout=30)


async def same_on_both(urls: list[str], token: str) -> list[list]:
    """Every node shows the same frames and the same end, by attach and by status."""
    seen = [await read_all(u, token) for u in urls]
    assert seen[0] == seen[1], seen
    end = seen[0][-1]
    assert end[1] == "exit" and end[2]["state"] == "lost" and end[2]["error"]["type"] == "NodeLost", end
    for u in urls:
        async with connect(u) as c:
            st = await c.ok("status", token=token)
        assert st["state"] == "lost" and st["exit"] == end[2] and st["next_seq"] == end[0] + 1, (u, st)
    return seen[0]


@pytest.mark.parametrize("machine", [True, False], ids=["machine-dies", "server-only"])
async def test_a_node_back_after_the_verdict_takes_it(redis_server, tmp_path, machine):
    """The cluster ends a session lost when its node stops (the whole machine:
    the server and its exchanges; or the server only, its function running on),
    then the node starts again on the same data dir. The cluster's end stands
    there too, and the node ends the function rather than run on what every
    other node calls lost."""
    name = "back-machine" if machine else "back-server"
    args = ("--cluster", redis_server.url, "--node", name)
    node = ServerProcess(str(tmp_path / name), *args).start()
    other = ServerProcess(str(tmp_path / "other"), "--cluster", redis_server.url, "--node", f"o-{name}").start()
    try:
        async with connect(other.url) as co:
            r = await start_elsewhere(node.url, co, 20)
            pids = node.exchange_pids()
            node.kill(signal.SIGKILL)
            for pid in pids if machine else ():
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            await wait_status(co, r["token"], lambda st: st["state"] == "lost", timeout=LOST_WITHIN_S)
        if not machine:
            assert any(alive(p) for p in pids), "the exchange should have outlived its server"
        node = ServerProcess(str(tmp_path / name), *args).start()
        seen = await same_on_both([node.url, other.url], r["token"])
        assert [f[2] for f in seen[:-1]] == list(range(20))
        deadline = time.monotonic() + 10
        while any(alive(p) for p in pids):
            assert time.monotonic() < deadline, "the function still runs on the returning node"
            await trio.sleep(0.1)
        # And it stays so: the returning node's mirror does not move Redis's copy on.
        await trio.sleep(1)
        assert await same_on_both([node.url, other.url], r["token"]) == seen
        redis = coredis.Redis.from_url(redis_server.url, decode_responses=False)
        async with redis:
            assert await redis.xlen(f"bento:{{{r['session']}}}:out") == 21  # 20 values, one exit
    finally:
        node.stop()
        other.stop()


async def test_a_node_that_was_frozen_past_the_verdict_takes_it(redis_server, tmp_path):
    """The node's server stops answering (SIGSTOP) while its function goes on
    printing; the cluster ends the session lost; the server wakes up with output
    Redis never had. The cluster's end stands there too, and nothing of what the
    node ran after it reaches a reader."""
    node = ServerProcess(str(tmp_path / "frozen"), "--cluster", redis_server.url, "--node", "frozen").start()
    other = ServerProcess(str(tmp_path / "other"), "--cluster", redis_server.url, "--node", "o-frozen").start()
    try:
        async with connect(node.url) as c:
            r = await c.ok("execute", code=TICKS, attach=False)
        pids = node.exchange_pids()
        async with connect(other.url) as co:
            await co.ok("attach", token=r["viewer_token"], **{"from": 1})
            await co.frames(r["session"], until_exit=False, count=5, timeout=30)
            assert node.proc is not None
            node.proc.send_signal(signal.SIGSTOP)
            try:
                st = await wait_status(co, r["token"], lambda st: st["state"] == "lost", timeout=LOST_WITHIN_S)
            finally:
                node.proc.send_signal(signal.SIGCONT)
        end_seq = st["next_seq"] - 1
        deadline = time.monotonic() + 10
        while any(alive(p) for p in pids):
            assert time.monotonic() < deadline, "the function still runs on the node the cluster called lost"
            await trio.sleep(0.1)
        # The node may have written one more batch into Redis before it learned
        # of the end: no reader gets it, on either node.
        seen = await same_on_both([node.url, other.url], r["token"])
        assert seen[-1][0] == end_seq
        assert [f[2] for f in seen[:-1]] == list(range(end_seq - 1))
        await trio.sleep(1)
        assert await same_on_both([node.url, other.url], r["token"]) == seen
    finally:
        node.stop()
        other.stop()
