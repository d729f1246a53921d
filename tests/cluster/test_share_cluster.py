"""share in a cluster, where it can go wrong: while Redis is out of reach,
beyond the last 16 retired viewer tokens, and racing a destroy. A viewer token
that share took away must not read anything anywhere, and nothing of a
destroyed session may stay in Redis."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import trio
from helpers import ServerProcess, connect, wait_status

FOREVER = "import time\ndef main():\n    while True:\n        time.sleep(0.05)\n"


def token_keys_of(port: int, sid: str) -> list[str]:
    """The token keys in the Redis on ``port`` that name session ``sid``."""
    def cli(*args: str) -> str:
        return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout

    return [k for k in cli("--scan", "--pattern", "bento:token:*").split() if sid in cli("GET", k)]


async def test_share_while_redis_is_down_takes_the_token_away_here_and_soon_everywhere(durable_redis, tmp_path):
    url = durable_redis.url
    a = ServerProcess(str(tmp_path / "a"), "--cluster", url, "--node", "sa").start()
    b = ServerProcess(str(tmp_path / "b"), "--cluster", url, "--node", "sb").start()
    try:
        async with connect(a.url) as ca, connect(b.url) as cb:
            r = await ca.ok("execute", code=FOREVER, attach=False)
            old = r["viewer_token"]
            await wait_status(cb, old, lambda st: st["state"] == "running")
            durable_redis.stop()
            err = (await ca.request("share", token=r["token"], viewer="rotate"))["error"]
            assert err["code"] == "unavailable" and err["viewer_token"].startswith("btv_"), err
            # The CLI keeps and prints the new token, and says what Redis did not take.
            env = {**{k: v for k, v in os.environ.items() if not k.startswith("BENTO_")},
                   "BENTO_CLIENT_STATE": str(tmp_path / "state.json"), "BENTO_CONFIG": str(tmp_path / "none.toml")}
            cli = await trio.to_thread.run_sync(lambda: subprocess.run(
                [sys.executable, "-m", "bento.app", "share", "--server", a.url, "--rotate", r["token"]],
                capture_output=True, text=True, env=env, timeout=60))
            assert cli.returncode == 0 and "warning" in cli.stderr and "Redis" in cli.stderr, cli
            new = cli.stdout.strip()
            assert new.startswith("btv_") and new != err["viewer_token"], cli
            # The node that runs it refuses the old token at once, Redis or not.
            for retired in (old, err["viewer_token"]):
                gone = (await ca.request("status", token=retired))["error"]
                assert gone["code"] == "not_found" and gone["replaced"] is True, gone
            durable_redis.start()
            back = time.monotonic()
            worked: dict[str, list[float]] = {"a": [], "b": []}
            async with connect(b.url) as cb2:
                while time.monotonic() - back < 6:
                    for name, c in (("a", ca), ("b", cb2)):
                        if (await c.request("status", token=old)).get("ok"):
                            worked[name].append(time.monotonic() - back)
                    await trio.sleep(0.05)
                await wait_status(cb2, new, lambda st: st["state"] == "running")
        assert not worked["a"], worked
        # Other nodes: until the node's next write (every second) reaches Redis.
        assert not worked["b"] or max(worked["b"]) < 2.5, worked
    finally:
        a.stop()
        b.stop()


async def test_token_keys_stay_at_the_last_16_and_go_with_the_session(nodes, redis_server):
    a, b = nodes
    async with connect(a.url) as c:
        r = await c.ok("execute", code=FOREVER, attach=False)
        first = r["viewer_token"]
        for _ in range(20):
            await c.ok("share", token=r["token"], viewer="rotate")
        assert len(token_keys_of(redis_server.port, r["session"])) == 2 + 16  # owner, viewer, retired
        for srv in (a, b):
            async with connect(srv.url) as v:
                err = (await v.request("status", token=first))["error"]
                assert err["code"] == "not_found" and "replaced" not in err, err  # forgotten beyond 16
        await c.ok("destroy", token=r["token"])
    with trio.fail_after(5):
        while token_keys_of(redis_server.port, r["session"]):
            await trio.sleep(0.1)


async def ask(answers: dict, c, op: str, fields: dict) -> None:
    answers[op] = await c.request(op, **fields)


async def test_share_racing_destroy_leaves_no_token_in_redis(nodes, redis_server):
    a, _ = nodes
    sids = []
    for _ in range(10):
        async with connect(a.url) as c1, connect(a.url) as c2:
            r = await c1.ok("execute", code=FOREVER, attach=False)
            await wait_status(c1, r["token"], lambda st: st["state"] == "running")
            answers: dict[str, dict] = {}
            async with trio.open_nursery() as n:
                n.start_soon(ask, answers, c1, "share", {"token": r["token"], "viewer": "rotate"})
                n.start_soon(ask, answers, c2, "destroy", {"token": r["token"]})
            assert answers["destroy"]["ok"], answers
            sids.append(r["session"])
    with trio.fail_after(5):
        while any(token_keys_of(redis_server.port, sid) for sid in sids):
            await trio.sleep(0.1)


async def test_shares_while_redis_is_down_leave_no_forgotten_token_behind(durable_redis, tmp_path):
    """16 shares while Redis is out of reach, then two once it is back, before the
    node's next retry: the two forget the oldest viewer tokens, and no retry of
    an earlier share may write those back (each would stay in Redis, ``retired``,
    until the session goes)."""
    a = ServerProcess(str(tmp_path / "a"), "--cluster", durable_redis.url, "--node", "sa").start()
    try:
        async with connect(a.url) as c:
            r = await c.ok("execute", code=FOREVER, attach=False)
            durable_redis.stop()
            for _ in range(16):
                err = (await c.request("share", token=r["token"], viewer="rotate"))["error"]
                assert err["code"] == "unavailable", err
            durable_redis.start()
            for _ in range(2):
                await c.ok("share", token=r["token"], viewer="rotate")
            await trio.sleep(2.5)  # the node's retries (every second) are done by now
            keys = token_keys_of(durable_redis.port, r["session"])
            assert len(keys) == 2 + 16, keys  # owner, viewer, the last 16 retired
            await c.ok("destroy", token=r["token"])
        with trio.fail_after(5):
            while token_keys_of(durable_redis.port, r["session"]):
                await trio.sleep(0.1)
    finally:
        a.stop()
