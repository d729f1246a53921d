"""The ``bento`` CLI as a subprocess against a real server: exit codes, kill -9
and resume (byte-exact), detach keys under a pty, input, and the small commands."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import time

import pexpect
import pytest
from client_helpers import CLI, ROOT, cli_env, run_cli, spawn_cli, state_sessions, write_file

NUMBERED = """
import sys, time
def main(n, step):
    for i in range(n):
        print(f"{i:05d} " + "x" * (i % 37), flush=True)
        if i % 50 == 0:
            print(f"err {i}", file=sys.stderr, flush=True)
        time.sleep(step)
    return {"lines": n}
"""

TICKS = """
import time
def main(n):
    for i in range(n):
        print("tick", i, flush=True)
        time.sleep(0.05)
    return "finished"
"""

ECHO = """
def main():
    got = []
    while True:
        try:
            got.append(api.recv())
        except EOFError:
            return got
"""


@pytest.fixture
def cli(server, tmp_path):
    """(env, tmp dir) for CLI runs with their own state file."""
    return cli_env(str(tmp_path / "state" / "client.json"), server.url), str(tmp_path)


def _lines(path: str) -> int:
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def _wait_lines(path: str, count: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while _lines(path) < count:
        assert proc.poll() is None, f"the CLI ended early ({proc.returncode})"
        assert time.monotonic() < deadline, f"{path} never reached {count} lines"
        time.sleep(0.005)


def _kill9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)


@pytest.mark.parametrize(
    ("code", "expected", "stderr_has"),
    [
        ("def main():\n    return {'ok': 1}\n", 0, None),
        ("def main():\n    raise ValueError('it broke')\n", 1, "ValueError: it broke"),
        ("import sys\ndef main():\n    sys.exit(3)\n", 3, None),
        ("import os, signal\ndef main():\n    os.kill(os.getpid(), signal.SIGTERM)\n", 128 + 15, "signal TERM"),
        ("import os, signal\ndef main():\n    os.kill(os.getpid(), signal.SIGKILL)\n", 128 + 9, "signal KILL"),
    ],
    ids=["ok", "exception", "sys-exit-3", "sigterm", "sigkill"],
)
def test_exit_codes(cli, code, expected, stderr_has):
    env, tmp = cli
    job = write_file(tmp, "job.py", code)
    r = run_cli(["run", job], env)
    assert r.returncode == expected, r.stderr
    if expected == 0:
        assert json.loads(r.stdout) == {"ok": 1}
    if stderr_has:
        assert stderr_has.encode() in r.stderr
        # An exception: its summary and where it was raised (with a hint for --traceback).
        assert r.stderr.count(b"\n") == (2 if expected == 1 else 1) and b"Traceback" not in r.stderr


def test_kill9_mid_stream_then_attach_is_byte_exact(cli):
    """kill -9 the CLI three times mid-stream; each `bento attach` resumes where the
    last one stopped: the combined output has every line exactly once."""
    env, tmp = cli
    n = 800
    job = write_file(tmp, "job.py", NUMBERED)
    out_path, err_path = os.path.join(tmp, "out.txt"), os.path.join(tmp, "err.txt")
    expected_out = "".join(f"{i:05d} " + "x" * (i % 37) + "\n" for i in range(n)) + json.dumps({"lines": n}) + "\n"
    expected_err = "".join(f"err {i}\n" for i in range(0, n, 50))

    def start(args: list[str]) -> subprocess.Popen:
        with open(out_path, "ab") as out, open(err_path, "ab") as err:
            return subprocess.Popen(CLI + args, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                    env=env, cwd=ROOT)

    proc = start(["run", job, str(n), "0.003"])
    try:
        _wait_lines(out_path, 100, proc)
        _kill9(proc)
        token = next(iter(state_sessions(env["BENTO_CLIENT_STATE"]).values()))["token"]
        for stop_at in (300, 500):
            proc = start(["attach", token])
            _wait_lines(out_path, stop_at, proc)
            _kill9(proc)
        proc = start(["attach", token])
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            _kill9(proc)
    with open(out_path) as f:
        assert f.read() == expected_out
    with open(err_path) as f:
        assert f.read() == expected_err
    # Attaching again prints nothing more: it all was delivered here.
    again = run_cli(["attach", token], env)
    assert again.returncode == 0 and again.stdout == b""


# The CLI with a SIGKILL of itself at the worst moments, to test exactly-once
# without luck: "write" dies half way through writing the DIE_AT-th frame
# batch; "record" dies after writing it and before recording it.
DYING_CLI = """
import os, signal, sys
from bento_clients import cli, state, terminal
where, at = os.environ["DIE_WHERE"], int(os.environ["DIE_AT"])
calls = 0
def die_after(n):
    global calls
    calls += n
    return calls >= at
