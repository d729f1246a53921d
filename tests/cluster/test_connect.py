"""The cluster's Redis connection: the --cluster URL forms (redis://, rediss://
with a CA, Redis Cluster seed lists), sessions on a real TLS redis-server and
on a real 3-master Redis Cluster, and the client's pool under cancellation."""

from __future__ import annotations

import gc
import random
import subprocess
import sys

import coredis
import pytest
import trio
from conftest import make_ca
from coredis.exceptions import RedisError
from coredis.retry import NoRetryPolicy
from helpers import ServerProcess, assert_contiguous, connect, wait_status
from proxy import Proxy

from bento.cluster import connect as rconnect
from bento.cluster import keys

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


def values(frames: list[list]) -> list:
    return [f[2] for f in frames if f[1] == "msg"]


# -- the URL forms -------------------------------------------------------------------------


def test_url_forms():
    t = rconnect.parse("redis://127.0.0.1:6379/3")
    assert (t.tls, t.cluster, t.hosts, t.db, t.ca) == (False, False, (("127.0.0.1", 6379),), 3, None)
    t = rconnect.parse("rediss://u:p%40ss@redis.example:6380/0?ca=/etc/ca.pem")
    assert (t.tls, t.username, t.password, t.ca) == (True, "u", "p@ss", "/etc/ca.pem")
    assert t.shown() == "rediss://u:***@redis.example:6380/0"
    t = rconnect.parse("redis+cluster://:secret@10.0.0.1:7000,10.0.0.2:7001,[::1]:7002")
    assert t.cluster and t.hosts == (("10.0.0.1", 7000), ("10.0.0.2", 7001), ("::1", 7002))
    assert t.password == "secret" and "secret" not in t.shown()
    assert rconnect.parse("rediss+cluster://h:1?ca=/x").tls
    assert rconnect.parse("redis://h:1").db == 0


@pytest.mark.parametrize("url, says", [
    ("http://h:1/0", "scheme"),
    ("redis://h/0", "HOST:PORT"),
    ("redis://h:99999/0", "HOST:PORT"),
    ("redis://h:1,g:2/0", "several hosts"),
    ("redis://h:1/x", "database"),
    ("redis+cluster://h:1/2", "only database 0"),
    ("redis://h:1/0?ca=/x", "needs TLS"),
    ("rediss://h:1/0?ca=", "file"),
    ("rediss://h:1/0?cafile=/x", "unknown parameter"),
])
def test_bad_urls_say_what_is_wrong(url, says):
    with pytest.raises(ValueError, match=says):
        rconnect.parse(url)


def test_node_refuses_a_bad_url_with_the_reason(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "bento.app", "server", "--port", "0", "--data-dir", str(tmp_path / "d"),
         "--cluster", "rediss://:hunter2@127.0.0.1:1/0?ca=/x&tls=yes"],
        capture_output=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert p.returncode == 2
    assert b"unknown parameter(s) tls" in p.stderr and b"hunter2" not in p.stderr


# -- one session's keys share a hash slot --------------------------------------------------


def test_one_sessions_keys_share_a_hash_slot():
    from coredis._utils import hash_slot

    for sid in ("s1", "0123abcd", "x" * 40):
        slots = {hash_slot(k.encode()) for k in (keys.meta(sid), keys.out(sid))}
        assert len(slots) == 1
    assert hash_slot(keys.meta("a").encode()) != hash_slot(keys.meta("b").encode())


# -- TLS -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_nodes(tls_redis, tmp_path_factory):
    started = []
    for name in ("a", "b"):
        data = str(tmp_path_factory.mktemp(f"tls-node-{name}") / "data")
        started.append(ServerProcess(data, "--cluster", tls_redis.url, "--node", name).start())
    yield started
    for srv in started:
        srv.stop()


async def test_over_tls_a_session_run_on_a_is_read_and_fed_on_b(tls_nodes):
    a, b = tls_nodes
    await cross_node_exactly_once(a, b)


