"""End-to-end: a client that breaks the wire protocol (PROTOCOL.md, Transport,
Requests and replies, Handshake) gets exactly the documented answer, and the
server keeps serving everyone else.

Every test runs under ``keeps_serving``: a *witness* session streams stdout on
its own connection for the whole test, and afterwards must have delivered
every one of its frames, in order, exactly once; then a fresh connection must
be able to hello and execute.
"""

from __future__ import annotations

import math
import time
from contextlib import asynccontextmanager
from typing import Any

import cbor2
import trio
from helpers import Client, assert_contiguous, conn, connect, data_of
from trio_websocket import ConnectionClosed

# --------------------------------------------------------------------------
# Helpers local to this file.


async def close_code(c: Client, timeout: float = 5) -> int:
    """Read (keeping whatever arrives) until the server closes; its close code."""
    with trio.fail_after(timeout):
        while True:
            try:
                await c._read_one()
            except ConnectionClosed as exc:
                return exc.reason.code


async def still_open(c: Client) -> None:
    """The connection answers a ping (so it was not closed)."""
    r = await c.request("ping", timeout=5)
    assert r["ok"] is True, r
    assert c.closed is None


async def pinger(c: Client, every: float = 0.1) -> None:
    """Keep a connection from being idle (replies land in c.replies, unread)."""
    rid = 1_000_000
    while True:
        await trio.sleep(every)
        rid += 1
        await c.send({"op": "ping", "id": rid})


# Prints 0, 1, 2, ... (one line about every 10 ms) until it gets an input.
# (api.recv with a timeout rather than api.poll: the witness must not depend on
# api.poll, which in the first driver never saw waiting input.)
WITNESS = """
def main():
    i = 0
    while True:
        print(i, flush=True)
        i += 1
        try:
            api.recv(timeout=0.01)
        except TimeoutError:
            continue
        return i
"""


class Witness:
    """A session streaming on its own connection while a test abuses the server.

    It pings every 0.1 s (so idle timeouts do not apply to it), reads every
    frame as it comes, and on ``stop`` tells the function to finish."""

    def __init__(self, url: str, auth: str | None = None) -> None:
        self.url, self.auth = url, auth
        self.frames: list[list] = []
        self.stop = trio.Event()
        self.done = trio.Event()
        self.session = ""

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with conn(self.url, auth=self.auth) as c:
            r = await c.ok("execute", code=WITNESS)
            self.session = sid = r["session"]
            self.frames += await c.frames(sid, until_exit=False, count=3)
            task_status.started()
            async with trio.open_nursery() as n:
                n.start_soon(self._pinger, c)
                n.start_soon(self._stopper, c)
                while not (self.frames and self.frames[-1][1] == "exit"):
                    ev = await c.event(ev="out", session=sid, timeout=60)
                    self.frames += ev["frames"]
                self.done.set()
                n.cancel_scope.cancel()

    async def _pinger(self, c: Client) -> None:
        await pinger(c)

    async def _stopper(self, c: Client) -> None:
        await self.stop.wait()
        await c.send({"op": "input", "session": self.session, "seq": 1, "data": "stop"})

    def check(self) -> None:
        frames = self.frames
        assert frames and frames[-1][1] == "exit", frames[-3:]
        assert_contiguous(frames)
        ex = frames[-1][2]
        assert ex["state"] == "exited" and ex["code"] == 0, ex
        n = ex["result"]
        assert data_of(frames) == b"".join(f"{i}\n".encode() for i in range(n))
        assert [f for f in frames if f[1] not in ("stdout", "exit")] == []


async def fresh_connection_works(url: str, auth: str | None = None) -> None:
    async with conn(url, auth=auth) as c:
        r = await c.ok("execute", code="def main(x):\n    return x * 2\n", args=[21])
        frames = await c.frames(r["session"], timeout=15)
        assert frames[-1][2]["result"] == 42


@asynccontextmanager
async def keeps_serving(url: str, auth: str | None = None):
    """Run the body while a witness session streams; then check the witness got
    everything, in order, exactly once, and that a new connection works."""
    w = Witness(url, auth)
    with trio.fail_after(60):
        async with trio.open_nursery() as n:
            await n.start(w.run)
            yield w
            w.stop.set()
            with trio.fail_after(20):
                await w.done.wait()
    w.check()
    await fresh_connection_works(url, auth)


