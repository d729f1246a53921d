"""Admission control: may the server start one more function, and for whom.

Pure code, like bento/session_core.py: it never does I/O and never reads a
clock (callers pass ``now``, in monotonic seconds, and the data dir's free
bytes). The server (bento/gate.py) is the thin layer that reads the disk and
the clock and waits.

Two kinds of refusal, kept apart because a client answers them differently:
- ``busy``: the *server* is full (running functions, the memory budget, the
  disk floor). It says ``retry_after``; an execute may instead wait in the
  queue for capacity.
- ``quota``: the *key* used its share (concurrent sessions, executes per
  minute, retained history bytes, environments built). It names the quota;
  waiting in the queue does not help, so a quota refusal is never queued.

Every key has the default quota (``Quotas.default``) unless the config file
gives it its own (``Quotas.by_key``, by key hash); a reload replaces both.

The queue is a bounded FIFO, fair between keys: waiters are served in rounds,
the first waiter of every key (in arrival order), then the second of every
key, and so on, so one key's burst cannot push another key's single execute
to the back. Each waiter gets a round number when it arrives (start-time fair
queueing): one past its key's previous waiter, and never below the round
being served, so a key that arrives late joins the current round instead of
jumping every earlier waiter. Only the head is admitted: a head that does not
fit yet holds the queue, so no big execute starves behind small ones.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

# What a busy answer suggests when nothing says better: capacity frees up
# when a running function ends, which nothing here can foresee.
BUSY_RETRY_S = 1.0


@dataclass(frozen=True)
class Capacity:
    """The server-wide limits. ``memory_budget`` bounds the sum of the running
    sessions' memory limits; below ``disk_floor`` free bytes in the data dir no
    new function starts (running ones keep writing: nothing accepted is lost)."""

    max_running: int
    memory_budget: int
    disk_floor: int
    default_memory: int  # what a session without a memory limit counts
    max_queued: int = 1024


@dataclass(frozen=True)
class Quota:
    """What one API key may use; None is no limit. ``environments``: package
    environments the key's executes built that exist now (ready, or being built
    by a running function of the key); an execute whose packages are ready, or
    being built by a running function, builds none."""

    sessions: int | None = None
    executes_per_minute: float | None = None
    history_bytes: int | None = None
    environments: int | None = None


QUOTA_NAMES = ("sessions", "executes_per_minute", "history_bytes", "environments")


@dataclass
class Quotas:
    """Every key's quota: ``default``, or the key's own in ``by_key`` (by key
    hash). Shared by the config and the admission; a reload calls ``replace``."""

    default: Quota = field(default_factory=Quota)
    by_key: dict[str, Quota] = field(default_factory=dict)

    def of(self, key: str) -> Quota:
        return self.by_key.get(key, self.default)

    def replace(self, default: Quota, by_key: dict[str, Quota]) -> None:
        self.default, self.by_key = default, dict(by_key)


class Refused(Exception):
    """An execute that may not start: ``code`` is ``busy`` or ``quota``; ``limit``
    names what was hit; ``retry_after`` is seconds (None: waiting does not help)."""

    def __init__(self, code: str, limit: str, message: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.code = code
        self.limit = limit
        self.message = message
        self.retry_after = retry_after

    def fields(self) -> dict:
        """The error's extra fields on the wire."""
        out: dict = {"busy" if self.code == "busy" else "quota": self.limit}
        if self.retry_after is not None:
            out["retry_after"] = round(self.retry_after, 3)
        return out


@dataclass
class Bucket:
    """A token bucket: ``rate`` per minute, holding at most ``rate`` tokens."""

    level: float
    at: float

    def take(self, rate: float, now: float) -> float:
        """Take one token; 0.0 if taken, else the seconds until one is there."""
        self.level = min(rate, self.level + (now - self.at) * rate / 60.0)
        self.at = now
        if self.level >= 1.0:
            self.level -= 1.0
            return 0.0
        return (1.0 - self.level) * 60.0 / rate


@dataclass(eq=False)
class Ticket:
    """One admitted (or waiting) execute: who, how much memory it holds, and the
    environment it builds (None: no packages, or their environment is there)."""

    key: str
    memory: int
    arrival: int
    env: str | None = None
    round: int = 0  # its round in the queue (see the module's docstring)
    admitted: bool = False


@dataclass
class KeyUsage:
    running: int = 0
    memory: int = 0
    executes: int = 0


