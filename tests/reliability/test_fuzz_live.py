"""Fuzzing the protocol decoder and a live server (DESIGN.md 5: "The server
survives anything a client sends"; PROTOCOL.md Transport, Requests and replies).

In-process: request-shaped messages (valid-looking, with random field values
and types), mutations and truncations go through ``protocol.decode`` and
``protocol.parse_request``. Only ``ProtocolError`` / ``RequestError(bad_request)``
may come out, whatever was accepted reads the same with cbor2, and
``parse_request`` accepts exactly what an independent reading of PROTOCOL.md
accepts (``spec_accepts`` below).

Live: many connections send random and mutated CBOR at a real server while a
*control* session streams numbered output on its own connection. Every answer
must be conformant (a reply to each request that needs one, well-formed events,
close 1002 after an ``error``/``proto`` for invalid messages, 1009 for
oversize ones, nothing closed for valid ones); the control session must
receive every line exactly once; the server must stay up, log no traceback,
and serve a fresh hello+execute at the end.

``Gen`` and ``LiveFuzz`` are also the engine of ``fuzz_long.py`` (make fuzz).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import cbor2
import trio
from helpers import close_ws
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed, open_websocket_url

from bento import protocol

MAX_MESSAGE = 1024 * 1024  # the fuzzed server runs with --max-message this
SERVER_ARGS = ("--max-message", str(MAX_MESSAGE))
OPS = ("hello", "store", "execute", "attach", "detach", "ack", "input", "signal", "status",
       "destroy", "state_get", "list", "state_put", "ping")
NO_ID = ("ack", "input")
EVENTS = ("out", "in_ack", "error", "state")

# --------------------------------------------------------------------------
# What PROTOCOL.md (and docs/protocol.md, for what it leaves open) accepts,
# written down independently of bento.protocol's tables.

SPEC: dict[str, dict[str, str]] = {
    "hello": {"proto": "int", "client": "text?", "auth": "text?"},
    "store": {"name": "text", "code": "text"},
    "execute": {"function": "text?", "code": "text?", "entry": "text?", "args": "array?",
                "kwargs": "kwargs?", "env": "env?", "limits": "limits?", "buffer": "buffer?",
                "network": "bool?", "idempotency_key": "idem?", "attach": "bool?"},
    "attach": {"token": "text", "from": "pos?"},
    "detach": {"session": "text"},
    "ack": {"session": "text", "seq": "uint"},
    "input": {"session": "text", "seq": "pos", "data": "any?", "eof": "bool?"},
    "signal": {"token": "text", "signal": "signal"},
    "status": {"token": "text"},
    "destroy": {"token": "text"},
    "state_get": {"token": "text"},
    "list": {},
    "state_put": {"token": "text", "value": "any", "if_version": "uint?"},
    "ping": {},
}
LIMIT_KEYS = ("wall_s", "cpu_s", "memory_bytes", "pids", "output_bytes", "file_bytes")


def _is_int(v: Any) -> bool:
    return type(v) is int


def _kind_ok(kind: str, v: Any) -> bool:
    if kind == "any":
        return True
    if kind == "int":
        return _is_int(v)
    if kind == "uint":
        return _is_int(v) and v >= 0
    if kind == "pos":
        return _is_int(v) and v >= 1
    if kind == "text":
        return type(v) is str
    if kind == "bool":
        return type(v) is bool
    if kind == "array":
        return type(v) is list
    if kind == "kwargs":
        return type(v) is dict and all(type(k) is str for k in v)
    if kind == "env":
        return type(v) is dict and all(type(k) is str and type(x) is str for k, x in v.items())
    if kind == "idem":
        return type(v) is str and 1 <= len(v) <= 256
    if kind == "signal":
        return v in ("INT", "TERM", "KILL") and type(v) is str
    if kind == "limits":
        if type(v) is not dict:
            return False
        for k, x in v.items():
            if k not in LIMIT_KEYS or type(k) is not str:
                return False
            if k in ("wall_s", "cpu_s"):
                if type(x) not in (int, float) or not math.isfinite(x) or x < 0:
                    return False
            elif not (_is_int(x) and x >= 0):
                return False
        return True
    if kind == "buffer":
        if v is None:
            return True
        if type(v) is not dict:
            return False
        for k, x in v.items():
            if k == "max_bytes" and type(k) is str:
                if not (_is_int(x) and x >= 0):
                    return False
            elif k == "policy" and type(k) is str:
                if x not in ("block", "drop_oldest", "fail") or type(x) is not str:
                    return False
            else:
                return False
        return True
    raise AssertionError(kind)


def spec_accepts(msg: dict) -> bool:
    op = msg.get("op")
    if type(op) is not str or op not in SPEC:
        return False
    if op not in NO_ID and not (_is_int(msg.get("id")) and msg["id"] >= 0):
        return False
    for name, kind in SPEC[op].items():
        optional = kind.endswith("?")
        if name not in msg:
            if not optional:
                return False
        elif not _kind_ok(kind.rstrip("?"), msg[name]):
            return False
    if op == "execute" and (("function" in msg) == ("code" in msg)):
        return False
    if op == "input" and (("data" in msg) == (msg.get("eof") is True)):  # (eof false: as if absent)
        return False
    return True


def check_pipeline(data: bytes, max_size: int = MAX_MESSAGE) -> str:
    """decode + parse_request on untrusted bytes, checking every property that
    holds for any input. Returns the outcome: "proto", "bad_request" or "ok"."""
    try:
        msg = protocol.decode(data, max_size=max_size)
    except protocol.ProtocolError as exc:
        assert exc.close_code in (1002, 1009) and exc.code == "proto"
        assert (exc.close_code == 1009) == (len(data) > max_size)
        return "proto"
    assert type(msg) is dict and all(type(k) is str for k in msg)
    assert depth(msg) <= protocol.MAX_DEPTH
    # Whatever the strict decoder accepts is plain CBOR that cbor2 reads the same
    # (compared through its encoding, so that NaN equals NaN).
    assert cbor2.dumps(msg) == cbor2.dumps(cbor2.loads(data))
    try:
        req = protocol.parse_request(msg)
    except protocol.RequestError as exc:
        assert exc.code == "bad_request", exc
        rid = msg.get("id")
        if exc.request_id is not None:
            assert exc.request_id == rid and _is_int(rid) and rid >= 0
        assert not spec_accepts(msg), f"parse_request refused what PROTOCOL.md accepts: {msg!r} ({exc})"
        return "bad_request"
    assert spec_accepts(msg), f"parse_request accepted what PROTOCOL.md refuses: {msg!r} -> {req!r}"
    assert req["op"] == msg["op"]
    assert req["id"] == (None if msg["op"] in NO_ID else msg["id"])
    return "ok"


def depth(v: Any) -> int:
    if isinstance(v, list):
        return 1 + max(map(depth, v), default=0)
    if isinstance(v, dict):
        return 1 + max((max(depth(k), depth(x)) for k, x in v.items()), default=0)
    return 0


# --------------------------------------------------------------------------
# Generating messages (random.Random, fast: the live fuzz and fuzz_long.py).

INTERESTING_INTS = (0, 1, 2, 23, 24, 255, 256, 65535, 65536, 2**31, 2**32, 2**53, 2**63,
                    2**64 - 1, -1, -24, -25, -(2**63), -(2**64))
INTERESTING_BYTES = (0x00, 0x17, 0x18, 0x1b, 0x1c, 0x1f, 0x3f, 0x5f, 0x7f, 0x9f, 0xbf, 0xc0,
                     0xc1, 0xd8, 0xd9, 0xdb, 0xf4, 0xf5, 0xf6, 0xf7, 0xf8, 0xf9, 0xfa, 0xfb,
                     0xfc, 0xff)
WORDS = ("main", "stdout", "msg", "exit", "gap", "out", "hello", "bto_", "btv_", "s_", "INT",
         "KILL", "block", "fail", "drop_oldest", "wall_s", "pids", "max_bytes", "policy", "")
CODES = ("def main():\n    return 1\n", "def main(:\n", "x = 1\n",
         "def main(*a, **k):\n    print('hi')\n    return a\n",
         "import time\ndef main():\n    time.sleep(0.2)\n")


class Gen:
    """Random protocol-shaped messages: mostly valid-looking requests with random
    field values and types, plus mutations, truncations, structural attacks,
    random bytes, text frames and oversize messages."""

    def __init__(self, rng: random.Random, max_message: int = MAX_MESSAGE) -> None:
        self.rng = rng
        self.max_message = max_message
        self.tokens: list[str] = []  # real tokens of the fuzz's own sessions
        self.sessions: list[str] = []
        self.allow_execute = True
        self.next_id = 1

    # -- values ------------------------------------------------------------------

    def text(self) -> str:
        r = self.rng.random()
        if r < 0.3:
            return self.rng.choice(WORDS)
        if r < 0.6:
            return "".join(chr(self.rng.randint(32, 126)) for _ in range(self.rng.randint(0, 20)))
        if r < 0.9:
            return "".join(chr(self.rng.choice((self.rng.randint(0x80, 0xD7FF),
                                                self.rng.randint(0xE000, 0x10FFFF))))
                           for _ in range(self.rng.randint(1, 8)))
        return "x" * self.rng.choice((255, 256, 257, 1000, 70_000))

    def integer(self) -> int:
        if self.rng.random() < 0.5:
            return self.rng.choice(INTERESTING_INTS)
        return self.rng.randint(-1000, 1000)

    def value(self, d: int = 0) -> Any:
        r = self.rng.random()
        if d > 3 or r < 0.55:
            return self.rng.choice((
                None, True, False, self.integer(), self.text(), self.rng.randbytes(self.rng.randint(0, 16)),
                self.rng.choice((0.0, -0.0, 1.5, 1e308, float("inf"), float("-inf"), float("nan"))),
            ))
        if r < 0.8:
            return [self.value(d + 1) for _ in range(self.rng.randint(0, 4))]
        out: dict = {}
        for _ in range(self.rng.randint(0, 4)):
            k = self.rng.choice((self.text(), self.integer(), self.rng.randbytes(3)))
            out[k] = self.value(d + 1)
        return out

    def plausible(self, name: str) -> Any:
        rng = self.rng
        if name == "token":
            if self.tokens and rng.random() < 0.85:
                return rng.choice(self.tokens)
            return rng.choice(("bto_", "btv_", "")) + self.text()
        if name == "session":
            if self.sessions and rng.random() < 0.6:
                return rng.choice(self.sessions)
            return "s_" + self.text()
        if name in ("seq", "from", "if_version", "proto", "id"):
            return rng.choice((0, 1, 1, 2, 3, 5, 100, 2**64 - 1, -1))
        if name == "code":
            return rng.choice(CODES)
        if name == "function":
            return rng.choice(("0" * 64, rng.randbytes(32).hex(), self.text()))
        if name in ("name", "entry", "client", "auth", "idempotency_key"):
            return rng.choice(("main", "tests/1", f"k{rng.randint(0, 30)}", self.text()))
        if name == "args":
            return [self.value(2) for _ in range(rng.randint(0, 3))]
        if name == "kwargs":
            return {self.text(): self.value(2) for _ in range(rng.randint(0, 2))}
        if name == "env":
            return {self.text(): self.text() for _ in range(rng.randint(0, 2))}
        if name == "limits":
            return {rng.choice(LIMIT_KEYS + ("bogus",)): rng.choice((0, 1, 0.5, 10, -1, 2**40, "x"))
                    for _ in range(rng.randint(0, 3))}
        if name == "buffer":
            return rng.choice((None, {}, {"max_bytes": rng.choice((0, 1, 4096, 2**62))},
                               {"policy": rng.choice(("block", "drop_oldest", "fail", "x"))}))
        if name in ("network", "attach"):
            return rng.random() < 0.5
        if name == "eof":
            return self.rng.random() < 0.8
        if name == "signal":
            return rng.choice(("INT", "TERM", "KILL", "HUP", "int", ""))
        return self.value()

    # -- requests and messages ------------------------------------------------------

    def request(self) -> dict:
        rng = self.rng
        r = rng.random()
        op: Any = rng.choice(OPS) if r < 0.93 else self.value() if r < 0.97 else None
        msg: dict = {}
        if op is not None:
            msg["op"] = op
        r = rng.random()
        if r < 0.85:
            msg["id"] = self.next_id
            self.next_id += 1
        elif r < 0.95:
            msg["id"] = rng.choice((-1, 1.0, "1", None, True, 2**64 - 1, [1]))
        for name in SPEC.get(op, {}) if type(op) is str else ():
            if rng.random() < 0.85:
                msg[name] = self.plausible(name) if rng.random() < 0.85 else self.value()
        if op == "execute":
            if not self.allow_execute:
                msg.pop("code", None)
                msg.pop("function", None)
            elif rng.random() < 0.3:  # one that runs
                msg = {"op": op, "id": self.next_id, "code": rng.choice(CODES),
                       "attach": rng.random() < 0.5}
                self.next_id += 1
        for _ in range(rng.choice((0, 0, 0, 1, 2))):
            msg[self.text()] = self.value()
        items = list(msg.items())
        rng.shuffle(items)
        return dict(items)

    def valid_bytes(self) -> bytes:
        return cbor2.dumps(self.request())

    def mutate(self, data: bytes) -> bytes:
        rng = self.rng
        b = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            if not b:
                break
            pos = rng.randrange(len(b))
            kind = rng.randrange(6)
            if kind == 0:
                b[pos] ^= 1 << rng.randrange(8)
            elif kind == 1:
                b[pos] = rng.choice(INTERESTING_BYTES)
            elif kind == 2:
                b[pos:pos] = rng.randbytes(rng.randint(1, 4))
            elif kind == 3:
                del b[pos:pos + rng.randint(1, 4)]
            elif kind == 4:
                end = min(len(b), pos + rng.randint(1, 8))
                b[pos:pos] = b[pos:end]
            else:
                b[pos] = rng.randrange(256)
        return bytes(b)

    def structural(self) -> bytes:
        rng = self.rng
        head = cbor2.dumps({"op": "ping", "id": self.next_id})
        self.next_id += 1
        body = b"\xa3" + head[1:] + b"\x61x"  # a third key "x"; its value follows
        kind = rng.randrange(10)
        if kind == 0:
            d = rng.randint(28, 40)
            return body + b"\x81" * (d - 2) + b"\x80"
        if kind == 1:
            tag = rng.choice((0, 1, 2, 24, 28, 29, 35, 55799, 2**32))
            return body + protocol.encode_head(6, tag) + cbor2.dumps(self.value(2))
        if kind == 2:
            return body + rng.choice((b"\x9f\x01\xff", b"\xbf\xff", b"\x5f\x41a\xff", b"\x7f\xff"))
        if kind == 3:
            return b"\xa3" + head[1:] + cbor2.dumps("id") + cbor2.dumps(rng.randint(0, 9))
        if kind == 4:
            return b"\xa3" + head[1:] + cbor2.dumps(self.integer()) + b"\x00"
        if kind == 5:
            return body + rng.choice((b"\xf7", b"\xf0", b"\xf8\x20", b"\xf8\x00", b"\xff", b"\x1c"))
        if kind == 6:
            return body + bytes([rng.choice((0x5b, 0x7b, 0x9b, 0xbb))]) + rng.randbytes(8)
        if kind == 7:
            return head + rng.choice((b"\x00", head, b"\xff"))
        if kind == 8:
            n = rng.choice((protocol.DEFAULT_MAX_ITEMS - 3, protocol.DEFAULT_MAX_ITEMS + 1))
            return body + b"\x9a" + n.to_bytes(4, "big") + b"\x00" * n
        return body + b"\xa2\x61a\x01\x61a\x02"  # a duplicate key, nested

    def message(self) -> bytes | str:
        rng = self.rng
        r = rng.random()
        if r < 0.7:
            return self.valid_bytes()
        if r < 0.85:
            return self.mutate(self.valid_bytes())
        if r < 0.9:
            data = self.valid_bytes()
            return data[: rng.randrange(len(data))]
        if r < 0.96:
            return self.structural()
        if r < 0.985:
            return bytes([rng.choice((0xa1, 0xa2, 0xbf, 0x80, 0xff))]) + rng.randbytes(rng.randint(0, 40))
        if r < 0.998:
            return rng.choice(("{}", '{"op": "ping", "id": 1}', ""))
        return b"\xa1\x61x\x5a" + (self.max_message).to_bytes(4, "big") + b"\x00" * self.max_message


# --------------------------------------------------------------------------
# In-process: the decoder and the validator under hypothesis.

scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**64), max_value=2**64 - 1)
           | st.floats() | st.text(max_size=20) | st.binary(max_size=20))
values = st.recursive(
    scalars,
    lambda children: (st.lists(children, max_size=4)
                      | st.dictionaries(st.text(max_size=5) | st.integers(-(2**64), 2**64 - 1)
                                        | st.binary(max_size=5),
                                        children, max_size=4)),
    max_leaves=12,
)
PLAUSIBLE: dict[str, st.SearchStrategy] = {
    "int": st.integers(min_value=-2, max_value=3) | st.sampled_from([2**64 - 1, -(2**64)]),
    "uint": st.integers(min_value=-1, max_value=5) | st.just(2**64 - 1),
    "pos": st.integers(min_value=-1, max_value=5),
    "text": st.text(max_size=10),
    "bool": st.booleans(),
    "array": st.lists(values, max_size=3),
    "kwargs": st.dictionaries(st.text(max_size=5), values, max_size=3),
    "env": st.dictionaries(st.text(max_size=5), st.text(max_size=5) | st.integers(0, 9), max_size=3),
    "idem": st.text(max_size=3) | st.just("k" * 256) | st.just("k" * 257),
    "signal": st.sampled_from(["INT", "TERM", "KILL", "HUP", "int"]),
    "limits": st.dictionaries(st.sampled_from(LIMIT_KEYS + ("bogus",)),
                              st.integers(min_value=-1, max_value=10) | st.floats(), max_size=3),
    "buffer": st.none() | st.dictionaries(
        st.sampled_from(["max_bytes", "policy", "x"]),
        st.integers(min_value=-1, max_value=10) | st.sampled_from(["block", "drop_oldest", "fail", "no"]),
        max_size=2),
    "any": values,
}


@st.composite
def requests(draw: Any) -> dict:
    op = draw(st.sampled_from(OPS) | st.text(max_size=6) | values)
    msg: dict = {"op": op}
    if draw(st.booleans()):
        msg["id"] = draw(st.integers(min_value=0, max_value=2**64 - 1) | values)
    else:
        msg["id"] = draw(st.integers(min_value=0, max_value=1000))
    spec = SPEC.get(op, {}) if type(op) is str else {}
    for name, kind in spec.items():
        if draw(st.integers(0, 9)) < 8:
            strategy = PLAUSIBLE[kind.rstrip("?")]
            msg[name] = draw(strategy if draw(st.integers(0, 9)) < 8 else values)
    if draw(st.integers(0, 9)) == 0:
        del msg["op"]
    extra = draw(st.dictionaries(st.text(max_size=6), values, max_size=2))
    return {**extra, **msg}


edits = st.lists(st.tuples(st.integers(0, 5), st.integers(0, 10**6), st.integers(0, 255)),
                 min_size=1, max_size=4)


def apply_edits(data: bytes, ops: list[tuple[int, int, int]]) -> bytes:
    b = bytearray(data)
    for kind, pos, byte in ops:
        if not b:
            break
        pos %= len(b)
        if kind == 0:
            b[pos] ^= 1 << (byte % 8)
        elif kind == 1:
            b[pos] = byte
        elif kind == 2:
            b.insert(pos, byte)
        elif kind == 3:
            del b[pos]
        elif kind == 4:
            del b[pos:]
        else:
            b[pos] = INTERESTING_BYTES[byte % len(INTERESTING_BYTES)]
    return bytes(b)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests())
def test_decoder_and_validator_on_requests(msg):
    """Valid-looking requests with random field values and types: parse_request
    agrees with PROTOCOL.md on each one, after an exact trip through decode."""
    check_pipeline(cbor2.dumps(msg))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests(), edits)
def test_decoder_and_validator_on_mutated_requests(msg, ops):
    check_pipeline(apply_edits(cbor2.dumps(msg), ops))


def test_decoder_and_validator_on_generated_messages():
    """The live fuzz's own generator, in process: 3,000 messages of every kind."""
    gen = Gen(random.Random(1), max_message=MAX_MESSAGE)
    outcomes: Counter = Counter()
    for _ in range(3000):
        data = gen.message()
        if isinstance(data, str):
            continue
        outcomes[check_pipeline(data)] += 1
    assert outcomes["ok"] > 300 and outcomes["bad_request"] > 300 and outcomes["proto"] > 300, outcomes


