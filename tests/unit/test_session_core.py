"""The session core's rules, one test each, driven with bytes and a fake clock (no processes).

``Pair`` plays the exchange (a log of frames, the core's actions carried out)
and an owner that reads and acks, joined by a link the test can cut: as h11's
ConnectionPair, both sides are checked to agree after every step.
"""

from __future__ import annotations

import pytest

from bento import protocol
from bento.session_core import (
    ACCEPT,
    DUPLICATE,
    ENDED,
    EXIT_RULES,
    NEW,
    TRANSITIONS,
    Announce,
    ExitFacts,
    Kill,
    LocalError,
    Refused,
    Save,
    SessionCore,
    Snapshot,
    State,
    StateChanged,
    Trim,
    classify_exit,
    failed_exit,
    life_over,
    lost_exit,
)


class Pair:
    """An exchange (the core, its log, the actions it carried out) and an owner reading it."""

    def __init__(self, max_bytes: int = 100, policy: str = "block", core: SessionCore | None = None) -> None:
        self.core = core or SessionCore(max_bytes, policy)
        self.log: dict[int, bytes] = {}  # seq -> encoded frame data
        self.trimmed_to = 1
        self.kills: list[str] = []
        self.saves = 0
        self.pushed: list[tuple[int, bytes]] = []
        self.owner_next = 1  # the owner's position
        self.clock = 1000.0

    def do(self, actions: tuple) -> tuple:
        for a in actions:
            if isinstance(a, Trim):
                self.trimmed_to = a.first_seq
            elif isinstance(a, Kill):
                self.kills.append(a.reason)
            elif isinstance(a, Save):
                self.saves += 1
            elif isinstance(a, StateChanged):
                self.pushed.append((a.version, a.value))
        return actions

    def send(self, value: object) -> tuple:
        """The function's ``api.send(value)``: one frame, durable at once."""
        data = protocol.encode(value)
        seq = self.core.next_seq
        self.log[seq] = data
        actions = self.do(self.core.frame(seq, len(data)))
        self.core.durable(seq + 1)
        return actions

    def end(self, data: dict) -> None:
        seq = self.core.next_seq
        self.log[seq] = protocol.encode(data)
        self.do(self.core.recorded_exit(data, seq, self.clock))
        self.core.durable(seq + 1)

    def read(self) -> list:
        """The owner reads everything it has not (as an attachment from its position)."""
        snap = Snapshot.from_map(self.core.snapshot())
        got: list = []
        if self.owner_next < snap.first_seq:
            got.append(("gap", self.owner_next, snap.first_seq - 1, snap.gap_reason(self.owner_next)))
            self.owner_next = snap.first_seq
        while self.owner_next < snap.next_seq:
            got.append(protocol.decode(self.log[self.owner_next], require_map=False))
            self.owner_next += 1
        return got

    def ack(self) -> tuple:
        return self.do(self.core.ack(self.owner_next - 1))


def started(**kw: object) -> Pair:
    p = Pair(**kw)  # type: ignore[arg-type]
    p.core.started()
    return p


# -- §state ------------------------------------------------------------------------------


def test_a_new_session_is_starting_with_positions_1_1():
    core = SessionCore(100, "block")
    snap = core.snapshot()
    assert snap == dict(NEW._asdict())
    assert (snap["state"], snap["first_seq"], snap["next_seq"], snap["input_seq"]) == ("starting", 1, 1, 0)


def test_the_transition_table_covers_every_state_and_ended_states_are_final():
    assert set(TRANSITIONS) == set(State)
    for s in ENDED:
        assert TRANSITIONS[s] == frozenset()
    assert State.RUNNING in TRANSITIONS[State.STARTING]
    assert State.EXITED not in TRANSITIONS[State.STARTING]  # a function that never ran cannot exit
    assert {s.value for s in State} == set(protocol.STATES)


def test_nothing_leaves_an_ended_state():
    p = started()
    p.end({"state": "exited", "code": 0, "signal": None, "result": None, "error": None})
    with pytest.raises(LocalError):
        p.core.started()
    with pytest.raises(LocalError):
        p.core.recorded_exit(lost_exit(), p.core.next_seq, 0.0)


