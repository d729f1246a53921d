"""Every test ends, and so does the run: a plugin (loaded by conftest.py).

- A trio test runs under ``trio.fail_after(deadline)``: on time it is cancelled,
  fails with a clear message, and its fixtures stop their servers as usual.
- A watchdog thread covers what a cancel scope cannot: a test blocked in a
  synchronous call (setup, teardown and sync tests included), and the run as a
  whole. When a test outlives its deadline by ``GRACE_S``, or the run outlives
  ``RUN_DEADLINE_S``, it prints every thread's stack, stops every live server by
  pid (with their exchanges and environments) and ends pytest with exit code 3.

The deadline of a test is ``TEST_DEADLINE_S`` unless it is marked
``@pytest.mark.deadline(seconds)``. Both figures can be set from the environment
(``BENTO_TEST_DEADLINE_S``, ``BENTO_RUN_DEADLINE_S``) for slow machines.
"""

from __future__ import annotations

import faulthandler
import functools
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


def _under_deadline(fn: Any, seconds: float, nodeid: str) -> Any:
    @functools.wraps(fn)
    async def run(*args: Any, **kwargs: Any) -> Any:
        try:
            with trio.fail_after(seconds):
                return await fn(*args, **kwargs)
        except trio.TooSlowError:
            pytest.fail(f"{nodeid} did not end within its deadline of {seconds:g} s", pytrace=False)

    return run


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
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        for srv in list(LIVE):
            try:
                srv.stop()
            except Exception as e:  # keep stopping the others; say what failed
                sys.stderr.write(f"*** could not stop the server on port {srv.port}: {e!r}\n")
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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fn = getattr(item, "obj", None)
        if isinstance(item, pytest.Function) and inspect.iscoroutinefunction(fn):
            item.obj = _under_deadline(fn, deadline_of(item), item.nodeid)


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
