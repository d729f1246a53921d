"""Redis down: a node answers what needs Redis with `unavailable` at once, and
keeps running its own sessions."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import bento_clients
import pytest
import trio
from helpers import TICKS, ServerProcess, connect, wait_status

PROMPT_S = 5.0  # an answer that needs Redis, with Redis down, comes within this


async def test_redis_down_answers_unavailable_and_sessions_keep_running(durable_redis, tmp_path):
    url = durable_redis.url
    a = ServerProcess(str(tmp_path / "a"), "--cluster", url, "--node", "ua").start()
    b = ServerProcess(str(tmp_path / "b"), "--cluster", url, "--node", "ub").start()
    try:
        async with connect(a.url) as ca, connect(b.url) as cb, bento_clients.connect(b.url) as client:
            r = await ca.ok("execute", code=TICKS, attach=False)
            sid = r["session"]
            await cb.ok("attach", token=r["viewer_token"], **{"from": 1})
            await cb.frames(sid, until_exit=False, count=3, timeout=30)
            reading = await client.attach(r["viewer_token"])
            durable_redis.stop(signal.SIGKILL)
            # The SDK's attachment through B ends with Unavailable, once: it does not loop.
            with trio.fail_after(15), pytest.raises(bento_clients.Unavailable, match="Redis"):
                async for _frame in reading.output():
                    pass
            # The attachment through B ends with the reason.
            ev = await cb.event(ev="error", session=sid, timeout=15)
            assert ev["error"]["code"] == "unavailable" and "Redis" in ev["error"]["message"], ev
            took = {}
            for op, fields in (("status", {"token": r["token"]}),
                               ("attach", {"token": r["token"], "from": 1}),
                               ("execute", {"code": TICKS, "idempotency_key": "k", "attach": False})):
                t0 = time.monotonic()
                got = await cb.request(op, timeout=PROMPT_S, **fields)
                took[op] = time.monotonic() - t0
                assert not got["ok"] and got["error"]["code"] == "unavailable", (op, got)
                assert "Redis" in got["error"]["message"]
            # Node A runs its session on: its output goes on growing, read on A.
            first = (await ca.ok("status", token=r["token"]))["next_seq"]
            st = await wait_status(ca, r["token"], lambda st: st["next_seq"] > first + 10, timeout=15)
            assert st["state"] == "running"
            await ca.ok("attach", token=r["viewer_token"], **{"from": first})
            assert len(await ca.frames(sid, until_exit=False, count=5, timeout=15)) >= 5
        # The SDK raises Unavailable once, with the reason; it does not loop.
        with trio.fail_after(PROMPT_S * 2):
            async with bento_clients.connect(b.url) as client:
                t0 = time.monotonic()
                with pytest.raises(bento_clients.Unavailable, match="Redis"):
                    await client.attach(r["token"])
                took["sdk attach"] = time.monotonic() - t0
        # The CLI says it in one line, at once.
        t0 = time.monotonic()
        env = {k: v for k, v in os.environ.items() if not k.startswith("BENTO_")}
        env.update(BENTO_CLIENT_STATE=str(tmp_path / "state.json"), BENTO_CONFIG=str(tmp_path / "none.toml"),
                   BENTO_SERVER=b.url)
        cli = subprocess.run([sys.executable, "-m", "bento.app", "status", r["token"]], capture_output=True,
                             env=env, timeout=60, stdin=subprocess.DEVNULL)
        cli_took = time.monotonic() - t0  # the interpreter's start included
        assert cli.returncode != 0
        assert b"the cluster is unavailable from this node" in cli.stderr, cli.stderr
        assert len(cli.stderr.decode().strip().splitlines()) == 1, cli.stderr
        print("\nanswered unavailable with Redis down in " +
              ", ".join(f"{op} {t * 1000:.0f} ms" for op, t in took.items()) +
              f"; the CLI's status command ran {cli_took * 1000:.0f} ms in all")
        assert all(t < PROMPT_S for t in took.values()), took
        assert cli_took < 4 * PROMPT_S
    finally:
        a.stop()
        b.stop()
