"""Admission rules (bento/admission.py) with a fake clock: no server, no I/O."""

from __future__ import annotations

import pytest

from bento.admission import Admission, Capacity, Quota, Quotas, Refused, default_capacity, key_id
from bento.config import make_quotas

MiB = 1 << 20
GiB = 1 << 30
DISK = 10 * GiB


def make(max_running: int = 4, budget: int = 4 * GiB, floor: int = GiB, queued: int = 8,
         **quota: int | float) -> Admission:
    cap = Capacity(max_running=max_running, memory_budget=budget, disk_floor=floor,
                   default_memory=GiB, max_queued=queued)
    return Admission(cap, Quotas(Quota(**quota)))


def start(adm: Admission, key: str = "k", memory: int = 256 * MiB, now: float = 0.0,
          disk: int = DISK, history: int = 0):
    adm.check_capacity(memory, disk)
    adm.check_quota(key, now, history)
    t = adm.ticket(key, memory)
    adm.admit(t)
    return t


def refused(fn, *args, **kw) -> Refused:
    with pytest.raises(Refused) as info:
        fn(*args, **kw)
    return info.value


def test_max_running_is_busy_with_retry_after_and_frees_on_release():
    adm = make(max_running=2)
    a = start(adm)
    start(adm)
    r = refused(adm.check_capacity, MiB, DISK)
    assert (r.code, r.limit) == ("busy", "sessions")
    assert r.retry_after and r.retry_after > 0
    assert r.fields() == {"busy": "sessions", "retry_after": r.retry_after}
    adm.release(a)
    adm.release(a)  # twice is once
    adm.check_capacity(MiB, DISK)
    assert adm.statistics()["running"] == 1


def test_memory_budget_counts_limits_and_the_default_for_none():
    adm = make(max_running=100, budget=3 * GiB)
    assert adm.memory_of({}) == GiB
    assert adm.memory_of({"memory_bytes": 100 * MiB}) == 100 * MiB
    start(adm, memory=adm.memory_of({}))
    start(adm, memory=GiB)
    r = refused(adm.check_capacity, GiB + 1, DISK)
    assert (r.code, r.limit) == ("busy", "memory") and r.retry_after
    adm.check_capacity(GiB, DISK)
    assert adm.memory == 2 * GiB


def test_more_than_the_whole_budget_is_never_worth_a_retry():
    adm = make(budget=GiB)
    r = refused(adm.check_capacity, 2 * GiB, DISK)
    assert r.limit == "memory" and r.retry_after is None and "ask for less" in r.message


def test_disk_floor():
    adm = make(floor=GiB)
    r = refused(adm.check_capacity, MiB, GiB - 1)
    assert (r.code, r.limit) == ("busy", "disk") and "floor" in r.message
    adm.check_capacity(MiB, GiB)


def test_quota_sessions_is_per_key():
    adm = make(sessions=1)
    a = start(adm, "alice")
    r = refused(adm.check_quota, "alice", 0.0, 0)
    assert (r.code, r.limit) == ("quota", "sessions") and r.retry_after is None
    assert r.fields() == {"quota": "sessions"}
    start(adm, "bob")
    adm.release(a)
    adm.check_quota("alice", 0.0, 0)


def test_executes_per_minute_is_a_token_bucket():
    adm = make(max_running=1000, executes_per_minute=6)  # one every 10 s, burst 6
    for _ in range(6):
        adm.check_quota("alice", 0.0, 0)
    r = refused(adm.check_quota, "alice", 0.0, 0)
    assert (r.code, r.limit) == ("quota", "executes_per_minute")
    assert r.retry_after == pytest.approx(10.0)
    adm.check_quota("bob", 0.0, 0)  # another key's bucket is full
    r = refused(adm.check_quota, "alice", 5.0, 0)
    assert r.retry_after == pytest.approx(5.0)
    adm.check_quota("alice", 10.0, 0)
    refused(adm.check_quota, "alice", 10.0, 0)
    adm.refund("alice")
    adm.check_quota("alice", 10.0, 0)


def test_zero_executes_per_minute_refuses_without_retry():
    adm = make(executes_per_minute=0)
    r = refused(adm.check_quota, "k", 0.0, 0)
    assert r.limit == "executes_per_minute" and r.retry_after is None


def test_history_bytes_quota():
    adm = make(history_bytes=1000)
    adm.check_quota("k", 0.0, 999)
    r = refused(adm.check_quota, "k", 0.0, 1000)
    assert (r.code, r.limit) == ("quota", "history_bytes")


def test_a_keys_own_quota_replaces_the_default_quota():
    adm = make(sessions=1)
    adm.quotas.by_key["vip"] = Quota(sessions=3)
    for _ in range(3):
        start(adm, "vip")
    refused(adm.check_quota, "vip", 0.0, 0)
    start(adm, "other")
    refused(adm.check_quota, "other", 0.0, 0)


