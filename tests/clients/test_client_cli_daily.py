"""The ``bento`` CLI in daily use, against real servers: session names, ``ls``
(one ``list`` per server, no token guesses spent on sessions known to be gone,
exit codes), the server a session was started on, API key messages, remote
tracebacks, a closed stdout pipe, a viewer typing, a full buffer, the state
file's own directory, and help for every option."""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import stat
import subprocess
import sys
import time

import pexpect
import pytest
from bento_clients import cli
from bento_clients.cli_output import buffer_line, exit_message, status_lines, traceback_hint
from bento_clients.state import NameTaken, StateFile
from client_helpers import CLI, ROOT, cli_env, run_cli, state_sessions, write_file
from helpers import conn
from test_client_cli import ECHO, TICKS


@pytest.fixture
def cli_run(server, tmp_path):
    """(env, tmp dir) for CLI runs with their own state file."""
    return cli_env(str(tmp_path / "state" / "state.json"), server.url), str(tmp_path)


def _json(r: subprocess.CompletedProcess[bytes]) -> object:
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


# --------------------------------------------------------------------------
# Session names


def test_names_stand_for_tokens_and_prune_frees_them(cli_run):
    env, tmp = cli_run
    echo = write_file(tmp, "echo.py", ECHO)
    ticks = write_file(tmp, "ticks.py", TICKS)
    started = _json(run_cli(["run", echo, "--name", "nightly", "-d", "--json"], env))
    assert started["name"] == "nightly"

    taken = run_cli(["run", echo, "--name", "nightly", "-d"], env)
    assert taken.returncode == 2 and b"the name 'nightly' is taken by session " + started["session"].encode() \
        in taken.stderr, taken.stderr
    assert len(state_sessions(env["BENTO_CLIENT_STATE"])) == 1  # nothing was started
    bad = run_cli(["run", echo, "--name", "bto_x", "-d"], env)
    assert bad.returncode == 2 and b"bad session name" in bad.stderr

    assert run_cli(["send", "nightly", '"a"'], env).returncode == 0
    assert run_cli(["send", "nightly", "--eof"], env).returncode == 0
    assert _json(run_cli(["status", "nightly", "--json"], env))["session"] == started["session"]
    follow = run_cli(["logs", "-f", "nightly"], env)
    assert follow.returncode == 0 and json.loads(follow.stdout) == ["a"]
    tokens = _json(run_cli(["tokens", "nightly", "--json"], env))
    assert (tokens["token"], tokens["viewer_token"]) == (started["token"], started["viewer_token"])
    text = run_cli(["tokens", "nightly"], env).stdout.decode()
    assert started["token"] in text and started["viewer_token"] in text and "bento attach nightly" in text

    _json(run_cli(["run", ticks, "1000", "--name", "ticker", "-d", "--json"], env))
    assert run_cli(["kill", "ticker", "-s", "KILL"], env).returncode == 0
    assert run_cli(["attach", "ticker", "--no-stdin"], env).returncode == 128 + 9

    ls = run_cli(["ls"], env).stdout.decode()
    assert re.search(r"\bnightly\b.*\bexited\b.*echo\.py", ls) and re.search(r"\bticker\b.*\bkilled\b", ls), ls
    pruned = run_cli(["ls", "--prune"], env)
    assert pruned.returncode == 0 and b"forgot 2 ended sessions" in pruned.stderr, pruned.stderr
    assert state_sessions(env["BENTO_CLIENT_STATE"]) == {}
    again = _json(run_cli(["run", echo, "--name", "nightly", "-d", "--json"], env))  # the name is free
    assert run_cli(["rm", "nightly"], env).returncode == 0
    assert again["session"] not in state_sessions(env["BENTO_CLIENT_STATE"])


# --------------------------------------------------------------------------
# ls


