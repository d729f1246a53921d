"""End-to-end: warm environments forked by the sandbox template
(driver/bento_driver/template.py), each in a sandbox of its own.

The abuse suite runs every attack on a forked environment too (its ``forked``
backend); these are what is particular to forking: two at once see nothing of
each other, exit codes and signals come back through pid 1's report, a
forked function outlives a server killed with SIGKILL (the template dies
with the server; its forks do not), and a template that cannot run here is
said once and replaced by a bwrap per environment.
"""

from __future__ import annotations

import os
import shutil

import pytest
import trio
from helpers import ServerProcess, conn, proc_entry, read_pid, read_proc, warm_pids
from test_http import aget, figures

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap (bwrap) is not installed")

LOOK = """
import os, socket, time
def main(mark, wait):
    open(os.path.join(os.environ["HOME"], mark), "w").write(mark)
    open(os.path.join("/tmp", mark), "w").write(mark)
    time.sleep(wait)  # (the other one runs meanwhile)
    with socket.socket() as s:  # loopback is up, as under bwrap
        s.bind(("127.0.0.1", 0))
        s.listen()
    caps = [l.split()[1] for l in open("/proc/self/status") if l.startswith(("CapEff", "CapBnd"))]
    import ctypes
    nested = ctypes.CDLL(None, use_errno=True).unshare(0x10000000) == 0  # CLONE_NEWUSER
    return {"home": sorted(os.listdir(os.environ["HOME"])), "tmp": sorted(os.listdir("/tmp")),
            "pwd": os.environ.get("PWD"), "tmp_mode": oct(os.stat("/tmp").st_mode & 0o7777),
            "homes": sorted(os.listdir("/opt/bento/homes")), "host": socket.gethostname(),
            "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()), "pid": os.getpid(),
            "caps": caps, "nested_userns": nested, "uid": os.getuid()}
"""

FORKED = "import os\ndef main():\n    return os.path.exists('/opt/bento/homes')\n"  # (True only in a fork)


async def warm_forked(srv: ServerProcess, count: int, timeout: float = 20) -> None:
    """Until ``count`` warm environments are up; each was forked by the template."""
    with trio.fail_after(timeout):
        while len(pids := warm_pids(srv.data_dir, "env.pid")) < count:
            await trio.sleep(0.02)
    for pid in pids:
        assert b"bento_driver.template" in (read_proc(pid, "cmdline") or b""), pid


async def test_two_forked_environments_at_once_see_nothing_of_each_other(make_server):
    srv = make_server("--pool", "2")
    await warm_forked(srv, 2)
    async with conn(srv.url) as c:
        a = await c.ok("execute", code=LOOK, args=["a", 1.0])
        b = await c.ok("execute", code=LOOK, args=["b", 0.5])
        got = {}
        for mark, r in (("a", a), ("b", b)):
            ex = (await c.frames(r["session"], timeout=30))[-1][2]
            assert ex["state"] == "exited", ex
            got[mark] = ex["result"]
    for mark in "ab":
        seen = got[mark]
        assert seen["home"] == [mark] and seen["tmp"] == [mark], seen
        assert seen["homes"] == [], seen  # every warm home, covered
        assert seen["pids"] == [1, 2] and seen["pid"] == 2, seen
        assert seen["host"] == "bento" and seen["uid"] == 65534, seen
        assert seen["pwd"] == "/home/bento" and seen["tmp_mode"] == "0o755", seen  # (as bwrap's)
        assert all(int(c, 16) == 0 for c in seen["caps"]) and not seen["nested_userns"], seen