def enc(x: Any) -> bytes:
    return cbor2.dumps(x)


PING = enc({"op": "ping", "id": 1})
PING_HEAD = b"\xa3" + enc("op") + enc("ping") + enc("id") + enc(1) + enc("x")  # 3rd value follows


def nested(depth: int) -> bytes:
    """{"op": "ping", "id": 1, "x": [[...]]} where the deepest array is at ``depth``."""
    return PING_HEAD + b"\x81" * (depth - 2) + b"\x80"


# Each is a message that PROTOCOL.md (Transport) calls invalid.
INVALID: dict[str, bytes] = {
    "empty": b"",
    "not_cbor": b"\xff\xfe\xfd\xfc",
    "truncated": PING[:-3],
    "bad_utf8": b"\xa2" + enc("op") + b"\x64pi\xffg" + enc("id") + enc(1),
    "trailing_bytes": PING + b"\x00",
    "trailing_map": PING + PING,
    "tag_inside": PING_HEAD + b"\xc1\x00",
    "tag_top": b"\xc0" + PING,
    "self_describe_tag": b"\xd9\xd9\xf7" + PING,
    "indefinite_map": b"\xbf" + enc("op") + enc("ping") + enc("id") + enc(1) + b"\xff",
    "indefinite_bytes_inside": PING_HEAD + b"\x5f\x41a\xff",
    "indefinite_array_inside": PING_HEAD + b"\x9f\x01\xff",
    "duplicate_key_top": b"\xa3" + enc("op") + enc("ping") + enc("id") + enc(1) + enc("id") + enc(2),
    "duplicate_key_nested": PING_HEAD + b"\xa2" + enc("a") + enc(1) + enc("a") + enc(2),
    "undefined": PING_HEAD + b"\xf7",
    "simple_16": PING_HEAD + b"\xf0",
    "simple_32": PING_HEAD + b"\xf8\x20",
    "depth_33": nested(33),
    "top_array": enc(["ping", 1]),
    "top_text": enc("ping"),
    "top_int_key": b"\xa3" + enc("op") + enc("ping") + enc("id") + enc(1) + enc(7) + enc(1),
    "nested_float_key": PING_HEAD + b"\xa1" + enc(1.5) + enc(1),
    "nested_array_key": PING_HEAD + b"\xa1" + enc([1]) + enc(1),
    "reserved_additional_info": PING_HEAD + b"\x1c",
    "huge_declared_length": PING_HEAD + b"\x5b" + b"\x7f" + b"\xff" * 7,
}


async def expect_proto_close(c: Client, payload: bytes | str) -> None:
    """Send one invalid message: an error event (proto), then close 1002."""
    await c.send_raw(payload)
    code = await close_code(c)
    errors = [e for e in c.events if e.get("ev") == "error"]
    assert code == 1002, (code, c.events, c.replies)
    assert len(errors) == 1, (c.events, c.replies)
    assert errors[0]["error"]["code"] == "proto" and errors[0]["session"] is None, errors
    assert isinstance(errors[0]["error"]["message"], str)
    assert not c.replies, c.replies


# --------------------------------------------------------------------------
# Handshake.


async def test_first_message_not_hello(server):
    async with keeps_serving(server.url):
        # With an id: a reply carrying that id, code proto; then 1002.
        for first in ({"op": "ping", "id": 5}, {"op": "nonsense", "id": 5}, {"id": 5},
                      {"op": "store", "id": 5, "name": "f", "code": "x = 1\n"}):
            async with conn(server.url, hello=False) as c:
                await c.send(first)
                code = await close_code(c)
                assert code == 1002, (first, code)
                assert list(c.replies) == [5], (first, c.replies, c.events)
                assert c.replies[5]["ok"] is False
                assert c.replies[5]["error"]["code"] == "proto", c.replies
                assert not [e for e in c.events if e.get("ev") != "error"]
        # Without an id: an error event (session null), then 1002.
        for first in ({"op": "ping"}, {"op": "ack", "session": "s_x", "seq": 1},
                      {"op": "input", "session": "s_x", "seq": 1, "data": 1}):
            async with conn(server.url, hello=False) as c:
                await c.send(first)
                code = await close_code(c)
                assert code == 1002, (first, code)
                assert not c.replies, c.replies
                assert len(c.events) == 1, c.events
                ev = c.events[0]
                assert ev["ev"] == "error" and ev["error"]["code"] == "proto", ev


