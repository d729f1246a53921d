"""The exchange template (bento/exchange_template.py, bento/template_link.py):
warm exchanges forked from one process that imported the exchange, each in a
session of its own; and when there is no template, the pool says so and starts
warm exchanges as processes of their own."""

from __future__ import annotations

import os
import sys

import pytest
import trio

from bento import exchange_paths, exchanges
from bento.template_link import Template, TemplateUnavailable


def _stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def boot() -> list[str]:
    path = exchange_paths.exchange_sys_path()
    return [exchange_paths.real_python(), "-I", "-S", "-c",
            f"import sys;sys.path[:0]={path!r};from bento.exchange import main;main(sys.argv[1:])"]


async def test_a_forked_warm_exchange_is_the_templates_child_in_a_session_of_its_own():
    async with trio.open_nursery() as nursery:
        template = Template(boot(), nursery)
        ours, pid = await template.fork_warm()
        ours2, pid2 = await template.fork_warm()
        assert template.proc is not None and pid != pid2
        for p in (pid, pid2):
            assert int(_stat(p)[1]) == template.proc.pid  # forked by the template
            with trio.fail_after(10):  # then it leaves the template's session
                while int(_stat(p)[3]) != p:
                    await trio.sleep(0.01)
        # The server closing its end ends the warm exchange (it waits for "warm").
        ours.close()
        ours2.close()
        with trio.fail_after(10):
            while os.path.exists(f"/proc/{pid}") and _stat(pid)[0] != "Z":
                await trio.sleep(0.01)
        template.close()
        with trio.fail_after(10):
            await template_wait(template)


async def test_a_sessions_exchange_forked_from_the_template_writes_to_the_fds_given(tmp_path):
    # A directory that is no session: the forked exchange says why on the
    # stderr it was given (the session's exchange.log), and its stdout (where a
    # good one says "ready") ends without a word.
    missing = str(tmp_path / "no-such-session")
    errlog = tmp_path / "exchange.log"
    r, w = os.pipe()
    err = os.open(errlog, os.O_WRONLY | os.O_CREAT, 0o600)
    async with trio.open_nursery() as nursery:
        template = Template(boot(), nursery)
        try:
            pid = await template.fork_exchange([missing], w, err)
        finally:
            os.close(w)
            os.close(err)
        assert template.proc is not None and pid > 0
        with trio.fail_after(10):
            said = await trio.to_thread.run_sync(os.read, r, 100)
        os.close(r)
        assert said == b""
        assert missing in errlog.read_text()
        # A request that is none is refused, and the template goes on forking;
        # one too long to ask for is not sent.
        with pytest.raises(TemplateUnavailable, match="refused"):
            await template._fork(b"x", [0])
        with pytest.raises(ValueError, match="longer than the template reads"):
            await template.fork_exchange(["d" * 9000], 1, 2)
        ours, pid2 = await template.fork_warm()
        assert int(_stat(pid2)[1]) == template.proc.pid
        ours.close()
        template.close()
        with trio.fail_after(10):
            await template_wait(template)


async def template_wait(template: Template) -> None:
    while True:
        proc = template.proc
        if proc is None or proc.returncode is not None:
            return
        await trio.sleep(0.01)


async def test_a_template_that_does_not_start_is_reported():
    async with trio.open_nursery() as nursery:
        template = Template([sys.executable, "-c", "pass"], nursery)
        with pytest.raises(TemplateUnavailable, match="did not start"):
            await template.fork_warm()


def _config(tmp_path):  # what Exchanges reads of the server's configuration
    from types import SimpleNamespace

    return SimpleNamespace(data_dir=str(tmp_path), sandbox="none", sandbox_cmd=None, pool_size=1,
                           pool_template=True, sandbox_template_renew_s=3600.0)


def _session(tmp_path):  # a server's configuration, and a session dir in its data dir
    sdir = tmp_path / "sessions" / "s_1"
    sdir.mkdir(parents=True)
    return _config(tmp_path), sdir


def _faked(config, nursery, code: str):  # the server's exchanges, with a template that runs ``code``
    ex = exchanges.Exchanges(config, nursery)
    assert ex.template is not None
    ex.template.argv = [sys.executable, "-c", code]
    return ex, ex.template