def test_make_quotas_merges_a_keys_table_over_the_default():
    q = make_quotas({"sessions": 2, "executes_per_minute": 30.0, "history_bytes": None, "environments": None},
                    {"vip": {"sessions": None, "environments": 3}, "slow": {"executes_per_minute": 0.5}})
    assert q.of("anyone") == Quota(sessions=2, executes_per_minute=30.0)
    assert q.of("vip") == Quota(sessions=None, executes_per_minute=30.0, environments=3)
    assert q.of("slow") == Quota(sessions=2, executes_per_minute=0.5)
    with pytest.raises(ValueError, match="--quota-sessions"):
        make_quotas({"sessions": -1}, {})
    # A reload replaces both in place: the admission that shares the object sees it.
    adm = Admission(make().capacity, q)
    q.replace(Quota(sessions=0), {})
    assert refused(adm.check_quota, "vip", 0.0, 0).limit == "sessions"


def test_environments_quota_counts_what_the_key_built_and_still_exists():
    adm = make(max_running=10, environments=2)
    ready: set[str] = {"old"}

    def build(key: str, env: str):
        """What the gate does for an execute with packages (environment ``env``)."""
        new = env if adm.builds(env, ready.__contains__) else None
        held = adm.environments(key, ready.__contains__) if new else None
        adm.check_quota(key, 0.0, 0, held)
        t = adm.ticket(key, MiB, new)
        adm.admit(t)
        return t

    assert not adm.builds("old", ready.__contains__) and not adm.builds(None, ready.__contains__)
    build("alice", "old")  # ready: no build, however many
    a = build("alice", "e1")
    assert not adm.builds("e1", ready.__contains__)  # being built: another execute waits for it
    build("alice", "e1")
    build("alice", "e2")
    r = refused(build, "alice", "e3")
    assert (r.code, r.limit) == ("quota", "environments") and r.retry_after is None
    assert r.fields() == {"quota": "environments"}
    build("bob", "e3")  # another key's count
    ready.add("e1")
    adm.release(a)
    refused(build, "alice", "e4")  # e1 is ready, e2 still building: two
    for t in [t for t in adm.running if t.env == "e2"]:
        adm.release(t)  # e2's build failed: it is not there, so it is not counted
    build("alice", "e4")
    ready.discard("e1")  # evicted or removed
    build("alice", "e5")
    assert adm.built["alice"] == {"e4", "e5"}


def test_queue_is_fair_between_keys():
    adm = make(max_running=1)
    start(adm, "x")
    a1, a2, a3 = (adm.ticket("a", MiB) for _ in range(3))
    b1 = adm.ticket("b", MiB)
    assert [adm.enqueue(t) for t in (a1, a2, a3)] == [1, 2, 3]
    assert adm.enqueue(b1) == 2  # one of b's before a's second
    assert adm.waiting == [a1, b1, a2, a3]
    c1 = adm.ticket("c", MiB)
    assert adm.enqueue(c1) == 3
    adm.release(next(iter(adm.running)))
    assert adm.next_admitted(DISK) is a1
    assert adm.waiting == [b1, c1, a2, a3]
    # A key that comes now joins the round being served: after a2, before a3.
    d1 = adm.ticket("d", MiB)
    assert adm.enqueue(d1) == 4
    assert adm.waiting == [b1, c1, a2, d1, a3]
    adm.leave(c1)  # timed out
    assert adm.position(a2) == 2


def test_queue_admits_only_the_head_when_it_fits():
    adm = make(max_running=10, budget=2 * GiB)
    x = start(adm, "x", memory=GiB + 512 * MiB)
    big = adm.ticket("a", GiB)
    small = adm.ticket("b", MiB)
    adm.enqueue(big)
    adm.enqueue(small)
    assert adm.next_admitted(DISK) is None  # the head does not fit: nobody jumps it
    adm.release(x)
    assert adm.next_admitted(DISK) is big and big.admitted
    assert adm.next_admitted(DISK) is small
    assert adm.next_admitted(DISK) is None
    assert adm.statistics()["queued"] == 0


def test_queue_waits_for_the_disk_and_is_bounded():
    adm = make(max_running=1, queued=2)
    start(adm)
    t = adm.ticket("k", MiB)
    adm.enqueue(t)
    adm.enqueue(adm.ticket("k", MiB))
    r = refused(adm.enqueue, adm.ticket("k", MiB))
    assert (r.code, r.limit) == ("busy", "queue")
    assert "queue is full" in r.message and "--max-queued 2" in r.message, r.message
    adm.release(next(iter(adm.running)))
    assert adm.next_admitted(GiB - 1) is None
    assert adm.next_admitted(DISK) is t


def test_usage_per_key():
    adm = make()
    start(adm, "alice", memory=10 * MiB)
    b = start(adm, "alice", memory=20 * MiB)
    adm.release(b)
    used = adm.usage["alice"]
    assert (used.running, used.memory, used.executes) == (1, 10 * MiB, 2)


def test_defaults_from_the_machine():
    cap = default_capacity(24 * GiB, 100 * GiB, None)
    assert cap.memory_budget == 18 * GiB
    assert cap.max_running == 384
    assert cap.disk_floor == GiB
    assert cap.default_memory == GiB
    assert default_capacity(GiB, 100 * MiB, 256 * MiB).disk_floor == 5 * MiB


def test_key_id_is_short_and_never_empty():
    assert key_id("ab" * 32) == "ab" * 6
    assert key_id("") == "-"
