"""The server fails closed: no empty API key, no limit it cannot hold, one server
per data dir. Each case was a way to run with less protection than the
operator asked for, with nothing said."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import urllib.request

import bento_sandbox
import pytest
from bento_sandbox.spawn import Process
from helpers import ROOT, ServerProcess, connect

RETURN_ONE = "def main():\n    return 1\n"


def start_server(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """`bento server ARGS` expected to refuse at once (it would run forever otherwise)."""
    return subprocess.run([sys.executable, "-m", "bento.app", "server", "--port", "0", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


# -- an empty API key is no key -------------------------------------------------------


@pytest.mark.parametrize("key", ["", "   ", "\t"])
def test_blank_api_key_refuses_to_start(tmp_path, key):
    """`--api-key "$KEY"` with KEY unset must not serve anyone on a public address."""
    r = start_server("--host", "0.0.0.0", "--api-key", key, "--data-dir", str(tmp_path / "d"))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "empty or blank" in r.stderr and "listening" not in r.stdout, r.stderr


@pytest.mark.parametrize("value", ["", " ", "k1,", "k1, ,k2"])
def test_a_blank_bento_api_keys_refuses_to_start(tmp_path, value):
    """BENTO_API_KEYS="$KEYS" with KEYS unset was taken as no keys at all."""
    r = subprocess.run([sys.executable, "-m", "bento.app", "server", "--port", "0", "--data-dir",
                        str(tmp_path / "d")], capture_output=True, text=True, timeout=30, cwd=ROOT,
                       env={**os.environ, "BENTO_API_KEYS": value})
    assert r.returncode == 2 and "empty or blank" in r.stderr and "BENTO_API_KEYS" in r.stderr, r.stderr


def test_blank_api_key_next_to_a_real_one_refuses_too(tmp_path):
    r = start_server("--api-key", "s3cret", "--api-key", "", "--data-dir", str(tmp_path / "d"))
    assert r.returncode == 2 and "empty or blank" in r.stderr, r.stderr


# -- one data dir, one server ----------------------------------------------------------


async def test_second_server_on_a_data_dir_is_refused(make_server, tmp_path):
    first = make_server("--sandbox", "none")
    r = start_server("--sandbox", "none", "--data-dir", first.data_dir)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert first.proc is not None and f"pid {first.proc.pid}" in r.stderr, r.stderr
    assert "in use by another server" in r.stderr


async def test_data_dir_lock_goes_with_a_killed_server(tmp_path):
    """kill -9 of the server frees the data dir for the next one, even though its
    exchanges (which outlive it) keep running."""
    data = str(tmp_path / "d")
    srv = ServerProcess(data, "--sandbox", "none").start()
    try:
        async with connect(srv.url) as c:
            r = await c.ok("execute", code="def main():\n    return api.recv()\n", attach=False)
        srv.kill(signal.SIGKILL)
        nxt = ServerProcess(data, "--sandbox", "none").start()
        try:
            async with connect(nxt.url) as c:
                await c.ok("attach", token=r["token"], **{"from": 1})
                await c.send({"op": "input", "session": r["session"], "seq": 1, "data": "ok"})
                frames = await c.frames(r["session"])
            assert frames[-1][2]["result"] == "ok", frames
        finally:
            nxt.stop()
    finally:
        srv.stop()


# -- limits: enforced for the whole environment, or refused ------------------------------


def test_environment_refuses_a_limit_no_cgroup_holds():
    proc = subprocess.Popen(["true"])
    proc.wait()
    env = bento_sandbox.Environment(Process(proc.pid), None, {}, signal_exit_codes=False)
    with pytest.raises(bento_sandbox.Unenforceable) as err:
        env.apply(bento_sandbox.Limits(pids=10, memory_bytes=1 << 29, wall_s=5))
    assert err.value.names == ["memory_bytes", "pids"], err.value
    enforced, rlimits = env.apply(bento_sandbox.Limits(pids=10, memory_bytes=1 << 29, wall_s=5),
                                  strict=False)
    assert "per process only" in enforced["memory_bytes"] and "pids" not in enforced, enforced
    assert enforced["wall_s"] and rlimits["RLIMIT_AS"] == (1 << 29, 1 << 29)


def _hidden_cgroups() -> tuple[str, ...]:
    """A command prefix that runs the server with /sys/fs/cgroup hidden (a private
    mount namespace with an empty tmpfs there), as under `ip netns exec` or in some
    containers; skips where this cannot be done."""
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or unshare is None:
        pytest.skip("hiding cgroups needs root and unshare(1)")
    probe = subprocess.run([unshare, "--mount", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs none /sys/fs/cgroup && ls /sys/fs/cgroup"],
                           capture_output=True, text=True, timeout=20)
    if probe.returncode != 0 or probe.stdout.strip():
        pytest.skip(f"cannot hide cgroups here: {probe.stderr.strip()}")
    return (unshare, "--mount", "--propagation", "private", "sh", "-c",
            'mount -t tmpfs none /sys/fs/cgroup && exec "$@"', "sh")


def test_cgroupless_server_refuses_a_maximum_it_cannot_hold(tmp_path):
    prefix = _hidden_cgroups()
    r = subprocess.run([*prefix, sys.executable, "-m", "bento.app", "server", "--port", "0",
                        "--data-dir", str(tmp_path / "d"), "--max-limit", "memory_bytes=536870912"],
                       capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "cannot enforce memory_bytes" in r.stderr and "--allow-unenforced-limits" in r.stderr


FORKS = """
import os, time
def main(n):
    made = 0
    for _ in range(n):
        try:
            if os.fork() == 0:
                time.sleep(2)
                os._exit(0)
            made += 1
        except OSError:
            break
    return made
