"""Helpers for the client tests: a runner for the ``bento`` CLI as a subprocess
(every wait bounded, every process waited for). The TCP proxy that cuts
connections on demand is tests/proxy.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLI = [sys.executable, "-m", "bento.app"]
CLI_TIMEOUT_S = 60.0


def line_numbers(frames: list[Any]) -> list[int]:
    """The number each stdout line of ``frames`` starts with, in order (the
    output must end with its newline)."""
    from bento_clients.frames import Stdout

    lines = b"".join(f.data for f in frames if isinstance(f, Stdout)).split(b"\n")
    assert lines[-1] == b"", lines[-1][:80]
    numbers = []
    for line in lines[:-1]:
        m = re.match(rb"\s*(\d+)", line)
        assert m is not None, line[:80]
        numbers.append(int(m.group(1)))
    return numbers


def cli_env(state_file: str, server_url: str | None = None, **extra: str) -> dict[str, str]:
    """The environment for a CLI subprocess: its own state file and server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BENTO_")}
    env["BENTO_CLIENT_STATE"] = state_file
    env["BENTO_CONFIG"] = os.path.join(os.path.dirname(state_file), "no-config.toml")
    if server_url:
        env["BENTO_SERVER"] = server_url
    env.update(extra)
    return env


def run_cli(args: list[str], env: dict[str, str], input: bytes | None = b"",
            timeout: float = CLI_TIMEOUT_S, cwd: str | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run ``bento ARGS`` to completion (killed and waited for on timeout)."""
    return subprocess.run(CLI + args, input=input, capture_output=True, env=env, timeout=timeout,
                          cwd=cwd or ROOT)


def spawn_cli(env: dict[str, str], args: list[str], rows: int = 24, cols: int = 200) -> Any:
    """``bento ARGS`` under a pexpect PTY of that size (the caller closes it)."""
    import pexpect

    return pexpect.spawn(CLI[0], CLI[1:] + args, env=env, cwd=ROOT, timeout=30, dimensions=(rows, cols))


def state_sessions(state_file: str) -> dict[str, Any]:
    with open(state_file) as f:
        return json.load(f)["sessions"]


def write_file(directory: str, name: str, text: str) -> str:
    path = os.path.join(directory, name)
    with open(path, "w") as f:
        f.write(text)
    return path
