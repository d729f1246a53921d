"""Unit tests of the clients' pure parts: option parsing, CLI arguments and
rendering, the local state file, key handling, resume filtering, positions."""

from __future__ import annotations

import json
import multiprocessing
import os
import stat
from types import SimpleNamespace

import pytest
from bento_clients import cli
from bento_clients.convert import (
    from_json,
    parse_buffer,
    parse_duration,
    parse_limits,
    parse_size,
    to_json,
)
from bento_clients.errors import (
    Conflict,
    InputClosed,
    NotFound,
    RemoteError,
    RequestFailed,
    SessionFailed,
    SessionKilled,
    SessionLost,
    remote_error,
)
from bento_clients.frames import EOF, Exit, Gap, Msg, Stderr, Stdout, frame_from_wire
from bento_clients.inputs import SessionInput
from bento_clients.positions import InputLog, OutputTracker
from bento_clients.state import StateFile
from bento_clients.terminal import KeyReader, ResumeFilter, Sinks, parse_detach_keys

# --------------------------------------------------------------------------
# limits, sizes, durations


def test_parse_limits_spec():
    assert parse_limits("wall=30s,mem=256M,cpu=10s,out=1M,pids=64") == {
        "wall_s": 30, "memory_bytes": 256 * 2**20, "cpu_s": 10, "output_bytes": 2**20, "pids": 64,
    }
    assert parse_limits("wall=1.5m, memory_bytes=1G ,file=4k") == {
        "wall_s": 90, "memory_bytes": 2**30, "file_bytes": 4096,
    }
    assert parse_limits("wall=500ms") == {"wall_s": 0.5}
    assert parse_limits({"wall": "2h", "pids": 3, "cpu_s": 1.5}) == {"wall_s": 7200, "pids": 3, "cpu_s": 1.5}
    assert parse_limits(None) == {} and parse_limits("") == {}


