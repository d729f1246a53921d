"""Cluster mode on a real redis-server: a session run by node A is read through node B."""

from __future__ import annotations

import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request

import coredis
import trio
from helpers import ServerProcess, assert_contiguous, connect, wait_status

COUNT = '''
import time
def main(n):
    for i in range(n):
        api.send(i)
        if i % 100 == 0:
            time.sleep(0.01)
    return n
'''

CLOCK = '''
import time
def main(n):
    for _ in range(n):
        api.send(time.time())
        time.sleep(0.02)
'''


async def redis_client(url: str) -> coredis.Redis:
    return coredis.Redis.from_url(url, decode_responses=False)


async def run_elsewhere(runs_url: str, reader, code: str, n: int) -> dict:
    """Execute ``code(n)`` on the node at ``runs_url`` and attach ``reader`` (a
    client of another node) with the owner token from seq 1; the execute's reply."""
    async with connect(runs_url) as c:
        r = await c.ok("execute", code=code, args=[n], attach=False)
    await reader.ok("attach", token=r["token"], **{"from": 1})
    return r


def values(frames: list[list]) -> list:
    return [f[2] for f in frames if f[1] == "msg"]


async def redis_totals(url: str) -> tuple[int, int]:
    """Commands processed and bytes received by the Redis server so far."""
    redis = await redis_client(url)
    async with redis:
        stats = await redis.info("stats")
    return stats["total_commands_processed"], stats["total_net_input_bytes"]


async def test_attach_on_other_node_reads_every_frame_once(nodes, redis_server):
    a, b = nodes
    ops_before, bytes_before = await redis_totals(redis_server.url)
    async with connect(a.url) as ca, connect(b.url) as cb:
        r = await ca.ok("execute", code=COUNT, args=[2000], attach=False)
        rb = await cb.ok("attach", token=r["token"], **{"from": 1})
        assert rb["session"] == r["session"] and rb["mode"] == "rw"
        on_b = await cb.frames(r["session"], timeout=60)
        ops_after, bytes_after = await redis_totals(redis_server.url)
        await ca.ok("attach", token=r["viewer_token"], **{"from": 1})
        on_a = await ca.frames(r["session"], timeout=60)
    print(f"\nRedis per frame (small frames, one reader on the other node): "
          f"{(ops_after - ops_before) / len(on_b):.2f} commands, "
          f"{(bytes_after - bytes_before) / len(on_b):.0f} bytes in")
    assert_contiguous(on_b)
    assert on_b == on_a, "node B must deliver exactly the frames node A has, with the same seqs"
    assert values(on_b) == list(range(2000))
    assert on_b[-1][2]["result"] == 2000


async def test_function_stored_on_one_node_runs_on_another(nodes):
    a, b = nodes
    async with connect(a.url) as ca, connect(b.url) as cb:
        fid = (await ca.ok("store", name="count", code=COUNT))["function"]
        r = await cb.ok("execute", function=fid, args=[3])
        frames = await cb.frames(r["session"])
        missing = await cb.request("execute", function="0" * 64)
    assert values(frames) == [0, 1, 2]
    assert missing["error"]["code"] == "not_found"


async def test_idempotent_execute_retried_on_other_node_starts_nothing_new(nodes, redis_server):
    a, b = nodes
    async with connect(a.url) as ca, connect(b.url) as cb:
        first = await ca.ok("execute", code=COUNT, args=[5], idempotency_key="job-1", attach=False)
        again = await cb.ok("execute", code=COUNT, args=[5], idempotency_key="job-1")
        assert {k: again[k] for k in ("session", "token", "viewer_token")} == \
            {k: first[k] for k in ("session", "token", "viewer_token")}
        frames = await cb.frames(first["session"], timeout=30)  # attached on B, run on A
        back = await ca.ok("execute", code=COUNT, args=[5], idempotency_key="job-1", attach=False)
        assert back["session"] == first["session"]
        other = await cb.ok("execute", code=COUNT, args=[5], idempotency_key="job-2", attach=False)
        assert other["session"] != first["session"]
    assert values(frames) == list(range(5))
    redis = await redis_client(redis_server.url)
    async with redis:
        on_b = await redis.smembers("bento:node:b:sessions")
        on_a = await redis.smembers("bento:node:a:sessions")
    assert first["session"].encode() in on_a and first["session"].encode() not in on_b
    assert other["session"].encode() in on_b


