"""An exchange whose session directory is deleted while no server is
connected ends itself and its environment (nothing could ever reach it)."""

from __future__ import annotations

import os
import shutil

import psutil
import trio
from helpers import connect


async def test_exchange_ends_when_its_session_dir_is_gone(make_server):
    srv = make_server()
    async with connect(srv.url) as c:
        r = await c.ok("execute", code="import time\ndef main():\n    time.sleep(60)\n", attach=False)
    sdir = os.path.join(srv.data_dir, "sessions", r["session"])
    with open(os.path.join(sdir, "exchange.pid")) as f:
        exchange = psutil.Process(int(f.read()))
    with open(os.path.join(sdir, "env.pid")) as f:
        env_pid = int(f.read())
    srv.kill()  # the exchange outlives the server, as it must
    await trio.sleep(0.5)
    assert exchange.is_running()
    shutil.rmtree(sdir)
    with trio.fail_after(15):
        while exchange.is_running() and exchange.status() != psutil.STATUS_ZOMBIE:
            await trio.sleep(0.2)
    with trio.fail_after(5):
        while psutil.pid_exists(env_pid) and psutil.Process(env_pid).status() != psutil.STATUS_ZOMBIE:
            await trio.sleep(0.1)


def cgroups_of(exchange_pid: int) -> list[str]:
    import bento_sandbox

    return [os.path.join(base, name) for base in bento_sandbox.detect_cgroups().values()
            for name in os.listdir(base) if name.endswith(f"-{exchange_pid}")]


def procs_in(cgroup: str) -> str:
    with open(os.path.join(cgroup, "cgroup.procs")) as f:
        return f.read().strip()


async def test_cgroups_of_a_killed_exchange_are_swept(make_server):
    """An exchange killed with SIGKILL cannot remove its environment's cgroups;
    the sweep does, and leaves a live session's alone. (The server runs it at
    start and every 10 minutes, Registry.reaper; here it is called directly.)"""
    import bento_sandbox

    if not bento_sandbox.detect_cgroups():
        import pytest

        pytest.skip("no cgroups usable here")
    srv = make_server("--pool", "0")
    code = "import time\ndef main():\n    time.sleep(60)\n"
    pids = []
    async with connect(srv.url) as c:
        for _ in range(2):
            r = await c.ok("execute", code=code, attach=False)
            with open(os.path.join(srv.data_dir, "sessions", r["session"], "exchange.pid")) as f:
                pids.append(int(f.read()))
        killed, live = pids
        assert cgroups_of(killed) and cgroups_of(live)
        os.kill(killed, 9)
        with trio.fail_after(10):  # its environment dies with it (parent-death signal)
            while any(procs_in(p) for p in cgroups_of(killed)):
                await trio.sleep(0.05)
        left = len(cgroups_of(killed))
        assert bento_sandbox.sweep_cgroups(min_age_s=0) >= left > 0
        assert cgroups_of(killed) == []
        assert cgroups_of(live), "a live session's cgroups were swept"
        st = await c.ok("status", token=r["token"])
        assert st["state"] == "running"
