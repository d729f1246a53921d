"""bento_sandbox.spawn: what the backends rely on from the child it starts."""

from __future__ import annotations

import errno
import os
import signal
import sys

import psutil
import pytest
from bento_sandbox.spawn import spawn

# Prints: its session id and pid, its open fds above 2 (number=target), and its
# ignored-signals mask.
REPORT = (
    "import os\n"
    "print(os.getsid(0), os.getpid())\n"
    "fds = []\n"
    "for n in os.listdir('/proc/self/fd'):\n"
    "    try:\n"
    "        fds.append(n + '=' + os.readlink('/proc/self/fd/' + n))\n"
    "    except OSError:\n"
    "        pass\n"  # the directory listdir had open, closed by now
    "print(' '.join(f for f in fds if int(f.split('=')[0]) > 2))\n"
    "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('SigIgn')][0])\n"
)


def _run(argv: list[str], **kw):  # type: ignore[no-untyped-def]
    out_r, out_w = os.pipe()
    null = os.open(os.devnull, os.O_RDWR)
    try:
        proc = spawn(argv, cwd=kw.pop("cwd", "/"), env=kw.pop("env", {"PATH": "/usr/bin:/bin"}),
                     stdin=null, stdout=out_w, stderr=null, **kw)
    finally:
        os.close(out_w)
        os.close(null)
    with os.fdopen(out_r) as f:
        text = f.read()
    return proc, text


def test_the_child_has_its_own_session_its_fds_and_default_signals():
    keep_r, keep_w = os.pipe()
    stray = os.open(os.devnull, os.O_RDONLY)
    os.set_inheritable(stray, True)  # inheritable, but not passed: it must not reach the child
    try:
        proc, text = _run([sys.executable, "-I", "-S", "-c", REPORT], pass_fds=(keep_w,))
    finally:
        os.close(stray)
        os.close(keep_r)
        os.close(keep_w)
    assert proc.wait(timeout=10) == 0
    sid_pid, fds, ignored = text.splitlines()
    sid, pid = sid_pid.split()
    assert sid == pid == str(proc.pid)
    # Above 2, only the passed fd (the inheritable /dev/null was not passed).
    assert len(fds.split()) == 1 and fds.startswith(f"{keep_w}=pipe:"), fds
    assert ignored  # (Python ignores SIGPIPE itself: the dispositions are checked with cat below)


def test_signals_python_ignores_are_default_again_in_the_child():
    assert signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN  # as in the exchange
    proc, text = _run(["cat", "/proc/self/status"])
    assert proc.wait(timeout=10) == 0
    mask = int(next(line.split()[1] for line in text.splitlines() if line.startswith("SigIgn")), 16)
    assert not mask & (1 << (signal.SIGPIPE - 1)), "SIGPIPE stays ignored in the child"
    assert not mask & (1 << (signal.SIGXFSZ - 1)), "SIGXFSZ stays ignored in the child"


def test_the_program_is_found_on_the_given_path_and_runs_in_cwd(tmp_path):
    proc, text = _run(["pwd"], cwd=str(tmp_path))
    assert proc.wait(timeout=10) == 0
    assert text.strip() == str(tmp_path)


def test_an_exec_failure_is_an_oserror_in_the_parent_and_leaves_no_child():
    before = {p.pid for p in psutil.Process().children()}
    with pytest.raises(OSError) as err:
        _run(["no-such-program-here"])
    assert err.value.errno == errno.ENOENT
    assert "exec failed" in str(err.value)
    assert {p.pid for p in psutil.Process().children()} <= before  # reaped, not a zombie


def test_a_failing_setup_is_reported_and_nothing_runs():
    def setup() -> None:
        raise RuntimeError("cannot enter the cgroup")

    with pytest.raises(OSError, match="setup failed: cannot enter the cgroup"):
        _run(["true"], setup=setup)


def test_wait_times_out_then_returns_the_signal():
    out_r, out_w = os.pipe()
    try:
        proc = spawn(["sleep", "30"], cwd="/", env={"PATH": "/usr/bin:/bin"},
                     stdin=out_r, stdout=out_w, stderr=out_w)
    finally:
        os.close(out_r)
        os.close(out_w)
    with pytest.raises(TimeoutError):
        proc.wait(timeout=0.05)
    assert proc.poll() is None
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=10) == -signal.SIGKILL
    assert proc.returncode == -signal.SIGKILL


def test_standard_streams_below_3_are_refused():
    with pytest.raises(ValueError, match="3 or more"):
        spawn(["true"], cwd="/", env={}, stdin=0, stdout=1, stderr=2)
