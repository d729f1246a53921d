"""``bento run -t`` / ``attach -t`` driven with pexpect: a PTY on each side.

The function's terminal does the editing and the echo; bento passes keys as
typed, keeps its detach keys, follows window changes, and tells a viewer that
its keys go nowhere.
"""

from __future__ import annotations

import json
import re

import pexpect
import pytest
from client_helpers import cli_env, run_cli, spawn_cli, write_file

PROGRESS_THEN_PROMPT = r'''
import os, signal, time
def main():
    for i in range(0, 101, 25):
        print(f"\r\x1b[1;32mloading {i:3d}%\x1b[0m", end="", flush=True)
        time.sleep(0.05)
    print()
    name = input("name? ")
    sizes = []
    signal.signal(signal.SIGWINCH, lambda *a: sizes.append(os.get_terminal_size()))
    print(f"hello {name}, size {tuple(os.get_terminal_size())}", flush=True)
    deadline = time.monotonic() + 15
    while not sizes and time.monotonic() < deadline:
        time.sleep(0.01)
    print(f"resized to {tuple(sizes[0]) if sizes else None}", flush=True)
    input("press enter ")
    return name
'''


@pytest.fixture
def cli(server, tmp_path):
    return cli_env(str(tmp_path / "state" / "client.json"), server.url), str(tmp_path)


def _spawn(env: dict[str, str], args: list[str]) -> pexpect.spawn:
    return spawn_cli(env, args, rows=30, cols=100)


def test_run_t_prompt_backspace_progress_bar_and_resize(cli):
    env, tmp = cli
    job = write_file(tmp, "screen.py", PROGRESS_THEN_PROMPT)
    child = _spawn(env, ["run", "-t", job])
    try:
        # The progress bar redraws in place with \r, in colour.
        child.expect(re.escape("\r\x1b[1;32mloading  50%\x1b[0m"))
        child.expect(re.escape("\r\x1b[1;32mloading 100%\x1b[0m"))
        child.expect(re.escape("name? "))
        child.send(b"bobx\x7f\r")  # the remote terminal erases the x
        child.expect(re.escape("hello bob, size (100, 30)"))
        child.setwinsize(40, 120)  # SIGWINCH here: bento resizes the remote terminal
        child.expect(re.escape("resized to (120, 40)"))
        child.expect(re.escape("press enter "))
        child.send(b"\r")
        # The result line starts the next line at its left edge: bento's own
        # lines carry their \r while the terminal has no output processing.
        child.expect(re.escape('"bob"\r\n'))
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_run_t_into_a_file_writes_plain_newlines(cli):
    """The carriage returns are for the raw terminal: a stdout redirected to a
    file gets the result line as it would without -t."""
    import shlex

    from client_helpers import CLI

    env, tmp = cli
    job = write_file(tmp, "ask.py", "def main():\n    return input('name? ')\n")
    out = f"{tmp}/out.txt"
    child = pexpect.spawn("/bin/sh", ["-c", f"{shlex.join([*CLI, 'run', '-t', job])} > {shlex.quote(out)}"],
                          env=env, timeout=30, dimensions=(24, 80))
    try:
        child.send(b"ann\r")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    with open(out, "rb") as f:
        written = f.read()
    assert written.endswith(b'"ann"\n') and not written.endswith(b'\r\n'), written


def test_the_result_starts_its_own_line_after_a_prompt_answered_from_a_pipe(cli):
    import shlex

    from client_helpers import CLI

    env, tmp = cli
    job = write_file(tmp, "ask.py", "def main():\n    return 'done, ' + input('name? ')\n")
    child = pexpect.spawn("/bin/sh", ["-c", f"echo Ada | {shlex.join([*CLI, 'run', job])}"],
                          env=env, timeout=30, dimensions=(24, 80))
    try:
        child.expect(pexpect.EOF)
        shown = child.before
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    assert shown.endswith(b'name? \r\n"done, Ada"\r\n'), shown  # (was: name? "done, Ada")


def test_run_t_json_lines_all_end_with_crlf(cli):
    env, tmp = cli
    job = write_file(tmp, "ask.py", "def main():\n    return input('name? ')\n")
    child = _spawn(env, ["run", "-t", "--json", job])
    try:
        child.expect(re.escape('"bmFtZT8g"'))  # "name? ", base64
        child.send(b"ann\r")
        child.expect(pexpect.EOF)
        shown = child.before
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    assert b'"ch": "exit"' in shown and b"}\n" not in shown.replace(b"}\r\n", b""), shown


def test_attach_t_detach_keys_and_a_viewer_told_its_keys_go_nowhere(cli):
    env, tmp = cli
    job = write_file(tmp, "ask.py", "def main():\n    return input('name? ')\n")
    started = json.loads(run_cli(["run", "-t", job, "-d", "--json"], env).stdout)
    token, viewer = started["token"], started["viewer_token"]

    watcher = _spawn(env, ["attach", "-t", viewer])
    try:
        watcher.expect("your keys go nowhere")
        watcher.send(b"ignored\r")
        watcher.send(b"\x10\x11")  # ctrl-p ctrl-q still detaches
        watcher.expect("detached")
        watcher.expect(pexpect.EOF)
    finally:
        watcher.close(force=True)

    owner = _spawn(env, ["attach", "-t", token, "--from", "1"])  # the viewer above took the prompt
    try:
        owner.expect(re.escape("name? "))
        owner.send(b"\x10x\r")  # a lone ctrl-p is an ordinary key
        owner.expect(re.escape('"\\u0010x"'))
        owner.expect(pexpect.EOF)
    finally:
        owner.close(force=True)
    assert owner.exitstatus == 0