# --------------------------------------------------------------------------
# Live: the engine.


@dataclass
class Expect:
    close: int | None  # the close code the message must cause, or None (stays open)
    reply_id: int | None = None  # a reply with this id must come
    code: str | None = None  # ...with this error code ("" = ok; None = any answer)
    proto_event: bool = False  # an error event (proto) must come before the close
    hello: bool = False  # a valid hello: the handshake is done


def oracle(data: bytes | str, hello_done: bool, max_message: int) -> Expect:
    """What PROTOCOL.md says the server must do with this message."""
    if isinstance(data, str):
        return Expect(1002, proto_event=True)
    if len(data) > max_message:
        return Expect(1009)  # trio-websocket closes it before the server reads it
    try:
        msg = protocol.decode(data, max_size=max_message)
    except protocol.ProtocolError as exc:
        return Expect(exc.close_code, proto_event=exc.close_code == 1002)
    try:
        req = protocol.parse_request(msg)
    except protocol.RequestError as exc:
        if not hello_done:
            return Expect(1002, exc.request_id, "proto", proto_event=exc.request_id is None)
        return Expect(None, exc.request_id, "bad_request")
    rid = req["id"]
    if not hello_done:
        if req["op"] != "hello" or req["proto"] != protocol.PROTO_VERSION:
            return Expect(1002, rid, "proto", proto_event=rid is None)
        return Expect(None, rid, "", hello=True)
    if req["op"] == "hello":
        return Expect(None, rid, "bad_request")
    return Expect(None, rid, None)