@dataclass
class Admission:
    """The accounting: who runs, how much memory is committed, the buckets, the
    environments each key built, the queue."""

    capacity: Capacity
    quotas: Quotas = field(default_factory=Quotas)
    running: set[Ticket] = field(default_factory=set)
    memory: int = 0
    usage: dict[str, KeyUsage] = field(default_factory=dict)
    buckets: dict[str, Bucket] = field(default_factory=dict)
    built: dict[str, set[str]] = field(default_factory=dict)  # environment names, by key
    waiting: list[Ticket] = field(default_factory=list)
    serving: int = 0  # the round of the last waiter admitted
    last_round: dict[str, int] = field(default_factory=dict)  # of each key with waiters
    _arrivals: itertools.count = field(default_factory=itertools.count)

    def quota_for(self, key: str) -> Quota:
        return self.quotas.of(key)

    def memory_of(self, limits: dict) -> int:
        """What a session with these limits counts against the budget."""
        asked = limits.get("memory_bytes")
        return int(asked) if asked else self.capacity.default_memory

    # -- the checks ----------------------------------------------------------

    def check_quota(self, key: str, now: float, history_bytes: int, environments: int | None = None) -> None:
        """Raise Refused("quota") if ``key`` may not start one more function now.
        ``environments``: how many environments the key holds, when this execute
        builds one more (None: it builds none). Takes one token from the key's
        execute bucket when it passes."""
        q = self.quota_for(key)
        used = self.usage.get(key, KeyUsage())
        if q.sessions is not None and used.running >= q.sessions:
            raise Refused("quota", "sessions", f"this key runs {used.running} functions, its quota "
                          f"of concurrent sessions is {q.sessions}: wait for one to end", None)
        if q.history_bytes is not None and history_bytes >= q.history_bytes:
            raise Refused("quota", "history_bytes", f"this key's sessions retain {history_bytes} bytes "
                          f"of output (unacknowledged and history), its quota is {q.history_bytes}: "
                          "destroy ended sessions, or wait for their keep period", None)
        if q.environments is not None and environments is not None and environments >= q.environments:
            raise Refused("quota", "environments", f"these packages are not built on this server, and "
                          f"this key holds {environments} environments it built, its quota is "
                          f"{q.environments}: use packages it built already, or remove one "
                          "(`bento env rm`)", None)
        rate = q.executes_per_minute
        if rate is not None:
            bucket = self.buckets.setdefault(key, Bucket(level=rate, at=now))
            wait = bucket.take(rate, now) if rate > 0 else math.inf
            if wait:
                raise Refused("quota", "executes_per_minute", f"this key may start {rate:g} executes "
                              "per minute", None if math.isinf(wait) else wait)

    def builds(self, env: str | None, ready: Callable[[str], bool]) -> bool:
        """Whether an execute with environment ``env`` builds it: it is not
        ``ready`` and no running function builds it now."""
        return env is not None and not ready(env) and not any(t.env == env for t in self.running)

    def environments(self, key: str, ready: Callable[[str], bool]) -> int:
        """The environments ``key``'s executes built that exist now: ready, or
        being built by its running functions. Forgets the others (evicted,
        removed, or a build that failed)."""
        building = {t.env for t in self.running if t.key == key and t.env is not None}
        kept = {name for name in self.built.get(key, ()) if name in building or ready(name)}
        if kept:
            self.built[key] = kept
        else:
            self.built.pop(key, None)
        return len(kept)

    def refund(self, key: str) -> None:
        """Give back the execute token ``check_quota`` took (the execute did not start)."""
        bucket = self.buckets.get(key)
        rate = self.quota_for(key).executes_per_minute
        if bucket is not None and rate:
            bucket.level = min(rate, bucket.level + 1.0)

    def check_capacity(self, memory: int, disk_free: int) -> None:
        """Raise Refused("busy") if the server cannot hold one more function of ``memory`` now."""
        cap = self.capacity
        if disk_free < cap.disk_floor:
            raise Refused("busy", "disk", f"the data dir has {disk_free} bytes free, below the floor of "
                          f"{cap.disk_floor}: new executes wait until space is freed", BUSY_RETRY_S * 10)
        self._check_fits(memory)

    def _check_fits(self, memory: int) -> None:
        cap = self.capacity
        if len(self.running) >= cap.max_running:
            raise Refused("busy", "sessions", f"the server runs {len(self.running)} functions, its "
                          f"maximum (--max-sessions {cap.max_running})", BUSY_RETRY_S)
        if memory > cap.memory_budget:
            raise Refused("busy", "memory", f"a memory limit of {memory} bytes is more than this server's "
                          f"whole memory budget ({cap.memory_budget}): ask for less", None)
        if self.memory + memory > cap.memory_budget:
            raise Refused("busy", "memory", f"running functions hold {self.memory} of the memory budget "
                          f"of {cap.memory_budget} bytes; this one asks {memory}", BUSY_RETRY_S)

    def fits(self, memory: int) -> bool:
        try:
            self._check_fits(memory)
        except Refused:
            return False
        return True

    # -- running functions ------------------------------------------------------

    def ticket(self, key: str, memory: int, env: str | None = None) -> Ticket:
        return Ticket(key=key, memory=memory, arrival=next(self._arrivals), env=env)

    def admit(self, t: Ticket) -> None:
        """Count ``t`` as running (checked or not: a recovered session is admitted as it is)."""
        if t.admitted:
            return
        t.admitted = True
        self.running.add(t)
        self.memory += t.memory
        used = self.usage.setdefault(t.key, KeyUsage())
        used.running += 1
        used.memory += t.memory
        used.executes += 1
        if t.env is not None:
            self.built.setdefault(t.key, set()).add(t.env)

    def release(self, t: Ticket) -> None:
        """``t``'s function ended (or never started): free what it held. Idempotent."""
        if t not in self.running:
            return
        self.running.discard(t)
        self.memory -= t.memory
        used = self.usage[t.key]
        used.running -= 1
        used.memory -= t.memory

    # -- the queue ------------------------------------------------------------

    def enqueue(self, t: Ticket) -> int:
        """Put ``t`` in the queue; its position (1 = next). Busy when the queue is full."""
        if len(self.waiting) >= self.capacity.max_queued:
            raise Refused("busy", "queue", f"its queue is full: {len(self.waiting)} executes already wait "
                          f"(--max-queued {self.capacity.max_queued})", BUSY_RETRY_S)
        t.round = max(self.serving, self.last_round.get(t.key, 0)) + 1
        self.last_round[t.key] = t.round
        self.waiting.append(t)
        self.waiting.sort(key=lambda w: (w.round, w.arrival))
        return self.position(t)

    def position(self, t: Ticket) -> int:
        return self.waiting.index(t) + 1

    def leave(self, t: Ticket) -> None:
        """``t`` stops waiting (admitted, timed out or cancelled): the rest move up."""
        if t not in self.waiting:
            return
        self.waiting.remove(t)
        if not any(w.key == t.key for w in self.waiting):
            self.last_round.pop(t.key, None)

    def next_admitted(self, disk_free: int) -> Ticket | None:
        """The head of the queue, admitted, if it fits now; else None."""
        if not self.waiting or disk_free < self.capacity.disk_floor:
            return None
        head = self.waiting[0]
        if not self.fits(head.memory):
            return None
        self.leave(head)
        self.serving = max(self.serving, head.round)
        self.admit(head)
        return head

    # -- figures ----------------------------------------------------------------

    def statistics(self) -> dict:
        cap = self.capacity
        return {"running": len(self.running), "max_running": cap.max_running, "memory": self.memory,
                "memory_budget": cap.memory_budget, "disk_floor": cap.disk_floor,
                "queued": len(self.waiting), "max_queued": cap.max_queued}


def key_id(key_hash: str) -> str:
    """A key's short id for logs and figures: never the key, only a prefix of its hash."""
    return key_hash[:12] if key_hash else "-"


def default_capacity(mem_total: int, disk_total: int, default_memory: int | None) -> Capacity:
    """Defaults from the machine: a memory budget of 3/4 of its RAM; at most one
    running function per 64 MiB of RAM (what a session costs with no memory
    use of its own, with room to spare); a disk floor of 5% of the data dir's
    file system, at most 1 GiB."""
    return Capacity(
        max_running=max(1, mem_total // (64 << 20)),
        memory_budget=mem_total * 3 // 4,
        disk_floor=min(1 << 30, disk_total // 20),
        default_memory=default_memory or (1 << 30),
    )


def with_settings(cap: Capacity, **given: int | None) -> Capacity:
    """``cap`` with the settings that were given (None: keep the default).
    Raises ValueError for a negative one, or fewer than one running function."""
    for name, value in given.items():
        if value is not None and (value < 0 or (name == "max_running" and value < 1)):
            raise ValueError(f"{name} cannot be {value}")
    return replace(cap, **{k: v for k, v in given.items() if v is not None})