async def test_ls_spends_no_guesses_on_sessions_known_gone(server, tmp_path):
    """Fifteen sessions this machine knows that the server has forgotten, and one
    running: three `ls` in a row each print every session once, and leave the
    host's allowance of failed token look-ups (20) untouched but for one look-up
    per forgotten session, the first time."""
    state_file = str(tmp_path / "state.json")
    env = cli_env(state_file, server.url)
    sessions = {}
    async with conn(server.url) as c:
        for i in range(15):
            r = await c.ok("execute", code="def main():\n    return 1\n", attach=False)
            await c.ok("destroy", token=r["token"])
            # Recorded here by attaching, not started here: ls must look it up once.
            sessions[r["session"]] = {"session": r["session"], "server": server.url, "token": r["token"],
                                      "created": time.time() - 100 + i}
    with open(state_file, "w") as f:
        json.dump({"format": 2, "sessions": sessions}, f)
    live = _json(run_cli(["run", write_file(str(tmp_path), "t.py", TICKS), "1000", "-d", "--json"], env))

    for _ in range(3):
        r = run_cli(["ls", "--json"], env)
        rows = _json(r)
        ids = [row["session"] for row in rows]  # a keyless server lists other tests' sessions too
        assert len(ids) == len(set(ids)) and set(ids) >= {*sessions, live["session"]}, ids
        states = {row["session"]: row["state"] for row in rows}
        assert states[live["session"]] == "running"
        assert all(states[sid].endswith("(cleaned up)") for sid in sessions), states
    text = run_cli(["ls"], env).stdout.decode()
    assert text.count(live["session"]) == 1 and all(text.count(sid) == 1 for sid in sessions)
    # The allowance is intact: a wrong token is still "not found", not "slow down".
    wrong = run_cli(["status", "bto_" + "A" * 43], env)
    assert wrong.returncode == 1 and b"no session has this token" in wrong.stderr, wrong.stderr
    assert run_cli(["rm", live["token"]], env).returncode == 0


def test_ls_and_run_say_whether_the_key_was_refused(make_server, tmp_path):
    srv = make_server("--api-key", "right-key")
    env = cli_env(str(tmp_path / "state.json"), srv.url)
    job = write_file(str(tmp_path), "job.py", "def main():\n    return 7\n")

    wrong = run_cli(["ls", "--api-key", "wrong-key"], env)
    assert wrong.returncode == 1 and b"list: the API key was refused" in wrong.stderr, wrong.stderr
    none = run_cli(["ls"], env)
    assert none.returncode == 1 and b"list: the server needs an API key" in none.stderr, none.stderr
    ok = run_cli(["ls", "--api-key", "right-key", "--json"], env)
    assert ok.returncode == 0 and json.loads(ok.stdout) == [], ok.stderr

    refused = run_cli(["run", job, "--api-key", "wrong-key"], env)
    assert refused.returncode == 125 and b"the API key was refused" in refused.stderr
    assert b"give --api-key" not in refused.stderr
    missing = run_cli(["run", job], env)
    assert missing.returncode == 125 and b"needs an API key: give --api-key" in missing.stderr
    done = run_cli(["run", job], {**env, "BENTO_API_KEY": "right-key"})
    assert done.returncode == 0 and json.loads(done.stdout) == 7
    listed = _json(run_cli(["ls", "--json"], {**env, "BENTO_API_KEY": "right-key"}))
    assert [row["state"].split(" ")[0] for row in listed] == ["exited"]  # maybe cleaned up already


# --------------------------------------------------------------------------
# The server a session lives on


