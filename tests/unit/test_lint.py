"""The code stays as `make lint` wants it: ruff's rules and mypy's types.

Both tools are in the `dev` extra, which `make test` installs; they run as
their own processes, over the same paths as `make lint`.
"""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)


def run(tool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([os.path.join(BIN, tool), *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_ruff_finds_nothing():
    r = run("ruff", "check", "bento", "driver", "sandbox", "clients", "tests")
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_finds_nothing():
    r = run("mypy", "bento", "driver/bento_driver", "sandbox/bento_sandbox", "clients/bento_clients")
    assert r.returncode == 0, r.stdout + r.stderr
