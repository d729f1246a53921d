"""The event log's lines: text and JSON forms, and refused requests throttled per
class and peer so a flood of bad requests cannot flood the log."""

from __future__ import annotations

import json
import logging

import pytest

from bento import events


@pytest.fixture
def lines(monkeypatch):
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    events.log.addHandler(handler)
    monkeypatch.setattr(events.log, "level", logging.INFO)
    monkeypatch.setattr(events, "_refused", {})
    yield records
    events.log.removeHandler(handler)


def test_text_and_json_forms(lines):
    events.emit("session.state", session="s_1", state="killed", note="two words",
                **events.exit_fields({"state": "killed", "signal": "KILL", "code": None,
                                      "error": {"type": "Killed", "by": "admin:alice"}}))
    (record,) = lines
    assert record.getMessage() == ('session.state session=s_1 state=killed note="two words" '
                                   'signal=KILL error=Killed by=admin:alice')
    as_json = json.loads(events.JsonFormatter().format(record))
    assert as_json["event"] == "session.state" and as_json["by"] == "admin:alice"
    assert as_json["level"] == "info" and as_json["time"].endswith("Z") and "message" not in as_json


def test_refused_is_throttled_per_class_and_peer(lines, monkeypatch):
    now = [100.0]
    monkeypatch.setattr(events.time, "monotonic", lambda: now[0])
    for _ in range(50):
        events.refused("bad_key", "10.0.0.1")
    events.refused("bad_key", "10.0.0.2")
    events.refused("rate_limit", "10.0.0.1")
    assert len(lines) == 3
    now[0] += events.REFUSED_EVERY_S
    events.refused("bad_key", "10.0.0.1")
    assert lines[-1].getMessage() == "refused what=bad_key peer=10.0.0.1 more_since_last=49"