def test_a_known_session_goes_to_its_own_server(server, make_server, cli_run):
    env, tmp = cli_run
    job = write_file(tmp, "echo.py", ECHO)
    started = _json(run_cli(["run", job, "-d", "--json"], env))
    other = make_server()
    elsewhere = {**env, "BENTO_SERVER": other.url}
    for word in (started["session"], started["token"]):
        st = _json(run_cli(["status", word, "--json"], elsewhere))
        assert st["session"] == started["session"] and st["state"] == "running"
    assert run_cli(["send", started["token"], "--eof"], elsewhere).returncode == 0
    assert json.loads(run_cli(["logs", "-f", started["viewer_token"]], elsewhere).stdout) == []
    # --server, given explicitly, wins.
    explicit = run_cli(["status", started["token"], "--server", other.url], env)
    assert explicit.returncode == 1 and b"no session has this token" in explicit.stderr
    # A new session goes to $BENTO_SERVER.
    new = _json(run_cli(["run", job, "-d", "--json"], elsewhere))
    assert state_sessions(env["BENTO_CLIENT_STATE"])[new["session"]]["server"] == other.url
    assert run_cli(["rm", new["session"]], elsewhere).returncode == 0


# --------------------------------------------------------------------------
# Remote tracebacks


RAISES = """def helper(x):
    raise ValueError(f"it broke on {x}")


def main():
    print("before")
    helper(3)
"""


def test_remote_traceback_shows_the_users_file_and_source(cli_run):
    env, tmp = cli_run
    job = write_file(tmp, "job.py", RAISES)
    r = run_cli(["run", job], env)
    assert r.returncode == 1 and r.stdout == b"before\n"
    first, hint = r.stderr.decode().splitlines()
    assert first == "ValueError: it broke on 3"
    assert hint == f"bento: raised at {job}, line 2, in helper; --traceback shows the whole traceback"

    full = run_cli(["run", job, "--traceback"], env).stderr.decode()
    assert full == (f'Traceback (most recent call last):\n  File "{job}", line 7, in main\n    helper(3)\n'
                    f'  File "{job}", line 2, in helper\n    raise ValueError(f"it broke on {{x}}")\n'
                    f"ValueError: it broke on 3\n"), full
    # The session's file is known here: logs (and attach) show it too.
    started = _json(run_cli(["run", job, "-d", "--json"], env))
    logs = run_cli(["logs", "-f", started["viewer_token"], "--traceback"], env).stderr.decode()
    assert f'File "{job}", line 2, in helper' in logs and "bento_driver" not in logs, logs

    bad = write_file(tmp, "bad.py", "def main():\n    return (1,\n")
    r = run_cli(["run", bad], env)
    assert r.returncode == 1
    assert r.stderr.decode().splitlines()[0] == (
        f"bento: the function could not start: SyntaxError: '(' was never closed ({bad}, line 2)")
    full = run_cli(["run", bad, "--traceback"], env).stderr.decode()
    assert f'File "{bad}", line 2\n    return (1,\n           ^\n' in full and "bento_driver" not in full, full


# --------------------------------------------------------------------------
# Pipes and terminals


def test_a_closed_stdout_pipe_ends_quietly(cli_run):
    """`bento attach TOKEN | head -3`: exit 141 (as a tool SIGPIPE ended), nothing
    on stderr; what was not written is not recorded, so attach shows it later."""
    env, tmp = cli_run
    job = write_file(tmp, "lines.py", "def main():\n    for i in range(20000):\n        print(f'{i:08d}' + 'x' * 60)\n")
    started = _json(run_cli(["run", job, "-d", "--json"], env))
    head = subprocess.run(["bash", "-o", "pipefail", "-c",
                           f"{' '.join(CLI)} attach {started['token']} --no-stdin | head -3"],
                          capture_output=True, env=env, cwd=ROOT, timeout=60)
    assert head.returncode == 141, head
    assert head.stderr == b"" and head.stdout.count(b"\n") == 3
    rest = run_cli(["attach", started["token"], "--no-stdin"], env)
    assert rest.returncode == 0 and rest.stdout.endswith(b"00019999" + b"x" * 60 + b"\n")