@pytest.mark.parametrize("spec, message", [
    ("wall", "NAME=VALUE"),
    ("colour=red", "unknown limit"),
    ("wall=soon", "bad duration"),
    ("mem=lots", "bad size"),
    ("pids=1.5", "whole number"),
    ("wall=1s,wall=2s", "twice"),
])
def test_parse_limits_rejects(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_limits(spec)
    with pytest.raises(ValueError):
        parse_limits({"wall": -1})


def test_sizes_and_durations():
    assert [parse_size(s) for s in ("4096", "64K", "64k", "1.5M", "256MiB", "2gb", "1T")] == [
        4096, 65536, 65536, 1572864, 256 * 2**20, 2 * 2**30, 2**40]
    assert [parse_duration(s) for s in ("30", "30s", "500ms", "2m", "1h", "1d")] == [
        30, 30, 0.5, 120, 3600, 86400]
    assert parse_buffer("64M", "drop_oldest") == {"max_bytes": 64 * 2**20, "policy": "drop_oldest"}
    assert parse_buffer() is None
    with pytest.raises(ValueError):
        parse_buffer(None, "sometimes")


def test_json_form_round_trip():
    value = {"b": b"\x00\xff", "l": [1, 2.5, None, True, "é"], 3: "int key"}
    js = to_json(value)
    assert js == {"b": {"$base64": "AP8="}, "l": [1, 2.5, None, True, "é"], "3": "int key"}
    assert json.loads(json.dumps(js)) == js
    assert from_json(js) == {"b": b"\x00\xff", "l": [1, 2.5, None, True, "é"], "3": "int key"}
    with pytest.raises(ValueError):
        from_json({"$base64": "not base64!"})


# --------------------------------------------------------------------------
# CLI arguments and rendering


def test_run_arguments_intermixed():
    p = cli.build_parser()["run"]
    a = p.parse_intermixed_args(["job.py", "1", "-d", '"x"', "--limit", "wall=30s,mem=256M", "-1",
                                 "--policy", "fail", "--json", "--kwarg", "k=[1]"])
    assert a.file == "job.py" and a.args == ["1", '"x"', "-1"] and a.detach and a.json
    assert a.limit == ["wall=30s,mem=256M"] and a.policy == "fail" and a.kwarg == ["k=[1]"]
    with pytest.raises(cli.UsageError, match="invalid choice"):
        p.parse_intermixed_args(["job.py", "--policy", "sometimes"])
    a = cli.build_parser()["kill"].parse_intermixed_args(["bto_x", "-s", "kill"])
    assert a.signal == "KILL"
    a = cli.build_parser()["attach"].parse_intermixed_args(["bto_x", "--from", "7", "--detach-keys", "ctrl-a,d"])
    assert a.from_seq == 7 and a.detach_keys == "ctrl-a,d"


def test_server_address_and_config(tmp_path, monkeypatch):
    assert cli.normalize_url("example.org:8765") == "ws://example.org:8765/v1"
    assert cli.normalize_url("wss://example.org") == "wss://example.org/v1"
    assert cli.normalize_url("ws://h:1/other") == "ws://h:1/other"
    with pytest.raises(cli.UsageError):
        cli.normalize_url("http://h:1/v1")
    cfg = tmp_path / "config.toml"
    cfg.write_text('server = "h:9"\napi_key = "k"\n')
    assert cli.load_config(str(cfg)) == {"server": "h:9", "api_key": "k"}
    cfg.write_text("colour = 1\n")
    with pytest.raises(cli.UsageError, match="unknown setting"):
        cli.load_config(str(cfg))
    cfg.write_text("server = \n")
    with pytest.raises(cli.UsageError, match="cannot read"):
        cli.load_config(str(cfg))
    assert cli.load_config(str(tmp_path / "missing.toml")) == {}


def test_exit_codes_and_messages():
    assert cli.exit_code({"state": "exited", "code": 0}) == 0
    assert cli.exit_code({"state": "exited", "code": 3}) == 3
    assert cli.exit_code({"state": "killed", "signal": "TERM"}) == 143
    assert cli.exit_code({"state": "killed", "signal": "INT"}) == 130
    assert cli.exit_code({"state": "failed"}) == 1
    assert cli.exit_code({"state": "lost"}) == cli.EXIT_BENTO
    err = {"state": "exited", "code": 1, "error": {"type": "E", "message": "one\ntwo", "traceback": "TB"}}
    assert cli.exit_message(err) == "E: one ...\n"
    assert cli.exit_message(err, traceback=True) == "TB\n"
    limit = {"state": "killed", "signal": "KILL", "error": {"type": "LimitExceeded", "message": "wall_s"}}
    assert "limit wall_s exceeded" in cli.exit_message(limit)


def test_render_frames():
    assert cli.render(Stdout(1, b"\xffraw")) == [("stdout", b"\xffraw")]
    assert cli.render(Stderr(2, b"e")) == [("stderr", b"e")]
    assert cli.render(Msg(3, {"b": b"\x01"})) == [("stdout", b'{"msg": {"b": {"$base64": "AQ=="}}}\n')]
    assert cli.render(Msg(3, 1, "x")) == [("stdout", b'{"msg": 1, "channel": "x"}\n')]
    assert cli.render(Gap(9, 1, 9, "dropped"))[0][0] == "stderr"
    ok = Exit(4, "exited", 0, None, [1], None)
    assert cli.render(ok) == [("stdout", b"[1]\n")]
    assert cli.render(Exit(4, "exited", 0, None, None, None)) == []
    line = cli.render(Stdout(1, b"hi"), as_json=True)[0][1]
    assert json.loads(line) == {"seq": 1, "ch": "stdout", "data": {"$base64": "aGk="}}


# --------------------------------------------------------------------------
# the state file


def test_state_file_atomic_private_and_locked(tmp_path):
    path = tmp_path / "deep" / "state" / "client.json"
    sf = StateFile(str(path))
    assert sf.sessions() == {}
    sf.add_session({"session": "s_1", "token": "bto_1", "viewer_token": "btv_1", "server": "ws://h/v1"})
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    inode = os.stat(path).st_ino
    sf.record_delivery("s_1", 5, {"1:2": 10})
    assert os.stat(path).st_ino != inode  # replaced by rename, never rewritten in place
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    other = StateFile(str(path))  # another process's view
    entry = other.find("btv_1")
    assert entry is not None and entry["delivered"] == 5 and entry["sinks"] == {"1:2": 10}
    assert other.find("s_1") == entry and other.find("bto_nope") is None
    assert not [p for p in os.listdir(path.parent) if p.endswith(".tmp")]


def test_state_file_survives_torn_temp_and_damage(tmp_path):
    path = tmp_path / "client.json"
    sf = StateFile(str(path))
    sf.add_session({"session": "s_1", "token": "bto_1"})
    good = path.read_bytes()
    # A writer killed half way leaves a torn temp file: it changes nothing.
    torn = tmp_path / "client.json.999.123.tmp"
    torn.write_bytes(good[: len(good) // 2])
    os.utime(torn, (0, 0))
    assert StateFile(str(path)).find("bto_1") is not None
    sf.update_session("s_1", state="running")  # the next write removes the stale temp file
    assert not torn.exists()
    # A state file damaged by something else is moved aside, not trusted, not fatal.
    path.write_bytes(b'{"sessions": {"s_1": ')
    damaged = StateFile(str(path))
    assert damaged.sessions() == {}
    assert damaged.warnings and "moved to" in damaged.warnings[0]
    assert [p for p in os.listdir(tmp_path) if ".corrupt-" in p]
    damaged.add_session({"session": "s_2", "token": "bto_2"})
    assert set(StateFile(str(path)).sessions()) == {"s_2"}


def _journal_many(path: str, n: int, out: multiprocessing.Queue) -> None:
    journal = StateFile(path).journal("s_1")
    out.put([journal.record(f"v{i}", 1)[0] for i in range(n)])


def test_state_journal_seqs_unique_across_processes(tmp_path):
    path = str(tmp_path / "client.json")
    StateFile(path).add_session({"session": "s_1", "token": "bto_1"})
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_journal_many, args=(path, 25, out)) for _ in range(3)]
    for p in procs:
        p.start()
    seqs = [s for _ in procs for s in out.get(timeout=60)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sorted(seqs) == list(range(1, 76))
    sf = StateFile(path)
    assert len(sf.pending_input("s_1")) == 75
    sf.journal("s_1").acked(70)
    assert [seq for seq, _ in sf.pending_input("s_1")] == [71, 72, 73, 74, 75]
    seq, others = sf.journal("s_1").record(EOF, 1)
    assert seq == 76 and [s for s, _ in others] == [71, 72, 73, 74, 75]
    assert sf.pending_input("s_1")[-1] == (76, EOF)


# --------------------------------------------------------------------------
# keys and resume


def test_detach_keys_and_line_editing():
    assert parse_detach_keys("ctrl-p,ctrl-q") == b"\x10\x11"
    assert parse_detach_keys("ctrl-a,d") == b"\x01d"
    with pytest.raises(ValueError):
        parse_detach_keys("ctrl-1")
    kr = KeyReader(b"\x10\x11")
    events = kr.feed(b"ab\x7fc\r")
    assert [(e.kind, e.text) for e in events] == [("line", "ac")]
    # ctrl-p alone is held; with ctrl-q it detaches; with anything else both are input.
    assert kr.feed(b"\x10") == []
    assert [e.kind for e in kr.feed(b"\x11")] == ["detach"]
    assert kr.feed(b"\x10") == [] and kr.feed(b"x") == []
    assert [(e.kind, e.text) for e in kr.feed(b"\r")] == [("line", "\x10x")]
    # a broken sequence can start a new one
    assert [e.kind for e in kr.feed(b"\x10\x10\x11")] == ["detach"]
    assert [(e.kind, e.text) for e in kr.feed(b"\r")] == [("line", "\x10")]
    # UTF-8 erase removes a whole character; ctrl-u clears; ctrl-d on an empty line is EOF
    assert [(e.kind, e.text) for e in kr.feed("é€\x7f\r".encode())] == [("line", "é")]
    assert [e.kind for e in kr.feed(b"zz\x15\x04")] == ["eof"]
    assert [e.kind for e in kr.feed(b"\x03")] == ["interrupt"]
    assert kr.take_echo() and not kr.take_echo()


def test_resume_filter_skips_bytes_already_in_the_file(tmp_path):
    out = open(tmp_path / "out", "ab+")
    err = open(tmp_path / "err", "ab+")
    try:
        sinks = Sinks(out.fileno(), err.fileno())
        out.write(b"frame1\n")
        out.flush()
        recorded = sinks.sizes()  # after frame 1 was recorded
        out.write(b"fra")  # frame 2 was being written when the CLI died
        out.flush()
        rf = ResumeFilter(sinks, recorded)
        assert rf.filter("stdout", b"frame2\n") == b"me2\n"
        assert rf.filter("stdout", b"frame3\n") == b"frame3\n"
        assert rf.filter("stderr", b"e\n") == b"e\n"
        # Another file (or a terminal) is never filtered.
        assert not ResumeFilter(sinks, {"0:0": 1}).active
    finally:
        out.close()
        err.close()


# --------------------------------------------------------------------------
# positions, frames, errors


def test_output_tracker_orders_and_dedups():
    t = OutputTracker()
    assert t.accept(1, "stdout", b"a") == [Stdout(1, b"a")]
    assert t.accept(1, "stdout", b"a") == [] and t.duplicates == 1
    got = t.accept(4, "msg", 7)  # 2 and 3 never came: loss is never silent
    assert got == [Gap(3, 2, 3, "missing (client saw a hole)"), Msg(4, 7)] and t.holes == 1
    assert t.accept(6, "gap", {"from": 5, "to": 6, "reason": "dropped"}) == [Gap(6, 5, 6, "dropped")]
    assert t.held == 6
    t2 = OutputTracker(from_seq=5)
    assert t2.accept(9, "gap", {"from": 1, "to": 9, "reason": "acked"}) == [Gap(9, 5, 9, "acked")]
    with pytest.raises(ValueError):
        t2.accept(10, "stdout", "not bytes")


def test_input_log_resend_rules():
    log = InputLog()
    assert [log.add(v) for v in ("a", "b", "c")] == [1, 2, 3]
    assert log.unsent(1) == [(2, "b"), (3, "c")]
    assert log.ack(2) and not log.ack(1)
    assert log.unsent(0) == [(3, "c")]
    log.reset(3, [(4, "d"), (2, "old")])
    assert log.pending == {4: "d"} and log.last == 4 and log.accepted == 3
    assert log.add(EOF, seq=9) == 9
    with pytest.raises(ValueError):
        log.add("x", seq=5)


def test_frames_and_remote_errors():
    ex = frame_from_wire(5, "exit", {"state": "killed", "code": None, "signal": "KILL", "result": None,
                                      "error": {"type": "LimitExceeded", "message": "wall_s"}})
    assert isinstance(ex, Exit) and not ex.ok
    err = remote_error(ex.data())
    assert isinstance(err, SessionKilled) and err.signal_number == 9 and err.message == "wall_s"
    assert remote_error({"state": "exited", "code": 0}) is None
    assert isinstance(remote_error({"state": "failed", "error": {"type": "SyntaxError"}}), SessionFailed)
    assert isinstance(remote_error({"state": "lost"}), SessionLost)
    exc = remote_error({"state": "exited", "code": 1, "error": {"type": "E", "message": "m", "traceback": "T"}})
    assert type(exc) is RemoteError and "Remote traceback" in str(exc)
    assert frame_from_wire(1, "msg:x", 1) == Msg(1, 1, "x")
    assert isinstance(RequestFailed.from_reply({"code": "not_found", "message": "m"}), NotFound)
    c = RequestFailed.from_reply({"code": "conflict", "message": "m", "version": 4})
    assert isinstance(c, Conflict) and c.version == 4


async def test_an_input_acked_after_the_exit_counts_as_accepted():
    """The exit may reach the client before the in_ack of the input that ended the
    function (an eof): wait_acked asks the server (status) instead of failing."""
    answers = []

    async def status():
        return {"input_seq": answers.pop(0)}

    session = SimpleNamespace(id="s_1", mode="rw", _end=None, _detached=False, _link=None, status=status)
    inputs = SessionInput(session, None, 16)
    inputs.log.add("a")
    inputs.log.add(EOF)
    inputs.gone = True  # the exit frame came; no in_ack yet
    answers.append(2)
    await inputs.wait_acked()
    assert len(inputs) == 0 and inputs.log.accepted == 2
    inputs.log.add("late")
    answers.append(2)  # this one the server never took
    with pytest.raises(InputClosed, match="took 2 input"):
        await inputs.wait_acked()