def test_a_session_that_could_not_start_is_failed_from_starting():
    p = Pair()
    p.end(failed_exit("SandboxError", "no bwrap"))
    assert p.core.state is State.FAILED and p.core.exit["error"]["message"] == "no bwrap"


def test_adoption_marks_a_live_session_lost():
    p = started()
    p.send("x")
    p.end(lost_exit())
    snap = p.core.snapshot()
    assert snap["state"] == "lost" and snap["exit_seq"] == 2 and snap["next_seq"] == 3


def facts(**kw: object) -> ExitFacts:
    base = dict(signal=None, code=0, kill_reason=None, kill_error=None, report=None, driver_up=True,
                user_signal=None, oom_killed=False, cpu_over=False, stderr_tail="", status=0)
    base.update(kw)
    return ExitFacts(**base)


RETURNED = {"t": "exit", "kind": "return", "result": 7, "error": None, "code": 0}
RAISED = {"t": "exit", "kind": "return", "result": None, "code": 1,
          "error": {"type": "ValueError", "message": "bad", "traceback": "..."}}


@pytest.mark.parametrize(("fx", "want"), [
    (facts(report=RETURNED), {"state": "exited", "code": 0, "result": 7, "signal": None, "error": None}),
    (facts(report=RAISED), {"state": "exited", "code": 1, "error": RAISED["error"]}),
    (facts(report={"kind": "sysexit", "code": 3, "error": None}), {"state": "exited", "code": 3}),
    (facts(report={"kind": "failed", "code": 1, "error": {"type": "SyntaxError"}}),
     {"state": "failed", "code": None, "error": {"type": "SyntaxError"}}),
    (facts(report={"kind": "interrupted", "code": 1, "error": {"type": "KeyboardInterrupt"}}),
     {"state": "killed", "signal": "INT", "code": None}),
    (facts(report=RETURNED, user_signal="INT"), {"state": "exited", "code": 0}),  # returned anyway
    (facts(signal="TERM", code=None, user_signal="TERM"), {"state": "killed", "signal": "TERM"}),
    (facts(signal="KILL", code=None), {"state": "killed", "signal": "KILL", "error": None}),
    (facts(signal="KILL", code=None, kill_reason="wall_s"),
     {"state": "killed", "signal": "KILL", "error": {"type": "LimitExceeded", "message": "wall_s"}}),
    (facts(signal="KILL", code=None, kill_reason="buffer"),
     {"state": "killed", "error": {"type": "LimitExceeded", "message": "buffer"}}),
    (facts(signal="KILL", code=None, oom_killed=True),
     {"state": "killed", "error": {"type": "LimitExceeded", "message": "memory_bytes"}}),
    (facts(signal="KILL", code=None, cpu_over=True),
     {"state": "killed", "error": {"type": "LimitExceeded", "message": "cpu_s"}}),
    (facts(signal="KILL", code=None, kill_reason="destroyed"), {"state": "killed", "signal": "KILL", "error": None}),
    (facts(code=1, driver_up=False, stderr_tail="bwrap: no", status=256),
     {"state": "failed", "error": {"type": "SandboxError", "traceback": "",
                                  "message": "the environment did not start (status 256): bwrap: no"}}),
    (facts(code=5), {"state": "exited", "code": 5}),
])
def test_exit_classification(fx, want):
    got = classify_exit(fx)
    assert set(got) == {"state", "code", "signal", "result", "error"}
    for k, v in want.items():
        assert got[k] == v, (k, got)
    if got["state"] in ("killed", "failed"):
        assert got["code"] is None


def test_every_exit_rule_is_reachable():
    # Each rule wins for at least one of the cases above (the table has no dead rows).
    cases = [facts(kill_reason="wall_s", signal="KILL"), facts(driver_up=False),
             facts(user_signal="TERM"), facts(signal="TERM"), facts(report=RETURNED), facts()]
    winners = []
    for fx in cases:
        winners.append(next(name for name, test, _ in EXIT_RULES if test(fx)))
    assert winners == [name for name, _, _ in EXIT_RULES]