async def test_hello_with_wrong_proto_closes(server):
    async with keeps_serving(server.url):
        for proto in (2, 0, "1"):
            async with conn(server.url, hello=False) as c:
                await c.send({"op": "hello", "id": 0, "proto": proto, "client": "t/1"})
                code = await close_code(c)
                assert code == 1002, (proto, code)
                assert 0 in c.replies, (proto, c.replies, c.events)
                assert c.replies[0]["ok"] is False and c.replies[0]["error"]["code"] == "proto"


async def test_hello_any_uint_id_works(server):
    async with keeps_serving(server.url):
        async with conn(server.url, hello=False) as c:
            await c.send({"op": "hello", "id": 77, "proto": 1, "client": "t/1"})
            with trio.fail_after(5):
                while 77 not in c.replies:
                    await c._read_one()
            r = c.replies.pop(77)
            assert r["ok"] is True and r["proto"] == 1
            assert isinstance(r["server"], str) and isinstance(r["node"], str)
            assert r["max_message"] == 16 * 1024 * 1024
            await still_open(c)


async def test_second_hello_is_bad_request(server):
    async with keeps_serving(server.url):
        async with conn(server.url) as c:
            r = await c.request("hello", proto=1, client="t/1")
            assert r["ok"] is False and r["error"]["code"] == "bad_request", r
            await still_open(c)
            r = await c.request("hello", proto=2, client="t/1")
            assert r["ok"] is False and r["error"]["code"] == "bad_request", r
            await still_open(c)
            r = await c.ok("execute", code="def main():\n    return 1\n")
            assert (await c.frames(r["session"]))[-1][2]["result"] == 1


# --------------------------------------------------------------------------
# Invalid messages (Transport).


async def test_text_message_closes_1002(server):
    async with keeps_serving(server.url):
        async with conn(server.url) as c:
            await expect_proto_close(c, '{"op": "ping", "id": 1}')
        async with conn(server.url, hello=False) as c:
            await expect_proto_close(c, "hello")


async def proto_close_outcome(url: str, payload: bytes | str, hello: bool) -> tuple:
    """(close code, [error event codes with their session], replies) for one
    invalid message sent on a fresh connection."""
    async with conn(url, hello=hello) as c:
        await c.send_raw(payload)
        code = await close_code(c)
        errors = [(e["error"]["code"], e["session"]) for e in c.events if e.get("ev") == "error"]
        others = [e for e in c.events if e.get("ev") != "error"]
        return code, errors, dict(c.replies), others


async def test_invalid_messages_close_1002(server):
    """Every kind of invalid message, after hello and as the very first message:
    exactly one error event (proto, session null), no reply, close 1002."""
    expected = (1002, [("proto", None)], {}, [])
    async with keeps_serving(server.url):
        outcomes = {}
        for kind in sorted(INVALID):
            for hello in (True, False):
                outcomes[(kind, hello)] = await proto_close_outcome(server.url, INVALID[kind], hello)
        wrong = {k: v for k, v in outcomes.items() if v != expected}
        assert wrong == {}, wrong


async def test_valid_edge_messages_are_accepted(server):
    """The limits are exact: nesting of depth 32, integer/bytes nested keys, the
    three allowed simple values and floats of every width are all valid."""
    async with keeps_serving(server.url):
        async with conn(server.url) as c:
            valid = [
                nested(32),
                PING_HEAD + b"\xa2" + enc(1) + enc(1) + enc(b"k") + enc(2),
                PING_HEAD + b"\x83\xf4\xf5\xf6",
                PING_HEAD + b"\x83\xf9\x3c\x00\xfa\x3f\x80\x00\x00\xfb\x3f\xf0\x00\x00\x00\x00\x00\x00",
            ]
            for payload in valid:
                await c.send_raw(payload)
                with trio.fail_after(5):
                    while 1 not in c.replies:
                        await c._read_one()
                assert c.replies.pop(1) == {"id": 1, "ok": True}, payload
            assert not c.events, c.events