async def test_without_a_template_the_pool_starts_warm_exchanges_itself_and_says_so(tmp_path, caplog):
    config = _config(tmp_path)
    async with trio.open_nursery() as nursery:
        ex = exchanges.Exchanges(config, nursery)
        assert ex.template is not None
        ex.template.argv = [sys.executable, "-c", "pass"]  # a template that never says ready
        for _ in range(int(exchanges.TEMPLATE_RATE) + 1):  # executes come fast: the template is asked
            ex.sizing.executed(trio.current_time())
        ours, pid, kill = await ex._start_warm_process()
        assert ex.template is None
        assert "exchanges start as their own processes from now on" in caplog.text
        assert int(_stat(pid)[1]) == os.getpid()  # the server's own child
        ours.close()  # it sees the end and exits


async def test_the_template_forks_warm_exchanges_only_while_executes_come_fast(tmp_path):
    config = _config(tmp_path)
    async with trio.open_nursery() as nursery:
        ex = exchanges.Exchanges(config, nursery)
        assert ex.template is not None
        ours, pid, _kill = await ex._start_warm_process()  # no executes yet
        assert ex.template.proc is None  # not even started
        assert int(_stat(pid)[1]) == os.getpid()
        ours.close()
        for _ in range(int(exchanges.TEMPLATE_RATE) + 1):
            ex.sizing.executed(trio.current_time())
        ours, pid, _kill = await ex._start_warm_process()
        assert ex.template.proc is not None and int(_stat(pid)[1]) == ex.template.proc.pid
        ours.close()
        ex.template.close()
        with trio.fail_after(10):
            await template_wait(ex.template)


@pytest.mark.parametrize("template", [True, False])
async def test_an_exchange_that_does_not_start_says_why_from_its_log(tmp_path, template):
    # A session dir without its metadata: the exchange (forked or its own
    # process) fails, writes why in exchange.log, and the error quotes it.
    config, sdir = _session(tmp_path)
    config.pool_template = template
    async with trio.open_nursery() as nursery:
        ex = exchanges.Exchanges(config, nursery)
        with pytest.raises(RuntimeError) as caught:
            await ex.spawn(str(sdir), adopt=False)
        log = (sdir / "exchange.log").read_text()
        last = log.strip().splitlines()[-1]
        assert "did not start" in str(caught.value) and last[:100] in str(caught.value)
        assert str(sdir / "exchange.log") in str(caught.value)
        if ex.template is not None:
            ex.template.close()


async def test_a_cold_spawn_cancelled_while_the_template_starts_leaves_no_fd_nor_a_half_template(tmp_path):
    # A template that never says ready: the spawn is cancelled while it waits.
    config, sdir = _session(tmp_path)
    async with trio.open_nursery() as nursery:
        ex, template = _faked(config, nursery, "import time; time.sleep(30)")
        before = sorted(os.listdir("/proc/self/fd"))
        with trio.move_on_after(0.5) as waited:
            await ex.spawn(str(sdir), adopt=False)
        assert waited.cancelled_caught
        with trio.move_on_after(5):  # (the killed template's pidfd goes once it is reaped)
            while sorted(os.listdir("/proc/self/fd")) != before:
                await trio.sleep(0.01)
        assert sorted(os.listdir("/proc/self/fd")) == before
        # Not kept half-started (its socket would be taken for a ready one); the
        # next request starts a template afresh.
        assert template.sock is None and template.proc is None
        assert ex.template is template


SLOW_TEMPLATE = """
import os, socket, sys, time
sock = socket.socket(fileno=int(sys.argv[-1]))
sock.sendall(b"ready\\n")
n = 1000
while True:
    msg, fds, _, _ = socket.recv_fds(sock, 8192, 2)
    if not msg:
        break
    for fd in fds:
        os.close(fd)
    time.sleep(0.3)
    sock.sendall(f"{n}\\n".encode())
    n += 1
"""


async def test_a_request_cancelled_while_the_template_answers_does_not_shift_the_next_answer(tmp_path):
    # Each answer is a pid: an answer left unread would be taken for the next
    # request's, so a request is seen through to its answer.
    config, sdir = _session(tmp_path)
    async with trio.open_nursery() as nursery:
        ex, template = _faked(config, nursery, SLOW_TEMPLATE)
        await template.start()
        with trio.move_on_after(0.1) as waited:
            await ex.spawn(str(sdir), adopt=False)
        assert waited.cancelled_caught
        ours, pid = await template.fork_warm()
        ours.close()
        assert pid == 1001
        template._drop()
