"""What the sandbox template accepts as a request, and how an exchange names a
home to it: only a directory directly under the data dir's ``warm/`` or
``sessions/``, never a path that climbs out or into anything else."""

from __future__ import annotations

import pytest
from bento_driver.template import _request
from bento_sandbox.forked import home_of

FDS = [10, 11, 12, 13, 14]


@pytest.mark.parametrize("name", ["warm/warm-ab_c1", "sessions/s_0123abcd", "warm/.probe"])
def test_a_request_for_a_session_directory_is_taken(name):
    assert _request(f"{name}\0{1 << 20}\0{1 << 16}".encode(), FDS) == (name, 1 << 20, 1 << 16)


@pytest.mark.parametrize("body", [
    b"warm/..\x001\x001", b"sessions/.\x001\x001", b"warm/a/b\x001\x001", b"envs/x\x001\x001",
    b"../warm/x\x001\x001", b"warm/\x001\x001", b"warm\x001\x001", b"/warm/x\x001\x001",
    b"warm/x\x00-1\x001", b"warm/x\x001", b"warm/x\x001\x001\x001", b"warm/x y\x001\x001",
])
def test_anything_else_is_refused(body):
    assert _request(body, FDS) is None


def test_a_request_without_its_five_fds_is_refused():
    assert _request(b"warm/x\x001\x001", FDS[:4]) is None


def test_an_exchange_names_only_homes_the_template_sees():
    assert home_of("/d/warm/warm-x1/work") == "warm/warm-x1"
    assert home_of("/d/sessions/s_1/work/") == "sessions/s_1"
    assert home_of("/d/sessions/s_1/other") is None
    assert home_of("/d/elsewhere/s_1/work") is None


def test_the_template_and_the_exchange_agree_on_the_failed_exit_code():
    # (the two packages cannot import each other: each names it)
    from bento_driver import template
    from bento_sandbox import forked

    assert template.FAILED == forked.FAILED