async def test_exit_codes_and_signals_of_a_forked_function(make_server):
    srv = make_server("--pool", "2")
    async with conn(srv.url) as c:
        cases = [("import sys\ndef main():\n    sys.exit(3)\n", ("exited", 3, None)),
                 ("import os, signal\ndef main():\n    os.kill(os.getpid(), signal.SIGKILL)\n",
                  ("killed", None, "KILL")),
                 ("def main():\n    return 4\n", ("exited", 0, None))]
        for code, (state, exit_code, sig) in cases:
            await warm_forked(srv, 1)
            ex = await c.exit_of(code)
            assert (ex["state"], ex["code"], ex["signal"]) == (state, exit_code, sig), ex
        # A signal from the client: TERM ends it, and it is told as TERM.
        await warm_forked(srv, 1)
        r = await c.ok("execute", code="import time\ndef main():\n    print('up')\n    time.sleep(60)\n")
        await c.frames(r["session"], until_exit=False, count=1)
        await c.ok("signal", token=r["token"], signal="TERM")
        ex = (await c.frames(r["session"]))[-1][2]
        assert ex["state"] == "killed" and ex["signal"] == "TERM", ex


async def test_a_forked_function_outlives_a_server_killed_with_sigkill(make_server, tmp_path):
    data = str(tmp_path / "data")
    old = make_server("--pool", "1", data_dir=data)
    await warm_forked(old, 1)
    code = ("import time\ndef main():\n    print('before')\n    time.sleep(3)\n    print('after')\n"
            "    return 9\n")
    async with conn(old.url) as c:
        r = await c.ok("execute", code=code)
        frames = await c.frames(r["session"], until_exit=False, count=1)
    assert frames[0][2] == b"before\n", frames
    old.kill()  # SIGKILL: the template goes with it (its stdin closes); its forks stay
    new = make_server("--pool", "1", data_dir=data)
    async with conn(new.url) as c:
        await c.ok("attach", token=r["token"], **{"from": 1})
        frames = await c.frames(r["session"], timeout=30)
    outs = [f[2] for f in frames if f[1] == "stdout"]
    assert b"".join(outs) == b"before\nafter\n", frames
    assert frames[-1][2]["state"] == "exited" and frames[-1][2]["result"] == 9, frames[-1]


async def test_a_silent_warm_function_is_reached_by_the_next_server(make_server, tmp_path):
    """A warm exchange binds the socket for a later server after the function's
    first output, or a moment later when there is none: a server killed right
    after answering the execute of a function that prints nothing leaves a
    session the next server reaches while it runs."""
    data = str(tmp_path / "data")
    old = make_server("--pool", "1", data_dir=data)
    await warm_forked(old, 1)
    async with conn(old.url) as c:
        r = await c.ok("execute", code="import time\ndef main():\n    time.sleep(60)\n")
    old.kill()
    new = make_server("--pool", "1", data_dir=data)
    async with conn(new.url) as c:
        await c.ok("attach", token=r["token"], **{"from": 1})
        await c.ok("signal", token=r["token"], signal="TERM")
        frames = await c.frames(r["session"], timeout=15)
    assert [f[1] for f in frames] == ["exit"], frames
    assert frames[-1][2]["state"] == "killed" and frames[-1][2]["signal"] == "TERM", frames[-1]


async def test_a_warm_exchange_binds_its_socket_soon_whatever_its_function_does_first(make_server):
    """The first rounds after the hello end at their own deadline: a shared
    state put (saved at once) does not leave them waiting for the next event."""
    srv = make_server("--pool", "1")
    await warm_forked(srv, 1)
    async with conn(srv.url) as c:
        r = await c.ok("execute", code="import time\ndef main():\n    api.state.put(1)\n    time.sleep(30)\n")
        ctl = os.path.join(srv.data_dir, "sessions", r["session"], "ctl.sock")
        with trio.fail_after(0.8):  # (rounds that waited for an event: the 1 s work-dir check, or the end)
            while not os.path.exists(ctl):
                await trio.sleep(0.01)
        await c.ok("destroy", token=r["token"])


