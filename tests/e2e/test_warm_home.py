"""End-to-end: a warm environment is handed out only once its sandbox is up.

A warm bwrap sandbox gets its home as an fd of a directory under
``DATA_DIR/warm`` (the ``work`` of its exchange's directory); when a session
takes the environment, that directory is renamed into ``sessions/``. bwrap turns the fd into a path early and
mounts by that path later, so a rename in between leaves the sandbox without
its home and it dies before the function runs. The pool must therefore count
an environment as ready only after its driver said ``up`` (all mounts done).

The tests put a ``bwrap`` of their own first on the server's PATH: it does
what bwrap does with ``--bind-fd`` (resolve the fd to its path, mount that
path), with the window between the two widened, or it never comes up for a
warm home. Either way the real bwrap runs the sandbox.
"""

from __future__ import annotations

import os
import re
import shutil
import time

import pytest
import trio
from helpers import ServerProcess, conn
from test_http import aget, figures

CODE = ("import os\n"
        "def main(i):\n"
        "    with open('mark.txt', 'w') as f:\n"
        "        f.write(str(i))\n"
        "    return [os.getcwd(), os.environ['HOME']]\n")

# A bwrap that resolves --bind-fd to a path, waits, then mounts by that path:
# bwrap's own order, with the window stretched to DELAY seconds. (A shell
# script: it resolves within a few ms of its start, as bwrap would.) With
# NEVER_UP set, a sandbox whose home is a warm one fails before it runs.
WRAPPER = """#!/bin/sh
n=$#; i=0; mode=; warm=
while [ $i -lt $n ]; do
    a=$1; shift; i=$((i + 1))
    case $mode in
        rest) set -- "$@" "$a"; continue ;;
        fd) p=$(readlink "/proc/self/fd/$a"); set -- "$@" --bind "$p"; mode=
            case $p in */warm/warm-*) warm=1 ;; esac
            continue ;;
    esac
    case $a in
        --bind-fd) mode=fd ;;
        --) mode=rest; set -- "$@" "$a" ;;
        *) set -- "$@" "$a" ;;
    esac
done
if [ -n "{never_up}" ] && [ -n "$warm" ]; then
    echo "bwrap: test: this warm sandbox never comes up" >&2
    exit 1
fi
sleep {delay}
exec {real} "$@"
"""


def wrapper_dir(tmp_path, delay: float, never_up: bool = False) -> str:
    real = shutil.which("bwrap")
    if real is None:
        pytest.skip("bwrap is not installed")
    d = tmp_path / "bin"
    d.mkdir()
    script = d / "bwrap"
    script.write_text(WRAPPER.format(real=real, delay=delay, never_up="1" if never_up else ""))
    script.chmod(0o755)
    return str(d)


def start_server(tmp_path, bindir: str, *extra: str) -> ServerProcess:
    """A server whose every environment is a bwrap of its own (this wrapper): not
    forked by the sandbox template, which mounts its homes itself."""
    path = f"PATH={bindir}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}"
    return ServerProcess(str(tmp_path / "data"), "--sandbox", "bwrap", "--no-sandbox-template", "--log-level",
                         "INFO", *extra, prefix=("env", path)).start()


async def run_all(url: str, n: int) -> list[tuple[dict, bytes]]:
    """``n`` executes back to back (none waits for another's end), then each one's exit and mark file."""
    async with conn(url) as c:
        started = [await c.ok("execute", code=CODE, args=[i]) for i in range(n)]
        out = []
        for r in started:
            frames = await c.frames(r["session"], timeout=60)
            got = await c.request("file_get", token=r["token"], path="mark.txt", offset=0, length=100)
            out.append((frames[-1][2], got.get("data", b"")))
        return out


async def warm_ready(port: int, timeout: float = 30) -> None:
    """Until the server's /metrics counts a warm environment as ready."""
    with trio.fail_after(timeout):
        while True:
            _, _, body = await aget(port, "/metrics")
            if figures(body).get(("bento_warm_pool", ())) == 1:
                return
            await trio.sleep(0.02)