@dataclass
class Stats:
    cases: int = 0
    connections: int = 0
    closes: Counter = field(default_factory=Counter)
    replies: Counter = field(default_factory=Counter)
    events: Counter = field(default_factory=Counter)
    executed: int = 0


class LiveFuzz:
    """Fuzz a live server from ``workers`` concurrent connections.

    Each connection says hello (most of the time), then sends fuzz messages;
    after each one that must not close the connection, a ping: everything up to
    its reply is checked. Findings are collected, not raised, so a long run
    reports them all."""

    def __init__(self, url: str, seed: int, cases: int, workers: int = 6,
                 max_message: int = MAX_MESSAGE, max_executes: int = 30) -> None:
        self.url = url
        self.rng = random.Random(seed)
        self.target = cases
        self.workers = workers
        self.max_message = max_message
        self.max_executes = max_executes
        self.stats = Stats()
        self.findings: list[str] = []
        # Tokens of sessions the fuzz started whose destroy was refused (``limit``:
        # the fuzz's failed token guesses drain the per-peer bucket): retried later.
        self.undestroyed: list[str] = []
        self.gens = [Gen(random.Random(seed * 1000 + w), max_message) for w in range(workers)]

    def finding(self, what: str, data: Any = None) -> None:
        if len(self.findings) < 200:
            shown = data.hex() if isinstance(data, bytes) else repr(data)
            self.findings.append(f"{what}; message: {shown[:400]}")

    def share(self, token: str, session: str) -> None:
        for g in self.gens:
            g.tokens.append(token)
            g.sessions.append(session)

    async def run(self) -> None:
        async with trio.open_nursery() as n:
            for w in range(self.workers):
                n.start_soon(self.worker, self.gens[w])

    async def worker(self, gen: Gen) -> None:
        while self.stats.cases < self.target:
            self.stats.connections += 1
            async with open_websocket_url(self.url, max_message_size=64 * 1024 * 1024) as ws:
                try:
                    await self.connection(ws, gen)
                finally:
                    await close_ws(ws)

    async def connection(self, ws: Any, gen: Gen) -> None:
        rng = self.rng
        conn = Conn(self, ws)
        if rng.random() < 0.93:
            await conn.step(cbor2.dumps({"op": "hello", "id": 0, "proto": 1, "client": "fuzz/1"}),
                            count=False)
        for _ in range(2):
            if conn.hello and self.undestroyed:
                await conn.destroy(self.undestroyed.pop())
        for _ in range(rng.randint(1, 150)):
            if self.stats.cases >= self.target or conn.closed:
                break
            gen.allow_execute = (self.stats.executed < self.max_executes
                                 and len(self.undestroyed) < 5)
            await conn.step(gen.message())
        # (A connection that never said hello - no hello drawn, and the case
        # budget ran out at once - has nothing to sync: a ping would close it.)
        if not conn.closed and conn.hello:
            await conn.sync()
            conn.final_check()


