"""Shared pieces of the benchmark: statistics, rows, the table, machine info.

A ``Row`` is one line of the table: a figure (p50 and p90 over repeated runs),
the ceiling it is compared against (measured in the same run, on the same
machine), their ratio, and a target that is either met or not.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from bento import tcptune

MiB = 1024 * 1024
KiB = 1024


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (q in [0, 1]) of a non-empty sequence."""
    xs = sorted(values)
    if not xs:
        raise ValueError("no values")
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class Sample:
    """Repeated measurements of one quantity.

    ``higher_is_better`` decides which side is the tail: p90 is the 90th
    percentile for latencies and memory, the 10th percentile for rates (the
    figure 90% of the runs reached)."""

    values: list[float]
    higher_is_better: bool = False

    @property
    def p50(self) -> float:
        return statistics.median(self.values)

    @property
    def p90(self) -> float:
        return quantile(self.values, 0.1 if self.higher_is_better else 0.9)


@dataclass
class Row:
    key: str                      # stable machine name
    name: str                     # what the table shows
    unit: str
    p50: float | None = None
    p90: float | None = None
    n: int = 0                    # how many runs / samples
    ceiling: float | None = None
    ceiling_name: str = ""
    target: str = "-"             # human text, e.g. "p50 <= 5 ms"
    met: bool | None = None       # None: no target, or not measured
    error: str | None = None
    note: str = ""
    # Lower ratio is better for latencies/memory, higher for rates.
    higher_is_better: bool = False
    cpu: dict[str, float] | None = None  # CPU share per role while measured (cores)

    @property
    def ratio(self) -> float | None:
        if self.p50 is None or not self.ceiling:
            return None
        return self.p50 / self.ceiling

    def set(self, sample: Sample | list[float] | float) -> Row:
        if isinstance(sample, (int, float)):
            sample = Sample([float(sample)], self.higher_is_better)
        elif isinstance(sample, list):
            sample = Sample(sample, self.higher_is_better)
        if sample.values:
            self.p50, self.n = sample.p50, len(sample.values)
            self.p90 = sample.p90 if len(sample.values) > 1 else None
        return self

    def judge(self, check: Callable[[float], bool] | None) -> Row:
        if check is not None and self.p50 is not None and self.error is None:
            self.met = bool(check(self.p50))
        return self

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["ratio"] = self.ratio
        return d


def fmt_num(x: float | None) -> str:
    if x is None:
        return "-"
    if x == 0:
        return "0"
    a = abs(x)
    if a >= 100_000:
        return f"{x / 1000:,.0f}k"
    if a >= 1000:
        return f"{x:,.0f}"
    if a >= 100:
        return f"{x:.0f}"
    if a >= 10:
        return f"{x:.1f}"
    if a >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def fmt_ratio(r: float | None) -> str:
    if r is None:
        return "-"
    return f"{r:.2f}x" if r < 100 else f"{r:.0f}x"


COLUMNS = ("row", "unit", "p50", "p90", "n", "ceiling", "ratio", "target", "met?")


def table(rows: list[Row]) -> str:
    lines = []
    for r in rows:
        if r.error:
            met = "ERROR"
        elif r.met is None:
            met = "-"
        else:
            met = "met" if r.met else "NOT met"
        lines.append((r.name, r.unit, fmt_num(r.p50), fmt_num(r.p90), str(r.n) if r.n else "-",
                      fmt_num(r.ceiling), fmt_ratio(r.ratio), r.target, met))
    widths = [max(len(COLUMNS[i]), *(len(line[i]) for line in lines)) for i in range(len(COLUMNS))]
    right = {2, 3, 4, 5, 6}

    def render(cells: Sequence[str]) -> str:
        out = []
        for i, c in enumerate(cells):
            out.append(c.rjust(widths[i]) if i in right else c.ljust(widths[i]))
        return "  ".join(out).rstrip()

    sep = "  ".join("-" * w for w in widths)
    body = [render(COLUMNS), sep, *(render(line) for line in lines), sep]
    return "\n".join(body)


def footnotes(rows: list[Row]) -> str:
    out = []
    ceilings = {}
    for r in rows:
        if r.ceiling_name and r.ceiling is not None:
            ceilings.setdefault(r.ceiling_name, []).append(r.name)
    if ceilings:
        out.append("ceilings (measured in this run, same machine):")
        for name, used in ceilings.items():
            out.append(f"  {name}  <- {', '.join(used)}")
    notes = [(r.name, r.note) for r in rows if r.note]
    errs = [(r.name, r.error) for r in rows if r.error]
    if notes:
        out.append("notes:")
        out += [f"  {n}: {t}" for n, t in notes]
    if errs:
        out.append("errors:")
        out += [f"  {n}: {t}" for n, t in errs]
    return "\n".join(out)


