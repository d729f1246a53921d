"""Client chaos across two nodes: the chaos test of tests/reliability/test_chaos.py
(clients cut abruptly again and again - socket closed, RST, task cancelled -
in the handshake, with hello or attach in flight, or mid-stream, while the
owners keep sending input) with every new connection made to node A or node B
at random, and the functions run on node A.

The same audit at the end: every attachment saw exactly the session's log,
byte for byte, contiguous from the seq it asked for; every input reached the
function exactly once, in order.
"""

from __future__ import annotations

import random
import time
from typing import Any

import pytest
import trio
from helpers import connect
from reliability import test_chaos as chaos
from trio_websocket import open_websocket_url

SESSIONS = 6
TARGET_DISCONNECTS = 600
ATTACH_RETRY_S = 0.02
ATTACH_RETRIES = 100


class CrossChaos(chaos.Chaos):
    """The chaos, each connection to a node chosen at random."""

    def __init__(self, urls: list[str], port: int, rng: random.Random, target: int, acks: bool) -> None:
        super().__init__(urls[0], port, rng, target, acks)
        self.urls = urls
        self.by_node = {u: 0 for u in urls}
        self.attach_waits = 0  # attaches that came before the other node's mirror had the frames

    async def connection(self, s: Any, a: Any, life: Any, mode: str) -> None:
        url = self.rng.choice(self.urls)
        self.by_node[url] += 1
        with trio.fail_after(10 if life.stage else 30), life.scope:
            async with open_websocket_url(url, max_message_size=chaos.MAX_MESSAGE) as ws:
                try:
                    await self.attached(chaos.Conn(ws), s, a, life)
                finally:
                    if life.scope.cancel_called:
                        chaos.cut(ws, mode)
        assert not (life.stage is None and life.scope.cancelled_caught)

    async def request(self, c: Any, s: Any, a: Any, view: Any, op: str, **fields: Any) -> dict:
        """As the base, but an attach ``from`` beyond what the other node's mirror
        holds yet (a client that read further on the running node) is asked again
        a moment later: the documented answer there is ``bad_request`` for the few
        milliseconds the mirror runs behind."""
        if op != "attach":
            return await super().request(c, s, a, view, op, **fields)
        for _ in range(ATTACH_RETRIES):
            rid = c.next_id
            c.next_id += 1
            await c.send({"op": op, "id": rid, **fields})
            while True:
                msg, raw = await c.recv()
                if msg.get("id") == rid and "ev" not in msg:
                    break
                self.on_message(s, a, view, msg, raw)
            if msg["ok"]:
                return msg
            assert msg["error"]["code"] == "bad_request" and "beyond next_seq" in msg["error"]["message"], msg
            self.attach_waits += 1
            await trio.sleep(ATTACH_RETRY_S)
        raise AssertionError(f"{a.name}: attach from {fields['from']} refused for "
                             f"{ATTACH_RETRIES * ATTACH_RETRY_S:.0f} s")


@pytest.mark.parametrize("acks", [False, True], ids=["no-acks", "owner-acks"])
async def test_chaos_across_nodes(nodes, acks):
    """Without acks the reference is one clean read from 1 through node B; with
    the owner's acks (of what it has seen, sent through either node) the acked
    frames stay readable as history, so that read is the owner's own frames."""
    a, b = nodes
    rng = random.Random(14_2026 + acks)
    cc = CrossChaos([a.url, b.url], b.port, rng, TARGET_DISCONNECTS, acks)
    t0 = time.monotonic()
    sessions = []
    async with open_websocket_url(a.url, max_message_size=chaos.MAX_MESSAGE) as ws:
        c = chaos.Conn(ws)
        await c.send({"op": "hello", "id": 0, "proto": 1, "client": "chaos/1"})
        assert (await c.recv())[0]["ok"]
        for k in range(SESSIONS):
            await c.send({"op": "execute", "id": k + 1, "code": chaos.CHAOS_FN,
                          "args": [k, chaos.MAX_LINES], "attach": False})
            r = (await c.recv())[0]
            assert r["ok"], r
            s = chaos.Sess(r["session"], r["token"], r["viewer_token"])
            s.actors = [chaos.Actor(f"s{k}-owner", s.token, True)] + [
                chaos.Actor(f"s{k}-viewer{v}", s.viewer_token, False) for v in range(chaos.VIEWERS)]
            sessions.append(s)
    with trio.fail_after(150):
        async with trio.open_nursery() as n:
            for s in sessions:
                for actor in s.actors:
                    n.start_soon(cc.run_actor, s, actor)
    t_chaos = time.monotonic() - t0

    total_inputs = total_frames = 0
    for s in sessions:
        with trio.fail_after(30):
            log = await chaos.read_whole_log(b.url, s.token, s.sid)  # read through the other node
        if acks:
            owner = s.actors[0]
            assert log == [owner.seen[q] for q in range(1, owner.last + 1)]
        total_frames += len(log)
        total_inputs += chaos.audit(s, log)
    st = cc.stats
    print(f"\nchaos across nodes ({'owner acks' if acks else 'no acks'}): {SESSIONS} sessions x {1 + chaos.VIEWERS} clients, "
          f"{st.disconnects} abrupt disconnects {dict(st.modes)}, connections per node "
          f"{list(cc.by_node.values())}, {st.rewinds} rewinds, {st.frames_received} frames received, "
          f"log {total_frames} frames, {total_inputs} inputs ({st.resent_inputs} re-sent), "
          f"{cc.attach_waits} attaches asked again; chaos phase {t_chaos:.1f} s")
    assert st.disconnects >= TARGET_DISCONNECTS and min(cc.by_node.values()) > 50
    assert st.rewinds >= 20 and st.resent_inputs > 0
    assert total_inputs >= chaos.MIN_INPUTS


BIG = "import sys\ndef main(n):\n    b = b'x' * 65536\n    for _ in range(n):\n        sys.stdout.buffer.write(b)\n"


async def test_acks_racing_a_destroy_through_the_other_node_leave_the_node_up(nodes):
    """The owner reads through node B, acking every batch, and destroys the
    session on node A as soon as the exit frame arrives: acks still in node A's
    control stream then meet a session whose directory is going away. Node A
    answers on."""
    a, b = nodes
    async with connect(a.url) as ca, connect(b.url) as cb:
        for _ in range(12):
            r = await ca.ok("execute", code=BIG, args=[40], attach=False)
            await cb.ok("attach", token=r["token"], **{"from": 1})
            frames: list = []
            while not frames or frames[-1][1] != "exit":
                ev = await cb.event(ev="out", session=r["session"], timeout=30)
                frames += ev["frames"]
                await cb.send({"op": "ack", "session": r["session"], "seq": frames[-1][0]})
            await ca.ok("destroy", token=r["token"])  # on A: it overtakes the acks queued for A
        # Both nodes still serve.
        for c in (ca, cb):
            r = await c.ok("execute", code="def main():\n    return 1\n")
            assert (await c.frames(r["session"]))[-1][2]["result"] == 1
    assert a.proc.poll() is None and b.proc.poll() is None
