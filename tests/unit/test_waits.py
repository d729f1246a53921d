"""What a function waits for: the driver's side (api.recv(), sys.stdin), the
session core's ``waiting``, and a server's acceptance of exchanges that have none."""

from __future__ import annotations

import os
import queue
import threading
import time
import types

import pytest
import trio.testing
from bento_driver import cbor, wire
from bento_driver.main import Api
from bento_driver.waits import GRACE_S, Waits, _Stdin

from bento import protocol, session_core
from bento.exchange_driver import DriverSide
from bento.exchange_link import ExchangeLink
from bento.session_core import NEW, Announce, LocalError, SessionCore, Snapshot


class FakeLink:
    """The driver's link: inputs to take, and the messages it would send."""

    def __init__(self) -> None:
        self.inputs: queue.SimpleQueue = queue.SimpleQueue()
        self.sent: list[dict] = []

    def send(self, msg: dict) -> None:
        wire.check(wire.FROM_DRIVER, msg)
        self.sent.append(msg)

    def told(self) -> list:
        return [m["on"] for m in self.sent]


def api_of(link: FakeLink) -> Api:
    return Api(link, None, Waits(link))  # type: ignore[arg-type]


def put_later(link: FakeLink, value: object, after: float) -> threading.Thread:
    t = threading.Timer(after, lambda: link.inputs.put({"t": "in", "data": cbor.encode(value)}))
    t.start()
    return t


# -- api.recv() ---------------------------------------------------------------


def test_a_recv_that_finds_its_input_queued_tells_nothing():
    link = FakeLink()
    api = api_of(link)
    for i in range(3):
        link.inputs.put({"t": "in", "data": cbor.encode(i)})
    assert [api.recv() for _ in range(3)] == [0, 1, 2]
    assert link.sent == []


def test_a_recv_answered_within_the_grace_period_tells_nothing():
    link = FakeLink()
    t = put_later(link, "soon", GRACE_S / 5)
    assert api_of(link).recv() == "soon"
    t.join()
    assert link.sent == []


def test_a_recv_that_blocks_tells_recv_then_none_when_its_input_comes():
    link = FakeLink()
    t = put_later(link, "late", GRACE_S + 0.2)
    assert api_of(link).recv() == "late"
    t.join()
    assert link.told() == ["recv", None]


def test_a_recv_that_times_out_stops_waiting_and_a_short_timeout_tells_nothing():
    link = FakeLink()
    api = api_of(link)
    with pytest.raises(TimeoutError):
        api.recv(timeout=GRACE_S / 2)
    assert link.sent == []
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        api.recv(timeout=GRACE_S + 0.1)
    assert time.monotonic() - started >= GRACE_S + 0.1
    assert link.told() == ["recv", None]


def test_eof_ends_a_blocked_recv_and_its_wait():
    link = FakeLink()
    t = threading.Timer(GRACE_S + 0.1, lambda: link.inputs.put({"t": "eof"}))
    t.start()
    with pytest.raises(EOFError):
        api_of(link).recv()
    t.join()
    assert link.told() == ["recv", None]


# -- Waits --------------------------------------------------------------------


def test_waits_tell_each_change_once_and_recv_before_stdin():
    link = FakeLink()
    w = Waits(link)
    w.enter("stdin")
    w.enter("recv")  # a second thread, in api.recv()
    w.enter("recv")  # and a third
    w.leave("recv")
    assert link.told() == ["stdin", "recv"]
    w.leave("recv")
    assert link.told() == ["stdin", "recv", "stdin"]
    w.leave("stdin")
    w.leave("stdin")  # more leaves than enters (an interrupt at the wrong time) do not go below 0
    assert link.told() == ["stdin", "recv", "stdin", None]


# -- sys.stdin ----------------------------------------------------------------


@pytest.fixture
def pipe():
    r, w = os.pipe()
    yield r, w
    for fd in (r, w):
        try:
            os.close(fd)
        except OSError:
            pass


def stdin_of(fd: int, link: FakeLink) -> _Stdin:
    raw = _Stdin(fd, "rb", closefd=False)
    raw.waits = Waits(link)
    return raw