LEGEND = (
    "p50 = median over the runs (n); p90 = the tail: 90th percentile for times and memory,\n"
    "10th percentile for rates (what 90% of the runs reached). ratio = p50 / ceiling.\n"
    "met? judges p50 against the target."
)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count() or 0
    mem_total = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem_total = int(line.split()[1]) * 1024
    except OSError:
        pass
    from importlib import metadata

    versions = {}
    for mod, dist in (("trio", "trio"), ("trio_websocket", "trio-websocket"), ("cbor2", "cbor2"),
                      ("psutil", "psutil")):
        try:
            versions[mod] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[mod] = "missing"
    return {
        "cores": os.cpu_count(),
        "cores_usable": affinity,
        "cpu": cpu_model(),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "memory_bytes": mem_total,
        "versions": versions,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "host": platform.node(),
        "loadavg_start": os.getloadavg(),
        "tcp_congestion": tcptune.system_default(),
    }


def machine_text(info: dict[str, Any], mode: str) -> str:
    mem = f"{info['memory_bytes'] / 2**30:.1f} GiB RAM" if info.get("memory_bytes") else "RAM ?"
    v = info["versions"]
    return "\n".join([
        f"Bento benchmark ({mode})  {info['date']}",
        f"machine: {info['cores']} cores ({info['cores_usable']} usable), {info['cpu']}, {mem}",
        f"kernel {info['kernel']}, {info['implementation']} {info['python']}, "
        f"trio {v['trio']}, trio-websocket {v['trio_websocket']}, cbor2 {v['cbor2']}",
        "client, server, exchanges, sandboxes and ceilings all run on this one machine and share its cores;",
        "every connection is loopback. Load average (1/5/15 min) at the start "
        + "/".join(f"{x:.2f}" for x in info["loadavg_start"])
        + (", at the end " + "/".join(f"{x:.2f}" for x in info["loadavg_end"]) if "loadavg_end" in info else "")
        + " (other work on the machine skews the figures).",
        f"TCP congestion control: {info.get('tcp_congestion', '?')} (the system's); the bento server and SDK "
        "use cubic or reno on connections from this host (docs/operations.md), the bench's own clients and "
        "the bare ws ceiling keep the system's.",
    ])


@dataclass
class Budget:
    """How big each measurement is in one mode."""

    mode: str
    spawn_runs: int
    first_output_runs: int
    cold_runs: int
    echo_rtts: int
    stream_runs: int
    stream_bytes: int          # per run, 64 KiB frames
    small_frames: int          # per run, 100-byte frames
    reattach_runs: int
    sessions: int
    loaded_echo_rtts: int
    memory_sample: int         # sessions whose exchange/environment memory is read
    backlog_bytes: int
    first_output_pause: float = 0.2   # seconds between executes of the first-output rows
    extra: dict[str, Any] = field(default_factory=dict)


BUDGETS = {
    "full": Budget("full", spawn_runs=30, first_output_runs=30, cold_runs=15, echo_rtts=2000,
                   stream_runs=5, stream_bytes=256 * MiB, small_frames=200_000, reattach_runs=30,
                   sessions=1000, loaded_echo_rtts=500, memory_sample=100, backlog_bytes=1024 * MiB,
                   extra={"b2b_rate": 20.0, "b2b_seconds": 60.0}),
    "quick": Budget("quick", spawn_runs=20, first_output_runs=15, cold_runs=8, echo_rtts=500,
                    stream_runs=3, stream_bytes=64 * MiB, small_frames=50_000, reattach_runs=15,
                    sessions=100, loaded_echo_rtts=200, memory_sample=50, backlog_bytes=128 * MiB,
                    extra={"b2b_rate": 20.0, "b2b_seconds": 15.0}),
    "smoke": Budget("smoke", spawn_runs=5, first_output_runs=5, cold_runs=3, echo_rtts=100,
                    stream_runs=2, stream_bytes=8 * MiB, small_frames=10_000, reattach_runs=5,
                    sessions=20, loaded_echo_rtts=50, memory_sample=20, backlog_bytes=16 * MiB,
                    extra={"b2b_rate": 20.0, "b2b_seconds": 2.0}),
}


def busy_cores(window: float) -> float:
    """Cores this machine kept busy over ``window`` seconds (from /proc/stat).

    Busy is user, nice, system, irq and softirq time; steal (the host's) and
    guest (already inside user) are not counted. The counters tick 100 times a
    second: over 0.2 s one tick is 0.05 cores on any number of CPUs."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:9]]  # up to steal
        busy = vals[0] + vals[1] + vals[2] + vals[5] + vals[6]
        return busy, sum(vals)

    busy0, total0 = sample()
    time.sleep(window)
    busy1, total1 = sample()
    ncpu = os.cpu_count() or 1
    return ncpu * (busy1 - busy0) / max(1, total1 - total0)


def settle(max_busy: float = 0.15, window: float = 0.2, timeout: float = 3.0) -> bool:
    """Wait until the machine is quiet (at most ``max_busy`` cores busy over one
    ``window``), at most ``timeout`` seconds: what a finished run leaves behind
    (an exchange deleting a 256 MiB log, the warm pool starting a sandbox) must
    not land in the next measurement, a figure's or its ceiling's. False if
    the machine did not quieten in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if busy_cores(window) <= max_busy:
            return True
    return False
