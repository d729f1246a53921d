"""End-to-end: a burst of executes beyond the warm pool's size all run, each
in a fresh environment of its own (the pool grows with the executes and never
hands an environment out twice). No timing is asserted: the bench measures
how fast (bench/backtoback.py)."""

from __future__ import annotations

import os

import trio
from helpers import conn
from test_http import aget, figures

CODE = ("import os\n"
        "def main(i):\n"
        "    found = sorted(os.listdir('.'))\n"
        "    with open('mark.txt', 'w') as f:\n"
        "        f.write(str(i))\n"
        "    return [i, found]\n")
BURST = 12


async def test_a_burst_beyond_the_pool_all_runs_each_in_a_fresh_environment(make_server):
    srv = make_server("--pool", "1", "--pool-max", "4")
    results: dict[int, list] = {}
    sessions: dict[int, str] = {}

    async def one(i: int) -> None:
        async with conn(srv.url) as c:
            r = await c.ok("execute", code=CODE, args=[i])
            sessions[i] = r["session"]
            frames = await c.frames(r["session"], timeout=60)
            exit_frame = frames[-1][2]
            assert exit_frame["state"] == "exited", exit_frame
            results[i] = exit_frame["result"]

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            for i in range(BURST):
                nursery.start_soon(one, i)
    # Each ran, and each found its home empty: no environment was used twice.
    assert results == {i: [i, []] for i in range(BURST)}
    for i, sid in sessions.items():
        with open(os.path.join(srv.data_dir, "sessions", sid, "work", "mark.txt")) as f:
            assert f.read() == str(i)
    assert len(set(sessions.values())) == BURST
    # The pool is kept between its floor and its maximum.
    _, _, body = await aget(srv.port, "/metrics")
    assert 1 <= figures(body)[("bento_warm_pool_target", ())] <= 4