@pytest.mark.deadline(240)
@pytest.mark.parametrize("fields", [{}, {"packages": ["six"]}], ids=["plain", "packages"])
async def test_a_warm_sandbox_taken_the_moment_the_pool_counts_it_keeps_its_home(tmp_path, fields):
    # The wrapper widens bwrap's window to 1.5 s: an environment taken as soon as
    # the pool counts it ready is inside that window unless ready means up. With
    # packages (uv installs six from the index, as in test_envs) the start
    # message waits for the build, but the home was renamed at the take already.
    srv = start_server(tmp_path, wrapper_dir(tmp_path, delay=1.5), "--pool", "1", "--pool-max", "1")
    results = []
    try:
        async with conn(srv.url) as c:
            started = []
            for i in range(4):
                await warm_ready(srv.port)
                started.append(await c.ok("execute", code=CODE, args=[i], **fields))
            for r in started:
                frames = await c.frames(r["session"], timeout=120)
                got = await c.request("file_get", token=r["token"], path="mark.txt", offset=0, length=100)
                results.append((frames[-1][2], got.get("data", b"")))
        log = srv.read_log()
    finally:
        srv.stop()
    ends = [(ex["state"], ex.get("error")) for ex, _mark in results]
    assert all(state == "exited" for state, _error in ends), ends
    for i, (ex, mark) in enumerate(results):
        assert ex["result"] == ["/home/bento", "/home/bento"], ex
        assert mark == str(i).encode()
    assert "Traceback" not in log, log


@pytest.mark.deadline(120)
async def test_a_warm_sandbox_that_never_comes_up_is_logged_and_retried_slowly(tmp_path):
    srv = start_server(tmp_path, wrapper_dir(tmp_path, delay=0, never_up=True), "--pool", "2")
    try:
        began = time.monotonic()
        await trio.sleep(6)
        # Executes go to cold environments meanwhile, and the server keeps serving.
        results = await run_all(srv.url, 2)
        elapsed = time.monotonic() - began
        log = srv.read_log()
        assert srv.proc is not None and srv.proc.poll() is None, log[-3000:]
    finally:
        srv.stop()
    for i, (ex, mark) in enumerate(results):
        assert ex["state"] == "exited", (ex, log[-3000:])
        assert mark == str(i).encode()
    failures = re.findall(r"warm pool: .*never comes up", log)
    assert failures, log[-3000:]
    # Retried at a bounded pace (the pause doubles from 1 s): a handful, not a tight loop.
    assert len(failures) <= 2 + elapsed, (len(failures), elapsed, log[-3000:])
    assert "Traceback" not in log, log[-3000:]
    # Nothing of a failed warm environment is left behind.
    assert len(os.listdir(tmp_path / "data" / "warm")) <= 2


async def test_a_warm_exchange_that_died_before_its_assign_leaves_nothing_in_the_cold_session(tmp_path):
    import psutil

    srv = ServerProcess(str(tmp_path / "data"), "--sandbox", "none", "--pool", "1", "--log-level", "INFO").start()
    try:
        await warm_ready(srv.port)
        assert srv.proc is not None
        warm = [p for p in psutil.Process(srv.proc.pid).children() if "--warm" in p.cmdline()]
        assert len(warm) == 1, [p.cmdline() for p in psutil.Process(srv.proc.pid).children()]
        warm[0].kill()
        warm[0].wait(10)
        results = await run_all(srv.url, 1)
        sessions = os.listdir(tmp_path / "data" / "sessions")
        left = [sorted(os.listdir(tmp_path / "data" / "sessions" / sid)) for sid in sessions]
        log = srv.read_log()
    finally:
        srv.stop()
    (ex, mark), = results
    assert ex["state"] == "exited" and mark == b"0", (ex, log[-3000:])
    # The cold start got a directory of its own: none of the warm one's empty copies.
    assert len(left) == 1 and not [n for n in left[0] if n.endswith(".new")], left
    assert "Traceback" not in log, log[-3000:]