async def test_a_warm_exchange_writes_its_errors_to_the_sessions_exchange_log(make_server):
    """docs/operations.md: a session's exchange.log holds its exchange's own
    errors. A warm exchange's went nowhere (its stderr was /dev/null)."""
    srv = make_server("--pool", "1")
    await warm_forked(srv, 1)
    async with conn(srv.url) as c:
        r = await c.ok("execute", code="import time\ndef main():\n    time.sleep(30)\n")
        sdir = os.path.join(srv.data_dir, "sessions", r["session"])
        with trio.fail_after(10):
            while not os.path.exists(os.path.join(sdir, "ctl.sock")):
                await trio.sleep(0.01)
        # Not a server: the exchange drops this connection and says why. (The
        # server it replaced may connect again first and replace it unread: tried again.)
        log = os.path.join(sdir, "exchange.log")
        for _ in range(20):
            sock = _control_connection(sdir)
            sock.sendall(b"\xff" * 64)
            with trio.move_on_after(0.5):
                while "broke the wire" not in _text(log):
                    await trio.sleep(0.02)
            sock.close()
            if "broke the wire" in _text(log):
                break
        assert "broke the wire" in _text(log), _text(log)
        await c.ok("destroy", token=r["token"])


def _text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


def _control_connection(sdir: str):  # type: ignore[no-untyped-def]
    import socket

    from bento_sandbox.unix import short_path

    sock = socket.socket(socket.AF_UNIX)
    with short_path(os.path.join(sdir, "ctl.sock")) as path:
        sock.connect(path)
    return sock


def failing_template_bwrap(tmp_path) -> str:
    """A bwrap first on PATH that fails the sandbox template's start, and runs the real one otherwise."""
    real = shutil.which("bwrap")
    d = tmp_path / "bin"
    d.mkdir()
    script = d / "bwrap"
    script.write_text(f"""#!/bin/sh
case "$*" in *bento_driver.template*) echo "bwrap: test: no template here" >&2; exit 1 ;; esac
exec {real} "$@"
""")
    script.chmod(0o755)
    return str(d)


async def test_a_template_that_cannot_start_is_said_once_and_bwrap_does_the_work(tmp_path):
    path = f"PATH={failing_template_bwrap(tmp_path)}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}"
    srv = ServerProcess(str(tmp_path / "data"), "--log-level", "INFO", "--pool", "2",
                        prefix=("env", path)).start()
    try:
        async with conn(srv.url) as c:
            for _ in range(3):
                ex = await c.exit_of(FORKED)
                assert ex["state"] == "exited" and ex["result"] is False, ex
        log = srv.read_log()
        _, _, body = await aget(srv.port, "/metrics")
    finally:
        srv.stop()
    assert figures(body)[("bento_sandbox_template_up", ())] == 0
    said = [line for line in log.splitlines() if "sandbox template" in line]
    assert len(said) == 1 and "not used" in said[0] and "no template here" in said[0], said


async def test_a_forked_environment_dies_with_its_exchange(make_server):
    import signal

    srv = make_server("--pool", "1")
    await warm_forked(srv, 1)
    async with conn(srv.url) as c:
        r = await c.ok("execute", code="import time\ndef main():\n    print('up')\n    time.sleep(60)\n")
        await c.frames(r["session"], until_exit=False, count=1)
    sdir = os.path.join(srv.data_dir, "sessions", r["session"])
    pid1, exchange = read_pid(os.path.join(sdir, "env.pid")), read_pid(os.path.join(sdir, "exchange.pid"))
    assert pid1 is not None and exchange is not None
    with open(f"/proc/{pid1}/task/{pid1}/children") as f:
        driver = int(f.read().split()[0])
    os.kill(exchange, signal.SIGKILL)
    with trio.fail_after(10):
        while any((e := proc_entry(pid)) is not None and e.state != "Z" for pid in (driver, pid1)):
            await trio.sleep(0.02)