def test_a_read_of_data_already_there_tells_nothing(pipe):
    r, w = pipe
    link = FakeLink()
    os.write(w, b"here\n")
    assert stdin_of(r, link).read(100) == b"here\n"
    assert link.sent == []


def test_a_read_that_blocks_tells_stdin_then_none(pipe):
    r, w = pipe
    link = FakeLink()
    t = threading.Timer(GRACE_S + 0.2, lambda: os.write(w, b"typed\n"))
    t.start()
    buf = bytearray(100)
    assert stdin_of(r, link).readinto(buf) == 6 and buf[:6] == b"typed\n"
    t.join()
    assert link.told() == ["stdin", None]


def test_read_to_the_end_waits_between_chunks_and_at_the_end(pipe):
    r, w = pipe
    link = FakeLink()
    os.write(w, b"first ")

    def later() -> None:
        os.write(w, b"second")
        time.sleep(GRACE_S + 0.2)
        os.close(w)

    t = threading.Timer(GRACE_S + 0.2, later)
    t.start()
    assert stdin_of(r, link).read() == b"first second"
    t.join()
    assert link.told() == ["stdin", None, "stdin", None]


def test_a_non_blocking_stdin_is_never_waited_on(pipe):
    r, _w = pipe
    link = FakeLink()
    os.set_blocking(r, False)
    started = time.monotonic()
    assert stdin_of(r, link).read(10) is None
    assert time.monotonic() - started < GRACE_S and link.sent == []


# -- the session core -------------------------------------------------------------


def test_the_core_announces_each_change_of_waiting_and_none_once_the_function_ends():
    core = SessionCore(1 << 20, "block")
    assert core.snapshot()["waiting"] is None
    assert core.wait("recv") == (Announce(),)
    assert core.wait("recv") == ()
    assert core.snapshot()["waiting"] == "recv"
    assert core.wait("stdin") == (Announce(),) and core.wait(None) == (Announce(),)
    core.wait("stdin")
    core.function_ended()
    assert core.snapshot()["waiting"] is None
    assert core.wait("recv") == () and core.snapshot()["waiting"] is None
    with pytest.raises(LocalError):
        core.wait("sleep")


def test_a_snapshot_without_waiting_is_one_that_waits_for_nothing():
    old = {k: v for k, v in NEW._asdict().items() if k != "waiting"}
    assert Snapshot.from_map(old) == NEW
    assert Snapshot.from_map({**old, "waiting": "stdin"}).waiting == "stdin"
    assert session_core.WAITS == (None, "recv", "stdin")


async def test_a_server_takes_an_exchange_of_wire_6_whose_snapshot_has_no_waiting():
    hello = {"t": "hello", "wire": 6, "pid": 4242, "enforced": {}, "shared_version": 0,
             "shared_value": protocol.encode(None),
             **{k: v for k, v in NEW._asdict().items() if k != "waiting"}}
    ours, theirs = trio.testing.memory_stream_pair()
    link = ExchangeLink(ours)  # type: ignore[arg-type]
    await theirs.send_all(wire.frame(protocol.encode(hello)))
    got = await link.hello()
    assert Snapshot.from_map(got).waiting is None
    # Its progress (no waiting either) passes the table too.
    wire.check(wire.FROM_EXCHANGE, {"t": "progress", **{k: v for k, v in hello.items() if k in NEW._fields}})


def test_the_exchange_takes_a_wait_and_refuses_a_wait_for_anything_else():
    applied: list[tuple] = []
    ex = types.SimpleNamespace(core=SessionCore(1 << 20, "block"), apply=applied.append)
    side = DriverSide(ex, None)  # type: ignore[arg-type]
    side.handle({"t": "wait", "on": "recv"})
    assert applied == [(Announce(),)] and ex.core.waiting == "recv"
    for bad in ("sleep", ["recv"], 1):
        with pytest.raises(ValueError):  # the exchange's driver side kills it: ProtocolViolation
            side.handle({"t": "wait", "on": bad})
    assert ex.core.waiting == "recv"
