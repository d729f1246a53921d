"""Admission control on a real server: capacity (busy), per-key quotas (quota),
the queue, and the disk floor."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import trio
from helpers import ROOT, connect

WAIT_INPUT = "def main():\n    print('up', flush=True)\n    return api.recv()\n"
QUICK = "def main():\n    return 1\n"


async def start_waiting(c, n: int) -> list[dict]:
    out = []
    for _ in range(n):
        r = await c.ok("execute", code=WAIT_INPUT)
        await c.event(ev="out", session=r["session"])  # its function runs
        out.append(r)
    return out


async def finish(c, r: dict, value: str) -> list[list]:
    await c.send({"op": "input", "session": r["session"], "seq": 1, "data": value})
    return await c.frames(r["session"])


async def test_the_fifth_execute_is_busy_at_once_and_the_four_are_unharmed(make_server):
    srv = make_server("--max-sessions", "4", "--pool", "0")
    async with connect(srv.url) as c:
        running = await start_waiting(c, 4)
        t0 = time.monotonic()
        r = await c.request("execute", code=QUICK)
        took = time.monotonic() - t0
        assert not r["ok"]
        err = r["error"]
        assert err["code"] == "busy" and err["busy"] == "sessions", err
        assert err["retry_after"] > 0
        assert "--max-sessions 4" in err["message"]
        assert took < 0.1, took  # refused at once (issue 16: within 100 ms), not queued
        for i, run in enumerate(running):
            got = await finish(c, run, f"v{i}")
            assert got[-1][2]["result"] == f"v{i}" and got[-1][2]["state"] == "exited"
        # Capacity is back once they ended.
        r = await c.ok("execute", code=QUICK)
        assert (await c.frames(r["session"]))[-1][2]["result"] == 1


async def test_queue_waits_and_starts_when_one_ends(make_server):
    srv = make_server("--max-sessions", "2", "--pool", "0")
    async with connect(srv.url) as c:
        first, _ = await start_waiting(c, 2)
        rid = c.next_id
        await c.send({"op": "execute", "id": rid, "code": QUICK, "queue": 30})
        c.next_id += 1
        queued = await c.event(ev="queued", id=rid)
        assert queued["position"] == 1
        # The connection still answers while its execute waits.
        await c.ok("ping")
        assert rid not in c.replies
        await c.send({"op": "input", "session": first["session"], "seq": 1, "data": "x"})
        with trio.fail_after(15):
            while rid not in c.replies:
                await c._read_one()
        r = c.replies.pop(rid)
        assert r["ok"], r
        assert (await c.frames(r["session"]))[-1][2]["result"] == 1
        # A queue that never frees up answers busy when its time is over.
        await start_waiting(c, 1)
        r = await c.request("execute", code=QUICK, queue=0.3)
        assert not r["ok"] and r["error"]["code"] == "busy" and "waited" in r["error"]["message"]


ECHO = "def main():\n    while True:\n        try:\n            api.send(api.recv())\n        except EOFError:\n            return 0\n"


class Echo:
    """Round trips through a running function: input -> the function's
    ``api.send`` -> this client (the path a real client's messages take)."""

    def __init__(self, c, sid: str) -> None:
        self.c, self.sid, self.seq = c, sid, 0

    async def once(self) -> float:
        self.seq += 1
        t0 = time.monotonic()
        await self.c.send({"op": "input", "session": self.sid, "seq": self.seq, "data": self.seq})
        with trio.fail_after(10):
            while True:
                await self.c._read_one()
                got = False
                while self.c.events:  # in_ack and out events: only our echo counts
                    ev = self.c.events.popleft()
                    if ev.get("ev") == "out" and ev.get("session") == self.sid:
                        got |= any(f[1] == "msg" and f[2] == self.seq for f in ev["frames"])
                if got:
                    return time.monotonic() - t0

    async def p50(self, n: int = 40) -> float:
        """The median round trip, seconds: the better of two runs of ``n`` (other
        work on a shared machine can stall either one)."""
        medians = []
        for _ in range(2):
            took = sorted([await self.once() for _ in range(n)])
            medians.append(took[n // 2])
        return min(medians)


# Alice's flood runs in its own process, at the lowest CPU priority, so that
# bob's figures measure the server, not how this test process and the flood
# share two cores.
FLOOD = """
import json, os, sys, time
os.nice(19)
import trio
from helpers import ROOT, connect

async def main(url, seconds):
    async with connect(url, auth="alice") as c:
        answers = []
        print("flooding", flush=True)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            answers.append(await c.request("execute", code="def main():\\n    return 1\\n", attach=False))
    print(json.dumps({"n": len(answers), "ok": sum(1 for a in answers if a["ok"]),
                      "first": answers[0]}), flush=True)

trio.run(main, sys.argv[1], float(sys.argv[2]))
"""


async def test_a_key_over_its_rate_gets_quota_while_another_key_is_served(make_server):
    srv = make_server("--api-key", "alice", "--api-key", "bob", "--quota-executes-per-minute", "3",
                      "--pool", "0")
    async with connect(srv.url, auth="alice") as alice:
        for _ in range(3):
            await alice.ok("execute", code=QUICK, attach=False)
    tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    async with connect(srv.url, auth="bob") as bob:
        run = await bob.ok("execute", code=ECHO)
        echo = Echo(bob, run["session"])
        await echo.once()  # the function runs
        baseline = await echo.p50()
        flood = subprocess.Popen([sys.executable, "-c", FLOOD, srv.url, "4"], cwd=tests_dir,
                                 stdout=subprocess.PIPE, text=True)
        try:
            assert flood.stdout is not None
            with trio.fail_after(20):
                assert await trio.to_thread.run_sync(flood.stdout.readline) == "flooding\n"
                loaded = await echo.p50()
                assert flood.poll() is None  # measured while the flood ran
                result = json.loads(await trio.to_thread.run_sync(flood.stdout.readline))
        finally:
            flood.kill()
            flood.wait(timeout=10)
            flood.stdout.close()
        await bob.send({"op": "input", "session": run["session"], "seq": echo.seq + 1, "eof": True})
        assert (await bob.frames(run["session"]))[-1][2]["state"] == "exited"
        assert result["n"] >= 50 and result["ok"] == 0, result
        err = result["first"]["error"]
        assert err["code"] == "quota" and err["quota"] == "executes_per_minute", err
        assert 0 < err["retry_after"] <= 20
        # Bob's own bucket is full.
        r = await bob.ok("execute", code=QUICK)
        assert (await bob.frames(r["session"]))[-1][2]["result"] == 1
    # Served, not starved: within 2x its baseline (issue 16). A starved echo waits
    # behind the flood for hundreds of milliseconds; sub-millisecond medians
    # wobble by more than 2x on a shared machine, so the bound is 2x the
    # baseline or 20 ms, whichever is larger.
    assert loaded <= max(2 * baseline, 0.02), (baseline, loaded)


async def test_quota_sessions_names_the_quota(make_server):
    srv = make_server("--quota-sessions", "1", "--pool", "0")
    async with connect(srv.url) as c:
        (run,) = await start_waiting(c, 1)
        r = await c.request("execute", code=QUICK, queue=5)
        assert not r["ok"] and r["error"]["code"] == "quota" and r["error"]["quota"] == "sessions"
        assert (await finish(c, run, "v"))[-1][2]["result"] == "v"


async def test_quota_history_bytes_counts_acked_history_until_the_session_is_destroyed(make_server):
    # 64 KiB of output, read and acked: it stays as history, and the key's
    # 32 KiB quota on retained bytes still refuses until the session is destroyed.
    srv = make_server("--quota-history-bytes", "32K", "--pool", "0")
    loud = "def main():\n    print('x' * 65535)\n    return 1\n"
    async with connect(srv.url) as c:
        r = await c.ok("execute", code=loud)
        frames = await c.frames(r["session"])
        await c.send({"op": "ack", "session": r["session"], "seq": frames[-1][0]})
        with trio.fail_after(10):
            while (await c.ok("status", token=r["token"]))["history_bytes"] < 65536:
                await trio.sleep(0.1)
        refused = await c.request("execute", code=QUICK)
        assert not refused["ok"], refused
        assert (refused["error"]["code"], refused["error"]["quota"]) == ("quota", "history_bytes")
        await c.ok("destroy", token=r["token"])
        again = await c.ok("execute", code=QUICK)
        assert (await c.frames(again["session"]))[-1][2]["result"] == 1


BURST = "def main():\n    block = bytearray(32 * 1024 * 1024)\n    return len(block)\n"


async def test_a_burst_never_commits_more_memory_than_the_budget(make_server):
    """200 executes, each with a 64 MiB limit that it half uses, against a 256 MiB
    budget: at most four run at once, the rest wait in the queue, all finish."""
    from test_http import aget, figures

    srv = make_server("--memory-budget", "256M")
    results: list[dict] = []
    peaks = {"running": 0.0, "memory": 0.0}
    budget = 256 * 1024 * 1024

    async def client(n: int) -> None:
        # All sent at once, then one reader takes the replies and frames (the
        # raw client is not for concurrent readers).
        async with connect(srv.url) as c:
            for rid in range(100, 100 + n):
                await c.send({"op": "execute", "id": rid, "code": BURST, "queue": 170,
                              "limits": {"memory_bytes": 64 * 1024 * 1024}})
            exits = 0
            while exits < n:
                await c._read_one()
                for r in c.replies.values():
                    assert r["ok"], r
                c.replies.clear()
                while c.events:
                    ev = c.events.popleft()
                    for frame in ev.get("frames", ()):
                        if frame[1] == "exit":
                            results.append(frame[2])
                            exits += 1

    async def watch(done: trio.Event) -> None:
        while not done.is_set():
            _, _, body = await aget(srv.port, "/metrics")
            got = figures(body)
            assert got[("bento_memory_budget_bytes", ())] == budget
            peaks["running"] = max(peaks["running"], got[("bento_running", ())])
            peaks["memory"] = max(peaks["memory"], got[("bento_memory_committed_bytes", ())])
            await trio.sleep(0.1)

    done = trio.Event()
    with trio.fail_after(110):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch, done)
            async with trio.open_nursery() as clients:
                for _ in range(4):
                    clients.start_soon(client, 50)
            done.set()
    assert len(results) == 200
    assert all(r["state"] == "exited" and r["result"] == 32 * 1024 * 1024 for r in results), results[:3]
    assert 1 <= peaks["running"] <= 4 and peaks["memory"] <= budget, peaks
    _, _, body = await aget(srv.port, "/metrics")
    got = figures(body)
    assert got[("bento_running", ())] == 0 and got[("bento_queued_executes", ())] == 0
    assert got[("bento_key_executes_total", (("key", "-"),))] == 200


async def test_share_rotate_and_revoke_the_viewer_token_and_the_audit_lines(make_server):
    srv = make_server("--pool", "0", "--log-level", "INFO")
    async with connect(srv.url) as owner, connect(srv.url) as viewer:
        r = await owner.ok("execute", code=WAIT_INPUT, attach=False)
        sid, old = r["session"], r["viewer_token"]
        await viewer.ok("attach", token=old)
        rotated = await owner.ok("share", token=r["token"], viewer="rotate")
        new = rotated["viewer_token"]
        assert new.startswith("btv_") and new != old
        ev = await viewer.event(ev="error", session=sid)
        assert ev["error"]["code"] == "forbidden" and "revoked" in ev["error"]["message"]
        assert (await viewer.request("attach", token=old))["error"]["code"] == "not_found"
        await viewer.ok("attach", token=new)
        refused = await viewer.request("share", token=new, viewer="rotate")
        assert refused["error"]["code"] == "forbidden"
        assert (await owner.ok("share", token=r["token"], viewer="revoke"))["viewer_token"] is None
        assert (await viewer.request("status", token=new))["error"]["code"] == "not_found"
    # A restarted server keeps the revocation.
    srv.kill()
    srv.start()
    async with connect(srv.url) as c:
        assert (await c.request("status", token=new))["error"]["code"] == "not_found"
        await c.ok("attach", token=r["token"])
        await c.send({"op": "input", "session": sid, "seq": 1, "data": "bye"})
        assert (await c.frames(sid))[-1][2]["result"] == "bye"
        await c.ok("destroy", token=r["token"])
    log = srv.read_log()
    for op in ("execute", "attach", "share.rotate", "share.revoke", "destroy"):
        assert f"audit op={op} key=- session={sid}" in log, op
    assert "bto_" not in log and "btv_" not in log


def quota_config(tmp_path, text: str) -> str:
    """A config file (rewritten in place for a reload) with keys alice and bob."""
    path = tmp_path / "bento.toml"
    path.write_text('sandbox = "none"\npool = 0\n' + text)
    os.chmod(path, 0o600)
    return str(path)


async def reload(srv, times: int) -> None:
    """SIGHUP, then wait until the log says it was handled ``times`` times in all."""
    srv.proc.send_signal(signal.SIGHUP)
    with trio.fail_after(10):
        while srv.read_log().count("server.reload") < times:
            await trio.sleep(0.05)


async def test_per_key_quotas_from_the_config_file_reload_on_sighup(make_server, tmp_path):
    config = quota_config(tmp_path, """
quota_sessions = 1
[keys.alice]
key = "k-alice"
quota = {sessions = 2, executes_per_minute = 2}
[keys.bob]
key = "k-bob"
""")
    srv = make_server("--config", config)
    async with connect(srv.url, auth="k-alice") as alice, connect(srv.url, auth="k-bob") as bob:
        # Bob has the default quota (quota_sessions = 1), alice her own (2).
        (b1,) = await start_waiting(bob, 1)
        r = await bob.request("execute", code=QUICK)
        assert (r["error"]["code"], r["error"]["quota"]) == ("quota", "sessions"), r
        a1, a2 = await start_waiting(alice, 2)
        r = await alice.request("execute", code=QUICK)
        assert (r["error"]["code"], r["error"]["quota"]) == ("quota", "sessions"), r
        assert "quota of concurrent sessions is 2" in r["error"]["message"]
        for run in (a1, a2):
            await finish(alice, run, "v")
        # Her two executes were her burst of executes_per_minute = 2.
        r = await alice.request("execute", code=QUICK)
        assert (r["error"]["code"], r["error"]["quota"]) == ("quota", "executes_per_minute"), r
        assert 0 < r["error"]["retry_after"] <= 30

        # A reload: alice has no rate quota now, bob a quota of his own.
        quota_config(tmp_path, """
quota_sessions = 1
[keys.alice]
key = "k-alice"
quota = {executes_per_minute = "none"}
[keys.bob]
key = "k-bob"
quota = {sessions = 3}
""")
        await reload(srv, 1)
        assert "server.reloaded" in srv.read_log() and "quotas=2" in srv.read_log()
        await start_waiting(bob, 2)  # three running now
        r = await bob.request("execute", code=QUICK)
        assert (r["error"]["code"], r["error"]["quota"]) == ("quota", "sessions"), r
        (a3,) = await start_waiting(alice, 1)  # no rate quota; her sessions are the default 1
        r = await alice.request("execute", code=QUICK)
        assert (r["error"]["code"], r["error"]["quota"]) == ("quota", "sessions"), r
        assert "quota of concurrent sessions is 1" in r["error"]["message"]

        # A file that cannot be used keeps what is in force.
        quota_config(tmp_path, '[keys.alice]\nkey = "k-alice"\nquota = {sessions = -1}\n')
        await reload(srv, 2)
        assert "server.reload_failed" in srv.read_log()
        assert "keys.alice.quota.sessions" in srv.read_log()
        r = await bob.request("execute", code=QUICK)
        assert (r["error"]["code"], r["error"]["quota"]) == ("quota", "sessions"), r
        await finish(alice, a3, "v")
        await finish(bob, b1, "v")
        r = await bob.ok("execute", code=QUICK)
        assert (await bob.frames(r["session"]))[-1][2]["result"] == 1


def test_a_quota_that_cannot_work_refuses_to_start(tmp_path):
    from test_config_file import refused

    data = str(tmp_path / "d")
    cases = [
        ('[keys.a]\nkey = "k"\nquota = {sessions = -1}\n', "keys.a.quota.sessions", "at least 0"),
        ('[keys.a]\nkey = "k"\nquota = {session = 1}\n', "keys.a.quota", "unknown quota 'session'"),
        ('[keys.a]\nkey = "k"\nquota = {environments = 1.5}\n', "environments", "whole number"),
        ('[keys.a]\nkey = "k"\nquota = {history_bytes = "lots"}\n', "history_bytes", "bad size"),
        ('[keys.a]\nkey = "k"\nquota = 3\n', "keys.a.quota", "must be a table"),
    ]
    for n, (text, name, message) in enumerate(cases):
        config = quota_config(tmp_path, text)
        os.rename(config, tmp_path / f"c{n}.toml")
        line = refused("--data-dir", data, "--config", str(tmp_path / f"c{n}.toml"))
        assert name in line and message in line, (text, line)
    # On the command line, argparse refuses it (its usage, then the line).
    r = subprocess.run([sys.executable, "-m", "bento.app", "server", "--port", "0", "--data-dir", data,
                        "--quota-environments", "-1"], capture_output=True, text=True, timeout=30, cwd=ROOT,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and "--quota-environments: must be at least 0, not -1" in r.stderr, r.stderr