async def test_status_on_other_node(nodes):
    a, b = nodes
    async with connect(a.url) as ca, connect(b.url) as cb:
        r = await ca.ok("execute", code=COUNT, args=[10])
        await ca.frames(r["session"])
        on_a = await ca.ok("status", token=r["token"])
        on_b = await wait_status(cb, r["viewer_token"], lambda st: st["state"] == "exited")
    same = ("session", "state", "first_seq", "next_seq", "input_seq", "exit", "sandbox", "enforced")
    assert {k: on_b[k] for k in same} == {k: on_a[k] for k in same}
    assert on_b["node"] == "a" and on_b["attachments"] is None


async def test_resume_on_other_node_after_a_dropped_connection(nodes):
    a, b = nodes
    async with connect(b.url) as cb:
        r = await run_elsewhere(a.url, cb, COUNT, 3000)
        sid = r["session"]
        first = await cb.frames(sid, until_exit=False, count=700, timeout=60)
    # The connection is gone mid-stream; the session goes on. Resume on B from a seq.
    resume_at = first[500][0]
    async with connect(b.url) as cb:
        rb = await cb.ok("attach", token=r["token"], **{"from": resume_at})
        assert rb["first_seq"] == 1
        rest = await cb.frames(sid, timeout=60)
    frames = first[:500] + rest
    assert_contiguous(frames)
    assert values(frames) == list(range(3000))


async def test_owner_ack_through_other_node_frees_the_buffer(nodes, redis_server):
    """An ack sent through B frees A's buffer; the acked frames stay readable as
    history, on both nodes and in the session's Redis Stream."""
    a, b = nodes
    async with connect(a.url) as ca, connect(b.url) as cb:
        r = await ca.ok("execute", code=COUNT, args=[300], attach=False)
        sid = r["session"]
        await cb.ok("attach", token=r["token"], **{"from": 1})
        frames = await cb.frames(sid, timeout=60)
        last = frames[-1][0]
        before = await ca.ok("status", token=r["token"])
        assert before["buffer_bytes"] > 0
        await cb.send({"op": "ack", "session": sid, "seq": last - 1})
        st = await wait_status(ca, r["token"], lambda st: st["acked_seq"] == last - 1)
        assert st["buffer_bytes"] < before["buffer_bytes"] and st["history_bytes"] > 0, st
        assert st["first_seq"] == 1
        redis = await redis_client(redis_server.url)
        async with redis:
            assert len(await redis.xrange(f"bento:{{{sid}}}:out", "-", "+")) == last
        # A viewer on B that asks for the acked frames reads them from the history.
        async with connect(b.url) as cv:
            rv = await cv.ok("attach", token=r["viewer_token"], **{"from": 1})
            assert rv["mode"] == "ro" and rv["first_seq"] == 1
            seen = await cv.frames(sid, timeout=30)
        assert seen == frames


async def test_directory_holds_token_hashes_only_and_a_node_heartbeat(nodes, redis_server):
    a, b = nodes
    async with connect(a.url) as ca:
        r = await ca.ok("execute", code=COUNT, args=[3])
        await ca.frames(r["session"])
    redis = await redis_client(redis_server.url)
    async with redis:
        stored = b""
        for key in await redis.keys("*"):
            kind = await redis.type(key)
            stored += key
            if kind == b"string":
                stored += await redis.get(key) or b""
            elif kind == b"hash":
                stored += b"".join(k + v for k, v in (await redis.hgetall(key)).items())
            elif kind == b"stream":
                for e in await redis.xrange(key, "-", "+"):
                    stored += b"".join(k + v for k, v in e.field_values.items())
        assert r["session"].encode() in stored
        assert r["token"].encode() not in stored and r["viewer_token"].encode() not in stored
        ttl = await redis.pttl(b"bento:node:a")
        assert 0 < ttl <= 10_000
        # One session's keys share a hash slot: the first {...} in each is the session id.
        tag = b"{" + r["session"].encode() + b"}"
        session_keys = await redis.keys(f"bento:{{{r['session']}}}:*")
        assert len(session_keys) == 2
        assert all(k[k.index(b"{"):].startswith(tag) for k in session_keys)


