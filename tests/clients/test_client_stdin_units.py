"""Stdin input items in the CLI's state file: they come back as they went in."""

from __future__ import annotations

import json

from bento_clients.frames import EOF, Stdin
from bento_clients.state import input_from_json, input_to_json


def test_stdin_items_round_trip_through_json():
    for item in (Stdin(b"line\n\xff\x00"), Stdin(b""), Stdin(None), EOF, "text", {"k": [1, b"\x01"]}):
        assert input_from_json(json.loads(json.dumps(input_to_json(item)))) == item


def test_a_value_that_looks_like_a_stdin_item_stays_a_value():
    assert input_from_json({"$stdin": 1}) == {"$stdin": 1}
    assert input_from_json({"$stdin": "text"}) == {"$stdin": "text"}