DEPTH_OF = """
def main():
    out = []
    while True:
        try:
            v = api.recv()
        except EOFError:
            return out
        d = 0
        while isinstance(v, list) and v:
            v, d = v[0], d + 1
        out.append([d, v])
"""


async def test_deepest_and_oddest_inputs_reach_the_function(server):
    """What the server accepts as input it re-encodes with protocol.encode (our own
    encoder since the exchange dropped cbor2) for the exchange, which logs and
    forwards those bytes: the deepest input (the message at depth 1, its data 31
    lists deep), 64-bit extremes and non-finite floats arrive intact. (Checked to
    fail when that encode allows one level less.)"""
    deep: object = "bottom"
    for _ in range(31):
        deep = [deep]
    values = [deep, [[float("inf")]], [[-0.0]], [[2**64 - 1]], [[-(2**64)]]]
    async with connect(server.url) as c:
        r = await c.ok("execute", code=DEPTH_OF)
        sid = r["session"]
        for seq, v in enumerate(values, 1):
            await c.send({"op": "input", "session": sid, "seq": seq, "data": v})
        await c.send({"op": "input", "session": sid, "seq": len(values) + 1, "eof": True})
        ex = (await c.frames(sid))[-1][2]
    assert ex["state"] == "exited", ex
    assert ex["result"] == [[31, "bottom"], [2, float("inf")], [2, -0.0], [2, 2**64 - 1],
                            [2, -(2**64)]], ex
    assert math.copysign(1.0, ex["result"][2][1]) == -1.0  # (0.0 == -0.0: the sign, too)


async def test_message_larger_than_max_message_closes_1009(make_server):
    srv = make_server("--max-message", "65536")

    def ping_of_size(size: int) -> bytes:
        pad = size - 30
        while True:
            msg = enc({"op": "ping", "id": 1, "pad": b"\x00" * pad})
            if len(msg) == size:
                return msg
            pad += size - len(msg)

    async with keeps_serving(srv.url):
        async with conn(srv.url, hello=False) as c:
            r = await c.request("hello", proto=1, client="t/1")
            assert r["ok"] and r["max_message"] == 65536, r
            # Exactly max_message is allowed.
            await c.send_raw(ping_of_size(65536))
            with trio.fail_after(5):
                while 1 not in c.replies:
                    await c._read_one()
            assert c.replies.pop(1)["ok"] is True
            await c.send_raw(ping_of_size(65537))
            assert await close_code(c) == 1009
        async with conn(srv.url) as c:
            await c.send_raw(enc({"op": "store", "id": 3, "name": "f", "code": "#" * 200_000}))
            assert await close_code(c) == 1009
            assert 3 not in c.replies


async def test_server_messages_stay_within_max_message(make_server):
    """The server's own messages obey the bound it announced: out events are
    split and stdout chunked to fit 64 KiB."""
    srv = make_server("--max-message", "65536")
    code = (
        "import sys\n"
        "def main():\n"
        "    sys.stdout.write('y' * 300_000)\n"
        "    sys.stdout.flush()\n"
        "    for i in range(300):\n"
        "        api.send(b'z' * 1000)\n"
        "    return 'done'\n"
    )
    sizes: list[int] = []
    async with keeps_serving(srv.url):
        async with conn(srv.url) as c:
            real_get = c.ws.get_message

            async def measured() -> bytes:
                raw = await real_get()
                sizes.append(len(raw))
                return raw

            c.ws.get_message = measured
            r = await c.ok("execute", code=code)
            frames = await c.frames(r["session"])
    assert_contiguous(frames)
    assert data_of(frames) == b"y" * 300_000
    assert [f[2] for f in frames if f[1] == "msg"] == [b"z" * 1000] * 300
    assert frames[-1][2]["result"] == "done", frames[-1]
    assert max(sizes) <= 65536, max(sizes)


