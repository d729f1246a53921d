"""The output log's reader: what it checks with and without checksums."""

from __future__ import annotations

import errno
import os

import pytest

from bento import sessionlog


def write_log(tmp_path, n: int) -> str:
    w = sessionlog.Writer(str(tmp_path), "out", buffered=True)
    for seq in range(1, n + 1):
        w.append(seq, b"payload %d" % seq)
    w.flush()
    os.close(w.fd)
    return sessionlog.list_segments(str(tmp_path), "out")[0][1]


def damage(path: str, offset: int, byte: bytes = b"!") -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(byte)


def record_offset(seq: int) -> int:
    """Offset of record ``seq`` in a log written by ``write_log`` (seqs 1..9)."""
    return sum(sessionlog.HEAD.size + len(b"payload %d" % s) for s in range(1, seq))


def test_reads_what_was_written(tmp_path):
    write_log(tmp_path, 9)
    for verify in (True, False):
        c = sessionlog.Cursor(str(tmp_path), "out", 3, verify=verify)
        assert [bytes(p) for p in c.read(10, 1 << 20)] == [b"payload %d" % s for s in range(3, 10)]
        assert c.next_seq == 10


def test_a_damaged_payload_fails_its_checksum(tmp_path):
    path = write_log(tmp_path, 9)
    damage(path, record_offset(5) + sessionlog.HEAD.size + 2)
    c = sessionlog.Cursor(str(tmp_path), "out", 1)
    with pytest.raises(sessionlog.LogCorrupt, match="checksum"):
        c.read(10, 1 << 20)
    # Without the checksum (a log written while the server ran) the bytes are taken.
    c = sessionlog.Cursor(str(tmp_path), "out", 1, verify=False)
    got = [bytes(p) for p in c.read(10, 1 << 20)]
    assert got[4] == b"pa!load 5" and len(got) == 9


@pytest.mark.parametrize("verify", [True, False])
def test_lengths_and_seqs_are_checked_always(tmp_path, verify):
    path = write_log(tmp_path, 9)
    # Record 5 claims to be seq 7.
    damage(path, record_offset(5) + 4, (7).to_bytes(8, "little"))
    c = sessionlog.Cursor(str(tmp_path), "out", 1, verify=verify)
    with pytest.raises(sessionlog.LogCorrupt, match="expected record 5"):
        c.read(10, 1 << 20)
    other = tmp_path / "other"
    other.mkdir()
    path = write_log(other, 9)
    # Record 5 claims more bytes than a record may have.
    damage(path, record_offset(5), (sessionlog.MAX_PAYLOAD + 1).to_bytes(4, "little"))
    c = sessionlog.Cursor(str(other), "out", 1, verify=verify)
    with pytest.raises(sessionlog.LogCorrupt, match="record 5"):
        c.read(10, 1 << 20)


def test_a_full_disk_keeps_the_whole_records_that_fit(tmp_path, monkeypatch):
    w = sessionlog.Writer(str(tmp_path), "out", buffered=True)
    for seq in range(1, 6):
        w.append(seq, b"x" * 100)
    record = sessionlog.HEAD.size + 100
    room = [2 * record + 50]  # two whole records and part of a third fit
    real_writev = os.writev

    def full_disk_writev(fd, buffers):
        if fd != w.fd:
            return real_writev(fd, buffers)
        if room[0] <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = os.write(fd, b"".join(buffers)[: room[0]])
        room[0] -= n
        return n

    monkeypatch.setattr(sessionlog.os, "writev", full_disk_writev)
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


def test_a_batch_of_more_pieces_than_one_writev_takes(tmp_path):
    w = sessionlog.Writer(str(tmp_path), "out", buffered=True)
    n = sessionlog.IOV_MAX  # each record is 3 pieces: head, and its payload in two
    for seq in range(1, n + 1):
        w.append_parts(seq, (b"%d:" % seq, memoryview(b"-" * (seq % 7))))
    w.flush()
    got = sessionlog.Cursor(str(tmp_path), "out", 1).read(n + 1, 1 << 30)
    assert [bytes(p) for p in got] == [b"%d:" % s + b"-" * (s % 7) for s in range(1, n + 1)]


def test_short_writes_are_continued(tmp_path, monkeypatch):
    w = sessionlog.Writer(str(tmp_path), "out", buffered=True)
    real_writev = os.writev

    def short_writev(fd, buffers):
        if fd != w.fd:
            return real_writev(fd, buffers)
        return os.write(fd, b"".join(buffers)[:37])  # a pipe-like short write

    monkeypatch.setattr(sessionlog.os, "writev", short_writev)
    n = 400  # 1,600 pieces: more than one writev takes, written 37 bytes at a time
    for seq in range(1, n + 1):
        w.append_parts(seq, (b"a" * (seq % 50), b"", b"b" * 3))
    w.flush()
    got = sessionlog.Cursor(str(tmp_path), "out", 1).read(n + 1, 1 << 20)
    assert [bytes(p) for p in got] == [b"a" * (s % 50) + b"bbb" for s in range(1, n + 1)]
