"""An ended session read back from disk: from its saved frame sizes when they
agree with the log, from a scan of the log otherwise. A warm exchange's
directory, prepared as a session's."""

from __future__ import annotations

import os

import pytest

from bento import protocol, session_core, sessiondisk, sessionlog

META = {"buffer": {"max_bytes": 1 << 20, "policy": "block"}}


def ended_session(sdir: str, n: int) -> session_core.SessionCore:
    """A session of ``n`` frames (frame i has i bytes of data) and an exit frame, saved."""
    core = session_core.SessionCore(1 << 20, "block")
    core.started()
    out = sessionlog.Writer(sdir, "out", segment_bytes=256)
    for seq in range(1, n + 1):
        data = protocol.encode(b"x" * seq)
        out.append(seq, protocol.encode_frame(seq, "out", b"") + data)
        core.frame(seq, sessiondisk.data_len(protocol.encode_frame(seq, "out", b"") + data))
    exit_data = {"state": "exited", "code": 0, "signal": None, "result": None, "error": None}
    out.append(n + 1, protocol.encode_frame(n + 1, "exit", protocol.encode(exit_data)))
    out.close()
    core.durable(n + 1)
    core.recorded_exit(exit_data, n + 1, 1000.0)
    core.durable(n + 2)
    sessiondisk.save(sdir, core, {})
    return core


def recovered(sdir: str) -> session_core.SessionCore:
    out = sessionlog.Writer(sdir, "out", segment_bytes=256)
    out.close()
    return sessiondisk.recover(out, sessiondisk.load_saved(sdir), META, 0)


def test_an_ended_session_reads_back_from_its_saved_sizes_without_a_scan(tmp_path, monkeypatch):
    sdir = str(tmp_path)
    core = ended_session(sdir, 40)
    assert os.path.exists(os.path.join(sdir, sessiondisk.SIZES_FILE))
    monkeypatch.setattr(sessionlog.Writer, "records", lambda self: (_ for _ in ()).throw(AssertionError("scanned")))
    again = recovered(sdir)
    assert again.snapshot() == {**core.snapshot(), "next_seq": 42}
    assert list(again.sizes) == list(core.sizes) and again.buffer_bytes == core.buffer_bytes


def test_sizes_that_disagree_with_the_log_are_not_trusted(tmp_path):
    sdir = str(tmp_path)
    core = ended_session(sdir, 40)
    path = os.path.join(sdir, sessiondisk.SIZES_FILE)
    with open(path, "rb") as f:
        good = f.read()
    for bad in (b"", b"\x01" * 7, (1).to_bytes(8, "little") + (5).to_bytes(8, "little") * 3,
                (0).to_bytes(8, "little") + good[8:], good[:-8] + (7).to_bytes(8, "little")):
        with open(path, "wb") as f:
            f.write(bad)
        again = recovered(sdir)
        assert list(again.sizes) == list(core.sizes)
        assert again.buffer_bytes == core.buffer_bytes


def test_an_ended_session_as_its_exchange_left_it_opens_without_scanning_its_logs(tmp_path, monkeypatch):
    sdir = str(tmp_path)
    core = ended_session(sdir, 40)
    inputs = sessionlog.Writer(sdir, "in")
    for seq in (1, 2, 3):
        inputs.append(seq, protocol.encode(seq))
    inputs.close()
    core.input_seq = 3
    sessiondisk.save(sdir, core, {})
    monkeypatch.setattr(sessionlog, "scan_file", lambda path: (_ for _ in ()).throw(AssertionError("scanned")))
    ended = sessiondisk.open_ended(sdir, META)
    assert ended is not None
    assert ended.core.snapshot() == {**core.snapshot(), "next_seq": 42, "input_seq": 3}
    assert list(ended.core.sizes) == list(core.sizes)


