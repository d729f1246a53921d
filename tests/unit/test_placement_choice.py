"""Placement's choice of a node (bento/cluster/placement.py): pure functions of the heartbeats."""

from __future__ import annotations

import pytest

pytest.importorskip("coredis")

from bento.cluster.placement import candidates, figures, has_room, load  # noqa: E402

GiB = 1 << 30


def fig(running=0, max_running=4, memory=0, budget=8 * GiB, disk_ok=True, queued=0) -> dict:
    return {"running": running, "max_running": max_running, "memory": memory, "memory_budget": budget,
            "disk_ok": disk_ok, "queued": queued}


def test_figures_come_from_the_admission_statistics():
    stats = {"running": 2, "max_running": 5, "memory": 3, "memory_budget": 9, "disk_floor": 1, "queued": 0,
             "max_queued": 10}
    assert figures(stats, disk_ok=False) == fig(2, 5, 3, 9, disk_ok=False)


def test_room_needs_a_free_slot_the_memory_the_disk_and_no_queue():
    assert has_room(fig(), GiB)
    assert not has_room(fig(running=4), GiB)
    assert not has_room(fig(memory=7 * GiB + 1), GiB)
    assert has_room(fig(memory=7 * GiB), GiB)
    assert not has_room(fig(disk_ok=False), GiB)
    assert not has_room(fig(queued=1), GiB)  # its own waiters come first


def test_load_is_the_fuller_of_sessions_and_memory():
    assert load(fig(running=1, memory=6 * GiB)) == 0.75
    assert load(fig(running=3, memory=0)) == 0.75


def test_candidates_least_loaded_first_without_me_full_ones_or_nodes_without_figures():
    beats = {
        "a": {"capacity": fig()},  # this node
        "b": {"capacity": fig(running=3)},
        "c": {"capacity": fig(running=1)},
        "d": {"capacity": fig(running=4)},  # full
        "e": {"capacity": None},  # a node of an older version, or still starting
        "f": {},
        "g": {"capacity": fig(running=1)},
    }
    assert candidates(beats, "a", GiB) == ["c", "g", "b"]
    assert candidates(beats, "a", 9 * GiB) == []