def test_a_viewer_is_told_once_that_typing_is_not_sent(cli_run):
    env, tmp = cli_run
    started = _json(run_cli(["run", write_file(tmp, "t.py", TICKS), "2000", "-d", "--json"], env))
    child = pexpect.spawn(CLI[0], CLI[1:] + ["attach", started["viewer_token"]], env=env, cwd=ROOT, timeout=30,
                          dimensions=(24, 200))
    child.logfile_read = io.BytesIO()
    try:
        child.expect(r"tick \d+\r\n")
        child.send(b"zebra\r")
        child.expect("attached read-only \\(viewer token\\): what you type is not sent")
        child.send(b"quokka\r")
        child.expect(r"tick \d+\r\n")
        child.expect(r"tick \d+\r\n")
        child.send(b"\x10\x11")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    shown = child.logfile_read.getvalue()
    assert shown.count(b"what you type is not sent") == 1
    assert b"zebra" not in shown and b"quokka" not in shown, shown  # not echoed as if sent
    assert run_cli(["rm", started["token"]], env).returncode == 0


# --------------------------------------------------------------------------
# status


@pytest.mark.parametrize("asked", [True, False], ids=["asked-by-run", "the-servers-default"])
def test_status_says_the_buffer_is_full_and_the_function_blocked(make_server, tmp_path, asked):
    # Asked by run, the CLI knows the limit; as the server's default, only the status says it.
    srv = make_server() if asked else make_server("--buffer-bytes", "64K")
    env, tmp = cli_env(str(tmp_path / "state" / "state.json"), srv.url), str(tmp_path)
    job = write_file(tmp, "loud.py", "def main():\n    for _ in range(100000):\n        print('x' * 1000)\n")
    buffer_args = ["--buffer", "64K", "--policy", "block"] if asked else []
    started = _json(run_cli(["run", job, *buffer_args, "-d", "--json"], env))
    deadline = time.monotonic() + 30
    while True:
        st = _json(run_cli(["status", started["token"], "--json"], env))
        if st["buffer_bytes"] >= 65536:
            break
        assert time.monotonic() < deadline, st
        time.sleep(0.2)
    text = run_cli(["status", started["token"]], env).stdout.decode()
    buffer = next(line for line in text.splitlines() if line.startswith("buffer"))
    assert re.fullmatch(r"buffer +\d+ bytes of 65536 \(\d+%\): FULL, the function is blocked in its next "
                        r"write until the owner reads \(bento attach\) and acknowledges output \(policy block\)",
                        buffer), buffer
    assert run_cli(["rm", started["token"]], env).returncode == 0


@pytest.mark.parametrize("how", ["stdin", "recv"])
def test_status_says_the_function_waits_for_input_until_it_comes(cli_run, how):
    env, tmp = cli_run
    read = "input('name? ')" if how == "stdin" else "api.recv()"
    job = write_file(tmp, "asks.py", f"import time\ndef main():\n    api.send({read})\n    time.sleep(60)\n")
    started = _json(run_cli(["run", job, "-d", "--json"], env))
    token = started["token"]

    def waiting_lines() -> list[str]:
        text = run_cli(["status", token], env).stdout.decode()
        return [line for line in text.splitlines() if line.startswith("waiting")]

    deadline = time.monotonic() + 30
    while _json(run_cli(["status", token, "--json"], env))["waiting"] != how:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    expected = ("the function is blocked reading its standard input" if how == "stdin"
                else "the function is blocked in api.recv()")
    assert len(lines := waiting_lines()) == 1 and f"waiting   for input: {expected} (" in lines[0], lines
    value = ["--stdin", "ann"] if how == "stdin" else ["--str", "ann"]
    assert run_cli(["send", token, *value], env).returncode == 0
    while _json(run_cli(["status", token, "--json"], env))["waiting"] is not None:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert waiting_lines() == []
    assert run_cli(["rm", token], env).returncode == 0


# --------------------------------------------------------------------------
# The state file's place, --ca-file, help


