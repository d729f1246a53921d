"""Tests that measure the whole machine run alone: a plugin (loaded by conftest.py).

``make test`` runs the suite in two pytest-xdist workers. A test marked
``@pytest.mark.alone`` reads something every process shares (the host's
available memory), so no other test may run beside it. Each test takes a lock
on a file that all workers of one run share: shared for an ordinary test,
exclusive for an ``alone`` one. A turnstile lock taken first keeps a waiting
``alone`` test from being starved by a worker that takes its next shared lock
the moment it lets go of the last.

The ``alone`` tests are collected first, so that they run one after another
on one worker, and that worker keeps its exclusive lock from one ``alone``
test to the next: else the other worker runs one of its tests between each
two, and each ``alone`` test waits for that one to end.

The lock is taken before the test's deadline starts (bento's ``deadlines``
plugin, which wraps this hook from outside): the longest wait is the other
worker's current test, which its own deadline bounds, or the ``alone``
tests themselves. A worker that dies lets go of its locks with its process.
Without xdist this does nothing but the order.
"""

from __future__ import annotations

import fcntl
import os
import tempfile

import pytest

_lock_fd = -1
_turnstile_fd = -1
_paths: tuple[str, str] | None = None  # (lock, turnstile) of this run, in an xdist worker
_held_alone = False  # this worker holds the lock exclusively, kept for its next ``alone`` test


def pytest_configure(config: pytest.Config) -> None:
    global _lock_fd, _turnstile_fd, _paths
    config.addinivalue_line("markers", "alone: no other test runs beside this one (xdist)")
    run = getattr(config, "workerinput", {}).get("testrunuid")
    if run is None:
        return  # not an xdist worker: one test at a time anyway
    base = os.path.join(tempfile.gettempdir(), f"bento-tests-{run}")
    _paths = (base + ".lock", base + ".turnstile")
    _lock_fd, _turnstile_fd = (os.open(path, os.O_RDWR | os.O_CREAT, 0o600) for path in _paths)


def pytest_unconfigure(config: pytest.Config) -> None:
    global _lock_fd, _turnstile_fd
    for fd in (_lock_fd, _turnstile_fd):
        if fd >= 0:
            os.close(fd)
    _lock_fd = _turnstile_fd = -1
    for path in _paths or ():
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass  # the other worker removed it first


def _alone(item: pytest.Item | None) -> bool:
    return item is not None and item.get_closest_marker("alone") is not None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items[:] = [i for i in items if _alone(i)] + [i for i in items if not _alone(i)]


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    global _held_alone
    if _lock_fd < 0:
        yield
        return
    alone = _alone(item)
    if _held_alone:
        # Still ours from the last test. Not an ``alone`` one after all (xdist's
        # worksteal may have handed the one that was next to the other worker): a
        # shared lock now, without the turnstile, which that worker may hold
        # while it waits for this very lock.
        if not alone:
            fcntl.flock(_lock_fd, fcntl.LOCK_SH)
    else:
        fcntl.flock(_turnstile_fd, fcntl.LOCK_EX)
        try:
            fcntl.flock(_lock_fd, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        finally:
            fcntl.flock(_turnstile_fd, fcntl.LOCK_UN)
    _held_alone = alone and _alone(nextitem)
    try:
        yield
    finally:
        if not _held_alone:
            fcntl.flock(_lock_fd, fcntl.LOCK_UN)