async def test_unknown_token_and_destroyed_session_on_other_node(nodes):
    a, b = nodes
    async with connect(b.url) as cb:
        bad = await cb.request("attach", token="bto_" + "x" * 43, **{"from": 1})
        assert not bad["ok"] and bad["error"]["code"] == "not_found"
    async with connect(a.url) as ca, connect(b.url) as cb:
        r = await ca.ok("execute", code="import time\ndef main():\n    time.sleep(60)\n", attach=False)
        await cb.ok("attach", token=r["viewer_token"], **{"from": 1})
        await ca.ok("destroy", token=r["token"])
        ev = await cb.event(ev="error", session=r["session"], timeout=15)
        assert ev["error"]["code"] == "gone"


async def test_how_far_behind_the_other_node_reads(nodes):
    """The mirror's delay as a reader sees it: a frame's arrival on B after its
    arrival on A (printed; asserted only to be bounded)."""
    a, b = nodes
    n = 100
    async with connect(a.url) as ca, connect(b.url) as cb:
        r = await ca.ok("execute", code=CLOCK, args=[n], attach=False)
        sid = r["session"]
        await ca.ok("attach", token=r["viewer_token"], **{"from": 1})
        await cb.ok("attach", token=r["token"], **{"from": 1})
        seen: dict[str, dict[int, float]] = {"a": {}, "b": {}}

        async def read(name: str, c) -> None:
            got = 0
            while got < n + 1:
                ev = await c.event(ev="out", session=sid, timeout=30)
                for seq, _ch, _data in ev["frames"]:
                    seen[name][seq] = time.time()
                got += len(ev["frames"])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read, "a", ca)
            nursery.start_soon(read, "b", cb)
    delays = sorted(seen["b"][q] - seen["a"][q] for q in seen["a"])
    median, p99 = statistics.median(delays), delays[int(len(delays) * 0.99) - 1]
    print(f"\nB behind A per frame: median {median * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, "
          f"max {delays[-1] * 1000:.1f} ms")
    assert median < 1.0


DOUBLE = '''
def main(_unused):
    got = []
    try:
        while True:
            got.append(api.recv())
            api.send(got[-1] * 2)
    except EOFError:
        return got
'''

SHARED = '''
import time
def main():
    while True:
        time.sleep(0.05)
'''


async def test_input_through_other_node_exactly_once(nodes):
    a, b = nodes
    async with connect(b.url) as cb:
        r = await run_elsewhere(a.url, cb, DOUBLE, 0)
        sid = r["session"]
        for seq in range(1, 21):
            await cb.send({"op": "input", "session": sid, "seq": seq, "data": seq})
            assert (await cb.event(ev="in_ack", session=sid))["seq"] == seq
        # A re-sent input is a duplicate: acknowledged, not delivered again.
        await cb.send({"op": "input", "session": sid, "seq": 20, "data": 20})
        assert (await cb.event(ev="in_ack", session=sid))["seq"] == 20
        await cb.send({"op": "input", "session": sid, "seq": 30, "data": 30})
        gap = await cb.event(ev="error", session=sid)
        assert gap["error"]["code"] == "input_gap"
        await cb.send({"op": "input", "session": sid, "seq": 21, "eof": True})
        await cb.event(ev="in_ack", session=sid)
        frames = await cb.frames(sid, timeout=30)
    assert values(frames) == [2 * i for i in range(1, 21)]
    assert frames[-1][2]["result"] == list(range(1, 21))


async def test_signal_state_and_destroy_through_other_node(nodes):
    a, b = nodes
    async with connect(a.url) as ca, connect(b.url) as cb:
        r = await ca.ok("execute", code=SHARED, attach=False)
        put = await cb.ok("state_put", token=r["token"], value={"k": 1}, if_version=0)
        got = await cb.ok("state_get", token=r["viewer_token"])
        assert got["value"] == {"k": 1} and got["version"] == put["version"]
        assert (await ca.ok("state_get", token=r["viewer_token"]))["value"] == {"k": 1}
        stale = await cb.request("state_put", token=r["token"], value=2, if_version=0)
        assert stale["error"]["code"] == "conflict" and stale["error"]["version"] == put["version"]
        refused = await cb.request("signal", token=r["viewer_token"], signal="TERM")
        assert refused["error"]["code"] == "forbidden"
        await cb.ok("signal", token=r["token"], signal="KILL")
        st = await wait_status(ca, r["token"], lambda st: st["exit"] is not None)
        assert st["state"] == "killed"
        await cb.ok("destroy", token=r["token"])
        gone = await ca.request("status", token=r["token"])
        assert gone["error"]["code"] == "not_found"


