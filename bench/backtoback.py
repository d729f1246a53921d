"""Back-to-back executes at a paced rate: does the warm pool keep up?

One client starts an execute every ``1 / rate`` seconds (or at once, when the
previous one took longer), each waiting for its session's exit (and its
destroy) before the next. The figure is execute -> first output of each; its
ceiling is the isolated warm figure of the same run (one execute every
~200 ms, the pool full each time), so the ratio says what a sustained rate
costs over an execute that finds the pool full.

The server is started with its defaults for the pool: the row measures what
an operator gets without tuning.
"""

from __future__ import annotations

import statistics

import chain
import trio
from client import now, open_client

MS = 1000.0

# key, name, unit, higher_is_better, target
ROW_SPECS: list[tuple[str, str, str, bool, str]] = [
    ("b2b", "back-to-back executes: ->first output", "ms", False, "p50 <= 5 ms"),
]
KEYS = [spec[0] for spec in ROW_SPECS]


async def paced(url: str, rate: float, seconds: float, warmup: int = 2) -> tuple[list[float], float]:
    """(first-output seconds of each execute after ``warmup``, the achieved
    execute rate per second). Paced from the first measured execute on; an
    execute that falls behind its slot starts at once (no catching up by bursts
    beyond that: the next slot is measured from the schedule, not the late start)."""
    out: list[float] = []
    async with open_client(url) as c:
        for _ in range(warmup):
            await chain.first_output_once(c)
            await trio.sleep(0.2)
        n = max(1, round(rate * seconds))
        t0 = now()
        for i in range(n):
            slot = t0 + i / rate
            wait = slot - now()
            if wait > 0:
                await trio.sleep(wait)
            out.append(await chain.first_output_once(c))
        elapsed = now() - t0
    return out, n / elapsed if elapsed > 0 else 0.0


def stage(bench) -> None:  # type: ignore[no-untyped-def]
    """Measure the row on a bwrap server of default pool settings (bench/run.py's Bench)."""
    b = bench.b
    rate, seconds = b.extra.get("b2b_rate", 20.0), b.extra.get("b2b_seconds", 60.0)
    with bench.running("bwrap") as srv:
        xs, achieved = trio.run(paced, srv.url, rate, seconds)
    row = bench.rows["b2b"]
    row.set([x * MS for x in xs])
    row.note = (f"{rate:g} executes/s asked for {seconds:g} s, {achieved:.1f}/s reached; each waits "
                "for its session's exit and destroy; server with its default pool settings")
    bench.log(f"    back-to-back p50 {statistics.median(xs) * MS:.1f} ms, p90 "
              f"{row.p90 or 0:.1f} ms at {achieved:.1f}/s")


def set_ceilings(bench) -> None:  # type: ignore[no-untyped-def]
    """The isolated warm first output of the same run is this row's ceiling."""
    warm = bench.rows["first_bwrap"]
    row = bench.rows["b2b"]
    if warm.p50 is not None:
        row.ceiling = warm.p50
        row.ceiling_name = (f"isolated warm first output (bwrap, one execute every ~200 ms) = "
                            f"{warm.p50:.2f} ms")
    row.judge(lambda x: x <= 5)


def main(argv: list[str] | None = None) -> int:
    """This row alone, next to its ceiling, on a server with the given extra options:
    ``python bench/backtoback.py [--rate R] [--seconds S] [-- SERVER OPTIONS]``."""
    import argparse
    import os
    import shutil
    import tempfile

    from helpers import ServerProcess

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--rate", type=float, default=20.0)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--isolated", type=int, default=30, help="executes ~200 ms apart for the ceiling")
    ap.add_argument("server", nargs="*", help="extra server options (after --)")
    args = ap.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="bento-b2b-")
    srv = ServerProcess(os.path.join(tmp, "data"), "--sandbox", "bwrap", "--max-sessions", "100000",
                        "--memory-budget", "100T", *args.server)
    try:
        srv.start()
        iso = trio.run(chain.first_output, srv.url, args.isolated, 2, 0.2)
        xs, achieved = trio.run(paced, srv.url, args.rate, args.seconds)
    finally:
        srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    q = sorted(xs)
    print(f"isolated warm first output p50 {statistics.median(iso) * MS:.2f} ms (n={len(iso)}); "
          f"back-to-back at {achieved:.1f}/s: p50 {statistics.median(xs) * MS:.2f} ms, "
          f"p90 {q[int(0.9 * (len(q) - 1))] * MS:.2f} ms, max {q[-1] * MS:.1f} ms (n={len(xs)}); "
          f"server options {args.server}")
    return 0


if __name__ == "__main__":
    import os
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:0] = [here, os.path.join(os.path.dirname(here), "tests"), os.path.dirname(here)]
    sys.exit(main())
