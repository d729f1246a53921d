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
    w.close()
    return sessionlog.list_segments(str(tmp_path), "out")[0][1]


def damage(path: str, offset: int, byte: bytes = b"!") -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(byte)


def record_offset(seq: int) -> int:
    """Offset of record ``seq`` in a log written by ``write_log`` (seqs 1..9)."""
    return sum(sessionlog.HEAD.size + len(b"payload %d" % s) for s in range(1, seq))


def enospc_writev(w, room: list[int]):
    """A writev for ``w``'s fd that takes ``room[0]`` more bytes, then fails."""
    real_writev = os.writev

    def writev(fd, buffers):
        if fd != w.fd:
            return real_writev(fd, buffers)
        if room[0] <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = os.write(fd, b"".join(buffers)[: room[0]])
        room[0] -= n
        return n

    return writev


def test_reads_what_was_written(tmp_path):
    write_log(tmp_path, 9)
    for verify_below in (1 << 62, 1):
        c = sessionlog.Cursor(str(tmp_path), "out", 3, verify_below=verify_below)
        assert [bytes(p) for p in c.read(10, 1 << 20)] == [b"payload %d" % s for s in range(3, 10)]
        assert c.next_seq == 10


def test_a_damaged_payload_fails_its_checksum(tmp_path):
    path = write_log(tmp_path, 9)
    damage(path, record_offset(5) + sessionlog.HEAD.size + 2)
    c = sessionlog.Cursor(str(tmp_path), "out", 1)
    with pytest.raises(sessionlog.LogCorrupt, match="checksum"):
        c.read(10, 1 << 20)
    # Checked below seq 5 only: record 5 passes unchecked (a log written while
    # the server ran, and while this reader was attached).
    c = sessionlog.Cursor(str(tmp_path), "out", 1, verify_below=5)
    got = [bytes(p) for p in c.read(10, 1 << 20)]
    assert got[4] == b"pa!load 5" and len(got) == 9
    # Checked below seq 6: record 5 is refused.
    c = sessionlog.Cursor(str(tmp_path), "out", 1, verify_below=6)
    with pytest.raises(sessionlog.LogCorrupt, match="record 5 fails its checksum"):
        c.read(10, 1 << 20)


@pytest.mark.parametrize("verify_below", [1 << 62, 1])
def test_lengths_and_seqs_are_checked_always(tmp_path, verify_below):
    path = write_log(tmp_path, 9)
    # Record 5 claims to be seq 7.
    damage(path, record_offset(5) + 4, (7).to_bytes(8, "little"))
    c = sessionlog.Cursor(str(tmp_path), "out", 1, verify_below=verify_below)
    with pytest.raises(sessionlog.LogCorrupt, match="expected record 5"):
        c.read(10, 1 << 20)
    other = tmp_path / "other"
    other.mkdir()
    path = write_log(other, 9)
    # Record 5 claims more bytes than a record may have.
    damage(path, record_offset(5), (sessionlog.MAX_PAYLOAD + 1).to_bytes(4, "little"))
    c = sessionlog.Cursor(str(other), "out", 1, verify_below=verify_below)
    with pytest.raises(sessionlog.LogCorrupt, match="record 5"):
        c.read(10, 1 << 20)


def test_a_full_disk_keeps_the_whole_records_that_fit(tmp_path, monkeypatch):
    w = sessionlog.Writer(str(tmp_path), "out", buffered=True)
    for seq in range(1, 6):
        w.append(seq, b"x" * 100)
    record = sessionlog.HEAD.size + 100
    room = [2 * record + 50]  # two whole records and part of a third fit
    monkeypatch.setattr(sessionlog.os, "writev", enospc_writev(w, room))
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


def test_an_unbuffered_append_that_fails_leaves_nothing(tmp_path, monkeypatch):
    """The input log: an append the disk refuses is not in the log, and the
    same seq can be appended once there is room (it was left half-kept, and the
    retry raised 'appending seq 2, expected 3', ending the exchange)."""
    w = sessionlog.Writer(str(tmp_path), "in")
    w.append(1, b"first")
    room = [10]  # part of the next record fits
    monkeypatch.setattr(sessionlog.os, "writev", enospc_writev(w, room))
    with pytest.raises(OSError):
        w.append(2, b"second")
    assert w.next_seq == 2 and w.flushed_next == 2 and not w.pending
    room[0] = 1 << 20
    w.append(2, b"second")
    assert [p for _s, p in w.records()] == [b"first", b"second"]


def test_a_failed_cut_is_made_before_the_next_write(tmp_path, monkeypatch):
    w = sessionlog.Writer(str(tmp_path), "out", buffered=True)
    for seq in range(1, 4):
        w.append(seq, b"y" * 100)
    room = [sessionlog.HEAD.size + 150]  # one record and part of the next
    monkeypatch.setattr(sessionlog.os, "writev", enospc_writev(w, room))
    real_ftruncate = os.ftruncate

    def failing_ftruncate(fd, n):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(sessionlog.os, "ftruncate", failing_ftruncate)
    with pytest.raises(OSError):
        w.flush()
    assert w.flushed_next == 2 and w.cut_to == sessionlog.HEAD.size + 100
    monkeypatch.setattr(sessionlog.os, "ftruncate", real_ftruncate)
    room[0] = 1 << 20
    w.flush()
    assert w.flushed_next == 4 and w.cut_to is None
    assert [p for _s, p in w.records()] == [b"y" * 100] * 3


def test_a_segment_that_cannot_be_deleted_stays_listed(tmp_path, monkeypatch):
    w = sessionlog.Writer(str(tmp_path), "out", segment_bytes=64, buffered=True)
    for seq in range(1, 7):
        w.append(seq, b"z" * 60)
        w.flush()
    assert len(w.segments) >= 3
    first = w.segments[0][1]
    real_unlink = os.unlink

    def unlink(path):
        if path == first:
            raise OSError(errno.EROFS, "Read-only file system")
        return real_unlink(path)

    monkeypatch.setattr(sessionlog.os, "unlink", unlink)
    with pytest.raises(OSError):
        w.drop_before(6)
    assert w.segments[0][1] == first  # kept, to be tried again
    monkeypatch.setattr(sessionlog.os, "unlink", real_unlink)
    w.drop_before(6)
    assert not os.path.exists(first) and len(w.segments) == 1


def test_records_skip_a_segment_deleted_while_they_are_listed(tmp_path, monkeypatch):
    w = sessionlog.Writer(str(tmp_path), "out", segment_bytes=64)
    for seq in range(1, 21):
        w.append(seq, b"x" * 30)
    w.close()
    segments = sessionlog.list_segments(str(tmp_path), "out")
    assert len(segments) > 2
    real_scan = sessionlog.scan_file

    def scan_after_trim(path):  # the oldest segment goes between the listing and its read
        if path == segments[0][1] and os.path.exists(path):
            os.unlink(path)
        return real_scan(path)

    monkeypatch.setattr(sessionlog, "scan_file", scan_after_trim)
    seqs = [seq for seq, _ in sessionlog.Writer(str(tmp_path), "out", segment_bytes=64).records()]
    assert seqs == list(range(segments[1][0], 21))
