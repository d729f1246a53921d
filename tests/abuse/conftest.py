"""Fixtures of the sandbox abuse suite: one server per test, of the backend the test is
parametrized with (``abuse_kit.backends``), and a finaliser that fails the test if any
process of its attacks is still alive (and kills it, by pid)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from abuse_kit import Abuse  # noqa: E402


@pytest.fixture
def backend(request) -> str:
    return request.param


@pytest.fixture
def abuse(backend, make_server):
    """A fresh server with ``--sandbox <backend>``, its canaries, and the attack runner.

    Requested after ``make_server``, so this finaliser runs while the server still
    lives: what it finds is what the server failed to clean up."""
    # bwrap: each environment a bwrap of its own; forked: forked by the sandbox template
    # (driver/bento_driver/template.py), which makes the sandbox itself.
    options = {"bwrap": ["--sandbox", "bwrap", "--no-sandbox-template"], "forked": ["--sandbox", "bwrap"],
               "none": ["--sandbox", "none"]}[backend]
    ab = Abuse(make_server(*options), backend)
    yield ab
    left = ab.cleanup()
    if left:
        pytest.fail(f"attack processes outlived the test (killed now): {left}")