if where == "record":
    record = state.StateFile.record_delivery
    def dying_record(self, *a, **k):
        if die_after(1):
            os.kill(os.getpid(), signal.SIGKILL)
        return record(self, *a, **k)
    state.StateFile.record_delivery = dying_record
else:
    write = terminal.Sinks.write
    def dying_write(self, name, data):
        if name == "stdout" and die_after(1):
            write(self, name, data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        return write(self, name, data)
    terminal.Sinks.write = dying_write
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("where", ["write", "record"])
def test_killed_between_write_and_record_resumes_exactly(cli, where):
    """A kill landing exactly in the window (half a frame written; or written
    but not recorded): the next attach, writing to the same file, completes it
    without repeating a byte."""
    env, tmp = cli
    n = 60
    job = write_file(tmp, "job.py", NUMBERED)
    out_path, err_path = os.path.join(tmp, "out.txt"), os.path.join(tmp, "err.txt")
    dying_env = {**env, "DIE_WHERE": where, "DIE_AT": "5"}
    with open(out_path, "ab") as out, open(err_path, "ab") as err:
        first = subprocess.run([CLI[0], "-c", DYING_CLI, "run", job, str(n), "0.01"], stdout=out,
                               stderr=err, stdin=subprocess.DEVNULL, env=dying_env, cwd=ROOT, timeout=60)
    assert first.returncode == -signal.SIGKILL
    token = next(iter(state_sessions(env["BENTO_CLIENT_STATE"]).values()))["token"]
    with open(out_path, "ab") as out, open(err_path, "ab") as err:
        rest = subprocess.run(CLI + ["attach", token], stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                              env=env, cwd=ROOT, timeout=60)
    assert rest.returncode == 0
    with open(out_path) as f:
        assert f.read() == "".join(f"{i:05d} " + "x" * (i % 37) + "\n" for i in range(n)) + '{"lines": 60}\n'


def _spawn(env: dict[str, str], args: list[str]) -> pexpect.spawn:
    return spawn_cli(env, args)


def test_detach_keys_under_a_pty(cli):
    env, tmp = cli
    job = write_file(tmp, "ticks.py", TICKS)
    child = _spawn(env, ["run", job, "60"])
    child.logfile_read = io.BytesIO()
    try:
        child.expect(r"tick 5\r\n")
        child.send(b"\x10\x11")  # ctrl-p ctrl-q
        child.expect("detached; the function keeps running")
        child.expect(pexpect.EOF)
        before = child.logfile_read.getvalue()
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    token = next(iter(state_sessions(env["BENTO_CLIENT_STATE"]).values()))["token"]
    status = run_cli(["status", token, "--json"], env)
    assert json.loads(status.stdout)["state"] == "running"
    rest = run_cli(["attach", token, "--no-stdin"], env)
    assert rest.returncode == 0, rest.stderr
    shown_before = [int(x) for x in re.findall(rb"tick (\d+)", before)]
    shown_after = [int(x) for x in re.findall(rb"tick (\d+)", rest.stdout)]
    assert shown_before and shown_after
    assert shown_before + shown_after == list(range(60))
    assert rest.stdout.endswith(b'"finished"\n')


def test_lone_ctrl_p_reaches_the_function(cli):
    env, tmp = cli
    job = write_file(tmp, "recv.py", "def main():\n    return api.recv()\n")
    child = _spawn(env, ["run", job, "--recv"])
    try:
        time.sleep(1.0)  # let the CLI attach and take the terminal
        child.send(b"\x10x\r")
        child.expect(re.escape('"\\u0010x"'))
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_a_line_typed_at_the_terminal_reaches_input(cli):
    env, tmp = cli
    job = write_file(tmp, "ask.py", "def main():\n    return input('name? ')\n")
    child = _spawn(env, ["run", job])
    try:
        child.expect("name\\? ")
        child.send(b"bobx\x7f\r")  # a backspace is edited away here, before the line is sent
        child.expect(re.escape('"bob"'))
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_ctrl_c_interrupts_the_function(cli):
    env, tmp = cli
    code = ("import time\ndef main():\n    print('ready', flush=True)\n    try:\n        time.sleep(30)\n"
            "    except KeyboardInterrupt:\n        return 'caught'\n")
    job = write_file(tmp, "int.py", code)
    child = _spawn(env, ["run", job])
    try:
        child.expect("ready")
        time.sleep(0.3)
        child.send(b"\x03")
        child.expect('"caught"')
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_stdin_lines_are_inputs_and_eof_closes(cli):
    env, tmp = cli
    job = write_file(tmp, "echo.py", ECHO)
    r = run_cli(["run", job, "--recv"], env, input="alpha\nbéta\n\nlast-without-newline".encode())
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == ["alpha", "béta", "", "last-without-newline"]
    entry = next(iter(state_sessions(env["BENTO_CLIENT_STATE"]).values()))
    # Four lines, then the end of input closes stdin and api.recv().
    assert entry["pending"] == [] and entry["input_seq"] == 6


def test_piped_stdin_is_the_functions_stdin_and_send_stdin_adds_to_it(cli):
    env, tmp = cli
    job = write_file(tmp, "cat.py", "import sys\ndef main():\n    return sys.stdin.read()\n")
    r = run_cli(["run", job], env, input="alpha\nbéta\n\nlast-without-newline".encode())
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == "alpha\nbéta\n\nlast-without-newline"

    job = write_file(tmp, "lines.py", "def main():\n    return [input(), input(), api.recv()]\n")
    started = json.loads(run_cli(["run", job, "-d", "--json"], env).stdout)
    token = started["token"]
    assert run_cli(["send", "--stdin", token, "first line"], env).returncode == 0
    assert run_cli(["send", "--stdin", token, "-"], env, input=b"second\n").returncode == 0
    assert run_cli(["send", token, '"a value"'], env).returncode == 0
    follow = run_cli(["logs", "-f", started["viewer_token"]], env)
    assert json.loads(follow.stdout) == ["first line", "second", "a value"]


def test_detached_run_then_send_logs_status_share_ls_rm(cli):
    env, tmp = cli
    job = write_file(tmp, "echo.py", ECHO)
    r = run_cli(["run", job, "-d", "--json"], env)
    assert r.returncode == 0, r.stderr
    started = json.loads(r.stdout)
    token, viewer, sid = started["token"], started["viewer_token"], started["session"]

    assert run_cli(["send", token, '"a"'], env).returncode == 0
    sent = run_cli(["send", sid, '{"b": [1, 2]}', "--json"], env)  # a session id known here works too
    assert json.loads(sent.stdout)["seq"] == 2
    assert run_cli(["send", token, "--eof"], env).returncode == 0
    entry = state_sessions(env["BENTO_CLIENT_STATE"])[sid]
    assert entry["input_seq"] == 3 and entry["pending"] == []

    share = run_cli(["share", token], env)
    assert share.stdout.decode().strip() == viewer
    st = run_cli(["status", viewer, "--json"], env)
    assert json.loads(st.stdout)["input_seq"] == 3

    # logs -f with the viewer token follows to the end; then plain logs prints
    # what is retained, again and again (read-only: nothing is acknowledged).
    follow = run_cli(["logs", "-f", viewer], env)
    assert follow.returncode == 0
    assert json.loads(follow.stdout) == ["a", {"b": [1, 2]}]
    for _ in range(2):
        assert run_cli(["logs", viewer], env).stdout == follow.stdout

    ls = run_cli(["ls"], env)
    assert sid in ls.stdout.decode() and "echo.py" in ls.stdout.decode()
    ls_json = json.loads(run_cli(["ls", "--json"], env).stdout)
    assert [row["here"] for row in ls_json if row["session"] == sid] == [True]

    rm = run_cli(["rm", token], env)
    assert rm.returncode == 0, rm.stderr
    gone = run_cli(["status", token], env)
    assert gone.returncode == 1 and b"no session has this token" in gone.stderr
    assert sid not in state_sessions(env["BENTO_CLIENT_STATE"])


def test_logs_follow_and_kill(cli):
    env, tmp = cli
    job = write_file(tmp, "ticks.py", TICKS)
    r = run_cli(["run", job, "1000", "-d", "--json"], env)
    started = json.loads(r.stdout)
    follow = subprocess.Popen(CLI + ["logs", "-f", started["viewer_token"]], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=env, cwd=ROOT)
    try:
        time.sleep(1.0)
        k = run_cli(["kill", started["token"], "--signal", "KILL"], env)
        assert k.returncode == 0, k.stderr
        out, err = follow.communicate(timeout=30)
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.communicate(timeout=10)
    assert follow.returncode == 128 + 9, err
    assert b"tick 0\n" in out and b"killed by signal KILL" in err
    again = run_cli(["kill", started["token"]], env)
    assert again.returncode == 1 and b"already ended" in again.stderr


def test_user_mistakes_are_one_line(cli):
    env, tmp = cli
    job = write_file(tmp, "job.py", "def main(x):\n    return x\n")
    cases = [
        (["status", "bto_" + "A" * 43], 1, b"no session has this token"),
        (["attach", "bto_" + "A" * 43], 125, b"no session has this token"),
        (["status", "not-a-token"], 2, b"not a token"),
        (["run", job, "{bad json"], 2, b"bad JSON"),
        (["run", os.path.join(tmp, "missing.py")], 2, b"cannot read"),
        (["run", job, "1", "--limit", "wall=soon"], 2, b"bad duration"),
        (["run", job, "1", "--limit", "colour=blue"], 2, b"unknown limit"),
        (["run", job, "1", "--server", "127.0.0.1:9", "--connect-timeout", "0.5"], 125, b"cannot connect"),
        (["frobnicate"], 2, b"unknown command"),
        (["send"], 2, b"required"),
    ]
    for args, code, message in cases:
        r = run_cli(args, env)
        assert r.returncode == code, (args, r.returncode, r.stderr)
        assert message in r.stderr, (args, r.stderr)
        assert b"Traceback" not in r.stderr
        if args[0] != "frobnicate":
            assert r.stderr.count(b"\n") == 1, (args, r.stderr)
    ok = run_cli(["run", job, '"\\u00e9"', "--json"], env)
    assert json.loads(ok.stdout.splitlines()[-1])["data"]["result"] == "é"


def test_run_options_reach_the_server(cli):
    env, tmp = cli
    code = "import os\ndef helper(a, *, k=None):\n    return [a, k, os.environ.get('GREETING')]\n"
    job = write_file(tmp, "opts.py", code)
    r = run_cli(["run", job, "--entry", "helper", "[1, 2]", "--kwarg", 'k={"z": null}',
                 "--env", "GREETING=hi", "--limit", "wall=30s,mem=512M", "--buffer", "1M",
                 "--policy", "block", "--idempotency-key", "cli-test-key"], env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [[1, 2], {"z": None}, "hi"]


def test_help():
    r = subprocess.run(CLI + ["--help"], capture_output=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0 and b"bento COMMAND" in r.stdout
    r = subprocess.run(CLI + ["run", "--help"], capture_output=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0 and b"--detach-keys" in r.stdout


def test_logs_after_the_owner_read_everything_still_prints_the_output_and_the_exit(cli):
    """The owner's ``attach`` reads the run to its end and acks its exit; the
    session stays for its keep period, so ``logs`` prints it all again."""
    env, tmp = cli
    job = write_file(tmp, "ticks.py", TICKS)
    started = json.loads(run_cli(["run", job, "3", "-d", "--json"], env).stdout)
    token, sid = started["token"], started["session"]
    attached = run_cli(["attach", token, "--no-stdin"], env)
    assert attached.returncode == 0, attached.stderr
    assert attached.stdout == b'tick 0\ntick 1\ntick 2\n"finished"\n'  # the output, then the result
    st = json.loads(run_cli(["status", token, "--json"], env).stdout)
    assert st["acked_seq"] == st["next_seq"] - 1 and st["first_seq"] == 1, st
    for who in (token, started["viewer_token"], sid):
        logs = run_cli(["logs", who], env)
        assert logs.returncode == 0, logs.stderr
        assert logs.stdout == attached.stdout, logs
        assert b"gone" not in logs.stderr, logs.stderr