def test_tls_with_another_ca_is_refused(tls_redis, tmp_path):
    other_ca, _ = make_ca(str(tmp_path), "other")
    url = tls_redis.url.split("?")[0] + f"?ca={other_ca}"
    p = subprocess.run(
        [sys.executable, "-m", "bento.app", "server", "--port", "0", "--data-dir", str(tmp_path / "d"),
         "--cluster", url], capture_output=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert p.returncode == 2
    assert b"cannot reach Redis at rediss://127.0.0.1" in p.stderr
    assert b"CERTIFICATE_VERIFY_FAILED" in p.stderr or b"certificate verify failed" in p.stderr


# -- a real Redis Cluster ----------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster_nodes(redis_cluster, tmp_path_factory):
    started = []
    for name in ("a", "b"):
        data = str(tmp_path_factory.mktemp(f"rc-node-{name}") / "data")
        started.append(ServerProcess(data, "--cluster", redis_cluster.url, "--node", name).start())
    yield started
    for srv in started:
        srv.stop()


async def cross_node_exactly_once(a: ServerProcess, b: ServerProcess) -> str:
    """Execute on A; attach, read, send input, status, state, destroy on B: every
    frame and every input once, in order. The session's id."""
    async with connect(a.url) as ca, connect(b.url) as cb:
        r = await ca.ok("execute", code=DOUBLE, attach=False)
        sid = r["session"]
        got = await cb.ok("attach", token=r["token"], **{"from": 1})
        assert got["session"] == sid and got["mode"] == "rw"
        for seq in range(1, 31):
            await cb.send({"op": "input", "session": sid, "seq": seq, "data": seq})
            assert (await cb.event(ev="in_ack", session=sid))["seq"] == seq
        await cb.send({"op": "input", "session": sid, "seq": 30, "data": 30})  # a duplicate
        assert (await cb.event(ev="in_ack", session=sid))["seq"] == 30
        put = await cb.ok("state_put", token=r["token"], value={"k": 1}, if_version=0)
        assert (await cb.ok("state_get", token=r["viewer_token"]))["version"] == put["version"]
        st = await cb.event(ev="state", session=sid, timeout=5)  # from the session's state stream
        assert (st["version"], st["value"]) == (put["version"], {"k": 1})
        listed = {s["session"]: s for s in (await cb.ok("list"))["sessions"]}
        assert listed[sid]["node"] == "a", listed
        await cb.send({"op": "input", "session": sid, "seq": 31, "eof": True})
        await cb.event(ev="in_ack", session=sid)
        frames = await cb.frames(sid, timeout=30)
        st = await wait_status(cb, r["token"], lambda st: st["state"] == "exited")
        assert st["node"] == "a"
        await ca.ok("attach", token=r["viewer_token"], **{"from": 1})
        on_a = await ca.frames(sid, timeout=30)
        await cb.ok("destroy", token=r["token"])
        gone = await ca.request("status", token=r["token"])
        assert gone.get("error", {}).get("code") == "not_found", gone
    assert_contiguous(frames)
    assert frames == on_a
    assert values(frames) == [2 * i for i in range(1, 31)]
    assert frames[-1][2]["result"] == list(range(1, 31))
    return sid


async def test_on_a_redis_cluster_a_session_run_on_a_is_read_and_fed_on_b(cluster_nodes, redis_cluster):
    a, b = cluster_nodes
    async with connect(a.url) as ca:
        r = await ca.ok("execute", code="def main():\n    api.send(1)\n", attach=False)
        await wait_status(ca, r["token"], lambda st: st["state"] == "exited")
    # Every key of the session sits in one slot, on one master. (The node knows the
    # exit before its mirror has written the stream: looked for until it is there.)
    want = {keys.meta(r["session"]).encode(), keys.out(r["session"]).encode()}
    with trio.move_on_after(10):
        while True:
            holders = {}
            for server in redis_cluster.servers:
                redis = coredis.Redis(host="127.0.0.1", port=server.port, decode_responses=False)
                async with redis:
                    found = [k async for k in redis.scan_iter(match=f"*{r['session']}*")]
                    if found:
                        holders[server.port] = {await redis.cluster_keyslot(k) for k in found}, found
            if any(want <= set(found) for _, found in holders.values()):
                break
            await trio.sleep(0.1)
    assert len(holders) == 1, holders
    (slots, found), = holders.values()
    assert len(slots) == 1 and want <= set(found)
    await cross_node_exactly_once(a, b)


# -- the pool under cancellation -----------------------------------------------------------


async def cancel_blocking_requests(redis, times: int) -> None:
    for _ in range(times):
        with trio.move_on_after(0.02):
            await redis.xread({"bento:test:none": "0-0"}, block=5_000)
        with trio.move_on_after(0.02):
            await redis.blpop(["bento:test:none:list"], timeout=5)


async def still_serves(redis, width: int) -> bool:
    """Whether ``width`` blocking reads at once (0.1 s each) and then a GET all finish within 1.5 s."""
    with trio.move_on_after(1.5):
        async with trio.open_nursery() as nursery:
            for _ in range(width):
                async def one() -> None:
                    await redis.xread({"bento:test:none": "0-0"}, block=100)
                nursery.start_soon(one)
        await redis.get("bento:test:none:key")
        return True
    return False


# coredis's cluster client leaves an anyio memory stream of a cancelled blocking
# command unclosed (its own pool too): expected here, whenever a collection finds it
# (an automatic one during the test failed a CI run; the explicit one is below).
@pytest.mark.filterwarnings("ignore:Unclosed <MemoryObject:ResourceWarning")
@pytest.mark.parametrize("where", ["redis", "cluster"])
async def test_cancelled_requests_give_their_pool_slot_back(where, redis_server, redis_cluster):
    url = redis_server.url if where == "redis" else redis_cluster.url
    redis = rconnect.client(url, max_connections=3)
    async with redis:
        await cancel_blocking_requests(redis, 10)  # 20 cancelled, far more than the pool holds
        assert await still_serves(redis, 3)
    del redis
    gc.collect()  # (here, under this test's filter, not during a later test)


async def test_coredis_own_pool_still_loses_slots(redis_server):
    """What ``connect.Pool`` is for; when this fails, coredis keeps its slots
    itself and the wrapper can go."""
    redis = coredis.Redis.from_url(redis_server.url, max_connections=3)
    async with redis:
        await cancel_blocking_requests(redis, 2)
        assert not await still_serves(redis, 1)


async def test_a_node_serves_on_after_many_attachments_detached_mid_wait(nodes):
    """Each detach of an idle attachment on node B cancels its XREAD BLOCK:
    more detaches than B's pool has connections, and B still reads."""
    a, b = nodes
    detaches = rconnect.MAX_CONNECTIONS + 44
    async with connect(a.url) as ca, connect(b.url) as cb:
        r = await ca.ok("execute", code="def main():\n    api.recv()\n    api.send('done')\n",
                        attach=False)
        for _ in range(detaches):
            await cb.ok("attach", token=r["viewer_token"], **{"from": 1})
            await trio.sleep(0.004)  # its reader is in XREAD BLOCK by now
            await cb.ok("detach", session=r["session"])
        await cb.ok("attach", token=r["token"], **{"from": 1})
        await cb.send({"op": "input", "session": r["session"], "seq": 1, "data": None})
        frames = await cb.frames(r["session"], timeout=10)
    assert values(frames) == ["done"]


# -- a cancelled XREAD and the commands beside it ------------------------------------------

LAG_S = 0.005  # a Redis in another zone


async def test_coredis_still_fails_the_commands_beside_a_cancelled_xread(redis_server):
    """Why a node has two clients (``connect``'s docstring); when this fails,
    coredis no longer closes a connection under other commands and they can be one."""
    async with trio.open_nursery() as nursery:
        proxy = Proxy(redis_server.port, lag=0.05)
        await nursery.start(proxy.run)
        # One connection, and no retry (coredis retries a failed command twice by
        # default: the third failure in a row is what a node's client answers).
        redis = coredis.Redis(host="127.0.0.1", port=proxy.port, max_connections=1,
                              connection_pool_cls=rconnect.Pool, retry_policy=NoRetryPolicy())
        async with redis:
            await redis.ping()  # the one connection is made
            got: list = []

            async def get() -> None:
                try:
                    got.append(await redis.get("bento:test:none"))
                except RedisError as exc:
                    got.append(exc)

            nursery.start_soon(get)
            await trio.sleep(0.01)  # the GET is sent; its connection, the only one, is back in the pool
            with trio.move_on_after(0.01):
                await redis.xread({"bento:test:none": "0-0"}, count=1)
            with trio.fail_after(5):
                while not got:
                    await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert isinstance(got[0], RedisError) and "Connection lost" in str(got[0]), got


async def test_attachments_cut_fail_no_other_request(nodes, redis_server, tmp_path):
    """Clients on node C attach and detach at once (each detach cancels the
    attachment's XREAD), while other clients ask for the session's status; C
    reaches Redis 5 ms away. No status and no attach is answered ``unavailable``."""
    a, _ = nodes
    statuses, cutters = 4, 4
    async with trio.open_nursery() as nursery:
        proxy = Proxy(redis_server.port, lag=LAG_S)
        await nursery.start(proxy.run)
        c = ServerProcess(str(tmp_path / "data"), "--cluster", f"redis://127.0.0.1:{proxy.port}/0", "--node", "c")
        await trio.to_thread.run_sync(c.start)
        try:
            async with connect(a.url) as ca:
                r = await ca.ok("execute", code="import time\ndef main():\n    time.sleep(60)\n", attach=False)
            answers: list[dict] = []

            async def status() -> None:
                async with connect(c.url) as cc:
                    for _ in range(200):
                        answers.append(await cc.request("status", token=r["token"]))

            async def cut() -> None:
                async with connect(c.url) as cc:
                    for _ in range(60):
                        answers.append(q := await cc.request("attach", token=r["token"], **{"from": 1}))
                        if q["ok"]:
                            await trio.sleep(random.random() * 0.002)  # its first XREAD is in flight
                            await cc.ok("detach", session=r["session"])

            with trio.fail_after(90):
                async with trio.open_nursery() as clients:
                    for _ in range(statuses):
                        clients.start_soon(status)
                    for _ in range(cutters):
                        clients.start_soon(cut)
        finally:
            await trio.to_thread.run_sync(c.stop)
            nursery.cancel_scope.cancel()
    refused = [q for q in answers if not q["ok"]]
    assert not refused and len(answers) == statuses * 200 + cutters * 60, refused[:3]
