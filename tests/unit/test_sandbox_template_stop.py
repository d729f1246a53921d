"""Stopping the sandbox template (bento/sandbox_template.py ``_stop``) ends its
whole process group: a child that bwrap has not yet set apart in a session of
its own (it waits for bwrap while it sets up the sandbox) must not outlive it."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import trio

from bento.sandbox_template import _stop


async def test_stop_ends_the_child_that_is_still_in_the_group(tmp_path):
    pid_file = tmp_path / "child.pid"
    # As bwrap during its set-up: a child in the same group, waiting.
    proc = await trio.lowlevel.open_process(
        ["sh", "-c", f"sleep 60 & echo $! > {pid_file}; wait"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
    with trio.fail_after(10):
        while not pid_file.exists() or not pid_file.read_text().strip():
            await trio.sleep(0.02)
    child = int(pid_file.read_text())
    ended = False
    try:
        await _stop(proc)
        deadline = time.monotonic() + 5
        while True:
            try:
                with open(f"/proc/{child}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except FileNotFoundError:
                ended = True
                break
            if state == "Z":
                ended = True
                break  # killed; reaped by init in a moment
            assert time.monotonic() < deadline, f"the child {child} outlived the stop"
            await trio.sleep(0.02)
    finally:
        if not ended:  # (the stop left it: nothing outlives the test)
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
