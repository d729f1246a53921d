"""Requests between nodes on a node's control stream (bento/cluster/control.py)."""

from __future__ import annotations

import secrets

import coredis
import trio
from helpers import connect

from bento import protocol
from bento.cluster import keys

COUNT_INTS = '''
import signal, time
def main():
    got = []
    signal.signal(signal.SIGINT, lambda *_: got.append(1))
    api.send("ready")
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        time.sleep(0.05)
    return len(got)
'''


async def test_a_request_added_twice_is_carried_out_once(nodes, redis_server):
    """An XADD that coredis retried after its connection was lost (Redis had
    taken it) puts the same request, with the same reply key, on the stream
    twice: the running node carries it out, and answers, once."""
    a, _ = nodes
    async with connect(a.url) as ca:
        r = await ca.ok("execute", code=COUNT_INTS)
        assert (await ca.event(ev="out", session=r["session"]))["frames"][0][2] == "ready"
        rid = secrets.token_hex(12)
        fields = {"sid": r["session"], "rid": rid, "req": protocol.encode({"op": "signal", "signal": "INT"})}
        redis = coredis.Redis.from_url(redis_server.url)
        async with redis:
            for _ in range(2):
                await redis.xadd(keys.control("a"), fields)
            frames = await ca.frames(r["session"])
            with trio.fail_after(5):
                while await redis.llen(keys.reply(rid)) == 0:
                    await trio.sleep(0.02)
            await trio.sleep(0.2)  # a second answer would be there by now
            answers = await redis.lrange(keys.reply(rid), 0, -1)
    assert frames[-1][2]["result"] == 1
    assert [protocol.decode(x)["ok"] for x in answers] == [True]
