"""The output log: its writer on a full disk."""

from __future__ import annotations

import errno
import os

import pytest

from bento import sessionlog


def test_a_full_disk_keeps_the_whole_records_that_fit(tmp_path, monkeypatch):
    w = sessionlog.Writer(str(tmp_path), "out", buffered=True)
    for seq in range(1, 6):
        w.append(seq, b"x" * 100)
    record = sessionlog.HEAD.size + 100
    room = [2 * record + 50]  # two whole records and part of a third fit
    real_write = os.write

    def full_disk_write(fd, data):
        if fd != w.fd:
            return real_write(fd, data)
        if room[0] <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = real_write(fd, bytes(data[: room[0]]))
        room[0] -= n
        return n

    monkeypatch.setattr(sessionlog.os, "write", full_disk_write)
    with pytest.raises(OSError):
        w.flush()
    seg = sessionlog.list_segments(str(tmp_path), "out")[0][1]
    assert w.flushed_next == 3 and os.path.getsize(seg) == 2 * record  # the partial one is taken back
    assert len(sessionlog.Cursor(str(tmp_path), "out", 1).read(w.flushed_next, 1 << 20)) == 2
    room[0] = 1 << 20  # space again: the rest goes, once
    w.flush()
    assert w.flushed_next == 6 and not w.pending
    got = sessionlog.Cursor(str(tmp_path), "out", 1).read(w.flushed_next, 1 << 20)
    assert [bytes(p) for p in got] == [b"x" * 100] * 5
