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

from bento import protocol
from bento.cluster import connect as redis_connect
from bento.cluster import keys, lost

FEW_THEN_WAIT = '''
import time
def main(n):
    for i in range(n):
        api.send(i)
    time.sleep(600)
'''

NODE_TIMEOUT_S = 4  # --node-timeout: the heartbeat's expiry (10 s by default)
LOST_WITHIN_S = 10  # that expiry, plus a sweep, with room: the default timeout could not make it

IDLE = '''
import time
def main():
    api.send("ready")
    time.sleep(600)
'''


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def on(url: str, node: str) -> tuple[str, ...]:
    """A server's arguments for node ``node`` of the cluster on the Redis at ``url``."""
    return ("--cluster", url, "--node", node, "--node-timeout", f"{NODE_TIMEOUT_S}s")


def two_nodes(tmp_path, url: str, name: str) -> tuple[ServerProcess, ServerProcess]:
    """The node a test stops (``<name>-n``, data in tmp_path/n) and another (``<name>-o``)."""
    node = ServerProcess(str(tmp_path / "n"), *on(url, f"{name}-n")).start()
    try:
        return node, ServerProcess(str(tmp_path / "o"), *on(url, f"{name}-o")).start()
    except BaseException:
        node.stop()
        raise


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
    node, other = two_nodes(tmp_path, redis_server.url, name)
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
        node = ServerProcess(str(tmp_path / "n"), *on(redis_server.url, f"{name}-n")).start()
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
    node, other = two_nodes(tmp_path, redis_server.url, "frozen")
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


async def freeze_past_verdict(node: ServerProcess, other: ServerProcess, r: dict) -> dict:
    """SIGSTOP the node's server until the other node ends the session lost,
    then SIGCONT; the session's status then, from the other node."""
    async with connect(other.url) as co:
        await co.ok("attach", token=r["viewer_token"], **{"from": 1})
        await co.frames(r["session"], until_exit=False, count=5, timeout=30)
        assert node.proc is not None
        node.proc.send_signal(signal.SIGSTOP)
        try:
            return await wait_status(co, r["token"], lambda st: st["state"] == "lost", timeout=LOST_WITHIN_S)
        finally:
            node.proc.send_signal(signal.SIGCONT)


async def test_nothing_past_the_exit_for_a_reader_from_next_seq(redis_server, tmp_path):
    """The woken node's last batch lands in the stream past the exit frame; a
    reader that attaches at next_seq (past the exit) gets none of it, on either node."""
    node, other = two_nodes(tmp_path, redis_server.url, "next")
    try:
        async with connect(node.url) as c:
            r = await c.ok("execute", code=TICKS, attach=False)
        st = await freeze_past_verdict(node, other, r)
        async with connect(node.url) as c:
            await wait_status(c, r["token"], lambda st: st["state"] == "lost", timeout=15)
        for url in (other.url, node.url):
            async with connect(url) as c:
                await c.ok("attach", token=r["viewer_token"], **{"from": st["next_seq"]})
                with trio.move_on_after(2):
                    got = await c.frames(r["session"], until_exit=False, count=1)
                    raise AssertionError(f"{url}: frames after the exit frame: {got}")
    finally:
        node.stop()
        other.stop()


async def test_a_reader_attached_to_the_node_itself_ends_at_the_clusters_end(redis_server, tmp_path):
    """A client attached to the node before it froze: it goes on from the
    cluster's copy to the cluster's exit frame, or, when it had read past that
    end before the node learned of it, is told so (internal) and attaches again."""
    node, other = two_nodes(tmp_path, redis_server.url, "local")
    try:
        async with connect(node.url) as local:
            r = await local.ok("execute", code=TICKS, attach=True)
            st = await freeze_past_verdict(node, other, r)
            end_seq = st["next_seq"] - 1
            seen: list[list] = []
            with trio.fail_after(20):
                while not (seen and seen[-1][1] == "exit"):
                    ev = await local.event(session=r["session"])
                    if ev["ev"] == "error":
                        assert ev["error"]["code"] == "internal" and f"seq {end_seq}" in ev["error"]["message"]
                        assert seen and seen[-1][0] >= end_seq, (seen[-3:], ev)
                        await local.ok("attach", token=r["token"], **{"from": end_seq})
                        seen = seen[: end_seq - 1]
                    elif ev["ev"] == "out":
                        seen += ev["frames"]
        assert seen[-1] == [end_seq, "exit", st["exit"]], (seen[-1], st["exit"])
        assert [f[0] for f in seen] == list(range(1, end_seq + 1))
    finally:
        node.stop()
        other.stop()