class Conn:
    """One fuzzing connection: what it sent, what it must still get."""

    def __init__(self, fuzz: LiveFuzz, ws: Any) -> None:
        self.fuzz = fuzz
        self.ws = ws
        self.hello = False
        self.closed = False
        self.expected: Counter = Counter()  # reply ids still owed
        self.codes: dict[int, list[str | None]] = {}
        self.ping_id = 10**12
        self.destroys: dict[int, str] = {}  # request id -> token of a fuzz session

    async def step(self, data: bytes | str, count: bool = True) -> None:
        fuzz = self.fuzz
        exp = oracle(data, self.hello, fuzz.max_message)
        if count:
            fuzz.stats.cases += 1
        if exp.reply_id is not None:
            self.expected[exp.reply_id] += 1
            self.codes.setdefault(exp.reply_id, []).append(exp.code)
        if exp.hello:
            self.hello = True
        try:
            await self.ws.send_message(data)
        except ConnectionClosed:
            self.closed = True
            fuzz.finding("the server closed the connection before this message was sent", data)
            return
        if exp.close is not None:
            await self.expect_close(exp, data)
        else:
            await self.sync(data)

    async def sync(self, data: Any = None) -> None:
        """A ping; read and check everything up to its reply."""
        self.ping_id += 1
        pid = self.ping_id
        self.expected[pid] += 1
        self.codes.setdefault(pid, []).append("")
        try:
            await self.ws.send_message(cbor2.dumps({"op": "ping", "id": pid}))
            with trio.fail_after(20):
                while self.expected[pid]:
                    await self.read_one(data)
        except ConnectionClosed as exc:
            self.closed = True
            self.fuzz.finding(f"the connection was closed ({exc.reason}) after a message that "
                              "must leave it open", data)
        except trio.TooSlowError:
            self.closed = True
            self.fuzz.finding("no answer to a ping within 20 s (server stalled)", data)

    async def expect_close(self, exp: Expect, data: Any) -> None:
        proto_events = 0
        try:
            with trio.fail_after(20):
                while True:
                    msg = await self.read_one(data)
                    if msg is not None and msg.get("ev") == "error" and msg["error"]["code"] == "proto":
                        proto_events += 1
        except ConnectionClosed as exc:
            self.closed = True
            code = exc.reason.code
            self.fuzz.stats.closes[code] += 1
            if code != exp.close:
                self.fuzz.finding(f"closed with {code}, expected {exp.close}", data)
            if exp.proto_event and proto_events != 1:
                self.fuzz.finding(f"{proto_events} error events (proto) before close {code}, "
                                  "expected exactly one", data)
            self.final_check(data)
        except trio.TooSlowError:
            self.closed = True
            self.fuzz.finding(f"an invalid message did not close the connection (expected "
                              f"{exp.close}) within 20 s", data)

    async def read_one(self, data: Any) -> dict | None:
        raw = await self.ws.get_message()
        fuzz = self.fuzz
        if not isinstance(raw, bytes):
            fuzz.finding(f"the server sent a text message {raw[:100]!r}", data)
            return None
        try:
            msg = protocol.decode(raw, max_size=fuzz.max_message)
        except protocol.ProtocolError as exc:
            fuzz.finding(f"the server sent an invalid message ({exc}): {raw[:100].hex()}", data)
            return None
        problem = conformance(msg)
        if problem:
            fuzz.finding(f"non-conformant server message {msg!r:.300}: {problem}", data)
            return msg
        if "ev" in msg:
            fuzz.stats.events[msg["ev"]] += 1
            return msg
        rid = msg["id"]
        fuzz.stats.replies["ok" if msg["ok"] else msg["error"]["code"]] += 1
        if not self.expected[rid]:
            fuzz.finding(f"a reply nobody asked for: {msg!r:.300}", data)
            return msg
        self.expected[rid] -= 1
        want = self.codes[rid].pop(0)
        got = "" if msg["ok"] else msg["error"]["code"]
        if want is not None and got != want:
            fuzz.finding(f"reply {msg!r:.300}: expected {want or 'ok'}", data)
        token = self.destroys.pop(rid, None)
        if token is not None and got == "limit":
            fuzz.undestroyed.append(token)
        if msg["ok"] and "token" in msg and "viewer_token" in msg:
            # A session the fuzz started: gone again at once (its reply is owed too).
            fuzz.stats.executed += 1
            await self.destroy(msg["token"])
        return msg

    async def destroy(self, token: str) -> None:
        self.ping_id += 1
        self.expected[self.ping_id] += 1
        self.codes.setdefault(self.ping_id, []).append(None)
        self.destroys[self.ping_id] = token
        await self.ws.send_message(cbor2.dumps({"op": "destroy", "id": self.ping_id,
                                                "token": token}))

    def final_check(self, data: Any = None) -> None:
        owed = {k: v for k, v in self.expected.items() if v}
        if owed:
            self.fuzz.finding(f"requests never answered (ids {sorted(owed)[:10]})", data)


