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
