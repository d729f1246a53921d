"""The clients against a full server: Busy at once unless asked to wait, the
queue's position heard, and the CLI's one-line message and --wait."""

from __future__ import annotations

import time

import bento_clients
import pytest
import trio
from client_helpers import cli_env, run_cli, write_file

WAIT_INPUT = "def main():\n    return api.recv()\n"
QUICK = "def main():\n    return 1\n"


async def test_sdk_fails_at_once_unless_asked_to_wait(make_server):
    srv = make_server("--max-sessions", "1", "--pool", "0")
    with trio.fail_after(60):
        async with bento_clients.connect(srv.url) as c:
            first = await c.execute(WAIT_INPUT)
            t0 = time.monotonic()
            with pytest.raises(bento_clients.Busy) as info:
                await c.execute(QUICK)
            assert time.monotonic() - t0 < 1.0
            assert info.value.limit == "sessions" and info.value.retry_after
            assert "--max-sessions 1" in str(info.value) and "wait" in str(info.value)
            positions: list[int] = []
            c.on_queued = positions.append
            made: list = []

            async def waiting() -> None:
                made.append(await c.execute(QUICK, wait=30))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(waiting)
                with trio.fail_after(10):
                    while not positions:
                        await trio.sleep(0.02)
                assert positions == [1] and not made
                await first.send("done")
            assert await first.result() == "done"
            assert await made[0].result() == 1


def test_cli_says_which_limit_and_waits_when_asked(make_server, tmp_path):
    srv = make_server("--max-sessions", "1", "--pool", "0")
    env = cli_env(str(tmp_path / "state" / "client.json"), srv.url)
    hold = write_file(str(tmp_path), "hold.py", "import time\ndef main():\n    time.sleep(4)\n    return 'held'\n")
    quick = write_file(str(tmp_path), "quick.py", QUICK)
    r = run_cli(["run", "-d", hold], env)
    assert r.returncode == 0, r.stderr
    r = run_cli(["run", quick], env)
    assert r.returncode != 0
    err = r.stderr.decode()
    assert "the server is full (sessions)" in err and "--wait" in err, err
    r = run_cli(["run", "--wait", "30", quick], env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "waiting in its queue, position 1" in r.stderr.decode()