def test_logs_changed_since_the_exchange_left_are_scanned(tmp_path):
    """A log whose last segment is not as saved (a torn record added, say) is
    scanned and cut as before: the saved end is not trusted."""
    sdir = str(tmp_path)
    core = ended_session(sdir, 40)
    last = sessionlog.list_segments(sdir, "out")[-1][1]
    with open(last, "ab") as f:
        f.write(b"\x05\x00\x00")  # the start of a record that was never finished
    ended = sessiondisk.open_ended(sdir, META)
    assert ended is not None and ended.core.snapshot() == {**core.snapshot(), "next_seq": 42}
    assert os.path.getsize(last) == sessiondisk._log_end(sdir, "out")[1]
    with open(os.path.join(sdir, "exchange.log")) as f:
        assert "torn record of 3 bytes" in f.read()


def test_a_prepared_directory_becomes_a_session_with_nothing_left_to_create(tmp_path):
    from bento.store import Store

    store = Store(str(tmp_path / "data"))
    home = tmp_path / "data" / "warm-1"
    (home / "work").mkdir(parents=True)
    lock_fd = sessiondisk.prepare_dir(str(home))
    try:
        assert sessiondisk.take_lock(str(home)) == -1  # held by the warm exchange from now on
        assert (home / "exchange.pid").read_text() == f"{os.getpid()}\n"
        sdir = store.create_session("s_prepared", protocol.encode({"code": "x"}), prepared=str(home))
        assert not home.exists()
        names = sorted(os.listdir(sdir))
        assert names == ["exchange.pid", "lock", "meta.cbor", sessionlog.segment_name("out", 1), "sizes.bin.new",
                         "state.cbor.new", "work"], names
        assert store.read_cbor("s_prepared", "meta.cbor") == {"code": "x"}
        assert sessiondisk.take_lock(sdir) == -1  # the lock moved with the directory
        out = sessionlog.Writer(sdir, "out")  # the empty first segment is the log's start
        assert out.next_seq == 1 and out.torn_bytes == 0
        out.close()
        # The exchange's first saves go into the empty copies, later ones through new files.
        core = session_core.SessionCore(META["buffer"]["max_bytes"], META["buffer"]["policy"])
        prepared = {sessiondisk.STATE_FILE, sessiondisk.SIZES_FILE}
        for _ in range(2):
            sessiondisk.save(sdir, core, {"sandbox": "none"}, prepared)
        assert prepared == {sessiondisk.SIZES_FILE}  # (written at the end only)
        assert sessiondisk.load_saved(sdir)["sandbox"] == "none"
        assert "state.cbor.new" not in os.listdir(sdir)
    finally:
        os.close(lock_fd)
    # Prepared twice (a directory of a previous run): refused, nothing overwritten.
    with pytest.raises(FileExistsError):
        sessiondisk.prepare_dir(sdir)
    assert sessionlog.Writer(sdir, "out").next_seq == 1 and store.read_cbor("s_prepared", "meta.cbor") == {"code": "x"}


def test_a_prepared_directory_whose_meta_was_never_written_is_removed_at_start(tmp_path):
    from bento.store import Store

    store = Store(str(tmp_path / "data"))
    home = tmp_path / "data" / "warm-2"
    (home / "work").mkdir(parents=True)
    lock_fd = sessiondisk.prepare_dir(str(home))
    os.rename(home, store.session_dir("s_unanswered"))  # taken; the server stopped before its meta
    assert not store.drop_unanswered("s_unanswered")  # its exchange still holds it
    os.close(lock_fd)
    assert store.drop_unanswered("s_unanswered")
    assert "s_unanswered" not in store.session_ids()
    # A session with its meta, or a directory that was never prepared, is not touched.
    store.create_session("s_answered", protocol.encode({"code": "x"}))
    os.mkdir(store.session_dir("s_unknown"))
    assert not store.drop_unanswered("s_answered") and not store.drop_unanswered("s_unknown")
    assert store.session_ids() == ["s_answered", "s_unknown"]


def test_a_prepared_copy_is_written_whole_even_when_it_was_not_empty(tmp_path):
    # The copy is written in place, without O_TRUNC (sessionlog.write_atomic says why):
    # one that a crash left longer than the new content must still end up exactly it.
    path, ready = tmp_path / "state.cbor", tmp_path / "state.cbor.new"
    for left in (b"", b"x" * 100):
        ready.write_bytes(left)
        sessionlog.write_atomic(str(path), b"abc", prepared=str(ready))
        assert path.read_bytes() == b"abc" and not ready.exists()
