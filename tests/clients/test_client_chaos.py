"""The SDK across dropped connections: a proxy between SDK and server cuts the
transport again and again, at random points, while output streams and input
is in flight. Every frame must reach the user exactly once, in order, and
every input must reach the function exactly once."""

from __future__ import annotations

import random

import bento_clients
import pytest
import trio
from bento_clients.frames import Exit, Gap, Msg, Stdout
from client_helpers import line_numbers
from proxy import Proxy

# Prints numbered lines without pause and echoes every input it receives
# (api.send) until its input is closed; returns what it received.
STREAM_AND_ECHO = """
import time
def main():
    got = []
    i = 0
    while True:
        print(f"line {i}", flush=True)
        i += 1
        while api.poll():
            try:
                v = api.recv()
            except EOFError:
                return {"lines": i, "got": got}
            got.append(v)
            api.send(v)
        time.sleep(0.002)
"""


async def test_fifty_cuts_exactly_once(server, caplog):
    with trio.fail_after(60):
        rng = random.Random(20261122)
        n_cuts = 55
        async with trio.open_nursery() as outer:
            proxy = Proxy(server.port)
            await outer.start(proxy.run)
            url = f"ws://127.0.0.1:{proxy.port}/v1"
            async with bento_clients.connect(url, reconnect_timeout=20, backoff_base=0.01, backoff_max=0.1) as c:
                s = await c.execute(STREAM_AND_ECHO)
                frames: list = []
                sent: list[int] = []
                cutting_done = trio.Event()
                statuses = 0
                live_cuts = 0

                async def consume() -> None:
                    async for frame in s.output():
                        frames.append(frame)

                async def produce() -> None:
                    i = 0
                    while not cutting_done.is_set():
                        await s.send(i)
                        sent.append(i)
                        i += 1
                        await trio.sleep(rng.uniform(0, 0.02))
                    await s.close_input()

                async def chaos() -> None:
                    # Cut live connections at random points; now and then also cut
                    # the reconnect itself: at a random moment (TCP connect, the
                    # WebSocket handshake ...) or right after the server's 2nd-4th
                    # answer (hello, re-attach, re-sent input).
                    # Goes on past n_cuts until five reconnects were cut early:
                    # whether a reconnect reaches its 2nd-4th answer before the
                    # next live cut depends on the machine's timing.
                    nonlocal live_cuts
                    while live_cuts < n_cuts or proxy.early_cuts < 5:
                        while not c.connected:
                            await trio.sleep(0.002)
                        await trio.sleep(rng.uniform(0.02, 0.12))
                        early = rng.random()
                        if early < 0.2 or live_cuts >= n_cuts:
                            proxy.cut_next_after = rng.choice([2, 3, 4])
                        if c.connected and proxy.cut():
                            live_cuts += 1
                        if early > 0.8:
                            await trio.sleep(rng.uniform(0, 0.02))
                            proxy.cut()
                    cutting_done.set()

                async def requests() -> None:
                    # Requests in flight during cuts are retried (status is idempotent).
                    nonlocal statuses
                    while not cutting_done.is_set():
                        st = await s.status()
                        assert st["session"] == s.id
                        statuses += 1
                        await trio.sleep(rng.uniform(0, 0.05))

                with trio.fail_after(45):
                    async with trio.open_nursery() as n:
                        n.start_soon(consume)
                        n.start_soon(produce)
                        n.start_soon(chaos)
                        n.start_soon(requests)
                    result = await s.result()
                reconnects = c.reconnects
                stats = s.statistics()
            outer.cancel_scope.cancel()

        assert live_cuts >= 50 and reconnects >= 50 and proxy.early_cuts >= 5, (
            live_cuts, reconnects, proxy.early_cuts)
        assert statuses > 0
        # The user-visible event: one log line per drop and one per reconnect.
        said = [r.getMessage() for r in caplog.records if r.name == "bento.client"]
        assert sum("reconnected to" in m for m in said) == reconnects
        assert sum("lost" in m and "reconnecting" in m for m in said) >= reconnects
        # Frames: seqs 1..n with no gap and no repeat, the exit frame last.
        assert [f.seq for f in frames] == list(range(1, len(frames) + 1))
        assert not any(isinstance(f, Gap) for f in frames)
        assert isinstance(frames[-1], Exit) and frames[-1].ok
        assert stats["duplicates"] == 0 and stats["holes"] == 0
        # Output: every line once, in order.
        text = b"".join(f.data for f in frames if isinstance(f, Stdout)).decode()
        assert text == "".join(f"line {i}\n" for i in range(result["lines"]))
        # Input: every value reached the function once, in order (echoed back in order too).
        assert result["got"] == sent
        assert [f.value for f in frames if isinstance(f, Msg)] == sent
        assert len(sent) > 100


async def test_execute_retried_with_its_idempotency_key_starts_one_function(server):
    """The reply to execute is lost with the connection: the SDK retries with the
    same (generated) idempotency key and gets the same session."""
    with trio.fail_after(60):
        async with trio.open_nursery() as outer:
            proxy = Proxy(server.port)
            await outer.start(proxy.run)
            url = f"ws://127.0.0.1:{proxy.port}/v1"
            async with bento_clients.connect(url, reconnect_timeout=10, backoff_base=0.01) as c:
                before = {st["session"] for st in await c.list()}
                proxy.hold = True  # the execute reaches the server; its reply does not come back
                made: list = []
                async with trio.open_nursery() as n:
                    async def run() -> None:
                        made.append(await c.execute("import os\ndef main():\n    print(os.getpid())\n    return 5\n"))
                    n.start_soon(run)
                    await trio.sleep(1.0)
                    assert not made
                    assert proxy.cut() >= 1
                s = made[0]
                assert await s.result() == 5
                after = {st["session"] for st in await c.list()}
            outer.cancel_scope.cancel()
        assert after - before == {s.id}


