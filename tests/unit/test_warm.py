"""The warm pool: an environment counts as ready only once its driver is up,
and the keeper outlives every failure at a bounded pace."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from types import SimpleNamespace

import bento_sandbox
import pytest
import trio
from bento_driver import wire
from bento_sandbox.spawn import Process

from bento import protocol, warm_pool
from bento.exchange_link import ExchangeGone
from bento.exchanges import Exchanges
from bento.launch import Launched, prestart
from bento.warm import wait_up


@pytest.fixture
def env():
    """A Launched whose 'driver' is the test: it writes the driver's pipe and its stderr."""
    from_r, from_w = os.pipe()
    err_r, err_w = os.pipe()
    to_r, to_w = os.pipe()
    for fd in (from_r, err_r, to_w):
        os.set_blocking(fd, False)
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    launched = Launched(bento_sandbox.Environment(Process(proc.pid), None, {}, signal_exit_codes=False),
                        err_r=err_r, to_w=to_w, from_r=from_r)
    server, ours = socket.socketpair()
    fake = SimpleNamespace(launched=launched, from_w=from_w, err_w=err_w, server=server, ours=ours)
    yield fake
    launched.discard()  # kills and reaps it (by pid: Popen learns of it below)
    proc.wait(timeout=5)
    for fd in (from_w, err_w, to_r):
        try:
            os.close(fd)
        except OSError:
            pass
    server.close()
    ours.close()


def frame(msg: dict) -> bytes:
    return wire.frame(protocol.encode(msg))


def test_up_is_read_and_what_follows_it_is_kept_for_the_sessions_link(env):
    later = frame({"t": "get"})
    os.write(env.from_w, frame({"t": "up"}) + later)
    assert wait_up(env.launched, env.ours.fileno(), 5) is None
    assert env.launched.up and env.launched.early == later
    meta = {"limits": {}, "max_message": 1 << 20, "code": "", "entry": "main", "args": b"",
            "kwargs": b"", "env": {}, "sandbox": "none"}
    driver, _enforced, _at = prestart(env.launched, meta, None)
    assert protocol.decode_internal(driver.next()) == {"t": "get"}


def test_a_driver_that_never_says_up_is_given_up_on_time(env):
    began = time.monotonic()
    why = wait_up(env.launched, env.ours.fileno(), 0.3)
    assert why == "the environment did not come up within 0.3 s"
    assert 0.25 < time.monotonic() - began < 3
    assert not env.launched.up


def test_a_message_in_pieces_still_counts(env):
    data = frame({"t": "up"})
    os.write(env.from_w, data[:3])
    assert wait_up(env.launched, env.ours.fileno(), 0.2) is not None  # not yet whole
    env.launched.up = False
    os.write(env.from_w, data)
    assert wait_up(env.launched, env.ours.fileno(), 5) is None


def test_an_environment_that_ends_first_says_why_with_its_stderr(env):
    os.write(env.err_w, b"bwrap: Can't find source path /x: No such file or directory\n")
    os.close(env.from_w)
    why = wait_up(env.launched, env.ours.fileno(), 5)
    assert why == ("the environment ended before it came up: "
                   "bwrap: Can't find source path /x: No such file or directory")


def test_a_first_message_other_than_up_is_refused(env):
    os.write(env.from_w, frame({"t": "get"}))
    why = wait_up(env.launched, env.ours.fileno(), 5)
    assert why is not None and "broke the internal wire" in why and "'get' before up" in why


def test_an_oversized_first_frame_is_refused(env):
    os.write(env.from_w, wire.LEN.pack(1 << 20))
    why = wait_up(env.launched, env.ours.fileno(), 5)
    assert why is not None and "broke the internal wire" in why


def test_the_server_closing_the_link_ends_the_wait(env):
    env.server.close()
    began = time.monotonic()
    assert wait_up(env.launched, env.ours.fileno(), 30) == \
        "the server closed the link before the environment came up"
    assert time.monotonic() - began < 3


def exchanges(tmp_path, pool: int = 1) -> Exchanges:
    config = SimpleNamespace(data_dir=str(tmp_path), sandbox="none", sandbox_cmd=None, pool_size=pool,
                             pool_template=False, sandbox_template_renew_s=3600.0)
    return Exchanges(config, None)


