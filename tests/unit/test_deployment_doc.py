"""docs/operations.md's systemd unit and config file example are what an
operator copies: the unit must keep functions alive across a restart, and the
example may use only settings the server knows."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import tomllib

import pytest

from bento import settings
from bento.app import server_parser

DOC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "operations.md")


def fenced(language: str) -> list[str]:
    with open(DOC) as f:
        text = f.read()
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.DOTALL)


def test_systemd_unit_keeps_functions_alive_across_restart():
    (unit,) = fenced("ini")
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(unit)
    service = parser["Service"]
    # Only the server's own process is stopped; exchanges and environments stay.
    assert service["KillMode"] == "process"
    start = service["ExecStart"]
    assert " server --config " in start and "--api-key " not in start, start
    assert "-HUP" in service["ExecReload"] and "$MAINPID" in service["ExecReload"]
    assert service.get("Restart") in ("on-failure", "always")
    assert parser["Install"]["WantedBy"] == "multi-user.target"


def test_systemd_accepts_the_unit(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("no systemd-analyze here")
    (unit,) = fenced("ini")
    start = re.search(r"^ExecStart=(\S+)", unit, flags=re.MULTILINE)
    assert start is not None
    path = tmp_path / "bento.service"
    path.write_text(unit.replace(start.group(1), "/bin/true"))  # the install path is not here
    r = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr


def test_config_example_uses_only_known_settings():
    (example,) = fenced("toml")
    config = tomllib.loads(example)
    known = {a.dest for a in server_parser()._actions} - set(settings.NOT_IN_FILE)
    assert set(config) <= known | set(settings.FILE_ONLY), set(config) - known
    for name, key in config["keys"].items():
        assert set(key) <= {"role", "quota", *settings.KEY_SOURCES}, name
        assert key["role"] in ("admin", "user")
        if "quota" in key:
            settings._quota(key["quota"], name)  # raises for a name or value it would refuse
