"""The warm pool's size rule (bento/pool_sizing.py): a pure function of the
recent executes' times and the time a warm environment takes to come up,
read against a fake clock (plain numbers)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import trio

from bento import pool_sizing
from bento.exchanges import Exchanges
from bento.pool_sizing import LONG_S, SHORT_S, PoolSizing, default_maximum, rate, target


def paced(rate_per_s: float, seconds: float, start: float = 0.0) -> list[float]:
    n = round(rate_per_s * seconds)
    return [start + i / rate_per_s for i in range(n)]


def test_without_executes_the_pool_stays_at_its_floor():
    assert target([], now=100.0, floor=2, maximum=8, refill_s=0.2) == 2
    assert target([], now=0.0, floor=0, maximum=8, refill_s=0.2) == 0


def test_a_steady_rate_keeps_what_it_takes_while_one_is_made():
    times = paced(20, 10)  # 20/s for 10 s
    now = times[-1]
    assert rate(times, now) == pytest.approx(20, abs=1)
    # 20/s x 0.15 s = 3 taken while one comes up, on top of the floor of 2.
    assert target(times, now, floor=2, maximum=8, refill_s=0.15) == 5
    # A slower rate needs fewer.
    slow = paced(2, 10)
    assert target(slow, slow[-1], floor=2, maximum=8, refill_s=0.15) == 3


def test_the_maximum_holds_and_the_floor_too():
    times = paced(100, 5)
    assert target(times, times[-1], floor=2, maximum=6, refill_s=0.5) == 6
    # A maximum under the floor does not take the floor away.
    assert target(times, times[-1], floor=4, maximum=1, refill_s=0.5) == 4


def test_a_burst_grows_the_pool_within_a_second():
    burst = [50.0 + i * 0.02 for i in range(10)]  # 10 executes in 0.2 s after a quiet minute
    assert rate(burst, 50.5) == pytest.approx(10 / SHORT_S)
    assert target(burst, 50.5, floor=2, maximum=8, refill_s=0.2) == 4


def test_an_idle_pool_shrinks_back_to_its_floor():
    times = paced(20, 10)
    last = times[-1]
    grown = target(times, last, floor=2, maximum=8, refill_s=0.2)
    assert grown == 6
    # Past the burst window only the long window counts: 200 executes over 30 s.
    assert target(times, last + 2 * SHORT_S, floor=2, maximum=8, refill_s=0.2) == 4
    # Smaller as the executes leave the long window, and the floor once none is left in it.
    later = [target(times, last + t, floor=2, maximum=8, refill_s=0.2) for t in (5, 15, 25, LONG_S + 1)]
    assert later == sorted(later, reverse=True)
    assert later[-1] == 2


def test_the_sizing_keeps_only_the_long_window_and_the_median_start():
    s = PoolSizing(floor=2, maximum=8)
    assert s.refill_s == pool_sizing.REFILL_GUESS_S
    for t in paced(10, 100):
        s.executed(t)
    assert len(s.times) <= 10 * LONG_S + 1  # old executes are dropped as new ones come
    for seconds in (0.1, 0.1, 5.0, 0.1, 0.3):  # one slow start does not move the median
        s.started(seconds)
    assert s.refill_s == pytest.approx(0.1)
    assert s.target(now=99.95) == 2 + 1  # 10/s x 0.1 s
    assert s.target(now=99.95 + LONG_S + 1) == 2


def test_the_default_maximum_fits_the_machine():
    gib = 1024 ** 3
    assert default_maximum(2, cores=2, ram_bytes=24 * gib) == 8  # 4 per core
    assert default_maximum(2, cores=64, ram_bytes=1024 * gib) == 32  # at most 32
    # A small machine: 1/64 of 4 GiB is 64 MiB, two environments of 32 MiB.
    assert default_maximum(1, cores=8, ram_bytes=4 * gib) == 2
    assert default_maximum(3, cores=1, ram_bytes=1 * gib) == 3  # never under the floor


def exchanges(tmp_path, pool: int, pool_max: int) -> Exchanges:
    config = SimpleNamespace(data_dir=str(tmp_path), sandbox="none", sandbox_cmd=None, pool_size=pool,
                             pool_max=pool_max, pool_template=False, sandbox_template_renew_s=3600.0)
    return Exchanges(config, None)


class FakeLink:
    def __init__(self, name: str, closed: list[str]) -> None:
        self.name, self.home = name, None
        self.stream = SimpleNamespace(aclose=self.aclose)
        self.closed = closed

    async def aclose(self) -> None:
        self.closed.append(self.name)


async def test_the_keeper_grows_with_executes_starts_in_parallel_and_shrinks_when_idle(tmp_path,
                                                                                      autojump_clock):
    ex = exchanges(tmp_path, pool=1, pool_max=6)
    ex.parallel = 2
    made, closed = [], []
    running = 0
    most_at_once = 0

    async def spawn() -> FakeLink:
        nonlocal running, most_at_once
        running += 1
        most_at_once = max(most_at_once, running)
        await trio.sleep(0.2)  # every start takes 0.2 s: two at once make 10 a second
        running -= 1
        made.append(FakeLink(f"w{len(made)}", closed))
        return made[-1]

    ex._spawn_warm = spawn  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        ex.nursery = nursery
        nursery.start_soon(ex.pool_keeper)
        await trio.sleep(2)
        assert len(ex.warm) == 1 and most_at_once == 1  # the floor, one start
        # 8 executes a second for 4 s, each taking one (as take_warm does).
        found = []
        for _ in range(32):
            ex.sizing.executed(trio.current_time())
            found.append(bool(ex.warm))
            if ex.warm:
                ex.warm.pop(0)
            ex.warm_wanted.set()
            await trio.sleep(0.125)
        # 8-9 executes in the last second x (0.2 s start + the pause after a take)
        assert 1 + 2 <= ex.sizing.target(trio.current_time()) <= 1 + 3
        assert most_at_once == 2
        assert all(found[8:]), found  # once grown, every execute found one ready
        assert 1 + 2 <= len(ex.warm) + ex.starting <= 1 + 3  # (the target of the keeper's last look)
        # Idle: back to the floor once the executes left the long window, the extra ones closed.
        await trio.sleep(LONG_S + 2)
        assert len(ex.warm) == 1
        # Every one made was taken, closed, or is the one left: none handed out twice.
        assert closed and len(made) == sum(found) + len(closed) + len(ex.warm)
        nursery.cancel_scope.cancel()