async def test_the_keeper_outlives_failures_and_retries_at_a_doubling_pace(tmp_path, autojump_clock,
                                                                         caplog):
    ex = exchanges(tmp_path)
    attempts: list[float] = []
    failures = [RuntimeError("the environment did not come up within 10 s"), OSError("no fds"),
                ExchangeGone("gone"), trio.TooSlowError(), KeyError("a bug"), RuntimeError("x"),
                RuntimeError("y")]

    async def spawn() -> object:
        attempts.append(trio.current_time())
        if failures:
            raise failures.pop(0)
        return "a warm exchange"

    ex._spawn_warm = spawn  # type: ignore[method-assign]
    with trio.move_on_after(110):  # (virtual time: the test's deadline counts it too)
        await ex.pool_keeper()
    assert ex.warm == ["a warm exchange"]
    gaps = [b - a for a, b in zip(attempts, attempts[1:], strict=False)]
    assert gaps == [1, 2, 4, 8, 16, 30, 30]
    assert "the environment did not come up within 10 s (next try in 1 s)" in caplog.text
    assert "KeyError" in caplog.text  # an unexpected failure is logged with its traceback


async def test_after_a_success_the_pause_starts_small_again(tmp_path, autojump_clock):
    ex = exchanges(tmp_path)
    script = [RuntimeError("a"), RuntimeError("b"), "w1", RuntimeError("c"), "w2"]
    attempts: list[float] = []

    async def spawn() -> object:
        attempts.append(trio.current_time())
        item = script.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    ex._spawn_warm = spawn  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ex.pool_keeper)
        await trio.sleep(10)
        assert ex.warm == ["w1"]
        ex.warm.pop(0)
        ex.warm_wanted.set()
        await trio.sleep(10)
        assert ex.warm == ["w2"]
        nursery.cancel_scope.cancel()
    gaps = [round(b - a, 2) for a, b in zip(attempts, attempts[1:], strict=False)]
    assert gaps[:2] == [1, 2] and gaps[-1] == 1  # c failed after w1: the pause is 1 s again


def test_the_warm_timeout_outlasts_the_exchanges_own(tmp_path):
    from bento import warm

    assert warm_pool.WARM_TIMEOUT_S > warm.UP_TIMEOUT_S


def test_a_discarded_warm_environment_takes_its_env_pid_with_it(env, tmp_path):
    # A warm exchange writes env.pid before any session; an environment it then
    # discards (a limit no cgroup holds, a packages build that failed) must not
    # leave the file naming a process group that is gone.
    pid_file = tmp_path / "env.pid"
    pid_file.write_text(f"{env.launched.env.pgid}\n")
    env.launched.pid_file = str(pid_file)
    env.launched.discard()
    assert not pid_file.exists() and env.launched.pid_file is None


def test_the_early_hello_is_the_hello_of_the_session_once_set_up(tmp_path):
    """A warm exchange tells the server its started session's hello before it
    opens the logs (bento/exchange.py ``early_hello``); once set up it must be
    the same hello, or the exchange would owe the server a progress."""
    from bento import sessiondisk
    from bento.exchange import Exchange, early_hello
    from bento.exchange_control import hello

    home = str(tmp_path / "warm")
    os.mkdir(home)
    lock = sessiondisk.prepare_dir(home)
    meta = {"session": "s1", "limits": {}, "max_message": 1 << 20, "sandbox": "bwrap",
            "buffer": {"max_bytes": 1 << 20, "policy": "block"}, "history_bytes": 1 << 30}
    enforced = {"memory_bytes": "cgroup"}
    server, ours = socket.socketpair()
    with server, ours:
        said = early_hello(ours, meta, enforced)
        assert said is not None
        link = wire.Framer(1 << 16)
        link.feed(server.recv(1 << 16))
        assert protocol.decode_internal(link.next()) == said
        ex = Exchange(sessiondisk.pin_dir(home), False, meta)
        ex.enforced = enforced
        ex.apply(ex.core.started())
        assert hello(ex.enforced, ex.core) == said
        assert said["state"] == "running" and said["next_seq"] == 1, said
    os.close(lock)


def test_logs_opened_while_warm_write_into_the_renamed_directory(tmp_path):
    """A warm exchange opens its directory's logs before the server renames the
    directory into sessions/ (bento/warm.py): they must still write there."""
    from bento import sessiondisk, sessionlog

    home, renamed = str(tmp_path / "warm"), str(tmp_path / "s_1")
    os.mkdir(home)
    lock = sessiondisk.prepare_dir(home)
    pinned = sessiondisk.pin_dir(home)
    out, inlog, saved = sessiondisk.open_logs(pinned)
    assert saved == {} and out.next_seq == 1 and inlog.next_seq == 1
    os.rename(home, renamed)
    out.append(1, protocol.encode([1, "stdout", b"x"]))
    out.flush()
    inlog.append(1, protocol.encode([1, "a"]))
    assert [seq for seq, _ in sessionlog.Writer(renamed, "out").records()] == [1]
    assert [seq for seq, _ in sessionlog.Writer(renamed, "in").records()] == [1]
    os.close(lock)