"""


async def test_cgroupless_server_refuses_limits_it_cannot_hold(tmp_path):
    srv = ServerProcess(str(tmp_path / "d"), prefix=_hidden_cgroups()).start()
    try:
        async with connect(srv.url) as c:
            for limits in ({"pids": 10}, {"memory_bytes": 512 << 20}, {"cpu_s": 5}):
                bad = await c.request("execute", code=FORKS, args=[60], limits=limits)
                key = next(iter(limits))
                assert not bad["ok"] and bad["error"]["code"] == "bad_request", bad
                assert f"limit {key} cannot be enforced" in bad["error"]["message"], bad
            # Without those limits it runs, and status does not pretend.
            r = await c.ok("execute", code=RETURN_ONE, limits={"wall_s": 10})
            assert (await c.frames(r["session"]))[-1][2]["result"] == 1
            st = await c.ok("status", token=r["token"])
        assert "pids" not in st["enforced"] and "memory_bytes" not in st["enforced"], st
    finally:
        srv.stop()


async def test_cgroupless_server_with_allow_unenforced_says_so(tmp_path):
    srv = ServerProcess(str(tmp_path / "d"), "--allow-unenforced-limits",
                        prefix=_hidden_cgroups()).start()
    try:
        async with connect(srv.url) as c:
            r = await c.ok("execute", code=FORKS, args=[20],
                           limits={"pids": 10, "memory_bytes": 512 << 20, "wall_s": 20})
            ex = (await c.frames(r["session"], timeout=30))[-1][2]
            st = await c.ok("status", token=r["token"])
        # Accepted knowingly: the forks are not held, and status says what little is.
        assert ex["state"] == "exited" and ex["result"] == 20, ex
        assert "pids" not in st["enforced"], st["enforced"]
        assert "per process only" in st["enforced"]["memory_bytes"], st["enforced"]
    finally:
        srv.stop()


def _start_lines(srv: ServerProcess) -> str:
    """What the server printed at start: all of it once it answers a request
    (the lines are printed before it serves)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/healthz", timeout=10) as r:
        assert r.status == 200
    return srv.printed("bento: default limits:")


def test_start_lines_say_the_capacity_and_what_each_limit_is_held_by(tmp_path):
    srv = ServerProcess(str(tmp_path / "d"), "--max-sessions", "7", "--memory-budget", "3GiB",
                        "--disk-floor", "100MiB").start()
    try:
        out = _start_lines(srv)
    finally:
        srv.stop()
    assert "bento: capacity 7 running functions, memory budget 3072 MiB" in out, out
    assert "disk floor 100 MiB" in out, out
    held = next(ln for ln in out.splitlines() if ln.startswith("bento: limits enforced: "))
    warned = next((ln for ln in out.splitlines() if "limits this machine cannot enforce" in ln), "")
    # Every limit is either named with what holds it, or named as not enforceable.
    for key in bento_sandbox.Limits.KEYS:
        assert f"{key} by " in held or key in warned, (key, held, warned)


def test_the_default_limits_line_says_what_an_execute_gets(tmp_path):
    """A maximum below a built-in default lowers that default (as an execute
    sees it), and the capacity counts it; values are written with units."""
    srv = ServerProcess(str(tmp_path / "d"), "--max-limit", "memory_bytes=512MiB").start()
    try:
        out = _start_lines(srv)
    finally:
        srv.stop()
    line = next(ln for ln in out.splitlines() if ln.startswith("bento: default limits: "))
    assert "memory_bytes=512MiB" in line and "wall_s=1d" in line and "cpu_s=4h" in line, line
    assert "a function without a memory limit counts 512 MiB" in out, out


def test_start_lines_name_the_limits_a_cgroupless_machine_refuses(tmp_path):
    srv = ServerProcess(str(tmp_path / "d"), prefix=_hidden_cgroups()).start()
    try:
        out = _start_lines(srv)
    finally:
        srv.stop()
    warned = next(ln for ln in out.splitlines() if "limits this machine cannot enforce" in ln)
    assert "pids" in warned and "refused" in warned, warned
    assert "pids by " not in next(ln for ln in out.splitlines() if ln.startswith("bento: limits enforced: "))


async def test_a_memory_limit_below_what_the_environment_uses_says_why(make_server):
    """The cgroup refuses a limit under the environment's present use (EBUSY):
    said as that, not as a machine without a memory cgroup."""
    if "memory_bytes" not in bento_sandbox.enforcement():
        pytest.skip("no writable memory cgroup here")
    srv = make_server()
    async with connect(srv.url) as c:
        r = await c.ok("execute", code=RETURN_ONE, limits={"memory_bytes": 64 * 1024})
        ex = (await c.frames(r["session"]))[-1][2]
    assert ex["state"] == "failed", ex
    assert "refused 65536 bytes" in ex["error"]["message"] and "no writable" not in ex["error"]["message"], ex