def test_the_state_file_moves_out_of_the_servers_data_dir(tmp_path):
    xdg = tmp_path / "xdg"
    old = xdg / "bento" / "client.json"
    old.parent.mkdir(parents=True)
    (old.parent / "secret").write_text("the server's")
    old.write_text(json.dumps({"format": 1, "sessions": {"s_old": {
        "session": "s_old", "server": "ws://127.0.0.1:9/v1", "token": "bto_old", "viewer_token": "btv_old",
        "name": "job.py"}}}))
    env = cli_env(str(tmp_path / "unused.json"), "ws://127.0.0.1:9/v1", XDG_STATE_HOME=str(xdg))
    del env["BENTO_CLIENT_STATE"]
    new = xdg / "bento-client" / "state.json"

    r = run_cli(["tokens", "s_old", "--json"], env)
    assert r.returncode == 0 and json.loads(r.stdout)["token"] == "bto_old"
    assert r.stderr.decode() == f"bento: warning: moved the state file from {old} (the server's data dir) to {new}\n"
    assert not old.exists() and (old.parent / "secret").exists()
    assert stat.S_IMODE(new.stat().st_mode) == 0o600 and stat.S_IMODE(new.parent.stat().st_mode) == 0o700
    again = run_cli(["ls", "--json", "--connect-timeout", "0.2"], env)
    assert b"moved the state file" not in again.stderr
    assert [row["file"] for row in json.loads(again.stdout)] == ["job.py"]  # format 1's "name" was the file


def test_ca_file_must_be_readable(cli_run):
    env, tmp = cli_run
    job = write_file(tmp, "job.py", "def main():\n    return 1\n")
    for args, extra in ((["--ca-file", os.path.join(tmp, "missing.pem")], {}),
                        ([], {"BENTO_CA_FILE": os.path.join(tmp, "missing.pem")})):
        r = run_cli(["run", job, *args], {**env, **extra})
        assert r.returncode == 2 and b"cannot read the CA file" in r.stderr and b"missing.pem" in r.stderr


def test_every_option_has_help():
    for name, parser in cli.build_parser().items():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help and action.help != argparse.SUPPRESS, (name, action.dest)
    kill = cli.build_parser()["kill"].format_help()
    assert "KeyboardInterrupt" in kill and "TERM (default)" in " ".join(kill.split())


# --------------------------------------------------------------------------
# The pure parts


def test_a_name_is_recorded_once(tmp_path):
    state = StateFile(str(tmp_path / "state.json"))
    state.add_session({"session": "s_1", "token": "bto_1", "name": "nightly"})
    state.add_session({"session": "s_1", "viewer_token": "btv_1"})  # the same session: merged
    with pytest.raises(NameTaken, match="'nightly' is taken by session s_1"):
        state.add_session({"session": "s_2", "token": "bto_2", "name": "nightly"})
    assert set(state.sessions()) == {"s_1"}
    assert state.find("nightly")["viewer_token"] == "btv_1" and state.find("btv_1")["session"] == "s_1"


def test_buffer_line_says_what_a_full_buffer_does():
    running = {"state": "running", "buffer_bytes": 4096}
    assert buffer_line(running) == "4096 bytes"  # the limit is not known here
    assert buffer_line(running, {"max_bytes": 8192, "policy": "block"}) == "4096 bytes of 8192 (50%), policy block"
    assert buffer_line(running, {"max_bytes": 4096, "policy": "drop_oldest"}).endswith(
        ": FULL, the oldest unread output is being dropped (policy drop_oldest)")
    assert "FULL" not in buffer_line({**running, "state": "exited"}, {"max_bytes": 4096, "policy": "block"})
    # A limit the server reports wins over what run asked for.
    assert buffer_line({**running, "buffer": {"max_bytes": 4096, "policy": "block"}}, {"max_bytes": 1}).startswith(
        "4096 bytes of 4096 (100%): FULL, the function is blocked")