PACED = '''
import time
def main(n):
    for i in range(n):
        api.send(i)
        time.sleep(0.01)
'''

FEW_THEN_WAIT = '''
import time
def main(n):
    for i in range(n):
        api.send(i)
    time.sleep(600)
'''


async def test_node_death_ends_its_sessions_lost_readable_on_another(redis_server, tmp_path):
    dying = ServerProcess(str(tmp_path / "dying"), "--cluster", redis_server.url, "--node", "dying").start()
    watcher = ServerProcess(str(tmp_path / "watcher"), "--cluster", redis_server.url, "--node", "w").start()
    try:
        async with connect(watcher.url) as cw:
            r = await run_elsewhere(dying.url, cw, FEW_THEN_WAIT, 50)
            sid = r["session"]
            before = await cw.frames(sid, until_exit=False, count=50, timeout=30)
            # The machine dies: the node and its exchanges, at once.
            pids = dying.exchange_pids()
            dying.kill(signal.SIGKILL)
            for pid in pids:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            died = time.monotonic()
            after = await cw.frames(sid, timeout=30)
            took = time.monotonic() - died
            st = await cw.ok("status", token=r["viewer_token"])
        print(f"\nsession lost on the other node {took:.1f} s after its node died")
        assert values(before + after) == list(range(50))
        assert_contiguous(before + after)
        end = after[-1]
        assert end[1] == "exit" and end[2]["state"] == "lost" and end[2]["error"]["type"] == "NodeLost"
        assert st["state"] == "lost" and st["exit"] == end[2] and st["next_seq"] == end[0] + 1
        assert took < 15
    finally:
        dying.stop()
        watcher.stop()


async def test_node_restart_mirrors_on_with_no_gap_and_no_duplicate(redis_server, tmp_path):
    runner = ServerProcess(str(tmp_path / "runner"), "--cluster", redis_server.url, "--node", "r").start()
    reader = ServerProcess(str(tmp_path / "reader"), "--cluster", redis_server.url, "--node", "rd").start()
    try:
        async with connect(reader.url) as cr:
            r = await run_elsewhere(runner.url, cr, PACED, 300)
            sid = r["session"]
            before = await cr.frames(sid, until_exit=False, count=30, timeout=30)
            # The server restarts; its exchange goes on writing meanwhile.
            runner.kill(signal.SIGTERM)
            runner.start()
            rest = await cr.frames(sid, timeout=60)
        frames = before + rest
        assert_contiguous(frames)
        assert values(frames) == list(range(300))
        assert frames[-1][2]["state"] == "exited"
    finally:
        runner.stop()
        reader.stop()