@pytest.mark.parametrize("op", ["signal", "state_put"])
async def test_unsafe_request_in_flight_fails_clearly(server, op):
    """signal and state_put are not repeated after a drop: RequestInterrupted."""
    with trio.fail_after(60):
        async with trio.open_nursery() as outer:
            proxy = Proxy(server.port)
            await outer.start(proxy.run)
            url = f"ws://127.0.0.1:{proxy.port}/v1"
            async with bento_clients.connect(url, reconnect_timeout=10, backoff_base=0.01) as c:
                s = await c.execute("import time\ndef main():\n    time.sleep(20)\n")
                proxy.hold = True

                async def cut_soon() -> None:
                    await trio.sleep(0.5)
                    proxy.cut()

                outer.start_soon(cut_soon)
                with pytest.raises(bento_clients.RequestInterrupted, match=op), trio.fail_after(10):
                    if op == "signal":
                        await s.signal("TERM")
                    else:
                        await s.state_put({"x": 1})
                # The client reconnected by itself and works.
                with trio.fail_after(10):
                    st = await s.status()
                assert st["session"] == s.id
                await s.destroy()
            outer.cancel_scope.cancel()


# Writes numbered 32 KiB lines, as fast as it may, then takes three inputs.
LINE_BYTES = 32 * 1024 - 4  # "%10d %s\n" with the pad below
PAGES = """
def main(n):
    pad = "p" * (32 * 1024 - 16)
    for i in range(n):
        print(f"{i:>10} {pad}", flush=True)
    return [api.recv() for _ in range(3)]
"""


async def test_pauses_and_cuts_exactly_once(server):
    """A slow reader with a small max_queued_bytes pauses and resumes again and again
    while the transport is cut: every line exactly once, in order, and every input
    exactly once, some of them sent while paused (held, then sent on resume)."""
    with trio.fail_after(90):
        rng = random.Random(20261123)
        n_lines = 512  # 16 MiB
        async with trio.open_nursery() as outer:
            proxy = Proxy(server.port)
            await outer.start(proxy.run)
            url = f"ws://127.0.0.1:{proxy.port}/v1"
            async with bento_clients.connect(url, reconnect_timeout=20, backoff_base=0.01, backoff_max=0.1,
                                     max_queued_bytes=256 * 1024) as c:
                s = await c.execute(PAGES, n_lines, buffer={"policy": "block", "max_bytes": 4 << 20})
                cuts = 0
                most = 0

                async def cutter() -> None:
                    nonlocal cuts
                    for _ in range(12):
                        await trio.sleep(rng.uniform(0.05, 0.25))
                        cuts += proxy.cut() > 0

                frames = []
                sent = sent_paused = 0
                all_lines = trio.Event()

                async def rest_of_inputs() -> None:
                    # What was not sent during a pause goes once every line is in
                    # (the function asks for its inputs after its last line).
                    nonlocal sent
                    await all_lines.wait()
                    while sent < 3:
                        await s.send(sent)
                        sent += 1

                async with trio.open_nursery() as n:
                    n.start_soon(cutter)
                    n.start_soon(rest_of_inputs)
                    got = 0
                    async for frame in s.output():
                        frames.append(frame)
                        most = max(most, s.statistics()["queued_bytes"])
                        if s.paused and sent < 3 and frame.seq % 7 == 0:
                            await s.send(sent)  # held by the client until the pause ends
                            sent += 1
                            sent_paused += 1
                        if isinstance(frame, Stdout):
                            got += len(frame.data)
                            if got >= n_lines * LINE_BYTES:
                                all_lines.set()
                        if rng.random() < 0.05:
                            await trio.sleep(0.01)  # a reader that falls behind now and then
                assert await s.result() == [0, 1, 2]
                assert sent_paused >= 1, sent_paused
                stats = s.statistics()
            outer.cancel_scope.cancel()
        assert cuts >= 5 and stats["pauses"] >= 3, (cuts, stats)
        assert most <= 256 * 1024 + (2 << 20), most
        assert [f.seq for f in frames] == list(range(1, len(frames) + 1))
        assert not [f for f in frames if isinstance(f, Gap)]
        assert line_numbers(frames) == list(range(n_lines))
        assert isinstance(frames[-1], Exit)


# input() in a loop: each line it reads is echoed back as a message.
INPUT_LOOP = """
def main():
    got = []
    while True:
        try:
            line = input()
        except EOFError:
            return got
        got.append(line)
        api.send(line)
"""


async def test_stdin_lines_exactly_once_across_cuts(server):
    with trio.fail_after(60):
        rng = random.Random(20261204)
        async with trio.open_nursery() as outer:
            proxy = Proxy(server.port)
            await outer.start(proxy.run)
            url = f"ws://127.0.0.1:{proxy.port}/v1"
            async with bento_clients.connect(url, reconnect_timeout=20, backoff_base=0.01, backoff_max=0.1) as c:
                s = await c.execute(INPUT_LOOP)
                lines = [f"line {i}" for i in range(60)]
                for i, line in enumerate(lines):
                    # Some lines in two writes: the function still sees one line.
                    if i % 3 == 0:
                        await s.write_stdin(line[:3])
                        await s.write_stdin(line[3:] + "\n")
                    else:
                        await s.write_stdin(line + "\n")
                    if i % 6 == 5:
                        while not c.connected:
                            await trio.sleep(0.002)
                        proxy.cut()
                        await trio.sleep(rng.uniform(0, 0.02))
                await s.close_stdin()
                frames = [f async for f in s.output()]
                assert await s.result() == lines
            outer.cancel_scope.cancel()
    assert [f.value for f in frames if isinstance(f, Msg)] == lines