async def test_an_idempotent_retry_on_the_node_reads_the_clusters_end(redis_server, tmp_path):
    """A client cut off with the node retries its execute (same idempotency key)
    once the node answers again: it reads the cluster's end, not what the node ran past it."""
    node, other = two_nodes(tmp_path, redis_server.url, "idem")
    try:
        async with connect(node.url) as c:
            r = await c.ok("execute", code=TICKS, attach=False, idempotency_key="job-1")
        st = await freeze_past_verdict(node, other, r)
        async with connect(node.url) as c:
            await wait_status(c, r["token"], lambda st: st["state"] == "lost", timeout=15)
            again = await c.ok("execute", code=TICKS, attach=True, idempotency_key="job-1")
            assert again["session"] == r["session"]
            seen = await c.frames(r["session"], timeout=30)
        assert seen[-1] == [st["next_seq"] - 1, "exit", st["exit"]]
    finally:
        node.stop()
        other.stop()


class _Sweeper:
    """What lost.end_lost needs of a cluster: its Redis client."""

    def __init__(self, redis) -> None:
        self.redis = redis


async def sweep(redis, node: str, sid: str) -> None:
    """End ``sid`` lost as a sweeper would: again at its next sweep while the
    node's mirror is still writing (a snapshot that lands between the sweeper's
    read and its script makes it end nothing, and say so)."""
    with trio.fail_after(10):
        while not await lost.end_lost(_Sweeper(redis), node, sid):
            await trio.sleep(0.2)


async def test_a_second_death_does_not_move_the_end(redis_server, tmp_path):
    """Frozen past the verdict, the node's last batch overwrote 'snap'; restarted,
    it enters the session into its set again; dead once more, its session keeps
    the first end: one exit frame, the same 'lost'."""
    node, other = two_nodes(tmp_path, redis_server.url, "twice")
    redis = coredis.Redis.from_url(redis_server.url, decode_responses=False)
    try:
        async with redis:
            async with connect(node.url) as c:
                r = await c.ok("execute", code=TICKS, attach=False)
            await freeze_past_verdict(node, other, r)
            async with connect(node.url) as c:
                await wait_status(c, r["token"], lambda st: st["state"] == "lost", timeout=15)
            meta = keys.meta(r["session"])
            first = await redis.hget(meta, "lost")
            # (What this test is about: the node's last batch overwrote 'snap'.)
            assert protocol.decode(await redis.hget(meta, "snap"))["state"] == "running"
            node.stop()
            node = ServerProcess(str(tmp_path / "n"), *on(redis_server.url, "twice-n")).start()
            async with connect(node.url) as c:
                await wait_status(c, r["token"], lambda st: st["state"] == "lost", timeout=15)
            node.kill(signal.SIGKILL)
            deadline = time.monotonic() + LOST_WITHIN_S  # past the expiry and a sweep
            while await redis.hget(meta, "lost") == first and time.monotonic() < deadline:
                await trio.sleep(0.5)
            exits = [e.identifier for e in await redis.xrange(keys.out(r["session"]))
                     if protocol.is_exit_frame(e.field_values[b"f"])]
            assert await redis.hget(meta, "lost") == first and len(exits) == 1, exits
    finally:
        node.stop()
        other.stop()


