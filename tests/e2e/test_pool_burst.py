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


def _cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().decode().split("\0")


async def test_executes_that_find_no_warm_exchange_get_one_forked_from_the_template(make_server):
    # The pool's one warm exchange goes to the first execute; the others of the
    # burst start cold, each with an exchange forked from the template (no
    # Python start of its own), which still runs its session to the end.
    srv = make_server("--pool", "1", "--pool-max", "1")
    code = "def main():\n    return api.recv()\n"
    async with conn(srv.url) as c:
        made = [await c.ok("execute", code=code, attach=False) for _ in range(4)]
        kinds = []
        for r in made:
            sdir = os.path.join(srv.data_dir, "sessions", r["session"])
            with open(os.path.join(sdir, "exchange.pid")) as f:
                argv = _cmdline(int(f.read()))
            kinds.append("forked" if "--template" in argv else "warm" if "--warm" in argv else "own")
        assert kinds.count("own") == 0, kinds  # (a warm one may be its own process: executes came slowly)
        assert kinds.count("forked") >= 2, kinds
        for r in made:
            await c.ok("attach", token=r["token"], start=1)
            await c.send({"op": "input", "session": r["session"], "seq": 1, "data": b"go"})
            frames = await c.frames(r["session"], timeout=30)
            assert frames[-1][2]["state"] == "exited" and frames[-1][2]["result"] == b"go", frames[-1]
