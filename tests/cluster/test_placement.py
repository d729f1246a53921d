"""Placement on a real redis-server: a full node hands an execute to another
live node, the whole cluster full answers busy, and an idempotency key still
starts one session. Two nodes with --max-sessions 1 each."""

from __future__ import annotations

import time
import urllib.request

import coredis
import pytest
import trio
from helpers import ServerProcess, connect, wait_status

from bento import protocol

DOUBLE = '''
def main():
    got = []
    try:
        while True:
            got.append(api.recv())
            api.send(got[-1] * 2)
    except EOFError:
        return got
'''

WAIT = "import time\ndef main():\n    time.sleep(120)\n"
QUICK = "def main():\n    return 7\n"
QUEUED_ID = 10_000  # a request id the helper's own numbering does not reach


@pytest.fixture(scope="module")
def full_nodes(redis_server, tmp_path_factory):
    """Nodes ``pa`` and ``pb``, each running at most one function."""
    started = []
    for name in ("pa", "pb"):
        data = str(tmp_path_factory.mktemp(f"node-{name}") / "data")
        started.append(ServerProcess(data, "--cluster", redis_server.url, "--node", name,
                                     "--max-sessions", "1", "--pool", "0").start())
    yield started
    for srv in started:
        srv.stop()


async def wait_running(url: str, want: dict[str, int], timeout: float = 15) -> None:
    """Until the nodes' heartbeats say they run these numbers of functions
    (a heartbeat is renewed every 2 s)."""
    redis = coredis.Redis.from_url(url, decode_responses=False)
    seen: dict = {}
    async with redis:
        with trio.fail_after(timeout):
            while True:
                for name in want:
                    raw = await redis.get(f"bento:node:{name}")
                    seen[name] = protocol.decode(raw).get("capacity") if raw else None
                if all(seen[n] is not None and seen[n]["running"] == k for n, k in want.items()):
                    return
                await trio.sleep(0.1)


async def test_full_node_hands_the_execute_to_the_other_node(full_nodes, redis_server):
    a, b = full_nodes
    await wait_running(redis_server.url, {"pa": 0, "pb": 0})
    async with connect(a.url) as ca:
        t0 = time.monotonic()
        here = await ca.ok("execute", code=WAIT, attach=False)
        local = time.monotonic() - t0
        t0 = time.monotonic()
        r = await ca.ok("execute", code=DOUBLE)  # attached, through A
        took = time.monotonic() - t0
        sid = r["session"]
        st = await ca.ok("status", token=r["viewer_token"])
        assert st["node"] == "pb", st
        for seq in range(1, 6):
            await ca.send({"op": "input", "session": sid, "seq": seq, "data": seq})
            assert (await ca.event(ev="in_ack", session=sid))["seq"] == seq
        await ca.send({"op": "input", "session": sid, "seq": 5, "data": 5})  # a re-sent input: not again
        assert (await ca.event(ev="in_ack", session=sid))["seq"] == 5
        await ca.send({"op": "input", "session": sid, "seq": 6, "eof": True})
        await ca.event(ev="in_ack", session=sid)
        frames = await ca.frames(sid, timeout=30)
        await ca.ok("destroy", token=here["token"])
    print(f"\nexecute reply: {local * 1000:.0f} ms run locally, {took * 1000:.0f} ms handed from a full "
          "node to another")
    assert [f[2] for f in frames if f[1] == "msg"] == [2, 4, 6, 8, 10]
    assert frames[-1][1] == "exit" and frames[-1][2]["result"] == [1, 2, 3, 4, 5]
    async with connect(b.url) as cb:  # B runs it: its own status has no node
        assert "node" not in await cb.ok("status", token=r["token"])
    metrics = await trio.to_thread.run_sync(scrape, a.port)
    assert 'bento_executes_handed_on_total{node="pb"} 1.0' in metrics


async def test_whole_cluster_full_is_busy_and_queue_waits_on_the_node_reached(full_nodes, redis_server):
    a, b = full_nodes
    await wait_running(redis_server.url, {"pa": 0, "pb": 0})
    async with connect(a.url) as ca, connect(b.url) as cb:
        on_a = await ca.ok("execute", code=WAIT, attach=False)
        on_b = await cb.ok("execute", code=WAIT, attach=False)
        await wait_running(redis_server.url, {"pa": 1, "pb": 1})
        t0 = time.monotonic()
        busy = await ca.request("execute", code=QUICK, attach=False)
        took = time.monotonic() - t0
        err = busy["error"]
        assert err["code"] == "busy" and err["busy"] == "sessions" and err["retry_after"] == 1.0, err
        assert "no other live node has room" in err["message"], err
        # Queued on A: it runs on A once A's function ends.
        await ca.send({"op": "execute", "id": QUEUED_ID, "code": QUICK, "attach": False, "queue": 20})
        assert (await ca.event(ev="queued", id=QUEUED_ID))["position"] == 1
        await ca.ok("destroy", token=on_a["token"])
        with trio.fail_after(20):
            while QUEUED_ID not in ca.replies:
                await ca._read_one()
        queued = ca.replies.pop(QUEUED_ID)
        assert queued["ok"], queued
        st = await wait_status(ca, queued["token"], lambda st: st["state"] == "exited")
        assert "node" not in st  # ran on A, the node it reached
        await cb.ok("destroy", token=on_b["token"])
    print(f"\nbusy from a full cluster in {took * 1000:.0f} ms")


async def test_handed_on_execute_retried_with_its_key_starts_nothing_new(full_nodes, redis_server):
    a, b = full_nodes
    await wait_running(redis_server.url, {"pa": 0, "pb": 0})
    redis = coredis.Redis.from_url(redis_server.url, decode_responses=False)
    async with connect(a.url) as ca, connect(b.url) as cb, redis:
        here = await ca.ok("execute", code=WAIT, attach=False)
        before = await redis.smembers("bento:node:pb:sessions")
        first = await ca.ok("execute", code=WAIT, idempotency_key="placed-1", attach=False)
        again = await ca.ok("execute", code=WAIT, idempotency_key="placed-1", attach=False)
        on_b = await cb.ok("execute", code=WAIT, idempotency_key="placed-1", attach=False)
        after = await redis.smembers("bento:node:pb:sessions")
        same = ("session", "token", "viewer_token")
        assert {k: again[k] for k in same} == {k: first[k] for k in same}
        assert {k: on_b[k] for k in same} == {k: first[k] for k in same}
        assert after - before == {first["session"].encode()}
        assert (await ca.ok("status", token=first["token"]))["node"] == "pb"
        await ca.ok("destroy", token=first["token"])
        await ca.ok("destroy", token=here["token"])


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()