async def test_api_send_too_big_for_max_message_raises_value_error(make_server):
    """An api.send value whose encoding would not fit max_message with 1 KiB to
    spare raises ValueError inside the function; one that fits is delivered."""
    srv = make_server("--max-message", "65536")
    code = (
        "def main():\n"
        "    api.send(b'a' * 60_000)\n"
        "    for n in (65_000, 70_000, 1_000_000):\n"
        "        try:\n"
        "            api.send(b'x' * n)\n"
        "        except ValueError:\n"
        "            api.send(n, channel='refused')\n"
        "    return 'done'\n"
    )
    async with keeps_serving(srv.url):
        async with conn(srv.url) as c:
            r = await c.ok("execute", code=code)
            frames = await c.frames(r["session"])
    assert_contiguous(frames)
    assert [(f[1], f[2]) for f in frames[:-1]] == [
        ("msg", b"a" * 60_000), ("msg:refused", 65_000), ("msg:refused", 70_000),
        ("msg:refused", 1_000_000)]
    assert frames[-1][2]["result"] == "done", frames[-1]


# --------------------------------------------------------------------------
# Bad requests: answered, connection stays open.

BAD_REQUESTS: dict[str, dict] = {
    "unknown_op": {"op": "frobnicate"},
    "store_missing_code": {"op": "store", "name": "f"},
    "store_code_not_text": {"op": "store", "name": "f", "code": b"def main(): pass"},
    "status_missing_token": {"op": "status"},
    "attach_from_bool": {"op": "attach", "token": "bto_x", "from": True},
    "attach_from_float": {"op": "attach", "token": "bto_x", "from": 1.0},
    "attach_token_int": {"op": "attach", "token": 5},
    "execute_code_and_function": {"op": "execute", "code": "def main(): pass\n", "function": "ab" * 32},
    "execute_neither": {"op": "execute", "args": []},
    "execute_args_map": {"op": "execute", "code": "def main(): pass\n", "args": {}},
    "execute_network_int": {"op": "execute", "code": "def main(): pass\n", "network": 1},
    "execute_attach_uint": {"op": "execute", "code": "def main(): pass\n", "attach": 0},
    "execute_negative_limit": {"op": "execute", "code": "def main(): pass\n", "limits": {"wall_s": -1}},
    "execute_bool_limit": {"op": "execute", "code": "def main(): pass\n", "limits": {"pids": True}},
    "execute_bad_policy": {"op": "execute", "code": "def main(): pass\n", "buffer": {"policy": "yolo"}},
    "execute_env_not_text": {"op": "execute", "code": "def main(): pass\n", "env": {"A": 1}},
    "execute_unknown_limit": {"op": "execute", "code": "def main(): pass\n", "limits": {"cores": 1}},
    "execute_inf_limit": {"op": "execute", "code": "def main(): pass\n", "limits": {"wall_s": float("inf")}},
    "execute_nan_limit": {"op": "execute", "code": "def main(): pass\n", "limits": {"cpu_s": float("nan")}},
    "execute_huge_buffer": {"op": "execute", "code": "def main(): pass\n", "buffer": {"max_bytes": 2**62}},
    "execute_entry_int": {"op": "execute", "code": "def main(): pass\n", "entry": 1},
    "signal_bad_name": {"op": "signal", "token": "bto_x", "signal": "HUP"},
    "signal_lowercase": {"op": "signal", "token": "bto_x", "signal": "kill"},
    "state_put_if_version_bool": {"op": "state_put", "token": "bto_x", "value": 1, "if_version": True},
    "state_put_missing_value": {"op": "state_put", "token": "bto_x"},
    "detach_session_int": {"op": "detach", "session": 3},
}


async def test_bad_requests_get_bad_request_and_connection_stays_open(server):
    async with keeps_serving(server.url):
        async with conn(server.url) as c:
            before = len((await c.ok("list"))["sessions"])
            for name, msg in BAD_REQUESTS.items():
                r = await c.request(msg["op"], **{k: v for k, v in msg.items() if k != "op"})
                assert r["ok"] is False, (name, r)
                assert r["error"]["code"] == "bad_request", (name, r)
                assert isinstance(r["error"]["message"], str) and r["error"]["message"]
                await still_open(c)
            assert not c.events, c.events
            # A bad request started nothing.
            assert len((await c.ok("list"))["sessions"]) == before