# -- §acknowledgements -----------------------------------------------------------------


def test_owner_ack_frees_the_buffer_and_trims():
    p = started(max_bytes=1000)
    for _ in range(5):
        p.send(b"x" * 10)  # 11 bytes of data each
    assert p.core.buffer_bytes == 55
    assert len(p.read()) == 5
    actions = p.ack()
    assert Trim(6) in actions and Save(False) in actions and Announce() in actions
    snap = p.core.snapshot()
    assert (snap["acked_seq"], snap["first_seq"], snap["buffer_bytes"]) == (5, 6, 0)


def test_ack_beyond_the_last_durable_frame_counts_as_it():
    p = started()
    p.send(1)
    p.core.ack(99)
    assert p.core.acked_seq == 1
    seq = p.core.next_seq
    p.core.frame(seq, 1)  # appended, not yet durable
    p.core.ack(seq)
    assert p.core.acked_seq == 1


def test_an_old_ack_changes_nothing():
    p = started()
    p.send(1)
    p.send(2)
    p.do(p.core.ack(2))
    assert p.core.ack(1) == () and p.core.acked_seq == 2


def test_block_policy_is_full_at_the_limit_and_resumes_after_an_ack():
    p = started(max_bytes=30)
    p.send(b"x" * 14)
    assert not p.core.full and p.core.room == 15
    p.send(b"x" * 14)
    assert p.core.full and p.core.room == 0
    assert p.kills == [] and p.trimmed_to == 1  # nothing lost, nothing killed
    p.read()
    p.ack()
    assert not p.core.full and p.core.buffer_bytes == 0


def test_the_exit_frame_is_never_blocked_nor_counted():
    p = started(max_bytes=10)
    p.send(b"x" * 20)
    assert p.core.full
    p.end({"state": "exited", "code": 0, "signal": None, "result": None, "error": None})
    assert p.core.buffer_bytes == 21 and p.core.exit_seq == 2
    assert p.read()[-1]["state"] == "exited"


def test_drop_oldest_drops_the_oldest_and_records_a_gap():
    p = started(max_bytes=30, policy="drop_oldest")
    for i in range(5):
        actions = p.send(b"%d" % i * 9)  # 10 bytes of data each
    assert any(isinstance(a, Trim) for a in actions)
    snap = p.core.snapshot()
    assert snap["buffer_bytes"] <= 30 and snap["first_seq"] == 3 and snap["dropped_to"] == 2
    got = p.read()
    assert got[0] == ("gap", 1, 2, "dropped")
    assert [g[:1] for g in got[1:]] == [b"2", b"3", b"4"]


def test_drop_oldest_never_drops_the_new_frame():
    p = started(max_bytes=5, policy="drop_oldest")
    p.send(b"x" * 50)
    assert p.core.first_seq == 1 and p.core.next_seq == 2


def test_fail_policy_asks_to_kill_with_buffer():
    p = started(max_bytes=10, policy="fail")
    p.send(b"x" * 20)
    assert p.kills == ["buffer"]


def test_fail_policy_after_the_function_ended_kills_nothing():
    p = started(max_bytes=10, policy="fail")
    p.core.function_ended()
    p.send(b"x" * 20)  # its last output, drained after the end
    assert p.kills == []


def test_gap_after_trimmed_acked_frames_says_acked():
    p = started(max_bytes=100)
    p.send(1)
    p.send(2)
    p.read()
    p.ack()
    p.owner_next = 1  # a second reader from the start (cut link, resume from 1)
    assert p.read()[0] == ("gap", 1, 2, "acked")


def test_every_frame_reaches_the_owner_once_across_cut_links():
    p = started(max_bytes=10_000)
    seen: list = []
    for i in range(20):
        p.send(i)
        if i % 3 == 0:
            seen += p.read()
        if i % 7 == 0:
            p.owner_next = len(seen) + 1  # reconnect: resume from the last seq it has
    seen += p.read()
    assert seen == list(range(20))


# -- §input ------------------------------------------------------------------------------


