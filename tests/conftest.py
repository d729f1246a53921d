from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from helpers import ServerProcess  # noqa: E402

pytest_plugins = ["deadlines", "alone"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server shared by the tests of one module (each test uses its own sessions)."""
    srv = ServerProcess(str(tmp_path_factory.mktemp("srv") / "data")).start()
    yield srv
    srv.stop()


@pytest.fixture
def make_server(tmp_path):
    """Start servers with their own options and data dir; all stopped at the end."""
    started: list[ServerProcess] = []

    def make(*extra: str, data_dir: str | None = None) -> ServerProcess:
        srv = ServerProcess(data_dir or str(tmp_path / f"data{len(started)}"), *extra).start()
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()