async def test_request_with_unusable_id_stays_open(server):
    """A request whose id is not a uint cannot get a reply: an error event
    (bad_request) instead, and the connection stays open."""
    async with keeps_serving(server.url):
        async with conn(server.url) as c:
            for rid in (-1, "7", True, None):
                await c.send({"op": "ping", "id": rid})
                ev = await c.event(ev="error", timeout=5)
                assert ev["error"]["code"] == "bad_request", (rid, ev)
                await still_open(c)
            assert not c.events and not c.replies


# --------------------------------------------------------------------------
# ack / input / detach: attachment rules.

WAITER = "def main():\n    print('ready', flush=True)\n    v = api.recv()\n    return v\n"


async def test_ack_and_input_with_bad_fields_get_error_events(server):
    async with keeps_serving(server.url):
        async with conn(server.url) as c:
            r = await c.ok("execute", code=WAITER)
            sid = r["session"]
            await c.frames(sid, until_exit=False, count=1)
            bad = [
                {"op": "ack", "session": sid, "seq": -1},
                {"op": "ack", "session": sid, "seq": "3"},
                {"op": "ack", "session": sid, "seq": True},
                {"op": "ack", "session": sid},
                {"op": "ack", "session": sid, "seq": 1.5, "id": 99},
                {"op": "input", "session": sid, "seq": 0, "data": 1},
                {"op": "input", "session": sid, "seq": -2, "data": 1},
                {"op": "input", "session": sid, "seq": "1", "data": 1},
                {"op": "input", "session": sid, "seq": 1},
                {"op": "input", "session": sid, "seq": 1, "data": 1, "eof": True},
                {"op": "input", "session": sid, "seq": 1, "eof": 1, "id": 98},
            ]
            for msg in bad:
                await c.send(msg)
                ev = await c.event(ev="error", timeout=5)
                assert ev["error"]["code"] == "bad_request", (msg, ev)
                assert ev["session"] == sid, (msg, ev)
            # A missing/mistyped session: the event has session null.
            for msg in ({"op": "ack", "seq": 1}, {"op": "input", "session": 5, "seq": 1, "data": 0}):
                await c.send(msg)
                ev = await c.event(ev="error", timeout=5)
                assert ev["error"]["code"] == "bad_request" and ev["session"] is None, (msg, ev)
            await still_open(c)
            # No reply for any of them (ids 98 and 99 were ignored), no other event.
            assert not c.replies, c.replies
            assert not [e for e in c.events if e.get("ev") == "error"], c.events
            # None of the refused inputs consumed a seq: seq 1 is still the next.
            await c.send({"op": "input", "session": sid, "seq": 1, "data": "v1", "id": 97})
            assert (await c.event(ev="in_ack", session=sid))["seq"] == 1
            frames = await c.frames(sid)
            assert frames[-1][2]["result"] == "v1"
            # A valid ack carrying an id gets no reply either.
            await c.send({"op": "ack", "session": sid, "seq": frames[-1][0], "id": 96})
            await still_open(c)
            assert 96 not in c.replies and 97 not in c.replies
            assert not [e for e in c.events if e.get("ev") == "error"], c.events


async def test_ops_on_a_session_not_attached_are_not_found(server):
    async with keeps_serving(server.url):
        async with conn(server.url) as owner, conn(server.url) as other:
            r = await owner.ok("execute", code=WAITER)
            sid = r["session"]
            for target in (sid, "s_000000000000000000000000"):
                await other.send({"op": "ack", "session": target, "seq": 1})
                ev = await other.event(ev="error", timeout=5)
                assert ev["error"]["code"] == "not_found" and ev["session"] == target, ev
                await other.send({"op": "input", "session": target, "seq": 1, "data": "x"})
                ev = await other.event(ev="error", timeout=5)
                assert ev["error"]["code"] == "not_found" and ev["session"] == target, ev
                d = await other.request("detach", session=target)
                assert d["ok"] is False and d["error"]["code"] == "not_found", d
            # not_found is checked before the op's own rules: an input with a gap
            # or an eof on a session not attached is still not_found.
            await other.send({"op": "input", "session": sid, "seq": 9, "eof": True})
            ev = await other.event(ev="error", timeout=5)
            assert ev["error"]["code"] == "not_found", ev
            await still_open(other)
            assert not other.events and not other.replies
            # After detaching, the owner's connection is no longer attached either.
            await owner.ok("detach", session=sid)
            d = await owner.request("detach", session=sid)
            assert d["ok"] is False and d["error"]["code"] == "not_found", d
            await owner.send({"op": "input", "session": sid, "seq": 1, "data": "x"})
            ev = await owner.event(ev="error", session=sid, timeout=5)
            assert ev["error"]["code"] == "not_found", ev
            # Nothing reached the function: it still waits for input seq 1.
            st = await owner.ok("status", token=r["token"])
            assert st["input_seq"] == 0 and st["state"] in ("starting", "running"), st
            await owner.ok("destroy", token=r["token"])