def test_input_seqs_start_at_1_and_duplicates_are_ignored():
    core = SessionCore(100, "block")
    assert core.input(1) == ACCEPT
    core.input_recorded(1)
    assert core.input(1) == DUPLICATE and core.input(0) == DUPLICATE
    assert core.snapshot()["input_seq"] == 1


def test_an_input_gap_is_refused():
    core = SessionCore(100, "block")
    verdict = core.input(3)
    assert isinstance(verdict, Refused) and verdict.code == "input_gap" and "skips 1" in verdict.message


def test_input_while_starting_is_accepted():
    core = SessionCore(100, "block")
    assert core.state is State.STARTING and core.input(1) == ACCEPT


def test_input_after_the_function_ended_is_gone():
    core = SessionCore(100, "block")
    core.started()
    core.function_ended()
    verdict = core.input(1)
    assert isinstance(verdict, Refused) and verdict.code == "gone"
    # A duplicate is still answered as one (the client only re-sent it).
    assert core.input(0) == DUPLICATE


def test_input_recorded_out_of_order_is_the_shells_bug():
    core = SessionCore(100, "block")
    with pytest.raises(LocalError):
        core.input_recorded(2)


# -- shared state ----------------------------------------------------------------------------


def test_shared_state_starts_at_version_0_null_and_puts_count_up():
    p = started()
    assert (p.core.shared_version, p.core.shared_value) == (0, protocol.encode(None))
    ok, version, actions = p.core.put_state(protocol.encode({"a": 1}), None)
    p.do(actions)
    assert ok and version == 1 and p.pushed == [(1, protocol.encode({"a": 1}))] and Save(True) in actions


def test_shared_state_compare_and_set_conflicts_on_another_version():
    p = started()
    p.core.put_state(b"\x01", None)
    ok, version, actions = p.core.put_state(b"\x02", 0)
    assert (ok, version, actions) == (False, 1, ())
    assert p.core.put_state(b"\x03", 1)[:2] == (True, 2)


def test_shared_state_over_64_kib_is_refused_by_the_caller():
    core = SessionCore(100, "block")
    with pytest.raises(LocalError):
        core.put_state(b"\x00" * (64 * 1024 + 1), None)


# -- restart -----------------------------------------------------------------------------------


def test_a_restarted_core_has_the_same_positions():
    p = started(max_bytes=1000, policy="drop_oldest")
    for i in range(4):
        p.send(i)
    p.core.input_recorded(1)
    p.core.put_state(b"\x05", None)
    p.owner_next = 3
    p.ack()
    import array

    sizes = array.array("q", (len(p.log[s]) for s in sorted(p.log)))
    again = SessionCore(1000, "drop_oldest", saved=p.core.saved(), size_base=1, sizes=sizes, input_seq=1)
    assert again.snapshot() == p.core.snapshot()
    assert again.shared_version == 1 and again.state is State.RUNNING


def test_an_unknown_policy_is_refused():
    with pytest.raises(LocalError):
        SessionCore(1, "keep_all")


# -- §lifetime -------------------------------------------------------------------------------------


def snap(**kw: object) -> Snapshot:
    return NEW._replace(**kw)


def test_an_attached_session_never_ends():
    assert not life_over(snap(state="exited", exit_seq=3, acked_seq=3), True, 1e9, 1e9, 1.0)


def test_a_running_function_is_never_ended_by_the_lifetime():
    for state in ("starting", "running"):
        assert not life_over(snap(state=state), False, 1e9, 0.0, 1.0)


def test_an_ended_session_whose_exit_the_owner_acked_ends_once_detached():
    assert life_over(snap(state="exited", exit_seq=3, acked_seq=3), False, 0.0, 0.0, 3600.0)
    assert not life_over(snap(state="exited", exit_seq=3, acked_seq=2), False, 0.0, 0.0, 3600.0)


def test_an_ended_unattached_session_stays_the_ttl_after_its_end_and_last_detach():
    ended = snap(state="killed", exit_seq=3, acked_seq=0)
    assert not life_over(ended, False, 59.0, 600.0, 60.0)  # detached a moment ago
    assert not life_over(ended, False, 600.0, 59.0, 60.0)  # ended a moment ago
    assert life_over(ended, False, 60.0, 60.0, 60.0)
