"""Every test ends, and so does the run: a plugin (loaded by conftest.py).

- A trio test and its async fixtures run under one ``trio.fail_after(deadline)``
  (a ``run`` for pytest-trio's marker): on time they are cancelled, the test
  fails with a clear message, and its sync fixtures stop their servers as usual.
- A watchdog thread covers what a cancel scope cannot: a test blocked in a
  synchronous call (setup, teardown and sync tests included), and the run as a
  whole. When a test outlives its deadline by ``GRACE_S``, or the run outlives
  ``RUN_DEADLINE_S``, it prints every thread's stack, stops every live server by
  pid (with their exchanges and environments) and ends pytest with exit code 3
  (under xdist, that worker: xdist reports its test as crashed and the run fails).

The deadline of a test is ``TEST_DEADLINE_S`` unless it is marked
``@pytest.mark.deadline(seconds)``. Both figures can be set from the environment
(``BENTO_TEST_DEADLINE_S``, ``BENTO_RUN_DEADLINE_S``) for slow machines.
"""

from __future__ import annotations

import faulthandler
import inspect
import os
import sys
import threading
import time
from typing import Any

import pytest
import trio
from helpers import LIVE

TEST_DEADLINE_S = float(os.environ.get("BENTO_TEST_DEADLINE_S", "120"))
RUN_DEADLINE_S = float(os.environ.get("BENTO_RUN_DEADLINE_S", "1500"))
GRACE_S = 30.0


def deadline_of(item: pytest.Item) -> float:
    mark = item.get_closest_marker("deadline")
    return float(mark.args[0]) if mark else TEST_DEADLINE_S


def _run_under_deadline(seconds: float, nodeid: str) -> Any:
    """A ``trio.run`` for pytest-trio (its ``trio`` marker's ``run``): the test *and*
    its async fixtures, set-up and teardown, run under one ``fail_after``."""

    def run(fn: Any, **kwargs: Any) -> Any:
        async def main() -> Any:
            try:
                with trio.fail_after(seconds):
                    return await fn()
            except trio.TooSlowError:
                pytest.fail(f"{nodeid} did not end within its deadline of {seconds:g} s "
                            "(test and async fixtures)", pytrace=False)

        return trio.run(main, **kwargs)

    return run


SUMMARY_LINES = 16


def _frames_of(frame: Any, limit: int) -> list[str]:
    """The innermost ``limit`` frames of a stack, outermost first (as a traceback)."""
    out = []
    while frame is not None and len(out) < limit:
        code = frame.f_code
        where = os.path.relpath(code.co_filename) if code.co_filename.startswith(os.getcwd()) else code.co_filename
        out.append(f"    {where}:{frame.f_lineno} in {code.co_name}\n")
        frame = frame.f_back
    return out[::-1]


def summarise_threads() -> list[str]:
    """A few lines per thread, the main thread last: where each one is stuck."""
    names = {t.ident: t.name for t in threading.enumerate()}
    frames = sys._current_frames()
    lines: list[str] = []
    main = threading.main_thread().ident
    for ident, frame in frames.items():
        if ident in (main, threading.get_ident()):
            continue
        lines.append(f"*** thread {names.get(ident, ident)}:\n")
        lines += _frames_of(frame, 2)
    if main in frames:
        lines.append("*** main thread (innermost last):\n")
        lines += _frames_of(frames[main], 8)
    return lines


class Watchdog:
    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.started = time.monotonic()
        self.item: str | None = None
        self.item_until = float("inf")
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="test-watchdog", daemon=True)

    def _watch(self) -> None:
        while not self.stop.wait(1.0):
            now = time.monotonic()
            if now > self.item_until:
                self._end(f"{self.item} is still running {GRACE_S:g} s after its deadline")
            if now - self.started > RUN_DEADLINE_S:
                self._end(f"the test run took over {RUN_DEADLINE_S:g} s (now in {self.item})")

    def _end(self, why: str) -> None:
        capman = self.config.pluginmanager.getplugin("capturemanager")
        if capman is not None:
            capman.suspend_global_capture(in_=True)
        sys.stderr.write(f"\n\n*** test watchdog: {why}; stacks follow, then every server is stopped\n")
        sys.stderr.flush()
        summary = summarise_threads()  # before the servers go: what was it waiting for?
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        for srv in list(LIVE):
            try:
                srv.stop()
            except Exception as e:  # keep stopping the others; say what failed
                sys.stderr.write(f"*** could not stop the server on port {srv.port}: {e!r}\n")
        # Last, and short: a CI log may keep only its tail.
        sys.stderr.write(f"\n*** test watchdog: {why}\n")
        sys.stderr.write("".join(summary[-SUMMARY_LINES:]))
        sys.stderr.write("*** test watchdog: ended the run (exit code 3)\n")
        sys.stderr.flush()
        os._exit(3)


_watchdog: Watchdog | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _watchdog
    config.addinivalue_line("markers", "deadline(seconds): this test's own deadline")
    _watchdog = Watchdog(config)
    _watchdog.thread.start()


def pytest_unconfigure(config: pytest.Config) -> None:
    if _watchdog is not None:
        _watchdog.stop.set()


@pytest.hookimpl(trylast=True)  # after pytest-trio's own marker: this one goes first
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fn = getattr(item, "obj", None)
        if isinstance(item, pytest.Function) and inspect.iscoroutinefunction(fn):
            run = _run_under_deadline(deadline_of(item), item.nodeid)
            item.add_marker(pytest.mark.trio(run=run), append=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    if _watchdog is not None:
        _watchdog.item = item.nodeid
        _watchdog.item_until = time.monotonic() + deadline_of(item) + GRACE_S
    try:
        yield
    finally:
        if _watchdog is not None:
            _watchdog.item_until = float("inf")
