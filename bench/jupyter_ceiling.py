"""The warm Jupyter ceilings: bench/jupyter/first.py (stock Jupyter packages in
bench/jupyter/.venv) as a child process, one ``print('x')`` per call.

Available when that venv is installed (`make bench` and `make test` install
bench/jupyter/requirements.txt there); :func:`missing` says why not otherwise,
and the rows carry that instead of a figure."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import tempfile
import time

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "jupyter")
PYTHON = os.path.join(HERE, ".venv", "bin", "python")
INSTALLED = os.path.join(HERE, ".venv", ".installed")  # (the Makefile's stamp: every package is in)
SCRIPT = os.path.join(HERE, "first.py")
START_TIMEOUT_S = 120.0  # a kernel (and a gateway) start, then ten executes
ONCE_TIMEOUT_S = 40.0


def missing() -> str | None:
    """Why the Jupyter ceilings cannot run here, or None."""
    if not os.path.exists(INSTALLED):
        return ("bench/jupyter/.venv missing (`make bench` installs bench/jupyter/requirements.txt "
                "there; it needs PyPI)")
    return None


class Jupyter:
    """A warm kernel (``mode`` "kernel") or a kernel behind the gateway ("gateway")."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen([PYTHON, SCRIPT, mode], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.err, text=True, bufsize=1, start_new_session=True)
        try:
            line = self._line(START_TIMEOUT_S)
            if line != "ready":
                raise RuntimeError(f"jupyter {mode}: said {line!r} instead of ready")
        except BaseException:
            self.close()
            raise

    def _line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"jupyter {self.mode}: no answer within {timeout:.0f} s")
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                break
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(10)
            self.err.seek(0)
            tail = self.err.read().decode(errors="replace").strip().splitlines()[-5:]
            raise RuntimeError(f"jupyter {self.mode} exited with {self.proc.returncode}: " + " | ".join(tail))
        return line.strip()

    def once(self) -> float:
        """Seconds from one execute's send to its first stream output."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return float(self._line(ONCE_TIMEOUT_S))

    def close(self) -> None:
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            # Its gateway too (its kernels watch their parent, and follow).
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.err.close()
