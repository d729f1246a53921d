"""The SDK's flow control (bento_clients/flow.py) driven without a network: when
an attachment pauses and resumes, what it drops while paused, and that a
reader that falls behind sees every frame exactly once with a bounded queue."""

from __future__ import annotations

import random

import pytest
from bento_clients.flow import ReadQueue
from bento_clients.frames import Stdout
from bento_clients.positions import OutputTracker


def test_no_limit_never_pauses():
    q: ReadQueue[int] = ReadQueue(None)
    for i in range(1000):
        assert q.arrived(1)
        q.push(i, 1 << 20)
    assert not q.should_pause() and not q.paused
    assert q.queued_bytes == 1000 << 20 and len(q) == 1000
    with pytest.raises(ValueError):
        ReadQueue(0)


def test_pauses_once_past_the_limit_and_drops_while_paused():
    q: ReadQueue[str] = ReadQueue(100)
    q.push("a", 60)
    assert not q.should_pause()  # at or under the limit
    q.push("b", 60)
    assert not q.should_pause(allowed=False)  # e.g. the exit frame is in: nothing to pause
    assert q.should_pause() and q.paused and q.pauses == 1
    assert not q.should_pause()  # already paused: one detach only
    assert not q.arrived(7) and q.refetched == 7  # sent before the server had the detach
    assert q.take() == "a" and q.queued_bytes == 60


def test_resumes_at_half_once_and_the_pause_ends_with_the_attach_reply():
    q: ReadQueue[str] = ReadQueue(100)
    for name in "abc":
        q.push(name, 40)
    assert q.should_pause()
    assert not q.should_resume()  # 120 bytes queued
    q.take()
    assert not q.should_resume()  # 80 > 50
    q.take()
    assert not q.should_resume(allowed=False)  # e.g. the client gave up
    assert q.should_resume() and q.resuming
    assert not q.should_resume()  # one resume on its way at a time
    assert q.paused and not q.arrived(1)  # frames before the attach reply are still dropped
    q.attached()
    assert not q.paused and q.arrived(1)  # those right behind the reply are taken
    q.resume_ended()
    assert not q.resuming and not q.should_resume()


def test_a_refused_resume_may_be_tried_again():
    q: ReadQueue[str] = ReadQueue(10)
    q.push("a", 11)
    assert q.should_pause()
    q.take()
    assert q.should_resume()
    q.resume_ended()  # refused or cut short: still paused
    assert q.paused and q.should_resume()


def test_take_all_reads_everything_at_once():
    q: ReadQueue[str] = ReadQueue(10)
    assert q.take() is None and q.take_all() is None
    for name in "xyz":
        q.push(name, 5)
    assert q.take_all() == "z" and len(q) == 0 and q.queued_bytes == 0


@pytest.mark.parametrize("seed", range(20))
def test_a_slow_reader_gets_every_frame_once_within_the_bound(seed):
    """A fake server pushes events of 1-8 frames from the attachment's position;
    the client pauses (the server stops after the events already on the wire) and
    re-attaches from held + 1 once read down. Every seq arrives once, in order,
    and the queue never holds more than the limit plus one event."""
    rng = random.Random(seed)
    limit, size, total = 4096, 256, 2000
    q: ReadQueue[Stdout] = ReadQueue(limit)
    tracker = OutputTracker(1)
    position = 1  # the next seq the server sends on the attachment
    attached = True
    in_flight = 0  # events sent before the server had the detach
    read: list[int] = []
    most = 0
    for _ in range(200_000):
        if len(read) == total:
            break
        if attached or in_flight:
            n = min(rng.randint(1, 8), total + 1 - position)
            if n > 0:
                if not attached:
                    in_flight -= 1
                if q.arrived(n):
                    for seq in range(position, position + n):
                        for frame in tracker.accept(seq, "stdout", b"x"):
                            q.push(frame, size)
                position += n
                most = max(most, q.queued_bytes)
                if q.should_pause():
                    attached, in_flight = False, rng.randint(0, 3)
        for _ in range(rng.randint(0, 3)):  # the reader, slower than the server
            frame = q.take()
            if frame is not None:
                read.append(frame.seq)
        if q.should_resume():
            position, attached, in_flight = tracker.held + 1, True, 0
            q.attached()
            q.resume_ended()
    assert read == list(range(1, total + 1))
    assert tracker.duplicates == 0 and tracker.holes == 0
    assert q.pauses >= 5 and most <= limit + 8 * size