def test_node_without_its_redis_refuses_to_start(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    p = subprocess.run(
        [sys.executable, "-m", "bento.app", "server", "--port", "0", "--data-dir", str(tmp_path / "d"),
         "--cluster", f"redis://127.0.0.1:{port}/0"],
        capture_output=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert p.returncode == 2
    assert f"cannot reach Redis at redis://127.0.0.1:{port}/0".encode() in p.stderr
    # A URL of no known scheme is refused without showing its password.
    p = subprocess.run(
        [sys.executable, "-m", "bento.app", "server", "--port", "0", "--data-dir", str(tmp_path / "d"),
         "--cluster", "redix://u:s3cret@127.0.0.1:1/0"],
        capture_output=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert p.returncode == 2 and b"redix://u:***@127.0.0.1:1/0" in p.stderr and b"s3cret" not in p.stderr, p.stderr


def test_node_name_in_use_elsewhere_is_refused(nodes, redis_server, tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "bento.app", "server", "--port", "0", "--data-dir", str(tmp_path / "d"),
         "--cluster", redis_server.url, "--node", "a"],
        capture_output=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert p.returncode == 2
    assert b"the node name 'a' is in use by" in p.stderr and b"--node" in p.stderr


async def test_redis_restart_loses_no_session(durable_redis, tmp_path):
    """Redis goes away for longer than a heartbeat's expiry and comes back with
    its data: the nodes keep running their sessions, nobody is declared lost,
    and the other node reads every frame once the mirror has caught up."""
    url = durable_redis.url
    runner = ServerProcess(str(tmp_path / "runner"), "--cluster", url, "--node", "r2").start()
    reader = ServerProcess(str(tmp_path / "reader"), "--cluster", url, "--node", "rd2").start()
    n = 1500
    try:
        async with connect(reader.url) as cr:
            r = await run_elsewhere(runner.url, cr, PACED, n)
            sid = r["session"]
            await cr.frames(sid, until_exit=False, count=30, timeout=30)
            durable_redis.stop(signal.SIGTERM)
            await trio.sleep(12)
            status, body = await trio.to_thread.run_sync(readyz, runner.port)
            assert status == 503 and "Redis" in body, (status, body)  # /readyz says why
            durable_redis.start()
            ev = await cr.event(ev="error", session=sid, timeout=30)
            assert "Redis" in ev["error"]["message"]
        async with connect(reader.url) as cr:
            await cr.ok("attach", token=r["viewer_token"], **{"from": 1})
            frames = await cr.frames(sid, timeout=90)
        assert_contiguous(frames)
        assert values(frames) == list(range(n))
        assert frames[-1][2]["state"] == "exited"
        assert (await trio.to_thread.run_sync(readyz, runner.port))[0] == 200
    finally:
        runner.stop()
        reader.stop()


async def test_a_redis_that_hangs_makes_the_node_unready(durable_redis, tmp_path):
    """A stopped (SIGSTOP) Redis raises nothing: the heartbeat's write just
    waits. /readyz goes by when one last reached Redis."""
    node = ServerProcess(str(tmp_path / "hang"), "--cluster", durable_redis.url, "--node", "h").start()
    assert durable_redis.proc is not None
    try:
        assert (await trio.to_thread.run_sync(readyz, node.port))[0] == 200
        durable_redis.proc.send_signal(signal.SIGSTOP)
        try:
            with trio.fail_after(20):
                while (got := await trio.to_thread.run_sync(readyz, node.port))[0] != 503:
                    await trio.sleep(0.5)
            assert "heartbeat" in got[1] and "Redis" in got[1], got
        finally:
            durable_redis.proc.send_signal(signal.SIGCONT)
        with trio.fail_after(20):
            while (await trio.to_thread.run_sync(readyz, node.port))[0] != 200:
                await trio.sleep(0.5)
    finally:
        node.stop()


async def test_the_cluster_secret_comes_back_after_redis_lost_its_data(volatile_redis, tmp_path):
    """A Redis restarted without persistence forgets the cluster's secret; the
    running node puts it back with its next heartbeat, so a node started later
    derives the same tokens."""
    redis = volatile_redis
    node = ServerProcess(str(tmp_path / "n"), "--cluster", redis.url, "--node", "s").start()
    try:
        before = await trio.to_thread.run_sync(_redis_get, redis.port, b"bento:secret")
        assert before is not None and len(before) == 32
        await trio.to_thread.run_sync(_redis_command, redis.port, b"SET", b"test:marker", b"1")
        redis.stop()
        redis.start()  # (the same port, nothing kept)
        assert await trio.to_thread.run_sync(_redis_get, redis.port, b"test:marker") is None
        with trio.fail_after(15):
            while (now := await trio.to_thread.run_sync(_redis_get, redis.port, b"bento:secret")) is None:
                await trio.sleep(0.2)
        assert now == before
    finally:
        node.stop()


def _redis_get(port: int, key: bytes) -> bytes | None:
    """GET over a bare RESP connection (the test's own look, not the server's client)."""
    got = _redis_command(port, b"GET", key)
    head, _, rest = got.partition(b"\r\n")
    return None if head == b"$-1" else rest[: int(head[1:])]


def _redis_command(port: int, *words: bytes) -> bytes:
    """One command's raw answer (a simple or bulk string)."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"*%d\r\n" % len(words) + b"".join(b"$%d\r\n%s\r\n" % (len(w), w) for w in words))
        got = b""
        for _ in range(100):
            got += sock.recv(4096)
            head, sep, rest = got.partition(b"\r\n")
            if sep and (not head.startswith(b"$") or head == b"$-1" or len(rest) >= int(head[1:]) + 2):
                break
    return got


def readyz(port: int) -> tuple[int, str]:
    """GET /readyz: (status, body)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()