async def test_a_template_that_ends_is_started_again_and_forks_again(make_server):
    import signal

    srv = make_server("--log-level", "INFO", "--pool", "1")
    await warm_forked(srv, 1)
    with trio.fail_after(10):
        while "sandbox template started (pid" not in srv.read_log():
            await trio.sleep(0.05)
    first = int(srv.read_log().split("sandbox template started (pid ")[1].split(")")[0])
    os.kill(first, signal.SIGKILL)
    with trio.fail_after(20):
        while srv.read_log().count("sandbox template started (pid") < 2:
            await trio.sleep(0.05)
    log = srv.read_log()
    assert "sandbox template ended (exit code" in log and "started again in 1 s" in log, log[-2000:]
    _, _, body = await aget(srv.port, "/metrics")
    assert figures(body)[("bento_sandbox_template_up", ())] == 1
    async with conn(srv.url) as c:
        for _ in range(2):  # whatever the pool held meanwhile, then one forked again
            await warm_forked(srv, 1)
            ex = await c.exit_of(FORKED)
            assert ex["state"] == "exited", ex
    assert ex["result"] is True, ex


PID1 = """
import ctypes, os, signal, time
def main():
    libc = ctypes.CDLL(None, use_errno=True)
    traced = libc.ptrace(0x4206, 1, 0, 0) == 0  # PTRACE_SEIZE
    pidfd = os.pidfd_open(1)
    got = libc.syscall(438, pidfd, 3, 0)  # pidfd_getfd: pid 1's connection to the exchange
    os.kill(1, signal.SIGINT)  # (pid 1 has no handler for it: nothing happens)
    time.sleep(0.3)
    return {"traced": traced, "took_fd": got >= 0}
"""


async def test_the_function_cannot_trace_signal_or_rob_its_pid_1(make_server):
    # Pid 1 holds the connection that reports the exit: the function must not reach it.
    srv = make_server("--pool", "1")
    await warm_forked(srv, 1)
    async with conn(srv.url) as c:
        ex = await c.exit_of(PID1)
    assert ex["state"] == "exited" and ex["result"] == {"traced": False, "took_fd": False}, ex


@pytest.mark.deadline(90)
async def test_the_template_outlives_the_worker_thread_that_started_it(make_server):
    # trio starts processes from worker threads that end after 10 s idle: a
    # parent-death signal tied to one would end the template then.
    srv = make_server("--log-level", "INFO", "--pool", "1")
    await warm_forked(srv, 1)
    await trio.sleep(12)
    log = srv.read_log()
    assert log.count("sandbox template started") == 1 and "sandbox template ended" not in log, log[-2000:]
    async with conn(srv.url) as c:
        ex = await c.exit_of(FORKED)
    assert ex["state"] == "exited" and ex["result"] is True, ex


async def _template_socket(srv: ServerProcess, count: int) -> list:
    """``count`` connections to the server's sandbox template that send nothing
    (each accepted in order), once the template has started."""
    with trio.fail_after(10):
        while "sandbox template started (pid" not in srv.read_log():
            await trio.sleep(0.05)
    return [_template_connection(srv) for _ in range(count)]


def _template_connection(srv: ServerProcess):  # type: ignore[no-untyped-def]
    import socket

    from bento_sandbox.unix import short_path

    sock = socket.socket(socket.AF_UNIX)
    with short_path(os.path.join(srv.data_dir, "sandbox.sock")) as path:
        sock.connect(path)
    return sock


def _still_open(sock) -> bool:  # type: ignore[no-untyped-def]
    sock.setblocking(False)
    try:
        return sock.recv(1) != b""
    except BlockingIOError:
        return True


async def test_a_connection_that_sends_no_request_holds_up_no_fork(make_server):
    # The template reads each connection's request when it comes: one that
    # says nothing waits alone, and is closed after REQUEST_TIMEOUT_S.
    srv = make_server("--log-level", "INFO", "--pool", "0")  # (each execute's environment: forked now)
    [silent] = await _template_socket(srv, 1)  # (accepted before the execute's: the queue is in order)
    with silent:
        async with conn(srv.url) as c:
            ex = await c.exit_of(FORKED)
        assert ex["state"] == "exited" and ex["result"] is True, ex  # forked, not a bwrap
        assert _still_open(silent)  # the fork did not wait for it to time out
        silent.settimeout(10)
        assert silent.recv(1) == b""  # and then it was closed