async def test_an_idle_session_ended_after_the_node_came_back(redis_server, tmp_path):
    """The sweeper ends a node's sessions one by one; the node may be back, and
    done with its own check, before one of them is ended. The counter the
    sweeper moves tells it at its next heartbeat, though the session writes nothing."""
    node = ServerProcess(str(tmp_path / "n"), *on(redis_server.url, "idle-n")).start()
    redis = redis_connect.client(redis_server.url)
    try:
        async with redis:
            async with connect(node.url) as c:
                r = await c.ok("execute", code=IDLE, attach=True)
                await c.frames(r["session"], until_exit=False, count=1)
            pids = node.exchange_pids()
            assert node.proc is not None
            node.proc.send_signal(signal.SIGSTOP)
            await trio.sleep(NODE_TIMEOUT_S + 1)  # its heartbeat expires; no other node sweeps
            node.proc.send_signal(signal.SIGCONT)
            with trio.fail_after(10):
                while not await redis.exists([keys.node("idle-n")]):
                    await trio.sleep(0.1)
            await trio.sleep(1)  # its own check after the lapse has run: nothing ended yet
            await sweep(redis, "idle-n", r["session"])  # the sweeper, late
            async with connect(node.url) as c:
                await wait_status(c, r["token"], lambda st: st["state"] == "lost", timeout=8)
            deadline = time.monotonic() + 10
            while any(alive(p) for p in pids):
                assert time.monotonic() < deadline, "the function still runs"
                await trio.sleep(0.1)
    finally:
        node.stop()


async def test_removal_while_redis_is_down_keeps_the_node_up(volatile_redis, tmp_path):
    """A session the cluster ended, destroyed on its node while Redis is down:
    the node stays up, and removes the session's keys once Redis is back."""
    node = ServerProcess(str(tmp_path / "n"), *on(volatile_redis.url, "down-n")).start()
    redis = redis_connect.client(volatile_redis.url)
    try:
        async with redis:
            async with connect(node.url) as c:
                r = await c.ok("execute", code=IDLE, attach=False)
                await wait_status(c, r["token"], lambda st: st["state"] == "running")
                await sweep(redis, "down-n", r["session"])
                await wait_status(c, r["token"], lambda st: st["state"] == "lost", timeout=8)
        volatile_redis.stop()
        async with connect(node.url) as c:
            await c.ok("destroy", token=r["token"])
        await trio.sleep(3)  # the mirror's removal of the keys fails meanwhile, and is retried
        assert node.proc is not None and node.proc.poll() is None, node.read_log()[-2000:]
        log = node.read_log()
        assert "cannot remove its keys from Redis" in log
        # Its end in the log is the cluster's too (the node's own exchange was killed).
        assert f'session.ended session={r["session"]} state=lost why="destroyed by owner"' in log
        assert not os.path.exists(os.path.join(node.data_dir, "sessions", r["session"]))
    finally:
        node.stop()


async def test_a_node_frozen_past_the_verdict_on_a_redis_cluster(redis_cluster, tmp_path):
    """The frozen node on a Redis Cluster (3 masters): its first write after
    waking is refused there too, and it takes the cluster's end."""
    node, other = two_nodes(tmp_path, redis_cluster.url, "rc")
    try:
        async with connect(node.url) as c:
            r = await c.ok("execute", code=TICKS, attach=False)
        pids = node.exchange_pids()
        await freeze_past_verdict(node, other, r)
        deadline = time.monotonic() + 10
        while any(alive(p) for p in pids):
            assert time.monotonic() < deadline, "the function still runs"
            await trio.sleep(0.1)
        assert node.proc is not None and node.proc.poll() is None, node.read_log()[-2000:]
        await same_on_both([node.url, other.url], r["token"])
    finally:
        node.stop()
        other.stop()


async def test_the_shared_state_stays_as_the_cluster_has_it(redis_server, tmp_path):
    """After the cluster's end no node takes a state_put (its mirror writes
    nothing more, so the other nodes would never see it): ``gone``, on both."""
    node, other = two_nodes(tmp_path, redis_server.url, "state")
    redis = redis_connect.client(redis_server.url)
    try:
        async with redis, connect(node.url) as c:
            r = await c.ok("execute", code=IDLE, attach=False)
            await wait_status(c, r["token"], lambda st: st["state"] == "running")
            await c.ok("state_put", token=r["token"], value="before")
            await sweep(redis, "state-n", r["session"])
            await wait_status(c, r["token"], lambda st: st["state"] == "lost", timeout=8)
            for url in (node.url, other.url):
                async with connect(url) as c2:
                    err = (await c2.request("state_put", token=r["token"], value="after"))["error"]
                    assert err["code"] == "gone" and "shared state stays" in err["message"], (url, err)
                    assert (await c2.ok("state_get", token=r["token"]))["value"] == "before"
    finally:
        node.stop()
        other.stop()
