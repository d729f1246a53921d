"""Fixtures of the sandbox abuse suite: a server of the backend each test is
parametrized with (``abuse_kit.backends``), and a finaliser that fails the test if any
process of its attacks is still alive (and kills it, by pid).

The module's attacks share one server per backend, as a server meets one attack
after another (each attack still gets its own health session, baseline, tag and
canaries). A server that an attack ended (unsandboxed, an attack may kill it: its
test says so) is replaced for the next test. (The module runs ``alone``: while it
does no other test runs, so its servers' starts cost the whole suite.)"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from abuse_kit import Abuse  # noqa: E402
from helpers import ServerProcess  # noqa: E402

# bwrap: each environment a bwrap of its own; forked: forked by the sandbox template
# (driver/bento_driver/template.py), which makes the sandbox itself.
OPTIONS = {"bwrap": ("--sandbox", "bwrap", "--no-sandbox-template"), "forked": ("--sandbox", "bwrap"),
           "none": ("--sandbox", "none")}


@pytest.fixture
def backend(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def abuse_servers(tmp_path_factory):
    """The module's servers by backend, started when a test first needs one; all
    stopped (by pid) at the module's end."""
    servers: dict[str, ServerProcess] = {}
    started: list[ServerProcess] = []

    def server(backend: str) -> ServerProcess:
        srv = servers.get(backend)
        if srv is None or srv.proc is None or srv.proc.poll() is not None:
            base = tmp_path_factory.mktemp(f"abuse-{backend}")
            srv = servers[backend] = ServerProcess(str(base / "data"), *OPTIONS[backend]).start()
            started.append(srv)
        return srv

    yield server
    for srv in started:
        srv.stop()


@pytest.fixture
def abuse(backend, abuse_servers):
    """The backend's server, a fresh tag and canaries, and the attack runner."""
    ab = Abuse(abuse_servers(backend), backend)
    yield ab
    left = ab.cleanup()
    if left:
        pytest.fail(f"attack processes outlived the test (killed now): {left}")
