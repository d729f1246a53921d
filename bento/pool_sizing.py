"""How many warm environments to keep ready: a pure rule over recent executes.

An environment taken from the pool is replaced by a fresh one (never reused),
which takes ``refill_s`` to come up. At ``rate`` executes a second, about
``rate * refill_s`` are taken while one is being made, so the pool keeps its
floor (``--pool``) plus that many, at most ``--pool-max``. The rate is the
higher of the last second's and the last ``LONG_S``'s: a burst grows the pool
within a second, and an idle pool shrinks back to its floor over ``LONG_S``
(each warm environment holds memory: docs/operations.md).

No clock of its own: every call is given ``now`` (trio's clock in the server,
a fake one in the tests).
"""

from __future__ import annotations

import math
import os
import statistics
from collections import deque

SHORT_S = 1.0  # a burst counts within this window
LONG_S = 30.0  # an idle pool is back at its floor this long after the last execute
REFILL_GUESS_S = 0.2  # a warm environment's start before one was measured
REFILL_SAMPLES = 8  # recent starts the refill time is the median of
ENV_BYTES = 32 * 1024 * 1024  # what one warm environment holds (RSS of exchange + sandbox, rounded up)
MAX_PER_CORE = 4
MAX_RAM_SHARE = 64  # warm environments take at most 1/64 of RAM by default
MAX_ANYWAY = 32


def rate(times: deque[float] | list[float], now: float) -> float:
    """Executes per second: the higher of the last SHORT_S's and the last LONG_S's."""
    short = sum(1 for t in times if now - SHORT_S < t <= now) / SHORT_S
    long = sum(1 for t in times if now - LONG_S < t <= now) / LONG_S
    return max(short, long)


def target(times: deque[float] | list[float], now: float, floor: int, maximum: int, refill_s: float) -> int:
    """Warm environments to keep ready: ``floor`` plus what ``rate`` takes while
    one is made, never more than ``maximum`` (nor less than ``floor``)."""
    want = floor + math.ceil(rate(times, now) * refill_s)
    return max(floor, min(want, maximum))


def default_maximum(floor: int, cores: int | None = None, ram_bytes: int | None = None) -> int:
    """``--pool-max`` when not given: 4 per core, at most 1/64 of RAM at
    ENV_BYTES each, at most 32, and never below the floor."""
    cores = cores or os.cpu_count() or 1
    if ram_bytes is None:
        try:
            ram_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            ram_bytes = 0
    by_ram = ram_bytes // MAX_RAM_SHARE // ENV_BYTES if ram_bytes else MAX_ANYWAY
    return max(floor, min(MAX_PER_CORE * cores, by_ram, MAX_ANYWAY))


class PoolSizing:
    """The recent executes and environment starts the rule reads (``target``)."""

    def __init__(self, floor: int, maximum: int) -> None:
        self.floor = floor
        self.maximum = max(floor, maximum)
        self.times: deque[float] = deque()
        self.starts: deque[float] = deque(maxlen=REFILL_SAMPLES)

    def executed(self, now: float) -> None:
        """An execute asked for a warm environment (found one or not)."""
        self.times.append(now)
        while self.times and self.times[0] <= now - LONG_S:
            self.times.popleft()

    def started(self, seconds: float) -> None:
        """A warm environment took ``seconds`` to come up."""
        self.starts.append(seconds)

    @property
    def refill_s(self) -> float:
        return statistics.median(self.starts) if self.starts else REFILL_GUESS_S

    def target(self, now: float) -> int:
        return target(self.times, now, self.floor, self.maximum, self.refill_s)

    def rate(self, now: float) -> float:
        return rate(self.times, now)