def conformance(msg: dict) -> str | None:
    """Why a server message breaks PROTOCOL.md (None if it does not)."""
    if "ev" in msg:
        ev = msg["ev"]
        if ev not in EVENTS:
            return f"unknown event {ev!r}"
        if "id" in msg:
            return "an event with an id"
        if ev == "error":
            err = msg.get("error")
            if set(msg) != {"ev", "session", "error"} or not isinstance(err, dict):
                return "error event fields"
            if not (msg["session"] is None or type(msg["session"]) is str):
                return "error event session"
            if err.get("code") not in protocol.ERROR_CODES or type(err.get("message")) is not str:
                return "error code/message"
        elif type(msg.get("session")) is not str:
            return "event without a session"
        elif ev == "out":
            frames = msg.get("frames")
            if type(frames) is not list or not frames:
                return "out frames"
            for f in frames:
                if type(f) is not list or len(f) != 3 or type(f[0]) is not int or type(f[1]) is not str:
                    return f"frame {f!r:.80}"
        elif ev == "in_ack" and type(msg.get("seq")) is not int:
            return "in_ack seq"
        elif ev == "state" and type(msg.get("version")) is not int:
            return "state version"
        return None
    if type(msg.get("id")) is not int or msg["id"] < 0:
        return "a reply without a uint id"
    if msg.get("ok") is True:
        return None if "error" not in msg else "ok reply with an error"
    if msg.get("ok") is not False:
        return "reply without ok"
    err = msg.get("error")
    if not isinstance(err, dict) or err.get("code") not in protocol.ERROR_CODES:
        return "error reply code"
    if type(err.get("message")) is not str:
        return "error reply message"
    return None


