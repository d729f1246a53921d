"""Sizes, durations and limit values as the server's options, its config file and
the clients read them: one parser (bento/units.py)."""

from __future__ import annotations

import pytest

from bento import units
from bento.settings import parse_limits


def test_sizes_with_every_suffix():
    cases = {"512MiB": 512 << 20, "1GiB": 1 << 30, "1G": 1 << 30, "4k": 4096, "64K": 65536,
             "1.5M": 3 << 19, "2gb": 2 << 30, "1T": 1 << 40, "4096": 4096, " 8 MiB ": 8 << 20}
    assert {text: units.parse_size(text) for text in cases} == cases
    assert units.size(1024) == 1024


def test_durations_with_every_suffix():
    cases = {"30": 30, "30s": 30, "500ms": 0.5, "1.5m": 90, "2h": 7200, "1d": 86400}
    assert {text: units.parse_duration(text) for text in cases} == cases
    assert units.duration(2.5) == 2.5 and units.duration("24h") == 86400


@pytest.mark.parametrize("bad", ["", "lots", "-1", "1.5.2M", "1X", "nan", "inf", "1e9"])
def test_bad_sizes_say_what_is_accepted(bad):
    with pytest.raises(ValueError, match="bad size .*examples"):
        units.parse_size(bad)


@pytest.mark.parametrize("bad", [-1, float("inf"), float("nan"), True, "soon", "1w"])
def test_bad_durations_are_refused(bad):
    with pytest.raises(ValueError, match="bad duration"):
        units.duration(bad)


def test_limit_values_by_kind():
    assert units.limit_value("memory_bytes", "512MiB") == 512 << 20
    assert units.limit_value("output_bytes", 1000) == 1000
    assert units.limit_value("wall_s", "1.5m") == 90
    assert units.limit_value("cpu_s", 2.5) == 2.5
    assert units.limit_value("pids", "64") == 64
    for key, value, message in [("pids", "1.5", "whole number"), ("memory_bytes", "big", "bad size"),
                                ("wall_s", -3, "bad duration"), ("colour", "1", "not a limit")]:
        with pytest.raises(ValueError, match=f"limit {key}: .*{message}"):
            units.limit_value(key, value)


def test_server_limit_options_take_suffixes():
    """`--max-limit memory_bytes=512MiB` failed with "could not convert string to float"
    although --help itself wrote memory_bytes=1GiB."""
    assert parse_limits(["memory_bytes=512MiB", "wall_s=2h", "pids=10", "file_bytes=4k",
                         "cpu_s=none"]) == {
        "memory_bytes": 512 << 20, "wall_s": 7200, "pids": 10, "file_bytes": 4096, "cpu_s": None}
    assert parse_limits(["wall_s=1h", "wall_s=2h"]) == {"wall_s": 7200}  # the later one wins
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_limits(["memory=1G"])