async def test_input_over_viewer_attachment_is_forbidden(server):
    async with keeps_serving(server.url):
        async with conn(server.url) as owner, conn(server.url) as viewer:
            r = await owner.ok("execute", code=WAITER, attach=False)
            sid = r["session"]
            a = await viewer.ok("attach", token=r["viewer_token"])
            assert a["mode"] == "ro" and a["session"] == sid
            # forbidden comes before the op's own rules (a gap, an eof).
            for msg in ({"seq": 1, "data": "v"}, {"seq": 5, "data": "v"}, {"seq": 1, "eof": True}):
                await viewer.send({"op": "input", "session": sid, **msg})
                ev = await viewer.event(ev="error", timeout=5)
                assert ev["error"]["code"] == "forbidden" and ev["session"] == sid, (msg, ev)
            await still_open(viewer)
            assert not [e for e in viewer.events if e.get("ev") in ("error", "in_ack")]
            st = await owner.ok("status", token=r["token"])
            assert st["input_seq"] == 0, st
            # The owner's input is seq 1: the viewer's attempts took nothing.
            await owner.ok("attach", token=r["token"])
            await owner.send({"op": "input", "session": sid, "seq": 1, "data": "owner"})
            assert (await owner.event(ev="in_ack", session=sid))["seq"] == 1
            frames = await owner.frames(sid)
            assert frames[-1][2]["result"] == "owner"
            vframes = await viewer.frames(sid)
            assert vframes == frames


async def test_attach_from_bounds(server):
    code = (
        "def main():\n"
        "    for i in range(5):\n"
        "        print('before', i, flush=True)\n"
        "    api.recv()\n"
        "    for i in range(3):\n"
        "        print('after', i, flush=True)\n"
        "    return 'done'\n"
    )
    async with keeps_serving(server.url):
        async with conn(server.url) as owner, conn(server.url) as late:
            r = await owner.ok("execute", code=code)
            sid = r["session"]
            got = await owner.frames(sid, until_exit=False, count=1)
            while data_of(got) != b"".join(f"before {i}\n".encode() for i in range(5)):
                got += (await owner.event(ev="out", session=sid))["frames"]
            st = await owner.ok("status", token=r["token"])
            next_seq = st["next_seq"]
            assert next_seq == got[-1][0] + 1, (st, got)
            for bad in (0, next_seq + 1, next_seq + 1000):
                b = await late.request("attach", token=r["viewer_token"], **{"from": bad})
                assert b["ok"] is False and b["error"]["code"] == "bad_request", (bad, b)
                await still_open(late)
            assert not late.events
            a = await late.ok("attach", token=r["viewer_token"], **{"from": next_seq})
            assert a["next_seq"] == next_seq and a["first_seq"] == 1, a
            await still_open(late)
            assert not late.events, late.events  # nothing retained was pushed
            await owner.send({"op": "input", "session": sid, "seq": 1, "data": None})
            live = await late.frames(sid)
            assert live[0][0] == next_seq, live
            assert_contiguous(live, start=next_seq)
            assert data_of(live) == b"after 0\nafter 1\nafter 2\n"
            assert live[-1][2]["result"] == "done"
            # The owner, attached from 1, got the same live frames after the old ones.
            rest = await owner.frames(sid)
            assert rest == live


# --------------------------------------------------------------------------
# Floods.