async def test_at_most_64_connections_wait_for_their_request(make_server):
    from bento_driver.template import MAX_ASKING

    srv = make_server("--log-level", "INFO", "--pool", "0")
    socks = await _template_socket(srv, MAX_ASKING)
    try:
        async with conn(srv.url) as c:
            ex = await c.exit_of(FORKED)  # (well within the 2 s the others may wait)
        assert ex["state"] == "exited" and ex["result"] is True, ex
        assert not _still_open(socks[0])  # the oldest made room for the execute's connection
        assert all(_still_open(s) for s in socks[1:])
    finally:
        for s in socks:
            s.close()


async def test_a_request_that_came_is_answered_even_at_the_cap(make_server):
    # At 64 waiting, a new connection closes the oldest: never one whose
    # request came in the same round (the template answers before it accepts).
    import signal

    from bento_driver.template import MAX_ASKING

    srv = make_server("--log-level", "INFO", "--pool", "0")  # (nothing else talks to the template)
    socks = await _template_socket(srv, MAX_ASKING)  # socks[0]: the oldest
    template = _template_pid(srv)
    try:
        with trio.fail_after(5):  # until it has accepted them all
            while len(os.listdir(f"/proc/{template}/fd")) < MAX_ASKING + 4:
                await trio.sleep(0.01)
        os.kill(template, signal.SIGSTOP)  # (so that the request and the next connection come in one round)
        try:
            socks[0].sendall(b"not a request")
            socks.append(_template_connection(srv))
        finally:
            os.kill(template, signal.SIGCONT)
        socks[0].settimeout(5)
        assert socks[0].recv(100) == b"e not a request\n"
    finally:
        for s in socks:
            s.close()


@pytest.mark.deadline(60)
async def test_the_template_is_renewed_and_forks_go_on_meanwhile(make_server):
    # A new interpreter every --sandbox-template-renew: its forks share a new
    # hash secret. The old one keeps what came to it; no fork falls back to bwrap.
    srv = make_server("--log-level", "INFO", "--pool", "0", "--sandbox-template-renew", "1s")
    await _template_socket(srv, 0)  # (started)
    first = _template_pid(srv)
    secrets = set()
    async with conn(srv.url) as c:
        with trio.fail_after(40):
            while srv.read_log().count("sandbox template renewed") < 2:
                ex = await c.exit_of("import os\ndef main():\n    return [os.path.exists('/opt/bento/homes'), "
                                     "hash('bento')]\n")
                assert ex["state"] == "exited" and ex["result"][0] is True, ex  # forked, every one
                secrets.add(ex["result"][1])
                await trio.sleep(0.1)
            ex = await c.exit_of(FORKED)
    assert ex["result"] is True, ex
    log = srv.read_log()
    assert "sandbox template ended" not in log and "did not start" not in log, log[-2000:]
    assert len(secrets) >= 2, secrets  # (forks of different templates)
    _, _, body = await aget(srv.port, "/metrics")
    assert figures(body)[("bento_sandbox_template_up", ())] == 1
    with trio.fail_after(10):  # the first one was retired: it ends
        while (e := proc_entry(first)) is not None and e.state != "Z":
            await trio.sleep(0.1)


def _template_pid(srv: ServerProcess) -> int:
    """The running template's own pid (the child of its bwrap, which the log names)."""
    bwrap = int(srv.read_log().split("sandbox template started (pid ")[1].split(")")[0])
    with open(f"/proc/{bwrap}/task/{bwrap}/children") as f:
        return int(f.read().split()[0])
