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


def test_held_lines_are_written_in_order_when_the_block_ends(lines):
    with events.held():
        events.emit("session.created", session="s_1")
        events.emit("session.state", session="s_1", state="running")
        assert lines == []  # nothing written yet
    events.emit("session.ended", session="s_1")
    assert [r.getMessage().split()[0] for r in lines] == ["session.created", "session.state", "session.ended"]
    assert lines[0].event == "session.created" and lines[0].fields == {"session": "s_1"}


def test_held_lines_are_written_when_the_block_raises(lines):
    with pytest.raises(RuntimeError), events.held():
        events.emit("session.created", session="s_2")
        raise RuntimeError("the execute failed")
    assert [r.getMessage() for r in lines] == ["session.created session=s_2"]


async def test_a_task_started_while_held_writes_at_once_after_the_block(lines):
    import trio

    async def reader(task_status=trio.TASK_STATUS_IGNORED) -> None:  # noqa: ANN001
        events.emit("reader.started")
        task_status.started()
        await trio.sleep(0.01)
        events.emit("reader.later")  # the block has ended: not held, not lost

    async with trio.open_nursery() as nursery:
        with events.held():
            events.emit("held.line")
            await nursery.start(reader)
            assert lines == []
        assert [r.getMessage() for r in lines] == ["held.line", "reader.started"]
    assert [r.getMessage() for r in lines] == ["held.line", "reader.started", "reader.later"]


def test_handed_on_lines_wait_for_their_release_and_are_written_once(lines):
    with events.held() as held:
        events.emit("session.created", session="s_3")
        handed = held.hand_on()
    assert lines == []  # the block's end left them to the receiver
    events.emit("session.state", session="s_3", state="exited")  # not held: written at once
    handed.release()
    handed.release()
    assert [r.getMessage().split()[0] for r in lines] == ["session.state", "session.created"]