# Prints 0, 1, 2, ... every few ms until it gets an input; returns the count.
CONTROL = """
import time
def main():
    i = 0
    while True:
        print(i)
        i += 1
        try:
            api.recv(timeout=0.003)
        except TimeoutError:
            continue
        return i
"""

VICTIM = """
def main():
    while True:
        try:
            v = api.recv()
        except EOFError:
            return None
        api.send(v)
"""


class Control:
    """A session streaming numbered lines on its own connection during the fuzz."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.frames: list[list] = []
        self.stop = trio.Event()
        self.started = trio.Event()

    async def run(self) -> None:
        async with open_websocket_url(self.url, max_message_size=64 * 1024 * 1024) as ws:
            try:
                await ws.send_message(cbor2.dumps({"op": "hello", "id": 0, "proto": 1}))
                await ws.get_message()
                await ws.send_message(cbor2.dumps({"op": "execute", "id": 1, "code": CONTROL}))
                r = protocol.decode(await ws.get_message())
                assert r["ok"], r
                sid = r["session"]
                async with trio.open_nursery() as n:
                    n.start_soon(self._stopper, ws, sid)
                    while not (self.frames and self.frames[-1][1] == "exit"):
                        msg = protocol.decode(await ws.get_message(), max_items=10_000_000)
                        if msg.get("ev") == "in_ack" or msg.get("id", 0) > 100:
                            continue  # the ack of "stop"; ping replies
                        assert msg.get("ev") == "out" and msg["session"] == sid, msg
                        self.frames += msg["frames"]
                        self.started.set()
                    n.cancel_scope.cancel()
            finally:
                await close_ws(ws)

    async def _stopper(self, ws: Any, sid: str) -> None:
        rid = 100
        while not self.stop.is_set():
            with trio.move_on_after(1):
                await self.stop.wait()
            rid += 1
            await ws.send_message(cbor2.dumps({"op": "ping", "id": rid}))  # not idle
        await ws.send_message(cbor2.dumps({"op": "input", "session": sid, "seq": 1, "data": 0}))

    def check(self) -> int:
        frames = self.frames
        assert frames and frames[-1][1] == "exit", frames[-3:]
        assert [f[0] for f in frames] == list(range(1, len(frames) + 1))
        ex = frames[-1][2]
        assert ex["state"] == "exited" and ex["code"] == 0, ex
        text = b"".join(f[2] for f in frames if f[1] == "stdout")
        assert text == b"".join(b"%d\n" % i for i in range(ex["result"]))
        assert all(f[1] in ("stdout", "exit") for f in frames)
        return ex["result"]


async def start_victims(url: str, fuzz: LiveFuzz, n: int = 3) -> None:
    """Sessions whose tokens the fuzz uses in its requests (attach, input, destroy...)."""
    async with open_websocket_url(url) as ws:
        await ws.send_message(cbor2.dumps({"op": "hello", "id": 0, "proto": 1}))
        await ws.get_message()
        for k in range(n):
            await ws.send_message(cbor2.dumps({"op": "execute", "id": k + 1, "code": VICTIM,
                                               "attach": False}))
            r = protocol.decode(await ws.get_message())
            assert r["ok"], r
            fuzz.share(r["token"], r["session"])
            fuzz.share(r["viewer_token"], r["session"])


async def fresh_hello_execute(url: str) -> None:
    async with open_websocket_url(url) as ws:
        await ws.send_message(cbor2.dumps({"op": "hello", "id": 0, "proto": 1}))
        assert protocol.decode(await ws.get_message())["ok"]
        await ws.send_message(cbor2.dumps({"op": "execute", "id": 1, "args": [20],
                                           "code": "def main(x):\n    return x + 1\n"}))
        assert protocol.decode(await ws.get_message())["ok"]
        while True:
            msg = protocol.decode(await ws.get_message())
            if msg.get("ev") == "out" and msg["frames"][-1][1] == "exit":
                assert msg["frames"][-1][2]["result"] == 21
                return


async def fuzz_server(srv: Any, fuzz: LiveFuzz, timeout: float,
                      drive: Any = None) -> tuple[int, str]:
    """Run ``fuzz`` (or ``drive``) against ``srv`` with a control session and
    victims; then check the server. Returns (control lines, the server's log
    meanwhile); findings go to ``fuzz``."""
    log_start = len(srv.read_log())
    control = Control(srv.url)
    with trio.fail_after(timeout):
        async with trio.open_nursery() as n:
            n.start_soon(control.run)
            with trio.fail_after(20):
                await control.started.wait()
            await start_victims(srv.url, fuzz)
            await (drive or fuzz.run)()
            control.stop.set()
        lines = control.check()
        if srv.proc.poll() is not None:
            fuzz.finding(f"the server process exited with {srv.proc.returncode}")
        await fresh_hello_execute(srv.url)
    log = srv.read_log()[log_start:]
    if "Traceback" in log:
        fuzz.finding("the server logged a traceback: " + log[log.index("Traceback") - 300:][:3000])
    return lines, log


async def test_live_fuzz_random_messages(make_server):
    srv = make_server(*SERVER_ARGS)
    fuzz = LiveFuzz(srv.url, seed=2026, cases=1500, workers=6, max_executes=20)
    lines, _ = await fuzz_server(srv, fuzz, timeout=90)
    st_ = fuzz.stats
    print(f"\nlive fuzz: {st_.cases} cases on {st_.connections} connections; closes "
          f"{dict(st_.closes)}; replies {dict(st_.replies)}; events {dict(st_.events)}; "
          f"{st_.executed} sessions started (and destroyed); control session {lines} lines "
          f"exactly once; {len(fuzz.findings)} findings")
    assert not fuzz.findings, "\n".join(fuzz.findings[:20])
    assert st_.closes[1002] > 50 and st_.replies["bad_request"] > 100 and st_.replies["ok"] > 100


async def test_live_fuzz_hypothesis(make_server):
    """hypothesis drives the messages (valid-looking requests, mutated ones, raw
    bytes); each example is one connection. hypothesis runs in a worker thread and
    each example's I/O runs in this trio loop, so the control session streams
    across all examples."""
    srv = make_server(*SERVER_ARGS)
    fuzz = LiveFuzz(srv.url, seed=7, cases=0)
    examples = 0

    async def one(messages: list[bytes]) -> None:
        nonlocal examples
        examples += 1
        fuzz.stats.connections += 1
        async with open_websocket_url(srv.url, max_message_size=64 * 1024 * 1024) as ws:
            try:
                conn = Conn(fuzz, ws)
                await conn.step(cbor2.dumps({"op": "hello", "id": 0, "proto": 1}), count=False)
                for data in messages:
                    if conn.closed:
                        break
                    await conn.step(data)
                if not conn.closed:
                    await conn.sync()
                    conn.final_check()
            finally:
                await close_ws(ws)

    message = (requests().map(cbor2.dumps)
               | st.tuples(requests(), edits).map(lambda t: apply_edits(cbor2.dumps(t[0]), t[1]))
               | st.binary(max_size=40))

    @settings(max_examples=150, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(message, min_size=1, max_size=8))
    def drive(messages: list[bytes]) -> None:
        trio.from_thread.run(one, messages)

    async def run_hypothesis() -> None:
        await trio.to_thread.run_sync(drive)

    lines, _ = await fuzz_server(srv, fuzz, timeout=120, drive=run_hypothesis)
    print(f"\nlive hypothesis fuzz: {examples} examples, {fuzz.stats.cases} messages; closes "
          f"{dict(fuzz.stats.closes)}; replies {dict(fuzz.stats.replies)}; control {lines} lines")
    assert not fuzz.findings, "\n".join(fuzz.findings[:20])
    assert examples >= 150