def test_traceback_hint_and_file_name():
    no_entry = {"state": "failed", "error": {"type": "LookupError", "message": "no callable named 'main'",
                                             "traceback": "LookupError: no callable named 'main'\n"}}
    assert traceback_hint(no_entry) == "bento: --traceback shows the whole traceback\n"
    syntax = {"state": "failed", "error": {"type": "SyntaxError", "message": "invalid syntax (<function>, line 3)",
                                           "traceback": '  File "<function>", line 3\n    def (\n'}}
    assert exit_message(syntax, file="job.py") == (
        "bento: the function could not start: SyntaxError: invalid syntax (job.py, line 3)\n")
    assert exit_message(syntax) == (
        "bento: the function could not start: SyntaxError: invalid syntax (<function>, line 3)\n")
    assert traceback_hint(syntax, "job.py") == "bento: raised at job.py, line 3; --traceback shows the whole traceback\n"


def test_the_hint_skips_the_interpreters_frames_and_says_where_a_killed_function_was():
    tb = ('Traceback (most recent call last):\n  File "<function>", line 4, in main\n    import nosuch\n'
          '  File "<frozen importlib._bootstrap>", line 1140, in _find_and_load_unlocked\n'
          "ModuleNotFoundError: No module named 'nosuch'\n")
    missing = {"state": "exited", "error": {"type": "ModuleNotFoundError", "message": "No module named 'nosuch'",
                                            "traceback": tb}}
    assert traceback_hint(missing, "job.py") == (
        "bento: raised at job.py, line 4, in main; --traceback shows the whole traceback\n")
    only_frozen = {**missing, "error": {**missing["error"], "traceback": tb.replace(
        '  File "<function>", line 4, in main\n    import nosuch\n', "")}}
    assert traceback_hint(only_frozen) == "bento: --traceback shows the whole traceback\n"
    interrupted = {"state": "killed", "signal": "INT", "error": {
        "type": "KeyboardInterrupt", "message": "",
        "traceback": 'Traceback (most recent call last):\n  File "<function>", line 5, in main\nKeyboardInterrupt\n'}}
    assert exit_message(interrupted) + traceback_hint(interrupted, "job.py") == (
        "bento: killed by signal INT\nbento: stopped at job.py, line 5, in main; --traceback shows the whole traceback\n")
    assert "error     killed by signal INT" in status_lines({"state": "killed", "exit": interrupted}).splitlines()



def test_a_full_server_suggests_a_longer_wait_to_a_run_that_waited():
    from bento_clients.errors import Busy

    full = Busy("busy", "waited 8.0 s in the queue and the server is still full", "execute", busy="sessions",
                retry_after=1)
    assert cli.describe_error(full, False).endswith("try again in 1 s, or run with --wait")
    assert cli.describe_error(full, False, waited=True).endswith("try again in 1 s, with a longer --wait")


def test_say_ends_its_line_with_a_carriage_return_on_a_raw_terminal(monkeypatch):
    """run -t turns output processing off: a notice (an SDK reconnect, say) then
    needs its \r, and gets none on a terminal that adds it itself."""
    import termios

    from bento_clients import cli_output

    master, slave = os.openpty()
    try:
        with open(slave, "w", closefd=False) as stream:
            monkeypatch.setattr(sys, "stderr", stream)
            cli_output.say("bento: cooked")
            attrs = termios.tcgetattr(slave)
            attrs[1] &= ~termios.OPOST
            termios.tcsetattr(slave, termios.TCSANOW, attrs)
            cli_output.say("bento: raw")
        got = b""
        for _ in range(50):  # (a pty read may return one line at a time)
            got += os.read(master, 1024)
            if got.endswith(b"raw\r\n"):
                break
    finally:
        os.close(master)
        os.close(slave)
    assert got == b"bento: cooked\r\nbento: raw\r\n", got  # (the first one's \r is the terminal's)