async def test_two_thousand_pipelined_pings(server):
    n = 2000
    async with keeps_serving(server.url):
        async with conn(server.url) as c:
            async def sender() -> None:
                for i in range(n):
                    await c.send({"op": "ping", "id": 10_000 + i})

            with trio.fail_after(30):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(sender)
                    while len(c.replies) < n:
                        await c._read_one()
            assert sorted(c.replies) == list(range(10_000, 10_000 + n))
            assert all(r == {"id": rid, "ok": True} for rid, r in c.replies.items())
            assert not c.events


async def test_burst_of_malformed_connections(server):
    kinds = sorted(INVALID)
    codes: list[int] = []

    async def garbage(i: int) -> None:
        async with conn(server.url, hello=i % 2 == 0) as c:
            payload: bytes | str = INVALID[kinds[i % len(kinds)]] if i % 7 else "text garbage"
            await c.send_raw(payload)
            codes.append(await close_code(c, timeout=10))

    async with keeps_serving(server.url) as w:
        before = len(w.frames)
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for i in range(50):
                    nursery.start_soon(garbage, i)
        assert codes == [1002] * 50, codes
        # The witness kept streaming during the burst (it is checked in full at the end).
        with trio.fail_after(5):
            while len(w.frames) <= before:
                await trio.sleep(0.02)


# --------------------------------------------------------------------------
# Timeouts.


async def test_handshake_timeout_closes_1008(make_server):
    srv = make_server("--handshake-timeout", "0.5")
    async with keeps_serving(srv.url):
        async with conn(srv.url, hello=False) as c:
            t0 = time.monotonic()
            code = await close_code(c, timeout=5)
            elapsed = time.monotonic() - t0
            assert code == 1008, code
            assert 0.3 <= elapsed <= 4, elapsed
            assert not c.replies
        # A client that said hello in time is not closed by the handshake timeout.
        async with conn(srv.url) as c:
            await trio.sleep(0.8)
            await still_open(c)


async def test_idle_timeout_closes_1008_and_session_survives(make_server):
    srv = make_server("--idle-timeout", "1")
    async with keeps_serving(srv.url):
        async with conn(srv.url) as c:
            r = await c.ok("execute", code=WITNESS)
            sid, token = r["session"], r["token"]
            t0 = time.monotonic()
            have: list[list] = []
            with trio.fail_after(10):
                while True:
                    try:
                        await c._read_one()
                    except ConnectionClosed as exc:
                        code = exc.reason.code
                        break
                    while c.events:
                        ev = c.events.popleft()
                        if ev.get("ev") == "out":
                            have += ev["frames"]
            elapsed = time.monotonic() - t0
            assert code == 1008, code
            assert 0.7 <= elapsed <= 8, elapsed
        assert have and have[-1][1] != "exit"
        # The session kept running; re-attach from where we were.
        await trio.sleep(0.3)  # unattached, the function keeps producing
        async with conn(srv.url) as c2, trio.open_nursery() as nursery:
            nursery.start_soon(pinger, c2)
            st = await c2.ok("status", token=token)
            assert st["state"] == "running", st
            assert st["next_seq"] > len(have) + 1, (st, len(have))
            a = await c2.ok("attach", token=token, **{"from": len(have) + 1})
            assert a["mode"] == "rw" and a["session"] == sid
            await c2.send({"op": "input", "session": sid, "seq": 1, "data": "stop"})
            rest = await c2.frames(sid)
            nursery.cancel_scope.cancel()
    frames = have + rest
    assert_contiguous(frames)
    n = frames[-1][2]["result"]
    assert data_of(frames) == b"".join(f"{i}\n".encode() for i in range(n))


# --------------------------------------------------------------------------
# Path.


async def upgrade_status(port: int, path: str) -> int:
    """The HTTP status a WebSocket upgrade request for ``path`` gets."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        await stream.send_all(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        buf = b""
        with trio.fail_after(5):
            while b"\r\n" not in buf:
                chunk = await stream.receive_some(4096)
                assert chunk, buf
                buf += chunk
        return int(buf.split(b" ", 2)[1])
    finally:
        await stream.aclose()


async def test_websocket_path_other_than_v1_is_refused(server):
    async with keeps_serving(server.url):
        assert await upgrade_status(server.port, "/v1") == 101
        for path in ("/", "/v2", "/v1/", "/v1/x", "/V1", "/v10", "/v0"):
            status = await upgrade_status(server.port, path)
            assert 400 <= status < 500, (path, status)
